//! The CUDA backend: specdec's kernels on a caller's device memory and stream.
//!
//! * The device's **primary context** is used: the one PyTorch, vLLM and other runtime-API engines use, so
//!   their pointers and streams are valid here as they are.
//! * The caller's current context is left as it was: every call pushes the device's context and pops it.
//! * Each kernel module (one per `cuda/*.cu` file) is loaded once per device, on first use, from the fatbin
//!   embedded in the library.
//! * Work is launched on the caller's stream. specdec never owns, synchronises or frees the stream or the
//!   caller's memory; scratch memory it needs is allocated and freed in stream order on that stream
//!   (`cuMemAllocAsync`), which is also safe under CUDA graph capture.
//! * libcuda is looked for before any driver call (cudarc would panic without it), and every failure is an
//!   [`Error`]: no driver, no device, an unsupported architecture, a CUDA error with its name.
//!
//! Calls go through [`crate::backend::Backend::Cuda`] with device arrays ([`DeviceIn`], [`DeviceOut`]):
//!
//! ```no_run
//! use specdec::backend::{Backend, Stream};
//! use specdec::cuda::{CudaBackend, DeviceIn, DeviceOut};
//! use specdec::greedy::{GreedyInputs, GreedyOutputs};
//! # fn main() -> specdec::Result<()> {
//! let cuda = CudaBackend::new(0)?;
//! let stream = cuda.context().default_stream();
//! let logits = stream.clone_htod(&vec![0.5f32; 3 * 8]).unwrap(); // [rows = 2 drafts + 1 request, V = 8]
//! let offsets = stream.clone_htod(&[0i32, 2]).unwrap();
//! let drafts = stream.clone_htod(&[0i32, 0]).unwrap();
//! let mut accepted = stream.alloc_zeros::<i32>(1).unwrap();
//! let mut emitted = stream.alloc_zeros::<i32>(3).unwrap();
//! let inputs = GreedyInputs {
//!     logits: DeviceIn::new(&logits, &stream).into(),
//!     vocab_size: 8,
//!     draft_offsets: DeviceIn::new(&offsets, &stream).into(),
//!     draft_tokens: DeviceIn::new(&drafts, &stream).into(),
//! };
//! let outputs = GreedyOutputs {
//!     emit_width: 3,
//!     accepted_counts: DeviceOut::new(&mut accepted, &stream).into(),
//!     emitted_tokens: DeviceOut::new(&mut emitted, &stream).into(),
//!     request_status: None,
//! };
//! Backend::Cuda(cuda.clone()).greedy_verify(Stream::Cuda(&stream), &inputs, outputs)?;
//! assert_eq!(stream.clone_dtoh(&accepted).unwrap(), [2]); // all-equal rows: argmax 0 everywhere
//! # Ok(()) }
//! ```

pub(crate) mod attention;
pub(crate) mod greedy;
pub(crate) mod int4;
mod memory;
mod module;
mod params;
pub(crate) mod sampling;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};

use crate::error::{Error, Result};
pub use attention::MAX_COMPACTION_LAYERS;
pub(crate) use memory::check_device_ptr;
pub use memory::{DeviceIn, DeviceOut};
pub use module::{COMPILED_ARCHS, KERNELS_COMPILED};

/// specdec's kernels on one CUDA device. Cheap to clone; safe to use from several threads at once.
#[derive(Clone)]
pub struct CudaBackend {
    device: Arc<Device>,
}

/// What specdec keeps per device, for the life of the process: the retained primary context, its properties,
/// and the kernel functions loaded so far.
struct Device {
    ctx: Arc<CudaContext>,
    ordinal: usize,
    multiprocessors: u32,
    loaded: Mutex<Loaded>,
}

/// Modules loaded so far (by kernel family) and functions looked up so far (by kernel name). Modules are never
/// unloaded, so their handles stay valid for the life of the process; the driver allows their use from any
/// thread.
#[derive(Default)]
struct Loaded {
    modules: HashMap<&'static str, sys::CUmodule>,
    functions: HashMap<&'static str, sys::CUfunction>,
}
// SAFETY: see above; the handles are plain driver handles usable from any thread.
unsafe impl Send for Loaded {}

impl CudaBackend {
    /// The backend for device `ordinal`. The first call per device retains its primary context and checks its
    /// architecture; later calls return the same backend.
    pub fn new(ordinal: usize) -> Result<Self> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
        if !KERNELS_COMPILED {
            return Err(Error::KernelsNotCompiled);
        }
        // SAFETY: only probes whether the library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoDriver);
        }
        let mut devices = DEVICES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(device) = devices.get(&ordinal) {
            return Ok(CudaBackend {
                device: device.clone(),
            });
        }
        let device = Arc::new(Device::open(ordinal)?);
        devices.insert(ordinal, device.clone());
        Ok(CudaBackend { device })
    }

    /// The cudarc context (the device's primary context), to allocate memory and make streams with.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.device.ctx
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.device.ordinal
    }

    /// The device's name as the driver reports it.
    pub fn device_name(&self) -> Result<String> {
        self.device
            .ctx
            .name()
            .map_err(|e| cuda_error("cuDeviceGetName", e))
    }

    /// The number of streaming multiprocessors.
    pub fn multiprocessors(&self) -> u32 {
        self.device.multiprocessors
    }

    pub(crate) fn check_stream(&self, stream: &CudaStream) -> Result<()> {
        if stream.context().cu_ctx() == self.device.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::invalid(
                "stream",
                format!(
                    "belongs to device {}, not {}",
                    stream.context().ordinal(),
                    self.ordinal()
                ),
            ))
        }
    }

    /// Makes the device's context current for the guard's life, restoring the caller's afterwards.
    fn bind(&self) -> Result<ContextGuard> {
        self.device.bind()
    }

    /// Kernel `name` of kernel family `module` (a `cuda/*.cu` file), loading the module on first use. The
    /// device's context must be bound. A name that no instantiation produced is an error.
    fn function(&self, module: &'static str, name: &str) -> Result<sys::CUfunction> {
        let name = module::entry_point(module, name)?;
        let mut loaded = self.device.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = loaded.functions.get(name) {
            return Ok(*f);
        }
        let m = match loaded.modules.get(module) {
            Some(m) => *m,
            None => {
                let m = module::load(&self.device, module)?;
                loaded.modules.insert(module, m);
                m
            }
        };
        let f = module::function(m, name)?;
        loaded.functions.insert(name, f);
        Ok(f)
    }
}

impl Device {
    fn open(ordinal: usize) -> Result<Self> {
        result::init().map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_NO_DEVICE => Error::NoDevice { ordinal, count: 0 },
            _ => cuda_error("cuInit", e),
        })?;
        let count = result::device::get_count()
            .map_err(|e| cuda_error("cuDeviceGetCount", e))?
            .max(0) as usize;
        if ordinal >= count {
            return Err(Error::NoDevice { ordinal, count });
        }
        let previous = result::ctx::get_current().map_err(|e| cuda_error("cuCtxGetCurrent", e))?;
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_error("cuDevicePrimaryCtxRetain", e));
        // CudaContext::new makes the context current; give the caller's thread its own back, or none if it
        // had none.
        let previous = previous.unwrap_or(std::ptr::null_mut());
        // SAFETY: `previous` was current on this thread a moment ago (or is null, which unbinds).
        unsafe { result::ctx::set_current(previous) }
            .map_err(|e| cuda_error("cuCtxSetCurrent", e))?;
        let ctx = ctx?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_error("cuDeviceGetAttribute", e))?;
        let compute_capability = (major * 10 + minor) as u32;
        if COMPILED_ARCHS
            .first()
            .is_none_or(|lowest| compute_capability < *lowest)
        {
            return Err(Error::UnsupportedArchitecture {
                ordinal,
                compute_capability,
                compiled: COMPILED_ARCHS,
            });
        }
        if !ctx.has_async_alloc() {
            return Err(Error::Cuda {
                call: "cuDeviceGetAttribute(MEMORY_POOLS_SUPPORTED)",
                code: 801,
                name: "CUDA_ERROR_NOT_SUPPORTED: stream-ordered allocation is unavailable on this device".into(),
            });
        }
        let multiprocessors =
            ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| cuda_error("cuDeviceGetAttribute", e))? as u32;
        Ok(Device {
            ctx,
            ordinal,
            multiprocessors,
            loaded: Mutex::default(),
        })
    }

    fn bind(&self) -> Result<ContextGuard> {
        // SAFETY: the context is retained for the life of the process.
        unsafe { sys::cuCtxPushCurrent_v2(self.ctx.cu_ctx()) }
            .result()
            .map_err(|e| cuda_error("cuCtxPushCurrent", e))?;
        Ok(ContextGuard)
    }
}

/// Pops the context pushed by [`CudaBackend::bind`].
struct ContextGuard;

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let mut popped = std::ptr::null_mut();
        // SAFETY: pairs with the push in `bind`; a failure leaves nothing to clean up.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

/// The smallest vocabulary chunk one block reads: below this, block start-up costs more than it saves.
const MIN_CHUNK: usize = 8192;
/// How many blocks per multiprocessor to aim for when splitting rows across blocks.
const BLOCKS_PER_SM: usize = 4;

/// How each row's vocabulary is split across blocks: `(chunk, splits)` with enough blocks to fill the device,
/// no chunk below [`MIN_CHUNK`] (unless there is one), and chunks a multiple of `granularity` tokens (the
/// samplers draw noise 4 tokens at a time). The kernels' results do not depend on it.
pub(crate) fn vocabulary_split(
    rows: usize,
    vocab_size: usize,
    multiprocessors: u32,
    granularity: usize,
) -> (usize, u32) {
    let target_blocks = BLOCKS_PER_SM * multiprocessors as usize;
    let splits = target_blocks
        .div_ceil(rows.max(1))
        .min(vocab_size / MIN_CHUNK)
        .clamp(1, 65535);
    let chunk = vocab_size.div_ceil(splits).next_multiple_of(granularity);
    (chunk, vocab_size.div_ceil(chunk) as u32)
}

/// An [`Error::Cuda`] for a failed driver call. libcuda is loaded whenever a driver call could fail, so
/// asking it for the error's name is safe.
pub(crate) fn cuda_error(call: &'static str, e: DriverError) -> Error {
    let name = e
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    Error::Cuda {
        call,
        code: e.0 as u32,
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels each launcher can ask for are exactly those ptxas compiled into that family's fatbin: no
    /// name without a kernel, no kernel without a launcher. (Without nvcc nothing is compiled, and every
    /// lookup fails with KernelsNotCompiled.)
    #[test]
    fn launchers_ask_for_exactly_the_kernels_ptxas_compiled() {
        let families: [(&str, Vec<String>); 4] = [
            ("greedy_verify", greedy::kernel_names()),
            ("rejection_sampling", sampling::kernel_names()),
            ("int4", int4::kernel_names()),
            ("tree_attention", attention::kernel_names()),
        ];
        if !KERNELS_COMPILED {
            for (family, names) in &families {
                assert_eq!(
                    module::entry_point(family, &names[0]),
                    Err(Error::KernelsNotCompiled)
                );
            }
            return;
        }
        for (family, names) in &families {
            let mut names = names.clone();
            names.sort();
            assert_eq!(
                names,
                module::entry_points(family),
                "kernel family {family}: launcher names (left) against the compiled kernels (right)"
            );
        }
        assert!(matches!(
            module::entry_point("int4", "Int4GemvKernel_bf16_bf16_m8_r3"),
            Err(Error::Cuda { .. })
        ));
    }

    #[test]
    fn vocabulary_split_covers_each_row_in_whole_granules_without_empty_chunks() {
        for rows in [1usize, 2, 5, 33, 320, 576, 10_000] {
            for vocab in [
                1usize, 3, 5, 8191, 8192, 8193, 32000, 128256, 151936, 151937, 262144,
            ] {
                for sms in [1u32, 108, 132] {
                    for granularity in [1usize, 4] {
                        let (chunk, splits) = vocabulary_split(rows, vocab, sms, granularity);
                        let splits = splits as usize;
                        assert_eq!(chunk % granularity, 0);
                        assert!(chunk * splits >= vocab, "chunks cover the row");
                        assert!(chunk * (splits - 1) < vocab, "the last chunk is not empty");
                        assert!((1..=65535).contains(&splits));
                        assert!(
                            splits == 1 || chunk >= MIN_CHUNK,
                            "no chunk below MIN_CHUNK"
                        );
                    }
                }
            }
        }
    }
}
