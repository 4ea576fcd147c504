//! Greedy verification's test bodies, run unchanged on every backend (`greedy_tests!` in `tests/greedy_cpu.rs`
//! and `tests/greedy_gpu.rs`): against the naive reference of `GreedyCase::expected` on fresh random inputs
//! (seed printed), outputs poisoned before each run and checked past their ends, every dtype, the awkward
//! sizes, unaligned logits, NaN and infinities, bad requests flagged alone, and bad sizes refused naming the
//! argument. Tolerance: none; tokens must be identical.

use half::{bf16, f16};
use rand::Rng;
use specdec::greedy::{GreedyInputs, GreedyOutputs};
use specdec::{Error, RequestStatus};

use super::device::TestDevice;
use super::{rng, GreedyCase, GreedyOutput, TestElement, POISON};

/// Declares one test per body, each running it on `$device` (an `Option<TestDevice>`; `None` skips).
#[macro_export]
macro_rules! greedy_tests {
    ($device:expr) => {
        $crate::device_tests!($device; greedy =>
            random_f32_cases_match_the_naive_reference,
            random_f16_cases_match_the_naive_reference,
            random_bf16_cases_match_the_naive_reference,
            hand_worked_batch,
            special_values_are_flagged_alone,
            bad_requests_are_flagged_and_the_rest_are_right,
            rows_claimed_by_two_requests_go_to_one_and_flag_the_other,
            empty_batch_and_single_token_vocabulary,
            bad_sizes_are_refused_naming_the_argument,
            arrays_in_the_wrong_memory_are_refused,
        );
    };
}

fn random_cases_match_the_naive_reference<T: TestElement + super::device::Element>(
    device: &TestDevice,
    dtype: &str,
) {
    let name = format!("{} {dtype} random cases", device.name());
    let mut rng = rng(&name);
    let vocabularies = [
        1usize, 2, 3, 31, 32, 33, 1000, 32000, 128256, 151936, 262144,
    ];
    for vocab in vocabularies {
        // Batch 257 with 32 drafts, and large vocabularies, only where the logits stay small.
        let mut shapes = vec![(0usize, 0usize), (1, 0), (1, 32), (7, 5)];
        shapes.push((257, if vocab <= 1000 { 32 } else { 1 }));
        if vocab > 32000 {
            shapes = vec![(1, 0), (3, 4)];
        }
        for (requests, max_drafts) in shapes {
            for tie_prone in [false, true] {
                let case =
                    GreedyCase::<T>::random(&mut rng, requests, vocab, max_drafts, 0.8, tie_prone);
                let want = case.expected();
                for offset in [0, 1] {
                    let got = case.run(device, true, offset).unwrap();
                    assert_eq!(
                        got, want,
                        "{name}: V={vocab} B={requests} k<={max_drafts} ties={tie_prone} offset={offset}"
                    );
                }
            }
        }
    }
}

pub fn random_f32_cases_match_the_naive_reference(device: &TestDevice) {
    random_cases_match_the_naive_reference::<f32>(device, "f32");
}

pub fn random_f16_cases_match_the_naive_reference(device: &TestDevice) {
    random_cases_match_the_naive_reference::<f16>(device, "f16");
}

pub fn random_bf16_cases_match_the_naive_reference(device: &TestDevice) {
    random_cases_match_the_naive_reference::<bf16>(device, "bf16");
}

pub fn hand_worked_batch(device: &TestDevice) {
    // V = 5. Request 0 drafts [4, 2, 0]: rows argmax 4 (accept), 2 (accept), 1 (reject 0, emit 1).
    // Request 1 drafts [3]: row argmax 3 (accept), bonus row argmax 0.
    // Request 2 drafts nothing: its bonus row has a two-way tie at 2 and 4, the lower index wins.
    #[rustfmt::skip]
    let logits: Vec<f32> = vec![
        0., 0., 0., 0., 1.,
        0., 0., 5., 0., 0.,
        0., 2., 0., 0., 0.,
        9., 9., 9., 9., 9.5, // request 0's bonus row: not reached
        0., 0., 0., 3., 0.,
        7., 0., 0., 0., 0.,
        0., 0., 6., 0., 6.,
    ];
    let case = GreedyCase {
        vocab_size: 5,
        logits,
        draft_offsets: vec![0, 3, 4, 4],
        draft_tokens: vec![4, 2, 0, 3],
        emit_width: 4,
    };
    let got = case.run(device, true, 0).unwrap();
    assert_eq!(got.accepted, [2, 1, 0]);
    assert_eq!(got.emitted, [4, 2, 1, -1, 3, 0, -1, -1, 2, -1, -1, -1]);
    assert_eq!(got.status, [0, 0, 0]);
}

/// NaN, infinities and rows of -inf: the requests whose rows hold a NaN or `+inf`, or have no finite logit, are
/// flagged (the same statuses, -1 rows) and the others get their tokens; `-0.0`, `-inf` and `f32::MAX` in an
/// otherwise usable row are fine.
pub fn special_values_are_flagged_alone(device: &TestDevice) {
    let name = format!("{} special values", device.name());
    let mut rng = rng(&name);
    let specials = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        f32::MAX,
        f32::MIN,
    ];
    for vocab in [3usize, 40_000] {
        let mut case = GreedyCase::<f32>::random(&mut rng, 64, vocab, 4, 0.5, false);
        // Special values in one row of ten, then a row of NaN and a row of -inf (no finite logit).
        for row in case.logits.chunks_mut(vocab) {
            if rng.random_bool(0.1) {
                for _ in 0..rng.random_range(1..=2) {
                    let at = rng.random_range(0..vocab);
                    row[at] = specials[rng.random_range(0..specials.len())];
                }
            }
        }
        let rows = case.logits.len() / vocab;
        case.logits[(rows - 1) * vocab..].fill(f32::NAN);
        case.logits[(rows / 2) * vocab..(rows / 2 + 1) * vocab].fill(f32::NEG_INFINITY);
        let want = case.expected();
        let flagged = want.status.iter().filter(|&&s| s != 0).count();
        assert!(
            flagged > 0 && flagged < 64,
            "V={vocab}: {flagged} of 64 flagged; the case must mix good and bad requests"
        );
        assert_eq!(
            case.run(device, true, 0).unwrap(),
            want,
            "{name}: V={vocab}"
        );
    }
}

pub fn bad_requests_are_flagged_and_the_rest_are_right(device: &TestDevice) {
    let name = format!("{} bad requests", device.name());
    let mut rng = rng(&name);
    let mut case = GreedyCase::<bf16>::random(&mut rng, 6, 1000, 3, 0.9, false);
    // Every draft length 2 so the offsets are easy to corrupt: [0, 2, 4, 6, 8, 10, 12].
    case.draft_offsets = (0..=6).map(|b| 2 * b).collect();
    case.draft_tokens = vec![1; 12];
    case.logits = (0..(12 + 6) * 1000)
        .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32))
        .collect();
    case.emit_width = 3;
    let good = case.expected();
    let mut bad = case;
    bad.draft_tokens[2] = 1000; // request 1: draft id == V
    bad.draft_tokens[4] = -1; // request 2: -1 padding
    bad.draft_offsets[4] = 20; // requests 3 and 4: offset beyond num_draft_tokens
    let got = bad.run(device, true, 0).unwrap();
    // Request 5's own offsets (10..12) are valid, but the search for the owner of its rows (15..=17) lands on
    // request 3, whose offsets are broken: with a broken neighbour a row's owner cannot be trusted, so request 5
    // is flagged too (the rule of GreedyShape::row_owner and of the sampler).
    check_flagged(&got, &good, &[1, 2, 3, 4, 5]);
    let (token, offsets) = (
        RequestStatus::DraftToken.code(),
        RequestStatus::Offsets.code(),
    );
    assert_eq!(got.status, [0, token, token, offsets, offsets, offsets]);
    if device.is_cpu() {
        expect_invalid(bad.run(device, false, 0), "draft_tokens[2]");
    } else {
        // The kernel cannot report without synchronising: it still marks the requests.
        let strict = bad.run(device, false, 0).unwrap();
        assert_eq!(strict.accepted, got.accepted);
        assert_eq!(strict.emitted, got.emitted);
        assert!(
            strict.status.iter().all(|&s| s == POISON),
            "status not written"
        );
    }

    // Offsets that do not cover the drafts: the first starting at 1, the last ending at 11 of 12. The first and
    // the last request are flagged, the others are right.
    let mut uncovered = bad;
    uncovered.draft_tokens = vec![1; 12];
    uncovered.draft_offsets = (0..=6).map(|b| 2 * b).collect();
    uncovered.draft_offsets[0] = 1;
    uncovered.draft_offsets[6] = 11;
    let got = uncovered.run(device, true, 0).unwrap();
    check_flagged(&got, &good, &[0, 5]);
    assert_eq!(got.status, [offsets, 0, 0, 0, 0, offsets]);
}

/// Requests `flagged` are marked invalid with rows of -1; the others equal `good`.
fn check_flagged(got: &GreedyOutput, good: &GreedyOutput, flagged: &[usize]) {
    for b in 0..6 {
        let row = &got.emitted[b * 3..(b + 1) * 3];
        if flagged.contains(&b) {
            assert_eq!(got.accepted[b], -1, "request {b} flagged");
            assert_eq!(row, [-1, -1, -1], "request {b} row cleared");
        } else {
            assert_eq!(got.accepted[b], good.accepted[b], "request {b} unaffected");
            assert_eq!(
                row,
                &good.emitted[b * 3..(b + 1) * 3],
                "request {b} unaffected"
            );
        }
    }
}

/// A request's broken offsets can make two others claim the same logits rows: `draft_offsets = [0, 3, 1, 4]`
/// breaks request 1 (3 > 1) and gives request 2 rows 2..=5, which overlap request 0's 0..=3. The rows go to
/// request 0 (the search of `GreedyShape::row_owner`, the sampler's rule) and request 2 is flagged OFFSETS, as the
/// sampler at temperature 0 flags it (found by review: greedy processed request 2 and the two disagreed).
pub fn rows_claimed_by_two_requests_go_to_one_and_flag_the_other(device: &TestDevice) {
    let case = GreedyCase {
        vocab_size: 4,
        logits: [0.0f32, 5.0, 0.0, 0.0].repeat(7),
        draft_offsets: vec![0, 3, 1, 4],
        draft_tokens: vec![1, 1, 1, 1],
        emit_width: 5,
    };
    let out = case.run(device, true, 0).unwrap();
    let offsets = RequestStatus::Offsets.code();
    assert_eq!(out.status, [0, offsets, offsets]);
    assert_eq!(out.accepted, [3, -1, -1]);
    assert_eq!(&out.emitted[..5], &[1, 1, 1, 1, -1]);
    assert!(out.emitted[5..].iter().all(|&t| t == -1));
}

pub fn empty_batch_and_single_token_vocabulary(device: &TestDevice) {
    let empty = GreedyCase::<f32> {
        vocab_size: 10,
        logits: vec![],
        draft_offsets: vec![0],
        draft_tokens: vec![],
        emit_width: 1,
    };
    let out = empty.run(device, true, 0).unwrap();
    assert!(out.accepted.is_empty() && out.emitted.is_empty());
    // V = 1: every argmax is 0, so a chain of zeros is accepted in full.
    let single = GreedyCase {
        vocab_size: 1,
        logits: vec![3.0f32; 4],
        draft_offsets: vec![0, 3],
        draft_tokens: vec![0, 0, 0],
        emit_width: 4,
    };
    let out = single.run(device, true, 0).unwrap();
    assert_eq!((out.accepted, out.emitted), (vec![3], vec![0, 0, 0, 0]));
}

pub fn expect_invalid<T: std::fmt::Debug>(result: specdec::Result<T>, argument: &str) {
    match result {
        Err(Error::InvalidArgument {
            argument: got,
            reason,
        }) => assert_eq!(got, argument, "wrong argument named (reason: {reason})"),
        other => panic!("expected an invalid-argument error naming {argument}, got {other:?}"),
    }
}

/// Sizes and lengths that do not fit are refused before anything runs, naming the argument, on every backend,
/// and the outputs stay untouched.
pub fn bad_sizes_are_refused_naming_the_argument(device: &TestDevice) {
    let logits = device.upload(&[0.0f32; 4 * 3]);
    let run = |vocab: usize,
               logits_from: usize,
               offsets: &[i32],
               drafts: &[i32],
               width: usize,
               accepted_len: usize,
               emitted_len: usize,
               status_len: Option<usize>| {
        let (offsets, drafts) = (device.upload(offsets), device.upload(drafts));
        let mut accepted = device.upload_with_spare(&vec![POISON; accepted_len], POISON);
        let mut emitted = device.upload_with_spare(&vec![POISON; emitted_len], POISON);
        let mut status = device.upload_with_spare(&vec![POISON; status_len.unwrap_or(0)], POISON);
        let result = device.backend.greedy_verify(
            device.stream(),
            &GreedyInputs {
                logits: logits.input_from(logits_from),
                vocab_size: vocab,
                draft_offsets: offsets.input(),
                draft_tokens: drafts.input(),
            },
            GreedyOutputs {
                emit_width: width,
                accepted_counts: accepted.output(),
                emitted_tokens: emitted.output(),
                request_status: status_len.map(|_| status.output()),
            },
        );
        let untouched = accepted.download(device).iter().all(|&x| x == POISON)
            && emitted.download(device).iter().all(|&x| x == POISON)
            && status.download(device).iter().all(|&x| x == POISON);
        assert!(untouched, "a refused call writes nothing");
        result
    };
    let ok = [0, 1, 2];
    expect_invalid(run(3, 0, &[], &[0, 0], 3, 2, 6, None), "draft_offsets");
    expect_invalid(run(3, 0, &ok, &[0, 0], 0, 2, 0, None), "emit_width");
    expect_invalid(run(0, 0, &ok, &[0, 0], 3, 2, 6, None), "vocab_size");
    expect_invalid(run(3, 1, &ok, &[0, 0], 3, 2, 6, None), "logits");
    expect_invalid(run(3, 0, &ok, &[0], 3, 2, 6, None), "logits");
    expect_invalid(run(3, 0, &ok, &[0, 0], 3, 3, 6, None), "accepted_counts");
    expect_invalid(run(3, 0, &ok, &[0, 0], 3, 2, 5, None), "emitted_tokens");
    expect_invalid(run(3, 0, &ok, &[0, 0], 3, 2, 6, Some(1)), "request_status");
}

/// An array in the other backend's memory is refused naming it: the CPU backend given device memory (when a GPU
/// is here to make some), the CUDA backend given host memory.
pub fn arrays_in_the_wrong_memory_are_refused(device: &TestDevice) {
    let host_logits = [0.0f32; 3];
    let gpu = if device.is_cpu() { other_gpu() } else { None };
    let device_logits = gpu.as_ref().map(|gpu| gpu.upload(&host_logits));
    let logits = match (&device_logits, device.is_cpu()) {
        (Some(array), _) => array.input(),
        (None, true) => return,
        (None, false) => host_logits[..].into(),
    };
    let (offsets, drafts) = (device.upload(&[0i32, 0]), device.upload::<i32>(&[]));
    let mut accepted = device.upload(&[0i32]);
    let mut emitted = device.upload(&[0i32]);
    let result = device.backend.greedy_verify(
        device.stream(),
        &GreedyInputs {
            logits,
            vocab_size: 3,
            draft_offsets: offsets.input(),
            draft_tokens: drafts.input(),
        },
        GreedyOutputs {
            emit_width: 1,
            accepted_counts: accepted.output(),
            emitted_tokens: emitted.output(),
            request_status: None,
        },
    );
    expect_invalid(result, "logits");
}

/// A GPU to make device memory with, for a test running on the CPU backend.
fn other_gpu() -> Option<TestDevice> {
    #[cfg(feature = "cuda")]
    return TestDevice::cuda("wrong memory (CPU backend given device memory)");
    #[cfg(not(feature = "cuda"))]
    None
}
