"""The torch.library ops: opcheck (schema, fake implementation, dispatch) for each, and a compiled function
calling them with fullgraph=True (the fake implementations give every shape without running the library)."""
import pytest
import torch

import specdec_kernels as sk
from specdec_kernels import ops


def greedy_args():
    offsets = torch.tensor([0, 2, 5], dtype=torch.int32)
    return (torch.randn(7, 40), torch.randint(0, 40, (5,), dtype=torch.int32), offsets, 4)


def chain_args(with_draft):
    logits, tokens, offsets, width = greedy_args()
    draft = torch.randn(5, 40) if with_draft else None
    seeds = torch.tensor([3, 4], dtype=torch.int64)
    steps = torch.tensor([0, 7], dtype=torch.int64)
    return (logits, draft, tokens, offsets, torch.tensor([0.9, 1.0]), None, None, seeds, steps, None, None, None,
            False, width)


def tree_args():
    target = torch.randn(6, 30)
    tokens = torch.tensor([0, 3, 4, 5, 0, 9], dtype=torch.int32)
    parents = torch.tensor([-1, 0, 0, 1, -1, 0], dtype=torch.int32)
    offsets = torch.tensor([0, 4, 6], dtype=torch.int32)
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    steps = torch.zeros(2, dtype=torch.int64)
    return (target, torch.randn(6, 30), tokens, parents, offsets, torch.ones(2), None, None, seeds, steps, None,
            None, None, False, 3)


OPCHECK_CASES = {
    "greedy_verify": greedy_args,
    "rejection_verify_chain": lambda: chain_args(True),
    "rejection_verify_chain_point_mass": lambda: chain_args(False),
    "rejection_verify_tree": tree_args,
    "int4_quantize": lambda: (torch.randn(32, 128, dtype=torch.bfloat16), 64, torch.bfloat16),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case):
    namespace = ops.ensure_registered()
    op = getattr(namespace, case.replace("_point_mass", ""))
    torch.library.opcheck(op, OPCHECK_CASES[case]())


def test_opcheck_int4_gemv():
    weight = sk.int4_quantize(torch.randn(32, 128, dtype=torch.float16), group_size=64)
    x = torch.randn(3, 128, dtype=torch.float16)
    torch.library.opcheck(ops.ensure_registered().int4_gemv, (x, weight.packed, weight.scales, weight.zeros, 32, 64))


def attention_args():
    torch.manual_seed(0)
    q = torch.randn(3, 4, 64, dtype=torch.bfloat16)
    k, v = torch.randn(3, 2, 64, dtype=torch.bfloat16), torch.randn(3, 2, 64, dtype=torch.bfloat16)
    offsets = torch.tensor([0, 2, 3], dtype=torch.int32)
    parents = torch.tensor([-1, 0, -1], dtype=torch.int32)
    prefix_lens = torch.tensor([5, 0], dtype=torch.int32)
    page_table = torch.tensor([[0], [2]], dtype=torch.int32)
    k_cache, v_cache = torch.randn(3, 16, 2, 64, dtype=torch.bfloat16), torch.randn(3, 16, 2, 64, dtype=torch.bfloat16)
    angles = torch.rand(32, 32, dtype=torch.float64)
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1).float()
    return (q, k, v, offsets, parents, prefix_lens, page_table, k_cache, v_cache, cos_sin, "neox", 0.125, 2)


def test_opcheck_tree_attention():
    torch.library.opcheck(ops.ensure_registered().tree_attention, attention_args())


def test_opcheck_tree_kv_compact():
    k_caches = [torch.randn(3, 16, 2, 64, dtype=torch.float16) for _ in range(2)]
    v_caches = [torch.randn(3, 16, 2, 64, dtype=torch.float16) for _ in range(2)]
    args = (k_caches, v_caches, torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([0, 2, 0], dtype=torch.int32),
            torch.tensor([5, 0], dtype=torch.int32), torch.tensor([[0], [2]], dtype=torch.int32))
    torch.library.opcheck(ops.ensure_registered().tree_kv_compact, args)


def test_compiled_verification_step_matches_eager():
    logits, tokens, offsets, width = greedy_args()

    def step(logits, tokens, offsets):
        greedy = sk.greedy_verify(logits, tokens, offsets, emit_width=width)
        sampled = sk.rejection_verify_chain(logits * 2, tokens, offsets, seeds=torch.tensor([5, 6]),
                                            steps=torch.tensor([1, 1]), emit_width=width)
        return greedy.emitted_tokens, sampled.emitted_tokens, sampled.accepted_counts + 1

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(compiled(logits, tokens, offsets), step(logits, tokens, offsets)):
        torch.testing.assert_close(got, want)


def test_int4_traces_with_fullgraph():
    w = torch.randn(32, 128, dtype=torch.bfloat16)
    x = torch.randn(2, 128, dtype=torch.bfloat16)

    def layer(w, x):
        return sk.int4_gemv(x, sk.int4_quantize(w, group_size=64))

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w, x), layer(w, x), rtol=0, atol=0)
