//! The fatbins build.rs compiled from `cuda/*.cu`, and loading them.

use std::ffi::{c_void, CString};

use cudarc::driver::{result, sys};

use super::{cuda_error, Device};
use crate::error::{Error, Result};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// Whether this build carries CUDA kernels (nvcc was found when it was compiled).
pub const KERNELS_COMPILED: bool = generated::KERNELS_COMPILED;

/// The compute capabilities (major * 10 + minor) this build has machine code for; the lowest one also has PTX,
/// which the driver can compile for newer devices.
pub const COMPILED_ARCHS: &[u32] = generated::COMPILED_ARCHS;

/// Loads the fatbin of kernel family `family` into the device's context, which the caller has bound.
pub(super) fn load(device: &Device, family: &'static str) -> Result<sys::CUmodule> {
    let image = generated::FATBINS
        .iter()
        .find(|(name, _)| *name == family)
        .map(|(_, image)| *image)
        .ok_or(Error::KernelsNotCompiled)?;
    // SAFETY: the image is a complete fatbin embedded in the library and aligned by build.rs.
    unsafe { result::module::load_data(image.as_ptr() as *const c_void) }.map_err(|e| match e.0 {
        sys::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU
        | sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            let compute_capability = device
                .ctx
                .compute_capability()
                .map(|(major, minor)| (major * 10 + minor) as u32)
                .unwrap_or(0);
            Error::UnsupportedArchitecture {
                ordinal: device.ordinal,
                compute_capability,
                compiled: COMPILED_ARCHS,
            }
        }
        _ => cuda_error("cuModuleLoadData", e),
    })
}

/// The kernel `name` of kernel family `family` as build.rs recorded it from ptxas's report: the one source of
/// kernel names. A name no instantiation in `cuda/` produced is refused here, before the driver is asked.
pub(super) fn entry_point(family: &str, name: &str) -> Result<&'static str> {
    if !KERNELS_COMPILED {
        return Err(Error::KernelsNotCompiled);
    }
    entry_points(family)
        .iter()
        .find(|n| **n == name)
        .copied()
        .ok_or_else(|| Error::Cuda {
            call: "cuModuleGetFunction",
            code: sys::CUresult::CUDA_ERROR_NOT_FOUND as u32,
            name: format!("CUDA_ERROR_NOT_FOUND: kernel family {family} has no kernel {name}"),
        })
}

/// Every kernel compiled into kernel family `family` (empty when none was compiled).
pub(super) fn entry_points(family: &str) -> &'static [&'static str] {
    generated::ENTRY_POINTS
        .iter()
        .find(|(f, _)| *f == family)
        .map_or(&[], |(_, names)| names)
}

/// Kernel `name` of a loaded module.
pub(super) fn function(module: sys::CUmodule, name: &'static str) -> Result<sys::CUfunction> {
    let c_name = CString::new(name).expect("kernel names have no NUL");
    // SAFETY: `module` is loaded and never unloaded.
    unsafe { result::module::get_function(module, c_name) }
        .map_err(|e| cuda_error("cuModuleGetFunction", e))
}
