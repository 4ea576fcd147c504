"""Tree-attention verification over a paged KV cache, and the compaction of accepted paths (`specdec::attention`).

One call appends each tree node's key and value to the cache (rotated by RoPE when a cos/sin cache is given) and
computes every node's attention to its request's cached prefix, its ancestors and itself (SpecInfer's tree
attention, Miao et al., ASPLOS 2024, section 4.1; the NHD paged layout of vLLM and FlashInfer). After
verification, `tree_kv_compact` moves each request's accepted path to contiguous slots in every layer.
"""
import math
from typing import Any, NamedTuple

from . import _arrays
from ._ffi import check, context, ffi, lib

ELEMENT_DTYPES = ("float16", "bfloat16")
_DTYPE_CODE = {"float16": 1, "bfloat16": 2}
_ROPE_STYLES = {"neox": 0, "gptj": 1}


class AttentionResult(NamedTuple):
    """`out` `[N, Hq, D]` (q's dtype), `lse` `[N, Hq]` float32 (natural log of each row's softmax sum) and
    `request_status` `[B]` int32 (0, or the `SPECDEC_REQUEST_*` rule a request broke: nothing of it touched the
    cache and its rows are NaN)."""

    out: Any
    lse: Any
    request_status: Any


def _check_rope_style(rope_style):
    if rope_style not in _ROPE_STYLES:
        raise ValueError(f"rope_style: {rope_style!r}, expected 'neox' or 'gptj'")
    return rope_style


def tree_attention(q, k, v, token_offsets, parents, prefix_lens, page_table, k_cache, v_cache, *,
                   cos_sin_cache=None, rope_style="neox", softmax_scale=None, max_tree_size=None):
    """Tree attention with the tree's KV appended to the cache (modified in place).

    Args:
        q: `[N, Hq, D]` fp16 or bf16; k, v: `[N, Hkv, D]` the nodes' keys and values (before RoPE), same dtype.
            `Hq` a multiple of `Hkv` (GQA), `D` in {64, 128, 256}.
        token_offsets: `[B + 1]` int32, request `b`'s nodes are rows `token_offsets[b]..token_offsets[b+1]`.
        parents: `[N]` int32, -1 for a root, else an earlier node's index within the request's tree.
        prefix_lens: `[B]` int32, tokens already cached per request (node i goes to slot prefix + i).
        page_table: `[B, pages_per_request]` int32, slot t of request b is row t % page_size of page
            page_table[b, t // page_size].
        k_cache, v_cache: `[num_pages, page_size, Hkv, D]` of q's dtype (NHD), written in place.
        cos_sin_cache: `[max_position, D]` float32 (cos of the D/2 frequencies, then their sin), or None for no
            RoPE; node i sits at position prefix + depth(i). rope_style: 'neox' (pairs j, j + D/2) or 'gptj'.
        softmax_scale: default 1 / sqrt(D).
        max_tree_size: the most nodes of one request's tree (1..=64); default: read from token_offsets (a
            device-to-host copy on CUDA; pass it under torch.compile).

    Returns:
        AttentionResult(out, lse, request_status).
    """
    q = _arrays.array(q, "q", ELEMENT_DTYPES, ndim=3)
    token_offsets = _arrays.array(token_offsets, "token_offsets", ("int32",), ndim=1)
    if max_tree_size is None:
        bounds = _arrays.host_offsets(token_offsets, lib.SPECDEC_MAX_TREE_NODES, "max_tree_size")
        max_tree_size = max([bounds[b + 1] - bounds[b] for b in range(len(bounds) - 1)] + [1])
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[2])
    _check_rope_style(rope_style)
    if _arrays.through_op(q):
        from . import ops

        return AttentionResult(*ops.ensure_registered().tree_attention(
            q.value, k, v, token_offsets.value, parents, prefix_lens, page_table, k_cache, v_cache, cos_sin_cache,
            rope_style, float(softmax_scale), int(max_tree_size)))
    return tree_attention_call(q, k, v, token_offsets, parents, prefix_lens, page_table, k_cache, v_cache,
                               cos_sin_cache, rope_style, softmax_scale, max_tree_size)


def tree_attention_call(q, k, v, token_offsets, parents, prefix_lens, page_table, k_cache, v_cache, cos_sin_cache,
                        rope_style, softmax_scale, max_tree_size):
    """The call itself: every argument checked here (the torch op enters here); returns an AttentionResult."""
    q = q if isinstance(q, _arrays.Array) else _arrays.array(q, "q", ELEMENT_DTYPES, ndim=3)
    dtype = (q.dtype,)
    k = _arrays.array(k, "k", dtype, ndim=3)
    v = _arrays.array(v, "v", dtype, ndim=3)
    if not isinstance(token_offsets, _arrays.Array):
        token_offsets = _arrays.array(token_offsets, "token_offsets", ("int32",), ndim=1)
    parents = _arrays.array(parents, "parents", ("int32",), ndim=1)
    prefix_lens = _arrays.array(prefix_lens, "prefix_lens", ("int32",), ndim=1)
    page_table = _arrays.array(page_table, "page_table", ("int32",), ndim=2)
    k_cache = _arrays.array(k_cache, "k_cache", dtype, ndim=4)
    v_cache = _arrays.array(v_cache, "v_cache", dtype, ndim=4)
    rope = _arrays.optional_array(cos_sin_cache, "cos_sin_cache", ("float32",), ndim=2)
    _check_rope_style(rope_style)
    num_tokens, num_q_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, cache_head_dim = k_cache.shape
    num_requests = token_offsets.shape[0] - 1
    if token_offsets.shape[0] < 1:
        raise ValueError("token_offsets: empty; it holds num_requests + 1 offsets (0 first)")
    _arrays.expect_shape(k, (num_tokens, num_kv_heads, head_dim))
    _arrays.expect_shape(v, (num_tokens, num_kv_heads, head_dim))
    _arrays.expect_shape(parents, (num_tokens,))
    _arrays.expect_shape(prefix_lens, (num_requests,))
    if page_table.shape[0] != num_requests:
        raise ValueError(f"page_table: {page_table.shape[0]} rows, expected {num_requests} (one per request)")
    if cache_head_dim != head_dim:
        raise ValueError(f"k_cache: head dimension {cache_head_dim}, expected {head_dim} (q's)")
    _arrays.expect_shape(v_cache, k_cache.shape)
    max_position = 0
    if rope is not None:
        if rope.shape[1] != head_dim:
            raise ValueError(f"cos_sin_cache: shape {rope.shape}, expected (max_position, {head_dim})")
        max_position = rope.shape[0]
    _arrays.same_device(q, k, v, token_offsets, parents, prefix_lens, page_table, k_cache, v_cache, rope)
    out = _arrays.empty(q, q.shape, q.dtype)
    lse = _arrays.empty(q, (num_tokens, num_q_heads), "float32")
    status = _arrays.empty(q, (num_requests,), "int32")
    outs = [_arrays.output(x, name) for x, name in ((out, "out"), (lse, "lse"), (status, "request_status"))]
    check(
        lib.specdec_tree_attention(
            context(*q.device), _DTYPE_CODE[q.dtype], q.pointer(), k.pointer(), v.pointer(), num_requests, num_tokens,
            num_q_heads, int(max_tree_size), token_offsets.pointer("int32_t"), parents.pointer("int32_t"),
            prefix_lens.pointer("int32_t"), page_table.pointer("int32_t"), k_cache.pointer(), v_cache.pointer(),
            num_pages, page_size, num_kv_heads, head_dim, page_table.shape[1],
            ffi.NULL if rope is None else rope.pointer("float"), max_position, _ROPE_STYLES[rope_style],
            float(softmax_scale), outs[0].pointer(), outs[1].pointer("float"), outs[2].pointer("int32_t"),
            _arrays.stream_of(q),
        ),
        "specdec_tree_attention",
    )
    return AttentionResult(out, lse, status)


def tree_kv_compact(k_caches, v_caches, accepted_offsets, accepted_nodes, prefix_lens, page_table):
    """Moves each request's accepted nodes to contiguous slots in every layer's cache (in place): the entries at
    slot `prefix_lens[b] + accepted_nodes[accepted_offsets[b] + j]` go to slot `prefix_lens[b] + j`.

    Args:
        k_caches, v_caches: sequences of the layers' caches, each `[num_pages, page_size, Hkv, D]` fp16 or bf16
            (at most 128 layers per call).
        accepted_offsets: `[B + 1]` int32; accepted_nodes: `[A]` int32, each request's path with node 0 first,
            strictly increasing (`compaction_paths` makes them from the sampler's outputs).
        prefix_lens: `[B]` int32; page_table: `[B, pages_per_request]` int32, as for tree_attention.

    Returns:
        request_status `[B]` int32 (a flagged request moves nothing).
    """
    if isinstance(k_caches, (list, tuple)) and isinstance(v_caches, (list, tuple)):
        first = _arrays.array(k_caches[0], "k_caches[0]", ELEMENT_DTYPES) if k_caches else None
        if first is not None and _arrays.through_op(first):
            from . import ops

            return ops.ensure_registered().tree_kv_compact(list(k_caches), list(v_caches), accepted_offsets,
                                                           accepted_nodes, prefix_lens, page_table)
    return tree_kv_compact_call(k_caches, v_caches, accepted_offsets, accepted_nodes, prefix_lens, page_table)


def tree_kv_compact_call(k_caches, v_caches, accepted_offsets, accepted_nodes, prefix_lens, page_table):
    """The call itself, every argument checked here (the torch op enters here)."""
    for name, caches in (("k_caches", k_caches), ("v_caches", v_caches)):
        if not isinstance(caches, (list, tuple)) or not caches:
            raise TypeError(f"{name}: expected a non-empty list of the layers' caches")
    if len(v_caches) != len(k_caches):
        raise ValueError(f"v_caches: {len(v_caches)} layers while k_caches has {len(k_caches)}")
    keys = [_arrays.array(c, f"k_caches[{i}]", ELEMENT_DTYPES, ndim=4) for i, c in enumerate(k_caches)]
    values = [_arrays.array(c, f"v_caches[{i}]", (keys[0].dtype,), ndim=4) for i, c in enumerate(v_caches)]
    for cache in keys[1:] + values:
        if cache.dtype != keys[0].dtype:
            raise TypeError(f"{cache.name}: dtype {cache.dtype} while k_caches[0] is {keys[0].dtype}")
        _arrays.expect_shape(cache, keys[0].shape)
    offsets = _arrays.array(accepted_offsets, "accepted_offsets", ("int32",), ndim=1)
    nodes = _arrays.array(accepted_nodes, "accepted_nodes", ("int32",), ndim=1)
    prefix_lens = _arrays.array(prefix_lens, "prefix_lens", ("int32",), ndim=1)
    page_table = _arrays.array(page_table, "page_table", ("int32",), ndim=2)
    if offsets.shape[0] < 1:
        raise ValueError("accepted_offsets: empty; it holds num_requests + 1 offsets (0 first)")
    num_requests = offsets.shape[0] - 1
    _arrays.expect_shape(prefix_lens, (num_requests,))
    if page_table.shape[0] != num_requests:
        raise ValueError(f"page_table: {page_table.shape[0]} rows, expected {num_requests} (one per request)")
    _arrays.same_device(keys[0], *keys[1:], *values, offsets, nodes, prefix_lens, page_table)
    num_pages, page_size, num_kv_heads, head_dim = keys[0].shape
    key_pointers = ffi.new("void *[]", [c.pointer() for c in keys])
    value_pointers = ffi.new("void *[]", [c.pointer() for c in values])
    status = _arrays.empty(offsets, (num_requests,), "int32")
    status_array = _arrays.output(status, "request_status")
    check(
        lib.specdec_tree_kv_compact(
            context(*keys[0].device), key_pointers, value_pointers, len(keys), num_pages, page_size, num_kv_heads,
            head_dim, page_table.shape[1], num_requests, offsets.pointer("int32_t"), nodes.pointer("int32_t"),
            nodes.shape[0], prefix_lens.pointer("int32_t"), page_table.pointer("int32_t"),
            status_array.pointer("int32_t"), _arrays.stream_of(keys[0]),
        ),
        "specdec_tree_kv_compact",
    )
    return status
