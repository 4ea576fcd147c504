//! The CPU backend's int4 primitives: quantize, pack with given scales and dequantize as plain loops (the
//! quantizer's rule is defined operation by operation, and the CUDA quantizer must give the same bytes), and the
//! GEMV as a kernel (AVX-512, AVX2 or portable, chosen at run time, on the backend's threads). Format and rounding
//! rule: [`crate::int4`]. The GEMV's readable f64 reference is in the tests (`tests/common/int4.rs`).

use rayon::prelude::*;

use super::simd::Kernel;

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
    // The common case in one vectorised pass: no zero point has a bit above the low four.
    if zeros.iter().fold(0u8, |bits, &z| bits | z) <= 15 {
        return Ok(());
    }
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

/// `y[M, N] = x[M, K] W^T` for an int4 `W`, on the CPU backend's kernel: every weight `(q - z) * s` is formed
/// in f32 (exactly, unless a bf16 scale above `2^128 / 15` takes it out of f32's range), multiplied with the
/// activation and accumulated in f32 (fused multiply-adds, 32 partial sums per row, K / 32 terms each, added
/// in a fixed tree), and each output is rounded once to the activation type; `docs/int4-format.md`, "GEMV
/// semantics", states the order and the error bound. Zeros above 15 are an error; a NaN scale makes its row
/// NaN, and every NaN output is the activation type's converted NaN (`HalfElement::CONVERTED_NAN`). Host
/// slices: shorthand for [`Backend::Cpu.int4_gemv`](crate::backend::Backend::int4_gemv).
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

// ---------------------------------------------------------------------------------------------------------
// The GEMV kernel
//
// What it computes: for every output row n, sum over k of ((q - z) * s)[n, k] * x[m, k], in f32.
//
// Napkin math (SmolLM2-135M's LM head, 49152 x 576 at M = 1): 14.2 MB of codes, 0.9 MB of scales and zeros,
// 28.3 M weights. Memory: at 10-20 GB/s, 0.7-1.4 ms. Compute: 28.3 M fused multiply-adds plus the decoding of
// as many codes; at 8 lanes and two vector ops per cycle, 5 vector ops per 8 weights are about 9 M cycles, 3 ms
// on one core at 3 GHz (half that with 16 lanes). So decoding, not memory, bounds a core, and the kernel spends
// 5 ops per lane-vector of weights: shift, mask, convert, one fused multiply-add for `q * s + (-(z * s))`
// (exact: both products fit f32's mantissa, so the only rounding is of an exact value that f32 represents;
// where `z * s` overflows, a bf16 scale near its maximum, the row runs on the portable kernel's `(q - z) * s`),
// one for the product with `x`. Measured (benches/int4.rs): 7-13 GiB/s, against a 26 GiB/s copy.
//
// The layout (crate::int4) is read as it lies. Four consecutive lanes of a tile (64 bytes, 16 words) hold two
// rows, r and r + 8, over all 64 columns: nibble 2p + rho of a word is row r + 8 rho, at a column that depends
// on the word and on p but not on the row. So `x` is permuted once per call into that order
// (`permuted_activations`), and then each of the 8 nibbles of 16 words is one shift and mask of one 16-lane
// (or two 8-lane) vectors, against 16 contiguous activations. Accumulators: 2 rows x 2 (even and odd p, two
// independent chains of fused multiply-adds: one chain's latency bounded the first version) per chunk, kept
// in registers across the whole row of tiles.
// ---------------------------------------------------------------------------------------------------------

/// The CPU GEMV, on arrays whose lengths the caller checked.
pub(crate) fn gemv<A: HalfElement, S: HalfElement>(
    shape: &GemvShape,
    packed: &[u32],
    scales: &[S],
    zeros: &[u8],
    x: &[A],
    y: &mut [A],
) -> Result<()> {
    check_zeros(zeros)?;
    let w = shape.weights;
    let (m, n) = (shape.m, w.n);
    let activations = permuted_activations(x, m, w.k);
    let tile_row_words = TILE_WORDS * (w.k / TILE_COLS);
    let kernel = Kernel::detect();
    let mut sums = vec![0.0f32; n * m];
    // As many tasks as threads, each with enough words that waking a thread (microseconds) is small
    // against it.
    let tile_rows = n / TILE_ROWS;
    let tasks = (packed.len() / MIN_WORDS_PER_TASK)
        .clamp(1, super::pool::threads())
        .min(tile_rows);
    let rows_per_task = tile_rows.div_ceil(tasks);
    let run = |(task, (words, sums)): (usize, (&[u32], &mut [f32]))| {
        let mut meta = RowMeta::new(&w);
        prefetch(words.get(..tile_row_words).unwrap_or(words));
        let tile_rows = words
            .chunks(tile_row_words)
            .zip(sums.chunks_mut(TILE_ROWS * m));
        let mut next_words = words.chunks(tile_row_words).skip(1);
        for (i, (words, sums)) in tile_rows.enumerate() {
            let tile_row = task * rows_per_task + i;
            meta.fill(&w, tile_row, scales, zeros);
            if tile_row + META_PREFETCH_ROWS < w.n / TILE_ROWS {
                // A row's scales lie in one short run per group, N apart: streams the hardware prefetchers do
                // not pick up.
                RowMeta::prefetch(&w, tile_row + META_PREFETCH_ROWS, scales, zeros);
            }
            kernel.tile_row(&meta, words, next_words.next(), &activations, w.k, sums);
        }
    };
    let tasks: Vec<_> = packed
        .chunks(tile_row_words * rows_per_task)
        .zip(sums.chunks_mut(TILE_ROWS * m * rows_per_task))
        .enumerate()
        .collect();
    super::pool::spread(tasks, run);
    // `sums` is [tile row][activation row][16 rows]; `y` is [M, N].
    for (tile_row, block) in sums.chunks(TILE_ROWS * m).enumerate() {
        for (i, rows) in block.chunks(TILE_ROWS).enumerate() {
            let out = &mut y[i * n + tile_row * TILE_ROWS..][..TILE_ROWS];
            for (o, &v) in out.iter_mut().zip(rows) {
                *o = A::from_f32(v);
            }
        }
    }
    Ok(())
}

/// How many rows of tiles ahead the scales and zeros are prefetched.
const META_PREFETCH_ROWS: usize = 4;

/// Packed words per parallel task, at least: 128 KiB (at 64 KiB, the 576 x 576 matrix ran slower on two threads
/// than on one).
const MIN_WORDS_PER_TASK: usize = 1 << 15;

/// Words in four lanes of a tile: two rows (r, r + 8) over the tile's 64 columns.
const CHUNK_WORDS: usize = 16;

/// Column (within a tile) of nibble pair `p` (nibbles `2p` and `2p + 1`, rows r and r + 8) of word `i` of a
/// chunk: word `w = i % 4` of lane `4a + b`, `b = i / 4`, holds columns `32 (w / 2) + 8 b + 4 (w % 2) + d` at
/// nibbles `4 (d % 2) + 2 (d / 2) + rho` (crate::int4), so pair `p` is column offset `d = [0, 2, 1, 3][p]`.
const fn chunk_column(i: usize, p: usize) -> usize {
    let (b, w) = (i / 4, i % 4);
    let d = [0, 2, 1, 3][p];
    32 * (w / 2) + 8 * b + 4 * (w % 2) + d
}

/// `x` in f32, each tile's 64 columns in chunk order: `[m][tile][p][i]` holds `x[m, 64 tile + chunk_column(i, p)]`.
fn permuted_activations<A: HalfElement>(x: &[A], m: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m * k];
    for (row, out_row) in x.chunks(k).zip(out.chunks_mut(k)).take(m) {
        for (tile, out_tile) in row.chunks(TILE_COLS).zip(out_row.chunks_mut(TILE_COLS)) {
            for p in 0..4 {
                for i in 0..CHUNK_WORDS {
                    out_tile[p * CHUNK_WORDS + i] = tile[chunk_column(i, p)].to_f32();
                }
            }
        }
    }
    out
}

/// The scales and zero points of one row of tiles in f32: for group `g` of the row and row `r` of the tile,
/// `scale[16 g + r]`, `zero[16 g + r]` and `offset[16 g + r] = -(z * s)`. A weight is `(q - z) * s`, one
/// rounding of an exact value; where `z * s` is finite, `q * s + offset` in one fused multiply-add is that same
/// rounding (the vector kernels' form: one instruction instead of two).
struct RowMeta {
    scale: Vec<f32>,
    zero: Vec<f32>,
    offset: Vec<f32>,
    /// Every `offset` is finite, so the vector kernels' form gives the same bits as `(q - z) * s`. Not so for
    /// a bf16 scale above `f32::MAX / 15` (`z * s` overflows where `(q - z) * s` need not), nor an infinite
    /// or NaN one: such a row of tiles runs on the portable kernel.
    offsets_finite: bool,
    /// `log2(group_size)`: the group of column `c` is `c >> group_shift`.
    group_shift: u32,
}

impl RowMeta {
    fn new(w: &Int4Shape) -> Self {
        let len = TILE_ROWS * w.groups_per_row();
        RowMeta {
            scale: vec![0.0; len],
            zero: vec![0.0; len],
            offset: vec![0.0; len],
            offsets_finite: true,
            group_shift: w.group_size.trailing_zeros(),
        }
    }

    fn fill<S: HalfElement>(&mut self, w: &Int4Shape, tile_row: usize, scales: &[S], zeros: &[u8]) {
        self.offsets_finite = true;
        for g in 0..w.groups_per_row() {
            let first = g * w.n + tile_row * TILE_ROWS;
            let rows = scales[first..][..TILE_ROWS]
                .iter()
                .zip(&zeros[first..][..TILE_ROWS]);
            for (r, (s, &z)) in rows.enumerate() {
                let (s, z) = (s.to_f32(), f32::from(z));
                let offset = -(z * s);
                self.scale[TILE_ROWS * g + r] = s;
                self.zero[TILE_ROWS * g + r] = z;
                self.offset[TILE_ROWS * g + r] = offset;
                self.offsets_finite &= offset.is_finite();
            }
        }
    }

    /// Asks for the scales and zeros of `tile_row` to be brought towards the cache.
    fn prefetch<S: HalfElement>(w: &Int4Shape, tile_row: usize, scales: &[S], zeros: &[u8]) {
        for g in 0..w.groups_per_row() {
            let first = g * w.n + tile_row * TILE_ROWS;
            prefetch(&scales[first..][..TILE_ROWS]);
            prefetch(&zeros[first..][..TILE_ROWS]);
        }
    }

    /// The scales and zero points of row `row` of the tile for the 8 lanes of a vector of its chunk's words:
    /// lane `i` is word `i % 4` of a tile lane, which lies in half `(i % 4) / 2` of the tile.
    fn lanes(&self, tile_col: usize, row: usize) -> ([f32; 8], [f32; 8]) {
        let (h0, h1) = self.groups(tile_col);
        let lanes = |v: &[f32]| {
            let (a, b) = (v[h0 + row], v[h1 + row]);
            [a, a, b, b, a, a, b, b]
        };
        (lanes(&self.scale), lanes(&self.zero))
    }

    /// Where the two halves' groups of a tile start in `scale` and `offset`.
    #[inline(always)]
    fn groups(&self, tile_col: usize) -> (usize, usize) {
        let at = |half: usize| TILE_ROWS * ((tile_col * TILE_COLS + 32 * half) >> self.group_shift);
        (at(0), at(1))
    }
}

// The GEMV's kernels, by `Kernel` (src/cpu/simd.rs): AVX-512 where the CPU has it, else AVX2 with FMA, else the
// portable one. All compute the same sums bit for bit (the same roundings in the same order; `f32::mul_add` is
// fused). Only the sign of a zero weight may differ (`(q - z) * s` against `q * s - z * s` where `q = z`), which
// no sum shows: the accumulators start at +0.
impl Kernel {
    /// The 16 x M sums of one row of tiles (`words`), into `sums` as `[activation row][16 rows]`, while the
    /// next row of tiles (`next`) is brought towards the cache.
    ///
    /// Each chunk (two rows) is summed over the whole row of tiles, so its accumulators stay in registers, but
    /// then memory is read 64 bytes every 512, which the hardware prefetchers follow poorly (most of the time
    /// went to waiting for it). So the next row of tiles is prefetched, an eighth per chunk, in order.
    fn tile_row(
        self,
        meta: &RowMeta,
        words: &[u32],
        next: Option<&[u32]>,
        activations: &[f32],
        k: usize,
        sums: &mut [f32],
    ) {
        assert!(
            self.runs_here(),
            "{self:?} kernel on a CPU without its instructions"
        );
        let eighth = words.len() / 8;
        let kernel = if meta.offsets_finite {
            self
        } else {
            Kernel::Portable
        };
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512 {
            return avx512_tile_row(meta, words, next, activations, k, sums);
        }
        for (i, x) in activations.chunks(k).enumerate() {
            let out = &mut sums[i * TILE_ROWS..][..TILE_ROWS];
            for chunk in 0..TILE_ROWS / 2 {
                if let (0, Some(next)) = (i, next) {
                    prefetch(&next[chunk * eighth..][..eighth]);
                }
                let (upper, lower) = match kernel {
                    Kernel::Portable => portable_chunk_rows(words, x, chunk, meta),
                    // SAFETY: the CPU has AVX2 and FMA (asserted above); `words` holds whole tiles and `x`
                    // their 64 activations each (the caller's shapes); `chunk < 8`.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2Fma => unsafe { avx2::chunk_rows(words, x, chunk, meta) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx512 => unreachable!("handled above"),
                };
                out[chunk] = upper;
                out[chunk + 8] = lower;
            }
        }
    }
}

/// [`Kernel::tile_row`] with AVX-512: up to 4 activation rows per pass, so that each vector of codes is
/// decoded once for them (16 accumulators; more would spill).
#[cfg(target_arch = "x86_64")]
fn avx512_tile_row(
    meta: &RowMeta,
    words: &[u32],
    next: Option<&[u32]>,
    activations: &[f32],
    k: usize,
    sums: &mut [f32],
) {
    const BLOCK: usize = 4;
    let eighth = words.len() / 8;
    for (block, block_rows) in activations.chunks(BLOCK * k).enumerate() {
        let mut rows = block_rows.chunks(k);
        let xs: [&[f32]; BLOCK] = std::array::from_fn(|_| rows.next().unwrap_or(&[]));
        let xs = &xs[..block_rows.len() / k];
        for chunk in 0..TILE_ROWS / 2 {
            if let (0, Some(next)) = (block, next) {
                prefetch(&next[chunk * eighth..][..eighth]);
            }
            let mut store = |pairs: &[(f32, f32)]| {
                for (j, &(upper, lower)) in pairs.iter().enumerate() {
                    let out = &mut sums[(block * BLOCK + j) * TILE_ROWS..][..TILE_ROWS];
                    out[chunk] = upper;
                    out[chunk + 8] = lower;
                }
            };
            // SAFETY: `detect` found AVX-512F, AVX2 and FMA on this CPU; `words` holds whole tiles and every
            // activation row their 64 activations each (the caller's shapes); `chunk < 8`.
            unsafe {
                match *xs {
                    [a, b, c, d] => store(&avx512::chunk_rows(words, [a, b, c, d], chunk, meta)),
                    [a, b, c] => store(&avx512::chunk_rows(words, [a, b, c], chunk, meta)),
                    [a, b] => store(&avx512::chunk_rows(words, [a, b], chunk, meta)),
                    [a] => store(&avx512::chunk_rows(words, [a], chunk, meta)),
                    _ => unreachable!("blocks of 1 to {BLOCK} rows"),
                }
            }
        }
    }
}

/// Asks for every cache line of `values` to be brought towards the cache (a hint: no effect on results).
fn prefetch<T>(values: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in values.chunks(64 / std::mem::size_of::<T>()) {
        // SAFETY: a prefetch never faults and changes nothing the program can observe.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// The sums of rows `chunk` and `chunk + 8` of a row of tiles against one activation row `x` (permuted), as
/// the vector kernels compute them: 32 partial sums per row (lane `i` of the chunk's words, for even and for
/// odd `p`), added pairwise, then lanes `i` and `i + 8`, then as [`reduce`] does.
fn portable_chunk_rows(words: &[u32], x: &[f32], chunk: usize, meta: &RowMeta) -> (f32, f32) {
    // `acc[p % 2][rho][i]`: two sums per lane, so that each vector kernel runs two chains of fused
    // multiply-adds per accumulator register instead of one (their latency, not their rate, bounded it).
    let mut acc = [[[0.0f32; CHUNK_WORDS]; 2]; 2];
    for (tile_col, (tile, x)) in words
        .chunks(TILE_WORDS)
        .zip(x.chunks(TILE_COLS))
        .enumerate()
    {
        let meta = [meta.lanes(tile_col, chunk), meta.lanes(tile_col, chunk + 8)];
        let chunk_words = &tile[chunk * CHUNK_WORDS..][..CHUNK_WORDS];
        for p in 0..4 {
            for (rho, acc) in acc[p % 2].iter_mut().enumerate() {
                let (s, z) = meta[rho];
                for (i, (acc, &word)) in acc.iter_mut().zip(chunk_words).enumerate() {
                    let q = ((word >> (4 * (2 * p + rho))) & 0xF) as f32;
                    let weight = (q - z[i % 8]) * s[i % 8];
                    *acc = weight.mul_add(x[p * CHUNK_WORDS + i], *acc);
                }
            }
        }
    }
    let row = |rho: usize| {
        let total: [f32; CHUNK_WORDS] = std::array::from_fn(|i| acc[0][rho][i] + acc[1][rho][i]);
        reduce(std::array::from_fn(|l| total[l] + total[l + 8]))
    };
    (row(0), row(1))
}

/// The sum of 8 lanes in the AVX2 kernel's order: halves added lane by lane, then pairs, then the two.
fn reduce(v: [f32; 8]) -> f32 {
    let u = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (u[0] + u[2]) + (u[1] + u[3])
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{RowMeta, CHUNK_WORDS, TILE_COLS, TILE_WORDS};

    /// [`super::portable_chunk_rows`] in AVX2 vectors: the same operations in the same order, each weight as
    /// `q * s + offset` (the same bits as `(q - z) * s` where `meta.offsets_finite`).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA. `words` holds whole tiles, `x` 64 activations per tile, and
    /// `chunk < 8`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn chunk_rows(
        words: &[u32],
        x: &[f32],
        chunk: usize,
        meta: &RowMeta,
    ) -> (f32, f32) {
        let tiles = words.len() / TILE_WORDS;
        assert!(x.len() >= tiles * TILE_COLS);
        let mask = _mm256_set1_epi32(0xF);
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        for tile_col in 0..tiles {
            // Lanes [h0, h0, h1, h1, h0, h0, h1, h1] (RowMeta::lanes), built in registers: assembling them in
            // memory from scalars stalls the vector load that follows (no store forwarding).
            let (h0, h1) = meta.groups(tile_col);
            let lanes = |v: &[f32], row: usize| {
                _mm256_blend_ps::<0b1100_1100>(
                    _mm256_set1_ps(v[h0 + row]),
                    _mm256_set1_ps(v[h1 + row]),
                )
            };
            let scale = [lanes(&meta.scale, chunk), lanes(&meta.scale, chunk + 8)];
            let offset = [lanes(&meta.offset, chunk), lanes(&meta.offset, chunk + 8)];
            // SAFETY (all loads): `tile_col < tiles`, so the chunk's 16 words lie inside `words` and the 64
            // activations inside `x` (asserted above).
            let base = words
                .as_ptr()
                .add(tile_col * TILE_WORDS + chunk * CHUNK_WORDS);
            let codes = [
                _mm256_loadu_si256(base as *const __m256i),
                _mm256_loadu_si256(base.add(8) as *const __m256i),
            ];
            let xs = x.as_ptr().add(tile_col * TILE_COLS);
            for p in 0..4 {
                let x_lo = _mm256_loadu_ps(xs.add(p * CHUNK_WORDS));
                let x_hi = _mm256_loadu_ps(xs.add(p * CHUNK_WORDS + 8));
                for rho in 0..2 {
                    let shift = _mm256_set1_epi32((4 * (2 * p + rho)) as i32);
                    for (half, x_half) in [x_lo, x_hi].into_iter().enumerate() {
                        let q = _mm256_and_si256(_mm256_srlv_epi32(codes[half], shift), mask);
                        let weight =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), scale[rho], offset[rho]);
                        let a = &mut acc[p % 2][2 * rho + half];
                        *a = _mm256_fmadd_ps(weight, x_half, *a);
                    }
                }
            }
        }
        let total: [__m256; 4] = std::array::from_fn(|i| _mm256_add_ps(acc[0][i], acc[1][i]));
        let (mut upper, mut lower) = ([0.0f32; 8], [0.0f32; 8]);
        _mm256_storeu_ps(upper.as_mut_ptr(), _mm256_add_ps(total[0], total[1]));
        _mm256_storeu_ps(lower.as_mut_ptr(), _mm256_add_ps(total[2], total[3]));
        (super::reduce(upper), super::reduce(lower))
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{RowMeta, CHUNK_WORDS, TILE_COLS, TILE_WORDS};

    /// [`super::portable_chunk_rows`] for `ROWS` activation rows at once, in AVX-512 vectors: a chunk's 16
    /// words are one vector, decoded once for all the rows, and each accumulator holds 16 partial sums of an
    /// output; for each output, the same operations in the same order, each weight as `q * s + offset` (the
    /// same bits as `(q - z) * s` where `meta.offsets_finite`).
    ///
    /// # Safety
    /// The CPU must have AVX-512F (and so AVX2 and FMA). `words` holds whole tiles, each of `xs` 64
    /// activations per tile, and `chunk < 8`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn chunk_rows<const ROWS: usize>(
        words: &[u32],
        xs: [&[f32]; ROWS],
        chunk: usize,
        meta: &RowMeta,
    ) -> [(f32, f32); ROWS] {
        let tiles = words.len() / TILE_WORDS;
        assert!(xs.iter().all(|x| x.len() >= tiles * TILE_COLS));
        let mask = _mm512_set1_epi32(0xF);
        // `acc[i][p % 2][rho]`.
        let mut acc = [[[_mm512_setzero_ps(); 2]; 2]; ROWS];
        for tile_col in 0..tiles {
            // Lanes [h0, h0, h1, h1] four times (RowMeta::lanes).
            let (h0, h1) = meta.groups(tile_col);
            let lanes = |v: &[f32], row: usize| {
                _mm512_mask_blend_ps(
                    0b1100_1100_1100_1100,
                    _mm512_set1_ps(v[h0 + row]),
                    _mm512_set1_ps(v[h1 + row]),
                )
            };
            let scale = [lanes(&meta.scale, chunk), lanes(&meta.scale, chunk + 8)];
            let offset = [lanes(&meta.offset, chunk), lanes(&meta.offset, chunk + 8)];
            // SAFETY (all loads): `tile_col < tiles`, so the chunk's 16 words lie inside `words` and the 64
            // activations inside each of `xs` (asserted above).
            let codes = _mm512_loadu_si512(
                words
                    .as_ptr()
                    .add(tile_col * TILE_WORDS + chunk * CHUNK_WORDS)
                    as *const __m512i,
            );
            let column = tile_col * TILE_COLS;
            for p in 0..4 {
                for rho in 0..2 {
                    let shift = _mm512_set1_epi32((4 * (2 * p + rho)) as i32);
                    let q = _mm512_and_si512(_mm512_srlv_epi32(codes, shift), mask);
                    let weight = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), scale[rho], offset[rho]);
                    for (acc, x) in acc.iter_mut().zip(&xs) {
                        let x_p = _mm512_loadu_ps(x.as_ptr().add(column + p * CHUNK_WORDS));
                        acc[p % 2][rho] = _mm512_fmadd_ps(weight, x_p, acc[p % 2][rho]);
                    }
                }
            }
        }
        let row = |a: __m512| {
            let halves = _mm256_add_ps(
                _mm512_castps512_ps256(a),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
            );
            let mut v = [0.0f32; 8];
            _mm256_storeu_ps(v.as_mut_ptr(), halves);
            super::reduce(v)
        };
        acc.map(|[even, odd]| {
            (
                row(_mm512_add_ps(even[0], odd[0])),
                row(_mm512_add_ps(even[1], odd[1])),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    /// The vector kernels this CPU has and the portable one give the same bits, including for a NaN
    /// scale and infinite activations.
    #[test]
    fn the_vector_and_portable_kernels_agree_bit_for_bit() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let kernels = Kernel::available();
        for (n, k, g) in [(16, 64, 32), (32, 192, 64), (48, 256, 128), (16, 1024, 32)] {
            let w = Int4Shape::new(n, k, g).unwrap();
            let packed: Vec<u32> = (0..w.packed_len()).map(|_| next() as u32).collect();
            let mut scales: Vec<bf16> = (0..w.meta_len())
                .map(|_| bf16::from_f32((next() % 1000) as f32 * 1e-4 + 1e-3))
                .collect();
            scales[3] = bf16::NAN;
            // In the last row of tiles (the first too where there is one): scales whose `z * s` overflows f32
            // for z >= 4 (and `(q - z) * s` for |q - z| >= 4), whose rows run on the portable kernel; a
            // negative and a zero scale, which do not.
            let last = w.meta_len() - 1;
            scales[last] = bf16::from_f32(1.0e38);
            scales[last - 1] = bf16::from_f32(-1.0e38);
            scales[last - 2] = bf16::INFINITY;
            scales[last - 3] = bf16::from_f32(-0.5);
            scales[last - 4] = bf16::ZERO;
            let zeros: Vec<u8> = (0..w.meta_len()).map(|_| (next() % 16) as u8).collect();
            for m in [1, 2, 3, 4, 5, 9] {
                let mut x: Vec<f16> = (0..m * k)
                    .map(|_| f16::from_f32((next() % 2001) as f32 * 1e-3 - 1.0))
                    .collect();
                x[k - 1] = f16::INFINITY;
                let activations = permuted_activations(&x, m, k);
                let tile_row_words = TILE_WORDS * (k / TILE_COLS);
                let mut meta = RowMeta::new(&w);
                for (tile_row, words) in packed.chunks(tile_row_words).enumerate() {
                    meta.fill(&w, tile_row, &scales, &zeros);
                    let mut want = vec![0.0f32; TILE_ROWS * m];
                    Kernel::Portable.tile_row(&meta, words, None, &activations, k, &mut want);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    for &kernel in &kernels[1..] {
                        let mut got = vec![0.0f32; TILE_ROWS * m];
                        kernel.tile_row(&meta, words, None, &activations, k, &mut got);
                        assert_eq!(
                            bits(&got),
                            bits(&want),
                            "{kernel:?} {w:?} m {m} tile row {tile_row}"
                        );
                    }
                }
            }
        }
    }

    /// A bf16 scale above `f32::MAX / 15` with weights that f32 holds: `(q - z) * s` is finite where
    /// `q * s - z * s` would overflow, and the output is the exact sum (here one weight, -1e38, times 1).
    #[test]
    fn a_scale_near_bf16_max_gives_finite_outputs_where_the_weights_are_finite() {
        let w = Int4Shape::new(16, 64, 64).unwrap();
        let scale = bf16::from_f32(1.0e38);
        let mut weights = vec![bf16::ZERO; 16 * 64];
        weights[5] = -scale; // row 0, column 5: code 14 against zero point 15
        let (scales, zeros) = (vec![scale; 16], vec![15u8; 16]);
        let mut packed = vec![0u32; w.packed_len()];
        int4_pack(&w, &weights, &scales, &zeros, &mut packed).unwrap();
        let x = vec![bf16::ONE; 64];
        let mut y = vec![bf16::NAN; 16];
        int4_gemv(
            &GemvShape::new(1, w).unwrap(),
            &packed,
            &scales,
            &zeros,
            &x,
            &mut y,
        )
        .unwrap();
        assert_eq!(y[0], -scale);
        assert!(y[1..].iter().all(|v| *v == bf16::ZERO), "{y:?}");
    }

    /// The permutation puts every column of a tile in exactly one place.
    #[test]
    fn the_activation_permutation_is_a_permutation() {
        let mut seen = [false; TILE_COLS];
        for p in 0..4 {
            for i in 0..CHUNK_WORDS {
                let c = chunk_column(i, p);
                assert!(!seen[c], "column {c} twice");
                seen[c] = true;
            }
        }
    }
}
