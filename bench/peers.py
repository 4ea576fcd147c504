#!/usr/bin/env python3
"""Peer harness: specdec through its Python package (specdec_kernels) next to PyTorch, in one process, on the same
inputs.

The package is the harness's only way into specdec: tensors in, outputs allocated and returned, the current
stream taken from the tensors. On a GPU machine (no Rust there: `scripts/stage-gpu.sh` carries the package
sources, libspecdec.so and the cffi wheels) each primitive is timed with CUDA events (median over batches of
calls, inputs rotated over copies larger than the L2 cache) twice: called from Python as a user calls it, and
replayed from a CUDA graph captured around the same call (the kernels alone, without the Python overhead; a
capture that fails is reported). Every specdec result is checked against torch first. Prints a markdown table
with the copy bandwidth measured in the same run.

    PYTHONPATH=python SPECDEC_KERNELS_LIBRARY=target/release/libspecdec.so python3 bench/peers.py [--quick]
        [--family greedy|sampling|int4|attention]... [--device cuda|cpu]

`--device cpu` runs small cases on the CPU backend with wall-clock timing: CI runs it to prove the harness and
its checks (the figures are not the GPU's).

Peers per primitive:
  greedy_verify: torch.argmax over all rows, then compare with the drafts, cumprod for the accepted prefix and
  torch.where for the padded output (what an engine does without a fused kernel).
  rejection_verify_chain (bf16 logits, draft rows, temperature 1): vLLM's algorithm written in torch (softmax of
  target and draft rows in fp32, accept u < p/q, recovered tokens by an exponential race over max(0, p - q),
  bonus by the same race over p), and FlashInfer's chain_speculative_sampling after the softmax it needs, when
  the flashinfer package is importable (its wheel must be carried to the GPU machine).
  int4_gemv (g128 on the GPU, g64 on the CPU; bf16 activations): PyTorch's tinygemm (torch.ops.aten._weight_int4pack_mm, CUDA only, same
  codes with the zero point written as its float zero (8 - z) * s), gemlite when importable, and bf16
  torch.matmul on the unquantized weights. specdec's weights come from int4_quantize on the device (timed too).
  tree_attention: SDPA with a dense mask and FlexAttention with a tree block mask on contiguous K/V gathered
  beforehand (their best case), and FlashInfer's custom-mask paged prefill where it is installed.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import torch

import specdec_kernels as sk

ROTATION_BYTES = 256 << 20


class Harness:
    """The device, the input generator and the timers of one run."""

    def __init__(self, device, seed):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.rotation_bytes = ROTATION_BYTES if self.cuda else 8 << 20

    def copies(self, per_copy, most):
        """Copies of an input to rotate over so that the data read exceeds the L2 cache (one on the CPU)."""
        return max(1, min(most, -(-self.rotation_bytes // per_copy))) if self.cuda else 1

    def time_us(self, fn, batches=30, per_batch=10, warmup=10):
        """Median microseconds per call; fn(i) runs (on CUDA: enqueues) call i."""
        if not self.cuda:
            batches, per_batch, warmup = 5, 2, 1
        for i in range(warmup):
            fn(i)
        samples = []
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for b in range(batches):
            if self.cuda:
                start.record()
            else:
                begin = time.perf_counter()
            for i in range(per_batch):
                fn(warmup + b * per_batch + i)
            if self.cuda:
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) * 1e3 / per_batch)
            else:
                samples.append((time.perf_counter() - begin) * 1e6 / per_batch)
        return statistics.median(samples)

    def graph_us(self, fn, copies):
        """The same calls replayed from one CUDA graph holding one call per input copy: microseconds per call,
        or why it could not be captured. CPU: '-'."""
        if not self.cuda:
            return "-"
        try:
            for i in range(3):  # warm up outside the capture (allocator pools, lazy registration)
                fn(i)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for i in range(copies):
                    fn(i)
            replays = max(1, 64 // copies)
            return self.time_us(lambda i: graph.replay(), batches=15, per_batch=replays, warmup=2) / copies
        except Exception as e:  # reported in the table, not fatal: capture is what is being tried
            return f"capture failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"

    def randn(self, *shape, scale=1.0, dtype=torch.bfloat16):
        return (torch.randn(*shape, device=self.device, generator=self.gen) * scale).to(dtype)


def copy_bandwidth_gbps(h):
    n = (1 << 30) if h.cuda else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=h.device).random_(0, 255, generator=h.gen)
    dst = torch.empty_like(src)
    us = h.time_us(lambda i: dst.copy_(src), batches=10, per_batch=1, warmup=2)
    return 2 * n / (us * 1e3)


def fmt_us(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def ratio(peer, ours):
    return f"{peer / ours:.2f}x" if isinstance(peer, float) and isinstance(ours, float) else "-"


def torch_greedy(logits, drafts, batch, k):
    """The peer: argmax of every row, then the accepted prefix and the padded emitted tokens."""
    argmax = logits.argmax(dim=-1).to(torch.int32).view(batch, k + 1)
    matches = argmax[:, :k] == drafts.view(batch, k)
    accepted = matches.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    positions = torch.arange(k + 1, device=logits.device)
    emitted = torch.where(positions[None, :] <= accepted[:, None], argmax, torch.full_like(argmax, -1))
    return accepted, emitted


def bench_greedy(h, dtype, batch, k, vocab):
    rows = batch * (k + 1)
    base = h.randn(rows, vocab, scale=4, dtype=dtype)
    # Every draft is its row's argmax, so every row must be read (same inputs as the Rust main job's shape).
    drafts = base.argmax(dim=-1).to(torch.int32).view(batch, k + 1)[:, :k].contiguous().view(-1)
    offsets = torch.arange(0, (batch + 1) * k, k, dtype=torch.int32, device=h.device)
    copies = h.copies(base.nbytes, 4096)
    rotated = [base.clone() for _ in range(copies)]

    def run_specdec(i):
        return sk.greedy_verify(rotated[i % copies], drafts, offsets, emit_width=k + 1)

    got = run_specdec(0)
    want_accepted, want_emitted = torch_greedy(base, drafts, batch, k)
    ok = torch.equal(got.accepted_counts, want_accepted) and torch.equal(got.emitted_tokens, want_emitted)
    specdec_us = h.time_us(run_specdec)
    graph_us = h.graph_us(run_specdec, copies)
    torch_us = h.time_us(lambda i: torch_greedy(rotated[i % copies], drafts, batch, k))
    nbytes = base.nbytes + 4 * (offsets.numel() + drafts.numel() + batch + batch * (k + 1))
    return specdec_us, graph_us, torch_us, nbytes, ok


def torch_vllm_chain(target, draft, drafts, batch, k, gen):
    """vLLM's rejection sampler in torch: fp32 softmax of both, accept u < p/q, recovered and bonus tokens by an
    exponential race (argmax of weight / Exp(1) noise)."""
    vocab = target.shape[-1]
    p = torch.softmax(target.float(), dim=-1).view(batch, k + 1, vocab)
    q = torch.softmax(draft.float(), dim=-1).view(batch, k, vocab)
    x = drafts.view(batch, k).long()
    p_x = p[:, :k].gather(2, x[..., None]).squeeze(2)
    q_x = q.gather(2, x[..., None]).squeeze(2)
    u = torch.rand(batch, k, device=target.device, generator=gen)
    accept = u * q_x < p_x
    accepted = accept.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    weights = torch.cat([(p[:, :k] - q).clamp_min_(0), p[:, k:]], dim=1)
    noise = torch.empty_like(weights).exponential_(generator=gen)
    recovered = weights.div_(noise).argmax(dim=-1).to(torch.int32)
    positions = torch.arange(k + 1, device=target.device)
    drafted = torch.cat([drafts.view(batch, k), recovered[:, k:]], dim=1)
    emitted = torch.where(positions[None, :] < accepted[:, None], drafted, recovered)
    emitted = torch.where(positions[None, :] <= accepted[:, None], emitted, torch.full_like(emitted, -1))
    return accepted, emitted


def flashinfer_chain(target, draft, drafts, batch, k):
    """FlashInfer's chain_speculative_sampling after the softmax it needs (ImportError when not installed)."""
    import flashinfer  # noqa: PLC0415 (optional peer)
    vocab = target.shape[-1]
    p = torch.softmax(target.float(), dim=-1).view(batch, k + 1, vocab)
    q = torch.softmax(draft.float(), dim=-1).view(batch, k, vocab)
    return flashinfer.sampling.chain_speculative_sampling(q, drafts.view(batch, k), p)


def bench_sampler(h, batch, k, vocab):
    target = h.randn(batch * (k + 1), vocab, scale=3)
    noise = h.randn(batch, k, vocab, scale=0.5, dtype=torch.float32)
    draft = (target.view(batch, k + 1, vocab)[:, :k].float() + noise).to(torch.bfloat16).view(batch * k, vocab)
    drafts = torch.multinomial(torch.softmax(draft.float(), dim=-1), 1, generator=h.gen).to(torch.int32).view(-1)
    offsets = torch.arange(0, (batch + 1) * k, k, dtype=torch.int32, device=h.device)
    temperature = torch.ones(batch, device=h.device)
    seeds = torch.randint(0, 2**62, (batch,), device=h.device, generator=h.gen, dtype=torch.int64)
    steps = torch.zeros(batch, dtype=torch.int64, device=h.device)
    copies = h.copies(target.nbytes + draft.nbytes, 4096)
    rotated = [(target.clone(), draft.clone()) for _ in range(copies)]

    def run_specdec(i):
        t, d = rotated[i % copies]
        return sk.rejection_verify_chain(t, drafts, offsets, draft=d, seeds=seeds, steps=steps,
                                         temperature=temperature, emit_width=k + 1)

    got = run_specdec(0)
    n = got.accepted_counts.long()
    emitted = got.emitted_tokens
    positions = torch.arange(k + 1, device=h.device)
    ok = bool((got.request_status == 0).all()) and bool(((n >= 0) & (n <= k)).all())
    ok = ok and bool(((emitted >= 0) == (positions[None, :] <= n[:, None])).all())
    ok = ok and bool((emitted[:, :k] == torch.where(positions[None, :k] < n[:, None], drafts.view(batch, k),
                                                     emitted[:, :k])).all())
    specdec_us = h.time_us(run_specdec)
    graph_us = h.graph_us(run_specdec, copies)
    torch_us = h.time_us(lambda i: torch_vllm_chain(*rotated[i % copies], drafts, batch, k, h.gen))
    try:
        flashinfer_chain(target, draft, drafts, batch, k)
        flashinfer_us = h.time_us(lambda i: flashinfer_chain(*rotated[i % copies], drafts, batch, k))
    except ImportError:
        flashinfer_us = "not installed"
    except Exception as e:  # a peer's API drift is reported, not fatal
        flashinfer_us = f"failed: {type(e).__name__}"
    return specdec_us, graph_us, torch_us, flashinfer_us, target.nbytes + draft.nbytes, ok


def int4_codes(packed, n, k):
    """The codes q[n, k] of specdec's format (docs/int4-format.md), unpacked with torch ops: an independent
    reading of the layout, so the GEMV is checked against the format rather than against itself."""
    words = packed.view(torch.int32).view(n // 16, k // 64, 32, 4)  # (tile row, tile col, lane, word)
    nib = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # (..., lane, word, nibble)
    device = packed.device
    lane, word, d = torch.arange(32, device=device), torch.arange(4, device=device), torch.arange(4, device=device)
    q = torch.empty(n, k, dtype=torch.int32, device=device)
    tr, tc = n // 16, k // 64
    for rho in range(2):
        nibble = 4 * (d % 2) + 2 * (d // 2) + rho  # (d,)
        vals = nib[..., nibble]  # (tr, tc, lane, word, d)
        rows = (lane // 4 + 8 * rho)[:, None, None].expand(32, 4, 4)
        cols = (32 * (word // 2)[None, :, None] + 8 * (lane % 4)[:, None, None] + 4 * (word % 2)[None, :, None]
                + d[None, None, :])
        full_rows = (torch.arange(tr, device=device)[:, None, None, None, None] * 16 + rows).expand(tr, tc, 32, 4, 4)
        full_cols = (torch.arange(tc, device=device)[None, :, None, None, None] * 64 + cols).expand(tr, tc, 32, 4, 4)
        q[full_rows.reshape(-1), full_cols.reshape(-1)] = vals.reshape(-1)
    return q


def bench_int4(h, n, k, m, group):
    w = h.randn(n, k, scale=0.02)
    x = h.randn(m, k)
    per_copy = n * k // 2 + 3 * n * (k // group)
    copies = h.copies(per_copy, 64)
    weights = [sk.int4_quantize(w, group_size=group) for _ in range(copies)]
    quantize_us = h.time_us(lambda i: sk.int4_quantize(w, group_size=group)) if m == 1 else None

    def run_specdec(i):
        return sk.int4_gemv(x, weights[i % copies])

    y = run_specdec(0)
    q = int4_codes(weights[0].packed, n, k)
    s = weights[0].scales.float()
    z = weights[0].zeros.float()
    deq = ((q.float().view(n, k // group, group) - z.t()[:, :, None]) * s.t()[:, :, None]).view(n, k)
    want = x.float() @ deq.t()
    err = (y.float() - want).abs().max().item()
    ok = err <= 2 ** -7 * want.abs().max().item()
    specdec_us = h.time_us(run_specdec)
    graph_us = h.graph_us(run_specdec, copies)

    # tinygemm: uint8 [n, k / 2] (even column in the high nibble), scales and float zeros [k / g, n, 2].
    if h.cuda:
        try:
            q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
            tiny_w = torch.ops.aten._convert_weight_to_int4pack(q_u8, 8)
            sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
            tiny = lambda i: torch.ops.aten._weight_int4pack_mm(x, tiny_w, group, sz)  # noqa: E731
            tiny_err = (tiny(0).float() - want).abs().max().item()
            tiny_us = h.time_us(tiny)
            tiny_us = tiny_us if tiny_err <= 2 ** -5 * want.abs().max().item() else f"wrong ({tiny_err:.3g})"
        except Exception as e:  # a peer's API drift is reported, not fatal
            tiny_us = f"failed: {type(e).__name__}"
    else:
        tiny_us = "CUDA only"
    try:
        import gemlite  # noqa: PLC0415 (optional peer)
        layer = gemlite.GemLiteLinear(4, group_size=group, in_features=k, out_features=n,
                                      input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16)
        layer.pack(q.to(torch.uint8), s.t().contiguous().to(torch.bfloat16), z.t().contiguous().to(torch.bfloat16),
                   bias=None)
        gemlite_us = h.time_us(lambda i: layer(x))
    except ImportError:
        gemlite_us = "not installed"
    except Exception as e:
        gemlite_us = f"failed: {type(e).__name__}"
    dense_copies = h.copies(w.nbytes, 16)
    dense = [w.clone() for _ in range(dense_copies)]
    matmul_us = h.time_us(lambda i: torch.matmul(x, dense[i % dense_copies].t()))
    nbytes = per_copy + 2 * (m * k + m * n)
    return specdec_us, graph_us, quantize_us, tiny_us, gemlite_us, matmul_us, nbytes, ok, err


def bench_tree_attention(h, batch, prefix, tree, heads):
    """specdec's fused tree attention over a paged cache vs SDPA with a dense mask and FlexAttention with a tree
    block mask, both on contiguous K/V gathered beforehand (their best case: the gather is not timed), and
    FlashInfer's custom-mask paged prefill where it is installed. Full binary trees."""
    hq, hkv, d = heads
    ps = 16
    ppr = -(-(prefix + tree) // ps)
    pages = batch * ppr
    k_cache, v_cache = h.randn(pages, ps, hkv, d), h.randn(pages, ps, hkv, d)
    table = torch.randperm(pages, device=h.device, generator=h.gen).to(torch.int32).view(batch, ppr)
    n = batch * tree
    q, k, v = h.randn(n, hq, d), h.randn(n, hkv, d), h.randn(n, hkv, d)
    parents = [-1] + [(i - 1) // 2 for i in range(1, tree)]
    parents_t = torch.tensor(parents * batch, dtype=torch.int32, device=h.device)
    offsets = torch.arange(0, n + 1, tree, dtype=torch.int32, device=h.device)
    prefix_lens = torch.full((batch,), prefix, dtype=torch.int32, device=h.device)
    scale = d ** -0.5

    def run_specdec(i):
        # The tree's KV goes to the same slots every call (prefix .. prefix + tree): repeatable.
        return sk.tree_attention(q, k, v, offsets, parents_t, prefix_lens, table, k_cache, v_cache,
                                 softmax_scale=scale, max_tree_size=tree)

    # Contiguous K/V per request (prefix then tree), the ancestor mask, and the reference through SDPA.
    slots = (table.long()[:, :, None] * ps + torch.arange(ps, device=h.device)).view(batch, -1)[:, :prefix]
    flat_k, flat_v = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
    kk = torch.cat([flat_k[slots], k.view(batch, tree, hkv, d)], dim=1).transpose(1, 2).contiguous()
    vv = torch.cat([flat_v[slots], v.view(batch, tree, hkv, d)], dim=1).transpose(1, 2).contiguous()
    qq = q.view(batch, tree, hq, d).transpose(1, 2).contiguous()
    ancestors = torch.zeros(tree, tree, dtype=torch.bool)
    for i in range(tree):
        j = i
        while j >= 0:
            ancestors[i, j] = True
            j = parents[j]
    ancestors = ancestors.to(h.device)
    mask = torch.cat([torch.ones(tree, prefix, dtype=torch.bool, device=h.device), ancestors], dim=1)
    sdpa = lambda i: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        qq, kk, vv, attn_mask=mask[None, None], scale=scale, enable_gqa=True)
    want = sdpa(0)
    result = run_specdec(0)
    got = result.out.view(batch, tree, hq, d).transpose(1, 2).float()
    err = (got - want.float()).abs().max().item()
    ok = err <= 2 ** -5 and bool((result.request_status == 0).all())
    specdec_us = h.time_us(run_specdec)
    graph_us = h.graph_us(run_specdec, 1)
    sdpa_us = h.time_us(sdpa)
    if h.cuda:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

            def tree_mask(b, head, q_idx, kv_idx):
                return (kv_idx < prefix) | ancestors[q_idx, (kv_idx - prefix).clamp(min=0)]

            block_mask = create_block_mask(tree_mask, None, None, tree, prefix + tree, device=h.device)
            flex = torch.compile(flex_attention)
            flex_call = lambda i: flex(qq, kk, vv, block_mask=block_mask, scale=scale, enable_gqa=True)  # noqa
            flex_err = (flex_call(0).float() - want.float()).abs().max().item()
            flex_us = h.time_us(flex_call)
            flex_us = flex_us if flex_err <= 2 ** -5 else f"wrong ({flex_err:.3g})"
        except Exception as e:  # a peer's API drift is reported, not fatal
            flex_us = f"failed: {type(e).__name__}"
    else:
        flex_us = "not timed on the CPU"
    try:
        import flashinfer  # noqa: PLC0415 (optional peer)
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device=h.device)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        kv_indptr = torch.arange(0, pages + 1, ppr, dtype=torch.int32, device=h.device)
        last = (prefix + tree - 1) % ps + 1
        wrapper.plan(offsets, kv_indptr, table.view(-1), torch.full((batch,), last, dtype=torch.int32,
                     device=h.device), hq, hkv, d, ps, custom_mask=mask.repeat(batch, 1, 1).view(-1),
                     q_data_type=torch.bfloat16)
        fi_us = h.time_us(lambda i: wrapper.run(q, (k_cache, v_cache)))
    except ImportError:
        fi_us = "not installed"
    except Exception as e:
        fi_us = f"failed: {type(e).__name__}"
    nbytes = batch * prefix * hkv * d * 4 + n * (2 * hq + 2 * hkv) * d * 2
    return specdec_us, graph_us, sdpa_us, flex_us, fi_us, nbytes, ok, err


def peers_greedy(h, bandwidth, quick):
    """greedy_verify against torch argmax plus the comparison. Returns the number of failed checks."""
    failures = 0
    if not h.cuda:
        cases = [(torch.bfloat16, b, 4, 32000) for b in (1, 8)] + [(torch.float32, 4, 4, 4096)]
    else:
        batches, vocabs = ([1, 64], [32000, 128256]) if quick else ([1, 8, 64, 256], [32000, 128256, 151936])
        cases = [(torch.bfloat16, b, 4, v) for v in vocabs for b in batches]
        cases += [(torch.float16, 64, 4, 128256), (torch.float32, 64, 4, 128256)]
    print("| primitive | dtype | B | k | V | specdec (us) | specdec in a CUDA graph (us) | torch argmax+compare (us) "
          "| speedup | MB | specdec GB/s | % of copy BW | check |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, (dtype, batch, k, vocab) in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] greedy {dtype} B={batch} V={vocab}", file=sys.stderr, flush=True)
        specdec_us, graph_us, torch_us, nbytes, ok = bench_greedy(h, dtype, batch, k, vocab)
        gbps = nbytes / (specdec_us * 1e3)
        failures += not ok
        print(f"| greedy_verify | {str(dtype).replace('torch.', '')} | {batch} | {k} | {vocab} | {specdec_us:.2f} "
              f"| {fmt_us(graph_us)} | {torch_us:.2f} | {ratio(torch_us, specdec_us)} | {nbytes / 1e6:.2f} "
              f"| {gbps:.1f} | {100 * gbps / bandwidth:.1f} | {'= torch' if ok else 'MISMATCH'} |")
    return failures


def peers_sampling(h, bandwidth, quick):
    """rejection_verify_chain (with draft rows) against vLLM's algorithm in torch and FlashInfer. Returns the
    number of failed checks."""
    failures = 0
    if not h.cuda:
        cases = [(1, 4, 32000), (8, 4, 8192)]
    elif quick:
        cases = [(b, 4, 128256) for b in (1, 64)]
    else:
        cases = [(b, k, v) for v in (32000, 128256, 151936) for k in (1, 4, 8) for b in (1, 8, 64, 256)]
    print("| primitive | dtype | B | k | V | specdec (us) | specdec in a CUDA graph (us) | torch vLLM algorithm (us) "
          "| FlashInfer + softmax (us) | speedup vs best peer | MB | specdec GB/s | % of copy BW | check |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, (batch, k, vocab) in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] rejection B={batch} k={k} V={vocab}", file=sys.stderr, flush=True)
        specdec_us, graph_us, torch_us, flashinfer_us, nbytes, ok = bench_sampler(h, batch, k, vocab)
        gbps = nbytes / (specdec_us * 1e3)
        failures += not ok
        best = min(torch_us, flashinfer_us) if isinstance(flashinfer_us, float) else torch_us
        print(f"| rejection_verify_chain (q) | bfloat16 | {batch} | {k} | {vocab} | {specdec_us:.2f} "
              f"| {fmt_us(graph_us)} | {torch_us:.2f} | {fmt_us(flashinfer_us)} | {ratio(best, specdec_us)} "
              f"| {nbytes / 1e6:.2f} | {gbps:.1f} | {100 * gbps / bandwidth:.1f} "
              f"| {'well-formed' if ok else 'MALFORMED'} |")
    return failures


def peers_int4(h, bandwidth, quick):
    """int4_gemv against tinygemm, gemlite and a bf16 matmul. Returns the number of failed checks."""
    failures = 0
    group = 128 if h.cuda else 64  # SmolLM2-135M's K = 576 on the CPU: groups of 64
    print(f"| int4_gemv g{group} bf16 | N | K | M | specdec (us) | specdec in a CUDA graph (us) | tinygemm (us) "
          "| gemlite (us) | bf16 matmul (us) | vs tinygemm | vs matmul | MB | specdec GB/s | % of copy BW "
          "| specdec quantize (us) | check |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    if not h.cuda:
        shapes, ms = [(576, 1536), (1536, 576)], (1, 4)
    else:
        shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
        ms = (1, 8) if quick else (1, 2, 4, 8, 16)
    for n, k in shapes:
        for m in ms:
            print(f"int4 N={n} K={k} M={m}", file=sys.stderr, flush=True)
            (specdec_us, graph_us, quantize_us, tiny_us, gemlite_us, matmul_us, nbytes, ok,
             err) = bench_int4(h, n, k, m, group)
            failures += not ok
            gbps = nbytes / (specdec_us * 1e3)
            print(f"| int4_gemv | {n} | {k} | {m} | {specdec_us:.2f} | {fmt_us(graph_us)} | {fmt_us(tiny_us)} "
                  f"| {fmt_us(gemlite_us)} | {matmul_us:.2f} | {ratio(tiny_us, specdec_us)} "
                  f"| {ratio(matmul_us, specdec_us)} | {nbytes / 1e6:.2f} | {gbps:.1f} | {100 * gbps / bandwidth:.1f} "
                  f"| {fmt_us(quantize_us) if quantize_us else '-'} "
                  f"| {'~ dequantized matmul' if ok else f'MISMATCH ({err:.3g})'} |")
    return failures


def peers_attention(h, bandwidth, quick):
    """tree attention against SDPA with a dense mask, FlexAttention and FlashInfer. Returns the number of failed
    checks."""
    failures = 0
    heads = (32, 8, 128) if h.cuda else (9, 3, 64)  # Llama-3-8B on the GPU; SmolLM2-135M on the CPU
    print(f"| tree_attention bf16 ({heads[0]} q, {heads[1]} kv, D {heads[2]}) | B | L | T | specdec (us) "
          "| specdec in a CUDA graph (us) | SDPA dense mask (us) | FlexAttention (us) | FlashInfer custom mask (us) "
          "| vs SDPA | vs Flex | MB | specdec GB/s | % of copy BW | check |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    if not h.cuda:
        cases = [(1, 256, 16), (4, 512, 8)]
    elif quick:
        cases = [(1, 8192, 16), (16, 8192, 1), (16, 8192, 64)]
    else:
        cases = [(b, length, t) for b in (1, 16, 64) for length in (1024, 8192, 32768) for t in (1, 8, 16, 64)]
    for batch, prefix, tree in cases:
        print(f"tree attention B={batch} L={prefix} T={tree}", file=sys.stderr, flush=True)
        try:
            (specdec_us, graph_us, sdpa_us, flex_us, fi_us, nbytes, ok,
             err) = bench_tree_attention(h, batch, prefix, tree, heads)
        except torch.cuda.OutOfMemoryError:
            print(f"| tree_attention | {batch} | {prefix} | {tree} | out of memory for the peers' dense inputs |")
            torch.cuda.empty_cache()
            continue
        failures += not ok
        gbps = nbytes / (specdec_us * 1e3)
        print(f"| tree_attention | {batch} | {prefix} | {tree} | {specdec_us:.2f} | {fmt_us(graph_us)} "
              f"| {sdpa_us:.2f} | {fmt_us(flex_us)} | {fmt_us(fi_us)} | {ratio(sdpa_us, specdec_us)} "
              f"| {ratio(flex_us, specdec_us)} | {nbytes / 1e6:.2f} | {gbps:.1f} | {100 * gbps / bandwidth:.1f} "
              f"| {'~ SDPA' if ok else f'MISMATCH ({err:.3g})'} |")
        if h.cuda:
            torch.cuda.empty_cache()
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--family", action="append", choices=list(FAMILIES),
                        help="one family to time (repeatable; every family when none is named)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("peers: no CUDA device (pass --device cpu to run the harness on the CPU backend)", file=sys.stderr)
        return 2
    seed = int.from_bytes(os.urandom(4), "little")
    h = Harness(args.device, seed)
    bandwidth = copy_bandwidth_gbps(h)
    where = torch.cuda.get_device_name(h.device) if h.cuda else "CPU (wall clock; not the GPU's figures)"
    print("## specdec vs peers (PyTorch, same process, same inputs)")
    print()
    print(f"- device: {where}; torch {torch.__version__}; CUDA {torch.version.cuda}")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} (UTC); specdec {sk.version()} through "
          f"specdec_kernels; commit {os.environ.get('SPECDEC_COMMIT', 'unknown')}; input seed {seed}")
    print(f"- measured copy bandwidth (read + write): {bandwidth:.1f} GB/s")
    failures = 0
    for family in dict.fromkeys(args.family or FAMILIES):  # each named family once, in the order named
        print()
        failures += FAMILIES[family](h, bandwidth, args.quick)
    return 1 if failures else 0


# The families as --family names them, in the order they run.
FAMILIES = {"greedy": peers_greedy, "sampling": peers_sampling, "int4": peers_int4, "attention": peers_attention}

if __name__ == "__main__":
    sys.exit(main())
