//! Tree attention and compaction on the GPU: the shared bodies of `tests/common/attention.rs` (the same ones
//! `tests/attention_cpu.rs` runs on the CPU backend: chain, star, random and full binary trees up to 64 nodes
//! over shuffled pages, GQA ratios 1, 4 and 8, fp16 and bf16, head dims 64, 128, 256, RoPE off, NeoX and GPT-J,
//! RoPE against inputs rotated beforehand, rows claimed by two requests; tolerances stated there), then what
//! only the GPU has: long prefixes split across blocks and merged, short prefixes beside a long one, bad
//! requests marked per request, compaction and NaN payloads against the CPU, and offsets beyond i32. Fresh
//! random data every run (seed printed); outputs start as poison and are checked past their ends.
//!
//! Without a usable GPU every test prints why it was skipped and passes; with `SPECDEC_REQUIRE_GPU=1` it fails.

mod common;

attention_tests!(common::device::TestDevice::cuda("attention_gpu"));

use std::sync::Arc;

use common::attention::{chain, check, epsilon, full_binary, star, tree_of, Problem, Spec};
use common::device::TestDevice;
use common::guarded::Guarded;
use common::{gpu, rng};
use cudarc::driver::{CudaStream, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use specdec::attention::{
    CompactionShape, KvCompaction, PagedCacheShape, RequestStatus, RopeStyle, TreeAttentionInputs,
    TreeAttentionOutputs,
};
use specdec::backend::{Backend, Out, Stream};
use specdec::cpu;
use specdec::cuda::{CudaBackend, DeviceIn};
use specdec::HalfElement;

const SUBNORMAL_STEP: f64 = 1.0 / (1u64 << 24) as f64;

struct GpuResult<T> {
    out: Vec<T>,
    lse: Vec<f32>,
    k_cache: Vec<T>,
    v_cache: Vec<T>,
    status: Vec<i32>,
}

fn run_gpu<T: HalfElement + DeviceRepr + ValidAsZeroBits>(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    p: &Problem<T>,
) -> GpuResult<T> {
    let up = |x: &[i32]| stream.clone_htod(x).unwrap();
    let (q, k, v) = (
        stream.clone_htod(&p.q).unwrap(),
        stream.clone_htod(&p.k).unwrap(),
        stream.clone_htod(&p.v).unwrap(),
    );
    let (offsets, parents, prefix, table) = (
        up(&p.token_offsets),
        up(&p.parents),
        up(&p.prefix_lens),
        up(&p.page_table),
    );
    let cos_sin = p.cos_sin.as_ref().map(|c| stream.clone_htod(c).unwrap());
    let poison = T::from_f32(-12345.0);
    let mut k_cache = Guarded::with_contents(stream, &p.k_cache, poison);
    let mut v_cache = Guarded::with_contents(stream, &p.v_cache, poison);
    let mut out = Guarded::new(stream, p.shape.q_len(), poison);
    let mut lse = Guarded::new(stream, p.shape.lse_len(), -777.0f32);
    let mut status = Guarded::new(stream, p.shape.num_requests, -9i32);
    let inputs = TreeAttentionInputs {
        shape: p.shape,
        q: DeviceIn::new(&q, stream).into(),
        k: DeviceIn::new(&k, stream).into(),
        v: DeviceIn::new(&v, stream).into(),
        token_offsets: DeviceIn::new(&offsets, stream).into(),
        parents: DeviceIn::new(&parents, stream).into(),
        prefix_lens: DeviceIn::new(&prefix, stream).into(),
        page_table: DeviceIn::new(&table, stream).into(),
        cos_sin_cache: cos_sin.as_ref().map(|c| DeviceIn::new(c, stream).into()),
        softmax_scale: p.scale,
    };
    let outputs = TreeAttentionOutputs {
        k_cache: k_cache.out(stream).into(),
        v_cache: v_cache.out(stream).into(),
        out: out.out(stream).into(),
        lse: Some(lse.out(stream).into()),
        request_status: Some(status.out(stream).into()),
    };
    Backend::Cuda(backend.clone())
        .tree_attention(Stream::Cuda(stream), &inputs, outputs)
        .unwrap();
    stream.synchronize().unwrap();
    GpuResult {
        out: out.read(stream, "out"),
        lse: lse.read(stream, "lse"),
        k_cache: k_cache.read(stream, "k_cache"),
        v_cache: v_cache.read(stream, "v_cache"),
        status: status.read(stream, "request_status"),
    }
}

/// Llama-3-8B-shaped heads with long prefixes: batch 1 splits the prefix over many blocks and merges; batch 24
/// with T = 16 does not split.
#[test]
fn gpu_long_prefixes_split_and_merge_exactly() {
    let Some(device) = TestDevice::cuda("gpu_long_prefixes_split_and_merge_exactly") else {
        return;
    };
    let mut rng = rng("gpu_long_prefixes_split_and_merge_exactly");
    for (batch, tree, prefix) in [(1, 1, 8191), (1, 16, 12000), (2, 64, 5000), (24, 16, 700)] {
        let spec = Spec {
            trees: (0..batch).map(|b| tree_of(&mut rng, b + 3, tree)).collect(),
            // Ragged prefixes, every one positive (batch 24 from 700 down to 309).
            prefix_lens: (0..batch).map(|b| prefix - 17 * b).collect(),
            num_q_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            page_size: 16,
            rope: Some(RopeStyle::Neox),
        };
        let p = Problem::<bf16>::random(&mut rng, &spec);
        check(&device, &p, &format!("batch {batch} T {tree} L {prefix}"));
    }
}

/// A launch planned for the longest prefix, holding short ones: each request uses only the splits its own prefix
/// fills (one per tile of 64 keys; the empty prefix one), the rest return at once and the merge skips them.
#[test]
fn gpu_short_prefixes_beside_a_long_one_use_only_their_splits() {
    let Some(device) =
        TestDevice::cuda("gpu_short_prefixes_beside_a_long_one_use_only_their_splits")
    else {
        return;
    };
    let mut rng = rng("gpu_short_prefixes_beside_a_long_one_use_only_their_splits");
    let prefix_lens = vec![6000, 100, 0, 64, 65, 1];
    let spec = Spec {
        trees: (0..prefix_lens.len())
            .map(|b| tree_of(&mut rng, b, 8))
            .collect(),
        prefix_lens,
        num_q_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        page_size: 16,
        rope: Some(RopeStyle::Neox),
    };
    let p = Problem::<bf16>::random(&mut rng, &spec);
    check(&device, &p, "prefixes 6000, 100, 0, 64, 65, 1");
}

/// Bad index arrays: each request gets the status of the rule it breaks (the one the CPU names), a failing
/// request writes nothing to the cache and NaN to its rows, and the valid requests beside it are exact.
#[test]
fn gpu_bad_requests_are_marked_and_touch_nothing() {
    let Some(backend) = gpu("gpu_bad_requests_are_marked_and_touch_nothing") else {
        return;
    };
    let mut rng = rng("gpu_bad_requests_are_marked_and_touch_nothing");
    let stream = backend.context().new_stream().unwrap();
    let spec = Spec {
        trees: vec![
            chain(3),
            star(4),
            full_binary(5),
            chain(2),
            star(3),
            chain(4),
        ],
        prefix_lens: vec![5, 17, 40, 3, 20, 9],
        num_q_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        rope: Some(RopeStyle::Gptj),
    };
    let good = Problem::<f16>::random(&mut rng, &spec);
    let mut p = good.clone();
    let ppr = p.shape.cache.pages_per_request;
    p.parents[p.token_offsets[1] as usize + 2] = 2; // request 1: a parent not before its child
    p.page_table[2 * ppr] = p.shape.cache.num_pages as i32 + 1000; // request 2: a page beyond the cache
    p.prefix_lens[3] = p.shape.cache.capacity() as i32; // request 3: no room for its tree
    p.prefix_lens[4] = -3; // request 4: a negative prefix
    let expected: Vec<RequestStatus> = (0..6)
        .map(|b| {
            p.shape.request_status(
                b,
                &p.token_offsets,
                &p.parents,
                &p.prefix_lens,
                &p.page_table,
            )
        })
        .collect();
    assert_eq!(
        expected,
        [
            RequestStatus::Ok,
            RequestStatus::Parents,
            RequestStatus::PageTable,
            RequestStatus::PrefixLen,
            RequestStatus::PrefixLen,
            RequestStatus::Ok
        ]
    );
    let gpu = run_gpu(&backend, &stream, &p);
    let codes: Vec<i32> = expected.iter().map(|&s| s as i32).collect();
    assert_eq!(gpu.status, codes);

    // The CPU with request_status flags the same requests alike: statuses, NaN rows, the same cache bits.
    let (cpu_out, cpu_lse, cpu_k, cpu_v, cpu_status) = p.run_cpu_flagged().unwrap();
    assert_eq!(cpu_status, codes, "the CPU's request_status");
    let bits = |x: &[f16]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert!(bits(&cpu_k) == bits(&gpu.k_cache) && bits(&cpu_v) == bits(&gpu.v_cache));
    for (i, (g, c)) in gpu.out.iter().zip(&cpu_out).enumerate() {
        let (g, c) = (f64::from(g.to_f32()), f64::from(c.to_f32()));
        let eps = epsilon::<f16>();
        assert!(
            (g.is_nan() && c.is_nan())
                || (g - c).abs() <= 2.0 * eps + eps * c.abs() + SUBNORMAL_STEP,
            "out[{i}]: GPU {g}, CPU {c}"
        );
    }
    for (i, (g, c)) in gpu.lse.iter().zip(&cpu_lse).enumerate() {
        assert_eq!(g.is_nan(), c.is_nan(), "lse[{i}]: GPU {g}, CPU {c}");
    }

    // The unbroken problem on the CPU gives the reference for the valid requests' rows and cache rows.
    let (hq, d) = (8, 64);
    let (out, _, k_cache, _) = good.run_cpu();
    for (b, &code) in codes.iter().enumerate() {
        for row in p.rows(b) {
            let got = &gpu.out[row * hq * d..][..hq * d];
            if code == 0 {
                let want = &out[row * hq * d..][..hq * d];
                let eps = epsilon::<f16>();
                for (g, w) in got.iter().zip(want) {
                    let (g, w) = (f64::from(g.to_f32()), f64::from(w.to_f32()));
                    assert!(
                        (g - w).abs() <= 2.0 * eps + eps * w.abs() + SUBNORMAL_STEP,
                        "request {b}"
                    );
                }
            } else {
                assert!(
                    got.iter().all(|x| x.to_f32().is_nan()),
                    "request {b}: rows not NaN"
                );
                assert!(
                    gpu.lse[row * hq..][..hq].iter().all(|x| x.is_nan()),
                    "request {b}: lse not NaN"
                );
            }
        }
    }
    // Cache: rows appended by valid requests as on the CPU; nothing else changed.
    let mut want = good.k_cache.clone();
    for b in [0, 5] {
        for node in 0..p.rows(b).len() {
            for h in 0..2 {
                let at = p.cache_index(b, p.prefix_lens[b] as usize + node, h);
                want[at..at + d].copy_from_slice(&k_cache[at..at + d]);
            }
        }
    }
    let bits = |x: &[f16]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&gpu.k_cache) == bits(&want),
        "invalid requests wrote to the cache"
    );
}

/// Rows claimed by two requests (a neighbour's broken offsets, `token_offsets = [0, 3, 1, 4]`): the GPU gives
/// each row to one request and flags the other, as the CPU does, and computes request 0 as the CPU does.
/// Compaction on the device equals the CPU's, for several layers, in place, with overlapping moves; a bad
/// request is marked and moves nothing.
#[test]
fn gpu_compaction_matches_the_cpu() {
    let Some(backend) = gpu("gpu_compaction_matches_the_cpu") else {
        return;
    };
    let mut rng = rng("gpu_compaction_matches_the_cpu");
    let stream = backend.context().new_stream().unwrap();
    for head_dim in [64, 128, 256] {
        let (ps, hkv, layers, requests) = (16, 4, 5, 6);
        let pages_per_request = 8;
        let num_pages = requests * pages_per_request + 1;
        let cache = PagedCacheShape::new(num_pages, ps, hkv, head_dim, pages_per_request).unwrap();
        let mut pool: Vec<i32> = (0..num_pages as i32).collect();
        rand::seq::SliceRandom::shuffle(&mut pool[..], &mut rng);
        let page_table = pool[..requests * pages_per_request].to_vec();
        let mut offsets = vec![0i32];
        let mut nodes = Vec::new();
        let mut prefix_lens = Vec::new();
        for b in 0..requests {
            let mut path: Vec<i32> = (0..64).filter(|_| rng.random_bool(0.3)).collect();
            if b == 0 {
                path = vec![0, 1, 2, 3]; // already in place
            }
            if b == requests - 1 {
                path = vec![3, 9, 7]; // breaks a rule: not increasing
            }
            prefix_lens.push(rng.random_range(0..(pages_per_request * ps - 64)) as i32);
            nodes.extend(&path);
            offsets.push(nodes.len() as i32);
        }
        let shape = CompactionShape::new(requests, layers, nodes.len(), cache).unwrap();
        let host: Vec<Vec<f16>> = (0..2 * layers)
            .map(|_| {
                (0..cache.cache_len())
                    .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                    .collect()
            })
            .collect();
        let mut want = host.clone();
        let mut cpu_status = vec![-9; requests];
        {
            // The CPU with request_status on the same inputs: request 5 flagged, nothing of it moved.
            let (k, v) = want.split_at_mut(layers);
            let mut k: Vec<&mut [f16]> = k.iter_mut().map(|c| c.as_mut_slice()).collect();
            let mut v: Vec<&mut [f16]> = v.iter_mut().map(|c| c.as_mut_slice()).collect();
            cpu::tree_kv_compact(
                &shape,
                &offsets,
                &nodes,
                &prefix_lens,
                &page_table,
                &mut k,
                &mut v,
                Some(&mut cpu_status),
            )
            .unwrap();
        }
        let mut buffers: Vec<Guarded<f16>> = host
            .iter()
            .map(|c| Guarded::with_contents(&stream, c, f16::from_f32(-3.0)))
            .collect();
        let up = |x: &[i32]| stream.clone_htod(x).unwrap();
        let (o, n, l, t) = (up(&offsets), up(&nodes), up(&prefix_lens), up(&page_table));
        let mut status = Guarded::new(&stream, requests, -9i32);
        {
            let mut caches: Vec<Out<'_, f16>> =
                buffers.iter_mut().map(|g| g.out(&stream).into()).collect();
            let v_caches = caches.split_off(layers);
            let args = KvCompaction {
                shape,
                accepted_offsets: DeviceIn::new(&o, &stream).into(),
                accepted_nodes: DeviceIn::new(&n, &stream).into(),
                prefix_lens: DeviceIn::new(&l, &stream).into(),
                page_table: DeviceIn::new(&t, &stream).into(),
                k_caches: caches,
                v_caches,
                request_status: Some(status.out(&stream).into()),
            };
            Backend::Cuda(backend.clone())
                .tree_kv_compact(Stream::Cuda(&stream), args)
                .unwrap();
        }
        stream.synchronize().unwrap();
        assert_eq!(
            status.read(&stream, "request_status"),
            [0, 0, 0, 0, 0, RequestStatus::Parents as i32]
        );
        assert_eq!(status.read(&stream, "request_status"), cpu_status);
        for (i, g) in buffers.iter().enumerate() {
            let got = g.read(&stream, "cache");
            assert!(
                got == want[i],
                "d {head_dim}: cache {i} differs from the CPU's compaction"
            );
        }
    }
}

/// Keys and values holding NaNs with signs and payloads: the GPU appends the CPU's bits exactly (0x7FFF for a
/// key rotated by RoPE, whatever its payload; the payload itself when copied without RoPE).
#[test]
fn gpu_nan_payloads_append_the_cpu_bits() {
    let Some(backend) = gpu("gpu_nan_payloads_append_the_cpu_bits") else {
        return;
    };
    let mut rng = rng("gpu_nan_payloads_append_the_cpu_bits");
    let stream = backend.context().new_stream().unwrap();
    fn case<T: HalfElement + DeviceRepr + ValidAsZeroBits>(
        backend: &CudaBackend,
        stream: &Arc<CudaStream>,
        rng: &mut StdRng,
        nans: [u16; 3],
        from_bits: fn(u16) -> T,
    ) {
        for rope in [None, Some(RopeStyle::Neox), Some(RopeStyle::Gptj)] {
            let (p, _) = common::attention::with_payload_nans(rng, rope, nans, from_bits);
            let gpu = run_gpu(backend, stream, &p);
            let (_, _, k_cache, v_cache) = p.run_cpu();
            let bits = |x: &[T]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
            let label = format!("{} rope {rope:?}", T::DTYPE.name());
            assert_eq!(gpu.status, [0, 0], "{label}");
            assert!(
                bits(&gpu.k_cache) == bits(&k_cache),
                "{label}: k_cache differs from the CPU's"
            );
            assert!(
                bits(&gpu.v_cache) == bits(&v_cache),
                "{label}: v_cache differs from the CPU's"
            );
        }
    }
    case(
        &backend,
        &stream,
        &mut rng,
        common::attention::F16_PAYLOAD_NANS,
        f16::from_bits,
    );
    case(
        &backend,
        &stream,
        &mut rng,
        common::attention::BF16_PAYLOAD_NANS,
        bf16::from_bits,
    );
}

/// Offsets more than INT32_MAX apart (a request from i32::MIN to i32::MAX) are refused as bad offsets, with their
/// difference taken in 64 bits: in 32 bits it overflows, which is undefined behaviour the simulator's UBSan
/// reports (as it did before the kernels widened it).
#[test]
fn gpu_offsets_further_apart_than_i32_are_refused() {
    let Some(backend) = gpu("gpu_offsets_further_apart_than_i32_are_refused") else {
        return;
    };
    let mut rng = rng("gpu_offsets_further_apart_than_i32_are_refused");
    let stream = backend.context().new_stream().unwrap();
    let spec = Spec {
        trees: vec![chain(3), star(4)],
        prefix_lens: vec![5, 17],
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        rope: None,
    };
    let mut p = Problem::<bf16>::random(&mut rng, &spec);
    p.token_offsets = vec![i32::MIN, i32::MAX, 7];
    let gpu = run_gpu(&backend, &stream, &p);
    assert_eq!(gpu.status, [RequestStatus::Offsets as i32; 2]);
    let bits = |x: &[bf16]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert!(bits(&gpu.k_cache) == bits(&p.k_cache), "k_cache written");
    assert!(bits(&gpu.v_cache) == bits(&p.v_cache), "v_cache written");
}
