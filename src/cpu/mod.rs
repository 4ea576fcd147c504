//! The CPU backend: plain, readable reference implementations of every primitive.
//!
//! They are the oracle of the GPU tests and the fallback where no GPU is present. Work is spread over the
//! machine's cores with rayon where a call has independent requests: on the caller's rayon pool when called
//! inside one (`ThreadPool::install`), otherwise on specdec's own, which a process forked from one that used it
//! rebuilds for itself (`pool`).

mod attention;
mod greedy;
mod int4;
pub(crate) mod pool;
mod sampling;

pub use attention::{tree_attention, tree_kv_compact};
pub use greedy::{argmax, greedy_verify};
pub use int4::{int4_dequantize, int4_gemv, int4_pack, int4_quantize};
pub use sampling::rejection_verify;
