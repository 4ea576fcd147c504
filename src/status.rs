//! One per-request status for every batched primitive: the rule a request broke, as a code a kernel can write.
//!
//! Greedy verification, rejection sampling, tree attention and KV compaction check each request of a batch by
//! rules of their own (offsets, parents, draft ids, rows of logits...). Each rule has one [`RequestStatus`],
//! and the function that checks it builds a [`RequestFailure`]: the status code and the [`Error`] naming the
//! offending element, together, so that the code a CUDA kernel writes and the message the CPU backend returns
//! cannot drift apart.
//!
//! Every batched call takes an optional `request_status: [B]` output (`i32`, these codes). When it is given,
//! a request that breaks a rule is flagged alone, alike on every backend: its status is written, its outputs
//! are the family's "invalid" values (`accepted_counts[b] = -1` and rows of -1 for verification, NaN rows for
//! attention, nothing moved for compaction), the other requests are processed, and the call succeeds. When it
//! is not given, the CPU backend fails the whole call with the first failing request's [`Error`] and writes
//! nothing, while a CUDA kernel, which cannot report to the host without synchronising, still marks the
//! request in the family's outputs.

use std::fmt;

use crate::error::{check_len, Error, Result};

/// The rule a request broke: the value written to `request_status[b]` (0 when the request was processed).
///
/// The codes are fixed and only ever appended to; the C ABI names them `SPECDEC_REQUEST_*`. When a request
/// breaks several rules, the first in this order is reported, on every backend: its offsets, then node by
/// node its parents and draft ids, then the output width and the sampling parameters, then its rows (their
/// owner: `Offsets` when the search for a row's request, misled by another request's broken offsets, does
/// not give the row to it; then their values), then the drafted tokens' mass (verification); for attention,
/// its offsets and rows' owner, its parents, its prefix and pages, its positions. The order is the checks'
/// order, not the codes'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum RequestStatus {
    /// The request was processed.
    Ok = 0,
    /// Its offsets (`draft_offsets`, `node_offsets`, `token_offsets`, `accepted_offsets`) are out of order or
    /// out of range, do not cover the array, or give it more drafts or nodes than supported.
    Offsets = 1,
    /// A parent breaks the tree's parent rule (or accepted nodes are not strictly increasing in `0..64`).
    Parents = 2,
    /// `prefix_lens[b]` is negative, or the prefix and tree do not fit the request's pages.
    PrefixLen = 3,
    /// A page-table entry the request uses is outside `0..num_pages`.
    PageTable = 4,
    /// A node's RoPE position `L_b + depth` is at or beyond `max_position`.
    RopePosition = 5,
    /// A draft token is outside the vocabulary `0..V` (-1 padding is not a draft).
    DraftToken = 6,
    /// The request's longest path plus one is more than `emit_width`.
    EmitWidth = 7,
    /// A sampling parameter (target's or drafter's temperature, top-k, top-p) is out of its range.
    SamplingParams = 8,
    /// A row the request reads is unusable: a NaN or `+inf` logit, no finite logit, a logit that overflows when
    /// divided by the temperature, or probabilities that are negative, NaN, massless or do not sum to 1.
    RowValues = 9,
    /// A drafted token has probability 0 under the draft row it was drawn from.
    DraftedTokenMass = 10,
}

impl RequestStatus {
    /// Every status, in code order.
    pub const ALL: [RequestStatus; 11] = [
        RequestStatus::Ok,
        RequestStatus::Offsets,
        RequestStatus::Parents,
        RequestStatus::PrefixLen,
        RequestStatus::PageTable,
        RequestStatus::RopePosition,
        RequestStatus::DraftToken,
        RequestStatus::EmitWidth,
        RequestStatus::SamplingParams,
        RequestStatus::RowValues,
        RequestStatus::DraftedTokenMass,
    ];

    /// The code written to `request_status[b]`.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The status of a code, or `None` for a value that is not one.
    pub fn from_code(code: i32) -> Option<Self> {
        usize::try_from(code)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
    }

    /// A short name, e.g. `"row_values"`.
    pub fn name(self) -> &'static str {
        match self {
            RequestStatus::Ok => "ok",
            RequestStatus::Offsets => "offsets",
            RequestStatus::Parents => "parents",
            RequestStatus::PrefixLen => "prefix_len",
            RequestStatus::PageTable => "page_table",
            RequestStatus::RopePosition => "rope_position",
            RequestStatus::DraftToken => "draft_token",
            RequestStatus::EmitWidth => "emit_width",
            RequestStatus::SamplingParams => "sampling_params",
            RequestStatus::RowValues => "row_values",
            RequestStatus::DraftedTokenMass => "drafted_token_mass",
        }
    }

    /// A [`RequestFailure`] of this rule carrying `error`.
    pub fn with(self, error: Error) -> RequestFailure {
        RequestFailure {
            status: self,
            error,
        }
    }

    /// A [`RequestFailure`] of this rule for `argument` (named as the documentation does).
    pub fn failure(self, argument: impl Into<String>, reason: impl Into<String>) -> RequestFailure {
        RequestFailure {
            status: self,
            error: Error::invalid(argument, reason),
        }
    }
}

impl fmt::Display for RequestStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request that broke a rule: its status code and the error naming the offending element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFailure {
    /// The rule, as written to `request_status[b]`.
    pub status: RequestStatus,
    /// The [`Error::InvalidArgument`] the CPU backend returns when no `request_status` is given.
    pub error: Error,
}

impl From<RequestFailure> for Error {
    fn from(failure: RequestFailure) -> Self {
        failure.error
    }
}

impl fmt::Display for RequestFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.error, self.status)
    }
}

impl std::error::Error for RequestFailure {}

/// A per-request check's result.
pub type RequestResult<T> = std::result::Result<T, RequestFailure>;

/// The `request_status` contract on a batch's checks (see the module documentation): without `request_status`, the
/// first bad request's error fails the call; with it, each request's status (the failures as `None`), for
/// [`write_statuses`] once nothing else can fail. Checks `request_status`'s length.
pub(crate) fn settle<R>(
    checked: Vec<RequestResult<R>>,
    request_status: Option<&[i32]>,
) -> Result<(Vec<Option<R>>, Vec<RequestStatus>)> {
    match request_status {
        None => {
            let requests = checked.into_iter().collect::<RequestResult<Vec<R>>>()?;
            let statuses = vec![RequestStatus::Ok; requests.len()];
            Ok((requests.into_iter().map(Some).collect(), statuses))
        }
        Some(status) => {
            check_len("request_status", status.len(), checked.len())?;
            Ok(checked
                .into_iter()
                .map(|result| match result {
                    Ok(request) => (Some(request), RequestStatus::Ok),
                    Err(failure) => (None, failure.status),
                })
                .unzip())
        }
    }
}

pub(crate) fn write_statuses(statuses: &[RequestStatus], request_status: Option<&mut [i32]>) {
    if let Some(out) = request_status {
        for (slot, status) in out.iter_mut().zip(statuses) {
            *slot = status.code();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_dense() {
        for (i, status) in RequestStatus::ALL.iter().enumerate() {
            assert_eq!(status.code(), i as i32);
            assert_eq!(RequestStatus::from_code(i as i32), Some(*status));
        }
        assert_eq!(RequestStatus::from_code(-1), None);
        assert_eq!(
            RequestStatus::from_code(RequestStatus::ALL.len() as i32),
            None
        );
    }

    #[test]
    fn a_failure_converts_to_its_error() {
        let failure = RequestStatus::Parents.failure("parents[3]", "is 5");
        let error: Error = failure.clone().into();
        assert_eq!(error, Error::invalid("parents[3]", "is 5"));
        assert!(failure.to_string().contains("(parents)"));
    }
}

/// The CUDA kernels' copy of the codes (`RequestStatusCode` in `cuda/common.cuh`), read from the source and
/// checked entry by entry: `kRequestRowValues = 9` must be [`RequestStatus::RowValues`].
#[cfg(test)]
mod cuda_codes {
    use super::RequestStatus;

    #[test]
    fn the_kernels_list_every_status_with_its_code() {
        let source = include_str!("../cuda/common.cuh");
        let start = source
            .find("enum RequestStatusCode")
            .expect("RequestStatusCode in cuda/common.cuh");
        let body = &source[start..start + source[start..].find("};").unwrap()];
        let entries: Vec<(String, i32)> = body
            .lines()
            .filter_map(|line| {
                let (name, value) = line.trim().trim_end_matches(',').split_once(" = ")?;
                Some((
                    name.strip_prefix("kRequest")?.to_string(),
                    value.parse().ok()?,
                ))
            })
            .collect();
        let expected: Vec<(String, i32)> = RequestStatus::ALL
            .iter()
            .map(|s| (format!("{s:?}"), s.code()))
            .collect();
        assert_eq!(entries, expected);
    }
}
