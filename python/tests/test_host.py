"""The host-side families through the package: the suffix drafter, the tree converters and the policy, against
what their documentation states (checked by hand here, not copied from the library's output)."""
import numpy as np
import pytest
import torch

import specdec_kernels as sk


def test_drafter_proposes_the_continuation_seen_in_history():
    with sk.SuffixDrafter(max_draft=6) as drafter:
        history = [10, 11, 12, 13, 14, 15, 16, 17]
        drafter.add_request(request=1, prompt=7, prompt_tokens=[1, 2, 3])
        drafter.append(1, history)
        drafter.finish_request(1)
        drafter.add_request(request=2, prompt=7, prompt_tokens=[1, 2, 3])
        drafter.append(2, [10, 11, 12])
        for kind in ("chain", "tree"):
            proposal = drafter.propose(2, kind=kind)
            # The context ends 10 11 12; the history continued with 13 14 15 16 17 (and nothing else).
            assert proposal.tokens.tolist() == [13, 14, 15, 16, 17]
            assert proposal.parents.tolist() == [-1, 0, 1, 2, 3]
            assert proposal.match_len >= 3
            np.testing.assert_allclose(proposal.probs, 1.0)
            assert proposal.score == pytest.approx(5.0)
        capped = drafter.propose(2, capacity=2)
        assert capped.tokens.tolist() == [13, 14] and capped.score == pytest.approx(5.0)
        stats = drafter.stats()
        assert stats["rollouts"] >= 1 and stats["active_requests"] == 1 and stats["prompts"] == 1
    with pytest.raises(ValueError, match="^drafter: closed"):
        drafter.propose(2)


def test_drafter_errors_are_named():
    with pytest.raises(TypeError, match=r"^max_drafts: not a drafter setting"):
        sk.SuffixDrafter(max_drafts=4)
    with pytest.raises(sk.InvalidArgumentError, match=r"max_draft"):
        sk.SuffixDrafter(max_draft=0)
    drafter = sk.SuffixDrafter()
    with pytest.raises(TypeError, match=r"^prompt_tokens: dtype int64, expected int32"):
        drafter.add_request(0, 0, np.array([1, 2], np.int64))
    with pytest.raises(TypeError, match=r"^tokens: expected integers"):
        drafter.append(0, [1.5])
    with pytest.raises(ValueError, match=r"^kind: 'dag'"):
        drafter.propose(0, kind="dag")
    with pytest.raises(ValueError, match=r"^request: -1"):
        drafter.propose(-1)
    with pytest.raises(sk.InvalidArgumentError, match=r"request"):
        drafter.propose(12345)  # never registered


def test_draft_to_verify_tree_puts_the_last_token_at_the_root():
    tree = sk.draft_to_verify_tree(99, [5, 6, 7], [-1, 0, -1])
    assert tree.tokens.tolist() == [99, 5, 6, 7]
    assert tree.parents.tolist() == [-1, 0, 1, 0]
    assert tree.emit_width == 3  # depth 2 (99 -> 5 -> 6) plus one
    with pytest.raises(sk.InvalidArgumentError, match="draft_parents"):
        sk.draft_to_verify_tree(99, [5, 6], [-1, 1])  # a parent must come before its child
    with pytest.raises(ValueError, match=r"^draft_parents: shape \(1,\), expected \(2,\)"):
        sk.draft_to_verify_tree(99, [5, 6], [-1])


def test_a_proposal_verified_and_compacted_end_to_end():
    """Drafter -> verification tree -> sampler (point masses) -> compaction's paths: the glue agrees."""
    drafter = sk.SuffixDrafter()
    drafter.add_request(0, 0, [1, 2, 3, 4, 1, 2, 3])
    proposal = drafter.propose(0, kind="tree")
    tree = sk.draft_to_verify_tree(3, proposal.tokens, proposal.parents)
    vocab = 8
    target = np.full((len(tree.tokens), vocab), -30.0, np.float32)
    for node, token in enumerate(tree.tokens):  # the target agrees with every draft, then emits 7
        children = [c for c in range(len(tree.tokens)) if tree.parents[c] == node]
        target[node, tree.tokens[children[0]] if children else 7] = 30.0
    offsets = np.array([0, len(tree.tokens)], np.int32)
    result = sk.rejection_verify_tree(target, tree.tokens, tree.parents, offsets, seeds=1, steps=0,
                                      emit_width=tree.emit_width)
    assert result.accepted_counts.tolist() == [len(tree.tokens) - 1]  # a chain here: every draft accepted
    assert result.emitted_tokens[0].tolist() == list(tree.tokens[1:]) + [7]
    paths = sk.compaction_paths(result.accepted_counts, result.accepted_nodes)
    assert paths.nodes.tolist() == list(range(len(tree.tokens)))


def test_compaction_paths_refuses_a_flagged_request():
    with pytest.raises(sk.InvalidArgumentError, match="accepted_counts"):
        sk.compaction_paths([-1], [[-1, -1]])


def test_cost_model_and_policy():
    model = sk.CostModel.preset("h100", "llama3-8b")
    decode = model.step_seconds("decode", batch=1, context_tokens=1000)
    verify = model.step_seconds("verify", batch=1, context_tokens=1000, verified_tokens=5)
    assert 0 < decode <= verify
    # Perfect acceptance is worth drafting; zero acceptance is not (drafting only costs).
    sure = sk.choose_draft_lengths(model, [1000], [[1.0]], max_draft=8)
    never = sk.choose_draft_lengths(model, [1000], [[0.0]], max_draft=8)
    assert sure.lengths.tolist()[0] > 0 and never.lengths.tolist() == [0]
    assert sure.goodput > never.goodput > 0
    trees = sk.choose_draft_trees(model, [1000], [[0.9]], max_drafts=6, max_depth=3)
    n = trees.num_drafts.tolist()
    assert n[0] > 0
    assert sk.choose_draft_trees(model, [1000], [[0.0]], max_drafts=6, max_depth=3).num_drafts.tolist() == [0]
    row = trees.parents[0]
    assert row[0] == -1 and all(0 <= row[j] < j for j in range(1, n[0] + 1)) and all(row[n[0] + 1:] == -1)
    depth = [0]
    for j in range(1, n[0] + 1):
        depth.append(depth[row[j]] + 1)
    assert max(depth) <= 3
    model.t0 = 0.5
    assert model.fields()["t0"] == 0.5
    with pytest.raises(AttributeError, match="^tzero"):
        model.tzero = 1
    with pytest.raises(ValueError, match=r"^acceptance: 1 rows, expected 2"):
        sk.choose_draft_lengths(model, [1, 2], [[0.5]], max_draft=4)
    with pytest.raises(ValueError, match=r"^gpu: 'v100'"):
        sk.CostModel.preset("v100")
    with pytest.raises(ValueError, match=r"^contexts: on cuda|^contexts: on meta"):
        sk.choose_draft_lengths(model, torch.zeros(1, dtype=torch.int64, device="meta"), [[0.5]], max_draft=4)
