//! Criterion benchmarks of the CPU backend's int4 GEMV at M = 1 on SmolLM2-135M's shapes (the self-drafter's
//! every linear layer and its LM head), next to a 256 MiB copy measured in the same run, the bandwidth the
//! GEMV is judged against (issue 19, item 9: at least half of it).
//!
//! Throughput is the bytes a GEMV must move: codes, scales, zeros, activations and outputs. Each iteration
//! multiplies the next of several copies of the weights, more than 96 MiB in all (three times this machine's
//! last-level cache), so that the weights come from memory as they do when a drafter runs all its layers in
//! turn, not from a cache that holds one matrix. The row "reference" is the readable f64 path the tests
//! compare with (dequantize, then sum exact products in f64), on the smallest shape.
//!
//! `cargo bench --no-default-features --bench int4`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use specdec::cpu;
use specdec::int4::{GemvShape, Int4Shape};

/// `(name, N, K)`: SmolLM2-135M's q/o projections, MLP up/gate, MLP down, and the tied LM head.
const SHAPES: [(&str, usize, usize); 4] = [
    ("attention 576x576", 576, 576),
    ("mlp up 1536x576", 1536, 576),
    ("mlp down 576x1536", 576, 1536),
    ("lm head 49152x576", 49152, 576),
];
const GROUP_SIZE: usize = 64;
/// Bytes of weights cycled through: three times a 32 MiB last-level cache.
const COLD_BYTES: usize = 96 << 20;

struct Weights {
    packed: Vec<u32>,
    scales: Vec<bf16>,
    zeros: Vec<u8>,
}

fn random_weights(shape: Int4Shape, seed: u64) -> Weights {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    Weights {
        packed: (0..shape.packed_len()).map(|_| next() as u32).collect(),
        scales: (0..shape.meta_len())
            .map(|_| bf16::from_f32((next() % 1000) as f32 * 1e-5 + 1e-3))
            .collect(),
        zeros: (0..shape.meta_len()).map(|_| (next() % 16) as u8).collect(),
    }
}

fn copy(c: &mut Criterion) {
    let mut group = c.benchmark_group("copy");
    group.sample_size(20);
    let len = 256 << 20;
    let source = vec![1u8; len];
    let mut dest = vec![0u8; len];
    // Read plus write, as the rollout engine's calibration counts it.
    group.throughput(Throughput::Bytes(2 * len as u64));
    group.bench_function("256MiB", |b| {
        b.iter(|| {
            dest.copy_from_slice(black_box(&source));
            black_box(&dest);
        })
    });
    group.finish();
}

fn gemv_m1(c: &mut Criterion) {
    let mut group = c.benchmark_group("int4_gemv_m1_bf16_g64");
    for (name, n, k) in SHAPES {
        let shape = Int4Shape::new(n, k, GROUP_SIZE).unwrap();
        let gemv = GemvShape::new(1, shape).unwrap();
        let matrix_bytes = shape.packed_len() * 4 + shape.meta_len() * 3;
        let copies = COLD_BYTES.div_ceil(matrix_bytes).max(2);
        let weights: Vec<Weights> = (0..copies)
            .map(|i| random_weights(shape, 0x2545_F491_4F6C_DD1D ^ i as u64))
            .collect();
        let x: Vec<bf16> = (0..k)
            .map(|i| bf16::from_f32((i % 7) as f32 - 3.0))
            .collect();
        let mut y = vec![bf16::ZERO; n];
        group.throughput(Throughput::Bytes((matrix_bytes + 2 * (k + n)) as u64));
        let mut turn = 0;
        group.bench_function(BenchmarkId::new("kernel", name), |b| {
            b.iter(|| {
                let w = &weights[turn % copies];
                turn += 1;
                cpu::int4_gemv(&gemv, &w.packed, &w.scales, &w.zeros, &x, &mut y).unwrap();
                black_box(&y);
            })
        });
        if n == 576 && k == 576 {
            let w = &weights[0];
            group.sample_size(10);
            group.bench_function(BenchmarkId::new("reference", name), |b| {
                b.iter(|| {
                    let dense =
                        cpu::int4_dequantize(&shape, &w.packed, &w.scales, &w.zeros).unwrap();
                    for (row, out) in dense.chunks(k).zip(y.iter_mut()) {
                        let sum: f64 = row
                            .iter()
                            .zip(&x)
                            .map(|(&w, &x)| f64::from(w) * f64::from(x.to_f32()))
                            .sum();
                        *out = bf16::from_f64(sum);
                    }
                    black_box(&y);
                })
            });
            group.sample_size(100);
        }
    }
    group.finish();
}

/// M = 8 (a batch of eight sequences' draft step): each vector of codes is decoded once per 4 activation rows
/// on AVX-512, so the time grows slower than M.
fn gemv_m8(c: &mut Criterion) {
    let mut group = c.benchmark_group("int4_gemv_m8_bf16_g64");
    let m = 8;
    for (name, n, k) in SHAPES {
        let shape = Int4Shape::new(n, k, GROUP_SIZE).unwrap();
        let gemv = GemvShape::new(m, shape).unwrap();
        let matrix_bytes = shape.packed_len() * 4 + shape.meta_len() * 3;
        let copies = COLD_BYTES.div_ceil(matrix_bytes).max(2);
        let weights: Vec<Weights> = (0..copies)
            .map(|i| random_weights(shape, 0x2545_F491_4F6C_DD1D ^ i as u64))
            .collect();
        let x: Vec<bf16> = (0..m * k)
            .map(|i| bf16::from_f32((i % 7) as f32 - 3.0))
            .collect();
        let mut y = vec![bf16::ZERO; m * n];
        group.throughput(Throughput::Bytes((matrix_bytes + 2 * m * (k + n)) as u64));
        let mut turn = 0;
        group.bench_function(BenchmarkId::new("kernel", name), |b| {
            b.iter(|| {
                let w = &weights[turn % copies];
                turn += 1;
                cpu::int4_gemv(&gemv, &w.packed, &w.scales, &w.zeros, &x, &mut y).unwrap();
                black_box(&y);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, copy, gemv_m1, gemv_m8);
criterion_main!(benches);
