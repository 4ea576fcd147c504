// The simulator's internals shared by the driver API (driver.cpp), the kernel-module loader (cubin.cpp,
// modules.cpp) and the SIMT executor (executor.cpp, collectives.cpp).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>
#include <vector>

#include "specdec_sim/device.h"

namespace specdec_sim {

// ---------------------------------------------------------------------------------------------------------
// The modelled GPU and the run's settings (environment variables, read once; the README's simulator section lists
// them).
// ---------------------------------------------------------------------------------------------------------
struct Settings {
  int compute_capability = 90;    // SPECDEC_SIM_CC
  int multiprocessors = 132;      // SPECDEC_SIM_SMS
  int devices = 1;                // SPECDEC_SIM_DEVICES
  uint64_t seed = 0;              // SPECDEC_SIM_SEED, or drawn and printed
  uint8_t poison = 0xFF;          // SPECDEC_SIM_POISON: fresh device and shared memory
  size_t stack_bytes = 64 << 10;  // SPECDEC_SIM_STACK_KIB: each CUDA thread's fiber stack
  std::string kernels_dir;        // SPECDEC_SIM_KERNELS, or kernels/ beside libcuda.so.1
  bool verbose = false;           // SPECDEC_SIM_VERBOSE=1: one line per launch
  bool stats = false;             // SPECDEC_SIM_STATS=1: the executor's counts at exit
  int threads = 1;                // SPECDEC_SIM_THREADS: OS threads running a launch's blocks (default: cores)
  bool asan_fibers = false;       // SPECDEC_SIM_ASAN_FIBERS=1: announce fiber switches to AddressSanitizer
};
const Settings& GetSettings();

// H100 SXM limits (compute capability 9.0).
constexpr int kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
constexpr size_t kSharedPerBlock = 48 << 10;        // without the opt-in attribute
constexpr size_t kSharedPerBlockOptin = 227 << 10;  // 232448
constexpr size_t kSharedPerMultiprocessor = 228 << 10;
constexpr size_t kSharedReservedPerBlock = 1 << 10;  // the driver's reservation (sm_80+)
constexpr int kRegistersPerBlock = 65536;
constexpr size_t kDynamicSharedCapacity = kSharedPerBlockOptin;  // the size of each module's dynamic array

// ---------------------------------------------------------------------------------------------------------
// Kernels: what the cubin says of each (as the real driver reads it) and the host-compiled entry point.
// ---------------------------------------------------------------------------------------------------------
struct CubinKernel {
  std::string name;
  int max_threads = kMaxThreadsPerBlock;  // __launch_bounds__ (EIATTR_MAX_THREADS), else the device limit
  int registers = 0;                      // EIATTR_REGCOUNT
  size_t static_shared = 0;               // .nv.shared.<name>, less the reservation
  std::vector<uint32_t> param_sizes;      // EIATTR_KPARAM_INFO, by ordinal
};

// One cubin (ELF) of a fatbin: the kernels it defines.
struct Cubin {
  int arch = 0;
  std::vector<CubinKernel> kernels;
};

// The parts of a fatbin the simulator uses. `source` is the .cu the image was compiled from.
struct Fatbin {
  std::string source;
  std::vector<Cubin> cubins;
  std::vector<int> ptx_archs;
};

// Parses a fatbin image (the one build.rs embeds) or a bare cubin; false with `error` set if it is neither.
bool ParseFatbin(const void* image, Fatbin* out, std::string* error);

// A host-compiled kernel module (target/sim/kernels/<family>.so): one per cuda/*.cu, loaded once.
struct KernelModule {
  std::string family;
  std::string path;
  void* handle = nullptr;
  size_t tls_size = 0;  // the module's TLS block: every __shared__ variable, and the dynamic array
};
// The module of `family`, loading it on first use; null with `error` set when it cannot be loaded.
KernelModule* LoadKernelModule(const std::string& family, std::string* error);

using EntryPoint = void (*)(void** params);

struct Kernel {
  CubinKernel cubin;
  KernelModule* module = nullptr;
  EntryPoint entry = nullptr;
  size_t max_dynamic_shared = 0;  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
};

// ---------------------------------------------------------------------------------------------------------
// Execution.
// ---------------------------------------------------------------------------------------------------------
struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t dynamic_shared = 0;
  void** params = nullptr;
};

// How a launch failed on the simulated device, mapped to the CUresult a GPU would give.
enum class FaultKind { kNone, kIllegalAddress, kMisalignedAddress, kIllegalInstruction, kLaunchFailed };

struct LaunchResult {
  FaultKind fault = FaultKind::kNone;
  std::string message;  // also printed to stderr
};

// Runs every block of the launch on the calling OS thread (blocks in a shuffled order, each block's threads
// as fibers under a shuffled, warp-by-warp schedule). The launch configuration was checked by the caller.
LaunchResult Execute(const Kernel& kernel, const LaunchConfig& config, uint64_t launch_seed);

// Names the running CUDA thread when AddressSanitizer or UBSan stops the process.
void InstallSanitizerHook();

// What the executor did, summed over the process (printed at exit with SPECDEC_SIM_STATS=1).
struct ExecutorStats {
  uint64_t launches, blocks, threads, resumes, barriers, collectives, nanoseconds;
};
ExecutorStats GetExecutorStats();

// ---------------------------------------------------------------------------------------------------------
// Warp collectives (collectives.cpp): the result of one collective, computed when its last lane arrives.
// `shared_base` and `shared_size` give the block's shared window (ldmatrix reads it).
// ---------------------------------------------------------------------------------------------------------
struct CollectiveError {
  FaultKind kind = FaultKind::kNone;
  std::string message;
};
CollectiveError CompleteCollective(specdec_sim_warp_op* const ops[32], uint32_t mask, const unsigned char* shared_base,
                                   size_t shared_size);
const char* CollectiveName(int kind);

// Reproducible randomness: SplitMix64.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t Next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t Below(uint64_t n) { return Next() % n; }
  template <typename T>
  void Shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[Below(i)]);
  }
};
uint64_t Mix(uint64_t a, uint64_t b);
uint64_t HashString(const std::string& s);

}  // namespace specdec_sim
