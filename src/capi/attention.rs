//! Tree attention over a paged KV cache and KV compaction (`specdec::attention`).

use super::*;

/// Which dimensions RoPE rotates together, passed as `int32_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_rope_style {
    /// NeoX (Llama, Qwen): dimension `j` with `j + head_dim / 2`.
    SPECDEC_ROPE_NEOX = 0,
    /// GPT-J: dimension `2j` with `2j + 1`.
    SPECDEC_ROPE_GPTJ = 1,
}

c_enum_table!(specdec_rope_style {
    SPECDEC_ROPE_NEOX,
    SPECDEC_ROPE_GPTJ,
});

/// The paged cache geometry from C arguments.
fn paged_cache_arg(
    num_pages: i64,
    page_size: i64,
    num_kv_heads: i64,
    head_dim: i64,
    pages_per_request: i64,
) -> Result<PagedCacheShape> {
    PagedCacheShape::new(
        size_arg("num_pages", num_pages)?,
        size_arg("page_size", page_size)?,
        size_arg("num_kv_heads", num_kv_heads)?,
        size_arg("head_dim", head_dim)?,
        size_arg("pages_per_request", pages_per_request)?,
    )
}

/// Tree-attention verification over a paged KV cache with the tree's KV appended (and RoPE applied) in the
/// same call; semantics, layouts and rules are those of the Rust module `specdec::attention` (and the README).
///
/// * `dtype` (fp16 or bf16) for `q[num_tokens * num_q_heads * head_dim]`, `k`, `v`
///   `[num_tokens * num_kv_heads * head_dim]`, `k_cache`, `v_cache`
///   `[num_pages * page_size * num_kv_heads * head_dim]` and `out` (like `q`).
/// * `token_offsets[num_requests + 1]`, `parents[num_tokens]` (-1 for a root, else an earlier node of the same
///   tree), `prefix_lens[num_requests]`, `page_table[num_requests * pages_per_request]` (int32).
/// * RoPE: `cos_sin_cache[max_position * head_dim]` (f32; cos then sin per position) with `rope_style` a
///   `specdec_rope_style`; NULL (and `max_position` 0) for none.
/// * Optional outputs (NULL to skip): `lse[num_tokens * num_q_heads]` (f32, natural log) and
///   `request_status[num_requests]` (`specdec_request_status`: 0 = ok, else the rule the request broke).
///
/// With `request_status`, a request that breaks a rule is flagged alone on either context: its
/// `specdec_request_status` code there, nothing appended to the cache for it and NaN in its rows of `out` and
/// `lse` (nothing at all when its `token_offsets` are broken); the others are computed. Without it, a CPU
/// context returns SPECDEC_INVALID_ARGUMENT naming the first bad element and writes nothing, while the CUDA
/// kernel still skips a failing request. On a CUDA context every array is device memory and the work is
/// enqueued on `stream`; `k_cache` and `v_cache` must be 16-byte aligned there.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, valid for the call (on a CUDA context:
/// until the work on `stream` has finished), and the outputs must not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_tree_attention(
    ctx: *const specdec_context,
    dtype: i32,
    q: *const c_void,
    k: *const c_void,
    v: *const c_void,
    num_requests: i64,
    num_tokens: i64,
    num_q_heads: i64,
    max_tree_size: i64,
    token_offsets: *const i32,
    parents: *const i32,
    prefix_lens: *const i32,
    page_table: *const i32,
    k_cache: *mut c_void,
    v_cache: *mut c_void,
    num_pages: i64,
    page_size: i64,
    num_kv_heads: i64,
    head_dim: i64,
    pages_per_request: i64,
    cos_sin_cache: *const f32,
    max_position: i64,
    rope_style: i32,
    softmax_scale: f32,
    out: *mut c_void,
    lse: *mut f32,
    request_status: *mut i32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let dtype = half_dtype_arg("dtype", dtype)?;
        let cache = paged_cache_arg(
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            pages_per_request,
        )?;
        let rope = if cos_sin_cache.is_null() {
            None
        } else {
            let style = match enum_arg::<specdec_rope_style>("rope_style", rope_style)? {
                specdec_rope_style::SPECDEC_ROPE_NEOX => RopeStyle::Neox,
                specdec_rope_style::SPECDEC_ROPE_GPTJ => RopeStyle::Gptj,
            };
            Some(RopeShape {
                style,
                max_position: size_arg("max_position", max_position)?,
            })
        };
        let shape = TreeAttentionShape::new(
            size_arg("num_requests", num_requests)?,
            size_arg("num_tokens", num_tokens)?,
            size_arg("num_q_heads", num_q_heads)?,
            size_arg("max_tree_size", max_tree_size)?,
            cache,
            rope,
        )?;
        match &ctx.backend {
            Backend::Cpu => {
                let batch = TreeBatch {
                    token_offsets: host_slice(
                        "token_offsets",
                        token_offsets,
                        shape.num_requests + 1,
                    )?,
                    parents: host_slice("parents", parents, shape.num_tokens)?,
                    prefix_lens: host_slice("prefix_lens", prefix_lens, shape.num_requests)?,
                    page_table: host_slice("page_table", page_table, shape.page_table_len())?,
                };
                let cos_sin = optional_slice("cos_sin_cache", cos_sin_cache, shape.cos_sin_len())?;
                let lse = optional_slice_mut("lse", lse, shape.lse_len())?;
                let status =
                    optional_slice_mut("request_status", request_status, shape.num_requests)?;
                with_half!(dtype, T => {
                    let cache_len = shape.cache.cache_len();
                    crate::cpu::tree_attention(
                        &shape,
                        host_slice("q", q as *const T, shape.q_len())?,
                        host_slice("k", k as *const T, shape.kv_len())?,
                        host_slice("v", v as *const T, shape.kv_len())?,
                        &batch,
                        cos_sin,
                        softmax_scale,
                        host_slice_mut("k_cache", k_cache as *mut T, cache_len)?,
                        host_slice_mut("v_cache", v_cache as *mut T, cache_len)?,
                        host_slice_mut("out", out as *mut T, shape.q_len())?,
                        lse,
                        status,
                    )
                })
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let ptrs = TreeAttentionDevicePtrs {
                    q: q as u64,
                    k: k as u64,
                    v: v as u64,
                    token_offsets: token_offsets as u64,
                    parents: parents as u64,
                    prefix_lens: prefix_lens as u64,
                    page_table: page_table as u64,
                    k_cache: k_cache as u64,
                    v_cache: v_cache as u64,
                    cos_sin_cache: cos_sin_cache as u64,
                    out: out as u64,
                    lse: lse as u64,
                    request_status: request_status as u64,
                };
                ptrs.check(&shape)?;
                backend.launch_tree_attention(stream as _, &shape, dtype, softmax_scale, &ptrs)
            }
        }
    })
}

/// Moves each request's accepted tree nodes to contiguous cache slots in every layer (see `specdec::attention`):
/// for request `b`, the entries at slot `prefix_lens[b] + accepted_nodes[accepted_offsets[b] + j]` move to slot
/// `prefix_lens[b] + j`; entries already in place are not touched. `k_caches[num_layers]` and
/// `v_caches[num_layers]` are host arrays holding each layer's cache pointer (`[num_pages * page_size *
/// num_kv_heads * head_dim]` 16-bit elements; on a CUDA context device memory, 16-byte aligned, at most 128
/// layers per call). `accepted_offsets[num_requests + 1]`, `accepted_nodes[num_accepted]` (strictly increasing
/// per request, below 64), `prefix_lens[num_requests]`, `page_table[num_requests * pages_per_request]`, and
/// optionally `request_status[num_requests]`, live where the caches do. Errors and `request_status` as
/// `specdec_tree_attention`; a flagged request moves nothing.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, valid for the call (on a CUDA context:
/// until the work on `stream` has finished); `k_caches` and `v_caches` are read during the call only.
#[no_mangle]
pub unsafe extern "C" fn specdec_tree_kv_compact(
    ctx: *const specdec_context,
    k_caches: *const *mut c_void,
    v_caches: *const *mut c_void,
    num_layers: i64,
    num_pages: i64,
    page_size: i64,
    num_kv_heads: i64,
    head_dim: i64,
    pages_per_request: i64,
    num_requests: i64,
    accepted_offsets: *const i32,
    accepted_nodes: *const i32,
    num_accepted: i64,
    prefix_lens: *const i32,
    page_table: *const i32,
    request_status: *mut i32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let cache = paged_cache_arg(
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            pages_per_request,
        )?;
        let shape = CompactionShape::new(
            size_arg("num_requests", num_requests)?,
            size_arg("num_layers", num_layers)?,
            size_arg("num_accepted", num_accepted)?,
            cache,
        )?;
        let k_list = host_slice("k_caches", k_caches, shape.num_layers)?;
        let v_list = host_slice("v_caches", v_caches, shape.num_layers)?;
        match &ctx.backend {
            Backend::Cpu => {
                let offsets =
                    host_slice("accepted_offsets", accepted_offsets, shape.num_requests + 1)?;
                let nodes = host_slice("accepted_nodes", accepted_nodes, shape.num_accepted)?;
                let prefix = host_slice("prefix_lens", prefix_lens, shape.num_requests)?;
                let table = host_slice(
                    "page_table",
                    page_table,
                    shape.num_requests * cache.pages_per_request,
                )?;
                let status =
                    optional_slice_mut("request_status", request_status, shape.num_requests)?;
                let layer_slices = |list: &[*mut c_void], name: &str| -> Result<Vec<&mut [u16]>> {
                    list.iter()
                        .enumerate()
                        .map(|(i, &p)| {
                            host_slice_mut(
                                &format!("{name}[{i}]"),
                                p as *mut u16,
                                cache.cache_len(),
                            )
                        })
                        .collect()
                };
                let mut k = layer_slices(k_list, "k_caches")?;
                let mut v = layer_slices(v_list, "v_caches")?;
                crate::cpu::tree_kv_compact(
                    &shape, offsets, nodes, prefix, table, &mut k, &mut v, status,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let k: Vec<u64> = k_list.iter().map(|&p| p as u64).collect();
                let v: Vec<u64> = v_list.iter().map(|&p| p as u64).collect();
                let ptrs = CompactionDevicePtrs {
                    k_caches: &k,
                    v_caches: &v,
                    accepted_offsets: accepted_offsets as u64,
                    accepted_nodes: accepted_nodes as u64,
                    prefix_lens: prefix_lens as u64,
                    page_table: page_table as u64,
                    request_status: request_status as u64,
                };
                ptrs.check(&shape)?;
                backend.launch_tree_kv_compact(stream as _, &shape, &ptrs)
            }
        }
    })
}
