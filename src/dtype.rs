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
