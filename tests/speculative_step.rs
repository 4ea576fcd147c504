//! The glue of speculative decoding steps on the CPU, through `specdec::tree`'s one vocabulary. Each step takes a
//! verification tree per request from a suffix drafter's chain or tree proposal, from the policy's largest tree
//! (63 drafts: 64 nodes with the root), or no drafts at all; runs tree attention over a paged cache (appending the
//! nodes' KV, rotated at their depths); computes the target's logits from the attention outputs; verifies with the
//! rejection sampler; converts its accepted paths for compaction and compacts. After every step each request's
//! cache must hold exactly, bit for bit, the KV of its accepted sequence as if every token had been appended one
//! after another: what the next step's attention reads.

mod common;

use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;
use specdec::attention::{
    CompactionShape, PagedCacheShape, RopeShape, RopeStyle, TreeAttentionShape, TreeBatch,
    MAX_TREE_NODES,
};
use specdec::drafter::{DraftKind, Drafter, DrafterConfig};
use specdec::policy::DraftTree;
use specdec::sampling::{Drafts, Rows, SamplingParams, VerifyInputs, VerifyOutputs};
use specdec::tree::{compaction_paths, PackedTrees, VerifyTree, MAX_DRAFTS};

const V: usize = 48;
const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 64;
const PAGE: usize = 16;
const PAGES_PER_REQUEST: usize = 48;
const MAX_POSITION: usize = PAGE * PAGES_PER_REQUEST;

/// The token the toy target strongly prefers after `t`.
fn next(t: i32) -> i32 {
    (7 * t + 3) % V as i32
}

/// A toy target: per-token q, k, v rows and an output projection to logits, all fixed pseudo-random values.
struct Target {
    qkv: Vec<[Vec<bf16>; 3]>,
    w: Vec<f32>,
    cos_sin: Vec<f32>,
}

impl Target {
    fn new(rng: &mut StdRng) -> Target {
        let mut row = |n: usize| -> Vec<bf16> {
            (0..n)
                .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
                .collect()
        };
        let qkv = (0..V)
            .map(|_| [row(HQ * D), row(HKV * D), row(HKV * D)])
            .collect();
        let w = (0..V * HQ * D)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut cos_sin = vec![0.0f32; MAX_POSITION * D];
        for p in 0..MAX_POSITION {
            for j in 0..D / 2 {
                let angle = p as f64 / 10000f64.powf(2.0 * j as f64 / D as f64);
                cos_sin[p * D + j] = angle.cos() as f32;
                cos_sin[p * D + D / 2 + j] = angle.sin() as f32;
            }
        }
        Target { qkv, w, cos_sin }
    }

    /// Logits after a node: a strong preference for `next(token)` plus a term from the node's attention output,
    /// so that what attention read decides the sampler's draws.
    fn logits(&self, token: i32, out: &[bf16]) -> Vec<f32> {
        (0..V)
            .map(|x| {
                let from_attention: f32 = out
                    .iter()
                    .zip(&self.w[x * HQ * D..(x + 1) * HQ * D])
                    .map(|(o, w)| o.to_f32() * w)
                    .sum();
                let preferred = if x as i32 == next(token) { 8.0 } else { 0.0 };
                preferred + 0.05 * from_attention
            })
            .collect()
    }
}

/// A paged cache of one layer, each request owning a disjoint run of pages (shuffled).
struct Cache {
    shape: PagedCacheShape,
    page_table: Vec<i32>,
    k: Vec<bf16>,
    v: Vec<bf16>,
}

impl Cache {
    fn new(requests: usize, page_table: Vec<i32>) -> Cache {
        let shape = PagedCacheShape::new(
            requests * PAGES_PER_REQUEST,
            PAGE,
            HKV,
            D,
            PAGES_PER_REQUEST,
        )
        .unwrap();
        let poison = bf16::from_f32(-777.0);
        Cache {
            shape,
            page_table,
            k: vec![poison; shape.cache_len()],
            v: vec![poison; shape.cache_len()],
        }
    }

    /// Tree attention over `trees` (request `b` has `prefix_lens[b]` tokens cached): appends their KV and returns
    /// the outputs `[N, HQ, D]`.
    fn attend(&mut self, target: &Target, trees: &[VerifyTree], prefix_lens: &[i32]) -> Vec<bf16> {
        let packed = PackedTrees::new(trees);
        let n = packed.tokens.len();
        let shape = TreeAttentionShape::new(
            trees.len(),
            n,
            HQ,
            packed.max_tree_size,
            self.shape,
            Some(RopeShape {
                style: RopeStyle::Neox,
                max_position: MAX_POSITION,
            }),
        )
        .unwrap();
        let rows = |which: usize| -> Vec<bf16> {
            packed
                .tokens
                .iter()
                .flat_map(|&t| target.qkv[t as usize][which].clone())
                .collect()
        };
        let (q, k, v) = (rows(0), rows(1), rows(2));
        let mut out = vec![bf16::ZERO; n * HQ * D];
        specdec::cpu::tree_attention(
            &shape,
            &q,
            &k,
            &v,
            &TreeBatch {
                token_offsets: &packed.offsets,
                parents: &packed.parents,
                prefix_lens,
                page_table: &self.page_table,
            },
            Some(&target.cos_sin),
            1.0 / (D as f32).sqrt(),
            &mut self.k,
            &mut self.v,
            &mut out,
            None,
            None,
        )
        .unwrap();
        out
    }

    /// Request `b`'s cached keys and values of slots `0..len`.
    fn slots(&self, b: usize, len: usize) -> Vec<(Vec<bf16>, Vec<bf16>)> {
        (0..len)
            .map(|t| {
                let at = self.shape.slot_offset(&self.page_table, b, t, 0);
                (
                    self.k[at..at + HKV * D].to_vec(),
                    self.v[at..at + HKV * D].to_vec(),
                )
            })
            .collect()
    }
}

/// Appends `tokens` to every request's cache one chain of at most MAX_TREE_NODES at a time: the reference layout.
fn append_sequences(cache: &mut Cache, target: &Target, sequences: &[Vec<i32>]) {
    let mut cached = vec![0usize; sequences.len()];
    while cached.iter().zip(sequences).any(|(&c, s)| c < s.len()) {
        let trees: Vec<VerifyTree> = sequences
            .iter()
            .zip(&cached)
            .map(|(s, &c)| {
                let end = s.len().min(c + MAX_TREE_NODES);
                match &s[c..end] {
                    [] => VerifyTree::root(0),
                    [first, rest @ ..] => VerifyTree::chain(*first, rest).unwrap(),
                }
            })
            .collect();
        // A request with nothing left appends its placeholder root past its sequence, where nothing is read.
        let prefix_lens: Vec<i32> = cached.iter().map(|&c| c as i32).collect();
        cache.attend(target, &trees, &prefix_lens);
        for (c, s) in cached.iter_mut().zip(sequences) {
            *c = s.len().min(*c + MAX_TREE_NODES);
        }
    }
}

/// How a request drafts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    DrafterChain,
    DrafterTree,
    PolicyTree,
    Nothing,
}

#[test]
fn accepted_paths_reach_the_next_steps_attention_exactly() {
    let mut rng = common::rng("accepted_paths_reach_the_next_steps_attention_exactly");
    let target = Target::new(&mut rng);
    let sources = [
        Source::DrafterChain,
        Source::DrafterTree,
        Source::PolicyTree,
        Source::Nothing,
        Source::PolicyTree,
    ];
    let b = sources.len();
    let mut pages: Vec<i32> = (0..(b * PAGES_PER_REQUEST) as i32).collect();
    rand::seq::SliceRandom::shuffle(&mut pages[..], &mut rng);
    let mut cache = Cache::new(b, pages.clone());

    // The drafter's history: finished rollouts of the same prompt that follow the target's preference, with a
    // wrong token now and then, so that its proposals are long and mostly right.
    let drafter = Drafter::new(DrafterConfig {
        max_draft: MAX_DRAFTS,
        ..DrafterConfig::default()
    })
    .unwrap();
    for r in 0..6u64 {
        let mut t = rng.random_range(0..V as i32);
        let rollout: Vec<u32> = (0..300)
            .map(|_| {
                t = if rng.random_bool(0.03) {
                    rng.random_range(0..V as i32)
                } else {
                    next(t)
                };
                t as u32
            })
            .collect();
        drafter.add_request(1000 + r, 7, &[]).unwrap();
        drafter.append(1000 + r, &rollout).unwrap();
        drafter.finish_request(1000 + r).unwrap();
    }

    // Prompts: 20 tokens each; everything but the last token is cached by a prefill.
    let mut sequences: Vec<Vec<i32>> = (0..b)
        .map(|_| (0..20).map(|_| rng.random_range(0..V as i32)).collect())
        .collect();
    for (i, s) in sequences.iter().enumerate() {
        let prompt: Vec<u32> = s.iter().map(|&t| t as u32).collect();
        drafter.add_request(i as u64, 7, &prompt).unwrap();
    }
    let cached_part = |s: &Vec<i32>| s[..s.len() - 1].to_vec();
    append_sequences(
        &mut cache,
        &target,
        &sequences.iter().map(cached_part).collect::<Vec<_>>(),
    );
    // The policy's largest tree for a drafter accepted 90% of the time at every depth.
    let policy = DraftTree::best_first(|_| 0.9, MAX_DRAFTS, 16);
    assert_eq!(policy.drafts(), MAX_DRAFTS);

    let (mut full_trees, mut moved, mut accepted_total) = (0, 0, 0);
    for step in 0..5u64 {
        let trees: Vec<VerifyTree> = sources
            .iter()
            .zip(&sequences)
            .enumerate()
            .map(|(i, (source, s))| {
                let root = *s.last().unwrap();
                match source {
                    Source::DrafterChain | Source::DrafterTree => {
                        let kind = if *source == Source::DrafterChain {
                            DraftKind::Chain
                        } else {
                            DraftKind::Tree
                        };
                        let draft = drafter.propose(i as u64, kind).unwrap();
                        VerifyTree::from_draft(root, &draft).unwrap()
                    }
                    Source::PolicyTree => {
                        // One child of each node follows the target's preference: the second where an odd node
                        // has two or more (so accepted paths leave the first nodes and compaction moves KV),
                        // else the first. Its siblings do not.
                        let parents = policy.verification_parents();
                        let mut children = vec![0; parents.len()];
                        for &p in &parents[1..] {
                            children[p as usize] += 1;
                        }
                        let mut tokens = vec![root];
                        for (&parent, &rank) in parents.iter().zip(&policy.ranks).skip(1) {
                            let p = parent as usize;
                            let preferred = if p % 2 == 1 && children[p] >= 2 { 2 } else { 1 };
                            let rank = rank as i32;
                            let above = tokens[p];
                            tokens.push(if rank == preferred {
                                next(above)
                            } else {
                                (next(above) + rank) % V as i32
                            });
                        }
                        VerifyTree::new(tokens, parents).unwrap()
                    }
                    Source::Nothing => VerifyTree::root(root),
                }
            })
            .collect();
        full_trees += trees.iter().filter(|t| t.len() == MAX_TREE_NODES).count();

        // Tree attention, then the target's logits from its outputs.
        let prefix_lens: Vec<i32> = sequences.iter().map(|s| s.len() as i32 - 1).collect();
        let out = cache.attend(&target, &trees, &prefix_lens);
        let packed = PackedTrees::new(&trees);
        let logits: Vec<f32> = packed
            .tokens
            .iter()
            .enumerate()
            .flat_map(|(row, &t)| target.logits(t, &out[row * HQ * D..(row + 1) * HQ * D]))
            .collect();

        // The sampler.
        let width = packed.emit_width;
        let (mut accepted, mut emitted, mut nodes) =
            (vec![0; b], vec![0; b * width], vec![0; b * width]);
        specdec::cpu::rejection_verify(
            &VerifyInputs {
                vocab_size: V,
                drafts: Drafts::Tree {
                    node_offsets: (&packed.offsets).into(),
                    node_tokens: (&packed.tokens).into(),
                    parents: (&packed.parents).into(),
                },
                target: Rows::LogitsF32((&logits).into()),
                draft: None,
                params: Some(SamplingParams {
                    temperature: (&vec![1.0; b]).into(),
                    top_k: None,
                    top_p: None,
                }),
                draft_params: None,
                seeds: (&(0..b as u64).map(|i| 17 * i + 5).collect::<Vec<_>>()).into(),
                steps: (&vec![step; b]).into(),
            },
            VerifyOutputs {
                emit_width: width,
                accepted_counts: (&mut accepted).into(),
                emitted_tokens: (&mut emitted).into(),
                accepted_nodes: Some((&mut nodes).into()),
                accept_flags: None,
                request_status: None,
            },
        )
        .unwrap();

        // Compaction of the accepted paths, root first.
        let (offsets, paths) = compaction_paths(&accepted, &nodes, width).unwrap();
        moved += paths
            .iter()
            .enumerate()
            .filter(|&(j, &node)| {
                let request = offsets.partition_point(|&o| o as usize <= j) - 1;
                node as usize != j - offsets[request] as usize
            })
            .count();
        let shape = CompactionShape::new(b, 1, paths.len(), cache.shape).unwrap();
        specdec::cpu::tree_kv_compact(
            &shape,
            &offsets,
            &paths,
            &prefix_lens,
            &cache.page_table,
            &mut [&mut cache.k[..]],
            &mut [&mut cache.v[..]],
            None,
        )
        .unwrap();

        // The accepted tokens are the path's tokens; then the correction or bonus token, the next root.
        for r in 0..b {
            let n = accepted[r] as usize;
            let tree = &trees[r];
            for j in 0..n {
                assert_eq!(
                    emitted[r * width + j],
                    tree.tokens()[nodes[r * width + j] as usize],
                    "step {step}, request {r}: accepted token {j}"
                );
            }
            let verified = &emitted[r * width..r * width + n + 1];
            sequences[r].extend_from_slice(verified);
            let appended: Vec<u32> = verified.iter().map(|&t| t as u32).collect();
            drafter.append(r as u64, &appended).unwrap();
            accepted_total += n;
        }

        // What the next step's attention reads: every cached slot equals the reference appended token by token.
        let mut reference = Cache::new(b, pages.clone());
        append_sequences(
            &mut reference,
            &target,
            &sequences.iter().map(cached_part).collect::<Vec<_>>(),
        );
        for (r, s) in sequences.iter().enumerate() {
            let len = s.len() - 1;
            assert!(
                cache.slots(r, len) == reference.slots(r, len),
                "step {step}, request {r} ({:?}): the cache differs from the accepted sequence's KV",
                sources[r]
            );
        }
    }
    eprintln!(
        "5 steps of {b} requests: {accepted_total} drafts accepted, {moved} KV entries moved by compaction, \
         {full_trees} trees of {MAX_TREE_NODES} nodes"
    );
    assert!(moved > 0, "compaction moved something");
    assert!(accepted_total > 50, "drafts were accepted");
}
