"""Verification through the package: greedy against a Python reference, rejection sampling proven lossless by
chi-square tests, numpy and torch (and chains and one-node trees) agreeing bit for bit."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

import specdec_kernels as sk

# Each statistical test fails by chance with probability below 1e-7; the file's tests together below 1e-6.
FALSE_FAILURE_PER_TEST = 1e-7


def ragged(rng, num_requests, max_drafts, vocab):
    lengths = rng.integers(0, max_drafts + 1, num_requests)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    tokens = rng.integers(0, vocab, int(offsets[-1])).astype(np.int32)
    return offsets, tokens


def greedy_reference(logits, tokens, offsets):
    counts, emitted = [], []
    width = int(np.diff(offsets).max(initial=0)) + 1
    for b in range(len(offsets) - 1):
        rows = logits[offsets[b] + b: offsets[b + 1] + b + 1].astype(np.float32)
        argmax = rows.argmax(axis=1)  # ties to the lowest index, as specdec's rule
        drafts = tokens[offsets[b]: offsets[b + 1]]
        n = 0
        while n < len(drafts) and drafts[n] == argmax[n]:
            n += 1
        counts.append(n)
        emitted.append(list(argmax[: n + 1]) + [-1] * (width - n - 1))
    return np.array(counts, np.int32), np.array(emitted, np.int32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("num_requests,max_drafts,vocab", [(1, 0, 1), (5, 4, 7), (13, 9, 1000), (3, 63, 33)])
def test_greedy_matches_reference(rng, dtype, num_requests, max_drafts, vocab):
    offsets, tokens = ragged(rng, num_requests, max_drafts, vocab)
    logits = rng.standard_normal((len(tokens) + num_requests, vocab)).astype(np.float32)
    # Make some drafts right so that prefixes of every length are accepted.
    for b in range(num_requests):
        for j in range(offsets[b], offsets[b + 1]):
            if rng.random() < 0.8:
                logits[j + b, tokens[j]] = 50.0
    logits = logits.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    want_counts, want_emitted = greedy_reference(logits, tokens, offsets)
    got = sk.greedy_verify(logits, tokens, offsets)
    np.testing.assert_array_equal(got.accepted_counts, want_counts)
    np.testing.assert_array_equal(got.emitted_tokens, want_emitted)
    np.testing.assert_array_equal(got.request_status, 0)
    as_torch = torch.from_numpy(logits.view(np.uint16)).view(torch.bfloat16) if dtype == "bfloat16" else \
        torch.from_numpy(logits)
    got_torch = sk.greedy_verify(as_torch, torch.from_numpy(tokens), torch.from_numpy(offsets))
    np.testing.assert_array_equal(got_torch.accepted_counts.numpy(), want_counts)
    np.testing.assert_array_equal(got_torch.emitted_tokens.numpy(), want_emitted)


def chi_square_p_value(counts, probabilities):
    """P(chi-square >= observed) for `counts` against `probabilities` (cells of expected count below 5 pooled)."""
    total = counts.sum()
    expected = probabilities * total
    keep = expected >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(statistic / 2.0, dtype=torch.float64)))


def softmax(x, temperature=1.0):
    z = x.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("with_draft_rows", [True, False])
def test_chain_first_token_follows_the_target(rng, with_draft_rows):
    """Every request shares one target row and one draft row; each has its own seed, so the first emitted token
    of N requests is N independent draws, which must follow softmax(target / T) whatever the drafts."""
    vocab, num_requests, drafts, temperature = 12, 40000, 3, 0.8
    target_row = rng.standard_normal(vocab).astype(np.float32) * 2
    draft_row = rng.standard_normal(vocab).astype(np.float32) * 2
    offsets = np.arange(0, (num_requests + 1) * drafts, drafts, dtype=np.int32)
    draft_dist = softmax(draft_row, temperature)
    tokens = rng.choice(vocab, size=num_requests * drafts, p=draft_dist).astype(np.int32)
    target = np.tile(target_row, (num_requests * (drafts + 1), 1))
    draft = np.tile(draft_row, (num_requests * drafts, 1)) if with_draft_rows else None
    seeds = np.array([sk.sample_seed(7, i) for i in range(num_requests)], np.uint64)
    result = sk.rejection_verify_chain(target, tokens, offsets, draft=draft, seeds=seeds, steps=3,
                                       temperature=temperature)
    np.testing.assert_array_equal(result.request_status, 0)
    first = result.emitted_tokens[:, 0]
    counts = np.bincount(first, minlength=vocab)
    p = chi_square_p_value(counts, softmax(target_row, temperature))
    assert p > FALSE_FAILURE_PER_TEST, f"first tokens do not follow the target (p = {p:.3g}; counts {counts})"
    # The acceptance of the first draft is min(1, p/q) averaged over q: its rate has a known value.
    if with_draft_rows:
        accept = np.minimum(1.0, softmax(target_row, temperature) / draft_dist)
        want = float((draft_dist * accept).sum())
        got = float((result.accepted_counts > 0).mean())
        sigma = math.sqrt(want * (1 - want) / num_requests)
        assert abs(got - want) < 5.5 * sigma, f"first-draft acceptance {got:.4f}, expected {want:.4f}"


def test_tree_first_token_follows_the_target_with_point_mass_drafts(rng):
    """Trees of a root with three children (point-mass drafts, as a suffix drafter proposes): the emitted first
    token follows the target's row at the root."""
    vocab, num_requests = 9, 30000
    root_row = rng.standard_normal(vocab).astype(np.float32) * 1.5
    nodes = 4
    node_offsets = np.arange(0, (num_requests + 1) * nodes, nodes, dtype=np.int32)
    parents = np.tile(np.array([-1, 0, 0, 0], np.int32), num_requests)
    children = np.stack([rng.choice(vocab, 3, replace=False) for _ in range(num_requests)])
    node_tokens = np.concatenate([np.zeros((num_requests, 1), np.int64), children], axis=1).astype(np.int32).ravel()
    target = np.tile(root_row, (num_requests * nodes, 1))
    seeds = np.array([sk.sample_seed(11, i) for i in range(num_requests)], np.uint64)
    result = sk.rejection_verify_tree(target, node_tokens, parents, node_offsets, seeds=seeds, steps=0)
    np.testing.assert_array_equal(result.request_status, 0)
    counts = np.bincount(result.emitted_tokens[:, 0], minlength=vocab)
    p = chi_square_p_value(counts, softmax(root_row))
    assert p > FALSE_FAILURE_PER_TEST, f"first tokens do not follow the target (p = {p:.3g}; counts {counts})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_numpy_and_torch_give_the_same_bits(rng, dtype):
    vocab, num_requests = 257, 6
    offsets, tokens = ragged(rng, num_requests, 5, vocab)
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    target = torch.randn(len(tokens) + num_requests, vocab, generator=generator)
    draft = torch.randn(len(tokens), vocab, generator=generator)
    target, draft = target.to(dtype), draft.to(dtype)
    seeds = rng.integers(0, 1 << 63, num_requests).astype(np.uint64)

    def numpy_of(t):
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()

    from_torch = sk.rejection_verify_chain(target, torch.from_numpy(tokens), torch.from_numpy(offsets), draft=draft,
                                           seeds=torch.from_numpy(seeds), steps=5, top_p=0.9)
    from_numpy = sk.rejection_verify_chain(numpy_of(target), tokens, offsets, draft=numpy_of(draft), seeds=seeds,
                                           steps=5, top_p=0.9)
    for a, b in zip(from_torch, from_numpy):
        np.testing.assert_array_equal(a.numpy(), b)


def test_a_chain_is_a_tree_of_one_branch(rng):
    """The same drafts verified as a chain and as a one-branch tree (its rows in node order) give the same
    tokens: one sampler, one rule."""
    vocab, num_requests, drafts = 50, 16, 5
    target = rng.standard_normal((num_requests * (drafts + 1), vocab)).astype(np.float32)
    # Draft rows near the target's, and drafts drawn from them, so that paths of every length get accepted.
    draft = (target.reshape(num_requests, drafts + 1, vocab)[:, :drafts].reshape(-1, vocab)
             + 0.3 * rng.standard_normal((num_requests * drafts, vocab)).astype(np.float32))
    tokens = np.array([rng.choice(vocab, p=softmax(row)) for row in draft], np.int32)
    offsets = np.arange(0, (num_requests + 1) * drafts, drafts, dtype=np.int32)
    seeds = list(range(1, num_requests + 1))
    chain = sk.rejection_verify_chain(target, tokens, offsets, draft=draft, seeds=seeds, steps=9)
    assert chain.accepted_counts.max() >= 2, chain.accepted_counts  # the comparison covers accepted paths
    # Tree: node 0 is the last accepted token (its row is the first target row), node j + 1 is draft j.
    node_tokens = np.concatenate([np.concatenate([[0], tokens[b * drafts:(b + 1) * drafts]])
                                  for b in range(num_requests)]).astype(np.int32)
    parents = np.tile(np.arange(-1, drafts, dtype=np.int32), num_requests)
    node_offsets = np.arange(0, (num_requests + 1) * (drafts + 1), drafts + 1, dtype=np.int32)
    # A node's draft row is the distribution its children were drawn from: the chain's row of the next draft.
    tree_draft = np.concatenate([np.concatenate([draft[b * drafts:(b + 1) * drafts], draft[:1] * 0])
                                 for b in range(num_requests)])
    tree = sk.rejection_verify_tree(target, node_tokens, parents, node_offsets, draft=tree_draft, seeds=seeds,
                                    steps=9)
    np.testing.assert_array_equal(chain.accepted_counts, tree.accepted_counts)
    np.testing.assert_array_equal(chain.emitted_tokens, tree.emitted_tokens)


def test_same_seed_and_step_same_draw_in_any_slot(rng):
    vocab = 64
    row = rng.standard_normal(vocab).astype(np.float32)
    target = np.tile(row, (4, 1))
    tokens = np.zeros(0, np.int32)
    offsets = np.zeros(5, np.int32)
    result = sk.rejection_verify_chain(target, tokens, offsets, seeds=[5, 6, 5, 6], steps=[1, 1, 1, 2])
    emitted = result.emitted_tokens[:, 0]
    assert emitted[0] == emitted[2]


def test_sample_seeds_are_distinct():
    seeds = {sk.sample_seed(123, i) for i in range(1000)}
    assert len(seeds) == 1000
