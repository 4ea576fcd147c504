//! candle's one-test-every-device pattern: a test body takes a [`TestDevice`] and runs unchanged on the CPU
//! backend and, where a GPU is usable, on the CUDA backend, through the one public way in
//! ([`specdec::backend::Backend`]). A family lists its bodies once (`greedy_tests!`); its `_cpu` test file
//! runs them on the CPU and its `_gpu` file on device 0.
//!
//! Arrays are made with [`TestDevice::upload`] and read back with [`Array::download`]; device arrays carry
//! one spare element past their length, poisoned, and `download` fails the test if a kernel wrote it.
// Without the `cuda` feature every array is a host array and the stream arguments go unused.
#![cfg_attr(not(feature = "cuda"), allow(unused_variables))]

#[cfg(feature = "cuda")]
use std::sync::Arc;

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use specdec::backend::{Backend, In, Out, Stream};
#[cfg(feature = "cuda")]
use specdec::cuda::{DeviceIn, DeviceOut};

/// Declares one `#[test]` per body of `common::$module`, each running that body on `$device` (an
/// `Option<TestDevice>`, evaluated per test; `None` skips: `TestDevice::cuda` has printed why).
#[macro_export]
macro_rules! device_tests {
    ($device:expr; $module:ident => $($body:ident),* $(,)?) => {
        $(
            #[test]
            fn $body() {
                let device: Option<common::device::TestDevice> = $device;
                if let Some(device) = device {
                    common::$module::$body(&device);
                }
            }
        )*
    };
}

/// A backend and, for CUDA, the stream the test's work and copies run on.
pub struct TestDevice {
    pub backend: Backend,
    #[cfg(feature = "cuda")]
    stream: Option<Arc<CudaStream>>,
}

/// Element types the tests move between host and device.
#[cfg(feature = "cuda")]
pub trait Element: Copy + DeviceRepr + Default + PartialEq + std::fmt::Debug {}
#[cfg(feature = "cuda")]
impl<T: Copy + DeviceRepr + Default + PartialEq + std::fmt::Debug> Element for T {}
#[cfg(not(feature = "cuda"))]
pub trait Element: Copy + Default + PartialEq + std::fmt::Debug {}
#[cfg(not(feature = "cuda"))]
impl<T: Copy + Default + PartialEq + std::fmt::Debug> Element for T {}

/// An array in a test device's memory.
pub enum Array<T> {
    Host(Vec<T>),
    #[cfg(feature = "cuda")]
    Device {
        /// `len` elements then one poisoned spare.
        slice: CudaSlice<T>,
        len: usize,
        spare: T,
    },
}

impl TestDevice {
    pub fn cpu() -> Self {
        TestDevice {
            backend: Backend::Cpu,
            #[cfg(feature = "cuda")]
            stream: None,
        }
    }

    /// Device 0 on a fresh stream, or `None` after printing why `test` is skipped.
    #[cfg(feature = "cuda")]
    pub fn cuda(test: &str) -> Option<Self> {
        let cuda = super::gpu(test)?;
        let stream = cuda.context().new_stream().unwrap();
        Some(TestDevice {
            backend: Backend::Cuda(cuda),
            stream: Some(stream),
        })
    }

    pub fn name(&self) -> String {
        self.backend.name()
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self.backend, Backend::Cpu)
    }

    /// The stream to pass to the backend.
    pub fn stream(&self) -> Stream<'_> {
        #[cfg(feature = "cuda")]
        if let Some(stream) = &self.stream {
            return Stream::Cuda(stream);
        }
        Stream::Default
    }

    /// A copy of `data` in this device's memory; on a device, followed by one spare element set to `spare`.
    pub fn upload_with_spare<T: Element>(&self, data: &[T], spare: T) -> Array<T> {
        #[cfg(feature = "cuda")]
        if let Some(stream) = &self.stream {
            let mut padded = data.to_vec();
            padded.push(spare);
            return Array::Device {
                slice: stream.clone_htod(&padded).unwrap(),
                len: data.len(),
                spare,
            };
        }
        let _ = spare;
        Array::Host(data.to_vec())
    }

    /// A copy of `data` in this device's memory.
    pub fn upload<T: Element>(&self, data: &[T]) -> Array<T> {
        self.upload_with_spare(data, T::default())
    }

    /// Waits for the work enqueued so far.
    pub fn synchronize(&self) {
        #[cfg(feature = "cuda")]
        if let Some(stream) = &self.stream {
            stream.synchronize().unwrap();
        }
    }
}

impl<T: Element> Array<T> {
    /// A view to read. Device views are raw pointers into the array, used on the device's one stream (which
    /// orders every upload, launch and download of a test), and borrow the array for their life.
    pub fn input(&self) -> In<'_, T> {
        match self {
            Array::Host(data) => In::Host(data),
            #[cfg(feature = "cuda")]
            Array::Device { slice, len, .. } => {
                let ptr = raw_address(slice);
                // SAFETY: `len` initialised elements of the live allocation, borrowed for the view's life.
                In::Device(unsafe { DeviceIn::from_raw(ptr, *len) })
            }
        }
    }

    /// A view to read of the elements from `offset` on.
    pub fn input_from(&self, offset: usize) -> In<'_, T> {
        match self {
            Array::Host(data) => In::Host(&data[offset..]),
            #[cfg(feature = "cuda")]
            Array::Device { slice, len, .. } => {
                assert!(offset <= *len);
                let ptr = raw_address(slice) + (offset * std::mem::size_of::<T>()) as u64;
                // SAFETY: as in `input`, from element `offset` on.
                In::Device(unsafe { DeviceIn::from_raw(ptr, *len - offset) })
            }
        }
    }

    /// A view to write (see [`Array::input`]).
    pub fn output(&mut self) -> Out<'_, T> {
        match self {
            Array::Host(data) => Out::Host(data),
            #[cfg(feature = "cuda")]
            Array::Device { slice, len, .. } => {
                let ptr = raw_address(slice);
                // SAFETY: as in `input`, borrowed mutably.
                Out::Device(unsafe { DeviceOut::from_raw(ptr, *len) })
            }
        }
    }

    /// The array's contents, after the work enqueued on `device` so far; fails the test if a kernel wrote the
    /// spare element past the end.
    pub fn download(&self, device: &TestDevice) -> Vec<T> {
        match self {
            Array::Host(data) => data.clone(),
            #[cfg(feature = "cuda")]
            Array::Device { slice, len, spare } => {
                let stream = device
                    .stream
                    .as_ref()
                    .expect("a CUDA test device has a stream");
                let mut all = stream.clone_dtoh(slice).unwrap();
                assert_eq!(all[*len], *spare, "a kernel wrote past the end of an array");
                all.truncate(*len);
                all
            }
        }
    }
}

/// The device address of a cudarc allocation, without stream tracking: a test device runs everything on one
/// stream.
#[cfg(feature = "cuda")]
fn raw_address<T>(slice: &CudaSlice<T>) -> cudarc::driver::sys::CUdeviceptr {
    use cudarc::driver::DevicePtr;
    let (ptr, _record) = slice.device_ptr(slice.stream());
    ptr
}
