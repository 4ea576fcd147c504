//! A process that used the CPU backend and then forks (Python's `multiprocessing`, data-loader workers): the
//! child must work. `fork` copies only the calling thread, so a thread pool started before it has no workers in
//! the child; before, the child's first parallel call waited for them for ever. Here the parent runs every CPU
//! family (so every pool is started), forks, and the child runs every family again and must give the parent's
//! results and exit within 60 s. A second test forks while other threads churn C handles: no lock may be
//! inherited held.

mod common;

use std::time::{Duration, Instant};

use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use specdec::attention::RopeStyle;
use specdec::drafter::{DraftKind, Drafter, DrafterConfig};
use specdec::int4::{GemvShape, Int4Shape};
use specdec::policy::{
    simulate, CostModel, GoodputDraft, Gpu, ModelShape, Overheads, RolloutConfig,
};
use specdec::sampling::{Drafts, Rows, VerifyInputs, VerifyOutputs};

/// Every CPU family once, on inputs from `seed`: a digest of all the outputs.
fn every_family(seed: u64) -> String {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut digest = String::new();

    // Greedy verification (rows long enough to split across threads).
    let v = 150_000;
    let logits: Vec<f32> = (0..3 * v).map(|_| rng.random_range(-5.0..5.0)).collect();
    let (mut accepted, mut emitted) = ([0; 1], [0; 3]);
    specdec::cpu::greedy_verify(
        &logits,
        v,
        &[0, 2],
        &[5, 9],
        3,
        &mut accepted,
        &mut emitted,
        None,
    )
    .unwrap();
    digest += &format!("greedy {accepted:?} {emitted:?}\n");

    // Rejection sampling, 16 chains with draft rows.
    let (b, k, v) = (16, 3, 1000);
    let target: Vec<f32> = (0..b * (k + 1) * v)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    let draft: Vec<f32> = (0..b * k * v)
        .map(|_| rng.random_range(-3.0..3.0))
        .collect();
    let tokens: Vec<i32> = (0..b * k).map(|_| rng.random_range(0..v as i32)).collect();
    let offsets: Vec<i32> = (0..=b).map(|i| (i * k) as i32).collect();
    let inputs = VerifyInputs {
        vocab_size: v,
        drafts: Drafts::Chain {
            draft_offsets: (&offsets).into(),
            draft_tokens: (&tokens).into(),
        },
        target: Rows::LogitsF32((&target).into()),
        draft: Some(Rows::LogitsF32((&draft).into())),
        params: Some(specdec::sampling::SamplingParams {
            temperature: (&[0.8; 16]).into(),
            top_k: None,
            top_p: None,
        }),
        draft_params: None,
        seeds: (&[3; 16]).into(),
        steps: (&[1; 16]).into(),
    };
    let (mut a, mut e) = (vec![0; b], vec![0; b * (k + 1)]);
    specdec::cpu::rejection_verify(
        &inputs,
        VerifyOutputs {
            emit_width: k + 1,
            accepted_counts: (&mut a).into(),
            emitted_tokens: (&mut e).into(),
            accepted_nodes: None,
            accept_flags: None,
            request_status: None,
        },
    )
    .unwrap();
    digest += &format!("sampling {a:?} {e:?}\n");

    // int4: quantize, then a GEMV.
    let shape = Int4Shape::new(64, 256, 64).unwrap();
    let weights: Vec<bf16> = (0..64 * 256)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    let (mut packed, mut scales, mut zeros) = (
        vec![0u32; shape.packed_len()],
        vec![bf16::ZERO; shape.meta_len()],
        vec![0u8; shape.meta_len()],
    );
    specdec::cpu::int4_quantize(&shape, &weights, &mut packed, &mut scales, &mut zeros).unwrap();
    let x: Vec<bf16> = (0..2 * 256)
        .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
        .collect();
    let mut y = vec![bf16::ZERO; 2 * 64];
    specdec::cpu::int4_gemv(
        &GemvShape::new(2, shape).unwrap(),
        &packed,
        &scales,
        &zeros,
        &x,
        &mut y,
    )
    .unwrap();
    digest += &format!(
        "int4 {:?}\n",
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );

    // Tree attention over a paged cache, with RoPE.
    let spec = common::attention::Spec {
        trees: vec![common::attention::star(5), common::attention::chain(3)],
        prefix_lens: vec![40, 9],
        num_q_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
        page_size: 16,
        rope: Some(RopeStyle::Neox),
    };
    let problem = common::attention::Problem::<f16>::random(&mut rng, &spec);
    let (out, lse, k_cache, _) = problem.run_cpu();
    digest += &format!(
        "attention {:?} {:?} {}\n",
        out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        lse.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        k_cache.len()
    );

    // The drafter, and the policy's rollout simulator (engines in parallel).
    let drafter = Drafter::new(DrafterConfig::default()).unwrap();
    drafter.add_request(1, 7, &[1, 2, 3, 4, 1, 2, 3]).unwrap();
    digest += &format!(
        "drafter {:?}\n",
        drafter.propose(1, DraftKind::Chain).unwrap()
    );
    let cost = CostModel::new(
        Gpu::A100,
        ModelShape::QWEN25_7B,
        Overheads::EFFICIENT_ROLLOUT_A100,
    );
    let config = RolloutConfig {
        prompts: 4,
        samples: 2,
        engines: 2,
        median_length: 100.0,
        max_tokens: 512,
        rollouts: 1,
        seed,
        ..RolloutConfig::default()
    };
    let run = simulate(
        &cost,
        &config,
        || Box::new(GoodputDraft { max_draft: 4 }),
        |_, _| {},
    );
    digest += &format!("policy {}\n", run.makespan);
    digest
}

#[test]
fn a_forked_child_runs_every_cpu_family() {
    let seed: u64 = common::rng("a_forked_child_runs_every_cpu_family").random();
    let parent = every_family(seed);
    // SAFETY: fork in a test process; the child only runs Rust code that allocates (glibc's malloc is fork-safe)
    // and leaves with _exit, never returning into the test harness.
    let child = unsafe { libc::fork() };
    assert!(child >= 0, "fork failed");
    if child == 0 {
        let ok = std::panic::catch_unwind(|| every_family(seed) == parent).unwrap_or(false);
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let start = Instant::now();
    let mut status = 0;
    loop {
        // SAFETY: waits for our own child without blocking.
        let done = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
        if done == child {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            unsafe { libc::kill(child, libc::SIGKILL) };
            unsafe { libc::waitpid(child, &mut status, 0) };
            panic!("the forked child did not finish within 60 s: a thread pool from before the fork (seed {seed})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the forked child failed or gave other results than the parent (status {status}, seed {seed})"
    );
}

/// A fork while other threads create, use and destroy C handles (the table of live handles is locked for a
/// moment by each): the child must find every lock free. Before the locks were taken across `fork`, about 1
/// child in 6 inherited the table locked and hung. Each child gets 3 s (it needs microseconds).
#[test]
fn a_fork_while_other_threads_churn_handles_leaves_no_lock_held() {
    use specdec::capi::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn use_handles() -> bool {
        let mut ctx = std::ptr::null_mut();
        let mut backend = -1;
        let mut config = std::mem::MaybeUninit::<specdec_drafter_config>::uninit();
        let mut drafter = std::ptr::null_mut();
        // SAFETY: every pointer is valid; each handle is destroyed once.
        unsafe {
            specdec_context_create_cpu(&mut ctx) == specdec_status::SPECDEC_OK
                && specdec_context_backend(ctx, &mut backend) == specdec_status::SPECDEC_OK
                && specdec_context_destroy(ctx) == specdec_status::SPECDEC_OK
                && specdec_drafter_config_default(config.as_mut_ptr()) == specdec_status::SPECDEC_OK
                && specdec_drafter_create(config.as_ptr(), &mut drafter)
                    == specdec_status::SPECDEC_OK
                && specdec_drafter_destroy(drafter) == specdec_status::SPECDEC_OK
        }
    }

    // The handlers are registered at the first use of a lock they cover (a fork racing that very first use may
    // miss them, see src/fork_safety.rs): one use here, so that the test measures the steady state.
    assert!(use_handles());
    let stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..2)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    assert!(use_handles());
                }
            })
        })
        .collect();
    let mut hung = 0;
    for _ in 0..200 {
        // SAFETY: the child only calls specdec and leaves with _exit; alarm() kills it if it hangs.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            unsafe { libc::alarm(3) };
            let ok = std::panic::catch_unwind(use_handles).unwrap_or(false);
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        if libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGALRM {
            hung += 1;
        } else {
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "a forked child failed (status {status})"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for churner in churners {
        churner.join().unwrap();
    }
    assert_eq!(
        hung, 0,
        "{hung} of 200 forked children hung on a lock held at the fork"
    );
}
