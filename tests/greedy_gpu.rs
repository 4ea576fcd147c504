//! Greedy verification on the GPU against the CPU reference.
//!
//! Fresh random inputs every run (seed printed), outputs poisoned before each launch, every dtype, the
//! awkward sizes (V = 1, 3, 32000, 128256, 151936, 262144; batch 0, 1, 257; 0 and 32 drafts), a logits pointer
//! that is not 16-byte aligned, ties, NaN and infinities, bad per-request contents, and the C ABI on device
//! pointers and a caller's stream. Tolerance: none; tokens must be identical.
//!
//! Without a usable GPU every test prints why it was skipped and passes; with `SPECDEC_REQUIRE_GPU=1` it fails.

mod common;

use std::ffi::c_void;
use std::sync::Arc;

use common::{gpu, rng, GreedyCase, GreedyOutput, TestElement, POISON};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::{bf16, f16};
use specdec::capi::{self, specdec_status};
use specdec::cuda::{CudaBackend, DeviceIn, DeviceOut};
use specdec::greedy::REQUEST_INVALID;
use specdec::RequestStatus;

/// Device copies of a case's logits (shifted by `logits_offset` elements, to exercise rows that are not
/// 16-byte aligned), offsets and drafts. Every array gets one spare element: cudarc rejects empty copies.
struct DeviceCase<T> {
    logits: CudaSlice<T>,
    logits_offset: usize,
    offsets: CudaSlice<i32>,
    drafts: CudaSlice<i32>,
}

fn upload<T: TestElement + cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    case: &GreedyCase<T>,
    logits_offset: usize,
) -> DeviceCase<T> {
    let mut logits = vec![T::from_f32(-1.0); logits_offset];
    logits.extend_from_slice(&case.logits);
    logits.push(T::from_f32(0.0));
    DeviceCase {
        logits: stream.clone_htod(&logits).unwrap(),
        logits_offset,
        offsets: stream.clone_htod(&case.draft_offsets).unwrap(),
        drafts: stream
            .clone_htod(&[case.draft_tokens.clone(), vec![0]].concat())
            .unwrap(),
    }
}

/// Runs the case on the GPU through the safe API, with poisoned outputs; `logits_offset` shifts the logits by
/// that many elements to exercise unaligned rows.
fn run_gpu<T: TestElement + cudarc::driver::DeviceRepr>(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    case: &GreedyCase<T>,
    logits_offset: usize,
) -> GreedyOutput {
    let poisoned = GreedyOutput::poisoned(case.num_requests(), case.emit_width);
    let inputs = upload(stream, case, logits_offset);
    let mut accepted = stream
        .clone_htod(&[poisoned.accepted.clone(), vec![POISON]].concat())
        .unwrap();
    let mut emitted = stream
        .clone_htod(&[poisoned.emitted.clone(), vec![POISON]].concat())
        .unwrap();
    let mut status = stream
        .clone_htod(&[poisoned.status.clone(), vec![POISON]].concat())
        .unwrap();
    let (b, n) = (case.num_requests(), case.emitted_len());
    let logits_view = inputs
        .logits
        .slice(inputs.logits_offset..inputs.logits_offset + case.logits.len());
    let drafts_view = inputs.drafts.slice(0..case.draft_tokens.len());
    {
        let mut accepted_view = accepted.slice_mut(0..b);
        let mut emitted_view = emitted.slice_mut(0..n);
        let mut status_view = status.slice_mut(0..b);
        backend
            .greedy_verify(
                stream,
                DeviceIn::new(&logits_view, stream),
                case.vocab_size,
                DeviceIn::new(&inputs.offsets, stream),
                DeviceIn::new(&drafts_view, stream),
                case.emit_width,
                DeviceOut::new(&mut accepted_view, stream),
                DeviceOut::new(&mut emitted_view, stream),
                Some(DeviceOut::new(&mut status_view, stream)),
            )
            .unwrap();
    }
    stream.synchronize().unwrap();
    let accepted = stream.clone_dtoh(&accepted).unwrap();
    let emitted = stream.clone_dtoh(&emitted).unwrap();
    let status = stream.clone_dtoh(&status).unwrap();
    assert_eq!(accepted[b], POISON, "wrote past accepted_counts");
    assert_eq!(emitted[n], POISON, "wrote past emitted_tokens");
    assert_eq!(status[b], POISON, "wrote past request_status");
    GreedyOutput {
        accepted: accepted[..b].to_vec(),
        emitted: emitted[..n].to_vec(),
        status: status[..b].to_vec(),
    }
}

fn matches_cpu_for<T: TestElement + cudarc::driver::DeviceRepr>(name: &str) {
    let Some(backend) = gpu(name) else { return };
    let stream = backend.context().new_stream().unwrap();
    let mut rng = rng(name);
    // (vocab, requests, max drafts): every awkward vocabulary with batch 0 and 1 and 0 or 32 drafts; batch 257
    // with ragged drafts up to 32 where the logits stay within a few hundred MB.
    let mut shapes = Vec::new();
    for &vocab in &[1usize, 3, 32000, 128256, 151936, 262144] {
        for &(requests, drafts) in &[(0usize, 0usize), (1, 0), (1, 32)] {
            shapes.push((vocab, requests, drafts));
        }
        shapes.push((vocab, 257, if vocab <= 32000 { 32 } else { 1 }));
    }
    for (vocab, requests, drafts) in shapes {
        for tie_prone in [false, true] {
            let case = GreedyCase::<T>::random(&mut rng, requests, vocab, drafts, 0.8, tie_prone);
            let want = case.run_cpu().unwrap();
            for offset in [0, 1] {
                let got = run_gpu(&backend, &stream, &case, offset);
                assert_eq!(
                    got, want,
                    "{name}: V={vocab} B={requests} k<={drafts} ties={tie_prone} offset={offset}"
                );
            }
        }
    }
}

#[test]
fn f32_matches_cpu() {
    matches_cpu_for::<f32>("gpu f32");
}

#[test]
fn f16_matches_cpu() {
    matches_cpu_for::<f16>("gpu f16");
}

#[test]
fn bf16_matches_cpu() {
    matches_cpu_for::<bf16>("gpu bf16");
}

/// NaN, infinities and rows of -inf: the requests whose rows hold a NaN or `+inf`, or have no finite logit, are
/// flagged alike on both backends (the same statuses, -1 rows), and the others get the same tokens.
#[test]
fn special_values_match_cpu() {
    let Some(backend) = gpu("special values") else {
        return;
    };
    let stream = backend.context().new_stream().unwrap();
    let mut rng = rng("special values");
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
        // Special values in one row of ten (a few per row: some rows stay usable, with -0.0, -inf or f32::MAX
        // in them), then a row of NaN and a row of -inf (no finite logit).
        for row in case.logits.chunks_mut(vocab) {
            if rand::Rng::random_bool(&mut rng, 0.1) {
                for _ in 0..rand::Rng::random_range(&mut rng, 1..=2) {
                    let at = rand::Rng::random_range(&mut rng, 0..vocab);
                    row[at] = specials[rand::Rng::random_range(&mut rng, 0..specials.len())];
                }
            }
        }
        let rows = case.logits.len() / vocab;
        case.logits[(rows - 1) * vocab..].fill(f32::NAN);
        case.logits[(rows / 2) * vocab..(rows / 2 + 1) * vocab].fill(f32::NEG_INFINITY);
        let want = case.run_cpu().unwrap();
        let flagged = want.status.iter().filter(|&&s| s != 0).count();
        assert!(
            flagged > 0 && flagged < 64,
            "V={vocab}: {flagged} of 64 flagged; the case must mix good and bad requests"
        );
        assert!(want
            .status
            .iter()
            .all(|&s| s == 0 || s == RequestStatus::RowValues.code()));
        assert_eq!(run_gpu(&backend, &stream, &case, 0), want, "V={vocab}");
    }
}

#[test]
fn bad_requests_are_flagged_and_the_rest_are_right() {
    let Some(backend) = gpu("bad requests") else {
        return;
    };
    let stream = backend.context().new_stream().unwrap();
    let mut rng = rng("bad requests");
    let mut case = GreedyCase::<bf16>::random(&mut rng, 6, 1000, 3, 0.9, false);
    // Make every draft length 2 so the offsets are easy to corrupt: [0, 2, 4, 6, 8, 10, 12].
    case.draft_offsets = (0..=6).map(|b| 2 * b).collect();
    case.draft_tokens = vec![1; 12];
    case.logits = (0..(12 + 6) * 1000)
        .map(|i| bf16::from_f32(((i * 7919) % 1000) as f32))
        .collect();
    case.emit_width = 3;
    let good = case.run_cpu().unwrap();
    let mut bad = case;
    bad.draft_tokens[2] = 1000; // request 1: draft id == V
    bad.draft_tokens[4] = -1; // request 2: -1 padding
    bad.draft_offsets[4] = 20; // requests 3 and 4: offset beyond num_draft_tokens
    assert!(
        bad.run_cpu_strict().is_err(),
        "without request_status the CPU backend rejects the same inputs"
    );
    let got = run_gpu(&backend, &stream, &bad, 0);
    // Request 5's own offsets (10..12) are valid, but the search for the owner of its rows (15..=17) lands on
    // request 3, whose offsets are broken: with a broken neighbour a row's owner cannot be trusted, so request 5
    // is flagged too (the rule of GreedyShape::row_owner and of the sampler).
    check_flagged(&got, &good, &[1, 2, 3, 4, 5]);
    assert_eq!(got, bad.run_cpu().unwrap(), "flagged alike on the CPU");
    let (token, offsets) = (
        RequestStatus::DraftToken.code(),
        RequestStatus::Offsets.code(),
    );
    assert_eq!(got.status, [0, token, token, offsets, offsets, offsets]);

    // Offsets that do not cover the drafts: the first starting at 1, the last ending at 11 of 12. The first and
    // the last request are flagged (the CPU refuses the batch), the others are right.
    let mut uncovered = bad;
    uncovered.draft_tokens = vec![1; 12];
    uncovered.draft_offsets = (0..=6).map(|b| 2 * b).collect();
    uncovered.draft_offsets[0] = 1;
    uncovered.draft_offsets[6] = 11;
    assert!(
        uncovered.run_cpu_strict().is_err(),
        "without request_status the CPU backend rejects the same inputs"
    );
    let got = run_gpu(&backend, &stream, &uncovered, 0);
    check_flagged(&got, &good, &[0, 5]);
    assert_eq!(
        got,
        uncovered.run_cpu().unwrap(),
        "flagged alike on the CPU"
    );
}

/// Requests `flagged` are marked invalid with rows of -1; the others equal `good`.
fn check_flagged(got: &GreedyOutput, good: &GreedyOutput, flagged: &[usize]) {
    for b in 0..6 {
        let row = &got.emitted[b * 3..(b + 1) * 3];
        if flagged.contains(&b) {
            assert_eq!(got.accepted[b], REQUEST_INVALID, "request {b} flagged");
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

#[test]
fn c_abi_on_device_pointers_and_a_callers_stream() {
    let Some(backend) = gpu("C ABI on CUDA") else {
        return;
    };
    let stream = backend.context().new_stream().unwrap();
    let mut rng = rng("C ABI on CUDA");
    let case = GreedyCase::<f16>::random(&mut rng, 33, 50_000, 7, 0.8, false);
    let want = case.run_cpu().unwrap();
    let inputs = upload(&stream, &case, 0);
    let mut accepted = stream.clone_htod(&vec![POISON; 33]).unwrap();
    let mut emitted = stream
        .clone_htod(&vec![POISON; 33 * case.emit_width])
        .unwrap();
    let mut ctx = std::ptr::null_mut();
    unsafe {
        assert_eq!(
            capi::specdec_context_create_cuda(0, &mut ctx),
            specdec_status::SPECDEC_OK
        );
        let current_before = cudarc::driver::result::ctx::get_current().unwrap();
        let status = {
            let (l, _l) = inputs.logits.device_ptr(&stream);
            let (o, _o) = inputs.offsets.device_ptr(&stream);
            let (d, _d) = inputs.drafts.device_ptr(&stream);
            let (a, _a) = accepted.device_ptr_mut(&stream);
            let (e, _e) = emitted.device_ptr_mut(&stream);
            capi::specdec_greedy_verify(
                ctx,
                l as *const c_void,
                1,
                case.vocab_size as i64,
                o as *const i32,
                33,
                d as *const i32,
                case.draft_tokens.len() as i64,
                case.emit_width as i64,
                a as *mut i32,
                e as *mut i32,
                std::ptr::null_mut(),
                stream.cu_stream() as *mut c_void,
            )
        };
        assert_eq!(status, specdec_status::SPECDEC_OK);
        assert_eq!(
            cudarc::driver::result::ctx::get_current().unwrap(),
            current_before,
            "caller's context kept"
        );
        // Misaligned device pointer: rejected before launch.
        let (l, _l) = inputs.logits.device_ptr(&stream);
        let status = capi::specdec_greedy_verify(
            ctx,
            (l + 1) as *const c_void,
            1,
            case.vocab_size as i64,
            std::ptr::null(),
            33,
            std::ptr::null(),
            0,
            8,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        assert_eq!(status, specdec_status::SPECDEC_INVALID_ARGUMENT);
        assert_eq!(
            capi::specdec_context_destroy(ctx),
            specdec_status::SPECDEC_OK
        );
    }
    stream.synchronize().unwrap();
    assert_eq!(stream.clone_dtoh(&accepted).unwrap(), want.accepted);
    assert_eq!(stream.clone_dtoh(&emitted).unwrap(), want.emitted);
}

#[test]
fn raw_pointers_on_the_legacy_default_stream() {
    let Some(backend) = gpu("raw pointers") else {
        return;
    };
    let stream = backend.context().default_stream();
    let mut rng = rng("raw pointers");
    let case = GreedyCase::<f32>::random(&mut rng, 5, 4097, 2, 0.8, false);
    let want = case.run_cpu().unwrap();
    let inputs = upload(&stream, &case, 0);
    let mut accepted = stream.clone_htod(&vec![POISON; 5]).unwrap();
    let mut emitted = stream.clone_htod(&vec![POISON; 15]).unwrap();
    {
        let (l, _l) = inputs.logits.device_ptr(&stream);
        let (o, _o) = inputs.offsets.device_ptr(&stream);
        let (d, _d) = inputs.drafts.device_ptr(&stream);
        let (a, _a) = accepted.device_ptr_mut(&stream);
        let (e, _e) = emitted.device_ptr_mut(&stream);
        // SAFETY: the pointers are live cudarc allocations of the stated lengths, used on this stream.
        unsafe {
            backend
                .greedy_verify::<f32>(
                    &stream,
                    DeviceIn::from_raw(l, case.logits.len()),
                    case.vocab_size,
                    DeviceIn::from_raw(o, 6),
                    DeviceIn::from_raw(d, case.draft_tokens.len()),
                    3,
                    DeviceOut::from_raw(a, 5),
                    DeviceOut::from_raw(e, 15),
                    None,
                )
                .unwrap();
        }
    }
    assert_eq!(stream.clone_dtoh(&accepted).unwrap(), want.accepted);
    assert_eq!(stream.clone_dtoh(&emitted).unwrap(), want.emitted);
}
