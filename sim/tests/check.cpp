// The simulator's own tests: `make -C sim check` (or sim/run target/sim/tests/check target/sim/tests/suite.fatbin).
//
// Runs the kernels of sim/tests/suite.cu through the driver API, as any CUDA program would, and checks
//   * the hand-worked PTX examples against values derived by hand from the PTX ISA's fragment tables;
//   * that every deliberate fault is reported: the launch fails with the right CUresult and a message naming the
//     kernel, block and thread, or (for an out-of-bounds or misaligned access) AddressSanitizer or UBSan stops
//     the process with the simulator's note naming the CUDA thread (those run in a child process);
//   * that a missing barrier or a missing cp.async wait changes a result under the shuffled schedule;
//   * the launch limits and the driver's argument checks.
// Prints one PASS or FAIL line per check and ends with "N passed, N failed".
#include <cuda.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <string>
#include <vector>

namespace {

CUmodule g_module;

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct alignas(16) uint4 {
  uint32_t x, y, z, w;
};

std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Format(const char* fmt, ...) {
  char buffer[2048];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  return buffer;
}

std::string ErrorName(CUresult r) {
  const char* name = nullptr;
  cuGetErrorName(r, &name);
  return name ? name : Format("CUresult %d", static_cast<int>(r));
}

#define CHECK_CU(call)                                                                    \
  do {                                                                                    \
    const CUresult r_ = (call);                                                           \
    if (r_ != CUDA_SUCCESS) return Format("%s failed: %s", #call, ErrorName(r_).c_str()); \
  } while (0)

template <typename T>
struct Device {
  CUdeviceptr ptr = 0;
  size_t n = 0;
  explicit Device(size_t count, const std::vector<T>& init = {}) : n(count) {
    if (cuMemAlloc(&ptr, n * sizeof(T)) != CUDA_SUCCESS) abort();
    if (!init.empty()) cuMemcpyHtoD(ptr, init.data(), n * sizeof(T));
  }
  ~Device() { cuMemFree(ptr); }
  std::vector<T> Read() const {
    std::vector<T> v(n);
    cuMemcpyDtoH(v.data(), ptr, n * sizeof(T));
    return v;
  }
};

CUfunction Function(const char* name) {
  CUfunction f = nullptr;
  if (cuModuleGetFunction(&f, g_module, name) != CUDA_SUCCESS) {
    fprintf(stderr, "no kernel %s in the suite\n", name);
    abort();
  }
  return f;
}

template <typename... Args>
CUresult Launch(const char* name, dim3 grid, dim3 block, unsigned shared, Args... args) {
  void* params[] = {&args..., nullptr};
  return cuLaunchKernel(Function(name), grid.x, grid.y, grid.z, block.x, block.y, block.z, shared, nullptr, params,
                        nullptr);
}

// f16 and bf16 bit patterns of small integers (exact in both).
uint16_t HalfBits(int v) {
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  int m = v < 0 ? -v : v, e = 0;
  while ((m >> e) > 1) ++e;
  return sign | static_cast<uint16_t>(((e + 15) << 10) | (((m << 10) >> e) & 0x3FF));
}
uint16_t Bf16Bits(int v) {
  const float f = static_cast<float>(v);
  uint32_t bits;
  memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}

// ---------------------------------------------------------------------------------------------------------------
// Hand-worked examples.
// ---------------------------------------------------------------------------------------------------------------

// A = identity, B[k][n] = 8 k + n, C = 0: D = B's rows, so (the C/D table: d_i at row groupID + 8 for i >= 2,
// column 2 tig + (i & 1)) lane l's d_i = 8 (l / 4 + 8 [i >= 2]) + 2 (l % 4) + (i & 1).
std::string MmaIdentity(bool bf16) {
  std::vector<uint16_t> a(256), b(128);
  for (int m = 0; m < 16; ++m) a[m * 16 + m] = bf16 ? Bf16Bits(1) : HalfBits(1);
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 8; ++n) b[k * 8 + n] = bf16 ? Bf16Bits(8 * k + n) : HalfBits(8 * k + n);
  Device<uint16_t> da(256, a), db(128, b);
  Device<float> dc(128, std::vector<float>(128, 0.0f)), dd(128);
  CHECK_CU(Launch("MmaExampleKernel", dim3(1), dim3(32), 0, da.ptr, db.ptr, dc.ptr, dd.ptr, bf16 ? 1 : 0));
  const std::vector<float> d = dd.Read();
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 4; ++i) {
      const float want = static_cast<float>(8 * (l / 4 + (i >= 2 ? 8 : 0)) + 2 * (l % 4) + (i & 1));
      if (d[l * 4 + i] != want) return Format("lane %d d%d = %g, want %g", l, i, d[l * 4 + i], want);
    }
  }
  return "";
}

// Small integers everywhere, so every sum is exact: D = A B + C, compared through the C/D table.
std::string MmaIntegers(bool bf16) {
  std::vector<uint16_t> a(256), b(128);
  std::vector<int> ai(256), bi(128);
  std::vector<float> c(128);
  for (int i = 0; i < 256; ++i) ai[i] = (i * 7 + i / 16 * 3) % 9 - 4;
  for (int i = 0; i < 128; ++i) bi[i] = (i * 5 + i / 8) % 7 - 3;
  for (int i = 0; i < 128; ++i) c[i] = static_cast<float>((i * 11) % 13 - 6);
  for (int i = 0; i < 256; ++i) a[i] = bf16 ? Bf16Bits(ai[i]) : HalfBits(ai[i]);
  for (int i = 0; i < 128; ++i) b[i] = bf16 ? Bf16Bits(bi[i]) : HalfBits(bi[i]);
  Device<uint16_t> da(256, a), db(128, b);
  Device<float> dc(128, c), dd(128);
  CHECK_CU(Launch("MmaExampleKernel", dim3(1), dim3(32), 0, da.ptr, db.ptr, dc.ptr, dd.ptr, bf16 ? 1 : 0));
  const std::vector<float> d = dd.Read();
  for (int l = 0; l < 32; ++l) {
    for (int i = 0; i < 4; ++i) {
      const int row = l / 4 + (i >= 2 ? 8 : 0), col = 2 * (l % 4) + (i & 1);
      int want = static_cast<int>(c[row * 8 + col]);
      for (int k = 0; k < 16; ++k) want += ai[row * 16 + k] * bi[k * 8 + col];
      if (d[l * 4 + i] != static_cast<float>(want)) {
        return Format("lane %d d%d (D[%d][%d]) = %g, want %d", l, i, row, col, d[l * 4 + i], want);
      }
    }
  }
  return "";
}

// Element (r, c) of matrix j holds 64 j + 8 r + c; lane l's register j holds elements (l / 4, 2 (l % 4)) and
// (l / 4, 2 (l % 4) + 1), low half first; with .trans, (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
std::string LdMatrixExample(int matrices, bool trans) {
  Device<uint32_t> out(128);
  CHECK_CU(Launch("LdMatrixExampleKernel", dim3(1), dim3(32), 0, out.ptr, matrices, trans ? 1 : 0));
  const std::vector<uint32_t> got = out.Read();
  for (int l = 0; l < 32; ++l) {
    for (int j = 0; j < matrices; ++j) {
      const int r = l / 4, c = 2 * (l % 4);
      const uint32_t lo = trans ? 64 * j + 8 * c + r : 64 * j + 8 * r + c;
      const uint32_t hi = trans ? 64 * j + 8 * (c + 1) + r : 64 * j + 8 * r + c + 1;
      const uint32_t want = lo | (hi << 16);
      if (got[l * 4 + j] != want)
        return Format("lane %d register %d = 0x%08x, want 0x%08x", l, j, got[l * 4 + j], want);
    }
  }
  return "";
}

std::string Collectives() {
  Device<int> out(64 * 8);
  CHECK_CU(Launch("CollectivesExampleKernel", dim3(1), dim3(64), 0, out.ptr));
  const std::vector<int> got = out.Read();
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, base = t - lane;
    const int want[8] = {
        100 * (t ^ 5),
        lane % 8 >= 3 ? 100 * (t - 3) : 100 * t,
        lane % 16 + 2 < 16 ? 100 * (t + 2) : 100 * t,
        100 * (base + (lane & 16) + 7),
        static_cast<int>(0x49249249u),
        (t >= 32 ? 1 : 0) + 2,
        16 + 1000 * 1 + 10000 * 0,
        t ^ 1,
    };
    for (int k = 0; k < 8; ++k) {
      if (got[t * 8 + k] != want[k]) return Format("thread %d result %d = %d, want %d", t, k, got[t * 8 + k], want[k]);
    }
  }
  return "";
}

// ---------------------------------------------------------------------------------------------------------------
// Faults. A fault ends the context (as on a GPU), so each runs in a child process; the parent checks how the
// child ended and what it printed.
// ---------------------------------------------------------------------------------------------------------------
struct ChildResult {
  int exit_code;  // -1 when killed by a signal
  std::string stderr_text;
};

ChildResult InChild(const std::function<int()>& body) {
  int pipe_fds[2];
  if (pipe(pipe_fds) != 0) abort();
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid == 0) {
    close(pipe_fds[0]);
    dup2(pipe_fds[1], 2);
    _exit(body());
  }
  close(pipe_fds[1]);
  std::string text;
  char buffer[4096];
  ssize_t n;
  while ((n = read(pipe_fds[0], buffer, sizeof(buffer))) > 0) text.append(buffer, static_cast<size_t>(n));
  close(pipe_fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
}

// The child launches; the launch must fail with `want` and the report must contain every one of `phrases`.
std::string LaunchFails(CUresult want, const std::vector<std::string>& phrases,
                        const std::function<CUresult()>& launch) {
  const ChildResult child = InChild([&] {
    const CUresult r = launch();
    fprintf(stderr, "launch returned %d\n", static_cast<int>(r));
    return r == want ? 0 : 1;
  });
  if (child.exit_code != 0)
    return Format("the launch did not fail with %s:\n%s", ErrorName(want).c_str(), child.stderr_text.c_str());
  for (const std::string& p : phrases) {
    if (child.stderr_text.find(p) == std::string::npos) {
      return Format("the report lacks \"%s\":\n%s", p.c_str(), child.stderr_text.c_str());
    }
  }
  return "";
}

// The child's launch must be stopped by a sanitizer whose report contains every one of `phrases`.
std::string SanitizerStops(const std::vector<std::string>& phrases, const std::function<CUresult()>& launch) {
  const ChildResult child = InChild([&] {
    launch();
    return 0;  // reaching here means nothing stopped the access
  });
  if (child.exit_code == 0) return "the faulty access went unreported";
  for (const std::string& p : phrases) {
    if (child.stderr_text.find(p) == std::string::npos) {
      return Format("the report lacks \"%s\":\n%s", p.c_str(), child.stderr_text.c_str());
    }
  }
  return "";
}

std::string PartialBarrier() {
  return LaunchFails(CUDA_ERROR_ILLEGAL_INSTRUCTION,
                     {"reached by 32 of the block's 64 threads", "kernel PartialBarrierKernel", "suite.cu"}, [] {
                       Device<int> out(64);
                       return Launch("PartialBarrierKernel", dim3(2), dim3(64), 0, out.ptr);
                     });
}

std::string DivergentBarrier() {
  return LaunchFails(CUDA_ERROR_ILLEGAL_INSTRUCTION, {"wait at different barriers", "kernel DivergentBarrierKernel"},
                     [] {
                       Device<int> out(64);
                       return Launch("DivergentBarrierKernel", dim3(1), dim3(64), 0, out.ptr);
                     });
}

std::string BadMask(int variant, unsigned threads, const char* phrase) {
  return LaunchFails(CUDA_ERROR_ILLEGAL_INSTRUCTION, {phrase, "kernel BadMaskKernel", "suite.cu"}, [=] {
    Device<int> out(64);
    return Launch("BadMaskKernel", dim3(1), dim3(threads), 0, out.ptr, variant);
  });
}

// 3 rows of 5 floats in an allocation of exactly 15: the last row's extra read is one element past the end.
std::string TailRead() {
  return SanitizerStops({"AddressSanitizer", "heap-buffer-overflow", "READ of size 4",
                         "the error above happened in kernel TailReadKernel, block (2,0,0)", "thread (0,0,0)"},
                        [] {
                          Device<float> values(15, std::vector<float>(15, 1.0f)), sums(3);
                          return Launch("TailReadKernel", dim3(3), dim3(32), 0, values.ptr, 3, 5, sums.ptr);
                        });
}

std::string MisalignedLoad() {
  return SanitizerStops({"misaligned address", "uint4", "the error above happened in kernel MisalignedLoadKernel"}, [] {
    Device<float> values(16, std::vector<float>(16, 1.0f));
    Device<uint4> out(1);
    return Launch("MisalignedLoadKernel", dim3(1), dim3(1), 0, values.ptr, out.ptr);
  });
}

// Over `launches` launches (each a fresh schedule), how many give `want` and how many do not.
template <typename T>
std::pair<int, int> Outcomes(int launches, const T& want, const std::function<T()>& run) {
  int right = 0, wrong = 0;
  for (int i = 0; i < launches; ++i) (run() == want ? right : wrong)++;
  return {right, wrong};
}

// Warp order is a coin per launch: without the barrier the consumer runs first in about half of the launches
// (all 40 right by chance: probability 2^-40).
std::string MissingBarrier() {
  Device<int> out(1);
  auto run = [&](int barrier) {
    return Outcomes<int>(40, 42, [&] {
      cuMemsetD32(out.ptr, 0, 1);
      if (Launch("ProducerConsumerKernel", dim3(1), dim3(64), 0, out.ptr, barrier) != CUDA_SUCCESS) return -7;
      return out.Read()[0];
    });
  };
  const auto with = run(1), without = run(0);
  if (with.second != 0) return Format("with the barrier, %d of 40 launches read the wrong value", with.second);
  if (without.second == 0) return "without the barrier, all 40 launches read the right value";
  return "";
}

// Without the wait, thread 63's copy lands only when thread 63 exits, after thread 0 has read in about half of
// the launches.
std::string MissingCopyWait() {
  std::vector<uint4> in(64);
  for (unsigned i = 0; i < 64; ++i) in[i] = {i, i + 1, i + 2, i + 3};
  Device<uint4> din(64, in), out(1);
  auto run = [&](int wait) {
    return Outcomes<uint32_t>(40, 63u, [&] {
      if (Launch("CopyAsyncKernel", dim3(1), dim3(64), 0, din.ptr, out.ptr, wait) != CUDA_SUCCESS) return 7u;
      return out.Read()[0].x;
    });
  };
  const auto with = run(1), without = run(0);
  if (with.second != 0) return Format("with the wait, %d of 40 launches read stale data", with.second);
  if (without.second == 0) return "without the wait, all 40 launches read the landed copy";
  return "";
}

std::string UnwrittenShared() {
  Device<uint32_t> out(32);
  CHECK_CU(Launch("UnwrittenSharedKernel", dim3(1), dim3(32), 0, out.ptr));
  const char* poison = getenv("SPECDEC_SIM_POISON");
  const uint32_t byte = poison ? static_cast<uint32_t>(strtoul(poison, nullptr, 0)) : 0xFFu;
  const uint32_t want = byte * 0x01010101u;
  for (uint32_t v : out.Read()) {
    if (v != want) return Format("read 0x%08x, want the poison 0x%08x", v, want);
  }
  return "";
}

// ---------------------------------------------------------------------------------------------------------------
// Launch limits and driver checks (no fault: the context stays usable).
// ---------------------------------------------------------------------------------------------------------------
std::string Expect(CUresult got, CUresult want, const char* what) {
  if (got == want) return "";
  return Format("%s returned %s, want %s", what, ErrorName(got).c_str(), ErrorName(want).c_str());
}

std::string LaunchLimits() {
  Device<int> out(1 << 16);
  CUfunction bounded = Function("BoundedKernel");
  std::string e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(1, 65535), dim3(32), 128, out.ptr), CUDA_SUCCESS, "grid y = 65535"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(1, 65536), dim3(32), 128, out.ptr), CUDA_ERROR_INVALID_VALUE,
                   "grid y = 65536"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(1, 1, 65536), dim3(32), 128, out.ptr), CUDA_ERROR_INVALID_VALUE,
                   "grid z = 65536"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(0), dim3(32), 128, out.ptr), CUDA_ERROR_INVALID_VALUE, "grid x = 0"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(1), dim3(256), 1024, out.ptr), CUDA_ERROR_INVALID_VALUE,
                   "256 threads over __launch_bounds__(128)"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BarrierOnlyKernel", dim3(1), dim3(1025), 0), CUDA_ERROR_INVALID_VALUE, "1025 threads"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BarrierOnlyKernel", dim3(1), dim3(1, 1, 65), 0), CUDA_ERROR_INVALID_VALUE, "block z = 65"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(1), dim3(128), 48 << 10, out.ptr), CUDA_SUCCESS, "48 KiB dynamic"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(1), dim3(128), (48 << 10) + 4, out.ptr), CUDA_ERROR_INVALID_VALUE,
                   "48 KiB + 4 dynamic without the attribute"))
           .empty())
    return e;
  if (!(e = Expect(cuFuncSetAttribute(bounded, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, (227 << 10) + 4),
                   CUDA_ERROR_INVALID_VALUE, "an attribute over the opt-in maximum"))
           .empty())
    return e;
  CHECK_CU(cuFuncSetAttribute(bounded, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 100 << 10));
  if (!(e = Expect(Launch("BoundedKernel", dim3(1), dim3(128), 100 << 10, out.ptr), CUDA_SUCCESS,
                   "100 KiB dynamic with the attribute"))
           .empty())
    return e;
  if (!(e = Expect(Launch("BoundedKernel", dim3(1), dim3(128), (100 << 10) + 4, out.ptr), CUDA_ERROR_INVALID_VALUE,
                   "past the attribute"))
           .empty())
    return e;
  int value = 0;
  CHECK_CU(cuFuncGetAttribute(&value, CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK, bounded));
  if (value != 128) return Format("MAX_THREADS_PER_BLOCK = %d, want 128 (the cubin's __launch_bounds__)", value);
  return "";
}

// A read past the end of the dynamic shared memory the launch asked for is caught by AddressSanitizer.
std::string DynamicSharedBound() {
  return SanitizerStops({"AddressSanitizer", "the error above happened in kernel BoundedKernel"}, [] {
    Device<int> out(1);
    return Launch("BoundedKernel", dim3(1), dim3(128), 64 * 4, out.ptr);  // 128 ints written into room for 64
  });
}

std::string DriverChecks() {
  std::string e;
  Device<int> d(4);
  const int host[8] = {};
  if (!(e = Expect(cuMemcpyHtoD(d.ptr, host, 5 * sizeof(int)), CUDA_ERROR_INVALID_VALUE, "a copy past the allocation"))
           .empty())
    return e;
  if (!(e = Expect(cuMemcpyHtoD(d.ptr + 4, host, 4 * sizeof(int)), CUDA_ERROR_INVALID_VALUE,
                   "a copy from inside past the end"))
           .empty())
    return e;
  CUdeviceptr none = 0;
  if (!(e = Expect(cuMemFree(d.ptr + 4), CUDA_ERROR_INVALID_VALUE, "freeing an inner pointer")).empty()) return e;
  CUfunction f;
  if (!(e = Expect(cuModuleGetFunction(&f, g_module, "NoSuchKernel"), CUDA_ERROR_NOT_FOUND, "an unknown kernel"))
           .empty())
    return e;
  CUcontext ctx;
  CHECK_CU(cuCtxPopCurrent(&ctx));
  const CUresult without = cuMemAlloc(&none, 16);
  CHECK_CU(cuCtxPushCurrent(ctx));
  if (!(e = Expect(without, CUDA_ERROR_INVALID_CONTEXT, "cuMemAlloc without a current context")).empty()) return e;
  CUgraph graph;
  if (!(e = Expect(cuGraphCreate(&graph, 0), CUDA_ERROR_NOT_SUPPORTED, "an unsimulated call")).empty()) return e;
  return "";
}

// Not a check: what a thread costs the simulator (1024-thread blocks that only meet at one barrier).
std::string Timing() {
  const char* blocks_env = getenv("SPECDEC_SIM_TIMING_BLOCKS");
  const int blocks = blocks_env ? atoi(blocks_env) : 200;
  const auto start = std::chrono::steady_clock::now();
  CHECK_CU(Launch("BarrierOnlyKernel", dim3(blocks), dim3(1024), 0));
  const double ns = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  printf("  (simulated cost: %.0f ns per CUDA thread that meets one barrier)\n", ns / (blocks * 1024.0));
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s suite.fatbin\n", argv[0]);
    return 2;
  }
  FILE* f = fopen(argv[1], "rb");
  if (f == nullptr) {
    perror(argv[1]);
    return 2;
  }
  std::vector<char> image;
  char buffer[65536];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), f)) > 0) image.insert(image.end(), buffer, buffer + n);
  fclose(f);
  CUcontext ctx;
  if (cuInit(0) != CUDA_SUCCESS || cuDevicePrimaryCtxRetain(&ctx, 0) != CUDA_SUCCESS ||
      cuCtxPushCurrent(ctx) != CUDA_SUCCESS || cuModuleLoadData(&g_module, image.data()) != CUDA_SUCCESS) {
    fprintf(stderr, "cannot set up the device and load %s\n", argv[1]);
    return 2;
  }
  const std::vector<std::pair<const char*, std::function<std::string()>>> checks = {
      {"mma f16: identity times B, hand-worked per lane", [] { return MmaIdentity(false); }},
      {"mma bf16: identity times B, hand-worked per lane", [] { return MmaIdentity(true); }},
      {"mma f16: small integers, D = A B + C", [] { return MmaIntegers(false); }},
      {"mma bf16: small integers, D = A B + C", [] { return MmaIntegers(true); }},
      {"ldmatrix .x1", [] { return LdMatrixExample(1, false); }},
      {"ldmatrix .x4", [] { return LdMatrixExample(4, false); }},
      {"ldmatrix .x1.trans", [] { return LdMatrixExample(1, true); }},
      {"ldmatrix .x4.trans", [] { return LdMatrixExample(4, true); }},
      {"shuffles, votes, barrier reductions", Collectives},
      {"a barrier reached by part of the block is reported", PartialBarrier},
      {"threads at different barriers are reported", DivergentBarrier},
      {"a mask that leaves out the calling lane is reported",
       [] { return BadMask(0, 32, "leaves out the calling lane"); }},
      {"a mask naming lanes that do not exist is reported", [] { return BadMask(1, 48, "which do not exist"); }},
      {"a mask naming exited lanes is reported", [] { return BadMask(2, 32, "exited"); }},
      {"a read one element past a row faults at once", TailRead},
      {"a misaligned 16-byte load faults", MisalignedLoad},
      {"a read past the launch's dynamic shared memory faults", DynamicSharedBound},
      {"a missing __syncthreads changes the result", MissingBarrier},
      {"a missing cp.async.wait_group reads stale data", MissingCopyWait},
      {"shared memory nobody wrote reads as poison", UnwrittenShared},
      {"launch limits: grid, block, __launch_bounds__, dynamic shared memory", LaunchLimits},
      {"driver argument checks", DriverChecks},
      {"timing", Timing},
  };
  int passed = 0, failed = 0;
  for (const auto& [name, run] : checks) {
    const std::string failure = run();
    if (failure.empty()) {
      ++passed;
      printf("PASS %s\n", name);
    } else {
      ++failed;
      printf("FAIL %s: %s\n", name, failure.c_str());
    }
    fflush(stdout);
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
