//! The CPU backend's tree-attention kernel: one (request, KV head) at a time, in f32, as two small matrix
//! products around a softmax. The readable f64 reference the tests hold it to is `Problem::reference` in
//! `tests/common/attention.rs`; semantics, layouts and rules: [`crate::attention`].
//!
//! What it computes, for one request of `L` cached tokens and a tree of `T` nodes, and one KV head shared by
//! `G` q heads (GQA): the `T * G` query rows (node-major) against `n = L + T` keys, prefix first, then the
//! tree's nodes in order, with every key outside a node's root-to-node path masked:
//!
//! ```text
//!   S[r, j] = (q_r . k_j) * scale              Q [T G, D] times K^T [D, n]
//!   m_r = max_j S[r, j],  s_r = sum_j exp(S[r, j] - m_r)       (j on r's path; s_r summed in f64)
//!   out_r = (sum_j exp(S[r, j] - m_r) v_j) / s_r,  lse_r = m_r + ln s_r      P [T G, n] times V [n, D]
//! ```
//!
//! Napkin math, SmolLM2-135M (`Hq = 9`, `Hkv = 3`, `D = 64`) at `B = 8`, `L = 512`, `T = 16`: 24 work items of
//! 48 rows; 4 D (L + depth + 1) flops per row, 151 Mflop in all: 0.33 ms at the 2-core development VM's
//! measured 470 Gflop/s of AVX-512 FMA (`benches/attention.rs` measures the rate beside the kernel). Keys and
//! values are read once per work item (L D elements each, converted to f32 once), so the products are
//! compute-bound; the gathering, the exponentials and the f64 sums are the rest.
//!
//! Both products use one register-blocked micro-kernel, `C[R x W] += A[R x depth] B[depth x W]`, whose
//! accumulators stay in registers while `depth` runs in order: every output element is one chain of
//! multiply-adds in key (or dimension) order, whatever the blocking. So a query row's scores, weights and output
//! do not depend on which rows or columns it was computed with, nor on where the masked keys sit: a node verified
//! in a tree gets the bits it gets when decoded alone over the same keys (prefix, then path, in order). The
//! multiply-add is fused where the CPU has FMA (the AVX2 kernel, blocks of 4 rows by 16 columns; the AVX-512
//! kernel, 8 by 32) and a product then a sum elsewhere (the portable kernel, 4 by 8); the kernel is chosen once
//! per call, by what the CPU has. Scores are f32: a dot product beyond f32's range is infinite, as on the GPU.

use super::simd::Kernel;
use crate::attention::TreeRequest;

/// One multiply-add, `a * b + c`: fused (one rounding) or not, the same in every loop of one kernel; and the
/// kernel's widest micro-kernel block.
trait MulAdd: Sized {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;

    /// [`block`] of `R` rows by `W` columns.
    ///
    /// # Safety
    /// The CPU must have the features of the kernel this type belongs to.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn wide_block<const R: usize, const W: usize>(
        a: &[f32],
        a_stride: usize,
        b: &[f32],
        b_stride: usize,
        col: usize,
        depth: usize,
        c: &mut [f32],
        c_stride: usize,
    ) {
        block::<Self, R, W>(a, a_stride, b, b_stride, col, depth, c, c_stride)
    }
}

/// `a * b + c` rounded once (the FMA instruction where the caller's target features enable it).
#[cfg(target_arch = "x86_64")]
struct Fused;

#[cfg(target_arch = "x86_64")]
impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// The fused multiply-add of the AVX-512 kernel, whose 32-column blocks are written with intrinsics: LLVM
/// compiles the generic [`block`] at that width poorly (several times slower than at 16).
#[cfg(target_arch = "x86_64")]
struct Fused512;

#[cfg(target_arch = "x86_64")]
impl MulAdd for Fused512 {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }

    #[inline(always)]
    unsafe fn wide_block<const R: usize, const W: usize>(
        a: &[f32],
        a_stride: usize,
        b: &[f32],
        b_stride: usize,
        col: usize,
        depth: usize,
        c: &mut [f32],
        c_stride: usize,
    ) {
        if W == 32 {
            // SAFETY: the caller's CPU has AVX-512F (this type is the AVX-512 kernel's).
            unsafe { block_avx512::<R>(a, a_stride, b, b_stride, col, depth, c, c_stride) }
        } else {
            block::<Self, R, W>(a, a_stride, b, b_stride, col, depth, c, c_stride)
        }
    }
}

/// [`block`] for 32 columns, as two 16-lane vectors per row, with fused multiply-adds: the same operations on
/// each element, so the same bits.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn block_avx512<const R: usize>(
    a: &[f32],
    a_stride: usize,
    b: &[f32],
    b_stride: usize,
    col: usize,
    depth: usize,
    c: &mut [f32],
    c_stride: usize,
) {
    use std::arch::x86_64::*;
    assert!(
        rows_within(a.len(), R, a_stride, depth)
            && rows_within(b.len(), depth, b_stride, col + 32)
            && rows_within(c.len(), R, c_stride, 32)
    );
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for k in 0..depth {
        // SAFETY: within `b` and `a` by the assertions above.
        let (low, high, row) = unsafe {
            let at = b.as_ptr().add(k * b_stride + col);
            (
                _mm512_loadu_ps(at),
                _mm512_loadu_ps(at.add(16)),
                a.as_ptr().add(k),
            )
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: as above.
            let x = _mm512_set1_ps(unsafe { *row.add(r * a_stride) });
            acc[0] = _mm512_fmadd_ps(x, low, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, high, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: within `c` by the assertion above.
        unsafe {
            let at = c.as_mut_ptr().add(r * c_stride);
            _mm512_storeu_ps(at, acc[0]);
            _mm512_storeu_ps(at.add(16), acc[1]);
        }
    }
}

/// Whether `count` rows `stride` apart, each read up to `extent`, lie within `len` elements (without overflow).
#[cfg(target_arch = "x86_64")]
fn rows_within(len: usize, count: usize, stride: usize, extent: usize) -> bool {
    count == 0
        || (count - 1)
            .checked_mul(stride)
            .and_then(|start| start.checked_add(extent))
            .is_some_and(|end| end <= len)
}

/// `a * b + c` as a product then a sum, which every CPU vectorises.
struct Separate;

impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One work item's inputs, in f32: the request's keys as `K^T` and values, its query rows, and its tree.
pub(crate) struct WorkItem<'a> {
    pub request: &'a TreeRequest,
    /// `[D, n]`: key `j` in column `j`, the `L` prefix keys first, then the `T` (rotated) node keys.
    pub keys_t: &'a [f32],
    /// `[n, D]`, in the order of the keys.
    pub values: &'a [f32],
    /// `[T * G, D]`: node `i`'s q head `g` (of the group) in row `i * G + g`, rotated.
    pub queries: &'a [f32],
    pub group: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Query rows computed together: bounds the score block to `ROW_BLOCK * n` f32.
const ROW_BLOCK: usize = 64;

/// Attention of every query row of `item` into `out[T * G, D]` and `lse[T * G]`, each output given to `round`
/// (f64 to the element type, one rounding). A row with a NaN or `+inf` score is NaN throughout (out and lse); a row whose every score is
/// `-inf` has NaN outputs and an lse of `-inf` (an empty softmax), as in f64.
pub(crate) fn attend<T: Copy>(
    kernel: Kernel,
    item: &WorkItem<'_>,
    out: &mut [T],
    lse: &mut [f32],
    round: impl Fn(f64) -> T,
) {
    assert!(
        kernel.runs_here(),
        "{kernel:?} kernel on a CPU without its instructions"
    );
    match kernel {
        Kernel::Portable => attend_rows::<T, Separate, 4, 8>(item, out, lse, round),
        // SAFETY: the CPU has the kernel's instructions (asserted above).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => unsafe { attend_avx2_fma(item, out, lse, round) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { attend_avx512(item, out, lse, round) },
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2_fma<T: Copy>(
    item: &WorkItem<'_>,
    out: &mut [T],
    lse: &mut [f32],
    round: impl Fn(f64) -> T,
) {
    attend_rows::<T, Fused, 4, 16>(item, out, lse, round)
}

/// AVX-512 has 32 vector registers: blocks of 8 rows by 32 columns keep 16 sums in them.
///
/// # Safety
/// The CPU must have AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn attend_avx512<T: Copy>(
    item: &WorkItem<'_>,
    out: &mut [T],
    lse: &mut [f32],
    round: impl Fn(f64) -> T,
) {
    attend_rows::<T, Fused512, 8, 32>(item, out, lse, round)
}

/// The whole computation for one work item, in micro-kernel blocks of `R` rows by `W` columns (`W` a multiple
/// of the vector width).
#[inline(always)]
fn attend_rows<T: Copy, M: MulAdd, const R: usize, const W: usize>(
    item: &WorkItem<'_>,
    out: &mut [T],
    lse: &mut [f32],
    round: impl Fn(f64) -> T,
) {
    let d = item.head_dim;
    let prefix = item.request.prefix_len;
    let n = prefix + item.request.tree_size();
    let rows = item.request.tree_size() * item.group;
    assert!(
        item.keys_t.len() == d * n
            && item.values.len() == n * d
            && item.queries.len() == rows * d
            && out.len() == rows * d
            && lse.len() == rows,
        "work item's arrays disagree with its shape"
    );
    let mut scores = vec![0.0f32; ROW_BLOCK.min(rows) * n];
    let mut sums = vec![0.0f32; ROW_BLOCK.min(rows) * d];
    let mut maxima = Vec::with_capacity(ROW_BLOCK.min(rows));
    for first in (0..rows).step_by(ROW_BLOCK) {
        let block = ROW_BLOCK.min(rows - first);
        let (scores, sums) = (&mut scores[..block * n], &mut sums[..block * d]);
        let queries = &item.queries[first * d..(first + block) * d];
        product::<M, R, W>(queries, d, item.keys_t, n, d, scores);
        maxima.clear();
        for (r, row) in scores.chunks_exact_mut(n).enumerate() {
            let path = item.request.ancestors[(first + r) / item.group];
            maxima.push(exponentials::<M>(row, prefix, path, item.scale));
        }
        let totals = row_sums(scores, n);
        // P V over the prefix keys by blocks, then each row's path keys in order on the same sums.
        product::<M, R, W>(scores, n, &item.values[..prefix * d], d, prefix, sums);
        for (r, (acc, weights)) in sums
            .chunks_exact_mut(d)
            .zip(scores.chunks_exact(n))
            .enumerate()
        {
            let node = (first + r) / item.group;
            let path = item.request.ancestors[node];
            for j in (0..=node).filter(|&j| path >> j & 1 == 1) {
                let p = weights[prefix + j];
                let v = &item.values[(prefix + j) * d..][..d];
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a = M::mul_add(p, v, *a);
                }
            }
            let (max, total) = (maxima[r], totals[r]);
            let o = &mut out[(first + r) * d..][..d];
            for (o, &a) in o.iter_mut().zip(acc.iter()) {
                *o = round(f64::from(a) / total);
            }
            lse[first + r] = (f64::from(max) + total.ln()) as f32;
        }
    }
}

/// One row of scores, in place: scaled, the tree keys off the row's `path` (bit `j` for node `j`) set to
/// `-inf`, then replaced by the weights `exp(s - max)`. Returns the max; a row with a NaN or `+inf` score is
/// left NaN throughout (max included), and one whose every score is `-inf` gets weights 0.
#[inline(always)]
fn exponentials<M: MulAdd>(row: &mut [f32], prefix: usize, path: u64, scale: f32) -> f32 {
    let (prefix_scores, node_scores) = row.split_at_mut(prefix);
    for s in prefix_scores.iter_mut() {
        *s *= scale;
    }
    for (j, s) in node_scores.iter_mut().enumerate() {
        *s = if path >> j & 1 == 1 {
            *s * scale
        } else {
            f32::NEG_INFINITY
        };
    }
    // The max is exact in any order: by lanes, so that it vectorises.
    const LANES: usize = 16;
    let (mut maxima, mut poisoned) = ([f32::NEG_INFINITY; LANES], [false; LANES]);
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks.chain(std::iter::once(tail)) {
        for ((max, bad), &s) in maxima.iter_mut().zip(&mut poisoned).zip(chunk) {
            *bad |= s.is_nan() || s == f32::INFINITY;
            *max = if s > *max { s } else { *max };
        }
    }
    let max = maxima
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if poisoned.iter().any(|&bad| bad) {
        row.fill(f32::NAN);
        return f32::NAN;
    }
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return max;
    }
    // Loops, not closures, in this file's kernels: a closure does not take on the target features of the
    // function it is inlined into, and would call `fmaf` rather than use the instruction.
    for s in row.iter_mut() {
        *s = exp_nonpositive::<M>(*s - max);
    }
    max
}

/// The sum of each row's weights in f64, in key order, so that a row's sum does not depend on where its zero
/// weights (masked keys) sit; the rows are summed side by side, each still in order, so that the additions
/// overlap. An empty softmax (max `-inf`) sums to 0.
#[inline(always)]
fn row_sums(weights: &[f32], n: usize) -> Vec<f64> {
    let mut totals = vec![0.0f64; weights.len() / n];
    for j in 0..n {
        for (r, total) in totals.iter_mut().enumerate() {
            *total += f64::from(weights[r * n + j]);
        }
    }
    totals
}

/// `exp(x)` for `x <= 0` (`-inf` included), vectorisable: `2^k e^r` with `k = round(x / ln 2)` and
/// `|r| <= ln 2 / 2`, `e^r` by its Taylor polynomial of degree 7 (truncation below 6e-9 relative). Within
/// 3 ulp of `exp` (tested); below `-87`, where `exp` is under 2^-125, it returns 0.
#[inline(always)]
fn exp_nonpositive<M: MulAdd>(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer, kept in the low mantissa bits.
    const ROUNDER: f32 = 12_582_912.0;
    // ln 2 as a sum whose first term has few bits, so that k * LN2_HIGH is exact (Cody and Waite).
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    let clamped = if x < -87.0 { -87.0 } else { x };
    let shifted = M::mul_add(clamped, std::f32::consts::LOG2_E, ROUNDER);
    let k = shifted - ROUNDER;
    let power = (shifted.to_bits() as i32 - ROUNDER.to_bits() as i32 + 127) << 23;
    let r = M::mul_add(k, -LN2_LOW, M::mul_add(k, -LN2_HIGH, clamped));
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = M::mul_add(p, r, c);
    }
    let y = p * f32::from_bits(power as u32);
    if x < -87.0 {
        0.0
    } else {
        y
    }
}

/// `c[rows, cols] = a[rows, depth] b[depth, cols]`, with `a`'s rows `a_stride` apart, `b`'s rows `b_stride`
/// apart, `c` dense (`cols = c.len() / rows`, `rows = a.len() / a_stride` rounded up): each element summed
/// from zero in `depth` order. Blocks of `R` rows by `W` columns, then smaller blocks for the edges.
#[inline(always)]
fn product<M: MulAdd, const R: usize, const W: usize>(
    a: &[f32],
    a_stride: usize,
    b: &[f32],
    b_stride: usize,
    depth: usize,
    c: &mut [f32],
) {
    let rows = a.len().div_ceil(a_stride.max(1));
    let cols = c.len() / rows.max(1);
    let mut row = 0;
    for height in [R, 4, 2, 1] {
        while height <= R && row + height <= rows {
            let (a, c) = (&a[row * a_stride..], &mut c[row * cols..]);
            match height {
                1 => columns::<M, 1, W>(a, a_stride, b, b_stride, depth, c, cols),
                2 => columns::<M, 2, W>(a, a_stride, b, b_stride, depth, c, cols),
                4 => columns::<M, 4, W>(a, a_stride, b, b_stride, depth, c, cols),
                _ => columns::<M, R, W>(a, a_stride, b, b_stride, depth, c, cols),
            }
            row += height;
        }
    }
}

/// `R` rows of `c` (`cols` wide), by blocks of `W` columns, then 16, 8 and 1.
#[inline(always)]
fn columns<M: MulAdd, const R: usize, const W: usize>(
    a: &[f32],
    a_stride: usize,
    b: &[f32],
    b_stride: usize,
    depth: usize,
    c: &mut [f32],
    cols: usize,
) {
    let mut col = 0;
    while col + W <= cols {
        // SAFETY: the kernel's features are enabled (`attend` chose it by them).
        unsafe { M::wide_block::<R, W>(a, a_stride, b, b_stride, col, depth, &mut c[col..], cols) };
        col += W;
    }
    while col + 16 <= cols {
        block::<M, R, 16>(a, a_stride, b, b_stride, col, depth, &mut c[col..], cols);
        col += 16;
    }
    while col + 8 <= cols {
        block::<M, R, 8>(a, a_stride, b, b_stride, col, depth, &mut c[col..], cols);
        col += 8;
    }
    while col < cols {
        block::<M, R, 1>(a, a_stride, b, b_stride, col, depth, &mut c[col..], cols);
        col += 1;
    }
}

/// The micro-kernel: the `R x C` sums of columns `col..col + C` in registers over the whole `depth`, then
/// stored once.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<M: MulAdd, const R: usize, const C: usize>(
    a: &[f32],
    a_stride: usize,
    b: &[f32],
    b_stride: usize,
    col: usize,
    depth: usize,
    c: &mut [f32],
    c_stride: usize,
) {
    let a_rows: [&[f32]; R] = std::array::from_fn(|r| &a[r * a_stride..][..depth]);
    let mut acc = [[0.0f32; C]; R];
    for k in 0..depth {
        let b_row: &[f32; C] = b[k * b_stride + col..][..C].try_into().expect("C elements");
        for (acc, a_row) in acc.iter_mut().zip(&a_rows) {
            let x = a_row[k];
            for (s, &y) in acc.iter_mut().zip(b_row) {
                *s = M::mul_add(x, y, *s);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        c[r * c_stride..][..C].copy_from_slice(acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    /// xorshift values in [-1, 1).
    fn values(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn exp_on(kernel: Kernel, x: f32) -> f32 {
        match kernel {
            Kernel::Portable => exp_nonpositive::<Separate>(x),
            // SAFETY: the kernel is one `Kernel::available` lists, so the CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => unsafe { exp_avx2_fma(x) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { exp_avx512(x) },
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_avx2_fma(x: f32) -> f32 {
        exp_nonpositive::<Fused>(x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn exp_avx512(x: f32) -> f32 {
        exp_nonpositive::<Fused>(x)
    }

    #[test]
    fn the_exponential_is_within_3_ulp_and_zero_below_minus_87() {
        for kernel in Kernel::available() {
            let mut worst = 0.0f64;
            for i in 0..=870_000 {
                let x = -(i as f32) * 1e-4;
                let want = f64::from(x).exp();
                let ulp = 2f64.powi(want.log2().floor() as i32 - 23);
                worst = worst.max((f64::from(exp_on(kernel, x)) - want).abs() / ulp);
            }
            assert!(worst <= 3.0, "{kernel:?}: {worst} ulp");
            assert_eq!(exp_on(kernel, 0.0), 1.0, "{kernel:?}");
            for x in [-87.5, -100.0, f32::MIN, f32::NEG_INFINITY] {
                assert_eq!(exp_on(kernel, x), 0.0, "{kernel:?} at {x}");
            }
        }
    }

    /// A request's work item with random data: `prefix` keys, the tree `parents`, group `g`, head dim `d`.
    struct Case {
        request: TreeRequest,
        keys_t: Vec<f32>,
        values: Vec<f32>,
        queries: Vec<f32>,
        group: usize,
        d: usize,
    }

    fn ancestors(parents: &[i32]) -> Vec<u64> {
        let mut masks: Vec<u64> = Vec::new();
        for (i, &p) in parents.iter().enumerate() {
            let above = if p < 0 { 0 } else { masks[p as usize] };
            masks.push(above | 1 << i);
        }
        masks
    }

    fn case(seed: u64, prefix: usize, parents: &[i32], group: usize, d: usize) -> Case {
        let n = prefix + parents.len();
        let masks = ancestors(parents);
        Case {
            request: TreeRequest {
                first_row: 0,
                prefix_len: prefix,
                depths: masks.iter().map(|m| m.count_ones() as usize - 1).collect(),
                ancestors: masks,
            },
            // Keys scaled so that scores spread over several units.
            keys_t: values(seed, d * n).iter().map(|x| 3.0 * x).collect(),
            values: values(seed ^ 0x9E37, n * d),
            queries: values(seed ^ 0x79B9, parents.len() * group * d),
            group,
            d,
        }
    }

    /// The kernel's outputs before their rounding to the element type, and its lse.
    fn run(kernel: Kernel, c: &Case) -> (Vec<f64>, Vec<f32>) {
        let rows = c.request.tree_size() * c.group;
        let item = WorkItem {
            request: &c.request,
            keys_t: &c.keys_t,
            values: &c.values,
            queries: &c.queries,
            group: c.group,
            head_dim: c.d,
            scale: 1.0 / (c.d as f32).sqrt(),
        };
        let (mut out, mut lse) = (vec![f64::NAN; rows * c.d], vec![f32::NAN; rows]);
        attend(kernel, &item, &mut out, &mut lse, |x| x);
        (out, lse)
    }

    /// Row `r`'s attention in f64 over the prefix and its node's path: (out, lse).
    fn naive(c: &Case, r: usize) -> (Vec<f64>, f64) {
        let (d, prefix) = (c.d, c.request.prefix_len);
        let n = prefix + c.request.tree_size();
        let node = r / c.group;
        let keys: Vec<usize> = (0..n)
            .filter(|&j| j < prefix || c.request.ancestors[node] >> (j - prefix) & 1 == 1)
            .collect();
        let scale = 1.0 / (d as f64).sqrt();
        let scores: Vec<f64> = keys
            .iter()
            .map(|&j| {
                let dot: f64 = (0..d)
                    .map(|e| f64::from(c.queries[r * d + e]) * f64::from(c.keys_t[e * n + j]))
                    .sum();
                dot * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        let out = (0..d)
            .map(|e| {
                keys.iter()
                    .zip(&scores)
                    .map(|(&j, s)| (s - max).exp() / total * f64::from(c.values[j * d + e]))
                    .sum()
            })
            .collect();
        (out, max + total.ln())
    }

    /// Every kernel against f64 on awkward sizes: no prefix, prefixes that are not multiples of any block
    /// width, row counts that are not multiples of 4 and above the row block (72 rows: a chain of 8 nodes
    /// times a group of 9); fp16 outputs within half an ulp
    /// plus the f32 slack of `tests/common/attention.rs` (2^-14).
    #[test]
    fn every_kernel_matches_f64_on_awkward_sizes() {
        let (one, small, star, chain): (&[i32], &[i32], &[i32], &[i32]) = (
            &[-1],
            &[-1, 0, 1, 1, 0],
            &[-1, 0, 0, 0, 0, 0, 0],
            &[-1, 0, 1, 2, 3, 4, 5, 6],
        );
        let cases = [
            (0, one, 1, 64),
            (1, small, 3, 64),
            (37, star, 3, 64),
            (200, chain, 8, 128),
            (511, one, 9, 64),
            (70, chain, 9, 64),
        ];
        for kernel in Kernel::available() {
            for (i, &(prefix, parents, group, d)) in cases.iter().enumerate() {
                let c = case(7 + i as u64, prefix, parents, group, d);
                let (out, lse) = run(kernel, &c);
                for r in 0..parents.len() * group {
                    let (want, want_lse) = naive(&c, r);
                    for (e, w) in want.iter().enumerate() {
                        let got = f64::from(f16::from_f64(out[r * d + e]).to_f32());
                        let bound = 1.0 / 16384.0 + w.abs() / 2048.0 + 1.0 / (1u64 << 24) as f64;
                        assert!(
                            (got - w).abs() <= bound,
                            "{kernel:?} case {i} row {r} [{e}]: {got} vs {w}"
                        );
                    }
                    let got = f64::from(lse[r]);
                    assert!(
                        (got - want_lse).abs() <= (1.0 + want_lse.abs()) / 65536.0,
                        "{kernel:?} case {i} lse"
                    );
                }
            }
        }
    }

    /// A node verified in a tree gets the bits it gets when decoded alone with its path as the prefix (the
    /// unrounded outputs are compared, so that a change in any sum's order shows): the greedy speculative
    /// tokens of the rollout engine equal its autoregressive ones because of this.
    #[test]
    fn a_node_in_a_tree_gets_the_bits_it_gets_decoded_alone() {
        let parents = [-1, 0, 0, 1, 1, 2, 3, 6];
        let (group, d) = (3, 64);
        // Prefixes that move the path's keys between the 32-, 16-, 8- and 1-column blocks of the scores.
        let runs = Kernel::available()
            .into_iter()
            .flat_map(|kernel| [13, 28, 45, 70].map(|prefix| (kernel, prefix)));
        for (kernel, prefix) in runs {
            let tree = case(99 + prefix as u64, prefix, &parents, group, d);
            let (out, lse) = run(kernel, &tree);
            let n = prefix + parents.len();
            for node in 0..parents.len() {
                let path: Vec<usize> = (0..=node)
                    .filter(|&j| tree.request.ancestors[node] >> j & 1 == 1)
                    .collect();
                // The prefix, then the path's keys, the node itself last as a tree of one.
                let keys: Vec<usize> = (0..prefix).chain(path.iter().map(|j| prefix + j)).collect();
                let m = keys.len();
                let alone = Case {
                    request: TreeRequest {
                        first_row: 0,
                        prefix_len: m - 1,
                        depths: vec![0],
                        ancestors: vec![1],
                    },
                    keys_t: (0..d)
                        .flat_map(|e| keys.iter().map(move |&j| (e, j)))
                        .map(|(e, j)| tree.keys_t[e * n + j])
                        .collect(),
                    values: keys
                        .iter()
                        .flat_map(|&j| tree.values[j * d..][..d].to_vec())
                        .collect(),
                    queries: tree.queries[node * group * d..][..group * d].to_vec(),
                    group,
                    d,
                };
                let (alone_out, alone_lse) = run(kernel, &alone);
                let bits = |x: &[f64]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&out[node * group * d..][..group * d]),
                    bits(&alone_out),
                    "{kernel:?} node {node}: out"
                );
                let lse_bits = |x: &[f32]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    lse_bits(&lse[node * group..][..group]),
                    lse_bits(&alone_lse),
                    "{kernel:?} node {node}"
                );
            }
        }
    }

    #[test]
    fn nan_and_infinite_scores_poison_their_row_alone() {
        for kernel in Kernel::available() {
            let mut c = case(5, 10, &[-1, 0, 0], 1, 64);
            let n = 13;
            c.keys_t[3 * n + 11] = f32::NAN; // node 1's own key: rows 1 only
            c.keys_t[5 * n + 12] = f32::INFINITY; // node 2's own key, times a nonzero query element
            c.queries[2 * 64 + 5] = 1.0;
            let (out, lse) = run(kernel, &c);
            assert!(
                out[..64].iter().all(|x| x.is_finite()) && lse[0].is_finite(),
                "{kernel:?} row 0"
            );
            for r in 1..3 {
                assert!(
                    out[r * 64..][..64].iter().all(|x| x.is_nan()) && lse[r].is_nan(),
                    "{kernel:?} row {r}"
                );
            }
        }
    }
}
