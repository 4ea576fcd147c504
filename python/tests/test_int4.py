"""Int4 through the package: numpy and torch write the same bytes; the GEMV equals x times the dequantized
matrix (read back through the GEMV itself with unit rows, so the test does not depend on the tile layout);
every weight is within half a scale of its code."""
import ml_dtypes
import numpy as np
import pytest
import torch

import specdec_kernels as sk


def dequantized(weight, dtype):
    """W[n, k] = (q - z) * s exactly, in f64, as the GEMV sees it: read through the GEMV with unit rows (16 at a
    time, m <= 16), which gives (q - z) * s rounded to the activations' dtype. That is within a relative 2^-8 of
    the product, and |q - z| <= 15, so y / s rounds back to the integer q - z exactly."""
    columns = []
    for start in range(0, weight.k, 16):
        x = torch.zeros(16, weight.k, dtype=dtype)
        for i in range(16):
            x[i, start + i] = 1
        columns.append(sk.int4_gemv(x, weight).double())
    rounded = torch.cat(columns).T  # [n, k]
    scale = weight.scales.double().T.repeat_interleave(weight.group_size, dim=1)
    return torch.round(rounded / scale) * scale, scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k,group_size", [(16, 64, 32), (48, 256, 128), (32, 192, 64)])
def test_quantize_and_gemv(rng, dtype, n, k, group_size):
    w = torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32)).to(dtype)
    weight = sk.int4_quantize(w, group_size=group_size)
    assert weight.packed.shape == (n * k // 8,) and weight.scales.shape == (k // group_size, n)
    # numpy gives the same bytes.
    w_numpy = w.view(torch.uint16).numpy().view(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else w.numpy()
    from_numpy = sk.int4_quantize(w_numpy, group_size=group_size)
    np.testing.assert_array_equal(weight.packed.numpy(), from_numpy.packed)
    np.testing.assert_array_equal(weight.zeros.numpy(), from_numpy.zeros)
    assert weight.zeros.max().item() <= 15
    # docs/int4-format.md, "Error bound": |w - (q - z) s| <= s/2 + 16 max(u s, m) (u the scale type's unit
    # roundoff, m its smallest subnormal spacing).
    w_dq, scale = dequantized(weight, dtype)
    u, spacing = (2.0**-11, 2.0**-24) if dtype == torch.float16 else (2.0**-8, 2.0**-133)
    bound = scale / 2 + 16 * torch.maximum(u * scale, torch.full_like(scale, spacing))
    assert torch.all((w_dq - w.double()).abs() <= bound)
    # The GEMV is x times that matrix; bound (docs/int4-format.md, "GEMV semantics", the looser of the CPU's and
    # the GPU's): one unit in the last place of the output plus 2^-14 sum_k |w_k x_k|.
    for m in (1, 5, 16):
        x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dtype)
        y = sk.int4_gemv(x, weight)
        want = x.double() @ w_dq.T
        ulp = want.abs() * (2 * u) + spacing
        tolerance = ulp + 2.0**-14 * (x.double().abs() @ w_dq.abs().T)
        assert y.dtype == dtype and y.shape == (m, n)
        assert torch.all((y.double() - want).abs() <= tolerance), f"m={m}"


def test_pack_with_the_quantizers_own_scales_gives_its_bytes(rng):
    """docs/int4-format.md: packing with given scales and zeros runs the quantizer's steps 3 and 4 with them."""
    w = torch.from_numpy(rng.standard_normal((32, 256)).astype(np.float32)).to(torch.bfloat16)
    quantized = sk.int4_quantize(w, group_size=64)
    packed = sk.int4_pack(w, quantized.scales, quantized.zeros, group_size=64)
    assert torch.equal(packed.packed, quantized.packed)
    bad_zeros = quantized.zeros.clone()
    bad_zeros[1, 3] = 16
    with pytest.raises(sk.InvalidArgumentError, match="zeros"):
        sk.int4_pack(w, quantized.scales, bad_zeros, group_size=64)


def checkpoint_layer(rng, n, k, group_size):
    q = rng.integers(0, 16, (n, k))
    z = rng.integers(0, 16, (k // group_size, n))
    s = (rng.random((k // group_size, n)) * 0.1 + 0.01).astype(np.float16)
    want = (q - z.T.repeat(group_size, axis=1)) * s.T.astype(np.float64).repeat(group_size, axis=1)
    return q, z, s, want


def pack_nibbles(values, order=range(8)):
    """Eight 4-bit values per int32 along the last axis: value i of each eight goes to nibble position order[i]."""
    values = values.reshape(*values.shape[:-1], -1, 8)
    word = np.zeros(values.shape[:-1], np.uint32)
    for i, nibble in enumerate(order):
        word |= (values[..., i].astype(np.uint32) & 0xF) << (4 * nibble)
    return word.view(np.int32)


@pytest.mark.parametrize("zeros_minus_one", [True, False])
def test_gptq_checkpoint_converts_exactly(rng, zeros_minus_one):
    n, k, g = 32, 256, 128
    q, z, s, want = checkpoint_layer(rng, n, k, g)
    qweight = np.ascontiguousarray(pack_nibbles(q).T)  # [k / 8, n]: bits 4j of qweight[i, n] hold q[n, 8i + j]
    stored = (z - 1) % 16 if zeros_minus_one else z
    qzeros = pack_nibbles(stored)  # [k / g, n / 8]: bits 4j of qzeros[t, c] hold the zero of row 8c + j
    weight = sk.int4_from_gptq(qweight, qzeros, s, group_size=g, zeros_minus_one=zeros_minus_one)
    np.testing.assert_array_equal(weight.zeros, z)
    got, _ = dequantized(Int4FromNumpy(weight), torch.float16)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=0)
    with pytest.raises(sk.InvalidArgumentError, match="g_idx"):  # act-order: features permuted
        sk.int4_from_gptq(qweight, qzeros, s, group_size=g, g_idx=rng.permutation(k).astype(np.int32) // g)


def test_awq_checkpoint_converts_exactly(rng):
    n, k, g = 64, 128, 64
    q, z, s, want = checkpoint_layer(rng, n, k, g)
    awq_order = [0, 2, 4, 6, 1, 3, 5, 7]  # column 8c + order[i] sits in nibble i
    nibble_of_column = [awq_order.index(j) for j in range(8)]
    qweight = pack_nibbles(np.ascontiguousarray(q.T), nibble_of_column)  # [k, n / 8]
    qzeros = pack_nibbles(z, nibble_of_column)  # [k / g, n / 8]
    weight = sk.int4_from_awq(qweight, qzeros, s, group_size=g)
    got, _ = dequantized(Int4FromNumpy(weight), torch.float16)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=0)


def Int4FromNumpy(weight):
    """The same weight with torch tensors (the test reads it through the torch GEMV)."""
    return weight._replace(packed=torch.from_numpy(weight.packed), scales=torch.from_numpy(weight.scales),
                           zeros=torch.from_numpy(weight.zeros))
