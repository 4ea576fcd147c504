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
from .int4 import Int4Weight
from .int4 import gemv as int4_gemv
from .int4 import quantize as int4_quantize
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
    "version",
]


def version():
    """The library's version string, e.g. "0.2.0"."""
    from ._ffi import ffi, lib

    return ffi.string(lib.specdec_version_string()).decode()
