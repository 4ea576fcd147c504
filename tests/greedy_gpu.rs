//! Greedy verification on the GPU: the shared bodies of `tests/common/greedy.rs` (the same ones
//! `tests/greedy_cpu.rs` runs on the CPU backend: fresh random inputs against the naive reference, every dtype,
//! the awkward sizes, logits not 16-byte aligned, NaN and infinities, bad requests flagged alone, sizes and
//! memory refused), then what only the GPU has: the C ABI on device pointers and a caller's stream, and raw
//! pointers on the legacy default stream. Tolerance: none; tokens must be identical.
//!
//! Without a usable GPU every test prints why it was skipped and passes; with `SPECDEC_REQUIRE_GPU=1` it fails.

mod common;

use std::ffi::c_void;
use std::sync::Arc;

use common::{gpu, rng, GreedyCase, TestElement, POISON};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::f16;
use specdec::backend::{Backend, Stream};
use specdec::capi::{self, specdec_status};
use specdec::cuda::{DeviceIn, DeviceOut};
use specdec::greedy::{GreedyInputs, GreedyOutputs};

greedy_tests!(common::device::TestDevice::cuda("greedy_gpu"));

/// Device copies of a case's logits, offsets and drafts for the C ABI test. Every array gets one spare
/// element: cudarc rejects empty copies.
struct DeviceCase<T> {
    logits: CudaSlice<T>,
    offsets: CudaSlice<i32>,
    drafts: CudaSlice<i32>,
}

fn upload<T: TestElement + cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    case: &GreedyCase<T>,
) -> DeviceCase<T> {
    DeviceCase {
        logits: stream
            .clone_htod(&[case.logits.clone(), vec![T::from_f32(0.0)]].concat())
            .unwrap(),
        offsets: stream.clone_htod(&case.draft_offsets).unwrap(),
        drafts: stream
            .clone_htod(&[case.draft_tokens.clone(), vec![0]].concat())
            .unwrap(),
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
    let inputs = upload(&stream, &case);
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
    let inputs = upload(&stream, &case);
    let mut accepted = stream.clone_htod(&vec![POISON; 5]).unwrap();
    let mut emitted = stream.clone_htod(&vec![POISON; 15]).unwrap();
    {
        let (l, _l) = inputs.logits.device_ptr(&stream);
        let (o, _o) = inputs.offsets.device_ptr(&stream);
        let (d, _d) = inputs.drafts.device_ptr(&stream);
        let (a, _a) = accepted.device_ptr_mut(&stream);
        let (e, _e) = emitted.device_ptr_mut(&stream);
        // SAFETY: the pointers are live cudarc allocations of the stated lengths, used on this stream.
        let (inputs, outputs) = unsafe {
            (
                GreedyInputs {
                    logits: DeviceIn::<f32>::from_raw(l, case.logits.len()).into(),
                    vocab_size: case.vocab_size,
                    draft_offsets: DeviceIn::from_raw(o, 6).into(),
                    draft_tokens: DeviceIn::from_raw(d, case.draft_tokens.len()).into(),
                },
                GreedyOutputs {
                    emit_width: 3,
                    accepted_counts: DeviceOut::from_raw(a, 5).into(),
                    emitted_tokens: DeviceOut::from_raw(e, 15).into(),
                    request_status: None,
                },
            )
        };
        Backend::Cuda(backend)
            .greedy_verify(Stream::Default, &inputs, outputs)
            .unwrap();
    }
    assert_eq!(stream.clone_dtoh(&accepted).unwrap(), want.accepted);
    assert_eq!(stream.clone_dtoh(&emitted).unwrap(), want.emitted);
}
