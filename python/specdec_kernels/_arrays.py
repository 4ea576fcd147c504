"""Arguments checked before anything runs: torch tensors (CPU or CUDA) and numpy arrays (CPU).

The library takes raw pointers and counts and cannot see a tensor's dtype, device, strides or size; those are
checked here, each error naming the argument. What the library can check (offsets, parents, token ranges, row
values, sampling parameters) it checks itself, on every backend, and its message is passed on.
"""
import sys

import numpy as np

from ._ffi import ffi

# The element types the library's arrays use, by the name numpy and torch print.
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int32", "uint32", "int64", "uint64", "uint8", "int8")


# numpy's dtype.name is slow (it formats a string each time); the library's dtypes by lookup instead.
_NUMPY_NAMES = {np.dtype(name): name for name in _DTYPE_NAMES if name != "bfloat16"}


def _torch():
    return sys.modules.get("torch")


_TORCH_NAMES = {}


def _torch_dtype_name(dtype):
    name = _TORCH_NAMES.get(dtype)
    if name is None:
        name = _TORCH_NAMES[dtype] = str(dtype).replace("torch.", "")
    return name


def through_op(primary):
    """Whether a call on torch tensors goes through its torch.library op: while torch.compile (or export)
    traces, and for tensor subclasses (fake, functional) that only the op's fake implementation can take. A
    plain eager call runs the same implementation directly, without the op dispatch's tens of microseconds."""
    torch = _torch()
    return primary.is_torch and (torch.compiler.is_compiling() or type(primary.value) is not torch.Tensor)


class Array:
    """One checked argument: `value` (the tensor or array), `name`, `dtype` (a name such as `"bfloat16"`),
    `shape` and `device` (`("cpu", 0)` or `("cuda", ordinal)`)."""

    __slots__ = ("value", "name", "dtype", "shape", "device", "is_torch")

    def __init__(self, value, name, dtype, shape, device, is_torch):
        self.value = value
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.device = device
        self.is_torch = is_torch

    def pointer(self, c_type="void"):
        """The data as a C pointer (read only when the call runs: a fake tensor being traced has none)."""
        address = self.value.data_ptr() if self.is_torch else self.value.ctypes.data
        return ffi.cast(f"{c_type} *", address)


def _describe(value, name):
    torch = _torch()
    if torch is not None and isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"{name}: {value.layout} layout; specdec takes dense (strided) tensors")
        dtype = _torch_dtype_name(value.dtype)
        device = (value.device.type, value.device.index or 0)
        if device[0] not in ("cpu", "cuda"):
            raise ValueError(f"{name}: on device {value.device}; specdec takes CPU and CUDA tensors")
        if not value.is_contiguous():
            raise ValueError(
                f"{name}: not contiguous (shape {tuple(value.shape)}, strides {value.stride()}); a view such as "
                f"x[:, :V] must be copied first (x[:, :V].contiguous())"
            )
        if value.requires_grad:
            raise ValueError(f"{name}: requires grad; specdec's kernels have no backward (pass x.detach())")
        return Array(value, name, dtype, tuple(value.shape), device, True)
    if isinstance(value, np.ndarray):
        if not value.dtype.isnative:
            raise ValueError(f"{name}: byte order {value.dtype.str!r} is not this machine's; convert with "
                             f".astype({value.dtype.newbyteorder('=').name!r})")
        if not value.flags.c_contiguous:
            raise ValueError(
                f"{name}: not C-contiguous (shape {value.shape}, strides {value.strides}); a view such as "
                f"x[:, :V] must be copied first (np.ascontiguousarray(x[:, :V]))"
            )
        dtype = _NUMPY_NAMES.get(value.dtype) or value.dtype.name
        return Array(value, name, dtype, tuple(value.shape), ("cpu", 0), False)
    raise TypeError(f"{name}: expected a torch.Tensor or a numpy.ndarray, got {type(value).__name__}")


def _dtype_hint(found, allowed):
    if found == "uint16" and "bfloat16" in allowed:
        return (
            " (uint16 is not read as bfloat16 bits: pass a torch.bfloat16 tensor or an ml_dtypes.bfloat16 "
            "array, e.g. x.view(ml_dtypes.bfloat16))"
        )
    if found == "int64" and "int32" in allowed:
        return " (convert with .to(torch.int32) or .astype(np.int32))"
    return ""


def array(value, name, dtypes, ndim=None):
    """Checks one argument: a contiguous tensor or array of one of `dtypes` (names), with `ndim` dimensions."""
    described = _describe(value, name)
    if described.dtype not in dtypes:
        allowed = " or ".join(dtypes)
        raise TypeError(f"{name}: dtype {described.dtype}, expected {allowed}{_dtype_hint(described.dtype, dtypes)}")
    if ndim is not None and len(described.shape) != ndim:
        raise ValueError(f"{name}: {len(described.shape)} dimensions (shape {described.shape}), expected {ndim}")
    return described


def output(value, name):
    """An output this package has just allocated (so nothing to check): its Array."""
    if isinstance(value, np.ndarray):
        return Array(value, name, _NUMPY_NAMES.get(value.dtype) or value.dtype.name, value.shape, ("cpu", 0), False)
    device = (value.device.type, value.device.index or 0)
    return Array(value, name, _torch_dtype_name(value.dtype), tuple(value.shape), device, True)


def optional_array(value, name, dtypes, ndim=None):
    return None if value is None else array(value, name, dtypes, ndim)


def same_device(primary, *others):
    """Every array on `primary`'s device (and the same framework: torch with torch, numpy with numpy)."""
    for other in others:
        if other is None:
            continue
        if other.is_torch != primary.is_torch:
            kinds = ("a torch tensor", "a numpy array")
            raise TypeError(
                f"{other.name}: {kinds[not other.is_torch]} while {primary.name} is {kinds[not primary.is_torch]}; "
                f"pass the same kind for every array"
            )
        if other.device != primary.device:
            raise ValueError(
                f"{other.name}: on {_device_text(other.device)} while {primary.name} is on "
                f"{_device_text(primary.device)}; every array of a call must be on one device"
            )


def _device_text(device):
    return "cpu" if device[0] == "cpu" else f"cuda:{device[1]}"


def expect_shape(arr, shape):
    if arr.shape != tuple(shape):
        raise ValueError(f"{arr.name}: shape {arr.shape}, expected {tuple(shape)}")


def empty(like, shape, dtype):
    """An uninitialised array of `shape` and `dtype` (a name), on `like`'s device and framework."""
    if like.is_torch:
        torch = _torch()
        return torch.empty(shape, dtype=getattr(torch, dtype), device=like.value.device)
    return np.empty(shape, dtype=_numpy_dtype(dtype))


def full(like, shape, dtype, fill):
    if like.is_torch:
        torch = _torch()
        return torch.full(shape, fill, dtype=getattr(torch, dtype), device=like.value.device)
    return np.full(shape, fill, dtype=_numpy_dtype(dtype))


def _numpy_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def per_request(value, name, like, count, dtype, dtypes):
    """A per-request parameter: a Python scalar (the same for every request), a sequence of `count` values, or a
    tensor / array of `count` elements on `like`'s device. Returns a checked Array."""
    if value is None:
        return None
    torch = _torch()
    is_array = isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor))
    if not is_array:
        integral = dtype in ("int32", "int64")
        values = [value] if _is_scalar(value) else value
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"{name}: {value!r}, expected a number, a sequence of numbers or an array")
        values = list(values)
        for v in values:
            if isinstance(v, bool) or not _is_scalar(v) or (integral and not isinstance(v, (int, np.integer))):
                kind = "integers" if integral else "numbers"
                raise TypeError(f"{name}: {v!r} in it, expected {kind}")
        if dtype == "int64":
            values = [int64_bits(v, name) for v in values]
        elif dtype == "int32":
            for v in values:
                if not -(1 << 31) <= int(v) < (1 << 31):
                    raise OverflowError(f"{name}: {v} does not fit in int32")
        if _is_scalar(value):
            value = full(like, (count,), dtype, values[0])
        elif like.is_torch:
            value = torch.tensor(values, dtype=getattr(torch, dtype), device=like.value.device)
        else:
            value = np.asarray(values, dtype=_numpy_dtype(dtype))
    checked = array(value, name, dtypes, ndim=1)
    same_device(like, checked)
    expect_shape(checked, (count,))
    return checked


def _is_scalar(value):
    return isinstance(value, (int, float, np.integer, np.floating))


def int64_bits(value, name):
    """A Python or numpy int in [-2^63, 2^64) as the int64 with the same 64 bits (seeds are uint64 in the C ABI)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: {value!r}, expected an int")
    value = int(value)
    if not -(1 << 63) <= value < (1 << 64):
        raise OverflowError(f"{name}: {value} does not fit in 64 bits")
    return value - (1 << 64) if value >= (1 << 63) else value


def host_offsets(offsets, most_per_request, default_of):
    """An offsets array's values read on the host, to compute the default of `default_of`: 0 first, each request
    0 to `most_per_request` entries. Broken offsets are an error here; passing `default_of` instead lets the
    library flag such a request alone."""
    bounds = offsets.value.tolist()
    if not bounds:
        raise ValueError(f"{offsets.name}: empty; it holds num_requests + 1 offsets (0 first)")
    if bounds[0] != 0:
        raise ValueError(f"{offsets.name}: must start at 0 (pass {default_of} to have broken requests flagged alone)")
    for b in range(len(bounds) - 1):
        if not 0 <= bounds[b + 1] - bounds[b] <= most_per_request:
            raise ValueError(f"{offsets.name}: request {b} spans {bounds[b]}..{bounds[b + 1]}, expected 0 to "
                             f"{most_per_request} entries (pass {default_of} to have it flagged alone)")
    return bounds


def stream_of(primary):
    """The current CUDA stream of the primary array's device (NULL on the CPU)."""
    if primary.device[0] != "cuda":
        return ffi.NULL
    torch = _torch()
    stream = torch.cuda.current_stream(primary.value.device).cuda_stream
    return ffi.cast("void *", stream)
