//! # specdec
//!
//! Hand-written CUDA kernels for speculative decoding in LLM reinforcement-learning rollouts, a CPU reference
//! backend for every primitive, and a C ABI (`include/specdec.h`) so that any engine can call the primitives on
//! its own device pointers and CUDA stream.
//!
//! * [`cpu`]: the CPU backend (readable reference implementations, and SIMD kernels where speed matters, such
//!   as the int4 GEMV); the oracle of the GPU tests and the backend without a GPU.
//! * [`cuda`]: the same primitives on a CUDA device, launched on the caller's stream.
//! * [`capi`]: the C ABI.
//!
//! Primitives so far: greedy verification ([`greedy`]); lossless rejection-sampling verification of chains and
//! trees ([`sampling`]); int4 draft weights and their GEMV ([`int4`]); tree attention over a paged KV cache
//! with KV append, RoPE and accepted-path compaction ([`attention`]). Host-side: a suffix drafter over rollout history
//! ([`drafter`]); the step cost model and speculation policies ([`policy`]).
//!
//! Every entry point validates its arguments through one shared path (for greedy verification,
//! [`greedy::GreedyShape`]) before dispatching to a backend, and reports problems as an [`Error`] naming the
//! argument.
#![warn(missing_docs)]

pub mod attention;
pub mod backend;
pub mod capi;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod drafter;
pub mod dtype;
mod error;
mod fork_safety;
pub mod greedy;
pub mod int4;
pub mod policy;
pub mod sampling;
pub mod status;
pub mod tree;

pub use dtype::{DType, HalfElement, LogitsElement};
pub use error::{Error, Result};
/// The `half` crate whose `f16` and `bf16` the API takes, re-exported so callers need not name a matching
/// version: `specdec::half::bf16`.
pub use half;
pub use status::{RequestFailure, RequestStatus};

/// The README's Rust examples, compiled and run by `cargo test`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
