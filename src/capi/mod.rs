//! The C ABI, declared in `include/specdec.h` (generated from these files by cbindgen; a test fails when the
//! two differ). This file holds what every family shares: versions, statuses, contexts, handles, the panic
//! boundary and the argument checks; each family's functions have a file of their own (`verify`, `drafter`,
//! `policy`, `int4`, `attention`).
//!
//! Conventions: every function returns a [`specdec_status`] (fixed values, only ever appended to); on failure
//! [`specdec_last_error`] gives a message naming the offending argument. Sizes are `int64_t` so that negative
//! values are caught rather than wrapped. A pointer may be null only where the array it points to is empty.
//! Every function runs inside a panic boundary: a bug in specdec is reported as [`specdec_status::SPECDEC_PANIC`],
//! never as an abort of the host process.
#![allow(non_camel_case_types)]
// Built without the `cuda` feature, the CUDA paths are compiled out: their `stream` arguments go
// unused, and every context is a CPU context.
#![cfg_attr(not(feature = "cuda"), allow(unused_variables))]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::RwLock;

use half::{bf16, f16};

use crate::attention::{
    CompactionShape, KvCompaction, PagedCacheShape, RequestStatus, RopeShape, RopeStyle,
    TreeAttentionInputs, TreeAttentionOutputs, TreeAttentionShape,
};
use crate::backend::{Backend, In, Out, Stream};
#[cfg(feature = "cuda")]
use crate::cuda::CudaBackend;
use crate::drafter::{DraftKind, Drafter, DrafterConfig, LengthClasses, Token};
use crate::dtype::{DType, LogitsElement};
use crate::error::{Error, Result};
use crate::greedy::{GreedyInputs, GreedyOutputs, GreedyShape};
use crate::int4::convert::{from_awq, from_gptq, GptqZeros};
use crate::int4::{GemvShape, Int4Gemv, Int4Pack, Int4Quantize, Int4Shape};
use crate::policy::{
    choose_draft_lengths, choose_draft_trees, CostModel, Gpu, ModelShape, Overheads, RequestOutlook,
};
use crate::sampling::{
    Drafts, Rows, RowsKind, SamplingParams, VerifyInputs, VerifyOutputs, VerifyShape,
};

/// Major version of the library this header belongs to.
pub const SPECDEC_VERSION_MAJOR: u32 = 0;
/// Minor version.
pub const SPECDEC_VERSION_MINOR: u32 = 2;
/// Patch version.
pub const SPECDEC_VERSION_PATCH: u32 = 0;
/// MAJOR * 1000000 + MINOR * 1000 + PATCH: what `specdec_version()` returns for this header.
pub const SPECDEC_VERSION: u32 = 2000;

/// A C enum passed as `int32_t`: its values, its C type name and each value's C name.
trait CEnum: Copy + 'static {
    /// The C type, e.g. `"specdec_dtype"`.
    const C_TYPE: &'static str;
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    /// The integer the C side passes.
    fn code(self) -> i32;
    /// The value's C name, e.g. `"SPECDEC_DTYPE_BF16"`.
    fn name(self) -> &'static CStr;
    /// The value of a C code, or `None` for an integer that is not one.
    fn from_code(code: i32) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.code() == code)
    }
}

/// The one table of a C enum: [`CEnum`] from the list of its variants. The list must name every variant once:
/// `name` matches on it, so a variant left out is a compile error (one listed twice, an unreachable-pattern
/// lint), and the names are the identifiers themselves, so they cannot drift from the header. (The enums stay
/// written out in full because cbindgen does not expand macros.)
macro_rules! c_enum_table {
    ($name:ident { $($variant:ident),+ $(,)? }) => {
        impl CEnum for $name {
            const C_TYPE: &'static str = stringify!($name);
            const ALL: &'static [Self] = &[$($name::$variant),+];
            fn code(self) -> i32 {
                self as i32
            }
            fn name(self) -> &'static CStr {
                let name: &'static str = match self {
                    $($name::$variant => concat!(stringify!($variant), "\0")),+
                };
                CStr::from_bytes_with_nul(name.as_bytes()).expect("one NUL, at the end")
            }
        }
    };
}

/// The `argument`'s value as a `E`, or an error listing `E`'s values.
fn enum_arg<E: CEnum>(argument: &str, value: i32) -> Result<E> {
    E::from_code(value).ok_or_else(|| {
        let values: Vec<String> = E::ALL
            .iter()
            .map(|v| format!("{} = {}", v.code(), v.name().to_string_lossy()))
            .collect();
        Error::invalid(
            argument,
            format!("is {value}, not a {} ({})", E::C_TYPE, values.join(", ")),
        )
    })
}

/// The name of a code of `E`, or `unknown` (static storage).
fn enum_name<E: CEnum>(code: i32, unknown: &'static CStr) -> *const c_char {
    E::from_code(code).map_or(unknown, E::name).as_ptr()
}

/// The outcome of a call. Values are fixed and new ones are only ever appended.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_status {
    /// Success.
    SPECDEC_OK = 0,
    /// A null pointer, a negative, zero or overflowing size, an unknown dtype, an array whose contents break
    /// the documented rules, a pointer not aligned for its elements. The message names the argument.
    SPECDEC_INVALID_ARGUMENT = 1,
    /// The library was built without CUDA kernels (no nvcc at build time).
    SPECDEC_KERNELS_NOT_COMPILED = 2,
    /// The CUDA driver library (libcuda) could not be loaded.
    SPECDEC_NO_DRIVER = 3,
    /// No CUDA device with that ordinal.
    SPECDEC_NO_DEVICE = 4,
    /// The device is older than every architecture compiled into the library.
    SPECDEC_UNSUPPORTED_ARCHITECTURE = 5,
    /// A CUDA driver call failed; the message names the call and the CUDA error.
    SPECDEC_CUDA_ERROR = 6,
    /// A bug in specdec was caught at the C boundary; the message says where.
    SPECDEC_PANIC = 7,
}

c_enum_table!(specdec_status {
    SPECDEC_OK,
    SPECDEC_INVALID_ARGUMENT,
    SPECDEC_KERNELS_NOT_COMPILED,
    SPECDEC_NO_DRIVER,
    SPECDEC_NO_DEVICE,
    SPECDEC_UNSUPPORTED_ARCHITECTURE,
    SPECDEC_CUDA_ERROR,
    SPECDEC_PANIC,
});

/// Why a request of a batched call was not processed: the values written to its `request_status[b]` (greedy
/// verification, rejection sampling, tree attention, KV compaction). The same codes on a CPU and a CUDA context;
/// values are fixed and only ever appended to. See the Rust `specdec::RequestStatus`, which documents each rule
/// and the order in which they are checked.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_request_status {
    /// The request was processed.
    SPECDEC_REQUEST_OK = 0,
    /// Its offsets are out of order or range, do not cover the array, or give it too many drafts or nodes.
    SPECDEC_REQUEST_OFFSETS = 1,
    /// A parent breaks the parent rule (or accepted nodes are not strictly increasing in 0..64).
    SPECDEC_REQUEST_PARENTS = 2,
    /// `prefix_lens[b]` is negative, or the prefix and tree do not fit the request's pages.
    SPECDEC_REQUEST_PREFIX_LEN = 3,
    /// A page-table entry the request uses is outside `0..num_pages`.
    SPECDEC_REQUEST_PAGE_TABLE = 4,
    /// A node's RoPE position is at or beyond `max_position`.
    SPECDEC_REQUEST_ROPE_POSITION = 5,
    /// A draft token is outside the vocabulary.
    SPECDEC_REQUEST_DRAFT_TOKEN = 6,
    /// The request's longest path plus one is more than `emit_width`.
    SPECDEC_REQUEST_EMIT_WIDTH = 7,
    /// A temperature, top-k or top-p (target's or drafter's) is out of range.
    SPECDEC_REQUEST_SAMPLING_PARAMS = 8,
    /// A row it reads holds NaN or +inf logits, no finite logit, or bad probabilities.
    SPECDEC_REQUEST_ROW_VALUES = 9,
    /// A drafted token has probability 0 under its draft row.
    SPECDEC_REQUEST_DRAFTED_TOKEN_MASS = 10,
}

c_enum_table!(specdec_request_status {
    SPECDEC_REQUEST_OK,
    SPECDEC_REQUEST_OFFSETS,
    SPECDEC_REQUEST_PARENTS,
    SPECDEC_REQUEST_PREFIX_LEN,
    SPECDEC_REQUEST_PAGE_TABLE,
    SPECDEC_REQUEST_ROPE_POSITION,
    SPECDEC_REQUEST_DRAFT_TOKEN,
    SPECDEC_REQUEST_EMIT_WIDTH,
    SPECDEC_REQUEST_SAMPLING_PARAMS,
    SPECDEC_REQUEST_ROW_VALUES,
    SPECDEC_REQUEST_DRAFTED_TOKEN_MASS,
});

impl From<RequestStatus> for specdec_request_status {
    fn from(status: RequestStatus) -> Self {
        // The codes are one list: RequestStatus's, the kernels' (checked in specdec::status) and this enum's
        // (checked by a test below).
        Self::from_code(status.code()).expect("every RequestStatus has a C value")
    }
}

/// The name of a request status code, e.g. `"SPECDEC_REQUEST_ROW_VALUES"`; `"SPECDEC_REQUEST_UNKNOWN"` for a
/// value that is not one. Static storage: never free it.
#[no_mangle]
pub extern "C" fn specdec_request_status_string(status: i32) -> *const c_char {
    enum_name::<specdec_request_status>(status, c"SPECDEC_REQUEST_UNKNOWN")
}

/// Element type of a logits tensor, passed as `int32_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_dtype {
    /// IEEE binary32.
    SPECDEC_DTYPE_F32 = 0,
    /// IEEE binary16.
    SPECDEC_DTYPE_F16 = 1,
    /// bfloat16.
    SPECDEC_DTYPE_BF16 = 2,
}

c_enum_table!(specdec_dtype {
    SPECDEC_DTYPE_F32,
    SPECDEC_DTYPE_F16,
    SPECDEC_DTYPE_BF16,
});

/// What the rows of a rejection-sampling call hold, passed as `int32_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_rows {
    /// fp32 logits.
    SPECDEC_ROWS_LOGITS_F32 = 0,
    /// fp16 logits.
    SPECDEC_ROWS_LOGITS_F16 = 1,
    /// bf16 logits.
    SPECDEC_ROWS_LOGITS_BF16 = 2,
    /// fp32 probabilities; a row read as a distribution sums to 1 within 1e-3.
    SPECDEC_ROWS_PROBS_F32 = 3,
}

c_enum_table!(specdec_rows {
    SPECDEC_ROWS_LOGITS_F32,
    SPECDEC_ROWS_LOGITS_F16,
    SPECDEC_ROWS_LOGITS_BF16,
    SPECDEC_ROWS_PROBS_F32,
});

/// What `specdec_context_backend` reports.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum specdec_backend {
    /// The CPU reference backend: every pointer is host memory.
    SPECDEC_BACKEND_CPU = 0,
    /// A CUDA device: every array pointer is device memory (or mapped into the device), and work is enqueued on
    /// the stream passed to each call.
    SPECDEC_BACKEND_CUDA = 1,
}

c_enum_table!(specdec_backend {
    SPECDEC_BACKEND_CPU,
    SPECDEC_BACKEND_CUDA,
});

/// An opaque handle: the CPU backend or one CUDA device. Created by `specdec_context_create_cpu` or
/// `specdec_context_create_cuda`, released by `specdec_context_destroy`. A context may be used from several
/// threads at once.
///
/// Handle rules (contexts and drafters). The library keeps a table of its live handles and their types, and
/// checks every handle argument against it: a handle already destroyed (destroying it twice included), a
/// handle of the other type (a context passed as a drafter) or a pointer the library never returned is
/// SPECDEC_INVALID_ARGUMENT, naming the argument; nothing is read through it. What stays undefined: destroying
/// a handle while another thread uses it, and using a destroyed handle's pointer once a later create has
/// returned the same address (the table then sees the new handle).
pub struct specdec_context {
    backend: Backend,
    /// Never zero-sized, even when `Backend` holds only `Cpu` (a build without the `cuda` feature): a boxed
    /// zero-sized value has no address of its own, and the handle table tells handles apart by address.
    _address: u8,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn status_of(error: &Error) -> specdec_status {
    match error {
        Error::InvalidArgument { .. } => specdec_status::SPECDEC_INVALID_ARGUMENT,
        Error::KernelsNotCompiled => specdec_status::SPECDEC_KERNELS_NOT_COMPILED,
        Error::NoDriver => specdec_status::SPECDEC_NO_DRIVER,
        Error::NoDevice { .. } => specdec_status::SPECDEC_NO_DEVICE,
        Error::UnsupportedArchitecture { .. } => specdec_status::SPECDEC_UNSUPPORTED_ARCHITECTURE,
        Error::Cuda { .. } => specdec_status::SPECDEC_CUDA_ERROR,
    }
}

fn set_last_error(message: String) {
    let message = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message);
}

/// The panic boundary every exported function runs in: records the outcome for `specdec_last_error`.
fn boundary(call: impl FnOnce() -> Result<()>) -> specdec_status {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(())) => {
            set_last_error(String::new());
            specdec_status::SPECDEC_OK
        }
        Ok(Err(error)) => {
            set_last_error(error.to_string());
            status_of(&error)
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(format!("internal error in specdec (please report): {what}"));
            specdec_status::SPECDEC_PANIC
        }
    }
}

fn size_arg(argument: &str, value: i64) -> Result<usize> {
    usize::try_from(value)
        .map_err(|_| Error::invalid(argument, format!("is {value}; sizes cannot be negative")))
}

fn dtype_arg(argument: &str, value: i32) -> Result<DType> {
    Ok(match enum_arg::<specdec_dtype>(argument, value)? {
        specdec_dtype::SPECDEC_DTYPE_F32 => DType::F32,
        specdec_dtype::SPECDEC_DTYPE_F16 => DType::F16,
        specdec_dtype::SPECDEC_DTYPE_BF16 => DType::BF16,
    })
}

/// The single value (a scalar output, a settings struct, a handle) at `ptr`: not null and aligned for `T`, as the
/// header promises for every pointer.
fn non_null<'a, T>(argument: &str, ptr: *mut T) -> Result<&'a mut T> {
    if ptr.is_null() {
        return Err(Error::invalid(argument, "is a null pointer"));
    }
    check_host_ptr(argument, ptr as usize, 1, std::mem::align_of::<T>())?;
    // SAFETY: the caller passes a pointer to a live T; it is neither null nor misaligned.
    Ok(unsafe { &mut *ptr })
}

/// A host array of `len` elements at `ptr`: null only if empty, and aligned for `T`.
///
/// # Safety
/// A non-null `ptr` must point to `len` initialised elements that stay valid for `'a`.
unsafe fn host_slice<'a, T>(argument: &str, ptr: *const T, len: usize) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    check_host_ptr(argument, ptr as usize, len, std::mem::align_of::<T>())?;
    check_host_len::<T>(argument, len)?;
    Ok(std::slice::from_raw_parts(ptr, len))
}

/// As [`host_slice`], writable.
///
/// # Safety
/// A non-null `ptr` must point to `len` elements that nothing else accesses for `'a`.
unsafe fn host_slice_mut<'a, T>(argument: &str, ptr: *mut T, len: usize) -> Result<&'a mut [T]> {
    if len == 0 {
        return Ok(&mut []);
    }
    check_host_ptr(argument, ptr as usize, len, std::mem::align_of::<T>())?;
    check_host_len::<T>(argument, len)?;
    Ok(std::slice::from_raw_parts_mut(ptr, len))
}

/// [`host_slice`] of an optional array: `None` for a null pointer.
///
/// # Safety
/// As [`host_slice`].
unsafe fn optional_slice<'a, T>(
    argument: &str,
    ptr: *const T,
    len: usize,
) -> Result<Option<&'a [T]>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        host_slice(argument, ptr, len).map(Some)
    }
}

/// An array of `len` elements at `ptr` in the context's memory: a host slice ([`host_slice`]) on a CPU context,
/// raw device memory on a CUDA context, checked non-null (unless empty) and aligned there too, so that both
/// contexts name a bad pointer alike.
///
/// # Safety
/// As [`host_slice`] on a CPU context; on a CUDA context, as [`crate::cuda::DeviceIn::from_raw`].
unsafe fn array_in<'a, T>(
    backend: &Backend,
    argument: &str,
    ptr: *const T,
    len: usize,
) -> Result<In<'a, T>> {
    match backend {
        Backend::Cpu => host_slice(argument, ptr, len).map(In::Host),
        #[cfg(feature = "cuda")]
        Backend::Cuda(_) => Ok(In::Device(crate::cuda::DeviceIn::from_raw(ptr as u64, len))),
    }
}

/// As [`array_in`], for an array the call writes.
///
/// # Safety
/// As [`host_slice_mut`] on a CPU context; on a CUDA context, as [`crate::cuda::DeviceOut::from_raw`].
unsafe fn array_out<'a, T>(
    backend: &Backend,
    argument: &str,
    ptr: *mut T,
    len: usize,
) -> Result<Out<'a, T>> {
    match backend {
        Backend::Cpu => host_slice_mut(argument, ptr, len).map(Out::Host),
        #[cfg(feature = "cuda")]
        Backend::Cuda(_) => {
            crate::cuda::check_device_ptr(argument, ptr as u64, len, std::mem::align_of::<T>())?;
            Ok(Out::Device(crate::cuda::DeviceOut::from_raw(
                ptr as u64, len,
            )))
        }
    }
}

/// [`array_in`] of an optional array: `None` for a null pointer.
///
/// # Safety
/// As [`array_in`].
unsafe fn optional_in<'a, T>(
    backend: &Backend,
    argument: &str,
    ptr: *const T,
    len: usize,
) -> Result<Option<In<'a, T>>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        array_in(backend, argument, ptr, len).map(Some)
    }
}

/// [`array_out`] of an optional array: `None` for a null pointer.
///
/// # Safety
/// As [`array_out`].
unsafe fn optional_out<'a, T>(
    backend: &Backend,
    argument: &str,
    ptr: *mut T,
    len: usize,
) -> Result<Option<Out<'a, T>>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        array_out(backend, argument, ptr, len).map(Some)
    }
}

/// The caller's `cudaStream_t` / `CUstream` (NULL: the legacy default stream); ignored by a CPU context.
fn stream_arg<'a>(stream: *mut c_void) -> Stream<'a> {
    #[cfg(feature = "cuda")]
    if !stream.is_null() {
        // SAFETY: the C functions' contract: `stream` is a stream of the context's device.
        return unsafe { Stream::from_raw(stream as _) };
    }
    Stream::Default
}

/// No array of `len` elements of `T` can exist if it spans more than `isize::MAX` bytes (Rust's rule for every
/// allocation): such a size is a caller's error, refused before a slice is made.
fn check_host_len<T>(argument: &str, len: usize) -> Result<()> {
    match len.checked_mul(std::mem::size_of::<T>()) {
        Some(bytes) if bytes <= isize::MAX as usize => Ok(()),
        _ => Err(Error::invalid(
            argument,
            format!("holds {len} elements, more than any array can"),
        )),
    }
}

fn check_host_ptr(argument: &str, address: usize, len: usize, align: usize) -> Result<()> {
    if address == 0 {
        return Err(Error::invalid(
            argument,
            format!("is a null pointer but has {len} elements"),
        ));
    }
    if !address.is_multiple_of(align) {
        return Err(Error::invalid(
            argument,
            format!("pointer {address:#x} is not aligned to {align} bytes"),
        ));
    }
    Ok(())
}

/// The types of opaque handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HandleKind {
    Context,
    Drafter,
}

impl HandleKind {
    fn type_name(self) -> &'static str {
        match self {
            HandleKind::Context => "specdec_context",
            HandleKind::Drafter => "specdec_drafter",
        }
    }
}

/// Every live handle's address and type: the tag of the handle rules (see `specdec_context`). Kept apart from
/// the handles, so that checking a destroyed handle reads no freed memory. Held only for one map operation.
static LIVE_HANDLES: RwLock<BTreeMap<usize, HandleKind>> = RwLock::new(BTreeMap::new());

fn live_handles() -> std::sync::RwLockReadGuard<'static, BTreeMap<usize, HandleKind>> {
    LIVE_HANDLES.read().unwrap_or_else(|e| e.into_inner())
}

fn live_handles_mut() -> std::sync::RwLockWriteGuard<'static, BTreeMap<usize, HandleKind>> {
    LIVE_HANDLES.write().unwrap_or_else(|e| e.into_inner())
}

/// The handle table, locked for a `fork` (see `crate::fork_safety`).
pub(crate) fn lock_handles_for_fork() -> Box<dyn std::any::Any> {
    Box::new(live_handles_mut())
}

/// Moves `value` to the heap and records it as a live handle of `kind`.
fn register_handle<T>(kind: HandleKind, value: T) -> *mut T {
    crate::fork_safety::install();
    let ptr = Box::into_raw(Box::new(value));
    live_handles_mut().insert(ptr as usize, kind);
    ptr
}

/// The handle argument `ptr`, checked against the table of live handles to be a live `kind`.
fn live_handle<T>(argument: &str, ptr: *const T, kind: HandleKind) -> Result<*const T> {
    if ptr.is_null() {
        return Err(Error::invalid(argument, "is a null pointer"));
    }
    match live_handles().get(&(ptr as usize)) {
        Some(&live) if live == kind => Ok(ptr),
        found => Err(handle_error(argument, kind, found.copied())),
    }
}

fn handle_error(argument: &str, expected: HandleKind, found: Option<HandleKind>) -> Error {
    let reason = match found {
        Some(other) => format!("is a {}, not a {}", other.type_name(), expected.type_name()),
        None => format!(
            "is not a live {}: destroyed already, or never returned by specdec",
            expected.type_name()
        ),
    };
    Error::invalid(argument, reason)
}

/// Releases the handle `ptr` of `kind` (null: nothing to do), after taking it out of the table of live handles.
///
/// # Safety
/// A pointer the table holds as a live `kind` was made by [`register_handle`] from a `T`.
unsafe fn destroy_handle<T>(argument: &str, ptr: *mut T, kind: HandleKind) -> Result<()> {
    if ptr.is_null() {
        return Ok(());
    }
    {
        let mut live = live_handles_mut();
        match live.get(&(ptr as usize)) {
            Some(&found) if found == kind => live.remove(&(ptr as usize)),
            found => return Err(handle_error(argument, kind, found.copied())),
        };
    }
    drop(Box::from_raw(ptr));
    Ok(())
}

/// The context argument `ctx`, checked to be a live context.
fn context_arg<'a>(ctx: *const specdec_context) -> Result<&'a specdec_context> {
    // SAFETY: live_handle only returns a pointer the registry holds as a live context.
    Ok(unsafe { &*live_handle("ctx", ctx, HandleKind::Context)? })
}

/// The library's version, `MAJOR * 1000000 + MINOR * 1000 + PATCH`; compare with `SPECDEC_VERSION`.
#[no_mangle]
pub extern "C" fn specdec_version() -> u32 {
    SPECDEC_VERSION
}

/// The library's version as text, e.g. `"0.1.0"`. Static storage: never free it.
#[no_mangle]
pub extern "C" fn specdec_version_string() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The name of a status code, e.g. `"SPECDEC_INVALID_ARGUMENT"`; `"SPECDEC_UNKNOWN_STATUS"` for a value that is
/// not one. Static storage: never free it.
#[no_mangle]
pub extern "C" fn specdec_status_string(status: i32) -> *const c_char {
    enum_name::<specdec_status>(status, c"SPECDEC_UNKNOWN_STATUS")
}

/// The message of this thread's last specdec call: empty if it succeeded, otherwise what went wrong, naming the
/// offending argument. Valid until this thread's next specdec call; never free it.
#[no_mangle]
pub extern "C" fn specdec_last_error() -> *const c_char {
    LAST_ERROR.with(|slot| slot.borrow().as_ptr())
}

/// Creates a context for the CPU reference backend in `*out`.
///
/// # Safety
/// `out` must be null (rejected) or point to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn specdec_context_create_cpu(
    out: *mut *mut specdec_context,
) -> specdec_status {
    boundary(|| {
        let out = non_null("out", out)?;
        *out = register_handle(
            HandleKind::Context,
            specdec_context {
                backend: Backend::Cpu,
                _address: 0,
            },
        );
        Ok(())
    })
}

/// Creates a context for CUDA device `device_ordinal` in `*out`, using the device's primary context (the one
/// the CUDA runtime, PyTorch and most engines use), so their device pointers and streams can be passed in.
/// Fails with SPECDEC_KERNELS_NOT_COMPILED, SPECDEC_NO_DRIVER, SPECDEC_NO_DEVICE or
/// SPECDEC_UNSUPPORTED_ARCHITECTURE where CUDA cannot be used. The calling thread's current context is left
/// as it was.
///
/// # Safety
/// `out` must be null (rejected) or point to writable storage for a pointer.
#[no_mangle]
pub unsafe extern "C" fn specdec_context_create_cuda(
    device_ordinal: i32,
    out: *mut *mut specdec_context,
) -> specdec_status {
    boundary(|| {
        let out = non_null("out", out)?;
        let ordinal = usize::try_from(device_ordinal).map_err(|_| {
            Error::invalid(
                "device_ordinal",
                format!("is {device_ordinal}; ordinals are 0 or more"),
            )
        })?;
        #[cfg(feature = "cuda")]
        {
            let backend = CudaBackend::new(ordinal)?;
            *out = register_handle(
                HandleKind::Context,
                specdec_context {
                    backend: Backend::Cuda(backend),
                    _address: 0,
                },
            );
            Ok(())
        }
        // A library built without the `cuda` feature has no kernels.
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (out, ordinal);
            Err(Error::KernelsNotCompiled)
        }
    })
}

/// Releases a context. Null is accepted and ignored. Work already enqueued on a stream is not affected. A
/// context already destroyed, or a pointer that is not a context, is SPECDEC_INVALID_ARGUMENT (see the handle
/// rules at `specdec_context`).
///
/// # Safety
/// `ctx` must be null or a context from `specdec_context_create_*`, used by no other thread during the call.
#[no_mangle]
pub unsafe extern "C" fn specdec_context_destroy(ctx: *mut specdec_context) -> specdec_status {
    boundary(|| destroy_handle("ctx", ctx, HandleKind::Context))
}

/// Reports in `*out_backend` which backend a context runs on: a `specdec_backend` value.
///
/// # Safety
/// `ctx` must be null (rejected) or a live context; `out_backend` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_context_backend(
    ctx: *const specdec_context,
    out_backend: *mut i32,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let out = non_null("out_backend", out_backend)?;
        *out = match ctx.backend {
            Backend::Cpu => specdec_backend::SPECDEC_BACKEND_CPU as i32,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => specdec_backend::SPECDEC_BACKEND_CUDA as i32,
        };
        Ok(())
    })
}

fn half_dtype_arg(argument: &str, value: i32) -> Result<DType> {
    match dtype_arg(argument, value)? {
        DType::F32 => Err(Error::invalid(
            argument,
            "is SPECDEC_DTYPE_F32; int4 weights, scales and activations are fp16 or bf16",
        )),
        dtype => Ok(dtype),
    }
}

/// Calls `$body` with `$t` bound to the Rust type of a 16-bit `DType`.
macro_rules! with_half {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F16 => {
                type $t = f16;
                $body
            }
            _ => {
                type $t = bf16;
                $body
            }
        }
    };
}

// The families, in the header's order: the verification primitives, the kernels' other primitives, then the
// host-side drafter and policies (blank lines keep rustfmt from sorting them).
mod verify;

mod attention;

mod int4;

mod drafter;

mod policy;

pub use attention::*;
pub use drafter::*;
pub use int4::*;
pub use policy::*;
pub use verify::*;

#[cfg(test)]
mod tests {
    use super::*;

    /// Each C enum's table: codes 0, 1, 2... in order, each code back to its value, names as in the header.
    fn check_table<E: CEnum + PartialEq + std::fmt::Debug>(prefix: &str) {
        let header = include_str!("../../include/specdec.h");
        for (i, &value) in E::ALL.iter().enumerate() {
            assert_eq!(value.code(), i as i32, "{}", E::C_TYPE);
            assert_eq!(E::from_code(value.code()), Some(value));
            let name = value.name().to_str().unwrap();
            assert!(name.starts_with(prefix), "{name}");
            assert!(
                header.contains(&format!("  {name} = {i},")),
                "{name} = {i} is not in include/specdec.h"
            );
        }
        assert_eq!(E::from_code(E::ALL.len() as i32), None);
        assert_eq!(E::from_code(-1), None);
        assert!(
            header.contains(&format!("}} {};", E::C_TYPE)),
            "{}",
            E::C_TYPE
        );
    }

    #[test]
    fn every_c_enum_table_is_complete_and_in_the_header() {
        check_table::<specdec_status>("SPECDEC_");
        check_table::<specdec_request_status>("SPECDEC_REQUEST_");
        check_table::<specdec_dtype>("SPECDEC_DTYPE_");
        check_table::<specdec_rows>("SPECDEC_ROWS_");
        check_table::<specdec_backend>("SPECDEC_BACKEND_");
        check_table::<specdec_gpu>("SPECDEC_GPU_");
        check_table::<specdec_model>("SPECDEC_MODEL_");
        check_table::<specdec_draft_kind>("SPECDEC_DRAFT_");
        check_table::<specdec_rope_style>("SPECDEC_ROPE_");
        let message = enum_arg::<specdec_rope_style>("rope_style", 2)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(
                "is 2, not a specdec_rope_style (0 = SPECDEC_ROPE_NEOX, 1 = SPECDEC_ROPE_GPTJ)"
            ),
            "{message}"
        );
    }

    #[test]
    fn request_status_codes_names_and_c_enum_agree() {
        for status in RequestStatus::ALL {
            assert_eq!(specdec_request_status::from(status) as i32, status.code());
            // SAFETY: a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(specdec_request_status_string(status.code())) };
            let expected = format!("SPECDEC_REQUEST_{}", status.name().to_uppercase());
            assert_eq!(name.to_str().unwrap(), expected);
        }
        // SAFETY: as above.
        let unknown = unsafe { CStr::from_ptr(specdec_request_status_string(99)) };
        assert_eq!(unknown.to_str().unwrap(), "SPECDEC_REQUEST_UNKNOWN");
    }

    fn last_error() -> String {
        // SAFETY: the pointer is valid until this thread's next specdec call.
        unsafe { CStr::from_ptr(specdec_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = boundary(|| panic!("boom at the boundary"));
        assert_eq!(status, specdec_status::SPECDEC_PANIC);
        assert!(
            last_error().contains("boom at the boundary"),
            "{}",
            last_error()
        );
        // The next successful call clears the message.
        assert_eq!(boundary(|| Ok(())), specdec_status::SPECDEC_OK);
        assert_eq!(last_error(), "");
    }

    #[test]
    fn every_error_maps_to_its_documented_status() {
        let cases = [
            (
                Error::invalid("x", "bad"),
                specdec_status::SPECDEC_INVALID_ARGUMENT,
            ),
            (
                Error::KernelsNotCompiled,
                specdec_status::SPECDEC_KERNELS_NOT_COMPILED,
            ),
            (Error::NoDriver, specdec_status::SPECDEC_NO_DRIVER),
            (
                Error::NoDevice {
                    ordinal: 1,
                    count: 0,
                },
                specdec_status::SPECDEC_NO_DEVICE,
            ),
            (
                Error::UnsupportedArchitecture {
                    ordinal: 0,
                    compute_capability: 75,
                    compiled: &[80],
                },
                specdec_status::SPECDEC_UNSUPPORTED_ARCHITECTURE,
            ),
            (
                Error::Cuda {
                    call: "cuX",
                    code: 700,
                    name: "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
                },
                specdec_status::SPECDEC_CUDA_ERROR,
            ),
        ];
        for (error, status) in cases {
            let message = error.to_string();
            assert_eq!(boundary(|| Err(error)), status);
            assert_eq!(last_error(), message);
            // SAFETY: static strings.
            let name = unsafe { CStr::from_ptr(specdec_status_string(status as i32)) }
                .to_str()
                .unwrap();
            assert_eq!(name, format!("{status:?}"), "status names match the enum");
        }
    }
}
