"""The package on CUDA tensors (skipped without a GPU; the GPU runner runs this file, see scripts/gpu-run.sh):
each family against the CPU backend through the package, on the current stream (a side stream included),
inside CUDA graphs, and through opcheck. What the library documents as the same bytes on both backends (greedy
verification, point-mass sampling, int4 quantization, the cache rows tree attention appends) is compared bit for
bit; the rest within its stated bound, and the sampler by a chi-square test."""
import numpy as np
import pytest
import torch

import specdec_kernels as sk
from specdec_kernels import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Each statistical test fails by chance with probability below 1e-7.
FALSE_FAILURE_PER_TEST = 1e-7


def cuda(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


def chain_batch(rng, num_requests=16, drafts=4, vocab=1000, dtype=torch.bfloat16):
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    target = (torch.randn(num_requests * (drafts + 1), vocab, generator=generator) * 3).to(dtype)
    draft = (torch.randn(num_requests * drafts, vocab, generator=generator) * 3).to(dtype)
    tokens = torch.multinomial(torch.softmax(draft.float(), -1), 1, generator=generator).to(torch.int32).view(-1)
    offsets = torch.arange(0, (num_requests + 1) * drafts, drafts, dtype=torch.int32)
    return target, draft, tokens, offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_same_as_cpu(rng, dtype):
    target, _, tokens, offsets = chain_batch(rng, dtype=dtype)
    target[torch.arange(0, target.shape[0], 2)] *= 0  # ties everywhere in half the rows: lowest index wins
    on_cpu = sk.greedy_verify(target, tokens, offsets)
    on_gpu = sk.greedy_verify(*cuda(target, tokens, offsets))
    for a, b in zip(on_cpu, on_gpu):
        if a is not None:
            assert b.is_cuda and torch.equal(a, b.cpu())


def test_point_mass_chain_same_as_cpu(rng):
    target, _, tokens, offsets = chain_batch(rng)
    seeds = torch.from_numpy(rng.integers(0, 1 << 62, 16)).to(torch.int64)
    on_cpu = sk.rejection_verify_chain(target, tokens, offsets, seeds=seeds, steps=3, top_k=50)
    on_gpu = sk.rejection_verify_chain(*cuda(target, tokens, offsets), seeds=seeds.cuda(), steps=3, top_k=50)
    assert torch.equal(on_cpu.request_status, on_gpu.request_status.cpu())
    assert torch.equal(on_cpu.accepted_counts, on_gpu.accepted_counts.cpu())
    assert torch.equal(on_cpu.emitted_tokens, on_gpu.emitted_tokens.cpu())  # README: identical without top-p


def test_chain_with_draft_rows_follows_the_target_on_cuda(rng):
    vocab, num_requests, drafts = 12, 40000, 3
    target_row = torch.from_numpy(rng.standard_normal(vocab).astype(np.float32)) * 2
    draft_row = torch.from_numpy(rng.standard_normal(vocab).astype(np.float32)) * 2
    target = target_row.repeat(num_requests * (drafts + 1), 1).cuda()
    draft = draft_row.repeat(num_requests * drafts, 1).cuda()
    tokens = torch.multinomial(torch.softmax(draft_row, -1), num_requests * drafts, replacement=True)
    offsets = torch.arange(0, (num_requests + 1) * drafts, drafts, dtype=torch.int32).cuda()
    seeds = torch.arange(num_requests, dtype=torch.int64).cuda() * 7919 + 1
    result = sk.rejection_verify_chain(target, tokens.to(torch.int32).cuda(), offsets, draft=draft, seeds=seeds,
                                       steps=0)
    assert bool((result.request_status == 0).all())
    counts = torch.bincount(result.emitted_tokens[:, 0].long().cpu(), minlength=vocab).double()
    expected = torch.softmax(target_row.double(), -1) * num_requests
    statistic = float(((counts - expected) ** 2 / expected).sum())
    p = float(torch.special.gammaincc(torch.tensor((vocab - 1) / 2.0), torch.tensor(statistic / 2.0)))
    assert p > FALSE_FAILURE_PER_TEST, f"first tokens do not follow the target (p = {p:.3g})"


def test_int4_quantize_same_bytes_and_gemv_within_bound(rng):
    w = torch.from_numpy(rng.standard_normal((64, 512)).astype(np.float32)).to(torch.bfloat16)
    on_cpu = sk.int4_quantize(w, group_size=128)
    on_gpu = sk.int4_quantize(w.cuda(), group_size=128)
    for a, b in zip(on_cpu[:3], on_gpu[:3]):
        assert b.is_cuda and torch.equal(a, b.cpu())
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    y_cpu = sk.int4_gemv(x, on_cpu).double()
    y_gpu = sk.int4_gemv(x.cuda(), on_gpu).double().cpu()
    # Both within their documented bounds of the exact sum, so within twice the looser one of each other.
    scale = on_cpu.scales.double().T.repeat_interleave(128, dim=1)
    bound = 2 * (y_cpu.abs() * 2.0**-7 + 2.0**-14 * (x.double().abs() @ (scale * 15).T))
    assert torch.all((y_cpu - y_gpu).abs() <= bound)


def test_tree_attention_same_cache_bytes_as_cpu(rng):
    from test_attention import make_batch  # noqa: PLC0415 (the CPU suite's batch builder)

    batch = make_batch(rng, torch.bfloat16, [40, 7], [[-1, 0, 0, 1], [-1, 0, 1]], 8, 2, 128, 16, 96)
    on_gpu = {name: t.clone().cuda() for name, t in batch.items()}
    cpu_result = sk.tree_attention(**batch)
    gpu_result = sk.tree_attention(**on_gpu)
    assert torch.equal(batch["k_cache"], on_gpu["k_cache"].cpu())
    assert torch.equal(batch["v_cache"], on_gpu["v_cache"].cpu())
    assert torch.equal(cpu_result.request_status, gpu_result.request_status.cpu())
    unit = 2.0**-8
    err = (cpu_result.out.double() - gpu_result.out.double().cpu()).abs()
    assert torch.all(err <= 2 * unit * cpu_result.out.double().abs() + 16 * unit * batch["v"].double().abs().max())
    torch.testing.assert_close(cpu_result.lse, gpu_result.lse.cpu(), rtol=1e-4, atol=1e-4)


def test_side_stream_is_used(rng):
    """Work goes on the current stream of the tensors' device: on a side stream, the results are there once
    that stream is synchronised."""
    target, _, tokens, offsets = chain_batch(rng)
    want = sk.greedy_verify(target, tokens, offsets)
    target, tokens, offsets = cuda(target, tokens, offsets)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = sk.greedy_verify(target, tokens, offsets, emit_width=5)
    stream.synchronize()
    assert torch.equal(got.emitted_tokens.cpu(), want.emitted_tokens)


def test_cuda_graph_capture_and_replay(rng):
    """Each kernel family captured in one CUDA graph and replayed on new inputs copied into the captured ones."""
    target, draft, tokens, offsets = cuda(*chain_batch(rng))
    seeds = torch.arange(16, dtype=torch.int64, device="cuda")
    steps = torch.zeros(16, dtype=torch.int64, device="cuda")
    w = sk.int4_quantize(torch.randn(64, 256, dtype=torch.bfloat16, device="cuda"), group_size=128)
    x = torch.randn(1, 256, dtype=torch.bfloat16, device="cuda")

    def step():
        greedy = sk.greedy_verify(target, tokens, offsets, emit_width=5)
        sampled = sk.rejection_verify_chain(target, tokens, offsets, draft=draft, seeds=seeds, steps=steps,
                                            emit_width=5)
        return greedy.emitted_tokens, sampled.emitted_tokens, sk.int4_gemv(x, w)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    new_target, new_draft, _, _ = cuda(*chain_batch(rng))
    target.copy_(new_target)
    draft.copy_(new_draft)
    x.copy_(torch.randn_like(x))
    steps.fill_(9)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["greedy_verify", "rejection_verify_chain", "int4_gemv", "tree_attention"])
def test_opcheck_on_cuda(case):
    from test_ops import attention_args, chain_args, greedy_args  # noqa: PLC0415 (the CPU suite's inputs)

    namespace = ops.ensure_registered()
    if case == "int4_gemv":
        weight = sk.int4_quantize(torch.randn(32, 128, dtype=torch.float16, device="cuda"), group_size=64)
        args = (torch.randn(3, 128, dtype=torch.float16, device="cuda"), weight.packed, weight.scales, weight.zeros,
                32, 64)
    else:
        args = {"greedy_verify": greedy_args, "rejection_verify_chain": lambda: chain_args(True),
                "tree_attention": attention_args}[case]()
        args = tuple(cuda(*args))
    torch.library.opcheck(getattr(namespace, case), args)


def test_cpu_and_cuda_tensors_in_one_call_are_refused():
    logits = torch.randn(2, 8, device="cuda")
    with pytest.raises(ValueError, match=r"^draft_tokens: on cpu while logits is on cuda:0"):
        sk.greedy_verify(logits, torch.zeros(1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32).cuda())

