"""Host-side arguments (the drafter, the policy, the tree converters): Python sequences, numpy arrays or CPU
tensors, turned into C-contiguous numpy arrays of the C type, each error naming the argument."""
import sys

import numpy as np


def host_array(value, name, dtype, ndim=1, accept=()):
    """`value` as a C-contiguous numpy array of `dtype` with `ndim` dimensions. Sequences of Python numbers are
    converted (integers range-checked); arrays and CPU tensors must already be `dtype` or one of `accept`
    (no silent narrowing of an int64 array of token ids)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.device.type != "cpu":
            raise ValueError(f"{name}: on {value.device}; this function runs on the host (pass a CPU tensor)")
        value = value.detach().numpy()
    if isinstance(value, np.ndarray):
        if value.dtype != np.dtype(dtype) and value.dtype.name not in accept:
            hint = " (token ids and parents are int32)" if np.dtype(dtype) == np.int32 else ""
            raise TypeError(f"{name}: dtype {value.dtype.name}, expected {np.dtype(dtype).name}{hint}")
        array = np.ascontiguousarray(value, dtype=dtype)
    else:
        try:
            values = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name}: expected a sequence of numbers ({error})") from None
        if values.dtype == object or values.dtype.kind not in "iufb":
            raise TypeError(f"{name}: expected numbers, got {values.dtype.name} values")
        if np.dtype(dtype).kind in "iu":
            if values.size and values.dtype.kind == "f":
                raise TypeError(f"{name}: expected integers, got floats")
            info = np.iinfo(dtype)
            if values.size and (values.min() < info.min or values.max() > info.max):
                raise OverflowError(f"{name}: a value outside {np.dtype(dtype).name}'s range")
        array = np.ascontiguousarray(values, dtype=dtype)
    if array.ndim != ndim:
        raise ValueError(f"{name}: {array.ndim} dimensions (shape {array.shape}), expected {ndim}")
    return array


def pointer(ffi, array, c_type):
    """A C pointer to a host numpy array (NULL for an empty one)."""
    if array.size == 0:
        return ffi.NULL
    return ffi.cast(f"{c_type} *", array.ctypes.data)


def whole_number(value, name, low=None, high=None):
    """A Python int within [low, high], named in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: {value!r}, expected an int")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else '-inf'}..={high if high is not None else 'inf'}"
        raise ValueError(f"{name}: {value}, expected {bounds}")
    return value
