//! The drafter's memory is bounded by its budgets and reported truthfully (issue 16, item 3).
//!
//! A counting global allocator measures every byte this test binary holds. A drafter with a one-iteration
//! window and a 100k-token budget is fed 100 new prompts per iteration, 100,000 prompts in all; the bytes held
//! must not grow with the number of prompts seen, must match what `stats()` reports, and must all be given back
//! once every rollout has left the window. Then, with no iterations at all, 40,000 rollouts pass through budgets
//! that hold a few percent of them: again the bytes held stay flat and match the report.
//!
//! This file holds one test, so that nothing else allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use specdec::drafter::{Drafter, DrafterConfig, Token};

struct Counting;

static HELD: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is updated beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            HELD.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        HELD.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            HELD.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            HELD.fetch_sub(layout.size(), Ordering::Relaxed);
            HELD.fetch_add(new_size, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn held() -> usize {
    HELD.load(Ordering::Relaxed)
}

/// A small deterministic generator (xorshift64*), so that every run feeds the same tokens.
struct Tokens(u64);
impl Tokens {
    fn next(&mut self, vocab: u32) -> Token {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as Token % vocab
    }
    fn many(&mut self, n: usize, vocab: u32) -> Vec<Token> {
        (0..n).map(|_| self.next(vocab)).collect()
    }
}

#[test]
fn memory_follows_the_budgets_over_100k_prompts_and_stats_report_it() {
    const PROMPTS_PER_ITERATION: u64 = 100;
    const ITERATIONS: u64 = 1000;
    const REQUESTS_PER_PROMPT: u64 = 2;
    let budget = 100_000;
    let drafter = Drafter::new(DrafterConfig {
        window_iterations: 1,
        total_token_budget: budget,
        prompt_token_budget: budget,
        ..DrafterConfig::default()
    })
    .unwrap();
    let mut tokens = Tokens(0x9E37_79B9_7F4A_7C15);
    // Everything the test itself keeps between iterations is allocated before the baseline.
    let mut ids: Vec<u64> =
        Vec::with_capacity((PROMPTS_PER_ITERATION * REQUESTS_PER_PROMPT) as usize);
    // (iteration, prompts held, tokens, bytes held, bytes reported), printed at the end: printing now would
    // allocate the captured output.
    let mut report: Vec<(u64, usize, usize, usize, usize)> = Vec::with_capacity(8);
    let baseline = held();
    let mut steady_bytes = None;
    for iteration in 0..ITERATIONS {
        drafter.begin_iteration(iteration).unwrap();
        ids.clear();
        for p in 0..PROMPTS_PER_ITERATION {
            let prompt = iteration * PROMPTS_PER_ITERATION + p;
            let prompt_tokens = tokens.many(24, 1000);
            for r in 0..REQUESTS_PER_PROMPT {
                let request = prompt * REQUESTS_PER_PROMPT + r;
                drafter
                    .add_request(request, prompt, &prompt_tokens)
                    .unwrap();
                ids.push(request);
            }
        }
        // Decode in steps, as an engine does: every request appends a few tokens per step.
        for _ in 0..8 {
            for &request in &ids {
                let step = tokens.many(4, 1000);
                drafter.append(request, &step).unwrap();
            }
        }
        for &request in &ids {
            drafter.finish_request(request).unwrap();
        }
        let stats = drafter.stats();
        let measured = held() - baseline;
        assert!(stats.tokens <= budget, "iteration {iteration}: {stats:?}");
        assert!(
            stats.prompts <= PROMPTS_PER_ITERATION as usize,
            "iteration {iteration}: prompts whose rollouts left the window are still held: {stats:?}"
        );
        // What stats() reports is what the allocator holds for the drafter, within 10% and 4 KiB.
        let (low, high) = (stats.bytes * 9 / 10, stats.bytes * 11 / 10 + 4096);
        assert!(
            (low..=high).contains(&measured),
            "iteration {iteration}: the allocator holds {measured} bytes, stats() reports {}",
            stats.bytes
        );
        // After the first iterations the bytes held stay flat: they follow what is stored, not how many
        // prompts were ever seen.
        if iteration == 10 {
            steady_bytes = Some(measured);
        }
        if let Some(steady) = steady_bytes {
            assert!(
                measured <= steady * 3 / 2,
                "iteration {iteration}: {measured} bytes held, {steady} at iteration 10"
            );
        }
        if iteration % 200 == 0 || iteration == ITERATIONS - 1 {
            report.push((
                iteration,
                stats.prompts,
                stats.tokens,
                measured,
                stats.bytes,
            ));
        }
    }
    // Once every rollout has left the window, nothing of them is held.
    drafter.begin_iteration(ITERATIONS + 1).unwrap();
    let stats = drafter.stats();
    assert_eq!(
        (stats.prompts, stats.rollouts, stats.tokens),
        (0, 0, 0),
        "{stats:?}"
    );
    let measured = held() - baseline;
    for (iteration, prompts, tokens, measured, reported) in report {
        println!(
            "iteration {iteration}: {} prompts seen, {prompts} held, {tokens} tokens, {measured} bytes held, \
             {reported} reported ({:.1} bytes per token)",
            (iteration + 1) * PROMPTS_PER_ITERATION,
            reported as f64 / tokens.max(1) as f64
        );
    }
    println!("emptied: {measured} bytes held, {} reported", stats.bytes);
    assert!(
        measured <= 8192 && stats.bytes <= 8192,
        "an empty drafter holds {measured} bytes (reported {})",
        stats.bytes
    );
    drop(drafter);
    budgets_alone_bound_memory_without_iterations();
}

/// No `begin_iteration` at all: only the budgets evict. 40,000 rollouts of 10 prompts pass through a drafter
/// whose budgets hold about 1,600 of them; the bytes held stay flat and match `stats()`.
fn budgets_alone_bound_memory_without_iterations() {
    let (prompt_budget, total_budget) = (10_000, 60_000);
    let drafter = Drafter::new(DrafterConfig {
        window_iterations: u64::MAX,
        prompt_token_budget: prompt_budget,
        total_token_budget: total_budget,
        ..DrafterConfig::default()
    })
    .unwrap();
    let mut tokens = Tokens(0x0123_4567_89AB_CDEF);
    let baseline = held();
    let mut first = None;
    for round in 0..4000u64 {
        for prompt in 0..10u64 {
            let request = round * 10 + prompt;
            // Prompts 0-4 are long-lived favourites: they hit the per-prompt budget; the rest the total one.
            let length = if prompt < 5 { 40 } else { 20 };
            drafter
                .add_request(request, prompt, &tokens.many(length, 500))
                .unwrap();
            drafter
                .append(request, &tokens.many(length / 2, 500))
                .unwrap();
            drafter.finish_request(request).unwrap();
        }
        let stats = drafter.stats();
        let measured = held() - baseline;
        assert!(stats.tokens <= total_budget, "round {round}: {stats:?}");
        let (low, high) = (stats.bytes * 9 / 10, stats.bytes * 11 / 10 + 4096);
        assert!(
            (low..=high).contains(&measured),
            "round {round}: the allocator holds {measured} bytes, stats() reports {}",
            stats.bytes
        );
        if round == 1000 {
            first = Some(measured);
        }
        if let Some(first) = first {
            assert!(
                measured <= first * 3 / 2,
                "round {round}: {measured} bytes held, {first} at round 1000 ({stats:?})"
            );
        }
    }
}
