//! Launchers of tree attention and compaction (`cuda/tree_attention.cu`). Semantics and validation:
//! [`crate::attention`].

use std::ffi::c_void;

use cudarc::driver::{result, sys};

use super::greedy::arg;
use super::memory::{check_device_ptr, StreamScratch};
use super::params::{CompactionParams, TreeAttentionParams};
use super::{cuda_error, CudaBackend};
use crate::attention::{CompactionShape, TreeAttentionShape};
use crate::dtype::DType;
use crate::error::{Error, Result};

const MODULE: &str = "tree_attention";
/// The most splits of one request's prefix; the merge kernel holds one per lane.
const MAX_SPLITS: usize = 32;
/// The most layers one compaction call moves; must match kMaxLayers in the .cu file.
pub const MAX_COMPACTION_LAYERS: usize = 128;
/// Threads of the merge and compaction kernels; must match the .cu file.
const MERGE_THREADS: u32 = 128;
const COMPACT_THREADS: u32 = 128;

/// Raw device pointers of one tree-attention call (0 for an absent optional array), after validation.
pub(crate) struct TreeAttentionDevicePtrs {
    pub q: sys::CUdeviceptr,
    pub k: sys::CUdeviceptr,
    pub v: sys::CUdeviceptr,
    pub token_offsets: sys::CUdeviceptr,
    pub parents: sys::CUdeviceptr,
    pub prefix_lens: sys::CUdeviceptr,
    pub page_table: sys::CUdeviceptr,
    pub k_cache: sys::CUdeviceptr,
    pub v_cache: sys::CUdeviceptr,
    pub cos_sin_cache: sys::CUdeviceptr,
    pub out: sys::CUdeviceptr,
    pub lse: sys::CUdeviceptr,
    pub request_status: sys::CUdeviceptr,
}

impl TreeAttentionDevicePtrs {
    /// What `backend::In::device` does not check: the kernels read the caches in 16-byte vectors. Lengths,
    /// non-null pointers and element alignment were checked when the addresses were taken.
    pub(crate) fn check(&self, shape: &TreeAttentionShape) -> Result<()> {
        check_device_ptr("k_cache", self.k_cache, shape.cache.cache_len(), 16)?;
        check_device_ptr("v_cache", self.v_cache, shape.cache.cache_len(), 16)
    }
}

/// Raw device pointers of one compaction call, after validation.
pub(crate) struct CompactionDevicePtrs<'a> {
    pub k_caches: &'a [sys::CUdeviceptr],
    pub v_caches: &'a [sys::CUdeviceptr],
    pub accepted_offsets: sys::CUdeviceptr,
    pub accepted_nodes: sys::CUdeviceptr,
    pub prefix_lens: sys::CUdeviceptr,
    pub page_table: sys::CUdeviceptr,
    pub request_status: sys::CUdeviceptr,
}

impl CompactionDevicePtrs<'_> {
    /// What the shared checks do not cover: at most [`MAX_COMPACTION_LAYERS`] layers per launch, and caches
    /// aligned for the kernel's 16-byte vectors.
    pub(crate) fn check(&self, shape: &CompactionShape) -> Result<()> {
        if shape.num_layers > MAX_COMPACTION_LAYERS {
            return Err(Error::invalid(
                "num_layers",
                format!(
                    "is {}; one call moves at most {MAX_COMPACTION_LAYERS} layers (call once per \
                     {MAX_COMPACTION_LAYERS})",
                    shape.num_layers
                ),
            ));
        }
        for (layer, (&k, &v)) in self.k_caches.iter().zip(self.v_caches).enumerate() {
            let len = shape.cache.cache_len();
            check_device_ptr(&format!("k_caches[{layer}]"), k, len, 16)?;
            check_device_ptr(&format!("v_caches[{layer}]"), v, len, 16)?;
        }
        Ok(())
    }
}

impl CudaBackend {
    /// Enqueues the attention kernel and, when the prefix is split, the merge. `shape` and `ptrs` are validated
    /// by the caller.
    pub(crate) fn launch_tree_attention(
        &self,
        stream: sys::CUstream,
        shape: &TreeAttentionShape,
        dtype: DType,
        softmax_scale: f32,
        ptrs: &TreeAttentionDevicePtrs,
    ) -> Result<()> {
        let dtype_name = match dtype {
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F32 => {
                return Err(Error::invalid(
                    "dtype",
                    "is fp32; tree attention takes fp16 or bf16",
                ))
            }
        };
        if shape.num_requests == 0 || shape.num_tokens == 0 {
            return Ok(());
        }
        let d = shape.cache.head_dim;
        let plan = LaunchPlan::new(shape, self.multiprocessors());
        let _bound = self.bind()?;
        let kernel = self.function(
            MODULE,
            &attention_kernel_name(dtype_name, d, plan.row_warps),
        )?;
        let shared_bytes = plan.shared_bytes(d);
        // SAFETY: a valid function handle; the size is within every supported device's opt-in limit.
        unsafe {
            result::function::set_function_attribute(
                kernel,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
        }
        .map_err(|e| cuda_error("cuFuncSetAttribute", e))?;

        let scratch = if plan.splits > 1 {
            let partial_out = plan.splits * shape.q_len();
            let partial_lse = plan.splits * shape.lse_len();
            Some(StreamScratch::alloc(
                stream,
                (partial_out + partial_lse) * 4,
            )?)
        } else {
            None
        };
        let partial_out = scratch.as_ref().map_or(0, StreamScratch::ptr);
        let partial_lse = partial_out + (plan.splits * shape.q_len() * 4) as u64;
        let (rope_style, max_position) = shape
            .rope
            .map_or((0, 0), |r| (r.style.code(), r.max_position as i32));
        let mut params = TreeAttentionParams {
            q: ptrs.q,
            k: ptrs.k,
            v: ptrs.v,
            token_offsets: ptrs.token_offsets,
            parents: ptrs.parents,
            prefix_lens: ptrs.prefix_lens,
            page_table: ptrs.page_table,
            k_cache: ptrs.k_cache,
            v_cache: ptrs.v_cache,
            cos_sin: ptrs.cos_sin_cache,
            out: ptrs.out,
            lse: ptrs.lse,
            request_status: ptrs.request_status,
            partial_out,
            partial_lse: if scratch.is_some() { partial_lse } else { 0 },
            num_requests: shape.num_requests as i32,
            num_tokens: shape.num_tokens as i32,
            num_q_heads: shape.num_q_heads as i32,
            num_kv_heads: shape.cache.num_kv_heads as i32,
            group: shape.group_size() as i32,
            max_tree: shape.max_tree_size as i32,
            num_pages: shape.cache.num_pages as i32,
            page_size_log2: shape.cache.page_size.trailing_zeros() as i32,
            pages_per_request: shape.cache.pages_per_request as i32,
            max_position,
            rope_style,
            num_splits: plan.splits as i32,
            row_chunks: plan.row_chunks as i32,
            scale_log2: softmax_scale * std::f32::consts::LOG2_E,
        };
        let mut args = [arg(&mut params)];
        let grid = (
            plan.splits as u32,
            (shape.cache.num_kv_heads * plan.row_chunks) as u32,
            shape.num_requests as u32,
        );
        // SAFETY: the parameter block matches TreeAttentionParams; every block validates its request's index
        // arrays before using them, and every array's size was checked against the shape.
        unsafe {
            result::launch_kernel(
                kernel,
                grid,
                (plan.threads(), 1, 1),
                shared_bytes as u32,
                stream,
                &mut args,
            )
        }
        .map_err(|e| cuda_error("cuLaunchKernel(TreeAttentionKernel)", e))?;

        if let Some(scratch) = scratch {
            let merge = self.function(MODULE, &merge_kernel_name(dtype_name, d))?;
            let pairs = shape.max_tree_size * shape.num_q_heads;
            let warps = MERGE_THREADS as usize / 32;
            let mut args = [arg(&mut params)];
            // SAFETY: as above; the merge reads the partials the attention kernel wrote for valid requests.
            unsafe {
                result::launch_kernel(
                    merge,
                    (pairs.div_ceil(warps) as u32, shape.num_requests as u32, 1),
                    (MERGE_THREADS, 1, 1),
                    0,
                    stream,
                    &mut args,
                )
            }
            .map_err(|e| cuda_error("cuLaunchKernel(TreeAttentionMergeKernel)", e))?;
            scratch.free()?;
        }
        Ok(())
    }

    /// Enqueues the compaction kernel. `shape` and `ptrs` are validated by the caller.
    pub(crate) fn launch_tree_kv_compact(
        &self,
        stream: sys::CUstream,
        shape: &CompactionShape,
        ptrs: &CompactionDevicePtrs<'_>,
    ) -> Result<()> {
        if shape.num_requests == 0 || shape.num_layers == 0 {
            return Ok(());
        }
        let _bound = self.bind()?;
        let kernel = self.function(MODULE, &compaction_kernel_name(shape.cache.head_dim))?;
        let mut params = CompactionParams {
            k_caches: [0; MAX_COMPACTION_LAYERS],
            v_caches: [0; MAX_COMPACTION_LAYERS],
            accepted_offsets: ptrs.accepted_offsets,
            accepted_nodes: ptrs.accepted_nodes,
            prefix_lens: ptrs.prefix_lens,
            page_table: ptrs.page_table,
            request_status: ptrs.request_status,
            num_accepted: shape.num_accepted as i32,
            num_kv_heads: shape.cache.num_kv_heads as i32,
            num_pages: shape.cache.num_pages as i32,
            page_size_log2: shape.cache.page_size.trailing_zeros() as i32,
            pages_per_request: shape.cache.pages_per_request as i32,
        };
        params.k_caches[..shape.num_layers].copy_from_slice(ptrs.k_caches);
        params.v_caches[..shape.num_layers].copy_from_slice(ptrs.v_caches);
        let mut args = [&mut params as *mut CompactionParams as *mut c_void];
        let grid = (
            shape.num_requests as u32,
            shape.cache.num_kv_heads as u32,
            shape.num_layers as u32,
        );
        // SAFETY: the parameter block matches CompactionParams; every block validates its request before moving
        // anything, inside the caches whose sizes and alignment the caller checked.
        unsafe {
            result::launch_kernel(kernel, grid, (COMPACT_THREADS, 1, 1), 0, stream, &mut args)
        }
        .map_err(|e| cuda_error("cuLaunchKernel(TreeKvCompactKernel)", e))
    }
}

/// How a tree-attention call is laid over the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LaunchPlan {
    /// Warps of 16 query rows per block (1, 2, 4 or 8); a block has at least 4 warps.
    pub row_warps: usize,
    /// Blocks along a request's `max_tree_size x group` rows.
    pub row_chunks: usize,
    /// Blocks along each request's prefix.
    pub splits: usize,
}

impl LaunchPlan {
    pub(crate) fn new(shape: &TreeAttentionShape, multiprocessors: u32) -> Self {
        let rows = shape.max_tree_size * shape.group_size();
        let (fewest, most) = Self::row_warps_range(shape.cache.head_dim);
        let row_warps = rows.div_ceil(16).next_power_of_two().clamp(fewest, most);
        let row_chunks = rows.div_ceil(16 * row_warps);
        let blocks = shape.num_requests * shape.cache.num_kv_heads * row_chunks;
        // At most one split per tile of the longest prefix the cache can hold (the kernels further skip the
        // splits each request's own prefix leaves empty: UsedSplits in cuda/tree_attention.cu).
        let keys_per_tile = if shape.cache.head_dim == 256 { 32 } else { 64 };
        let capacity_tiles =
            (shape.cache.pages_per_request * shape.cache.page_size).div_ceil(keys_per_tile);
        let splits = (2 * multiprocessors as usize)
            .div_ceil(blocks)
            .min(capacity_tiles)
            .clamp(1, MAX_SPLITS);
        LaunchPlan {
            row_warps,
            row_chunks,
            splits,
        }
    }

    /// The row warps instantiated for a head dimension, powers of two in `fewest..=most`: at 256 only those
    /// that fit 99 KiB of shared memory.
    fn row_warps_range(head_dim: usize) -> (usize, usize) {
        if head_dim == 256 {
            (2, 4)
        } else {
            (1, 8)
        }
    }

    fn threads(&self) -> u32 {
        32 * self.row_warps.max(4) as u32
    }

    /// Dynamic shared memory: Q rows and two stages of K and V tiles, 2-byte elements.
    fn shared_bytes(&self, head_dim: usize) -> usize {
        let keys = if head_dim == 256 { 32 } else { 64 };
        (16 * self.row_warps + 4 * keys) * head_dim * 2
    }
}

/// The attention kernel for a dtype (`f16`, `bf16`), head dimension and row warps per block. Names are checked
/// against what ptxas compiled when the kernel is looked up (`module::entry_point`).
fn attention_kernel_name(dtype: &str, head_dim: usize, row_warps: usize) -> String {
    format!("TreeAttentionKernel_{dtype}_d{head_dim}_r{row_warps}")
}

/// The kernel merging the split-prefix partials of the attention kernel.
fn merge_kernel_name(dtype: &str, head_dim: usize) -> String {
    format!("TreeAttentionMergeKernel_{dtype}_d{head_dim}")
}

/// The KV compaction kernel (it moves 16-bit elements, whatever their dtype).
fn compaction_kernel_name(head_dim: usize) -> String {
    format!("TreeKvCompactKernel_d{head_dim}")
}

/// Every kernel the launchers of this family can ask for (checked against the compiled ones by a test).
#[cfg(test)]
pub(super) fn kernel_names() -> Vec<String> {
    use crate::attention::HEAD_DIMS;
    let mut names = Vec::new();
    for dtype in ["f16", "bf16"] {
        for d in HEAD_DIMS {
            let (fewest, most) = LaunchPlan::row_warps_range(d);
            for row_warps in [1, 2, 4, 8] {
                if (fewest..=most).contains(&row_warps) {
                    names.push(attention_kernel_name(dtype, d, row_warps));
                }
            }
            names.push(merge_kernel_name(dtype, d));
        }
    }
    names.extend(HEAD_DIMS.map(compaction_kernel_name));
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::PagedCacheShape;

    fn shape(batch: usize, tree: usize, hq: usize, hkv: usize, d: usize) -> TreeAttentionShape {
        shape_with_capacity(batch, tree, hq, hkv, d, 4096)
    }

    /// A shape whose requests can hold `pages_per_request` pages of 16 tokens.
    fn shape_with_capacity(
        batch: usize,
        tree: usize,
        hq: usize,
        hkv: usize,
        d: usize,
        pages_per_request: usize,
    ) -> TreeAttentionShape {
        let cache = PagedCacheShape::new(64, 16, hkv, d, pages_per_request).unwrap();
        TreeAttentionShape::new(batch, batch * tree, hq, tree, cache, None).unwrap()
    }

    #[test]
    fn plans_use_instantiated_kernels_that_fit_shared_memory() {
        for d in [64, 128, 256] {
            for tree in 1..=64 {
                for (hq, hkv) in [(32, 8), (8, 8), (64, 8), (8, 1)] {
                    for batch in [1, 16, 64] {
                        let plan = LaunchPlan::new(&shape(batch, tree, hq, hkv, d), 132);
                        let name = attention_kernel_name("bf16", d, plan.row_warps);
                        assert!(kernel_names().contains(&name), "{name}");
                        // sm_86 / sm_89 allow 99 KiB per block, of which the kernel's static arrays take 2 KiB.
                        assert!(plan.shared_bytes(d) <= 97 * 1024, "{plan:?} d {d}");
                        assert!(plan.row_chunks * 16 * plan.row_warps >= tree * hq / hkv);
                        assert!((1..=MAX_SPLITS).contains(&plan.splits));
                    }
                }
            }
        }
    }

    #[test]
    fn small_batches_split_the_prefix_and_large_ones_do_not() {
        assert_eq!(LaunchPlan::new(&shape(1, 1, 32, 8, 128), 132).splits, 32);
        assert_eq!(LaunchPlan::new(&shape(64, 16, 32, 8, 128), 132).splits, 1);
    }

    #[test]
    fn splits_never_outnumber_the_tiles_a_request_can_hold() {
        // 7 pages of 16 tokens: 112 tokens, 2 tiles of 64 keys (4 of 32 at D = 256).
        assert_eq!(
            LaunchPlan::new(&shape_with_capacity(1, 1, 32, 8, 128, 7), 132).splits,
            2
        );
        assert_eq!(
            LaunchPlan::new(&shape_with_capacity(1, 1, 32, 8, 256, 7), 132).splits,
            4
        );
        assert_eq!(
            LaunchPlan::new(&shape_with_capacity(1, 1, 32, 8, 64, 1), 132).splits,
            1
        );
    }
}
