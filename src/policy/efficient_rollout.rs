//! EfficientRollout's speculation toggle and draft-length ladder, as published (arXiv 2606.18967).
//!
//! * Toggle, checked before every scheduler step while speculation is off: turn it on when the cost model's
//!   predicted speedup `L / (gamma * T_draft / T_target + T_verify / T_target)` reaches `margin` (1.05), where
//!   `L` is the previous rollout's measured mean acceptance length (tokens per verification step; before any
//!   rollout, a cold-start value from gamma). Once on, it stays on until the next rollout.
//! * Ladder of draft lengths (5, 7, 9, 11): after each rollout, the acceptance rate (accepted / drafted over the
//!   rollout) at or above `promote_at` (0.94) two rollouts in a row moves one rung up; at or below `demote_at`
//!   (0.85) two in a row moves one rung down. A rollout that drafted nothing leaves the ladder as it is.

use super::{expected_tokens, CostModel};
use crate::error::{Error, Result};

/// EfficientRollout's published settings, and the cold-start assumption.
#[derive(Debug, Clone, PartialEq)]
pub struct EfficientRolloutConfig {
    /// Draft lengths, ascending.
    pub ladder: Vec<usize>,
    /// Acceptance rate at or above which a rollout counts towards moving up.
    pub promote_at: f64,
    /// Acceptance rate at or below which a rollout counts towards moving down.
    pub demote_at: f64,
    /// Rollouts in a row needed to move.
    pub streak: usize,
    /// Predicted speedup needed to turn speculation on.
    pub margin: f64,
    /// Per-token acceptance assumed before any rollout was measured: the cold-start mean acceptance length is
    /// `expected_tokens(gamma, this)`. (The paper uses a table from gamma that it does not print.)
    pub cold_start_acceptance: f64,
}

impl Default for EfficientRolloutConfig {
    fn default() -> Self {
        EfficientRolloutConfig {
            ladder: vec![5, 7, 9, 11],
            promote_at: 0.94,
            demote_at: 0.85,
            streak: 2,
            margin: 1.05,
            cold_start_acceptance: 0.8,
        }
    }
}

/// The toggle and ladder state across steps and rollouts.
#[derive(Debug, Clone)]
pub struct EfficientRollout {
    config: EfficientRolloutConfig,
    rung: usize,
    high_streak: usize,
    low_streak: usize,
    measured_length: Option<f64>,
    on: bool,
}

impl EfficientRollout {
    /// Starts at the lowest rung, speculation off.
    pub fn new(config: EfficientRolloutConfig) -> Result<Self> {
        if config.ladder.is_empty()
            || config.ladder.windows(2).any(|w| w[0] >= w[1])
            || config.ladder[0] == 0
        {
            return Err(Error::invalid(
                "ladder",
                "must be non-empty, positive and strictly increasing",
            ));
        }
        if !(0.0..=1.0).contains(&config.demote_at)
            || !(config.demote_at..=1.0).contains(&config.promote_at)
        {
            return Err(Error::invalid(
                "promote_at",
                "needs 0 <= demote_at <= promote_at <= 1",
            ));
        }
        if config.streak == 0 {
            return Err(Error::invalid("streak", "is 0"));
        }
        Ok(EfficientRollout {
            config,
            rung: 0,
            high_streak: 0,
            low_streak: 0,
            measured_length: None,
            on: false,
        })
    }

    /// The current draft length.
    pub fn gamma(&self) -> usize {
        self.config.ladder[self.rung]
    }

    /// Whether speculation is on for the rest of this rollout.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// The mean acceptance length the toggle uses: the previous rollout's, or the cold-start value.
    pub fn acceptance_length(&self) -> f64 {
        self.measured_length
            .unwrap_or_else(|| expected_tokens(self.gamma(), |_| self.config.cold_start_acceptance))
    }

    /// Before a scheduler step with `batch` active sequences holding `context_tokens`: whether to speculate
    /// (with [`EfficientRollout::gamma`] draft tokens for every sequence).
    pub fn step(&mut self, cost: &CostModel, batch: usize, context_tokens: usize) -> bool {
        if !self.on && batch > 0 {
            let speedup = cost.predicted_speedup(
                batch,
                context_tokens,
                self.gamma(),
                self.acceptance_length(),
            );
            self.on = speedup >= self.config.margin;
        }
        self.on
    }

    /// After a rollout: `accepted` of `drafted` draft tokens were accepted, and `emitted` tokens came out of
    /// `verify_steps` verification steps. Moves the ladder, records the mean acceptance length, and turns
    /// speculation off for the next rollout.
    pub fn end_rollout(&mut self, accepted: u64, drafted: u64, emitted: u64, verify_steps: u64) {
        self.on = false;
        if verify_steps > 0 {
            self.measured_length = Some(emitted as f64 / verify_steps as f64);
        }
        if drafted == 0 {
            return;
        }
        let rate = accepted as f64 / drafted as f64;
        self.high_streak = if rate >= self.config.promote_at {
            self.high_streak + 1
        } else {
            0
        };
        self.low_streak = if rate <= self.config.demote_at {
            self.low_streak + 1
        } else {
            0
        };
        if self.high_streak >= self.config.streak && self.rung + 1 < self.config.ladder.len() {
            self.rung += 1;
            self.high_streak = 0;
        } else if self.low_streak >= self.config.streak && self.rung > 0 {
            self.rung -= 1;
            self.low_streak = 0;
        }
    }
}
