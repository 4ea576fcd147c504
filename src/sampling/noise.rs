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
//! block is the 32-bit draw. Three domains:
//!
//! * [`Domain::Token`], `index` = token id: the high 32 bits of the 64-bit noise of token `x` when a token is
//!   drawn at node `node`.
//! * [`Domain::TokenLow`], `index` = token id: its low 32 bits, drawn only when the high word alone does not
//!   fix the noise to full precision (1 token in 1024, see [`exponential_of_draw`]).
//! * [`Domain::Coin`], `index` = `j`: the acceptance coin of the `j`-th child tried at node `node`.
//!
//! # Resolution of the race
//!
//! A token is drawn by the exponential race, `argmax w(x) / E_x` (or `z(x) - ln E_x`), ties to the lower id.
//! With `E = -ln u` of a 24-bit uniform `u`, the smallest `E` of a row (the winner of a flat row) is known only to
//! 2^-24 in absolute terms, about `V 2^-24` relative, so at V = 151,936 about 0.9% of draws tied at the top
//! and went to the lower id. The noise is now `E = -ln(1 - t)` of a uniform `t` with a floating-point
//! resolution ([`exponential_of_draw`]): every `E` is known to 2^-22 relative, whatever its size (2^-21 for
//! `E` in [0.29, 0.69], where `1 - t` rounds; those never win a large row). A tie at the
//! maximum then needs two keys within one rounding of each other: for a row of any size that happens with
//! probability about 2^-22 (2.4e-7) per draw for probabilities (`w / E`) and about `|key| 2^-24` for logits
//! (`z - ln E` in f32: at most 4e-6 for `|z| + 28 <= 64`). `tests` measures it: at most one tie at the top in
//! 2 x 600 flat rows of 262,144 tokens, where the 24-bit uniform tied in about 1.5% of rows.
//!
//! A node draws at most one token, and every coin has its own index, so no draw is ever used twice (the bug
//! of flashinfer#424: one uniform for both the accept test and the residual sample).

/// Which kind of draw; part of the Philox counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Domain {
    /// Per-token noise of the token drawn at a node: its high 32 bits.
    Token = 0,
    /// Acceptance coins of the children tried at a node.
    Coin = 1,
    /// Per-token noise of the token drawn at a node: its low 32 bits, drawn only when needed.
    TokenLow = 2,
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

/// [`philox4x32_10`] of `N` counters that differ only in their first word, `c0 + i` for lane `i`: word `w` of
/// lane `i`'s block in `[w][i]`. The same bits lane by lane, written as loops over the lanes so that a compiler
/// vectorises them (32-bit products into 64 bits, exclusive ors).
#[inline(always)]
pub fn philox4x32_10_lanes<const N: usize>(key: [u32; 2], counter: [u32; 4]) -> [[u32; N]; 4] {
    let [mut k0, mut k1] = key;
    let mut c = [
        [counter[0]; N],
        [counter[1]; N],
        [counter[2]; N],
        [counter[3]; N],
    ];
    for (i, c0) in c[0].iter_mut().enumerate() {
        *c0 = c0.wrapping_add(i as u32);
    }
    for round in 0..10 {
        if round > 0 {
            k0 = k0.wrapping_add(PHILOX_W0);
            k1 = k1.wrapping_add(PHILOX_W1);
        }
        // The four words of lane `i` live in four arrays: an index is the plain way to walk them together.
        #[allow(clippy::needless_range_loop)]
        for i in 0..N {
            let (hi0, lo0) = mulhilo(PHILOX_M0, c[0][i]);
            let (hi1, lo1) = mulhilo(PHILOX_M1, c[2][i]);
            (c[0][i], c[1][i], c[2][i], c[3][i]) =
                (hi1 ^ c[1][i] ^ k0, lo1, hi0 ^ c[3][i] ^ k1, lo0);
        }
    }
    c
}

/// A seed for sample `sample` of a group sharing `base_seed` (the rollouts of one prompt in GRPO, or any requests
/// that must draw independently): the same seed and step give the same noise in any batch slot, so samples meant
/// to differ need different seeds. For a fixed `base_seed` distinct `sample` values give distinct seeds (an odd
/// multiple of `sample` added to `base_seed`, then splitmix64's finaliser, both bijections of `u64`).
pub fn sample_seed(base_seed: u64, sample: u64) -> u64 {
    let mut z = base_seed.wrapping_add(sample.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

    /// The high words (Token domain) of the `4 N` tokens from `first` (a multiple of 4) drawn at `node`: the
    /// same words as [`Self::block`] gives four at a time, from `N` blocks computed side by side.
    #[inline(always)]
    pub fn token_highs<const N: usize>(&self, node: u32, first: u32) -> [[u32; N]; 4] {
        debug_assert!(node < 1 << 16 && first.is_multiple_of(4));
        philox4x32_10_lanes(
            [self.seed as u32, (self.seed >> 32) as u32],
            [
                first / 4,
                ((Domain::Token as u32) << 16) | node,
                self.step as u32,
                (self.step >> 32) as u32,
            ],
        )
    }

    /// The acceptance coin of the `j`-th child tried at `node`: a uniform in (0, 1).
    pub fn coin(&self, node: u32, j: u32) -> f32 {
        uniform(self.bits(Domain::Coin, node, j))
    }

    /// The exponential noise of token `token` drawn at `node`, from the token's high word `high` (word
    /// `token % 4` of its Token-domain block, which a backend computes four tokens at a time): see
    /// [`exponential_of_draw`].
    #[inline(always)]
    pub fn token_exponential_from(&self, node: u32, token: u32, high: u32) -> f32 {
        exponential_of_draw(high, || self.bits(Domain::TokenLow, node, token))
    }

    /// The exponential noise of token `token` drawn at `node`.
    #[inline(always)]
    pub fn token_exponential(&self, node: u32, token: u32) -> f32 {
        self.token_exponential_from(node, token, self.bits(Domain::Token, node, token))
    }
}

/// A lower bound on every [`exponential_of_draw`] (the smallest is about `2^-41 = 4.55e-13`): race keys are at
/// most `w / MIN_EXPONENTIAL` or `z - ln(MIN_EXPONENTIAL)`, which lets a backend skip tokens that cannot win.
pub const MIN_EXPONENTIAL: f64 = 4.5e-13;

/// An upper bound on `-ln(MIN_EXPONENTIAL)`, the most a logit's race key `z - ln E` exceeds `z`.
pub const MAX_GUMBEL: f64 = 28.43;

/// The Exp(1) draw of a token from its 64 random bits `r = high << 32 | low`: `E = -ln(1 - t)`, with `t` a
/// uniform in (0, 1) of floating-point resolution. With `lz` the leading zeros of `r` (at most 40) and `m` the
/// 22 bits after its leading one, `t = 2^-(lz+1) (1 + (2m + 1) / 2^23)`: exact in `f32`, in the middle of its
/// `2^-(lz+1)`-wide bucket's `2^22` cells, never 0 or 1 (so `E` is in [4.5e-13, 16.7], never 0 or infinite).
/// Only when the high word has 10 or more leading zeros does `t` need bits of the low word, so `low` is called
/// for 1 token in 1024. (Below `r < 2^23`, probability 2^-41, the cells of the last bucket are reused.)
///
/// `E` is computed as `2 atanh(t / (2 - t))` by its odd series when `t < 1/4` (no cancellation in `1 - t`, so
/// small `E` keep their 2^-22 resolution), else as `-ln(1 - t)` by [`ln`]: a fixed sequence of correctly
/// rounded `f32` operations, as everywhere in this file.
#[inline(always)]
pub fn exponential_of_draw(high: u32, low: impl FnOnce() -> u32) -> f32 {
    if high.leading_zeros() <= 9 {
        return exponential_of_high(high);
    }
    let r = (u64::from(high) << 32) | u64::from(low());
    let lz = r.leading_zeros().min(40);
    exponential_of_bucket(lz, ((r >> (41 - lz)) & 0x3F_FFFF) as u32)
}

/// [`exponential_of_draw`] of a high word with at most 9 leading zeros (all but 1 in 1024), which needs no low
/// word, as straight-line code: both branches computed and one selected, so that a loop over many tokens
/// vectorises, with the same bits. For a high word with more leading zeros the result is meaningless: a caller
/// computing many at once redoes those with [`exponential_of_draw`].
#[inline(always)]
pub fn exponential_of_high(high: u32) -> f32 {
    let lz = high.leading_zeros().min(9);
    exponential_of_bucket(lz, (high >> (9 - lz)) & 0x3F_FFFF)
}

/// `E` of bucket `lz` and cell `m` (see [`exponential_of_draw`]).
#[inline(always)]
fn exponential_of_bucket(lz: u32, m: u32) -> f32 {
    let t = f32::from_bits(((126 - lz) << 23) | (2 * m + 1));
    if lz >= 2 {
        // t < 1/4: E = -ln(1 - t) = 2 atanh(s), s = t / (2 - t) <= 1/7; the first omitted term is below 2^-31 E.
        two_atanh(t / (2.0 - t))
    } else {
        -ln(1.0 - t)
    }
}

/// A uniform in the open interval (0, 1) from 32 random bits: `(2m + 1) / 2^24` with `m` the top 23 bits. Exact
/// in `f32`, never 0 (so `-ln u` is finite) and never 1 (so `u * q < q` for every `q > 0`, see the samplers).
#[inline(always)]
pub fn uniform(bits: u32) -> f32 {
    ((bits >> 9) * 2 + 1) as f32 * (1.0 / 16_777_216.0)
}

/// `2 atanh(s) = 2 (s + s^3/3 + s^5/5 + s^7/7 + s^9/9)` for `|s| <= 0.172`, the series [`ln`] and
/// [`exponential_of_draw`] share, as a fixed sequence of correctly rounded operations.
#[inline(always)]
fn two_atanh(s: f32) -> f32 {
    let s2 = s * s;
    let series = s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0))));
    let two_s = s + s;
    two_s + two_s * series
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
    let ln_f = two_atanh((f - 1.0) / (f + 1.0));
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
    fn philox_lanes_equal_philox_lane_by_lane() {
        let (key, counter) = (
            [0xa409_3822, 0x299f_31d0],
            [0xFFFF_FFF9, 0x85a3_08d3, 7, 0x0370_7344],
        );
        let lanes = philox4x32_10_lanes::<16>(key, counter);
        for i in 0..16u32 {
            let c0 = counter[0].wrapping_add(i);
            let one = philox4x32_10(key, [c0, counter[1], counter[2], counter[3]]);
            assert_eq!(lanes.map(|words| words[i as usize]), one, "lane {i}");
        }
    }

    #[test]
    fn the_high_word_alone_gives_the_draw_where_it_suffices() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut highs: Vec<u32> = (0..=9)
            .flat_map(|lz| [u32::MAX >> lz, 1 << (31 - lz), (1 << (31 - lz)) | 1])
            .collect();
        highs.extend((0..1_000_000).map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 32) as u32 | 1 << 22
        }));
        for high in highs {
            assert!(high.leading_zeros() <= 9);
            // The rule of `exponential_of_draw`'s documentation, written out with branches: `t` from the bucket
            // `lz` and the 22 bits after the leading one, then the series or the logarithm.
            let lz = high.leading_zeros();
            let m = (high >> (9 - lz)) & 0x3F_FFFF;
            let t = f32::from_bits(((126 - lz) << 23) | (2 * m + 1));
            let want = if lz >= 2 {
                two_atanh(t / (2.0 - t))
            } else {
                -ln(1.0 - t)
            };
            assert_eq!(
                exponential_of_draw(high, || unreachable!("no low word needed")).to_bits(),
                want.to_bits(),
                "high {high:#x}"
            );
            assert_eq!(
                exponential_of_high(high).to_bits(),
                want.to_bits(),
                "high {high:#x}"
            );
        }
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
    fn min_exponential_and_max_gumbel_bound_every_draw() {
        // E grows with r = high << 32 | low: the smallest r gives the smallest draw, the largest the largest.
        let smallest = f64::from(exponential_of_draw(0, || 0));
        assert!(
            smallest > MIN_EXPONENTIAL && smallest < MIN_EXPONENTIAL * 1.02,
            "{smallest}"
        );
        assert!(-MIN_EXPONENTIAL.ln() < MAX_GUMBEL && -MIN_EXPONENTIAL.ln() > MAX_GUMBEL - 0.01);
        let largest = f64::from(exponential_of_draw(u32::MAX, || u32::MAX));
        assert!(largest.is_finite() && largest < 16.7, "{largest}");
        // Fewer random bits below r = 2^23 (probability 2^-41): the last bucket's cells are reused there.
        let mut previous = 0.0f32;
        for lz in 0..64u32 {
            let r = u64::MAX >> lz;
            let e = exponential_of_draw((r >> 32) as u32, || r as u32);
            assert!(e > 0.0 && e.is_finite() && f64::from(e) > MIN_EXPONENTIAL);
            if lz > 0 {
                assert!(
                    e < previous || (lz >= 41 && e <= previous),
                    "not decreasing at {lz} leading zeros"
                );
            }
            previous = e;
        }
    }

    #[test]
    fn the_low_word_is_drawn_only_when_it_matters() {
        // Nine or fewer leading zeros: the high word fixes E; the low word is not even asked for.
        for high in [u32::MAX, 1 << 31, 1 << 24, (1 << 22) | 12345] {
            let e = exponential_of_draw(high, || panic!("low word drawn for {high:#x}"));
            for low in [0, 1, u32::MAX] {
                assert_eq!(e, exponential_of_draw(high, || low), "{high:#x}");
            }
        }
        // Ten or more: it does, and the result follows both words.
        assert_ne!(
            exponential_of_draw(1 << 21, || 0),
            exponential_of_draw(1 << 21, || 1 << 31)
        );
    }

    #[test]
    fn small_draws_keep_a_relative_resolution_of_2_pow_minus_22() {
        // Two draws whose t differ by one cell of 2^22 give different E, however small, and their ratio is
        // t's: E ~ t for small t.
        for lz in [9u32, 20, 30, 40] {
            let r = 1u64 << (63 - lz);
            let next = r + (1u64 << (41 - lz));
            let (a, b) = (
                exponential_of_draw((r >> 32) as u32, || r as u32),
                exponential_of_draw((next >> 32) as u32, || next as u32),
            );
            let ratio = f64::from(b) / f64::from(a);
            assert!(
                ratio > 1.0 && (ratio - 1.0 - 2.0 / 8_388_609.0).abs() < 1e-7,
                "lz {lz}: {ratio}"
            );
        }
        // Against the f64 formula over every bucket and the switch at t = 1/4.
        let mut worst = 0.0f64;
        for lz in 0..41u32 {
            for m in [0u64, 1, 0x1F_FFFF, 0x20_0000, 0x3F_FFFF] {
                let r = (1u64 << (63 - lz)) | (m << (41 - lz));
                let e = f64::from(exponential_of_draw((r >> 32) as u32, || r as u32));
                let t = (1.0 + (2 * m + 1) as f64 / 8_388_608.0) * 2f64.powi(-(lz as i32) - 1);
                let exact = -(-t).ln_1p();
                worst = worst.max((e - exact).abs() / exact);
            }
        }
        // The t >= 1/4 branch rounds 1 - t once and ln is within 2 ulp: a few 2^-24 in all.
        assert!(worst < 5e-7, "worst relative error {worst}");
    }

    /// Rows of `V` tokens of equal weight, drawn as the samplers draw them: how many rows' largest race key is
    /// shared by two tokens (a tie, which goes to the lower id). 24-bit uniforms tied in about 1.5% of rows at
    /// V = 2^18; the bound of the module documentation is 2^-22 per draw for weights and about 2^-20 here for
    /// logits (keys near 13 in f32). False-failure probability: P(2 or more ties in 2 x 600 rows) < 1e-6.
    #[test]
    fn flat_rows_of_262144_tokens_have_no_ties_at_the_top() {
        const V: u32 = 1 << 18;
        const ROWS: u32 = 600;
        let mut ties = 0;
        for row in 0..ROWS {
            let noise = RequestNoise {
                seed: 0x5EED ^ u64::from(row),
                step: 11,
            };
            let (mut best_weight, mut weight_count) = (f32::MIN, 0);
            let (mut best_logit, mut logit_count) = (f32::MIN, 0);
            for first in (0..V).step_by(4) {
                let high = noise.block(Domain::Token, 0, first);
                for (token, word) in (first..).zip(high) {
                    let e = noise.token_exponential_from(0, token, word);
                    let (weight_key, logit_key) = (1.0 / e, 0.0 - ln(e));
                    for (key, best, count) in [
                        (weight_key, &mut best_weight, &mut weight_count),
                        (logit_key, &mut best_logit, &mut logit_count),
                    ] {
                        if key > *best {
                            (*best, *count) = (key, 1);
                        } else if key == *best {
                            *count += 1;
                        }
                    }
                }
            }
            ties += usize::from(weight_count > 1) + usize::from(logit_count > 1);
        }
        assert!(
            ties <= 1,
            "{ties} ties at the top in {ROWS} rows of {V} tokens, twice"
        );
    }

    #[test]
    fn exponential_noise_has_mean_one_and_unit_variance() {
        let n = 1 << 20;
        let (mut sum, mut sum2) = (0.0f64, 0.0f64);
        let noise = RequestNoise { seed: 7, step: 3 };
        for token in 0..n {
            let e = f64::from(noise.token_exponential(0, token));
            // (Half of the draws are checked through the four-at-a-time form the backends use.)
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
