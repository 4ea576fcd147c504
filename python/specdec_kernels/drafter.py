"""The suffix drafter over rollout history (`specdec::drafter`): DAS's drafter for RL rollouts.

Rollouts of earlier iterations and of the same group are the history; a request's context is matched against
it (suffix matching, as in SuffixDecoding, Oliaro et al. 2024, and DAS, arXiv 2511.13841, section 3), and the
continuations become a chain or a tree of drafts with their path probabilities. Drafts are point masses: verify
them with `rejection_verify_chain` / `rejection_verify_tree` and `draft=None`.
"""
from typing import Any, NamedTuple

import numpy as np

from . import _host
from ._ffi import check, ffi, lib

_KINDS = {"chain": 0, "tree": 1}
_UINT64_MAX = (1 << 64) - 1


class Proposal(NamedTuple):
    """A proposal: `tokens` and `parents` int32 `[n]` (a parent -1 is the context's last token, otherwise an
    earlier index), `probs` float64 `[n]` (path probabilities), `match_len` (context suffix matched, 0 for
    none) and `score` (expected accepted tokens: the sum of the path probabilities)."""

    tokens: Any
    parents: Any
    probs: Any
    match_len: int
    score: float


class SuffixDrafter:
    """A suffix drafter. Settings are the fields of `specdec::drafter::DrafterConfig` (and of
    `specdec_drafter_config`), given by name; the library checks them and names a bad one.

        drafter = SuffixDrafter(max_draft=8, min_match=2)
        drafter.add_request(request=0, prompt=3, prompt_tokens=[...])
        proposal = drafter.propose(0, kind="tree")
        drafter.append(0, verified_tokens); drafter.finish_request(0)

    Request and prompt ids are the caller's (uint64). Usable from several threads at once; `close()` (or the
    context manager, or garbage collection) releases it.
    """

    def __init__(self, **settings):
        config = ffi.new("specdec_drafter_config *")
        check(lib.specdec_drafter_config_default(config), "specdec_drafter_config_default")
        fields = {name for name, _ in ffi.typeof("specdec_drafter_config").fields}
        for name, value in settings.items():
            if name not in fields:
                raise TypeError(f"{name}: not a drafter setting (settings: {', '.join(sorted(fields))})")
            if isinstance(value, bool):
                value = int(value)
            try:
                setattr(config, name, value)
            except (TypeError, OverflowError) as error:
                raise TypeError(f"{name}: {value!r} ({error})") from None
        out = ffi.new("specdec_drafter **")
        check(lib.specdec_drafter_create(config, out), "specdec_drafter_create")
        self._handle = ffi.gc(out[0], lib.specdec_drafter_destroy)
        self.settings = {name: getattr(config, name) for name in fields}

    def _live(self):
        if self._handle is None:
            raise ValueError("drafter: closed")
        return self._handle

    def close(self):
        """Releases the drafter and its history; later calls raise."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            ffi.release(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def begin_iteration(self, iteration):
        """Starts training iteration `iteration` (non-decreasing): rollouts older than the window leave."""
        iteration = _host.whole_number(iteration, "iteration", 0, _UINT64_MAX)
        check(lib.specdec_drafter_begin_iteration(self._live(), iteration), "specdec_drafter_begin_iteration")

    def add_request(self, request, prompt, prompt_tokens):
        """Registers request `request` (unique among registered ones) of prompt `prompt` with its prompt."""
        request = _host.whole_number(request, "request", 0, _UINT64_MAX)
        prompt = _host.whole_number(prompt, "prompt", 0, _UINT64_MAX)
        tokens = _host.host_array(prompt_tokens, "prompt_tokens", np.int32)
        check(lib.specdec_drafter_add_request(self._live(), request, prompt, _host.pointer(ffi, tokens, "int32_t"),
                                              tokens.size), "specdec_drafter_add_request")

    def append(self, request, tokens):
        """Appends verified tokens to a request's output (and so to the history)."""
        request = _host.whole_number(request, "request", 0, _UINT64_MAX)
        tokens = _host.host_array(tokens, "tokens", np.int32)
        check(lib.specdec_drafter_append(self._live(), request, _host.pointer(ffi, tokens, "int32_t"), tokens.size),
              "specdec_drafter_append")

    def finish_request(self, request):
        """Ends a request; its rollout stays in the history until the window or a budget drops it."""
        request = _host.whole_number(request, "request", 0, _UINT64_MAX)
        check(lib.specdec_drafter_finish_request(self._live(), request), "specdec_drafter_finish_request")

    def propose(self, request, kind="chain", capacity=None):
        """A chain or tree (`kind`) continuing the request's context, at most `capacity` nodes (default:
        SPECDEC_MAX_DRAFTS = 63). Returns a Proposal."""
        request = _host.whole_number(request, "request", 0, _UINT64_MAX)
        if kind not in _KINDS:
            raise ValueError(f"kind: {kind!r}, expected 'chain' or 'tree'")
        capacity = lib.SPECDEC_MAX_TREE_NODES - 1 if capacity is None else _host.whole_number(capacity, "capacity", 0)
        tokens = np.empty(capacity, np.int32)
        parents = np.empty(capacity, np.int32)
        probs = np.empty(capacity, np.float64)
        count, match_len, score = ffi.new("int64_t *"), ffi.new("int64_t *"), ffi.new("double *")
        check(
            lib.specdec_drafter_propose(self._live(), request, _KINDS[kind], capacity,
                                        _host.pointer(ffi, tokens, "int32_t"), _host.pointer(ffi, parents, "int32_t"),
                                        _host.pointer(ffi, probs, "double"), count, match_len, score),
            "specdec_drafter_propose",
        )
        n = count[0]
        return Proposal(tokens[:n].copy(), parents[:n].copy(), probs[:n].copy(), int(match_len[0]), float(score[0]))

    def stats(self):
        """Sizes of the histories: a dict of prompts, rollouts, tokens, bytes, bytes_per_token,
        active_requests."""
        out = ffi.new("specdec_drafter_stats *")
        check(lib.specdec_drafter_get_stats(self._live(), out), "specdec_drafter_get_stats")
        return {name: getattr(out, name) for name, _ in ffi.typeof("specdec_drafter_stats").fields}
