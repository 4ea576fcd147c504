//! The int4 format, quantizer, converters and GEMV on the CPU backend, against independent references: the
//! shared bodies of `tests/common/int4.rs` (also run on the GPU by `tests/int4_gpu.rs`: the rounding rule
//! applied weight by weight, NaN groups, GEMV sums in f64), then what only the CPU does: codes read one by one
//! through `Int4Shape::locate` by the dequantizer, bad scales, zeros and lengths refused by name, and the GPTQ
//! and AWQ checkpoint packers written from their published layouts. Fresh random data every run (seed printed).

mod common;

use common::device::TestDevice;
use common::int4::{awq_pack, gptq_pack, random_packed, random_weights, Packed};
use common::rng;
use half::{bf16, f16};
use specdec::cpu;
use specdec::int4::convert::{from_awq, from_gptq, GptqZeros};
use specdec::int4::{GemvShape, Int4Shape, GROUP_SIZES};
use specdec::Error;

int4_tests!(Some(TestDevice::cpu()));

fn argument_of<T: std::fmt::Debug>(r: Result<T, Error>) -> String {
    match r {
        Err(Error::InvalidArgument { argument, .. }) => argument,
        other => panic!("expected an invalid argument, got {other:?}"),
    }
}

#[test]
/// Given scales and zeros are checked (the CUDA kernel, which cannot report, gives such a group codes 0); the
/// codes of valid ones are `packing_with_the_quantizers_scales_reproduces_its_codes`.
fn packing_with_given_scales_checks_them() {
    let mut rng = rng("packing_with_given_scales_checks_them");
    let shape = Int4Shape::new(32, 256, 64).unwrap();
    let w: Vec<f16> = random_weights(&mut rng, &shape, true);
    let p: Packed<f16> = common::int4::quantize_on(&TestDevice::cpu(), shape, &w);
    let mut packed = vec![0xDEAD_BEEF; shape.packed_len()];

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
        let original: Packed<f16> = common::int4::quantize_on(
            &TestDevice::cpu(),
            shape,
            &random_weights::<f16>(&mut rng, &shape, true),
        );
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

/// A shape built field by field (its fields are public) is re-checked by the backend: a group size of 0 is an
/// error naming it, not a division by zero.
#[test]
fn shapes_built_field_by_field_are_checked() {
    let shape = Int4Shape {
        n: 16,
        k: 64,
        group_size: 0,
    };
    let w = vec![f16::from_f32(0.0); 16 * 64];
    let (mut packed, mut scales, mut zeros) = (vec![0u32; 128], vec![f16::ZERO; 0], vec![0u8; 0]);
    let result = cpu::int4_quantize(&shape, &w, &mut packed, &mut scales, &mut zeros);
    assert_eq!(argument_of(result), "group_size");
    let gemv = GemvShape {
        m: 0,
        weights: Int4Shape::new(16, 64, 32).unwrap(),
    };
    let (x, mut y) = (vec![f16::ZERO; 0], vec![f16::ZERO; 0]);
    let result = cpu::int4_gemv(&gemv, &packed, &scales, &zeros, &x, &mut y);
    assert_eq!(argument_of(result), "m");
}
