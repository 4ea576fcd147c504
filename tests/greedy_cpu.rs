//! Greedy verification on the CPU backend against a naive reference, hand-worked cases, and bad input.

mod common;

use common::{naive_argmax, rng, GreedyCase, GreedyOutput, TestElement};
use half::{bf16, f16};
use specdec::{cpu, Error, RequestStatus};

fn random_cases_match_the_naive_reference<T: TestElement>(name: &str) {
    let mut rng = rng(name);
    for &vocab in &[1usize, 2, 3, 31, 32, 33, 1000, 32000] {
        for &(requests, max_drafts) in &[(0usize, 0usize), (1, 0), (1, 32), (7, 5), (257, 3)] {
            for tie_prone in [false, true] {
                let case =
                    GreedyCase::<T>::random(&mut rng, requests, vocab, max_drafts, 0.8, tie_prone);
                let got = case.run_cpu().unwrap();
                assert_eq!(
                    got,
                    case.expected(),
                    "V={vocab} B={requests} k<={max_drafts} ties={tie_prone}"
                );
            }
        }
    }
}

#[test]
fn random_f32_cases_match_the_naive_reference() {
    random_cases_match_the_naive_reference::<f32>("f32");
}

#[test]
fn random_f16_cases_match_the_naive_reference() {
    random_cases_match_the_naive_reference::<f16>("f16");
}

#[test]
fn random_bf16_cases_match_the_naive_reference() {
    random_cases_match_the_naive_reference::<bf16>("bf16");
}

#[test]
fn large_vocabularies_match_the_naive_reference() {
    let mut rng = rng("large vocabularies");
    for &vocab in &[128256usize, 151936, 262144] {
        let case = GreedyCase::<bf16>::random(&mut rng, 3, vocab, 4, 0.9, false);
        assert_eq!(case.run_cpu().unwrap(), case.expected(), "V={vocab}");
    }
}

#[test]
fn hand_worked_batch() {
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
    let (mut accepted, mut emitted) = (vec![99; 3], vec![99; 3 * 4]);
    cpu::greedy_verify(
        &logits,
        5,
        &[0, 3, 4, 4],
        &[4, 2, 0, 3],
        4,
        &mut accepted,
        &mut emitted,
        None,
    )
    .unwrap();
    assert_eq!(accepted, [2, 1, 0]);
    assert_eq!(emitted, [4, 2, 1, -1, 3, 0, -1, -1, 2, -1, -1, -1]);
}

#[test]
fn nan_infinities_and_signed_zeros_follow_the_documented_order() {
    let nan = f32::NAN;
    let inf = f32::INFINITY;
    // (row, expected argmax): NaN wins over +inf, the first NaN wins, -0 and +0 tie (lower index), -inf rows
    // give index 0.
    let cases: &[(&[f32], usize)] = &[
        (&[1.0, inf, nan, 2.0], 2),
        (&[nan, nan], 0),
        (&[-nan, 1.0], 0),
        (&[-0.0, 0.0], 0),
        (&[0.0, -0.0], 0),
        (&[-1.0, -0.0, 0.0], 1),
        (&[f32::NEG_INFINITY, f32::NEG_INFINITY], 0),
        (&[-3.0, f32::NEG_INFINITY, -2.0], 2),
    ];
    for (row, want) in cases {
        assert_eq!(cpu::argmax(row), *want, "{row:?}");
        assert_eq!(
            naive_argmax(row),
            *want,
            "the test's own reference agrees on {row:?}"
        );
        let halves: Vec<f16> = row.iter().map(|&x| f16::from_f32(x)).collect();
        let brains: Vec<bf16> = row.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(cpu::argmax(&halves), *want, "f16 {row:?}");
        assert_eq!(cpu::argmax(&brains), *want, "bf16 {row:?}");
    }
}

/// A request whose rows hold a NaN or `+inf`, or no finite logit, has no meaningful argmax: it is refused
/// (naming the element) or, with `request_status`, flagged alone; rows of the request past its first mismatch
/// count too, as in the sampler. `-inf` and `-0.0` elsewhere in a row are fine.
#[test]
fn unusable_rows_are_refused_or_flagged_alone() {
    let (nan, inf, ninf) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
    // V = 3, four requests of one draft (token 0) each, two rows apiece.
    let rows: [[f32; 3]; 8] = [
        [5.0, ninf, -0.0], // request 0: accepts 0, bonus argmax 1
        [ninf, 2.0, 1.0],
        [0.0, 1.0, 0.0], // request 1: mismatch at row 0, but its bonus row holds a NaN
        [1.0, nan, 0.0],
        [9.0, 0.0, 0.0], // request 2: +inf in its bonus row
        [0.0, inf, 0.0],
        [ninf, ninf, ninf], // request 3: no finite logit
        [1.0, 0.0, 0.0],
    ];
    let logits: Vec<f32> = rows.concat();
    let (offsets, drafts) = ([0, 1, 2, 3, 4], [0, 0, 0, 0]);
    let mut out = GreedyOutput::poisoned(4, 2);
    let strict = cpu::greedy_verify(
        &logits,
        3,
        &offsets,
        &drafts,
        2,
        &mut out.accepted,
        &mut out.emitted,
        None,
    );
    expect_invalid(strict, "logits[3, 1]");
    assert_eq!(
        out,
        GreedyOutput::poisoned(4, 2),
        "nothing written on an error"
    );
    cpu::greedy_verify(
        &logits,
        3,
        &offsets,
        &drafts,
        2,
        &mut out.accepted,
        &mut out.emitted,
        Some(&mut out.status),
    )
    .unwrap();
    let bad = RequestStatus::RowValues.code();
    assert_eq!(out.status, [0, bad, bad, bad]);
    assert_eq!(out.accepted, [1, -1, -1, -1]);
    assert_eq!(out.emitted, [0, 1, -1, -1, -1, -1, -1, -1]);
    // Each alone, strict: the element named is the row's first NaN, its +inf, or the whole row.
    for (b, argument) in [(2, "logits[5, 1]"), (3, "logits[6]")] {
        let one = &logits[2 * b * 3..2 * (b + 1) * 3];
        let (mut a, mut e) = ([0; 1], [0; 2]);
        let got = cpu::greedy_verify(one, 3, &[0, 1], &[0], 2, &mut a, &mut e, None);
        let shifted = argument
            .replace(&format!("{}", 2 * b), "0")
            .replace(&format!("{}", 2 * b + 1), "1");
        expect_invalid(got, &shifted);
    }
}

#[test]
fn empty_batch_and_single_token_vocabulary() {
    let (mut accepted, mut emitted): ([i32; 0], [i32; 0]) = ([], []);
    cpu::greedy_verify::<f32>(&[], 10, &[0], &[], 1, &mut accepted, &mut emitted, None).unwrap();
    // V = 1: every argmax is 0, so a chain of zeros is accepted in full.
    let (mut accepted, mut emitted) = ([0; 1], [0; 4]);
    cpu::greedy_verify(
        &[3.0f32; 4],
        1,
        &[0, 3],
        &[0, 0, 0],
        4,
        &mut accepted,
        &mut emitted,
        None,
    )
    .unwrap();
    assert_eq!((accepted, emitted), ([3], [0, 0, 0, 0]));
}

fn expect_invalid(result: specdec::Result<()>, argument: &str) {
    match result {
        Err(Error::InvalidArgument {
            argument: got,
            reason,
        }) => {
            assert_eq!(got, argument, "wrong argument named (reason: {reason})")
        }
        other => panic!("expected an invalid-argument error naming {argument}, got {other:?}"),
    }
}

#[test]
fn bad_input_is_rejected_naming_the_argument_and_outputs_are_untouched() {
    let logits = vec![0.0f32; 4 * 3];
    let run = |offsets: &[i32],
               drafts: &[i32],
               width: usize,
               accepted: &mut Vec<i32>,
               emitted: &mut Vec<i32>| {
        cpu::greedy_verify(&logits, 3, offsets, drafts, width, accepted, emitted, None)
    };
    let mut out = GreedyOutput::poisoned(2, 3);
    expect_invalid(
        run(&[0, 1, 2], &[0, 3], 3, &mut out.accepted, &mut out.emitted),
        "draft_tokens[1]",
    );
    expect_invalid(
        run(&[0, 1, 2], &[-1, 0], 3, &mut out.accepted, &mut out.emitted),
        "draft_tokens[0]",
    );
    expect_invalid(
        run(&[0, 2, 1], &[0, 0], 3, &mut out.accepted, &mut out.emitted),
        "draft_offsets[2]",
    );
    expect_invalid(
        run(&[-1, 1, 2], &[0, 0], 3, &mut out.accepted, &mut out.emitted),
        "draft_offsets[0]",
    );
    expect_invalid(
        run(&[0, 1, 3], &[0, 0], 3, &mut out.accepted, &mut out.emitted),
        "draft_offsets[2]",
    );
    // The offsets must cover the drafts: start at 0, end at num_draft_tokens (before, both were accepted and
    // the rows derived from them no longer lined up with the logits).
    expect_invalid(
        run(&[1, 1, 2], &[0, 0], 3, &mut out.accepted, &mut out.emitted),
        "draft_offsets[0]",
    );
    expect_invalid(
        run(&[0, 1, 1], &[0, 0], 3, &mut out.accepted, &mut out.emitted),
        "draft_offsets[2]",
    );
    expect_invalid(
        run(
            &[0, 2, 2],
            &[0, 0],
            2,
            &mut out.accepted,
            &mut out.emitted[..4].to_vec(),
        ),
        "emit_width",
    );
    expect_invalid(
        run(&[0, 1, 2], &[0, 0], 0, &mut out.accepted, &mut vec![]),
        "emit_width",
    );
    expect_invalid(
        run(&[], &[0, 0], 3, &mut out.accepted, &mut out.emitted),
        "draft_offsets",
    );
    expect_invalid(
        run(&[0, 1, 2], &[0, 0], 3, &mut vec![0; 3], &mut out.emitted),
        "accepted_counts",
    );
    expect_invalid(
        run(&[0, 1, 2], &[0, 0], 3, &mut out.accepted, &mut vec![0; 5]),
        "emitted_tokens",
    );
    expect_invalid(
        cpu::greedy_verify(
            &logits[1..],
            3,
            &[0, 1, 2],
            &[0, 0],
            3,
            &mut out.accepted,
            &mut out.emitted,
            None,
        ),
        "logits",
    );
    expect_invalid(
        cpu::greedy_verify(
            &logits,
            0,
            &[0, 1, 2],
            &[0, 0],
            3,
            &mut out.accepted,
            &mut out.emitted,
            None,
        ),
        "vocab_size",
    );
    assert_eq!(
        out,
        GreedyOutput::poisoned(2, 3),
        "a rejected call writes nothing"
    );
}

/// A request's broken offsets can make two others claim the same logits rows: `draft_offsets = [0, 3, 1, 4]`
/// breaks request 1 (3 > 1) and gives request 2 rows 2..=5, which overlap request 0's 0..=3. The rows go to
/// request 0 (the search of `GreedyShape::row_owner`, the sampler's rule) and request 2 is flagged OFFSETS, as the
/// sampler at temperature 0 flags it (found by review: greedy processed request 2 and the two disagreed).
#[test]
fn rows_claimed_by_two_requests_go_to_one_and_flag_the_other() {
    let case = GreedyCase {
        vocab_size: 4,
        logits: [0.0f32, 5.0, 0.0, 0.0].repeat(7),
        draft_offsets: vec![0, 3, 1, 4],
        draft_tokens: vec![1, 1, 1, 1],
        emit_width: 5,
    };
    let out = case.run_cpu().unwrap();
    let offsets = RequestStatus::Offsets.code();
    assert_eq!(out.status, [0, offsets, offsets]);
    assert_eq!(out.accepted, [3, -1, -1]);
    assert_eq!(&out.emitted[..5], &[1, 1, 1, 1, -1]);
    assert!(out.emitted[5..].iter().all(|&t| t == -1));
}
