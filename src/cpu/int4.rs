//! CPU reference of the int4 primitives: quantize, pack with given scales, dequantize, GEMV. Format and
//! rounding rule: [`crate::int4`].

use rayon::prelude::*;

use crate::backend::{Backend, Stream};
use crate::dtype::HalfElement;
use crate::error::{Error, Result};
use crate::int4::{
    group_parameters, quantize_value, scale_reciprocal, GemvShape, Int4Gemv, Int4Pack,
    Int4Quantize, Int4Shape, TILE_COLS, TILE_POSITIONS, TILE_ROWS, TILE_WORDS,
};

/// Round-to-nearest quantization of `weights[N, K]` (row-major) into `packed`, `scales` and `zeros`, by the
/// rule of [`crate::int4`], on host slices: shorthand for
/// [`Backend::Cpu.int4_quantize`](crate::backend::Backend::int4_quantize). Every input is accepted: groups
/// holding NaN or infinities become NaN groups.
pub fn int4_quantize<T: HalfElement, S: HalfElement>(
    shape: &Int4Shape,
    weights: &[T],
    packed: &mut [u32],
    scales: &mut [S],
    zeros: &mut [u8],
) -> Result<()> {
    let args = Int4Quantize {
        shape: *shape,
        weights: weights.into(),
        packed: packed.into(),
        scales: scales.into(),
        zeros: zeros.into(),
    };
    Backend::Cpu.int4_quantize(Stream::Default, args)
}

/// The CPU quantizer, on arrays whose lengths the caller checked.
pub(crate) fn quantize<T: HalfElement, S: HalfElement>(
    shape: &Int4Shape,
    weights: &[T],
    packed: &mut [u32],
    scales: &mut [S],
    zeros: &mut [u8],
) {
    let (n, k, g) = (shape.n, shape.k, shape.group_size);
    // Row-major [N, K / g] first (rows are independent), then transposed into the format's [K / g, N].
    let per_row: Vec<(S, u8)> = super::pool::install(|| {
        weights
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
            .collect()
    });
    for row in 0..n {
        for group in 0..k / g {
            let (scale, zero) = per_row[row * (k / g) + group];
            scales[group * n + row] = scale;
            zeros[group * n + row] = zero;
        }
    }
    pack_codes(shape, weights, scales, zeros, packed);
}

/// Packs `weights[N, K]` with given `scales` and `zeros` (from GPTQ, AWQ or another quantizer), by step 4 of
/// the rule. Every scale must be positive and finite with a finite reciprocal, every zero at most 15; the
/// error names the first element that is not. Host slices: shorthand for
/// [`Backend::Cpu.int4_pack`](crate::backend::Backend::int4_pack).
pub fn int4_pack<T: HalfElement, S: HalfElement>(
    shape: &Int4Shape,
    weights: &[T],
    scales: &[S],
    zeros: &[u8],
    packed: &mut [u32],
) -> Result<()> {
    let args = Int4Pack {
        shape: *shape,
        weights: weights.into(),
        scales: scales.into(),
        zeros: zeros.into(),
        packed: packed.into(),
    };
    Backend::Cpu.int4_pack(Stream::Default, args)
}

/// The CPU packer, on arrays whose lengths the caller checked.
pub(crate) fn pack<T: HalfElement, S: HalfElement>(
    shape: &Int4Shape,
    weights: &[T],
    scales: &[S],
    zeros: &[u8],
    packed: &mut [u32],
) -> Result<()> {
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
    super::pool::install(|| {
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
                            Some(r) => {
                                quantize_value(weights[row * k + col].to_f32(), r, zeros[meta])
                            }
                            None => 0,
                        };
                        tile[slot / 8] |= u32::from(code) << (4 * (slot % 8));
                    }
                }
            })
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
/// Zeros above 15 are an error; a NaN scale makes its row NaN. Host slices: shorthand for
/// [`Backend::Cpu.int4_gemv`](crate::backend::Backend::int4_gemv).
pub fn int4_gemv<A: HalfElement, S: HalfElement>(
    shape: &GemvShape,
    packed: &[u32],
    scales: &[S],
    zeros: &[u8],
    x: &[A],
    y: &mut [A],
) -> Result<()> {
    let args = Int4Gemv {
        shape: *shape,
        packed: packed.into(),
        scales: scales.into(),
        zeros: zeros.into(),
        x: x.into(),
        y: y.into(),
    };
    Backend::Cpu.int4_gemv(Stream::Default, args)
}

/// The CPU GEMV, on arrays whose lengths the caller checked.
pub(crate) fn gemv<A: HalfElement, S: HalfElement>(
    shape: &GemvShape,
    packed: &[u32],
    scales: &[S],
    zeros: &[u8],
    x: &[A],
    y: &mut [A],
) -> Result<()> {
    let w = &shape.weights;
    check_zeros(zeros)?;
    let (m, n, k) = (shape.m, w.n, w.k);
    let x: Vec<f64> = x.iter().map(|v| f64::from(v.to_f32())).collect();
    let tiles_per_row = k / TILE_COLS;
    // One task per 16-row tile: decode each 16 x 64 tile into f32 weights, then dot its rows with x in f64.
    let sums: Vec<Vec<f64>> = super::pool::install(|| {
        packed
            .par_chunks(TILE_WORDS * tiles_per_row)
            .enumerate()
            .map(|(tile_row, words)| {
                let mut acc = vec![0.0f64; TILE_ROWS * m];
                let mut tile_weights = [[0.0f32; TILE_COLS]; TILE_ROWS];
                for (tile_col, tile) in words.chunks(TILE_WORDS).enumerate() {
                    decode_tile(
                        w,
                        tile,
                        tile_row,
                        tile_col,
                        scales,
                        zeros,
                        &mut tile_weights,
                    );
                    let col0 = tile_col * TILE_COLS;
                    for (r, row) in tile_weights.iter().enumerate() {
                        for i in 0..m {
                            let xs = &x[i * k + col0..][..TILE_COLS];
                            let dot: f64 = row
                                .iter()
                                .zip(xs)
                                .map(|(&wv, &xv)| f64::from(wv) * xv)
                                .sum();
                            acc[r * m + i] += dot;
                        }
                    }
                }
                acc
            })
            .collect()
    });
    for (tile_row, acc) in sums.iter().enumerate() {
        for r in 0..TILE_ROWS {
            for i in 0..m {
                y[i * n + tile_row * TILE_ROWS + r] = A::from_f64(acc[r * m + i]);
            }
        }
    }
    Ok(())
}

/// The weights `(q - z) * s` of one 16 x 64 tile, as `[row][col]` of the tile.
fn decode_tile<S: HalfElement>(
    w: &Int4Shape,
    tile: &[u32],
    tile_row: usize,
    tile_col: usize,
    scales: &[S],
    zeros: &[u8],
    out: &mut [[f32; TILE_COLS]; TILE_ROWS],
) {
    // Each 32-column half of a tile lies in one group: its 16 rows' scales and zeros.
    let mut meta = [[(0.0f32, 0.0f32); TILE_ROWS]; 2];
    for (half, rows) in meta.iter_mut().enumerate() {
        for (r, slot) in rows.iter_mut().enumerate() {
            let i = w.meta_index(tile_row * TILE_ROWS + r, tile_col * TILE_COLS + 32 * half);
            *slot = (scales[i].to_f32(), f32::from(zeros[i]));
        }
    }
    for (slot, &(r, c)) in TILE_POSITIONS.iter().enumerate() {
        let q = ((tile[slot / 8] >> (4 * (slot % 8))) & 0xF) as f32;
        let (s, z) = meta[c as usize / 32][r as usize];
        out[r as usize][c as usize] = (q - z) * s;
    }
}
