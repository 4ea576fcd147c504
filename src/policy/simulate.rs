//! A rollout simulator: one RL rollout batch decoded by several engines under a speculation policy, priced by
//! the cost model, to compare policies before spending GPU hours.
//!
//! Model of a rollout (every number configurable in [`RolloutConfig`]):
//! * `prompts x samples` requests (GRPO's n samples per prompt), dealt round-robin over `engines` engines, all
//!   starting together (prefill is not modelled).
//! * Response lengths are long-tailed: each prompt has a median length drawn log-normally, each sample a
//!   log-normal length around it, capped at `max_tokens`.
//! * Each prompt has a first-position acceptance `a0` drawn uniformly from a range; draft position `j` is
//!   accepted with `a0 * exp(-decay * (j - 1))`, given the ones before were.
//! * Each engine decodes its active requests step by step: the policy picks each request's draft (none, a
//!   chain or a tree), the step costs [`shaped_step_seconds`], and each request emits its accepted drafts plus
//!   one token (at most what it has left). A tree's children beyond the first are accepted by the sibling law
//!   ([`child_acceptance`]) at their depth's acceptance.
//! * `rollouts` rollouts run one after another with the same prompts (lengths and coins drawn afresh), so
//!   policies that learn across rollouts (EfficientRollout's ladder, DAS's length averages) can.
//!
//! Reported per policy: the makespan (the slowest engine, summed over rollouts) and the GPU time (all engines'
//! busy time).

use rayon::prelude::*;

use super::{
    child_acceptance, choose_draft_lengths, choose_draft_trees, shaped_step_seconds,
    AcceptanceStats, CostModel, DraftShape, DraftTree, EfficientRollout, RequestOutlook,
};

/// What a policy sees of an active request.
#[derive(Debug, Clone)]
pub struct ActiveRequest<'a> {
    /// Prompt and output tokens so far.
    pub context: usize,
    /// Output tokens so far.
    pub generated: usize,
    /// The moving average of this prompt's past response lengths, if any.
    pub predicted_length: Option<f64>,
    /// Acceptance measured on this request so far.
    pub stats: &'a AcceptanceStats,
}

/// Totals of one rollout over all engines, for policies that adapt between rollouts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RolloutTotals {
    /// Draft tokens proposed.
    pub drafted: u64,
    /// Draft tokens accepted.
    pub accepted: u64,
    /// Tokens emitted by verification steps.
    pub emitted: u64,
    /// Verification steps.
    pub verify_steps: u64,
}

/// One request's draft in one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Draft {
    /// A chain of this many drafts (0: no draft).
    Chain(usize),
    /// A tree of sampled children.
    Tree(DraftTree),
}

impl Draft {
    fn drafts(&self) -> usize {
        match self {
            Draft::Chain(k) => *k,
            Draft::Tree(t) => t.drafts(),
        }
    }

    fn shape(&self) -> DraftShape {
        match self {
            Draft::Chain(k) => DraftShape::chain(*k),
            Draft::Tree(t) => DraftShape::tree(t, t.drafts()),
        }
    }
}

/// A speculation policy: called before every decoding step of an engine.
pub trait SpeculationPolicy: Send {
    /// Name, for reports.
    fn name(&self) -> String;
    /// The draft of each active request.
    fn drafts(&mut self, cost: &CostModel, active: &[ActiveRequest<'_>]) -> Vec<Draft>;
    /// After a rollout, with totals over all engines.
    fn end_rollout(&mut self, _totals: &RolloutTotals) {}
}

fn chains(lengths: impl IntoIterator<Item = usize>) -> Vec<Draft> {
    lengths.into_iter().map(Draft::Chain).collect()
}

/// Plain decoding.
pub struct Autoregressive;

impl SpeculationPolicy for Autoregressive {
    fn name(&self) -> String {
        "autoregressive".into()
    }
    fn drafts(&mut self, _: &CostModel, active: &[ActiveRequest<'_>]) -> Vec<Draft> {
        chains(active.iter().map(|_| 0))
    }
}

/// Always speculate `k` tokens.
pub struct FixedDraft(pub usize);

impl SpeculationPolicy for FixedDraft {
    fn name(&self) -> String {
        format!("always on, k = {}", self.0)
    }
    fn drafts(&mut self, _: &CostModel, active: &[ActiveRequest<'_>]) -> Vec<Draft> {
        chains(active.iter().map(|_| self.0))
    }
}

impl SpeculationPolicy for EfficientRollout {
    fn name(&self) -> String {
        "EfficientRollout toggle + ladder".into()
    }
    fn drafts(&mut self, cost: &CostModel, active: &[ActiveRequest<'_>]) -> Vec<Draft> {
        let context = active.iter().map(|r| r.context).sum();
        let k = if self.step(cost, active.len(), context) {
            self.gamma()
        } else {
            0
        };
        chains(active.iter().map(|_| k))
    }
    fn end_rollout(&mut self, t: &RolloutTotals) {
        EfficientRollout::end_rollout(self, t.accepted, t.drafted, t.emitted, t.verify_steps);
    }
}

/// DAS length classes: a request's predicted length (its prompt's moving average, or its current length once
/// larger) picks its draft length: `budgets[0]` at `thresholds[0]` tokens or more (Long), `budgets[1]` at
/// `thresholds[1]` or more (Medium), `budgets[2]` otherwise (Short).
pub struct LengthClassDraft {
    /// Long and Medium thresholds, in tokens.
    pub thresholds: [usize; 2],
    /// Long, Medium and Short draft lengths.
    pub budgets: [usize; 3],
}

impl SpeculationPolicy for LengthClassDraft {
    fn name(&self) -> String {
        format!(
            "DAS length classes {}/{}/{}",
            self.budgets[0], self.budgets[1], self.budgets[2]
        )
    }
    fn drafts(&mut self, _: &CostModel, active: &[ActiveRequest<'_>]) -> Vec<Draft> {
        chains(active.iter().map(|r| {
            let length = r.predicted_length.unwrap_or(0.0).max(r.generated as f64);
            if length >= self.thresholds[0] as f64 {
                self.budgets[0]
            } else if length >= self.thresholds[1] as f64 {
                self.budgets[1]
            } else {
                self.budgets[2]
            }
        }))
    }
}

/// specdec's policy: [`choose_draft_lengths`] on each request's measured per-position acceptance.
pub struct GoodputDraft {
    /// The longest draft considered.
    pub max_draft: usize,
}

impl SpeculationPolicy for GoodputDraft {
    fn name(&self) -> String {
        format!("specdec goodput, k <= {}", self.max_draft)
    }
    fn drafts(&mut self, cost: &CostModel, active: &[ActiveRequest<'_>]) -> Vec<Draft> {
        chains(choose_draft_lengths(cost, &outlooks(active, self.max_draft), self.max_draft).0)
    }
}

/// specdec's tree policy: [`choose_draft_trees`] on each request's measured per-position acceptance, with the
/// sibling law for the children past the first.
pub struct GoodputTreeDraft {
    /// The most drafts in one request's tree.
    pub max_drafts: usize,
    /// The deepest tree considered.
    pub max_depth: usize,
}

impl SpeculationPolicy for GoodputTreeDraft {
    fn name(&self) -> String {
        format!(
            "specdec goodput trees, <= {} nodes, depth <= {}",
            self.max_drafts, self.max_depth
        )
    }
    fn drafts(&mut self, cost: &CostModel, active: &[ActiveRequest<'_>]) -> Vec<Draft> {
        let (trees, _) = choose_draft_trees(
            cost,
            &outlooks(active, self.max_depth),
            self.max_drafts,
            self.max_depth,
        );
        trees
            .into_iter()
            .map(|t| {
                if t.drafts() == 0 {
                    Draft::Chain(0)
                } else {
                    Draft::Tree(t)
                }
            })
            .collect()
    }
}

/// What the goodput policies see of each request: its context and acceptance estimates for `positions`
/// draft positions.
fn outlooks(active: &[ActiveRequest<'_>], positions: usize) -> Vec<RequestOutlook> {
    active
        .iter()
        .map(|r| RequestOutlook {
            context: r.context,
            acceptance: (1..=positions).map(|j| r.stats.acceptance(j)).collect(),
        })
        .collect()
}

/// The rollout batch and its statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutConfig {
    /// Distinct prompts.
    pub prompts: usize,
    /// Samples per prompt.
    pub samples: usize,
    /// Engines (GPUs) the requests are dealt over.
    pub engines: usize,
    /// Prompt tokens per request.
    pub prompt_tokens: usize,
    /// Median over prompts of their median response length.
    pub median_length: f64,
    /// Log-normal sigma of prompts' median lengths.
    pub prompt_sigma: f64,
    /// Log-normal sigma of samples around their prompt's median.
    pub sample_sigma: f64,
    /// Longest response.
    pub max_tokens: usize,
    /// Range of prompts' first-position acceptance.
    pub acceptance: (f64, f64),
    /// Per-position decay of acceptance.
    pub decay: f64,
    /// Rollouts simulated one after another.
    pub rollouts: usize,
    /// Seed of every random draw.
    pub seed: u64,
    /// Prior of a request's acceptance statistics before any verification.
    pub acceptance_prior: f64,
    /// How far a step without drafting moves a request's acceptance estimates back to the prior
    /// ([`AcceptanceStats::forget`]).
    pub forget_weight: f64,
}

impl Default for RolloutConfig {
    /// 64 prompts x 8 samples on 8 engines, 8192-token cap (EfficientRollout's GRPO setting); median response
    /// 1500 tokens with a long tail (sigma 0.6 across prompts, 0.5 within; these shapes are this simulator's
    /// assumption); acceptance 0.75-0.95 decaying 2% per position.
    fn default() -> Self {
        RolloutConfig {
            prompts: 64,
            samples: 8,
            engines: 8,
            prompt_tokens: 512,
            median_length: 1500.0,
            prompt_sigma: 0.6,
            sample_sigma: 0.5,
            max_tokens: 8192,
            acceptance: (0.75, 0.95),
            decay: 0.02,
            rollouts: 3,
            seed: 1,
            acceptance_prior: 0.7,
            forget_weight: 0.01,
        }
    }
}

/// One step of one engine, for pictures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// Seconds since the rollout started.
    pub start: f64,
    /// Active requests.
    pub batch: usize,
    /// Requests that drafted.
    pub drafting: usize,
    /// Tokens emitted.
    pub tokens: usize,
}

/// The outcome of simulating one policy.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulationReport {
    /// The policy's name.
    pub policy: String,
    /// Sum over rollouts of the slowest engine's time, seconds.
    pub makespan: f64,
    /// Sum over rollouts and engines of busy time, seconds.
    pub gpu_time: f64,
    /// Totals over all rollouts.
    pub totals: RolloutTotals,
    /// Engine 0's steps in the last rollout.
    pub trace: Vec<StepRecord>,
}

/// SplitMix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
}

struct Request {
    prompt: usize,
    length: usize,
    generated: usize,
    a0: f64,
    stats: AcceptanceStats,
}

/// Simulates `config.rollouts` rollouts under `policy` (one instance per engine, from `make_policy`). Engines
/// run in parallel, each with its own seeded stream of acceptance coins, so results do not depend on the
/// number of threads. `progress(done, total)` is called as engine runs finish.
pub fn simulate(
    cost: &CostModel,
    config: &RolloutConfig,
    mut make_policy: impl FnMut() -> Box<dyn SpeculationPolicy>,
    progress: impl FnMut(usize, usize) + Send,
) -> SimulationReport {
    // The workload (lengths, acceptance) comes from its own stream: the same for every policy.
    let mut rng = Rng(config.seed);
    // Per prompt: its median length and its drafter acceptance, fixed across rollouts.
    let prompt_medians: Vec<f64> = (0..config.prompts)
        .map(|_| config.median_length * (config.prompt_sigma * rng.normal()).exp())
        .collect();
    let prompt_acceptance: Vec<f64> = (0..config.prompts)
        .map(|_| config.acceptance.0 + (config.acceptance.1 - config.acceptance.0) * rng.uniform())
        .collect();
    let mut policies: Vec<Box<dyn SpeculationPolicy>> =
        (0..config.engines).map(|_| make_policy()).collect();
    let name = policies[0].name();
    let mut length_average: Vec<Option<f64>> = vec![None; config.prompts];
    let (mut makespan, mut gpu_time) = (0.0, 0.0);
    let mut all = RolloutTotals::default();
    let mut trace = Vec::new();
    let progress = std::sync::Mutex::new((progress, 0));
    for rollout in 0..config.rollouts {
        // Requests dealt round-robin: engine e decodes requests e, e + engines, ...
        let mut engines: Vec<Vec<Request>> = (0..config.engines).map(|_| Vec::new()).collect();
        for r in 0..config.prompts * config.samples {
            let prompt = r / config.samples;
            let length = (prompt_medians[prompt] * (config.sample_sigma * rng.normal()).exp())
                .round()
                .clamp(1.0, config.max_tokens as f64) as usize;
            let stats = AcceptanceStats::new(32, config.acceptance_prior, 0.1)
                .expect("valid statistics settings");
            engines[r % config.engines].push(Request {
                prompt,
                length,
                generated: 0,
                a0: prompt_acceptance[prompt],
                stats,
            });
        }
        let last = rollout + 1 == config.rollouts;
        let runs: Vec<(f64, RolloutTotals, Vec<StepRecord>)> = crate::cpu::pool::install(|| {
            policies
                .par_iter_mut()
                .zip(engines.par_iter_mut())
                .enumerate()
                .map(|(engine, (policy, requests))| {
                    let stream = (config.seed ^ 0xC01D_C0FF_EE00_5EED).wrapping_add(
                        ((rollout * config.engines + engine) as u64)
                            .wrapping_mul(0x2545_F491_4F6C_DD1D),
                    );
                    let mut coins = Rng(Rng(stream).next_u64());
                    let run = run_engine(
                        cost,
                        config,
                        policy.as_mut(),
                        requests,
                        &length_average,
                        &mut coins,
                        last && engine == 0,
                    );
                    let mut guard = progress.lock().expect("progress lock");
                    guard.1 += 1;
                    let done = guard.1;
                    (guard.0)(done, config.rollouts * config.engines);
                    run
                })
                .collect()
        });
        let mut totals = RolloutTotals::default();
        let mut slowest: f64 = 0.0;
        for (clock, engine_totals, engine_trace) in runs {
            slowest = slowest.max(clock);
            gpu_time += clock;
            totals.drafted += engine_totals.drafted;
            totals.accepted += engine_totals.accepted;
            totals.emitted += engine_totals.emitted;
            totals.verify_steps += engine_totals.verify_steps;
            if !engine_trace.is_empty() {
                trace = engine_trace;
            }
        }
        makespan += slowest;
        for (prompt, average) in length_average.iter_mut().enumerate() {
            let total: f64 = engines
                .iter()
                .flatten()
                .filter(|r| r.prompt == prompt)
                .map(|r| r.length as f64)
                .sum();
            let mean = total / config.samples as f64;
            *average = Some(average.map_or(mean, |a| 0.5 * a + 0.5 * mean));
        }
        for policy in &mut policies {
            policy.end_rollout(&totals);
        }
        all.drafted += totals.drafted;
        all.accepted += totals.accepted;
        all.emitted += totals.emitted;
        all.verify_steps += totals.verify_steps;
    }
    SimulationReport {
        policy: name,
        makespan,
        gpu_time,
        totals: all,
        trace,
    }
}

/// One engine's share of a rollout, decoded to the end: its busy seconds, its totals and, if `record`, its
/// steps.
fn run_engine(
    cost: &CostModel,
    config: &RolloutConfig,
    policy: &mut dyn SpeculationPolicy,
    requests: &mut [Request],
    length_average: &[Option<f64>],
    coins: &mut Rng,
    record: bool,
) -> (f64, RolloutTotals, Vec<StepRecord>) {
    let mut clock = 0.0;
    let mut totals = RolloutTotals::default();
    let mut trace = Vec::new();
    let mut active: Vec<usize> = (0..requests.len()).collect();
    while !active.is_empty() {
        let views: Vec<ActiveRequest<'_>> = active
            .iter()
            .map(|&r| ActiveRequest {
                context: config.prompt_tokens + requests[r].generated,
                generated: requests[r].generated,
                predicted_length: length_average[requests[r].prompt],
                stats: &requests[r].stats,
            })
            .collect();
        let drafts = policy.drafts(cost, &views);
        let contexts: Vec<usize> = views.iter().map(|v| v.context).collect();
        let shapes: Vec<DraftShape> = drafts.iter().map(Draft::shape).collect();
        let seconds = shaped_step_seconds(cost, &contexts, &shapes.iter().collect::<Vec<_>>());
        let mut step_tokens = 0;
        for (&r, draft) in active.iter().zip(&drafts) {
            let request = &mut requests[r];
            let truth = |depth: usize| request.a0 * (-config.decay * (depth as f64 - 1.0)).exp();
            // What the verification shows of first children: accepted ones along the path, then the
            // first rejected one (the stats' chain estimates are first-child acceptances).
            let (accepted, first_children) = match draft {
                Draft::Chain(k) => {
                    let accepted = (1..=*k).take_while(|&j| coins.uniform() < truth(j)).count();
                    let mut seen = vec![true; accepted];
                    if accepted < *k {
                        seen.push(false);
                    }
                    (accepted, seen)
                }
                Draft::Tree(tree) => {
                    let path = tree.sample_path(tree.drafts(), |depth, rank| {
                        coins.uniform() < child_acceptance(truth(depth), rank)
                    });
                    let mut seen: Vec<bool> = path.iter().map(|&n| tree.ranks[n] == 1).collect();
                    if let Some(first_sibling) = seen.iter().position(|&first| !first) {
                        seen.truncate(first_sibling + 1);
                    } else {
                        let last = path.last().copied().unwrap_or(0);
                        if tree.parents[1..].contains(&last) {
                            seen.push(false);
                        }
                    }
                    (path.len(), seen)
                }
            };
            let emitted = (accepted + 1).min(request.length - request.generated);
            request.generated += emitted;
            step_tokens += emitted;
            let drafted = draft.drafts();
            if drafted == 0 {
                request.stats.forget(config.forget_weight);
            } else {
                request
                    .stats
                    .record_indicators(&first_children)
                    .expect("indicators end at the first rejection");
                totals.drafted += drafted as u64;
                totals.accepted += accepted as u64;
                totals.emitted += emitted as u64;
                totals.verify_steps += 1;
            }
        }
        if record {
            let drafting = drafts.iter().filter(|d| d.drafts() > 0).count();
            trace.push(StepRecord {
                start: clock,
                batch: active.len(),
                drafting,
                tokens: step_tokens,
            });
        }
        clock += seconds;
        active.retain(|&r| requests[r].generated < requests[r].length);
    }
    (clock, totals, trace)
}
