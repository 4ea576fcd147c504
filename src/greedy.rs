//! Greedy verification: what it computes, its layout, and the validation shared by every backend.
//!
//! # Semantics
//!
//! A batch of `B` requests; request `b` drafted `k_b = draft_offsets[b+1] - draft_offsets[b]` tokens (ragged,
//! 0 allowed), stored at `draft_tokens[draft_offsets[b] .. draft_offsets[b+1]]`. The target scored `k_b + 1`
//! positions of it: rows `draft_offsets[b] + b + j`, `j = 0..=k_b`, of `logits: [num_draft_tokens + B, V]`
//! (row-major, any of fp32, fp16, bf16).
//!
//! With `a_j` the argmax of row `j` (ties go to the lowest index), the request accepts the longest prefix of
//! drafts with `draft[j] == a_j`, `n_b` of them, and emits `n_b + 1` tokens: `a_0 .. a_{n_b}`, i.e. the
//! accepted drafts, then the target's token at the first mismatch, or the bonus token after all `k_b` drafts.
//!
//! This is rejection sampling at temperature 0 ([`crate::sampling`]), and the two agree exactly, bad requests
//! included: the same outputs and the same [`RequestStatus`] for every chain of at most
//! [`crate::tree::MAX_DRAFTS`] drafts (the sampler's limit; greedy verification has none).
//!
//! # Outputs
//!
//! * `accepted_counts: [B]`: `n_b`.
//! * `emitted_tokens: [B, emit_width]`: row `b` holds the `n_b + 1` emitted tokens, then `-1` up to
//!   `emit_width`. `emit_width` must be at least `k_b + 1` for every request (the longest draft plus one).
//! * `request_status: [B]` (optional): 0, or the [`RequestStatus`] code of the rule request `b` broke.
//!
//! # Validation
//!
//! Sizes and lengths are checked before anything runs, on every backend ([`GreedyShape`]). Each request
//! follows per-request rules, reported in this order ([`GreedyShape::check_request`],
//! [`GreedyShape::check_row`]): `0 <= draft_offsets[b] <= draft_offsets[b+1] <= num_draft_tokens`, the offsets
//! covering the drafts (`draft_offsets[0] = 0` and `draft_offsets[B] = num_draft_tokens`, checked with the
//! first and the last request) ([`RequestStatus::Offsets`]); every draft id in `[0, V)`
//! ([`RequestStatus::DraftToken`]); `k_b + 1 <= emit_width` ([`RequestStatus::EmitWidth`]); its rows its own
//! ([`RequestStatus::Offsets`] again: another request's broken offsets can make two requests claim one row,
//! and [`GreedyShape::row_owner`] gives it to one at most, as the sampler does); and each of its
//! `k_b + 1` rows free of NaN and `+inf` with at least one finite logit ([`RequestStatus::RowValues`]: the
//! argmax of such a row means nothing, and the sampler refuses it too).
//!
//! A request that breaks a rule is flagged alone when `request_status` is given, alike on every backend: its
//! status is written, `accepted_counts[b] = `[`REQUEST_INVALID`], its row of `emitted_tokens` is -1, and the
//! others are verified. Without `request_status` the CPU backend returns the first failing request's
//! [`Error::InvalidArgument`] naming the element and writes nothing, while the CUDA kernel (which cannot report
//! without synchronising) still marks the request with [`REQUEST_INVALID`] and -1. Neither ever reads or writes
//! outside the documented arrays, whatever the contents.

use crate::backend::{optional_host, Backend, In, Out, Stream};
use crate::dtype::LogitsElement;
use crate::error::{check_batch_sizes, check_len, check_packed_offsets, Error, Result};
use crate::status::{RequestResult, RequestStatus};

/// The value of `accepted_counts[b]` for a request that broke a rule (see [`RequestStatus`]).
pub const REQUEST_INVALID: i32 = -1;

/// Everything greedy verification reads, in the memory of the [`Backend`] it runs on.
pub struct GreedyInputs<'a, T> {
    /// `[num_draft_tokens + B, V]`: row `draft_offsets[b] + b + j` is request `b`'s target position `j`.
    pub logits: In<'a, T>,
    /// `V`, the row length of `logits`.
    pub vocab_size: usize,
    /// `[B + 1]`: request `b`'s drafts are `draft_tokens[draft_offsets[b] .. draft_offsets[b + 1]]`.
    pub draft_offsets: In<'a, i32>,
    /// `[num_draft_tokens]`: token ids in `[0, V)`.
    pub draft_tokens: In<'a, i32>,
}

/// Everything greedy verification writes, in the memory of the [`Backend`] it runs on.
pub struct GreedyOutputs<'a> {
    /// The row length of `emitted_tokens`: at least the longest draft plus one.
    pub emit_width: usize,
    /// `[B]`: `n_b`, or [`REQUEST_INVALID`].
    pub accepted_counts: Out<'a, i32>,
    /// `[B, emit_width]`: the emitted tokens, then -1.
    pub emitted_tokens: Out<'a, i32>,
    /// `[B]`, optional: each request's [`RequestStatus`] code; when given, a bad request is flagged alone.
    pub request_status: Option<Out<'a, i32>>,
}

impl<T> GreedyInputs<'_, T> {
    /// The call's shape, with every array's length checked against it: the one size check of every backend.
    pub fn shape(&self, outputs: &GreedyOutputs<'_>) -> Result<GreedyShape> {
        let shape = GreedyShape::from_lengths(
            self.vocab_size,
            self.draft_offsets.len(),
            self.draft_tokens.len(),
            outputs.emit_width,
        )?;
        shape.check_lengths(
            self.logits.len(),
            self.draft_offsets.len(),
            self.draft_tokens.len(),
            outputs.accepted_counts.len(),
            outputs.emitted_tokens.len(),
        )?;
        shape.check_status_len(outputs.request_status.as_ref().map(Out::len))?;
        Ok(shape)
    }
}

impl Backend {
    /// Greedy verification of a batch of drafted chains; see the [module documentation](crate::greedy) for the
    /// layout, semantics and rules, and [`crate::backend`] for memory and streams.
    ///
    /// `outputs` is taken by value, so the borrows of its arrays end with the call.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument for a size, a length, an array in the wrong memory, a null
    /// or misaligned device pointer, and (CPU backend without `request_status`) the first bad request; CUDA
    /// errors from the launch.
    pub fn greedy_verify<T: LogitsElement>(
        &self,
        stream: Stream<'_>,
        inputs: &GreedyInputs<'_, T>,
        outputs: GreedyOutputs<'_>,
    ) -> Result<()> {
        let shape = inputs.shape(&outputs)?;
        match self {
            Backend::Cpu => {
                let _ = stream;
                crate::cpu::greedy::verify(
                    &shape,
                    inputs.logits.host("logits")?,
                    inputs.draft_offsets.host("draft_offsets")?,
                    inputs.draft_tokens.host("draft_tokens")?,
                    outputs.accepted_counts.host("accepted_counts")?,
                    outputs.emitted_tokens.host("emitted_tokens")?,
                    optional_host(outputs.request_status, "request_status")?,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => {
                let ptrs = crate::cuda::greedy::GreedyDevicePtrs {
                    logits: inputs.logits.device("logits")?,
                    draft_offsets: inputs.draft_offsets.device("draft_offsets")?,
                    draft_tokens: inputs.draft_tokens.device("draft_tokens")?,
                    accepted_counts: outputs.accepted_counts.device("accepted_counts")?,
                    emitted_tokens: outputs.emitted_tokens.device("emitted_tokens")?,
                    request_status: crate::backend::optional_device(
                        &outputs.request_status,
                        "request_status",
                    )?,
                };
                let stream = Backend::cu_stream(cuda, stream)?;
                cuda.launch_greedy_verify(stream, &shape, T::DTYPE, &ptrs)
            }
        }
    }
}

/// The validated sizes of one greedy-verification call. Constructing one is the only way into any backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GreedyShape {
    /// `B`, the number of requests.
    pub num_requests: usize,
    /// `V`, the vocabulary size (the row length of the logits).
    pub vocab_size: usize,
    /// The total number of draft tokens (the length of `draft_tokens`).
    pub num_draft_tokens: usize,
    /// The row length of `emitted_tokens`.
    pub emit_width: usize,
}

impl GreedyShape {
    /// Checks the sizes: `vocab_size` and `emit_width` at least 1, token ids and offsets representable as
    /// `i32`, and no array size overflowing the address space.
    pub fn new(
        num_requests: usize,
        vocab_size: usize,
        num_draft_tokens: usize,
        emit_width: usize,
    ) -> Result<Self> {
        let shape = GreedyShape {
            num_requests,
            vocab_size,
            num_draft_tokens,
            emit_width,
        };
        check_batch_sizes(
            num_requests,
            vocab_size,
            ("num_draft_tokens", num_draft_tokens),
            emit_width,
            || ("logits", shape.num_rows()),
        )?;
        Ok(shape)
    }

    /// The shape implied by slice lengths: `B = draft_offsets.len() - 1`.
    pub fn from_lengths(
        vocab_size: usize,
        draft_offsets_len: usize,
        num_draft_tokens: usize,
        emit_width: usize,
    ) -> Result<Self> {
        let num_requests = draft_offsets_len.checked_sub(1).ok_or_else(|| {
            Error::invalid(
                "draft_offsets",
                "is empty; it needs num_requests + 1 elements",
            )
        })?;
        Self::new(num_requests, vocab_size, num_draft_tokens, emit_width)
    }

    /// Rows of the logits tensor: one per draft token plus one bonus row per request.
    pub fn num_rows(&self) -> usize {
        self.num_draft_tokens + self.num_requests
    }

    /// Elements of the logits tensor.
    pub fn logits_len(&self) -> usize {
        self.num_rows() * self.vocab_size
    }

    /// Elements of `emitted_tokens`.
    pub fn emitted_len(&self) -> usize {
        self.num_requests * self.emit_width
    }

    /// Checks the lengths of all five arrays against the shape (`request_status`, when given, is checked by
    /// [`check_status_len`](Self::check_status_len)).
    pub fn check_lengths(
        &self,
        logits: usize,
        draft_offsets: usize,
        draft_tokens: usize,
        accepted: usize,
        emitted: usize,
    ) -> Result<()> {
        check_len("logits", logits, self.logits_len())?;
        check_len("draft_offsets", draft_offsets, self.num_requests + 1)?;
        check_len("draft_tokens", draft_tokens, self.num_draft_tokens)?;
        check_len("accepted_counts", accepted, self.num_requests)?;
        check_len("emitted_tokens", emitted, self.emitted_len())
    }

    /// Checks the length of the optional `request_status` output.
    pub fn check_status_len(&self, request_status: Option<usize>) -> Result<()> {
        request_status.map_or(Ok(()), |len| {
            check_len("request_status", len, self.num_requests)
        })
    }

    /// Checks request `b`'s offsets, draft ids and width, in that order, and returns its drafts. The CUDA
    /// kernel applies the same rules (`GreedyRequestStatus` in `cuda/greedy_verify.cu`).
    pub fn check_request<'a>(
        &self,
        b: usize,
        draft_offsets: &[i32],
        draft_tokens: &'a [i32],
    ) -> RequestResult<&'a [i32]> {
        let (first, last) =
            check_packed_offsets("draft_offsets", draft_offsets, b, self.num_draft_tokens)
                .map_err(|error| RequestStatus::Offsets.with(error))?;
        let drafts = &draft_tokens[first..last];
        if let Some(j) = drafts
            .iter()
            .position(|&t| t < 0 || t as usize >= self.vocab_size)
        {
            return Err(RequestStatus::DraftToken.failure(
                format!("draft_tokens[{}]", first + j),
                format!(
                    "is {}, outside the vocabulary 0..{} (padding with -1 is not a draft)",
                    drafts[j], self.vocab_size
                ),
            ));
        }
        if drafts.len() + 1 > self.emit_width {
            return Err(RequestStatus::EmitWidth.failure(
                "emit_width",
                format!(
                    "is {}, but request {b} has {} drafts and emits up to {}",
                    self.emit_width,
                    drafts.len(),
                    drafts.len() + 1
                ),
            ));
        }
        Ok(drafts)
    }

    /// The request whose rows hold logits row `row`, as the CUDA kernel finds it (`GreedyRowOwner`): the last
    /// request whose rows start (`draft_offsets[b] + b`) at or before it, accepted only if that request's offsets
    /// are valid and the row lies in its range. With valid offsets everywhere this is the row's request; when
    /// another request's offsets are broken, two requests may claim one row, and the one the search does not
    /// give it to is flagged [`RequestStatus::Offsets`] (after its drafts and width, before its rows' values):
    /// the rule and order of the sampler's `sampling::row_owner`, so that temperature 0 agrees here too.
    pub fn row_owner(&self, draft_offsets: &[i32], row: usize) -> Option<usize> {
        if self.num_requests == 0 {
            return None;
        }
        let start = |b: usize| i64::from(draft_offsets[b]) + b as i64;
        let (mut lo, mut hi) = (0, self.num_requests - 1);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if start(mid) <= row as i64 {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let (first, last) =
            check_packed_offsets("draft_offsets", draft_offsets, lo, self.num_draft_tokens).ok()?;
        (first + lo..=last + lo).contains(&row).then_some(lo)
    }

    /// Checks that every logits row of request `b` (`first_row ..= first_row + num_drafts`) is its own
    /// ([`GreedyShape::row_owner`]).
    pub fn check_row_owners(
        &self,
        b: usize,
        draft_offsets: &[i32],
        first_row: usize,
        num_drafts: usize,
    ) -> RequestResult<()> {
        for row in first_row..=first_row + num_drafts {
            let owner = self.row_owner(draft_offsets, row);
            if owner != Some(b) {
                return Err(RequestStatus::Offsets.failure(
                    format!("draft_offsets[{b}]"),
                    format!(
                        "gives request {b} logits row {row}, which the offsets give to {}: another request's \
                         offsets are broken, and no row may belong to two requests",
                        owner.map_or("no request".to_string(), |o| format!("request {o}"))
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks logits row `row` given its largest element `max` (in specdec's argmax order, where a NaN is
    /// above `+inf`) at index `at`: the row may hold no NaN and no `+inf`, and needs a finite logit, so its
    /// maximum must be finite. The CUDA kernel applies the same rule to the same maximum.
    pub fn check_row<T: LogitsElement>(&self, row: usize, max: T, at: usize) -> RequestResult<()> {
        let max = max.to_f32();
        if max.is_nan() || max == f32::INFINITY {
            return Err(RequestStatus::RowValues.failure(
                format!("logits[{row}, {at}]"),
                format!("is {max}: logits may not be NaN or +inf"),
            ));
        }
        if max == f32::NEG_INFINITY {
            return Err(
                RequestStatus::RowValues.failure(format!("logits[{row}]"), "has no finite logit")
            );
        }
        Ok(())
    }
}
