"""Int4 weights (W4A16, groups of 32, 64 or 128 columns) for a drafter: quantize, pack, GEMV.

The format is byte-exact and documented in `docs/int4-format.md`: `packed` `[N * K / 8]` uint32 (16 x 64 tiles),
`scales` `[K / g, N]` fp16 or bf16, `zeros` `[K / g, N]` uint8 (0..15); weight `(q - z) * s`. Quantization is
round-to-nearest with an asymmetric zero point per group (as EfficientRollout requantizes its int4 self-drafter
after each weight update); the CPU and CUDA backends write the same bytes.
"""
from typing import Any, NamedTuple

from . import _arrays
from ._ffi import check, context, lib

WEIGHT_DTYPES = ("float16", "bfloat16")
_DTYPE_CODE = {"float32": 0, "float16": 1, "bfloat16": 2}


class Int4Weight(NamedTuple):
    """An int4 matrix `W[n, k]`: `packed` `[n * k / 8]` uint32, `scales` `[k / group_size, n]` fp16 or bf16,
    `zeros` `[k / group_size, n]` uint8, on one device."""

    packed: Any
    scales: Any
    zeros: Any
    n: int
    k: int
    group_size: int


def _check_group_size(group_size):
    if isinstance(group_size, bool) or group_size not in (32, 64, 128):
        raise ValueError(f"group_size: {group_size!r}, expected 32, 64 or 128")


def quantize(weights, group_size=128, scale_dtype=None):
    """Round-to-nearest int4 quantization of `weights` `[n, k]` (fp16 or bf16, row-major: a Linear's weight).

    `n` a multiple of 16, `k` a multiple of 64 and of `group_size`; `scale_dtype` "float16" or "bfloat16"
    (or the torch dtype; default: the weights' dtype). Groups holding NaN or infinities get a NaN scale.
    Returns an Int4Weight on the weights' device; raises TypeError / ValueError naming the argument.
    """
    w = _arrays.array(weights, "weights", WEIGHT_DTYPES, ndim=2)
    _check_group_size(group_size)
    scale_name = w.dtype if scale_dtype is None else str(scale_dtype).replace("torch.", "")
    if scale_name not in WEIGHT_DTYPES:
        raise TypeError(f"scale_dtype: {scale_dtype!r}, expected float16 or bfloat16")
    n, k = w.shape
    if w.is_torch:
        from . import ops

        torch = __import__("torch")
        packed, scales, zeros = ops.ensure_registered().int4_quantize(w.value, group_size, getattr(torch, scale_name))
    else:
        packed, scales, zeros = quantize_call(w, group_size, scale_name)[:3]
    return Int4Weight(packed, scales, zeros, n, k, group_size)


def quantize_call(w, group_size, scale_name):
    """The call itself on checked weights; returns (packed, scales, zeros)."""
    _check_group_size(group_size)
    if len(w.shape) != 2:
        raise ValueError(f"weights: shape {w.shape}, expected [n, k]")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"weights: k = {k} is not a multiple of group_size = {group_size}")
    packed = _arrays.empty(w, (n * k // 8,), "uint32")
    scales = _arrays.empty(w, (k // group_size, n), scale_name)
    zeros = _arrays.empty(w, (k // group_size, n), "uint8")
    p = _arrays.array(packed, "packed", ("uint32",))
    s = _arrays.array(scales, "scales", WEIGHT_DTYPES)
    z = _arrays.array(zeros, "zeros", ("uint8",))
    check(
        lib.specdec_int4_quantize(
            context(*w.device), w.pointer(), _DTYPE_CODE[w.dtype], n, k, group_size, p.pointer("uint32_t"),
            s.pointer(), _DTYPE_CODE[scale_name], z.pointer("uint8_t"), _arrays.stream_of(w),
        ),
        "specdec_int4_quantize",
    )
    return packed, scales, zeros


def _checked_weight(weight):
    if not isinstance(weight, Int4Weight):
        raise TypeError(f"weight: expected an Int4Weight (from quantize or pack), got {type(weight).__name__}")
    _check_group_size(weight.group_size)
    packed = _arrays.array(weight.packed, "weight.packed", ("uint32",), ndim=1)
    scales = _arrays.array(weight.scales, "weight.scales", WEIGHT_DTYPES, ndim=2)
    zeros = _arrays.array(weight.zeros, "weight.zeros", ("uint8",), ndim=2)
    return packed, scales, zeros


def gemv(x, weight):
    """`y[m, n] = x[m, k] W^T` for an int4 `W` (an Int4Weight), `m` from 1 to 16; `x` fp16 or bf16, `y` of
    `x`'s dtype, fp32 accumulation. Returns `y` on `x`'s device."""
    xs = _arrays.array(x, "x", WEIGHT_DTYPES, ndim=2)
    packed, scales, zeros = _checked_weight(weight)
    if xs.shape[1] != weight.k:
        raise ValueError(f"x: shape {xs.shape}, expected (m, {weight.k}): the weight's k")
    if xs.is_torch:
        from . import ops

        return ops.ensure_registered().int4_gemv(xs.value, packed.value, scales.value, zeros.value, weight.n,
                                                 weight.group_size)
    return gemv_call(xs, packed, scales, zeros, weight.n, weight.group_size)


def gemv_call(xs, packed, scales, zeros, n, group_size):
    """The call itself on arrays of the right dtypes, checked here for shapes and device; returns `y`."""
    _check_group_size(group_size)
    if len(xs.shape) != 2:
        raise ValueError(f"x: shape {xs.shape}, expected [m, k]")
    m, k = xs.shape
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: {n!r}, expected a positive int")
    if packed.shape != (n * k // 8,) or (n * k) % 8:
        raise ValueError(f"packed: shape {packed.shape}, expected ({n * k // 8},) for n = {n} and x's k = {k}")
    groups = k // group_size
    for arr in (scales, zeros):
        if arr.shape != (groups, n):
            raise ValueError(f"{arr.name}: shape {arr.shape}, expected {(groups, n)} (k / group_size, n)")
    _arrays.same_device(xs, packed, scales, zeros)
    y = _arrays.empty(xs, (m, n), xs.dtype)
    ys = _arrays.array(y, "y", WEIGHT_DTYPES)
    check(
        lib.specdec_int4_gemv(
            context(*xs.device), packed.pointer("uint32_t"), scales.pointer(), _DTYPE_CODE[scales.dtype],
            zeros.pointer("uint8_t"), n, k, group_size, xs.pointer(), _DTYPE_CODE[xs.dtype], m, ys.pointer(),
            _arrays.stream_of(xs),
        ),
        "specdec_int4_gemv",
    )
    return y
