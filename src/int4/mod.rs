//! int4 weights (W4A16) for a quantized self-drafter: the packed format, the round-to-nearest quantizer's
//! rule, converters from GPTQ and AWQ checkpoints ([`convert`]), and the shape rules of the GEMV
//! `y[M, N] = x[M, K] W^T`.
//!
//! The byte-exact specification is `docs/int4-format.md`; this is its summary.
//!
//! # The format
//!
//! A weight matrix `W[N, K]` (N output features, K input features, row-major as in a PyTorch `Linear`) is
//! cut into groups of `group_size` (32, 64 or 128) consecutive columns of one row. Group `(n, j)` has a scale
//! `s` (fp16 or bf16) and an integer zero point `z` in `0..=15`, and every weight of it a 4-bit code `q`; the
//! weight it stands for is `(q - z) * s`, which fp32 represents exactly unless a bf16 scale above `2^128 / 15`
//! (about 2.27e37) pushes it past fp32's range (`docs/int4-format.md`).
//!
//! * `scales[K / group_size, N]` and `zeros[K / group_size, N]` (one byte each, high four bits 0): row-major,
//!   element `j * N + n` for group `j` of row `n`, the orientation GPTQ and AWQ checkpoints use.
//! * `packed[N * K / 8]`: little-endian 32-bit words holding the codes, in **tiles** of 16 rows x 64 columns
//!   (512 bytes), row tiles outermost: tile `(t_n, t_k)` starts at word `(t_n * K / 64 + t_k) * 128`. Inside a
//!   tile, 32 **lanes** of 16 bytes (4 words): lane `l` holds rows `r = l / 4` and `r + 8` of the tile, and
//!   columns `8 * (l % 4) .. + 8` of each half (`0..32`, `32..64`) of the tile. Word `w` of a lane holds the
//!   two rows at four consecutive columns `c = 32 * (w / 2) + 8 * (l % 4) + 4 * (w % 2) + d`, `d = 0..4`: the
//!   code of row `r + 8 * rho` at column offset `d` is nibble `4 * (d % 2) + 2 * (d / 2) + rho` (bits
//!   `4 * nibble ..`). [`Int4Shape::locate`] computes this.
//!
//! Why this layout: one 16-byte load per lane gives a warp 512 contiguous bytes, and each 32-bit word is,
//! after two logic operations per pair of codes (`(word >> 4i) & 0x000F000F | magic`), exactly a lane's
//! A-operand registers of a tensor-core `m16n8k16` MMA (weights as the M side, activations as the N side),
//! with the activations of a lane 8 consecutive columns (one 16-byte load). The two halves of a tile fall in
//! one group each, so scales can be applied per group in fp32 after the MMA (the integers `q - z` are exact in
//! fp16 and bf16): the GEMV's only rounding is fp32 accumulation and the final conversion.
//!
//! Shape rules: `N` a multiple of 16, `K` a multiple of 64 and of `group_size`. Anything else is rejected with
//! an error naming the rule ([`Int4Shape::new`]).
//!
//! # The quantizer's rule (round to nearest, asymmetric, as GPTQ's RTN baseline)
//!
//! In f32 with every operation correctly rounded (no fused multiply-add), for each group of weights `w_i`
//! (fp16 or bf16, so exact in f32), by [`group_parameters`] and [`quantize_value`]:
//!
//! 1. `lo = min(0, min w_i)`, `hi = max(0, max w_i)`; the group always spans zero, so 0 is represented
//!    exactly.
//! 2. `s = to_scale_dtype((hi - lo) / 15)`, rounded to nearest even. If `s` is 0, or its reciprocal
//!    overflows f32, `s = 1` (the group is all zeros, or too small to tell from zero).
//! 3. `r = 1 / s`, `z = clamp(round_half_even(-lo * r), 0, 15)`.
//! 4. `q_i = clamp(round_half_even(w_i * r) + z, 0, 15)`, where the clamp sends NaN to 0.
//!
//! A group holding a NaN or an infinity, or whose `s` overflows the scale dtype, is a **NaN group**: scale NaN
//! (`0x7E00` / `0x7FC0`), zero 0, every code 0; its row of a GEMV is NaN, so a diverged weight update is
//! visible rather than silently clipped. Packing with given scales and zeros (GPTQ, AWQ) runs steps 3-4 with
//! them. The CPU and CUDA quantizers produce the same bytes.

pub mod convert;

use crate::backend::{Backend, In, Out, Stream};
use crate::dtype::HalfElement;
use crate::error::{check_len, Error, Result};

/// The group sizes the format supports.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];
/// Rows of a tile: `N` must be a multiple of it.
pub const TILE_ROWS: usize = 16;
/// Columns of a tile: `K` must be a multiple of it.
pub const TILE_COLS: usize = 64;
/// 32-bit words in a tile (512 bytes).
pub const TILE_WORDS: usize = TILE_ROWS * TILE_COLS / 8;
/// The most activation rows (`M`) one GEMV call takes.
pub const MAX_GEMV_ROWS: usize = 16;

/// The validated sizes of an int4 weight matrix `W[N, K]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Int4Shape {
    /// `N`, output features (rows of `W`).
    pub n: usize,
    /// `K`, input features (columns of `W`).
    pub k: usize,
    /// Columns per group: 32, 64 or 128.
    pub group_size: usize,
}

impl Int4Shape {
    /// The shape re-checked by the rules of [`Int4Shape::new`]: its fields are public, so a shape built field
    /// by field reaches a backend only through this.
    pub fn checked(&self) -> Result<Self> {
        Int4Shape::new(self.n, self.k, self.group_size)
    }

    /// Checks the format's shape rules: `group_size` in [`GROUP_SIZES`], `n` a positive multiple of 16, `k` a
    /// positive multiple of 64 and of `group_size`, and every array size addressable by 32-bit element indices
    /// on the device (`n * k < 2^31 * 8`).
    pub fn new(n: usize, k: usize, group_size: usize) -> Result<Self> {
        if !GROUP_SIZES.contains(&group_size) {
            return Err(Error::invalid(
                "group_size",
                format!("is {group_size}; the int4 format has groups of 32, 64 or 128 columns"),
            ));
        }
        if n == 0 || !n.is_multiple_of(TILE_ROWS) {
            return Err(Error::invalid(
                "n",
                format!("is {n}; the int4 format needs a positive multiple of {TILE_ROWS} rows (pad the matrix)"),
            ));
        }
        if k == 0 || !k.is_multiple_of(TILE_COLS) || !k.is_multiple_of(group_size) {
            return Err(Error::invalid(
                "k",
                format!(
                    "is {k}; the int4 format needs a positive multiple of {TILE_COLS} columns and of the group \
                     size {group_size}"
                ),
            ));
        }
        if n.checked_mul(k).is_none_or(|e| e / 8 > i32::MAX as usize) {
            return Err(Error::invalid(
                "n",
                format!("{n} x {k} weights exceed the 2^34 the int4 kernels index"),
            ));
        }
        Ok(Int4Shape { n, k, group_size })
    }

    /// `N * K`: the weights.
    pub fn weights_len(&self) -> usize {
        self.n * self.k
    }

    /// `N * K / 8`: the 32-bit words of `packed`.
    pub fn packed_len(&self) -> usize {
        self.n * self.k / 8
    }

    /// `K / group_size`: groups per row.
    pub fn groups_per_row(&self) -> usize {
        self.k / self.group_size
    }

    /// `N * K / group_size`: the elements of `scales` and of `zeros`.
    pub fn meta_len(&self) -> usize {
        self.n * self.groups_per_row()
    }

    /// Where the code of `W[row, col]` lives: `(word index into packed, bit shift)`; the code is
    /// `(packed[word] >> shift) & 0xF`.
    pub fn locate(&self, row: usize, col: usize) -> (usize, u32) {
        let tile = (row / TILE_ROWS) * (self.k / TILE_COLS) + col / TILE_COLS;
        let (word, nibble) = locate_in_tile(row % TILE_ROWS, col % TILE_COLS);
        (tile * TILE_WORDS + word, 4 * nibble)
    }

    /// The index into `scales` and `zeros` of the group holding `W[row, col]`.
    pub fn meta_index(&self, row: usize, col: usize) -> usize {
        (col / self.group_size) * self.n + row
    }

    /// Checks the lengths of a packed matrix's three arrays.
    pub fn check_packed_lengths(&self, packed: usize, scales: usize, zeros: usize) -> Result<()> {
        check_len("packed", packed, self.packed_len())?;
        check_len("scales", scales, self.meta_len())?;
        check_len("zeros", zeros, self.meta_len())
    }
}

/// `(word in tile, nibble in word)` of the code at `(row, col)` of a tile (row < 16, col < 64).
const fn locate_in_tile(row: usize, col: usize) -> (usize, u32) {
    let (r, rho) = (row % 8, row / 8);
    let (half, within) = (col / 32, col % 32);
    let lane = 4 * r + within / 8;
    let word = 2 * half + (within % 8) / 4;
    let d = within % 4;
    (4 * lane + word, (4 * (d % 2) + 2 * (d / 2) + rho) as u32)
}

/// For each of a tile's 1024 codes, in storage order (word, then nibble), its `(row, col)` in the tile: the
/// inverse of [`Int4Shape::locate`] within a tile, for walking packed data in order.
pub(crate) const TILE_POSITIONS: [(u8, u8); TILE_WORDS * 8] = {
    let mut map = [(0u8, 0u8); TILE_WORDS * 8];
    let mut row = 0;
    while row < TILE_ROWS {
        let mut col = 0;
        while col < TILE_COLS {
            let (word, nibble) = locate_in_tile(row, col);
            map[word * 8 + nibble as usize] = (row as u8, col as u8);
            col += 1;
        }
        row += 1;
    }
    map
};

/// The validated sizes of a GEMV `y[M, N] = x[M, K] W^T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemvShape {
    /// `M`, the activation rows: 1 to [`MAX_GEMV_ROWS`].
    pub m: usize,
    /// The weight matrix.
    pub weights: Int4Shape,
}

impl GemvShape {
    /// The shape re-checked by the rules of [`GemvShape::new`] and [`Int4Shape::new`].
    pub fn checked(&self) -> Result<Self> {
        GemvShape::new(self.m, self.weights.checked()?)
    }

    /// Checks `m` (1 to 16) and the weight shape.
    pub fn new(m: usize, weights: Int4Shape) -> Result<Self> {
        if m == 0 || m > MAX_GEMV_ROWS {
            return Err(Error::invalid(
                "m",
                format!("is {m}; the int4 GEMV takes 1 to {MAX_GEMV_ROWS} activation rows"),
            ));
        }
        Ok(GemvShape { m, weights })
    }

    /// `M * K`: the activations.
    pub fn x_len(&self) -> usize {
        self.m * self.weights.k
    }

    /// `M * N`: the outputs.
    pub fn y_len(&self) -> usize {
        self.m * self.weights.n
    }
}

/// A round-to-nearest quantization of `weights[N, K]` (row-major) into the packed format, in the memory of the
/// [`Backend`] it runs on. Every input is accepted: groups holding NaN or infinities become NaN groups. The CPU
/// and CUDA backends write the same bytes. On CUDA, `weights` and `packed` must be 16-byte aligned.
pub struct Int4Quantize<'a, T, S> {
    /// The weight matrix's shape.
    pub shape: Int4Shape,
    /// `[N * K]`, fp16 or bf16.
    pub weights: In<'a, T>,
    /// `[N * K / 8]`: the codes, in the tiled layout.
    pub packed: Out<'a, u32>,
    /// `[K / group_size * N]`, fp16 or bf16.
    pub scales: Out<'a, S>,
    /// `[K / group_size * N]`, each `0..=15`.
    pub zeros: Out<'a, u8>,
}

/// Packing of `weights[N, K]` with given `scales` and `zeros` (a GPTQ or AWQ checkpoint's): codes
/// `clamp(round(w / s) + z, 0, 15)` by the quantizer's steps 3-4. The CPU backend refuses an unusable scale
/// (not positive and finite, or with an infinite reciprocal) or a zero above 15, naming the element; the CUDA
/// backend, which cannot report without synchronising, gives such a group codes 0 and reads zeros' low 4 bits.
pub struct Int4Pack<'a, T, S> {
    /// The weight matrix's shape.
    pub shape: Int4Shape,
    /// `[N * K]`, fp16 or bf16.
    pub weights: In<'a, T>,
    /// `[K / group_size * N]`, fp16 or bf16.
    pub scales: In<'a, S>,
    /// `[K / group_size * N]`.
    pub zeros: In<'a, u8>,
    /// `[N * K / 8]`.
    pub packed: Out<'a, u32>,
}

/// The GEMV `y[M, N] = x[M, K] W^T` for an int4 `W`, fp32 accumulation, `y` rounded to the activation type
/// (`docs/int4-format.md`, "GEMV semantics", states each backend's order and error bound; with a bf16 scale
/// above `2^128 / 15`, where `(q - z) * s` itself may leave f32's range, an output may be infinite or NaN where
/// the exact sum is finite; likewise where partial sums of products leave f32's range, which needs activations
/// or scales within a few binades of f32's maximum). The CPU backend refuses a zero above 15; the CUDA backend
/// reads zeros' low 4 bits. On CUDA, `packed` and `x` must be 16-byte aligned.
pub struct Int4Gemv<'a, A, S> {
    /// `M` and the weight matrix's shape.
    pub shape: GemvShape,
    /// `[N * K / 8]`.
    pub packed: In<'a, u32>,
    /// `[K / group_size * N]`, fp16 or bf16.
    pub scales: In<'a, S>,
    /// `[K / group_size * N]`.
    pub zeros: In<'a, u8>,
    /// `[M, K]`, fp16 or bf16.
    pub x: In<'a, A>,
    /// `[M, N]`, of `x`'s type.
    pub y: Out<'a, A>,
}

impl Backend {
    /// Round-to-nearest int4 quantization ([`Int4Quantize`]; the rule in the [module documentation](self)).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming a length, an array in the wrong memory or a null or misaligned device
    /// pointer; CUDA errors from the launch.
    pub fn int4_quantize<T: HalfElement, S: HalfElement>(
        &self,
        stream: Stream<'_>,
        args: Int4Quantize<'_, T, S>,
    ) -> Result<()> {
        let shape = args.shape.checked()?;
        check_len("weights", args.weights.len(), shape.weights_len())?;
        shape.check_packed_lengths(args.packed.len(), args.scales.len(), args.zeros.len())?;
        match self {
            Backend::Cpu => {
                let _ = stream;
                crate::cpu::int4::quantize(
                    &shape,
                    args.weights.host("weights")?,
                    args.packed.host("packed")?,
                    args.scales.host("scales")?,
                    args.zeros.host("zeros")?,
                );
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => {
                let ptrs = crate::cuda::int4::QuantizeDevicePtrs {
                    weights: args.weights.device("weights")?,
                    given_scales: 0,
                    given_zeros: 0,
                    packed: args.packed.device("packed")?,
                    scales: args.scales.device("scales")?,
                    zeros: args.zeros.device("zeros")?,
                };
                ptrs.check(&shape, false)?;
                let stream = Backend::cu_stream(cuda, stream)?;
                cuda.launch_int4_quantize(stream, &shape, T::DTYPE, S::DTYPE, &ptrs)
            }
        }
    }

    /// Packing with given scales and zeros ([`Int4Pack`]).
    ///
    /// # Errors
    /// As [`Backend::int4_quantize`]; on the CPU, an unusable scale or a zero above 15, naming the element.
    pub fn int4_pack<T: HalfElement, S: HalfElement>(
        &self,
        stream: Stream<'_>,
        args: Int4Pack<'_, T, S>,
    ) -> Result<()> {
        let shape = args.shape.checked()?;
        check_len("weights", args.weights.len(), shape.weights_len())?;
        shape.check_packed_lengths(args.packed.len(), args.scales.len(), args.zeros.len())?;
        match self {
            Backend::Cpu => {
                let _ = stream;
                crate::cpu::int4::pack(
                    &shape,
                    args.weights.host("weights")?,
                    args.scales.host("scales")?,
                    args.zeros.host("zeros")?,
                    args.packed.host("packed")?,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => {
                let ptrs = crate::cuda::int4::QuantizeDevicePtrs {
                    weights: args.weights.device("weights")?,
                    given_scales: args.scales.device("scales")?,
                    given_zeros: args.zeros.device("zeros")?,
                    packed: args.packed.device("packed")?,
                    scales: 0,
                    zeros: 0,
                };
                ptrs.check(&shape, true)?;
                let stream = Backend::cu_stream(cuda, stream)?;
                cuda.launch_int4_quantize(stream, &shape, T::DTYPE, S::DTYPE, &ptrs)
            }
        }
    }

    /// The int4 GEMV ([`Int4Gemv`]).
    ///
    /// # Errors
    /// As [`Backend::int4_quantize`]; on the CPU, a zero above 15, naming the element.
    pub fn int4_gemv<A: HalfElement, S: HalfElement>(
        &self,
        stream: Stream<'_>,
        args: Int4Gemv<'_, A, S>,
    ) -> Result<()> {
        let shape = args.shape.checked()?;
        shape.weights.check_packed_lengths(
            args.packed.len(),
            args.scales.len(),
            args.zeros.len(),
        )?;
        check_len("x", args.x.len(), shape.x_len())?;
        check_len("y", args.y.len(), shape.y_len())?;
        match self {
            Backend::Cpu => {
                let _ = stream;
                crate::cpu::int4::gemv(
                    &shape,
                    args.packed.host("packed")?,
                    args.scales.host("scales")?,
                    args.zeros.host("zeros")?,
                    args.x.host("x")?,
                    args.y.host("y")?,
                )
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(cuda) => {
                let ptrs = crate::cuda::int4::GemvDevicePtrs {
                    packed: args.packed.device("packed")?,
                    scales: args.scales.device("scales")?,
                    zeros: args.zeros.device("zeros")?,
                    x: args.x.device("x")?,
                    y: args.y.device("y")?,
                };
                ptrs.check(&shape)?;
                let stream = Backend::cu_stream(cuda, stream)?;
                cuda.launch_int4_gemv(stream, &shape, A::DTYPE, S::DTYPE, &ptrs)
            }
        }
    }
}

/// The scale and zero of a group (steps 1-3 of the rule in the module documentation), from the group's
/// minimum and maximum (`lo`, `hi` already include 0) and whether all its values are finite. Returns
/// `(scale, zero)`; a NaN group gets `(NaN, 0)`.
pub fn group_parameters<S: HalfElement>(lo: f32, hi: f32, all_finite: bool) -> (S, u8) {
    let scale = S::from_f32((hi - lo) / 15.0);
    if !all_finite || !scale.to_f32().is_finite() {
        return (S::NAN, 0);
    }
    let scale = if scale_reciprocal(scale.to_f32()).is_none() {
        S::from_f32(1.0)
    } else {
        scale
    };
    let r = 1.0 / scale.to_f32();
    (scale, clamp_code((-lo * r).round_ties_even(), 0))
}

/// `1 / scale` if `scale` is a usable scale: positive, finite, with a finite reciprocal.
pub fn scale_reciprocal(scale: f32) -> Option<f32> {
    let r = 1.0 / scale;
    (scale > 0.0 && scale.is_finite() && r.is_finite()).then_some(r)
}

/// The code of weight `w` in a group with scale reciprocal `r` and zero `z` (step 4):
/// `clamp(round_half_even(w * r) + z, 0, 15)`, NaN to 0.
pub fn quantize_value(w: f32, r: f32, z: u8) -> u8 {
    clamp_code((w * r).round_ties_even(), z)
}

/// `clamp(v + z, 0, 15)` in f32, NaN to 0; written as the CUDA quantizer writes it.
fn clamp_code(v: f32, z: u8) -> u8 {
    let v = v + f32::from(z);
    if v >= 15.0 {
        15
    } else if v >= 0.0 {
        v as u8
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_is_a_bijection_onto_every_nibble() {
        for (n, k) in [(16, 64), (32, 128), (48, 192)] {
            let shape = Int4Shape::new(n, k, 32).unwrap();
            let mut seen = vec![false; shape.packed_len() * 8];
            for row in 0..n {
                for col in 0..k {
                    let (word, shift) = shape.locate(row, col);
                    assert_eq!(shift % 4, 0);
                    let slot = word * 8 + shift as usize / 4;
                    assert!(!seen[slot], "({row}, {col}) shares a nibble");
                    seen[slot] = true;
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }

    #[test]
    fn tile_layout_matches_the_documented_lane_rule() {
        // Lane l, word w holds rows l/4 and l/4 + 8 at columns 32(w/2) + 8(l%4) + 4(w%2) + d.
        for lane in 0..32 {
            for word in 0..4 {
                for d in 0..4 {
                    for rho in 0..2 {
                        let (row, col) = (
                            lane / 4 + 8 * rho,
                            32 * (word / 2) + 8 * (lane % 4) + 4 * (word % 2) + d,
                        );
                        let nibble = 4 * (d % 2) + 2 * (d / 2) + rho;
                        assert_eq!(
                            TILE_POSITIONS[(4 * lane + word) * 8 + nibble],
                            (row as u8, col as u8)
                        );
                    }
                }
            }
        }
        // Whole tiles, row tiles outermost.
        let shape = Int4Shape::new(32, 128, 64).unwrap();
        assert_eq!(shape.locate(0, 64).0, TILE_WORDS);
        assert_eq!(shape.locate(16, 0).0, 2 * TILE_WORDS);
        assert_eq!(shape.meta_index(5, 70), 32 + 5);
    }

    #[test]
    fn shapes_outside_the_format_are_rejected_naming_the_rule() {
        let name = |r: Result<Int4Shape>| match r {
            Err(Error::InvalidArgument { argument, .. }) => argument,
            other => panic!("{other:?}"),
        };
        assert_eq!(name(Int4Shape::new(16, 64, 16)), "group_size");
        assert_eq!(name(Int4Shape::new(16, 64, 256)), "group_size");
        assert_eq!(name(Int4Shape::new(0, 64, 32)), "n");
        assert_eq!(name(Int4Shape::new(24, 64, 32)), "n");
        assert_eq!(name(Int4Shape::new(16, 0, 32)), "k");
        assert_eq!(name(Int4Shape::new(16, 96, 32)), "k");
        assert_eq!(name(Int4Shape::new(16, 64, 128)), "k");
        assert_eq!(name(Int4Shape::new(1 << 20, 1 << 20, 128)), "n");
        for (n, k, g) in [
            (16, 64, 32),
            (16, 64, 64),
            (16, 128, 128),
            (4224, 4224, 128),
            (11008, 4096, 64),
        ] {
            Int4Shape::new(n, k, g).unwrap();
        }
        let w = Int4Shape::new(16, 64, 32).unwrap();
        assert!(GemvShape::new(0, w).is_err());
        assert!(GemvShape::new(17, w).is_err());
        assert!(GemvShape::new(16, w).is_ok());
    }

    #[test]
    fn rounding_rule_edge_cases() {
        use half::{bf16, f16};
        // A group spanning [-1, 2]: s = 3/15 = 0.2 (fp16 0.19995117), z = round(1 / s) = 5.
        let (s, z) = group_parameters::<f16>(-1.0, 2.0, true);
        assert_eq!(s, f16::from_f32(0.2));
        assert_eq!(z, 5);
        let r = 1.0 / s.to_f32();
        assert_eq!(quantize_value(0.0, r, z), 5, "zero is exact");
        assert_eq!(quantize_value(-1.0, r, z), 0);
        assert_eq!(quantize_value(2.0, r, z), 15);
        assert_eq!(quantize_value(100.0, r, z), 15);
        assert_eq!(quantize_value(f32::NAN, r, z), 0);
        // Ties go to even: 0.5 -> 0, 1.5 -> 2, -0.5 -> -0 (0), -1.5 -> -2.
        assert_eq!(quantize_value(0.5, 1.0, 4), 4);
        assert_eq!(quantize_value(1.5, 1.0, 4), 6);
        assert_eq!(quantize_value(-0.5, 1.0, 4), 4);
        assert_eq!(quantize_value(-1.5, 1.0, 4), 2);
        // All zeros: scale 1, zero 0.
        assert_eq!(
            group_parameters::<bf16>(0.0, 0.0, true),
            (bf16::from_f32(1.0), 0)
        );
        // Too small for the scale dtype: fp16 underflows to 0 -> scale 1.
        assert_eq!(
            group_parameters::<f16>(-1e-9, 1e-9, true).0,
            f16::from_f32(1.0)
        );
        // bf16 scale whose reciprocal overflows f32 -> scale 1.
        assert_eq!(
            group_parameters::<bf16>(0.0, 1e-38, true).0,
            bf16::from_f32(1.0)
        );
        // NaN groups: a non-finite value, or a scale overflowing the dtype.
        assert!(group_parameters::<f16>(-1.0, 1.0, false).0.is_nan());
        // (bf16 weights with fp16 scales: 2e6 / 15 overflows fp16, not bf16.)
        assert!(group_parameters::<f16>(-1e6, 1e6, true).0.is_nan());
        assert_eq!(group_parameters::<f16>(-1e6, 1e6, true).1, 0);
        assert!(group_parameters::<bf16>(-1e6, 1e6, true)
            .0
            .to_f32()
            .is_finite());
        assert!(group_parameters::<f16>(-60000.0, 60000.0, true)
            .0
            .to_f32()
            .is_finite());
    }
}
