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
