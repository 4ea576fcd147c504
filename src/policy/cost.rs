//! The step cost model: roofline terms plus fitted per-step overheads.
//!
//! For an active batch of `B` sequences holding `C` context tokens in all:
//!
//! ```text
//! target(B, C)     = max((W  + kv * C) / BW, (2 P B         + 4 L Hq D C)         / F) + t0 + t1 * B
//! draft(B, C, N)   = max((Wd + kv * C) / BW, (2 P N         + 4 L Hq D C N / B)   / F) + d0 + d1 * B
//! verify(B, C, N)  = max((W  + kv * C) / BW, (2 P N         + 4 L Hq D C N / B)   / F) + t0 + t1 * B + v1 * N
//! ```
//!
//! `W` is the bytes of weights a target step reads (every parameter but the embedding table, in bf16), `Wd` the
//! int4 drafter's (int4 linear layers with an fp16 scale and zero per group of 128, i.e. 4.25 bits, and the
//! bf16 LM head it shares), `kv` the KV-cache bytes per context token (the drafter reuses the target's cache,
//! so it reads the same KV), `P` the parameters a token multiplies through, `N` the tokens the step runs (a
//! verification: the sum of `k_i + 1`, or of tree nodes; a chain draft step: `B`; a tree draft step: the nodes
//! at that depth that get children). `BW` and `F` are the GPU's bandwidth and bf16 matrix rate times an
//! achievable fraction. The overheads `t0, t1, d0, d1, v1` (launches, scheduling, sampling) are what the roofline
//! does not see; [`CostModel::fit`] estimates them from measured step times.

use crate::error::{Error, Result};

/// A GPU's peak rates and the fraction of each a well-written kernel reaches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    /// Name, for reports.
    pub name: &'static str,
    /// Peak memory bandwidth, bytes per second (datasheet).
    pub bandwidth: f64,
    /// Peak dense bf16 matrix rate, FLOP per second (datasheet).
    pub flops: f64,
    /// Fraction of `bandwidth` reached.
    pub bandwidth_efficiency: f64,
    /// Fraction of `flops` reached.
    pub compute_efficiency: f64,
}

impl Gpu {
    /// NVIDIA A100-SXM4-80GB: 2.039 TB/s, 312 TFLOP/s bf16 dense (datasheet); 85% and 70% reached.
    pub const A100: Gpu = Gpu {
        name: "A100-80GB",
        bandwidth: 2.039e12,
        flops: 312e12,
        bandwidth_efficiency: 0.85,
        compute_efficiency: 0.70,
    };
    /// NVIDIA H100-SXM5-80GB: 3.35 TB/s, 989 TFLOP/s bf16 dense (datasheet); 85% and 70% reached.
    pub const H100: Gpu = Gpu {
        name: "H100-80GB",
        bandwidth: 3.35e12,
        flops: 989e12,
        bandwidth_efficiency: 0.85,
        compute_efficiency: 0.70,
    };

    fn effective_bandwidth(&self) -> f64 {
        self.bandwidth * self.bandwidth_efficiency
    }
    fn effective_flops(&self) -> f64 {
        self.flops * self.compute_efficiency
    }
}

/// The shape of a decoder-only transformer, as far as step costs depend on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelShape {
    /// Name, for reports.
    pub name: &'static str,
    /// All parameters, embeddings and LM head included.
    pub params: f64,
    /// Transformer layers.
    pub layers: usize,
    /// Model width.
    pub hidden: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Whether the LM head shares the embedding table's weights.
    pub tied_embeddings: bool,
}

impl ModelShape {
    /// Qwen2.5-7B: 7.62 B parameters, 28 layers, width 3584, 28 query and 4 KV heads of 128, vocabulary 152064,
    /// untied embeddings (its published config).
    pub const QWEN25_7B: ModelShape = ModelShape {
        name: "Qwen2.5-7B",
        params: 7.62e9,
        layers: 28,
        hidden: 3584,
        q_heads: 28,
        kv_heads: 4,
        head_dim: 128,
        vocab: 152_064,
        tied_embeddings: false,
    };
    /// Llama-3-8B: 8.03 B parameters, 32 layers, width 4096, 32 query and 8 KV heads of 128, vocabulary 128256,
    /// untied embeddings (its published config).
    pub const LLAMA3_8B: ModelShape = ModelShape {
        name: "Llama-3-8B",
        params: 8.03e9,
        layers: 32,
        hidden: 4096,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        vocab: 128_256,
        tied_embeddings: false,
    };

    fn embedding_params(&self) -> f64 {
        // In f64: shapes come from callers (the C ABI), and their products must not overflow an integer.
        self.vocab as f64 * self.hidden as f64
    }

    /// Parameters every token multiplies through: all but the embedding table (a lookup, not a product).
    pub fn matmul_params(&self) -> f64 {
        if self.tied_embeddings {
            self.params
        } else {
            self.params - self.embedding_params()
        }
    }

    /// Bytes of weights a bf16 target step reads: every matmul parameter, 2 bytes each.
    pub fn target_weight_bytes(&self) -> f64 {
        2.0 * self.matmul_params()
    }

    /// Bytes of weights a step of the int4 self-drafter reads: linear layers at 4.25 bits (int4 with an fp16
    /// scale and zero per group of 128), the LM head in bf16 (shared with the target).
    pub fn int4_drafter_weight_bytes(&self) -> f64 {
        let head = self.embedding_params();
        let linear = self.matmul_params() - head;
        linear * 4.25 / 8.0 + 2.0 * head
    }

    /// KV-cache bytes per context token (bf16 keys and values, every layer).
    pub fn kv_bytes_per_token(&self) -> f64 {
        self.layers as f64 * 2.0 * self.kv_heads as f64 * self.head_dim as f64 * 2.0
    }

    /// Attention FLOPs per query token per context token (QK and PV products, every layer and query head).
    fn attention_flops_per_context_token(&self) -> f64 {
        4.0 * self.layers as f64 * self.q_heads as f64 * self.head_dim as f64
    }
}

/// The overheads the roofline does not see, in seconds: `t0 + t1 * B` on target and verification steps,
/// `d0 + d1 * B` on draft steps, `v1` per verified token.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Overheads {
    /// Per target or verification step.
    pub t0: f64,
    /// Per sequence on a target or verification step.
    pub t1: f64,
    /// Per draft step.
    pub d0: f64,
    /// Per sequence on a draft step.
    pub d1: f64,
    /// Per verified token.
    pub v1: f64,
}

impl Overheads {
    /// The overheads that put the model of Qwen2.5-7B on an A100 at EfficientRollout's published operating
    /// point: a drafter step at 0.486 of a target step at batch 1, a predicted speedup of 1.34 to 1.37 at batch 1
    /// (gamma 5, acceptance 0.9) and break-even batches of 12 to 27 sequences (see the README's validation
    /// table). Replace them with [`CostModel::fit`] on measured step times for real use.
    pub const EFFICIENT_ROLLOUT_A100: Overheads = Overheads {
        t0: 0.5e-3,
        t1: 0.0,
        d0: 1.5e-3,
        d1: 0.06e-3,
        v1: 0.002e-3,
    };
}

/// Which kind of step a time was measured on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    /// A plain decode step.
    Target,
    /// One step of the drafter.
    Draft,
    /// Verification of `tokens` tokens in all.
    Verify {
        /// Tokens verified in the step (the sum of `k_i + 1`).
        tokens: usize,
    },
}

/// A measured step time, for [`CostModel::fit`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSample {
    /// The kind of step.
    pub kind: StepKind,
    /// Sequences in the batch.
    pub batch: usize,
    /// Context tokens over the batch.
    pub context_tokens: usize,
    /// Measured seconds.
    pub seconds: f64,
}

/// The quality of a fit: residuals in seconds, per kind of step.
#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    /// Root-mean-square residual over all samples.
    pub rms: f64,
    /// Largest absolute residual.
    pub max_abs: f64,
    /// Largest residual relative to its measured time.
    pub max_relative: f64,
    /// Samples used.
    pub samples: usize,
}

/// The cost model of one GPU and model, with an int4 self-drafter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// The GPU.
    pub gpu: Gpu,
    /// The target model.
    pub model: ModelShape,
    /// Bytes of weights a draft step reads.
    pub drafter_weight_bytes: f64,
    /// The fitted overheads.
    pub overheads: Overheads,
}

impl CostModel {
    /// The model of `model` on `gpu` with its int4 self-drafter and the given overheads.
    pub fn new(gpu: Gpu, model: ModelShape, overheads: Overheads) -> Self {
        CostModel {
            gpu,
            model,
            drafter_weight_bytes: model.int4_drafter_weight_bytes(),
            overheads,
        }
    }

    fn roofline(
        &self,
        weight_bytes: f64,
        batch: usize,
        context_tokens: usize,
        tokens: usize,
    ) -> f64 {
        let m = &self.model;
        let bytes = weight_bytes + m.kv_bytes_per_token() * context_tokens as f64;
        let mean_context = if batch == 0 {
            0.0
        } else {
            context_tokens as f64 / batch as f64
        };
        let flops = 2.0 * m.matmul_params() * tokens as f64
            + m.attention_flops_per_context_token() * mean_context * tokens as f64;
        (bytes / self.gpu.effective_bandwidth()).max(flops / self.gpu.effective_flops())
    }

    /// Seconds of one plain decode step of `batch` sequences holding `context_tokens` in all.
    pub fn target_step(&self, batch: usize, context_tokens: usize) -> f64 {
        let o = &self.overheads;
        self.roofline(
            self.model.target_weight_bytes(),
            batch,
            context_tokens,
            batch,
        ) + o.t0
            + o.t1 * batch as f64
    }

    /// Seconds of one draft step for `batch` sequences.
    pub fn draft_step(&self, batch: usize, context_tokens: usize) -> f64 {
        self.draft_tree_step(batch, context_tokens, batch)
    }

    /// Seconds of one draft step running `tokens` tree nodes of `batch` sequences (at least one each): the
    /// weights and each sequence's KV prefix are read once, the products grow with the nodes.
    pub fn draft_tree_step(&self, batch: usize, context_tokens: usize, tokens: usize) -> f64 {
        let o = &self.overheads;
        self.roofline(self.drafter_weight_bytes, batch, context_tokens, tokens)
            + o.d0
            + o.d1 * batch as f64
    }

    /// Seconds of one verification step of `tokens` tokens in all (the sum of `k_i + 1`, or of tree nodes).
    pub fn verify_step(&self, batch: usize, context_tokens: usize, tokens: usize) -> f64 {
        let o = &self.overheads;
        self.roofline(
            self.model.target_weight_bytes(),
            batch,
            context_tokens,
            tokens,
        ) + o.t0
            + o.t1 * batch as f64
            + o.v1 * tokens as f64
    }

    /// The predicted speedup of speculating with `gamma` draft tokens per sequence, for a mean of
    /// `tokens_per_step` tokens emitted per verification step, over plain decoding: EfficientRollout's
    /// `L / (gamma * T_draft / T_target + T_verify / T_target)`.
    pub fn predicted_speedup(
        &self,
        batch: usize,
        context_tokens: usize,
        gamma: usize,
        tokens_per_step: f64,
    ) -> f64 {
        let target = self.target_step(batch, context_tokens);
        let draft = self.draft_step(batch, context_tokens);
        let verify = self.verify_step(batch, context_tokens, batch * (gamma + 1));
        tokens_per_step / (gamma as f64 * draft / target + verify / target)
    }

    /// The smallest active batch (1..=max_batch) at which the predicted speedup falls below 1, with every
    /// sequence holding `context_per_sequence` tokens; `None` if it never does.
    pub fn break_even_batch(
        &self,
        context_per_sequence: usize,
        gamma: usize,
        tokens_per_step: f64,
        max_batch: usize,
    ) -> Option<usize> {
        (1..=max_batch).find(|&b| {
            self.predicted_speedup(b, b * context_per_sequence, gamma, tokens_per_step) < 1.0
        })
    }

    /// Fits the overheads to measured step times by least squares, keeping the roofline: for each kind of step,
    /// `measured - roofline` is regressed on its overhead terms (target and verify share `t0`, `t1`; verify adds
    /// `v1`; draft has `d0`, `d1`). Negative estimates are clamped to 0. Needs at least two target or verify
    /// samples at different batch sizes and two draft samples at different batch sizes.
    pub fn fit(
        gpu: Gpu,
        model: ModelShape,
        samples: &[StepSample],
    ) -> Result<(CostModel, FitReport)> {
        let base = CostModel::new(gpu, model, Overheads::default());
        // Target and verify: excess = t0 + t1 * B (+ v1 * N on verify).
        let mut tv_rows = Vec::new();
        let mut draft_rows = Vec::new();
        for s in samples {
            if !(s.seconds.is_finite() && s.seconds > 0.0) || s.batch == 0 {
                return Err(Error::invalid(
                    "samples",
                    format!("{s:?}: seconds must be positive and batch at least 1"),
                ));
            }
            match s.kind {
                StepKind::Target => {
                    let excess = s.seconds - base.target_step(s.batch, s.context_tokens);
                    tv_rows.push((vec![1.0, s.batch as f64, 0.0], excess));
                }
                StepKind::Verify { tokens } => {
                    let excess = s.seconds - base.verify_step(s.batch, s.context_tokens, tokens);
                    tv_rows.push((vec![1.0, s.batch as f64, tokens as f64], excess));
                }
                StepKind::Draft => {
                    let excess = s.seconds - base.draft_step(s.batch, s.context_tokens);
                    draft_rows.push((vec![1.0, s.batch as f64], excess));
                }
            }
        }
        let has_verify = samples
            .iter()
            .any(|s| matches!(s.kind, StepKind::Verify { .. }));
        if !has_verify {
            tv_rows.iter_mut().for_each(|(x, _)| x.truncate(2));
        }
        let tv = least_squares(&tv_rows).ok_or_else(|| Error::invalid("samples", "target/verify samples do not determine t0, t1 (and v1): need distinct batch sizes and token counts"))?;
        let d = least_squares(&draft_rows).ok_or_else(|| {
            Error::invalid(
                "samples",
                "draft samples do not determine d0, d1: need two distinct batch sizes",
            )
        })?;
        let overheads = Overheads {
            t0: tv[0].max(0.0),
            t1: tv[1].max(0.0),
            v1: tv.get(2).copied().unwrap_or(0.0).max(0.0),
            d0: d[0].max(0.0),
            d1: d[1].max(0.0),
        };
        let model = CostModel::new(gpu, model, overheads);
        let residuals: Vec<(f64, f64)> = samples
            .iter()
            .map(|s| {
                let predicted = match s.kind {
                    StepKind::Target => model.target_step(s.batch, s.context_tokens),
                    StepKind::Draft => model.draft_step(s.batch, s.context_tokens),
                    StepKind::Verify { tokens } => {
                        model.verify_step(s.batch, s.context_tokens, tokens)
                    }
                };
                (s.seconds - predicted, s.seconds)
            })
            .collect();
        let rms =
            (residuals.iter().map(|(r, _)| r * r).sum::<f64>() / residuals.len() as f64).sqrt();
        let max_abs = residuals.iter().map(|(r, _)| r.abs()).fold(0.0, f64::max);
        let max_relative = residuals
            .iter()
            .map(|(r, m)| (r / m).abs())
            .fold(0.0, f64::max);
        Ok((
            model,
            FitReport {
                rms,
                max_abs,
                max_relative,
                samples: samples.len(),
            },
        ))
    }
}

/// Ordinary least squares by the normal equations (at most three unknowns here), solved by Gaussian
/// elimination with partial pivoting. `None` when the system is singular (the samples do not determine it).
fn least_squares(rows: &[(Vec<f64>, f64)]) -> Option<Vec<f64>> {
    let n = rows.first()?.0.len();
    let mut a = vec![vec![0.0; n + 1]; n];
    for (x, y) in rows {
        for i in 0..n {
            for j in 0..n {
                a[i][j] += x[i] * x[j];
            }
            a[i][n] += x[i] * y;
        }
    }
    let scale = a
        .iter()
        .flat_map(|r| r[..n].iter())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    for col in 0..n {
        let pivot = (col..n).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[pivot][col].abs() <= 1e-12 * scale {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col].clone();
        for (row, values) in a.iter_mut().enumerate() {
            if row != col {
                let f = values[col] / pivot_row[col];
                for (x, p) in values[col..].iter_mut().zip(&pivot_row[col..]) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..n).map(|i| a[i][n] / a[i][i]).collect())
}
