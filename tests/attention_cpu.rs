//! Tree attention and compaction on the CPU backend, against the naive reference of `common::attention` (which
//! reads the cache through its own logical view and attends over each node's explicit root-to-node path), on
//! fresh random data (seed printed): the shared bodies of `tests/common/attention.rs` (also run on the GPU by
//! `tests/attention_gpu.rs`: chain, star, random and full binary trees; L = 0; L not a multiple of the page
//! size; shuffled pages; GQA ratios 1, 4 and 8; fp16 and bf16; head dims 64, 128 and 256; RoPE off, NeoX and
//! GPT-J), then T = 1 against plain decode attention, compaction, NaN keys, and every bad input, named, with
//! nothing written.
//!
//! Tolerances (CPU: f32 products, one rounding of each output from f64): `|out - ref| <= 2^-14 + eps * |ref| +
//! 2^-24` (the final rounding is half an ulp, at most `eps / 2 * |ref|` or half fp16's subnormal step; 2^-14 is
//! the f32 sums' slack, `CPU_F32_SLACK`), `|lse - ref| <= 2^-16 * (1 + |ref|)` (`CPU_LSE_TOLERANCE`). The cache rows written must be exactly the rotated keys and the values, and every
//! other row must be unchanged.

mod common;

attention_tests!(Some(common::device::TestDevice::cpu()));

use common::attention::{chain, epsilon, star, Problem, Spec, CPU_F32_SLACK, SUBNORMAL_STEP};
use common::rng;
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use specdec::attention::{CompactionShape, PagedCacheShape, RopeStyle, TreeAttentionShape};
use specdec::{cpu, Error, HalfElement, RequestStatus};

/// T = 1 is ordinary decoding: the output is softmax attention over the L cached tokens plus the new one.
#[test]
fn single_node_trees_are_plain_decode_attention() {
    let mut rng = rng("single_node_trees_are_plain_decode_attention");
    let spec = Spec {
        trees: vec![vec![-1]; 4],
        prefix_lens: vec![0, 1, 16, 77],
        num_q_heads: 32,
        num_kv_heads: 8,
        head_dim: 128,
        page_size: 16,
        rope: None,
    };
    let p = Problem::<f16>::random(&mut rng, &spec);
    let (out, _, _, _) = p.run_cpu();
    let (hq, d) = (32, 128);
    for b in 0..4 {
        let l = p.prefix_lens[b] as usize;
        for h in 0..hq {
            let q: Vec<f64> = p.q[(b * hq + h) * d..][..d]
                .iter()
                .map(|x| f64::from(x.to_f32()))
                .collect();
            let mut rows: Vec<(Vec<f64>, Vec<f64>)> = (0..l)
                .map(|t| {
                    let at = p.cache_index(b, t, h / 4);
                    let f = |c: &[f16]| {
                        c[at..at + d]
                            .iter()
                            .map(|x| f64::from(x.to_f32()))
                            .collect()
                    };
                    (f(&p.k_cache), f(&p.v_cache))
                })
                .collect();
            let at = (b * 8 + h / 4) * d;
            let f = |c: &[f16]| {
                c[at..at + d]
                    .iter()
                    .map(|x| f64::from(x.to_f32()))
                    .collect()
            };
            rows.push((f(&p.k), f(&p.v)));
            let scores: Vec<f64> = rows
                .iter()
                .map(|(k, _)| {
                    k.iter().zip(&q).map(|(a, b)| a * b).sum::<f64>() * f64::from(p.scale)
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for e in 0..d {
                let want: f64 = scores
                    .iter()
                    .zip(&rows)
                    .map(|(s, (_, v))| (s - max).exp() / total * v[e])
                    .sum();
                let got = f64::from(out[(b * hq + h) * d + e].to_f32());
                assert!(
                    (got - want).abs()
                        <= CPU_F32_SLACK + epsilon::<f16>() * want.abs() + SUBNORMAL_STEP,
                    "b {b} h {h} e {e}"
                );
            }
        }
    }
}

fn argument(e: Error) -> String {
    match e {
        Error::InvalidArgument { argument, .. } => argument,
        other => panic!("expected InvalidArgument, got {other}"),
    }
}

/// Runs a modified problem and returns the argument the error names, checking that nothing was written.
fn bad<T: HalfElement>(p: &Problem<T>) -> String {
    let mut k_cache = p.k_cache.clone();
    let mut v_cache = p.v_cache.clone();
    let mut out = vec![T::NAN; p.shape.q_len()];
    let err = cpu::tree_attention(
        &p.shape,
        &p.q,
        &p.k,
        &p.v,
        &p.batch(),
        p.cos_sin.as_deref(),
        p.scale,
        &mut k_cache,
        &mut v_cache,
        &mut out,
        None,
        None,
    )
    .unwrap_err();
    let bits = |x: &[T]| x.iter().map(|e| e.to_bits()).collect::<Vec<_>>();
    assert!(
        bits(&k_cache) == bits(&p.k_cache) && bits(&v_cache) == bits(&p.v_cache),
        "cache written"
    );
    assert!(
        out.iter().all(|x| x.to_bits() == T::NAN.to_bits()),
        "out written"
    );
    // With request_status the call succeeds and flags exactly the requests that break a rule, each with its
    // rule's status, NaN in its rows (unless its offsets, which say which rows, are the broken rule) and
    // nothing in the cache; an argument of the whole call is refused alike.
    match p.run_cpu_flagged() {
        Ok((out, _, _, _, status)) => {
            let hq_d = p.shape.num_q_heads * p.shape.cache.head_dim;
            for (b, &code) in status.iter().enumerate() {
                let want = p.shape.request_status(
                    b,
                    &p.token_offsets,
                    &p.parents,
                    &p.prefix_lens,
                    &p.page_table,
                );
                assert_eq!(code, want.code(), "request {b}'s status ({err})");
                if code != 0 && want != RequestStatus::Offsets {
                    let rows = p.rows(b);
                    assert!(
                        out[rows.start * hq_d..rows.end * hq_d]
                            .iter()
                            .all(|x| x.to_f32().is_nan()),
                        "request {b}'s rows"
                    );
                }
            }
            assert!(status.iter().any(|&s| s != 0), "nothing flagged for {err}");
        }
        Err(flag_err) => assert_eq!(flag_err, err, "a call-level error differs between modes"),
    }
    argument(err)
}

/// Rows claimed by two requests (`rows_claimed_by_two_requests_go_to_one_and_flag_the_other` on every backend):
/// without `request_status` the CPU fails the call, naming the offsets.
#[test]
fn rows_claimed_by_two_requests_fail_the_call_without_request_status() {
    let mut rng = rng("rows_claimed_by_two_requests_fail_the_call_without_request_status");
    let spec = Spec {
        trees: vec![chain(3), chain(1), chain(1)],
        prefix_lens: vec![5, 17, 9],
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        rope: Some(RopeStyle::Neox),
    };
    let mut p = Problem::<f16>::random(&mut rng, &spec);
    p.token_offsets = vec![0, 3, 1, 4];
    assert_eq!(bad(&p), "token_offsets[2]");
}

#[test]
fn bad_inputs_are_named_and_nothing_is_written() {
    let mut rng = rng("bad_inputs_are_named_and_nothing_is_written");
    let spec = Spec {
        trees: vec![chain(3), star(4)],
        prefix_lens: vec![5, 17],
        num_q_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        rope: Some(RopeStyle::Neox),
    };
    let good = Problem::<f16>::random(&mut rng, &spec);
    let modified = |f: &dyn Fn(&mut Problem<f16>)| {
        let mut p = good.clone();
        f(&mut p);
        bad(&p)
    };
    // Parents out of order, or below -1.
    assert_eq!(modified(&|p| p.parents[4] = 2), "parents[4]");
    assert_eq!(modified(&|p| p.parents[1] = 1), "parents[1]");
    assert_eq!(modified(&|p| p.parents[2] = -7), "parents[2]");
    // Page-table entries out of range (a used entry; unused ones are never read).
    assert_eq!(
        modified(&|p| p.page_table[0] = p.shape.cache.num_pages as i32),
        "page_table[0]"
    );
    assert_eq!(modified(&|p| p.page_table[4] = -1), "page_table[4]");
    // A shape built field by field (its fields are public) is re-checked, not trusted.
    assert_eq!(modified(&|p| p.shape.cache.page_size = 0), "page_size");
    assert_eq!(modified(&|p| p.shape.cache.head_dim = 65), "head_dim");
    // Offsets out of order, and a tree above max_tree_size.
    assert_eq!(modified(&|p| p.token_offsets[1] = 8), "token_offsets[1]");
    assert_eq!(
        modified(&|p| {
            p.shape.max_tree_size = 3;
        }),
        "token_offsets[2]"
    );
    // A cache too small: the prefix and tree do not fit the request's pages; a negative prefix.
    assert_eq!(
        modified(&|p| p.prefix_lens[1] = (p.shape.cache.capacity() - 3) as i32),
        "prefix_lens[1]"
    );
    assert_eq!(modified(&|p| p.prefix_lens[0] = -1), "prefix_lens[0]");
    // A RoPE position beyond the cos/sin table.
    assert_eq!(
        modified(&|p| {
            // Request 1's depth-1 nodes after 17 cached tokens need position 18.
            p.shape.rope.as_mut().unwrap().max_position = 18;
            p.cos_sin.as_mut().unwrap().truncate(18 * 64);
        }),
        "cos_sin_cache"
    );
    // Wrong lengths and a non-finite scale.
    assert_eq!(
        modified(&|p| {
            p.q.pop();
        }),
        "q"
    );
    assert_eq!(
        modified(&|p| {
            p.k_cache.pop();
        }),
        "k_cache"
    );
    assert_eq!(modified(&|p| p.scale = f32::NAN), "softmax_scale");
    // Two requests appending to the same cache row.
    assert_eq!(
        modified(&|p| {
            let ppr = p.shape.cache.pages_per_request;
            p.page_table[ppr + 1] = p.page_table[0];
            p.prefix_lens[1] = 16 + 5;
        }),
        "page_table[4]"
    );
    // More than 64 nodes is refused by the shape itself.
    let err = TreeAttentionShape::new(1, 65, 4, 65, good.shape.cache, None).unwrap_err();
    assert_eq!(argument(err), "max_tree_size");
}

/// Compaction against a copy made here through the logical view, for several layers, including a path
/// already in place (nothing moves) and overlapping moves.
#[test]
fn compaction_matches_a_reference_copy() {
    let mut rng = rng("compaction_matches_a_reference_copy");
    let (ps, hkv, d, layers) = (16, 2, 64, 3);
    let prefix_lens = [0i32, 13, 40, 7];
    let paths: [&[i32]; 4] = [&[0, 1, 2], &[0, 2, 3, 9], &[1, 5, 6, 7, 8], &[]];
    let pages_per_request = 5;
    let num_pages = 4 * pages_per_request + 2;
    let cache = PagedCacheShape::new(num_pages, ps, hkv, d, pages_per_request).unwrap();
    let mut pool: Vec<i32> = (0..num_pages as i32).collect();
    rand::seq::SliceRandom::shuffle(&mut pool[..], &mut rng);
    let page_table: Vec<i32> = pool[..4 * pages_per_request].to_vec();
    let mut offsets = vec![0i32];
    for p in paths {
        offsets.push(offsets.last().unwrap() + p.len() as i32);
    }
    let nodes: Vec<i32> = paths.concat();
    let shape = CompactionShape::new(4, layers, nodes.len(), cache).unwrap();
    // Sizes beyond the limits name themselves (num_accepted was reported as num_requests).
    let too_many = |requests, accepted| {
        argument(CompactionShape::new(requests, layers, accepted, cache).unwrap_err())
    };
    assert_eq!(too_many(4, 1 << 40), "num_accepted");
    assert_eq!(too_many(65535 * 1024 + 1, 0), "num_requests");
    let index = |b: usize, t: usize, h: usize| {
        let page = page_table[b * pages_per_request + t / ps] as usize;
        ((page * ps + t % ps) * hkv + h) * d
    };
    let mut caches: Vec<Vec<f16>> = (0..2 * layers)
        .map(|_| {
            (0..cache.cache_len())
                .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)))
                .collect()
        })
        .collect();
    let mut want = caches.clone();
    for c in &mut want {
        let old = c.clone();
        for (b, p) in paths.iter().enumerate() {
            for (j, &node) in p.iter().enumerate() {
                for h in 0..hkv {
                    let from = index(b, prefix_lens[b] as usize + node as usize, h);
                    let to = index(b, prefix_lens[b] as usize + j, h);
                    c[to..to + d].copy_from_slice(&old[from..from + d]);
                }
            }
        }
    }
    let (k, v) = caches.split_at_mut(layers);
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
        None,
    )
    .unwrap();
    assert!(
        caches == want,
        "compacted caches differ from the reference copy"
    );

    // Bad paths are named and nothing moves.
    let before = caches.clone();
    let (k, v) = caches.split_at_mut(layers);
    let mut k: Vec<&mut [f16]> = k.iter_mut().map(|c| c.as_mut_slice()).collect();
    let mut v: Vec<&mut [f16]> = v.iter_mut().map(|c| c.as_mut_slice()).collect();
    let mut decreasing = nodes.clone();
    decreasing.swap(4, 5);
    let err = cpu::tree_kv_compact(
        &shape,
        &offsets,
        &decreasing,
        &prefix_lens,
        &page_table,
        &mut k,
        &mut v,
        None,
    );
    assert_eq!(argument(err.unwrap_err()), "accepted_nodes[5]");
    let mut too_far = prefix_lens;
    too_far[2] = (5 * ps - 8) as i32;
    let err = cpu::tree_kv_compact(
        &shape,
        &offsets,
        &nodes,
        &too_far,
        &page_table,
        &mut k,
        &mut v,
        None,
    );
    assert_eq!(argument(err.unwrap_err()), "prefix_lens[2]");
    let mut bad_table = page_table.clone();
    bad_table[pages_per_request] = num_pages as i32;
    let err = cpu::tree_kv_compact(
        &shape,
        &offsets,
        &nodes,
        &prefix_lens,
        &bad_table,
        &mut k,
        &mut v,
        None,
    );
    assert_eq!(
        argument(err.unwrap_err()),
        format!("page_table[{pages_per_request}]")
    );
    drop((k, v));
    assert!(caches == before, "a rejected call moved entries");
}

/// A NaN key rotated by RoPE is appended as 0x7FFF whatever its sign and payload: the NaN the GPU's conversion
/// writes (the PTX ISA's `cvt.rn.f16.f32` / `.bf16.f32`, like CUDA's host `__float2half_rn`), so the CPU and
/// CUDA backends append the same bits. Without RoPE keys and values are copied, payload and all. (Before,
/// the CPU kept the sign and payload through RoPE.)
#[test]
fn nan_keys_are_appended_with_the_bits_the_gpu_writes() {
    fn case<T: HalfElement>(rng: &mut StdRng, nans: [u16; 3], from_bits: fn(u16) -> T) {
        for rope in [None, Some(RopeStyle::Neox), Some(RopeStyle::Gptj)] {
            let (p, at) = common::attention::with_payload_nans(rng, rope, nans, from_bits);
            let (_, _, k_cache, v_cache) = p.run_cpu();
            let (hkv, d) = (2, 64);
            let mut nan_keys = 0;
            for b in 0..2 {
                for (node, row) in p.rows(b).enumerate() {
                    for h in 0..hkv {
                        let slot = p.cache_index(b, p.prefix_lens[b] as usize + node, h);
                        let input = (row * hkv + h) * d;
                        for j in 0..d {
                            let (key, value) =
                                (k_cache[slot + j].to_bits(), v_cache[slot + j].to_bits());
                            assert_eq!(
                                value,
                                p.v[input + j].to_bits(),
                                "{rope:?}: values are copied"
                            );
                            if rope.is_none() {
                                assert_eq!(
                                    key,
                                    p.k[input + j].to_bits(),
                                    "keys are copied without RoPE"
                                );
                            } else if k_cache[slot + j].to_f32().is_nan() {
                                assert_eq!(key, 0x7FFF, "{rope:?}: a rotated NaN key");
                                nan_keys += 1;
                            }
                        }
                    }
                }
            }
            // Every NaN input makes its pair NaN: at least as many NaN keys as NaN inputs.
            assert!(
                rope.is_none() || nan_keys >= at.len(),
                "{rope:?}: {nan_keys} NaN keys"
            );
        }
    }
    let mut rng = rng("nan_keys_are_appended_with_the_bits_the_gpu_writes");
    case(
        &mut rng,
        common::attention::F16_PAYLOAD_NANS,
        f16::from_bits,
    );
    case(
        &mut rng,
        common::attention::BF16_PAYLOAD_NANS,
        bf16::from_bits,
    );
}
