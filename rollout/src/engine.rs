//! The decoding loop: a batch of requests decoded together, each step one target forward pass over every
//! active request's verification tree (its last decided token as the root, the drafts as the other nodes), then
//! specdec's rejection sampler over the target's rows, then compaction of the accepted paths.
//!
//! Without a drafter every tree is its root alone: autoregressive decoding through the very same calls. With
//! specdec's suffix drafter ([`specdec::drafter`], DAS's drafter over the rollouts of the same prompt, earlier
//! iterations included) the drafts are point masses: the sampler accepts a drafted token with the target's
//! probability of it and otherwise samples the residual (Leviathan et al. 2023, section 2.3; SpecInfer's
//! multi-step verification for trees, Miao et al. 2024, section 4.2), so the output distribution is the
//! target's at any temperature; at temperature 0 it is the target's argmax. With EfficientRollout's int4
//! self-drafter ([`crate::selfdraft`]) the drafts are sampled from the drafter's distribution `q`, whose rows go
//! to the sampler with them: a draft is accepted with probability `min(1, p/q)`, otherwise the residual
//! `norm(max(0, p - q))` is sampled (Leviathan et al. 2023, section 2.3).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use specdec::drafter::{Draft, DraftKind, Drafter};
use specdec::policy::{
    choose_draft_options, AcceptanceStats, CostModel, DraftOption, EfficientRollout,
    EfficientRolloutConfig, RequestOutlook,
};
use specdec::sampling::{noise, Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};
use specdec::tree::{compaction_paths, PackedTrees, VerifyTree, MAX_DRAFTS};

use crate::pq::PqSample;
use crate::target::{SequenceId, Target, TreeInput};

/// One rollout to generate.
#[derive(Debug, Clone)]
pub struct Request {
    /// The drafter's request id: unique among the requests alive together.
    pub id: u64,
    /// The prompt's id: the rollouts of one prompt share a drafter history.
    pub prompt_id: u64,
    /// The prompt's tokens (chat template applied), at least one.
    pub prompt: Vec<u32>,
    /// The sampler's Philox key for this rollout ([`specdec::sampling::noise::sample_seed`]).
    pub seed: u64,
}

/// How drafts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drafting {
    /// None: autoregressive decoding.
    None,
    /// The suffix drafter's chains.
    SuffixChain,
    /// The suffix drafter's trees.
    SuffixTree,
    /// specdec's goodput policy over the suffix drafter's chains: each step, every rollout's chain is cut to
    /// the length (0 included) that maximises the batch's expected tokens per second under
    /// [`DecodeSettings::cost`], from the rollout's measured per-position acceptance
    /// ([`specdec::policy::choose_draft_options`]).
    GoodputChain,
    /// EfficientRollout's int4 self-drafter ([`Target::requantize_drafter`]): chains of `k` tokens (1 to
    /// [`MAX_DRAFTS`]), each sampled from the drafter at the step's temperature and top-p, one batched draft
    /// forward pass per depth.
    Int4Chain {
        /// Drafts per step.
        k: usize,
    },
    /// specdec's goodput policy over the int4 self-drafter's chains: each step, every rollout's chain length
    /// (0 to `max_k`) maximising the batch's expected tokens per second under [`DecodeSettings::int4_cost`]
    /// (whose draft steps are the int4 drafter's, measured), from the rollout's measured acceptance.
    GoodputInt4 {
        /// The longest chain considered.
        max_k: usize,
    },
    /// EfficientRollout's toggle and ladder ([`specdec::policy::EfficientRollout`], its published settings)
    /// over the int4 self-drafter: each step, speculation turns on (for the rest of the call) once the
    /// predicted speedup under [`DecodeSettings::int4_cost`] reaches its margin, every rollout then drafting
    /// the ladder's length. The ladder starts at its first rung in every call (it moves between rollouts,
    /// and a call is one rollout phase here).
    EfficientRolloutInt4,
}

/// The settings of a batch.
#[derive(Debug, Clone, Copy)]
pub struct DecodeSettings {
    /// Most new tokens per rollout.
    pub max_new_tokens: usize,
    /// The token that ends a rollout (kept in its output).
    pub stop_token: u32,
    /// Sampling temperature, `>= 0`; 0 is greedy.
    pub temperature: f32,
    /// Nucleus sampling: `(0, 1]`, 1 off.
    pub top_p: f32,
    /// How drafts are made.
    pub drafting: Drafting,
    /// The step cost model of [`Drafting::GoodputChain`] (fitted on this machine: [`crate::policy::calibrate`]).
    pub cost: Option<CostModel>,
    /// The step cost model of the int4 policies ([`Drafting::GoodputInt4`], [`Drafting::EfficientRolloutInt4`]):
    /// fitted with the int4 drafter's draft steps ([`crate::policy::Calibration::int4`]).
    pub int4_cost: Option<CostModel>,
    /// With the int4 self-drafter above temperature 0, every rollout's drafted positions at the decoding steps
    /// `0, pq_every, 2 pq_every, ...` of the rollout are logged to [`DecodeStats::pq`]; 0 logs none.
    pub pq_every: u64,
}

/// What a batch took and did.
#[derive(Debug, Clone, Default)]
pub struct DecodeStats {
    /// Decoding steps (target forward passes after the prefill).
    pub steps: usize,
    /// Rollout-steps: the active rollouts summed over steps (each is one tree verified); autoregressive
    /// decoding emits exactly one token per rollout-step.
    pub rollout_steps: usize,
    /// Tokens drafted, over all steps and requests.
    pub drafted: usize,
    /// Drafted tokens accepted.
    pub accepted: usize,
    /// Tokens emitted (kept outputs).
    pub generated: usize,
    /// Wall time of the whole batch, prefill included.
    pub wall: Duration,
    /// In the target's forward passes (prefill included).
    pub target: Duration,
    /// In the drafter (proposals and appends).
    pub drafting: Duration,
    /// In the sampler.
    pub sampling: Duration,
    /// `accepted_at[j]`: steps whose draft position `j` was accepted; `drafted_at[j]`: steps that drafted a
    /// token at depth `j + 1`.
    pub accepted_at: Vec<usize>,
    /// See `accepted_at`.
    pub drafted_at: Vec<usize>,
    /// One entry per decoding step, in order.
    pub timeline: Vec<StepRecord>,
    /// The logged drafted positions ([`DecodeSettings::pq_every`]), in step order.
    pub pq: Vec<PqSample>,
    /// Time spent logging them (computing both rows' distributions and their misses): not in `wall`.
    pub pq_logging: Duration,
}

/// One decoding step, for the timeline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// Seconds from the start of the batch to the end of the step.
    pub end: f64,
    /// Rollouts verified in the step (the active batch).
    pub active: usize,
    /// Tokens they kept.
    pub emitted: usize,
}

struct Active {
    request: Request,
    sequence: SequenceId,
    /// The last decided token: the root of the next tree, not yet in the cache.
    last: u32,
    output: Vec<u32>,
    step: u64,
    /// Per-position acceptance of this rollout's drafts, for the goodput policy.
    acceptance: AcceptanceStats,
}

/// Generates every request's rollout; returns the outputs (in request order) and the batch's figures. The
/// drafter, if any, is fed every prompt and every emitted token (its requests are finished at the end), so the
/// next batch drafts from this one's rollouts. On an error every sequence the call made is released and every
/// drafter request it registered is finished, so the target and the drafter stay usable.
///
/// # Errors
/// Settings or requests that cannot run (checked before anything is allocated: `max_new_tokens` 0, a
/// temperature or top-p outside its range, a drafter or cost model missing for the drafting chosen, an empty
/// prompt, a repeated request id, a prompt plus `max_new_tokens` beyond the target's sequence length), or an
/// error of the target, the drafter or the sampler.
pub fn decode(
    target: &mut Target,
    drafter: Option<&Drafter>,
    requests: &[Request],
    settings: &DecodeSettings,
) -> Result<(Vec<Vec<u32>>, DecodeStats)> {
    check_inputs(target, drafter, requests, settings)?;
    let mut held = Held::default();
    let result = run(target, drafter, requests, settings, &mut held);
    if result.is_err() {
        // Best effort: the error being returned is the one that matters.
        for sequence in held.sequences {
            let _ = target.release(sequence);
        }
        if let Some(drafter) = drafter {
            for request in held.requests {
                let _ = drafter.finish_request(request);
            }
        }
    }
    result
}

/// What a call holds: its sequences in the target and its requests in the drafter.
#[derive(Default)]
struct Held {
    sequences: Vec<SequenceId>,
    requests: Vec<u64>,
}

fn check_inputs(
    target: &Target,
    drafter: Option<&Drafter>,
    requests: &[Request],
    settings: &DecodeSettings,
) -> Result<()> {
    ensure!(
        settings.max_new_tokens >= 1,
        "max_new_tokens is 0; at least 1"
    );
    ensure!(
        settings.temperature.is_finite() && settings.temperature >= 0.0,
        "temperature is {}; finite and >= 0",
        settings.temperature
    );
    ensure!(
        settings.top_p > 0.0 && settings.top_p <= 1.0,
        "top_p is {}; in (0, 1]",
        settings.top_p
    );
    match settings.drafting {
        Drafting::None => {}
        Drafting::Int4Chain { k: limit } | Drafting::GoodputInt4 { max_k: limit } => {
            ensure!(
                (1..=MAX_DRAFTS).contains(&limit),
                "{:?}: 1 to {MAX_DRAFTS} drafts",
                settings.drafting
            );
            ensure!(
                target.drafter().is_some(),
                "{:?} needs the target's int4 drafter (Target::requantize_drafter)",
                settings.drafting
            );
            ensure!(
                matches!(settings.drafting, Drafting::Int4Chain { .. })
                    || settings.int4_cost.is_some(),
                "{:?} needs the int4 cost model (settings.int4_cost)",
                settings.drafting
            );
        }
        Drafting::EfficientRolloutInt4 => {
            ensure!(
                target.drafter().is_some(),
                "EfficientRolloutInt4 needs the target's int4 drafter (Target::requantize_drafter)"
            );
            ensure!(
                settings.int4_cost.is_some(),
                "EfficientRolloutInt4 needs the int4 cost model (settings.int4_cost)"
            );
        }
        _ => ensure!(drafter.is_some(), "{:?} needs a drafter", settings.drafting),
    }
    ensure!(
        settings.drafting != Drafting::GoodputChain || settings.cost.is_some(),
        "the goodput policy needs a cost model (settings.cost)"
    );
    let capacity = target.max_sequence_len();
    for (i, request) in requests.iter().enumerate() {
        ensure!(
            !request.prompt.is_empty(),
            "requests[{i}] (id {}): empty prompt",
            request.id
        );
        ensure!(
            request.prompt.len() + settings.max_new_tokens <= capacity,
            "requests[{i}] (id {}): {} prompt tokens plus max_new_tokens {} exceed the target's sequence length {capacity}",
            request.id,
            request.prompt.len(),
            settings.max_new_tokens
        );
        ensure!(
            requests[..i].iter().all(|r| r.id != request.id),
            "requests[{i}]: id {} repeats an earlier request's",
            request.id
        );
    }
    Ok(())
}

fn run(
    target: &mut Target,
    drafter: Option<&Drafter>,
    requests: &[Request],
    settings: &DecodeSettings,
    held: &mut Held,
) -> Result<(Vec<Vec<u32>>, DecodeStats)> {
    let start = Instant::now();
    let mut stats = DecodeStats::default();
    let capacity = target.max_sequence_len();
    let mut outputs = vec![Vec::new(); requests.len()];
    let mut active = Vec::with_capacity(requests.len());
    let mut toggle = match settings.drafting {
        Drafting::EfficientRolloutInt4 => {
            Some(EfficientRollout::new(EfficientRolloutConfig::default())?)
        }
        _ => None,
    };
    // Rollouts of one prompt share its prefill: the first is prefilled, the others copy its cache.
    let mut prefilled: Vec<(u64, &[u32], SequenceId)> = Vec::new();
    for (slot, request) in requests.iter().enumerate() {
        let (&last, context) = request
            .prompt
            .split_last()
            .with_context(|| format!("request {}: empty prompt", request.id))?;
        let t = Instant::now();
        let shared = prefilled.iter().find(|(prompt_id, prompt, _)| {
            *prompt_id == request.prompt_id && *prompt == request.prompt.as_slice()
        });
        let sequence = match shared {
            Some(&(_, _, source)) => {
                let sequence = target.fork(source)?;
                held.sequences.push(sequence);
                sequence
            }
            None => {
                let sequence = target.add_sequence();
                held.sequences.push(sequence);
                target.prefill(sequence, context)?;
                prefilled.push((request.prompt_id, &request.prompt, sequence));
                sequence
            }
        };
        stats.target += t.elapsed();
        if let Some(drafter) = drafter {
            drafter.add_request(request.id, request.prompt_id, &request.prompt)?;
            held.requests.push(request.id);
        }
        active.push((
            slot,
            Active {
                request: request.clone(),
                sequence,
                last,
                output: Vec::new(),
                step: 0,
                acceptance: AcceptanceStats::new(MAX_DRAFTS, ACCEPTANCE_PRIOR, ACCEPTANCE_WEIGHT)?,
            },
        ));
    }

    while !active.is_empty() {
        stats.steps += 1;
        stats.rollout_steps += active.len();
        let t = Instant::now();
        let int4_lengths = match settings.drafting {
            Drafting::Int4Chain { k } => Some(vec![k; active.len()]),
            Drafting::GoodputInt4 { max_k } => Some(goodput_int4_lengths(
                settings.int4_cost.as_ref().context("checked")?,
                &active,
                max_k,
            )),
            Drafting::EfficientRolloutInt4 => {
                let policy = toggle.as_mut().context("made for this drafting")?;
                let context: usize = active
                    .iter()
                    .map(|(_, a)| a.request.prompt.len() + a.output.len())
                    .sum();
                let cost = settings.int4_cost.as_ref().context("checked")?;
                let on = policy.step(cost, active.len(), context);
                let k = if on {
                    policy.gamma().min(MAX_DRAFTS)
                } else {
                    0
                };
                Some(vec![k; active.len()])
            }
            _ => None,
        };
        let (mut drafts, q_rows) = match int4_lengths {
            Some(lengths) => {
                let (drafts, q_rows) = self_drafts(target, &active, &lengths, settings, capacity)?;
                (drafts, Some(q_rows))
            }
            _ => (
                active
                    .iter()
                    .map(|(_, a)| propose(drafter, a, settings, capacity))
                    .collect::<Result<Vec<_>>>()?,
                None,
            ),
        };
        if settings.drafting == Drafting::GoodputChain {
            let cost = settings
                .cost
                .as_ref()
                .context("the goodput policy needs a cost model")?;
            let lengths = goodput_lengths(cost, &active, &drafts);
            for (draft, k) in drafts.iter_mut().zip(lengths) {
                draft.tokens.truncate(k);
                draft.parents.truncate(k);
                draft.probs.truncate(k);
            }
        }
        let trees = active
            .iter()
            .zip(&drafts)
            .map(|((_, a), draft)| Ok(VerifyTree::from_draft(a.last as i32, draft)?))
            .collect::<Result<Vec<_>>>()?;
        stats.drafting += t.elapsed();
        let packed = PackedTrees::new(&trees);
        let nodes: Vec<u32> = packed.tokens.iter().map(|&t| t as u32).collect();
        let inputs: Vec<TreeInput<'_>> = active
            .iter()
            .enumerate()
            .map(|(b, (_, a))| {
                let range = packed.offsets[b] as usize..packed.offsets[b + 1] as usize;
                TreeInput {
                    sequence: a.sequence,
                    tokens: &nodes[range.clone()],
                    parents: &packed.parents[range],
                }
            })
            .collect();
        let t = Instant::now();
        let logits = target.forward(&inputs)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        stats.target += t.elapsed();

        let t = Instant::now();
        let verified = verify(
            &packed,
            &logits,
            q_rows.as_deref(),
            target.config().vocab,
            &active,
            settings,
        )?;
        stats.sampling += t.elapsed();
        if let (Some(q_rows), true) = (&q_rows, settings.pq_every > 0) {
            let t = Instant::now();
            log_pq(
                &mut stats.pq,
                &packed,
                &logits,
                q_rows,
                &verified,
                &active,
                settings,
            );
            stats.pq_logging += t.elapsed();
        }
        let (path_offsets, path_nodes) = compaction_paths(
            &verified.accepted_counts,
            &verified.accepted_nodes,
            packed.emit_width,
        )?;
        let paths: Vec<(SequenceId, &[i32])> = active
            .iter()
            .enumerate()
            .map(|(b, (_, a))| {
                let path = &path_nodes[path_offsets[b] as usize..path_offsets[b + 1] as usize];
                (a.sequence, path)
            })
            .collect();
        let t = Instant::now();
        target.accept(&paths)?;
        stats.target += t.elapsed();

        let w = packed.emit_width;
        let (batch, generated_before) = (active.len(), stats.generated);
        let mut still_active = Vec::with_capacity(active.len());
        for (b, (slot, mut a)) in active.into_iter().enumerate() {
            let accepted = verified.accepted_counts[b] as usize;
            let tree = &trees[b];
            stats.drafted += tree.drafts();
            stats.accepted += accepted;
            let depths = tree.depths();
            let max_depth = depths.iter().copied().max().unwrap_or(0);
            grow(&mut stats.drafted_at, max_depth);
            grow(&mut stats.accepted_at, max_depth);
            for depth in 1..=max_depth {
                stats.drafted_at[depth - 1] += 1;
            }
            for j in 0..accepted {
                stats.accepted_at[j] += 1;
            }
            if tree.drafts() > 0 {
                a.acceptance.record(max_depth, accepted)?;
            } else {
                a.acceptance.forget(ACCEPTANCE_WEIGHT / 4.0);
            }
            let emitted = &verified.emitted_tokens[b * w..b * w + accepted + 1];
            let room = settings.max_new_tokens - a.output.len();
            let mut kept: Vec<u32> = emitted.iter().take(room).map(|&t| t as u32).collect();
            let stop = kept.iter().position(|&t| t == settings.stop_token);
            if let Some(stop) = stop {
                kept.truncate(stop + 1);
            }
            stats.generated += kept.len();
            a.output.extend_from_slice(&kept);
            a.step += 1;
            let t = Instant::now();
            if let Some(drafter) = drafter {
                drafter.append(a.request.id, &kept)?;
            }
            stats.drafting += t.elapsed();
            a.last = *kept.last().expect("a step emits at least one token");
            if stop.is_some() || a.output.len() >= settings.max_new_tokens {
                target.release(a.sequence)?;
                held.sequences.retain(|&s| s != a.sequence);
                if let Some(drafter) = drafter {
                    drafter.finish_request(a.request.id)?;
                    held.requests.retain(|&r| r != a.request.id);
                }
                outputs[slot] = std::mem::take(&mut a.output);
            } else {
                still_active.push((slot, a));
            }
        }
        active = still_active;
        stats.timeline.push(StepRecord {
            end: (start.elapsed() - stats.pq_logging).as_secs_f64(),
            active: batch,
            emitted: stats.generated - generated_before,
        });
    }
    stats.wall = start.elapsed() - stats.pq_logging;
    Ok((outputs, stats))
}

/// Logs the drafted positions of the rollouts at a logged step ([`DecodeSettings::pq_every`]): the target's row
/// of each draft (its parent node's logits), the drafter's row it was drawn from, and whether it was accepted.
fn log_pq(
    log: &mut Vec<PqSample>,
    packed: &PackedTrees,
    logits: &[f32],
    q_rows: &[Vec<f32>],
    verified: &Verified,
    active: &[(usize, Active)],
    settings: &DecodeSettings,
) {
    if settings.temperature == 0.0 {
        return;
    }
    let vocab = logits.len() / packed.tokens.len();
    for (b, (_, a)) in active.iter().enumerate() {
        if a.step % settings.pq_every != 0 {
            continue;
        }
        let root = packed.offsets[b] as usize;
        for (j, draft) in q_rows[b].chunks(vocab).enumerate() {
            let token = packed.tokens[root + 1 + j] as u32;
            let reached = (j as i32) <= verified.accepted_counts[b];
            let accepted = (j as i32) < verified.accepted_counts[b];
            log.push(PqSample::new(
                (a.request.id, a.step, j + 1),
                (token, reached, accepted),
                &logits[(root + j) * vocab..][..vocab],
                draft,
                settings.temperature,
                settings.top_p,
            ));
        }
    }
}

fn grow(v: &mut Vec<usize>, len: usize) {
    if v.len() < len {
        v.resize(len, 0);
    }
}

/// The request's draft from the suffix drafter (none without drafting), cut so that every node can be kept:
/// none deeper than the request's remaining budget of new tokens allows, none below a stop token (a rollout
/// ends there), and no more nodes than the sequence has room for. Parents come first, so dropping a node with
/// its descendants, or the last nodes, keeps a valid tree.
fn propose(
    drafter: Option<&Drafter>,
    a: &Active,
    settings: &DecodeSettings,
    capacity: usize,
) -> Result<Draft> {
    let kind = match settings.drafting {
        Drafting::None
        | Drafting::Int4Chain { .. }
        | Drafting::GoodputInt4 { .. }
        | Drafting::EfficientRolloutInt4 => return Ok(Draft::default()),
        Drafting::SuffixChain | Drafting::GoodputChain => DraftKind::Chain,
        Drafting::SuffixTree => DraftKind::Tree,
    };
    let drafter = drafter.expect("checked by decode");
    let mut draft = drafter.propose(a.request.id, kind)?;
    let (max_depth, room) = draft_room(a, settings, capacity);
    let mut depth = Vec::with_capacity(draft.tokens.len());
    let mut keep = Vec::with_capacity(draft.tokens.len());
    for (i, &parent) in draft.parents.iter().enumerate() {
        ensure!(
            parent >= -1 && parent < i as i32,
            "the drafter's node {i} has parent {parent}"
        );
        let (d, parent_open) = if parent < 0 {
            (1, true)
        } else {
            let p = parent as usize;
            (
                depth[p] + 1,
                keep[p] && draft.tokens[p] != settings.stop_token,
            )
        };
        depth.push(d);
        keep.push(d <= max_depth && parent_open);
    }
    let mut new_index = vec![-1i32; keep.len()];
    let (mut tokens, mut parents, mut probs) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..keep.len() {
        if keep[i] && tokens.len() < room {
            new_index[i] = tokens.len() as i32;
            tokens.push(draft.tokens[i]);
            probs.push(draft.probs.get(i).copied().unwrap_or(0.0));
            let p = draft.parents[i];
            parents.push(if p < 0 { -1 } else { new_index[p as usize] });
        }
    }
    draft.tokens = tokens;
    draft.parents = parents;
    draft.probs = probs;
    Ok(draft)
}

/// How deep a rollout's drafts may go this step (its remaining budget of new tokens less one, as a step emits
/// its accepted drafts plus one; at most [`MAX_DRAFTS`]) and how many nodes its sequence has room for (the
/// cache holds the context but its last token, the root; the tree's nodes go after it).
fn draft_room(a: &Active, settings: &DecodeSettings, capacity: usize) -> (usize, usize) {
    let max_depth = (settings.max_new_tokens - a.output.len())
        .saturating_sub(1)
        .min(MAX_DRAFTS);
    let room = capacity.saturating_sub(a.request.prompt.len() + a.output.len());
    (max_depth, room)
}

/// The most drafts a chain may have this step ([`draft_room`]).
fn draft_limit(a: &Active, settings: &DecodeSettings, capacity: usize) -> usize {
    let (max_depth, room) = draft_room(a, settings, capacity);
    max_depth.min(room)
}

/// The int4 self-drafter's chains: each active rollout drafts up to its `lengths` entry (fewer near its budget, its
/// sequence's end, or after drafting the stop token), one batched [`Target::draft_forward`] per depth over the
/// rollouts still drafting. Each draft is drawn from the drafter's row by specdec's own sampler (a verification
/// with no drafts emits one token from its row), at the step's temperature and top-p, with Philox noise of a
/// stream of its own ([`draft_seed`]): so `q` is exactly the distribution the verification computes from the
/// same row. At temperature 0 a draft is the drafter's argmax. Returns the chains and, above temperature 0,
/// each rollout's draft logits (`[drafts, vocab]`, f32), the rows its verification reads as `q`. The drafted
/// tokens' KV is dropped again ([`Target::rewind`]); the verification writes the target's over it.
fn self_drafts(
    target: &mut Target,
    active: &[(usize, Active)],
    lengths: &[usize],
    settings: &DecodeSettings,
    capacity: usize,
) -> Result<(Vec<Draft>, Vec<Vec<f32>>)> {
    let vocab = target.config().vocab;
    let limits: Vec<usize> = active
        .iter()
        .zip(lengths)
        .map(|((_, a), &k)| draft_limit(a, settings, capacity).min(k))
        .collect();
    let mut drafts = vec![Draft::default(); active.len()];
    let mut q_rows = vec![Vec::new(); active.len()];
    let mut open: Vec<bool> = limits.iter().map(|&l| l > 0).collect();
    for depth in 0..limits.iter().copied().max().unwrap_or(0) {
        let members: Vec<usize> = (0..active.len()).filter(|&b| open[b]).collect();
        if members.is_empty() {
            break;
        }
        let fed: Vec<[u32; 1]> = members
            .iter()
            .map(|&b| [*drafts[b].tokens.last().unwrap_or(&active[b].1.last)])
            .collect();
        let inputs: Vec<TreeInput<'_>> = members
            .iter()
            .zip(&fed)
            .map(|(&b, token)| TreeInput {
                sequence: active[b].1.sequence,
                tokens: token,
                parents: &[-1],
            })
            .collect();
        let logits = target.draft_forward(&inputs)?;
        let kept: Vec<(SequenceId, &[i32])> = members
            .iter()
            .map(|&b| (active[b].1.sequence, &[0][..]))
            .collect();
        target.accept(&kept)?;
        let logits = logits.flatten_all()?.to_vec1::<f32>()?;
        let tokens = if settings.temperature == 0.0 {
            logits.chunks(vocab).map(specdec::cpu::argmax).collect()
        } else {
            let rollouts: Vec<&Active> = members.iter().map(|&b| &active[b].1).collect();
            sample_drafts(&logits, vocab, &rollouts, depth, settings)?
        };
        for ((&b, &token), row) in members.iter().zip(&tokens).zip(logits.chunks(vocab)) {
            if settings.temperature > 0.0 {
                q_rows[b].extend_from_slice(row);
            }
            let draft = &mut drafts[b];
            draft.parents.push(draft.tokens.len() as i32 - 1);
            draft.tokens.push(token as u32);
            open[b] = draft.tokens.len() < limits[b] && token as u32 != settings.stop_token;
        }
    }
    for ((_, a), draft) in active.iter().zip(&drafts) {
        target.rewind(a.sequence, draft.tokens.len())?;
    }
    Ok((drafts, q_rows))
}

/// One token from each row of `logits` (`[rollouts, vocab]`), by specdec's sampler: a verification of empty
/// chains emits its bonus token, drawn from the row at the step's temperature and top-p.
fn sample_drafts(
    logits: &[f32],
    vocab: usize,
    rollouts: &[&Active],
    depth: usize,
    settings: &DecodeSettings,
) -> Result<Vec<usize>> {
    let n = rollouts.len();
    let offsets = vec![0i32; n + 1];
    let temperature = vec![settings.temperature; n];
    let top_p = vec![settings.top_p; n];
    let seeds: Vec<u64> = rollouts
        .iter()
        .map(|a| draft_seed(a.request.seed))
        .collect();
    let steps: Vec<u64> = rollouts
        .iter()
        .map(|a| a.step * (MAX_DRAFTS as u64 + 1) + depth as u64)
        .collect();
    let (mut accepted, mut emitted) = (vec![0i32; n], vec![-1i32; n]);
    let inputs = VerifyInputs {
        vocab_size: vocab,
        drafts: Drafts::Chain {
            draft_offsets: offsets.as_slice().into(),
            draft_tokens: (&[][..]).into(),
        },
        target: Rows::LogitsF32(logits.into()),
        draft: None,
        params: Some(SamplingParams {
            temperature: temperature.as_slice().into(),
            top_k: None,
            top_p: (settings.top_p < 1.0).then(|| top_p.as_slice().into()),
        }),
        draft_params: None,
        seeds: seeds.as_slice().into(),
        steps: steps.as_slice().into(),
    };
    let outputs = VerifyOutputs {
        emit_width: 1,
        accepted_counts: accepted.as_mut_slice().into(),
        emitted_tokens: emitted.as_mut_slice().into(),
        accepted_nodes: None,
        accept_flags: None,
        request_status: None,
    };
    specdec::cpu::rejection_verify(&inputs, outputs).context("sampling the int4 drafts")?;
    Ok(emitted.into_iter().map(|t| t as usize).collect())
}

/// The Philox key of a rollout's drafts: derived from its sampling seed ([`noise::sample_seed`] with an index
/// no group uses), so the drafts' noise is independent of the verification's.
fn draft_seed(seed: u64) -> u64 {
    noise::sample_seed(seed, u64::MAX)
}

/// A rollout's acceptance estimates start here and move by this weight per verification.
const ACCEPTANCE_PRIOR: f64 = 0.5;
const ACCEPTANCE_WEIGHT: f64 = 0.2;

/// Per rollout, the length of its chain to verify (0 to the proposal's length) maximising the step's expected
/// tokens per second: [`specdec::policy::choose_draft_options`] with every chain length as an option, each a
/// model-free chain (the suffix drafter runs no model: no draft step, only the verification is priced).
fn goodput_lengths(cost: &CostModel, active: &[(usize, Active)], drafts: &[Draft]) -> Vec<usize> {
    let contexts: Vec<usize> = active
        .iter()
        .map(|(_, a)| a.request.prompt.len() + a.output.len())
        .collect();
    let options: Vec<Vec<DraftOption>> = active
        .iter()
        .zip(drafts)
        .map(|((_, a), draft)| {
            let outlook = RequestOutlook {
                context: a.request.prompt.len() + a.output.len(),
                acceptance: (1..=draft.tokens.len())
                    .map(|j| a.acceptance.acceptance(j))
                    .collect(),
            };
            (1..=draft.tokens.len())
                .map(|k| DraftOption::model_free_chain(&outlook, k))
                .collect()
        })
        .collect();
    choose_draft_options(cost, &contexts, &options).0
}

/// Per rollout, the int4 chain length (0 to `max_k`) maximising the step's expected tokens per second:
/// [`specdec::policy::choose_draft_options`] with every chain length as an option, each priced with its draft
/// steps and its verification.
fn goodput_int4_lengths(cost: &CostModel, active: &[(usize, Active)], max_k: usize) -> Vec<usize> {
    let contexts: Vec<usize> = active
        .iter()
        .map(|(_, a)| a.request.prompt.len() + a.output.len())
        .collect();
    let options: Vec<Vec<DraftOption>> = active
        .iter()
        .map(|(_, a)| {
            let outlook = RequestOutlook {
                context: a.request.prompt.len() + a.output.len(),
                acceptance: (1..=max_k).map(|j| a.acceptance.acceptance(j)).collect(),
            };
            (1..=max_k)
                .map(|k| DraftOption::chain(&outlook, k))
                .collect()
        })
        .collect();
    choose_draft_options(cost, &contexts, &options).0
}

struct Verified {
    accepted_counts: Vec<i32>,
    emitted_tokens: Vec<i32>,
    accepted_nodes: Vec<i32>,
}

/// specdec's rejection sampler over the packed trees, the target's f32 logits one row per node; the drafts are
/// point masses, or, with `q_rows` (each rollout's `[drafts, vocab]` draft logits, read with the target's
/// temperature and top-p), chains drawn from those.
fn verify(
    packed: &PackedTrees,
    logits: &[f32],
    q_rows: Option<&[Vec<f32>]>,
    vocab: usize,
    active: &[(usize, Active)],
    settings: &DecodeSettings,
) -> Result<Verified> {
    let b = active.len();
    ensure!(logits.len() == packed.tokens.len() * vocab, "logits rows");
    let temperature = vec![settings.temperature; b];
    let top_p = vec![settings.top_p; b];
    let seeds: Vec<u64> = active.iter().map(|(_, a)| a.request.seed).collect();
    let steps: Vec<u64> = active.iter().map(|(_, a)| a.step).collect();
    let w = packed.emit_width;
    let mut out = Verified {
        accepted_counts: vec![0; b],
        emitted_tokens: vec![-1; b * w],
        accepted_nodes: vec![-1; b * w],
    };
    // With q rows, every tree is a chain (root, then its drafts): the sampler's chain form, draft `j` of
    // rollout `b` at packed node `offsets[b] + 1 + j`.
    let chains = q_rows.filter(|_| settings.temperature > 0.0).map(|rows| {
        let draft_offsets: Vec<i32> = packed
            .offsets
            .iter()
            .enumerate()
            .map(|(b, &o)| o - b as i32)
            .collect();
        let draft_tokens: Vec<i32> = (0..b)
            .flat_map(|r| packed.offsets[r] as usize + 1..packed.offsets[r + 1] as usize)
            .map(|node| packed.tokens[node])
            .collect();
        (draft_offsets, draft_tokens, rows.concat())
    });
    let drafts = match &chains {
        Some((draft_offsets, draft_tokens, _)) => Drafts::Chain {
            draft_offsets: draft_offsets.as_slice().into(),
            draft_tokens: draft_tokens.as_slice().into(),
        },
        None => Drafts::Tree {
            node_offsets: packed.offsets.as_slice().into(),
            node_tokens: packed.tokens.as_slice().into(),
            parents: packed.parents.as_slice().into(),
        },
    };
    let inputs = VerifyInputs {
        vocab_size: vocab,
        drafts,
        target: Rows::LogitsF32(logits.into()),
        draft: chains
            .as_ref()
            .map(|(_, _, q)| Rows::LogitsF32(q.as_slice().into())),
        params: Some(SamplingParams {
            temperature: temperature.as_slice().into(),
            top_k: None,
            top_p: (settings.top_p < 1.0).then(|| top_p.as_slice().into()),
        }),
        draft_params: None,
        seeds: seeds.as_slice().into(),
        steps: steps.as_slice().into(),
    };
    let outputs = VerifyOutputs {
        emit_width: w,
        accepted_counts: out.accepted_counts.as_mut_slice().into(),
        emitted_tokens: out.emitted_tokens.as_mut_slice().into(),
        accepted_nodes: Some(out.accepted_nodes.as_mut_slice().into()),
        accept_flags: None,
        request_status: None,
    };
    specdec::cpu::rejection_verify(&inputs, outputs).context("the rejection sampler")?;
    if chains.is_some() {
        // A chain's accepted path is its first drafts, nodes 1..=accepted of its tree (written here, so that
        // compaction reads the tree form whichever form the sampler took).
        for (row, &accepted) in out.accepted_nodes.chunks_mut(w).zip(&out.accepted_counts) {
            for (j, node) in row.iter_mut().enumerate() {
                *node = if (j as i32) < accepted {
                    j as i32 + 1
                } else {
                    -1
                };
            }
        }
    }
    Ok(out)
}
