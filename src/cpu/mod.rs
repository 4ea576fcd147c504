//! The CPU backend: plain, readable reference implementations of every primitive.
//!
//! They are the oracle of the GPU tests and the fallback where no GPU is present.
//!
//! # Threads
//!
//! Work is spread over the machine's cores with rayon where a call has independent requests (the samplers,
//! greedy verification, tree attention's rows):
//!
//! * **Your pool.** A call made inside `rayon::ThreadPool::install` runs on that pool: size it as you like, or
//!   pass a one-thread pool to keep specdec off your other cores.
//!
//!   ```
//!   let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
//!   let (mut accepted, mut emitted) = ([0], [0; 1]);
//!   pool.install(|| {
//!       specdec::cpu::greedy_verify(&[0.0f32, 1.0], 2, &[0, 0], &[], 1, &mut accepted, &mut emitted, None)
//!   })
//!   .unwrap();
//!   assert_eq!(emitted, [1]);
//!   ```
//! * **specdec's pool.** Otherwise calls run on a pool of specdec's own, built on first use with rayon's
//!   defaults: one thread per core, or `RAYON_NUM_THREADS`. It is not rayon's global pool, and it belongs to
//!   the process that built it: a child forked after it started (Python's `multiprocessing`) builds its own
//!   instead of waiting for workers that `fork` did not copy.
//!
//! Results never depend on the thread count.

pub(crate) mod attention;
mod attention_kernel;
pub(crate) mod greedy;
pub(crate) mod int4;
pub(crate) mod pool;
pub(crate) mod sampling;
pub(crate) mod simd;
mod softmax;

pub use attention::{tree_attention, tree_kv_compact};
pub use greedy::{argmax, greedy_verify};
pub use int4::{int4_dequantize, int4_gemv, int4_pack, int4_quantize};
pub use sampling::rejection_verify;
