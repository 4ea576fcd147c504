//! The threads the CPU backend runs on, and what happens to them across `fork`.
//!
//! `fork` copies only the calling thread. A child forked after a thread pool started (Python's `multiprocessing`,
//! data-loader workers) inherits a pool whose workers do not exist, and its first parallel call would wait for
//! them for ever. So every parallel section of the CPU backend runs through [`install`] (or [`spread`], on the
//! same pools, by the same rule):
//!
//! * called on a thread of a rayon pool (inside the caller's `ThreadPool::install`), it runs there: the caller
//!   chose the threads, and they exist;
//! * otherwise it runs on specdec's own pool, which belongs to the process that built it: a forked child builds
//!   its own on first use (rayon's defaults: one thread per core, or `RAYON_NUM_THREADS`).

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// specdec's pool and the process it was built in.
static POOL: Mutex<Option<(u32, Arc<ThreadPool>)>> = Mutex::new(None);

/// Runs `work` (which may use rayon's parallel iterators) on a pool whose threads exist in this process.
pub(crate) fn install<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return work();
    }
    process_pool().install(work)
}

/// Runs `run` on every job and returns when all have finished: the first job on the calling thread, the others
/// on a pool whose threads exist in this process (as [`install`]). For short parallel sections (tens of
/// microseconds), where handing all the work to the pool and sleeping until it is done costs as much as a
/// job: the caller works instead of waiting.
pub(crate) fn spread<T: Send>(jobs: Vec<T>, run: impl Fn(T) + Sync) {
    if jobs.len() <= 1 {
        return jobs.into_iter().for_each(run);
    }
    if rayon::current_thread_index().is_some() {
        // On a pool the caller chose: as rayon schedules it there.
        use rayon::prelude::*;
        return jobs.into_par_iter().for_each(&run);
    }
    let run = &run;
    process_pool().in_place_scope(|scope| {
        let mut jobs = jobs.into_iter();
        let first = jobs.next();
        for job in jobs {
            scope.spawn(move |_| run(job));
        }
        first.map(run);
    });
}

/// Threads of the pool [`install`] and [`spread`] run on: of the caller's pool when called on one.
pub(crate) fn threads() -> usize {
    match rayon::current_thread_index() {
        Some(_) => rayon::current_num_threads(),
        None => process_pool().current_num_threads(),
    }
}

/// The pool's slot, locked for a `fork` (see `crate::fork_safety`).
pub(crate) fn lock_for_fork() -> Box<dyn std::any::Any> {
    Box::new(POOL.lock().unwrap_or_else(|e| e.into_inner()))
}

fn process_pool() -> Arc<ThreadPool> {
    crate::fork_safety::install();
    let pid = std::process::id();
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((owner, pool)) = &*pool {
        if *owner == pid {
            return pool.clone();
        }
    }
    let fresh = Arc::new(
        ThreadPoolBuilder::new()
            .thread_name(|i| format!("specdec-cpu-{i}"))
            .build()
            .expect("specdec: cannot start the CPU backend's threads"),
    );
    // A pool inherited through fork has no threads here; dropping it would signal threads that do not exist,
    // so it is left alone (one allocation per fork).
    if let Some(inherited) = pool.replace((pid, fresh.clone())) {
        std::mem::forget(inherited);
    }
    fresh
}
