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
        let backend = &ctx.backend;
        // Every array resolved in the order of the arguments, so that both contexts name the same bad one.
        with_half!(dtype, T => {
            let cache_len = shape.cache.cache_len();
            let (b, n) = (shape.num_requests, shape.num_tokens);
            let q = array_in(backend, "q", q as *const T, shape.q_len())?;
            let k = array_in(backend, "k", k as *const T, shape.kv_len())?;
            let v = array_in(backend, "v", v as *const T, shape.kv_len())?;
            let token_offsets = array_in(backend, "token_offsets", token_offsets, b + 1)?;
            let parents = array_in(backend, "parents", parents, n)?;
            let prefix_lens = array_in(backend, "prefix_lens", prefix_lens, b)?;
            let page_table = array_in(backend, "page_table", page_table, shape.page_table_len())?;
            let k_cache = array_out(backend, "k_cache", k_cache as *mut T, cache_len)?;
            let v_cache = array_out(backend, "v_cache", v_cache as *mut T, cache_len)?;
            let cos_sin_cache =
                optional_in(backend, "cos_sin_cache", cos_sin_cache, shape.cos_sin_len())?;
            let inputs = TreeAttentionInputs {
                shape,
                q,
                k,
                v,
                token_offsets,
                parents,
                prefix_lens,
                page_table,
                cos_sin_cache,
                softmax_scale,
            };
            let outputs = TreeAttentionOutputs {
                k_cache,
                v_cache,
                out: array_out(backend, "out", out as *mut T, shape.q_len())?,
                lse: optional_out(backend, "lse", lse, shape.lse_len())?,
                request_status: optional_out(backend, "request_status", request_status, b)?,
            };
            backend.tree_attention(stream_arg(stream), &inputs, outputs)
        })
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
        let backend = &ctx.backend;
        // The caches hold 16-bit elements of either type; compaction moves them unchanged.
        let layers = |list: &[*mut c_void], name: &str| -> Result<Vec<Out<'_, f16>>> {
            list.iter()
                .enumerate()
                .map(|(i, &p)| {
                    array_out(
                        backend,
                        &format!("{name}[{i}]"),
                        p as *mut f16,
                        cache.cache_len(),
                    )
                })
                .collect()
        };
        let args = KvCompaction {
            shape,
            accepted_offsets: array_in(
                backend,
                "accepted_offsets",
                accepted_offsets,
                shape.num_requests + 1,
            )?,
            accepted_nodes: array_in(
                backend,
                "accepted_nodes",
                accepted_nodes,
                shape.num_accepted,
            )?,
            prefix_lens: array_in(backend, "prefix_lens", prefix_lens, shape.num_requests)?,
            page_table: array_in(
                backend,
                "page_table",
                page_table,
                shape.num_requests * cache.pages_per_request,
            )?,
            k_caches: layers(k_list, "k_caches")?,
            v_caches: layers(v_list, "v_caches")?,
            request_status: optional_out(
                backend,
                "request_status",
                request_status,
                shape.num_requests,
            )?,
        };
        backend.tree_kv_compact(stream_arg(stream), args)
    })
}
