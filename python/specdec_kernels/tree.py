"""The glue between primitives, in the one tree vocabulary of `specdec::tree` (host-side).

A drafter's proposal has parents -1 for "the context's last token"; the sampler and tree attention take a
verification tree whose node 0 is that token. The sampler's accepted paths (without their root) become
compaction's paths (with node 0 first).
"""
from typing import Any, NamedTuple

import numpy as np

from . import _host
from ._ffi import check, ffi, lib


class VerifyTree(NamedTuple):
    """`tokens`, `parents` int32 `[n + 1]` (node 0 the context's last token, parent -1) and the sampler's
    `emit_width` for the tree (its depth plus one)."""

    tokens: Any
    parents: Any
    emit_width: int


def draft_to_verify_tree(last_token, draft_tokens, draft_parents):
    """The verification tree of a proposal (`SuffixDrafter.propose`, or any drafter's tree with parents in
    `-1..i`): node 0 is `last_token`, node `i + 1` is draft `i`, parents shifted by one."""
    last_token = _host.whole_number(last_token, "last_token", -(1 << 31), (1 << 31) - 1)
    tokens = _host.host_array(draft_tokens, "draft_tokens", np.int32)
    parents = _host.host_array(draft_parents, "draft_parents", np.int32)
    if parents.shape != tokens.shape:
        raise ValueError(f"draft_parents: shape {parents.shape}, expected {tokens.shape} (one per draft)")
    out_tokens = np.empty(tokens.size + 1, np.int32)
    out_parents = np.empty(tokens.size + 1, np.int32)
    emit_width = ffi.new("int64_t *")
    check(lib.specdec_draft_to_verify_tree(last_token, _host.pointer(ffi, tokens, "int32_t"),
                                           _host.pointer(ffi, parents, "int32_t"), tokens.size,
                                           _host.pointer(ffi, out_tokens, "int32_t"),
                                           _host.pointer(ffi, out_parents, "int32_t"), emit_width),
          "specdec_draft_to_verify_tree")
    return VerifyTree(out_tokens, out_parents, int(emit_width[0]))


class CompactionPaths(NamedTuple):
    """`offsets` int32 `[B + 1]` and `nodes` int32 `[offsets[B]]`: each request's accepted path with node 0
    first, as `tree_kv_compact` takes them."""

    offsets: Any
    nodes: Any


def compaction_paths(accepted_counts, accepted_nodes):
    """Compaction's inputs from the sampler's outputs (`VerifyResult.accepted_counts` `[B]` and
    `.accepted_nodes` `[B, W]`, on the host; a flagged request, count -1, is an error)."""
    counts = _host.host_array(accepted_counts, "accepted_counts", np.int32)
    nodes = _host.host_array(accepted_nodes, "accepted_nodes", np.int32, ndim=2)
    if nodes.shape[0] != counts.shape[0]:
        raise ValueError(f"accepted_nodes: {nodes.shape[0]} rows, expected {counts.shape[0]} (one per request)")
    out_offsets = np.empty(counts.size + 1, np.int32)
    out_nodes = np.empty(nodes.size, np.int32)
    check(lib.specdec_compaction_paths(_host.pointer(ffi, counts, "int32_t"), _host.pointer(ffi, nodes, "int32_t"),
                                       counts.size, nodes.shape[1], _host.pointer(ffi, out_offsets, "int32_t"),
                                       _host.pointer(ffi, out_nodes, "int32_t")), "specdec_compaction_paths")
    return CompactionPaths(out_offsets, out_nodes[: out_offsets[-1]].copy())
