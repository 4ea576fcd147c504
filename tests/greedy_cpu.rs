//! Greedy verification on the CPU backend: the shared bodies of `tests/common/greedy.rs` (the same ones
//! `tests/greedy_gpu.rs` runs on the GPU), then what only the CPU does: the argmax order, and a bad request
//! failing the whole call, naming its element, when no `request_status` is given.

mod common;

use common::{naive_argmax, GreedyOutput};
use half::{bf16, f16};
use specdec::{cpu, Error, RequestStatus};

greedy_tests!(Some(common::device::TestDevice::cpu()));

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
/// Without `request_status`, the first bad request fails the call, naming its element, and nothing is written
/// (sizes are refused alike on every backend: `bad_sizes_are_refused_naming_the_argument`).
fn bad_requests_fail_the_call_without_request_status() {
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
    assert_eq!(
        out,
        GreedyOutput::poisoned(2, 3),
        "a rejected call writes nothing"
    );
}
