// The SIMT executor: runs a launch's blocks on the calling OS thread and a pool of workers (SPECDEC_SIM_THREADS),
// one block at a time per OS thread, each CUDA thread of a block as a fiber (Boost.Context), and implements what
// the kernels call through specdec_sim/device.h: barriers, warp collectives, cp.async, the shared window, traps.
//
// Schedule. Blocks are taken in a shuffled order. Inside a block, between two barriers, warps run one at a time in a
// shuffled order, each as far as it can (until every lane waits at the barrier or has exited), its lanes in a
// shuffled order between collectives. A warp that reads what another warp writes without a barrier between
// them therefore sees stale or poisoned data whenever it runs first, and the seed decides which runs first.
//
// Checks. A barrier reached by part of a block (the rest exited or waiting elsewhere), threads of a block at
// different barriers, a collective whose mask leaves out the calling lane or names a lane that does not exist or
// has exited, lanes meeting at different collectives, a shuffle reading a lane outside its mask, misaligned or
// out-of-window shared addresses: each stops the launch with a report naming the kernel, block, thread and
// source line. Shared memory starts poisoned in every block; a cp.async lands only when its group is waited for.
#include <dlfcn.h>
#include <link.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <boost/context/fiber.hpp>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "runtime.h"

// The simulator itself is not instrumented (it would only slow every fiber switch); the kernel modules are,
// and sim/run preloads AddressSanitizer, whose interface is used when present: fiber switches are announced to
// it, the dynamic shared memory past a launch's size is poisoned, and its reports name the CUDA thread.
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size) __attribute__((weak));
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old)
    __attribute__((weak));
void __asan_poison_memory_region(void const volatile* address, size_t size) __attribute__((weak));
void __asan_unpoison_memory_region(void const volatile* address, size_t size) __attribute__((weak));
void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));
}

extern "C" {
__attribute__((visibility("default"))) __thread const specdec_sim_thread_info* specdec_sim_current = nullptr;
}

namespace specdec_sim {
namespace {

namespace bctx = boost::context;

// Whether AddressSanitizer is in the process (sim/run preloads it), and whether fiber switches are announced to
// it (SPECDEC_SIM_ASAN_FIBERS=1: its reports then place stack addresses in the right CUDA thread's stack; off by
// default, as it doubles the cost of a switch and detection does not depend on it).
const bool kAsan = __asan_poison_memory_region != nullptr && __asan_unpoison_memory_region != nullptr;
const bool kAsanFibers = kAsan && __sanitizer_start_switch_fiber != nullptr &&
                         __sanitizer_finish_switch_fiber != nullptr && GetSettings().asan_fibers;

std::string Format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string Format(const char* fmt, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buffer, sizeof(buffer), fmt, args);
  va_end(args);
  return buffer;
}

// ---------------------------------------------------------------------------------------------------------
// Fiber stacks: carved from 32 MiB slabs backed by transparent huge pages (a block's 1024 stacks then need a few
// TLB entries, not 1024), at a stride that is an odd number of cache lines past a multiple of the stack size (so
// the stacks' tops, where the fibers work, fall in different cache sets). An overflow is caught by a canary at
// the stack's bottom, checked at every switch away from the thread; each stack is reused across blocks.
// ---------------------------------------------------------------------------------------------------------
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kCanary = 0xCD;

class StackPool {
 public:
  bctx::stack_context Allocate() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!free_.empty()) {
      bctx::stack_context s = free_.back();
      free_.pop_back();
      return s;
    }
    const size_t stride = (GetSettings().stack_bytes + 63) / 64 * 64 + 17 * 64;
    if (slab_left_ < stride) {
      constexpr size_t kSlab = 32u << 20;
      void* slab = mmap(nullptr, kSlab, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (slab == MAP_FAILED) {
        fprintf(stderr, "specdec-sim: cannot map %zu bytes of fiber stacks\n", kSlab);
        abort();
      }
      madvise(slab, kSlab, MADV_HUGEPAGE);
      slab_next_ = static_cast<char*>(slab);
      slab_left_ = kSlab;
    }
    char* bottom = slab_next_;
    slab_next_ += stride;
    slab_left_ -= stride;
    memset(bottom, kCanary, kCanaryBytes);
    bctx::stack_context s;
    s.size = stride;
    s.sp = bottom + stride;
    return s;
  }
  void Release(const bctx::stack_context& s) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(s);
  }

 private:
  std::mutex mutex_;
  std::vector<bctx::stack_context> free_;
  char* slab_next_ = nullptr;
  size_t slab_left_ = 0;
};

// Whether the canary at the bottom of a thread's stack is intact: its first and last words (an overflow grows
// down into the last one first).
bool StackIntact(const bctx::stack_context& s) {
  const unsigned char* bottom = static_cast<const unsigned char*>(s.sp) - s.size;
  constexpr uint64_t kWord = 0x0101010101010101ull * kCanary;
  uint64_t first, last;
  memcpy(&first, bottom, 8);
  memcpy(&last, bottom + kCanaryBytes - 8, 8);
  return first == kWord && last == kWord;
}

StackPool& Stacks() {
  static StackPool* pool = new StackPool;  // outlives every fiber, abandoned ones included
  return *pool;
}

// Boost.Context's StackAllocator concept; records the stack it hands out in `*given`.
struct PooledStack {
  bctx::stack_context* given;
  bctx::stack_context allocate() {
    *given = Stacks().Allocate();
    return *given;
  }
  void deallocate(bctx::stack_context& s) noexcept { Stacks().Release(s); }
};

// ---------------------------------------------------------------------------------------------------------
// Threads, warps, blocks.
// ---------------------------------------------------------------------------------------------------------
enum class State : uint8_t { kRunnable, kBarrier, kCollective, kExited, kFaulted };

struct CopyInFlight {
  unsigned char* destination;
  uint64_t group;  // commit groups are numbered from 0; the uncommitted copies carry the next number
  int size;
  unsigned char data[16];
};

// A CUDA thread slot of one OS thread's blocks. Its fiber is made once and runs the kernel for every block that
// uses the slot (a loop: run the kernel, exit, wait for the next block), so a thread costs no fiber creation.
struct Thread {
  specdec_sim_thread_info info;
  int linear = 0, warp = 0, lane = 0;
  State state = State::kRunnable;
  bctx::fiber fiber;      // the suspended thread, resumed by the scheduler (empty until first used)
  bctx::fiber scheduler;  // inside the thread: the scheduler to switch back to
  bctx::stack_context stack;
  void* fake_stack = nullptr;
  bool quit = false;  // resumed to end its loop (the OS thread is ending)
  // At a barrier.
  int barrier_kind = 0, barrier_predicate = 0, barrier_result = 0;
  const char* file = nullptr;
  int line = 0;
  // cp.async copies in flight, oldest first, and the number the next commit_group gives.
  std::vector<CopyInFlight> copies;
  uint64_t next_group = 0;
};

// A collective some lanes of a warp have arrived at.
struct Gathering {
  int kind;
  uint32_t mask;
  const char* file;
  int line;
  uint32_t arrived = 0;
  specdec_sim_warp_op* ops[32] = {};
};

struct Warp {
  uint32_t lanes = 0;  // lanes that exist
  uint32_t exited = 0;
  std::vector<Gathering> gatherings;
};

// Threads and warps, reused by the blocks run on one OS thread (their vectors keep their capacity, so a block
// allocates nothing). A block that faults abandons its storage with its fibers.
struct BlockStorage {
  std::unique_ptr<Thread[]> threads{new Thread[kMaxThreadsPerBlock]};
  std::vector<Warp> warps{kMaxThreadsPerBlock / 32};
  std::vector<int> warp_order;
};

// The OS thread's storage. At the thread's end each idle fiber is resumed to leave its loop, so that it ends by
// returning (destroying a suspended fiber would throw through it to unwind it, and the sanitizer preloaded into a
// program that is not C++ cannot intercept that throw), and its stack goes back to the pool.
struct StorageOwner {
  BlockStorage* storage = nullptr;
  ~StorageOwner() {
    if (storage == nullptr) return;
    for (int i = 0; i < kMaxThreadsPerBlock; ++i) {
      Thread& t = storage->threads[i];
      if (!t.fiber) continue;
      t.quit = true;
      t.fiber = std::move(t.fiber).resume();
    }
    delete storage;
  }
};
thread_local StorageOwner tl_storage;

// The block's shared memory: the kernel module's TLS block on this OS thread, with the dynamic array in it.
struct SharedWindow {
  unsigned char* base = nullptr;
  size_t size = 0;
  unsigned char* dynamic = nullptr;
};

struct AtomicStats {
  std::atomic<uint64_t> launches{0}, blocks{0}, threads{0}, resumes{0}, barriers{0}, collectives{0}, nanoseconds{0};
};
AtomicStats g_stats;

class BlockRun;
thread_local BlockRun* tl_run = nullptr;
thread_local Thread* tl_thread = nullptr;
// The scheduler's stack, for AddressSanitizer's fiber annotations (SPECDEC_SIM_ASAN_FIBERS=1).
thread_local const void* tl_scheduler_stack_bottom = nullptr;
thread_local size_t tl_scheduler_stack_size = 0;

class BlockRun {
 public:
  BlockRun(const Kernel& kernel, const LaunchConfig& config, uint3 block_idx, uint64_t seed, SharedWindow window)
      : kernel_(kernel), config_(config), block_idx_(block_idx), rng_(seed), window_(window) {}

  LaunchResult Run();

  int Barrier(Thread* t, int kind, int predicate, const char* file, int line);
  void Collective(Thread* t, specdec_sim_warp_op* op);
  uint32_t ActiveMask(Thread* t) const { return warps_[t->warp].lanes & ~warps_[t->warp].exited; }
  uint32_t SharedAddress(Thread* t, const void* generic, const char* file, int line);
  void CpAsync(Thread* t, uint32_t address, const void* global, int cp_size, int src_size, const char* file, int line);
  void CpAsyncWait(Thread* t, int pending);
  [[noreturn]] void Trap(Thread* t, FaultKind kind, const std::string& what, const char* file, int line);
  std::string Where(const Thread* t) const;

 private:
  void Resume(Thread* t);
  void Yield(Thread* t);
  static void ThreadLoop(Thread* t);
  void ThreadExits(Thread* t);
  void Land(Thread* t, uint64_t groups_below);
  bool ReleaseBarrier();
  std::string DescribeStall() const;
  void Fail(FaultKind kind, std::string message);

  const Kernel& kernel_;
  const LaunchConfig& config_;
  uint3 block_idx_;
  Rng rng_;
  SharedWindow window_;
  int num_threads_ = 0;
  BlockStorage* storage_ = nullptr;
  Thread* threads_ = nullptr;
  Warp* warps_ = nullptr;
  size_t num_warps_ = 0;
  LaunchResult result_;
  uint64_t resumes_ = 0, barriers_ = 0, collectives_ = 0;
};

std::string BlockRun::Where(const Thread* t) const {
  const dim3& g = config_.grid;
  const dim3& b = config_.block;
  std::string where = Format("in kernel %s, block (%u,%u,%u) of grid (%u,%u,%u)", kernel_.cubin.name.c_str(),
                             block_idx_.x, block_idx_.y, block_idx_.z, g.x, g.y, g.z);
  if (t != nullptr) {
    where += Format(", thread (%u,%u,%u) of block (%u,%u,%u) (warp %d, lane %d)", t->info.thread_idx.x,
                    t->info.thread_idx.y, t->info.thread_idx.z, b.x, b.y, b.z, t->warp, t->lane);
  }
  return where;
}

void BlockRun::Fail(FaultKind kind, std::string message) {
  if (result_.fault != FaultKind::kNone) return;
  const uint64_t seed = GetSettings().seed;
  result_.fault = kind;
  result_.message =
      Format("specdec-sim: %s\n  simulator seed %llu (replay with SPECDEC_SIM_SEED=%llu and one test thread)",
             message.c_str(), static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  fprintf(stderr, "%s\n", result_.message.c_str());
}

void BlockRun::Trap(Thread* t, FaultKind kind, const std::string& what, const char* file, int line) {
  Fail(kind, Format("%s\n  %s\n  at %s:%d", what.c_str(), Where(t).c_str(), file ? file : "?", line));
  t->state = State::kFaulted;
  Yield(t);  // never resumed: the scheduler abandons the launch
  abort();
}

void BlockRun::Resume(Thread* t) {
  ++resumes_;
  tl_run = this;
  tl_thread = t;
  specdec_sim_current = &t->info;
  void* fake = nullptr;
  if (kAsanFibers)
    __sanitizer_start_switch_fiber(&fake, static_cast<char*>(t->stack.sp) - t->stack.size, t->stack.size);
  t->fiber = std::move(t->fiber).resume();
  if (kAsanFibers) __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
  tl_thread = nullptr;
  specdec_sim_current = nullptr;
}

void BlockRun::Yield(Thread* t) {
  if (!StackIntact(t->stack)) {
    // The overflow may have reached the stacks below; nothing of this OS thread's blocks can be trusted.
    fprintf(stderr, "specdec-sim: stack overflow: %s used more than its %zu KiB of stack (SPECDEC_SIM_STACK_KIB)\n",
            Where(t).c_str(), GetSettings().stack_bytes >> 10);
    abort();
  }
  if (kAsanFibers) __sanitizer_start_switch_fiber(&t->fake_stack, tl_scheduler_stack_bottom, tl_scheduler_stack_size);
  t->scheduler = std::move(t->scheduler).resume();
  if (kAsanFibers) __sanitizer_finish_switch_fiber(t->fake_stack, &tl_scheduler_stack_bottom, &tl_scheduler_stack_size);
}

LaunchResult BlockRun::Run() {
  const dim3& bd = config_.block;
  num_threads_ = static_cast<int>(bd.x * bd.y * bd.z);
  num_warps_ = static_cast<size_t>((num_threads_ + 31) / 32);
  if (tl_storage.storage == nullptr) tl_storage.storage = new BlockStorage;
  storage_ = tl_storage.storage;
  threads_ = storage_->threads.get();
  warps_ = storage_->warps.data();
  for (size_t w = 0; w < num_warps_; ++w) {
    warps_[w].lanes = 0;
    warps_[w].exited = 0;
    warps_[w].gatherings.clear();
  }
  for (int i = 0; i < num_threads_; ++i) {
    Thread* t = &threads_[i];
    t->state = State::kRunnable;
    t->copies.clear();
    t->next_group = 0;
    t->linear = i;
    t->warp = i / 32;
    t->lane = i % 32;
    t->info.thread_idx = {static_cast<unsigned>(i % bd.x), static_cast<unsigned>((i / bd.x) % bd.y),
                          static_cast<unsigned>(i / (bd.x * bd.y))};
    t->info.block_idx = block_idx_;
    t->info.block_dim = config_.block;
    t->info.grid_dim = config_.grid;
    warps_[t->warp].lanes |= 1u << t->lane;
    if (!t->fiber) {
      t->fiber = bctx::fiber(std::allocator_arg, PooledStack{&t->stack}, [t](bctx::fiber&& scheduler) {
        t->scheduler = std::move(scheduler);
        ThreadLoop(t);
        return std::move(t->scheduler);
      });
    }
  }

  std::vector<int>& warp_order = storage_->warp_order;
  warp_order.resize(num_warps_);
  for (size_t w = 0; w < num_warps_; ++w) warp_order[w] = static_cast<int>(w);
  rng_.Shuffle(warp_order);
  while (result_.fault == FaultKind::kNone) {
    for (int w : warp_order) {
      // Run the warp's lanes until none can go on, each pass in a random order: lane (start + step * i) % 32,
      // step odd, is a permutation of the 32 lanes, drawn with one random number.
      Thread* warp_threads = threads_ + w * 32;
      const int lanes = std::min(32, num_threads_ - w * 32);
      bool ran = true;
      while (ran && result_.fault == FaultKind::kNone) {
        ran = false;
        const uint64_t r = rng_.Next();
        const int start = static_cast<int>(r & 31), step = static_cast<int>((r >> 5) & 31) | 1;
        for (int i = 0; i < 32 && result_.fault == FaultKind::kNone; ++i) {
          const int lane = (start + step * i) & 31;
          if (lane < lanes && warp_threads[lane].state == State::kRunnable) {
            Resume(&warp_threads[lane]);
            ran = true;
          }
        }
      }
      if (result_.fault != FaultKind::kNone) break;
    }
    if (result_.fault != FaultKind::kNone) break;
    if (!ReleaseBarrier()) break;
    rng_.Shuffle(warp_order);
  }
  tl_run = nullptr;
  g_stats.blocks.fetch_add(1, std::memory_order_relaxed);
  g_stats.threads.fetch_add(static_cast<uint64_t>(num_threads_), std::memory_order_relaxed);
  g_stats.resumes.fetch_add(resumes_, std::memory_order_relaxed);
  g_stats.barriers.fetch_add(barriers_, std::memory_order_relaxed);
  g_stats.collectives.fetch_add(collectives_, std::memory_order_relaxed);
  if (result_.fault != FaultKind::kNone) {
    // Fibers suspended inside the kernel must not be destroyed (that would unwind kernel frames mid-collective):
    // abandon them, with their stacks and the storage that holds them.
    tl_storage.storage = nullptr;
  }
  return result_;
}

// The body of a thread slot's fiber: each time the scheduler resumes it for a new block, run the kernel as that
// block's thread, then wait for the next block. The running block is tl_run (set by Resume).
void BlockRun::ThreadLoop(Thread* t) {
  BlockRun* run = tl_run;
  if (kAsanFibers) __sanitizer_finish_switch_fiber(nullptr, &tl_scheduler_stack_bottom, &tl_scheduler_stack_size);
  while (true) {
    run->kernel_.entry(run->config_.params);
    run->ThreadExits(t);
    run->Yield(t);
    if (t->quit) return;
    run = tl_run;
  }
}

// Nothing is runnable: either every thread has exited (false, done), or every live thread waits at one
// barrier (release it, true), or the block is stuck (fail with a description, false).
bool BlockRun::ReleaseBarrier() {
  int at_barrier = 0, exited = 0;
  const Thread* first = nullptr;
  for (int i = 0; i < num_threads_; ++i) {
    const Thread& t = threads_[i];
    if (t.state == State::kExited) ++exited;
    if (t.state == State::kBarrier) {
      ++at_barrier;
      if (first == nullptr) first = &t;
    }
  }
  if (exited == num_threads_) return false;
  if (at_barrier + exited != num_threads_) {
    Fail(FaultKind::kIllegalInstruction, Format("deadlock: no thread of the block can proceed\n  %s\n%s",
                                                Where(nullptr).c_str(), DescribeStall().c_str()));
    return false;
  }
  if (exited > 0) {
    Fail(FaultKind::kIllegalInstruction,
         Format("__syncthreads at %s:%d reached by %d of the block's %d threads; the other %d have exited\n  %s\n%s",
                first->file, first->line, at_barrier, num_threads_, exited, Where(nullptr).c_str(),
                DescribeStall().c_str()));
    return false;
  }
  int and_all = 1, or_any = 0, count = 0;
  for (int i = 0; i < num_threads_; ++i) {
    const Thread& t = threads_[i];
    if (t.line != first->line || (t.file != first->file && strcmp(t.file, first->file) != 0)) {
      Fail(FaultKind::kIllegalInstruction,
           Format("threads of the block wait at different barriers: %s:%d and %s:%d\n  %s\n%s", first->file,
                  first->line, t.file, t.line, Where(&t).c_str(), DescribeStall().c_str()));
      return false;
    }
    and_all &= t.barrier_predicate;
    or_any |= t.barrier_predicate;
    count += t.barrier_predicate;
  }
  for (int i = 0; i < num_threads_; ++i) {
    Thread& t = threads_[i];
    switch (t.barrier_kind) {
      case SPECDEC_SIM_BAR_AND:
        t.barrier_result = and_all;
        break;
      case SPECDEC_SIM_BAR_OR:
        t.barrier_result = or_any;
        break;
      case SPECDEC_SIM_BAR_COUNT:
        t.barrier_result = count;
        break;
      default:
        t.barrier_result = 0;
        break;
    }
    t.state = State::kRunnable;
  }
  ++barriers_;
  return true;
}

// One line per warp: where its lanes are.
std::string BlockRun::DescribeStall() const {
  std::string out;
  for (size_t w = 0; w < num_warps_; ++w) {
    const Warp& warp = warps_[w];
    uint32_t barrier = 0;
    const Thread* at = nullptr;
    for (int lane = 0; lane < 32; ++lane) {
      const int i = static_cast<int>(w) * 32 + lane;
      if (i >= num_threads_) break;
      if (threads_[i].state == State::kBarrier) {
        barrier |= 1u << lane;
        at = &threads_[i];
      }
    }
    out += Format("  warp %zu: lanes 0x%08x exited", w, warp.exited);
    if (barrier != 0) out += Format(", 0x%08x at __syncthreads %s:%d", barrier, at->file, at->line);
    for (const Gathering& g : warp.gatherings) {
      out += Format(", 0x%08x at %s %s:%d (mask 0x%08x, missing 0x%08x)", g.arrived, CollectiveName(g.kind), g.file,
                    g.line, g.mask, g.mask & ~g.arrived);
    }
    out += "\n";
  }
  return out;
}

int BlockRun::Barrier(Thread* t, int kind, int predicate, const char* file, int line) {
  t->state = State::kBarrier;
  t->barrier_kind = kind;
  t->barrier_predicate = predicate;
  t->file = file;
  t->line = line;
  Yield(t);
  return t->barrier_result;
}

void BlockRun::Collective(Thread* t, specdec_sim_warp_op* op) {
  Warp& warp = warps_[t->warp];
  const uint32_t me = 1u << t->lane;
  const char* name = CollectiveName(op->kind);
  const bool aligned = op->kind == SPECDEC_SIM_MMA_M16N8K16_F16 || op->kind == SPECDEC_SIM_MMA_M16N8K16_BF16 ||
                       op->kind == SPECDEC_SIM_LDMATRIX;
  if (!(op->mask & me)) {
    Trap(t, FaultKind::kIllegalInstruction,
         Format("%s with mask 0x%08x, which leaves out the calling lane %d", name, op->mask, t->lane), op->file,
         op->line);
  }
  if (op->mask & ~warp.lanes) {
    Trap(t, FaultKind::kIllegalInstruction,
         Format("%s with mask 0x%08x names lanes 0x%08x, which do not exist (the block has %d threads)", name, op->mask,
                op->mask & ~warp.lanes, num_threads_),
         op->file, op->line);
  }
  if (op->mask & warp.exited) {
    Trap(t, FaultKind::kIllegalInstruction,
         Format("%s with mask 0x%08x names lanes 0x%08x, which have exited", name, op->mask, op->mask & warp.exited),
         op->file, op->line);
  }
  if (aligned && op->mask != 0xFFFFFFFFu) {
    Trap(t, FaultKind::kIllegalInstruction, Format("%s is .aligned: all 32 lanes must execute it", name), op->file,
         op->line);
  }
  Gathering* gathering = nullptr;
  for (Gathering& g : warp.gatherings) {
    if (g.mask == op->mask) gathering = &g;
  }
  if (gathering == nullptr) {
    warp.gatherings.push_back(Gathering{op->kind, op->mask, op->file, op->line});
    gathering = &warp.gatherings.back();
  } else if (gathering->kind != op->kind || gathering->line != op->line ||
             (gathering->file != op->file && strcmp(gathering->file, op->file) != 0)) {
    Trap(t, FaultKind::kIllegalInstruction,
         Format("lanes of mask 0x%08x meet at different collectives: %s at %s:%d and %s", op->mask,
                CollectiveName(gathering->kind), gathering->file, gathering->line, name),
         op->file, op->line);
  }
  gathering->arrived |= me;
  gathering->ops[t->lane] = op;
  if (gathering->arrived != gathering->mask) {
    t->state = State::kCollective;
    t->file = op->file;
    t->line = op->line;
    Yield(t);
    return;
  }
  // The last lane: compute every lane's result, release the others, and go on.
  ++collectives_;
  const CollectiveError error = CompleteCollective(gathering->ops, gathering->mask, window_.base, window_.size);
  if (error.kind != FaultKind::kNone) Trap(t, error.kind, error.message, op->file, op->line);
  const uint32_t mask = gathering->mask;
  warp.gatherings.erase(warp.gatherings.begin() + (gathering - warp.gatherings.data()));
  for (int lane = 0; lane < 32; ++lane) {
    if ((mask >> lane) & 1u) threads_[t->warp * 32 + lane].state = State::kRunnable;
  }
}

uint32_t BlockRun::SharedAddress(Thread* t, const void* generic, const char* file, int line) {
  const unsigned char* p = static_cast<const unsigned char*>(generic);
  if (p < window_.base || p >= window_.base + window_.size) {
    Trap(t, FaultKind::kIllegalAddress, Format("__cvta_generic_to_shared(%p): not a shared-memory address", generic),
         file, line);
  }
  return static_cast<uint32_t>(p - window_.base);
}

void BlockRun::CpAsync(Thread* t, uint32_t address, const void* global, int cp_size, int src_size, const char* file,
                       int line) {
  if (cp_size != 4 && cp_size != 8 && cp_size != 16) {
    Trap(t, FaultKind::kIllegalInstruction, Format("cp.async with cp-size %d", cp_size), file, line);
  }
  if (src_size < 0 || src_size > cp_size) {
    Trap(t, FaultKind::kIllegalInstruction, Format("cp.async with src-size %d > cp-size %d", src_size, cp_size), file,
         line);
  }
  if (address % cp_size != 0 || reinterpret_cast<uintptr_t>(global) % cp_size != 0) {
    Trap(t, FaultKind::kMisalignedAddress,
         Format("cp.async: shared 0x%x or global %p is not %d-byte aligned", address, global, cp_size), file, line);
  }
  if (static_cast<size_t>(address) + cp_size > window_.size) {
    Trap(t, FaultKind::kIllegalAddress,
         Format("cp.async: shared address 0x%x is outside the block's %zu bytes of shared memory", address,
                window_.size),
         file, line);
  }
  CopyInFlight copy;
  copy.destination = window_.base + address;
  copy.size = cp_size;
  memset(copy.data, 0, sizeof(copy.data));
  if (src_size > 0) memcpy(copy.data, global, static_cast<size_t>(src_size));  // checked by the sanitizer
  copy.group = t->next_group;
  t->copies.push_back(copy);
}

// Lands the copies of every group numbered below `groups_below` (a prefix of the thread's copies).
void BlockRun::Land(Thread* t, uint64_t groups_below) {
  size_t n = 0;
  while (n < t->copies.size() && t->copies[n].group < groups_below) {
    const CopyInFlight& c = t->copies[n++];
    memcpy(c.destination, c.data, static_cast<size_t>(c.size));
  }
  t->copies.erase(t->copies.begin(), t->copies.begin() + static_cast<std::ptrdiff_t>(n));
}

// cp.async.wait_group n: every committed group but the n most recent has landed.
void BlockRun::CpAsyncWait(Thread* t, int pending) {
  const uint64_t keep = static_cast<uint64_t>(pending < 0 ? 0 : pending);
  if (t->next_group > keep) Land(t, t->next_group - keep);
}

void BlockRun::ThreadExits(Thread* t) {
  Land(t, UINT64_MAX);
  Warp& warp = warps_[t->warp];
  warp.exited |= 1u << t->lane;
  t->state = State::kExited;
  for (const Gathering& g : warp.gatherings) {
    if ((g.mask >> t->lane) & 1u) {
      Fail(FaultKind::kIllegalInstruction,
           Format("lane %d exited while lanes 0x%08x wait for it at %s (%s:%d, mask 0x%08x)\n  %s", t->lane, g.arrived,
                  CollectiveName(g.kind), g.file, g.line, g.mask, Where(t).c_str()));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The module's shared window on this OS thread.
// ---------------------------------------------------------------------------------------------------------
SharedWindow WindowOf(const KernelModule& module) {
  SharedWindow w;
  // dlsym of a TLS symbol returns this thread's instance, allocating the module's TLS block if needed.
  w.dynamic = static_cast<unsigned char*>(dlsym(module.handle, "specdec_sim_dynamic_shared"));
  void* block = nullptr;
  if (w.dynamic == nullptr || dlinfo(module.handle, RTLD_DI_TLS_DATA, &block) != 0 || block == nullptr) {
    fprintf(stderr,
            "specdec-sim: %s has no dynamic shared memory symbol or TLS block (was it built by sim/Makefile?)\n",
            module.path.c_str());
    abort();
  }
  w.base = static_cast<unsigned char*>(block);
  w.size = module.tls_size;
  return w;
}

// Makes the dynamic array's bytes past the launch's size unaddressable (AddressSanitizer), for the launch.
void LimitDynamic(const SharedWindow& w, size_t dynamic_bytes) {
  if (kAsan) __asan_poison_memory_region(w.dynamic + dynamic_bytes, kDynamicSharedCapacity - dynamic_bytes);
}

// Poisons what a block may read of the window: the static shared memory and the launch's dynamic bytes.
void PoisonWindow(const SharedWindow& w, size_t dynamic_bytes) {
  const uint8_t poison = GetSettings().poison;
  const unsigned char* dynamic_end = w.dynamic + kDynamicSharedCapacity;
  memset(w.base, poison, static_cast<size_t>(w.dynamic - w.base));
  memset(w.dynamic, poison, dynamic_bytes);
  memset(const_cast<unsigned char*>(dynamic_end), poison, static_cast<size_t>(w.base + w.size - dynamic_end));
}

void UnpoisonDynamic(const SharedWindow& w) {
  if (kAsan) __asan_unpoison_memory_region(w.dynamic, kDynamicSharedCapacity);
}

BlockRun* CurrentRun(const char* what) {
  if (tl_run == nullptr || tl_thread == nullptr) {
    fprintf(stderr, "specdec-sim: %s called outside a kernel launch\n", what);
    abort();
  }
  return tl_run;
}

// Printed when a sanitizer stops the process: which CUDA thread was running.
void OnSanitizerDeath() {
  if (tl_run != nullptr && tl_thread != nullptr) {
    fprintf(stderr, "specdec-sim: the error above happened %s; simulator seed %llu\n", tl_run->Where(tl_thread).c_str(),
            static_cast<unsigned long long>(GetSettings().seed));
  }
}

// ---------------------------------------------------------------------------------------------------------
// A launch: its blocks in a shuffled order, shared by the launching OS thread and the pool's workers (blocks run
// concurrently, as on a GPU; a fault stops the launch after the blocks already running).
// ---------------------------------------------------------------------------------------------------------
struct Launch {
  const Kernel* kernel;
  const LaunchConfig* config;
  uint64_t seed;
  uint64_t blocks;
  std::vector<uint32_t> order;  // a random permutation, or empty for huge grids (a random affine one)
  uint64_t stride = 1, offset = 0;
  std::atomic<uint64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  LaunchResult fault;  // the first
  int helpers = 0;     // workers inside RunBlocks
  std::condition_variable helpers_done;

  uint64_t Linear(uint64_t i) const {
    return order.empty() ? static_cast<uint64_t>((offset + static_cast<unsigned __int128>(i) * stride) % blocks)
                         : order[i];
  }

  // Runs blocks until none is left or one faults.
  void RunBlocks() {
    const SharedWindow window = WindowOf(*kernel->module);
    LimitDynamic(window, config->dynamic_shared);
    const uint64_t gx = config->grid.x, gy = config->grid.y;
    for (uint64_t i = next.fetch_add(1); i < blocks && !failed.load(); i = next.fetch_add(1)) {
      const uint64_t linear = Linear(i);
      const uint3 idx{static_cast<unsigned>(linear % gx), static_cast<unsigned>((linear / gx) % gy),
                      static_cast<unsigned>(linear / (gx * gy))};
      PoisonWindow(window, config->dynamic_shared);
      BlockRun run(*kernel, *config, idx, Mix(seed, linear), window);
      const LaunchResult result = run.Run();
      if (result.fault != FaultKind::kNone) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!failed.exchange(true)) fault = result;
      }
    }
    UnpoisonDynamic(window);
  }
};

// Worker threads, started on first use; each waits for launches that have blocks left.
class WorkerPool {
 public:
  static WorkerPool& Get() {
    static WorkerPool* pool = new WorkerPool;  // workers never exit
    return *pool;
  }

  // Offers the launch to idle workers; they join until it runs out of blocks.
  void Offer(const std::shared_ptr<Launch>& launch) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      queue_.push_back(launch);
    }
    wake_.notify_all();
  }

  void Withdraw(const std::shared_ptr<Launch>& launch) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < queue_.size(); ++i) {
      if (queue_[i] == launch) queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }

  int workers() const { return static_cast<int>(threads_.size()); }

 private:
  WorkerPool() {
    for (int i = 1; i < GetSettings().threads; ++i) threads_.emplace_back([this] { Work(); });
  }

  void Work() {
    while (true) {
      std::shared_ptr<Launch> launch;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [this] { return !queue_.empty(); });
        launch = queue_.front();
        if (launch->next.load() >= launch->blocks || launch->failed.load()) {
          queue_.erase(queue_.begin());
          continue;
        }
      }
      {
        std::lock_guard<std::mutex> lock(launch->mutex);
        ++launch->helpers;
      }
      launch->RunBlocks();
      {
        std::lock_guard<std::mutex> lock(launch->mutex);
        --launch->helpers;
      }
      launch->helpers_done.notify_all();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::vector<std::shared_ptr<Launch>> queue_;
  std::vector<std::thread> threads_;
};

}  // namespace

// AddressSanitizer and (with GCC) UBSan are separate runtimes, each with its own death callbacks.
void InstallSanitizerHook() {
  if (__sanitizer_set_death_callback != nullptr) __sanitizer_set_death_callback(OnSanitizerDeath);
  if (void* ubsan = dlopen("libubsan.so.1", RTLD_LAZY | RTLD_NOLOAD)) {
    using SetCallback = void (*)(void (*)(void));
    if (auto set = reinterpret_cast<SetCallback>(dlsym(ubsan, "__sanitizer_set_death_callback"))) set(OnSanitizerDeath);
  }
}

ExecutorStats GetExecutorStats() {
  return {g_stats.launches.load(), g_stats.blocks.load(),      g_stats.threads.load(),    g_stats.resumes.load(),
          g_stats.barriers.load(), g_stats.collectives.load(), g_stats.nanoseconds.load()};
}

LaunchResult Execute(const Kernel& kernel, const LaunchConfig& config, uint64_t launch_seed) {
  const auto started = std::chrono::steady_clock::now();
  auto launch = std::make_shared<Launch>();
  launch->kernel = &kernel;
  launch->config = &config;
  launch->seed = launch_seed;
  launch->blocks = static_cast<uint64_t>(config.grid.x) * config.grid.y * config.grid.z;
  Rng order_rng(launch_seed);
  if (launch->blocks <= (1u << 24)) {
    launch->order.resize(launch->blocks);
    for (uint64_t i = 0; i < launch->blocks; ++i) launch->order[i] = static_cast<uint32_t>(i);
    order_rng.Shuffle(launch->order);
  } else {
    do {
      launch->stride = order_rng.Below(launch->blocks - 1) + 1;
    } while (std::gcd(launch->stride, launch->blocks) != 1);
    launch->offset = order_rng.Below(launch->blocks);
  }
  WorkerPool& pool = WorkerPool::Get();
  const bool shared = pool.workers() > 0 && launch->blocks > 1;
  if (shared) pool.Offer(launch);
  launch->RunBlocks();
  if (shared) {
    pool.Withdraw(launch);
    std::unique_lock<std::mutex> lock(launch->mutex);
    launch->helpers_done.wait(lock, [&] { return launch->helpers == 0; });
  }
  g_stats.launches.fetch_add(1, std::memory_order_relaxed);
  g_stats.nanoseconds.fetch_add(
      static_cast<uint64_t>(
          std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count()),
      std::memory_order_relaxed);
  return launch->fault;
}

}  // namespace specdec_sim

// ---------------------------------------------------------------------------------------------------------
// The interface of specdec_sim/device.h.
// ---------------------------------------------------------------------------------------------------------
using specdec_sim::CurrentRun;
using specdec_sim::tl_thread;

extern "C" {

__attribute__((visibility("default"))) int specdec_sim_barrier(int kind, int predicate, const char* file, int line) {
  return CurrentRun("__syncthreads")->Barrier(tl_thread, kind, predicate, file, line);
}

__attribute__((visibility("default"))) void specdec_sim_warp(specdec_sim_warp_op* op) {
  CurrentRun(specdec_sim::CollectiveName(op->kind))->Collective(tl_thread, op);
}

__attribute__((visibility("default"))) uint32_t specdec_sim_activemask(void) {
  return CurrentRun("__activemask")->ActiveMask(tl_thread);
}

__attribute__((visibility("default"))) uint32_t specdec_sim_shared_address(const void* generic, const char* file,
                                                                           int line) {
  return CurrentRun("__cvta_generic_to_shared")->SharedAddress(tl_thread, generic, file, line);
}

__attribute__((visibility("default"))) void specdec_sim_cp_async(uint32_t shared_address, const void* global,
                                                                 int cp_size, int src_size, const char* file,
                                                                 int line) {
  CurrentRun("cp.async")->CpAsync(tl_thread, shared_address, global, cp_size, src_size, file, line);
}

__attribute__((visibility("default"))) void specdec_sim_cp_async_commit(void) {
  CurrentRun("cp.async.commit_group");
  ++tl_thread->next_group;
}

__attribute__((visibility("default"))) void specdec_sim_cp_async_wait(int pending) {
  CurrentRun("cp.async.wait_group")->CpAsyncWait(tl_thread, pending);
}

__attribute__((visibility("default"))) void specdec_sim_trap(const char* what, const char* file, int line) {
  CurrentRun("trap")->Trap(tl_thread, specdec_sim::FaultKind::kIllegalInstruction, what, file, line);
}

}  // extern "C"
