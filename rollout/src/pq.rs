//! The target's and the drafter's distributions at drafted positions, logged from real rollouts, and the
//! sibling law of specdec's tree policy measured on them (issue 19, item 7).
//!
//! The tree policy ([`specdec::policy::DraftTree`]) prices a node's later children by an assumed law: with
//! chain acceptance `a`, all of a node's first `w` children (drawn i.i.d. from the drafter's `q`) are rejected
//! with probability `(1 - a) w^-g(a)`, `g` measured on synthetic pairs ([`specdec::policy::sibling_exponent`]).
//! Here the pairs are the real ones: at each logged position of an int4 self-drafted chain, the target's row
//! `p` (the verification's, for the drafted token's position) and the drafter's row `q` (the one the token was
//! drawn from), both at the step's temperature and top-p. [`specdec::policy::recursive_rejection_misses`] gives,
//! exactly and without sampling, the probability that the first `w` children of such a node would all be
//! rejected; [`SiblingLaw`] sets those against the law's prediction.

use specdec::policy::{recursive_rejection_misses, sibling_exponent};

/// Widths `w = 1..=MAX_WIDTH` whose all-rejected probability is logged per position.
pub const MAX_WIDTH: usize = 8;

/// Probabilities at or above this are written to the log token by token; the rest of each row is its `rest`
/// mass.
pub const LOG_FLOOR: f64 = 1e-5;

/// One drafted position: where it was, whether the run reached and accepted it, the exact all-rejected
/// probabilities, and the two rows (sparse: the drafted token and every token with `p` or `q` at least
/// [`LOG_FLOOR`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PqSample {
    /// The rollout's request id.
    pub rollout: u64,
    /// The rollout's decoding step.
    pub step: u64,
    /// The draft's depth in its chain, from 1.
    pub depth: usize,
    /// The drafted token.
    pub token: u32,
    /// Whether the verification tried it (every draft before it in the chain accepted).
    pub reached: bool,
    /// Whether the verification accepted it.
    pub accepted: bool,
    /// `misses[w - 1]`: the probability that `w` children drawn i.i.d. from `q` are all rejected against `p`,
    /// for `w = 1..=MAX_WIDTH`, from the full rows; `1 - misses[0]` is this position's acceptance probability.
    pub misses: Vec<f64>,
    /// The logged tokens, in increasing order.
    pub tokens: Vec<u32>,
    /// `p` of each logged token.
    pub p: Vec<f64>,
    /// `q` of each logged token.
    pub q: Vec<f64>,
    /// `p`'s mass outside the logged tokens.
    pub p_rest: f64,
    /// `q`'s mass outside the logged tokens.
    pub q_rest: f64,
}

impl PqSample {
    /// The sample of a drafted `token` whose target logits are `target` and draft logits `draft` (same length,
    /// the vocabulary), both read at `temperature` (`> 0`) and `top_p` as specdec's sampler reads them.
    ///
    /// # Panics
    /// As [`sampling_law`].
    pub fn new(
        (rollout, step, depth): (u64, u64, usize),
        (token, reached, accepted): (u32, bool, bool),
        target: &[f32],
        draft: &[f32],
        temperature: f32,
        top_p: f32,
    ) -> Self {
        let p = sampling_law(target, temperature, top_p);
        let q = sampling_law(draft, temperature, top_p);
        let misses = recursive_rejection_misses(&p, &q, MAX_WIDTH);
        let logged: Vec<usize> = (0..p.len())
            .filter(|&x| p[x] >= LOG_FLOOR || q[x] >= LOG_FLOOR || x == token as usize)
            .collect();
        let rest = |row: &[f64]| (1.0 - logged.iter().map(|&x| row[x]).sum::<f64>()).max(0.0);
        PqSample {
            rollout,
            step,
            depth,
            token,
            reached,
            accepted,
            misses,
            tokens: logged.iter().map(|&x| x as u32).collect(),
            p: logged.iter().map(|&x| p[x]).collect(),
            q: logged.iter().map(|&x| q[x]).collect(),
            p_rest: rest(&p),
            q_rest: rest(&q),
        }
    }

    /// This position's acceptance probability: `sum_x min(p(x), q(x))`.
    pub fn acceptance(&self) -> f64 {
        1.0 - self.misses[0]
    }

    /// The sample as one line of JSON (an object; `label` names the policy, `iteration` the decode call: request
    /// ids and steps restart in each).
    pub fn json_line(&self, label: &str, iteration: usize) -> String {
        serde_json::json!({
            "policy": label,
            "iteration": iteration,
            "rollout": self.rollout,
            "step": self.step,
            "depth": self.depth,
            "token": self.token,
            "reached": self.reached,
            "accepted": self.accepted,
            "misses": self.misses,
            "p_rest": self.p_rest,
            "q_rest": self.q_rest,
            "tokens": self.tokens,
            "p": self.p,
            "q": self.q,
        })
        .to_string()
    }
}

/// The distribution specdec's sampler draws from a row of logits (`crate::sampling`, "Distributions"):
/// `z = logit / temperature` in f32; top-p keeps, in decreasing order of `z`, the smallest prefix whose mass
/// reaches `top_p` (ties with its last element kept); softmax in f64 over what is kept (the sampler's own sums
/// are f32 on the CPU: the two agree within rounding).
///
/// # Panics
/// If `temperature` is not positive, a logit is NaN, or the row holds no finite logit (the sampler refuses
/// such rows before they could be logged).
pub fn sampling_law(logits: &[f32], temperature: f32, top_p: f32) -> Vec<f64> {
    assert!(
        temperature > 0.0,
        "a sampling law needs a positive temperature"
    );
    assert!(!logits.iter().any(|l| l.is_nan()), "a NaN logit");
    let z: Vec<f32> = logits.iter().map(|&l| l / temperature).collect();
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    assert!(max.is_finite(), "a row needs a finite logit");
    let weights: Vec<f64> = z.iter().map(|&v| f64::from(v - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut kept = vec![true; z.len()];
    if top_p < 1.0 {
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
        let (mut mass, mut cut) = (0.0, f32::NEG_INFINITY);
        for &x in &order {
            mass += weights[x] / total;
            if mass >= f64::from(top_p) {
                cut = z[x];
                break;
            }
        }
        for (k, &v) in kept.iter_mut().zip(&z) {
            *k = v >= cut;
        }
    }
    let kept_total: f64 = weights
        .iter()
        .zip(&kept)
        .filter(|(_, &k)| k)
        .map(|(w, _)| w)
        .sum();
    weights
        .iter()
        .zip(&kept)
        .map(|(&w, &k)| if k { w / kept_total } else { 0.0 })
        .collect()
}

/// The sibling law measured against the assumed one over a set of logged positions.
#[derive(Debug, Clone, PartialEq)]
pub struct SiblingLaw {
    /// Positions.
    pub positions: usize,
    /// Their mean acceptance probability `a`.
    pub acceptance: f64,
    /// `measured[w - 1]`: the mean over positions of the exact probability that `w` children are all
    /// rejected.
    pub measured: Vec<f64>,
    /// `assumed[w - 1]`: the law's `(1 - a) w^-g(a)` at the positions' mean `a`, as the tree policy applies it
    /// (it knows a depth's mean acceptance only).
    pub assumed: Vec<f64>,
}

impl SiblingLaw {
    /// Over `samples` (none: `None`).
    pub fn of<'a>(samples: impl IntoIterator<Item = &'a PqSample>) -> Option<Self> {
        let mut measured = vec![0.0; MAX_WIDTH];
        let (mut positions, mut acceptance) = (0usize, 0.0);
        for s in samples {
            positions += 1;
            acceptance += s.acceptance();
            for (total, m) in measured.iter_mut().zip(&s.misses) {
                *total += m;
            }
        }
        if positions == 0 {
            return None;
        }
        let n = positions as f64;
        let acceptance = acceptance / n;
        measured.iter_mut().for_each(|m| *m /= n);
        let g = sibling_exponent(acceptance);
        let assumed = (1..=MAX_WIDTH)
            .map(|w| (1.0 - acceptance) * (w as f64).powf(-g))
            .collect();
        Some(SiblingLaw {
            positions,
            acceptance,
            measured,
            assumed,
        })
    }

    /// The exponent `g` the measured probabilities imply at width `w >= 2`: `(1 - a) w^-g = measured`.
    pub fn implied_exponent(&self, w: usize) -> f64 {
        -(self.measured[w - 1] / self.measured[0]).ln() / (w as f64).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampling_law_is_softmax_with_the_nucleus_cut() {
        let logits = [2.0f32, 1.0, 0.0, f32::NEG_INFINITY];
        let full = sampling_law(&logits, 1.0, 1.0);
        let e: Vec<f64> = [2.0f64, 1.0, 0.0].iter().map(|v| v.exp()).collect();
        let total: f64 = e.iter().sum();
        for (got, want) in full.iter().zip(e.iter().map(|v| v / total)) {
            assert!((got - want).abs() < 1e-12);
        }
        assert_eq!(full[3], 0.0);
        // The top token holds 0.665: a nucleus of 0.6 keeps it alone, one of 0.7 the top two.
        assert_eq!(sampling_law(&logits, 1.0, 0.6), vec![1.0, 0.0, 0.0, 0.0]);
        let two = sampling_law(&logits, 1.0, 0.7);
        assert!((two[0] - e[0] / (e[0] + e[1])).abs() < 1e-12 && two[2] == 0.0);
        // Temperature 2 halves the logits.
        let warm = sampling_law(&logits, 2.0, 1.0);
        assert!((warm[0] / warm[1] - 0.5f64.exp()).abs() < 1e-12);
    }

    #[test]
    fn a_sample_logs_both_rows_and_their_exact_misses() {
        let target = [3.0f32, 1.0, 0.0, -20.0];
        let draft = [1.0f32, 3.0, 0.0, -20.0];
        let s = PqSample::new((7, 3, 1), (1, true, false), &target, &draft, 1.0, 1.0);
        let (p, q) = (
            sampling_law(&target, 1.0, 1.0),
            sampling_law(&draft, 1.0, 1.0),
        );
        let overlap: f64 = p.iter().zip(&q).map(|(a, b)| a.min(*b)).sum();
        assert!((s.acceptance() - overlap).abs() < 1e-12);
        assert!(s.misses.windows(2).all(|m| m[1] <= m[0]));
        // Token 3 has p and q near 2e-10: below the floor, in the rest, unless it is the drafted token.
        assert_eq!(s.tokens, vec![0, 1, 2]);
        assert!(s.p_rest > 0.0 && s.p_rest < 1e-8 && s.q_rest < 1e-8);
        let drafted = PqSample::new((7, 3, 2), (3, false, false), &target, &draft, 1.0, 1.0);
        assert_eq!(drafted.tokens, vec![0, 1, 2, 3]);
        assert!(drafted.p_rest < 1e-12 && drafted.q_rest < 1e-12);
        let line = s.json_line("int4", 1);
        assert!(!line.contains('\n'));
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(parsed["policy"], "int4");
        assert_eq!(
            (&parsed["iteration"], &parsed["rollout"], &parsed["step"]),
            (&1.into(), &7.into(), &3.into())
        );
        assert_eq!((&parsed["depth"], &parsed["token"]), (&1.into(), &1.into()));
        assert_eq!(
            (&parsed["reached"], &parsed["accepted"]),
            (&true.into(), &false.into())
        );
        assert_eq!(parsed["p"].as_array().unwrap().len(), 3);
        assert_eq!(parsed["p"][0].as_f64(), Some(s.p[0]));
        assert_eq!(parsed["misses"].as_array().unwrap().len(), MAX_WIDTH);
    }

    #[test]
    fn the_law_of_identical_rows_is_all_accepted() {
        let rows = [0.5f32, -1.0, 2.0];
        let s = PqSample::new((0, 0, 1), (2, true, true), &rows, &rows, 1.0, 1.0);
        let law = SiblingLaw::of([&s]).unwrap();
        assert!(law.measured.iter().all(|&m| m.abs() < 1e-12));
        assert!((law.acceptance - 1.0).abs() < 1e-12);
    }
}
