"""torch.library custom ops over specdec's kernels, with fake (meta) implementations.

Registered when this module is imported, which the package does on the first torch tensor it is given (numpy
users never import torch). The public functions of the package
route torch tensors through these ops, so they trace under `torch.compile` (the fake implementations give the
output shapes without running anything) and, on CUDA, enqueue on the current stream without allocating outside
PyTorch's allocator (the outputs are allocated by the op). Under `torch.compile` pass `emit_width`, which is
otherwise read from the offsets' values.

    torch.ops.specdec_kernels.greedy_verify(logits, draft_tokens, draft_offsets, emit_width)
    torch.ops.specdec_kernels.rejection_verify_chain(target, draft, draft_tokens, draft_offsets, temperature,
        top_k, top_p, seeds, steps, draft_temperature, draft_top_k, draft_top_p, probabilities, emit_width)
    torch.ops.specdec_kernels.rejection_verify_tree(target, draft, node_tokens, parents, node_offsets, ...)
    torch.ops.specdec_kernels.int4_quantize(weights, group_size, scale_dtype)
    torch.ops.specdec_kernels.int4_gemv(x, packed, scales, zeros, n, group_size)
    torch.ops.specdec_kernels.tree_attention(q, k, v, token_offsets, parents, prefix_lens, page_table, k_cache,
        v_cache, cos_sin_cache, rope_style, softmax_scale, max_tree_size)      # mutates k_cache, v_cache
    torch.ops.specdec_kernels.tree_kv_compact(k_caches, v_caches, accepted_offsets, accepted_nodes, prefix_lens,
        page_table)                                                          # mutates the caches
"""
from typing import List, Optional, Tuple

import torch


def ensure_registered():
    """The `torch.ops.specdec_kernels` namespace (the ops are registered when this module is imported)."""
    return torch.ops.specdec_kernels


def _register():
    from torch import Tensor

    from . import _arrays, attention, int4, verify

    def checked(tensor, name, dtypes):
        """A required tensor argument, checked (the schema lets None through for a Tensor)."""
        if tensor is None:
            raise TypeError(f"{name}: None, expected a tensor")
        return _arrays.array(tensor, name, dtypes)

    def optional(tensor, name, dtypes):
        return None if tensor is None else _arrays.array(tensor, name, dtypes)

    @torch.library.custom_op("specdec_kernels::greedy_verify", mutates_args=())
    def greedy_verify(
        logits: Tensor, draft_tokens: Tensor, draft_offsets: Tensor, emit_width: int,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        result = verify.greedy_verify_into(
            checked(logits, "logits", verify.LOGITS_DTYPES),
            checked(draft_tokens, "draft_tokens", ("int32",)),
            checked(draft_offsets, "draft_offsets", ("int32",)),
            emit_width,
        )
        return result.accepted_counts, result.emitted_tokens, result.request_status

    @greedy_verify.register_fake
    def _(logits, draft_tokens, draft_offsets, emit_width):
        num_requests = draft_offsets.shape[0] - 1
        return (
            logits.new_empty((num_requests,), dtype=torch.int32),
            logits.new_empty((num_requests, emit_width), dtype=torch.int32),
            logits.new_empty((num_requests,), dtype=torch.int32),
        )

    def rejection(kind, target, draft, tokens, tokens_name, parents, offsets, offsets_name, sampling,
                  probabilities, emit_width):
        """Both rejection ops: `sampling` the eight per-request tensors in `verify.SAMPLING_FIELDS` order."""
        sampling = {name: optional(value, name, verify.SAMPLING_FIELDS[name][1])
                    for name, value in zip(verify.SAMPLING_FIELDS, sampling)}
        return tuple(verify.rejection_call(
            kind, checked(target, "target", verify.LOGITS_DTYPES), optional(draft, "draft", verify.LOGITS_DTYPES),
            checked(tokens, tokens_name, ("int32",)),
            None if kind == "chain" else checked(parents, "parents", ("int32",)),
            checked(offsets, offsets_name, ("int32",)), probabilities, emit_width, sampling,
        ))

    def verify_outputs_fake(target, num_requests, emit_width):
        return (
            target.new_empty((num_requests,), dtype=torch.int32),
            target.new_empty((num_requests, emit_width), dtype=torch.int32),
            target.new_empty((num_requests, emit_width), dtype=torch.int32),
            target.new_empty((num_requests, emit_width), dtype=torch.int8),
            target.new_empty((num_requests,), dtype=torch.int32),
        )

    @torch.library.custom_op("specdec_kernels::rejection_verify_chain", mutates_args=())
    def rejection_verify_chain(
        target: Tensor, draft: Optional[Tensor], draft_tokens: Tensor, draft_offsets: Tensor,
        temperature: Optional[Tensor], top_k: Optional[Tensor], top_p: Optional[Tensor], seeds: Tensor,
        steps: Tensor, draft_temperature: Optional[Tensor], draft_top_k: Optional[Tensor],
        draft_top_p: Optional[Tensor], probabilities: bool, emit_width: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        sampling = (temperature, top_k, top_p, seeds, steps, draft_temperature, draft_top_k, draft_top_p)
        return rejection("chain", target, draft, draft_tokens, "draft_tokens", None, draft_offsets, "draft_offsets",
                         sampling, probabilities, emit_width)

    @rejection_verify_chain.register_fake
    def _(target, draft, draft_tokens, draft_offsets, *rest):
        return verify_outputs_fake(target, draft_offsets.shape[0] - 1, rest[-1])

    @torch.library.custom_op("specdec_kernels::rejection_verify_tree", mutates_args=())
    def rejection_verify_tree(
        target: Tensor, draft: Optional[Tensor], node_tokens: Tensor, parents: Tensor, node_offsets: Tensor,
        temperature: Optional[Tensor], top_k: Optional[Tensor], top_p: Optional[Tensor], seeds: Tensor,
        steps: Tensor, draft_temperature: Optional[Tensor], draft_top_k: Optional[Tensor],
        draft_top_p: Optional[Tensor], probabilities: bool, emit_width: int,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        sampling = (temperature, top_k, top_p, seeds, steps, draft_temperature, draft_top_k, draft_top_p)
        return rejection("tree", target, draft, node_tokens, "node_tokens", parents, node_offsets, "node_offsets",
                         sampling, probabilities, emit_width)

    @rejection_verify_tree.register_fake
    def _(target, draft, node_tokens, parents, node_offsets, *rest):
        return verify_outputs_fake(target, node_offsets.shape[0] - 1, rest[-1])

    @torch.library.custom_op("specdec_kernels::int4_quantize", mutates_args=())
    def int4_quantize(
        weights: Tensor, group_size: int, scale_dtype: torch.dtype,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        w = checked(weights, "weights", int4.WEIGHT_DTYPES)
        return tuple(int4.quantize_call(w, group_size, str(scale_dtype).replace("torch.", ""))[:3])

    @int4_quantize.register_fake
    def _(weights, group_size, scale_dtype):
        if scale_dtype not in (torch.float16, torch.bfloat16):
            raise TypeError(f"scale_dtype: {scale_dtype}, expected torch.float16 or torch.bfloat16")
        n, k = weights.shape
        groups = k // group_size
        return (
            weights.new_empty((n * k // 8,), dtype=torch.uint32),
            weights.new_empty((groups, n), dtype=scale_dtype),
            weights.new_empty((groups, n), dtype=torch.uint8),
        )

    @torch.library.custom_op("specdec_kernels::int4_gemv", mutates_args=())
    def int4_gemv(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, n: int, group_size: int) -> Tensor:
        return int4.gemv_call(
            checked(x, "x", int4.WEIGHT_DTYPES), checked(packed, "packed", ("uint32",)),
            checked(scales, "scales", int4.WEIGHT_DTYPES), checked(zeros, "zeros", ("uint8",)), n, group_size,
        )

    @int4_gemv.register_fake
    def _(x, packed, scales, zeros, n, group_size):
        return x.new_empty((x.shape[0], n))

    @torch.library.custom_op("specdec_kernels::tree_attention", mutates_args=("k_cache", "v_cache"))
    def tree_attention(
        q: Tensor, k: Tensor, v: Tensor, token_offsets: Tensor, parents: Tensor, prefix_lens: Tensor,
        page_table: Tensor, k_cache: Tensor, v_cache: Tensor, cos_sin_cache: Optional[Tensor], rope_style: str,
        softmax_scale: float, max_tree_size: int,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        return tuple(attention.tree_attention_call(q, k, v, token_offsets, parents, prefix_lens, page_table, k_cache,
                                                  v_cache, cos_sin_cache, rope_style, softmax_scale, max_tree_size))

    @tree_attention.register_fake
    def _(q, k, v, token_offsets, *rest):
        return (
            q.new_empty(q.shape),
            q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32),
            q.new_empty((token_offsets.shape[0] - 1,), dtype=torch.int32),
        )

    @torch.library.custom_op("specdec_kernels::tree_kv_compact", mutates_args=("k_caches", "v_caches"))
    def tree_kv_compact(
        k_caches: List[Tensor], v_caches: List[Tensor], accepted_offsets: Tensor, accepted_nodes: Tensor,
        prefix_lens: Tensor, page_table: Tensor,
    ) -> Tensor:
        return attention.tree_kv_compact_call(k_caches, v_caches, accepted_offsets, accepted_nodes, prefix_lens,
                                              page_table)

    @tree_kv_compact.register_fake
    def _(k_caches, v_caches, accepted_offsets, *rest):
        return accepted_offsets.new_empty((accepted_offsets.shape[0] - 1,), dtype=torch.int32)


_register()
