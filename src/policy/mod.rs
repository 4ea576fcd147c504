//! Host-side speculation policy: when speculation pays, and how long drafts should be.
//!
//! Speculation pays only when verification is nearly free: at small active batch, late in a rollout, for
//! requests whose drafts are accepted. This module holds the pieces an engine calls every decoding step:
//!
//! * [`CostModel`]: the time of one target decode step, one draft step and one verification step, from a
//!   roofline (bytes over bandwidth, FLOPs over the matrix rate, for a named [`Gpu`] and [`ModelShape`], with an
//!   int4 self-drafter) plus per-step overheads, which [`CostModel::fit`] calibrates from measured step times by
//!   least squares.
//! * [`AcceptanceStats`]: per-request, per-position acceptance from verification results (moving averages,
//!   with a fitted per-position decay).
//! * [`expected_tokens`]: tokens emitted per verification step for a draft length and per-position acceptance.
//! * [`EfficientRollout`]: EfficientRollout's speculation toggle and draft-length ladder, as published.
//! * [`choose_draft_lengths`] and [`choose_draft_trees`]: specdec's policy, per-request draft lengths or tree
//!   budgets maximising expected emitted tokens per second under the cost model; [`DraftTree`] and the
//!   sibling law of [`child_acceptance`] say what a tree of a sampling drafter is expected to emit.

mod acceptance;
mod cost;
mod efficient_rollout;
mod goodput;
mod simulate;
pub mod tree;

pub use acceptance::AcceptanceStats;
pub use cost::{CostModel, FitReport, Gpu, ModelShape, Overheads, StepKind, StepSample};
pub use efficient_rollout::{EfficientRollout, EfficientRolloutConfig};
pub use goodput::{
    choose_draft_lengths, choose_draft_options, choose_draft_trees, goodput, shaped_step_seconds,
    step_seconds, DraftOption, DraftShape, RequestOutlook,
};
pub use simulate::{
    simulate, ActiveRequest, Autoregressive, Draft, FixedDraft, GoodputDraft, GoodputTreeDraft,
    LengthClassDraft, RolloutConfig, RolloutTotals, SimulationReport, SpeculationPolicy,
    StepRecord,
};
pub use tree::{
    child_acceptance, recursive_rejection_misses, sibling_exponent, DraftTree, MIN_REACH,
};

/// Expected tokens emitted by one verification step of a `k`-token draft whose `j`-th token (1-based) is
/// accepted, given all before it were, with probability `acceptance(j)`: `1 + sum_{j=1..k} prod_{m<=j} a_m`
/// (the accepted drafts, plus the correction or bonus token).
pub fn expected_tokens(k: usize, acceptance: impl Fn(usize) -> f64) -> f64 {
    let mut survive = 1.0;
    let mut total = 1.0;
    for j in 1..=k {
        survive *= acceptance(j);
        total += survive;
    }
    total
}

/// Per-position acceptance decaying from `a0`: `a_j = a0 * exp(-beta * (j - 1))` (the form DAS fits).
pub fn decaying_acceptance(a0: f64, beta: f64) -> impl Fn(usize) -> f64 {
    move |j| a0 * (-beta * (j as f64 - 1.0)).exp()
}
