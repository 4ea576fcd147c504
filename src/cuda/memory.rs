//! Device arrays handed to specdec (borrowed, never freed) and the scratch memory it allocates in stream order.

use std::marker::PhantomData;

use cudarc::driver::{result, sys, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use super::cuda_error;
use crate::error::{Error, Result};

/// A device array a kernel reads: `len` elements of `T`. specdec never frees it.
pub struct DeviceIn<'a, T> {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) len: usize,
    _sync: Option<SyncOnDrop<'a>>,
    _borrow: PhantomData<&'a [T]>,
}

/// A device array a kernel writes: `len` elements of `T`. specdec never frees it.
pub struct DeviceOut<'a, T> {
    pub(crate) ptr: sys::CUdeviceptr,
    pub(crate) len: usize,
    _sync: Option<SyncOnDrop<'a>>,
    _borrow: PhantomData<&'a mut [T]>,
}

impl<'a, T> DeviceIn<'a, T> {
    /// Borrows a cudarc slice or view to be read on `stream`. cudarc's stream tracking is honoured: `stream`
    /// waits for earlier writes of the buffer, and the read is recorded once the call has been launched.
    pub fn new<S: DevicePtr<T>>(buffer: &'a S, stream: &'a CudaStream) -> Self {
        let (ptr, sync) = buffer.device_ptr(stream);
        DeviceIn {
            ptr,
            len: buffer.len(),
            _sync: Some(sync),
            _borrow: PhantomData,
        }
    }

    /// Borrows memory specdec knows nothing about: a pointer from PyTorch, an engine, or another allocator.
    ///
    /// # Safety
    ///
    /// `ptr` must point to `len` initialised elements of `T` in memory accessible from the device's primary
    /// context (ordinary device memory of that device, or memory mapped into it), stay valid and unmodified
    /// until the work launched with it has finished on its stream, and be aligned for `T`. A null `ptr` is
    /// allowed only when `len` is 0.
    pub unsafe fn from_raw(ptr: sys::CUdeviceptr, len: usize) -> Self {
        DeviceIn {
            ptr,
            len,
            _sync: None,
            _borrow: PhantomData,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The device address, for APIs that take raw pointers.
    pub fn as_raw(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a, T> DeviceOut<'a, T> {
    /// Borrows a cudarc slice or view to be written on `stream`; see [`DeviceIn::new`].
    pub fn new<S: DevicePtrMut<T>>(buffer: &'a mut S, stream: &'a CudaStream) -> Self {
        let len = buffer.len();
        let (ptr, sync) = buffer.device_ptr_mut(stream);
        DeviceOut {
            ptr,
            len,
            _sync: Some(sync),
            _borrow: PhantomData,
        }
    }

    /// Borrows memory specdec knows nothing about, to be written.
    ///
    /// # Safety
    ///
    /// As [`DeviceIn::from_raw`], and nothing else may read or write the memory until the work launched with
    /// it has finished on its stream.
    pub unsafe fn from_raw(ptr: sys::CUdeviceptr, len: usize) -> Self {
        DeviceOut {
            ptr,
            len,
            _sync: None,
            _borrow: PhantomData,
        }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The device address, for APIs that take raw pointers.
    pub fn as_raw(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Checks that a device array the kernels will touch is non-null (unless empty) and aligned for its elements.
pub(crate) fn check_device_ptr(
    argument: &str,
    ptr: sys::CUdeviceptr,
    len: usize,
    align: usize,
) -> Result<()> {
    if len > 0 && ptr == 0 {
        return Err(Error::invalid(
            argument,
            format!("is a null pointer but has {len} elements"),
        ));
    }
    if !ptr.is_multiple_of(align as u64) {
        return Err(Error::invalid(
            argument,
            format!("pointer {ptr:#x} is not aligned to {align} bytes"),
        ));
    }
    Ok(())
}

/// Scratch memory allocated in stream order on the caller's stream and freed in stream order after the work
/// that uses it: no synchronisation, safe when several streams run at once, and capturable in a CUDA graph.
pub(crate) struct StreamScratch {
    ptr: sys::CUdeviceptr,
    stream: sys::CUstream,
}

impl StreamScratch {
    pub(crate) fn alloc(stream: sys::CUstream, bytes: usize) -> Result<Self> {
        // SAFETY: the device's context is bound by the caller; the memory is only used on `stream`.
        let ptr = unsafe { result::malloc_async(stream, bytes.max(1)) }
            .map_err(|e| cuda_error("cuMemAllocAsync", e))?;
        Ok(StreamScratch { ptr, stream })
    }

    pub(crate) fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    /// Frees the memory after the work enqueued so far on the stream.
    pub(crate) fn free(self) -> Result<()> {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: allocated on this stream by `alloc`, freed once.
        unsafe { result::free_async(this.ptr, this.stream) }
            .map_err(|e| cuda_error("cuMemFreeAsync", e))
    }
}

impl Drop for StreamScratch {
    /// On an error path: free in stream order, ignoring a failure there (the first error is what is reported).
    fn drop(&mut self) {
        // SAFETY: as in `free`.
        let _ = unsafe { result::free_async(self.ptr, self.stream) };
    }
}
