// The CUDA execution model for kernels compiled as host C++ by the simulator (see the README's simulator section).
//
// Force-included (g++ -include) before every cuda/*.cu the simulator builds: it gives the CUDA language
// (qualifiers, built-in indices, vector types, intrinsics, warp collectives, barriers, atomics) to code that
// g++ compiles unchanged. Every thread of a block is a fiber of the simulator (libcuda.so.1 from sim/); a
// barrier or a warp collective is a rendezvous there. Functions here are either pure (conversions, bit casts,
// correctly rounded arithmetic) or call the simulator through the `specdec_sim_*` C interface below.
//
// `__shared__` variables are `thread_local`: the fibers of a block run on one OS thread, one block at a time,
// so the kernel module's TLS block is the block's shared memory; the simulator poisons it before each block.
// `extern __shared__` arrays are defined by the build (sim/Makefile) at the module's dynamic shared memory.
#pragma once

#define SPECDEC_SIM 1

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------------
// Qualifiers.
// ---------------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __constant__ const
#define warpSize 32

// ---------------------------------------------------------------------------------------------------------
// Vector types, with CUDA's alignments (a misaligned vector access is reported, as on a GPU).
// ---------------------------------------------------------------------------------------------------------
#define SPECDEC_SIM_VECTOR_TYPES(base, name, a2, a4)                          \
  struct name##1 { base x; };                                                 \
  struct __attribute__((aligned(a2))) name##2 { base x, y; };                 \
  struct name##3 { base x, y, z; };                                           \
  struct __attribute__((aligned(a4))) name##4 { base x, y, z, w; };           \
  inline name##1 make_##name##1(base x) { return {x}; }                       \
  inline name##2 make_##name##2(base x, base y) { return {x, y}; }            \
  inline name##3 make_##name##3(base x, base y, base z) { return {x, y, z}; } \
  inline name##4 make_##name##4(base x, base y, base z, base w) { return {x, y, z, w}; }
SPECDEC_SIM_VECTOR_TYPES(signed char, char, 2, 4)
SPECDEC_SIM_VECTOR_TYPES(unsigned char, uchar, 2, 4)
SPECDEC_SIM_VECTOR_TYPES(short, short, 4, 8)
SPECDEC_SIM_VECTOR_TYPES(unsigned short, ushort, 4, 8)
SPECDEC_SIM_VECTOR_TYPES(int, int, 8, 16)
SPECDEC_SIM_VECTOR_TYPES(unsigned int, uint, 8, 16)
SPECDEC_SIM_VECTOR_TYPES(long long, longlong, 16, 16)
SPECDEC_SIM_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
SPECDEC_SIM_VECTOR_TYPES(float, float, 8, 16)
SPECDEC_SIM_VECTOR_TYPES(double, double, 16, 16)
#undef SPECDEC_SIM_VECTOR_TYPES

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

// ---------------------------------------------------------------------------------------------------------
// The simulator's interface (exported by the stand-in libcuda.so.1; one ABI for every kernel module).
// ---------------------------------------------------------------------------------------------------------
extern "C" {

// What threadIdx, blockIdx, blockDim and gridDim read: the running fiber's thread.
struct specdec_sim_thread_info {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
// Initial-exec: a plain %fs-relative load (the simulator's few TLS bytes live in the static TLS surplus).
extern __thread const specdec_sim_thread_info* specdec_sim_current __attribute__((tls_model("initial-exec")));

enum specdec_sim_barrier_kind { SPECDEC_SIM_BAR_SYNC, SPECDEC_SIM_BAR_AND, SPECDEC_SIM_BAR_OR, SPECDEC_SIM_BAR_COUNT };

enum specdec_sim_warp_kind {
  SPECDEC_SIM_SHFL_IDX,
  SPECDEC_SIM_SHFL_UP,
  SPECDEC_SIM_SHFL_DOWN,
  SPECDEC_SIM_SHFL_BFLY,
  SPECDEC_SIM_VOTE_ALL,
  SPECDEC_SIM_VOTE_ANY,
  SPECDEC_SIM_VOTE_BALLOT,
  SPECDEC_SIM_SYNCWARP,
  SPECDEC_SIM_MMA_M16N8K16_F16,   // mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
  SPECDEC_SIM_MMA_M16N8K16_BF16,  // mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32
  SPECDEC_SIM_LDMATRIX,           // ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16
};

// One lane's part of a warp collective. The lane fills the inputs and calls specdec_sim_warp, which returns
// once every lane of `mask` has arrived at the same collective, with the outputs filled in.
struct specdec_sim_warp_op {
  int kind;
  uint32_t mask;
  const char* file;
  int line;
  int width;        // shuffles: the segment width (a power of two, 1..32)
  int operand;      // shuffles: source lane, delta or lane mask; ldmatrix: matrices (1, 2, 4) | 8 for .trans
  uint64_t value;   // shuffles: the value's bits; votes: the predicate; ldmatrix: the shared row address
  uint32_t a[4];    // mma: A fragment
  uint32_t b[2];    // mma: B fragment
  float c[4];       // mma: C fragment
  uint64_t result;  // shuffles and votes
  uint32_t d[4];    // mma: D fragment (f32 bits); ldmatrix: the destination registers
};

int specdec_sim_barrier(int kind, int predicate, const char* file, int line);
void specdec_sim_warp(struct specdec_sim_warp_op* op);
uint32_t specdec_sim_activemask(void);
uint32_t specdec_sim_shared_address(const void* generic, const char* file, int line);
void specdec_sim_cp_async(uint32_t shared_address, const void* global, int cp_size, int src_size, const char* file,
                          int line);
void specdec_sim_cp_async_commit(void);
void specdec_sim_cp_async_wait(int pending);
[[noreturn]] void specdec_sim_trap(const char* what, const char* file, int line);

}  // extern "C"

#define threadIdx (specdec_sim_current->thread_idx)
#define blockIdx (specdec_sim_current->block_idx)
#define blockDim (specdec_sim_current->block_dim)
#define gridDim (specdec_sim_current->grid_dim)

// An entry point of a kernel module: the simulator calls `specdec_sim_entry_<name>` with cuLaunchKernel's
// kernelParams, and reads the host-compiled parameter sizes from `specdec_sim_params_<name>` to check them
// against the cubin's. Expands to nothing under nvcc (cuda/common.cuh).
namespace specdec_sim {
template <typename... Args, size_t... I>
void Invoke(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<Args>*>(params[I])...);
}
template <typename... Args>
int ParamSizes(void (*)(Args...), size_t* sizes, int capacity) {
  const size_t all[] = {sizeof(Args)..., 0};
  for (int i = 0; i < static_cast<int>(sizeof...(Args)) && i < capacity; ++i) sizes[i] = all[i];
  return static_cast<int>(sizeof...(Args));
}
}  // namespace specdec_sim

#define SPECDEC_SIM_ENTRY(name)                                                                                  \
  extern "C" __attribute__((visibility("default"))) void specdec_sim_entry_##name(void** params) {               \
    specdec_sim::Invoke(&name, params, std::make_index_sequence<specdec_sim::Arity<decltype(&name)>::value>{});  \
  }                                                                                                              \
  extern "C" __attribute__((visibility("default"))) int specdec_sim_params_##name(size_t* sizes, int capacity) { \
    return specdec_sim::ParamSizes(&name, sizes, capacity);                                                      \
  }

namespace specdec_sim {
template <typename F>
struct Arity;
template <typename... Args>
struct Arity<void (*)(Args...)> {
  static constexpr size_t value = sizeof...(Args);
};
}  // namespace specdec_sim

// ---------------------------------------------------------------------------------------------------------
// Barriers, warp collectives and fences.
// ---------------------------------------------------------------------------------------------------------
#define __syncthreads() ((void)specdec_sim_barrier(SPECDEC_SIM_BAR_SYNC, 0, __FILE__, __LINE__))
#define __syncthreads_and(p) specdec_sim_barrier(SPECDEC_SIM_BAR_AND, (p) != 0, __FILE__, __LINE__)
#define __syncthreads_or(p) specdec_sim_barrier(SPECDEC_SIM_BAR_OR, (p) != 0, __FILE__, __LINE__)
#define __syncthreads_count(p) specdec_sim_barrier(SPECDEC_SIM_BAR_COUNT, (p) != 0, __FILE__, __LINE__)

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline unsigned int __activemask() { return specdec_sim_activemask(); }

namespace specdec_sim {
inline uint64_t Collective(int kind, unsigned int mask, uint64_t value, int operand, int width, const char* file,
                           int line) {
  specdec_sim_warp_op op{};
  op.kind = kind;
  op.mask = mask;
  op.file = file;
  op.line = line;
  op.width = width;
  op.operand = operand;
  op.value = value;
  specdec_sim_warp(&op);
  return op.result;
}

template <typename T>
inline uint64_t Bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffles move at most 64 bits");
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
inline T FromBits(uint64_t bits) {
  T v;
  memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
inline T Shuffle(int kind, unsigned int mask, T var, int operand, int width, const char* file, int line) {
  return FromBits<T>(Collective(kind, mask, Bits(var), operand, width, file, line));
}
}  // namespace specdec_sim

template <typename T>
inline T __shfl_sync(unsigned int mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return specdec_sim::Shuffle(SPECDEC_SIM_SHFL_IDX, mask, var, src_lane, width, file, line);
}
template <typename T>
inline T __shfl_up_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return specdec_sim::Shuffle(SPECDEC_SIM_SHFL_UP, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return specdec_sim::Shuffle(SPECDEC_SIM_SHFL_DOWN, mask, var, static_cast<int>(delta), width, file, line);
}
template <typename T>
inline T __shfl_xor_sync(unsigned int mask, T var, int lane_mask, int width = warpSize,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return specdec_sim::Shuffle(SPECDEC_SIM_SHFL_BFLY, mask, var, lane_mask, width, file, line);
}
inline int __all_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(specdec_sim::Collective(SPECDEC_SIM_VOTE_ALL, mask, predicate != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return static_cast<int>(specdec_sim::Collective(SPECDEC_SIM_VOTE_ANY, mask, predicate != 0, 0, 32, file, line));
}
inline unsigned int __ballot_sync(unsigned int mask, int predicate, const char* file = __builtin_FILE(),
                                  int line = __builtin_LINE()) {
  return static_cast<unsigned int>(
      specdec_sim::Collective(SPECDEC_SIM_VOTE_BALLOT, mask, predicate != 0, 0, 32, file, line));
}
inline void __syncwarp(unsigned int mask = 0xFFFFFFFFu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  specdec_sim::Collective(SPECDEC_SIM_SYNCWARP, mask, 0, 0, 32, file, line);
}

// ---------------------------------------------------------------------------------------------------------
// The PTX the kernels write by hand: each inline-asm wrapper's host branch calls these.
// ---------------------------------------------------------------------------------------------------------
namespace specdec_sim {
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 {c} = {a} x {b} + {c}, for this lane's
// fragments (kind is SPECDEC_SIM_MMA_M16N8K16_F16 or _BF16).
inline void MmaM16N8K16(int kind, float* c, const uint32_t* a, uint32_t b0, uint32_t b1,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  specdec_sim_warp_op op{};
  op.kind = kind;
  op.mask = 0xFFFFFFFFu;  // .aligned: the whole warp
  op.file = file;
  op.line = line;
  for (int i = 0; i < 4; ++i) op.a[i] = a[i];
  op.b[0] = b0;
  op.b[1] = b1;
  for (int i = 0; i < 4; ++i) op.c[i] = c[i];
  specdec_sim_warp(&op);
  for (int i = 0; i < 4; ++i) memcpy(&c[i], &op.d[i], 4);
}

// ldmatrix.sync.aligned.m8n8.x<matrices>[.trans].shared.b16 {d}, [shared_address].
inline void LdMatrix(uint32_t* d, uint32_t shared_address, int matrices, bool trans,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  specdec_sim_warp_op op{};
  op.kind = SPECDEC_SIM_LDMATRIX;
  op.mask = 0xFFFFFFFFu;
  op.file = file;
  op.line = line;
  op.operand = matrices | (trans ? 8 : 0);
  op.value = shared_address;
  specdec_sim_warp(&op);
  for (int i = 0; i < matrices; ++i) d[i] = op.d[i];
}

// cp.async.cg.shared.global [shared_address], [global], 16, src_size; commit_group; wait_group n.
inline void CpAsync(uint32_t shared_address, const void* global, int cp_size, int src_size,
                    const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  specdec_sim_cp_async(shared_address, global, cp_size, src_size, file, line);
}
inline void CpAsyncCommit() { specdec_sim_cp_async_commit(); }
inline void CpAsyncWait(int pending) { specdec_sim_cp_async_wait(pending); }

// ld.global.nc.v4.u32: a 16-byte load that must be 16-byte aligned.
template <typename T>
inline T LoadGlobalNc(const T* p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) specdec_sim_trap("misaligned ld.global.nc", file, line);
  return *p;
}

// lop3.b32 d, a, b, c, lut: bit i of d is bit (4 a_i + 2 b_i + c_i) of lut.
inline uint32_t Lop3(uint32_t a, uint32_t b, uint32_t c, uint32_t lut) {
  uint32_t d = 0;
  for (uint32_t sel = 0; sel < 8; ++sel) {
    if (!((lut >> sel) & 1u)) continue;
    const uint32_t ta = (sel & 4u) ? a : ~a, tb = (sel & 2u) ? b : ~b, tc = (sel & 1u) ? c : ~c;
    d |= ta & tb & tc;
  }
  return d;
}
}  // namespace specdec_sim

inline size_t __cvta_generic_to_shared(const void* p, const char* file = __builtin_FILE(),
                                       int line = __builtin_LINE()) {
  return specdec_sim_shared_address(p, file, line);
}

// ---------------------------------------------------------------------------------------------------------
// Loads with cache hints: plain loads here (alignment is checked by the sanitizer, as the GPU faults).
// ---------------------------------------------------------------------------------------------------------
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}

// ---------------------------------------------------------------------------------------------------------
// Atomics (real atomics: kernels on different streams of the process run on different OS threads).
// ---------------------------------------------------------------------------------------------------------
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
inline T atomicAdd(T* p, T v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <typename T, typename = std::enable_if_t<std::is_integral<T>::value>>
inline T atomicSub(T* p, T v) {
  return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T atomicOr(T* p, T v) {
  return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T atomicAnd(T* p, T v) {
  return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T atomicXor(T* p, T v) {
  return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T atomicExch(T* p, T v) {
  return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);
}
template <typename T>
inline T atomicCAS(T* p, T compare, T v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
template <typename T>
inline T atomicMax(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (old < v && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* p, T v) {
  T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
namespace specdec_sim {
template <typename F, typename Bits>
inline F AtomicAddFloat(F* p, F v) {
  static_assert(sizeof(F) == sizeof(Bits), "same width");
  Bits* word = reinterpret_cast<Bits*>(p);
  Bits old = __atomic_load_n(word, __ATOMIC_SEQ_CST);
  while (true) {
    F current;
    memcpy(&current, &old, sizeof(F));
    const F sum = current + v;
    Bits next;
    memcpy(&next, &sum, sizeof(F));
    if (__atomic_compare_exchange_n(word, &old, next, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return current;
  }
}
}  // namespace specdec_sim
inline float atomicAdd(float* p, float v) { return specdec_sim::AtomicAddFloat<float, uint32_t>(p, v); }
inline double atomicAdd(double* p, double v) { return specdec_sim::AtomicAddFloat<double, uint64_t>(p, v); }

// ---------------------------------------------------------------------------------------------------------
// Arithmetic. The host compiler is told not to contract (-ffp-contract=off), so each of these rounds once,
// as the _rn intrinsics promise; glibc's expf, logf and friends are correctly rounded or nearly so, where
// CUDA's are within 2 ulp: results that depend on those last bits differ from a GPU's (the README's simulator section).
// ---------------------------------------------------------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }

inline unsigned int __float_as_uint(float x) { return specdec_sim::FromBits<unsigned int>(specdec_sim::Bits(x)); }
inline int __float_as_int(float x) { return specdec_sim::FromBits<int>(specdec_sim::Bits(x)); }
inline float __uint_as_float(unsigned int x) { return specdec_sim::FromBits<float>(x); }
inline float __int_as_float(int x) { return specdec_sim::FromBits<float>(static_cast<uint32_t>(x)); }
inline long long __double_as_longlong(double x) { return specdec_sim::FromBits<long long>(specdec_sim::Bits(x)); }
inline double __longlong_as_double(long long x) { return specdec_sim::FromBits<double>(static_cast<uint64_t>(x)); }

inline unsigned int __umulhi(unsigned int a, unsigned int b) {
  return static_cast<unsigned int>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned int>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }

// CUDA's integer and floating-point max and min overloads.
#define SPECDEC_SIM_MINMAX(T)                      \
  inline T max(T a, T b) { return a > b ? a : b; } \
  inline T min(T a, T b) { return a < b ? a : b; }
SPECDEC_SIM_MINMAX(int)
SPECDEC_SIM_MINMAX(unsigned int)
SPECDEC_SIM_MINMAX(long)
SPECDEC_SIM_MINMAX(unsigned long)
SPECDEC_SIM_MINMAX(long long)
SPECDEC_SIM_MINMAX(unsigned long long)
#undef SPECDEC_SIM_MINMAX
inline float max(float a, float b) { return fmaxf(a, b); }
inline float min(float a, float b) { return fminf(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
