//! Converters from the int4 layouts of GPTQ and AWQ checkpoints to specdec's format.
//!
//! Both checkpoint formats store `W[N, K]` (a `Linear` with `in_features = K`, `out_features = N`) as integer
//! codes `q`, integer zeros `z` and scales `s` per group of `group_size` input features, meaning
//! `W[n, k] = (q - z) * s`, which is the meaning of specdec's format: conversion moves nibbles and copies the
//! scales, and is exact.
//!
//! * **GPTQ** (AutoGPTQ, GPTQModel, the `gptq` format of Transformers): `qweight: int32[K / 8, N]`, packed
//!   along K: bits `4j .. 4j + 4` of `qweight[i, n]` hold `q[n, 8i + j]`. `qzeros: int32[K / g, N / 8]`,
//!   packed along N: bits `4j ..` of `qzeros[t, c]` hold the zero of row `8c + j` in group `t`. In the original
//!   format (`GptqZeros::MinusOne`, AutoGPTQ, "gptq v1") the stored value is `z - 1` (modulo 16); GPTQModel's
//!   `gptq_v2` stores `z`. `scales: [K / g, N]`. `g_idx: int32[K]`, if present, must be `k / g` for every k:
//!   act-order (`desc_act`) checkpoints permute the input features, which the format does not represent.
//! * **AWQ** (llm-awq, AutoAWQ `GEMM` version): `qweight: int32[K, N / 8]`, packed along N in the order
//!   `[0, 2, 4, 6, 1, 3, 5, 7]`: bits `4i ..` of `qweight[k, c]` hold `q[8c + order[i], k]`. `qzeros:
//!   int32[K / g, N / 8]`, packed the same way; `scales: [K / g, N]`.

use super::Int4Shape;
use crate::dtype::HalfElement;
use crate::error::{check_len, Error, Result};

/// What a GPTQ checkpoint's `qzeros` hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GptqZeros {
    /// `z - 1` modulo 16: AutoGPTQ and most published GPTQ checkpoints (`checkpoint_format` "gptq").
    MinusOne,
    /// `z`: GPTQModel's `gptq_v2`.
    Exact,
}

/// The nibble of `qweight[k, c]` that holds column `8c + j` in an AWQ checkpoint: AWQ packs column
/// `8c + [0, 2, 4, 6, 1, 3, 5, 7][i]` into nibble `i`, so column `j` sits in nibble `AWQ_NIBBLE_OF_COLUMN[j]`.
const AWQ_NIBBLE_OF_COLUMN: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// A GPTQ layer in specdec's format. `scales` are copied; `packed`, `scales_out` and `zeros_out` have the
/// lengths [`Int4Shape::check_packed_lengths`] gives. Errors name the checkpoint tensor at fault.
#[allow(clippy::too_many_arguments)]
pub fn from_gptq<S: HalfElement>(
    shape: &Int4Shape,
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[S],
    g_idx: Option<&[i32]>,
    zeros_format: GptqZeros,
    packed: &mut [u32],
    scales_out: &mut [S],
    zeros_out: &mut [u8],
) -> Result<()> {
    let (n, k, g) = (shape.n, shape.k, shape.group_size);
    check_len("qweight", qweight.len(), k / 8 * n)?;
    check_len("qzeros", qzeros.len(), shape.groups_per_row() * n / 8)?;
    check_len("scales", scales.len(), shape.meta_len())?;
    shape.check_packed_lengths(packed.len(), scales_out.len(), zeros_out.len())?;
    if let Some(g_idx) = g_idx {
        check_len("g_idx", g_idx.len(), k)?;
        if let Some(col) = (0..k).find(|&col| g_idx[col] as i64 != (col / g) as i64) {
            return Err(Error::invalid(
                format!("g_idx[{col}]"),
                format!(
                    "is {}, not {} = k / group_size: an act-order (desc_act) checkpoint, whose groups are not \
                     contiguous in k; the int4 format needs contiguous groups",
                    g_idx[col],
                    col / g
                ),
            ));
        }
    }
    let offset = match zeros_format {
        GptqZeros::MinusOne => 1,
        GptqZeros::Exact => 0,
    };
    for group in 0..shape.groups_per_row() {
        for row in 0..n {
            let word = qzeros[group * (n / 8) + row / 8] as u32;
            let stored = (word >> (4 * (row % 8))) & 0xF;
            zeros_out[group * n + row] = ((stored + offset) & 0xF) as u8;
        }
    }
    scales_out.copy_from_slice(scales);
    packed.fill(0);
    for col in 0..k {
        for row in 0..n {
            let word = qweight[(col / 8) * n + row] as u32;
            put(shape, packed, row, col, (word >> (4 * (col % 8))) & 0xF);
        }
    }
    Ok(())
}

/// An AWQ (GEMM version) layer in specdec's format; see [`from_gptq`] for the outputs.
pub fn from_awq<S: HalfElement>(
    shape: &Int4Shape,
    qweight: &[i32],
    qzeros: &[i32],
    scales: &[S],
    packed: &mut [u32],
    scales_out: &mut [S],
    zeros_out: &mut [u8],
) -> Result<()> {
    let (n, k) = (shape.n, shape.k);
    check_len("qweight", qweight.len(), k * n / 8)?;
    check_len("qzeros", qzeros.len(), shape.groups_per_row() * n / 8)?;
    check_len("scales", scales.len(), shape.meta_len())?;
    shape.check_packed_lengths(packed.len(), scales_out.len(), zeros_out.len())?;
    let awq_nibble = |words: &[i32], line: usize, row: usize| {
        let word = words[line * (n / 8) + row / 8] as u32;
        (word >> (4 * AWQ_NIBBLE_OF_COLUMN[row % 8])) & 0xF
    };
    for group in 0..shape.groups_per_row() {
        for row in 0..n {
            zeros_out[group * n + row] = awq_nibble(qzeros, group, row) as u8;
        }
    }
    scales_out.copy_from_slice(scales);
    packed.fill(0);
    for col in 0..k {
        for row in 0..n {
            put(shape, packed, row, col, awq_nibble(qweight, col, row));
        }
    }
    Ok(())
}

/// Stores code `q` of `W[row, col]` into a zero-initialised `packed`.
fn put(shape: &Int4Shape, packed: &mut [u32], row: usize, col: usize, q: u32) {
    let (word, shift) = shape.locate(row, col);
    packed[word] |= q << shift;
}
