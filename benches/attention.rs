//! Criterion benchmarks of the CPU backend's tree attention on SmolLM2-135M's shapes (`Hq = 9`, `Hkv = 3`,
//! `D = 64`, bf16 cache) at B = 8 requests of L = 512 cached tokens and trees of T = 16 nodes, next to the
//! machine's f32 FMA rate measured in the same run, the rate the kernel is judged against (issue 19, item 9: at
//! least a quarter of it).
//!
//! Throughput is in flops (criterion prints "elem/s"): for attention the useful ones, `4 D (L + depth + 1)` per
//! query row and head (scores and the weighted sum of values over the row's prefix and path, a multiply-add
//! counting two); for the FMA rate, two per lane of every fused multiply-add, on as many threads as the machine
//! has (the backend's pool is that size), with AVX-512 and AVX2 each measured where the CPU has them. The row
//! "reference" is a naive f64 attention over the same inputs, on one request.
//!
//! `cargo bench --no-default-features --bench attention`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use specdec::attention::{PagedCacheShape, TreeAttentionShape, TreeBatch};
use specdec::cpu;

const HQ: usize = 9;
const HKV: usize = 3;
const D: usize = 64;
const PAGE: usize = 16;

/// `(B, L, T)`: the goal's shape, then a single request, then a longer prefix.
const CASES: [(usize, usize, usize); 3] = [(8, 512, 16), (1, 512, 16), (8, 2048, 16)];

/// Independent accumulators per thread: enough to cover the FMA latency on two pipes.
const CHAINS: usize = 12;
const FMA_STEPS: usize = 1 << 20;

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// FMA steps on `CHAINS` vectors of 8 lanes; returns a sum so that nothing is optimised away.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(steps: usize, x: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm256_set1_ps(x), _mm256_set1_ps(0.999_999));
    let mut acc = [_mm256_set1_ps(1.0); CHAINS];
    for _ in 0..steps {
        for c in acc.iter_mut() {
            *c = _mm256_fmadd_ps(*c, b, a);
        }
    }
    let mut lanes = [0.0f32; 8];
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &c| _mm256_add_ps(s, c));
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum()
}

/// As [`fma_avx2`], on 16 lanes.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(steps: usize, x: f32) -> f32 {
    use std::arch::x86_64::*;
    let (a, b) = (_mm512_set1_ps(x), _mm512_set1_ps(0.999_999));
    let mut acc = [_mm512_set1_ps(1.0); CHAINS];
    for _ in 0..steps {
        for c in acc.iter_mut() {
            *c = _mm512_fmadd_ps(*c, b, a);
        }
    }
    _mm512_reduce_add_ps(
        acc.iter()
            .fold(_mm512_setzero_ps(), |s, &c| _mm512_add_ps(s, c)),
    )
}

fn fma_rate(c: &mut Criterion) {
    let mut group = c.benchmark_group("f32_fma");
    group.sample_size(20);
    #[cfg(target_arch = "x86_64")]
    {
        type Steps = unsafe fn(usize, f32) -> f32;
        let mut kinds: Vec<(&str, usize, Steps)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            kinds.push(("avx2", 8, fma_avx2));
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            kinds.push(("avx512", 16, fma_avx512));
        }
        let n = threads();
        for (name, lanes, steps) in kinds {
            group.throughput(Throughput::Elements(
                (2 * lanes * CHAINS * FMA_STEPS * n) as u64,
            ));
            group.bench_function(BenchmarkId::new(name, format!("{n} threads")), |b| {
                b.iter(|| {
                    std::thread::scope(|s| {
                        let handles: Vec<_> = (0..n)
                            // SAFETY: `kinds` holds only what the CPU has.
                            .map(|i| {
                                s.spawn(move || unsafe { steps(FMA_STEPS, black_box(i as f32)) })
                            })
                            .collect();
                        handles.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
                    })
                })
            });
        }
    }
    group.finish();
}

struct Problem {
    shape: TreeAttentionShape,
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    offsets: Vec<i32>,
    parents: Vec<i32>,
    prefix_lens: Vec<i32>,
    page_table: Vec<i32>,
    k_cache: Vec<bf16>,
    v_cache: Vec<bf16>,
    out: Vec<bf16>,
    /// The useful flops of one call.
    flops: u64,
}

impl Problem {
    /// B requests of L cached tokens and a full binary tree of T nodes each, pages in reverse order, values
    /// in [-0.5, 0.5).
    fn new(batch: usize, prefix: usize, tree: usize) -> Self {
        let pages_per_request = (prefix + tree).div_ceil(PAGE);
        let cache =
            PagedCacheShape::new(batch * pages_per_request, PAGE, HKV, D, pages_per_request)
                .unwrap();
        let shape = TreeAttentionShape::new(batch, batch * tree, HQ, tree, cache, None).unwrap();
        let parents: Vec<i32> = (0..batch)
            .flat_map(|_| (0..tree as i32).map(|i| if i == 0 { -1 } else { (i - 1) / 2 }))
            .collect();
        let depth = |mut i: usize| {
            let mut depth = 0;
            while i > 0 {
                i = (i - 1) / 2;
                depth += 1;
            }
            depth
        };
        let keys: usize = (0..tree).map(|i| prefix + depth(i) + 1).sum();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut values = |n: usize| -> Vec<bf16> {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    bf16::from_f32((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                })
                .collect()
        };
        Problem {
            q: values(shape.q_len()),
            k: values(shape.kv_len()),
            v: values(shape.kv_len()),
            offsets: (0..=batch).map(|b| (b * tree) as i32).collect(),
            parents,
            prefix_lens: vec![prefix as i32; batch],
            page_table: (0..batch * pages_per_request)
                .rev()
                .map(|p| p as i32)
                .collect(),
            k_cache: values(cache.cache_len()),
            v_cache: values(cache.cache_len()),
            out: vec![bf16::ZERO; shape.q_len()],
            flops: (batch * HQ * 4 * D * keys) as u64,
            shape,
        }
    }

    fn run(&mut self) {
        let batch = TreeBatch {
            token_offsets: &self.offsets,
            parents: &self.parents,
            prefix_lens: &self.prefix_lens,
            page_table: &self.page_table,
        };
        cpu::tree_attention(
            &self.shape,
            &self.q,
            &self.k,
            &self.v,
            &batch,
            None,
            1.0 / (D as f32).sqrt(),
            &mut self.k_cache,
            &mut self.v_cache,
            &mut self.out,
            None,
            None,
        )
        .unwrap();
    }

    /// Naive f64 attention of request 0 (after a `run`, which appended its tree to the cache): every node and
    /// head over the prefix and the node's path, read slot by slot.
    fn reference_request_0(&self) -> Vec<f64> {
        let cache = self.shape.cache;
        let tree = (self.offsets[1] - self.offsets[0]) as usize;
        let prefix = self.prefix_lens[0] as usize;
        let at = |slot: usize, head: usize| cache.slot_offset(&self.page_table, 0, slot, head);
        let f = |x: &[bf16]| {
            x.iter()
                .map(|e| f64::from(e.to_f32()))
                .collect::<Vec<f64>>()
        };
        let mut out = Vec::with_capacity(tree * HQ * D);
        for node in 0..tree {
            let mut slots: Vec<usize> = (0..prefix).collect();
            let mut path = vec![node];
            while self.parents[*path.last().unwrap()] >= 0 {
                path.push(self.parents[*path.last().unwrap()] as usize);
            }
            slots.extend(path.iter().rev().map(|&j| prefix + j));
            for head in 0..HQ {
                let kv = head / (HQ / HKV);
                let q = f(&self.q[(node * HQ + head) * D..][..D]);
                let scores: Vec<f64> = slots
                    .iter()
                    .map(|&s| {
                        let k = f(&self.k_cache[at(s, kv)..][..D]);
                        k.iter().zip(&q).map(|(a, b)| a * b).sum::<f64>() / (D as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let mut o = vec![0.0; D];
                for (&s, &slot) in scores.iter().zip(&slots) {
                    let v = f(&self.v_cache[at(slot, kv)..][..D]);
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += (s - max).exp() / total * v;
                    }
                }
                out.extend(o);
            }
        }
        out
    }
}

fn tree_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("tree_attention_bf16_smollm2_heads");
    group.sample_size(20);
    for (batch, prefix, tree) in CASES {
        let mut p = Problem::new(batch, prefix, tree);
        group.throughput(Throughput::Elements(p.flops));
        let name = format!("B={batch} L={prefix} T={tree}");
        group.bench_function(BenchmarkId::new("kernel", &name), |b| {
            b.iter(|| {
                p.run();
                black_box(&p.out);
            })
        });
        if batch == 1 && prefix == 512 {
            p.run();
            group.sample_size(10);
            group.throughput(Throughput::Elements(p.flops));
            group.bench_function(BenchmarkId::new("reference", &name), |b| {
                b.iter(|| black_box(p.reference_request_0()))
            });
            group.sample_size(20);
        }
    }
    group.finish();
}

criterion_group!(benches, fma_rate, tree_attention);
criterion_main!(benches);
