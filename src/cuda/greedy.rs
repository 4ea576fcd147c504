//! Launcher of greedy verification (`cuda/greedy_verify.cu`). Semantics and validation: [`crate::greedy`].

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use super::memory::StreamScratch;
use super::{cuda_error, vocabulary_split, CudaBackend};
use crate::dtype::DType;
use crate::error::Result;
use crate::greedy::GreedyShape;

const MODULE: &str = "greedy_verify";
/// Threads per block of both kernels; must match kArgmaxThreads / kAcceptThreads in the .cu file.
const BLOCK_THREADS: u32 = 256;
/// The kernel that turns the rows' argmaxes into accepted counts and emitted tokens.
const ACCEPT_KERNEL: &str = "GreedyAcceptKernel";

/// The row-argmax kernel for a logits dtype. Names are checked against what ptxas compiled when the kernel is
/// looked up (`module::entry_point`).
fn argmax_kernel_name(dtype: DType) -> String {
    format!("GreedyRowArgmaxKernel_{}", dtype.name())
}

/// Every kernel the launchers of this family can ask for (checked against the compiled ones by a test).
#[cfg(test)]
pub(super) fn kernel_names() -> Vec<String> {
    let mut names: Vec<String> = [DType::F32, DType::F16, DType::BF16]
        .map(argmax_kernel_name)
        .into();
    names.push(ACCEPT_KERNEL.to_string());
    names
}

/// Raw device pointers of one greedy-verification call, each checked non-null and aligned
/// ([`crate::backend::In::device`]).
pub(crate) struct GreedyDevicePtrs {
    pub logits: sys::CUdeviceptr,
    pub draft_offsets: sys::CUdeviceptr,
    pub draft_tokens: sys::CUdeviceptr,
    pub accepted_counts: sys::CUdeviceptr,
    pub emitted_tokens: sys::CUdeviceptr,
    /// 0 when the caller asked for no statuses.
    pub request_status: sys::CUdeviceptr,
}

impl CudaBackend {
    /// Enqueues both kernels. `shape` and `ptrs` are validated by the caller.
    pub(crate) fn launch_greedy_verify(
        &self,
        stream: sys::CUstream,
        shape: &GreedyShape,
        dtype: DType,
        ptrs: &GreedyDevicePtrs,
    ) -> Result<()> {
        if shape.num_requests == 0 {
            return Ok(());
        }
        let _bound = self.bind()?;
        let argmax = self.function(MODULE, &argmax_kernel_name(dtype))?;
        let accept = self.function(MODULE, ACCEPT_KERNEL)?;

        let rows = shape.num_rows();
        let (chunk, splits) = vocabulary_split(rows, shape.vocab_size, self.multiprocessors(), 1);
        let partials =
            StreamScratch::alloc(stream, rows * splits as usize * std::mem::size_of::<u64>())?;

        let (mut logits, mut vocab, mut chunk, mut partials_ptr) = (
            ptrs.logits,
            shape.vocab_size as i64,
            chunk as i64,
            partials.ptr(),
        );
        let mut args = [
            arg(&mut logits),
            arg(&mut vocab),
            arg(&mut chunk),
            arg(&mut partials_ptr),
        ];
        // SAFETY: argument types match GreedyRowArgmaxKernel_*; every block reads inside its row of `logits`
        // (rows * vocab elements, checked by the caller) and writes its own partial.
        unsafe {
            result::launch_kernel(
                argmax,
                (rows as u32, splits, 1),
                (BLOCK_THREADS, 1, 1),
                0,
                stream,
                &mut args,
            )
        }
        .map_err(|e| cuda_error("cuLaunchKernel(GreedyRowArgmaxKernel)", e))?;

        let (mut offsets, mut drafts, mut splits_arg) =
            (ptrs.draft_offsets, ptrs.draft_tokens, splits as i32);
        let (mut requests, mut num_drafts, mut vocab, mut width) = (
            shape.num_requests as i64,
            shape.num_draft_tokens as i64,
            shape.vocab_size as i64,
            shape.emit_width as i64,
        );
        let (mut accepted, mut emitted, mut status) = (
            ptrs.accepted_counts,
            ptrs.emitted_tokens,
            ptrs.request_status,
        );
        let mut args = [
            arg(&mut offsets),
            arg(&mut drafts),
            arg(&mut partials_ptr),
            arg(&mut splits_arg),
            arg(&mut requests),
            arg(&mut num_drafts),
            arg(&mut vocab),
            arg(&mut width),
            arg(&mut accepted),
            arg(&mut emitted),
            arg(&mut status),
        ];
        let warps_per_block = (BLOCK_THREADS / 32) as usize;
        let blocks = shape.num_requests.div_ceil(warps_per_block) as u32;
        // SAFETY: argument types match GreedyAcceptKernel; it validates each request before indexing.
        unsafe {
            result::launch_kernel(
                accept,
                (blocks, 1, 1),
                (BLOCK_THREADS, 1, 1),
                0,
                stream,
                &mut args,
            )
        }
        .map_err(|e| cuda_error("cuLaunchKernel(GreedyAcceptKernel)", e))?;
        partials.free()
    }
}

/// A kernel argument as cuLaunchKernel takes it: a pointer to the value.
pub(crate) fn arg<T>(value: &mut T) -> *mut c_void {
    value as *mut T as *mut c_void
}
