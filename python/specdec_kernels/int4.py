"""Int4 weights (W4A16, groups of 32, 64 or 128 columns) for a drafter: quantize, pack, GEMV.

The format is byte-exact and documented in `docs/int4-format.md`: `packed` `[N * K / 8]` uint32 (16 x 64 tiles),
`scales` `[K / g, N]` fp16 or bf16, `zeros` `[K / g, N]` uint8 (0..15); weight `(q - z) * s`. Quantization is
round-to-nearest with an asymmetric zero point per group (as EfficientRollout requantizes its int4 self-drafter
after each weight update); the CPU and CUDA backends write the same bytes.
"""
import sys
from typing import Any, NamedTuple

import numpy as np

from . import _arrays, _host
from ._ffi import check, context, ffi, lib

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
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size not in (32, 64, 128):
        raise ValueError(f"group_size: {group_size!r}, expected 32, 64 or 128")
    return int(group_size)


def _scale_name(scale_dtype, default):
    """"float16" or "bfloat16" from a name, a torch dtype or a numpy / ml_dtypes dtype."""
    if scale_dtype is None:
        return default
    torch = sys.modules.get("torch")
    if isinstance(scale_dtype, str):
        name = scale_dtype
    elif torch is not None and isinstance(scale_dtype, torch.dtype):
        name = str(scale_dtype).replace("torch.", "")
    else:
        try:
            name = np.dtype(scale_dtype).name
        except TypeError:
            name = repr(scale_dtype)
    if name not in WEIGHT_DTYPES:
        raise TypeError(f"scale_dtype: {scale_dtype!r}, expected float16 or bfloat16")
    return name


def quantize(weights, group_size=128, scale_dtype=None):
    """Round-to-nearest int4 quantization of `weights` `[n, k]` (fp16 or bf16, row-major: a Linear's weight).

    `n` a multiple of 16, `k` a multiple of 64 and of `group_size`; `scale_dtype` "float16" or "bfloat16"
    (or the torch dtype; default: the weights' dtype). Groups holding NaN or infinities get a NaN scale.
    Returns an Int4Weight on the weights' device; raises TypeError / ValueError naming the argument.
    """
    w = _arrays.array(weights, "weights", WEIGHT_DTYPES, ndim=2)
    group_size = _check_group_size(group_size)
    scale_name = _scale_name(scale_dtype, w.dtype)
    n, k = w.shape
    if _arrays.through_op(w):
        from . import ops

        torch = sys.modules["torch"]
        packed, scales, zeros = ops.ensure_registered().int4_quantize(w.value, group_size, getattr(torch, scale_name))
    else:
        packed, scales, zeros = quantize_call(w, group_size, scale_name)[:3]
    return Int4Weight(packed, scales, zeros, n, k, group_size)


def quantize_call(w, group_size, scale_name):
    """The call itself on checked weights; returns (packed, scales, zeros)."""
    group_size = _check_group_size(group_size)
    scale_name = _scale_name(scale_name, None)
    if len(w.shape) != 2:
        raise ValueError(f"weights: shape {w.shape}, expected [n, k]")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"weights: k = {k} is not a multiple of group_size = {group_size}")
    packed = _arrays.empty(w, (n * k // 8,), "uint32")
    scales = _arrays.empty(w, (k // group_size, n), scale_name)
    zeros = _arrays.empty(w, (k // group_size, n), "uint8")
    p, s, z = _arrays.output(packed, "packed"), _arrays.output(scales, "scales"), _arrays.output(zeros, "zeros")
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
    _host.whole_number(weight.n, "weight.n", 1)
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
    _arrays.same_device(xs, packed, scales, zeros)
    if _arrays.through_op(xs):
        from . import ops

        return ops.ensure_registered().int4_gemv(xs.value, packed.value, scales.value, zeros.value, int(weight.n),
                                                 int(weight.group_size))
    return gemv_call(xs, packed, scales, zeros, weight.n, weight.group_size)


def gemv_call(xs, packed, scales, zeros, n, group_size):
    """The call itself on arrays of the right dtypes, checked here for shapes and device; returns `y`."""
    group_size = _check_group_size(group_size)
    if len(xs.shape) != 2:
        raise ValueError(f"x: shape {xs.shape}, expected [m, k]")
    m, k = xs.shape
    n = _host.whole_number(n, "n", 1)
    if packed.shape != (n * k // 8,) or (n * k) % 8:
        raise ValueError(f"packed: shape {packed.shape}, expected ({n * k // 8},) for n = {n} and x's k = {k}")
    groups = k // group_size
    for arr in (scales, zeros):
        if arr.shape != (groups, n):
            raise ValueError(f"{arr.name}: shape {arr.shape}, expected {(groups, n)} (k / group_size, n)")
    _arrays.same_device(xs, packed, scales, zeros)
    y = _arrays.empty(xs, (m, n), xs.dtype)
    ys = _arrays.output(y, "y")
    check(
        lib.specdec_int4_gemv(
            context(*xs.device), packed.pointer("uint32_t"), scales.pointer(), _DTYPE_CODE[scales.dtype],
            zeros.pointer("uint8_t"), n, k, group_size, xs.pointer(), _DTYPE_CODE[xs.dtype], m, ys.pointer(),
            _arrays.stream_of(xs),
        ),
        "specdec_int4_gemv",
    )
    return y


def pack(weights, scales, zeros, group_size=128):
    """Packs `weights` `[n, k]` (fp16 or bf16) with given `scales` `[k / group_size, n]` (fp16 or bf16) and
    `zeros` `[k / group_size, n]` (uint8, 0..15), from GPTQ, AWQ or another quantizer: codes
    `clamp(round(w / s) + z, 0, 15)` (docs/int4-format.md). Returns an Int4Weight (the scales and zeros are the
    ones given). On the CPU a scale that is not positive and finite, or a zero above 15, is an
    InvalidArgumentError naming the element; a CUDA kernel gives such a group codes 0."""
    w = _arrays.array(weights, "weights", WEIGHT_DTYPES, ndim=2)
    s = _arrays.array(scales, "scales", WEIGHT_DTYPES, ndim=2)
    z = _arrays.array(zeros, "zeros", ("uint8",), ndim=2)
    group_size = _check_group_size(group_size)
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"weights: k = {k} is not a multiple of group_size = {group_size}")
    for arr in (s, z):
        _arrays.expect_shape(arr, (k // group_size, n))
    _arrays.same_device(w, s, z)
    packed = _arrays.empty(w, (n * k // 8,), "uint32")
    check(
        lib.specdec_int4_pack(
            context(*w.device), w.pointer(), _DTYPE_CODE[w.dtype], n, k, group_size, s.pointer(),
            _DTYPE_CODE[s.dtype], z.pointer("uint8_t"), _arrays.output(packed, "packed").pointer("uint32_t"),
            _arrays.stream_of(w),
        ),
        "specdec_int4_pack",
    )
    return Int4Weight(packed, scales, zeros, n, k, group_size)


def _checkpoint_outputs(like, n, k, group_size, scale_dtype):
    packed = _arrays.empty(like, (n * k // 8,), "uint32")
    scales = _arrays.empty(like, (k // group_size, n), scale_dtype)
    zeros = _arrays.empty(like, (k // group_size, n), "uint8")
    return packed, scales, zeros


def _host_only(*arrays):
    for arr in arrays:
        if arr is not None and arr.device[0] != "cpu":
            raise ValueError(f"{arr.name}: on cuda; the checkpoint converters run on the host (pass CPU tensors)")


def from_gptq(qweight, qzeros, scales, group_size=128, g_idx=None, zeros_minus_one=True):
    """A GPTQ layer (AutoGPTQ / GPTQModel / Transformers' `gptq` format) in specdec's format, exactly.

    `qweight` int32 `[k / 8, n]` (packed along k), `qzeros` int32 `[k / group_size, n / 8]` (packed along n),
    `scales` `[k / group_size, n]` fp16 or bf16, `g_idx` int32 `[k]` or None (act-order checkpoints are
    rejected), `zeros_minus_one`: True for AutoGPTQ's stored `z - 1` ("gptq"), False for GPTQModel's
    `gptq_v2`. Host arrays (numpy or CPU tensors). Returns an Int4Weight of the same kind."""
    qw = _arrays.array(qweight, "qweight", ("int32",), ndim=2)
    qz = _arrays.array(qzeros, "qzeros", ("int32",), ndim=2)
    s = _arrays.array(scales, "scales", WEIGHT_DTYPES, ndim=2)
    gi = _arrays.optional_array(g_idx, "g_idx", ("int32",), ndim=1)
    group_size = _check_group_size(group_size)
    _arrays.same_device(qw, qz, s, gi)
    _host_only(qw)
    k, n = qw.shape[0] * 8, qw.shape[1]
    _arrays.expect_shape(qz, (k // group_size, n // 8))
    _arrays.expect_shape(s, (k // group_size, n))
    if gi is not None:
        _arrays.expect_shape(gi, (k,))
    packed, scales_out, zeros_out = _checkpoint_outputs(qw, n, k, group_size, s.dtype)
    check(
        lib.specdec_int4_from_gptq(
            n, k, group_size, qw.pointer("int32_t"), qz.pointer("int32_t"), s.pointer(), _DTYPE_CODE[s.dtype],
            gi.pointer("int32_t") if gi is not None else ffi.NULL, 1 if zeros_minus_one else 0,
            _arrays.output(packed, "packed").pointer("uint32_t"), _arrays.output(scales_out, "scales").pointer(),
            _arrays.output(zeros_out, "zeros").pointer("uint8_t"),
        ),
        "specdec_int4_from_gptq",
    )
    return Int4Weight(packed, scales_out, zeros_out, n, k, group_size)


def from_awq(qweight, qzeros, scales, group_size=128):
    """An AWQ layer (llm-awq, AutoAWQ's GEMM version) in specdec's format, exactly: `qweight` int32
    `[k, n / 8]` and `qzeros` int32 `[k / group_size, n / 8]`, packed along n in AWQ's order
    `[0, 2, 4, 6, 1, 3, 5, 7]`; `scales` `[k / group_size, n]` fp16 or bf16. Host arrays. Returns an
    Int4Weight of the same kind."""
    qw = _arrays.array(qweight, "qweight", ("int32",), ndim=2)
    qz = _arrays.array(qzeros, "qzeros", ("int32",), ndim=2)
    s = _arrays.array(scales, "scales", WEIGHT_DTYPES, ndim=2)
    group_size = _check_group_size(group_size)
    _arrays.same_device(qw, qz, s)
    _host_only(qw)
    k, n = qw.shape[0], qw.shape[1] * 8
    _arrays.expect_shape(qz, (k // group_size, n // 8))
    _arrays.expect_shape(s, (k // group_size, n))
    packed, scales_out, zeros_out = _checkpoint_outputs(qw, n, k, group_size, s.dtype)
    check(
        lib.specdec_int4_from_awq(
            n, k, group_size, qw.pointer("int32_t"), qz.pointer("int32_t"), s.pointer(), _DTYPE_CODE[s.dtype],
            _arrays.output(packed, "packed").pointer("uint32_t"), _arrays.output(scales_out, "scales").pointer(),
            _arrays.output(zeros_out, "zeros").pointer("uint8_t"),
        ),
        "specdec_int4_from_awq",
    )
    return Int4Weight(packed, scales_out, zeros_out, n, k, group_size)
