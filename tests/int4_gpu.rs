//! The int4 kernels on the GPU: the shared bodies of `tests/common/int4.rs` (the same ones `tests/int4_cpu.rs`
//! runs on the CPU backend: the quantizer against its rule, NaN groups, packing with given scales, the GEMV
//! against the f64 reference for every group size, dtype pair and M = 1..16 on awkward N and K, with the
//! tolerance stated there), then what only the GPU has: the quantizer and packer byte for byte against the CPU
//! on large shapes with NaN and infinite groups, misaligned or short device arrays, and the C ABI on device
//! pointers. Fresh random data every run (seed printed); outputs are poisoned first and checked past their ends.
//!
//! Without a usable GPU every test prints why it was skipped and passes; with `SPECDEC_REQUIRE_GPU=1` it fails.

mod common;

use std::ffi::c_void;
use std::sync::Arc;

use common::device::TestDevice;
use common::guarded::Guarded;
use common::int4::{random_weights, random_x, reference_gemv, ulp, Packed};
use common::{gpu, rng};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use rand::rngs::StdRng;
use rand::Rng;
use specdec::backend::{Backend, Stream};
use specdec::capi::{self, specdec_status};
use specdec::cpu;
use specdec::cuda::{CudaBackend, DeviceIn, DeviceOut};
use specdec::int4::{GemvShape, Int4Gemv, Int4Pack, Int4Quantize, Int4Shape, GROUP_SIZES};
use specdec::{Error, HalfElement};

int4_tests!(TestDevice::cuda("int4_gpu"));

fn quantize_on_gpu<T: HalfElement + DeviceRepr, S: HalfElement + DeviceRepr + ValidAsZeroBits>(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    shape: Int4Shape,
    w: &[T],
) -> Packed<S> {
    let weights = stream.clone_htod(w).unwrap();
    let mut packed = Guarded::new(stream, shape.packed_len(), 0xA5A5_A5A5u32);
    let mut scales = Guarded::new(stream, shape.meta_len(), S::from_f32(-7.0));
    let mut zeros = Guarded::new(stream, shape.meta_len(), 0xEEu8);
    Backend::Cuda(backend.clone())
        .int4_quantize(
            Stream::Cuda(stream),
            Int4Quantize {
                shape,
                weights: DeviceIn::new(&weights, stream).into(),
                packed: packed.out(stream).into(),
                scales: scales.out(stream).into(),
                zeros: zeros.out(stream).into(),
            },
        )
        .unwrap();
    Packed {
        shape,
        packed: packed.read(stream, "packed"),
        scales: scales.read(stream, "scales"),
        zeros: zeros.read(stream, "zeros"),
    }
}

fn check_quantizer<T: HalfElement + DeviceRepr, S: HalfElement + DeviceRepr + ValidAsZeroBits>(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    rng: &mut StdRng,
    shape: Int4Shape,
) {
    let mut w: Vec<T> = random_weights(rng, &shape, true);
    for _ in 0..3 {
        let i = rng.random_range(0..w.len());
        w[i] = [
            T::NAN,
            T::from_f32(f32::INFINITY),
            T::from_f32(f32::NEG_INFINITY),
        ][rng.random_range(0..3)];
    }
    let gpu: Packed<S> = quantize_on_gpu(backend, stream, shape, &w);
    let mut cpu_out: Packed<S> = Packed::zeroed(shape);
    cpu::int4_quantize(
        &shape,
        &w,
        &mut cpu_out.packed,
        &mut cpu_out.scales,
        &mut cpu_out.zeros,
    )
    .unwrap();
    let bits = |s: &[S]| s.iter().map(|v| v.to_bits()).collect::<Vec<u16>>();
    let what = format!("{shape:?} {:?} -> {:?}", T::DTYPE, S::DTYPE);
    assert_eq!(bits(&gpu.scales), bits(&cpu_out.scales), "scales, {what}");
    assert_eq!(gpu.zeros, cpu_out.zeros, "zeros, {what}");
    if let Some(i) = (0..gpu.packed.len()).find(|&i| gpu.packed[i] != cpu_out.packed[i]) {
        panic!(
            "packed word {i} differs, {what}: {:#010x} vs {:#010x}",
            gpu.packed[i], cpu_out.packed[i]
        );
    }

    // Packing with the given (CPU) scales and zeros on the device gives the same codes.
    let scales = stream.clone_htod(&cpu_out.scales).unwrap();
    let zeros = stream.clone_htod(&cpu_out.zeros).unwrap();
    let weights = stream.clone_htod(&w).unwrap();
    let mut packed = Guarded::new(stream, shape.packed_len(), 0x5A5A_5A5Au32);
    Backend::Cuda(backend.clone())
        .int4_pack(
            Stream::Cuda(stream),
            Int4Pack {
                shape,
                weights: DeviceIn::new(&weights, stream).into(),
                scales: DeviceIn::new(&scales, stream).into(),
                zeros: DeviceIn::new(&zeros, stream).into(),
                packed: packed.out(stream).into(),
            },
        )
        .unwrap();
    assert_eq!(
        packed.read(stream, "packed"),
        cpu_out.packed,
        "pack, {what}"
    );
}

#[test]
fn quantizer_is_byte_identical_to_the_cpu() {
    let Some(backend) = gpu("quantizer_is_byte_identical_to_the_cpu") else {
        return;
    };
    let stream = backend.context().new_stream().unwrap();
    let mut rng = rng("quantizer_is_byte_identical_to_the_cpu");
    for g in GROUP_SIZES {
        for (n, k) in [
            (16, 128),
            (48, 384),
            (4224, 4224),
            (11008, 256),
            (16, 14336),
            (32, 28672),
        ] {
            let shape = Int4Shape::new(n, k, g).unwrap();
            check_quantizer::<bf16, bf16>(&backend, &stream, &mut rng, shape);
            check_quantizer::<f16, f16>(&backend, &stream, &mut rng, shape);
            check_quantizer::<bf16, f16>(&backend, &stream, &mut rng, shape);
            check_quantizer::<f16, bf16>(&backend, &stream, &mut rng, shape);
        }
    }
}

#[test]
fn misaligned_or_short_device_arrays_are_rejected_naming_them() {
    let Some(backend) = gpu("misaligned_or_short_device_arrays_are_rejected_naming_them") else {
        return;
    };
    let stream = backend.context().new_stream().unwrap();
    let shape = Int4Shape::new(16, 64, 32).unwrap();
    let gemv = GemvShape::new(1, shape).unwrap();
    let packed = stream.alloc_zeros::<u32>(shape.packed_len() + 4).unwrap();
    let scales = stream.alloc_zeros::<bf16>(shape.meta_len()).unwrap();
    let zeros = stream.alloc_zeros::<u8>(shape.meta_len()).unwrap();
    let x = stream.alloc_zeros::<bf16>(64 + 8).unwrap();
    let mut y = stream.alloc_zeros::<bf16>(16).unwrap();
    let name = |r: Result<(), Error>| match r {
        Err(Error::InvalidArgument { argument, .. }) => argument,
        other => panic!("{other:?}"),
    };
    let x_off = x.slice(1..65); // 2 bytes past a 16-byte boundary
    let packed_ok = packed.slice(0..shape.packed_len());
    assert_eq!(
        name(Backend::Cuda(backend.clone()).int4_gemv(
            Stream::Cuda(&stream),
            Int4Gemv {
                shape: gemv,
                packed: DeviceIn::new(&packed_ok, &stream).into(),
                scales: DeviceIn::new(&scales, &stream).into(),
                zeros: DeviceIn::new(&zeros, &stream).into(),
                x: DeviceIn::new(&x_off, &stream).into(),
                y: DeviceOut::new(&mut y, &stream).into()
            }
        )),
        "x"
    );
    let packed_off = packed.slice(1..1 + shape.packed_len());
    let x_ok = x.slice(0..64);
    assert_eq!(
        name(Backend::Cuda(backend.clone()).int4_gemv(
            Stream::Cuda(&stream),
            Int4Gemv {
                shape: gemv,
                packed: DeviceIn::new(&packed_off, &stream).into(),
                scales: DeviceIn::new(&scales, &stream).into(),
                zeros: DeviceIn::new(&zeros, &stream).into(),
                x: DeviceIn::new(&x_ok, &stream).into(),
                y: DeviceOut::new(&mut y, &stream).into()
            }
        )),
        "packed"
    );
    let short = packed.slice(0..shape.packed_len() - 1);
    assert_eq!(
        name(Backend::Cuda(backend.clone()).int4_gemv(
            Stream::Cuda(&stream),
            Int4Gemv {
                shape: gemv,
                packed: DeviceIn::new(&short, &stream).into(),
                scales: DeviceIn::new(&scales, &stream).into(),
                zeros: DeviceIn::new(&zeros, &stream).into(),
                x: DeviceIn::new(&x_ok, &stream).into(),
                y: DeviceOut::new(&mut y, &stream).into()
            }
        )),
        "packed"
    );
}

#[test]
fn c_abi_quantizes_and_multiplies_on_device_pointers() {
    let Some(backend) = gpu("c_abi_quantizes_and_multiplies_on_device_pointers") else {
        return;
    };
    let stream = backend.context().new_stream().unwrap();
    let mut rng = rng("c_abi_quantizes_and_multiplies_on_device_pointers");
    let shape = Int4Shape::new(256, 512, 64).unwrap();
    let w: Vec<f16> = random_weights(&mut rng, &shape, false);
    let x: Vec<f16> = random_x(&mut rng, 2 * shape.k);
    let mut expected: Packed<f16> = Packed::zeroed(shape);
    cpu::int4_quantize(
        &shape,
        &w,
        &mut expected.packed,
        &mut expected.scales,
        &mut expected.zeros,
    )
    .unwrap();
    let mut y_cpu = vec![f16::from_f32(0.0); 2 * shape.n];
    cpu::int4_gemv(
        &GemvShape::new(2, shape).unwrap(),
        &expected.packed,
        &expected.scales,
        &expected.zeros,
        &x,
        &mut y_cpu,
    )
    .unwrap();

    let weights = stream.clone_htod(&w).unwrap();
    let xs = stream.clone_htod(&x).unwrap();
    let mut packed = stream.alloc_zeros::<u32>(shape.packed_len()).unwrap();
    let mut scales = stream.alloc_zeros::<f16>(shape.meta_len()).unwrap();
    let mut zeros = stream.alloc_zeros::<u8>(shape.meta_len()).unwrap();
    let mut y = stream.clone_htod(&vec![f16::NAN; 2 * shape.n]).unwrap();
    let mut ctx = std::ptr::null_mut();
    unsafe {
        assert_eq!(
            capi::specdec_context_create_cuda(0, &mut ctx),
            specdec_status::SPECDEC_OK
        );
        let (wp, _a) = weights.device_ptr(&stream);
        let (xp, _b) = xs.device_ptr(&stream);
        let (pp, _c) = packed.device_ptr_mut(&stream);
        let (sp, _d) = scales.device_ptr_mut(&stream);
        let (zp, _e) = zeros.device_ptr_mut(&stream);
        let (yp, _f) = y.device_ptr_mut(&stream);
        let s = stream.cu_stream() as *mut c_void;
        let (n, k, g) = (shape.n as i64, shape.k as i64, shape.group_size as i64);
        assert_eq!(
            capi::specdec_int4_quantize(
                ctx,
                wp as *const c_void,
                1,
                n,
                k,
                g,
                pp as *mut u32,
                sp as *mut c_void,
                1,
                zp as *mut u8,
                s
            ),
            specdec_status::SPECDEC_OK
        );
        assert_eq!(
            capi::specdec_int4_gemv(
                ctx,
                pp as *const u32,
                sp as *const c_void,
                1,
                zp as *const u8,
                n,
                k,
                g,
                xp as *const c_void,
                1,
                2,
                yp as *mut c_void,
                s
            ),
            specdec_status::SPECDEC_OK
        );
        assert_eq!(
            capi::specdec_int4_gemv(
                ctx,
                pp as *const u32,
                sp as *const c_void,
                1,
                zp as *const u8,
                n,
                k,
                g,
                xp as *const c_void,
                0,
                2,
                yp as *mut c_void,
                s
            ),
            specdec_status::SPECDEC_INVALID_ARGUMENT,
            "fp32 activations"
        );
        capi::specdec_context_destroy(ctx);
    }
    assert_eq!(stream.clone_dtoh(&packed).unwrap(), expected.packed);
    assert_eq!(stream.clone_dtoh(&zeros).unwrap(), expected.zeros);
    let y = stream.clone_dtoh(&y).unwrap();
    let (reference, magnitude) = reference_gemv(&expected, &x, 2);
    for i in 0..y.len() {
        let (g, c) = (f64::from(y[i].to_f32()), f64::from(y_cpu[i].to_f32()));
        assert!(
            (g - c).abs() <= 2.0 * ulp::<f16>(reference[i]) + 2f64.powi(-14) * magnitude[i],
            "y[{i}]: GPU {g}, CPU {c}"
        );
    }
}
