//! The error type of every fallible specdec call, on every backend and through the C ABI.

use std::fmt;

/// Why a specdec call failed.
///
/// Run-time conditions (no driver, no device, a CUDA error) are errors, never panics. Every variant maps to
/// one fixed C status code (see [`crate::capi::specdec_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// An argument is wrong: a size, a length, a pointer, or the contents of an input array. `argument`
    /// names it as the documentation does (`"draft_offsets[3]"`, `"vocab_size"`).
    InvalidArgument {
        /// The offending argument.
        argument: String,
        /// What is wrong with it.
        reason: String,
    },
    /// This build of specdec has no CUDA kernels: nvcc was not found when it was compiled.
    KernelsNotCompiled,
    /// The CUDA driver library (libcuda) could not be loaded.
    NoDriver,
    /// No CUDA device with this ordinal.
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// The device is older than every architecture compiled into this build.
    UnsupportedArchitecture {
        /// The device ordinal.
        ordinal: usize,
        /// Its compute capability, as major * 10 + minor.
        compute_capability: u32,
        /// The architectures compiled into this build.
        compiled: &'static [u32],
    },
    /// A CUDA driver call failed.
    Cuda {
        /// The driver function, e.g. `"cuLaunchKernel"`.
        call: &'static str,
        /// The CUresult code.
        code: u32,
        /// The CUresult name, e.g. `"CUDA_ERROR_ILLEGAL_ADDRESS"`.
        name: String,
    },
}

/// `Result<T, specdec::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `argument`.
    pub fn invalid(argument: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            argument: argument.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidArgument { argument, reason } => write!(f, "invalid argument `{argument}`: {reason}"),
            Error::KernelsNotCompiled => write!(
                f,
                "CUDA kernels not compiled into this build of specdec (nvcc was not found when it was built; \
                 see scripts/install-nvcc.sh)"
            ),
            Error::NoDriver => write!(f, "the CUDA driver library (libcuda.so) could not be loaded"),
            Error::NoDevice { ordinal, count } => {
                write!(f, "no CUDA device with ordinal {ordinal} (the driver reports {count})")
            }
            Error::UnsupportedArchitecture { ordinal, compute_capability, compiled } => write!(
                f,
                "CUDA device {ordinal} has compute capability {}.{}, older than every architecture in this build \
                 ({compiled:?}); rebuild with SPECDEC_CUDA_ARCHS including it",
                compute_capability / 10,
                compute_capability % 10
            ),
            Error::Cuda { call, code, name } => write!(f, "{call} failed: {name} ({code})"),
        }
    }
}

impl std::error::Error for Error {}

/// Checks that `len` equals `expected`, naming `argument` otherwise.
pub(crate) fn check_len(argument: &str, len: usize, expected: usize) -> Result<()> {
    if len == expected {
        Ok(())
    } else {
        Err(Error::invalid(
            argument,
            format!("has {len} elements, expected {expected}"),
        ))
    }
}

/// The size rules every verification primitive shares, checked before anything runs: `vocab_size` and
/// `emit_width` in `1..=i32::MAX`; token counts (`tokens`, named) and offsets representable as `i32`; and
/// neither the input of `rows` rows (named) of `vocab_size` elements of up to 4 bytes nor the
/// `num_requests x emit_width` outputs overflowing the address space. `rows` is computed by the caller from
/// the other sizes (at most `2 * i32::MAX` here, so it cannot overflow).
pub(crate) fn check_batch_sizes(
    num_requests: usize,
    vocab_size: usize,
    (tokens_name, num_tokens): (&str, usize),
    emit_width: usize,
    rows: impl FnOnce() -> (&'static str, usize),
) -> Result<()> {
    let max = i32::MAX as usize;
    if vocab_size == 0 || vocab_size > max {
        return Err(Error::invalid(
            "vocab_size",
            format!("is {vocab_size}, must be in 1..={max}"),
        ));
    }
    if emit_width == 0 || emit_width > max {
        return Err(Error::invalid(
            "emit_width",
            format!("is {emit_width}, must be in 1..={max}"),
        ));
    }
    if num_tokens > max {
        return Err(Error::invalid(
            tokens_name,
            format!("is {num_tokens}, must be at most {max}"),
        ));
    }
    if num_requests >= max {
        return Err(Error::invalid(
            "num_requests",
            format!("is {num_requests}, must be below {max}"),
        ));
    }
    let (rows_name, rows) = rows();
    if rows > max
        || rows
            .checked_mul(vocab_size)
            .and_then(|n| n.checked_mul(4))
            .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::invalid(
            rows_name,
            format!("{rows} rows of {vocab_size} overflow the address space"),
        ));
    }
    if num_requests
        .checked_mul(emit_width)
        .is_none_or(|n| n > isize::MAX as usize / 4)
    {
        return Err(Error::invalid(
            "emitted_tokens",
            "num_requests * emit_width overflows the address space",
        ));
    }
    Ok(())
}

/// Request `b`'s range `offsets[b] .. offsets[b + 1]` of an array of `limit` elements (`name` is the offsets
/// argument): non-decreasing and inside `0..=limit`, else an error naming the offending element.
pub(crate) fn check_offsets(
    name: &str,
    offsets: &[i32],
    b: usize,
    limit: usize,
) -> Result<(usize, usize)> {
    let (first, last) = (offsets[b], offsets[b + 1]);
    let limit_i = limit as i64;
    if first < 0 || i64::from(first) > limit_i {
        return Err(Error::invalid(
            format!("{name}[{b}]"),
            format!("is {first}, outside 0..={limit}"),
        ));
    }
    if last < first || i64::from(last) > limit_i {
        return Err(Error::invalid(
            format!("{name}[{}]", b + 1),
            format!(
                "is {last}; offsets must be non-decreasing (previous {first}) and at most {limit}"
            ),
        ));
    }
    Ok((first as usize, last as usize))
}

/// [`check_offsets`] for a batch whose requests share one array of `limit` elements between them, in order:
/// besides, the first request starts at 0 and the last one ends at `limit` (`offsets[0] == 0`,
/// `offsets[B] == limit`), so that no element belongs to no request and the rows derived from the offsets line
/// up with the caller's tensors.
pub(crate) fn check_packed_offsets(
    name: &str,
    offsets: &[i32],
    b: usize,
    limit: usize,
) -> Result<(usize, usize)> {
    let (first, last) = check_offsets(name, offsets, b, limit)?;
    if b == 0 && first != 0 {
        return Err(Error::invalid(
            format!("{name}[0]"),
            format!("is {first}; the first request starts at 0"),
        ));
    }
    let num_requests = offsets.len() - 1;
    if b + 1 == num_requests && last != limit {
        return Err(Error::invalid(
            format!("{name}[{num_requests}]"),
            format!("is {last}; the last request ends at the array's end, {limit}"),
        ));
    }
    Ok((first, last))
}
