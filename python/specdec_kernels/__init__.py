"""specdec's speculative-decoding kernels on torch tensors (CPU and CUDA) and numpy arrays (CPU).

    import specdec_kernels as sk
    result = sk.greedy_verify(logits, draft_tokens, draft_offsets)
    result = sk.rejection_verify_chain(target_logits, draft_tokens, draft_offsets, draft=draft_logits,
                                       seeds=seeds, steps=steps)
    w = sk.int4_quantize(weight, group_size=128); y = sk.int4_gemv(x, w)

Inputs are checked (dtype, device, contiguity, shape, one device per call) before anything runs, with errors that
name the argument; the library's own checks follow, and its message is passed on (`InvalidArgumentError`).
Outputs are allocated and returned, on the inputs' device. On CUDA the work is enqueued on the current stream of
the tensors' device and the call returns without waiting; torch tensors go through `torch.ops.specdec_kernels`
custom ops (see `specdec_kernels.ops`), which trace under torch.compile.
"""
from ._ffi import InvalidArgumentError, SpecdecError, request_status_name
from .attention import AttentionResult, tree_attention, tree_kv_compact
from .drafter import Proposal, SuffixDrafter
from .int4 import Int4Weight
from .int4 import from_awq as int4_from_awq
from .int4 import from_gptq as int4_from_gptq
from .int4 import gemv as int4_gemv
from .int4 import pack as int4_pack
from .int4 import quantize as int4_quantize
from .policy import CostModel, DraftLengths, DraftTrees, choose_draft_lengths, choose_draft_trees
from .tree import CompactionPaths, VerifyTree, compaction_paths, draft_to_verify_tree
from .verify import (
    VerifyResult,
    greedy_verify,
    rejection_verify_chain,
    rejection_verify_tree,
    sample_seed,
)

__all__ = [
    "InvalidArgumentError",
    "SpecdecError",
    "request_status_name",
    "VerifyResult",
    "greedy_verify",
    "rejection_verify_chain",
    "rejection_verify_tree",
    "sample_seed",
    "Int4Weight",
    "int4_quantize",
    "int4_gemv",
    "int4_pack",
    "int4_from_gptq",
    "int4_from_awq",
    "AttentionResult",
    "tree_attention",
    "tree_kv_compact",
    "SuffixDrafter",
    "Proposal",
    "CostModel",
    "DraftLengths",
    "DraftTrees",
    "choose_draft_lengths",
    "choose_draft_trees",
    "VerifyTree",
    "CompactionPaths",
    "draft_to_verify_tree",
    "compaction_paths",
    "version",
]


def version():
    """The library's version string, e.g. "0.2.0"."""
    from ._ffi import ffi, lib

    return ffi.string(lib.specdec_version_string()).decode()
