//! The C ABI, declared in `include/specdec.h` (generated from this file by cbindgen; a test fails when the two
//! differ).
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
    CompactionShape, PagedCacheShape, RequestStatus, RopeShape, RopeStyle, TreeAttentionShape,
    TreeBatch,
};
#[cfg(feature = "cuda")]
use crate::cuda::attention::{CompactionDevicePtrs, TreeAttentionDevicePtrs};
#[cfg(feature = "cuda")]
use crate::cuda::greedy::GreedyDevicePtrs;
#[cfg(feature = "cuda")]
use crate::cuda::int4::{GemvDevicePtrs, QuantizeDevicePtrs};
#[cfg(feature = "cuda")]
use crate::cuda::sampling::SamplingDevicePtrs;
#[cfg(feature = "cuda")]
use crate::cuda::CudaBackend;
use crate::drafter::{DraftKind, Drafter, DrafterConfig, LengthClasses, Token};
use crate::dtype::{DType, LogitsElement};
use crate::error::{Error, Result};
use crate::greedy::GreedyShape;
use crate::int4::convert::{from_awq, from_gptq, GptqZeros};
use crate::int4::{GemvShape, Int4Shape};
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

impl From<RequestStatus> for specdec_request_status {
    fn from(status: RequestStatus) -> Self {
        use specdec_request_status as C;
        match status {
            RequestStatus::Ok => C::SPECDEC_REQUEST_OK,
            RequestStatus::Offsets => C::SPECDEC_REQUEST_OFFSETS,
            RequestStatus::Parents => C::SPECDEC_REQUEST_PARENTS,
            RequestStatus::PrefixLen => C::SPECDEC_REQUEST_PREFIX_LEN,
            RequestStatus::PageTable => C::SPECDEC_REQUEST_PAGE_TABLE,
            RequestStatus::RopePosition => C::SPECDEC_REQUEST_ROPE_POSITION,
            RequestStatus::DraftToken => C::SPECDEC_REQUEST_DRAFT_TOKEN,
            RequestStatus::EmitWidth => C::SPECDEC_REQUEST_EMIT_WIDTH,
            RequestStatus::SamplingParams => C::SPECDEC_REQUEST_SAMPLING_PARAMS,
            RequestStatus::RowValues => C::SPECDEC_REQUEST_ROW_VALUES,
            RequestStatus::DraftedTokenMass => C::SPECDEC_REQUEST_DRAFTED_TOKEN_MASS,
        }
    }
}

/// The name of a request status code, e.g. `"SPECDEC_REQUEST_ROW_VALUES"`; `"SPECDEC_REQUEST_UNKNOWN"` for a
/// value that is not one. Static storage: never free it.
#[no_mangle]
pub extern "C" fn specdec_request_status_string(status: i32) -> *const c_char {
    let name: &'static CStr = match RequestStatus::from_code(status) {
        Some(RequestStatus::Ok) => c"SPECDEC_REQUEST_OK",
        Some(RequestStatus::Offsets) => c"SPECDEC_REQUEST_OFFSETS",
        Some(RequestStatus::Parents) => c"SPECDEC_REQUEST_PARENTS",
        Some(RequestStatus::PrefixLen) => c"SPECDEC_REQUEST_PREFIX_LEN",
        Some(RequestStatus::PageTable) => c"SPECDEC_REQUEST_PAGE_TABLE",
        Some(RequestStatus::RopePosition) => c"SPECDEC_REQUEST_ROPE_POSITION",
        Some(RequestStatus::DraftToken) => c"SPECDEC_REQUEST_DRAFT_TOKEN",
        Some(RequestStatus::EmitWidth) => c"SPECDEC_REQUEST_EMIT_WIDTH",
        Some(RequestStatus::SamplingParams) => c"SPECDEC_REQUEST_SAMPLING_PARAMS",
        Some(RequestStatus::RowValues) => c"SPECDEC_REQUEST_ROW_VALUES",
        Some(RequestStatus::DraftedTokenMass) => c"SPECDEC_REQUEST_DRAFTED_TOKEN_MASS",
        None => c"SPECDEC_REQUEST_UNKNOWN",
    };
    name.as_ptr()
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

enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(CudaBackend),
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
    match value {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::BF16),
        _ => Err(Error::invalid(
            argument,
            format!("is {value}, not a specdec_dtype (0 = F32, 1 = F16, 2 = BF16)"),
        )),
    }
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

/// [`host_slice_mut`] of an optional array: `None` for a null pointer.
///
/// # Safety
/// As [`host_slice_mut`].
unsafe fn optional_slice_mut<'a, T>(
    argument: &str,
    ptr: *mut T,
    len: usize,
) -> Result<Option<&'a mut [T]>> {
    if ptr.is_null() {
        Ok(None)
    } else {
        host_slice_mut(argument, ptr, len).map(Some)
    }
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
    if address % align != 0 {
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
    let name: &'static CStr = match status {
        0 => c"SPECDEC_OK",
        1 => c"SPECDEC_INVALID_ARGUMENT",
        2 => c"SPECDEC_KERNELS_NOT_COMPILED",
        3 => c"SPECDEC_NO_DRIVER",
        4 => c"SPECDEC_NO_DEVICE",
        5 => c"SPECDEC_UNSUPPORTED_ARCHITECTURE",
        6 => c"SPECDEC_CUDA_ERROR",
        7 => c"SPECDEC_PANIC",
        _ => c"SPECDEC_UNKNOWN_STATUS",
    };
    name.as_ptr()
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

/// Greedy verification of a batch of drafted chains (temperature 0).
///
/// Request `b` drafted `k_b = draft_offsets[b+1] - draft_offsets[b]` tokens, stored at
/// `draft_tokens[draft_offsets[b] ..]`; the offsets cover the drafts (`draft_offsets[0] = 0`,
/// `draft_offsets[num_requests] = num_draft_tokens`). `logits` is `[num_draft_tokens + num_requests, vocab_size]` of
/// `logits_dtype`: rows `draft_offsets[b] + b + j`, `j = 0..k_b`, are request `b`'s target positions (the last one
/// gives the bonus token). With `a_j` the argmax of row `j` (ties to the lowest index), the request accepts its
/// longest draft prefix equal to `a_0, a_1, ...`: `accepted_counts[b]` = that count `n`, and
/// `emitted_tokens[b * emit_width ..]` = `a_0 .. a_n` then -1 up to `emit_width` (which must be at least
/// `k_b + 1` for every request). A request's rows may hold no NaN and no +inf, and need a finite logit.
///
/// `request_status` (NULL, or `[num_requests]`): when given, a request that breaks a rule is flagged alone on
/// either context: its `specdec_request_status` code there, `accepted_counts[b] = -1` and a row of -1; the
/// others are verified and the call returns SPECDEC_OK. When NULL, a CPU context returns
/// SPECDEC_INVALID_ARGUMENT naming the first bad element (writing nothing), and a CUDA kernel still marks the
/// request with -1. On a CPU context every pointer is host memory and `stream` is ignored. On a CUDA context
/// every array is device memory, the work is enqueued on `stream` (a `cudaStream_t` / `CUstream`; NULL is the
/// legacy default stream) and the call returns without waiting.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated above, valid (on a CUDA context: until the
/// work on `stream` has finished), and the output arrays must not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_greedy_verify(
    ctx: *const specdec_context,
    logits: *const c_void,
    logits_dtype: i32,
    vocab_size: i64,
    draft_offsets: *const i32,
    num_requests: i64,
    draft_tokens: *const i32,
    num_draft_tokens: i64,
    emit_width: i64,
    accepted_counts: *mut i32,
    emitted_tokens: *mut i32,
    request_status: *mut i32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let dtype = dtype_arg("logits_dtype", logits_dtype)?;
        let shape = GreedyShape::new(
            size_arg("num_requests", num_requests)?,
            size_arg("vocab_size", vocab_size)?,
            size_arg("num_draft_tokens", num_draft_tokens)?,
            size_arg("emit_width", emit_width)?,
        )?;
        match &ctx.backend {
            Backend::Cpu => {
                let offsets = host_slice("draft_offsets", draft_offsets, shape.num_requests + 1)?;
                let drafts = host_slice("draft_tokens", draft_tokens, shape.num_draft_tokens)?;
                let accepted =
                    host_slice_mut("accepted_counts", accepted_counts, shape.num_requests)?;
                let emitted =
                    host_slice_mut("emitted_tokens", emitted_tokens, shape.emitted_len())?;
                let status =
                    optional_slice_mut("request_status", request_status, shape.num_requests)?;
                fn run<T: LogitsElement>(
                    logits: *const c_void,
                    shape: &GreedyShape,
                    o: &[i32],
                    d: &[i32],
                    a: &mut [i32],
                    e: &mut [i32],
                    s: Option<&mut [i32]>,
                ) -> Result<()> {
                    // SAFETY: the caller's contract on `logits`.
                    let logits =
                        unsafe { host_slice("logits", logits as *const T, shape.logits_len())? };
                    crate::cpu::greedy_verify(
                        logits,
                        shape.vocab_size,
                        o,
                        d,
                        shape.emit_width,
                        a,
                        e,
                        s,
                    )
                }
                let args = (offsets, drafts, accepted, emitted, status);
                let (o, d, a, e, s) = args;
                match dtype {
                    DType::F32 => run::<f32>(logits, &shape, o, d, a, e, s),
                    DType::F16 => run::<f16>(logits, &shape, o, d, a, e, s),
                    DType::BF16 => run::<bf16>(logits, &shape, o, d, a, e, s),
                }
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let ptrs = GreedyDevicePtrs {
                    logits: logits as u64,
                    draft_offsets: draft_offsets as u64,
                    draft_tokens: draft_tokens as u64,
                    accepted_counts: accepted_counts as u64,
                    emitted_tokens: emitted_tokens as u64,
                    request_status: request_status as u64,
                };
                ptrs.check(&shape, dtype)?;
                backend.launch_greedy_verify(stream as _, &shape, dtype, &ptrs)
            }
        }
    })
}

/// Rejection-sampling verification of ragged chains (`specdec_rejection_verify_chain`) or trees
/// (`specdec_rejection_verify_tree`); the semantics, layouts and rules are those of the Rust module
/// `specdec::sampling` (see its documentation and the README).
///
/// * `rows_kind`: a `specdec_rows`. `target` holds `num_draft_tokens + num_requests` rows (chain) or
///   `num_nodes` rows (tree) of `vocab_size`; `draft` (NULL: point-mass drafts) `num_draft_tokens` or
///   `num_nodes` rows of the same kind.
/// * Logits need `temperature[num_requests]` (0 = greedy); `top_k[num_requests]` (-1 = off) and
///   `top_p[num_requests]` (1 = off) may be NULL. Probabilities take none of the three (all NULL).
/// * `seeds[num_requests]`, `steps[num_requests]`: the Philox key and step of each request.
/// * Outputs: `accepted_counts[num_requests]`, `emitted_tokens[num_requests * emit_width]`, and optionally
///   (NULL to skip) `accepted_nodes[num_requests * emit_width]` and `accept_flags[num_requests * emit_width]`.
///
/// With `outputs.request_status`, a request that breaks a rule is flagged alone on either context: its
/// `specdec_request_status`, `accepted_counts[b] = -1` and rows of -1; the others are verified. Without it, a
/// CPU context returns SPECDEC_INVALID_ARGUMENT naming the first bad element, writing no output, and the CUDA
/// kernels still mark a bad request with -1. On a CUDA context every array is device memory and the work is
/// enqueued on `stream` (the call returns without waiting); sizes and pointers are checked on the host.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, valid for the call, and the outputs must
/// not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_rejection_verify_chain(
    ctx: *const specdec_context,
    rows_kind: i32,
    target: *const c_void,
    draft: *const c_void,
    vocab_size: i64,
    draft_offsets: *const i32,
    num_requests: i64,
    draft_tokens: *const i32,
    num_draft_tokens: i64,
    sampling: *const specdec_sampling,
    emit_width: i64,
    outputs: *const specdec_verify_outputs,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let call = RejectionCall {
            ctx,
            rows_kind,
            target,
            draft,
            vocab_size,
            offsets: draft_offsets,
            num_requests,
            tokens: draft_tokens,
            parents: std::ptr::null(),
            num_tokens: num_draft_tokens,
            sampling,
            emit_width,
            outputs,
            stream,
        };
        call.run(false)
    })
}

/// See `specdec_rejection_verify_chain`. Request `b` has nodes `node_offsets[b] .. node_offsets[b+1]` (1 to
/// SPECDEC_MAX_TREE_NODES, node 0 the last accepted token), `node_tokens` and `parents` (`-1` for node 0, else an
/// earlier node) per node: the verification tree of `specdec::tree` (`specdec_draft_to_verify_tree` builds one
/// from a drafter's proposal).
///
/// # Safety
/// As `specdec_rejection_verify_chain`.
#[no_mangle]
pub unsafe extern "C" fn specdec_rejection_verify_tree(
    ctx: *const specdec_context,
    rows_kind: i32,
    target: *const c_void,
    draft: *const c_void,
    vocab_size: i64,
    node_offsets: *const i32,
    num_requests: i64,
    node_tokens: *const i32,
    parents: *const i32,
    num_nodes: i64,
    sampling: *const specdec_sampling,
    emit_width: i64,
    outputs: *const specdec_verify_outputs,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let call = RejectionCall {
            ctx,
            rows_kind,
            target,
            draft,
            vocab_size,
            offsets: node_offsets,
            num_requests,
            tokens: node_tokens,
            parents,
            num_tokens: num_nodes,
            sampling,
            emit_width,
            outputs,
            stream,
        };
        call.run(true)
    })
}

/// The most nodes of one verification tree, its root included (`specdec::tree`): the one bound of the sampler,
/// tree attention, compaction, the policy and the drafter, so that the largest tree any of them makes is scored
/// and verified in one call (tree attention's ancestor sets are 64-bit masks).
pub const SPECDEC_MAX_TREE_NODES: i64 = 64;

/// The most drafts of one verification tree or chain: SPECDEC_MAX_TREE_NODES less the root.
pub const SPECDEC_MAX_DRAFTS: i64 = SPECDEC_MAX_TREE_NODES - 1;

const _: () = assert!(SPECDEC_MAX_TREE_NODES as usize == crate::tree::MAX_TREE_NODES);
const MAX_DRAFTS: usize = crate::tree::MAX_DRAFTS;

/// The verification tree of a drafter's proposal (`specdec_drafter_propose`), as the sampler and tree attention
/// take it: node 0 is `last_token` (the context's last token), node `i + 1` is draft `i`, and each parent is
/// shifted by one (the drafter's -1, "the context's last token", becomes node 0). Writes `num_drafts + 1`
/// entries to `out_tokens` and `out_parents`, and the sampler's `emit_width` for the tree (its depth plus one)
/// to `*out_emit_width`. `num_drafts` is in `0..=SPECDEC_MAX_DRAFTS`; `draft_parents[i]` must be in `-1..i`.
/// Host memory only.
///
/// # Safety
/// `draft_tokens` and `draft_parents` hold `num_drafts` values, `out_tokens` and `out_parents` `num_drafts + 1`;
/// `out_emit_width` is writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_draft_to_verify_tree(
    last_token: i32,
    draft_tokens: *const i32,
    draft_parents: *const i32,
    num_drafts: i64,
    out_tokens: *mut i32,
    out_parents: *mut i32,
    out_emit_width: *mut i64,
) -> specdec_status {
    boundary(|| {
        let n = size_arg("num_drafts", num_drafts)?;
        if n > MAX_DRAFTS {
            return Err(Error::invalid(
                "num_drafts",
                format!("is {n}, above SPECDEC_MAX_DRAFTS ({MAX_DRAFTS})"),
            ));
        }
        let tokens = host_slice("draft_tokens", draft_tokens, n)?;
        let parents = host_slice("draft_parents", draft_parents, n)?;
        let draft = crate::drafter::Draft {
            tokens: tokens
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    u32::try_from(t).map_err(|_| {
                        Error::invalid(
                            format!("draft_tokens[{i}]"),
                            format!("is {t}, not a token id"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            parents: parents.to_vec(),
            ..Default::default()
        };
        let tree =
            crate::tree::VerifyTree::from_draft(last_token, &draft).map_err(|e| match e {
                Error::InvalidArgument { argument, reason } => Error::InvalidArgument {
                    argument: argument.replace("draft.", "draft_"),
                    reason,
                },
                other => other,
            })?;
        // Every output is resolved before any is written: on an error nothing is.
        let width = non_null("out_emit_width", out_emit_width)?;
        let out_tokens = host_slice_mut("out_tokens", out_tokens, n + 1)?;
        let out_parents = host_slice_mut("out_parents", out_parents, n + 1)?;
        out_tokens.copy_from_slice(tree.tokens());
        out_parents.copy_from_slice(tree.parents());
        *width = tree.emit_width() as i64;
        Ok(())
    })
}

/// Compaction's inputs from the sampler's outputs (`specdec::tree::compaction_paths`): `accepted_counts
/// [num_requests]` and `accepted_nodes [num_requests * emit_width]` as `specdec_rejection_verify_*` wrote them
/// (each path without its root, then -1) become `out_offsets [num_requests + 1]` and `out_nodes` (each path with
/// node 0 first, `out_offsets[num_requests]` entries in all, never more than `num_requests * emit_width`), ready
/// for `specdec_tree_kv_compact`. Passing the sampler's rows unchanged would move the first accepted draft onto
/// the root's slot. A flagged request (count -1) is an error: nothing of it may be compacted. Host memory only.
///
/// # Safety
/// `accepted_counts` holds `num_requests` values, `accepted_nodes` and `out_nodes` `num_requests * emit_width`,
/// `out_offsets` `num_requests + 1`.
#[no_mangle]
pub unsafe extern "C" fn specdec_compaction_paths(
    accepted_counts: *const i32,
    accepted_nodes: *const i32,
    num_requests: i64,
    emit_width: i64,
    out_offsets: *mut i32,
    out_nodes: *mut i32,
) -> specdec_status {
    boundary(|| {
        let b = size_arg("num_requests", num_requests)?;
        let width = size_arg("emit_width", emit_width)?;
        let cells = b
            .checked_mul(width)
            .ok_or_else(|| Error::invalid("emit_width", "num_requests * emit_width overflows"))?;
        let counts = host_slice("accepted_counts", accepted_counts, b)?;
        let nodes = host_slice("accepted_nodes", accepted_nodes, cells)?;
        let (offsets, paths) = crate::tree::compaction_paths(counts, nodes, width)?;
        // Every output is resolved before any is written: on an error nothing is.
        let out_offsets = host_slice_mut("out_offsets", out_offsets, b + 1)?;
        let out_nodes = host_slice_mut("out_nodes", out_nodes, cells)?;
        out_offsets.copy_from_slice(&offsets);
        out_nodes[..paths.len()].copy_from_slice(&paths);
        Ok(())
    })
}

/// [`host_slice`] of `seeds` or `steps`, whose absence gets its own reason.
///
/// # Safety
/// As [`host_slice`].
unsafe fn noise_array<'a>(argument: &str, ptr: *const u64, len: usize) -> Result<&'a [u64]> {
    if ptr.is_null() && len > 0 {
        return Err(crate::sampling::missing_noise_array(argument));
    }
    host_slice(argument, ptr, len)
}

/// A seed for sample `sample` of a group sharing `base_seed` (`specdec::sampling::noise::sample_seed`): the same
/// seed and step give the same noise in any batch slot, so several samples of one prompt (a GRPO group) need
/// seeds of their own. Distinct `sample` values give distinct seeds for a fixed `base_seed`.
#[no_mangle]
pub extern "C" fn specdec_sample_seed(base_seed: u64, sample: u64) -> u64 {
    crate::sampling::noise::sample_seed(base_seed, sample)
}

/// Per-request sampling inputs of a rejection-sampling call (each array `[num_requests]`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_sampling {
    /// Logits: required, finite, `>= 0` (0 = greedy). Probabilities: NULL.
    pub temperature: *const f32,
    /// NULL, or -1 (off) or `1..=vocab_size` per request. Probabilities: NULL.
    pub top_k: *const i32,
    /// NULL, or in (0, 1] per request (1 = off). Probabilities: NULL.
    pub top_p: *const f32,
    /// Required: the Philox key of each request. The same seed and step give the same noise in any batch slot:
    /// several samples of one prompt need different seeds (`specdec_sample_seed`).
    pub seeds: *const u64,
    /// Required: each request's step counter, 0 at its first step and advanced every decoding step.
    pub steps: *const u64,
    /// NULL: the draft rows use `temperature`, `top_k` and `top_p`. Else the temperature (positive) the drafter
    /// sampled its drafts with, applied to the draft rows; logits with draft rows only.
    pub draft_temperature: *const f32,
    /// NULL (off), or the drafter's top-k per request (-1 = off); only with `draft_temperature`.
    pub draft_top_k: *const i32,
    /// NULL (off), or the drafter's top-p per request (1 = off); only with `draft_temperature`.
    pub draft_top_p: *const f32,
}

/// The outputs of a rejection-sampling call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_verify_outputs {
    /// `[num_requests]`: accepted drafts.
    pub accepted_counts: *mut i32,
    /// `[num_requests * emit_width]`: accepted tokens, then the correction or bonus token, then -1.
    pub emitted_tokens: *mut i32,
    /// NULL or `[num_requests * emit_width]`: the accepted path's node indices, then -1.
    pub accepted_nodes: *mut i32,
    /// NULL or `[num_requests * emit_width]`: 1 accepted, 0 all children rejected, -1 nothing tried.
    pub accept_flags: *mut i8,
    /// NULL or `[num_requests]`: each request's `specdec_request_status`. When given, a request that breaks a
    /// rule is flagged alone on either context (its status, `accepted_counts[b] = -1`, rows of -1) and the call
    /// returns SPECDEC_OK.
    pub request_status: *mut i32,
}

struct RejectionCall {
    ctx: *const specdec_context,
    rows_kind: i32,
    target: *const c_void,
    draft: *const c_void,
    vocab_size: i64,
    offsets: *const i32,
    num_requests: i64,
    tokens: *const i32,
    parents: *const i32,
    num_tokens: i64,
    sampling: *const specdec_sampling,
    emit_width: i64,
    outputs: *const specdec_verify_outputs,
    /// Read by the CUDA path only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    stream: *mut c_void,
}

impl RejectionCall {
    fn rows_kind(&self) -> Result<RowsKind> {
        Ok(match self.rows_kind {
            0 => RowsKind::LogitsF32,
            1 => RowsKind::LogitsF16,
            2 => RowsKind::LogitsBF16,
            3 => RowsKind::Probs,
            other => {
                return Err(Error::invalid(
                    "rows_kind",
                    format!(
                        "is {other}, not a specdec_rows (0-2 logits F32/F16/BF16, 3 probabilities)"
                    ),
                ))
            }
        })
    }

    /// The CUDA path: device pointers, enqueued on the caller's stream.
    #[cfg(feature = "cuda")]
    fn run_cuda(
        &self,
        backend: &CudaBackend,
        shape: &VerifyShape,
        sampling: &specdec_sampling,
        outputs: &specdec_verify_outputs,
    ) -> Result<()> {
        let ptrs = SamplingDevicePtrs {
            kind: self.rows_kind()?,
            target: self.target as u64,
            draft: self.draft as u64,
            offsets: self.offsets as u64,
            tokens: self.tokens as u64,
            parents: if shape.tree { self.parents as u64 } else { 0 },
            temperature: sampling.temperature as u64,
            top_k: sampling.top_k as u64,
            top_p: sampling.top_p as u64,
            draft_temperature: sampling.draft_temperature as u64,
            draft_top_k: sampling.draft_top_k as u64,
            draft_top_p: sampling.draft_top_p as u64,
            seeds: sampling.seeds as u64,
            steps: sampling.steps as u64,
            accepted: outputs.accepted_counts as u64,
            emitted: outputs.emitted_tokens as u64,
            nodes: outputs.accepted_nodes as u64,
            flags: outputs.accept_flags as u64,
            status: outputs.request_status as u64,
        };
        ptrs.check(shape)?;
        backend.launch_rejection_verify(self.stream as _, shape, &ptrs)
    }

    /// # Safety
    /// The contract of `specdec_rejection_verify_chain`.
    unsafe fn run(self, tree: bool) -> Result<()> {
        let ctx = context_arg(self.ctx)?;
        let sampling = *non_null("sampling", self.sampling as *mut specdec_sampling)?;
        let outputs = *non_null("outputs", self.outputs as *mut specdec_verify_outputs)?;
        let tokens_name = if tree {
            "num_nodes"
        } else {
            "num_draft_tokens"
        };
        let shape = VerifyShape::new(
            size_arg("num_requests", self.num_requests)?,
            size_arg("vocab_size", self.vocab_size)?,
            size_arg(tokens_name, self.num_tokens)?,
            tree,
            size_arg("emit_width", self.emit_width)?,
        )?;
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(backend) = &ctx.backend {
            return self.run_cuda(backend, &shape, &sampling, &outputs);
        }
        let b = shape.num_requests;
        let target_len = shape.target_rows() * shape.vocab_size;
        let draft_len = shape.draft_rows() * shape.vocab_size;
        let kind = self.rows_kind()?;
        let rows = |name: &str, ptr: *const c_void, len: usize| -> Result<Rows<'_>> {
            Ok(match kind {
                RowsKind::LogitsF32 => Rows::LogitsF32(host_slice(name, ptr as *const f32, len)?),
                RowsKind::LogitsF16 => Rows::LogitsF16(host_slice(name, ptr as *const f16, len)?),
                RowsKind::LogitsBF16 => {
                    Rows::LogitsBF16(host_slice(name, ptr as *const bf16, len)?)
                }
                RowsKind::Probs => Rows::Probs(host_slice(name, ptr as *const f32, len)?),
            })
        };
        let target = rows("target", self.target, target_len)?;
        let draft = if self.draft.is_null() {
            None
        } else {
            Some(rows("draft", self.draft, draft_len)?)
        };
        let (offsets_name, tokens_name) = if tree {
            ("node_offsets", "node_tokens")
        } else {
            ("draft_offsets", "draft_tokens")
        };
        let offsets = host_slice(offsets_name, self.offsets, b + 1)?;
        let tokens = host_slice(tokens_name, self.tokens, shape.num_tokens)?;
        let drafts = if tree {
            let parents = host_slice("parents", self.parents, shape.num_tokens)?;
            Drafts::Tree {
                node_offsets: offsets,
                node_tokens: tokens,
                parents,
            }
        } else {
            Drafts::Chain {
                draft_offsets: offsets,
                draft_tokens: tokens,
            }
        };
        // As the device path's SamplingDevicePtrs::check: logits need temperatures (null only for an empty
        // batch, like every array), probabilities refuse each sampling parameter by its own name.
        let params = if target.is_logits() {
            if sampling.temperature.is_null() && b > 0 {
                return Err(Error::invalid(
                    "sampling.temperature",
                    "is a null pointer; logits need a temperature per request (0 = greedy)",
                ));
            }
            Some(SamplingParams {
                temperature: host_slice("sampling.temperature", sampling.temperature, b)?,
                top_k: optional_slice("sampling.top_k", sampling.top_k, b)?,
                top_p: optional_slice("sampling.top_p", sampling.top_p, b)?,
            })
        } else {
            let given = [
                ("sampling.temperature", sampling.temperature.is_null()),
                ("sampling.top_k", sampling.top_k.is_null()),
                ("sampling.top_p", sampling.top_p.is_null()),
            ];
            if let Some((name, _)) = given.into_iter().find(|&(_, null)| !null) {
                return Err(Error::invalid(
                    name,
                    "probabilities take no sampling parameters: apply temperature, top-k and top-p before",
                ));
            }
            None
        };
        let draft_params = if sampling.draft_temperature.is_null() {
            let given = [
                ("sampling.draft_top_k", sampling.draft_top_k.is_null()),
                ("sampling.draft_top_p", sampling.draft_top_p.is_null()),
            ];
            if let Some((name, _)) = given.into_iter().find(|&(_, null)| !null) {
                return Err(Error::invalid(
                    name,
                    "needs sampling.draft_temperature (without it the draft rows use the target's parameters)",
                ));
            }
            None
        } else {
            if !target.is_logits() || draft.is_none() {
                return Err(Error::invalid(
                    "sampling.draft_temperature",
                    "applies to draft logits only: pass NULL without draft rows or with probabilities",
                ));
            }
            Some(SamplingParams {
                temperature: host_slice(
                    "sampling.draft_temperature",
                    sampling.draft_temperature,
                    b,
                )?,
                top_k: optional_slice("sampling.draft_top_k", sampling.draft_top_k, b)?,
                top_p: optional_slice("sampling.draft_top_p", sampling.draft_top_p, b)?,
            })
        };
        let inputs = VerifyInputs {
            vocab_size: shape.vocab_size,
            drafts,
            target,
            draft,
            params,
            draft_params,
            seeds: noise_array("sampling.seeds", sampling.seeds, b)?,
            steps: noise_array("sampling.steps", sampling.steps, b)?,
        };
        let n = shape.output_len();
        let mut out = VerifyOutputs {
            emit_width: shape.emit_width,
            accepted_counts: host_slice_mut("outputs.accepted_counts", outputs.accepted_counts, b)?,
            emitted_tokens: host_slice_mut("outputs.emitted_tokens", outputs.emitted_tokens, n)?,
            accepted_nodes: optional_slice_mut(
                "outputs.accepted_nodes",
                outputs.accepted_nodes,
                n,
            )?,
            accept_flags: optional_slice_mut("outputs.accept_flags", outputs.accept_flags, n)?,
            request_status: optional_slice_mut(
                "outputs.request_status",
                outputs.request_status,
                b,
            )?,
        };
        crate::cpu::rejection_verify(&inputs, &mut out)
    }
}

/// Settings of a suffix drafter. Fill with `specdec_drafter_config_default`, then change fields. Sizes are
/// `int64_t` and must be positive; see the Rust documentation of `specdec::drafter::DrafterConfig`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_drafter_config {
    /// The shortest context suffix worth matching (at least 1).
    pub min_match: i64,
    /// The longest context suffix matched (the depth cap).
    pub max_match: i64,
    /// The most draft tokens (chain) or nodes (tree) proposed, 1..=SPECDEC_MAX_DRAFTS (63).
    pub max_draft: i64,
    /// Budget from the match length: floor(match_len * match_factor + match_offset).
    pub match_factor: f64,
    /// See match_factor.
    pub match_offset: f64,
    /// Nodes whose path probability falls below this are not drafted.
    pub min_token_prob: f64,
    /// Rollouts started this many iterations ago or more leave the history at specdec_drafter_begin_iteration.
    pub window_iterations: i64,
    /// Most tokens stored for one prompt.
    pub prompt_token_budget: i64,
    /// Most tokens stored overall.
    pub total_token_budget: i64,
    /// 1: cap budgets by length class (the fields below); 0: no length classes.
    pub use_length_classes: i32,
    /// Predicted lengths of at least this many tokens are Long.
    pub long_threshold: i64,
    /// Predicted lengths of at least this many tokens (below long_threshold) are Medium.
    pub medium_threshold: i64,
    /// Draft budget of a Long request.
    pub long_budget: i64,
    /// Draft budget of a Medium request.
    pub medium_budget: i64,
    /// Draft budget of a Short request.
    pub short_budget: i64,
    /// Weight of the newest rollout length in a prompt's moving average, in (0, 1].
    pub length_smoothing: f64,
}

/// Sizes of a drafter's histories, from `specdec_drafter_get_stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct specdec_drafter_stats {
    /// Prompts with a history.
    pub prompts: i64,
    /// Rollouts stored.
    pub rollouts: i64,
    /// Tokens stored (what the budgets count).
    pub tokens: i64,
    /// Bytes the drafter holds: histories, registered requests (their contexts included) and bookkeeping.
    pub bytes: i64,
    /// bytes / tokens (0 when empty).
    pub bytes_per_token: f64,
    /// Requests registered and not finished.
    pub active_requests: i64,
}

/// An opaque suffix drafter over rollout history (see `specdec::drafter`). Usable from several threads at once.
pub struct specdec_drafter {
    drafter: Drafter,
}

/// A drafter configuration error with the argument named as `specdec_drafter_config` names it (the Rust
/// configuration nests the length classes; the C struct is flat).
fn c_config_field_names(e: Error) -> Error {
    match e {
        Error::InvalidArgument { argument, reason } => {
            let argument = match argument.as_str() {
                "length_classes.smoothing" => "length_smoothing".to_string(),
                "length_classes" => "medium_threshold".to_string(),
                _ => argument,
            };
            Error::InvalidArgument { argument, reason }
        }
        other => other,
    }
}

fn config_from_c(c: &specdec_drafter_config) -> Result<DrafterConfig> {
    let length_classes = match c.use_length_classes {
        0 => None,
        1 => Some(LengthClasses {
            long_threshold: size_arg("long_threshold", c.long_threshold)?,
            medium_threshold: size_arg("medium_threshold", c.medium_threshold)?,
            long_budget: size_arg("long_budget", c.long_budget)?,
            medium_budget: size_arg("medium_budget", c.medium_budget)?,
            short_budget: size_arg("short_budget", c.short_budget)?,
            smoothing: c.length_smoothing,
        }),
        other => {
            return Err(Error::invalid(
                "use_length_classes",
                format!("is {other}, not 0 or 1"),
            ))
        }
    };
    Ok(DrafterConfig {
        min_match: size_arg("min_match", c.min_match)?,
        max_match: size_arg("max_match", c.max_match)?,
        max_draft: size_arg("max_draft", c.max_draft)?,
        match_factor: c.match_factor,
        match_offset: c.match_offset,
        min_token_prob: c.min_token_prob,
        window_iterations: u64::try_from(c.window_iterations)
            .map_err(|_| Error::invalid("window_iterations", "cannot be negative"))?,
        prompt_token_budget: size_arg("prompt_token_budget", c.prompt_token_budget)?,
        total_token_budget: size_arg("total_token_budget", c.total_token_budget)?,
        length_classes,
    })
}

/// A host array of tokens: non-negative int32 ids.
///
/// # Safety
/// As [`host_slice`].
unsafe fn tokens_arg(argument: &str, ptr: *const i32, len: i64) -> Result<Vec<Token>> {
    let tokens = host_slice(argument, ptr, size_arg(argument, len)?)?;
    tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            u32::try_from(t).map_err(|_| {
                Error::invalid(
                    format!("{argument}[{i}]"),
                    format!("is {t}; token ids are >= 0"),
                )
            })
        })
        .collect()
}

fn drafter_arg<'a>(drafter: *const specdec_drafter) -> Result<&'a Drafter> {
    // SAFETY: live_handle only returns a pointer the registry holds as a live drafter.
    Ok(unsafe { &(*live_handle("drafter", drafter, HandleKind::Drafter)?).drafter })
}

/// Writes the default drafter settings into `*out`.
///
/// # Safety
/// `out` must be null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_config_default(
    out: *mut specdec_drafter_config,
) -> specdec_status {
    boundary(|| {
        let out = non_null("out", out)?;
        let d = DrafterConfig::default();
        let c = LengthClasses::default();
        *out = specdec_drafter_config {
            min_match: d.min_match as i64,
            max_match: d.max_match as i64,
            max_draft: d.max_draft as i64,
            match_factor: d.match_factor,
            match_offset: d.match_offset,
            min_token_prob: d.min_token_prob,
            window_iterations: d.window_iterations as i64,
            prompt_token_budget: d.prompt_token_budget as i64,
            total_token_budget: d.total_token_budget as i64,
            use_length_classes: 0,
            long_threshold: c.long_threshold as i64,
            medium_threshold: c.medium_threshold as i64,
            long_budget: c.long_budget as i64,
            medium_budget: c.medium_budget as i64,
            short_budget: c.short_budget as i64,
            length_smoothing: c.smoothing,
        };
        Ok(())
    })
}

/// Creates a drafter with `*config` in `*out`. The settings are checked; a bad one is named in the error.
///
/// # Safety
/// `config` must be null (rejected) or readable; `out` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_create(
    config: *const specdec_drafter_config,
    out: *mut *mut specdec_drafter,
) -> specdec_status {
    boundary(|| {
        let config = non_null("config", config as *mut specdec_drafter_config)?;
        let out = non_null("out", out)?;
        let drafter = Drafter::new(config_from_c(config)?).map_err(c_config_field_names)?;
        *out = register_handle(HandleKind::Drafter, specdec_drafter { drafter });
        Ok(())
    })
}

/// Releases a drafter and everything it stores. Null is accepted and ignored. A drafter already destroyed, or
/// a pointer that is not a drafter, is SPECDEC_INVALID_ARGUMENT (see the handle rules at `specdec_context`).
///
/// # Safety
/// `drafter` must be null or a drafter from `specdec_drafter_create`, used by no other thread during the call.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_destroy(drafter: *mut specdec_drafter) -> specdec_status {
    boundary(|| destroy_handle("drafter", drafter, HandleKind::Drafter))
}

/// Starts training iteration `iteration` (non-decreasing): rollouts older than the window leave the history.
///
/// # Safety
/// `drafter` must be null (rejected) or live.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_begin_iteration(
    drafter: *const specdec_drafter,
    iteration: u64,
) -> specdec_status {
    boundary(|| drafter_arg(drafter)?.begin_iteration(iteration))
}

/// Registers request `request` (an id of the caller's choosing, unique among registered requests) of prompt
/// `prompt`, with its `num_tokens` prompt tokens.
///
/// # Safety
/// `drafter` must be null (rejected) or live; `prompt_tokens` must hold `num_tokens` ids (null if 0).
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_add_request(
    drafter: *const specdec_drafter,
    request: u64,
    prompt: u64,
    prompt_tokens: *const i32,
    num_tokens: i64,
) -> specdec_status {
    boundary(|| {
        let drafter = drafter_arg(drafter)?;
        drafter.add_request(
            request,
            prompt,
            &tokens_arg("prompt_tokens", prompt_tokens, num_tokens)?,
        )
    })
}

/// Appends `num_tokens` verified tokens to a request's output.
///
/// # Safety
/// `drafter` must be null (rejected) or live; `tokens` must hold `num_tokens` ids (null if 0).
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_append(
    drafter: *const specdec_drafter,
    request: u64,
    tokens: *const i32,
    num_tokens: i64,
) -> specdec_status {
    boundary(|| {
        let drafter = drafter_arg(drafter)?;
        drafter.append(request, &tokens_arg("tokens", tokens, num_tokens)?)
    })
}

/// Ends a request; its rollout stays in the history until the window or a budget drops it.
///
/// # Safety
/// `drafter` must be null (rejected) or live.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_finish_request(
    drafter: *const specdec_drafter,
    request: u64,
) -> specdec_status {
    boundary(|| drafter_arg(drafter)?.finish_request(request))
}

/// Proposes a draft continuing a request's context: `kind` 0 for a chain, 1 for a tree. Writes up to `capacity`
/// nodes: `out_tokens[i]`, `out_parents[i]` (-1 for a child of the context's last token, otherwise an earlier
/// index: the first n nodes always form a valid tree) and `out_probs[i]` (path probability); `*out_count` =
/// nodes written, `*out_match_len` = length of the matched context suffix (0: nothing matched). For tree
/// verification, `specdec_draft_to_verify_tree` puts the context's last token as node 0 and shifts the parents by
/// one (the one tree vocabulary of `specdec::tree`).
///
/// # Safety
/// `drafter` must be null (rejected) or live; each output array must hold `capacity` elements; `out_count`
/// and `out_match_len` must be writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_propose(
    drafter: *const specdec_drafter,
    request: u64,
    kind: i32,
    capacity: i64,
    out_tokens: *mut i32,
    out_parents: *mut i32,
    out_probs: *mut f64,
    out_count: *mut i64,
    out_match_len: *mut i64,
) -> specdec_status {
    boundary(|| {
        let drafter = drafter_arg(drafter)?;
        let kind = match kind {
            0 => DraftKind::Chain,
            1 => DraftKind::Tree,
            other => {
                return Err(Error::invalid(
                    "kind",
                    format!("is {other}, not 0 (chain) or 1 (tree)"),
                ))
            }
        };
        let capacity = size_arg("capacity", capacity)?;
        if capacity == 0 {
            return Err(Error::invalid("capacity", "is 0; no draft fits"));
        }
        let tokens = host_slice_mut("out_tokens", out_tokens, capacity)?;
        let parents = host_slice_mut("out_parents", out_parents, capacity)?;
        let probs = host_slice_mut("out_probs", out_probs, capacity)?;
        let count = non_null("out_count", out_count)?;
        let match_len = non_null("out_match_len", out_match_len)?;
        let draft = drafter.propose(request, kind)?;
        let n = draft.tokens.len().min(capacity);
        for i in 0..n {
            tokens[i] = draft.tokens[i] as i32;
            parents[i] = draft.parents[i];
            probs[i] = draft.probs[i];
        }
        *count = n as i64;
        *match_len = draft.match_len as i64;
        Ok(())
    })
}

/// Writes the sizes of a drafter's histories into `*out`.
///
/// # Safety
/// `drafter` must be null (rejected) or live; `out` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_drafter_get_stats(
    drafter: *const specdec_drafter,
    out: *mut specdec_drafter_stats,
) -> specdec_status {
    boundary(|| {
        let stats = drafter_arg(drafter)?.stats();
        *non_null("out", out)? = specdec_drafter_stats {
            prompts: stats.prompts as i64,
            rollouts: stats.rollouts as i64,
            tokens: stats.tokens as i64,
            bytes: stats.bytes as i64,
            bytes_per_token: stats.bytes_per_token,
            active_requests: stats.active_requests as i64,
        };
        Ok(())
    })
}

/// A step cost model (see `specdec::policy::CostModel`): a GPU's rates, a model's shape, the drafter's weight
/// bytes and the fitted overheads, in SI units (bytes, seconds, FLOP). Fill it with
/// `specdec_cost_model_preset`, then adjust fields (for example the overheads from a fit).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct specdec_cost_model {
    /// Peak memory bandwidth, bytes per second.
    pub bandwidth: f64,
    /// Peak bf16 matrix rate, FLOP per second.
    pub flops: f64,
    /// Fraction of the bandwidth reached, in (0, 1].
    pub bandwidth_efficiency: f64,
    /// Fraction of the matrix rate reached, in (0, 1].
    pub compute_efficiency: f64,
    /// All parameters of the target model.
    pub params: f64,
    /// Transformer layers.
    pub layers: i64,
    /// Model width.
    pub hidden: i64,
    /// Query heads.
    pub q_heads: i64,
    /// Key/value heads.
    pub kv_heads: i64,
    /// Head dimension.
    pub head_dim: i64,
    /// Vocabulary size.
    pub vocab: i64,
    /// 1 if the LM head shares the embedding table, else 0.
    pub tied_embeddings: i32,
    /// Bytes of weights one draft step reads.
    pub drafter_weight_bytes: f64,
    /// Seconds per target or verification step.
    pub t0: f64,
    /// Seconds per sequence on a target or verification step.
    pub t1: f64,
    /// Seconds per draft step.
    pub d0: f64,
    /// Seconds per sequence on a draft step.
    pub d1: f64,
    /// Seconds per verified token.
    pub v1: f64,
}

fn cost_model_from_c(c: &specdec_cost_model) -> Result<CostModel> {
    let positive = |argument: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(Error::invalid(
                argument,
                format!("is {v}; it must be finite and positive"),
            ))
        }
    };
    let fraction = |argument: &str, v: f64| {
        if v > 0.0 && v <= 1.0 {
            Ok(v)
        } else {
            Err(Error::invalid(argument, format!("is {v}, outside (0, 1]")))
        }
    };
    let count = |argument: &str, v: i64| match size_arg(argument, v)? {
        0 => Err(Error::invalid(argument, "is 0")),
        n => Ok(n),
    };
    let overhead = |argument: &str, v: f64| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(Error::invalid(
                argument,
                format!("is {v}; overheads are finite and >= 0"),
            ))
        }
    };
    let gpu = Gpu {
        name: "custom",
        bandwidth: positive("bandwidth", c.bandwidth)?,
        flops: positive("flops", c.flops)?,
        bandwidth_efficiency: fraction("bandwidth_efficiency", c.bandwidth_efficiency)?,
        compute_efficiency: fraction("compute_efficiency", c.compute_efficiency)?,
    };
    let model = ModelShape {
        name: "custom",
        params: positive("params", c.params)?,
        layers: count("layers", c.layers)?,
        hidden: count("hidden", c.hidden)?,
        q_heads: count("q_heads", c.q_heads)?,
        kv_heads: count("kv_heads", c.kv_heads)?,
        head_dim: count("head_dim", c.head_dim)?,
        vocab: count("vocab", c.vocab)?,
        tied_embeddings: match c.tied_embeddings {
            0 => false,
            1 => true,
            other => {
                return Err(Error::invalid(
                    "tied_embeddings",
                    format!("is {other}, not 0 or 1"),
                ))
            }
        },
    };
    if model.matmul_params() <= 0.0 {
        return Err(Error::invalid(
            "params",
            "is not more than the embedding table (vocab x hidden)",
        ));
    }
    let overheads = Overheads {
        t0: overhead("t0", c.t0)?,
        t1: overhead("t1", c.t1)?,
        d0: overhead("d0", c.d0)?,
        d1: overhead("d1", c.d1)?,
        v1: overhead("v1", c.v1)?,
    };
    let mut cost = CostModel::new(gpu, model, overheads);
    cost.drafter_weight_bytes = positive("drafter_weight_bytes", c.drafter_weight_bytes)?;
    Ok(cost)
}

/// Fills `*out` with a named GPU (`gpu`: 0 = A100-80GB, 1 = H100-80GB) and model (`model`: 0 = Qwen2.5-7B,
/// 1 = Llama-3-8B), its int4 self-drafter, and the overheads calibrated to EfficientRollout's published A100
/// operating point (replace them with fitted ones for real decisions).
///
/// # Safety
/// `out` must be null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_cost_model_preset(
    gpu: i32,
    model: i32,
    out: *mut specdec_cost_model,
) -> specdec_status {
    boundary(|| {
        let out = non_null("out", out)?;
        let gpu = match gpu {
            0 => Gpu::A100,
            1 => Gpu::H100,
            other => {
                return Err(Error::invalid(
                    "gpu",
                    format!("is {other}, not 0 (A100) or 1 (H100)"),
                ))
            }
        };
        let model = match model {
            0 => ModelShape::QWEN25_7B,
            1 => ModelShape::LLAMA3_8B,
            other => {
                return Err(Error::invalid(
                    "model",
                    format!("is {other}, not 0 (Qwen2.5-7B) or 1 (Llama-3-8B)"),
                ))
            }
        };
        let cost = CostModel::new(gpu, model, Overheads::EFFICIENT_ROLLOUT_A100);
        let o = cost.overheads;
        *out = specdec_cost_model {
            bandwidth: gpu.bandwidth,
            flops: gpu.flops,
            bandwidth_efficiency: gpu.bandwidth_efficiency,
            compute_efficiency: gpu.compute_efficiency,
            params: model.params,
            layers: model.layers as i64,
            hidden: model.hidden as i64,
            q_heads: model.q_heads as i64,
            kv_heads: model.kv_heads as i64,
            head_dim: model.head_dim as i64,
            vocab: model.vocab as i64,
            tied_embeddings: i32::from(model.tied_embeddings),
            drafter_weight_bytes: cost.drafter_weight_bytes,
            t0: o.t0,
            t1: o.t1,
            d0: o.d0,
            d1: o.d1,
            v1: o.v1,
        };
        Ok(())
    })
}

/// Seconds of one step: `kind` 0 = plain decode, 1 = draft step, 2 = verification of `verified_tokens`
/// tokens (the sum of k_i + 1; ignored otherwise), for `batch` sequences holding `context_tokens` in all (at most
/// `SPECDEC_MAX_CONTEXT_TOKENS`).
///
/// # Safety
/// `model` must be null (rejected) or readable; `out_seconds` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_cost_model_step_seconds(
    model: *const specdec_cost_model,
    kind: i32,
    batch: i64,
    context_tokens: i64,
    verified_tokens: i64,
    out_seconds: *mut f64,
) -> specdec_status {
    boundary(|| {
        let cost = cost_model_from_c(non_null("model", model as *mut specdec_cost_model)?)?;
        let batch = size_arg("batch", batch)?;
        let context = context_tokens_arg("context_tokens", context_tokens)?;
        let out = non_null("out_seconds", out_seconds)?;
        let seconds = match kind {
            0 => cost.target_step(batch, context),
            1 => cost.draft_step(batch, context),
            2 => {
                let tokens = size_arg("verified_tokens", verified_tokens)?;
                if tokens < batch {
                    return Err(Error::invalid(
                        "verified_tokens",
                        format!("is {tokens}, fewer than one per sequence ({batch})"),
                    ));
                }
                cost.verify_step(batch, context, tokens)
            }
            other => {
                return Err(Error::invalid(
                    "kind",
                    format!("is {other}, not 0 (target), 1 (draft) or 2 (verify)"),
                ))
            }
        };
        // Each parameter is finite and positive on its own, but a bandwidth such as 5e-324 still overflows the
        // time: a model that cannot price this step is an invalid argument, not an infinite answer.
        if !seconds.is_finite() {
            return Err(Error::invalid(
                "model",
                format!(
                    "gives {seconds} s for this step (a bandwidth or rate too small to divide by)"
                ),
            ));
        }
        *out = seconds;
        Ok(())
    })
}

/// specdec's policy for one decoding step: for `num_requests` (at most `SPECDEC_MAX_POLICY_REQUESTS`) requests
/// with `contexts[i]` context tokens (at most `SPECDEC_MAX_CONTEXT_TOKENS` each) and per-position acceptance
/// `acceptance[i * positions + j]` (position j + 1, given the earlier ones were accepted; positions past
/// `positions` reuse the last), writes each request's draft length (0..=`max_draft`, 0 = do not draft) to
/// `out_lengths[i]`, maximising expected emitted tokens per second under `model`, and that rate to
/// `*out_goodput`. A model that cannot price the step (each field valid alone, but a rate so small that every
/// step time is infinite) is SPECDEC_INVALID_ARGUMENT naming `model`.
///
/// # Safety
/// `model` must be null (rejected) or readable; `contexts` must hold `num_requests` values, `acceptance`
/// `num_requests * positions`, `out_lengths` `num_requests` (null if 0); `out_goodput` null (rejected) or writable.
#[no_mangle]
pub unsafe extern "C" fn specdec_choose_draft_lengths(
    model: *const specdec_cost_model,
    contexts: *const i64,
    acceptance: *const f64,
    num_requests: i64,
    positions: i64,
    max_draft: i64,
    out_lengths: *mut i32,
    out_goodput: *mut f64,
) -> specdec_status {
    boundary(|| {
        let cost = cost_model_from_c(non_null("model", model as *mut specdec_cost_model)?)?;
        let n = policy_requests_arg(num_requests)?;
        let max_draft = size_arg("max_draft", max_draft)?;
        if max_draft > MAX_DRAFTS {
            return Err(Error::invalid(
                "max_draft",
                format!("is {max_draft}, above SPECDEC_MAX_DRAFTS ({MAX_DRAFTS})"),
            ));
        }
        let outlooks = outlooks_from_c(contexts, acceptance, n, positions, max_draft)?;
        let lengths = host_slice_mut("out_lengths", out_lengths, n)?;
        let goodput = non_null("out_goodput", out_goodput)?;
        let (chosen, value) = choose_draft_lengths(&cost, &outlooks, max_draft);
        let value = priced_goodput(value, n)?;
        for (out, k) in lengths.iter_mut().zip(chosen) {
            *out = k as i32;
        }
        *goodput = value;
        Ok(())
    })
}

/// specdec's tree policy for one decoding step, for a drafter whose children are drawn i.i.d. from its
/// distribution and verified by the tree sampler with draft rows: the inputs are those of
/// [`specdec_choose_draft_lengths`] (`acceptance` is each depth's first-child acceptance); for each request it
/// writes the number of drafts `n` (0..=`max_drafts`, 0 = do not draft) to `out_num_drafts[i]` and the tree to
/// row `i` of `out_parents` (`num_requests` rows of `max_drafts + 1`): entry 0 is -1 (the root, the last
/// accepted token), entries `1..=n` the parents (in `0..j` for entry `j`; children of a node in the order the
/// sampler tries them), the rest -1. Trees are at most `max_depth` deep. The expected tokens per second go to
/// `*out_goodput`.
///
/// # Safety
/// As [`specdec_choose_draft_lengths`], with `out_parents` holding `num_requests * (max_drafts + 1)` values and
/// `out_num_drafts` `num_requests` (each null if that is 0).
#[no_mangle]
pub unsafe extern "C" fn specdec_choose_draft_trees(
    model: *const specdec_cost_model,
    contexts: *const i64,
    acceptance: *const f64,
    num_requests: i64,
    positions: i64,
    max_drafts: i64,
    max_depth: i64,
    out_parents: *mut i32,
    out_num_drafts: *mut i32,
    out_goodput: *mut f64,
) -> specdec_status {
    boundary(|| {
        let cost = cost_model_from_c(non_null("model", model as *mut specdec_cost_model)?)?;
        let n = policy_requests_arg(num_requests)?;
        let max_drafts = size_arg("max_drafts", max_drafts)?;
        if !(1..=MAX_DRAFTS).contains(&max_drafts) {
            return Err(Error::invalid(
                "max_drafts",
                format!("is {max_drafts}, not in 1..=SPECDEC_MAX_DRAFTS ({MAX_DRAFTS})"),
            ));
        }
        let max_depth = size_arg("max_depth", max_depth)?;
        if !(1..=max_drafts).contains(&max_depth) {
            return Err(Error::invalid(
                "max_depth",
                format!("is {max_depth}, not in 1..=max_drafts ({max_drafts})"),
            ));
        }
        let outlooks = outlooks_from_c(contexts, acceptance, n, positions, max_depth)?;
        let parents = host_slice_mut("out_parents", out_parents, n * (max_drafts + 1))?;
        let counts = host_slice_mut("out_num_drafts", out_num_drafts, n)?;
        let goodput = non_null("out_goodput", out_goodput)?;
        let (trees, value) = choose_draft_trees(&cost, &outlooks, max_drafts, max_depth);
        let value = priced_goodput(value, n)?;
        for ((row, count), tree) in parents
            .chunks_mut(max_drafts + 1)
            .zip(counts.iter_mut())
            .zip(&trees)
        {
            row.fill(-1);
            for (out, parent) in row.iter_mut().zip(tree.verification_parents()) {
                *out = parent;
            }
            *count = tree.drafts() as i32;
        }
        *goodput = value;
        Ok(())
    })
}

/// The most requests one call of the policy entry points takes: a bound on the call's memory and time, which
/// grow with the batch (see README, Policy, for measured figures); real batches are far smaller.
pub const SPECDEC_MAX_POLICY_REQUESTS: i64 = 4096;

fn policy_requests_arg(num_requests: i64) -> Result<usize> {
    let n = size_arg("num_requests", num_requests)?;
    if n > SPECDEC_MAX_POLICY_REQUESTS as usize {
        return Err(Error::invalid(
            "num_requests",
            format!("is {n}, above SPECDEC_MAX_POLICY_REQUESTS ({SPECDEC_MAX_POLICY_REQUESTS})"),
        ));
    }
    Ok(n)
}

/// The longest context (2^40 tokens) the cost model prices: far beyond any model's, and small enough that the contexts of a
/// whole batch add up without overflow.
pub const SPECDEC_MAX_CONTEXT_TOKENS: i64 = 1_099_511_627_776; // 2^40

fn context_tokens_arg(argument: &str, value: i64) -> Result<usize> {
    if value > SPECDEC_MAX_CONTEXT_TOKENS {
        return Err(Error::invalid(
            argument,
            format!("is {value}, above SPECDEC_MAX_CONTEXT_TOKENS (2^40)"),
        ));
    }
    size_arg(argument, value)
}

/// The goodput a policy entry point reports for `requests` requests: 0 for an empty batch; otherwise finite and
/// positive, or the model could not price the step (each field valid alone, but a rate such as 5e-324 makes
/// every step time infinite) and the call fails before writing anything.
fn priced_goodput(value: f64, requests: usize) -> Result<f64> {
    if requests == 0 {
        Ok(0.0)
    } else if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(Error::invalid(
            "model",
            format!("gives a goodput of {value} tokens/s for this batch (a rate too small to divide by)"),
        ))
    }
}

/// The requests of the policy entry points: `contexts[i]` and `acceptance[i * positions ..][..positions]`, of
/// which only the first `used_positions` are kept (the policy never looks further).
///
/// # Safety
/// `contexts` must hold `n` values and `acceptance` `n * positions` (each null if that is 0).
unsafe fn outlooks_from_c(
    contexts: *const i64,
    acceptance: *const f64,
    n: usize,
    positions: i64,
    used_positions: usize,
) -> Result<Vec<RequestOutlook>> {
    let positions = size_arg("positions", positions)?;
    if positions == 0 {
        return Err(Error::invalid(
            "positions",
            "is 0; give at least the first position's acceptance",
        ));
    }
    let total = n
        .checked_mul(positions)
        .ok_or_else(|| Error::invalid("positions", "num_requests * positions overflows"))?;
    let contexts = host_slice("contexts", contexts, n)?;
    let acceptance = host_slice("acceptance", acceptance, total)?;
    let mut outlooks = Vec::with_capacity(n);
    for i in 0..n {
        let context = context_tokens_arg(&format!("contexts[{i}]"), contexts[i])?;
        let row = &acceptance[i * positions..(i + 1) * positions];
        if let Some(j) = row.iter().position(|a| !(0.0..=1.0).contains(a)) {
            return Err(Error::invalid(
                format!("acceptance[{}]", i * positions + j),
                format!("is {}, outside [0, 1]", row[j]),
            ));
        }
        outlooks.push(RequestOutlook {
            context,
            acceptance: row[..positions.min(used_positions.max(1))].to_vec(),
        });
    }
    Ok(outlooks)
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

fn int4_shape_arg(n: i64, k: i64, group_size: i64) -> Result<Int4Shape> {
    Int4Shape::new(
        size_arg("n", n)?,
        size_arg("k", k)?,
        size_arg("group_size", group_size)?,
    )
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

/// Round-to-nearest int4 quantization of `weights[n, k]` (row-major, `weights_dtype` fp16 or bf16) into the
/// format of `docs/int4-format.md`: `packed[n * k / 8]` (uint32 words), `scales[k / group_size * n]`
/// (`scale_dtype`, fp16 or bf16) and `zeros[k / group_size * n]` (bytes). `n` a multiple of 16, `k` a multiple
/// of 64 and of `group_size` (32, 64 or 128). The CPU and CUDA contexts produce the same bytes; groups holding
/// NaN or infinities get a NaN scale. On a CUDA context `weights` and `packed` must be 16-byte aligned.
///
/// # Safety
/// Each pointer must point to the number of elements stated, valid for the call (on a CUDA context: until the
/// work on `stream` has finished), and the outputs must not overlap the input.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_quantize(
    ctx: *const specdec_context,
    weights: *const c_void,
    weights_dtype: i32,
    n: i64,
    k: i64,
    group_size: i64,
    packed: *mut u32,
    scales: *mut c_void,
    scale_dtype: i32,
    zeros: *mut u8,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let weights_dtype = half_dtype_arg("weights_dtype", weights_dtype)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let shape = int4_shape_arg(n, k, group_size)?;
        match &ctx.backend {
            Backend::Cpu => {
                let packed = host_slice_mut("packed", packed, shape.packed_len())?;
                let zeros = host_slice_mut("zeros", zeros, shape.meta_len())?;
                with_half!(weights_dtype, T => with_half!(scale_dtype, S => {
                    let w = host_slice("weights", weights as *const T, shape.weights_len())?;
                    let s = host_slice_mut("scales", scales as *mut S, shape.meta_len())?;
                    crate::cpu::int4_quantize(&shape, w, packed, s, zeros)
                }))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let ptrs = QuantizeDevicePtrs {
                    weights: weights as u64,
                    given_scales: 0,
                    given_zeros: 0,
                    packed: packed as u64,
                    scales: scales as u64,
                    zeros: zeros as u64,
                };
                ptrs.check(&shape, false)?;
                backend.launch_int4_quantize(stream as _, &shape, weights_dtype, scale_dtype, &ptrs)
            }
        }
    })
}

/// Packs `weights[n, k]` into `packed` with given `scales` and `zeros` (GPTQ, AWQ or another quantizer's),
/// each `[k / group_size * n]`: codes `clamp(round(w / s) + z, 0, 15)` by the rule of `docs/int4-format.md`.
/// On a CPU context a scale that is not positive and finite (with a finite reciprocal), or a zero above 15, is
/// SPECDEC_INVALID_ARGUMENT naming the element; on a CUDA context such a group gets codes 0.
///
/// # Safety
/// As `specdec_int4_quantize`.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_pack(
    ctx: *const specdec_context,
    weights: *const c_void,
    weights_dtype: i32,
    n: i64,
    k: i64,
    group_size: i64,
    scales: *const c_void,
    scale_dtype: i32,
    zeros: *const u8,
    packed: *mut u32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let weights_dtype = half_dtype_arg("weights_dtype", weights_dtype)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let shape = int4_shape_arg(n, k, group_size)?;
        match &ctx.backend {
            Backend::Cpu => {
                let packed = host_slice_mut("packed", packed, shape.packed_len())?;
                let zeros = host_slice("zeros", zeros, shape.meta_len())?;
                with_half!(weights_dtype, T => with_half!(scale_dtype, S => {
                    let w = host_slice("weights", weights as *const T, shape.weights_len())?;
                    let s = host_slice("scales", scales as *const S, shape.meta_len())?;
                    crate::cpu::int4_pack(&shape, w, s, zeros, packed)
                }))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let ptrs = QuantizeDevicePtrs {
                    weights: weights as u64,
                    given_scales: scales as u64,
                    given_zeros: zeros as u64,
                    packed: packed as u64,
                    scales: 0,
                    zeros: 0,
                };
                ptrs.check(&shape, true)?;
                backend.launch_int4_quantize(stream as _, &shape, weights_dtype, scale_dtype, &ptrs)
            }
        }
    })
}

/// `y[m, n] = x[m, k] W^T` for an int4 `W` (`packed`, `scales`, `zeros` as `specdec_int4_quantize` writes
/// them), `m` from 1 to 16, activations and output of `x_dtype` (fp16 or bf16), fp32 accumulation. On a CPU
/// context a zero above 15 is SPECDEC_INVALID_ARGUMENT; a CUDA context reads zeros' low 4 bits. On a CUDA
/// context `packed` and `x` must be 16-byte aligned.
///
/// # Safety
/// As `specdec_int4_quantize`; `y` must not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_gemv(
    ctx: *const specdec_context,
    packed: *const u32,
    scales: *const c_void,
    scale_dtype: i32,
    zeros: *const u8,
    n: i64,
    k: i64,
    group_size: i64,
    x: *const c_void,
    x_dtype: i32,
    m: i64,
    y: *mut c_void,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let x_dtype = half_dtype_arg("x_dtype", x_dtype)?;
        let shape = GemvShape::new(size_arg("m", m)?, int4_shape_arg(n, k, group_size)?)?;
        let w = &shape.weights;
        match &ctx.backend {
            Backend::Cpu => {
                let packed = host_slice("packed", packed, w.packed_len())?;
                let zeros = host_slice("zeros", zeros, w.meta_len())?;
                with_half!(x_dtype, A => with_half!(scale_dtype, S => {
                    let s = host_slice("scales", scales as *const S, w.meta_len())?;
                    let xs = host_slice("x", x as *const A, shape.x_len())?;
                    let ys = host_slice_mut("y", y as *mut A, shape.y_len())?;
                    crate::cpu::int4_gemv(&shape, packed, s, zeros, xs, ys)
                }))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let ptrs = GemvDevicePtrs {
                    packed: packed as u64,
                    scales: scales as u64,
                    zeros: zeros as u64,
                    x: x as u64,
                    y: y as u64,
                };
                ptrs.check(&shape)?;
                backend.launch_int4_gemv(stream as _, &shape, x_dtype, scale_dtype, &ptrs)
            }
        }
    })
}

/// Converts a GPTQ layer (host memory; see `specdec::int4::convert`): `qweight[k / 8 * n]` (int32, packed
/// along k), `qzeros[k / group_size * n / 8]` (int32, packed along n), `scales[k / group_size * n]` of
/// `scale_dtype`, `g_idx[k]` or NULL (act-order checkpoints are rejected), `zeros_minus_one` 1 for AutoGPTQ's
/// stored `z - 1` ("gptq" format), 0 for GPTQModel's `gptq_v2`. Writes `packed`, `scales_out`, `zeros_out`.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, host memory valid for the call.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_from_gptq(
    n: i64,
    k: i64,
    group_size: i64,
    qweight: *const i32,
    qzeros: *const i32,
    scales: *const c_void,
    scale_dtype: i32,
    g_idx: *const i32,
    zeros_minus_one: i32,
    packed: *mut u32,
    scales_out: *mut c_void,
    zeros_out: *mut u8,
) -> specdec_status {
    boundary(|| {
        let shape = int4_shape_arg(n, k, group_size)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let zeros_format = match zeros_minus_one {
            1 => GptqZeros::MinusOne,
            0 => GptqZeros::Exact,
            v => {
                return Err(Error::invalid(
                    "zeros_minus_one",
                    format!("is {v}; 1 (AutoGPTQ, z - 1 stored) or 0 (gptq_v2)"),
                ))
            }
        };
        let qweight = host_slice("qweight", qweight, shape.k / 8 * shape.n)?;
        let qzeros = host_slice("qzeros", qzeros, shape.meta_len() / 8)?;
        let g_idx = optional_slice("g_idx", g_idx, shape.k)?;
        let packed = host_slice_mut("packed", packed, shape.packed_len())?;
        let zeros_out = host_slice_mut("zeros_out", zeros_out, shape.meta_len())?;
        with_half!(scale_dtype, S => {
            let s = host_slice("scales", scales as *const S, shape.meta_len())?;
            let so = host_slice_mut("scales_out", scales_out as *mut S, shape.meta_len())?;
            from_gptq(&shape, qweight, qzeros, s, g_idx, zeros_format, packed, so, zeros_out)
        })
    })
}

/// Converts an AWQ (GEMM version) layer (host memory; see `specdec::int4::convert`): `qweight[k * n / 8]` and
/// `qzeros[k / group_size * n / 8]` (int32, packed along n in AWQ's order), `scales[k / group_size * n]` of
/// `scale_dtype`. Writes `packed`, `scales_out`, `zeros_out`.
///
/// # Safety
/// As `specdec_int4_from_gptq`.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_from_awq(
    n: i64,
    k: i64,
    group_size: i64,
    qweight: *const i32,
    qzeros: *const i32,
    scales: *const c_void,
    scale_dtype: i32,
    packed: *mut u32,
    scales_out: *mut c_void,
    zeros_out: *mut u8,
) -> specdec_status {
    boundary(|| {
        let shape = int4_shape_arg(n, k, group_size)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let qweight = host_slice("qweight", qweight, shape.weights_len() / 8)?;
        let qzeros = host_slice("qzeros", qzeros, shape.meta_len() / 8)?;
        let packed = host_slice_mut("packed", packed, shape.packed_len())?;
        let zeros_out = host_slice_mut("zeros_out", zeros_out, shape.meta_len())?;
        with_half!(scale_dtype, S => {
            let s = host_slice("scales", scales as *const S, shape.meta_len())?;
            let so = host_slice_mut("scales_out", scales_out as *mut S, shape.meta_len())?;
            from_awq(&shape, qweight, qzeros, s, packed, so, zeros_out)
        })
    })
}

/// The paged cache geometry from C arguments.
fn paged_cache_arg(
    num_pages: i64,
    page_size: i64,
    num_kv_heads: i64,
    head_dim: i64,
    pages_per_request: i64,
) -> Result<PagedCacheShape> {
    PagedCacheShape::new(
        size_arg("num_pages", num_pages)?,
        size_arg("page_size", page_size)?,
        size_arg("num_kv_heads", num_kv_heads)?,
        size_arg("head_dim", head_dim)?,
        size_arg("pages_per_request", pages_per_request)?,
    )
}

/// Tree-attention verification over a paged KV cache with the tree's KV appended (and RoPE applied) in the
/// same call; semantics, layouts and rules are those of the Rust module `specdec::attention` (and the README).
///
/// * `dtype` (fp16 or bf16) for `q[num_tokens * num_q_heads * head_dim]`, `k`, `v`
///   `[num_tokens * num_kv_heads * head_dim]`, `k_cache`, `v_cache`
///   `[num_pages * page_size * num_kv_heads * head_dim]` and `out` (like `q`).
/// * `token_offsets[num_requests + 1]`, `parents[num_tokens]` (-1 for a root, else an earlier node of the same
///   tree), `prefix_lens[num_requests]`, `page_table[num_requests * pages_per_request]` (int32).
/// * RoPE: `cos_sin_cache[max_position * head_dim]` (f32; cos then sin per position) with `rope_style` 0 (NeoX)
///   or 1 (GPT-J); NULL (and `max_position` 0) for none.
/// * Optional outputs (NULL to skip): `lse[num_tokens * num_q_heads]` (f32, natural log) and
///   `request_status[num_requests]` (`specdec_request_status`: 0 = ok, else the rule the request broke).
///
/// With `request_status`, a request that breaks a rule is flagged alone on either context: its
/// `specdec_request_status` code there, nothing appended to the cache for it and NaN in its rows of `out` and
/// `lse` (nothing at all when its `token_offsets` are broken); the others are computed. Without it, a CPU
/// context returns SPECDEC_INVALID_ARGUMENT naming the first bad element and writes nothing, while the CUDA
/// kernel still skips a failing request. On a CUDA context every array is device memory and the work is
/// enqueued on `stream`; `k_cache` and `v_cache` must be 16-byte aligned there.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, valid for the call (on a CUDA context:
/// until the work on `stream` has finished), and the outputs must not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_tree_attention(
    ctx: *const specdec_context,
    dtype: i32,
    q: *const c_void,
    k: *const c_void,
    v: *const c_void,
    num_requests: i64,
    num_tokens: i64,
    num_q_heads: i64,
    max_tree_size: i64,
    token_offsets: *const i32,
    parents: *const i32,
    prefix_lens: *const i32,
    page_table: *const i32,
    k_cache: *mut c_void,
    v_cache: *mut c_void,
    num_pages: i64,
    page_size: i64,
    num_kv_heads: i64,
    head_dim: i64,
    pages_per_request: i64,
    cos_sin_cache: *const f32,
    max_position: i64,
    rope_style: i32,
    softmax_scale: f32,
    out: *mut c_void,
    lse: *mut f32,
    request_status: *mut i32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let dtype = half_dtype_arg("dtype", dtype)?;
        let cache = paged_cache_arg(
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            pages_per_request,
        )?;
        let rope = if cos_sin_cache.is_null() {
            None
        } else {
            let style = match rope_style {
                0 => RopeStyle::Neox,
                1 => RopeStyle::Gptj,
                _ => {
                    return Err(Error::invalid(
                        "rope_style",
                        format!("is {rope_style}; 0 (NeoX) or 1 (GPT-J)"),
                    ))
                }
            };
            Some(RopeShape {
                style,
                max_position: size_arg("max_position", max_position)?,
            })
        };
        let shape = TreeAttentionShape::new(
            size_arg("num_requests", num_requests)?,
            size_arg("num_tokens", num_tokens)?,
            size_arg("num_q_heads", num_q_heads)?,
            size_arg("max_tree_size", max_tree_size)?,
            cache,
            rope,
        )?;
        match &ctx.backend {
            Backend::Cpu => {
                let batch = TreeBatch {
                    token_offsets: host_slice(
                        "token_offsets",
                        token_offsets,
                        shape.num_requests + 1,
                    )?,
                    parents: host_slice("parents", parents, shape.num_tokens)?,
                    prefix_lens: host_slice("prefix_lens", prefix_lens, shape.num_requests)?,
                    page_table: host_slice("page_table", page_table, shape.page_table_len())?,
                };
                let cos_sin = optional_slice("cos_sin_cache", cos_sin_cache, shape.cos_sin_len())?;
                let lse = optional_slice_mut("lse", lse, shape.lse_len())?;
                let status =
                    optional_slice_mut("request_status", request_status, shape.num_requests)?;
                with_half!(dtype, T => {
                    let cache_len = shape.cache.cache_len();
                    crate::cpu::tree_attention(
                        &shape,
                        host_slice("q", q as *const T, shape.q_len())?,
                        host_slice("k", k as *const T, shape.kv_len())?,
                        host_slice("v", v as *const T, shape.kv_len())?,
                        &batch,
                        cos_sin,
                        softmax_scale,
                        host_slice_mut("k_cache", k_cache as *mut T, cache_len)?,
                        host_slice_mut("v_cache", v_cache as *mut T, cache_len)?,
                        host_slice_mut("out", out as *mut T, shape.q_len())?,
                        lse,
                        status,
                    )
                })
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let ptrs = TreeAttentionDevicePtrs {
                    q: q as u64,
                    k: k as u64,
                    v: v as u64,
                    token_offsets: token_offsets as u64,
                    parents: parents as u64,
                    prefix_lens: prefix_lens as u64,
                    page_table: page_table as u64,
                    k_cache: k_cache as u64,
                    v_cache: v_cache as u64,
                    cos_sin_cache: cos_sin_cache as u64,
                    out: out as u64,
                    lse: lse as u64,
                    request_status: request_status as u64,
                };
                ptrs.check(&shape)?;
                backend.launch_tree_attention(stream as _, &shape, dtype, softmax_scale, &ptrs)
            }
        }
    })
}

/// Moves each request's accepted tree nodes to contiguous cache slots in every layer (see `specdec::attention`):
/// for request `b`, the entries at slot `prefix_lens[b] + accepted_nodes[accepted_offsets[b] + j]` move to slot
/// `prefix_lens[b] + j`; entries already in place are not touched. `k_caches[num_layers]` and
/// `v_caches[num_layers]` are host arrays holding each layer's cache pointer (`[num_pages * page_size *
/// num_kv_heads * head_dim]` 16-bit elements; on a CUDA context device memory, 16-byte aligned, at most 128
/// layers per call). `accepted_offsets[num_requests + 1]`, `accepted_nodes[num_accepted]` (strictly increasing
/// per request, below 64), `prefix_lens[num_requests]`, `page_table[num_requests * pages_per_request]`, and
/// optionally `request_status[num_requests]`, live where the caches do. Errors and `request_status` as
/// `specdec_tree_attention`; a flagged request moves nothing.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, valid for the call (on a CUDA context:
/// until the work on `stream` has finished); `k_caches` and `v_caches` are read during the call only.
#[no_mangle]
pub unsafe extern "C" fn specdec_tree_kv_compact(
    ctx: *const specdec_context,
    k_caches: *const *mut c_void,
    v_caches: *const *mut c_void,
    num_layers: i64,
    num_pages: i64,
    page_size: i64,
    num_kv_heads: i64,
    head_dim: i64,
    pages_per_request: i64,
    num_requests: i64,
    accepted_offsets: *const i32,
    accepted_nodes: *const i32,
    num_accepted: i64,
    prefix_lens: *const i32,
    page_table: *const i32,
    request_status: *mut i32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let cache = paged_cache_arg(
            num_pages,
            page_size,
            num_kv_heads,
            head_dim,
            pages_per_request,
        )?;
        let shape = CompactionShape::new(
            size_arg("num_requests", num_requests)?,
            size_arg("num_layers", num_layers)?,
            size_arg("num_accepted", num_accepted)?,
            cache,
        )?;
        let k_list = host_slice("k_caches", k_caches, shape.num_layers)?;
        let v_list = host_slice("v_caches", v_caches, shape.num_layers)?;
        match &ctx.backend {
            Backend::Cpu => {
                let offsets =
                    host_slice("accepted_offsets", accepted_offsets, shape.num_requests + 1)?;
                let nodes = host_slice("accepted_nodes", accepted_nodes, shape.num_accepted)?;
                let prefix = host_slice("prefix_lens", prefix_lens, shape.num_requests)?;
                let table = host_slice(
                    "page_table",
                    page_table,
                    shape.num_requests * cache.pages_per_request,
                )?;
                let status =
                    optional_slice_mut("request_status", request_status, shape.num_requests)?;
                let layer_slices = |list: &[*mut c_void], name: &str| -> Result<Vec<&mut [u16]>> {
                    list.iter()
                        .enumerate()
                        .map(|(i, &p)| {
                            host_slice_mut(
                                &format!("{name}[{i}]"),
                                p as *mut u16,
                                cache.cache_len(),
                            )
                        })
                        .collect()
                };
                let mut k = layer_slices(k_list, "k_caches")?;
                let mut v = layer_slices(v_list, "v_caches")?;
                crate::cpu::tree_kv_compact(
                    &shape, offsets, nodes, prefix, table, &mut k, &mut v, status,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(backend) => {
                let k: Vec<u64> = k_list.iter().map(|&p| p as u64).collect();
                let v: Vec<u64> = v_list.iter().map(|&p| p as u64).collect();
                let ptrs = CompactionDevicePtrs {
                    k_caches: &k,
                    v_caches: &v,
                    accepted_offsets: accepted_offsets as u64,
                    accepted_nodes: accepted_nodes as u64,
                    prefix_lens: prefix_lens as u64,
                    page_table: page_table as u64,
                    request_status: request_status as u64,
                };
                ptrs.check(&shape)?;
                backend.launch_tree_kv_compact(stream as _, &shape, &ptrs)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
