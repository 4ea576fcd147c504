//! int4 draft weights: quantization, packing, GEMV and the GPTQ / AWQ converters (`specdec::int4`).

use super::*;

fn int4_shape_arg(n: i64, k: i64, group_size: i64) -> Result<Int4Shape> {
    Int4Shape::new(
        size_arg("n", n)?,
        size_arg("k", k)?,
        size_arg("group_size", group_size)?,
    )
}

/// Round-to-nearest int4 quantization of `weights[n, k]` (row-major, `weights_dtype` fp16 or bf16) into the
/// format of `docs/int4-format.md`: `packed[n * k / 8]` (uint32 words), `scales[k / group_size * n]`
/// (`scale_dtype`, fp16 or bf16) and `zeros[k / group_size * n]` (bytes). `n` a multiple of 16, `k` a multiple
/// of 64 and of `group_size` (32, 64 or 128). The CPU and CUDA contexts produce the same bytes; groups holding
/// NaN or infinities get a NaN scale. On a CUDA context `weights` and `packed` must be 16-byte aligned.
///
/// # Safety
/// Each pointer must point to the number of elements stated, valid for the call (on a CUDA context: until the
/// work on `stream` has finished), and the outputs must not overlap the input.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_quantize(
    ctx: *const specdec_context,
    weights: *const c_void,
    weights_dtype: i32,
    n: i64,
    k: i64,
    group_size: i64,
    packed: *mut u32,
    scales: *mut c_void,
    scale_dtype: i32,
    zeros: *mut u8,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let weights_dtype = half_dtype_arg("weights_dtype", weights_dtype)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let shape = int4_shape_arg(n, k, group_size)?;
        let backend = &ctx.backend;
        let packed = array_out(backend, "packed", packed, shape.packed_len())?;
        let zeros = array_out(backend, "zeros", zeros, shape.meta_len())?;
        with_half!(weights_dtype, T => with_half!(scale_dtype, S => {
            let args = Int4Quantize {
                shape,
                weights: array_in(backend, "weights", weights as *const T, shape.weights_len())?,
                packed,
                scales: array_out(backend, "scales", scales as *mut S, shape.meta_len())?,
                zeros,
            };
            backend.int4_quantize(stream_arg(stream), args)
        }))
    })
}

/// Packs `weights[n, k]` into `packed` with given `scales` and `zeros` (GPTQ, AWQ or another quantizer's),
/// each `[k / group_size * n]`: codes `clamp(round(w / s) + z, 0, 15)` by the rule of `docs/int4-format.md`.
/// On a CPU context a scale that is not positive and finite (with a finite reciprocal), or a zero above 15, is
/// SPECDEC_INVALID_ARGUMENT naming the element; on a CUDA context such a group gets codes 0.
///
/// # Safety
/// As `specdec_int4_quantize`.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_pack(
    ctx: *const specdec_context,
    weights: *const c_void,
    weights_dtype: i32,
    n: i64,
    k: i64,
    group_size: i64,
    scales: *const c_void,
    scale_dtype: i32,
    zeros: *const u8,
    packed: *mut u32,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let weights_dtype = half_dtype_arg("weights_dtype", weights_dtype)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let shape = int4_shape_arg(n, k, group_size)?;
        let backend = &ctx.backend;
        let packed = array_out(backend, "packed", packed, shape.packed_len())?;
        let zeros = array_in(backend, "zeros", zeros, shape.meta_len())?;
        with_half!(weights_dtype, T => with_half!(scale_dtype, S => {
            let args = Int4Pack {
                shape,
                weights: array_in(backend, "weights", weights as *const T, shape.weights_len())?,
                scales: array_in(backend, "scales", scales as *const S, shape.meta_len())?,
                zeros,
                packed,
            };
            backend.int4_pack(stream_arg(stream), args)
        }))
    })
}

/// `y[m, n] = x[m, k] W^T` for an int4 `W` (`packed`, `scales`, `zeros` as `specdec_int4_quantize` writes
/// them), `m` from 1 to 16, activations and output of `x_dtype` (fp16 or bf16), fp32 accumulation. On a CPU
/// context a zero above 15 is SPECDEC_INVALID_ARGUMENT; a CUDA context reads zeros' low 4 bits. On a CUDA
/// context `packed` and `x` must be 16-byte aligned.
///
/// # Safety
/// As `specdec_int4_quantize`; `y` must not overlap the inputs.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_gemv(
    ctx: *const specdec_context,
    packed: *const u32,
    scales: *const c_void,
    scale_dtype: i32,
    zeros: *const u8,
    n: i64,
    k: i64,
    group_size: i64,
    x: *const c_void,
    x_dtype: i32,
    m: i64,
    y: *mut c_void,
    stream: *mut c_void,
) -> specdec_status {
    boundary(|| {
        let ctx = context_arg(ctx)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let x_dtype = half_dtype_arg("x_dtype", x_dtype)?;
        let shape = GemvShape::new(size_arg("m", m)?, int4_shape_arg(n, k, group_size)?)?;
        let w = &shape.weights;
        let backend = &ctx.backend;
        let packed = array_in(backend, "packed", packed, w.packed_len())?;
        let zeros = array_in(backend, "zeros", zeros, w.meta_len())?;
        with_half!(x_dtype, A => with_half!(scale_dtype, S => {
            let args = Int4Gemv {
                shape,
                packed,
                scales: array_in(backend, "scales", scales as *const S, w.meta_len())?,
                zeros,
                x: array_in(backend, "x", x as *const A, shape.x_len())?,
                y: array_out(backend, "y", y as *mut A, shape.y_len())?,
            };
            backend.int4_gemv(stream_arg(stream), args)
        }))
    })
}

/// Converts a GPTQ layer (host memory; see `specdec::int4::convert`): `qweight[k / 8 * n]` (int32, packed
/// along k), `qzeros[k / group_size * n / 8]` (int32, packed along n), `scales[k / group_size * n]` of
/// `scale_dtype`, `g_idx[k]` or NULL (act-order checkpoints are rejected), `zeros_minus_one` 1 for AutoGPTQ's
/// stored `z - 1` ("gptq" format), 0 for GPTQModel's `gptq_v2`. Writes `packed`, `scales_out`, `zeros_out`.
///
/// # Safety
/// Each non-null pointer must point to the number of elements stated, host memory valid for the call.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_from_gptq(
    n: i64,
    k: i64,
    group_size: i64,
    qweight: *const i32,
    qzeros: *const i32,
    scales: *const c_void,
    scale_dtype: i32,
    g_idx: *const i32,
    zeros_minus_one: i32,
    packed: *mut u32,
    scales_out: *mut c_void,
    zeros_out: *mut u8,
) -> specdec_status {
    boundary(|| {
        let shape = int4_shape_arg(n, k, group_size)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let zeros_format = match zeros_minus_one {
            1 => GptqZeros::MinusOne,
            0 => GptqZeros::Exact,
            v => {
                return Err(Error::invalid(
                    "zeros_minus_one",
                    format!("is {v}; 1 (AutoGPTQ, z - 1 stored) or 0 (gptq_v2)"),
                ))
            }
        };
        let qweight = host_slice("qweight", qweight, shape.k / 8 * shape.n)?;
        let qzeros = host_slice("qzeros", qzeros, shape.meta_len() / 8)?;
        let g_idx = optional_slice("g_idx", g_idx, shape.k)?;
        let packed = host_slice_mut("packed", packed, shape.packed_len())?;
        let zeros_out = host_slice_mut("zeros_out", zeros_out, shape.meta_len())?;
        with_half!(scale_dtype, S => {
            let s = host_slice("scales", scales as *const S, shape.meta_len())?;
            let so = host_slice_mut("scales_out", scales_out as *mut S, shape.meta_len())?;
            from_gptq(&shape, qweight, qzeros, s, g_idx, zeros_format, packed, so, zeros_out)
        })
    })
}

/// Converts an AWQ (GEMM version) layer (host memory; see `specdec::int4::convert`): `qweight[k * n / 8]` and
/// `qzeros[k / group_size * n / 8]` (int32, packed along n in AWQ's order), `scales[k / group_size * n]` of
/// `scale_dtype`. Writes `packed`, `scales_out`, `zeros_out`.
///
/// # Safety
/// As `specdec_int4_from_gptq`.
#[no_mangle]
pub unsafe extern "C" fn specdec_int4_from_awq(
    n: i64,
    k: i64,
    group_size: i64,
    qweight: *const i32,
    qzeros: *const i32,
    scales: *const c_void,
    scale_dtype: i32,
    packed: *mut u32,
    scales_out: *mut c_void,
    zeros_out: *mut u8,
) -> specdec_status {
    boundary(|| {
        let shape = int4_shape_arg(n, k, group_size)?;
        let scale_dtype = half_dtype_arg("scale_dtype", scale_dtype)?;
        let qweight = host_slice("qweight", qweight, shape.weights_len() / 8)?;
        let qzeros = host_slice("qzeros", qzeros, shape.meta_len() / 8)?;
        let packed = host_slice_mut("packed", packed, shape.packed_len())?;
        let zeros_out = host_slice_mut("zeros_out", zeros_out, shape.meta_len())?;
        with_half!(scale_dtype, S => {
            let s = host_slice("scales", scales as *const S, shape.meta_len())?;
            let so = host_slice_mut("scales_out", scales_out as *mut S, shape.meta_len())?;
            from_awq(&shape, qweight, qzeros, s, packed, so, zeros_out)
        })
    })
}
