"""The C ABI of libspecdec, loaded with cffi from the header cbindgen generates (include/specdec.h).

No signature is written by hand: the header is the one the library was built with (the wheel carries both), and
cffi parses its declarations. The header's preprocessor lines are dropped first (cffi parses declarations, not
directives), keeping the integer constants. Calls release the GIL (cffi's ABI mode does for every call).
"""
import importlib.util
import os
import re
import threading

import cffi

_HERE = os.path.dirname(os.path.abspath(__file__))
_INTEGER_DEFINE = re.compile(r"#define\s+\w+\s+\d+\s*$")


def declarations(header_text):
    """The header's declarations as cffi's `cdef` takes them: directives dropped, C++-only lines skipped,
    `#define NAME <integer>` kept."""
    kept = []
    in_cplusplus_block = False
    for line in header_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#ifdef __cplusplus"):
            in_cplusplus_block = True
            continue
        if in_cplusplus_block:
            in_cplusplus_block = not stripped.startswith("#endif")
            continue
        if stripped.startswith("#") and not _INTEGER_DEFINE.match(stripped):
            continue
        kept.append(line)
    return "\n".join(kept)


def _library_path():
    override = os.environ.get("SPECDEC_KERNELS_LIBRARY")
    if override:
        return override
    spec = importlib.util.find_spec("specdec_kernels._libspecdec")
    if spec is None or spec.origin is None:
        raise ImportError(
            "specdec_kernels: the compiled library (_libspecdec) is missing; install the package with "
            "`pip install ./python` from a clone of specdec, which builds it with cargo"
        )
    return spec.origin


ffi = cffi.FFI()
with open(os.path.join(_HERE, "specdec.h"), encoding="utf-8") as header:
    ffi.cdef(declarations(header.read()))
lib = ffi.dlopen(_library_path())

if lib.specdec_version() != lib.SPECDEC_VERSION:
    raise ImportError(
        f"specdec_kernels: the library is version {ffi.string(lib.specdec_version_string()).decode()} but its "
        f"header is {lib.SPECDEC_VERSION}; reinstall the package"
    )


class SpecdecError(RuntimeError):
    """A call of the library failed. `status` is the library's status name (e.g. `SPECDEC_CUDA_ERROR`) and the
    message is the library's own (`specdec_last_error`), which names the offending argument."""

    def __init__(self, status, message):
        super().__init__(f"{status}: {message}")
        self.status = status


class InvalidArgumentError(SpecdecError, ValueError):
    """SPECDEC_INVALID_ARGUMENT: an argument the library rejected; the message names it."""


def check(status, function):
    """Raises for a status other than SPECDEC_OK, with the library's message of this thread's last call."""
    if status == lib.SPECDEC_OK:
        return
    name = ffi.string(lib.specdec_status_string(status)).decode()
    message = ffi.string(lib.specdec_last_error()).decode() or "(no message)"
    error = InvalidArgumentError if status == lib.SPECDEC_INVALID_ARGUMENT else SpecdecError
    raise error(name, f"{function}: {message}")


def request_status_name(code):
    """The name of a per-request status code, e.g. `SPECDEC_REQUEST_DRAFT_TOKEN`."""
    return ffi.string(lib.specdec_request_status_string(int(code))).decode()


_contexts = {}
_contexts_lock = threading.Lock()


def context(device_type, index):
    """The process's context for the CPU (`"cpu"`) or a CUDA device (`"cuda"`, ordinal), created on first use
    and kept for the process's lifetime (contexts are thread-safe and cheap to keep)."""
    key = (device_type, index)
    ctx = _contexts.get(key)
    if ctx is not None:
        return ctx
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            out = ffi.new("specdec_context **")
            if device_type == "cpu":
                check(lib.specdec_context_create_cpu(out), "specdec_context_create_cpu")
            else:
                check(lib.specdec_context_create_cuda(index, out), "specdec_context_create_cuda")
            ctx = out[0]
            _contexts[key] = ctx
        return ctx
