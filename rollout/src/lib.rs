//! specdec's main job on a real model: RL rollouts of SmolLM2-135M-Instruct with and without speculation,
//! every step through specdec's primitives (issue 19).
//!
//! * [`model`]: the GGUF file (fetched by `scripts/fetch-model.sh`), its configuration, its weights dequantized
//!   to f32 (the target) with candle.
//! * [`tokenizer`]: the byte-level BPE tokenizer built from the file's vocabulary and merges with the
//!   `tokenizers` crate, and its chat template.
//! * [`target`]: the target's forward pass, batched over every sequence's new tokens as trees, with specdec's
//!   tree attention over a paged KV cache and its compaction of accepted paths.
//! * [`engine`]: the decoding loop: trees of drafts verified by specdec's rejection sampler, autoregressive
//!   decoding through the same calls.
//! * [`policy`]: specdec's cost model calibrated on this machine, for the goodput policy.
//! * [`pq`]: the target's and the int4 drafter's rows at drafted positions, logged, and the tree policy's
//!   sibling law measured on them.
//! * [`selfdraft`]: EfficientRollout's int4 self-drafter, requantized from the target with specdec's quantizer
//!   and run through specdec's int4 GEMV.

pub mod engine;
pub mod model;
pub mod policy;
pub mod pq;
pub mod selfdraft;
pub mod target;
pub mod tokenizer;
