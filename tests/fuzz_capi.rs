//! Property-based fuzzing of every exported C family on a CPU context (issue 16, item 11): sampling (chain and
//! tree), drafter call sequences, int4, tree attention with KV compaction, and the policy.
//!
//! `cargo fuzz` needs a nightly toolchain, so these are proptest properties over the same calls. Each case
//! builds a call that is valid in shape (every array holds at least what its declared sizes say, so the
//! library may read everything the arguments promise), then makes its contents and sizes hostile: ids out of
//! range, broken offsets and parents, NaN and infinite values, negative and zero sizes, wrong dtypes, misused
//! handles. What must hold on every case:
//!
//! * the status is `SPECDEC_OK` or `SPECDEC_INVALID_ARGUMENT` (never a panic, an abort or another status);
//! * on `SPECDEC_INVALID_ARGUMENT` the last error is set and no output was written (outputs are poisoned first);
//! * on `SPECDEC_OK` the outputs keep the documented structure (counts within the drafts, tokens in the
//!   vocabulary, -1 padding, valid trees, finite positive rates).
//!
//! Bounded time: `PROPTEST_CASES` cases per target (256 by default here; CI runs the default). A failing case is
//! shrunk and saved to `tests/fuzz_capi.proptest-regressions`, the small corpus replayed first on every run.

use std::ffi::{c_void, CStr};
use std::ptr::{null, null_mut};

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::Config;
use specdec::capi::*;

const POISON: i32 = 0x5A5A_5A5A;
const OK: specdec_status = specdec_status::SPECDEC_OK;
const INVALID: specdec_status = specdec_status::SPECDEC_INVALID_ARGUMENT;

fn config() -> Config {
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..Config::default()
    }
}

/// A CPU context for one case, destroyed when dropped.
struct Cpu(*mut specdec_context);
impl Cpu {
    fn new() -> Self {
        let mut ctx = null_mut();
        // SAFETY: `ctx` is writable.
        assert_eq!(unsafe { specdec_context_create_cpu(&mut ctx) }, OK);
        Cpu(ctx)
    }
}
impl Drop for Cpu {
    fn drop(&mut self) {
        // SAFETY: a live context, destroyed once.
        assert_eq!(unsafe { specdec_context_destroy(self.0) }, OK);
    }
}

fn last_error() -> String {
    // SAFETY: specdec_last_error returns a NUL-terminated string owned by this thread.
    unsafe { CStr::from_ptr(specdec_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// The property every call shares: OK, or INVALID_ARGUMENT with a message.
fn check_status(status: specdec_status) -> Result<bool, TestCaseError> {
    prop_assert!(
        status == OK || status == INVALID,
        "status {status:?}: {}",
        last_error()
    );
    if status == INVALID {
        prop_assert!(
            !last_error().is_empty(),
            "INVALID_ARGUMENT without a message"
        );
    }
    Ok(status == OK)
}

/// Mostly ordinary values, sometimes the ones that break code: NaN, infinities, negatives, zeros, huge.
fn hostile_f32(low: f32, high: f32) -> impl Strategy<Value = f32> + Clone {
    prop_oneof![
        24 => low..high,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => Just(-1.0f32),
        1 => Just(0.0f32),
        1 => Just(f32::MAX),
    ]
}

/// Occasionally replaces one element of `values` (chosen by `at`) by `to`.
fn corrupt(values: &mut [i32], corruption: Option<(usize, i32)>) {
    if let (Some((at, to)), false) = (corruption, values.is_empty()) {
        let n = values.len();
        values[at % n] = to;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Sampling: chains and trees
// ---------------------------------------------------------------------------------------------------------

const MAX_REQUESTS: usize = 4;
const MAX_NODES: usize = 4; // per request, the root included for trees
const MAX_VOCAB: usize = 24;
const MAX_ROWS: usize = MAX_REQUESTS * MAX_NODES;

#[derive(Debug, Clone)]
struct SamplingCase {
    tree: bool,
    rows_kind: i32,
    vocab: usize,
    /// Drafts per request (chain) or nodes per request (tree: 0 is an empty tree, which is flagged).
    sizes: Vec<usize>,
    offset_corruption: Option<(usize, i32)>,
    tokens: Vec<i32>,
    token_corruption: Option<(usize, i32)>,
    parent_picks: Vec<u32>,
    parent_corruption: Option<(usize, i32)>,
    target: Vec<f32>,
    draft: Option<Vec<f32>>,
    normalise: bool,
    temperature: Vec<f32>,
    top_k: Option<Vec<i32>>,
    top_p: Option<Vec<f32>>,
    /// Give logits parameters to probabilities or leave them out for logits.
    wrong_parameters: bool,
    /// Pass the drafter's own parameters (the case's temperatures, top-k and top-p in reverse request order),
    /// with or without draft rows and of any kind.
    draft_parameters: bool,
    seeds: Vec<u64>,
    emit_slack: i64,
    optional_outputs: bool,
}

fn sampling_case() -> impl Strategy<Value = SamplingCase> {
    let vocab = 1..=MAX_VOCAB;
    (
        any::<bool>(),
        prop_oneof![30 => 0..=3i32, 1 => Just(4i32), 1 => Just(-1i32)],
        vocab,
        prop::collection::vec(0..=MAX_NODES, 0..=MAX_REQUESTS),
        prop::option::weighted(0.08, (0..MAX_REQUESTS + 1, -2..=(MAX_ROWS as i32 + 2))),
        prop::collection::vec(any::<u32>(), MAX_ROWS),
        prop::collection::vec(any::<u32>(), MAX_ROWS),
        prop::option::weighted(0.08, (0..MAX_ROWS, -3..=(MAX_NODES as i32 + 1))),
        prop::option::weighted(0.08, (0..MAX_ROWS, -2..=(MAX_VOCAB as i32 + 1))),
    )
        .prop_flat_map(|(tree, rows_kind, vocab, sizes, oc, token_picks, picks, pc, tc)| {
            // Hostile values are rare per element: a row of 24 holds one in about 8 cases.
            let row = prop_oneof![200 => -4.0f32..4.0, 1 => hostile_f32(-4.0, 4.0)];
            let tokens: Vec<i32> = token_picks.iter().map(|&p| (p % vocab as u32) as i32).collect();
            (
                Just((tree, rows_kind, vocab, sizes, oc, tokens, picks, pc, tc)),
                prop::collection::vec(row.clone(), (MAX_ROWS + MAX_REQUESTS) * MAX_VOCAB),
                prop::option::weighted(0.5, prop::collection::vec(row, MAX_ROWS * MAX_VOCAB)),
                prop::bool::weighted(0.8),
                prop::collection::vec(prop_oneof![30 => 0.0f32..2.0, 1 => hostile_f32(0.0, 2.0)], MAX_REQUESTS),
                prop::option::weighted(
                    0.4,
                    prop::collection::vec(
                        prop_oneof![12 => Just(-1i32), 12 => 1..=(vocab as i32), 1 => Just(0i32), 1 => Just(vocab as i32 + 1)],
                        MAX_REQUESTS,
                    ),
                ),
                prop::option::weighted(
                    0.4,
                    prop::collection::vec(prop_oneof![30 => 0.01f32..=1.0, 1 => hostile_f32(0.01, 1.0)], MAX_REQUESTS),
                ),
                prop::bool::weighted(0.04),
                prop::bool::weighted(0.3),
                prop::collection::vec(any::<u64>(), MAX_REQUESTS),
                prop_oneof![20 => Just(0i64), 1 => Just(1i64), 1 => Just(-1i64)],
                any::<bool>(),
            )
        })
        .prop_map(
            |(
                (tree, rows_kind, vocab, sizes, offset_corruption, tokens, parent_picks, parent_corruption, token_corruption),
                target,
                draft,
                normalise,
                temperature,
                top_k,
                top_p,
                wrong_parameters,
                draft_parameters,
                seeds,
                emit_slack,
                optional_outputs,
            )| SamplingCase {
                tree,
                rows_kind,
                vocab,
                sizes,
                offset_corruption,
                tokens,
                token_corruption,
                parent_picks,
                parent_corruption,
                target,
                draft,
                normalise,
                temperature,
                top_k,
                top_p,
                wrong_parameters,
                draft_parameters,
                seeds,
                emit_slack,
                optional_outputs,
            },
        )
}

/// Rows of `vocab` values from `values`, as the bytes of `rows_kind`; probability rows are made
/// distributions unless the case keeps them raw.
fn encode_rows(
    values: &[f32],
    rows: usize,
    vocab: usize,
    rows_kind: i32,
    normalise: bool,
) -> Vec<u8> {
    let mut out = Vec::new();
    for r in 0..rows {
        let mut row: Vec<f32> = values[r * vocab..(r + 1) * vocab].to_vec();
        if rows_kind == 3 && normalise {
            for x in &mut row {
                *x = if x.is_finite() { x.abs() } else { 1.0 };
            }
            let sum: f32 = row.iter().sum();
            for x in &mut row {
                *x = if sum > 0.0 {
                    *x / sum
                } else {
                    1.0 / vocab as f32
                };
            }
        }
        for x in row {
            match rows_kind {
                1 => out.extend_from_slice(&f16::from_f32(x).to_bits().to_ne_bytes()),
                2 => out.extend_from_slice(&bf16::from_f32(x).to_bits().to_ne_bytes()),
                _ => out.extend_from_slice(&x.to_ne_bytes()),
            }
        }
    }
    // 4-byte alignment for every element type: copy into u32 storage by the caller.
    out
}

fn aligned(bytes: &[u8]) -> Vec<u32> {
    let mut words = vec![0u32; bytes.len().div_ceil(4).max(1)];
    // SAFETY: `words` holds at least `bytes.len()` bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr() as *mut u8, bytes.len())
    };
    words
}

fn run_sampling(case: &SamplingCase) -> Result<(), TestCaseError> {
    let cpu = Cpu::new();
    let b = case.sizes.len();
    let v = case.vocab;
    // Offsets: per-request counts; for chains a count is drafts (at most MAX_NODES - 1).
    let counts: Vec<usize> = case
        .sizes
        .iter()
        .map(|&s| if case.tree { s } else { s.min(MAX_NODES - 1) })
        .collect();
    let mut offsets = vec![0i32];
    for &c in &counts {
        offsets.push(offsets.last().unwrap() + c as i32);
    }
    let num_tokens = *offsets.last().unwrap() as usize;
    corrupt(&mut offsets, case.offset_corruption);
    let mut tokens: Vec<i32> = case.tokens[..num_tokens].to_vec();
    corrupt(&mut tokens, case.token_corruption);
    // Valid parents (node 0 the root, node i's parent in 0..i), then perhaps one corrupted.
    let mut parents = Vec::with_capacity(num_tokens);
    for &c in &counts {
        for i in 0..c {
            let g = parents.len();
            parents.push(if i == 0 {
                -1
            } else {
                (case.parent_picks[g] % i as u32) as i32
            });
        }
    }
    corrupt(&mut parents, case.parent_corruption);
    let target_rows = if case.tree {
        num_tokens
    } else {
        num_tokens + b
    };
    let target = aligned(&encode_rows(
        &case.target,
        target_rows,
        v,
        case.rows_kind,
        case.normalise,
    ));
    let draft = case.draft.as_ref().map(|d| {
        aligned(&encode_rows(
            d,
            num_tokens,
            v,
            case.rows_kind,
            case.normalise,
        ))
    });
    let logits = (0..=2).contains(&case.rows_kind);
    let with_parameters = logits != case.wrong_parameters;
    let steps = vec![7u64; b];
    let reversed = |v: &[f32]| v.iter().rev().copied().collect::<Vec<f32>>();
    let draft_temperature = reversed(&case.temperature);
    let draft_top_k: Option<Vec<i32>> = case
        .top_k
        .as_ref()
        .map(|k| k.iter().rev().copied().collect());
    let draft_top_p = case.top_p.as_deref().map(reversed);
    let sampling = specdec_sampling {
        temperature: if with_parameters {
            case.temperature.as_ptr()
        } else {
            null()
        },
        top_k: match (&case.top_k, with_parameters) {
            (Some(k), true) => k.as_ptr(),
            _ => null(),
        },
        top_p: match (&case.top_p, with_parameters) {
            (Some(p), true) => p.as_ptr(),
            _ => null(),
        },
        seeds: case.seeds.as_ptr(),
        steps: steps.as_ptr(),
        draft_temperature: if case.draft_parameters {
            draft_temperature.as_ptr()
        } else {
            null()
        },
        draft_top_k: match (&draft_top_k, case.draft_parameters) {
            (Some(k), true) => k.as_ptr(),
            _ => null(),
        },
        draft_top_p: match (&draft_top_p, case.draft_parameters) {
            (Some(p), true) => p.as_ptr(),
            _ => null(),
        },
    };
    let longest = counts.iter().copied().max().unwrap_or(0);
    let emit_width = if case.tree {
        longest.max(1)
    } else {
        longest + 1
    } as i64
        + case.emit_slack;
    let width = emit_width.max(0) as usize;
    let mut accepted = vec![POISON; b];
    let mut emitted = vec![POISON; b * width];
    let mut nodes = vec![POISON; b * width];
    let mut flags = vec![0x5Ai8; b * width];
    let mut request_status = vec![POISON; b];
    let outputs = specdec_verify_outputs {
        accepted_counts: accepted.as_mut_ptr(),
        emitted_tokens: emitted.as_mut_ptr(),
        accepted_nodes: if case.optional_outputs {
            nodes.as_mut_ptr()
        } else {
            null_mut()
        },
        accept_flags: if case.optional_outputs {
            flags.as_mut_ptr()
        } else {
            null_mut()
        },
        // With request_status, bad requests are flagged alone instead of failing the call.
        request_status: if case.optional_outputs {
            request_status.as_mut_ptr()
        } else {
            null_mut()
        },
    };
    let draft_ptr = draft
        .as_ref()
        .map_or(null(), |d| d.as_ptr() as *const c_void);
    // SAFETY: every array holds what the declared sizes say (`width` is `emit_width`, or 0 where it is negative).
    let status = unsafe {
        if case.tree {
            specdec_rejection_verify_tree(
                cpu.0,
                case.rows_kind,
                target.as_ptr() as *const c_void,
                draft_ptr,
                v as i64,
                offsets.as_ptr(),
                b as i64,
                tokens.as_ptr(),
                parents.as_ptr(),
                num_tokens as i64,
                &sampling,
                emit_width,
                &outputs,
                null_mut(),
            )
        } else {
            specdec_rejection_verify_chain(
                cpu.0,
                case.rows_kind,
                target.as_ptr() as *const c_void,
                draft_ptr,
                v as i64,
                offsets.as_ptr(),
                b as i64,
                tokens.as_ptr(),
                num_tokens as i64,
                &sampling,
                emit_width,
                &outputs,
                null_mut(),
            )
        }
    };
    if !check_status(status)? {
        prop_assert!(
            accepted.iter().all(|&x| x == POISON),
            "an output was written on error"
        );
        prop_assert!(
            emitted.iter().all(|&x| x == POISON),
            "an output was written on error"
        );
        prop_assert!(nodes.iter().all(|&x| x == POISON) && flags.iter().all(|&x| x == 0x5A));
        return Ok(());
    }
    for r in 0..b {
        let n = accepted[r];
        // The call accepted the offsets, corrupted or not: they say how many drafts each request has.
        let size = (offsets[r + 1] - offsets[r]) as usize;
        let drafts = if case.tree {
            size.saturating_sub(1)
        } else {
            size
        };
        // A flagged request reports -1, a row of -1 and, when asked, the rule it broke.
        if case.optional_outputs {
            let code = request_status[r];
            prop_assert!(
                specdec::RequestStatus::from_code(code).is_some() && (code != 0) == (n == -1),
                "request {r}: status {code}, accepted {n}"
            );
        }
        if n == -1 {
            prop_assert!(
                case.optional_outputs || (case.tree && size == 0),
                "request {r} flagged: {case:?}"
            );
            prop_assert!(emitted[r * width..(r + 1) * width].iter().all(|&t| t == -1));
            continue;
        }
        prop_assert!(
            (0..=drafts as i32).contains(&n),
            "request {r}: {n} accepted of {drafts}"
        );
        let row = &emitted[r * width..(r + 1) * width];
        for (j, &t) in row.iter().enumerate() {
            if j <= n as usize {
                prop_assert!(
                    (0..v as i32).contains(&t),
                    "request {r}: emitted[{j}] = {t}"
                );
            } else {
                prop_assert_eq!(t, -1, "request {}: padding", r);
            }
        }
        if !case.tree {
            let start = offsets[r] as usize;
            prop_assert_eq!(&row[..n as usize], &tokens[start..start + n as usize]);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_rejection_sampling(case in sampling_case()) {
        run_sampling(&case)?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Drafter call sequences
// ---------------------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum DrafterCall {
    Add {
        request: u64,
        prompt: u64,
        tokens: Vec<i32>,
    },
    Append {
        request: u64,
        tokens: Vec<i32>,
    },
    Finish {
        request: u64,
    },
    Propose {
        request: u64,
        kind: i32,
        capacity: i64,
    },
    Begin {
        iteration: u64,
    },
    Stats,
    /// A call through a misused handle: the drafter cast from a context, or a destroyed one.
    WrongHandle,
}

fn drafter_tokens() -> impl Strategy<Value = Vec<i32>> {
    prop::collection::vec(
        prop_oneof![200 => 0..6i32, 1 => Just(-1i32), 1 => Just(i32::MAX)],
        0..8,
    )
}

fn drafter_call() -> impl Strategy<Value = DrafterCall> {
    let request = 0..4u64;
    prop_oneof![
        4 => (request.clone(), 0..3u64, drafter_tokens())
            .prop_map(|(request, prompt, tokens)| DrafterCall::Add { request, prompt, tokens }),
        6 => (request.clone(), drafter_tokens()).prop_map(|(request, tokens)| DrafterCall::Append { request, tokens }),
        2 => request.clone().prop_map(|request| DrafterCall::Finish { request }),
        4 => (request, prop_oneof![20 => 0..=1i32, 1 => Just(2i32)], prop_oneof![20 => 1..=8i64, 1 => Just(0i64), 1 => Just(-3i64)])
            .prop_map(|(request, kind, capacity)| DrafterCall::Propose { request, kind, capacity }),
        1 => (0..12u64).prop_map(|iteration| DrafterCall::Begin { iteration }),
        1 => Just(DrafterCall::Stats),
        1 => Just(DrafterCall::WrongHandle),
    ]
}

#[derive(Debug, Clone)]
struct DrafterSettings {
    min_match: i64,
    max_match: i64,
    max_draft: i64,
    min_token_prob: f64,
    window_iterations: i64,
    prompt_token_budget: i64,
    total_token_budget: i64,
    match_offset: f64,
}

fn drafter_settings() -> impl Strategy<Value = DrafterSettings> {
    (
        prop_oneof![20 => 1..=2i64, 1 => Just(0i64)],
        prop_oneof![20 => 2..=6i64, 1 => Just(2000i64)],
        prop_oneof![20 => 1..=8i64, 1 => Just(0i64), 1 => Just(1i64 << 40)],
        prop_oneof![20 => 0.0..=1.0f64, 1 => Just(f64::NAN), 1 => Just(1.5f64)],
        prop_oneof![20 => 1..=3i64, 1 => Just(0i64), 1 => Just(-1i64)],
        prop_oneof![20 => 1..=40i64, 1 => Just(0i64)],
        prop_oneof![20 => 1..=60i64, 1 => Just(-5i64)],
        prop_oneof![20 => -2.0..4.0f64, 1 => Just(f64::INFINITY), 1 => Just(1e18f64)],
    )
        .prop_map(
            |(
                min_match,
                max_match,
                max_draft,
                min_token_prob,
                window_iterations,
                prompt_budget,
                total_budget,
                match_offset,
            )| {
                DrafterSettings {
                    min_match,
                    max_match,
                    max_draft,
                    min_token_prob,
                    window_iterations,
                    prompt_token_budget: prompt_budget,
                    total_token_budget: total_budget,
                    match_offset,
                }
            },
        )
}

fn run_drafter(settings: &DrafterSettings, calls: &[DrafterCall]) -> Result<(), TestCaseError> {
    let mut config = std::mem::MaybeUninit::<specdec_drafter_config>::uninit();
    // SAFETY: `config` is writable; specdec_drafter_config_default fills every field.
    let mut config = unsafe {
        assert_eq!(specdec_drafter_config_default(config.as_mut_ptr()), OK);
        config.assume_init()
    };
    config.min_match = settings.min_match;
    config.max_match = settings.max_match;
    config.max_draft = settings.max_draft;
    config.min_token_prob = settings.min_token_prob;
    config.window_iterations = settings.window_iterations;
    config.prompt_token_budget = settings.prompt_token_budget;
    config.total_token_budget = settings.total_token_budget;
    config.match_offset = settings.match_offset;
    let mut drafter = null_mut();
    // SAFETY: both pointers are valid.
    if !check_status(unsafe { specdec_drafter_create(&config, &mut drafter) })? {
        prop_assert!(drafter.is_null());
        return Ok(());
    }
    let cpu = Cpu::new();
    // The model: which requests are registered, and the last iteration.
    let mut registered = std::collections::BTreeSet::new();
    let mut iteration = 0u64;
    for call in calls {
        // SAFETY (every call below): `drafter` is live and every array holds its declared length.
        let status = unsafe {
            match call {
                DrafterCall::Add {
                    request,
                    prompt,
                    tokens,
                } => {
                    let s = specdec_drafter_add_request(
                        drafter,
                        *request,
                        *prompt,
                        tokens.as_ptr(),
                        tokens.len() as i64,
                    );
                    let expect_ok = !registered.contains(request) && tokens.iter().all(|&t| t >= 0);
                    prop_assert_eq!(s == OK, expect_ok, "add {:?}: {}", call, last_error());
                    if s == OK {
                        registered.insert(*request);
                    }
                    s
                }
                DrafterCall::Append { request, tokens } => {
                    let s = specdec_drafter_append(
                        drafter,
                        *request,
                        tokens.as_ptr(),
                        tokens.len() as i64,
                    );
                    let expect_ok = registered.contains(request) && tokens.iter().all(|&t| t >= 0);
                    prop_assert_eq!(s == OK, expect_ok, "append {:?}: {}", call, last_error());
                    s
                }
                DrafterCall::Finish { request } => {
                    let s = specdec_drafter_finish_request(drafter, *request);
                    prop_assert_eq!(s == OK, registered.remove(request), "finish {:?}", call);
                    s
                }
                DrafterCall::Propose {
                    request,
                    kind,
                    capacity,
                } => {
                    let cap = (*capacity).max(0) as usize;
                    let (mut tokens, mut parents, mut probs) =
                        (vec![POISON; cap], vec![POISON; cap], vec![-1.0f64; cap]);
                    let (mut count, mut match_len) = (-7i64, -7i64);
                    let s = specdec_drafter_propose(
                        drafter,
                        *request,
                        *kind,
                        *capacity,
                        tokens.as_mut_ptr(),
                        parents.as_mut_ptr(),
                        probs.as_mut_ptr(),
                        &mut count,
                        &mut match_len,
                        std::ptr::null_mut(),
                    );
                    let expect_ok =
                        registered.contains(request) && (0..=1).contains(kind) && *capacity > 0;
                    prop_assert_eq!(s == OK, expect_ok, "propose {:?}: {}", call, last_error());
                    if s == OK {
                        prop_assert!((0..=*capacity).contains(&count) && match_len >= 0);
                        for i in 0..count as usize {
                            prop_assert!(tokens[i] >= 0, "token {}", tokens[i]);
                            prop_assert!(
                                (-1..i as i32).contains(&parents[i]),
                                "parent {} of node {i}",
                                parents[i]
                            );
                            if *kind == 0 {
                                prop_assert_eq!(parents[i], i as i32 - 1);
                            }
                            prop_assert!(probs[i] > 0.0 && probs[i] <= 1.0);
                        }
                    } else {
                        prop_assert!(count == -7 && tokens.iter().all(|&t| t == POISON));
                    }
                    s
                }
                DrafterCall::Begin { iteration: next } => {
                    let s = specdec_drafter_begin_iteration(drafter, *next);
                    prop_assert_eq!(s == OK, *next >= iteration);
                    iteration = iteration.max(*next);
                    s
                }
                DrafterCall::Stats => OK,
                DrafterCall::WrongHandle => {
                    // A context where a drafter belongs, then a drafter destroyed a moment ago.
                    let s = specdec_drafter_begin_iteration(cpu.0 as *const specdec_drafter, 1);
                    prop_assert_eq!(s, INVALID);
                    let mut gone = null_mut();
                    prop_assert_eq!(specdec_drafter_create(&config, &mut gone), OK);
                    prop_assert_eq!(specdec_drafter_destroy(gone), OK);
                    let (mut token, mut parent, mut prob, mut count, mut match_len) =
                        (0, 0, 0.0, 0, 0);
                    let s = specdec_drafter_propose(
                        gone,
                        0,
                        0,
                        1,
                        &mut token,
                        &mut parent,
                        &mut prob,
                        &mut count,
                        &mut match_len,
                        std::ptr::null_mut(),
                    );
                    prop_assert_eq!(s, INVALID);
                    prop_assert_eq!(specdec_drafter_destroy(gone), INVALID);
                    s
                }
            }
        };
        check_status(status)?;
        let mut stats = specdec_drafter_stats::default();
        // SAFETY: live drafter, writable output.
        prop_assert_eq!(
            unsafe { specdec_drafter_get_stats(drafter, &mut stats) },
            OK
        );
        prop_assert!(stats.tokens <= settings.total_token_budget, "{:?}", stats);
        prop_assert!(stats.tokens <= settings.prompt_token_budget * stats.prompts.max(1));
        prop_assert_eq!(stats.active_requests, registered.len() as i64);
        prop_assert!(stats.bytes >= 0 && (stats.tokens == 0 || stats.bytes > 0));
    }
    // Every request finished and the window moved past every rollout: nothing is left, prompts included.
    // SAFETY: a live drafter, writable outputs.
    unsafe {
        for request in std::mem::take(&mut registered) {
            prop_assert_eq!(specdec_drafter_finish_request(drafter, request), OK);
        }
        let window = settings.window_iterations.max(1) as u64;
        prop_assert_eq!(
            specdec_drafter_begin_iteration(drafter, iteration + window + 1),
            OK
        );
        let mut stats = specdec_drafter_stats::default();
        prop_assert_eq!(specdec_drafter_get_stats(drafter, &mut stats), OK);
        prop_assert_eq!(
            (
                stats.prompts,
                stats.rollouts,
                stats.tokens,
                stats.active_requests
            ),
            (0, 0, 0, 0),
            "{:?}",
            stats
        );
    }
    // SAFETY: a live drafter, destroyed once; then a second destroy, which must be refused.
    unsafe {
        prop_assert_eq!(specdec_drafter_destroy(drafter), OK);
        prop_assert_eq!(specdec_drafter_destroy(drafter), INVALID);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_drafter_call_sequences(
        settings in drafter_settings(),
        calls in prop::collection::vec(drafter_call(), 0..48),
    ) {
        run_drafter(&settings, &calls)?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// int4: quantize, then GEMV
// ---------------------------------------------------------------------------------------------------------

const INT4_MAX_N: usize = 32;
const INT4_MAX_K: usize = 128;
const INT4_MAX_M: usize = 3;

fn run_int4(
    n: i64,
    k: i64,
    group: i64,
    m: i64,
    dtypes: (i32, i32, i32),
    weights: &[f32],
    x: &[f32],
) -> Result<(), TestCaseError> {
    let cpu = Cpu::new();
    let (weights_dtype, scale_dtype, x_dtype) = dtypes;
    let as_half = |values: &[f32], dtype: i32| -> Vec<u16> {
        values
            .iter()
            .map(|&v| {
                if dtype == 2 {
                    bf16::from_f32(v).to_bits()
                } else {
                    f16::from_f32(v).to_bits()
                }
            })
            .collect()
    };
    let w = as_half(weights, weights_dtype);
    let xs = as_half(x, x_dtype);
    // Buffers for the largest shape any case declares (groups of 16 give the most metadata).
    let mut packed = vec![POISON as u32; INT4_MAX_N * INT4_MAX_K / 8];
    let mut scales = vec![0x5A5Au16; INT4_MAX_N * INT4_MAX_K / 16];
    let mut zeros = vec![0x5Au8; INT4_MAX_N * INT4_MAX_K / 16];
    // SAFETY: every buffer holds what any accepted shape (n <= 32, k <= 128) needs.
    let status = unsafe {
        specdec_int4_quantize(
            cpu.0,
            w.as_ptr() as *const c_void,
            weights_dtype,
            n,
            k,
            group,
            packed.as_mut_ptr(),
            scales.as_mut_ptr() as *mut c_void,
            scale_dtype,
            zeros.as_mut_ptr(),
            null_mut(),
        )
    };
    let quantized = check_status(status)?;
    if !quantized {
        prop_assert!(
            packed.iter().all(|&p| p == POISON as u32) && zeros.iter().all(|&z| z == 0x5A)
        );
        prop_assert!(scales.iter().all(|&s| s == 0x5A5A));
    }
    let mut y = vec![0x5A5Au16; INT4_MAX_M * INT4_MAX_N];
    // SAFETY: as above; x holds m * k <= 3 * 128 values and y m * n <= 3 * 32.
    let status = unsafe {
        specdec_int4_gemv(
            cpu.0,
            packed.as_ptr(),
            scales.as_ptr() as *const c_void,
            scale_dtype,
            zeros.as_ptr(),
            n,
            k,
            group,
            xs.as_ptr() as *const c_void,
            x_dtype,
            m,
            y.as_mut_ptr() as *mut c_void,
            null_mut(),
        )
    };
    if !check_status(status)? {
        prop_assert!(y.iter().all(|&v| v == 0x5A5A), "y written on error");
    } else if quantized
        && weights
            .iter()
            .chain(x)
            .all(|v| v.is_finite() && v.abs() <= 2.0)
    {
        // Finite weights and activations of magnitude <= 2 over k <= 128: |y| <= 512, finite in both types.
        let to_f32 = |b: u16| {
            if x_dtype == 2 {
                bf16::from_bits(b).to_f32()
            } else {
                f16::from_bits(b).to_f32()
            }
        };
        let outputs = (m as usize) * (n as usize);
        prop_assert!(
            y[..outputs].iter().all(|&b| to_f32(b).is_finite()),
            "a non-finite output from finite inputs"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_int4(
        n in prop_oneof![12 => prop_oneof![Just(16i64), Just(32)], 1 => Just(0i64), 1 => Just(8i64), 1 => Just(-16i64)],
        k in prop_oneof![12 => prop_oneof![Just(64i64), Just(128)], 1 => Just(0i64), 1 => Just(96i64), 1 => Just(-64i64)],
        group in prop_oneof![12 => prop_oneof![Just(32i64), Just(64), Just(128)], 1 => Just(0i64), 1 => Just(48i64), 1 => Just(16i64)],
        m in prop_oneof![12 => 1..=INT4_MAX_M as i64, 1 => Just(0i64), 1 => Just(-1i64)],
        dtypes in (prop_oneof![20 => 1..=2i32, 1 => Just(0i32), 1 => Just(3i32)],
                   prop_oneof![20 => 1..=2i32, 1 => Just(0i32)],
                   prop_oneof![20 => 1..=2i32, 1 => Just(7i32)]),
        weights in prop::collection::vec(prop_oneof![2000 => -2.0f32..2.0, 1 => hostile_f32(-2.0, 2.0)], INT4_MAX_N * INT4_MAX_K),
        x in prop::collection::vec(prop_oneof![200 => -2.0f32..2.0, 1 => hostile_f32(-2.0, 2.0)], INT4_MAX_M * INT4_MAX_K),
    ) {
        run_int4(n, k, group, m, dtypes, &weights, &x)?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Tree attention over a paged KV cache, then compaction of the accepted path
// ---------------------------------------------------------------------------------------------------------

const ATT_MAX_D: usize = 128;
const ATT_MAX_HQ: usize = 4;
const ATT_MAX_HKV: usize = 2;
const ATT_MAX_TOKENS: usize = 6;
const ATT_MAX_PAGES: usize = 3;
const ATT_MAX_PAGE_SIZE: usize = 17;
const ATT_REQUESTS: usize = 2;

#[derive(Debug, Clone)]
struct AttentionCase {
    dtype: i32,
    tree_sizes: Vec<usize>,
    offset_corruption: Option<(usize, i32)>,
    parent_picks: Vec<u32>,
    parent_corruption: Option<(usize, i32)>,
    prefix_lens: Vec<i32>,
    page_table: Vec<i32>,
    num_q_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    num_pages: i64,
    page_size: i64,
    pages_per_request: i64,
    max_tree_size: i64,
    rope: Option<(i32, i64)>,
    softmax_scale: f32,
    values: Vec<f32>,
    accepted: Vec<i32>,
    accepted_corruption: Option<(usize, i32)>,
}

fn attention_case() -> impl Strategy<Value = AttentionCase> {
    (
        (
            prop_oneof![20 => 1..=2i32, 1 => Just(0i32)],
            prop::collection::vec(0..=3usize, 0..=ATT_REQUESTS),
            prop::option::weighted(
                0.08,
                (0..ATT_REQUESTS + 1, -2..=(ATT_MAX_TOKENS as i32 + 1)),
            ),
            prop::collection::vec(any::<u32>(), ATT_MAX_TOKENS),
            prop::option::weighted(0.08, (0..ATT_MAX_TOKENS, -3..=4i32)),
            prop::collection::vec(
                prop_oneof![20 => 0..=12i32, 1 => Just(-1i32), 1 => Just(40i32)],
                ATT_REQUESTS,
            ),
            prop::collection::vec(
                prop_oneof![20 => 0..2i32, 1 => Just(-1i32), 1 => Just(3i32)],
                ATT_REQUESTS * 2,
            ),
        ),
        (
            prop_oneof![12 => Just(2i64), 4 => Just(4i64), 1 => Just(3i64), 1 => Just(0i64)],
            prop_oneof![12 => Just(1i64), 4 => Just(2i64), 1 => Just(0i64)],
            prop_oneof![12 => Just(64i64), 4 => Just(128i64), 1 => Just(48i64), 1 => Just(0i64)],
            prop_oneof![12 => Just(2i64), 4 => Just(3i64), 1 => Just(0i64)],
            prop_oneof![16 => Just(16i64), 1 => Just(8i64), 1 => Just(17i64), 1 => Just(0i64)],
            prop_oneof![12 => Just(1i64), 4 => Just(2i64), 1 => Just(0i64)],
            prop_oneof![16 => Just(8i64), 2 => Just(2i64), 1 => Just(0i64), 1 => Just(65i64)],
            prop::option::weighted(
                0.3,
                (
                    prop_oneof![12 => 0..=1i32, 1 => Just(2i32)],
                    prop_oneof![12 => Just(64i64), 1 => Just(4i64), 1 => Just(0i64)],
                ),
            ),
            prop_oneof![20 => 0.05f32..0.2, 1 => hostile_f32(0.05, 0.2)],
        ),
        prop::collection::vec(
            prop_oneof![200 => -1.0f32..1.0, 1 => hostile_f32(-1.0, 1.0)],
            64,
        ),
        prop::collection::vec(0..=3i32, ATT_REQUESTS * 3),
        prop::option::weighted(0.1, (0..ATT_REQUESTS * 3, -2..=5i32)),
    )
        .prop_map(
            |(a, b, values, accepted, accepted_corruption)| AttentionCase {
                dtype: a.0,
                tree_sizes: a.1,
                offset_corruption: a.2,
                parent_picks: a.3,
                parent_corruption: a.4,
                prefix_lens: a.5,
                page_table: a.6,
                num_q_heads: b.0,
                num_kv_heads: b.1,
                head_dim: b.2,
                num_pages: b.3,
                page_size: b.4,
                pages_per_request: b.5,
                max_tree_size: b.6,
                rope: b.7,
                softmax_scale: b.8,
                values,
                accepted,
                accepted_corruption,
            },
        )
}

fn run_attention(case: &AttentionCase) -> Result<(), TestCaseError> {
    let cpu = Cpu::new();
    let b = case.tree_sizes.len();
    let mut offsets = vec![0i32];
    let mut parents = Vec::new();
    for &size in &case.tree_sizes {
        for i in 0..size {
            let g = parents.len();
            parents.push(if i == 0 {
                -1
            } else {
                (case.parent_picks[g] % i as u32) as i32
            });
        }
        offsets.push(parents.len() as i32);
    }
    let num_tokens = parents.len();
    corrupt(&mut offsets, case.offset_corruption);
    corrupt(&mut parents, case.parent_corruption);
    let fill = |len: usize| -> Vec<u16> {
        (0..len)
            .map(|i| bf16::from_f32(case.values[i % case.values.len()]).to_bits())
            .collect()
    };
    let q = fill(ATT_MAX_TOKENS * ATT_MAX_HQ * ATT_MAX_D);
    let k = fill(ATT_MAX_TOKENS * ATT_MAX_HKV * ATT_MAX_D);
    let v = fill(ATT_MAX_TOKENS * ATT_MAX_HKV * ATT_MAX_D);
    let cache_len = ATT_MAX_PAGES * ATT_MAX_PAGE_SIZE * ATT_MAX_HKV * ATT_MAX_D;
    let mut k_cache = vec![0x1111u16; cache_len];
    let mut v_cache = vec![0x2222u16; cache_len];
    let mut out = vec![0x5A5Au16; ATT_MAX_TOKENS * ATT_MAX_HQ * ATT_MAX_D];
    let mut lse = vec![f32::from_bits(POISON as u32); ATT_MAX_TOKENS * ATT_MAX_HQ];
    let mut status = vec![POISON; ATT_REQUESTS];
    let rope_len = 64 * ATT_MAX_D;
    let cos_sin: Vec<f32> = (0..rope_len)
        .map(|i| ((i % 17) as f32 / 17.0) - 0.5)
        .collect();
    let (rope_ptr, max_position, rope_style) = match case.rope {
        Some((style, positions)) => (cos_sin.as_ptr(), positions, style),
        None => (null(), 0, 0),
    };
    // The page table is `num_requests * pages_per_request`: at most 2 * 2 entries, which it holds.
    // SAFETY: every buffer holds what the largest declared shape needs (tokens <= 6, heads <= 4 and 2,
    // head_dim <= 128, pages <= 3 of <= 17 slots, positions <= 64).
    let s = unsafe {
        specdec_tree_attention(
            cpu.0,
            case.dtype,
            q.as_ptr() as *const c_void,
            k.as_ptr() as *const c_void,
            v.as_ptr() as *const c_void,
            b as i64,
            num_tokens as i64,
            case.num_q_heads,
            case.max_tree_size,
            offsets.as_ptr(),
            parents.as_ptr(),
            case.prefix_lens.as_ptr(),
            case.page_table.as_ptr(),
            k_cache.as_mut_ptr() as *mut c_void,
            v_cache.as_mut_ptr() as *mut c_void,
            case.num_pages,
            case.page_size,
            case.num_kv_heads,
            case.head_dim,
            case.pages_per_request,
            rope_ptr,
            max_position,
            rope_style,
            case.softmax_scale,
            out.as_mut_ptr() as *mut c_void,
            lse.as_mut_ptr(),
            status.as_mut_ptr(),
            null_mut(),
        )
    };
    if check_status(s)? {
        // With request_status a bad request is flagged alone: every request gets a status code.
        prop_assert!(
            status[..b]
                .iter()
                .all(|&s| specdec::RequestStatus::from_code(s).is_some()),
            "request_status {:?}",
            status
        );
    } else {
        prop_assert!(out.iter().all(|&x| x == 0x5A5A), "out written on error");
        prop_assert!(k_cache.iter().all(|&x| x == 0x1111) && v_cache.iter().all(|&x| x == 0x2222));
        prop_assert!(status.iter().all(|&x| x == POISON));
    }

    // Compaction of an accepted path per request (nodes from the case, perhaps corrupted).
    let mut accepted_offsets = vec![0i32];
    let mut accepted_nodes = Vec::new();
    for r in 0..b {
        let n = (case.accepted[r] as usize).min(case.tree_sizes[r]);
        accepted_nodes.extend(case.accepted[ATT_REQUESTS + r..].iter().take(n).copied());
        accepted_offsets.push(accepted_nodes.len() as i32);
    }
    corrupt(&mut accepted_nodes, case.accepted_corruption);
    let k_before = k_cache.clone();
    let k_layers = [k_cache.as_mut_ptr() as *mut c_void];
    let v_layers = [v_cache.as_mut_ptr() as *mut c_void];
    status.fill(POISON);
    // SAFETY: as above, one layer.
    let s = unsafe {
        specdec_tree_kv_compact(
            cpu.0,
            k_layers.as_ptr(),
            v_layers.as_ptr(),
            1,
            case.num_pages,
            case.page_size,
            case.num_kv_heads,
            case.head_dim,
            case.pages_per_request,
            b as i64,
            accepted_offsets.as_ptr(),
            accepted_nodes.as_ptr(),
            accepted_nodes.len() as i64,
            case.prefix_lens.as_ptr(),
            case.page_table.as_ptr(),
            status.as_mut_ptr(),
            null_mut(),
        )
    };
    if !check_status(s)? {
        prop_assert!(k_cache == k_before, "the cache changed on error");
        prop_assert!(status.iter().all(|&x| x == POISON));
    } else {
        prop_assert!(
            status[..b]
                .iter()
                .all(|&s| specdec::RequestStatus::from_code(s).is_some()),
            "request_status {:?}",
            status
        );
        if status[..b].iter().all(|&s| s != 0) {
            prop_assert!(k_cache == k_before, "a flagged request moved the cache");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_tree_attention_and_compaction(case in attention_case()) {
        run_attention(&case)?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Policy: step prices, draft lengths and trees
// ---------------------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
fn run_policy(
    preset: (i32, i32),
    field: usize,
    hostile: f64,
    contexts: &[i64],
    acceptance: &[f64],
    num_requests: i64,
    positions: i64,
    max_draft: i64,
    max_depth: i64,
) -> Result<(), TestCaseError> {
    let mut model = std::mem::MaybeUninit::<specdec_cost_model>::uninit();
    // SAFETY: writable output.
    let status = unsafe { specdec_cost_model_preset(preset.0, preset.1, model.as_mut_ptr()) };
    if !check_status(status)? {
        return Ok(());
    }
    // SAFETY: the preset filled every field.
    let mut model = unsafe { model.assume_init() };
    match field {
        0 => model.bandwidth = hostile,
        1 => model.flops = hostile,
        2 => model.t0 = hostile,
        3 => model.params = hostile,
        4 => model.bandwidth_efficiency = hostile,
        5 => model.layers = hostile as i64,
        _ => {}
    }
    let mut seconds = -7.0;
    for kind in 0..=3 {
        // SAFETY: valid pointers.
        let s = unsafe {
            specdec_cost_model_step_seconds(&model, kind, num_requests, 4096, 3, &mut seconds)
        };
        if check_status(s)? {
            prop_assert!(seconds.is_finite() && seconds >= 0.0, "{seconds} s");
        }
    }
    // Arrays hold what the declared sizes say whenever the call could read them (n <= 4, positions <= 3).
    let n = num_requests.clamp(0, 4) as usize;
    let mut lengths = vec![POISON; n];
    let mut goodput = -7.0;
    // SAFETY: as above; sizes beyond the arrays are only ever the huge ones the call refuses first.
    let s = unsafe {
        specdec_choose_draft_lengths(
            &model,
            contexts.as_ptr(),
            acceptance.as_ptr(),
            num_requests,
            positions,
            max_draft,
            lengths.as_mut_ptr(),
            &mut goodput,
        )
    };
    if check_status(s)? {
        prop_assert!(
            lengths.iter().all(|&l| (0..=max_draft as i32).contains(&l)),
            "{:?}",
            lengths
        );
        prop_assert!(
            goodput.is_finite() && (n == 0 || goodput > 0.0),
            "goodput {goodput}"
        );
    } else {
        prop_assert!(lengths.iter().all(|&l| l == POISON) && goodput == -7.0);
    }
    let width = (max_draft.clamp(0, 64) + 1) as usize;
    let mut parents = vec![POISON; n * width];
    let mut drafts = vec![POISON; n];
    // SAFETY: as above.
    let s = unsafe {
        specdec_choose_draft_trees(
            &model,
            contexts.as_ptr(),
            acceptance.as_ptr(),
            num_requests,
            positions,
            max_draft,
            max_depth,
            parents.as_mut_ptr(),
            drafts.as_mut_ptr(),
            &mut goodput,
        )
    };
    if check_status(s)? {
        for r in 0..n {
            let row = &parents[r * width..(r + 1) * width];
            prop_assert!((0..width as i32).contains(&drafts[r]));
            prop_assert_eq!(row[0], -1);
            for (j, &p) in row.iter().enumerate().skip(1) {
                if j <= drafts[r] as usize {
                    prop_assert!((0..j as i32).contains(&p), "parent {p} of node {j}");
                } else {
                    prop_assert_eq!(p, -1);
                }
            }
        }
    } else {
        prop_assert!(parents.iter().all(|&p| p == POISON) && drafts.iter().all(|&d| d == POISON));
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_policy(
        preset in (prop_oneof![20 => 0..=1i32, 1 => Just(2i32)], prop_oneof![20 => 0..=1i32, 1 => Just(5i32)]),
        field in 0..24usize,
        hostile in prop_oneof![Just(f64::NAN), Just(-1.0f64), Just(0.0f64), Just(5e-324f64), Just(f64::INFINITY), Just(1e300f64)],
        contexts in prop::collection::vec(prop_oneof![40 => 0..100_000i64, 1 => Just(-1i64), 1 => Just(i64::MAX)], 4),
        acceptance in prop::collection::vec(prop_oneof![80 => 0.0..=1.0f64, 1 => Just(f64::NAN), 1 => Just(1.5f64)], 12),
        num_requests in prop_oneof![20 => 0..=4i64, 1 => Just(-1i64), 1 => Just(1i64 << 40)],
        positions in prop_oneof![20 => 1..=3i64, 1 => Just(0i64), 1 => Just(-2i64)],
        max_draft in prop_oneof![20 => 1..=16i64, 1 => Just(0i64), 1 => Just(65i64)],
        max_depth in prop_oneof![20 => 1..=6i64, 1 => Just(0i64), 1 => Just(99i64)],
    ) {
        // positions * num_requests values are read; the array holds 4 * 3.
        run_policy(preset, field, hostile, &contexts, &acceptance, num_requests, positions, max_draft, max_depth)?;
    }
}

// ---------------------------------------------------------------------------------------------------------
// The tree converters: a drafter's proposal to a verification tree, the sampler's paths to compaction's
// ---------------------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_tree_converters(
        last_token in any::<i32>(),
        draft in prop::collection::vec((prop_oneof![20 => 0..100i32, 1 => any::<i32>()], -3..70i32), 0..70),
        declared in prop_oneof![10 => Just(None), 1 => (-2i64..70).prop_map(Some)],
        counts in prop::collection::vec(prop_oneof![10 => 0..4i32, 1 => -2..70i32], 0..6),
        width in prop_oneof![10 => 1..5i64, 1 => -1..70i64],
        node_picks in prop::collection::vec(prop_oneof![10 => 1..70i32, 1 => any::<i32>()], 6 * 70),
    ) {
        // A proposal whose parents are mostly valid (-1 or an earlier index) and sometimes not.
        let tokens: Vec<i32> = draft.iter().map(|d| d.0).collect();
        let parents: Vec<i32> = draft
            .iter()
            .enumerate()
            .map(|(i, d)| if d.1 < i as i32 { d.1.max(-1) } else { d.1 })
            .collect();
        let n = declared.unwrap_or(tokens.len() as i64);
        let room = tokens.len() + 1;
        let (mut out_tokens, mut out_parents, mut out_width) = (vec![POISON; room], vec![POISON; room], -5i64);
        let status = if n > tokens.len() as i64 {
            // Never declare more than the arrays hold.
            INVALID
        } else {
            // SAFETY: `n` never exceeds the inputs, and the outputs hold `n + 1` values.
            unsafe {
                specdec_draft_to_verify_tree(
                    last_token,
                    tokens.as_ptr(),
                    parents.as_ptr(),
                    n,
                    out_tokens.as_mut_ptr(),
                    out_parents.as_mut_ptr(),
                    &mut out_width,
                )
            }
        };
        if n <= tokens.len() as i64 && check_status(status)? {
            let n = n as usize;
            prop_assert!(n < 64 && out_tokens[0] == last_token && out_parents[0] == -1);
            prop_assert_eq!(&out_tokens[1..=n], &tokens[..n]);
            let mut depth = vec![0i64; n + 1];
            for j in 1..=n {
                // The drafter's parent shifted by one: its -1 is the root.
                prop_assert_eq!(out_parents[j], parents[j - 1] + 1);
                prop_assert!(out_parents[j] >= 0 && out_parents[j] < j as i32);
                depth[j] = depth[out_parents[j] as usize] + 1;
            }
            prop_assert_eq!(out_width, depth.iter().max().unwrap() + 1);
        } else if n <= tokens.len() as i64 {
            prop_assert!(out_tokens.iter().chain(&out_parents).all(|&x| x == POISON) && out_width == -5);
        }

        // The sampler's rows: counts and increasing nodes, sometimes broken.
        let w = width.max(0) as usize;
        let b = counts.len();
        let mut rows = vec![-1i32; b * w];
        for r in 0..b {
            let mut node = 0;
            for j in 0..w.min(counts[r].max(0) as usize) {
                node += node_picks[r * 70 + j].clamp(-3, 3).max(1);
                rows[r * w + j] = if node_picks[r * 70 + j] < 0 { node_picks[r * 70 + j] } else { node };
            }
        }
        let (mut offsets, mut nodes) = (vec![POISON; b + 1], vec![POISON; b * w]);
        // SAFETY: `rows` and `nodes` hold `b * w` values, `offsets` `b + 1` (width < 0 is refused before use).
        let status = unsafe {
            specdec_compaction_paths(counts.as_ptr(), rows.as_ptr(), b as i64, width, offsets.as_mut_ptr(), nodes.as_mut_ptr())
        };
        if check_status(status)? {
            prop_assert_eq!(offsets[0], 0);
            for r in 0..b {
                let path = &nodes[offsets[r] as usize..offsets[r + 1] as usize];
                prop_assert_eq!(path.len(), counts[r] as usize + 1);
                prop_assert_eq!(path[0], 0);
                prop_assert_eq!(&path[1..], &rows[r * w..r * w + counts[r] as usize]);
                prop_assert!(path.windows(2).all(|p| p[0] < p[1]) && *path.last().unwrap() < 64);
            }
        } else {
            prop_assert!(offsets.iter().chain(&nodes).all(|&x| x == POISON));
        }
    }
}
