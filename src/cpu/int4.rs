//! CPU reference of the int4 primitives: quantize, pack with given scales, dequantize, GEMV. Format and
//! rounding rule: [`crate::int4`].

use rayon::prelude::*;

use crate::dtype::HalfElement;
use crate::error::{check_len, Error, Result};
use crate::int4::{
    group_parameters, quantize_value, scale_reciprocal, GemvShape, Int4Shape, TILE_COLS,
    TILE_POSITIONS, TILE_ROWS, TILE_WORDS,
};

/// Round-to-nearest quantization of `weights[N, K]` (row-major) into `packed`, `scales` and `zeros`, by the
/// rule of [`crate::int4`]. Every input is accepted: groups holding NaN or infinities become NaN groups.
pub fn int4_quantize<T: HalfElement, S: HalfElement>(
    shape: &Int4Shape,
    weights: &[T],
    packed: &mut [u32],
    scales: &mut [S],
    zeros: &mut [u8],
) -> Result<()> {
    check_len("weights", weights.len(), shape.weights_len())?;
    shape.check_packed_lengths(packed.len(), scales.len(), zeros.len())?;
    let (n, k, g) = (shape.n, shape.k, shape.group_size);
    // Row-major [N, K / g] first (rows are independent), then transposed into the format's [K / g, N].
    let per_row: Vec<(S, u8)> = weights
        .par_chunks(g)
        .map(|group| {
            let (mut lo, mut hi, mut finite) = (0.0f32, 0.0f32, true);
            for w in group {
                let w = w.to_f32();
                finite &= w.is_finite();
                lo = if w < lo { w } else { lo };
                hi = if w > hi { w } else { hi };
            }
            group_parameters(lo, hi, finite)
        })
        .collect();
    for row in 0..n {
        for group in 0..k / g {
            let (scale, zero) = per_row[row * (k / g) + group];
            scales[group * n + row] = scale;
            zeros[group * n + row] = zero;
        }
    }
    pack_codes(shape, weights, scales, zeros, packed);
    Ok(())
}

/// Packs `weights[N, K]` with given `scales` and `zeros` (from GPTQ, AWQ or another quantizer), by step 4 of
/// the rule. Every scale must be positive and finite with a finite reciprocal, every zero at most 15; the
/// error names the first element that is not.
pub fn int4_pack<T: HalfElement, S: HalfElement>(
    shape: &Int4Shape,
    weights: &[T],
    scales: &[S],
    zeros: &[u8],
    packed: &mut [u32],
) -> Result<()> {
    check_len("weights", weights.len(), shape.weights_len())?;
    shape.check_packed_lengths(packed.len(), scales.len(), zeros.len())?;
    if let Some(i) = scales
        .iter()
        .position(|s| scale_reciprocal(s.to_f32()).is_none())
    {
        return Err(Error::invalid(
            format!("scales[{i}]"),
            format!(
                "is {}; a scale must be positive and finite, with a reciprocal finite in f32",
                scales[i].to_f32()
            ),
        ));
    }
    check_zeros(zeros)?;
    pack_codes(shape, weights, scales, zeros, packed);
    Ok(())
}

/// Step 4 for every weight, tile by tile. NaN-group scales (and, for [`int4_pack`], nothing else, as it
/// checked them) give code 0.
fn pack_codes<T: HalfElement, S: HalfElement>(
    shape: &Int4Shape,
    weights: &[T],
    scales: &[S],
    zeros: &[u8],
    packed: &mut [u32],
) {
    let (n, k, g) = (shape.n, shape.k, shape.group_size);
    let tiles_per_row = k / TILE_COLS;
    packed
        .par_chunks_mut(TILE_WORDS * tiles_per_row)
        .enumerate()
        .for_each(|(tile_row, words)| {
            for (tile_col, tile) in words.chunks_mut(TILE_WORDS).enumerate() {
                tile.fill(0);
                for (slot, &(r, c)) in TILE_POSITIONS.iter().enumerate() {
                    let row = tile_row * TILE_ROWS + r as usize;
                    let col = tile_col * TILE_COLS + c as usize;
                    let meta = (col / g) * n + row;
                    let code = match scale_reciprocal(scales[meta].to_f32()) {
                        Some(r) => quantize_value(weights[row * k + col].to_f32(), r, zeros[meta]),
                        None => 0,
                    };
                    tile[slot / 8] |= u32::from(code) << (4 * (slot % 8));
                }
            }
        });
}

fn check_zeros(zeros: &[u8]) -> Result<()> {
    match zeros.iter().position(|&z| z > 15) {
        Some(i) => Err(Error::invalid(
            format!("zeros[{i}]"),
            format!("is {}; zero points are 4-bit (0..=15)", zeros[i]),
        )),
        None => Ok(()),
    }
}

/// The weights `(q - z) * s` of a packed matrix, row-major `[N, K]` (exact in f32). Zeros above 15 are an
/// error.
pub fn int4_dequantize<S: HalfElement>(
    shape: &Int4Shape,
    packed: &[u32],
    scales: &[S],
    zeros: &[u8],
) -> Result<Vec<f32>> {
    shape.check_packed_lengths(packed.len(), scales.len(), zeros.len())?;
    check_zeros(zeros)?;
    let mut out = vec![0.0f32; shape.weights_len()];
    for_each_weight(shape, packed, scales, zeros, |row, col, w| {
        out[row * shape.k + col] = w
    });
    Ok(out)
}

/// Calls `visit(row, col, (q - z) * s)` for every weight, in storage order.
fn for_each_weight<S: HalfElement>(
    shape: &Int4Shape,
    packed: &[u32],
    scales: &[S],
    zeros: &[u8],
    mut visit: impl FnMut(usize, usize, f32),
) {
    let tiles_per_row = shape.k / TILE_COLS;
    for (tile, words) in packed.chunks(TILE_WORDS).enumerate() {
        let (tile_row, tile_col) = (tile / tiles_per_row, tile % tiles_per_row);
        for (slot, &(r, c)) in TILE_POSITIONS.iter().enumerate() {
            let row = tile_row * TILE_ROWS + r as usize;
            let col = tile_col * TILE_COLS + c as usize;
            let meta = shape.meta_index(row, col);
            let q = (words[slot / 8] >> (4 * (slot % 8))) & 0xF;
            let w = (q as f32 - f32::from(zeros[meta])) * scales[meta].to_f32();
            visit(row, col, w);
        }
    }
}

/// `y[M, N] = x[M, K] W^T` for an int4 `W`: every product of a dequantized weight (exact in f32) and an
/// activation is exact in f64 and summed in f64, and each output is rounded once to the activation type.
/// Zeros above 15 are an error; a NaN scale makes its row NaN.
pub fn int4_gemv<A: HalfElement, S: HalfElement>(
    shape: &GemvShape,
    packed: &[u32],
    scales: &[S],
    zeros: &[u8],
    x: &[A],
    y: &mut [A],
) -> Result<()> {
    let w = &shape.weights;
    w.check_packed_lengths(packed.len(), scales.len(), zeros.len())?;
    check_len("x", x.len(), shape.x_len())?;
    check_len("y", y.len(), shape.y_len())?;
    check_zeros(zeros)?;
    let (m, n, k) = (shape.m, w.n, w.k);
    let x: Vec<f64> = x.iter().map(|v| f64::from(v.to_f32())).collect();
    let tiles_per_row = k / TILE_COLS;
    // One task per 16-row tile: its sums, [16 rows][M].
    let sums: Vec<Vec<f64>> = packed
        .par_chunks(TILE_WORDS * tiles_per_row)
        .enumerate()
        .map(|(tile_row, words)| {
            let mut acc = vec![0.0f64; TILE_ROWS * m];
            let sub = Int4Shape { n: TILE_ROWS, ..*w };
            let base = tile_row * TILE_ROWS;
            let (tile_scales, tile_zeros) = tile_meta(w, scales, zeros, base);
            for_each_weight(&sub, words, &tile_scales, &tile_zeros, |r, col, wv| {
                let wv = f64::from(wv);
                for i in 0..m {
                    acc[r * m + i] += wv * x[i * k + col];
                }
            });
            acc
        })
        .collect();
    for (tile_row, acc) in sums.iter().enumerate() {
        for r in 0..TILE_ROWS {
            for i in 0..m {
                y[i * n + tile_row * TILE_ROWS + r] = A::from_f64(acc[r * m + i]);
            }
        }
    }
    Ok(())
}

/// The scales and zeros of rows `base .. base + 16`, as a 16-row matrix's `[K / g, 16]` arrays.
fn tile_meta<S: HalfElement>(
    w: &Int4Shape,
    scales: &[S],
    zeros: &[u8],
    base: usize,
) -> (Vec<S>, Vec<u8>) {
    let groups = w.groups_per_row();
    let mut s = Vec::with_capacity(groups * TILE_ROWS);
    let mut z = Vec::with_capacity(groups * TILE_ROWS);
    for group in 0..groups {
        s.extend_from_slice(&scales[group * w.n + base..][..TILE_ROWS]);
        z.extend_from_slice(&zeros[group * w.n + base..][..TILE_ROWS]);
    }
    (s, z)
}
