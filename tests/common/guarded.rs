//! Device buffers with poisoned margins: a kernel writing outside its array is caught.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use specdec::cuda::DeviceOut;

pub const MARGIN: usize = 64;

/// A device buffer of `len` elements with `MARGIN` poisoned elements on each side.
pub struct Guarded<T> {
    buffer: CudaSlice<T>,
    len: usize,
    poison: T,
}

impl<T: DeviceRepr + ValidAsZeroBits + bytemuck::Pod> Guarded<T> {
    pub fn new(stream: &Arc<CudaStream>, len: usize, poison: T) -> Self {
        Guarded {
            buffer: stream.clone_htod(&vec![poison; len + 2 * MARGIN]).unwrap(),
            len,
            poison,
        }
    }

    /// A guarded buffer holding `contents` between the poisoned margins.
    pub fn with_contents(stream: &Arc<CudaStream>, contents: &[T], poison: T) -> Self {
        let mut all = vec![poison; contents.len() + 2 * MARGIN];
        all[MARGIN..MARGIN + contents.len()].copy_from_slice(contents);
        Guarded {
            buffer: stream.clone_htod(&all).unwrap(),
            len: contents.len(),
            poison,
        }
    }

    pub fn out<'a>(&'a mut self, stream: &'a Arc<CudaStream>) -> DeviceOut<'a, T> {
        let (ptr, _sync) = self.buffer.device_ptr_mut(stream);
        // SAFETY: the middle `len` elements of a live buffer, used only on `stream`.
        unsafe { DeviceOut::from_raw(ptr + (MARGIN * size_of::<T>()) as u64, self.len) }
    }

    /// The middle `len` elements, after checking both margins are still poison (compared bit for bit).
    pub fn read(&self, stream: &Arc<CudaStream>, what: &str) -> Vec<T> {
        let all = stream.clone_dtoh(&self.buffer).unwrap();
        assert!(
            all[..MARGIN]
                .iter()
                .chain(&all[MARGIN + self.len..])
                .all(|v| bytemuck::bytes_of(v) == bytemuck::bytes_of(&self.poison)),
            "{what}: wrote outside its array"
        );
        all[MARGIN..MARGIN + self.len].to_vec()
    }
}
