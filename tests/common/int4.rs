//! Test support for the int4 primitives: random weights, an independent element-by-element reader of the
//! packed format (through `Int4Shape::locate`, the documented rule, not the library's tile walk), the f64
//! GEMV reference, and the checkpoint packers of GPTQ and AWQ written from their published layouts.

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use specdec::int4::{
    quantize_value, scale_reciprocal, GemvShape, Int4Gemv, Int4Pack, Int4Quantize, Int4Shape,
    GROUP_SIZES,
};
use specdec::HalfElement;

use super::device::{Element, TestDevice};

/// `(K / g, N)` packed matrix pieces, owned.
pub struct Packed<S> {
    pub shape: Int4Shape,
    pub packed: Vec<u32>,
    pub scales: Vec<S>,
    pub zeros: Vec<u8>,
}

impl<S: HalfElement> Packed<S> {
    pub fn zeroed(shape: Int4Shape) -> Self {
        Packed {
            shape,
            packed: vec![0; shape.packed_len()],
            scales: vec![S::from_f32(0.0); shape.meta_len()],
            zeros: vec![0; shape.meta_len()],
        }
    }

    /// The 4-bit code of `W[row, col]`, read through `locate`.
    pub fn code(&self, row: usize, col: usize) -> u8 {
        let (word, shift) = self.shape.locate(row, col);
        ((self.packed[word] >> shift) & 0xF) as u8
    }

    /// `(q - z) * s` of `W[row, col]` in f64.
    pub fn weight(&self, row: usize, col: usize) -> f64 {
        let meta = self.shape.meta_index(row, col);
        (f64::from(self.code(row, col)) - f64::from(self.zeros[meta]))
            * f64::from(self.scales[meta].to_f32())
    }

    /// Every code as `q[N][K]` (row-major).
    pub fn codes(&self) -> Vec<u8> {
        let (n, k) = (self.shape.n, self.shape.k);
        (0..n * k).map(|i| self.code(i / k, i % k)).collect()
    }
}

/// Weights like a trained layer's: normal with a per-row spread, a few outliers; `exotic` adds groups that
/// are constant, all zero, tiny, or one-signed.
pub fn random_weights<T: HalfElement>(rng: &mut StdRng, shape: &Int4Shape, exotic: bool) -> Vec<T> {
    let (n, k, g) = (shape.n, shape.k, shape.group_size);
    let mut w = Vec::with_capacity(n * k);
    for _row in 0..n {
        let spread = 0.01 + rng.random::<f32>() * 0.1;
        for group in 0..k / g {
            let kind = if exotic { rng.random_range(0..8) } else { 7 };
            for _ in 0..g {
                let normal = gaussian(rng);
                let v = match kind {
                    0 => 0.0,
                    1 => 0.25,
                    2 => normal * 1e-6,
                    3 => normal.abs() * spread,
                    4 => -normal.abs() * spread,
                    _ if rng.random::<f32>() < 0.002 => normal * spread * 20.0,
                    _ => normal * spread,
                };
                w.push(T::from_f32(v));
            }
            let _ = group;
        }
    }
    w
}

pub fn gaussian(rng: &mut StdRng) -> f32 {
    let u: f32 = rng.random_range(1e-7..1.0);
    let v: f32 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Random activations in `[-2, 2]`.
pub fn random_x<T: HalfElement>(rng: &mut StdRng, len: usize) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f32(rng.random_range(-2.0..2.0)))
        .collect()
}

/// A random packed matrix: codes, zeros (0..=15) and scales drawn directly.
pub fn random_packed<S: HalfElement>(rng: &mut StdRng, shape: Int4Shape) -> Packed<S> {
    let mut p = Packed::zeroed(shape);
    for word in p.packed.iter_mut() {
        *word = rng.random();
    }
    for (s, z) in p.scales.iter_mut().zip(p.zeros.iter_mut()) {
        *s = S::from_f32(rng.random_range(0.001..0.02));
        *z = rng.random_range(0..16);
    }
    p
}

/// The f64 reference of `y[M, N] = x W^T`, with `sum |w x|` per output for tolerances.
pub fn reference_gemv<S: HalfElement, A: HalfElement>(
    p: &Packed<S>,
    x: &[A],
    m: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (n, k) = (p.shape.n, p.shape.k);
    let w: Vec<f64> = (0..n * k).map(|i| p.weight(i / k, i % k)).collect();
    let mut y = vec![0.0; m * n];
    let mut magnitude = vec![0.0; m * n];
    for i in 0..m {
        for row in 0..n {
            let (mut acc, mut mag) = (0.0, 0.0);
            for col in 0..k {
                let t = w[row * k + col] * f64::from(x[i * k + col].to_f32());
                acc += t;
                mag += t.abs();
            }
            y[i * n + row] = acc;
            magnitude[i * n + row] = mag;
        }
    }
    (y, magnitude)
}

/// One unit in the last place of `v` in the 16-bit type `A` (at least the smallest subnormal spacing).
pub fn ulp<A: HalfElement>(v: f64) -> f64 {
    let (mantissa_bits, min_exponent) = if A::DTYPE == specdec::DType::F16 {
        (10, -14)
    } else {
        (7, -126)
    };
    let exponent = if v == 0.0 {
        min_exponent
    } else {
        (v.abs().log2().floor() as i32).max(min_exponent)
    };
    2f64.powi(exponent - mantissa_bits)
}

/// Bits of precision and the smallest subnormal of a 16-bit type: its unit roundoff `u` and spacing floor.
pub fn unit_roundoff<S: HalfElement>() -> (f64, f64) {
    if S::DTYPE == specdec::DType::F16 {
        (2f64.powi(-11), 2f64.powi(-24))
    } else {
        (2f64.powi(-8), 2f64.powi(-133))
    }
}

/// GPTQ's packing (AutoGPTQ `QuantLinear.pack`): `qweight[K/8, N]` along K, `qzeros[K/g, N/8]` along N, the
/// zeros stored as `z - 1` when `minus_one`.
pub fn gptq_pack(
    q: &[u8],
    zeros: &[u8],
    shape: &Int4Shape,
    minus_one: bool,
) -> (Vec<i32>, Vec<i32>) {
    let (n, k) = (shape.n, shape.k);
    let mut qweight = vec![0u32; k / 8 * n];
    for row in 0..n {
        for col in 0..k {
            qweight[(col / 8) * n + row] |= u32::from(q[row * k + col]) << (4 * (col % 8));
        }
    }
    let groups = shape.groups_per_row();
    let mut qzeros = vec![0u32; groups * n / 8];
    for group in 0..groups {
        for row in 0..n {
            let z = u32::from(zeros[group * n + row]);
            let stored = if minus_one {
                z.wrapping_sub(1) & 0xF
            } else {
                z
            };
            qzeros[group * (n / 8) + row / 8] |= stored << (4 * (row % 8));
        }
    }
    (
        qweight.into_iter().map(|v| v as i32).collect(),
        qzeros.into_iter().map(|v| v as i32).collect(),
    )
}

/// AWQ's packing (AutoAWQ `WQLinear_GEMM.from_linear`): `qweight[K, N/8]` and `qzeros[K/g, N/8]` along N,
/// nibble `i` of a word holding column `8c + [0, 2, 4, 6, 1, 3, 5, 7][i]`.
pub fn awq_pack(q: &[u8], zeros: &[u8], shape: &Int4Shape) -> (Vec<i32>, Vec<i32>) {
    const ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];
    let (n, k) = (shape.n, shape.k);
    let pack_line = |value: &dyn Fn(usize) -> u8| -> Vec<u32> {
        (0..n / 8)
            .map(|c| {
                (0..8).fold(0u32, |word, i| {
                    word | u32::from(value(8 * c + ORDER[i])) << (4 * i)
                })
            })
            .collect()
    };
    let mut qweight = Vec::with_capacity(k * n / 8);
    for col in 0..k {
        qweight.extend(pack_line(&|row| q[row * k + col]));
    }
    let mut qzeros = Vec::new();
    for group in 0..shape.groups_per_row() {
        qzeros.extend(pack_line(&|row| zeros[group * n + row]));
    }
    (
        qweight.into_iter().map(|v| v as i32).collect(),
        qzeros.into_iter().map(|v| v as i32).collect(),
    )
}

// ---------------------------------------------------------------------------------------------------------
// The bodies run on every backend (`int4_tests!` in tests/int4_cpu.rs and tests/int4_gpu.rs): the quantizer
// against its rule written out weight by weight, NaN groups, packing with given scales, and the GEMV against
// the f64 reference. Outputs are poisoned, and on a device checked past their ends.
//
// GEMV tolerance. CPU: each weight exact in f32, its product with x and the sum in f32 fused multiply-adds
// over 32 partial sums per row (K / 32 terms each, then 5 additions), so the f32 sum is within
// (K / 32 + 5) * 2^-24 * sum_k |w_k x_k| of the exact one (the standard bound, one rounding per addition),
// stated with slack as (K / 16 + 8) * 2^-24 * sum, plus an ulp of the output for its rounding. CUDA: an ulp
// (the output's rounding, doubled for slack) + 2^-14 * sum_k |w_k x_k| (fp32 accumulation over up to 28672
// terms in tensor cores, which truncate; typical error is below 2^-20 of that sum). The CPU's sizes are
// smaller where its f64 reference would be slow.
// ---------------------------------------------------------------------------------------------------------

/// Declares one test per body, each running it on `$device` (an `Option<TestDevice>`; `None` skips).
#[macro_export]
macro_rules! int4_tests {
    ($device:expr) => {
        $crate::device_tests!($device; int4 =>
            quantizer_follows_the_rule_and_bounds_the_error,
            groups_with_nan_or_infinities_become_nan_groups_alone,
            packing_with_the_quantizers_scales_reproduces_its_codes,
            gemv_matches_the_f64_reference_for_every_group_dtype_and_m,
            gemv_handles_the_awkward_shapes,
            quantize_then_gemv_tracks_the_unquantized_product,
        );
    };
}

/// Round-to-nearest quantization of `w` on `device`, outputs poisoned first.
pub fn quantize_on<T: HalfElement + Element, S: HalfElement + Element>(
    device: &TestDevice,
    shape: Int4Shape,
    w: &[T],
) -> Packed<S> {
    let weights = device.upload(w);
    let mut packed =
        device.upload_with_spare(&vec![0xA5A5_A5A5u32; shape.packed_len()], 0xA5A5_A5A5);
    let poison = S::from_f32(-7.0);
    let mut scales = device.upload_with_spare(&vec![poison; shape.meta_len()], poison);
    let mut zeros = device.upload_with_spare(&vec![0xEEu8; shape.meta_len()], 0xEE);
    let args = Int4Quantize {
        shape,
        weights: weights.input(),
        packed: packed.output(),
        scales: scales.output(),
        zeros: zeros.output(),
    };
    device.backend.int4_quantize(device.stream(), args).unwrap();
    Packed {
        shape,
        packed: packed.download(device),
        scales: scales.download(device),
        zeros: zeros.download(device),
    }
}

/// `y = x W^T` on `device`, `y` poisoned with NaN first.
pub fn gemv_on<A: HalfElement + Element, S: HalfElement + Element>(
    device: &TestDevice,
    p: &Packed<S>,
    x: &[A],
    m: usize,
) -> Vec<A> {
    let gemv = GemvShape::new(m, p.shape).unwrap();
    let (packed, scales, zeros, xs) = (
        device.upload(&p.packed),
        device.upload(&p.scales),
        device.upload(&p.zeros),
        device.upload(x),
    );
    let mut y = device.upload_with_spare(&vec![A::NAN; m * p.shape.n], A::from_f32(-7.0));
    let args = Int4Gemv {
        shape: gemv,
        packed: packed.input(),
        scales: scales.input(),
        zeros: zeros.input(),
        x: xs.input(),
        y: y.output(),
    };
    device.backend.int4_gemv(device.stream(), args).unwrap();
    y.download(device)
}

/// The quantizer on `device` against the rule applied weight by weight, and its error bound.
fn check_quantizer<T: HalfElement + Element, S: HalfElement + Element>(
    device: &TestDevice,
    shape: Int4Shape,
    rng: &mut StdRng,
) {
    let w: Vec<T> = random_weights(rng, &shape, true);
    let p: Packed<S> = quantize_on(device, shape, &w);
    let (u, floor) = unit_roundoff::<S>();
    let (n, k, g) = (shape.n, shape.k, shape.group_size);
    for row in 0..n {
        for group in 0..k / g {
            let values: Vec<f32> = (0..g)
                .map(|i| w[row * k + group * g + i].to_f32())
                .collect();
            let meta = shape.meta_index(row, group * g);
            let (s, z) = (p.scales[meta].to_f32(), p.zeros[meta]);
            // Steps 1-3 written out again.
            let lo = values.iter().fold(0.0f32, |a, &v| a.min(v));
            let hi = values.iter().fold(0.0f32, |a, &v| a.max(v));
            let mut expected_s = S::from_f32((hi - lo) / 15.0).to_f32();
            if expected_s == 0.0 || !(1.0 / expected_s).is_finite() {
                expected_s = 1.0;
            }
            assert_eq!(
                s.to_bits(),
                expected_s.to_bits(),
                "scale of row {row} group {group}"
            );
            let r = scale_reciprocal(s).unwrap();
            assert_eq!(
                f32::from(z),
                (-lo * r).round_ties_even().clamp(0.0, 15.0),
                "zero of row {row} group {group}"
            );
            for (i, &v) in values.iter().enumerate() {
                let col = group * g + i;
                let q = p.code(row, col);
                assert_eq!(q, quantize_value(v, r, z), "code of ({row}, {col})");
                assert_eq!(
                    f32::from(q),
                    ((v * r).round_ties_even() + f32::from(z)).clamp(0.0, 15.0),
                    "code of ({row}, {col}) against the clamp written out"
                );
                // |w - (q - z) s| <= s / 2 + 15.5 * (rounding error of s), derived in docs/int4-format.md.
                let error = (f64::from(v) - p.weight(row, col)).abs();
                let bound = 0.5 * f64::from(s)
                    + 16.0 * (u * f64::from(s)).max(floor)
                    + 1e-6 * f64::from(v).abs();
                let bound = if s == 1.0 {
                    bound.max(15.0 * 1e-4)
                } else {
                    bound
                };
                assert!(
                    error <= bound,
                    "({row}, {col}): w {v}, dequantized {}, s {s}: error {error} > {bound}",
                    p.weight(row, col)
                );
            }
        }
    }
}

pub fn quantizer_follows_the_rule_and_bounds_the_error(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} quantizer rule", device.name()));
    for g in GROUP_SIZES {
        for (n, k) in [(16, 128), (48, 256), (32, 4224)] {
            let shape = Int4Shape::new(n, k, g).unwrap();
            check_quantizer::<f16, f16>(device, shape, &mut rng);
            check_quantizer::<bf16, bf16>(device, shape, &mut rng);
            check_quantizer::<bf16, f16>(device, shape, &mut rng);
            check_quantizer::<f16, bf16>(device, shape, &mut rng);
        }
    }
}

pub fn groups_with_nan_or_infinities_become_nan_groups_alone(device: &TestDevice) {
    let shape = Int4Shape::new(16, 128, 32).unwrap();
    let mut rng = super::rng(&format!("{} NaN groups", device.name()));
    let mut w: Vec<bf16> = random_weights(&mut rng, &shape, false);
    w[3 * 128 + 40] = bf16::NAN; // row 3, group 1
    w[5 * 128 + 100] = bf16::INFINITY; // row 5, group 3
    w[7 * 128] = bf16::from_f32(-1e30); // row 7, group 0: finite, but its scale overflows fp16
    let p: Packed<f16> = quantize_on(device, shape, &w);
    let clean: Packed<f16> = quantize_on(
        device,
        shape,
        &random_weights::<bf16>(&mut rng, &shape, false),
    );
    for (row, group) in [(3, 1), (5, 3), (7, 0)] {
        let meta = group * 16 + row;
        assert_eq!(p.scales[meta].to_bits(), 0x7E00, "row {row} group {group}");
        assert_eq!(p.zeros[meta], 0);
        assert!((0..32).all(|i| p.code(row, group * 32 + i) == 0));
    }
    assert_eq!(p.scales.iter().filter(|s| s.is_nan()).count(), 3);
    assert!(clean.scales.iter().all(|s| s.to_f32().is_finite()));
    // Their rows of a GEMV are NaN, the others finite.
    let y = gemv_on(device, &p, &[bf16::from_f32(1.0); 128], 1);
    for (row, v) in y.iter().enumerate() {
        assert_eq!(v.is_nan(), [3, 5, 7].contains(&row), "row {row}: {v}");
    }
}

pub fn packing_with_the_quantizers_scales_reproduces_its_codes(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} packing", device.name()));
    for g in GROUP_SIZES {
        let shape = Int4Shape::new(32, 256, g).unwrap();
        let w: Vec<f16> = random_weights(&mut rng, &shape, true);
        let p: Packed<f16> = quantize_on(device, shape, &w);
        let (weights, scales, zeros) = (
            device.upload(&w),
            device.upload(&p.scales),
            device.upload(&p.zeros),
        );
        let mut packed =
            device.upload_with_spare(&vec![0xDEAD_BEEFu32; shape.packed_len()], 0xDEAD_BEEF);
        let args = Int4Pack {
            shape,
            weights: weights.input(),
            scales: scales.input(),
            zeros: zeros.input(),
            packed: packed.output(),
        };
        device.backend.int4_pack(device.stream(), args).unwrap();
        assert_eq!(packed.download(device), p.packed, "group size {g}");
    }
}

/// The GEMV on `device` against the f64 reference, with the device's tolerance (module comment above).
fn check_gemv<A: HalfElement + Element, S: HalfElement + Element>(
    device: &TestDevice,
    rng: &mut StdRng,
    shape: Int4Shape,
    m: usize,
) {
    let p: Packed<S> = random_packed(rng, shape);
    let x: Vec<A> = random_x(rng, m * shape.k);
    let got = gemv_on(device, &p, &x, m);
    let (reference, magnitude) = reference_gemv(&p, &x, m);
    for (i, (&got, &want)) in got.iter().zip(&reference).enumerate() {
        let got = f64::from(got.to_f32());
        let tolerance = if device.is_cpu() {
            ulp::<A>(want) + (shape.k / 16 + 8) as f64 * 2f64.powi(-24) * magnitude[i]
        } else {
            ulp::<A>(want) + 2f64.powi(-14) * magnitude[i]
        };
        assert!(
            (got - want).abs() <= tolerance,
            "{shape:?} m {m} {:?}/{:?}: y[{}, {}] = {got}, reference {want} (tolerance {tolerance})",
            A::DTYPE,
            S::DTYPE,
            i / shape.n,
            i % shape.n
        );
    }
}

pub fn gemv_matches_the_f64_reference_for_every_group_dtype_and_m(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} GEMV reference", device.name()));
    let (n, k) = if device.is_cpu() {
        (32, 256)
    } else {
        (4096 + 128, 1024)
    };
    for g in GROUP_SIZES {
        let shape = Int4Shape::new(n, k, g).unwrap();
        for m in 1..=16 {
            check_gemv::<bf16, bf16>(device, &mut rng, shape, m);
            check_gemv::<f16, f16>(device, &mut rng, shape, m);
        }
        for m in [1, 8, 9, 16] {
            check_gemv::<bf16, f16>(device, &mut rng, shape, m);
            check_gemv::<f16, bf16>(device, &mut rng, shape, m);
        }
    }
}

pub fn gemv_handles_the_awkward_shapes(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} GEMV awkward shapes", device.name()));
    // The smallest allowed; 4096 + 128; 11008, 14336, 28672 as N and as K; on CUDA, N giving 1, 2 and 4 row
    // tiles per block, and N small enough that K is split across blocks (a K/V projection of an 8B model: 64
    // row blocks, K split 5 ways on 132 SMs and summed after). The CPU keeps the other side small.
    let shapes: &[(usize, usize, usize)] = if device.is_cpu() {
        &[
            (16, 64, 32),
            (16, 64, 64),
            (16, 128, 128),
            (4224, 64, 64),
            (16, 4224, 128),
            (11008, 64, 32),
            (16, 11008, 64),
            (16, 14336, 128),
            (14336, 128, 128),
            (32, 28672, 128),
        ]
    } else {
        &[
            (16, 64, 32),
            (16, 64, 64),
            (16, 128, 128),
            (4224, 4224, 128),
            (11008, 4096, 128),
            (4096, 11008, 64),
            (14336, 4096, 32),
            (4096, 14336, 128),
            (28672, 512, 128),
            (512, 28672, 128),
            (1024, 4096, 32),
        ]
    };
    for &(n, k, g) in shapes {
        let shape = Int4Shape::new(n, k, g).unwrap();
        for m in [1, 7, 16] {
            check_gemv::<bf16, bf16>(device, &mut rng, shape, m);
        }
        check_gemv::<f16, f16>(device, &mut rng, shape, 3);
    }
}

/// The drafter's path end to end: bf16 weights requantized, then multiplied. The result must be within the
/// quantization error bound of x W^T computed from the original weights.
pub fn quantize_then_gemv_tracks_the_unquantized_product(device: &TestDevice) {
    let mut rng = super::rng(&format!("{} quantize then GEMV", device.name()));
    let (n, k) = if device.is_cpu() {
        (256, 512)
    } else {
        (1024, 2048)
    };
    let shape = Int4Shape::new(n, k, 128).unwrap();
    let w: Vec<bf16> = random_weights(&mut rng, &shape, false);
    let p: Packed<bf16> = quantize_on(device, shape, &w);
    let x: Vec<bf16> = random_x(&mut rng, 4 * shape.k);
    let y = gemv_on(device, &p, &x, 4);
    let (_, magnitude) = reference_gemv(&p, &x, 4);
    for i in 0..4 {
        for row in 0..shape.n {
            let (mut exact, mut bound) = (0.0f64, 0.0f64);
            for col in 0..shape.k {
                let xv = f64::from(x[i * shape.k + col].to_f32());
                exact += f64::from(w[row * shape.k + col].to_f32()) * xv;
                let s = f64::from(p.scales[shape.meta_index(row, col)].to_f32());
                bound += 0.57 * s * xv.abs(); // s / 2 plus 16 roundings of a bf16 scale (2^-8 each)
            }
            let q = f64::from(y[i * shape.n + row].to_f32());
            // The GEMV's own error on top (the CUDA tolerance of the module comment, which covers the CPU's).
            let bound = bound + ulp::<bf16>(q) + 2f64.powi(-14) * magnitude[i * shape.n + row];
            assert!(
                (q - exact).abs() <= bound,
                "row {row}: quantized product {q}, exact {exact}, bound {bound}"
            );
        }
    }
}
