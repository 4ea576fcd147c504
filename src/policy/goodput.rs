//! specdec's own policy: per-request drafts (chains or trees) that maximise the expected emitted tokens per
//! second of a decoding step, under the cost model.
//!
//! Each request has a set of [`DraftOption`]s (draft nothing, a chain of `k`, a tree of `n` nodes, a chain of
//! `k` from a drafter that runs no model such as DAS's suffix drafter), each with
//! its expected emitted tokens ([`super::expected_tokens`] for chains, [`DraftTree::expected_tokens`] for
//! trees, from the request's per-position acceptance) and what it costs: the tokens the drafter runs at each
//! draft position and the tokens verified. A step in which nobody drafts is a plain target step; otherwise it
//! is one batched draft step per draft position over the requests still drafting there, then one verification
//! of everyone's tokens ([`step_seconds`]). [`choose_draft_options`] maximises the ratio of the expected tokens
//! to that time. The gains are concave in the draft size (each extra token or node is accepted with a smaller
//! probability), which makes local search reliable: for each depth limit `K` in increasing order, start with
//! every request at its most productive option no deeper than `K`, then sweep over the requests giving each
//! its best option with the others fixed, until a whole sweep changes nothing; keep the best over `K`, and
//! stop once the value has fallen for two limits in a row. A change is priced incrementally (per-position
//! draft batches are kept, so a change re-prices only the positions it touches). When even every request's
//! best option at the cheapest conceivable step time would not beat plain decoding, the search is skipped: at
//! large batch that is most steps. `tests/policy.rs` compares the result with brute force over every vector of
//! chain lengths, and over every combination of mixed chain and tree options.

use super::tree::DraftTree;
use super::{expected_tokens, CostModel};

/// One request as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestOutlook {
    /// Context tokens (prompt and output so far).
    pub context: usize,
    /// Estimated acceptance of draft positions `1..=acceptance.len()` (each given the ones before were
    /// accepted); positions past the end use the last value. For trees: the acceptance of a node's first child
    /// at that depth; later children follow the sibling law ([`super::tree`]).
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

    /// The best tree of at most `max_drafts` drafts and depth `max_depth` for this request
    /// ([`DraftTree::best_first`]).
    pub fn best_tree(&self, max_drafts: usize, max_depth: usize) -> DraftTree {
        DraftTree::best_first(|j| self.acceptance_at(j), max_drafts, max_depth)
    }
}

/// What a request's draft costs a step: the tokens the drafter runs for it at each draft position
/// `1..=len` (empty: no draft), and the tokens verified for it (the last accepted token and the drafts).
#[derive(Debug, Clone, PartialEq)]
pub struct DraftShape {
    /// Drafter tokens per draft position: 1 each for a chain, a tree's expanded nodes per depth.
    pub drafter_tokens: Vec<usize>,
    /// Tokens verified.
    pub verified: usize,
}

impl DraftShape {
    /// No draft.
    pub fn none() -> Self {
        DraftShape {
            drafter_tokens: Vec::new(),
            verified: 1,
        }
    }

    /// A chain of `k` drafts.
    pub fn chain(k: usize) -> Self {
        DraftShape {
            drafter_tokens: vec![1; k],
            verified: k + 1,
        }
    }

    /// A chain of `k` drafts from a drafter that runs no model (DAS's suffix drafter, an n-gram lookup): no
    /// draft steps, `k + 1` tokens verified.
    pub fn model_free_chain(k: usize) -> Self {
        DraftShape {
            drafter_tokens: Vec::new(),
            verified: k + 1,
        }
    }

    /// The first `drafts` drafts of `tree`.
    pub fn tree(tree: &DraftTree, drafts: usize) -> Self {
        DraftShape {
            drafter_tokens: tree.drafter_tokens(drafts),
            verified: drafts.min(tree.drafts()) + 1,
        }
    }

    /// Draft positions: the drafter steps this draft needs.
    pub fn depth(&self) -> usize {
        self.drafter_tokens.len()
    }
}

/// One way a request may draft in a step: what it is expected to emit and what it costs.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftOption {
    /// Expected tokens the verification emits for this request (1 without a draft).
    pub expected_tokens: f64,
    /// Its cost.
    pub shape: DraftShape,
}

impl DraftOption {
    /// No draft: a plain decode of this request.
    pub fn none() -> Self {
        DraftOption {
            expected_tokens: 1.0,
            shape: DraftShape::none(),
        }
    }

    /// A chain of `k` drafts for `request`.
    pub fn chain(request: &RequestOutlook, k: usize) -> Self {
        DraftOption {
            expected_tokens: request.expected_tokens(k),
            shape: DraftShape::chain(k),
        }
    }

    /// A chain of `k` drafts for `request` from a drafter that runs no model ([`DraftShape::model_free_chain`]).
    pub fn model_free_chain(request: &RequestOutlook, k: usize) -> Self {
        DraftOption {
            expected_tokens: request.expected_tokens(k),
            shape: DraftShape::model_free_chain(k),
        }
    }

    /// The first `drafts` drafts of `tree`.
    pub fn tree(tree: &DraftTree, drafts: usize) -> Self {
        DraftOption {
            expected_tokens: tree.expected_tokens(drafts),
            shape: DraftShape::tree(tree, drafts),
        }
    }

    fn depth(&self) -> usize {
        self.shape.depth()
    }

    /// Whether the drafter runs no model for it while it still verifies drafts.
    fn is_model_free(&self) -> bool {
        self.shape.drafter_tokens.is_empty() && self.shape.verified > 1
    }

    /// The search level that offers it: its depth, or for a model-free chain its length.
    fn level(&self) -> usize {
        if self.is_model_free() {
            self.shape.verified - 1
        } else {
            self.depth()
        }
    }
}

/// Seconds of one decoding step in which the request holding `contexts[i]` context tokens drafts a chain of
/// `draft_lengths[i]` tokens.
pub fn step_seconds(cost: &CostModel, contexts: &[usize], draft_lengths: &[usize]) -> f64 {
    let verified = draft_lengths.iter().map(|k| k + 1).sum();
    priced_step(cost, contexts, draft_lengths, |_, _| 1, verified)
}

/// Seconds of one decoding step in which the request holding `contexts[i]` context tokens drafts `shapes[i]`.
pub fn shaped_step_seconds(cost: &CostModel, contexts: &[usize], shapes: &[&DraftShape]) -> f64 {
    let depths: Vec<usize> = shapes.iter().map(|s| s.depth()).collect();
    let verified = shapes.iter().map(|s| s.verified).sum();
    priced_step(
        cost,
        contexts,
        &depths,
        |i, j| shapes[i].drafter_tokens[j - 1],
        verified,
    )
}

/// The step-time rule both forms share: `tokens_at(i, j)` is request `i`'s drafter tokens at position `j`,
/// for `j <= depths[i]`.
fn priced_step(
    cost: &CostModel,
    contexts: &[usize],
    depths: &[usize],
    tokens_at: impl Fn(usize, usize) -> usize,
    verified: usize,
) -> f64 {
    let batch = contexts.len();
    let context: usize = contexts.iter().sum();
    let longest = depths.iter().copied().max().unwrap_or(0);
    if longest == 0 {
        // No draft step: a plain step, or the verification of a model-free drafter's drafts.
        return if verified == batch {
            cost.target_step(batch, context)
        } else {
            cost.verify_step(batch, context, verified)
        };
    }
    let mut seconds = 0.0;
    for j in 1..=longest {
        let (mut drafting, mut drafting_context, mut tokens) = (0, 0, 0);
        for (i, (&depth, &c)) in depths.iter().zip(contexts).enumerate() {
            if depth >= j {
                drafting += 1;
                drafting_context += c;
                tokens += tokens_at(i, j);
            }
        }
        seconds += cost.draft_tree_step(drafting, drafting_context, tokens);
    }
    seconds + cost.verify_step(batch, context, verified)
}

/// Expected emitted tokens per second of a step with these chain draft lengths.
pub fn goodput(cost: &CostModel, requests: &[RequestOutlook], draft_lengths: &[usize]) -> f64 {
    let tokens: f64 = requests
        .iter()
        .zip(draft_lengths)
        .map(|(r, &k)| r.expected_tokens(k))
        .sum();
    let contexts: Vec<usize> = requests.iter().map(|r| r.context).collect();
    tokens / step_seconds(cost, &contexts, draft_lengths)
}

/// The chain draft lengths (each at most `max_draft`, and never above [`crate::tree::MAX_DRAFTS`], the most one
/// verification takes) that maximise [`goodput`], and that goodput.
pub fn choose_draft_lengths(
    cost: &CostModel,
    requests: &[RequestOutlook],
    max_draft: usize,
) -> (Vec<usize>, f64) {
    let max_draft = max_draft.min(crate::tree::MAX_DRAFTS);
    let options: Vec<Vec<DraftOption>> = requests
        .iter()
        .map(|r| (1..=max_draft).map(|k| DraftOption::chain(r, k)).collect())
        .collect();
    let contexts: Vec<usize> = requests.iter().map(|r| r.context).collect();
    // Choice m is options[i][m - 1], the chain of m drafts.
    choose_draft_options(cost, &contexts, &options)
}

/// Per request, no draft or the best tree ([`RequestOutlook::best_tree`]) of some depth limit `D <= max_depth`
/// and some size `n <= max_drafts`, maximising the step's expected tokens per second; and that goodput. Depth
/// decides the drafter steps, so the limits are every depth to 4, then every other one, and `max_depth`;
/// sizes are `D, 1.5 D, 2 D, 3 D, 4 D, 8 D, ...` and `max_drafts` (nodes at a depth already paid for are
/// nearly free at small batch, and the search finds how many the batch can afford). Trees for a depth limit
/// are built only when the search reaches it. `max_drafts` is capped at [`crate::tree::MAX_DRAFTS`], so that
/// every tree chosen is scored and verified in one call.
pub fn choose_draft_trees(
    cost: &CostModel,
    requests: &[RequestOutlook],
    max_drafts: usize,
    max_depth: usize,
) -> (Vec<DraftTree>, f64) {
    let max_drafts = max_drafts.min(crate::tree::MAX_DRAFTS);
    let max_depth = max_depth.min(max_drafts);
    let contexts: Vec<usize> = requests.iter().map(|r| r.context).collect();
    let most_tokens: Vec<f64> = requests
        .iter()
        .map(|r| tree_tokens_bound(r, max_drafts, max_depth))
        .collect();
    let limits = depth_limits(max_depth);
    // Options are tagged with (index into `trees[i]`, drafts).
    let mut trees: Vec<Vec<DraftTree>> = vec![Vec::new(); requests.len()];
    let (choice, value) = search(
        cost,
        &contexts,
        &most_tokens,
        limits.len(),
        false,
        |level| {
            let (limit, shallower) = (
                limits[level],
                if level == 0 { 0 } else { limits[level - 1] },
            );
            requests
                .iter()
                .zip(&mut trees)
                .map(|(r, built)| {
                    let tree = r.best_tree(max_drafts, limit);
                    let options = tree_sizes(limit, max_drafts)
                        .into_iter()
                        // A tree no deeper than the previous limit was offered there.
                        .filter(|&n| n <= tree.drafts() && tree.depth(n) > shallower)
                        .map(|n| (DraftOption::tree(&tree, n), (built.len(), n)))
                        .collect();
                    built.push(tree);
                    options
                })
                .collect()
        },
    );
    let chosen = choice
        .into_iter()
        .zip(&trees)
        .map(|(pick, built)| match pick {
            None => DraftTree::root(),
            Some((t, n)) => built[t].truncated(n),
        })
        .collect();
    (chosen, value)
}

/// An upper bound on the expected tokens of any tree of at most `max_drafts` drafts and depth `max_depth`:
/// as if every node on the way had all `max_drafts` children, so depth `j` is reached with at most
/// `prod_{m <= j} (1 - (1 - a_m) max_drafts^-g(a_m))` (and at most `max_drafts` drafts count).
fn tree_tokens_bound(request: &RequestOutlook, max_drafts: usize, max_depth: usize) -> f64 {
    let wide = max_drafts.max(1) as f64;
    let mut reach = 1.0;
    let mut tokens = 1.0;
    for j in 1..=max_depth.min(max_drafts) {
        let a = request.acceptance_at(j).clamp(0.0, 1.0);
        reach *= 1.0 - (1.0 - a) * wide.powf(-super::tree::sibling_exponent(a));
        tokens += reach;
    }
    tokens
}

/// The depth limits offered: every depth to 4, then every other one, and `max_depth`.
fn depth_limits(max_depth: usize) -> Vec<usize> {
    let mut limits: Vec<usize> = (1..=max_depth.min(4))
        .chain((6..max_depth).step_by(2))
        .collect();
    if max_depth > 4 {
        limits.push(max_depth);
    }
    limits
}

/// Tree sizes offered at depth `depth`: `depth` times 1, 1.5, 2, 3, 4, 8, 16, 32 below `max_drafts`, then
/// `max_drafts`.
fn tree_sizes(depth: usize, max_drafts: usize) -> Vec<usize> {
    const HALVES: [usize; 8] = [2, 3, 4, 6, 8, 16, 32, 64];
    let mut sizes: Vec<usize> = HALVES
        .iter()
        .map(|h| depth * h / 2)
        .take_while(|&n| n < max_drafts)
        .collect();
    if depth <= max_drafts {
        sizes.push(max_drafts);
    }
    sizes.dedup();
    sizes
}

/// Per request, no draft (0) or one of its options (`m` for `options[i][m - 1]`), maximising the step's
/// expected tokens per second; and that goodput.
pub fn choose_draft_options(
    cost: &CostModel,
    contexts: &[usize],
    options: &[Vec<DraftOption>],
) -> (Vec<usize>, f64) {
    assert_eq!(contexts.len(), options.len(), "one option list per request");
    let deepest = options
        .iter()
        .flat_map(|l| l.iter().map(|o| o.level()))
        .max()
        .unwrap_or(0);
    let most_tokens: Vec<f64> = options
        .iter()
        .map(|l| l.iter().map(|o| o.expected_tokens).fold(1.0, f64::max))
        .collect();
    let model_free = options.iter().flatten().any(DraftOption::is_model_free);
    let (choice, value) = search(cost, contexts, &most_tokens, deepest, model_free, |level| {
        // Level `l` offers the options of depth (or model-free length) `l + 1`, tagged with their place in the
        // list.
        options
            .iter()
            .map(|list| {
                list.iter()
                    .enumerate()
                    .filter(|(_, o)| o.level() == level + 1)
                    .map(|(m, o)| (o.clone(), m + 1))
                    .collect()
            })
            .collect()
    });
    (choice.into_iter().map(|m| m.unwrap_or(0)).collect(), value)
}

/// The relative gain in goodput a move of the local search must exceed: far above the rounding of its
/// incremental bookkeeping (about 1e-16 per move), far below any difference that matters.
const MIN_GAIN: f64 = 1e-12;

/// The search behind [`choose_draft_options`] and [`choose_draft_trees`]. `levels` depth limits, in increasing
/// order; `offer(level)` returns, per request, the options that become available at that level (no deeper than
/// its limit), each with a tag. `most_tokens[i]` bounds request `i`'s expected tokens over every option;
/// `model_free` says whether some option drafts without a draft step.
/// Returns each request's chosen tag (`None`: no draft) and the goodput.
fn search<T: Copy>(
    cost: &CostModel,
    contexts: &[usize],
    most_tokens: &[f64],
    levels: usize,
    model_free: bool,
    mut offer: impl FnMut(usize) -> Vec<Vec<(DraftOption, T)>>,
) -> (Vec<Option<T>>, f64) {
    let batch = contexts.len();
    let context: usize = contexts.iter().sum();
    let plain = batch as f64 / cost.target_step(batch, context);
    let mut best = (vec![None; batch], plain);
    if batch == 0 || !speculation_may_pay(cost, contexts, most_tokens, plain, model_free) {
        return best;
    }
    let none = DraftOption::none();
    let mut offered: Vec<Vec<(DraftOption, T)>> = vec![Vec::new(); batch];
    let (mut previous, mut falls) = (0.0, 0);
    for level in 0..levels {
        for (list, new) in offered.iter_mut().zip(offer(level)) {
            list.extend(new);
        }
        // Option 0 of every request is no draft.
        let lists: Vec<Vec<&DraftOption>> = offered
            .iter()
            .map(|l| {
                std::iter::once(&none)
                    .chain(l.iter().map(|(o, _)| o))
                    .collect()
            })
            .collect();
        let mut step = Step::new(cost, contexts, &lists);
        loop {
            let mut changed = false;
            for (i, list) in lists.iter().enumerate() {
                let current = step.choice[i];
                // A move must gain more than rounding: goodput_if and the state set() leaves are updated
                // incrementally, so between two nearly tied options each could look better than the other by
                // an ulp, and the ascent would swap them for ever (it did, on 1 run in about 25 of the
                // brute-force test).
                let current_value = step.goodput();
                let (mut best_m, mut best_value) = (current, current_value * (1.0 + MIN_GAIN));
                for m in 0..list.len() {
                    if m != current {
                        let value = step.goodput_if(i, m);
                        if value > best_value {
                            (best_m, best_value) = (m, value);
                        }
                    }
                }
                if best_m != current {
                    step.set(i, best_m);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let chosen: Vec<&DraftOption> = step
            .choice
            .iter()
            .enumerate()
            .map(|(i, &m)| lists[i][m])
            .collect();
        let tokens: f64 = chosen.iter().map(|o| o.expected_tokens).sum();
        let shapes: Vec<&DraftShape> = chosen.iter().map(|o| &o.shape).collect();
        let value = tokens / shaped_step_seconds(cost, contexts, &shapes);
        if value > best.1 {
            let tags = step
                .choice
                .iter()
                .zip(&offered)
                .map(|(&m, list)| (m > 0).then(|| list[m - 1].1))
                .collect();
            best = (tags, value);
        }
        // The value over the depth limit rises, then falls: stop once it has fallen twice in a row.
        falls = if value < previous { falls + 1 } else { 0 };
        previous = value;
        if falls == 2 {
            break;
        }
    }
    best
}

/// Whether any drafting could beat plain decoding: every request's most productive option, over a step no
/// shorter than any drafting step can be (one draft step of the shortest context, unless a model-free drafter
/// is on offer, then a verification of one draft), must beat the plain goodput. Both step terms only grow with
/// more drafts, so this bound is safe.
fn speculation_may_pay(
    cost: &CostModel,
    contexts: &[usize],
    most_tokens: &[f64],
    plain: f64,
    model_free: bool,
) -> bool {
    let batch = contexts.len();
    let context: usize = contexts.iter().sum();
    let shortest = contexts.iter().copied().min().unwrap_or(0);
    let cheapest_draft = if model_free {
        0.0
    } else {
        cost.draft_tree_step(1, shortest, 1)
    };
    let fastest = cheapest_draft + cost.verify_step(batch, context, batch + 1);
    most_tokens.iter().sum::<f64>() / fastest > plain
}

/// A step's choices with what pricing a change needs: per draft position, how many requests draft there,
/// their context and their drafter tokens.
struct Step<'a> {
    cost: &'a CostModel,
    contexts: &'a [usize],
    lists: &'a [Vec<&'a DraftOption>],
    choice: Vec<usize>,
    /// Per draft position `j` (index `j - 1`): requests drafting at `j`, their context, their drafter tokens.
    positions: Vec<(usize, usize, usize)>,
    /// The draft step time of each position.
    position_times: Vec<f64>,
    tokens: f64,
    draft_seconds: f64,
    verified: usize,
    context: usize,
}

impl<'a> Step<'a> {
    /// Every request at its most productive option.
    fn new(cost: &'a CostModel, contexts: &'a [usize], lists: &'a [Vec<&'a DraftOption>]) -> Self {
        let deepest = lists
            .iter()
            .flat_map(|l| l.iter().map(|o| o.depth()))
            .max()
            .unwrap_or(0);
        let mut step = Step {
            cost,
            contexts,
            lists,
            choice: vec![0; contexts.len()],
            positions: vec![(0, 0, 0); deepest],
            position_times: vec![0.0; deepest],
            tokens: contexts.len() as f64,
            draft_seconds: 0.0,
            verified: contexts.len(),
            context: contexts.iter().sum(),
        };
        for (i, list) in lists.iter().enumerate() {
            let start = (0..list.len())
                .max_by(|&a, &b| list[a].expected_tokens.total_cmp(&list[b].expected_tokens))
                .unwrap_or(0);
            step.set(i, start);
        }
        step
    }

    fn price(&self, tokens: f64, draft_seconds: f64, verified: usize) -> f64 {
        let batch = self.contexts.len();
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

    fn position_seconds(&self, (n, context, tokens): (usize, usize, usize)) -> f64 {
        if n == 0 {
            0.0
        } else {
            self.cost.draft_tree_step(n, context, tokens)
        }
    }

    /// The positions request `i` touches moving from option `from` to `to`, each with its new value.
    fn moved(
        &self,
        i: usize,
        from: usize,
        to: usize,
    ) -> impl Iterator<Item = (usize, (usize, usize, usize))> + '_ {
        let (old, new) = (self.lists[i][from], self.lists[i][to]);
        let c = self.contexts[i];
        let reach = old.depth().max(new.depth());
        (0..reach).map(move |p| {
            let (mut n, mut context, mut tokens) = self.positions[p];
            if let Some(&t) = old.shape.drafter_tokens.get(p) {
                (n, context, tokens) = (n - 1, context - c, tokens - t);
            }
            if let Some(&t) = new.shape.drafter_tokens.get(p) {
                (n, context, tokens) = (n + 1, context + c, tokens + t);
            }
            (p, (n, context, tokens))
        })
    }

    fn goodput_if(&self, i: usize, m: usize) -> f64 {
        let from = self.choice[i];
        let (old, new) = (self.lists[i][from], self.lists[i][m]);
        let mut draft_seconds = self.draft_seconds;
        for (p, position) in self.moved(i, from, m) {
            draft_seconds += self.position_seconds(position) - self.position_times[p];
        }
        let tokens = self.tokens - old.expected_tokens + new.expected_tokens;
        let verified = self.verified + new.shape.verified - old.shape.verified;
        self.price(tokens, draft_seconds, verified)
    }

    fn set(&mut self, i: usize, m: usize) {
        let from = self.choice[i];
        let (old, new) = (self.lists[i][from], self.lists[i][m]);
        let moved: Vec<_> = self.moved(i, from, m).collect();
        for (p, position) in moved {
            let seconds = self.position_seconds(position);
            self.draft_seconds += seconds - self.position_times[p];
            self.positions[p] = position;
            self.position_times[p] = seconds;
        }
        self.tokens += new.expected_tokens - old.expected_tokens;
        self.verified = self.verified + new.shape.verified - old.shape.verified;
        self.choice[i] = m;
    }
}
