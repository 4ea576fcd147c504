// The simulator's own test kernels (sim/tests/check.cpp runs them). Valid CUDA: nvcc compiles them into the
// fatbin the check loads, and the same examples can run on a GPU to check the simulator against the hardware.
//
//   * Hand-worked PTX examples: mma.sync m16n8k16 (f16, bf16), ldmatrix .x1/.x4/.trans, shuffles, votes and
//     barrier reductions, with every lane's operands built from the PTX ISA's fragment tables.
//   * Kernels with deliberate faults, each of which the simulator must report: a partial or divergent barrier,
//     bad warp masks, a read one element past a row, a misaligned vector load, a missing barrier, a missing
//     cp.async.wait_group, a read of shared memory nothing wrote.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

// ------------------------------------------------------------------------------------------------------------
// PTX wrappers (the same pattern as the kernels': a host branch for the simulator).
// ------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void LdMatrix(uint32_t* r, uint32_t address, int matrices, bool trans) {
#ifdef SPECDEC_SIM
  specdec_sim::LdMatrix(r, address, matrices, trans);
#else
  if (matrices == 1 && !trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(address));
  } else if (matrices == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];" : "=r"(r[0]) : "r"(address));
  } else if (!trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

__device__ __forceinline__ void CopyAsync16(void* shared, const void* global) {
#ifdef SPECDEC_SIM
  specdec_sim::CpAsync(SharedAddress(shared), global, 16, 16);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, 16;" ::"r"(SharedAddress(shared)), "l"(global));
#endif
}

__device__ __forceinline__ void CopyAsyncCommit() {
#ifdef SPECDEC_SIM
  specdec_sim::CpAsyncCommit();
#else
  asm volatile("cp.async.commit_group;");
#endif
}

__device__ __forceinline__ void CopyAsyncWaitAll() {
#ifdef SPECDEC_SIM
  specdec_sim::CpAsyncWait(0);
#else
  asm volatile("cp.async.wait_group 0;");
#endif
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// mma.sync.aligned.m16n8k16.row.col.f32: one warp. a: A [16][16] and b: B [16 (k)][8 (n)] as 16-bit patterns,
// c: C [16][8]. Each lane packs its A and B registers as the PTX ISA's tables place them (groupID = lane / 4,
// tig = lane % 4; A: a_i at row groupID + 8 for i in {2, 3, 6, 7}, column 2 tig + (i & 1) + 8 for i >= 4; B: b_i
// at row (k) 2 tig + (i & 1) + 8 for i >= 2, column groupID), and writes its four D values as they come:
// fragment[lane * 4 + i].
// ------------------------------------------------------------------------------------------------------------
template <typename T>
__device__ void MmaExample(const uint16_t* a, const uint16_t* b, const float* c, float* fragment) {
  const int lane = threadIdx.x, group = lane / 4, tig = lane % 4;
  uint32_t ra[4], rb[2];
  for (int r = 0; r < 4; ++r) {
    uint32_t packed = 0;
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * r + half;
      const int row = group + ((i == 2 || i == 3 || i == 6 || i == 7) ? 8 : 0);
      const int col = 2 * tig + (i & 1) + (i >= 4 ? 8 : 0);
      packed |= static_cast<uint32_t>(a[row * 16 + col]) << (16 * half);
    }
    ra[r] = packed;
  }
  for (int r = 0; r < 2; ++r) {
    uint32_t packed = 0;
    for (int half = 0; half < 2; ++half) {
      const int i = 2 * r + half;
      const int k = 2 * tig + (i & 1) + (i >= 2 ? 8 : 0);
      packed |= static_cast<uint32_t>(b[k * 8 + group]) << (16 * half);
    }
    rb[r] = packed;
  }
  float d[4];
  for (int i = 0; i < 4; ++i) d[i] = c[(group + (i >= 2 ? 8 : 0)) * 8 + 2 * tig + (i & 1)];
  specdec::Mma16816<T>(d, ra, rb[0], rb[1]);
  for (int i = 0; i < 4; ++i) fragment[lane * 4 + i] = d[i];
}

extern "C" __global__ void MmaExampleKernel(const uint16_t* a, const uint16_t* b, const float* c, float* fragment,
                                            int bf16) {
  if (bf16) {
    MmaExample<__nv_bfloat16>(a, b, c, fragment);
  } else {
    MmaExample<__half>(a, b, c, fragment);
  }
}
SPECDEC_SIM_ENTRY(MmaExampleKernel)

// ------------------------------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.x<matrices>[.trans].shared.b16: one warp. Element (r, c) of matrix j holds the
// 16-bit value 64 j + 8 r + c. Row r of matrix j is stored at row slot 7 - r (so a simulator that ignored the
// lanes' row addresses would read the rows reversed), and lane 8 j + r gives that slot's address.
// out[lane * 4 + j] is the lane's register j.
// ------------------------------------------------------------------------------------------------------------
extern "C" __global__ void LdMatrixExampleKernel(uint32_t* out, int matrices, int trans) {
  __shared__ __align__(16) uint16_t tile[4][8][8];
  const int lane = threadIdx.x;
  for (int e = lane; e < 4 * 64; e += 32) {
    const int j = e / 64, r = (e / 8) % 8, c = e % 8;
    tile[j][7 - r][c] = static_cast<uint16_t>(64 * j + 8 * r + c);
  }
  __syncwarp();
  const int j = (lane / 8) % matrices, r = lane % 8;
  uint32_t regs[4] = {0, 0, 0, 0};
  LdMatrix(regs, SharedAddress(&tile[j][7 - r][0]), matrices, trans != 0);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = regs[i];
}
SPECDEC_SIM_ENTRY(LdMatrixExampleKernel)

// ------------------------------------------------------------------------------------------------------------
// Shuffles, votes and barrier reductions: a block of 64 threads; out[t * 8 + k] is result k of thread t.
// ------------------------------------------------------------------------------------------------------------
extern "C" __global__ void CollectivesExampleKernel(int* out) {
  const int t = threadIdx.x, lane = t % 32;
  int* mine = out + t * 8;
  mine[0] = __shfl_xor_sync(0xFFFFFFFFu, 100 * t, 5);                    // from lane ^ 5
  mine[1] = __shfl_up_sync(0xFFFFFFFFu, 100 * t, 3, 8);                  // from lane - 3 within groups of 8, else own
  mine[2] = __shfl_down_sync(0xFFFFFFFFu, 100 * t, 2, 16);               // from lane + 2 within groups of 16, else own
  mine[3] = __shfl_sync(0xFFFFFFFFu, 100 * t, 7 + 16 * (lane & 1), 16);  // lane 7 of its group of 16
  mine[4] = static_cast<int>(__ballot_sync(0xFFFFFFFFu, lane % 3 == 0));
  mine[5] = __any_sync(0xFFFFFFFFu, t == 40) + 2 * __all_sync(0xFFFFFFFFu, lane < 32);
  mine[6] = __syncthreads_count(t % 4 == 0) + 1000 * __syncthreads_or(t == 63) + 10000 * __syncthreads_and(t < 63);
  const unsigned long long wide = (static_cast<unsigned long long>(t) << 40) | 7u;
  mine[7] = static_cast<int>(__shfl_xor_sync(0xFFFFFFFFu, wide, 1) >> 40);  // 64-bit shuffle
}
SPECDEC_SIM_ENTRY(CollectivesExampleKernel)

// ------------------------------------------------------------------------------------------------------------
// Faults the simulator must report.
// ------------------------------------------------------------------------------------------------------------

// A barrier after half the block has returned.
extern "C" __global__ void PartialBarrierKernel(int* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
SPECDEC_SIM_ENTRY(PartialBarrierKernel)

// The two halves of the block wait at different barriers.
extern "C" __global__ void DivergentBarrierKernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
SPECDEC_SIM_ENTRY(DivergentBarrierKernel)

// variant 0: a mask that leaves out the calling lanes 16..31; 1: a full mask in a warp of 16 lanes (launch 48
// threads); 2: a full mask after lanes 16..31 exited.
extern "C" __global__ void BadMaskKernel(int* out, int variant) {
  int v = static_cast<int>(threadIdx.x);
  if (variant == 0) v = __shfl_xor_sync(0x0000FFFFu, v, 1);
  if (variant == 1) v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  if (variant == 2) {
    if (threadIdx.x % 32 >= 16) return;
    v = __shfl_xor_sync(0xFFFFFFFFu, v, 1);
  }
  out[threadIdx.x] = v;
}
SPECDEC_SIM_ENTRY(BadMaskKernel)

// Sums each row of `rows` x `n` values, reading one element past every row: the last read is past the array.
extern "C" __global__ void TailReadKernel(const float* values, int rows, int n, float* sums) {
  const int row = blockIdx.x;
  if (row >= rows || threadIdx.x != 0) return;
  float sum = 0.0f;
  for (int i = 0; i <= n; ++i) sum += values[row * n + i];
  sums[row] = sum;
}
SPECDEC_SIM_ENTRY(TailReadKernel)

// A 16-byte load from an address that is 4-byte aligned only.
extern "C" __global__ void MisalignedLoadKernel(const float* values, uint4* out) {
  out[0] = __ldg(reinterpret_cast<const uint4*>(values + 1));
}
SPECDEC_SIM_ENTRY(MisalignedLoadKernel)

// Warp 1 writes a shared value that warp 0 reads; with `barrier` 0 the barrier between them is missing.
extern "C" __global__ void ProducerConsumerKernel(int* out, int barrier) {
  __shared__ int value;
  if (threadIdx.x == 32) value = 42;
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) out[0] = value;
}
SPECDEC_SIM_ENTRY(ProducerConsumerKernel)

// Each thread copies 16 bytes to shared memory with cp.async; thread 0 then reads another thread's copy after a
// barrier. With `wait` 0 the copies are committed but never waited for.
extern "C" __global__ void CopyAsyncKernel(const uint4* in, uint4* out, int wait) {
  __shared__ __align__(16) uint4 staged[64];
  CopyAsync16(&staged[threadIdx.x], &in[threadIdx.x]);
  CopyAsyncCommit();
  if (wait) CopyAsyncWaitAll();
  __syncthreads();
  if (threadIdx.x == 0) out[0] = staged[63];
}
SPECDEC_SIM_ENTRY(CopyAsyncKernel)

// Reads a shared word nothing wrote.
extern "C" __global__ void UnwrittenSharedKernel(uint32_t* out) {
  __shared__ uint32_t never_written[4];
  out[threadIdx.x] = never_written[threadIdx.x % 4];
}
SPECDEC_SIM_ENTRY(UnwrittenSharedKernel)

// Launch limits: at most 128 threads, and any amount of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(128) BoundedKernel(int* out) {
  extern __shared__ int dynamic[];
  dynamic[threadIdx.x] = static_cast<int>(threadIdx.x);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x + blockIdx.y] = dynamic[0];
}
SPECDEC_SIM_ENTRY(BoundedKernel)

// The cheapest block: one barrier. For timing the simulator's per-thread cost.
extern "C" __global__ void BarrierOnlyKernel() { __syncthreads(); }
SPECDEC_SIM_ENTRY(BarrierOnlyKernel)
