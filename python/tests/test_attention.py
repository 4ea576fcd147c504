"""Tree attention and KV compaction through the package, against a reference written here in torch (f64 from the
same rounded inputs): the cache rows it appends (RoPE applied by the documented rule), each node's attention
to its prefix, ancestors and itself, and compaction moving accepted paths; numpy and torch agree bit for bit."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

import specdec_kernels as sk


def make_batch(rng, dtype, prefix_lens, tree_parents, q_heads, kv_heads, head_dim, page_size, max_position=None):
    """Random q, k, v and a paged cache holding random prefixes; pages handed out in a shuffled order."""
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    num_requests = len(prefix_lens)
    sizes = [len(p) for p in tree_parents]
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(sizes)]), dtype=torch.int32)
    tokens = int(offsets[-1])
    pages_per_request = max(math.ceil((prefix_lens[b] + sizes[b]) / page_size) for b in range(num_requests))
    num_pages = num_requests * pages_per_request + 1
    order = torch.from_numpy(rng.permutation(num_pages)[: num_requests * pages_per_request].astype(np.int32))
    page_table = order.reshape(num_requests, pages_per_request).contiguous()
    shape = (num_pages, page_size, kv_heads, head_dim)
    batch = dict(
        q=torch.randn(tokens, q_heads, head_dim, generator=generator).to(dtype),
        k=torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype),
        v=torch.randn(tokens, kv_heads, head_dim, generator=generator).to(dtype),
        token_offsets=offsets,
        parents=torch.tensor(np.concatenate(tree_parents), dtype=torch.int32),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        page_table=page_table,
        k_cache=torch.randn(shape, generator=generator).to(dtype),
        v_cache=torch.randn(shape, generator=generator).to(dtype),
    )
    if max_position is not None:
        angles = torch.rand(max_position, head_dim // 2, generator=generator, dtype=torch.float64) * 6.3
        batch["cos_sin_cache"] = torch.cat([angles.cos(), angles.sin()], dim=1).float().contiguous()
    return batch


def slot(batch, b, t):
    page_size = batch["k_cache"].shape[1]
    return int(batch["page_table"][b, t // page_size]), t % page_size


def rotate(x, positions, cos_sin):
    """NeoX RoPE by the documented rule: f32 operations, each rounded (no fused multiply-add), then x's dtype."""
    if cos_sin is None:
        return x
    half = x.shape[-1] // 2
    c = cos_sin[positions, :half][:, None, :]
    s = cos_sin[positions, half:][:, None, :]
    a, b = x[..., :half].float(), x[..., half:].float()
    return torch.cat([a * c - b * s, b * c + a * s], dim=-1).to(x.dtype)


def reference(batch, scale):
    """Expected cache contents after the append, out (f64) and lse per node and head."""
    k_cache, v_cache = batch["k_cache"].clone(), batch["v_cache"].clone()
    offsets, parents = batch["token_offsets"].tolist(), batch["parents"].tolist()
    q_heads, kv_heads = batch["q"].shape[1], batch["k"].shape[1]
    cos_sin = batch.get("cos_sin_cache")
    out = torch.empty(batch["q"].shape, dtype=torch.float64)
    lse = torch.empty(batch["q"].shape[:2], dtype=torch.float64)
    for b in range(len(offsets) - 1):
        start, end, prefix = offsets[b], offsets[b + 1], int(batch["prefix_lens"][b])
        depth = []
        for i in range(end - start):
            p = parents[start + i]
            depth.append(0 if p < 0 else depth[p] + 1)
        positions = torch.tensor([prefix + d for d in depth], dtype=torch.long)
        k_rot = rotate(batch["k"][start:end], positions, cos_sin)
        q_rot = rotate(batch["q"][start:end], positions, cos_sin)
        for i in range(end - start):
            page, row = slot(batch, b, prefix + i)
            k_cache[page, row] = k_rot[i]
            v_cache[page, row] = batch["v"][start + i]
        for i in range(end - start):
            ancestors, node = [], i
            while node >= 0:
                ancestors.append(node)
                node = parents[start + node]
            slots = list(range(prefix)) + [prefix + a for a in sorted(ancestors)]
            keys = torch.stack([k_cache[slot(batch, b, t)] for t in slots]).double()  # [S, Hkv, D]
            values = torch.stack([v_cache[slot(batch, b, t)] for t in slots]).double()
            for h in range(q_heads):
                g = h // (q_heads // kv_heads)
                scores = scale * (keys[:, g, :] @ q_rot[i, h].double())
                weights = torch.softmax(scores, dim=0)
                out[start + i, h] = weights @ values[:, g, :]
                lse[start + i, h] = torch.logsumexp(scores, dim=0)
    return k_cache, v_cache, out, lse


CASES = [
    # prefix lengths, trees (parents), Hq, Hkv, D, page size, RoPE positions
    ([0], [[-1]], 2, 1, 64, 16, None),
    ([5, 40], [[-1, 0, 0, 1], [-1, 0, 1]], 4, 2, 64, 16, 128),
    ([17, 0, 33], [[-1], [-1, 0, 0, 0, 2, 4], [-1, 0]], 6, 2, 128, 32, 96),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_tree_attention_against_reference(rng, dtype, case):
    prefix_lens, trees, hq, hkv, d, page_size, positions = CASES[case]
    batch = make_batch(rng, dtype, prefix_lens, trees, hq, hkv, d, page_size, positions)
    scale = 1 / math.sqrt(d)
    want_k, want_v, want_out, want_lse = reference(batch, scale)
    before = {name: t.clone() for name, t in batch.items()}
    result = sk.tree_attention(**batch)
    assert result.request_status.tolist() == [0] * len(prefix_lens)
    # The append writes the rotated keys (the exact rule) and the values; nothing else in the cache changes.
    torch.testing.assert_close(batch["k_cache"], want_k, rtol=0, atol=0)
    torch.testing.assert_close(batch["v_cache"], want_v, rtol=0, atol=0)
    # Outputs: the reference from the same rounded inputs in f64; the kernel's f32 scores and one rounding to
    # the element type (2^-8 relative for bf16) bound the difference.
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (result.out.double() - want_out).abs()
    assert torch.all(err <= unit * want_out.abs() + 8 * unit * batch["v"].double().abs().max()), err.max()
    torch.testing.assert_close(result.lse.double(), want_lse, rtol=1e-5, atol=1e-4)
    # Inputs are not written.
    for name in ("q", "k", "v", "token_offsets", "parents", "prefix_lens", "page_table"):
        assert torch.equal(batch[name], before[name]), name


def numpy_of(t):
    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def test_numpy_and_torch_give_the_same_bits(rng):
    batch = make_batch(rng, torch.bfloat16, [9, 3], [[-1, 0, 0], [-1, 0]], 4, 1, 64, 16, 64)
    as_numpy = {name: numpy_of(t.clone()) for name, t in batch.items()}
    from_torch = sk.tree_attention(**batch)
    from_numpy = sk.tree_attention(**as_numpy)
    np.testing.assert_array_equal(numpy_of(from_torch.out), from_numpy.out)
    np.testing.assert_array_equal(from_torch.lse.numpy(), from_numpy.lse)
    np.testing.assert_array_equal(numpy_of(batch["k_cache"]), as_numpy["k_cache"])


def test_verify_then_compact_moves_the_accepted_path(rng):
    """A tree verified, its accepted path turned into compaction's paths, then compacted in two layers: the
    accepted nodes' entries sit at prefix + 0, 1, ... afterwards."""
    batch = make_batch(rng, torch.float16, [4, 7], [[-1, 0, 0, 2, 3], [-1, 0, 1]], 2, 2, 64, 16)
    sk.tree_attention(**batch)
    second_k, second_v = batch["k_cache"].clone() * 2, batch["v_cache"].clone() * 2
    caches_k, caches_v = [batch["k_cache"], second_k], [batch["v_cache"], second_v]
    # As the sampler writes them: request 0 accepted nodes 2, 3 (path 0 -> 2 -> 3), request 1 none.
    paths = sk.compaction_paths([2, 0], [[2, 3, -1, -1], [-1, -1, -1, -1]])
    assert paths.offsets.tolist() == [0, 3, 4] and paths.nodes.tolist() == [0, 2, 3, 0]
    before = [c.clone() for c in caches_k + caches_v]
    status = sk.tree_kv_compact(caches_k, caches_v, torch.from_numpy(paths.offsets), torch.from_numpy(paths.nodes),
                                batch["prefix_lens"], batch["page_table"])
    assert status.tolist() == [0, 0]
    for layer, cache in enumerate(caches_k + caches_v):
        old = before[layer]
        for j, node in enumerate([0, 2, 3]):
            assert torch.equal(cache[slot(batch, 0, 4 + j)], old[slot(batch, 0, 4 + node)])
        # Request 1 accepted only its root, already in place: nothing moves.
        assert torch.equal(cache[slot(batch, 1, 7)], old[slot(batch, 1, 7)])


def test_attention_arguments_are_named(rng):
    batch = make_batch(rng, torch.float16, [3], [[-1, 0]], 2, 1, 64, 16)
    with pytest.raises(TypeError, match=r"^k: dtype bfloat16, expected float16"):
        sk.tree_attention(**{**batch, "k": batch["k"].to(torch.bfloat16)})
    with pytest.raises(ValueError, match=r"^v: shape"):
        sk.tree_attention(**{**batch, "v": batch["v"][:1].contiguous()})
    with pytest.raises(ValueError, match=r"^k_cache: not contiguous"):
        sk.tree_attention(**{**batch, "k_cache": torch.cat([batch["k_cache"], batch["k_cache"]])[::2]})
    with pytest.raises(ValueError, match=r"^page_table: 2 rows, expected 1"):
        sk.tree_attention(**{**batch, "page_table": batch["page_table"].repeat(2, 1)})
    with pytest.raises(ValueError, match=r"^rope_style"):
        sk.tree_attention(**batch, rope_style="llama")
    with pytest.raises(sk.InvalidArgumentError, match=r"max_tree_size"):
        sk.tree_attention(**batch, max_tree_size=65)
    with pytest.raises(ValueError, match=r"^v_caches: 1 layers while k_caches has 2"):
        sk.tree_kv_compact([batch["k_cache"]] * 2, [batch["v_cache"]], torch.tensor([0, 1], dtype=torch.int32),
                           torch.tensor([0], dtype=torch.int32), batch["prefix_lens"], batch["page_table"])
