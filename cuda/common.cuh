// Shared device helpers for specdec kernels.
//
// Everything here is header-only and header-guarded so every kernel family (.cu file) compiles standalone
// into its own fatbin. Nothing here depends on the CUDA runtime API: kernels are loaded through the driver
// API, so only device code and the fp16/bf16 type headers are used.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// The CPU simulator (sim/) compiles these sources as host C++: each entry point then exports a launcher
// (SPECDEC_SIM_ENTRY) and each inline-asm wrapper takes its host branch. Under nvcc both are absent.
#ifndef SPECDEC_SIM
#define SPECDEC_SIM_ENTRY(name)
#endif

namespace specdec {

// ---------------------------------------------------------------------------------------------------------
// Per-request status: the rule a request broke, written to request_status[b] by every batched kernel. The
// values are specdec::RequestStatus (src/status.rs); a Rust test reads this list and checks it entry by entry.
// ---------------------------------------------------------------------------------------------------------
enum RequestStatusCode : int {
  kRequestOk = 0,
  kRequestOffsets = 1,
  kRequestParents = 2,
  kRequestPrefixLen = 3,
  kRequestPageTable = 4,
  kRequestRopePosition = 5,
  kRequestDraftToken = 6,
  kRequestEmitWidth = 7,
  kRequestSamplingParams = 8,
  kRequestRowValues = 9,
  kRequestDraftedTokenMass = 10,
};

// ---------------------------------------------------------------------------------------------------------
// Element types. Logits arrive as fp32, fp16 or bf16; comparisons happen in fp32, which represents every
// fp16 and bf16 value exactly, so the order of values (and hence every argmax) is the same as in the source
// type.
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }

// ---------------------------------------------------------------------------------------------------------
// Ordered argmax keys.
//
// An argmax over a row is a max over 64-bit keys: the high word orders values, the low word orders indices
// so that ties go to the lowest index. The reduction is then an associative, commutative max: the result does
// not depend on how the row is split across threads or blocks.
//
// Value order: NaN (any sign or payload) is above +inf, so a row holding a NaN yields its first NaN, as
// torch.argmax does. -0.0 and +0.0 are equal (the lower index wins). The identity 0 is below every real key:
// the smallest real key, that of -inf, is 0x007FFFFF.
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t OrderedValueKey(float x) {
  if (x != x) return 0xFFFFFFFFu;  // NaN
  uint32_t bits = __float_as_uint(x);
  if (x == 0.0f) bits = 0u;  // -0.0 == +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ uint64_t ArgmaxKey(float x, uint32_t index) {
  return (static_cast<uint64_t>(OrderedValueKey(x)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}

__device__ __forceinline__ uint32_t ArgmaxKeyIndex(uint64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(key & 0xFFFFFFFFull);
}

__device__ __forceinline__ uint64_t WarpReduceMax(uint64_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    uint64_t other = __shfl_xor_sync(0xFFFFFFFFu, v, offset);
    v = other > v ? other : v;
  }
  return v;
}

// Max over a whole block; every thread gets the result. `scratch` holds one slot per warp. Safe to call
// repeatedly with the same scratch: the trailing barrier keeps a later call from overwriting slots that
// slower warps are still reading (the bug behind flashinfer#424 was a missing barrier here).
template <int kBlockThreads>
__device__ __forceinline__ uint64_t BlockReduceMax(uint64_t v, uint64_t* scratch) {
  static_assert(kBlockThreads % 32 == 0 && kBlockThreads <= 1024, "block must be whole warps");
  constexpr int kWarps = kBlockThreads / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = WarpReduceMax(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0ull;
  v = WarpReduceMax(v);
  __syncthreads();
  return v;
}

// The elements row[first], ..., row[first + n - 1] (n <= 4) as floats in v[0..n), -inf beyond: with one vector load
// (16 bytes of fp32, 8 of fp16/bf16) when all four are there and aligned for it, as they are in every row of a
// vocabulary that is a multiple of 8, else element by element.
template <typename T>
__device__ __forceinline__ void LoadFour(const T* row, int64_t first, int n, float v[4]) {
  const T* p = row + first;
  if (n == 4 && reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T)) == 0) {
    if constexpr (sizeof(T) == 4) {
      const float4 q = __ldg(reinterpret_cast<const float4*>(p));
      v[0] = q.x;
      v[1] = q.y;
      v[2] = q.z;
      v[3] = q.w;
    } else {
      const uint2 q = __ldg(reinterpret_cast<const uint2*>(p));
      const T* e = reinterpret_cast<const T*>(&q);
#pragma unroll
      for (int i = 0; i < 4; ++i) v[i] = ToFloat(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < n ? ToFloat(p[i]) : -INFINITY;
  }
}

// ---------------------------------------------------------------------------------------------------------
// 16-byte vector loads over an arbitrary range of a row. Rows of odd length, or a caller's pointer at any
// element alignment, are handled by a scalar head up to the first 16-byte boundary and a scalar tail.
// `visit(value, index)` is called once for every element in [begin, end).
// ---------------------------------------------------------------------------------------------------------
template <typename T, int kBlockThreads, typename Visit>
__device__ __forceinline__ void ForEachInRange(const T* row, int64_t begin, int64_t end, Visit visit) {
  constexpr int kPerVector = 16 / sizeof(T);
  const uintptr_t address = reinterpret_cast<uintptr_t>(row + begin);
  int64_t head = static_cast<int64_t>(((16 - (address % 16)) % 16) / sizeof(T));
  // A row pointer that is not even element-aligned cannot happen (the host checks it), so `head` is exact.
  if (head > end - begin) head = end - begin;
  for (int64_t i = begin + threadIdx.x; i < begin + head; i += kBlockThreads) visit(ToFloat(row[i]), i);

  const int64_t body_begin = begin + head;
  const int64_t vectors = (end - body_begin) / kPerVector;
  const uint4* body = reinterpret_cast<const uint4*>(row + body_begin);
#pragma unroll 4
  for (int64_t v = threadIdx.x; v < vectors; v += kBlockThreads) {
    uint4 raw = __ldg(body + v);
    const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int e = 0; e < kPerVector; ++e) visit(ToFloat(elems[e]), body_begin + v * kPerVector + e);
  }

  for (int64_t i = body_begin + vectors * kPerVector + threadIdx.x; i < end; i += kBlockThreads) {
    visit(ToFloat(row[i]), i);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Tensor-core MMA m16n8k16 (sm_80+): c[16x8] += a[16x16] b[16x8], fp16 or bf16 inputs, fp32 accumulation, in
// the fragment layouts of the PTX ISA ("mma.m16n8k16"). `a` is four 32-bit registers, `b` two.
// ---------------------------------------------------------------------------------------------------------
template <typename A>
__device__ __forceinline__ void Mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void Mma16816<__half>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#ifdef SPECDEC_SIM
  specdec_sim::MmaM16N8K16(SPECDEC_SIM_MMA_M16N8K16_F16, c, a, b0, b1);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
#ifdef SPECDEC_SIM
  specdec_sim::MmaM16N8K16(SPECDEC_SIM_MMA_M16N8K16_BF16, c, a, b0, b1);
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

}  // namespace specdec
