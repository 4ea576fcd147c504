//! The int4 format, quantizer, converters and GEMV on the CPU backend, against independent references: codes
//! read one by one through `Int4Shape::locate` (the documented rule), the rounding rule applied weight by
//! weight, GEMV sums in f64, and the GPTQ and AWQ checkpoint packers written from their published layouts.
//! Fresh random data every run (seed printed).

mod common;

use common::int4::{
    awq_pack, gptq_pack, random_packed, random_weights, random_x, reference_gemv, ulp,
    unit_roundoff, Packed,
};
use common::rng;
use half::{bf16, f16};
use specdec::cpu;
use specdec::int4::convert::{from_awq, from_gptq, GptqZeros};
use specdec::int4::{quantize_value, scale_reciprocal, GemvShape, Int4Shape, GROUP_SIZES};
use specdec::{Error, HalfElement};

fn argument_of<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::InvalidArgument { argument, .. }) => argument,
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

fn quantize<T: HalfElement, S: HalfElement>(shape: Int4Shape, w: &[T]) -> Packed<S> {
    let mut p = Packed::zeroed(shape);
    cpu::int4_quantize(&shape, w, &mut p.packed, &mut p.scales, &mut p.zeros).unwrap();
    p
}

/// The quantizer against the rule applied weight by weight, and its error bound.
fn check_quantizer<T: HalfElement, S: HalfElement>(
    shape: Int4Shape,
    seed_rng: &mut rand::rngs::StdRng,
) {
    let w: Vec<T> = random_weights(seed_rng, &shape, true);
    let p: Packed<S> = quantize(shape, &w);
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

#[test]
fn quantizer_follows_the_rule_and_bounds_the_error() {
    let mut rng = rng("quantizer_follows_the_rule_and_bounds_the_error");
    for g in GROUP_SIZES {
        for (n, k) in [(16, 128), (48, 256), (32, 4224)] {
            let shape = Int4Shape::new(n, k, g).unwrap();
            check_quantizer::<f16, f16>(shape, &mut rng);
            check_quantizer::<bf16, bf16>(shape, &mut rng);
            check_quantizer::<bf16, f16>(shape, &mut rng);
            check_quantizer::<f16, bf16>(shape, &mut rng);
        }
    }
}

#[test]
fn groups_with_nan_or_infinities_become_nan_groups_alone() {
    let shape = Int4Shape::new(16, 128, 32).unwrap();
    let mut rng = rng("groups_with_nan_or_infinities_become_nan_groups_alone");
    let mut w: Vec<bf16> = random_weights(&mut rng, &shape, false);
    w[3 * 128 + 40] = bf16::NAN; // row 3, group 1
    w[5 * 128 + 100] = bf16::INFINITY; // row 5, group 3
    w[7 * 128] = bf16::from_f32(-1e30); // row 7, group 0: finite, but its scale overflows fp16
    let p: Packed<f16> = quantize(shape, &w);
    let clean: Packed<f16> = quantize(shape, &random_weights::<bf16>(&mut rng, &shape, false));
    for (row, group) in [(3, 1), (5, 3), (7, 0)] {
        let meta = group * 16 + row;
        assert_eq!(p.scales[meta].to_bits(), 0x7E00, "row {row} group {group}");
        assert_eq!(p.zeros[meta], 0);
        assert!((0..32).all(|i| p.code(row, group * 32 + i) == 0));
    }
    let nan_groups = p.scales.iter().filter(|s| s.is_nan()).count();
    assert_eq!(nan_groups, 3);
    assert!(clean.scales.iter().all(|s| s.to_f32().is_finite()));
    // Their rows of a GEMV are NaN, the others finite.
    let shape_m = GemvShape::new(1, shape).unwrap();
    let x = vec![bf16::from_f32(1.0); 128];
    let mut y = vec![bf16::from_f32(0.0); 16];
    cpu::int4_gemv(&shape_m, &p.packed, &p.scales, &p.zeros, &x, &mut y).unwrap();
    for (row, v) in y.iter().enumerate() {
        assert_eq!(v.is_nan(), [3, 5, 7].contains(&row), "row {row}: {v}");
    }
}

#[test]
fn packing_with_given_scales_reproduces_the_quantizer_and_checks_them() {
    let mut rng = rng("packing_with_given_scales_reproduces_the_quantizer_and_checks_them");
    let shape = Int4Shape::new(32, 256, 64).unwrap();
    let w: Vec<f16> = random_weights(&mut rng, &shape, true);
    let p: Packed<f16> = quantize(shape, &w);
    let mut packed = vec![0xDEAD_BEEF; shape.packed_len()];
    cpu::int4_pack(&shape, &w, &p.scales, &p.zeros, &mut packed).unwrap();
    assert_eq!(packed, p.packed);

    let mut bad_scale = |i: usize, v: f32| {
        let mut s = p.scales.clone();
        s[i] = f16::from_f32(v);
        argument_of(cpu::int4_pack(&shape, &w, &s, &p.zeros, &mut packed))
    };
    assert_eq!(bad_scale(7, 0.0), "scales[7]");
    assert_eq!(bad_scale(8, -0.5), "scales[8]");
    assert_eq!(bad_scale(9, f32::INFINITY), "scales[9]");
    assert_eq!(bad_scale(10, f32::NAN), "scales[10]");
    let mut tiny = vec![bf16::from_f32(0.01); shape.meta_len()];
    tiny[11] = bf16::from_bits(1); // subnormal: 1 / s overflows f32
    assert_eq!(
        argument_of(cpu::int4_pack(&shape, &w, &tiny, &p.zeros, &mut packed)),
        "scales[11]"
    );
    let mut zeros = p.zeros.clone();
    zeros[12] = 16;
    assert_eq!(
        argument_of(cpu::int4_pack(&shape, &w, &p.scales, &zeros, &mut packed)),
        "zeros[12]"
    );
    assert_eq!(
        argument_of(cpu::int4_pack(
            &shape,
            &w[1..],
            &p.scales,
            &p.zeros,
            &mut packed
        )),
        "weights"
    );
    assert_eq!(
        argument_of(cpu::int4_pack(
            &shape,
            &w,
            &p.scales[1..],
            &p.zeros,
            &mut packed
        )),
        "scales"
    );
    assert_eq!(
        argument_of(cpu::int4_pack(
            &shape,
            &w,
            &p.scales,
            &p.zeros,
            &mut packed[1..]
        )),
        "packed"
    );
}

#[test]
fn dequantize_reads_every_code_where_the_format_puts_it() {
    let mut rng = rng("dequantize_reads_every_code_where_the_format_puts_it");
    for g in GROUP_SIZES {
        let shape = Int4Shape::new(48, 384, g).unwrap();
        let p: Packed<bf16> = random_packed(&mut rng, shape);
        let w = cpu::int4_dequantize(&shape, &p.packed, &p.scales, &p.zeros).unwrap();
        for row in 0..48 {
            for col in 0..384 {
                assert_eq!(
                    f64::from(w[row * 384 + col]),
                    p.weight(row, col),
                    "({row}, {col})"
                );
            }
        }
    }
}

fn check_gemv<A: HalfElement, S: HalfElement>(
    rng: &mut rand::rngs::StdRng,
    shape: Int4Shape,
    m: usize,
) {
    let p: Packed<S> = random_packed(rng, shape);
    let x: Vec<A> = random_x(rng, m * shape.k);
    let gemv = GemvShape::new(m, shape).unwrap();
    let mut y = vec![A::NAN; m * shape.n]; // poisoned
    cpu::int4_gemv(&gemv, &p.packed, &p.scales, &p.zeros, &x, &mut y).unwrap();
    let (reference, _) = reference_gemv(&p, &x, m);
    for (i, (&got, &want)) in y.iter().zip(&reference).enumerate() {
        // f64 sums in another order: the result is the rounded reference, to half an ulp (plus f64 noise).
        let error = (f64::from(got.to_f32()) - want).abs();
        assert!(
            error <= 0.5 * ulp::<A>(want) * (1.0 + 1e-9) + 1e-12 * want.abs(),
            "{shape:?} m {m} output {i}: {} vs {want}",
            got.to_f32()
        );
    }
}

#[test]
fn gemv_matches_an_f64_reference_for_every_group_dtype_and_m() {
    let mut rng = rng("gemv_matches_an_f64_reference_for_every_group_dtype_and_m");
    for g in GROUP_SIZES {
        for m in 1..=16 {
            let shape = Int4Shape::new(32, 256, g).unwrap();
            check_gemv::<f16, f16>(&mut rng, shape, m);
            check_gemv::<bf16, bf16>(&mut rng, shape, m);
            check_gemv::<f16, bf16>(&mut rng, shape, m);
            check_gemv::<bf16, f16>(&mut rng, shape, m);
        }
    }
}

#[test]
fn gemv_handles_the_awkward_shapes() {
    let mut rng = rng("gemv_handles_the_awkward_shapes");
    // The smallest allowed, 4096 + 128, and 11008 / 14336 / 28672 on one side (the other kept small).
    for (n, k, g) in [
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
    ] {
        let shape = Int4Shape::new(n, k, g).unwrap();
        check_gemv::<bf16, bf16>(&mut rng, shape, 1);
        check_gemv::<f16, f16>(&mut rng, shape, 3);
    }
}

#[test]
fn gemv_rejects_bad_arguments_naming_them() {
    let shape = Int4Shape::new(16, 64, 32).unwrap();
    let gemv = GemvShape::new(2, shape).unwrap();
    let mut rng = rng("gemv_rejects_bad_arguments_naming_them");
    let p: Packed<f16> = random_packed(&mut rng, shape);
    let x = vec![f16::from_f32(1.0); 128];
    let mut y = vec![f16::from_f32(0.0); 32];
    assert_eq!(
        argument_of(cpu::int4_gemv(
            &gemv,
            &p.packed[1..],
            &p.scales,
            &p.zeros,
            &x,
            &mut y
        )),
        "packed"
    );
    assert_eq!(
        argument_of(cpu::int4_gemv(
            &gemv,
            &p.packed,
            &p.scales,
            &p.zeros[1..],
            &x,
            &mut y
        )),
        "zeros"
    );
    assert_eq!(
        argument_of(cpu::int4_gemv(
            &gemv,
            &p.packed,
            &p.scales,
            &p.zeros,
            &x[1..],
            &mut y
        )),
        "x"
    );
    assert_eq!(
        argument_of(cpu::int4_gemv(
            &gemv,
            &p.packed,
            &p.scales,
            &p.zeros,
            &x,
            &mut y[1..]
        )),
        "y"
    );
    let mut zeros = p.zeros.clone();
    zeros[5] = 200;
    assert_eq!(
        argument_of(cpu::int4_gemv(
            &gemv, &p.packed, &p.scales, &zeros, &x, &mut y
        )),
        "zeros[5]"
    );
    assert_eq!(argument_of(GemvShape::new(17, shape)), "m");
}

#[test]
fn gptq_checkpoints_convert_exactly() {
    let mut rng = rng("gptq_checkpoints_convert_exactly");
    for g in GROUP_SIZES {
        let shape = Int4Shape::new(32, 256, g).unwrap();
        // A quantized matrix, written out as GPTQ would store it, read back.
        let original: Packed<f16> = quantize(shape, &random_weights::<f16>(&mut rng, &shape, true));
        for (minus_one, format) in [(true, GptqZeros::MinusOne), (false, GptqZeros::Exact)] {
            let (qweight, qzeros) =
                gptq_pack(&original.codes(), &original.zeros, &shape, minus_one);
            let g_idx: Vec<i32> = (0..256).map(|k| (k / g) as i32).collect();
            let mut back: Packed<f16> = Packed::zeroed(shape);
            from_gptq(
                &shape,
                &qweight,
                &qzeros,
                &original.scales,
                Some(&g_idx),
                format,
                &mut back.packed,
                &mut back.scales,
                &mut back.zeros,
            )
            .unwrap();
            assert_eq!(back.packed, original.packed, "g {g} {format:?}");
            assert_eq!(back.zeros, original.zeros);
            assert_eq!(back.scales, original.scales);
        }
    }
    // Zero 0 stored as z - 1 wraps to 15 in v1 checkpoints, and must come back as 0.
    let shape = Int4Shape::new(16, 64, 32).unwrap();
    let mut p: Packed<f16> = random_packed(&mut rng, shape);
    p.zeros.iter_mut().for_each(|z| *z = 0);
    let (qweight, qzeros) = gptq_pack(&p.codes(), &p.zeros, &shape, true);
    assert!(qzeros.iter().all(|&w| w as u32 == 0xFFFF_FFFF));
    let mut back: Packed<f16> = Packed::zeroed(shape);
    from_gptq(
        &shape,
        &qweight,
        &qzeros,
        &p.scales,
        None,
        GptqZeros::MinusOne,
        &mut back.packed,
        &mut back.scales,
        &mut back.zeros,
    )
    .unwrap();
    assert!(back.zeros.iter().all(|&z| z == 0));
    assert_eq!(back.packed, p.packed);
}

#[test]
fn gptq_act_order_and_bad_lengths_are_rejected() {
    let shape = Int4Shape::new(16, 128, 64).unwrap();
    let (qweight, qzeros) = (vec![0i32; 16 * 16], vec![0i32; 2 * 2]);
    let scales = vec![f16::from_f32(1.0); 32];
    let mut out: Packed<f16> = Packed::zeroed(shape);
    let mut g_idx: Vec<i32> = (0..128).map(|k| k / 64).collect();
    g_idx.swap(3, 100); // act-order: input features permuted
    let mut run = |qw: &[i32], qz: &[i32], s: &[f16], gi: Option<&[i32]>| {
        argument_of(from_gptq(
            &shape,
            qw,
            qz,
            s,
            gi,
            GptqZeros::MinusOne,
            &mut out.packed,
            &mut out.scales,
            &mut out.zeros,
        ))
    };
    assert_eq!(run(&qweight, &qzeros, &scales, Some(&g_idx)), "g_idx[3]");
    assert_eq!(run(&qweight, &qzeros, &scales, Some(&g_idx[1..])), "g_idx");
    assert_eq!(run(&qweight[1..], &qzeros, &scales, None), "qweight");
    assert_eq!(run(&qweight, &qzeros[1..], &scales, None), "qzeros");
    assert_eq!(run(&qweight, &qzeros, &scales[1..], None), "scales");
}

#[test]
fn awq_checkpoints_convert_exactly() {
    let mut rng = rng("awq_checkpoints_convert_exactly");
    for g in GROUP_SIZES {
        let shape = Int4Shape::new(48, 256, g).unwrap();
        let original: Packed<f16> = random_packed(&mut rng, shape);
        let (qweight, qzeros) = awq_pack(&original.codes(), &original.zeros, &shape);
        let mut back: Packed<f16> = Packed::zeroed(shape);
        from_awq(
            &shape,
            &qweight,
            &qzeros,
            &original.scales,
            &mut back.packed,
            &mut back.scales,
            &mut back.zeros,
        )
        .unwrap();
        assert_eq!(back.packed, original.packed, "g {g}");
        assert_eq!(back.zeros, original.zeros);
        // And the dequantized weights are AWQ's (q - z) * s, element by element.
        for row in 0..48 {
            for col in (0..256).step_by(7) {
                let (word, nibble) = (
                    qweight[col * 6 + row / 8] as u32,
                    [0, 4, 1, 5, 2, 6, 3, 7][row % 8],
                );
                let q = f64::from((word >> (4 * nibble)) & 0xF);
                let meta = (col / g) * 48 + row;
                let z = f64::from((qzeros[(col / g) * 6 + row / 8] as u32 >> (4 * nibble)) & 0xF);
                assert_eq!(
                    back.weight(row, col),
                    (q - z) * f64::from(original.scales[meta].to_f32())
                );
            }
        }
    }
    let shape = Int4Shape::new(16, 64, 32).unwrap();
    let mut out: Packed<bf16> = Packed::zeroed(shape);
    let scales = vec![bf16::from_f32(1.0); 32];
    assert_eq!(
        argument_of(from_awq(
            &shape,
            &[0; 127],
            &[0; 4],
            &scales,
            &mut out.packed,
            &mut out.scales,
            &mut out.zeros
        )),
        "qweight"
    );
}
