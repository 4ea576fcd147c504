//! Launcher of greedy verification (`cuda/greedy_verify.cu`). Semantics and validation: [`crate::greedy`].

use std::ffi::c_void;

use cudarc::driver::{result, sys, CudaStream};

use super::memory::{check_device_ptr, StreamScratch};
use super::{cuda_error, vocabulary_split, CudaBackend, DeviceIn, DeviceOut};
use crate::dtype::{DType, LogitsElement};
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

/// Raw device pointers of one greedy-verification call, after validation.
pub(crate) struct GreedyDevicePtrs {
    pub logits: sys::CUdeviceptr,
    pub draft_offsets: sys::CUdeviceptr,
    pub draft_tokens: sys::CUdeviceptr,
    pub accepted_counts: sys::CUdeviceptr,
    pub emitted_tokens: sys::CUdeviceptr,
    /// 0 when the caller asked for no statuses.
    pub request_status: sys::CUdeviceptr,
}

impl GreedyDevicePtrs {
    pub(crate) fn check(&self, shape: &GreedyShape, dtype: DType) -> Result<()> {
        check_device_ptr("logits", self.logits, shape.logits_len(), dtype.size())?;
        check_device_ptr(
            "draft_offsets",
            self.draft_offsets,
            shape.num_requests + 1,
            4,
        )?;
        check_device_ptr("draft_tokens", self.draft_tokens, shape.num_draft_tokens, 4)?;
        check_device_ptr(
            "accepted_counts",
            self.accepted_counts,
            shape.num_requests,
            4,
        )?;
        check_device_ptr(
            "emitted_tokens",
            self.emitted_tokens,
            shape.emitted_len(),
            4,
        )?;
        if self.request_status != 0 {
            check_device_ptr("request_status", self.request_status, shape.num_requests, 4)?;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// Greedy verification on the GPU; see [`crate::greedy`] for layout, semantics and validation, and the
    /// module documentation for an example.
    ///
    /// Sizes and lengths are checked before anything is launched. Each request's rules are checked by the
    /// kernel, which marks a bad request with `accepted_counts[b] = `[`crate::greedy::REQUEST_INVALID`], a
    /// row of -1 and, when `request_status` (`[B]`) is given, the rule's [`crate::RequestStatus`] code. The
    /// call returns once the work is enqueued on `stream`.
    #[allow(clippy::too_many_arguments)]
    pub fn greedy_verify<T: LogitsElement>(
        &self,
        stream: &CudaStream,
        logits: DeviceIn<'_, T>,
        vocab_size: usize,
        draft_offsets: DeviceIn<'_, i32>,
        draft_tokens: DeviceIn<'_, i32>,
        emit_width: usize,
        accepted_counts: DeviceOut<'_, i32>,
        emitted_tokens: DeviceOut<'_, i32>,
        request_status: Option<DeviceOut<'_, i32>>,
    ) -> Result<()> {
        self.check_stream(stream)?;
        let shape = GreedyShape::from_lengths(
            vocab_size,
            draft_offsets.len(),
            draft_tokens.len(),
            emit_width,
        )?;
        shape.check_lengths(
            logits.len(),
            draft_offsets.len(),
            draft_tokens.len(),
            accepted_counts.len(),
            emitted_tokens.len(),
        )?;
        shape.check_status_len(request_status.as_ref().map(|s| s.len()))?;
        let ptrs = GreedyDevicePtrs {
            logits: logits.ptr,
            draft_offsets: draft_offsets.ptr,
            draft_tokens: draft_tokens.ptr,
            accepted_counts: accepted_counts.ptr,
            emitted_tokens: emitted_tokens.ptr,
            request_status: request_status.map_or(0, |s| s.ptr),
        };
        ptrs.check(&shape, T::DTYPE)?;
        self.launch_greedy_verify(stream.cu_stream(), &shape, T::DTYPE, &ptrs)
    }

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
