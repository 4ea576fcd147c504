//! EfficientRollout's self-drafter: the target itself with every linear layer and the LM head requantized to
//! int4 by specdec's quantizer (round to nearest, group size 64, bf16 scales), run through specdec's int4 GEMV.
//! It shares the target's embedding, norms and KV cache: a draft step reads the target's KV of the prefix and
//! appends its own for the drafted tokens, which the verification pass then overwrites ([`crate::target`]).
//! Requantizing takes a fraction of a second and is timed, as it would be after every RL weight update.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use specdec::half::bf16;
use specdec::int4::{GemvShape, Int4Shape, MAX_GEMV_ROWS};

use crate::model::Weights;

/// The quantizer's group size: 64 columns per scale (K = 576 and 1536 are multiples).
pub const GROUP_SIZE: usize = 64;

/// One linear layer `y = x W^T` in specdec's int4 format.
pub struct Int4Linear {
    shape: Int4Shape,
    packed: Vec<u32>,
    scales: Vec<bf16>,
    zeros: Vec<u8>,
}

impl Int4Linear {
    /// Quantizes a weight stored as the target stores it, `[in, out]` f32 (transposed), through bf16.
    ///
    /// # Errors
    /// A shape the int4 format cannot hold (out not a multiple of 16, in not of 64).
    pub fn quantize(transposed: &Tensor) -> Result<Self> {
        let (k, n) = transposed.dims2()?;
        let shape = Int4Shape::new(n, k, GROUP_SIZE)
            .with_context(|| format!("an int4 layout for a {k} x {n} weight"))?;
        let rows: Vec<bf16> = transposed
            .t()?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let mut packed = vec![0u32; shape.packed_len()];
        let mut scales = vec![bf16::ZERO; shape.meta_len()];
        let mut zeros = vec![0u8; shape.meta_len()];
        specdec::cpu::int4_quantize(&shape, &rows, &mut packed, &mut scales, &mut zeros)?;
        Ok(Int4Linear {
            shape,
            packed,
            scales,
            zeros,
        })
    }

    /// `x[M, in] W^T` for any `M`: bf16 activations, f32 accumulation (specdec's CPU GEMV, at most
    /// [`MAX_GEMV_ROWS`] rows per call), returned as f32 `[M, out]`.
    ///
    /// # Errors
    /// `x` not `[M, in]` f32.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        anyhow::ensure!(
            k == self.shape.k,
            "int4 linear: x has {k} columns, the weight {}",
            self.shape.k
        );
        let n = self.shape.n;
        let x: Vec<bf16> = x
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let mut y = vec![bf16::ZERO; m * n];
        for (x, y) in x
            .chunks(MAX_GEMV_ROWS * k)
            .zip(y.chunks_mut(MAX_GEMV_ROWS * n))
        {
            let gemv = GemvShape::new(x.len() / k, self.shape)?;
            specdec::cpu::int4_gemv(&gemv, &self.packed, &self.scales, &self.zeros, x, y)?;
        }
        let y: Vec<f32> = y.into_iter().map(f32::from).collect();
        Ok(Tensor::from_vec(y, (m, n), &Device::Cpu)?)
    }

    /// Bytes of codes, scales and zeros.
    pub fn bytes(&self) -> usize {
        self.packed.len() * 4 + self.scales.len() * 2 + self.zeros.len()
    }
}

/// The int4 linears of one block.
pub struct Int4Block {
    /// Projections, as in [`crate::model::Block`].
    pub wq: Int4Linear,
    /// See `wq`.
    pub wk: Int4Linear,
    /// See `wq`.
    pub wv: Int4Linear,
    /// See `wq`.
    pub wo: Int4Linear,
    /// See `wq`.
    pub w_gate: Int4Linear,
    /// See `wq`.
    pub w_up: Int4Linear,
    /// See `wq`.
    pub w_down: Int4Linear,
}

/// The self-drafter's int4 weights.
pub struct Int4Model {
    /// The blocks, first to last.
    pub blocks: Vec<Int4Block>,
    /// The LM head.
    pub lm_head: Int4Linear,
}

impl Int4Model {
    /// Requantizes every linear layer and the LM head of `weights`; returns the model and the time it took.
    ///
    /// # Errors
    /// A weight shape the int4 format cannot hold.
    pub fn requantize(weights: &Weights) -> Result<(Self, Duration)> {
        let start = Instant::now();
        let blocks = weights
            .blocks
            .iter()
            .map(|b| {
                Ok(Int4Block {
                    wq: Int4Linear::quantize(&b.wq)?,
                    wk: Int4Linear::quantize(&b.wk)?,
                    wv: Int4Linear::quantize(&b.wv)?,
                    wo: Int4Linear::quantize(&b.wo)?,
                    w_gate: Int4Linear::quantize(&b.w_gate)?,
                    w_up: Int4Linear::quantize(&b.w_up)?,
                    w_down: Int4Linear::quantize(&b.w_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = Int4Linear::quantize(&weights.lm_head)?;
        Ok((Int4Model { blocks, lm_head }, start.elapsed()))
    }

    /// Bytes of int4 weights (codes, scales, zeros): what one draft step reads.
    pub fn bytes(&self) -> usize {
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                [&b.wq, &b.wk, &b.wv, &b.wo, &b.w_gate, &b.w_up, &b.w_down]
                    .iter()
                    .map(|l| l.bytes())
                    .sum::<usize>()
            })
            .sum();
        blocks + self.lm_head.bytes()
    }
}
