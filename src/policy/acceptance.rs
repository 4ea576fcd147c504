//! Per-request acceptance statistics, fed from verification results.
//!
//! A verification of `drafted` tokens that accepted `accepted` of them says: positions `1..=accepted` were
//! accepted, position `accepted + 1` (if it was drafted) was rejected, and later positions were never tried
//! (a chain stops at its first rejection). Each position keeps an exponential moving average of its indicator,
//! so its estimate is the acceptance of position `j` given that all before it were accepted, tracking the
//! request (and the policy) as they drift. [`AcceptanceStats::decay`] fits `a_j = a0 * exp(-beta * (j - 1))`,
//! the per-position decay DAS models, to the estimates.

use crate::error::{Error, Result};

/// Moving-average acceptance per draft position for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct AcceptanceStats {
    weight: f64,
    prior: f64,
    /// Per position (index j - 1): the moving average and how many times the position was tried.
    positions: Vec<(f64, u64)>,
}

impl AcceptanceStats {
    /// Statistics for up to `max_positions` draft positions, each starting at `prior`, with each new indicator
    /// weighted `weight` in (0, 1] in its position's moving average.
    pub fn new(max_positions: usize, prior: f64, weight: f64) -> Result<Self> {
        if max_positions == 0 {
            return Err(Error::invalid("max_positions", "is 0"));
        }
        if !(0.0..=1.0).contains(&prior) {
            return Err(Error::invalid(
                "prior",
                format!("is {prior}, outside [0, 1]"),
            ));
        }
        if !(weight > 0.0 && weight <= 1.0) {
            return Err(Error::invalid(
                "weight",
                format!("is {weight}, outside (0, 1]"),
            ));
        }
        Ok(AcceptanceStats {
            weight,
            prior,
            positions: vec![(prior, 0); max_positions],
        })
    }

    /// Records one chain verification: `accepted` of `drafted` draft tokens were accepted. Positions beyond
    /// `max_positions` are not tracked.
    pub fn record(&mut self, drafted: usize, accepted: usize) -> Result<()> {
        if accepted > drafted {
            return Err(Error::invalid(
                "accepted",
                format!("is {accepted}, more than the {drafted} drafted"),
            ));
        }
        let tried = (accepted + 1).min(drafted);
        for (j, (average, count)) in self.positions.iter_mut().enumerate().take(tried) {
            let indicator = if j < accepted { 1.0 } else { 0.0 };
            *average += self.weight * (indicator - *average);
            *count += 1;
        }
        Ok(())
    }

    /// Records per-position accept indicators as the rejection sampler reports them: `indicators[j]` for draft
    /// position `j + 1`, ending at the first rejection.
    pub fn record_indicators(&mut self, indicators: &[bool]) -> Result<()> {
        let accepted = indicators.iter().take_while(|&&a| a).count();
        if indicators[accepted..].len() > 1 {
            return Err(Error::invalid(
                "indicators",
                "continue past the first rejection; a chain stops there",
            ));
        }
        self.record(indicators.len(), accepted)
    }

    /// A step in which the request was not verified: every estimate moves `weight` of the way back to the
    /// prior. Without it, a request whose estimate once fell low enough that no policy drafts for it would
    /// never be observed again, and never drafted for again; with it, it is retried after a while.
    pub fn forget(&mut self, weight: f64) {
        for (average, _) in &mut self.positions {
            *average += weight.clamp(0.0, 1.0) * (self.prior - *average);
        }
    }

    /// The estimated acceptance of position `j` (1-based) given all before it were accepted. A position never
    /// tried takes the estimate of the deepest tried position before it (the prior if none was tried): without
    /// that, positions past the drafts a policy has chosen so far would keep the prior forever, and a policy
    /// choosing from these estimates would never learn that longer drafts pay. Positions past the last tracked
    /// one use the last tracked position's estimate.
    pub fn acceptance(&self, j: usize) -> f64 {
        let index = j.clamp(1, self.positions.len()) - 1;
        self.positions[..=index]
            .iter()
            .rev()
            .find(|(_, tried)| *tried > 0)
            .map_or(self.prior, |(average, _)| *average)
    }

    /// How many verifications tried position `j` (1-based).
    pub fn tried(&self, j: usize) -> u64 {
        self.positions.get(j.wrapping_sub(1)).map_or(0, |p| p.1)
    }

    /// `(a0, beta)` of `a_j = a0 * exp(-beta * (j - 1))` fitted to the positions tried at least once, by least
    /// squares on `ln a_j` weighted by how often each was tried; `None` with fewer than two such positions or
    /// an estimate of 0.
    pub fn decay(&self) -> Option<(f64, f64)> {
        let points: Vec<(f64, f64, f64)> = self
            .positions
            .iter()
            .enumerate()
            .filter(|(_, (a, n))| *n > 0 && *a > 0.0)
            .map(|(j, (a, n))| (j as f64, a.ln(), *n as f64))
            .collect();
        if points.len() < 2 {
            return None;
        }
        let w: f64 = points.iter().map(|p| p.2).sum();
        let mx = points.iter().map(|p| p.2 * p.0).sum::<f64>() / w;
        let my = points.iter().map(|p| p.2 * p.1).sum::<f64>() / w;
        let sxx: f64 = points.iter().map(|p| p.2 * (p.0 - mx).powi(2)).sum();
        let sxy: f64 = points.iter().map(|p| p.2 * (p.0 - mx) * (p.1 - my)).sum();
        let slope = sxy / sxx;
        Some(((my - slope * mx).exp(), -slope))
    }
}
