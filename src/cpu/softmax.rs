//! The sampler's softmax on the CPU: probabilities of a row's log weights, `exp(z - max) / sum`, computed in the
//! row's own buffer and compiled for the CPU's vector instructions.
//!
//! Exponentials are taken in f32 by [`exp_nonpositive`] (a polynomial, so that the loop vectorises; libm's
//! `expf` is a call per token), summed in f64 by 16 lanes, and each is multiplied by the sum's reciprocal in f64
//! and rounded to f32. Napkin math at V = 49152: a row is 192 KiB, read three times from the L2 (max,
//! exponentials, quotients); about 20 vector operations per 16 tokens, some 60k instructions, tens of
//! microseconds. Results are the same on every kernel (every multiply-add is fused) and for any thread count.
//! The price of that: an x86-64 CPU without AVX2 and FMA runs the portable kernel, where each fused multiply-add
//! is a call to `fmaf`, about 10 times libm's `expf` per token (a review measured 1.37 against 0.14 ms per
//! 49152-token row). Top-p's cut is still found with the f64 softmax of libm's `exp` (`cpu::sampling`), so it
//! and these probabilities may differ in the last bits.
//!
//! The CUDA kernels take their own `expf` and an f32 sum, so probabilities may differ from them in the last bits;
//! the GPU tests allow for that where softmax sums are involved (`tokens_rarely_differ_where_softmax_sums_round`).

use super::simd::{largest, Kernel};

/// Replaces log weights `z` (finite, or `-inf` for tokens without mass; at least one finite) by their softmax.
pub(crate) fn softmax_in_place(z: &mut [f32]) {
    softmax_with(Kernel::detect(), z)
}

fn softmax_with(kernel: Kernel, z: &mut [f32]) {
    assert!(
        kernel.runs_here(),
        "{kernel:?} kernel on a CPU without its instructions"
    );
    match kernel {
        Kernel::Portable => softmax_lanes(z),
        // SAFETY: the CPU has the kernel's instructions (asserted above).
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => unsafe { softmax_avx2(z) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { softmax_avx512(z) },
    }
}

/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(z: &mut [f32]) {
    softmax_lanes(z)
}

/// # Safety
/// The CPU must have AVX-512F, AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_avx512(z: &mut [f32]) {
    softmax_lanes(z)
}

/// Lanes of the f64 sum: enough independent additions to vectorise (the sum is the same for any thread count,
/// since a row is never split).
const LANES: usize = 16;

#[inline(always)]
fn softmax_lanes(z: &mut [f32]) {
    let max = largest(z);
    let mut sums = [0.0f64; LANES];
    let mut chunks = z.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, sum) in chunk.iter_mut().zip(&mut sums) {
            *x = exp_nonpositive(*x - max);
            *sum += f64::from(*x);
        }
    }
    for (x, sum) in chunks.into_remainder().iter_mut().zip(&mut sums) {
        *x = exp_nonpositive(*x - max);
        *sum += f64::from(*x);
    }
    // A product by the reciprocal, not a quotient per token (a vector division costs about 16 times a product):
    // in f64 both are within an f64 rounding of `e / sum`, far below the f32 rounding that follows.
    let reciprocal = 1.0 / sums.iter().sum::<f64>();
    for x in z.iter_mut() {
        *x = (f64::from(*x) * reciprocal) as f32;
    }
}

/// `ln 2` split so that `n * LN2_HI` is exact for the `n` used here (|n| <= 150 needs 8 bits; `LN2_HI` has 9
/// significant bits): Cody and Waite's argument reduction.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// `1.5 * 2^23`: adding and subtracting it rounds an f32 of magnitude below `2^22` to the nearest integer (ties
/// to even), in two vectorisable additions.
const ROUND_TO_INTEGER: f32 = 12_582_912.0;
/// Below this, `exp` is under half the smallest subnormal f32 and rounds to 0.
const EXP_UNDERFLOW: f32 = -104.0;

/// `exp(x)` in f32 for `x <= 0` (`-inf` gives 0), within one unit in the last place of the correctly rounded
/// value (one subnormal step below `2^-126`), as the unit test sweeps.
///
/// `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `exp(r)` by the degree-7 minimax polynomial of Cephes' `expf`
/// (S. L. Moshier, *Methods and Programs for Mathematical Functions*, 1989), then `2^n` put in the exponent
/// bits, in two steps where `2^n` is subnormal.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let clamped = x.max(EXP_UNDERFLOW);
    let n = (clamped * std::f32::consts::LOG2_E + ROUND_TO_INTEGER) - ROUND_TO_INTEGER;
    let r = n.mul_add(-LN2_HI, clamped);
    let r = n.mul_add(-LN2_LO, r);
    let mut poly = 1.987_569_1e-4f32;
    poly = poly.mul_add(r, 1.398_199_9e-3);
    poly = poly.mul_add(r, 8.333_452e-3);
    poly = poly.mul_add(r, 4.166_579_6e-2);
    poly = poly.mul_add(r, 1.666_666_5e-1);
    poly = poly.mul_add(r, 0.5); // Cephes gives 5.0000001201e-1, which rounds to 0.5 in f32
    let exp_r = (poly * r).mul_add(r, r) + 1.0;
    // n is in -150..=0; 2^n below 2^-126 is applied as 2^(n + 64) and then 2^-64. The biased exponent (1 to
    // 127) is read from the low bits of `2^23 + exponent + 127` rather than by `as i32`, whose saturating
    // conversion LLVM does not vectorise.
    let subnormal = n < -126.0;
    let exponent = if subnormal { n + 64.0 } else { n };
    let biased = (exponent + (127.0 + 8_388_608.0)).to_bits() & 0xff;
    let scaled = exp_r * f32::from_bits(biased << 23);
    let scaled = if subnormal {
        scaled * f32::from_bits(((127 - 64) as u32) << 23)
    } else {
        scaled
    };
    if x >= EXP_UNDERFLOW {
        scaled
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in representable f32 values between two non-negative finite floats.
    fn steps_apart(a: f32, b: f32) -> u32 {
        a.to_bits().abs_diff(b.to_bits())
    }

    #[test]
    fn exp_is_within_one_step_of_the_correctly_rounded_value() {
        // Every 61st f32 from -0 down to below the underflow threshold (about 18 million values), against f64's
        // exp rounded to f32; then the special values.
        let mut bits = (-0.0f32).to_bits();
        let mut worst = 0;
        loop {
            let x = f32::from_bits(bits);
            if x < -105.0 {
                break;
            }
            let want = (f64::from(x)).exp() as f32;
            let got = exp_nonpositive(x);
            let apart = steps_apart(got, want);
            assert!(apart <= 1, "exp({x}) = {got}, correctly rounded {want}");
            worst = worst.max(apart);
            bits += 61;
        }
        assert_eq!(worst, 1, "the sweep reached rounding differences");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-104.5), 0.0);
        assert_eq!(
            exp_nonpositive(-103.9),
            f32::from_bits(1),
            "the smallest subnormal"
        );
    }

    /// The softmax in f64 from the f32 differences `z - max` (rounded as the kernels round them, on the CPU
    /// and the GPU alike).
    fn softmax_reference(z: &[f32]) -> Vec<f64> {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exps: Vec<f64> = z.iter().map(|&x| f64::from(x - max).exp()).collect();
        let sum: f64 = exps.iter().sum();
        exps.into_iter().map(|e| e / sum).collect()
    }

    #[test]
    fn softmax_is_the_same_on_every_kernel_and_close_to_exact_arithmetic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        for len in [1, 2, 15, 16, 17, 31, 1000, 49152] {
            for spread in [0.0f32, 1.0, 30.0, 200.0] {
                let z: Vec<f32> = (0..len)
                    .map(|i| match i % 11 {
                        3 if len > 1 => f32::NEG_INFINITY,
                        _ => (uniform() - 0.5) * spread,
                    })
                    .collect();
                let want = softmax_reference(&z);
                let mut first: Option<Vec<f32>> = None;
                for kernel in Kernel::available() {
                    let mut got = z.clone();
                    softmax_with(kernel, &mut got);
                    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                        // f32 exponentials within one step, an f64 sum, one rounding to f32: a few f32 epsilons.
                        let tolerance = 4.0 * f64::from(f32::EPSILON) * w + 1e-44;
                        assert!(
                            (f64::from(g) - w).abs() <= tolerance,
                            "{kernel:?} len {len} spread {spread} token {i}: {g} against {w}"
                        );
                        if z[i] == f32::NEG_INFINITY {
                            assert_eq!(g, 0.0, "a token without mass keeps none");
                        }
                    }
                    match &first {
                        None => first = Some(got),
                        Some(first) => assert!(
                            first
                                .iter()
                                .zip(&got)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{kernel:?} differs from the first kernel at len {len}"
                        ),
                    }
                }
            }
        }
    }
}
