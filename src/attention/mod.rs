//! Tree-attention verification over a paged KV cache, with the tree's KV appended and rotated in the same
//! launch, and the compaction of accepted paths afterwards: what they compute, their layouts, and the
//! validation shared by every backend.
//!
//! # Tree attention
//!
//! A batch of `B` requests. Request `b` has `L_b = prefix_lens[b]` tokens cached and a draft tree of
//! `T_b = token_offsets[b + 1] - token_offsets[b]` nodes (`0..=max_tree_size`, at most [`MAX_TREE_NODES`]), the
//! rows `token_offsets[b] ..` of the inputs. `parents[token_offsets[b] + i]` is node `i`'s parent as an index
//! inside the tree, or `-1` for a root; parents come before children (`-1 <= parents[i] < i`). `T_b = 1` is
//! ordinary decoding and a chain is a tree. The depth of a root is 0 and of any other node its parent's plus one.
//!
//! * `q: [N, Hq, D]`, `k, v: [N, Hkv, D]`, `N = token_offsets[B]` rows of fp16 or bf16, `Hq` a multiple of
//!   `Hkv` (GQA; `Hkv = 1` is MQA), `D` = `head_dim` in {64, 128, 256}.
//! * The cache: `k_cache, v_cache: [num_pages, page_size, Hkv, D]` (vLLM's and FlashInfer's NHD layout),
//!   `page_size` a power of two from 16, and `page_table: [B, pages_per_request]` (int32): token slot `t` of
//!   request `b` is row `t % page_size` of page `page_table[b * pages_per_request + t / page_size]`.
//! * Optional rotary embedding (RoPE) from `cos_sin_cache: [max_position, D]` (f32; row `p` holds `cos` of the
//!   `D / 2` frequencies at position `p`, then their `sin`: vLLM's layout), in the NeoX convention (pairs
//!   `(j, j + D/2)`) or the GPT-J one (pairs `(2j, 2j + 1)`). Node `i` sits at position `L_b + depth(i)`.
//!   A pair `(x, y)` with frequency `j` becomes `(x c - y s, y c + x s)`, every operation an f32 operation
//!   rounded to nearest (no fused multiply-add), and the results rounded to the element type: this exact rule
//!   makes the rotated keys written to the cache the same bytes on every backend.
//!
//! In one call:
//!
//! 1. **Append**: node `i`'s (rotated) key and its value are written to the cache at slot `L_b + i`.
//! 2. **Attention**: node `i`'s (rotated) query, for q head `h` (KV head `h / (Hq / Hkv)`), attends to the
//!    `L_b` cached prefix slots, to its ancestors and to itself, with scores `softmax_scale * q . k`:
//!    `out[row, h] = sum_j softmax(scores)_j v_j`, rounded to the element type, and optionally
//!    `lse[row, h] = ln sum_j exp(score_j)` (f32, natural logarithm). Scores are f32 on both backends (the CPU
//!    sums the softmax's weights in f64): on the CPU a dot product beyond f32's range (possible only with bf16
//!    inputs above about 1e19) is infinite and makes its row NaN, and a row whose every score is `-inf` has NaN
//!    outputs and an lse of `-inf`.
//!
//! No mask is ever built: ancestry comes from the parent array (a 64-bit ancestor set per node), prefix keys
//! are never masked, and nothing the call reads or allocates depends on `L` beyond the cache itself.
//!
//! The append slots `L_b .. L_b + T_b` of different requests must be different cache rows (pages being written
//! are private to their request; shared prefix pages are fine), and the outputs must not overlap the inputs.
//!
//! # Compaction
//!
//! After verification request `b` accepted the nodes `accepted_nodes[accepted_offsets[b] ..
//! accepted_offsets[b + 1]]` (tree indices, strictly increasing: a root-to-node path is, since parents come
//! first; at most [`MAX_TREE_NODES`]). For every layer's cache, the key and value at slot `L_b + node_j` move to
//! slot `L_b + j`; entries already in place (`node_j == j`) are not touched, so a greedy chain placed first
//! copies nothing.
//!
//! # Validation
//!
//! Sizes and lengths are checked before anything runs ([`TreeAttentionShape`], [`CompactionShape`]). The
//! contents of the small index arrays follow per-request rules ([`TreeAttentionShape::check_request`],
//! [`CompactionShape::check_request`]), one of them that a request's rows are its own
//! ([`TreeAttentionShape::token_owner`]: another request's broken offsets can make two requests claim one row).
//! With `request_status` every backend flags a failing request alone: nothing of it touches the cache, its
//! output rows are NaN (unless its offsets, which say which rows are its, are the broken rule), the rule it
//! broke goes to `request_status[b]` ([`RequestStatus`]) and the others are computed. Without it the CPU
//! backend returns [`Error::InvalidArgument`] naming the first offending element and writes nothing, while the
//! CUDA kernels (which cannot report without synchronising) still skip the request. No backend reads or writes
//! outside the documented arrays, whatever the contents.

use crate::backend::{optional_host, Backend, In, Out, Stream};
use crate::dtype::HalfElement;
use crate::error::{check_len, Error, Result};
use crate::status::RequestResult;
pub use crate::status::RequestStatus;

/// The largest tree, its root included: the one maximum of [`crate::tree`] (ancestor sets are 64-bit masks).
pub use crate::tree::MAX_TREE_NODES;
/// The head dimensions the kernels are compiled for.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 256];
/// The smallest page size.
pub const MIN_PAGE_SIZE: usize = 16;

/// How rotary-embedding pairs are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Elements `j` and `j + D/2` (GPT-NeoX, Llama, Qwen: `rotate_half`).
    Neox,
    /// Elements `2j` and `2j + 1` (GPT-J, interleaved).
    Gptj,
}

impl RopeStyle {
    /// The pair of element indices rotated by frequency `j` in a head of `head_dim` elements.
    pub fn pair(self, j: usize, head_dim: usize) -> (usize, usize) {
        match self {
            RopeStyle::Neox => (j, j + head_dim / 2),
            RopeStyle::Gptj => (2 * j, 2 * j + 1),
        }
    }

    /// The value the C ABI and the kernels use: 0 NeoX, 1 GPT-J.
    pub fn code(self) -> i32 {
        match self {
            RopeStyle::Neox => 0,
            RopeStyle::Gptj => 1,
        }
    }
}

/// Rotates one pair by the rule in the module documentation: `(x c - y s, y c + x s)` in f32, each operation
/// rounded (Rust never fuses them).
pub fn rotate_pair(x: f32, y: f32, cos: f32, sin: f32) -> (f32, f32) {
    (x * cos - y * sin, y * cos + x * sin)
}

/// The paged KV cache's geometry, shared by attention and compaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedCacheShape {
    /// Pages in each of `k_cache` and `v_cache`.
    pub num_pages: usize,
    /// Token slots per page: a power of two, at least [`MIN_PAGE_SIZE`].
    pub page_size: usize,
    /// `Hkv`.
    pub num_kv_heads: usize,
    /// `D`: one of [`HEAD_DIMS`].
    pub head_dim: usize,
    /// The row length of `page_table` (the most pages one request can use).
    pub pages_per_request: usize,
}

impl PagedCacheShape {
    /// The geometry re-checked by the rules of [`PagedCacheShape::new`]: its fields are public, so a shape
    /// built field by field reaches a backend only through this.
    pub fn checked(&self) -> Result<Self> {
        PagedCacheShape::new(
            self.num_pages,
            self.page_size,
            self.num_kv_heads,
            self.head_dim,
            self.pages_per_request,
        )
    }

    /// Checks the geometry: page size, head dimension, at least one KV head and one page per request, and
    /// every element index of the cache representable in 63 bits.
    pub fn new(
        num_pages: usize,
        page_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        pages_per_request: usize,
    ) -> Result<Self> {
        if !HEAD_DIMS.contains(&head_dim) {
            return Err(Error::invalid(
                "head_dim",
                format!("is {head_dim}; supported: {HEAD_DIMS:?}"),
            ));
        }
        if page_size < MIN_PAGE_SIZE || !page_size.is_power_of_two() || page_size > 1 << 20 {
            return Err(Error::invalid(
                "page_size",
                format!("is {page_size}; it must be a power of two from {MIN_PAGE_SIZE} to 2^20"),
            ));
        }
        if num_kv_heads == 0 || num_kv_heads > 1024 {
            return Err(Error::invalid(
                "num_kv_heads",
                format!("is {num_kv_heads}; it must be in 1..=1024"),
            ));
        }
        if pages_per_request == 0 || pages_per_request > i32::MAX as usize / page_size {
            return Err(Error::invalid(
                "pages_per_request",
                format!(
                    "is {pages_per_request}; it must be at least 1, with pages_per_request * page_size \
                     at most {}",
                    i32::MAX
                ),
            ));
        }
        if num_pages > i32::MAX as usize {
            return Err(Error::invalid(
                "num_pages",
                format!("is {num_pages}; at most {}", i32::MAX),
            ));
        }
        let elements = num_pages
            .checked_mul(page_size * num_kv_heads * head_dim)
            .filter(|&e| e <= i64::MAX as usize / 2);
        if elements.is_none() {
            return Err(Error::invalid(
                "num_pages",
                format!("is {num_pages}; the cache would overflow the address space"),
            ));
        }
        Ok(PagedCacheShape {
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            pages_per_request,
        })
    }

    /// Checks that a page table of `num_requests` rows is indexable with 32-bit entries; returns its length.
    pub fn check_page_table_rows(&self, num_requests: usize) -> Result<usize> {
        num_requests
            .checked_mul(self.pages_per_request)
            .filter(|&e| e <= i32::MAX as usize)
            .ok_or_else(|| {
                Error::invalid(
                    "pages_per_request",
                    format!(
                        "is {}; the page table of {num_requests} requests would exceed {} entries",
                        self.pages_per_request,
                        i32::MAX
                    ),
                )
            })
    }

    /// Elements of each of `k_cache` and `v_cache`.
    pub fn cache_len(&self) -> usize {
        self.num_pages * self.page_size * self.num_kv_heads * self.head_dim
    }

    /// Token slots one request can address.
    pub fn capacity(&self) -> usize {
        self.pages_per_request * self.page_size
    }

    /// The element index of slot `slot`'s row for KV head `head`, through request `b`'s page-table row
    /// (already validated).
    pub fn slot_offset(&self, page_table: &[i32], b: usize, slot: usize, head: usize) -> usize {
        let page = page_table[b * self.pages_per_request + slot / self.page_size] as usize;
        ((page * self.page_size + slot % self.page_size) * self.num_kv_heads + head) * self.head_dim
    }

    /// Checks that the prefix `prefix_len` plus `extra` slots fit request `b`'s pages and that each page they
    /// use is a valid page index.
    fn check_slots(
        &self,
        b: usize,
        prefix_lens: &[i32],
        extra: usize,
        page_table: &[i32],
    ) -> RequestResult<usize> {
        let prefix_len = prefix_lens[b];
        if prefix_len < 0 || prefix_len as usize + extra > self.capacity() {
            return Err(RequestStatus::PrefixLen.failure(
                format!("prefix_lens[{b}]"),
                format!(
                    "is {prefix_len}; with {extra} more slots it must fit the request's {} pages of {} \
                     ({} slots)",
                    self.pages_per_request,
                    self.page_size,
                    self.capacity()
                ),
            ));
        }
        let used = (prefix_len as usize + extra).div_ceil(self.page_size);
        let row = &page_table[b * self.pages_per_request..][..used];
        if let Some(p) = row
            .iter()
            .position(|&e| e < 0 || e as usize >= self.num_pages)
        {
            return Err(RequestStatus::PageTable.failure(
                format!("page_table[{}]", b * self.pages_per_request + p),
                format!(
                    "is {}, outside the cache's pages 0..{} (request {b} uses its first {used} entries)",
                    row[p], self.num_pages
                ),
            ));
        }
        Ok(prefix_len as usize)
    }
}

/// The rotary embedding of a tree-attention call: the style and the rows of `cos_sin_cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RopeShape {
    /// How pairs are formed.
    pub style: RopeStyle,
    /// Rows of `cos_sin_cache` (`[max_position, head_dim]` f32).
    pub max_position: usize,
}

/// The small index arrays of a tree-attention call in host memory, for the CPU shorthand
/// [`crate::cpu::tree_attention`].
#[derive(Debug, Clone, Copy)]
pub struct TreeBatch<'a> {
    /// `[B + 1]`: request `b`'s nodes are rows `token_offsets[b] .. token_offsets[b + 1]`.
    pub token_offsets: &'a [i32],
    /// `[N]`: each node's parent inside its tree, `-1` for a root.
    pub parents: &'a [i32],
    /// `[B]`: `L_b`, the cached tokens of each request.
    pub prefix_lens: &'a [i32],
    /// `[B, pages_per_request]`: each request's pages.
    pub page_table: &'a [i32],
}

/// Everything tree attention reads, in the memory of the [`Backend`] it runs on (layouts in the
/// [module documentation](self)).
pub struct TreeAttentionInputs<'a, T> {
    /// The call's sizes.
    pub shape: TreeAttentionShape,
    /// `[N, Hq, D]`.
    pub q: In<'a, T>,
    /// `[N, Hkv, D]`: the nodes' keys, before RoPE.
    pub k: In<'a, T>,
    /// `[N, Hkv, D]`.
    pub v: In<'a, T>,
    /// `[B + 1]`: request `b`'s nodes are rows `token_offsets[b] .. token_offsets[b + 1]`.
    pub token_offsets: In<'a, i32>,
    /// `[N]`: each node's parent inside its tree, `-1` for a root.
    pub parents: In<'a, i32>,
    /// `[B]`: `L_b`, the cached tokens of each request.
    pub prefix_lens: In<'a, i32>,
    /// `[B, pages_per_request]`.
    pub page_table: In<'a, i32>,
    /// `[max_position, D]` f32 when the shape has RoPE, else `None`.
    pub cos_sin_cache: Option<In<'a, f32>>,
    /// The factor of the scores, finite (usually `1 / sqrt(D)`).
    pub softmax_scale: f32,
}

/// Everything tree attention writes: the cache (appended to), `out`, and optionally `lse` and
/// `request_status`.
pub struct TreeAttentionOutputs<'a, T> {
    /// `[num_pages, page_size, Hkv, D]`, read and appended to; 16-byte aligned on CUDA.
    pub k_cache: Out<'a, T>,
    /// As `k_cache`.
    pub v_cache: Out<'a, T>,
    /// `[N, Hq, D]`.
    pub out: Out<'a, T>,
    /// `[N, Hq]`, the natural log-sum-exp of each row's scores.
    pub lse: Option<Out<'a, f32>>,
    /// `[B]`: each request's [`RequestStatus`] code; when given, a bad request is flagged alone.
    pub request_status: Option<Out<'a, i32>>,
}

/// A compaction of accepted paths in every layer's cache (see the [module documentation](self)).
pub struct KvCompaction<'a, T> {
    /// The call's sizes.
    pub shape: CompactionShape,
    /// `[B + 1]`.
    pub accepted_offsets: In<'a, i32>,
    /// `[num_accepted]`: strictly increasing node indices per request, below [`MAX_TREE_NODES`].
    pub accepted_nodes: In<'a, i32>,
    /// `[B]`.
    pub prefix_lens: In<'a, i32>,
    /// `[B, pages_per_request]`.
    pub page_table: In<'a, i32>,
    /// `[num_layers]` caches, each `[num_pages, page_size, Hkv, D]`; 16-byte aligned on CUDA (at most
    /// `specdec::cuda::MAX_COMPACTION_LAYERS` per call there).
    pub k_caches: Vec<Out<'a, T>>,
    /// As `k_caches`.
    pub v_caches: Vec<Out<'a, T>>,
    /// `[B]`, optional: each request's [`RequestStatus`] code; a flagged request moves nothing.
    pub request_status: Option<Out<'a, i32>>,
}

impl<T> TreeAttentionInputs<'_, T> {
    /// Checks every array's length against the shape, and the softmax scale: the one size check of every
    /// backend.
    pub fn check_lengths(&self, outputs: &TreeAttentionOutputs<'_, T>) -> Result<()> {
        check_softmax_scale(self.softmax_scale)?;
        self.shape.checked()?;
        self.shape.check_lengths(
            self.q.len(),
            self.k.len(),
            self.v.len(),
            self.token_offsets.len(),
            self.parents.len(),
            self.prefix_lens.len(),
            self.page_table.len(),
            outputs.k_cache.len(),
            outputs.v_cache.len(),
            self.cos_sin_cache.as_ref().map(In::len),
            outputs.out.len(),
            outputs.lse.as_ref().map(Out::len),
        )?;
        if let Some(status) = &outputs.request_status {
            check_len("request_status", status.len(), self.shape.num_requests)?;
        }
        Ok(())
    }
}

impl<T> KvCompaction<'_, T> {
    /// Checks every array's length against the shape: the one size check of every backend.
    pub fn check_lengths(&self) -> Result<()> {
        let shape = &self.shape.checked()?;
        shape.check_lengths(
            self.accepted_offsets.len(),
            self.accepted_nodes.len(),
            self.prefix_lens.len(),
            self.page_table.len(),
        )?;
        check_len("k_caches", self.k_caches.len(), shape.num_layers)?;
        check_len("v_caches", self.v_caches.len(), shape.num_layers)?;
        for (layer, (k, v)) in self.k_caches.iter().zip(&self.v_caches).enumerate() {
            let cache_len = shape.cache.cache_len();
            check_len(&format!("k_caches[{layer}]"), k.len(), cache_len)?;
            check_len(&format!("v_caches[{layer}]"), v.len(), cache_len)?;
        }
        if let Some(status) = &self.request_status {
            check_len("request_status", status.len(), shape.num_requests)?;
        }
        Ok(())
    }
}

impl Backend {
    /// Tree attention with KV append and RoPE ([`TreeAttentionInputs`], [`TreeAttentionOutputs`]; semantics
    /// and rules in the [module documentation](self)).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming a size, a length, an array in the wrong memory, a null or misaligned
    /// device pointer, and (CPU backend without `request_status`) the first bad request; CUDA errors from the
    /// launch.
    pub fn tree_attention<T: HalfElement>(
        &self,
        stream: Stream<'_>,
        inputs: &TreeAttentionInputs<'_, T>,
        outputs: TreeAttentionOutputs<'_, T>,
    ) -> Result<()> {
        inputs.check_lengths(&outputs)?;
        match self {
            Backend::Cpu => {
                let _ = stream;
                let batch = TreeBatch {
                    token_offsets: inputs.token_offsets.host("token_offsets")?,
                    parents: inputs.parents.host("parents")?,
                    prefix_lens: inputs.prefix_lens.host("prefix_lens")?,
                    page_table: inputs.page_table.host("page_table")?,
                };
                let cos_sin = inputs
                    .cos_sin_cache
                    .as_ref()
                    .map(|c| c.host("cos_sin_cache"))
                    .transpose()?;
                crate::cpu::attention::tree_attention_checked(
                    &inputs.shape,
                    inputs.q.host("q")?,
                    inputs.k.host("k")?,
                    inputs.v.host("v")?,
                    &batch,
                    cos_sin,
                    inputs.softmax_scale,
                    outputs.k_cache.host("k_cache")?,
                    outputs.v_cache.host("v_cache")?,
                    outputs.out.host("out")?,
                    optional_host(outputs.lse, "lse")?,
                    optional_host(outputs.request_status, "request_status")?,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => {
                use crate::backend::optional_device;
                let ptrs = crate::cuda::attention::TreeAttentionDevicePtrs {
                    q: inputs.q.device("q")?,
                    k: inputs.k.device("k")?,
                    v: inputs.v.device("v")?,
                    token_offsets: inputs.token_offsets.device("token_offsets")?,
                    parents: inputs.parents.device("parents")?,
                    prefix_lens: inputs.prefix_lens.device("prefix_lens")?,
                    page_table: inputs.page_table.device("page_table")?,
                    k_cache: outputs.k_cache.device("k_cache")?,
                    v_cache: outputs.v_cache.device("v_cache")?,
                    cos_sin_cache: inputs
                        .cos_sin_cache
                        .as_ref()
                        .map_or(Ok(0), |c| c.device("cos_sin_cache"))?,
                    out: outputs.out.device("out")?,
                    lse: optional_device(&outputs.lse, "lse")?,
                    request_status: optional_device(&outputs.request_status, "request_status")?,
                };
                ptrs.check(&inputs.shape)?;
                let stream = Backend::cu_stream(cuda, stream)?;
                cuda.launch_tree_attention(
                    stream,
                    &inputs.shape,
                    T::DTYPE,
                    inputs.softmax_scale,
                    &ptrs,
                )
            }
        }
    }

    /// Compaction of accepted paths in every layer's cache ([`KvCompaction`]). Elements are moved unchanged:
    /// any `T` on the CPU, 16-bit elements on CUDA.
    ///
    /// # Errors
    /// As [`Backend::tree_attention`]; on CUDA also more than `MAX_COMPACTION_LAYERS` layers, or elements that
    /// are not 16 bits.
    pub fn tree_kv_compact<T: Copy>(
        &self,
        stream: Stream<'_>,
        args: KvCompaction<'_, T>,
    ) -> Result<()> {
        args.check_lengths()?;
        match self {
            Backend::Cpu => {
                let _ = stream;
                let mut k_caches = host_layers(args.k_caches, "k_caches")?;
                let mut v_caches = host_layers(args.v_caches, "v_caches")?;
                crate::cpu::attention::tree_kv_compact_checked(
                    &args.shape,
                    args.accepted_offsets.host("accepted_offsets")?,
                    args.accepted_nodes.host("accepted_nodes")?,
                    args.prefix_lens.host("prefix_lens")?,
                    args.page_table.host("page_table")?,
                    &mut k_caches,
                    &mut v_caches,
                    optional_host(args.request_status, "request_status")?,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => {
                if size_of::<T>() != 2 {
                    return Err(Error::invalid(
                        "k_caches",
                        format!(
                            "hold {}-byte elements; the CUDA kernel moves 16-bit ones (fp16 or bf16)",
                            size_of::<T>()
                        ),
                    ));
                }
                let layers = |caches: &[Out<'_, T>], name: &str| -> Result<Vec<u64>> {
                    caches
                        .iter()
                        .enumerate()
                        .map(|(layer, cache)| cache.device(&format!("{name}[{layer}]")))
                        .collect()
                };
                let k_caches = layers(&args.k_caches, "k_caches")?;
                let v_caches = layers(&args.v_caches, "v_caches")?;
                let ptrs = crate::cuda::attention::CompactionDevicePtrs {
                    k_caches: &k_caches,
                    v_caches: &v_caches,
                    accepted_offsets: args.accepted_offsets.device("accepted_offsets")?,
                    accepted_nodes: args.accepted_nodes.device("accepted_nodes")?,
                    prefix_lens: args.prefix_lens.device("prefix_lens")?,
                    page_table: args.page_table.device("page_table")?,
                    request_status: crate::backend::optional_device(
                        &args.request_status,
                        "request_status",
                    )?,
                };
                ptrs.check(&args.shape)?;
                let stream = Backend::cu_stream(cuda, stream)?;
                cuda.launch_tree_kv_compact(stream, &args.shape, &ptrs)
            }
        }
    }
}

/// The host slices of every layer's cache, or an error naming the first in device memory.
fn host_layers<'a, T>(caches: Vec<Out<'a, T>>, argument: &str) -> Result<Vec<&'a mut [T]>> {
    caches
        .into_iter()
        .enumerate()
        .map(|(layer, cache)| cache.host(&format!("{argument}[{layer}]")))
        .collect()
}

/// Checks that the softmax scale is a finite number.
pub fn check_softmax_scale(softmax_scale: f32) -> Result<()> {
    if softmax_scale.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            "softmax_scale",
            format!("is {softmax_scale}; it must be finite"),
        ))
    }
}

/// The validated sizes of one tree-attention call. Constructing one is the only way into any backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TreeAttentionShape {
    /// `B`.
    pub num_requests: usize,
    /// `N`, the total number of tree nodes (rows of q, k, v and out).
    pub num_tokens: usize,
    /// `Hq`, a multiple of `cache.num_kv_heads`.
    pub num_q_heads: usize,
    /// The largest tree in the batch may have this many nodes (`1..=`[`MAX_TREE_NODES`]); it sizes the launch.
    pub max_tree_size: usize,
    /// The cache.
    pub cache: PagedCacheShape,
    /// `None`: no rotary embedding.
    pub rope: Option<RopeShape>,
}

/// One request's part of a tree-attention call, after [`TreeAttentionShape::check_request`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeRequest {
    /// The first row of the request in q, k, v and out.
    pub first_row: usize,
    /// `L_b`.
    pub prefix_len: usize,
    /// `depth(i)` of each node.
    pub depths: Vec<usize>,
    /// `ancestors[i]`: bit `j` set when node `j` is node `i` or one of its ancestors.
    pub ancestors: Vec<u64>,
}

impl TreeRequest {
    /// `T_b`.
    pub fn tree_size(&self) -> usize {
        self.depths.len()
    }
}

impl TreeAttentionShape {
    /// The shape re-checked by the rules of [`TreeAttentionShape::new`] and [`PagedCacheShape::new`].
    pub fn checked(&self) -> Result<Self> {
        TreeAttentionShape::new(
            self.num_requests,
            self.num_tokens,
            self.num_q_heads,
            self.max_tree_size,
            self.cache.checked()?,
            self.rope,
        )
    }

    /// Checks the sizes: `Hq` a positive multiple of `Hkv`, `max_tree_size` in `1..=`[`MAX_TREE_NODES`], `num_tokens` and every
    /// q/out element index representable in 31 and 63 bits, `max_position` at least 1.
    pub fn new(
        num_requests: usize,
        num_tokens: usize,
        num_q_heads: usize,
        max_tree_size: usize,
        cache: PagedCacheShape,
        rope: Option<RopeShape>,
    ) -> Result<Self> {
        if num_q_heads == 0 || !num_q_heads.is_multiple_of(cache.num_kv_heads) || num_q_heads > 8192
        {
            return Err(Error::invalid(
                "num_q_heads",
                format!(
                    "is {num_q_heads}; it must be a positive multiple of num_kv_heads ({}), at most 8192",
                    cache.num_kv_heads
                ),
            ));
        }
        if max_tree_size == 0 || max_tree_size > MAX_TREE_NODES {
            return Err(Error::invalid(
                "max_tree_size",
                format!("is {max_tree_size}; it must be in 1..={MAX_TREE_NODES}"),
            ));
        }
        if num_requests > 65535 {
            return Err(Error::invalid(
                "num_requests",
                format!("is {num_requests}; one call takes at most 65535 requests"),
            ));
        }
        if num_tokens > i32::MAX as usize {
            return Err(Error::invalid(
                "num_tokens",
                format!(
                    "is {num_tokens} for {num_requests} requests; at most {}",
                    i32::MAX
                ),
            ));
        }
        if num_tokens
            .checked_mul(num_q_heads * cache.head_dim)
            .is_none_or(|e| e > i64::MAX as usize / 4)
        {
            return Err(Error::invalid(
                "num_tokens",
                format!("is {num_tokens}; q would overflow the address space"),
            ));
        }
        cache.check_page_table_rows(num_requests)?;
        if let Some(r) = rope {
            if r.max_position == 0 || r.max_position > i32::MAX as usize {
                return Err(Error::invalid(
                    "max_position",
                    format!("is {}; it must be in 1..={}", r.max_position, i32::MAX),
                ));
            }
        }
        Ok(TreeAttentionShape {
            num_requests,
            num_tokens,
            num_q_heads,
            max_tree_size,
            cache,
            rope,
        })
    }

    /// q heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_q_heads / self.cache.num_kv_heads
    }

    /// Elements of `q` and `out`.
    pub fn q_len(&self) -> usize {
        self.num_tokens * self.num_q_heads * self.cache.head_dim
    }

    /// Elements of `k` and `v`.
    pub fn kv_len(&self) -> usize {
        self.num_tokens * self.cache.num_kv_heads * self.cache.head_dim
    }

    /// Elements of `lse`.
    pub fn lse_len(&self) -> usize {
        self.num_tokens * self.num_q_heads
    }

    /// Elements of `page_table`.
    pub fn page_table_len(&self) -> usize {
        self.num_requests * self.cache.pages_per_request
    }

    /// Elements of `cos_sin_cache` (0 without RoPE).
    pub fn cos_sin_len(&self) -> usize {
        self.rope
            .map_or(0, |r| r.max_position * self.cache.head_dim)
    }

    /// Checks the lengths of the arrays against the shape (`lse` and `cos_sin_cache` when given).
    #[allow(clippy::too_many_arguments)]
    pub fn check_lengths(
        &self,
        q: usize,
        k: usize,
        v: usize,
        token_offsets: usize,
        parents: usize,
        prefix_lens: usize,
        page_table: usize,
        k_cache: usize,
        v_cache: usize,
        cos_sin_cache: Option<usize>,
        out: usize,
        lse: Option<usize>,
    ) -> Result<()> {
        check_len("q", q, self.q_len())?;
        check_len("k", k, self.kv_len())?;
        check_len("v", v, self.kv_len())?;
        check_len("token_offsets", token_offsets, self.num_requests + 1)?;
        check_len("parents", parents, self.num_tokens)?;
        check_len("prefix_lens", prefix_lens, self.num_requests)?;
        check_len("page_table", page_table, self.page_table_len())?;
        check_len("k_cache", k_cache, self.cache.cache_len())?;
        check_len("v_cache", v_cache, self.cache.cache_len())?;
        match (self.rope.is_some(), cos_sin_cache) {
            (true, Some(len)) => check_len("cos_sin_cache", len, self.cos_sin_len())?,
            (false, None) => {}
            (true, None) => {
                return Err(Error::invalid(
                    "cos_sin_cache",
                    "is missing, but the shape asks for RoPE",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::invalid(
                    "cos_sin_cache",
                    "is given, but the shape has no RoPE",
                ))
            }
        }
        check_len("out", out, self.q_len())?;
        if let Some(lse) = lse {
            check_len("lse", lse, self.lse_len())?;
        }
        Ok(())
    }

    /// Checks request `b`'s index arrays and returns its tree. The CUDA kernel applies the same rules
    /// (`CheckTreeRequest` in `cuda/tree_attention.cu`).
    pub fn check_request(
        &self,
        b: usize,
        token_offsets: &[i32],
        parents: &[i32],
        prefix_lens: &[i32],
        page_table: &[i32],
    ) -> RequestResult<TreeRequest> {
        let (first, last) = check_tree_offsets(
            "token_offsets",
            token_offsets,
            b,
            self.num_tokens,
            self.max_tree_size,
        )?;
        for row in first..last {
            let owner = self.token_owner(token_offsets, row);
            if owner != Some(b) {
                return Err(RequestStatus::Offsets.failure(
                    format!("token_offsets[{b}]"),
                    format!(
                        "gives request {b} row {row}, which the offsets give to {}: another request's offsets \
                         are broken, and no row may belong to two requests",
                        owner.map_or("no request".to_string(), |o| format!("request {o}"))
                    ),
                ));
            }
        }
        let tree_size = last - first;
        let mut depths = Vec::with_capacity(tree_size);
        let mut ancestors = Vec::with_capacity(tree_size);
        for i in 0..tree_size {
            let parent = parents[first + i];
            if parent < -1 || parent >= i as i32 {
                return Err(RequestStatus::Parents.failure(
                    format!("parents[{}]", first + i),
                    format!(
                        "is {parent} for node {i} of request {b}; a parent must be -1 (a root) or an \
                         earlier node (0..{i})"
                    ),
                ));
            }
            let (depth, above) = if parent < 0 {
                (0, 0)
            } else {
                (depths[parent as usize] + 1, ancestors[parent as usize])
            };
            depths.push(depth);
            ancestors.push(above | 1u64 << i);
        }
        let prefix_len = self
            .cache
            .check_slots(b, prefix_lens, tree_size, page_table)?;
        if let (Some(rope), Some(deepest)) = (self.rope, depths.iter().max()) {
            if prefix_len + deepest >= rope.max_position {
                return Err(RequestStatus::RopePosition.failure(
                    "cos_sin_cache",
                    format!(
                        "has {} positions, but request {b}'s node at depth {deepest} after {prefix_len} \
                         cached tokens needs position {}",
                        rope.max_position,
                        prefix_len + deepest
                    ),
                ));
            }
        }
        Ok(TreeRequest {
            first_row: first,
            prefix_len,
            depths,
            ancestors,
        })
    }

    /// The request whose rows hold token `row`, as the CUDA kernel finds it (`TokenOwner` in
    /// `cuda/tree_attention.cu`): the last request whose first row is at or before it, accepted only if that
    /// request's offsets are valid and the row lies in its range. With valid offsets everywhere this is the row's
    /// request; when another request's offsets are broken, two requests may claim one row, the search gives it to
    /// one at most, and the other gets [`RequestStatus::Offsets`] (so no row is computed or written twice).
    pub fn token_owner(&self, token_offsets: &[i32], row: usize) -> Option<usize> {
        if self.num_requests == 0 {
            return None;
        }
        let (mut lo, mut hi) = (0, self.num_requests - 1);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if i64::from(token_offsets[mid]) <= row as i64 {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let (first, last) = check_tree_offsets(
            "token_offsets",
            token_offsets,
            lo,
            self.num_tokens,
            self.max_tree_size,
        )
        .ok()?;
        (first..last).contains(&row).then_some(lo)
    }

    /// [`RequestStatus`] of request `b`: what a CUDA kernel writes for it.
    pub fn request_status(
        &self,
        b: usize,
        token_offsets: &[i32],
        parents: &[i32],
        prefix_lens: &[i32],
        page_table: &[i32],
    ) -> RequestStatus {
        match self.check_request(b, token_offsets, parents, prefix_lens, page_table) {
            Ok(_) => RequestStatus::Ok,
            Err(failure) => failure.status,
        }
    }
}

/// Offsets `b`, `b + 1` of a ragged array: ordered, within `0..=limit`, and at most `max_size` apart.
fn check_tree_offsets(
    name: &str,
    offsets: &[i32],
    b: usize,
    limit: usize,
    max_size: usize,
) -> RequestResult<(usize, usize)> {
    let (first, last) = crate::error::check_offsets(name, offsets, b, limit)
        .map_err(|error| RequestStatus::Offsets.with(error))?;
    if last - first > max_size {
        return Err(RequestStatus::Offsets.failure(
            format!("{name}[{}]", b + 1),
            format!(
                "gives request {b} {} nodes; at most max_tree_size = {max_size}",
                last - first
            ),
        ));
    }
    Ok((first, last))
}

/// The validated sizes of one compaction call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionShape {
    /// `B`.
    pub num_requests: usize,
    /// Layers: the length of the arrays of cache pointers (or slices).
    pub num_layers: usize,
    /// Accepted nodes in all (the length of `accepted_nodes`).
    pub num_accepted: usize,
    /// Every layer's cache has this geometry.
    pub cache: PagedCacheShape,
}

impl CompactionShape {
    /// The shape re-checked by the rules of [`CompactionShape::new`] and [`PagedCacheShape::new`].
    pub fn checked(&self) -> Result<Self> {
        CompactionShape::new(
            self.num_requests,
            self.num_layers,
            self.num_accepted,
            self.cache.checked()?,
        )
    }

    /// Checks the sizes.
    pub fn new(
        num_requests: usize,
        num_layers: usize,
        num_accepted: usize,
        cache: PagedCacheShape,
    ) -> Result<Self> {
        if num_layers > 65535 {
            return Err(Error::invalid(
                "num_layers",
                format!("is {num_layers}; at most 65535"),
            ));
        }
        if num_requests > 65535 * 1024 {
            return Err(Error::invalid(
                "num_requests",
                format!("is {num_requests}; at most {} requests", 65535 * 1024),
            ));
        }
        if num_accepted > i32::MAX as usize {
            return Err(Error::invalid(
                "num_accepted",
                format!(
                    "is {num_accepted}; node indices are int32, so at most {}",
                    i32::MAX
                ),
            ));
        }
        cache.check_page_table_rows(num_requests)?;
        Ok(CompactionShape {
            num_requests,
            num_layers,
            num_accepted,
            cache,
        })
    }

    /// Checks the lengths of the index arrays.
    pub fn check_lengths(
        &self,
        accepted_offsets: usize,
        accepted_nodes: usize,
        prefix_lens: usize,
        page_table: usize,
    ) -> Result<()> {
        check_len("accepted_offsets", accepted_offsets, self.num_requests + 1)?;
        check_len("accepted_nodes", accepted_nodes, self.num_accepted)?;
        check_len("prefix_lens", prefix_lens, self.num_requests)?;
        check_len(
            "page_table",
            page_table,
            self.num_requests * self.cache.pages_per_request,
        )
    }

    /// Checks request `b`'s arrays; returns `L_b` and its accepted nodes. The CUDA kernel applies the same
    /// rules (`CheckCompactionRequest` in `cuda/tree_attention.cu`).
    pub fn check_request<'a>(
        &self,
        b: usize,
        accepted_offsets: &[i32],
        accepted_nodes: &'a [i32],
        prefix_lens: &[i32],
        page_table: &[i32],
    ) -> RequestResult<(usize, &'a [i32])> {
        let (first, last) = check_tree_offsets(
            "accepted_offsets",
            accepted_offsets,
            b,
            self.num_accepted,
            MAX_TREE_NODES,
        )?;
        let nodes = &accepted_nodes[first..last];
        let mut previous = -1;
        for (j, &node) in nodes.iter().enumerate() {
            if node <= previous || node >= MAX_TREE_NODES as i32 {
                return Err(RequestStatus::Parents.failure(
                    format!("accepted_nodes[{}]", first + j),
                    format!(
                        "is {node}; a request's accepted nodes must be strictly increasing tree indices in \
                         0..{MAX_TREE_NODES} (previous {previous})"
                    ),
                ));
            }
            previous = node;
        }
        let extent = nodes.last().map_or(0, |&n| n as usize + 1);
        let prefix_len = self.cache.check_slots(b, prefix_lens, extent, page_table)?;
        Ok((prefix_len, nodes))
    }

    /// [`RequestStatus`] of request `b`: what the CUDA kernel writes for it.
    pub fn request_status(
        &self,
        b: usize,
        accepted_offsets: &[i32],
        accepted_nodes: &[i32],
        prefix_lens: &[i32],
        page_table: &[i32],
    ) -> RequestStatus {
        match self.check_request(b, accepted_offsets, accepted_nodes, prefix_lens, page_table) {
            Ok(_) => RequestStatus::Ok,
            Err(failure) => failure.status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> PagedCacheShape {
        PagedCacheShape::new(8, 16, 2, 64, 4).unwrap()
    }

    #[test]
    fn depths_and_ancestors_follow_the_parent_array() {
        let shape = TreeAttentionShape::new(1, 5, 4, 8, cache(), None).unwrap();
        // 0 -> {1, 2}, 1 -> 3, 2 -> 4
        let parents = [-1, 0, 0, 1, 2];
        let request = shape
            .check_request(0, &[0, 5], &parents, &[3], &[0, 1, 2, 3])
            .unwrap();
        assert_eq!(request.depths, [0, 1, 1, 2, 2]);
        assert_eq!(request.ancestors, [0b1, 0b11, 0b101, 0b1011, 0b10101]);
    }

    #[test]
    fn each_broken_rule_maps_to_its_status() {
        let rope = RopeShape {
            style: RopeStyle::Neox,
            max_position: 6,
        };
        let shape = TreeAttentionShape::new(1, 3, 4, 3, cache(), Some(rope)).unwrap();
        let status = |offsets: &[i32], parents: &[i32], prefix: i32, table: &[i32]| {
            shape.request_status(0, offsets, parents, &[prefix], table)
        };
        let table = [0, 1, 2, 3];
        assert_eq!(status(&[0, 3], &[-1, 0, 1], 3, &table), RequestStatus::Ok);
        assert_eq!(
            status(&[0, 4], &[-1, 0, 1], 3, &table),
            RequestStatus::Offsets
        );
        assert_eq!(
            status(&[2, 1], &[-1, 0, 1], 3, &table),
            RequestStatus::Offsets
        );
        assert_eq!(
            status(&[0, 3], &[-1, 1, 1], 3, &table),
            RequestStatus::Parents
        );
        assert_eq!(
            status(&[0, 3], &[-1, 0, -2], 3, &table),
            RequestStatus::Parents
        );
        assert_eq!(
            status(&[0, 3], &[-1, 0, 1], -1, &table),
            RequestStatus::PrefixLen
        );
        assert_eq!(
            status(&[0, 3], &[-1, 0, 1], 62, &table),
            RequestStatus::PrefixLen
        );
        assert_eq!(
            status(&[0, 3], &[-1, 0, 1], 3, &[8, 1, 2, 3]),
            RequestStatus::PageTable
        );
        // The page past the ones used is not read.
        assert_eq!(
            status(&[0, 3], &[-1, 0, 1], 3, &[0, -5, 2, 3]),
            RequestStatus::Ok
        );
        // Depth 2 after 4 cached tokens is position 6: beyond a 6-row cos/sin cache.
        assert_eq!(
            status(&[0, 3], &[-1, 0, 1], 4, &table),
            RequestStatus::RopePosition
        );
        assert_eq!(status(&[0, 3], &[-1, 0, 0], 4, &table), RequestStatus::Ok);
    }

    #[test]
    fn compaction_needs_strictly_increasing_nodes_inside_the_pages() {
        let shape = CompactionShape::new(1, 2, 3, cache()).unwrap();
        let status = |nodes: &[i32], prefix: i32| {
            shape.request_status(0, &[0, 3], nodes, &[prefix], &[0, 1, 2, 3])
        };
        assert_eq!(status(&[0, 2, 5], 10), RequestStatus::Ok);
        assert_eq!(status(&[0, 2, 2], 10), RequestStatus::Parents);
        assert_eq!(status(&[0, 2, 64], 10), RequestStatus::Parents);
        assert_eq!(status(&[0, 2, 5], 58), RequestStatus::Ok);
        assert_eq!(status(&[0, 2, 5], 59), RequestStatus::PrefixLen);
    }

    #[test]
    fn geometry_rules_name_their_argument() {
        let name = |e: Error| match e {
            Error::InvalidArgument { argument, .. } => argument,
            other => panic!("{other}"),
        };
        assert_eq!(
            name(PagedCacheShape::new(8, 8, 2, 64, 4).unwrap_err()),
            "page_size"
        );
        assert_eq!(
            name(PagedCacheShape::new(8, 48, 2, 64, 4).unwrap_err()),
            "page_size"
        );
        assert_eq!(
            name(PagedCacheShape::new(8, 16, 2, 96, 4).unwrap_err()),
            "head_dim"
        );
        assert_eq!(
            name(PagedCacheShape::new(8, 16, 0, 64, 4).unwrap_err()),
            "num_kv_heads"
        );
        let err = TreeAttentionShape::new(1, 1, 3, 1, cache(), None).unwrap_err();
        assert_eq!(name(err), "num_q_heads");
        let err = TreeAttentionShape::new(1, 1, 4, 65, cache(), None).unwrap_err();
        assert_eq!(name(err), "max_tree_size");
    }
}
