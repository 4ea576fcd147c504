"""Verification of drafted tokens: greedy, and lossless rejection sampling over chains and trees.

Every function takes torch tensors (CPU or CUDA; on CUDA the work is enqueued on the tensors' device's current
stream and the call returns without waiting) or numpy arrays (CPU), checks them, allocates its outputs like its
first argument and returns them. The algorithms, layouts and rules are those of the Rust modules
`specdec::greedy` and `specdec::sampling` and of `include/specdec.h`; sources: Leviathan et al., "Fast Inference
from Transformers via Speculative Decoding" (ICML 2023, section 2.3) for chains, and Miao et al., "SpecInfer"
(ASPLOS 2024, section 4.2, multi-step speculative sampling) for trees.
"""
import sys
from typing import Any, NamedTuple, Optional

from . import _arrays, _host
from ._ffi import check, context, ffi, lib, request_status_name

LOGITS_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


class VerifyResult(NamedTuple):
    """Outputs of a verification call, on the inputs' device. `B` requests, `W` = `emit_width`.

    * `accepted_counts` `[B]` int32: drafts accepted per request (-1 for a request flagged in `request_status`).
    * `emitted_tokens` `[B, W]` int32: the accepted tokens, then the correction or bonus token, then -1.
    * `accepted_nodes` `[B, W]` int32: the accepted path's node indices (tree) or draft positions (chain), then
      -1; `None` for greedy verification.
    * `accept_flags` `[B, W]` int8: 1 accepted, 0 rejected, -1 not tried; `None` for greedy verification.
    * `request_status` `[B]` int32: 0, or the `SPECDEC_REQUEST_*` rule a request broke (that request alone is
      skipped; see `request_status_name`).
    """

    accepted_counts: Any
    emitted_tokens: Any
    accepted_nodes: Optional[Any]
    accept_flags: Optional[Any]
    request_status: Any

    def raise_for_status(self):
        """Raises ValueError naming the first request flagged in `request_status` (a device-to-host copy on
        CUDA); returns self otherwise."""
        codes = self.request_status.tolist()
        for request, code in enumerate(codes):
            if code != 0:
                raise ValueError(f"request {request}: {request_status_name(code)} (see specdec::RequestStatus)")
        return self


def _context_of(primary):
    return context(*primary.device)


def _check_emit_width(emit_width):
    return _host.whole_number(emit_width, "emit_width", 1)


# A default emit_width is read from the offsets on the host (a device-to-host copy for CUDA tensors: pass
# emit_width to avoid it, and under torch.compile).
def _longest_chain_plus_one(offsets):
    bounds = _arrays.host_offsets(offsets, lib.SPECDEC_MAX_TREE_NODES - 1, "emit_width")
    return max((bounds[b + 1] - bounds[b] for b in range(len(bounds) - 1)), default=0) + 1


def greedy_verify(logits, draft_tokens, draft_offsets, *, emit_width=None):
    """Greedy verification of a batch of drafted chains (temperature 0).

    Args:
        logits: `[T + B, V]` float32, float16 or bfloat16: the target's rows. Rows `draft_offsets[b] + b + j`,
            `j = 0..k_b`, are request `b`'s positions (its last row gives the bonus token).
        draft_tokens: `[T]` int32, request `b`'s `k_b` drafts at `draft_offsets[b]..draft_offsets[b+1]`.
        draft_offsets: `[B + 1]` int32, 0 first and `T` last.
        emit_width: columns of `emitted_tokens`, at least the longest chain plus one (default: exactly that,
            read from `draft_offsets`, a device-to-host copy on CUDA).

    Returns:
        VerifyResult (accepted_nodes and accept_flags None): each request accepts its longest draft prefix
        equal to the rows' argmaxes (ties to the lowest token) and emits it plus the next argmax.

    Raises:
        TypeError / ValueError naming the argument (dtype, device, contiguity, shape), and InvalidArgumentError
        for what the library rejects (its message names the argument).
    """
    draft_tokens = _arrays.array(draft_tokens, "draft_tokens", ("int32",), ndim=1)
    draft_offsets = _arrays.array(draft_offsets, "draft_offsets", ("int32",), ndim=1)
    logits = _arrays.array(logits, "logits", LOGITS_DTYPES, ndim=2)
    # The shapes are checked once, in greedy_verify_into (where the op enters too).
    width = _check_emit_width(emit_width) if emit_width is not None else _longest_chain_plus_one(draft_offsets)
    if _arrays.through_op(logits):
        from . import ops

        counts, emitted, status = ops.ensure_registered().greedy_verify(
            logits.value, draft_tokens.value, draft_offsets.value, width
        )
        return VerifyResult(counts, emitted, None, None, status)
    return greedy_verify_into(logits, draft_tokens, draft_offsets, width)


def _check_dimensions(offsets, *arrays_and_ndims):
    """Each array's number of dimensions (None: not given), and offsets holding at least the 0 of no request."""
    for arr, ndim in arrays_and_ndims + ((offsets, 1),):
        if arr is not None and len(arr.shape) != ndim:
            raise ValueError(f"{arr.name}: {len(arr.shape)} dimensions (shape {arr.shape}), expected {ndim}")
    if offsets.shape[0] < 1:
        raise ValueError(f"{offsets.name}: empty; it holds num_requests + 1 offsets (0 first)")


def _check_greedy(logits, draft_tokens, draft_offsets):
    _check_dimensions(draft_offsets, (logits, 2), (draft_tokens, 1))
    rows = draft_tokens.shape[0] + draft_offsets.shape[0] - 1
    if logits.shape[0] != rows:
        raise ValueError(f"logits: {logits.shape[0]} rows, expected {rows} (one per draft plus one per request)")
    _arrays.same_device(logits, draft_tokens, draft_offsets)


def greedy_verify_into(logits, draft_tokens, draft_offsets, emit_width):
    """The call itself, on arrays of the right dtypes (checked again here: the torch op enters here);
    allocates and returns the outputs."""
    _check_greedy(logits, draft_tokens, draft_offsets)
    _check_emit_width(emit_width)
    num_requests = draft_offsets.shape[0] - 1
    counts = _arrays.empty(logits, (num_requests,), "int32")
    emitted = _arrays.empty(logits, (num_requests, emit_width), "int32")
    status = _arrays.empty(logits, (num_requests,), "int32")
    outs = [_arrays.output(x, n) for x, n in ((counts, "counts"), (emitted, "emitted"), (status, "status"))]
    check(
        lib.specdec_greedy_verify(
            _context_of(logits),
            logits.pointer(),
            _DTYPE_CODE[logits.dtype],
            logits.shape[1],
            draft_offsets.pointer("int32_t"),
            num_requests,
            draft_tokens.pointer("int32_t"),
            draft_tokens.shape[0],
            emit_width,
            outs[0].pointer("int32_t"),
            outs[1].pointer("int32_t"),
            outs[2].pointer("int32_t"),
            _arrays.stream_of(logits),
        ),
        "specdec_greedy_verify",
    )
    return VerifyResult(counts, emitted, None, None, status)


SAMPLING_FIELDS = {  # name: (dtype made from a Python scalar, dtypes taken, C element type)
    "temperature": ("float32", ("float32",), "float"),
    "top_k": ("int32", ("int32",), "int32_t"),
    "top_p": ("float32", ("float32",), "float"),
    "seeds": ("int64", ("uint64", "int64"), "uint64_t"),
    "steps": ("int64", ("uint64", "int64"), "uint64_t"),
    "draft_temperature": ("float32", ("float32",), "float"),
    "draft_top_k": ("int32", ("int32",), "int32_t"),
    "draft_top_p": ("float32", ("float32",), "float"),
}


def sampling_arrays(target, num_requests, probabilities, has_draft, params):
    """The per-request sampling inputs, checked: a dict of Arrays (None where not given). Seeds and steps may be
    uint64 or int64 (the same 64 bits)."""
    params = dict(params)
    if probabilities:
        for name in ("temperature", "top_k", "top_p", "draft_temperature", "draft_top_k", "draft_top_p"):
            if params[name] is not None:
                raise ValueError(f"{name}: given with probabilities=True; probability rows take no sampling "
                                 f"parameters (they are already the distributions)")
    elif params["temperature"] is None:
        params["temperature"] = 1.0
    if params["draft_temperature"] is None and (params["draft_top_k"] is not None or params["draft_top_p"] is not None):
        raise ValueError("draft_top_k / draft_top_p: given without draft_temperature")
    if params["draft_temperature"] is not None and not has_draft:
        raise ValueError("draft_temperature: given without draft rows (draft=None means point-mass drafts)")
    for required in ("seeds", "steps"):
        if params[required] is None:
            raise ValueError(f"{required}: required (one per request, or one int for every request)")
    return {
        name: _arrays.per_request(params[name], name, target, num_requests, made, taken)
        for name, (made, taken, _) in SAMPLING_FIELDS.items()
    }


def sampling_struct(arrays):
    """The `specdec_sampling` struct pointing at checked arrays (which must outlive the call)."""
    struct = ffi.new("specdec_sampling *")
    for name, arr in arrays.items():
        setattr(struct, name, ffi.NULL if arr is None else arr.pointer(SAMPLING_FIELDS[name][2]))
    return struct


def _rejection(kind, target, draft, tokens, tokens_name, parents, offsets, offsets_name, probabilities,
               emit_width, params):
    tokens = _arrays.array(tokens, tokens_name, ("int32",), ndim=1)
    offsets = _arrays.array(offsets, offsets_name, ("int32",), ndim=1)
    num_requests = max(offsets.shape[0] - 1, 0)  # an empty offsets array is named by _check_rejection
    target = _arrays.array(target, "target", ("float32",) if probabilities else LOGITS_DTYPES, ndim=2)
    draft = _arrays.optional_array(draft, "draft", LOGITS_DTYPES, ndim=2)
    if kind == "tree":
        parents = _arrays.array(parents, "parents", ("int32",), ndim=1)
    sampling = sampling_arrays(target, num_requests, probabilities, draft is not None, params)
    # The shapes are checked once, in rejection_call (where the ops enter too).
    if emit_width is not None:
        width = _check_emit_width(emit_width)
    elif kind == "chain":
        width = _longest_chain_plus_one(offsets)
    else:
        width = _deepest_tree_plus_one(offsets, parents)
    if _arrays.through_op(target):
        from . import ops

        def tensor(arr):
            if arr is None:
                return None
            torch = sys.modules["torch"]
            return arr.value.view(torch.int64) if arr.dtype == "uint64" else arr.value

        namespace = ops.ensure_registered()
        op, tree_args = namespace.rejection_verify_chain, ()
        if kind == "tree":
            op, tree_args = namespace.rejection_verify_tree, (tensor(parents),)
        outputs = op(target.value, tensor(draft), tokens.value, *tree_args, offsets.value,
                     *(tensor(sampling[name]) for name in SAMPLING_FIELDS), probabilities, width)
        return VerifyResult(*outputs)
    return rejection_call(kind, target, draft, tokens, parents, offsets, probabilities, width, sampling)


def _check_rejection(kind, target, draft, tokens, parents, offsets, probabilities, sampling):
    """Everything the library cannot see for itself: dimensions, row counts, dtypes agreeing, one device."""
    _check_dimensions(offsets, (target, 2), (draft, 2), (tokens, 1), (parents, 1))
    num_requests = offsets.shape[0] - 1
    if probabilities and target.dtype != "float32":
        raise TypeError(f"target: dtype {target.dtype} with probabilities=True; probability rows are float32")
    rows = tokens.shape[0] + (num_requests if kind == "chain" else 0)
    if target.shape[0] != rows:
        what = "one per draft plus one per request" if kind == "chain" else "one per node"
        raise ValueError(f"target: {target.shape[0]} rows, expected {rows} ({what})")
    if draft is not None:
        if draft.dtype != target.dtype:
            raise TypeError(f"draft: dtype {draft.dtype} while target is {target.dtype}; they must match")
        if draft.shape != (tokens.shape[0], target.shape[1]):
            raise ValueError(f"draft: shape {draft.shape}, expected {(tokens.shape[0], target.shape[1])} "
                             f"(one row per {'draft' if kind == 'chain' else 'node'}, the target's vocabulary)")
    if parents is not None and parents.shape != tokens.shape:
        raise ValueError(f"parents: shape {parents.shape}, expected {tokens.shape} (one per node)")
    for name, arr in sampling.items():
        if arr is None:
            continue
        if arr.dtype not in SAMPLING_FIELDS[name][1]:
            raise TypeError(f"{name}: dtype {arr.dtype}, expected {' or '.join(SAMPLING_FIELDS[name][1])}")
        if arr.shape != (num_requests,):
            raise ValueError(f"{name}: shape {arr.shape}, expected ({num_requests},) (one per request)")
    _arrays.same_device(target, draft, tokens, offsets, parents, *sampling.values())


def _deepest_tree_plus_one(offsets, parents):
    bounds = _arrays.host_offsets(offsets, lib.SPECDEC_MAX_TREE_NODES, "emit_width")
    parent_of = parents.value.tolist()
    deepest = 0
    for b in range(len(bounds) - 1):
        depth = {}
        for node in range(bounds[b], min(bounds[b + 1], len(parent_of))):
            parent = parent_of[node]
            depth[node] = 0 if parent < 0 else depth.get(bounds[b] + parent, 0) + 1
            deepest = max(deepest, depth[node])
    return deepest + 1


def _rows_kind(target, probabilities):
    return lib.SPECDEC_ROWS_PROBS_F32 if probabilities else _DTYPE_CODE[target.dtype]


def rejection_call(kind, target, draft, tokens, parents, offsets, probabilities, emit_width, sampling):
    """The call itself, on arrays of the right dtypes (`sampling`: a dict as `sampling_arrays` returns), checked
    again here (the torch ops enter here); allocates and returns the outputs."""
    _check_rejection(kind, target, draft, tokens, parents, offsets, probabilities, sampling)
    _check_emit_width(emit_width)
    if draft is not None and draft.shape[0] == 0:
        # No draft rows to read. An empty torch tensor has no data pointer (NULL: "point-mass drafts") while an
        # empty numpy array has one; dropping the rows, and the drafter's parameters that apply to them only,
        # gives both one meaning.
        draft = None
        sampling = {**sampling, "draft_temperature": None, "draft_top_k": None, "draft_top_p": None}
    struct = sampling_struct(sampling)
    num_requests = offsets.shape[0] - 1
    result = VerifyResult(
        _arrays.empty(target, (num_requests,), "int32"),
        _arrays.empty(target, (num_requests, emit_width), "int32"),
        _arrays.empty(target, (num_requests, emit_width), "int32"),
        _arrays.empty(target, (num_requests, emit_width), "int8"),
        _arrays.empty(target, (num_requests,), "int32"),
    )
    outs = [_arrays.output(x, name) for x, name in zip(result, VerifyResult._fields)]
    outputs = ffi.new("specdec_verify_outputs *")
    outputs.accepted_counts = outs[0].pointer("int32_t")
    outputs.emitted_tokens = outs[1].pointer("int32_t")
    outputs.accepted_nodes = outs[2].pointer("int32_t")
    outputs.accept_flags = outs[3].pointer("int8_t")
    outputs.request_status = outs[4].pointer("int32_t")
    draft_pointer = ffi.NULL if draft is None else draft.pointer()
    common_head = (_context_of(target), _rows_kind(target, probabilities), target.pointer(), draft_pointer,
                   target.shape[1], offsets.pointer("int32_t"), num_requests, tokens.pointer("int32_t"))
    if kind == "chain":
        status = lib.specdec_rejection_verify_chain(*common_head, tokens.shape[0], struct, emit_width,
                                                    outputs, _arrays.stream_of(target))
    else:
        status = lib.specdec_rejection_verify_tree(*common_head, parents.pointer("int32_t"), tokens.shape[0],
                                                   struct, emit_width, outputs, _arrays.stream_of(target))
    check(status, f"specdec_rejection_verify_{kind}")
    return result


def rejection_verify_chain(target, draft_tokens, draft_offsets, *, draft=None, probabilities=False, seeds, steps,
                           temperature=None, top_k=None, top_p=None, draft_temperature=None, draft_top_k=None,
                           draft_top_p=None, emit_width=None):
    """Lossless rejection-sampling verification of ragged drafted chains (Leviathan et al. 2023, section 2.3).

    Args:
        target: `[T + B, V]`: the target's rows; request `b`'s rows are `draft_offsets[b] + b + j`,
            `j = 0..k_b` (the last one gives the bonus token). Logits (float32, float16, bfloat16) or, with
            `probabilities=True`, float32 distributions (each row sums to 1 within 1e-3).
        draft_tokens: `[T]` int32; draft_offsets: `[B + 1]` int32 (0 first, `T` last).
        draft: `[T, V]` rows the drafts were sampled from, same kind and dtype as `target`; None for point-mass
            drafts (a drafter without a distribution: n-gram, suffix, greedy).
        seeds, steps: per request (int for all, a sequence, or a uint64 / int64 array): the Philox key and
            the step counter. The same seed and step give the same draw in any batch slot; samples of one prompt
            need different seeds (`sample_seed`).
        temperature (default 1), top_k (-1 off), top_p (1 off): per request, logits only.
        draft_temperature, draft_top_k, draft_top_p: how the drafter sampled, applied to `draft` (default: the
            target's parameters).
        emit_width: columns of the outputs, at least the longest chain plus one (default: exactly that).

    Returns:
        VerifyResult. The emitted tokens follow the target's distribution exactly, whatever the drafts.

    Raises:
        TypeError / ValueError naming the argument, InvalidArgumentError for what the library rejects.
    """
    params = dict(seeds=seeds, steps=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                  draft_temperature=draft_temperature, draft_top_k=draft_top_k, draft_top_p=draft_top_p)
    return _rejection("chain", target, draft, draft_tokens, "draft_tokens", None, draft_offsets, "draft_offsets",
                      probabilities, emit_width, params)


def rejection_verify_tree(target, node_tokens, parents, node_offsets, *, draft=None, probabilities=False, seeds,
                          steps, temperature=None, top_k=None, top_p=None, draft_temperature=None,
                          draft_top_k=None, draft_top_p=None, emit_width=None):
    """Lossless rejection-sampling verification of drafted trees (SpecInfer, Miao et al. 2024, section 4.2).

    Args:
        target: `[N, V]`: one row per node (node 0 of each tree is the last accepted token; its row gives the
            distribution of the first draft). Logits, or float32 distributions with `probabilities=True`.
        node_tokens, parents: `[N]` int32; request `b` has nodes `node_offsets[b]..node_offsets[b+1]` (1 to
            64), `parents` -1 for node 0 and otherwise an earlier node's index within the request.
        node_offsets: `[B + 1]` int32.
        draft: `[N, V]` rows each node's children were sampled from, or None for point-mass drafts.
        seeds, steps, temperature, top_k, top_p, draft_*: as `rejection_verify_chain`.
        emit_width: at least the deepest tree's depth plus one (default: exactly that).

    Returns:
        VerifyResult; `accepted_nodes` holds the accepted path's node indices (within the request), ready for
        `compaction_paths`.
    """
    params = dict(seeds=seeds, steps=steps, temperature=temperature, top_k=top_k, top_p=top_p,
                  draft_temperature=draft_temperature, draft_top_k=draft_top_k, draft_top_p=draft_top_p)
    return _rejection("tree", target, draft, node_tokens, "node_tokens", parents, node_offsets, "node_offsets",
                      probabilities, emit_width, params)


def sample_seed(base_seed, sample):
    """The seed (a Python int in [0, 2^64)) of sample `sample` of a group sharing `base_seed`: distinct samples
    get distinct seeds. Both arguments are 64-bit: a negative int is taken as its two's-complement bits."""
    mask = (1 << 64) - 1
    return int(lib.specdec_sample_seed(_arrays.int64_bits(base_seed, "base_seed") & mask,
                                       _arrays.int64_bits(sample, "sample") & mask))
