//! The target model's forward pass: a Llama decoder in f32, batched over every sequence's new tokens, each
//! sequence's tokens a tree (one node when decoding, a chain when prefilling, a draft tree when verifying).
//!
//! The matmuls are candle's (f32). Attention is specdec's tree attention over a paged KV cache in fp16
//! ([`specdec::attention`]): in one call per layer it rotates the new queries and keys (RoPE), appends the keys and
//! values at the sequence's next slots, and attends to the cached prefix and each node's ancestors. After
//! verification, [`Target::accept`] moves the accepted path's KV into place with specdec's compaction, in every
//! layer at once.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor, D};
use specdec::attention::{
    CompactionShape, PagedCacheShape, RopeShape, RopeStyle, TreeAttentionShape, TreeBatch,
    MAX_TREE_NODES,
};
use specdec::half::f16;

use crate::model::{Config, Weights};
use crate::selfdraft::{Int4Linear, Int4Model};

/// A sequence's handle in a [`Target`]. Its slot is reused after [`Target::release`], but never its
/// generation: a released handle is refused, not taken for the slot's next sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SequenceId {
    slot: usize,
    generation: u64,
}

/// The new tokens of one sequence in a forward pass: a tree whose nodes are `tokens`, `parents[i]` the index
/// of node `i`'s parent (`-1` for a root, parents before children). Node `i` sits at position
/// `len + depth(i)` of the sequence.
#[derive(Debug, Clone, Copy)]
pub struct TreeInput<'a> {
    /// The sequence.
    pub sequence: SequenceId,
    /// `[T]` token ids, `1 <= T <=` [`MAX_TREE_NODES`].
    pub tokens: &'a [u32],
    /// `[T]`.
    pub parents: &'a [i32],
}

/// A chain's parents: `[-1, 0, 1, ..]`.
pub fn chain_parents(len: usize) -> Vec<i32> {
    (0..len as i32).map(|i| i - 1).collect()
}

#[derive(Debug, Clone, Default)]
struct Sequence {
    /// The generation of the handle that owns it.
    generation: u64,
    /// Pages of the cache, in order.
    pages: Vec<i32>,
    /// Tokens in the cache (committed).
    len: usize,
    /// Nodes appended by the last forward pass, not yet accepted.
    pending: usize,
    /// Their parents (inside that tree), to check accepted paths.
    pending_parents: Vec<i32>,
}

/// The paged KV cache of every layer, fp16, in specdec's layout (`[num_pages, page_size, Hkv, D]` per layer).
struct KvCache {
    shape: PagedCacheShape,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    free_pages: Vec<i32>,
}

/// The target model and its KV cache.
pub struct Target {
    weights: Weights,
    cache: KvCache,
    sequences: Vec<Option<Sequence>>,
    next_generation: u64,
    rope: RopeShape,
    /// `[max_position, D]`: cos of the `D / 2` frequencies at each position, then their sin (f32).
    cos_sin: Vec<f32>,
    /// Time spent in tree attention (KV append, RoPE and attention), all layers, since creation.
    attention_time: Duration,
    /// The int4 self-drafter, once [`Target::requantize_drafter`] made it.
    drafter: Option<Int4Model>,
}

/// How many tokens one sequence may hold, at most.
pub const DEFAULT_MAX_SEQUENCE_LEN: usize = 2048;

/// The RoPE pairing of a Llama GGUF's weights. llama.cpp's converter permutes the rows of Q and K so that its
/// rotation of adjacent pairs computes the original model's rotation of halves; the agreement test against
/// candle-transformers (tests/model.rs) establishes it for the files this engine reads.
pub const GGUF_LLAMA_ROPE: RopeStyle = RopeStyle::Gptj;

impl Target {
    /// A target over `weights` with a cache of `num_pages` pages of `page_size` tokens, each sequence holding
    /// up to `max_sequence_len` tokens.
    ///
    /// # Errors
    /// A head dimension specdec's attention does not support, or a cache geometry it rejects.
    pub fn new(
        weights: Weights,
        num_pages: usize,
        page_size: usize,
        max_sequence_len: usize,
        rope_style: RopeStyle,
    ) -> Result<Self> {
        let c = weights.config;
        let pages_per_request = max_sequence_len.div_ceil(page_size);
        let shape = PagedCacheShape::new(
            num_pages,
            page_size,
            c.num_kv_heads,
            c.head_dim,
            pages_per_request,
        )
        .context("the KV cache's geometry")?;
        let max_position = pages_per_request * page_size;
        let elements = shape.cache_len();
        Ok(Target {
            cache: KvCache {
                shape,
                k: vec![vec![f16::ZERO; elements]; c.num_layers],
                v: vec![vec![f16::ZERO; elements]; c.num_layers],
                free_pages: (0..num_pages as i32).rev().collect(),
            },
            sequences: Vec::new(),
            next_generation: 0,
            rope: RopeShape {
                style: rope_style,
                max_position,
            },
            cos_sin: cos_sin_table(c.head_dim, c.rope_base, max_position),
            attention_time: Duration::ZERO,
            drafter: None,
            weights,
        })
    }

    /// Makes (or remakes, after a weight update) the int4 self-drafter from the current weights; returns the
    /// time the requantization took.
    ///
    /// # Errors
    /// A weight shape the int4 format cannot hold.
    pub fn requantize_drafter(&mut self) -> Result<Duration> {
        let (model, took) = Int4Model::requantize(&self.weights)?;
        self.drafter = Some(model);
        Ok(took)
    }

    /// The int4 self-drafter, if made.
    pub fn drafter(&self) -> Option<&Int4Model> {
        self.drafter.as_ref()
    }

    /// The model's sizes.
    pub fn config(&self) -> &Config {
        &self.weights.config
    }

    /// The weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Time spent in specdec's tree attention (KV append, RoPE, attention) since the target was made.
    pub fn attention_time(&self) -> Duration {
        self.attention_time
    }

    /// The weights back, the cache dropped.
    pub fn into_weights(self) -> Weights {
        self.weights
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SequenceId {
        let slot = self.sequences.iter().position(Option::is_none);
        let slot = slot.unwrap_or_else(|| {
            self.sequences.push(None);
            self.sequences.len() - 1
        });
        let generation = self.next_generation;
        self.next_generation += 1;
        self.sequences[slot] = Some(Sequence {
            generation,
            ..Sequence::default()
        });
        SequenceId { slot, generation }
    }

    /// A new sequence holding a copy of `id`'s cached tokens (the rollouts of one prompt share its prefill).
    ///
    /// # Errors
    /// An unknown sequence, one with pending nodes, or a cache with too few free pages.
    pub fn fork(&mut self, id: SequenceId) -> Result<SequenceId> {
        let source = self.sequence(id)?.clone();
        ensure!(
            source.pending == 0,
            "sequence {id:?} has nodes not yet accepted"
        );
        let copy = self.add_sequence();
        if let Err(e) = self.reserve(copy, source.len) {
            self.release(copy)?;
            return Err(e);
        }
        let page_elements =
            self.cache.shape.page_size * self.cache.shape.num_kv_heads * self.cache.shape.head_dim;
        let pages = &self.sequences[copy.slot].as_ref().unwrap().pages;
        for layer in self.cache.k.iter_mut().chain(self.cache.v.iter_mut()) {
            for (&from, &to) in source.pages.iter().zip(pages) {
                let (from, to) = (from as usize * page_elements, to as usize * page_elements);
                layer.copy_within(from..from + page_elements, to);
            }
        }
        self.sequences[copy.slot].as_mut().unwrap().len = source.len;
        Ok(copy)
    }

    /// Frees a sequence's pages.
    ///
    /// # Errors
    /// An unknown sequence.
    pub fn release(&mut self, id: SequenceId) -> Result<()> {
        self.sequence(id)?;
        let seq = self.sequences[id.slot].take().expect("checked above");
        self.cache.free_pages.extend(seq.pages);
        Ok(())
    }

    /// The most tokens one sequence can hold (cached, plus a tree being verified).
    pub fn max_sequence_len(&self) -> usize {
        self.cache.shape.pages_per_request * self.cache.shape.page_size
    }

    /// Tokens in a sequence's cache.
    ///
    /// # Errors
    /// An unknown sequence.
    pub fn len(&self, id: SequenceId) -> Result<usize> {
        Ok(self.sequence(id)?.len)
    }

    fn sequence(&self, id: SequenceId) -> Result<&Sequence> {
        self.sequences
            .get(id.slot)
            .and_then(Option::as_ref)
            .filter(|s| s.generation == id.generation)
            .with_context(|| format!("sequence {id:?} is not in the target"))
    }

    /// The forward pass over every input's tree: appends their KV to the cache (pending until
    /// [`Target::accept`]) and returns the logits, `[N, vocab]` f32, row `offset_b + i` for node `i` of input
    /// `b` (inputs in order).
    ///
    /// # Errors
    /// An unknown or repeated sequence, a sequence with pending nodes, a bad tree, a token outside the
    /// vocabulary, or a cache with no free page.
    pub fn forward(&mut self, inputs: &[TreeInput<'_>]) -> Result<Tensor> {
        self.forward_through(inputs, false)
    }

    /// [`Target::forward`] through the int4 self-drafter's linears instead of the target's (embedding, norms,
    /// attention and KV cache shared): the drafter's KV is appended after the target's, pending as with
    /// `forward`. A draft step is this, then [`Target::accept`] of its one node; [`Target::rewind`] drops the
    /// drafted tokens before their verification, which writes the target's KV over them.
    ///
    /// # Errors
    /// As `forward`, or no drafter made ([`Target::requantize_drafter`]).
    pub fn draft_forward(&mut self, inputs: &[TreeInput<'_>]) -> Result<Tensor> {
        ensure!(
            self.drafter.is_some(),
            "draft_forward: no int4 drafter (requantize_drafter makes it)"
        );
        self.forward_through(inputs, true)
    }

    /// Drops the last `tokens` tokens of a sequence (drafted tokens, before their verification).
    ///
    /// # Errors
    /// An unknown sequence, one with pending nodes, or fewer tokens than `tokens`.
    pub fn rewind(&mut self, id: SequenceId, tokens: usize) -> Result<()> {
        let seq = self.sequence(id)?;
        ensure!(
            seq.pending == 0,
            "rewind: sequence {id:?} has {} nodes not yet accepted",
            seq.pending
        );
        ensure!(
            tokens <= seq.len,
            "rewind: {tokens} tokens from a sequence of {}",
            seq.len
        );
        self.sequences[id.slot].as_mut().unwrap().len -= tokens;
        Ok(())
    }

    fn forward_through(&mut self, inputs: &[TreeInput<'_>], drafter: bool) -> Result<Tensor> {
        ensure!(!inputs.is_empty(), "forward: no inputs");
        let c = self.weights.config;
        let mut token_offsets = vec![0i32];
        let mut parents = Vec::new();
        let mut tokens = Vec::new();
        let mut prefix_lens = Vec::new();
        let mut max_tree_size = 1;
        for (b, input) in inputs.iter().enumerate() {
            let t = input.tokens.len();
            ensure!(
                (1..=MAX_TREE_NODES).contains(&t) && input.parents.len() == t,
                "input {b}: {t} tokens and {} parents (1..={MAX_TREE_NODES} nodes, one parent each)",
                input.parents.len()
            );
            if let Some(&bad) = input.tokens.iter().find(|&&tok| tok as usize >= c.vocab) {
                bail!(
                    "input {b}: token {bad} is outside the vocabulary of {}",
                    c.vocab
                );
            }
            if inputs[..b]
                .iter()
                .any(|other| other.sequence == input.sequence)
            {
                bail!("input {b}: sequence {:?} appears twice", input.sequence);
            }
            let seq = self.sequence(input.sequence)?;
            ensure!(
                seq.pending == 0,
                "input {b}: sequence {:?} has {} nodes not yet accepted",
                input.sequence,
                seq.pending
            );
            prefix_lens.push(seq.len as i32);
            max_tree_size = max_tree_size.max(t);
            tokens.extend_from_slice(input.tokens);
            parents.extend_from_slice(input.parents);
            token_offsets.push(tokens.len() as i32);
        }
        for input in inputs {
            self.reserve(input.sequence, input.tokens.len())?;
        }
        let page_table = self.page_table(inputs.iter().map(|i| i.sequence))?;
        let batch = TreeBatch {
            token_offsets: &token_offsets,
            parents: &parents,
            prefix_lens: &prefix_lens,
            page_table: &page_table,
        };
        let shape = TreeAttentionShape::new(
            inputs.len(),
            tokens.len(),
            c.num_q_heads,
            max_tree_size,
            self.cache.shape,
            Some(self.rope),
        )?;
        let logits = self.layers(&tokens, &shape, &batch, drafter)?;
        for input in inputs {
            let seq = self.sequences[input.sequence.slot].as_mut().unwrap();
            seq.pending = input.tokens.len();
            seq.pending_parents = input.parents.to_vec();
        }
        Ok(logits)
    }

    /// The blocks and the head, through the target's linears or (`drafter`) the int4 self-drafter's.
    fn layers(
        &mut self,
        tokens: &[u32],
        shape: &TreeAttentionShape,
        batch: &TreeBatch<'_>,
        drafter: bool,
    ) -> Result<Tensor> {
        let int4 = if drafter {
            Some(self.drafter.as_ref().context("no int4 drafter")?)
        } else {
            None
        };
        let c = self.weights.config;
        let n = tokens.len();
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let mut x = self.weights.embedding.index_select(&ids, 0)?;
        let softmax_scale = 1.0 / (c.head_dim as f32).sqrt();
        let mut attn_out = vec![f16::ZERO; shape.q_len()];
        for (layer, block) in self.weights.blocks.iter().enumerate() {
            let small = int4.map(|m| &m.blocks[layer]);
            let h = rms_norm(&x, &block.attn_norm, c.rms_eps)?;
            let q = to_f16(&project(&h, &block.wq, small.map(|b| &b.wq))?)?;
            let k = to_f16(&project(&h, &block.wk, small.map(|b| &b.wk))?)?;
            let v = to_f16(&project(&h, &block.wv, small.map(|b| &b.wv))?)?;
            let start = Instant::now();
            specdec::cpu::tree_attention(
                shape,
                &q,
                &k,
                &v,
                batch,
                Some(&self.cos_sin),
                softmax_scale,
                &mut self.cache.k[layer],
                &mut self.cache.v[layer],
                &mut attn_out,
                None,
                None,
            )
            .with_context(|| format!("tree attention, layer {layer}"))?;
            self.attention_time += start.elapsed();
            let attn: Vec<f32> = attn_out.iter().map(|h| h.to_f32()).collect();
            let attn = Tensor::from_vec(attn, (n, c.num_q_heads * c.head_dim), &Device::Cpu)?;
            x = (x + project(&attn, &block.wo, small.map(|b| &b.wo))?)?;
            let h = rms_norm(&x, &block.ffn_norm, c.rms_eps)?;
            let gate = project(&h, &block.w_gate, small.map(|b| &b.w_gate))?.silu()?;
            let up = project(&h, &block.w_up, small.map(|b| &b.w_up))?;
            x = (x + project(&(gate * up)?, &block.w_down, small.map(|b| &b.w_down))?)?;
        }
        let h = rms_norm(&x, &self.weights.output_norm, c.rms_eps)?;
        project(&h, &self.weights.lm_head, int4.map(|m| &m.lm_head))
    }

    /// Keeps, for each sequence, the accepted nodes of its last forward pass (`accepted[b].1`: node indices
    /// of a root-to-node path, increasing; empty keeps none) and drops the rest: the accepted nodes' KV moves
    /// to the sequence's next slots in every layer (specdec's compaction) and its length grows by their
    /// number. Every sequence with pending nodes must be named.
    ///
    /// # Errors
    /// An unknown sequence, one without pending nodes, a node outside the last tree, or a path specdec's
    /// compaction rejects.
    pub fn accept(&mut self, accepted: &[(SequenceId, &[i32])]) -> Result<()> {
        let mut offsets = vec![0i32];
        let mut nodes = Vec::new();
        let mut prefix_lens = Vec::new();
        for (b, &(id, path)) in accepted.iter().enumerate() {
            let seq = self.sequence(id)?;
            ensure!(
                seq.pending > 0,
                "accepted[{b}]: sequence {id:?} has no pending nodes"
            );
            if let Some(&bad) = path.iter().find(|&&n| n < 0 || n as usize >= seq.pending) {
                bail!(
                    "accepted[{b}]: node {bad} is outside the last tree of {} nodes",
                    seq.pending
                );
            }
            prefix_lens.push(seq.len as i32);
            nodes.extend_from_slice(path);
            offsets.push(nodes.len() as i32);
        }
        let pending = self
            .sequences
            .iter()
            .flatten()
            .filter(|s| s.pending > 0)
            .count();
        ensure!(
            pending == accepted.len(),
            "accept names {} sequences; {pending} have pending nodes",
            accepted.len()
        );
        let page_table = self.page_table(accepted.iter().map(|a| a.0))?;
        let shape = CompactionShape::new(
            accepted.len(),
            self.weights.config.num_layers,
            nodes.len(),
            self.cache.shape,
        )?;
        let mut k: Vec<&mut [f16]> = self.cache.k.iter_mut().map(Vec::as_mut_slice).collect();
        let mut v: Vec<&mut [f16]> = self.cache.v.iter_mut().map(Vec::as_mut_slice).collect();
        specdec::cpu::tree_kv_compact(
            &shape,
            &offsets,
            &nodes,
            &prefix_lens,
            &page_table,
            &mut k,
            &mut v,
            None,
        )
        .context("compacting the accepted paths")?;
        for (id, path) in accepted {
            let seq = self.sequences[id.slot].as_mut().unwrap();
            seq.len += path.len();
            seq.pending = 0;
        }
        Ok(())
    }

    /// Feeds `tokens` to a sequence as chains of at most [`MAX_TREE_NODES`] tokens, all accepted, and returns
    /// the logits of every token, `[tokens.len(), vocab]`.
    ///
    /// # Errors
    /// As [`Target::forward`].
    pub fn prefill(&mut self, id: SequenceId, tokens: &[u32]) -> Result<Tensor> {
        if tokens.is_empty() {
            self.sequence(id)?;
            return Ok(Tensor::zeros(
                (0, self.weights.config.vocab),
                candle_core::DType::F32,
                &Device::Cpu,
            )?);
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(MAX_TREE_NODES) {
            let parents = chain_parents(chunk.len());
            logits.push(self.forward(&[TreeInput {
                sequence: id,
                tokens: chunk,
                parents: &parents,
            }])?);
            let all: Vec<i32> = (0..chunk.len() as i32).collect();
            self.accept(&[(id, &all)])?;
        }
        Ok(Tensor::cat(&logits, 0)?)
    }

    /// Makes sure a sequence has pages for `extra` more tokens.
    fn reserve(&mut self, id: SequenceId, extra: usize) -> Result<()> {
        let page_size = self.cache.shape.page_size;
        let max_len = self.cache.shape.pages_per_request * page_size;
        let seq = self.sequences[id.slot].as_mut().unwrap();
        let needed = seq.len + extra;
        ensure!(
            needed <= max_len,
            "sequence {id:?} would hold {needed} tokens; at most {max_len}"
        );
        while seq.pages.len() * page_size < needed {
            let page = self.cache.free_pages.pop().with_context(|| {
                format!(
                    "the KV cache is full ({} pages)",
                    self.cache.shape.num_pages
                )
            })?;
            seq.pages.push(page);
        }
        Ok(())
    }

    /// `[B, pages_per_request]`: each sequence's pages, then zeros.
    fn page_table(&self, ids: impl Iterator<Item = SequenceId>) -> Result<Vec<i32>> {
        let width = self.cache.shape.pages_per_request;
        let mut table = Vec::new();
        for id in ids {
            let pages = &self.sequence(id)?.pages;
            table.extend_from_slice(pages);
            table.resize(table.len() + width - pages.len(), 0);
        }
        Ok(table)
    }
}

/// `[max_position, D]` f32: row `p` holds `cos(p w_j)` for `j < D/2`, then `sin(p w_j)`, with
/// `w_j = base^(-2j / D)` (computed in f64, rounded once).
pub fn cos_sin_table(head_dim: usize, base: f32, max_position: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut table = Vec::with_capacity(max_position * head_dim);
    for p in 0..max_position {
        let angles: Vec<f64> = (0..half)
            .map(|j| p as f64 * f64::from(base).powf(-2.0 * j as f64 / head_dim as f64))
            .collect();
        table.extend(angles.iter().map(|a| a.cos() as f32));
        table.extend(angles.iter().map(|a| a.sin() as f32));
    }
    table
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
/// `x W` through the target's dense weight (`[in, out]`), or its int4 copy when drafting.
fn project(x: &Tensor, dense: &Tensor, int4: Option<&Int4Linear>) -> Result<Tensor> {
    match int4 {
        Some(w) => w.apply(x),
        None => Ok(x.matmul(dense)?),
    }
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_rms = (mean_square + f64::from(eps))?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv_rms)?.broadcast_mul(weight)?)
}

fn to_f16(t: &Tensor) -> Result<Vec<f16>> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(f16::from_f32)
        .collect())
}
