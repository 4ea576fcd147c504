//! The randomness of the samplers: counter-based Philox4x32-10 keyed by a request's seed, indexed by the
//! request's step, the tree node and the token, so that a request's noise never depends on its position in the
//! batch, the batch size or how a backend splits the work.
//!
//! Everything here is integer arithmetic or a fixed sequence of correctly rounded `f32` operations (no fused
//! multiply-add, no library `log`), so the CUDA kernels compute bit-identical values (`cuda/sampling_noise.cuh`
//! mirrors this file with `__fadd_rn`-style intrinsics, which nvcc never contracts).
//!
//! # Indexing
//!
//! A Philox block is `philox4x32_10(key, counter)` with `key = (seed as u32, (seed >> 32) as u32)` and
//! `counter = (index / 4, (domain << 16) | node, step as u32, (step >> 32) as u32)`; word `index % 4` of the
//! block is the 32-bit draw. Two domains:
//!
//! * [`Domain::Token`], `index` = token id: the noise of token `x` when a token is drawn at node `node`.
//! * [`Domain::Coin`], `index` = `j`: the acceptance coin of the `j`-th child tried at node `node`.
//!
//! A node draws at most one token, and every coin has its own index, so no draw is ever used twice (the bug
//! of flashinfer#424: one uniform for both the accept test and the residual sample).

/// Which kind of draw; part of the Philox counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Domain {
    /// Per-token noise of the token drawn at a node.
    Token = 0,
    /// Acceptance coins of the children tried at a node.
    Coin = 1,
}

const PHILOX_M0: u32 = 0xD251_1F53;
const PHILOX_M1: u32 = 0xCD9E_8D57;
const PHILOX_W0: u32 = 0x9E37_79B9;
const PHILOX_W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let product = u64::from(a) * u64::from(b);
    ((product >> 32) as u32, product as u32)
}

/// Philox4x32 with 10 rounds (Salmon et al., SC'11; the generator of cuRAND and Random123).
#[inline(always)]
pub fn philox4x32_10(key: [u32; 2], counter: [u32; 4]) -> [u32; 4] {
    let [mut k0, mut k1] = key;
    let [mut c0, mut c1, mut c2, mut c3] = counter;
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        let (hi0, lo0) = mulhilo(PHILOX_M0, c0);
        let (hi1, lo1) = mulhilo(PHILOX_M1, c2);
        (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0);
    }
    [c0, c1, c2, c3]
}

/// The noise source of one request: its seed and step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestNoise {
    /// The request's seed (the Philox key).
    pub seed: u64,
    /// The request's step counter (part of the Philox counter); callers advance it every decoding step.
    pub step: u64,
}

impl RequestNoise {
    /// The Philox block holding draw `index` of `domain` at `node`.
    #[inline(always)]
    pub fn block(&self, domain: Domain, node: u32, index: u32) -> [u32; 4] {
        debug_assert!(node < 1 << 16);
        philox4x32_10(
            [self.seed as u32, (self.seed >> 32) as u32],
            [
                index / 4,
                ((domain as u32) << 16) | node,
                self.step as u32,
                (self.step >> 32) as u32,
            ],
        )
    }

    /// The 32-bit draw `index` of `domain` at `node`.
    #[inline(always)]
    pub fn bits(&self, domain: Domain, node: u32, index: u32) -> u32 {
        self.block(domain, node, index)[(index % 4) as usize]
    }

    /// The acceptance coin of the `j`-th child tried at `node`: a uniform in (0, 1).
    pub fn coin(&self, node: u32, j: u32) -> f32 {
        uniform(self.bits(Domain::Coin, node, j))
    }

    /// The exponential noise of token `token` drawn at `node` ([`exponential`] of its Token-domain bits).
    #[inline(always)]
    pub fn token_exponential(&self, node: u32, token: u32) -> f32 {
        exponential(self.bits(Domain::Token, node, token))
    }
}

/// A lower bound on every [`exponential`] draw (the smallest is `-ln(1 - 2^-24)`, about 5.96e-8): race keys
/// are at most `w / MIN_EXPONENTIAL` or `z - ln(MIN_EXPONENTIAL)`, which lets a backend skip tokens that
/// cannot win.
pub const MIN_EXPONENTIAL: f64 = 5.9e-8;

/// A uniform in the open interval (0, 1) from 32 random bits: `(2m + 1) / 2^24` with `m` the top 23 bits. Exact
/// in `f32`, never 0 (so `-ln u` is finite) and never 1 (so `u * q < q` for every `q > 0`, see the samplers).
#[inline(always)]
pub fn uniform(bits: u32) -> f32 {
    ((bits >> 9) * 2 + 1) as f32 * (1.0 / 16_777_216.0)
}

/// `-ln(uniform(bits))`: an Exp(1) draw, in [6e-8, 16.7]: never 0 and never infinite.
#[inline(always)]
pub fn exponential(bits: u32) -> f32 {
    -ln(uniform(bits))
}

/// Natural logarithm of a positive, normal, finite `f32`, to within about 2 ulp, as a fixed sequence of
/// correctly rounded operations (so every backend gets the same bits): `x = 2^e f` with `f` in
/// [sqrt(1/2), sqrt(2)), then `ln f = 2 atanh(s)`, `s = (f - 1)/(f + 1)`, by its odd series to `s^9`
/// (`|s| < 0.172`, so the first omitted term is below 1e-9).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    const SQRT_2: f32 = std::f32::consts::SQRT_2;
    // ln 2 split so that e * LN2_HI is exact for |e| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xFF) as i32 - 127;
    let mut f = f32::from_bits((bits & 0x007F_FFFF) | 0x3F80_0000);
    if f > SQRT_2 {
        f *= 0.5;
        e += 1;
    }
    let s = (f - 1.0) / (f + 1.0);
    let s2 = s * s;
    let series = s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    let two_s = s + s;
    let ln_f = two_s + two_s * series;
    let e = e as f32;
    e * LN2_HI + (ln_f + e * LN2_LO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answers() {
        // Known-answer vectors of Random123 (kat_vectors, philox4x32_10).
        assert_eq!(
            philox4x32_10([0, 0], [0, 0, 0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX, u32::MAX], [u32::MAX; 4]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0xa409_3822, 0x299f_31d0],
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniform_is_strictly_inside_the_unit_interval() {
        assert_eq!(uniform(0), 1.0 / 16_777_216.0);
        assert_eq!(uniform(u32::MAX), 1.0 - 1.0 / 16_777_216.0);
        assert!(uniform(u32::MAX) < 1.0 && uniform(0) > 0.0);
        // Every value is an odd multiple of 2^-24, so the low 9 bits of the draw do not matter.
        assert_eq!(uniform(0x1234_5600), uniform(0x1234_57FF));
    }

    #[test]
    fn ln_is_within_two_ulp_of_the_f64_logarithm() {
        let mut worst = 0.0f64;
        let mut check = |x: f32| {
            let exact = f64::from(x).ln();
            let got = f64::from(ln(x));
            let ulp = f64::from(f32::EPSILON) * exact.abs().max(f64::from(f32::MIN_POSITIVE));
            worst = worst.max((got - exact).abs() / ulp);
        };
        // Every uniform the samplers can produce near 0 and near 1, and a sweep in between.
        for m in (0..1u32 << 23)
            .step_by(97)
            .chain(0..4096)
            .chain((1 << 23) - 4096..1 << 23)
        {
            check(((m * 2 + 1) as f32) * (1.0 / 16_777_216.0));
        }
        for x in [1e-30f32, 1e-5, 0.5, 1.0, 2.0, 16.6, 1e30] {
            check(x);
        }
        // Both sides of the range reduction's switch at sqrt(2) and sqrt(1/2).
        for x in [std::f32::consts::SQRT_2, std::f32::consts::FRAC_1_SQRT_2] {
            for x in [
                f32::from_bits(x.to_bits() - 1),
                x,
                f32::from_bits(x.to_bits() + 1),
            ] {
                check(x);
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn min_exponential_bounds_every_draw() {
        // exponential() decreases with its bits: the largest uniform gives the smallest draw.
        assert!(f64::from(exponential(u32::MAX)) > MIN_EXPONENTIAL);
        assert!(f64::from(exponential(u32::MAX)) < MIN_EXPONENTIAL * 1.02);
        assert!(exponential(u32::MAX - 512) > exponential(u32::MAX));
    }

    #[test]
    fn exponential_noise_has_mean_one_and_unit_variance() {
        let n = 1 << 20;
        let (mut sum, mut sum2) = (0.0f64, 0.0f64);
        let noise = RequestNoise { seed: 7, step: 3 };
        for token in 0..n {
            let e = f64::from(noise.token_exponential(0, token));
            assert!(e > 0.0 && e.is_finite());
            sum += e;
            sum2 += e * e;
        }
        let mean = sum / f64::from(n);
        let var = sum2 / f64::from(n) - mean * mean;
        // Standard errors: 1/sqrt(n) = 0.001 for the mean, about 0.0022 for the variance; 6 of them.
        assert!((mean - 1.0).abs() < 0.006, "mean {mean}");
        assert!((var - 1.0).abs() < 0.014, "variance {var}");
    }

    #[test]
    fn draws_differ_across_domain_node_step_and_seed() {
        let a = RequestNoise { seed: 1, step: 0 };
        let base = a.bits(Domain::Token, 0, 0);
        assert_ne!(base, a.bits(Domain::Coin, 0, 0));
        assert_ne!(base, a.bits(Domain::Token, 1, 0));
        assert_ne!(base, a.bits(Domain::Token, 0, 1));
        assert_ne!(
            base,
            RequestNoise { seed: 1, step: 1 }.bits(Domain::Token, 0, 0)
        );
        assert_ne!(
            base,
            RequestNoise { seed: 2, step: 0 }.bits(Domain::Token, 0, 0)
        );
        assert_ne!(
            base,
            RequestNoise {
                seed: 1 << 32,
                step: 0
            }
            .bits(Domain::Token, 0, 0)
        );
        assert_ne!(
            base,
            RequestNoise {
                seed: 1,
                step: 1 << 32
            }
            .bits(Domain::Token, 0, 0)
        );
    }
}
