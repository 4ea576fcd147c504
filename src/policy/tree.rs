//! Tree drafts for a sampling drafter: which tree to draft, and what it is expected to emit.
//!
//! A tree draft runs the drafter once per depth over the nodes that get children, draws each such node's
//! children i.i.d. from the drafter's distribution `q`, and is verified in one target pass by the lossless tree
//! sampler with draft rows (SpecInfer's rule, [`crate::sampling`]): a node's children are tried in order, child
//! `r` accepted with probability `min(1, p'(x_r) / q(x_r))` against the residual `p'` the rejected ones left.
//! At small batch the extra nodes are nearly free: a draft or verification step is memory-bound, and the tree
//! attention kernel reads a request's KV prefix once for all its nodes.
//!
//! # The sibling law (an assumption, stated)
//!
//! A node's first child is accepted with the chain acceptance `a` of its depth, which is what
//! [`super::AcceptanceStats`] measures. How much more its later children add depends on the two distributions,
//! not on `a` alone; this module assumes that all of the first `w` children are rejected with probability
//! `(1 - a) w^-g(a)`, so child `r >= 2` is accepted, given those before it were not, with probability
//! `1 - ((r - 1) / r)^g(a)`. [`sibling_exponent`] tabulates `g(a)`, measured with
//! [`recursive_rejection_misses`] (exact, no sampling) on synthetic pairs standing for an int4 self-drafter:
//! targets `p_i ∝ i^-beta` over 4000 tokens with `beta` uniform in 0.8..3 (peaked to flat rows), drafter
//! logits = target logits + Gaussian noise of one deviation per table entry (weight rounding perturbs logits
//! by a sum of many small terms). `g` is read at `w = 2`; it grows slowly with `w` (by about 0.06 from `w` = 2
//! to 8), so wider nodes do a little better than the law says. `tests/policy.rs` recomputes two
//! entries and checks `recursive_rejection_misses` against the sampler itself.
//!
//! # Which tree
//!
//! With per-depth acceptances `a_j`, a node is reached (its path accepted) with the product of its ancestors'
//! conditional acceptances, and a verification emits `1 + sum over nodes of P(reached)` tokens in
//! expectation. A child is never more likely to be reached than its parent, nor sibling `r + 1` than sibling
//! `r` (the law's `(r-1)^-g - r^-g` decreases), so the `n` most likely nodes form a tree and
//! [`DraftTree::best_first`] (a heap over the frontier) finds the tree of `n` nodes with the most expected
//! tokens. Its first `n` nodes are the best tree of `n` nodes for every `n`, so one call prices every budget.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Nodes reached less often than this are not drafted: at most 64 of them add 0.064 tokens to a step, and
/// leaving them out keeps the search cheap (a node's reach only falls with depth and rank).
pub const MIN_REACH: f64 = 1e-3;

/// `(chain acceptance a, sibling exponent g)`, measured as the module documents: noise deviations 1.2, 0.8, 0.5,
/// 0.3, 0.2, 0.1, 0.05, each over 3000 pairs (the estimate of `g` varies by about 0.02 between sets of pairs).
const SIBLING_EXPONENTS: [(f64, f64); 7] = [
    (0.660, 0.436),
    (0.773, 0.550),
    (0.856, 0.663),
    (0.914, 0.730),
    (0.942, 0.764),
    (0.972, 0.807),
    (0.985, 0.834),
];

/// The sibling law's exponent `g(a)`: linear between the measured entries, held at the end values outside.
pub fn sibling_exponent(first_child_acceptance: f64) -> f64 {
    let a = first_child_acceptance;
    let (first, last) = (
        SIBLING_EXPONENTS[0],
        SIBLING_EXPONENTS[SIBLING_EXPONENTS.len() - 1],
    );
    if a.is_nan() || a <= first.0 {
        return first.1;
    }
    if a >= last.0 {
        return last.1;
    }
    let upper = SIBLING_EXPONENTS
        .iter()
        .position(|&(x, _)| x >= a)
        .unwrap_or(0);
    let ((x0, g0), (x1, g1)) = (SIBLING_EXPONENTS[upper - 1], SIBLING_EXPONENTS[upper]);
    g0 + (g1 - g0) * (a - x0) / (x1 - x0)
}

/// The probability that child `rank` (1-based) of a node is accepted given that the children before it were
/// rejected, when the first child is accepted with `first_child_acceptance` (the sibling law).
pub fn child_acceptance(first_child_acceptance: f64, rank: usize) -> f64 {
    match rank {
        0 => 0.0,
        1 => first_child_acceptance.clamp(0.0, 1.0),
        r => {
            let g = sibling_exponent(first_child_acceptance);
            1.0 - ((r - 1) as f64 / r as f64).powf(g)
        }
    }
}

/// Exact probabilities that the first `1, 2, ..., children` children of one node, drawn i.i.d. from `q`, are
/// all rejected by recursive rejection sampling against the target `p` (both normalised here). Entry 0 is
/// `1 - sum_x min(p(x), q(x))`, one minus the chain acceptance. The recursion: child `r` is accepted with
/// `sum_x min(p_r(x), q(x))`, where `p_1 = p` and `p_{r+1} = norm(max(0, p_r - q))`.
///
/// # Panics
/// If `p` and `q` differ in length or either has no positive mass.
pub fn recursive_rejection_misses(p: &[f64], q: &[f64], children: usize) -> Vec<f64> {
    assert_eq!(p.len(), q.len(), "p and q must have the same length");
    let normalised = |row: &[f64]| {
        let total: f64 = row.iter().sum();
        assert!(total > 0.0, "a distribution needs positive mass");
        row.iter().map(|x| x / total).collect::<Vec<f64>>()
    };
    let (mut residual, q) = (normalised(p), normalised(q));
    let mut misses = Vec::with_capacity(children);
    let mut all_rejected = 1.0;
    for _ in 0..children {
        let accepted: f64 = residual.iter().zip(&q).map(|(r, q)| r.min(*q)).sum();
        all_rejected *= (1.0 - accepted).max(0.0);
        misses.push(all_rejected);
        let left: f64 = residual.iter().zip(&q).map(|(r, q)| (r - q).max(0.0)).sum();
        if left <= 0.0 {
            misses.resize(children, 0.0);
            break;
        }
        for (r, q) in residual.iter_mut().zip(&q) {
            *r = (*r - q).max(0.0) / left;
        }
    }
    misses
}

/// A draft tree in best-first order: node 0 is the root (the last accepted token), node `i >= 1` a draft.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftTree {
    /// `parents[i]` for `i >= 1` (in `0..i`); `parents[0]` is unused (0).
    pub parents: Vec<usize>,
    /// Depth of each node: 0 for the root.
    pub depths: Vec<usize>,
    /// Each draft's place among its parent's children (1-based): the order the sampler tries them in.
    pub ranks: Vec<usize>,
    /// Probability that each node's path is accepted (1 for the root).
    pub reach: Vec<f64>,
}

/// A frontier entry of the best-first search: the next child of `parent`, with its reach probability.
struct Candidate {
    reach: f64,
    parent: usize,
    rank: usize,
    /// Insertion order, so equal reaches pop in a fixed order.
    order: usize,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.reach
            .total_cmp(&other.reach)
            .then(other.order.cmp(&self.order))
    }
}

impl DraftTree {
    /// The parents in the verification tree's convention ([`crate::tree`]): -1 for the root, node 0, then each
    /// draft's parent. With the drafts' tokens, [`crate::tree::VerifyTree::new`] takes it as it is.
    pub fn verification_parents(&self) -> Vec<i32> {
        std::iter::once(-1)
            .chain(self.parents.iter().skip(1).map(|&p| p as i32))
            .collect()
    }

    /// The tree of no drafts: the root alone.
    pub fn root() -> DraftTree {
        DraftTree {
            parents: vec![0],
            depths: vec![0],
            ranks: vec![0],
            reach: vec![1.0],
        }
    }

    /// The tree of at most `max_nodes` drafts, none deeper than `max_depth`, with the most expected tokens,
    /// when a first child at depth `j` (1-based) is accepted with `acceptance(j)` and later children follow
    /// the sibling law. Nodes reached less often than [`MIN_REACH`] are left out.
    pub fn best_first(
        acceptance: impl Fn(usize) -> f64,
        max_nodes: usize,
        max_depth: usize,
    ) -> DraftTree {
        let mut tree = DraftTree::root();
        let acceptance: Vec<f64> = (1..=max_depth)
            .map(|j| acceptance(j).clamp(0.0, 1.0))
            .collect();
        let exponents: Vec<f64> = acceptance.iter().map(|&a| sibling_exponent(a)).collect();
        let mut frontier = BinaryHeap::new();
        let mut order = 0;
        let mut push =
            |frontier: &mut BinaryHeap<Candidate>, reach: f64, parent: usize, rank: usize| {
                if reach >= MIN_REACH {
                    frontier.push(Candidate {
                        reach,
                        parent,
                        rank,
                        order,
                    });
                    order += 1;
                }
            };
        if max_depth > 0 {
            push(&mut frontier, acceptance[0], 0, 1);
        }
        while tree.drafts() < max_nodes {
            let Some(c) = frontier.pop() else { break };
            let node = tree.parents.len();
            let depth = tree.depths[c.parent] + 1;
            tree.parents.push(c.parent);
            tree.depths.push(depth);
            tree.ranks.push(c.rank);
            tree.reach.push(c.reach);
            // The next sibling: reached when the parent is and children 1..=rank are rejected, then accepted.
            let (a, g) = (acceptance[depth - 1], exponents[depth - 1]);
            let parent_reach = tree.reach[c.parent];
            let rejected_through = |rank: usize| (1.0 - a) * (rank as f64).powf(-g);
            let sibling = parent_reach * (rejected_through(c.rank) - rejected_through(c.rank + 1));
            push(&mut frontier, sibling, c.parent, c.rank + 1);
            if depth < max_depth {
                push(&mut frontier, c.reach * acceptance[depth], node, 1);
            }
        }
        tree
    }

    /// Draft nodes (the root not counted).
    pub fn drafts(&self) -> usize {
        self.parents.len() - 1
    }

    /// The tree of its first `drafts` drafts (itself if it has no more).
    pub fn truncated(&self, drafts: usize) -> DraftTree {
        let n = (drafts + 1).min(self.parents.len());
        DraftTree {
            parents: self.parents[..n].to_vec(),
            depths: self.depths[..n].to_vec(),
            ranks: self.ranks[..n].to_vec(),
            reach: self.reach[..n].to_vec(),
        }
    }

    /// Expected tokens a verification of the first `drafts` drafts emits: `1 + sum of their reach`.
    pub fn expected_tokens(&self, drafts: usize) -> f64 {
        1.0 + self.reach[1..=drafts.min(self.drafts())]
            .iter()
            .sum::<f64>()
    }

    /// The deepest of the first `drafts` drafts: the drafter steps the tree needs.
    pub fn depth(&self, drafts: usize) -> usize {
        self.depths[..=drafts.min(self.drafts())]
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
    }

    /// For the first `drafts` drafts: entry `j - 1` is how many nodes the drafter runs at depth step `j`, i.e.
    /// the nodes at depth `j - 1` with at least one child among them.
    pub fn drafter_tokens(&self, drafts: usize) -> Vec<usize> {
        let n = drafts.min(self.drafts());
        let mut expanded = vec![false; n + 1];
        for i in 1..=n {
            expanded[self.parents[i]] = true;
        }
        let mut per_depth = vec![0; self.depth(n)];
        for (node, _) in expanded.iter().enumerate().filter(|(_, &e)| e) {
            per_depth[self.depths[node]] += 1;
        }
        per_depth
    }

    /// Walks the first `drafts` drafts as the sampler would: from the root, try each node's children in index
    /// order (which is rank order in a best-first tree) with `accept(depth, rank)` deciding each; return the
    /// accepted path (node indices, root excluded).
    pub fn sample_path(
        &self,
        drafts: usize,
        mut accept: impl FnMut(usize, usize) -> bool,
    ) -> Vec<usize> {
        let n = drafts.min(self.drafts());
        let mut path = Vec::new();
        let mut node = 0;
        'walk: loop {
            // Children come after their parent.
            for child in node + 1..=n {
                if self.parents[child] == node && accept(self.depths[child], self.ranks[child]) {
                    path.push(child);
                    node = child;
                    continue 'walk;
                }
            }
            return path;
        }
    }
}
