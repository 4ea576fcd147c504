//! Criterion benchmarks of the CPU backend's greedy verification: one-row argmax per dtype, and whole batches.
//! Throughput is the logits bytes read (each element once). GPU timings come from the main job
//! (`cargo run --release --example bench`), which times with CUDA events.
//!
//! `cargo bench --bench greedy`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use specdec::{cpu, LogitsElement};

fn values<T: LogitsElement>(len: usize, from: impl Fn(f32) -> T) -> Vec<T> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            from((state >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 8.0)
        })
        .collect()
}

fn argmax_row(c: &mut Criterion) {
    let vocab = 128_256;
    let mut group = c.benchmark_group("argmax_row");
    let f32s = values(vocab, |x| x);
    let f16s = values(vocab, f16::from_f32);
    let bf16s = values(vocab, bf16::from_f32);
    group.throughput(Throughput::Bytes((vocab * 4) as u64));
    group.bench_function("f32/128256", |b| b.iter(|| cpu::argmax(black_box(&f32s))));
    group.throughput(Throughput::Bytes((vocab * 2) as u64));
    group.bench_function("f16/128256", |b| b.iter(|| cpu::argmax(black_box(&f16s))));
    group.bench_function("bf16/128256", |b| b.iter(|| cpu::argmax(black_box(&bf16s))));
    group.finish();
}

fn greedy_batches(c: &mut Criterion) {
    let mut group = c.benchmark_group("greedy_verify_bf16_k4");
    group.sample_size(20);
    let drafts = 4;
    for &(batch, vocab) in &[
        (1usize, 32_000usize),
        (1, 128_256),
        (64, 32_000),
        (64, 128_256),
    ] {
        let rows = batch * (drafts + 1);
        let logits = values(rows * vocab, bf16::from_f32);
        let offsets: Vec<i32> = (0..=batch).map(|b| (b * drafts) as i32).collect();
        // Every draft is its row's argmax: every row must be read.
        let tokens: Vec<i32> = (0..batch)
            .flat_map(|b| (0..drafts).map(move |j| b * (drafts + 1) + j))
            .map(|row| cpu::argmax(&logits[row * vocab..(row + 1) * vocab]) as i32)
            .collect();
        let (mut accepted, mut emitted) = (vec![0; batch], vec![0; batch * (drafts + 1)]);
        group.throughput(Throughput::Bytes((logits.len() * 2) as u64));
        group.bench_function(BenchmarkId::new(format!("B{batch}"), vocab), |b| {
            b.iter(|| {
                cpu::greedy_verify(
                    black_box(&logits),
                    vocab,
                    &offsets,
                    &tokens,
                    drafts + 1,
                    &mut accepted,
                    &mut emitted,
                    None,
                )
                .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, argmax_row, greedy_batches);
criterion_main!(benches);
