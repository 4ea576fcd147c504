//! Lossless speculative verification by rejection sampling: chain and tree drafts, with or without the
//! drafter's distributions, from logits (with temperature, top-k, top-p) or from probabilities.
//!
//! # Which algorithm for which drafter
//!
//! | drafter | call | rule at a node |
//! |---|---|---|
//! | a small model sampling a chain (EAGLE-1 chain, a draft model) | chain, with `draft` rows | accept `x` with probability `min(1, p(x)/q(x))`; on rejection draw from `norm(max(0, p - q))` |
//! | n-gram, suffix tree ([`crate::drafter`]), prompt lookup, a greedy draft model | chain, no `draft` rows | the drafts are point masses: accept `x` with probability `p(x)`; on rejection draw from `p` without `x` |
//! | a tree of deterministic children (top-k expansion, suffix-tree branches, EAGLE-2 / SGLang trees) | tree, no `draft` rows | children are point masses tried in order against the current residual |
//! | a tree whose children were drawn i.i.d. from the drafter (SpecInfer) | tree, with `draft` rows | child `j`: accept with `min(1, p'(x_j)/q(x_j))`, else `p' = norm(max(0, p' - q))`; after the last child draw from `p'` |
//!
//! Every rule leaves the target distribution exactly unchanged, provided the drafts were chosen without looking
//! at this call's noise, and (with `draft` rows) each draft token was drawn from the `q` row passed here, after
//! the temperature, top-k and top-p the drafter sampled with (the bug of transformers#47932: a different `q`
//! in the ratio than the one sampled from biases the output). Those are [`VerifyInputs::draft_params`] when
//! they differ from the target's: a drafter that samples its unfiltered softmax (vLLM's default) passes its
//! temperature with top-k and top-p off. A drafted token whose `q` is 0 cannot have been drawn from `q`; it is
//! that request's error, never accepted.
//!
//! Point-mass nodes are computed in an equivalent, single-pass form: the node draws `y ~ p` (from its own
//! noise); the first child whose token is `y` is accepted, and if there is none, `y` is the emitted token. The
//! child tried `i`-th is then accepted with probability `p(x_i)` given that the earlier ones were rejected
//! relative to the residual, which is the sequential rule above, and the emitted token has the residual's law.
//!
//! # Layout
//!
//! **Tree**: request `b` has `T_b = node_offsets[b+1] - node_offsets[b]` nodes (1 to [`MAX_TREE_NODES`]), at
//! global index `g = node_offsets[b] + i`. Node 0 is the last accepted token (its `node_tokens` entry is not
//! read); node `i >= 1` is a draft token `node_tokens[g]` whose parent is `parents[g]`, in `0..i` (`parents` of
//! node 0 must be -1). Children of a node are tried in increasing index order. Target row `g` of
//! `target: [sum T, V]` is the target's distribution after node `i`; draft row `g` of `draft: [sum T, V]` is
//! the distribution node `i`'s children were drawn from (a leaf's row is neither read nor checked).
//!
//! **Chain**: the layout of greedy verification ([`crate::greedy`]): `k_b = draft_offsets[b+1] -
//! draft_offsets[b]` drafts (0 to [`MAX_TREE_NODES`] - 1) at `draft_tokens[draft_offsets[b] ..]`, target rows
//! `draft_offsets[b] + b + j` for `j = 0..=k_b` of `target: [num_draft_tokens + B, V]` ([`chain_target_row`]:
//! each request has one target row more than drafts, its bonus row), draft rows `draft_offsets[b] + j` for
//! `j < k_b` of `draft: [num_draft_tokens, V]` ([`chain_draft_row`]: one per draft). The two strides differ by
//! `b`. It is the tree whose node `j` is the `j`-th draft with parent `j - 1`.
//!
//! # Distributions
//!
//! * **Logits** (fp32, fp16, bf16) with [`SamplingParams`] per request: `z = logit / temperature` (in `f32`),
//!   then top-k keeps `z >= ` the `k`-th largest `z` (ties kept), then top-p keeps, in decreasing order, the
//!   smallest prefix whose softmax mass reaches `top_p` (ties with its last element kept), then softmax. The
//!   draft rows get the same with the draft's parameters ([`VerifyInputs::draft_params`], the target's when
//!   `None`); a draft temperature must be positive (a greedy drafter's drafts are point masses: pass no draft
//!   rows). A logit may be `-inf` (probability 0); NaN and `+inf` are errors, and a row must hold a finite
//!   logit. **Temperature 0** is greedy: the emitted tokens are exactly those of [`crate::cpu::greedy_verify`]
//!   on the target rows. By rule the draft rows and the drafter's parameters are then neither read nor checked,
//!   and top-k and top-p do not change the argmax (their values must still be well-formed).
//! * **Probabilities** (fp32): rows are used as given (finite, non-negative, a target row must have mass); no
//!   sampling parameters. Every row read as a distribution (target rows, draft rows of nodes with children)
//!   must sum to 1 within [`PROBABILITY_SUM_TOLERANCE`] (1e-3): acceptance and the residual assume it.
//!
//! # Randomness
//!
//! Philox keyed by `seeds[b]`, indexed by `steps[b]`, node and token ([`noise`]). The same seed and step give the
//! same noise in any batch slot, by design: several samples of one prompt (a GRPO group) need seeds of their own
//! ([`noise::sample_seed`] derives them), and a request advances its step every decoding step (0 at its first).
//! A request's result depends only on its own inputs, seed and step, on either backend, whatever the batch around it or the GPU (CUDA sums
//! softmax over fixed 8192-token chunks merged in order in f64, and top-p masses as integers). Tokens are drawn by an exponential race, `argmax_x w(x) / E_x` over
//! `w(x) > 0` (probability weights) or `argmax_x z(x) - ln E_x` over kept `x` (log weights, the Gumbel-max
//! form), with `E_x` the node's per-token Exp(1) noise and ties to the lowest index; this needs no
//! normalisation and no prefix sum, so a backend may split the vocabulary any way and get the same token. An
//! acceptance coin `u` in (0, 1) accepts when `u * q(x) < p(x)`, computed exactly in `f64`: a token of zero
//! target probability is never accepted, and `p(x) >= q(x) > 0` always is.
//!
//! The rule that a drafted token has `q > 0` reads `q` after the softmax, so like every comparison with a sum
//! it may go either way between the backends within rounding: a draft logit about 104 below its row's maximum
//! (where `exp` underflows, and Rust's and CUDA's `exp` may differ by an ulp), or a top-p cut within rounding of
//! `top_p`.
//!
//! CPU and CUDA agree bit for bit wherever no normalising constant is needed: point-mass nodes from logits
//! without top-p, and every probability input except a tree node with `draft` rows that rejects two or more
//! children (the residual's mass is a sum). Elsewhere softmax sums are rounded in a backend-specific order, and
//! a draw may differ when a coin or race lands within rounding of a threshold.
//!
//! # Outputs
//!
//! * `accepted_counts: [B]`: `n_b`, the accepted drafts (the path length in the tree).
//! * `emitted_tokens: [B, emit_width]`: the `n_b` accepted tokens, then the correction or bonus token, then
//!   -1. `emit_width` must be at least the depth of every tree (the longest chain) plus one.
//! * `accepted_nodes: [B, emit_width]` (optional): the node indices of the accepted path, then -1.
//! * `accept_flags: [B, emit_width]` (optional): entry `d` is 1 when a child at depth `d + 1` was accepted, 0
//!   when the node at depth `d` had children and all were rejected, -1 when nothing was tried.
//!
//! # Validation
//!
//! Shapes are checked by [`VerifyShape`] before anything runs. Each request follows rules of its own, each with
//! its [`RequestStatus`], reported in this order: offsets, which must cover the drafts or nodes
//! (`offsets[0] = 0` and `offsets[B] = num_tokens`) and give at most [`MAX_TREE_NODES`] nodes (`Offsets`);
//! node by node, parents (`Parents`) and draft ids (`DraftToken`); the depth against `emit_width`
//! (`EmitWidth`); sampling parameters (`SamplingParams`); the rows it reads, NaN or `+inf` logits, negative or
//! NaN probabilities and the like (`RowValues`, [`check_row_values`]); and drafted tokens of zero draft
//! probability (`DraftedTokenMass`, [`check_drafted_token`]).
//!
//! With `request_status` ([`VerifyOutputs::request_status`]), a request that breaks a rule is flagged alone,
//! alike on the CPU and CUDA: its status code, `accepted_counts[b] = `[`REQUEST_INVALID`] and rows of -1; the
//! others are verified. Without it, the CPU backend (and the C ABI on a CPU context) returns the first failing
//! request's [`Error::InvalidArgument`] naming the element and writes nothing, while the CUDA kernels still
//! mark the request with [`REQUEST_INVALID`] and -1. Neither ever reads or writes outside the documented
//! arrays. At temperature 0 the rules and outputs are those of greedy verification ([`crate::greedy`]),
//! bad rows included.

pub mod noise;

use half::{bf16, f16};

use crate::backend::{Backend, In, Out, Stream};
use crate::error::{check_batch_sizes, check_len, check_packed_offsets, Error, Result};
use crate::status::{RequestResult, RequestStatus};
use crate::LogitsElement;

pub use crate::greedy::REQUEST_INVALID;
pub use noise::RequestNoise;

/// The most nodes of one request's tree, its root included: the one maximum of [`crate::tree`] (63 drafts and
/// the last accepted token).
pub use crate::tree::MAX_TREE_NODES;

/// The target or draft rows of a call, as host slices.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HostRows<'a> {
    /// fp32 logits.
    LogitsF32(&'a [f32]),
    /// fp16 logits.
    LogitsF16(&'a [f16]),
    /// bf16 logits.
    LogitsBF16(&'a [bf16]),
    /// fp32 probabilities.
    Probs(&'a [f32]),
}

/// What a call's rows hold, without the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsKind {
    /// fp32 logits.
    LogitsF32,
    /// fp16 logits.
    LogitsF16,
    /// bf16 logits.
    LogitsBF16,
    /// fp32 probabilities.
    Probs,
}

impl RowsKind {
    /// Bytes per element.
    pub fn element_size(self) -> usize {
        match self {
            RowsKind::LogitsF16 | RowsKind::LogitsBF16 => 2,
            RowsKind::LogitsF32 | RowsKind::Probs => 4,
        }
    }

    /// Whether these are logits (else probabilities).
    pub fn is_logits(self) -> bool {
        self != RowsKind::Probs
    }
}

impl HostRows<'_> {
    /// Row `row` (of `vocab_size` elements) as `f32`.
    pub fn row_f32(&self, row: usize, vocab_size: usize) -> Vec<f32> {
        fn convert<T: LogitsElement>(r: &[T], row: usize, v: usize) -> Vec<f32> {
            r[row * v..(row + 1) * v]
                .iter()
                .map(|x| x.to_f32())
                .collect()
        }
        match self {
            HostRows::LogitsF32(r) | HostRows::Probs(r) => {
                r[row * vocab_size..(row + 1) * vocab_size].to_vec()
            }
            HostRows::LogitsF16(r) => convert(r, row, vocab_size),
            HostRows::LogitsBF16(r) => convert(r, row, vocab_size),
        }
    }

    /// [`check_row_values`] on row `row` (of `vocab_size` elements), in its own element type.
    pub fn check_row(
        &self,
        name: &str,
        row: usize,
        vocab_size: usize,
        logits: Option<RowTemperature<'_>>,
        needs_mass: bool,
    ) -> RequestResult<()> {
        let range = row * vocab_size..(row + 1) * vocab_size;
        match self {
            HostRows::LogitsF32(r) | HostRows::Probs(r) => {
                check_row_values(name, &r[range], row, logits, needs_mass)
            }
            HostRows::LogitsF16(r) => check_row_values(name, &r[range], row, logits, needs_mass),
            HostRows::LogitsBF16(r) => check_row_values(name, &r[range], row, logits, needs_mass),
        }
    }
}

/// Per-request sampling parameters of logits inputs (`[B]` each), as host slices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostParams<'a> {
    /// Finite and `>= 0`; 0 is greedy.
    pub temperature: &'a [f32],
    /// `None`, or per request -1 (off) or `1..=V`.
    pub top_k: Option<&'a [i32]>,
    /// `None`, or per request in (0, 1]; 1 is off.
    pub top_p: Option<&'a [f32]>,
}

/// One request's sampling parameters, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// `None` when off.
    pub top_k: Option<usize>,
    /// 1 when off.
    pub top_p: f32,
}

/// How the drafts of a call are laid out, as host slices.
#[derive(Debug, Clone, Copy)]
pub(crate) enum HostDrafts<'a> {
    /// Ragged chains, the layout of greedy verification.
    Chain {
        /// `[B + 1]`.
        draft_offsets: &'a [i32],
        /// `[num_draft_tokens]`.
        draft_tokens: &'a [i32],
    },
    /// Trees as parent arrays.
    Tree {
        /// `[B + 1]`.
        node_offsets: &'a [i32],
        /// `[sum T]`; node 0's entry is not read.
        node_tokens: &'a [i32],
        /// `[sum T]`; -1 for node 0, else in `0..i`.
        parents: &'a [i32],
    },
}

/// The error of an absent `seeds` or `steps` array in a call with requests (a null pointer through C or on a
/// device), with what to pass instead; every entry point reports it alike.
pub(crate) fn missing_noise_array(argument: &str) -> Error {
    let reason = if argument.ends_with("seeds") {
        "is missing: pass a seed per request; the same seed and step give the same noise in any batch slot, so \
         samples meant to differ need different seeds (noise::sample_seed, C: specdec_sample_seed)"
    } else {
        "is missing: pass each request's step counter (0 at its first step, advanced every decoding step); a \
         step reused with the same seed repeats its draws"
    };
    Error::invalid(argument, reason)
}

/// Chain layout: the target row of request `b`'s position `j` (`0..=k_b`, `j = k_b` its bonus row),
/// `draft_offsets[b] + b + j`. `draft_offsets[b]` must be valid (non-negative).
pub fn chain_target_row(draft_offsets: &[i32], b: usize, j: usize) -> usize {
    draft_offsets[b] as usize + b + j
}

/// Chain layout: the draft row that request `b`'s draft `j` was drawn from (`0..k_b`), `draft_offsets[b] + j`.
/// `draft_offsets[b]` must be valid (non-negative).
pub fn chain_draft_row(draft_offsets: &[i32], b: usize, j: usize) -> usize {
    draft_offsets[b] as usize + j
}

/// The request a row belongs to, as the CUDA kernels find it (`RowOwner` in `cuda/rejection_sampling.cu`): a
/// binary search for the last request whose rows start at or before the row, accepted only if that request's
/// offsets are valid and the row lies in its range. With valid offsets everywhere this is the row's true request;
/// when another request's offsets are broken, the search may land on that one instead, and the request whose
/// row it is gets [`RequestStatus::Offsets`], on every backend. `draft` says whether `row` indexes the draft
/// rows; `offsets` are the draft or node offsets.
pub fn row_owner(shape: &VerifyShape, offsets: &[i32], draft: bool, row: usize) -> Option<usize> {
    if shape.num_requests == 0 {
        return None;
    }
    let tree = shape.tree;
    let start = |b: usize| {
        let first = i64::from(offsets[b]);
        if draft || tree {
            first
        } else {
            first + b as i64
        }
    };
    let row = row as i64;
    let (mut lo, mut hi) = (0, shape.num_requests - 1);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if start(mid) <= row {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let name = if tree {
        "node_offsets"
    } else {
        "draft_offsets"
    };
    let (first, last) = check_packed_offsets(name, offsets, lo, shape.num_tokens).ok()?;
    let nodes = last - first + usize::from(!tree);
    if nodes == 0 || nodes > MAX_TREE_NODES {
        return None;
    }
    let count = if draft { last - first } else { nodes } as i64;
    (row >= start(lo) && row < start(lo) + count).then_some(lo)
}

/// The target or draft rows of a call, in the memory of the [`Backend`] it runs on.
pub enum Rows<'a> {
    /// fp32 logits.
    LogitsF32(In<'a, f32>),
    /// fp16 logits.
    LogitsF16(In<'a, f16>),
    /// bf16 logits.
    LogitsBF16(In<'a, bf16>),
    /// fp32 probabilities.
    Probs(In<'a, f32>),
}

impl<'a> Rows<'a> {
    /// The kind of these rows.
    pub fn kind(&self) -> RowsKind {
        match self {
            Rows::LogitsF32(_) => RowsKind::LogitsF32,
            Rows::LogitsF16(_) => RowsKind::LogitsF16,
            Rows::LogitsBF16(_) => RowsKind::LogitsBF16,
            Rows::Probs(_) => RowsKind::Probs,
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Rows::LogitsF32(r) | Rows::Probs(r) => r.len(),
            Rows::LogitsF16(r) => r.len(),
            Rows::LogitsBF16(r) => r.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether these are logits (else probabilities).
    pub fn is_logits(&self) -> bool {
        self.kind().is_logits()
    }

    /// The host view, or an error naming `argument` if the rows are device memory.
    pub(crate) fn host(&self, argument: &str) -> Result<HostRows<'a>> {
        Ok(match self {
            Rows::LogitsF32(r) => HostRows::LogitsF32(r.host(argument)?),
            Rows::LogitsF16(r) => HostRows::LogitsF16(r.host(argument)?),
            Rows::LogitsBF16(r) => HostRows::LogitsBF16(r.host(argument)?),
            Rows::Probs(r) => HostRows::Probs(r.host(argument)?),
        })
    }

    /// The device address, checked non-null and aligned, or an error naming `argument`.
    #[cfg(feature = "cuda")]
    pub(crate) fn device(&self, argument: &str) -> Result<u64> {
        match self {
            Rows::LogitsF32(r) | Rows::Probs(r) => r.device(argument),
            Rows::LogitsF16(r) => r.device(argument),
            Rows::LogitsBF16(r) => r.device(argument),
        }
    }
}

/// Per-request sampling parameters of logits inputs (`[B]` each), in the memory of the [`Backend`].
pub struct SamplingParams<'a> {
    /// Finite and `>= 0`; 0 is greedy.
    pub temperature: In<'a, f32>,
    /// `None`, or per request -1 (off) or `1..=V`.
    pub top_k: Option<In<'a, i32>>,
    /// `None`, or per request in (0, 1]; 1 is off.
    pub top_p: Option<In<'a, f32>>,
}

impl<'a> SamplingParams<'a> {
    fn host(&self, prefix: &str) -> Result<HostParams<'a>> {
        Ok(HostParams {
            temperature: self.temperature.host(&format!("{prefix}temperature"))?,
            top_k: self
                .top_k
                .as_ref()
                .map(|k| k.host(&format!("{prefix}top_k")))
                .transpose()?,
            top_p: self
                .top_p
                .as_ref()
                .map(|p| p.host(&format!("{prefix}top_p")))
                .transpose()?,
        })
    }
}

/// How the drafts of a call are laid out, in the memory of the [`Backend`].
pub enum Drafts<'a> {
    /// Ragged chains, the layout of greedy verification.
    Chain {
        /// `[B + 1]`.
        draft_offsets: In<'a, i32>,
        /// `[num_draft_tokens]`.
        draft_tokens: In<'a, i32>,
    },
    /// Trees as parent arrays.
    Tree {
        /// `[B + 1]`.
        node_offsets: In<'a, i32>,
        /// `[sum T]`; node 0's entry is not read.
        node_tokens: In<'a, i32>,
        /// `[sum T]`; -1 for node 0, else in `0..i`.
        parents: In<'a, i32>,
    },
}

impl<'a> Drafts<'a> {
    fn host(&self) -> Result<HostDrafts<'a>> {
        Ok(match self {
            Drafts::Chain {
                draft_offsets,
                draft_tokens,
            } => HostDrafts::Chain {
                draft_offsets: draft_offsets.host("draft_offsets")?,
                draft_tokens: draft_tokens.host("draft_tokens")?,
            },
            Drafts::Tree {
                node_offsets,
                node_tokens,
                parents,
            } => HostDrafts::Tree {
                node_offsets: node_offsets.host("node_offsets")?,
                node_tokens: node_tokens.host("node_tokens")?,
                parents: parents.host("parents")?,
            },
        })
    }
}

/// Everything a verification call reads, in the memory of the [`Backend`] it runs on.
pub struct VerifyInputs<'a> {
    /// `V`.
    pub vocab_size: usize,
    /// The drafts and their layout.
    pub drafts: Drafts<'a>,
    /// Target rows: one per node (tree) or per draft plus one per request (chain).
    pub target: Rows<'a>,
    /// Draft rows, of the same kind as `target`, or `None` for point-mass drafts.
    pub draft: Option<Rows<'a>>,
    /// Required with logits, `None` with probabilities.
    pub params: Option<SamplingParams<'a>>,
    /// The temperature, top-k and top-p the drafter sampled its drafts with, applied to the draft rows (`None`:
    /// the target's `params`). Logits with draft rows only; the temperature must be positive.
    pub draft_params: Option<SamplingParams<'a>>,
    /// `[B]`: the Philox key of each request. Several samples of one prompt need different seeds
    /// ([`noise::sample_seed`]): the same seed and step give the same noise in any batch slot.
    pub seeds: In<'a, u64>,
    /// `[B]`: each request's step counter, 0 at its first step and advanced every decoding step.
    pub steps: In<'a, u64>,
}

impl<'a> VerifyInputs<'a> {
    /// The host view, or an error naming the first array in device memory.
    pub(crate) fn host(&self) -> Result<HostInputs<'a>> {
        Ok(HostInputs {
            drafts: self.drafts.host()?,
            target: self.target.host("target")?,
            draft: self.draft.as_ref().map(|d| d.host("draft")).transpose()?,
            params: self.params.as_ref().map(|p| p.host("")).transpose()?,
            draft_params: self
                .draft_params
                .as_ref()
                .map(|p| p.host("draft_"))
                .transpose()?,
            seeds: self.seeds.host("seeds")?,
            steps: self.steps.host("steps")?,
        })
    }
}

/// Everything a verification call writes, in the memory of the [`Backend`] it runs on.
pub struct VerifyOutputs<'a> {
    /// The row length of the `[B, emit_width]` outputs.
    pub emit_width: usize,
    /// `[B]`.
    pub accepted_counts: Out<'a, i32>,
    /// `[B, emit_width]`.
    pub emitted_tokens: Out<'a, i32>,
    /// `[B, emit_width]`, optional.
    pub accepted_nodes: Option<Out<'a, i32>>,
    /// `[B, emit_width]`, optional.
    pub accept_flags: Option<Out<'a, i8>>,
    /// `[B]`, optional: each request's [`RequestStatus`] code. When given, a request that breaks a rule is
    /// flagged alone on every backend (see [`crate::status`]).
    pub request_status: Option<Out<'a, i32>>,
}

impl VerifyOutputs<'_> {
    /// The host view, or an error naming the first array in device memory.
    fn host(&mut self) -> Result<HostOutputs<'_>> {
        Ok(HostOutputs {
            accepted_counts: self.accepted_counts.host_mut("accepted_counts")?,
            emitted_tokens: self.emitted_tokens.host_mut("emitted_tokens")?,
            accepted_nodes: self
                .accepted_nodes
                .as_mut()
                .map(|n| n.host_mut("accepted_nodes"))
                .transpose()?,
            accept_flags: self
                .accept_flags
                .as_mut()
                .map(|f| f.host_mut("accept_flags"))
                .transpose()?,
            request_status: self
                .request_status
                .as_mut()
                .map(|s| s.host_mut("request_status"))
                .transpose()?,
        })
    }
}

impl Backend {
    /// Rejection-sampling verification of chains or trees; see the [module documentation](self) for the
    /// layouts, semantics, rules and randomness, and [`crate::backend`] for memory and streams.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming a size, a length, the kinds of rows and parameters, an array in the
    /// wrong memory, a null or misaligned device pointer, and (CPU backend without `request_status`) the first
    /// bad request; CUDA errors from the launch.
    ///
    /// `outputs` is taken by value: its arrays are borrowed until the call returns (on CUDA, until cudarc has
    /// recorded the launch on their streams), so the caller reads them right after.
    pub fn rejection_verify(
        &self,
        stream: Stream<'_>,
        inputs: &VerifyInputs<'_>,
        mut outputs: VerifyOutputs<'_>,
    ) -> Result<()> {
        let shape = VerifyShape::of(inputs, &outputs)?;
        match self {
            Backend::Cpu => {
                let _ = stream;
                crate::cpu::sampling::rejection_verify_checked(
                    &shape,
                    &inputs.host()?,
                    &mut outputs.host()?,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => {
                let ptrs = crate::cuda::sampling::SamplingDevicePtrs::of(inputs, &outputs)?;
                ptrs.check(&shape)?;
                let stream = Backend::cu_stream(cuda, stream)?;
                cuda.launch_rejection_verify(stream, &shape, &ptrs)
            }
        }
    }
}

/// Everything a verification call reads, as host slices: the CPU backend's view.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HostInputs<'a> {
    /// The drafts and their layout.
    pub drafts: HostDrafts<'a>,
    /// Target rows: one per node (tree) or per draft plus one per request (chain).
    pub target: HostRows<'a>,
    /// Draft rows, of the same kind as `target`, or `None` for point-mass drafts.
    pub draft: Option<HostRows<'a>>,
    /// Required with logits, `None` with probabilities.
    pub params: Option<HostParams<'a>>,
    /// The temperature, top-k and top-p the drafter sampled its drafts with, applied to the draft rows (`None`:
    /// the target's `params`). Logits with draft rows only; the temperature must be positive.
    pub draft_params: Option<HostParams<'a>>,
    /// `[B]`: the Philox key of each request. Several samples of one prompt need different seeds
    /// ([`noise::sample_seed`]): the same seed and step give the same noise in any batch slot.
    pub seeds: &'a [u64],
    /// `[B]`: each request's step counter, 0 at its first step and advanced every decoding step.
    pub steps: &'a [u64],
}

/// Everything a verification call writes, as host slices: the CPU backend's view.
#[derive(Debug)]
pub(crate) struct HostOutputs<'a> {
    /// `[B]`.
    pub accepted_counts: &'a mut [i32],
    /// `[B, emit_width]`.
    pub emitted_tokens: &'a mut [i32],
    /// `[B, emit_width]`, optional.
    pub accepted_nodes: Option<&'a mut [i32]>,
    /// `[B, emit_width]`, optional.
    pub accept_flags: Option<&'a mut [i8]>,
    /// `[B]`, optional: each request's [`RequestStatus`] code. When given, a request that breaks a rule is
    /// flagged alone on every backend (see [`crate::status`]).
    pub request_status: Option<&'a mut [i32]>,
}

/// The validated sizes of a verification call; constructing one is the only way into a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyShape {
    /// `B`.
    pub num_requests: usize,
    /// `V`.
    pub vocab_size: usize,
    /// Chain: draft tokens; tree: nodes.
    pub num_tokens: usize,
    /// Whether the drafts are trees.
    pub tree: bool,
    /// Row length of the `[B, emit_width]` outputs.
    pub emit_width: usize,
}

impl VerifyShape {
    /// Checks the sizes: `V` and `emit_width` at least 1, ids and offsets representable as `i32`, no array
    /// overflowing the address space.
    pub fn new(
        num_requests: usize,
        vocab_size: usize,
        num_tokens: usize,
        tree: bool,
        emit_width: usize,
    ) -> Result<Self> {
        let shape = VerifyShape {
            num_requests,
            vocab_size,
            num_tokens,
            tree,
            emit_width,
        };
        let tokens = if tree {
            "num_nodes"
        } else {
            "num_draft_tokens"
        };
        check_batch_sizes(
            num_requests,
            vocab_size,
            (tokens, num_tokens),
            emit_width,
            || ("target", shape.target_rows()),
        )?;
        Ok(shape)
    }

    /// Rows of `target`.
    pub fn target_rows(&self) -> usize {
        if self.tree {
            self.num_tokens
        } else {
            self.num_tokens + self.num_requests
        }
    }

    /// Rows of `draft`: one per node (tree) or per draft token (chain).
    pub fn draft_rows(&self) -> usize {
        self.num_tokens
    }

    /// Elements of each `[B, emit_width]` output.
    pub fn output_len(&self) -> usize {
        self.num_requests * self.emit_width
    }

    /// The shape of `inputs` and `outputs`, with every length and the kinds of rows and parameters checked.
    pub fn of(inputs: &VerifyInputs<'_>, outputs: &VerifyOutputs<'_>) -> Result<Self> {
        let (offsets, tokens, tree) = match &inputs.drafts {
            Drafts::Chain {
                draft_offsets,
                draft_tokens,
            } => (draft_offsets, draft_tokens.len(), false),
            Drafts::Tree {
                node_offsets,
                node_tokens,
                parents,
            } => {
                check_len("parents", parents.len(), node_tokens.len())?;
                (node_offsets, node_tokens.len(), true)
            }
        };
        let offsets_name = if tree {
            "node_offsets"
        } else {
            "draft_offsets"
        };
        let num_requests = offsets.len().checked_sub(1).ok_or_else(|| {
            Error::invalid(offsets_name, "is empty; it needs num_requests + 1 elements")
        })?;
        let shape = Self::new(
            num_requests,
            inputs.vocab_size,
            tokens,
            tree,
            outputs.emit_width,
        )?;
        shape.check_inputs(inputs)?;
        shape.check_outputs(outputs)?;
        Ok(shape)
    }

    fn check_inputs(&self, inputs: &VerifyInputs<'_>) -> Result<()> {
        let b = self.num_requests;
        check_len(
            "target",
            inputs.target.len(),
            self.target_rows() * self.vocab_size,
        )?;
        if let Some(draft) = &inputs.draft {
            if draft.kind() != inputs.target.kind() {
                return Err(Error::invalid(
                    "draft",
                    "must be of the same kind (logits dtype or probabilities) as target",
                ));
            }
            check_len("draft", draft.len(), self.draft_rows() * self.vocab_size)?;
        }
        match (inputs.target.is_logits(), &inputs.params) {
            (true, None) => {
                return Err(Error::invalid("params", "logits need sampling parameters (temperature at least)"))
            }
            (false, Some(_)) => {
                return Err(Error::invalid(
                    "params",
                    "probabilities take no sampling parameters: apply temperature, top-k and top-p before",
                ))
            }
            (true, Some(p)) => {
                check_len("temperature", p.temperature.len(), b)?;
                if let Some(top_k) = &p.top_k {
                    check_len("top_k", top_k.len(), b)?;
                }
                if let Some(top_p) = &p.top_p {
                    check_len("top_p", top_p.len(), b)?;
                }
            }
            (false, None) => {}
        }
        if let Some(p) = &inputs.draft_params {
            if inputs.draft.is_none() || !inputs.target.is_logits() {
                return Err(Error::invalid(
                    "draft_params",
                    "apply to draft logits only: pass None without draft rows or with probabilities",
                ));
            }
            check_len("draft_temperature", p.temperature.len(), b)?;
            if let Some(top_k) = &p.top_k {
                check_len("draft_top_k", top_k.len(), b)?;
            }
            if let Some(top_p) = &p.top_p {
                check_len("draft_top_p", top_p.len(), b)?;
            }
        }
        check_len("seeds", inputs.seeds.len(), b)?;
        check_len("steps", inputs.steps.len(), b)
    }

    fn check_outputs(&self, outputs: &VerifyOutputs<'_>) -> Result<()> {
        check_len(
            "accepted_counts",
            outputs.accepted_counts.len(),
            self.num_requests,
        )?;
        check_len(
            "emitted_tokens",
            outputs.emitted_tokens.len(),
            self.output_len(),
        )?;
        if let Some(nodes) = &outputs.accepted_nodes {
            check_len("accepted_nodes", nodes.len(), self.output_len())?;
        }
        if let Some(flags) = &outputs.accept_flags {
            check_len("accept_flags", flags.len(), self.output_len())?;
        }
        if let Some(status) = &outputs.request_status {
            check_len("request_status", status.len(), self.num_requests)?;
        }
        Ok(())
    }
}

/// One node of a request's tree, with where its rows are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Node {
    /// The draft token (node 0: not used, -1).
    pub token: i32,
    /// The parent's index (node 0: -1).
    pub parent: i32,
    /// Its row in `target`.
    pub target_row: usize,
    /// Its row in `draft`, or `None` for a chain's last node (which has no children).
    pub draft_row: Option<usize>,
}

/// Request `b`'s tree and parameters, checked.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckedRequest {
    /// Node 0 (the root) first, then the drafts in index order.
    pub nodes: Vec<Node>,
    /// The target rows' parameters (logits), `None` for probabilities.
    pub params: Option<RequestParams>,
    /// The draft rows' parameters (logits with draft rows): [`VerifyInputs::draft_params`] or `params`.
    pub draft_params: Option<RequestParams>,
}

/// Request `b`'s tree and parameters, checked: the rules every backend applies (the CUDA kernels check the
/// same per request). Row contents, and that each drafted token has probability under its draft row, are
/// checked by the backend with [`check_row_values`] and [`check_drafted_token`].
pub(crate) fn check_request(
    shape: &VerifyShape,
    inputs: &HostInputs<'_>,
    b: usize,
) -> RequestResult<CheckedRequest> {
    let offsets = |error| RequestStatus::Offsets.with(error);
    let nodes = match inputs.drafts {
        HostDrafts::Chain {
            draft_offsets,
            draft_tokens,
        } => {
            let (first, last) =
                check_packed_offsets("draft_offsets", draft_offsets, b, shape.num_tokens)
                    .map_err(offsets)?;
            let k = last - first;
            if k + 1 > MAX_TREE_NODES {
                return Err(RequestStatus::Offsets.failure(
                    format!("draft_offsets[{}]", b + 1),
                    format!(
                        "gives request {b} {k} drafts; at most {} are supported",
                        MAX_TREE_NODES - 1
                    ),
                ));
            }
            let mut nodes = vec![Node {
                token: -1,
                parent: -1,
                target_row: chain_target_row(draft_offsets, b, 0),
                draft_row: Some(chain_draft_row(draft_offsets, b, 0)),
            }];
            for j in 1..=k {
                nodes.push(Node {
                    token: draft_tokens[first + j - 1],
                    parent: j as i32 - 1,
                    target_row: chain_target_row(draft_offsets, b, j),
                    draft_row: (j < k).then_some(chain_draft_row(draft_offsets, b, j)),
                });
            }
            if k == 0 {
                nodes[0].draft_row = None;
            }
            for (j, node) in nodes.iter().enumerate().skip(1) {
                check_token(shape, "draft_tokens", first + j - 1, node.token)?;
            }
            nodes
        }
        HostDrafts::Tree {
            node_offsets,
            node_tokens,
            parents,
        } => {
            let (first, last) =
                check_packed_offsets("node_offsets", node_offsets, b, shape.num_tokens)
                    .map_err(offsets)?;
            let t = last - first;
            if t == 0 || t > MAX_TREE_NODES {
                return Err(RequestStatus::Offsets.failure(
                    format!("node_offsets[{}]", b + 1),
                    format!("gives request {b} {t} nodes; a tree has 1..={MAX_TREE_NODES} (its root included)"),
                ));
            }
            let mut nodes = Vec::with_capacity(t);
            for i in 0..t {
                let g = first + i;
                let parent = parents[g];
                crate::tree::parent_rule(i, parent).map_err(|rule| {
                    RequestStatus::Parents.failure(
                        format!("parents[{g}]"),
                        format!("is {parent}; node {i} of request {b}: {rule}"),
                    )
                })?;
                let token = if i == 0 { -1 } else { node_tokens[g] };
                if i > 0 {
                    check_token(shape, "node_tokens", g, token)?;
                }
                nodes.push(Node {
                    token,
                    parent,
                    target_row: g,
                    draft_row: Some(g),
                });
            }
            nodes
        }
    };
    let mut depth = vec![0usize; nodes.len()];
    for i in 1..nodes.len() {
        depth[i] = depth[nodes[i].parent as usize] + 1;
    }
    let max_depth = depth.iter().copied().max().unwrap_or(0);
    if max_depth + 1 > shape.emit_width {
        return Err(RequestStatus::EmitWidth.failure(
            "emit_width",
            format!(
                "is {}, but request {b} has a path of {max_depth} drafts and emits up to {}",
                shape.emit_width,
                max_depth + 1
            ),
        ));
    }
    let params = inputs
        .params
        .map(|p| check_params(shape, &p, b, ""))
        .transpose()?;
    // At temperature 0 the draft rows and the drafter's parameters are not read, so they are not checked.
    let greedy = params.is_some_and(|p| p.temperature == 0.0);
    let draft_params = match &inputs.draft_params {
        _ if greedy => None,
        Some(p) => {
            let checked = check_params(shape, p, b, "draft_")?;
            if checked.temperature == 0.0 {
                return Err(RequestStatus::SamplingParams.failure(
                    format!("draft_temperature[{b}]"),
                    "is 0; a greedy drafter's drafts are point masses: pass no draft rows",
                ));
            }
            Some(checked)
        }
        None if inputs.draft.is_some() => params,
        None => None,
    };
    Ok(CheckedRequest {
        nodes,
        params,
        draft_params,
    })
}

/// The rule that a drafted token was drawn from its draft row: `q`, the probability of `token` under the draft
/// row of its parent (after the draft's temperature, top-k and top-p), must be positive. `name[index]` is where
/// the token is (`draft_tokens` or `node_tokens`).
pub fn check_drafted_token(
    name: &str,
    index: usize,
    token: i32,
    q: f32,
    draft_row: usize,
) -> RequestResult<()> {
    if q > 0.0 {
        return Ok(());
    }
    Err(RequestStatus::DraftedTokenMass.failure(
        format!("{name}[{index}]"),
        format!(
            "is {token}, which has probability {q} under draft row {draft_row} (after the draft's temperature, \
             top-k and top-p): it cannot have been drawn from it"
        ),
    ))
}

fn check_token(shape: &VerifyShape, name: &str, index: usize, token: i32) -> RequestResult<()> {
    if token < 0 || token as usize >= shape.vocab_size {
        return Err(RequestStatus::DraftToken.failure(
            format!("{name}[{index}]"),
            format!(
                "is {token}, outside the vocabulary 0..{} (padding with -1 is not a draft)",
                shape.vocab_size
            ),
        ));
    }
    Ok(())
}

/// Request `b`'s parameters from `p`; `prefix` ("" or "draft_") names the arrays in errors.
fn check_params(
    shape: &VerifyShape,
    p: &HostParams<'_>,
    b: usize,
    prefix: &str,
) -> RequestResult<RequestParams> {
    let temperature = p.temperature[b];
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(RequestStatus::SamplingParams.failure(
            format!("{prefix}temperature[{b}]"),
            format!("is {temperature}, must be finite and >= 0 (0 is greedy)"),
        ));
    }
    let top_k = match p.top_k.map(|k| k[b]) {
        None | Some(-1) => None,
        Some(k) if k >= 1 && k as usize <= shape.vocab_size => Some(k as usize),
        Some(k) => {
            return Err(RequestStatus::SamplingParams.failure(
                format!("{prefix}top_k[{b}]"),
                format!("is {k}, must be -1 (off) or in 1..={}", shape.vocab_size),
            ))
        }
    };
    let top_p = p.top_p.map_or(1.0, |t| t[b]);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(RequestStatus::SamplingParams.failure(
            format!("{prefix}top_p[{b}]"),
            format!("is {top_p}, must be in (0, 1] (1 is off)"),
        ));
    }
    Ok(RequestParams {
        temperature,
        top_k,
        top_p,
    })
}

/// The temperature a row of logits is divided by, and where it comes from (for errors).
#[derive(Debug, Clone, Copy)]
pub struct RowTemperature<'a> {
    /// `temperature` or `draft_temperature`.
    pub name: &'a str,
    /// The request `b`.
    pub request: usize,
    /// `name[b]`.
    pub temperature: f32,
}

/// What one pass over a row finds (most rows break no rule, and [`check_row_values`] then reads them once).
struct RowScan {
    nan_or_positive_infinity: bool,
    below_zero: bool,
    above_zero: bool,
    above_negative_infinity: bool,
    /// The largest `|x|` over finite values (0 if none).
    largest_finite_magnitude: f32,
}

impl RowScan {
    fn of<T: LogitsElement>(values: &[T]) -> RowScan {
        #[cfg(target_arch = "x86_64")]
        match crate::cpu::simd::Kernel::detect() {
            // SAFETY: the CPU has AVX-512F and AVX2 (detected).
            crate::cpu::simd::Kernel::Avx512 => return unsafe { Self::of_avx512(values) },
            // SAFETY: the CPU has AVX2 (detected).
            crate::cpu::simd::Kernel::Avx2Fma => return unsafe { Self::of_avx2(values) },
            crate::cpu::simd::Kernel::Portable => {}
        }
        Self::of_lanes(values)
    }

    /// # Safety
    /// The CPU must have AVX-512F and AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn of_avx512<T: LogitsElement>(values: &[T]) -> RowScan {
        Self::of_lanes(values)
    }

    /// # Safety
    /// The CPU must have AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn of_avx2<T: LogitsElement>(values: &[T]) -> RowScan {
        Self::of_lanes(values)
    }

    #[inline(always)]
    fn of_lanes<T: LogitsElement>(values: &[T]) -> RowScan {
        let mut lanes = ScanLanes::default();
        let chunks = values.chunks_exact(SCAN_LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (lane, x) in chunk.iter().enumerate() {
                lanes.add(lane, x.to_f32());
            }
        }
        for (lane, x) in tail.iter().enumerate() {
            lanes.add(lane, x.to_f32());
        }
        let largest = lanes
            .largest
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let smallest = lanes.smallest.iter().copied().fold(f32::INFINITY, f32::min);
        RowScan {
            nan_or_positive_infinity: lanes.nan.contains(&1.0) || largest == f32::INFINITY,
            below_zero: smallest < 0.0,
            above_zero: largest > 0.0,
            above_negative_infinity: largest > f32::NEG_INFINITY,
            largest_finite_magnitude: lanes.magnitude.iter().copied().fold(0.0, f32::max),
        }
    }
}

const SCAN_LANES: usize = 16;

/// Four running values per lane, in 16 lanes so that the scan vectorises: the largest and smallest value and the
/// largest finite magnitude (comparisons that a NaN fails leave them alone), and whether a NaN was seen (1).
struct ScanLanes {
    largest: [f32; SCAN_LANES],
    smallest: [f32; SCAN_LANES],
    magnitude: [f32; SCAN_LANES],
    nan: [f32; SCAN_LANES],
}

impl Default for ScanLanes {
    fn default() -> Self {
        ScanLanes {
            largest: [f32::NEG_INFINITY; SCAN_LANES],
            smallest: [f32::INFINITY; SCAN_LANES],
            magnitude: [0.0; SCAN_LANES],
            nan: [0.0; SCAN_LANES],
        }
    }
}

impl ScanLanes {
    #[inline(always)]
    fn add(&mut self, lane: usize, x: f32) {
        let largest = &mut self.largest[lane];
        *largest = if x > *largest { x } else { *largest };
        let smallest = &mut self.smallest[lane];
        *smallest = if x < *smallest { x } else { *smallest };
        let finite = if x.abs() < f32::INFINITY {
            x.abs()
        } else {
            0.0
        };
        let magnitude = &mut self.magnitude[lane];
        *magnitude = if finite > *magnitude {
            finite
        } else {
            *magnitude
        };
        let nan = &mut self.nan[lane];
        *nan = if x.is_nan() { 1.0 } else { *nan };
    }
}

/// How far a probability row read as a distribution may sum from 1: far above the rounding of an f32 softmax
/// (about 1e-6 at V = 262144), far below any real mistake (a row of another scale, a missing normalisation).
pub const PROBABILITY_SUM_TOLERANCE: f64 = 1e-3;

/// Checks the values of row `row` (`name` is `target` or `draft`): logits may not be NaN or `+inf`, and
/// probabilities must be finite and non-negative; a row that is read as a distribution (`needs_mass`: every
/// target row, and the draft row of a node with children) needs a finite logit or a positive probability, and
/// as probabilities must sum to 1 within [`PROBABILITY_SUM_TOLERANCE`] (acceptance and the residual assume it).
/// `logits` is `None` for probabilities, else the temperature the row is divided by: with a positive
/// temperature, `logit / temperature` must stay finite.
pub fn check_row_values<T: LogitsElement>(
    name: &str,
    values: &[T],
    row: usize,
    logits: Option<RowTemperature<'_>>,
    needs_mass: bool,
) -> RequestResult<()> {
    let bad = |i: usize, x: f32, why: &str| {
        Err(RequestStatus::RowValues
            .failure(format!("{name}[{row}, {i}]"), format!("is {x}: {why}")))
    };
    // A first pass finds whether the row breaks a rule (most rows do not); only then is it searched for the
    // first value that does, to name it.
    let scan = RowScan::of(values);
    match logits {
        Some(RowTemperature {
            name: temperature_name,
            request: b,
            temperature,
        }) => {
            // x / t is monotone in |x|, so it overflows for some finite x exactly when it does for the largest.
            let overflows =
                temperature > 0.0 && (scan.largest_finite_magnitude / temperature).is_infinite();
            if scan.nan_or_positive_infinity || overflows {
                for (i, x) in values.iter().map(|x| x.to_f32()).enumerate() {
                    if x.is_nan() || x == f32::INFINITY {
                        return bad(i, x, "logits may not be NaN or +inf");
                    }
                    if temperature > 0.0 && x.is_finite() && (x / temperature).is_infinite() {
                        return Err(RequestStatus::RowValues.failure(
                            format!("{temperature_name}[{b}]"),
                            format!(
                                "is {temperature}: {name}[{row}, {i}] = {x} divided by it overflows f32"
                            ),
                        ));
                    }
                }
            }
            if needs_mass && !scan.above_negative_infinity {
                return Err(RequestStatus::RowValues
                    .failure(format!("{name}[{row}]"), "has no finite logit"));
            }
        }
        None => {
            if scan.nan_or_positive_infinity || scan.below_zero {
                for (i, x) in values.iter().map(|x| x.to_f32()).enumerate() {
                    if !(x.is_finite() && x >= 0.0) {
                        return bad(i, x, "probabilities must be finite and >= 0");
                    }
                }
            }
            if needs_mass && !scan.above_zero {
                return Err(RequestStatus::RowValues
                    .failure(format!("{name}[{row}]"), "has no probability mass"));
            }
            let sum: f64 = values.iter().map(|x| f64::from(x.to_f32())).sum();
            if needs_mass && (sum - 1.0).abs() > PROBABILITY_SUM_TOLERANCE {
                return Err(RequestStatus::RowValues.failure(
                    format!("{name}[{row}]"),
                    format!(
                        "sums to {sum}; a probability row must sum to 1 (within {PROBABILITY_SUM_TOLERANCE})"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// The scan against its definition, value by value, on rows of every length up to two chunks and a tail,
    /// with every special value at every position, on every dtype.
    fn scan_matches_its_definition<T: LogitsElement>(from: impl Fn(f32) -> T) {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            -3.5,
            2.25,
            6.0e4,
            -6.0e4,
        ];
        for len in 1..=40 {
            for at in 0..len {
                for &special in &specials {
                    let row: Vec<T> = (0..len)
                        .map(|i| {
                            from(if i == at {
                                special
                            } else {
                                (i % 5) as f32 * 0.5 - 1.0
                            })
                        })
                        .collect();
                    let values: Vec<f32> = row.iter().map(|x| x.to_f32()).collect();
                    let scan = RowScan::of(&row);
                    let want_magnitude = values
                        .iter()
                        .filter(|x| x.is_finite())
                        .fold(0.0f32, |m, x| m.max(x.abs()));
                    let context = format!("{:?} len {len} {special} at {at}", T::DTYPE);
                    assert_eq!(
                        scan.nan_or_positive_infinity,
                        values.iter().any(|x| x.is_nan() || *x == f32::INFINITY),
                        "{context}"
                    );
                    assert_eq!(
                        scan.below_zero,
                        values.iter().any(|x| *x < 0.0),
                        "{context}"
                    );
                    assert_eq!(
                        scan.above_zero,
                        values.iter().any(|x| *x > 0.0),
                        "{context}"
                    );
                    assert_eq!(
                        scan.above_negative_infinity,
                        values.iter().any(|x| *x > f32::NEG_INFINITY),
                        "{context}"
                    );
                    assert_eq!(scan.largest_finite_magnitude, want_magnitude, "{context}");
                }
            }
        }
    }

    #[test]
    fn the_row_scan_finds_what_its_definition_finds() {
        scan_matches_its_definition(|x| x);
        scan_matches_its_definition(f16::from_f32);
        scan_matches_its_definition(bf16::from_f32);
    }
}
