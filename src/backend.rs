//! The backend contract: one way to call every primitive on the CPU or on a CUDA device.
//!
//! A [`Backend`] is where a primitive runs. Each primitive family has one input struct and one output struct
//! (for greedy verification, [`crate::greedy::GreedyInputs`] and [`crate::greedy::GreedyOutputs`]) whose
//! arrays are [`In`] and [`Out`] views of host or device memory; the family's method on [`Backend`] checks
//! sizes and lengths once, in the family module, then runs the CPU reference or launches the kernels. The C
//! ABI, the main job (`examples/bench.rs`) and the tests all call through here, so the three cannot drift.
//!
//! * [`Backend::Cpu`] takes host arrays ([`In::Host`], made from a slice with `.into()`) and ignores the
//!   stream. Per-request results are complete when the call returns.
//! * [`Backend::Cuda`] takes device arrays ([`In::Device`]: a [`crate::cuda::DeviceIn`] borrowing a cudarc
//!   buffer, or raw memory from another runtime), enqueues the work on the [`Stream`] and returns without
//!   waiting.
//!
//! An array in the wrong memory for the backend, a null or misaligned device pointer, or a length that does
//! not fit the sizes is an [`Error::InvalidArgument`] naming the array, before anything runs.
//!
//! ```
//! use specdec::backend::{Backend, Stream};
//! use specdec::greedy::{GreedyInputs, GreedyOutputs};
//!
//! // One request over a vocabulary of 3 drafted [2]: the target agrees at position 0, then says 1.
//! let logits = [0.0f32, 0.0, 5.0, 0.0, 4.0, 0.0];
//! let (mut accepted, mut emitted) = ([0i32], [0i32; 2]);
//! let inputs = GreedyInputs {
//!     logits: logits[..].into(),
//!     vocab_size: 3,
//!     draft_offsets: [0, 1][..].into(),
//!     draft_tokens: [2][..].into(),
//! };
//! let outputs = GreedyOutputs {
//!     emit_width: 2,
//!     accepted_counts: accepted[..].as_mut().into(),
//!     emitted_tokens: emitted[..].as_mut().into(),
//!     request_status: None,
//! };
//! Backend::Cpu.greedy_verify(Stream::Default, &inputs, outputs)?;
//! assert_eq!((accepted, emitted), ([1], [2, 1]));
//! # Ok::<(), specdec::Error>(())
//! ```
// Built without the `cuda` feature every array is host memory: the wrong-memory errors and the argument names
// they carry go unused.
#![cfg_attr(not(feature = "cuda"), allow(unused_variables, dead_code))]

use crate::error::{Error, Result};

#[cfg(feature = "cuda")]
use crate::cuda::{CudaBackend, DeviceIn, DeviceOut};
#[cfg(feature = "cuda")]
use cudarc::driver::{sys, CudaStream};

/// Where a primitive runs.
#[derive(Clone)]
pub enum Backend {
    /// The CPU reference implementations ([`crate::cpu`]), on host memory.
    Cpu,
    /// specdec's kernels on one CUDA device, on device memory.
    #[cfg(feature = "cuda")]
    Cuda(CudaBackend),
}

/// The memory a backend's arrays live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// Host memory (the CPU backend).
    Host,
    /// Device memory of a CUDA device, or memory mapped into it.
    Device,
}

impl Memory {
    fn describe(self) -> &'static str {
        match self {
            Memory::Host => "host memory",
            Memory::Device => "device memory",
        }
    }
}

impl Backend {
    /// The memory this backend's arrays must live in.
    pub fn memory(&self) -> Memory {
        match self {
            Backend::Cpu => Memory::Host,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => Memory::Device,
        }
    }

    /// A short name for logs and reports: `"cpu"` or `"cuda:N"`.
    pub fn name(&self) -> String {
        match self {
            Backend::Cpu => "cpu".to_string(),
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => format!("cuda:{}", cuda.ordinal()),
        }
    }

    /// The raw stream to launch on; checks that a cudarc stream belongs to this backend's device.
    #[cfg(feature = "cuda")]
    pub(crate) fn cu_stream(cuda: &CudaBackend, stream: Stream<'_>) -> Result<sys::CUstream> {
        match stream {
            Stream::Default => Ok(std::ptr::null_mut()),
            Stream::Cuda(stream) => {
                cuda.check_stream(stream)?;
                Ok(stream.cu_stream())
            }
            Stream::Raw(RawStream(stream)) => Ok(stream),
        }
    }
}

/// The stream a CUDA backend enqueues work on; the CPU backend ignores it.
///
/// cudarc tracks the arrays it hands out ([`crate::cuda::DeviceIn::new`]) per stream: run a call on the stream
/// its arrays were borrowed for (`Stream::Cuda(&stream)`), or order the streams yourself.
#[derive(Clone, Copy, Default)]
pub enum Stream<'a> {
    /// The legacy default stream (a null `CUstream`), or no stream on the CPU.
    #[default]
    Default,
    /// A cudarc stream; it must belong to the backend's device.
    #[cfg(feature = "cuda")]
    Cuda(&'a CudaStream),
    /// A raw `CUstream` / `cudaStream_t` of another runtime (PyTorch, an engine), made by the unsafe
    /// [`Stream::from_raw`].
    #[cfg(feature = "cuda")]
    Raw(RawStream),
    #[doc(hidden)]
    #[cfg(not(feature = "cuda"))]
    _Unused(std::marker::PhantomData<&'a ()>),
}

/// A raw stream handle, only made by [`Stream::from_raw`] (whose contract makes the launch sound).
#[cfg(feature = "cuda")]
#[derive(Clone, Copy, Debug)]
pub struct RawStream(sys::CUstream);

#[cfg(feature = "cuda")]
impl Stream<'static> {
    /// A stream of another runtime, such as PyTorch's `torch.cuda.current_stream().cuda_stream`.
    ///
    /// # Safety
    /// `stream` must be null (the legacy default stream) or a live `CUstream` / `cudaStream_t` of the device's
    /// primary context, for every call it is passed to. Arrays borrowed through cudarc
    /// ([`crate::cuda::DeviceIn::new`]) are synchronised by cudarc on the stream they were borrowed for, not
    /// on this one: order their work with this stream yourself.
    pub unsafe fn from_raw(stream: sys::CUstream) -> Self {
        Stream::Raw(RawStream(stream))
    }
}

#[cfg(feature = "cuda")]
impl<'a> From<&'a CudaStream> for Stream<'a> {
    fn from(stream: &'a CudaStream) -> Self {
        Stream::Cuda(stream)
    }
}

/// An array a primitive reads: `len` elements of `T` in host or device memory.
pub enum In<'a, T> {
    /// Host memory, for [`Backend::Cpu`].
    Host(&'a [T]),
    /// Device memory, for [`Backend::Cuda`].
    #[cfg(feature = "cuda")]
    Device(DeviceIn<'a, T>),
}

/// An array a primitive writes: `len` elements of `T` in host or device memory.
pub enum Out<'a, T> {
    /// Host memory, for [`Backend::Cpu`].
    Host(&'a mut [T]),
    /// Device memory, for [`Backend::Cuda`].
    #[cfg(feature = "cuda")]
    Device(DeviceOut<'a, T>),
}

fn wrong_memory(argument: &str, found: Memory, expected: Memory) -> Error {
    Error::invalid(
        argument,
        format!(
            "is {} but the backend takes {}",
            found.describe(),
            expected.describe()
        ),
    )
}

impl<'a, T> In<'a, T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            In::Host(slice) => slice.len(),
            #[cfg(feature = "cuda")]
            In::Device(array) => array.len(),
        }
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memory the array lives in.
    pub fn memory(&self) -> Memory {
        match self {
            In::Host(_) => Memory::Host,
            #[cfg(feature = "cuda")]
            In::Device(_) => Memory::Device,
        }
    }

    /// The host slice, or an error naming `argument` if the array is device memory.
    pub(crate) fn host(&self, argument: &str) -> Result<&'a [T]> {
        match self {
            In::Host(slice) => Ok(slice),
            #[cfg(feature = "cuda")]
            In::Device(_) => Err(wrong_memory(argument, Memory::Device, Memory::Host)),
        }
    }

    /// The device address, checked non-null (unless empty) and aligned for `T`, or an error naming
    /// `argument` if the array is host memory.
    #[cfg(feature = "cuda")]
    pub(crate) fn device(&self, argument: &str) -> Result<sys::CUdeviceptr> {
        match self {
            In::Device(array) => {
                crate::cuda::check_device_ptr(argument, array.ptr, array.len, align_of::<T>())?;
                Ok(array.ptr)
            }
            In::Host(_) => Err(wrong_memory(argument, Memory::Host, Memory::Device)),
        }
    }
}

impl<'a, T> Out<'a, T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Out::Host(slice) => slice.len(),
            #[cfg(feature = "cuda")]
            Out::Device(array) => array.len(),
        }
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The memory the array lives in.
    pub fn memory(&self) -> Memory {
        match self {
            Out::Host(_) => Memory::Host,
            #[cfg(feature = "cuda")]
            Out::Device(_) => Memory::Device,
        }
    }

    /// The host slice, or an error naming `argument` if the array is device memory.
    pub(crate) fn host(self, argument: &str) -> Result<&'a mut [T]> {
        match self {
            Out::Host(slice) => Ok(slice),
            #[cfg(feature = "cuda")]
            Out::Device(_) => Err(wrong_memory(argument, Memory::Device, Memory::Host)),
        }
    }

    /// The host slice, borrowed, or an error naming `argument` if the array is device memory.
    pub(crate) fn host_mut(&mut self, argument: &str) -> Result<&mut [T]> {
        match self {
            Out::Host(slice) => Ok(slice),
            #[cfg(feature = "cuda")]
            Out::Device(_) => Err(wrong_memory(argument, Memory::Device, Memory::Host)),
        }
    }

    /// The device address, checked non-null (unless empty) and aligned for `T`, or an error naming
    /// `argument` if the array is host memory.
    #[cfg(feature = "cuda")]
    pub(crate) fn device(&self, argument: &str) -> Result<sys::CUdeviceptr> {
        match self {
            Out::Device(array) => {
                crate::cuda::check_device_ptr(argument, array.ptr, array.len, align_of::<T>())?;
                Ok(array.ptr)
            }
            Out::Host(_) => Err(wrong_memory(argument, Memory::Host, Memory::Device)),
        }
    }
}

/// The host slice of an optional output array.
pub(crate) fn optional_host<'a, T>(
    array: Option<Out<'a, T>>,
    argument: &str,
) -> Result<Option<&'a mut [T]>> {
    array.map(|array| array.host(argument)).transpose()
}

/// The device address of an optional output array, 0 when absent.
#[cfg(feature = "cuda")]
pub(crate) fn optional_device<T>(
    array: &Option<Out<'_, T>>,
    argument: &str,
) -> Result<sys::CUdeviceptr> {
    array.as_ref().map_or(Ok(0), |array| array.device(argument))
}

impl<'a, T> From<&'a [T]> for In<'a, T> {
    fn from(slice: &'a [T]) -> Self {
        In::Host(slice)
    }
}

impl<'a, T> From<&'a Vec<T>> for In<'a, T> {
    fn from(vec: &'a Vec<T>) -> Self {
        In::Host(vec)
    }
}

impl<'a, T, const N: usize> From<&'a [T; N]> for In<'a, T> {
    fn from(array: &'a [T; N]) -> Self {
        In::Host(array)
    }
}

impl<'a, T, const N: usize> From<&'a mut [T; N]> for Out<'a, T> {
    fn from(array: &'a mut [T; N]) -> Self {
        Out::Host(array)
    }
}

impl<'a, T> From<&'a mut [T]> for Out<'a, T> {
    fn from(slice: &'a mut [T]) -> Self {
        Out::Host(slice)
    }
}

impl<'a, T> From<&'a mut Vec<T>> for Out<'a, T> {
    fn from(vec: &'a mut Vec<T>) -> Self {
        Out::Host(vec)
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<DeviceIn<'a, T>> for In<'a, T> {
    fn from(array: DeviceIn<'a, T>) -> Self {
        In::Device(array)
    }
}

#[cfg(feature = "cuda")]
impl<'a, T> From<DeviceOut<'a, T>> for Out<'a, T> {
    fn from(array: DeviceOut<'a, T>) -> Self {
        Out::Device(array)
    }
}
