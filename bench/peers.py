#!/usr/bin/env python3
"""Peer harness: specdec through its C ABI (ctypes) next to PyTorch, in one process, on the same inputs.

Runs on a GPU machine with PyTorch (no Rust needed): loads libspecdec.so, passes torch tensors' data_ptr() and
torch.cuda.current_stream().cuda_stream, checks every specdec result against torch, and times specdec and the
peers with CUDA events (median over batches of calls, inputs rotated over copies larger than the L2 cache).
Prints a markdown table with the copy bandwidth measured in the same run.

    python3 bench/peers.py --lib target/release/libspecdec.so [--quick] [--family greedy|sampling|int4|attention]...

Peers per primitive:
  greedy_verify: torch.argmax over all rows, then compare with the drafts, cumprod for the accepted prefix and
  torch.where for the padded output (what an engine does without a fused kernel).
  rejection_verify (chain, bf16 logits, draft rows, temperature 1): vLLM's algorithm written in torch (softmax of
  target and draft rows in fp32, accept u < p/q, recovered tokens by an exponential race over max(0, p - q),
  bonus by the same race over p), and FlashInfer's chain_speculative_sampling after the softmax it needs, when
  the flashinfer package is importable (its wheel must be carried to the GPU machine).
  int4_gemv (g128, bf16 activations): PyTorch's tinygemm (torch.ops.aten._weight_int4pack_mm, same codes with
  the zero point written as its float zero (8 - z) * s), gemlite when importable, and bf16 torch.matmul on the
  unquantized weights. specdec's weights come from specdec_int4_quantize on the device (timed too).
"""
import argparse
import ctypes
import datetime
import os
import statistics
import sys

import torch

ROTATION_BYTES = 256 << 20
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
STATUS_OK = 0


def load_specdec(path):
    lib = ctypes.CDLL(path)
    c = ctypes
    lib.specdec_version.restype = c.c_uint32
    lib.specdec_last_error.restype = c.c_char_p
    lib.specdec_context_create_cuda.argtypes = [c.c_int32, c.POINTER(c.c_void_p)]
    lib.specdec_context_create_cuda.restype = c.c_int32
    lib.specdec_context_destroy.argtypes = [c.c_void_p]
    lib.specdec_context_destroy.restype = c.c_int32
    lib.specdec_greedy_verify.argtypes = [
        c.c_void_p, c.c_void_p, c.c_int32, c.c_int64, c.c_void_p, c.c_int64, c.c_void_p, c.c_int64, c.c_int64,
        c.c_void_p, c.c_void_p, c.c_void_p,
    ]
    lib.specdec_greedy_verify.restype = c.c_int32
    lib.specdec_rejection_verify_chain.argtypes = [
        c.c_void_p, c.c_int32, c.c_void_p, c.c_void_p, c.c_int64, c.c_void_p, c.c_int64, c.c_void_p, c.c_int64,
        c.POINTER(Sampling), c.c_int64, c.POINTER(VerifyOutputs), c.c_void_p,
    ]
    lib.specdec_rejection_verify_chain.restype = c.c_int32
    lib.specdec_int4_quantize.argtypes = [
        c.c_void_p, c.c_void_p, c.c_int32, c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_void_p, c.c_int32,
        c.c_void_p, c.c_void_p,
    ]
    lib.specdec_int4_quantize.restype = c.c_int32
    lib.specdec_int4_gemv.argtypes = [
        c.c_void_p, c.c_void_p, c.c_void_p, c.c_int32, c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p,
        c.c_int32, c.c_int64, c.c_void_p, c.c_void_p,
    ]
    lib.specdec_int4_gemv.restype = c.c_int32
    lib.specdec_tree_attention.argtypes = [
        c.c_void_p, c.c_int32, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_int64,
        c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_void_p, c.c_int64, c.c_int64, c.c_int64,
        c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_int32, c.c_float, c.c_void_p, c.c_void_p, c.c_void_p,
        c.c_void_p,
    ]
    lib.specdec_tree_attention.restype = c.c_int32
    return lib


class Sampling(ctypes.Structure):
    """specdec_sampling: per-request arrays (device pointers on a CUDA context)."""
    _fields_ = [(name, ctypes.c_void_p) for name in ("temperature", "top_k", "top_p", "seeds", "steps",
                                                          "draft_temperature", "draft_top_k", "draft_top_p")]


class VerifyOutputs(ctypes.Structure):
    """specdec_verify_outputs."""
    _fields_ = [(name, ctypes.c_void_p)
                for name in ("accepted_counts", "emitted_tokens", "accepted_nodes", "accept_flags")]


ROWS_LOGITS_BF16 = 2


def check(lib, status, what):
    if status != STATUS_OK:
        raise RuntimeError(f"{what}: status {status}: {lib.specdec_last_error().decode()}")


def time_us(fn, calls, batches=30, per_batch=10, warmup=10):
    """Median microseconds per call; fn(i) enqueues call i on the current stream."""
    for i in range(warmup):
        fn(i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for b in range(batches):
        start.record()
        for i in range(per_batch):
            fn(warmup + b * per_batch + i)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / per_batch)
    return statistics.median(samples)


def copy_bandwidth_gbps():
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    us = time_us(lambda i: dst.copy_(src), calls=None, batches=10, per_batch=1, warmup=2)
    return 2 * n / (us * 1e3)


def torch_greedy(logits, drafts, batch, k):
    """The peer: argmax of every row, then the accepted prefix and the padded emitted tokens."""
    argmax = logits.argmax(dim=-1).to(torch.int32).view(batch, k + 1)
    matches = argmax[:, :k] == drafts.view(batch, k)
    accepted = matches.to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    positions = torch.arange(k + 1, device=logits.device)
    emitted = torch.where(positions[None, :] <= accepted[:, None], argmax, torch.full_like(argmax, -1))
    return accepted, emitted


def bench_greedy(lib, ctx, dtype, batch, k, vocab, gen):
    rows = batch * (k + 1)
    base = (torch.randn(rows, vocab, device="cuda", dtype=torch.float32, generator=gen) * 4).to(dtype)
    # Every draft is its row's argmax, so every row must be read (same inputs as the Rust main job's shape).
    drafts = base.argmax(dim=-1).to(torch.int32).view(batch, k + 1)[:, :k].contiguous().view(-1)
    offsets = torch.arange(0, (batch + 1) * k, k, dtype=torch.int32, device="cuda")
    copies = max(1, min(4096, -(-ROTATION_BYTES // base.nbytes)))
    rotated = [base.clone() for _ in range(copies)]
    accepted = torch.full((batch,), -7, dtype=torch.int32, device="cuda")
    emitted = torch.full((batch, k + 1), -7, dtype=torch.int32, device="cuda")

    def run_specdec(i):
        logits = rotated[i % copies]
        check(lib, lib.specdec_greedy_verify(
            ctx, logits.data_ptr(), DTYPE_CODE[dtype], vocab, offsets.data_ptr(), batch, drafts.data_ptr(),
            drafts.numel(), k + 1, accepted.data_ptr(), emitted.data_ptr(),
            torch.cuda.current_stream().cuda_stream), "specdec_greedy_verify")

    def run_torch(i):
        torch_greedy(rotated[i % copies], drafts, batch, k)

    run_specdec(0)
    want_accepted, want_emitted = torch_greedy(base, drafts, batch, k)
    torch.cuda.synchronize()
    ok = torch.equal(accepted, want_accepted) and torch.equal(emitted, want_emitted)
    specdec_us = time_us(run_specdec, calls=None)
    torch_us = time_us(run_torch, calls=None)
    nbytes = base.nbytes + 4 * (offsets.numel() + drafts.numel() + accepted.numel() + emitted.numel())
    return specdec_us, torch_us, nbytes, ok


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
    """FlashInfer's chain_speculative_sampling after the softmax it needs (None when not installed)."""
    import flashinfer  # noqa: PLC0415 (optional peer)
    vocab = target.shape[-1]
    p = torch.softmax(target.float(), dim=-1).view(batch, k + 1, vocab)
    q = torch.softmax(draft.float(), dim=-1).view(batch, k, vocab)
    return flashinfer.sampling.chain_speculative_sampling(q, drafts.view(batch, k), p)


def bench_sampler(lib, ctx, batch, k, vocab, gen):
    target = (torch.randn(batch * (k + 1), vocab, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    draft = (target.view(batch, k + 1, vocab)[:, :k].float()
             + torch.randn(batch, k, vocab, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    draft = draft.view(batch * k, vocab).contiguous()
    drafts = torch.multinomial(torch.softmax(draft.float(), dim=-1), 1, generator=gen).to(torch.int32).view(-1)
    offsets = torch.arange(0, (batch + 1) * k, k, dtype=torch.int32, device="cuda")
    temperature = torch.ones(batch, device="cuda")
    seeds = torch.randint(0, 2**62, (batch,), device="cuda", generator=gen, dtype=torch.int64)
    steps = torch.zeros(batch, dtype=torch.int64, device="cuda")
    per_call = target.nbytes + draft.nbytes
    copies = max(1, min(4096, -(-ROTATION_BYTES // per_call)))
    rotated = [(target.clone(), draft.clone()) for _ in range(copies)]
    accepted = torch.full((batch,), -7, dtype=torch.int32, device="cuda")
    emitted = torch.full((batch, k + 1), -7, dtype=torch.int32, device="cuda")
    sampling = Sampling(temperature.data_ptr(), None, None, seeds.data_ptr(), steps.data_ptr())
    outputs = VerifyOutputs(accepted.data_ptr(), emitted.data_ptr(), None, None)

    def run_specdec(i):
        t, d = rotated[i % copies]
        check(lib, lib.specdec_rejection_verify_chain(
            ctx, ROWS_LOGITS_BF16, t.data_ptr(), d.data_ptr(), vocab, offsets.data_ptr(), batch, drafts.data_ptr(),
            drafts.numel(), ctypes.byref(sampling), k + 1, ctypes.byref(outputs),
            torch.cuda.current_stream().cuda_stream), "specdec_rejection_verify_chain")

    def run_torch(i):
        t, d = rotated[i % copies]
        torch_vllm_chain(t, d, drafts, batch, k, gen)

    run_specdec(0)
    torch.cuda.synchronize()
    n = accepted.long()
    positions = torch.arange(k + 1, device="cuda")
    ok = bool(((n >= 0) & (n <= k)).all()) and bool(((emitted >= 0) == (positions[None, :] <= n[:, None])).all())
    ok = ok and bool((emitted[:, :k] == torch.where(positions[None, :k] < n[:, None], drafts.view(batch, k),
                                                     emitted[:, :k])).all())
    specdec_us = time_us(run_specdec, calls=None)
    torch_us = time_us(run_torch, calls=None)
    try:
        flashinfer_chain(target, draft, drafts, batch, k)
        flashinfer_us = time_us(lambda i: flashinfer_chain(*rotated[i % copies], drafts, batch, k), calls=None)
    except ImportError:
        flashinfer_us = "not installed"
    except Exception as e:  # a peer's API drift is reported, not fatal
        flashinfer_us = f"failed: {type(e).__name__}"
    return specdec_us, torch_us, flashinfer_us, target.nbytes + draft.nbytes, ok


def int4_codes(packed, n, k):
    """The codes q[n, k] of specdec's format (docs/int4-format.md), unpacked with torch ops."""
    words = packed.view(n // 16, k // 64, 32, 4)  # (tile row, tile col, lane, word)
    nib = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)  # (..., lane, word, nibble)
    lane = torch.arange(32, device=packed.device)
    word = torch.arange(4, device=packed.device)
    d = torch.arange(4, device=packed.device)
    q = torch.empty(n, k, dtype=torch.int32, device=packed.device)
    for rho in range(2):
        nibble = 4 * (d % 2) + 2 * (d // 2) + rho  # (d,)
        vals = nib[..., nibble]  # (tr, tc, lane, word, d)
        rows = (lane // 4 + 8 * rho)[:, None, None].expand(32, 4, 4)
        cols = (32 * (word // 2)[None, :, None] + 8 * (lane % 4)[:, None, None] + 4 * (word % 2)[None, :, None]
                + d[None, None, :])
        tr, tc = n // 16, k // 64
        full_rows = (torch.arange(tr, device=packed.device)[:, None, None, None, None] * 16 + rows).expand(tr, tc, 32, 4, 4)
        full_cols = (torch.arange(tc, device=packed.device)[None, :, None, None, None] * 64 + cols).expand(tr, tc, 32, 4, 4)
        q[full_rows.reshape(-1), full_cols.reshape(-1)] = vals.reshape(-1)
    return q


def bench_int4(lib, ctx, n, k, m, gen):
    group = 128
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
    x = torch.randn(m, k, device="cuda", generator=gen).to(torch.bfloat16)
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731
    meta = n * (k // group)
    per_copy = n * k // 2 + 3 * meta
    copies = max(1, min(64, -(-ROTATION_BYTES // per_copy)))
    packed = torch.empty(copies, n * k // 8, dtype=torch.int32, device="cuda")
    scales = torch.empty(copies, meta, dtype=torch.bfloat16, device="cuda")
    zeros = torch.empty(copies, meta, dtype=torch.uint8, device="cuda")
    y = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")

    def quantize(c):
        check(lib, lib.specdec_int4_quantize(ctx, w.data_ptr(), 2, n, k, group, packed[c].data_ptr(),
                                             scales[c].data_ptr(), 2, zeros[c].data_ptr(), stream()),
              "specdec_int4_quantize")

    for c in range(copies):
        quantize(c)
    quantize_us = time_us(lambda i: quantize(i % copies), calls=None) if m == 1 else None

    def run_specdec(i):
        c = i % copies
        check(lib, lib.specdec_int4_gemv(ctx, packed[c].data_ptr(), scales[c].data_ptr(), 2, zeros[c].data_ptr(), n,
                                         k, group, x.data_ptr(), 2, m, y.data_ptr(), stream()), "specdec_int4_gemv")

    run_specdec(0)
    q = int4_codes(packed[0], n, k)
    s = scales[0].view(k // group, n).float()
    z = zeros[0].view(k // group, n).float()
    deq = ((q.float().view(n, k // group, group) - z.t()[:, :, None]) * s.t()[:, :, None]).view(n, k)
    want = x.float() @ deq.t()
    torch.cuda.synchronize()
    err = (y.float() - want).abs().max().item()
    ok = err <= 2 ** -7 * want.abs().max().item()
    specdec_us = time_us(run_specdec, calls=None)

    # tinygemm: uint8 [n, k / 2] (even column in the high nibble), scales and float zeros [k / g, n, 2].
    try:
        q_u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
        tiny_w = torch.ops.aten._convert_weight_to_int4pack(q_u8, 8)
        sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16).contiguous()
        tiny = lambda i: torch.ops.aten._weight_int4pack_mm(x, tiny_w, group, sz)  # noqa: E731
        tiny_err = (tiny(0).float() - want).abs().max().item()
        tiny_us = time_us(tiny, calls=None)
        tiny_us = tiny_us if tiny_err <= 2 ** -5 * want.abs().max().item() else f"wrong ({tiny_err:.3g})"
    except Exception as e:  # a peer's API drift is reported, not fatal
        tiny_us = f"failed: {type(e).__name__}"
    try:
        import gemlite  # noqa: PLC0415 (optional peer)
        layer = gemlite.GemLiteLinear(4, group_size=group, in_features=k, out_features=n,
                                      input_dtype=gemlite.DType.BF16, output_dtype=gemlite.DType.BF16)
        layer.pack(q.to(torch.uint8), s.t().contiguous().to(torch.bfloat16), z.t().contiguous().to(torch.bfloat16),
                   bias=None)
        gemlite_us = time_us(lambda i: layer(x), calls=None)
    except ImportError:
        gemlite_us = "not installed"
    except Exception as e:
        gemlite_us = f"failed: {type(e).__name__}"
    dense_copies = max(1, min(16, -(-ROTATION_BYTES // w.nbytes)))
    dense = [w.clone() for _ in range(dense_copies)]
    matmul_us = time_us(lambda i: torch.matmul(x, dense[i % dense_copies].t()), calls=None)
    nbytes = per_copy + 2 * (m * k + m * n)
    return specdec_us, quantize_us, tiny_us, gemlite_us, matmul_us, nbytes, ok, err


def bench_tree_attention(lib, ctx, batch, prefix, tree, gen):
    """specdec's fused tree attention over a paged cache vs SDPA with a dense mask and FlexAttention with a tree
    block mask, both on contiguous K/V gathered beforehand (their best case: the gather is not timed), and
    FlashInfer's custom-mask paged prefill where it is installed. Full binary trees, Llama-3-8B heads."""
    hq, hkv, d, ps = 32, 8, 128, 16
    ppr = -(-(prefix + tree) // ps)
    pages = batch * ppr
    k_cache = torch.randn(pages, ps, hkv, d, device="cuda", generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(pages, ps, hkv, d, device="cuda", generator=gen).to(torch.bfloat16)
    table = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32).view(batch, ppr)
    n = batch * tree
    q = torch.randn(n, hq, d, device="cuda", generator=gen).to(torch.bfloat16)
    k = torch.randn(n, hkv, d, device="cuda", generator=gen).to(torch.bfloat16)
    v = torch.randn(n, hkv, d, device="cuda", generator=gen).to(torch.bfloat16)
    parents = [-1] + [(i - 1) // 2 for i in range(1, tree)]
    parents_t = torch.tensor(parents * batch, dtype=torch.int32, device="cuda")
    offsets = torch.arange(0, n + 1, tree, dtype=torch.int32, device="cuda")
    prefix_lens = torch.full((batch,), prefix, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    status = torch.full((batch,), -9, dtype=torch.int32, device="cuda")
    scale = d ** -0.5
    stream = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731

    def run_specdec(i):
        check(lib, lib.specdec_tree_attention(
            ctx, 2, q.data_ptr(), k.data_ptr(), v.data_ptr(), batch, n, hq, tree, offsets.data_ptr(),
            parents_t.data_ptr(), prefix_lens.data_ptr(), table.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
            pages, ps, hkv, d, ppr, None, 0, 0, scale, out.data_ptr(), None, status.data_ptr(), stream()),
            "specdec_tree_attention")

    # Contiguous K/V per request (prefix then tree), the ancestor mask, and the reference through SDPA.
    slots = (table.long()[:, :, None] * ps + torch.arange(ps, device="cuda")).view(batch, -1)[:, :prefix]
    flat_k = k_cache.view(-1, hkv, d)
    flat_v = v_cache.view(-1, hkv, d)
    kk = torch.cat([flat_k[slots], k.view(batch, tree, hkv, d)], dim=1).transpose(1, 2).contiguous()
    vv = torch.cat([flat_v[slots], v.view(batch, tree, hkv, d)], dim=1).transpose(1, 2).contiguous()
    qq = q.view(batch, tree, hq, d).transpose(1, 2).contiguous()
    ancestors = torch.zeros(tree, tree, dtype=torch.bool)
    for i in range(tree):
        j = i
        while j >= 0:
            ancestors[i, j] = True
            j = parents[j]
    ancestors = ancestors.cuda()
    mask = torch.cat([torch.ones(tree, prefix, dtype=torch.bool, device="cuda"), ancestors], dim=1)
    sdpa = lambda i: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        qq, kk, vv, attn_mask=mask[None, None], scale=scale, enable_gqa=True)
    want = sdpa(0)
    run_specdec(0)
    torch.cuda.synchronize()
    got = out.view(batch, tree, hq, d).transpose(1, 2).float()
    err = (got - want.float()).abs().max().item()
    ok = err <= 2 ** -5 and bool((status == 0).all())
    specdec_us = time_us(run_specdec, calls=None)
    sdpa_us = time_us(sdpa, calls=None)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

        def tree_mask(b, h, q_idx, kv_idx):
            return (kv_idx < prefix) | ancestors[q_idx, (kv_idx - prefix).clamp(min=0)]

        block_mask = create_block_mask(tree_mask, None, None, tree, prefix + tree, device="cuda")
        flex = torch.compile(flex_attention)
        flex_call = lambda i: flex(qq, kk, vv, block_mask=block_mask, scale=scale, enable_gqa=True)  # noqa: E731
        flex_err = (flex_call(0).float() - want.float()).abs().max().item()
        flex_us = time_us(flex_call, calls=None)
        flex_us = flex_us if flex_err <= 2 ** -5 else f"wrong ({flex_err:.3g})"
    except Exception as e:  # a peer's API drift is reported, not fatal
        flex_us = f"failed: {type(e).__name__}"
    try:
        import flashinfer  # noqa: PLC0415 (optional peer)
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        kv_indptr = torch.arange(0, pages + 1, ppr, dtype=torch.int32, device="cuda")
        last = (prefix + tree - 1) % ps + 1
        wrapper.plan(offsets, kv_indptr, table.view(-1), torch.full((batch,), last, dtype=torch.int32,
                     device="cuda"), hq, hkv, d, ps, custom_mask=mask.repeat(batch, 1, 1).view(-1),
                     q_data_type=torch.bfloat16)
        fi = lambda i: wrapper.run(q, (k_cache, v_cache))  # noqa: E731
        fi_us = time_us(fi, calls=None)
    except ImportError:
        fi_us = "not installed"
    except Exception as e:
        fi_us = f"failed: {type(e).__name__}"
    nbytes = batch * prefix * hkv * d * 4 + n * (2 * hq + 2 * hkv) * d * 2
    return specdec_us, sdpa_us, flex_us, fi_us, nbytes, ok, err


def fmt_us(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def peers_greedy(lib, ctx, gen, bandwidth, quick):
    """greedy_verify against torch argmax plus the comparison.

    Returns the number of failed checks.
    """
    failures = 0
    batches, vocabs = ([1, 64], [32000, 128256]) if quick else ([1, 8, 64, 256], [32000, 128256, 151936])
    cases = [(torch.bfloat16, b, 4, v) for v in vocabs for b in batches]
    cases += [(torch.float16, 64, 4, 128256), (torch.float32, 64, 4, 128256)]

    print("| primitive | dtype | B | k | V | specdec (us) | torch argmax+compare (us) | speedup | MB | specdec GB/s "
          "| % of copy BW | check |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, (dtype, batch, k, vocab) in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] greedy {dtype} B={batch} V={vocab}", file=sys.stderr, flush=True)
        specdec_us, torch_us, nbytes, ok = bench_greedy(lib, ctx, dtype, batch, k, vocab, gen)
        gbps = nbytes / (specdec_us * 1e3)
        failures += not ok
        print(f"| greedy_verify | {str(dtype).replace('torch.', '')} | {batch} | {k} | {vocab} | {specdec_us:.2f} "
              f"| {torch_us:.2f} | {torch_us / specdec_us:.2f}x | {nbytes / 1e6:.2f} | {gbps:.1f} "
              f"| {100 * gbps / bandwidth:.1f} | {'= torch' if ok else 'MISMATCH'} |")
    return failures


def peers_sampling(lib, ctx, gen, bandwidth, quick):
    """rejection_verify (chain, with draft rows) against vLLM's algorithm in torch and FlashInfer.

    Returns the number of failed checks.
    """
    failures = 0
    sampler_cases = ([(b, 4, 128256) for b in (1, 64)] if quick else
                     [(b, k, v) for v in (32000, 128256, 151936) for k in (1, 4, 8) for b in (1, 8, 64, 256)])
    print("| primitive | dtype | B | k | V | specdec (us) | torch vLLM algorithm (us) | FlashInfer + softmax (us) "
          "| speedup vs best peer | MB | specdec GB/s | % of copy BW | check |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for i, (batch, k, vocab) in enumerate(sampler_cases):
        print(f"[{i + 1}/{len(sampler_cases)}] rejection B={batch} k={k} V={vocab}", file=sys.stderr, flush=True)
        specdec_us, torch_us, flashinfer_us, nbytes, ok = bench_sampler(lib, ctx, batch, k, vocab, gen)
        gbps = nbytes / (specdec_us * 1e3)
        failures += not ok
        timed = isinstance(flashinfer_us, float)
        best = min(torch_us, flashinfer_us) if timed else torch_us
        fi = f"{flashinfer_us:.2f}" if timed else flashinfer_us
        print(f"| rejection_verify (chain, q) | bfloat16 | {batch} | {k} | {vocab} | {specdec_us:.2f} | {torch_us:.2f} "
              f"| {fi} | {best / specdec_us:.2f}x | {nbytes / 1e6:.2f} | {gbps:.1f} | {100 * gbps / bandwidth:.1f} "
              f"| {'well-formed' if ok else 'MALFORMED'} |")
    return failures


def peers_int4(lib, ctx, gen, bandwidth, quick):
    """int4_gemv against tinygemm, gemlite and a bf16 matmul.

    Returns the number of failed checks.
    """
    failures = 0
    print("| int4_gemv g128 bf16 | N | K | M | specdec (us) | tinygemm (us) | gemlite (us) | bf16 matmul (us) "
          "| vs tinygemm | vs matmul | MB | specdec GB/s | % of copy BW | specdec quantize (us) | check |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    shapes = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)]
    for n, k in shapes:
        for m in ((1, 8) if quick else (1, 2, 4, 8, 16)):
            print(f"int4 N={n} K={k} M={m}", file=sys.stderr, flush=True)
            specdec_us, quantize_us, tiny_us, gemlite_us, matmul_us, nbytes, ok, err = bench_int4(lib, ctx, n, k, m,
                                                                                                  gen)
            failures += not ok
            gbps = nbytes / (specdec_us * 1e3)
            vs_tiny = f"{tiny_us / specdec_us:.2f}x" if isinstance(tiny_us, float) else "-"
            print(f"| int4_gemv | {n} | {k} | {m} | {specdec_us:.2f} | {fmt_us(tiny_us)} | {fmt_us(gemlite_us)} "
                  f"| {matmul_us:.2f} | {vs_tiny} | {matmul_us / specdec_us:.2f}x | {nbytes / 1e6:.2f} | {gbps:.1f} "
                  f"| {100 * gbps / bandwidth:.1f} | {fmt_us(quantize_us) if quantize_us else '-'} "
                  f"| {'~ dequantized matmul' if ok else f'MISMATCH ({err:.3g})'} |")
    return failures


def peers_attention(lib, ctx, gen, bandwidth, quick):
    """tree attention against SDPA with a dense mask, FlexAttention and FlashInfer.

    Returns the number of failed checks.
    """
    failures = 0
    print("| tree_attention bf16 (32 q, 8 kv, D 128) | B | L | T | specdec (us) | SDPA dense mask (us) "
          "| FlexAttention (us) | FlashInfer custom mask (us) | vs SDPA | vs Flex | MB | specdec GB/s | % of copy BW "
          "| check |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    attention_cases = ([(1, 8192, 16), (16, 8192, 1), (16, 8192, 64)] if quick else
                       [(b, l, t) for b in (1, 16, 64) for l in (1024, 8192, 32768) for t in (1, 8, 16, 64)])
    for batch, prefix, tree in attention_cases:
        print(f"tree attention B={batch} L={prefix} T={tree}", file=sys.stderr, flush=True)
        try:
            specdec_us, sdpa_us, flex_us, fi_us, nbytes, ok, err = bench_tree_attention(lib, ctx, batch, prefix, tree,
                                                                                        gen)
        except torch.cuda.OutOfMemoryError:
            print(f"| tree_attention | {batch} | {prefix} | {tree} | out of memory for the peers' dense inputs |")
            torch.cuda.empty_cache()
            continue
        failures += not ok
        gbps = nbytes / (specdec_us * 1e3)
        vs_flex = f"{flex_us / specdec_us:.2f}x" if isinstance(flex_us, float) else "-"
        print(f"| tree_attention | {batch} | {prefix} | {tree} | {specdec_us:.2f} | {sdpa_us:.2f} | {fmt_us(flex_us)} "
              f"| {fmt_us(fi_us)} | {sdpa_us / specdec_us:.2f}x | {vs_flex} | {nbytes / 1e6:.2f} | {gbps:.1f} "
              f"| {100 * gbps / bandwidth:.1f} | {'~ SDPA' if ok else f'MISMATCH ({err:.3g})'} |")
        torch.cuda.empty_cache()
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", default=os.path.join(os.path.dirname(__file__), "libspecdec.so"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--family", action="append", choices=list(FAMILIES),
                        help="one family to time (repeatable; every family when none is named)")
    args = parser.parse_args()
    lib = load_specdec(os.path.abspath(args.lib))
    device = torch.cuda.current_device()
    ctx = ctypes.c_void_p()
    check(lib, lib.specdec_context_create_cuda(device, ctypes.byref(ctx)), "specdec_context_create_cuda")
    gen = torch.Generator(device="cuda")
    seed = int.from_bytes(os.urandom(4), "little")
    gen.manual_seed(seed)

    bandwidth = copy_bandwidth_gbps()
    print("## specdec vs peers (PyTorch, same process, same inputs)")
    print()
    print(f"- gpu: {torch.cuda.get_device_name(device)}; torch {torch.__version__}; CUDA {torch.version.cuda}")
    print(f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d} (UTC); specdec {lib.specdec_version()}"
          f"; commit {os.environ.get('SPECDEC_COMMIT', 'unknown')}; input seed {seed}")
    print(f"- measured copy bandwidth (read + write): {bandwidth:.1f} GB/s")
    failures = 0
    for family in dict.fromkeys(args.family or FAMILIES):  # each named family once, in the order named
        print()
        failures += FAMILIES[family](lib, ctx, gen, bandwidth, args.quick)
    lib.specdec_context_destroy(ctx)
    return 1 if failures else 0


# The families as --family names them, in the order they run.
FAMILIES = {"greedy": peers_greedy, "sampling": peers_sampling, "int4": peers_int4, "attention": peers_attention}

if __name__ == "__main__":
    sys.exit(main())
