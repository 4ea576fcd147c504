//! Launchers of the int4 kernels (`cuda/int4.cu`): quantization and packing on the device, and the GEMV.
//! Format, rounding rule and shapes: [`crate::int4`].

use cudarc::driver::{result, sys};

use super::greedy::arg;
use super::memory::{check_device_ptr, StreamScratch};
use super::{cuda_error, CudaBackend};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::int4::{GemvShape, Int4Shape, TILE_ROWS};

const MODULE: &str = "int4";
/// Warps per block of both kernels; must match kQuantizeWarps / kGemvWarps in the .cu file.
const WARPS: u32 = 8;

/// Raw device pointers of a quantization (`given_scales` null) or packing (given) call, after validation.
pub(crate) struct QuantizeDevicePtrs {
    pub weights: sys::CUdeviceptr,
    pub given_scales: sys::CUdeviceptr,
    pub given_zeros: sys::CUdeviceptr,
    pub packed: sys::CUdeviceptr,
    pub scales: sys::CUdeviceptr,
    pub zeros: sys::CUdeviceptr,
}

impl QuantizeDevicePtrs {
    /// Non-null, and aligned as the kernel reads them: weights and packed in 16-byte vectors.
    pub(crate) fn check(&self, shape: &Int4Shape, packing: bool) -> Result<()> {
        check_device_ptr("weights", self.weights, shape.weights_len(), 16)?;
        check_device_ptr("packed", self.packed, shape.packed_len(), 16)?;
        let (scales_name, scales, zeros_name, zeros) = if packing {
            ("scales", self.given_scales, "zeros", self.given_zeros)
        } else {
            ("scales", self.scales, "zeros", self.zeros)
        };
        check_device_ptr(scales_name, scales, shape.meta_len(), 2)?;
        check_device_ptr(zeros_name, zeros, shape.meta_len(), 1)
    }
}

/// Raw device pointers of a GEMV call, after validation.
pub(crate) struct GemvDevicePtrs {
    pub packed: sys::CUdeviceptr,
    pub scales: sys::CUdeviceptr,
    pub zeros: sys::CUdeviceptr,
    pub x: sys::CUdeviceptr,
    pub y: sys::CUdeviceptr,
}

impl GemvDevicePtrs {
    /// Non-null, and aligned as the kernel reads them: packed and x in 16-byte vectors.
    pub(crate) fn check(&self, shape: &GemvShape) -> Result<()> {
        let w = &shape.weights;
        check_device_ptr("packed", self.packed, w.packed_len(), 16)?;
        check_device_ptr("scales", self.scales, w.meta_len(), 2)?;
        check_device_ptr("zeros", self.zeros, w.meta_len(), 1)?;
        check_device_ptr("x", self.x, shape.x_len(), 16)?;
        check_device_ptr("y", self.y, shape.y_len(), 2)
    }
}

impl CudaBackend {
    /// Enqueues the quantization kernel. `shape` and `ptrs` are validated by the caller.
    pub(crate) fn launch_int4_quantize(
        &self,
        stream: sys::CUstream,
        shape: &Int4Shape,
        weights_dtype: DType,
        scale_dtype: DType,
        ptrs: &QuantizeDevicePtrs,
    ) -> Result<()> {
        let name = quantize_kernel_name(
            half_name("weights", weights_dtype)?,
            half_name("scales", scale_dtype)?,
        );
        let _bound = self.bind()?;
        let kernel = self.function(MODULE, &name)?;
        let span = shape.group_size.max(64);
        let warps = (shape.n / TILE_ROWS) * (shape.k / span);
        let blocks = warps.div_ceil(WARPS as usize) as u32;
        let (mut weights, mut n, mut k, mut group) = (
            ptrs.weights,
            shape.n as i64,
            shape.k as i64,
            shape.group_size as i32,
        );
        let (mut given_scales, mut given_zeros, mut packed, mut scales, mut zeros) = (
            ptrs.given_scales,
            ptrs.given_zeros,
            ptrs.packed,
            ptrs.scales,
            ptrs.zeros,
        );
        let mut args = [
            arg(&mut weights),
            arg(&mut n),
            arg(&mut k),
            arg(&mut group),
            arg(&mut given_scales),
            arg(&mut given_zeros),
            arg(&mut packed),
            arg(&mut scales),
            arg(&mut zeros),
        ];
        // SAFETY: argument types match Int4QuantizeKernel_*; warps beyond the matrix return at once, and every
        // other warp reads and writes inside the arrays whose sizes the caller checked.
        unsafe {
            launch(
                kernel,
                blocks,
                stream,
                &mut args,
                "cuLaunchKernel(Int4QuantizeKernel)",
            )
        }
    }

    /// Enqueues the GEMV kernel. `shape` and `ptrs` are validated by the caller.
    pub(crate) fn launch_int4_gemv(
        &self,
        stream: sys::CUstream,
        shape: &GemvShape,
        act_dtype: DType,
        scale_dtype: DType,
        ptrs: &GemvDevicePtrs,
    ) -> Result<()> {
        let row_tiles_total = shape.weights.n / TILE_ROWS;
        let row_tiles = gemv_row_tiles(row_tiles_total, self.multiprocessors());
        let name = gemv_kernel_name(
            half_name("x", act_dtype)?,
            half_name("scales", scale_dtype)?,
            shape.m,
            row_tiles,
        );
        let _bound = self.bind()?;
        let kernel = self.function(MODULE, &name)?;
        let blocks = row_tiles_total / row_tiles;
        let k_splits = gemv_k_splits(blocks, shape.weights.k / 64, self.multiprocessors());
        let outputs = shape.m * shape.weights.n;
        let scratch = if k_splits > 1 {
            Some(StreamScratch::alloc(stream, k_splits * outputs * 4)?)
        } else {
            None
        };
        let (mut packed, mut scales, mut zeros, mut x, mut y) =
            (ptrs.packed, ptrs.scales, ptrs.zeros, ptrs.x, ptrs.y);
        let mut k_partial = scratch.as_ref().map_or(0, StreamScratch::ptr);
        let (mut m, mut n, mut k, mut group) = (
            shape.m as i32,
            shape.weights.n as i64,
            shape.weights.k as i64,
            shape.weights.group_size as i32,
        );
        let mut args = [
            arg(&mut packed),
            arg(&mut scales),
            arg(&mut zeros),
            arg(&mut x),
            arg(&mut y),
            arg(&mut m),
            arg(&mut n),
            arg(&mut k),
            arg(&mut group),
            arg(&mut k_partial),
        ];
        // SAFETY: argument types match Int4GemvKernel_*; block (b, s) reads row tiles b * R .. (b + 1) * R, all
        // inside the matrix (R divides the tile count), K split s, and the rows of x below m; with splits it
        // writes k_splits * m * n floats of the scratch, which holds them.
        unsafe {
            result::launch_kernel(
                kernel,
                (blocks as u32, k_splits as u32, 1),
                (WARPS * 32, 1, 1),
                0,
                stream,
                &mut args,
            )
        }
        .map_err(|e| cuda_error("cuLaunchKernel(Int4GemvKernel)", e))?;
        if let Some(scratch) = &scratch {
            let sum = self.function(MODULE, &split_sum_kernel_name(half_name("x", act_dtype)?))?;
            let (mut k_partial, mut y, mut outputs, mut splits) =
                (scratch.ptr(), ptrs.y, outputs as i64, k_splits as i32);
            let mut args = [
                arg(&mut k_partial),
                arg(&mut y),
                arg(&mut outputs),
                arg(&mut splits),
            ];
            // SAFETY: argument types match Int4GemvSplitSumKernel_*; thread i < outputs reads the splits' partials
            // of output i, which the GEMV wrote, and writes y[i] (y holds m * n values).
            unsafe {
                result::launch_kernel(
                    sum,
                    ((outputs as u64).div_ceil(256) as u32, 1, 1),
                    (256, 1, 1),
                    0,
                    stream,
                    &mut args,
                )
            }
            .map_err(|e| cuda_error("cuLaunchKernel(Int4GemvSplitSumKernel)", e))?;
        }
        if let Some(scratch) = scratch {
            scratch.free()?; // in stream order, after the sum kernel; a failure is reported, not dropped
        }
        Ok(())
    }
}

/// Launches `blocks` blocks of [`WARPS`] warps, no dynamic shared memory.
///
/// # Safety
/// `args` must match the kernel's parameters, and the kernel must stay inside the memory they describe.
unsafe fn launch(
    kernel: sys::CUfunction,
    blocks: u32,
    stream: sys::CUstream,
    args: &mut [*mut std::ffi::c_void],
    call: &'static str,
) -> Result<()> {
    result::launch_kernel(kernel, (blocks, 1, 1), (WARPS * 32, 1, 1), 0, stream, args)
        .map_err(|e| cuda_error(call, e))
}

fn half_name(argument: &str, dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F16 | DType::BF16 => Ok(dtype.name()),
        DType::F32 => Err(Error::invalid(
            argument,
            "is fp32; the int4 kernels take fp16 or bf16",
        )),
    }
}

/// Row tiles per GEMV block: the largest of 4, 2, 1 that divides the tile count and still leaves two blocks
/// per multiprocessor (more rows per block reuse each activation fragment more; fewer fill the device).
pub(crate) fn gemv_row_tiles(row_tiles: usize, multiprocessors: u32) -> usize {
    let wanted_blocks = 2 * multiprocessors as usize;
    [4, 2]
        .into_iter()
        .find(|&r| row_tiles.is_multiple_of(r) && row_tiles / r >= wanted_blocks)
        .unwrap_or(1)
}

/// Splits of K per GEMV block row: when the row blocks alone leave multiprocessors idle (the 1024-row K/V
/// projections give 64 blocks for 132 SMs), K is split so that the blocks reach two per multiprocessor, keeping
/// at least one 64-column chunk per warp of each split (8) and at most 8 splits (each split adds `m * n` floats
/// of partials to write and sum).
pub(crate) fn gemv_k_splits(blocks: usize, chunks: usize, multiprocessors: u32) -> usize {
    if blocks >= multiprocessors as usize {
        return 1;
    }
    let wanted = (2 * multiprocessors as usize).div_ceil(blocks.max(1));
    wanted.min(chunks / WARPS as usize).clamp(1, 8)
}

/// The GEMV kernel for activation and scale types (`f16`, `bf16`), `m` (instantiated for up to 8 and up to 16
/// activation rows) and row tiles per block. Names are checked against what ptxas compiled when the kernel is
/// looked up (`module::entry_point`).
fn gemv_kernel_name(act: &str, scale: &str, m: usize, row_tiles: usize) -> String {
    let m_tile = if m > 8 { 16 } else { 8 };
    format!("Int4GemvKernel_{act}_{scale}_m{m_tile}_r{row_tiles}")
}

/// The kernel summing the GEMV's split-K partials.
fn split_sum_kernel_name(act: &str) -> String {
    format!("Int4GemvSplitSumKernel_{act}")
}

/// The quantization kernel for weight and scale types.
fn quantize_kernel_name(weights: &str, scales: &str) -> String {
    format!("Int4QuantizeKernel_{weights}_{scales}")
}

/// Every kernel the launchers of this family can ask for (checked against the compiled ones by a test).
#[cfg(test)]
pub(super) fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for act in ["f16", "bf16"] {
        for scale in ["f16", "bf16"] {
            for m in [8, 16] {
                for row_tiles in [1, 2, 4] {
                    names.push(gemv_kernel_name(act, scale, m, row_tiles));
                }
            }
            names.push(quantize_kernel_name(act, scale));
        }
        names.push(split_sum_kernel_name(act));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gemv_the_launcher_can_choose_is_instantiated() {
        let names = kernel_names();
        for m in 1..=16 {
            for row_tiles_total in [1, 2, 3, 4, 8, 256, 896, 1024] {
                let name = gemv_kernel_name("bf16", "f16", m, gemv_row_tiles(row_tiles_total, 132));
                assert!(names.contains(&name), "{name}");
            }
        }
    }

    #[test]
    fn row_tiles_divide_the_matrix_and_fill_the_device() {
        assert_eq!(gemv_row_tiles(256, 132), 1); // N = 4096
        assert_eq!(gemv_row_tiles(896, 132), 2); // N = 14336
        assert_eq!(gemv_row_tiles(1792, 132), 4); // N = 28672
        assert_eq!(gemv_row_tiles(1, 132), 1);
        for tiles in 1..3000 {
            let r = gemv_row_tiles(tiles, 132);
            assert_eq!(tiles % r, 0);
        }
    }

    #[test]
    fn k_splits_fill_the_device_only_when_the_rows_do_not() {
        // The K/V projection of an 8B model: 1024 rows = 64 blocks of one tile, K = 4096 = 64 chunks.
        assert_eq!(gemv_k_splits(64, 64, 132), 5);
        // N = 4096: 256 blocks already fill 132 SMs twice.
        assert_eq!(gemv_k_splits(256, 64, 132), 1);
        // Short K: at least 8 chunks (one per warp) per split.
        assert_eq!(gemv_k_splits(4, 16, 132), 2);
        assert_eq!(gemv_k_splits(4, 7, 132), 1);
        // At most 8 splits.
        assert_eq!(gemv_k_splits(1, 1024, 132), 8);
    }
}
