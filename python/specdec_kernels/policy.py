"""Speculation policy: the step cost model and specdec's choice of draft lengths and trees (`specdec::policy`).

The cost model prices a decode, draft or verification step from a GPU's rates, a model's shape and fitted
overheads (a roofline, as EfficientRollout's SD toggle, arXiv 2606.18967, section 4); the policy picks, per
request, the draft length (or tree) that maximises expected emitted tokens per second (goodput) given measured
per-position acceptance (Leviathan et al. 2023, section 3.4, the expected tokens of a chain of length k).
Host-side: inputs are Python sequences, numpy arrays or CPU tensors.
"""
from typing import Any, NamedTuple

import numpy as np

from . import _host
from ._ffi import check, ffi, lib

_GPUS = {"a100": 0, "h100": 1}
_MODELS = {"qwen2.5-7b": 0, "llama3-8b": 1}
_STEP_KINDS = {"decode": 0, "draft": 1, "verify": 2}


class CostModel:
    """A step cost model: the fields of `specdec_cost_model` (bandwidth, flops, params, layers, ..., t0, t1, d0,
    d1, v1, SI units) as attributes. Start from `CostModel.preset(gpu, model)` and replace the overheads with
    fitted ones for real decisions."""

    def __init__(self, struct):
        object.__setattr__(self, "_struct", struct)

    @classmethod
    def preset(cls, gpu="h100", model="llama3-8b"):
        """A named GPU ('a100', 'h100') and model ('qwen2.5-7b', 'llama3-8b') with its int4 self-drafter and
        overheads calibrated to EfficientRollout's published A100 operating point."""
        if gpu not in _GPUS:
            raise ValueError(f"gpu: {gpu!r}, expected one of {sorted(_GPUS)}")
        if model not in _MODELS:
            raise ValueError(f"model: {model!r}, expected one of {sorted(_MODELS)}")
        struct = ffi.new("specdec_cost_model *")
        check(lib.specdec_cost_model_preset(_GPUS[gpu], _MODELS[model], struct), "specdec_cost_model_preset")
        return cls(struct)

    def fields(self):
        """The model's fields as a dict."""
        return {name: getattr(self._struct, name) for name, _ in ffi.typeof("specdec_cost_model").fields}

    def __getattr__(self, name):
        if name in dict(ffi.typeof("specdec_cost_model").fields):
            return getattr(self._struct, name)
        raise AttributeError(name)

    def __setattr__(self, name, value):
        if name not in dict(ffi.typeof("specdec_cost_model").fields):
            raise AttributeError(f"{name}: not a cost model field")
        setattr(self._struct, name, value)

    def __repr__(self):
        return f"CostModel({self.fields()})"

    def step_seconds(self, kind, batch, context_tokens, verified_tokens=0):
        """Seconds of one step: `kind` 'decode', 'draft' or 'verify' (of `verified_tokens` tokens, the sum of
        k_i + 1), for `batch` sequences holding `context_tokens` in all."""
        if kind not in _STEP_KINDS:
            raise ValueError(f"kind: {kind!r}, expected 'decode', 'draft' or 'verify'")
        out = ffi.new("double *")
        check(lib.specdec_cost_model_step_seconds(
            self._struct, _STEP_KINDS[kind], _host.whole_number(batch, "batch"),
            _host.whole_number(context_tokens, "context_tokens"),
            _host.whole_number(verified_tokens, "verified_tokens"), out), "specdec_cost_model_step_seconds")
        return out[0]


def _model(model):
    if not isinstance(model, CostModel):
        raise TypeError(f"model: expected a CostModel, got {type(model).__name__}")
    return model._struct


def _policy_inputs(contexts, acceptance):
    contexts = _host.host_array(contexts, "contexts", np.int64)
    acceptance = _host.host_array(acceptance, "acceptance", np.float64, ndim=2, accept=("float32",))
    if acceptance.shape[0] != contexts.shape[0]:
        raise ValueError(f"acceptance: {acceptance.shape[0]} rows, expected {contexts.shape[0]} (one per request, "
                         f"as contexts)")
    return contexts, acceptance


class DraftLengths(NamedTuple):
    """`lengths` int32 `[B]` (0 = do not draft) and the expected `goodput` (tokens per second)."""

    lengths: Any
    goodput: float


class DraftTrees(NamedTuple):
    """`parents` int32 `[B, max_drafts + 1]` (entry 0 the root, -1; entries 1..=n the parents; the rest -1),
    `num_drafts` int32 `[B]` and the expected `goodput` (tokens per second)."""

    parents: Any
    num_drafts: Any
    goodput: float


def choose_draft_lengths(model, contexts, acceptance, max_draft):
    """Each request's draft length for one decoding step.

    Args:
        model: a CostModel. contexts: `[B]` context tokens per request. acceptance: `[B, P]` float64: the
            acceptance of position j + 1 given the earlier ones were accepted (positions past P reuse the last).
        max_draft: the longest chain considered.
    """
    contexts, acceptance = _policy_inputs(contexts, acceptance)
    lengths = np.empty(contexts.shape[0], np.int32)
    goodput = ffi.new("double *")
    check(lib.specdec_choose_draft_lengths(
        _model(model), _host.pointer(ffi, contexts, "int64_t"), _host.pointer(ffi, acceptance, "double"),
        contexts.shape[0], acceptance.shape[1], _host.whole_number(max_draft, "max_draft"),
        _host.pointer(ffi, lengths, "int32_t"), goodput), "specdec_choose_draft_lengths")
    return DraftLengths(lengths, goodput[0])


def choose_draft_trees(model, contexts, acceptance, max_drafts, max_depth):
    """Each request's draft tree for one decoding step, for a drafter whose children are drawn i.i.d. from its
    distribution and verified by the tree sampler with draft rows; `acceptance` is each depth's first-child
    acceptance. Trees are at most `max_depth` deep and hold at most `max_drafts` drafts."""
    contexts, acceptance = _policy_inputs(contexts, acceptance)
    max_drafts = _host.whole_number(max_drafts, "max_drafts", 0, lib.SPECDEC_MAX_TREE_NODES - 1)
    parents = np.empty((contexts.shape[0], max_drafts + 1), np.int32)
    num_drafts = np.empty(contexts.shape[0], np.int32)
    goodput = ffi.new("double *")
    check(lib.specdec_choose_draft_trees(
        _model(model), _host.pointer(ffi, contexts, "int64_t"), _host.pointer(ffi, acceptance, "double"),
        contexts.shape[0], acceptance.shape[1], max_drafts, _host.whole_number(max_depth, "max_depth"),
        _host.pointer(ffi, parents, "int32_t"), _host.pointer(ffi, num_drafts, "int32_t"), goodput),
        "specdec_choose_draft_trees")
    return DraftTrees(parents, num_drafts, goodput[0])
