//! Criterion benchmarks of the CPU backend's rejection-sampling verification on the rollout engine's case
//! (issue 19, item 9): a batch of B = 8 chains of k = 4 drafts over SmolLM2's vocabulary (49152), from f32
//! logits, temperature 1, with draft rows (an int4 self-drafter's q) and without (point masses, a suffix
//! drafter). Throughput is the logits bytes a verification must read at least: the target rows of the nodes
//! it visits and their draft rows. Each draft's logit is raised to 30 in its target row (and its draft row),
//! so that it is accepted with probability 1 - 1e-6 or so and every row is visited: the costliest case.
//!
//! `cargo bench --no-default-features --bench sampling`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};

const BATCH: usize = 8;
const DRAFTS: usize = 4;
const VOCAB: usize = 49152;

fn logits(rows: usize, seed: u64) -> Vec<f32> {
    let mut state = seed | 1;
    (0..rows * VOCAB)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 16.0 - 8.0
        })
        .collect()
}

fn argmax(row: &[f32]) -> i32 {
    (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best }) as i32
}

fn chain_verification(c: &mut Criterion) {
    let mut group = c.benchmark_group("rejection_verify_chain_f32");
    group.sample_size(30);
    let mut target = logits(BATCH * (DRAFTS + 1), 0x2545_F491_4F6C_DD1D);
    let mut draft = logits(BATCH * DRAFTS, 0x9E37_79B9_7F4A_7C15);
    let tokens: Vec<i32> = (0..BATCH * DRAFTS)
        .map(|i| argmax(&draft[i * VOCAB..][..VOCAB]))
        .collect();
    for (i, &token) in tokens.iter().enumerate() {
        let (b, j) = (i / DRAFTS, i % DRAFTS);
        target[(b * (DRAFTS + 1) + j) * VOCAB + token as usize] = 30.0;
        draft[i * VOCAB + token as usize] = 30.0;
    }
    let offsets: Vec<i32> = (0..=BATCH).map(|b| (b * DRAFTS) as i32).collect();
    let temperature = [1.0f32; BATCH];
    let seeds: Vec<u64> = (0..BATCH as u64).collect();
    let steps = [0u64; BATCH];
    for with_draft_rows in [false, true] {
        let name = if with_draft_rows {
            "draft rows"
        } else {
            "point masses"
        };
        let bytes = (target.len() + if with_draft_rows { draft.len() } else { 0 }) * 4;
        group.throughput(Throughput::Bytes(bytes as u64));
        let (mut accepted, mut emitted) = (vec![0i32; BATCH], vec![0i32; BATCH * (DRAFTS + 1)]);
        group.bench_function(
            BenchmarkId::new(name, format!("B{BATCH} k{DRAFTS} V{VOCAB}")),
            |b| {
                b.iter(|| {
                    let inputs = VerifyInputs {
                        vocab_size: VOCAB,
                        drafts: Drafts::Chain {
                            draft_offsets: offsets[..].into(),
                            draft_tokens: tokens[..].into(),
                        },
                        target: Rows::LogitsF32(target[..].into()),
                        draft: with_draft_rows.then(|| Rows::LogitsF32(draft[..].into())),
                        params: Some(SamplingParams {
                            temperature: temperature[..].into(),
                            top_k: None,
                            top_p: None,
                        }),
                        draft_params: None,
                        seeds: seeds[..].into(),
                        steps: steps[..].into(),
                    };
                    let outputs = VerifyOutputs {
                        emit_width: DRAFTS + 1,
                        accepted_counts: accepted[..].as_mut().into(),
                        emitted_tokens: emitted[..].as_mut().into(),
                        accepted_nodes: None,
                        accept_flags: None,
                        request_status: None,
                    };
                    specdec::cpu::rejection_verify(&inputs, outputs).unwrap();
                    assert!(accepted.iter().all(|&a| a == DRAFTS as i32), "{accepted:?}");
                    black_box(&emitted);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, chain_verification);
criterion_main!(benches);
