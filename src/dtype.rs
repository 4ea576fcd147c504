//! Element types of logits and the order used by every argmax.

use half::{bf16, f16};

/// The element type of a logits tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// The short name used in kernel names and tables: `f32`, `f16`, `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A logits element type: `f32`, [`half::f16`] or [`half::bf16`].
pub trait LogitsElement: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The runtime tag of this type.
    const DTYPE: DType;

    /// A key whose unsigned order is the order specdec's argmax uses for values of this type: the numeric
    /// order, with -0.0 equal to +0.0, and every NaN above +inf (so a row holding a NaN has the index of its
    /// first NaN as argmax, as `torch.argmax` gives). The CUDA kernels compare the same way.
    fn order_key(self) -> u32;

    /// The value as `f32` (exact for every supported type).
    fn to_f32(self) -> f32;
}

/// A 16-bit float: [`half::f16`] or [`half::bf16`]; the element type of int4 GEMV activations, of weights to
/// quantize, and of int4 group scales.
pub trait HalfElement: LogitsElement {
    /// The value nearest to `x` (ties to even, one rounding); overflow gives an infinity, NaN
    /// [`Self::CONVERTED_NAN`].
    fn from_f64(x: f64) -> Self {
        Self::from_f32(f64_to_f32_round_to_odd(x))
    }
    /// The value nearest to `x` (ties to even), exactly as the GPU converts (`cvt.rn.f16.f32`,
    /// `cvt.rn.bf16.f32`): every NaN, whatever its sign and payload, becomes [`Self::CONVERTED_NAN`], so that
    /// rows the CPU and CUDA backends compute (RoPE-rotated keys, attention outputs, GEMV outputs) agree bit
    /// for bit. (`half`'s own conversion keeps the sign and payload.)
    fn from_f32(x: f32) -> Self;
    /// The bit pattern.
    fn to_bits(self) -> u16;
    /// The canonical quiet NaN of this type (`0x7E00` for fp16, `0x7FC0` for bf16), which int4 writes as the
    /// scale of a group that is not finite.
    const NAN: Self;
    /// The NaN a conversion from f32 gives: `0x7FFF` for both types, the canonical NaN of the PTX ISA's `cvt`
    /// (and of CUDA's `__float2half_rn` / `__float2bfloat16_rn` on the host).
    const CONVERTED_NAN: Self;
}

/// `x` rounded to f32 with round-to-odd: an inexact result gets its last bit set. Rounding that to a format
/// with at most 22 significant bits (fp16, bf16) then rounds `x` once, as if directly (half's own f64
/// conversions truncate, or round twice through f32).
fn f64_to_f32_round_to_odd(x: f64) -> f32 {
    let nearest = x as f32;
    if !nearest.is_finite() || f64::from(nearest) == x {
        return nearest;
    }
    let mut bits = nearest.to_bits();
    if f64::from(nearest).abs() > x.abs() {
        bits -= 1; // towards zero: the magnitude is the low 31 bits
    }
    f32::from_bits(bits | 1)
}

impl HalfElement for f16 {
    fn from_f32(x: f32) -> Self {
        if x.is_nan() {
            Self::CONVERTED_NAN
        } else {
            f16::from_f32(x)
        }
    }
    fn to_bits(self) -> u16 {
        f16::to_bits(self)
    }
    const NAN: Self = f16::from_bits(0x7E00);
    const CONVERTED_NAN: Self = f16::from_bits(0x7FFF);
}

impl HalfElement for bf16 {
    fn from_f32(x: f32) -> Self {
        if x.is_nan() {
            Self::CONVERTED_NAN
        } else {
            bf16::from_f32(x)
        }
    }
    fn to_bits(self) -> u16 {
        bf16::to_bits(self)
    }
    const NAN: Self = bf16::from_bits(0x7FC0);
    const CONVERTED_NAN: Self = bf16::from_bits(0x7FFF);
}

/// The order key of an IEEE sign-magnitude pattern: `sign_bit` is its top bit, `exponent_mask` its all-ones
/// exponent. Negative values map below positive ones, in reverse magnitude order. Written without branches
/// (selects only) so that loops over rows vectorise.
#[inline(always)]
fn sign_magnitude_key(bits: u32, sign_bit: u32, exponent_mask: u32) -> u32 {
    let magnitude = bits & !sign_bit;
    let all_bits = sign_bit | (sign_bit - 1);
    // Negative: flip every bit (reverses the magnitude order, clears the sign). Positive: set the sign bit.
    let negative = if bits & sign_bit != 0 { all_bits } else { 0 };
    let key = (bits ^ (negative | sign_bit)) & all_bits;
    let key = if magnitude == 0 { sign_bit } else { key }; // -0.0 == +0.0
    if magnitude > exponent_mask {
        u32::MAX // NaN
    } else {
        key
    }
}

impl LogitsElement for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn order_key(self) -> u32 {
        sign_magnitude_key(self.to_bits(), 0x8000_0000, 0x7F80_0000)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl LogitsElement for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn order_key(self) -> u32 {
        sign_magnitude_key(u32::from(self.to_bits()), 0x8000, 0x7C00)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl LogitsElement for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn order_key(self) -> u32 {
        sign_magnitude_key(u32::from(self.to_bits()), 0x8000, 0x7F80)
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order the keys must reproduce, written independently of the bit tricks: NaN above all, then the
    /// numeric order, with the two zeros equal.
    fn reference_cmp(a: f32, b: f32) -> std::cmp::Ordering {
        match (a.is_nan(), b.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => a.partial_cmp(&b).unwrap(),
        }
    }

    fn interesting_f32() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x8000_0001),
            f32::MAX,
            f32::MIN,
            f32::from_bits(0x7FC0_1234),
        ];
        let mut x = 0x1234_5678u32;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            v.push(f32::from_bits(x));
        }
        v
    }

    #[test]
    fn f32_keys_follow_the_documented_order() {
        let values = interesting_f32();
        for &a in &values {
            for &b in &values {
                assert_eq!(
                    a.order_key().cmp(&b.order_key()),
                    reference_cmp(a, b),
                    "{a:?} vs {b:?}"
                );
            }
        }
    }

    #[test]
    fn from_f64_rounds_once_to_nearest_even() {
        // Between two fp16 neighbours: just above the midpoint must round up even though the f32 nearest to
        // it is the midpoint itself (which a double rounding would send to even, down).
        let (lo, hi) = (1.0f64, 1.0 + 2f64.powi(-10));
        let mid = (lo + hi) / 2.0;
        assert_eq!(
            <f16 as HalfElement>::from_f64(mid + 2f64.powi(-40)).to_f64(),
            hi
        );
        assert_eq!(
            <f16 as HalfElement>::from_f64(mid - 2f64.powi(-40)).to_f64(),
            lo
        );
        assert_eq!(
            <f16 as HalfElement>::from_f64(mid).to_f64(),
            lo,
            "tie to even"
        );
        let (lo, hi) = (1.0f64, 1.0 + 2f64.powi(-7));
        let mid = (lo + hi) / 2.0;
        assert_eq!(
            <bf16 as HalfElement>::from_f64(mid + 2f64.powi(-45)).to_f64(),
            hi
        );
        assert_eq!(
            <bf16 as HalfElement>::from_f64(-mid - 2f64.powi(-45)).to_f64(),
            -hi
        );
        assert!(<f16 as HalfElement>::from_f64(1e6).to_f64().is_infinite());
        assert!(<bf16 as HalfElement>::from_f64(f64::NAN).is_nan());
        // Against an exhaustive search over the fp16 values around random doubles.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(0x3F00_0000_0000_0000 | (x >> 12))
                * if x & 1 == 0 { 1.0 } else { -1.0 };
            let got = <f16 as HalfElement>::from_f64(v);
            for neighbour in [got.to_bits().wrapping_sub(1), got.to_bits().wrapping_add(1)] {
                let n = f16::from_bits(neighbour).to_f64();
                assert!(
                    (n - v).abs() >= (got.to_f64() - v).abs(),
                    "{v} -> {got}, {n} is nearer"
                );
            }
        }
    }

    #[test]
    fn half_keys_follow_the_documented_order() {
        let values = interesting_f32();
        for &a in &values {
            for &b in &values {
                let (ha, hb) = (f16::from_f32(a), f16::from_f32(b));
                assert_eq!(
                    ha.order_key().cmp(&hb.order_key()),
                    reference_cmp(ha.to_f32(), hb.to_f32())
                );
                let (ba, bb) = (bf16::from_f32(a), bf16::from_f32(b));
                assert_eq!(
                    ba.order_key().cmp(&bb.order_key()),
                    reference_cmp(ba.to_f32(), bb.to_f32())
                );
            }
        }
    }
}
