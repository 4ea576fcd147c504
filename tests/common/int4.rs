//! Test support for the int4 primitives: random weights, an independent element-by-element reader of the
//! packed format (through `Int4Shape::locate`, the documented rule, not the library's tile walk), the f64
//! GEMV reference, and the checkpoint packers of GPTQ and AWQ written from their published layouts.

use rand::rngs::StdRng;
use rand::Rng;
use specdec::int4::Int4Shape;
use specdec::HalfElement;

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
