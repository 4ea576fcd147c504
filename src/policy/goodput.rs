//! specdec's own policy: per-request draft lengths that maximise the expected emitted tokens per second of a
//! decoding step, under the cost model.
//!
//! For draft lengths `k_i` (0 allowed) the step emits `sum_i E_i(k_i)` tokens in expectation
//! ([`super::expected_tokens`] from each request's per-position acceptance) and takes
//! [`step_seconds`]: a plain target step if nobody drafts, otherwise one batched draft step per draft position
//! `j = 1..=max k` over the requests still drafting at `j`, then one verification of `sum (k_i + 1)` tokens.
//! [`choose_draft_lengths`] maximises the ratio. The gains `E_i` are concave in `k_i` (each extra token is
//! accepted with a smaller probability), which makes local search reliable: for every maximum length `K`, start
//! with every request at `K`, then sweep over the requests giving each its best length in `0..=K` with the
//! others fixed, until a whole sweep changes nothing; keep the best over `K`. A change is priced
//! incrementally (per-position draft batches are kept, so moving `k_i` re-prices only the positions between its
//! old and new value). `tests/policy.rs` compares the result with brute force over every vector of draft
//! lengths.

use super::{expected_tokens, CostModel};

/// One request as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutlook {
    /// Context tokens (prompt and output so far).
    pub context: usize,
    /// Estimated acceptance of draft positions `1..=acceptance.len()` (each given the ones before were
    /// accepted); positions past the end use the last value.
    pub acceptance: Vec<f64>,
}

impl RequestOutlook {
    fn acceptance_at(&self, j: usize) -> f64 {
        self.acceptance
            .get(j - 1)
            .or(self.acceptance.last())
            .copied()
            .unwrap_or(0.0)
    }

    /// Expected tokens emitted by a verification of a `k`-token draft.
    pub fn expected_tokens(&self, k: usize) -> f64 {
        expected_tokens(k, |j| self.acceptance_at(j))
    }
}

/// Seconds of one decoding step in which the request holding `contexts[i]` context tokens drafts
/// `draft_lengths[i]` tokens.
pub fn step_seconds(cost: &CostModel, contexts: &[usize], draft_lengths: &[usize]) -> f64 {
    let batch = contexts.len();
    let context: usize = contexts.iter().sum();
    let longest = draft_lengths.iter().copied().max().unwrap_or(0);
    if longest == 0 {
        return cost.target_step(batch, context);
    }
    let mut seconds = 0.0;
    for j in 1..=longest {
        let (drafting, drafting_context) = contexts
            .iter()
            .zip(draft_lengths)
            .filter(|(_, &k)| k >= j)
            .fold((0, 0), |(n, c), (&r, _)| (n + 1, c + r));
        seconds += cost.draft_step(drafting, drafting_context);
    }
    let tokens: usize = draft_lengths.iter().map(|k| k + 1).sum();
    seconds + cost.verify_step(batch, context, tokens)
}

/// Expected emitted tokens per second of a step with these draft lengths.
pub fn goodput(cost: &CostModel, requests: &[RequestOutlook], draft_lengths: &[usize]) -> f64 {
    let tokens: f64 = requests
        .iter()
        .zip(draft_lengths)
        .map(|(r, &k)| r.expected_tokens(k))
        .sum();
    let contexts: Vec<usize> = requests.iter().map(|r| r.context).collect();
    tokens / step_seconds(cost, &contexts, draft_lengths)
}

/// The draft lengths (each at most `max_draft`) that maximise [`goodput`], and that goodput.
pub fn choose_draft_lengths(
    cost: &CostModel,
    requests: &[RequestOutlook],
    max_draft: usize,
) -> (Vec<usize>, f64) {
    let autoregressive = vec![0; requests.len()];
    let mut best = (
        autoregressive.clone(),
        goodput(cost, requests, &autoregressive),
    );
    let longest_allowed = if requests.is_empty() { 0 } else { max_draft };
    for longest in 1..=longest_allowed {
        let mut step = Step::new(cost, requests, longest);
        loop {
            let mut changed = false;
            for i in 0..requests.len() {
                let current = step.lengths[i];
                let (mut best_k, mut best_value) = (current, step.goodput());
                for k in 0..=longest {
                    if k != current {
                        let value = step.goodput_if(i, k);
                        if value > best_value {
                            (best_k, best_value) = (k, value);
                        }
                    }
                }
                if best_k != current {
                    step.set(i, best_k);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let value = goodput(cost, requests, &step.lengths);
        if value > best.1 {
            best = (step.lengths, value);
        }
    }
    best
}

/// A step's draft lengths with what pricing a change needs: per draft position, how many requests draft there
/// and their context, and the per-request expected tokens for every length.
struct Step<'a> {
    cost: &'a CostModel,
    requests: &'a [RequestOutlook],
    lengths: Vec<usize>,
    /// `gains[i][k]`: expected tokens of request `i` drafting `k`.
    gains: Vec<Vec<f64>>,
    /// Per draft position `j` (index `j - 1`): requests drafting at `j`, and their context tokens.
    positions: Vec<(usize, usize)>,
    tokens: f64,
    draft_seconds: f64,
    verified: usize,
    context: usize,
}

impl<'a> Step<'a> {
    /// Every request drafting `longest` tokens.
    fn new(cost: &'a CostModel, requests: &'a [RequestOutlook], longest: usize) -> Self {
        let gains: Vec<Vec<f64>> = requests
            .iter()
            .map(|r| (0..=longest).map(|k| r.expected_tokens(k)).collect())
            .collect();
        let context: usize = requests.iter().map(|r| r.context).sum();
        let positions = vec![(requests.len(), context); longest];
        let draft_seconds = positions.iter().map(|&(n, c)| cost.draft_step(n, c)).sum();
        Step {
            cost,
            requests,
            lengths: vec![longest; requests.len()],
            tokens: gains.iter().map(|g| g[longest]).sum(),
            gains,
            positions,
            draft_seconds,
            verified: requests.len() * (longest + 1),
            context,
        }
    }

    fn price(&self, tokens: f64, draft_seconds: f64, verified: usize) -> f64 {
        let batch = self.requests.len();
        let seconds = if verified == batch {
            self.cost.target_step(batch, self.context)
        } else {
            draft_seconds + self.cost.verify_step(batch, self.context, verified)
        };
        tokens / seconds
    }

    fn goodput(&self) -> f64 {
        self.price(self.tokens, self.draft_seconds, self.verified)
    }

    /// Draft seconds after request `i` moves from `from` to `to`.
    fn draft_seconds_if(&self, i: usize, from: usize, to: usize) -> f64 {
        let (low, high, sign) = if to > from {
            (from, to, 1isize)
        } else {
            (to, from, -1)
        };
        let c = self.requests[i].context as isize;
        let mut seconds = self.draft_seconds;
        for &(n, ctx) in &self.positions[low..high] {
            let (n2, ctx2) = (
                (n as isize + sign) as usize,
                (ctx as isize + sign * c) as usize,
            );
            let old = if n == 0 {
                0.0
            } else {
                self.cost.draft_step(n, ctx)
            };
            let new = if n2 == 0 {
                0.0
            } else {
                self.cost.draft_step(n2, ctx2)
            };
            seconds += new - old;
        }
        seconds
    }

    fn goodput_if(&self, i: usize, k: usize) -> f64 {
        let from = self.lengths[i];
        let tokens = self.tokens - self.gains[i][from] + self.gains[i][k];
        let verified = self.verified + k - from;
        self.price(tokens, self.draft_seconds_if(i, from, k), verified)
    }

    fn set(&mut self, i: usize, k: usize) {
        let from = self.lengths[i];
        self.draft_seconds = self.draft_seconds_if(i, from, k);
        self.tokens += self.gains[i][k] - self.gains[i][from];
        self.verified = self.verified + k - from;
        let (low, high, sign) = if k > from {
            (from, k, 1isize)
        } else {
            (k, from, -1)
        };
        let c = self.requests[i].context as isize;
        for (n, ctx) in &mut self.positions[low..high] {
            *n = (*n as isize + sign) as usize;
            *ctx = (*ctx as isize + sign * c) as usize;
        }
        self.lengths[i] = k;
    }
}
