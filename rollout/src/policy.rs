//! specdec's goodput policy on this machine: [`specdec::policy::CostModel`] calibrated by
//! [`CostModel::fit`] to step times measured here, and per-step draft lengths chosen by
//! [`specdec::policy::choose_draft_options`] from each rollout's measured acceptance.
//!
//! The cost model is a roofline (bytes over bandwidth, FLOPs over the matmul rate) plus fitted per-step,
//! per-sequence and per-token overheads. Here the "device" is this CPU: its copy bandwidth and f32 matmul rate
//! are measured first. The model counts weight bytes as bf16 while the target reads f32 weights, so the
//! roofline is given half the measured bandwidth. The suffix drafter runs no model: its chains are priced as
//! model-free ([`specdec::policy::DraftShape::model_free_chain`]: the verification alone). Its proposals are
//! timed too (microseconds), as the fit needs draft samples; the fitted draft terms are not used. When the
//! target has its int4 self-drafter, its draft steps are timed at the same batch sizes and a second model is
//! fitted with them, which prices the int4 policies' draft steps.

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use specdec::drafter::{DraftKind, Drafter, DrafterConfig};
use specdec::policy::{CostModel, FitReport, Gpu, ModelShape, StepKind, StepSample};

use crate::model::Config;
use crate::target::{chain_parents, Target, TreeInput};

/// What calibration measured, and the fitted model.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Copy bandwidth, bytes per second (read plus write).
    pub bandwidth: f64,
    /// f32 matmul rate on the model's shapes, FLOP per second.
    pub flops: f64,
    /// The step times the fit used.
    pub samples: Vec<StepSample>,
    /// The fitted model.
    pub cost: CostModel,
    /// Its residuals.
    pub report: FitReport,
    /// With the int4 self-drafter: its draft steps' times, and the model fitted with them instead of the
    /// suffix drafter's proposals.
    pub int4: Option<Int4Calibration>,
}

/// The int4 self-drafter's part of the calibration.
#[derive(Debug, Clone)]
pub struct Int4Calibration {
    /// Draft steps (one token per sequence) at each calibration batch size.
    pub samples: Vec<StepSample>,
    /// The cost model fitted on the target and verification samples plus these.
    pub cost: CostModel,
    /// Its residuals.
    pub report: FitReport,
}

/// The batch sizes calibration measures.
const CALIBRATION_BATCHES: [usize; 5] = [1, 2, 4, 8, 16];

/// Sequences calibration holds at once: the largest batch, and the prompt they copy.
pub const CALIBRATION_SEQUENCES: usize = 17;

/// The model's shape for the cost model (weights counted as the cost model counts them).
pub fn model_shape(c: &Config) -> ModelShape {
    let per_layer = c.hidden * (c.num_q_heads + 2 * c.num_kv_heads) * c.head_dim
        + c.num_q_heads * c.head_dim * c.hidden
        + 3 * c.hidden * c.ffn;
    ModelShape {
        name: "SmolLM2-135M (f32 target)",
        params: (c.num_layers * per_layer + c.vocab * c.hidden) as f64,
        layers: c.num_layers,
        hidden: c.hidden,
        q_heads: c.num_q_heads,
        kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
        vocab: c.vocab,
        tied_embeddings: true,
    }
}

/// Bytes per second of a 256 MiB copy (read plus write), the best of three.
pub fn copy_bandwidth() -> f64 {
    let len = 32 << 20; // f64 elements: 256 MiB
    let source = vec![1.0f64; len];
    let mut dest = vec![0.0f64; len];
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        dest.copy_from_slice(&source);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dest);
    }
    2.0 * (len * 8) as f64 / best
}

/// FLOP per second of candle's f32 matmul on the model's MLP shape at 64 rows (weights stored as the target
/// stores them), the best of five.
pub fn matmul_rate(c: &Config) -> Result<f64> {
    let x = Tensor::ones((64, c.hidden), candle_core::DType::F32, &Device::Cpu)?;
    let w = Tensor::ones((c.hidden, c.ffn), candle_core::DType::F32, &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(x.matmul(&w)?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (64 * c.hidden * c.ffn) as f64 / best)
}

/// Measures target steps (plain, and verifying chains of 4 drafts; the best of three runs each) at batches 1 to
/// 16 on copies of `prompt`, and suffix-drafter proposals at two batch sizes, and fits the cost model to them.
///
/// # Errors
/// The target's, or a fit that the samples do not determine.
pub fn calibrate(target: &mut Target, prompt: &[u32]) -> Result<Calibration> {
    ensure!(!prompt.is_empty(), "calibration needs a prompt");
    let config = *target.config();
    let bandwidth = copy_bandwidth();
    let flops = matmul_rate(&config)?;
    let cpu = Gpu {
        name: "this CPU (measured)",
        bandwidth: bandwidth / 2.0,
        flops,
        bandwidth_efficiency: 1.0,
        compute_efficiency: 1.0,
    };
    let source = target.add_sequence();
    target.prefill(source, prompt)?;
    let mut samples = Vec::new();
    for batch in CALIBRATION_BATCHES {
        for nodes in [1usize, 5] {
            let sequences: Vec<_> = (0..batch)
                .map(|_| target.fork(source))
                .collect::<Result<_>>()?;
            let tokens: Vec<u32> = prompt.iter().rev().cycle().take(nodes).copied().collect();
            let parents = chain_parents(nodes);
            let inputs: Vec<TreeInput<'_>> = sequences
                .iter()
                .map(|&sequence| TreeInput {
                    sequence,
                    tokens: &tokens,
                    parents: &parents,
                })
                .collect();
            // The best of three: the step's cost, not the machine's other work.
            let mut seconds = f64::INFINITY;
            for _ in 0..3 {
                let t = Instant::now();
                let logits = target.forward(&inputs)?;
                std::hint::black_box(logits.flatten_all()?.to_vec1::<f32>()?);
                seconds = seconds.min(t.elapsed().as_secs_f64());
                let keep: Vec<(_, &[i32])> = sequences.iter().map(|&s| (s, &[][..])).collect();
                target.accept(&keep)?;
            }
            let kind = if nodes == 1 {
                StepKind::Target
            } else {
                StepKind::Verify {
                    tokens: batch * nodes,
                }
            };
            samples.push(StepSample {
                kind,
                batch,
                context_tokens: batch * prompt.len(),
                seconds,
            });
            for s in sequences {
                target.release(s)?;
            }
        }
    }
    target.release(source)?;
    let drafter = Drafter::new(DrafterConfig::default())?;
    drafter.add_request(u64::MAX, 0, prompt)?;
    drafter.finish_request(u64::MAX)?;
    for batch in [1usize, 16] {
        for r in 0..batch as u64 {
            drafter.add_request(r, 0, prompt)?;
        }
        let t = Instant::now();
        for r in 0..batch as u64 {
            std::hint::black_box(drafter.propose(r, DraftKind::Chain)?);
        }
        samples.push(StepSample {
            kind: StepKind::Draft,
            batch,
            context_tokens: batch * prompt.len(),
            seconds: t.elapsed().as_secs_f64(),
        });
        for r in 0..batch as u64 {
            drafter.finish_request(r)?;
        }
    }
    let (cost, report) = CostModel::fit(cpu, model_shape(&config), &samples)?;
    let int4 = match target.drafter() {
        Some(_) => {
            let int4_samples = int4_draft_samples(target, prompt)?;
            let mut all: Vec<StepSample> = samples
                .iter()
                .filter(|s| s.kind != StepKind::Draft)
                .copied()
                .collect();
            all.extend_from_slice(&int4_samples);
            let (cost, report) = CostModel::fit(cpu, model_shape(&config), &all)?;
            Some(Int4Calibration {
                samples: int4_samples,
                cost,
                report,
            })
        }
        None => None,
    };
    Ok(Calibration {
        bandwidth,
        flops,
        samples,
        cost,
        report,
        int4,
    })
}

/// The int4 self-drafter's draft step (one token per sequence, through [`Target::draft_forward`]) at each
/// calibration batch size on copies of `prompt`, the best of three.
fn int4_draft_samples(target: &mut Target, prompt: &[u32]) -> Result<Vec<StepSample>> {
    let source = target.add_sequence();
    target.prefill(source, prompt)?;
    let token = [*prompt.last().expect("checked non-empty")];
    let mut samples = Vec::new();
    for batch in CALIBRATION_BATCHES {
        let sequences: Vec<_> = (0..batch)
            .map(|_| target.fork(source))
            .collect::<Result<_>>()?;
        let inputs: Vec<TreeInput<'_>> = sequences
            .iter()
            .map(|&sequence| TreeInput {
                sequence,
                tokens: &token,
                parents: &[-1],
            })
            .collect();
        let mut seconds = f64::INFINITY;
        for _ in 0..3 {
            let t = Instant::now();
            let logits = target.draft_forward(&inputs)?;
            std::hint::black_box(logits.flatten_all()?.to_vec1::<f32>()?);
            seconds = seconds.min(t.elapsed().as_secs_f64());
            let keep: Vec<(_, &[i32])> = sequences.iter().map(|&s| (s, &[][..])).collect();
            target.accept(&keep)?;
        }
        samples.push(StepSample {
            kind: StepKind::Draft,
            batch,
            context_tokens: batch * prompt.len(),
            seconds,
        });
        for s in sequences {
            target.release(s)?;
        }
    }
    target.release(source)?;
    Ok(samples)
}
