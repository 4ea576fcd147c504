// Lossless rejection-sampling verification of chains and trees of drafted tokens (src/sampling/mod.rs has the
// semantics; src/cpu/sampling.rs is the reference these kernels must match).
//
// What it computes. Per request b a tree of T_b <= 64 nodes (a chain is the tree j -> j + 1); node 0 is the last
// accepted token. Walking from the root, a node either accepts one of its children (the next node) or emits a
// token and stops:
//   * point-mass nodes (no draft rows, or temperature 0): the node draws y from its target row (an exponential
//     race over the row with the node's Philox noise; temperature 0: the argmax); the first child holding y is
//     accepted, else y is emitted;
//   * nodes whose children were drawn i.i.d. from a draft row q: child j is accepted when u_j q(x_j) m_j < r_j(x_j)
//     (exact in f64), with r_0 = p and r_{j+1} = max(0, r_j / m_j - q), m_j = sum r_j (m_0 = 1); after the last
//     child, the emitted token is an exponential race over the final residual.
// Outputs: accepted count, emitted tokens, accepted node path and per-depth accept flags, -1 padded.
//
// Two launches for point-mass drafts, three with draft rows, four more with top-k and six with top-p. A block working
// on a row finds the row's request by a binary search over the offsets (RowOwner), accepted only if the row lies in
// that request's valid range; the walk flags a request any of whose rows does not map back to it.
//   1. SamplingThresholdKernel_<T> (only when top-k or top-p are given): up to ten passes, one launch each, over the
//      row kernel's grid (rows, vocabulary chunks), find each row's smallest kept z: the k-th largest logit by
//      radix selection over 32-bit order keys (4 passes of 8 bits), then the top-p cut by the same selection
//      weighted by softmax mass (a pass for the max, one for the sum, 4 for the cut). Blocks add their histograms
//      into the row's bins with integer atomics (masses in units of 2^-60) and the row's last block chooses the
//      bin, so the cut is the same on every run and in every batch; a pass that finds no bin keeps the cut refined
//      so far. Rows of requests that use neither filter return at once. Tokens with z below the threshold are
//      removed from every later step.
//   2. SamplingRowKernel_<T>: grid (target rows + draft rows, vocabulary chunks). Block (row, chunk) reads its
//      chunk once and writes three partials: the race key of the node's draw (target rows), the softmax
//      statistics (max, sum exp) of z = logit / temperature (when draft rows are given), and value flags (NaN,
//      +inf, overflow of logit / temperature, negative probability, any mass). The race key is a 64-bit max with
//      ties to the lowest index and the noise is indexed by token, so the split does not change any result. The
//      chunks have a fixed size (ROW_CHUNK, src/cuda/sampling.rs) and the walk merges their softmax statistics in
//      chunk order in f64 (MergeRowStats), so a request's tokens do not depend on its batch or the GPU.
//   3. RejectionWalkKernel_<T>: one block per request validates it (the rules of sampling::check_request and
//      check_row_values; a bad request gets accepted = -1, rows of -1 and its RequestStatusCode), merges the partials
//      of the nodes it visits in a fixed order and decides acceptances. Where a node with draft rows rejects all its
//      children, it leaves a residual job (node, level, softmax statistics, residual masses); for an i.i.d. node that
//      rejects two or more children, the block makes one pass over the row per rejection, stepping the residual it
//      keeps in the request's residual row (scratch, trees only) and summing its mass: O(V) per rejection.
//   4. ResidualRaceKernel_<T> (with draft rows): grid (requests, vocabulary splits); blocks of requests with a job
//      race over their chunk of max(0, r - q), and the last block of a request to finish (a ticket counter)
//      merges the partials and writes the emitted token. No request waits on one block walking its vocabulary.
//
// Napkin math (B = 64, k = 4, V = 128256, bf16, draft rows): target and draft logits are read once by launch 2,
// 64 x 9 rows x 256.5 KB = 148 MB: 44 us at 3.35 TB/s (H100). Launch 4 re-reads the two rows of the node where a
// request stops (mostly from L2). Per element: a Philox round per 4 tokens and two logarithms only for tokens
// whose key could still win (the race bound), so compute stays under the memory time. With top-k and top-p, launch
// 1 reads each row up to ten times: at this batch 1.5 GB, 440 us from HBM; in the small batches of a rollout's tail
// (B = 4: 36 rows, 9 MB) the rows stay in L2 (50 MB) after the first pass. Before the split one block per row made
// those ten passes at one SM's share of bandwidth (36 rows on 132 SMs).

#include "common.cuh"
#include "sampling_noise.cuh"

namespace specdec {

constexpr int kThresholdThreads = 256;
// The row kernel is memory-bound: __launch_bounds__(kRowThreads, 4) holds it to 64 registers (63 with nvcc 13.0
// at sm_90, no spills; CI fails on any spill), so four blocks (1024 threads) per SM keep loads in flight.
constexpr int kRowThreads = 256;
// The walk is launched with __launch_bounds__(kWalkThreads, 1): one block per request needs no occupancy, and with
// the thread count alone this nvcc held it to 64 registers and spilled (80 without spills).
constexpr int kWalkThreads = 256;
constexpr int kResidualThreads = 256;
constexpr int kMaxTreeNodes = 64;                  // tree::MAX_TREE_NODES: the root and 63 drafts
constexpr double kProbabilitySumTolerance = 1e-3;  // sampling::PROBABILITY_SUM_TOLERANCE
constexpr int32_t kRequestInvalid = -1;

// Row flags, OR-ed over a row's splits.
constexpr uint32_t kFlagBadValue = 1u;  // a NaN or +inf logit; a NaN, infinite or negative probability
constexpr uint32_t kFlagOverflow = 2u;  // a finite logit / temperature is infinite
constexpr uint32_t kFlagHasMass = 4u;   // a logit above -inf; a probability above 0

// Every argument of the four kernels, passed by value. build.rs generates the host's mirror from this definition
// (build_support/kernel_params.rs): one field per declaration, pointers and stdint scalars.
struct SamplingArgs {
  const void* target;  // [target_rows, V] of T (logits) or float (probabilities)
  const void* draft;   // [draft_rows, V], or null: point-mass drafts
  int64_t vocab_size;
  const int32_t* offsets;  // [B + 1]: draft offsets (chain) or node offsets (tree)
  int64_t num_requests;
  const int32_t* tokens;   // [num_tokens]: drafts (chain) or node tokens (tree)
  const int32_t* parents;  // [num_tokens] (tree); unused for chains
  int64_t num_tokens;
  int64_t is_tree;                 // 1: trees (offsets are node offsets); 0: chains. Explicit, since a batch of
                                   // empty trees has no parents to point at.
  const float* temperature;        // [B] for logits, null for probabilities
  const int32_t* top_k;            // [B] (-1 = off) or null
  const float* top_p;              // [B] (1 = off) or null
  const float* draft_temperature;  // [B] the drafter's, for the draft rows; null: the target's three
  const int32_t* draft_top_k;      // [B] or null (off); only with draft_temperature
  const float* draft_top_p;        // [B] or null (off); only with draft_temperature
  const uint64_t* seeds;           // [B]
  const uint64_t* steps;           // [B]
  int64_t emit_width;
  int32_t* accepted;                  // [B]
  int32_t* emitted;                   // [B, W]
  int32_t* nodes;                     // [B, W] or null
  int8_t* flags;                      // [B, W] or null
  int32_t* status;                    // [B] or null: each request's RequestStatusCode
  uint64_t* race;                     // scratch [target_rows, splits]
  float2* stats;                      // scratch [target_rows + draft_rows, splits]: (max z, sum exp(z - max))
  uint32_t* row_flags;                // scratch [target_rows + draft_rows, splits]
  struct ThresholdState* thresholds;  // scratch [target_rows + draft_rows]; null without top-k/top-p
  double* threshold_sums;             // scratch [target_rows + draft_rows, splits]: top-p's softmax sum per chunk
  struct ResidualJob* jobs;  // scratch [B] (with draft rows): the residual race a request left, node -1 for none
  uint32_t* tickets;         // scratch [B] (with draft rows): residual-race blocks of a request done so far
  uint64_t* residual_race;   // scratch [B, residual_splits]
  float* residual_rows;      // scratch [B, V] (trees with draft rows): the current residual of the request's node
  int64_t residual_chunk;    // vocabulary chunk per residual split, a multiple of 4
  int64_t residual_splits;
  int64_t target_rows;
  int64_t draft_rows;
  int64_t chunk;  // vocabulary chunk per split, a multiple of 4
  int64_t splits;
};
static_assert(sizeof(SamplingArgs) == 38 * 8, "the host mirrors this layout");

// What the walk leaves for the residual race of a request whose stopping node rejected all its children.
struct ResidualJob {
  int32_t node;                      // -1: no job
  int32_t level;                     // children rejected at the node
  float p_max, p_sum, q_max, q_sum;  // softmax statistics of the node's target and draft rows (logits)
  double mass[kMaxTreeNodes + 1];    // residual masses; mass[0] = 1
};
static_assert(sizeof(ResidualJob) == 24 + 8 * (kMaxTreeNodes + 1), "the host sizes the scratch from this");

__device__ __forceinline__ bool IsTree(const SamplingArgs& a) { return a.is_tree != 0; }

// Rows and nodes of request b, from offsets the caller has checked (0 <= first <= last <= num_tokens).
__device__ __forceinline__ int64_t TargetRowStart(const SamplingArgs& a, int64_t b) {
  return IsTree(a) ? a.offsets[b] : a.offsets[b] + b;
}
__device__ __forceinline__ int64_t NodeCount(const SamplingArgs& a, int64_t b) {
  return a.offsets[b + 1] - a.offsets[b] + (IsTree(a) ? 0 : 1);
}
__device__ __forceinline__ int64_t DraftRowCount(const SamplingArgs& a, int64_t b) {
  return a.offsets[b + 1] - a.offsets[b];  // chain: k rows (the last node has none); tree: T rows
}

// The offsets of request b are in range and give it 1..kMaxTreeNodes nodes; the first request starts at 0 and
// the last ends at num_tokens (check_packed_offsets).
__device__ __forceinline__ bool OffsetsAreValid(const SamplingArgs& a, int64_t b) {
  const int64_t first = a.offsets[b], last = a.offsets[b + 1];
  if (first < 0 || first > last || last > a.num_tokens) return false;
  if ((b == 0 && first != 0) || (b == a.num_requests - 1 && last != a.num_tokens)) return false;
  const int64_t nodes = last - first + (IsTree(a) ? 0 : 1);
  return nodes >= 1 && nodes <= kMaxTreeNodes;
}

// The request owning `row` (target rows, then draft rows), or -1: the last request whose rows start at or before
// it, if the row lies inside that request's valid range. With non-decreasing offsets (every request valid) this
// is the true owner; otherwise the search may miss a request, and the walk then flags that request. It reads
// only offsets[0..=B] and never trusts their values for anything but comparisons.
__device__ __forceinline__ int64_t RowOwner(const SamplingArgs& a, int64_t row) {
  const bool is_draft = row >= a.target_rows;
  const int64_t local = is_draft ? row - a.target_rows : row;
  const auto start = [&](int64_t b) { return is_draft ? static_cast<int64_t>(a.offsets[b]) : TargetRowStart(a, b); };
  int64_t lo = 0, hi = a.num_requests - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (start(mid) <= local) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  if (!OffsetsAreValid(a, lo)) return -1;
  const int64_t count = is_draft ? DraftRowCount(a, lo) : NodeCount(a, lo);
  return local >= start(lo) && local < start(lo) + count ? lo : -1;
}

// RowOwner of this block's row (blockIdx.x), computed once and shared with the block.
__device__ __forceinline__ int64_t BlockRowOwner(const SamplingArgs& a) {
  __shared__ int64_t owner;
  if (threadIdx.x == 0) owner = RowOwner(a, blockIdx.x);
  __syncthreads();
  return owner;
}

// Whether request b's draft rows (`is_draft`) take the drafter's own parameters rather than the target's.
__device__ __forceinline__ bool UsesDraftParams(const SamplingArgs& a, bool is_draft) {
  return is_draft && a.draft_temperature != nullptr;
}

// The temperature request b's target rows or draft rows are divided by (logits only).
__device__ __forceinline__ float RowTemperature(const SamplingArgs& a, int64_t b, bool is_draft) {
  return UsesDraftParams(a, is_draft) ? a.draft_temperature[b] : a.temperature[b];
}

// Request b's top-k (0 when off) and top-p (1 when off) for its target rows or draft rows; `ok` is false when
// either is malformed (the walk flags the request).
struct TopKTopP {
  bool ok;
  int64_t top_k;
  float top_p;
};

__device__ __forceinline__ TopKTopP RowTopKTopP(const SamplingArgs& a, int64_t b, bool is_draft) {
  const bool drafter = UsesDraftParams(a, is_draft);
  const int32_t* top_k = drafter ? a.draft_top_k : a.top_k;
  const float* top_p = drafter ? a.draft_top_p : a.top_p;
  TopKTopP r{true, 0, 1.0f};
  if (top_k != nullptr) {
    const int32_t k = top_k[b];
    r.ok = r.ok && (k == -1 || (k >= 1 && k <= a.vocab_size));
    r.top_k = k > 0 ? k : 0;
  }
  if (top_p != nullptr) {
    const float p = top_p[b];
    r.ok = r.ok && p > 0.0f && p <= 1.0f;
    r.top_p = r.ok ? p : 1.0f;
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------
// 1b. Top-k / top-p thresholds, split over the vocabulary.
// ---------------------------------------------------------------------------------------------------------
//
// One launch per pass, each over the row kernel's grid (rows, fixed vocabulary chunks). A pass that selects a bin
// adds its block's histogram into the row's global bins with integer atomics, and the row's last block (a ticket
// counter) chooses the bin. Counts and fixed-point masses add exactly, so the cut does not depend on the order the
// blocks land in, on the number of blocks, or on the batch. A row whose request uses neither filter returns at once.
//   passes 0-3: top-k, the k-th largest logit by radix selection over 32-bit order keys, 8 bits per pass;
//   pass 4:     top-p, the largest kept z (an integer max of order keys);
//   pass 5:     top-p, the sum of exp(z - max) over the kept tokens: f64 per chunk, merged in chunk order;
//   passes 6-9: top-p, radix selection weighted by softmax mass in units of 2^-60.
constexpr int kTopKFirstPass = 0;
constexpr int kTopPMaxPass = 4;
constexpr int kTopPSumPass = 5;
constexpr int kTopPFirstRadixPass = 6;
constexpr int kThresholdPasses = 10;  // SAMPLING_THRESHOLD_PASSES on the host

// Softmax masses of the top-p selection are counted in units of 2^-60 of the row's kept mass.
constexpr double kMassUnits = 0x1p60;

// What the passes of one row carry from launch to launch (scratch zeroed by the host before pass 0; all zeros is
// "no filter yet").
struct ThresholdState {
  unsigned long long bins[256];   // this pass's histogram over the row; its last block reads and zeroes it
  unsigned long long mass_above;  // top-p: kept mass of the values above the selected prefix, in units of 2^-60
  double z_sum;                   // top-p: sum of exp(z - z_max) over the kept tokens
  uint32_t prefix, mask;          // the high bits of the order key selected so far, and which bits those are
  uint32_t count_above;           // top-k: tokens above the selected prefix
  uint32_t ticket;                // blocks of this pass done so far
  uint32_t z_max_key;             // top-p: OrderedValueKey of the largest kept z; 0 before any
  int32_t top_p_stopped;          // top-p: a pass found no bin, or no mass is kept; the cut refined so far stands
  float top_k_threshold;          // keep z >= it, when has_top_k
  float threshold;                // keep z >= it (both filters), when has_threshold
  int32_t has_top_k, has_threshold;
};
static_assert(sizeof(ThresholdState) == 2104, "the host sizes the scratch from this (THRESHOLD_STATE_BYTES)");

// The smallest kept z of a row (target rows, then draft rows): -inf when no filter applies.
__device__ __forceinline__ float RowThresholdOf(const SamplingArgs& a, int64_t row) {
  if (a.thresholds == nullptr) return -INFINITY;
  const ThresholdState& s = a.thresholds[row];
  return s.has_threshold ? s.threshold : -INFINITY;
}

// The value whose OrderedValueKey is `key` (-0.0 comes back as +0.0, which compares equal).
__device__ __forceinline__ float FloatFromOrderedKey(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

template <int kThreads>
__device__ __forceinline__ float BlockMaxFloat(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xFFFFFFFFu, v, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) total = fmaxf(total, scratch[w]);
  __syncthreads();
  return total;
}

// A fixed-order sum: each thread's elements are fixed by the chunk alone (LoadFour's assignment, whatever the
// row's alignment), then the warps and the block reduce in a fixed order.
template <int kThreads>
__device__ __forceinline__ double BlockSumDouble(double v, double* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  double total = 0.0;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// Whether this block is the last of its row to finish the pass; every thread's global writes before the call are
// visible to that block. (The pattern of the residual race: fence, then take a ticket.)
__device__ __forceinline__ bool LastBlockOfRow(ThresholdState& s, int64_t splits) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(&s.ticket, 1u) == static_cast<uint32_t>(splits - 1);
  __syncthreads();
  if (last) __threadfence();
  return last;
}

template <typename T>
__device__ __forceinline__ void ThresholdPass(const SamplingArgs& a, int pass) {
  __shared__ unsigned long long bins[256];
  __shared__ float float_scratch[kThresholdThreads / 32];
  __shared__ double double_scratch[kThresholdThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t b = BlockRowOwner(a);
  if (b < 0) return;  // the walk flags the request
  const bool is_draft = row >= a.target_rows;
  const float t = RowTemperature(a, b, is_draft);
  const TopKTopP params = RowTopKTopP(a, b, is_draft);
  const int64_t vocab = a.vocab_size;
  const bool top_k_on = params.top_k > 0 && params.top_k < vocab;
  const bool top_p_on = params.top_p < 1.0f;
  ThresholdState& s = a.thresholds[row];
  const bool top_k_pass = pass < kTopPMaxPass;
  // Uniform across the row's blocks: the pass, the request's parameters, and state the previous launch left.
  if (pass < kTopKFirstPass || pass >= kThresholdPasses) return;
  if (!params.ok || !(isfinite(t) && t > 0.0f)) return;
  if (top_k_pass ? !top_k_on : (!top_p_on || s.top_p_stopped)) return;

  const T* values =
      static_cast<const T*>(is_draft ? a.draft : a.target) + (is_draft ? row - a.target_rows : row) * vocab;
  const int64_t begin = split * a.chunk;
  const int64_t end = begin + a.chunk < vocab ? begin + a.chunk : vocab;
  const auto for_each_value = [&](auto visit) {
    for (int64_t first = begin + 4 * static_cast<int64_t>(threadIdx.x); first < end; first += 4 * kThresholdThreads) {
      const int n = end - first < 4 ? static_cast<int>(end - first) : 4;
      float v[4];
      LoadFour(values, first, n, v);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (i < n) visit(v[i]);
      }
    }
  };
  // z = logit / t of a token top-k keeps (top-p's domain), else -inf. Division by t > 0 is monotone, so top-k
  // selects on the logits and divides only its result.
  const float kept_min = s.has_top_k ? s.top_k_threshold : -INFINITY;
  const auto kept_z = [=](float v) {
    const float z = (v != v) ? -INFINITY : __fdiv_rn(v, t);
    return z >= kept_min ? z : -INFINITY;
  };

  if (pass == kTopPMaxPass) {
    float local_max = -INFINITY;
    for_each_value([&](float v) { local_max = fmaxf(local_max, kept_z(v)); });
    const float block_max = BlockMaxFloat<kThresholdThreads>(local_max, float_scratch);
    if (threadIdx.x == 0 && block_max > -INFINITY) atomicMax(&s.z_max_key, OrderedValueKey(block_max));
    return;
  }

  const float z_max = s.z_max_key != 0u ? FloatFromOrderedKey(s.z_max_key) : -INFINITY;
  if (pass == kTopPSumPass) {
    double local_sum = 0.0;
    for_each_value([&](float v) {
      const float z = kept_z(v);
      if (z > -INFINITY) local_sum += static_cast<double>(expf(z - z_max));
    });
    const double block_sum = BlockSumDouble<kThresholdThreads>(local_sum, double_scratch);
    if (threadIdx.x == 0) a.threshold_sums[row * a.splits + split] = block_sum;
    if (LastBlockOfRow(s, a.splits) && threadIdx.x == 0) {
      double z_sum = 0.0;
      for (int64_t c = 0; c < a.splits; ++c) z_sum += __ldcg(&a.threshold_sums[row * a.splits + c]);
      s.z_sum = z_sum;
      s.top_p_stopped = z_sum > 0.0 ? 0 : 1;
      s.ticket = 0u;
    }
    return;
  }

  // A radix pass: among the tokens whose key matches the prefix so far, the weight (a count, or a mass in units
  // of 2^-60, truncated: a row's kept mass sums to at most 2^60) of each value of the 8 bits at `shift`.
  const int shift = 24 - 8 * (top_k_pass ? pass - kTopKFirstPass : pass - kTopPFirstRadixPass);
  const uint32_t prefix = s.prefix, mask = s.mask;
  // One division per row, not per token (a per-token f64 division is a call that made ptxas spill around it).
  // Multiplying by 2^60 / z_sum instead of dividing by z_sum moves a mass by at most an ulp: within rounding.
  const double units_per_exp = top_k_pass ? 0.0 : kMassUnits / s.z_sum;
  for (int i = threadIdx.x; i < 256; i += kThresholdThreads) bins[i] = 0ull;
  __syncthreads();
  for_each_value([&](float v) {
    const uint32_t key = OrderedValueKey(v);
    if ((key & mask) != prefix) return;
    unsigned long long weight = 1ull;
    if (!top_k_pass) {
      const float z = kept_z(v);
      weight =
          z > -INFINITY ? static_cast<unsigned long long>(static_cast<double>(expf(z - z_max)) * units_per_exp) : 0ull;
    }
    if (weight > 0ull) atomicAdd(&bins[(key >> shift) & 0xFFu], weight);
  });
  __syncthreads();
  for (int i = threadIdx.x; i < 256; i += kThresholdThreads) {
    if (bins[i] != 0ull) atomicAdd(&s.bins[i], bins[i]);
  }
  if (!LastBlockOfRow(s, a.splits)) return;

  // The last block: the highest bin at which the weight above it plus its own reaches the target.
  if (threadIdx.x == 0) {
    // top_p is a float: its 24 bits scale exactly. The target is at least one unit, so that an empty bin never
    // meets it (a top_p below 2^-60 keeps the most likely value).
    const unsigned long long scaled_top_p =
        static_cast<unsigned long long>(static_cast<double>(params.top_p) * kMassUnits);
    const unsigned long long target =
        top_k_pass ? static_cast<unsigned long long>(params.top_k) : (scaled_top_p > 0ull ? scaled_top_p : 1ull);
    unsigned long long carried = top_k_pass ? s.count_above : s.mass_above;
    int bin = 255;
    for (; bin >= 0; --bin) {
      const unsigned long long weight = __ldcg(&s.bins[bin]);
      if (carried + weight >= target) break;
      carried += weight;
    }
    if (bin >= 0) {
      s.prefix = prefix | (static_cast<uint32_t>(bin) << shift);
      s.mask = mask | (0xFFu << shift);
      if (top_k_pass) {
        s.count_above = static_cast<uint32_t>(carried);
      } else {
        s.mass_above = carried;
        // The cut refined so far: the lowest value of the chosen bin still holds the mass top_p needs.
        s.threshold = fmaxf(kept_min, __fdiv_rn(FloatFromOrderedKey(s.prefix), t));
        s.has_threshold = 1;
      }
    } else if (!top_k_pass) {
      // With exact sums a later pass always finds a bin; the first can miss only when truncation leaves the kept
      // mass short of top_p, and then top-p keeps everything top-k kept.
      s.top_p_stopped = 1;
    }
    if (top_k_pass && shift == 0) {
      // The k-th largest logit, as z; top-p starts its own selection from an empty prefix.
      s.top_k_threshold = __fdiv_rn(FloatFromOrderedKey(s.prefix), t);
      s.has_top_k = 1;
      s.threshold = s.top_k_threshold;
      s.has_threshold = 1;
      s.prefix = 0u;
      s.mask = 0u;
    }
    s.ticket = 0u;
  }
  __syncthreads();  // thread 0 has read the bins
  for (int i = threadIdx.x; i < 256; i += kThresholdThreads) s.bins[i] = 0ull;
}

// ---------------------------------------------------------------------------------------------------------
// 2. Row partials.
// ---------------------------------------------------------------------------------------------------------

// Online softmax statistics: the max of z and the sum of exp(z - max).
struct SoftmaxStats {
  float max = -INFINITY;
  float sum = 0.0f;

  __device__ __forceinline__ void Add(float z) {
    if (z == -INFINITY) return;
    if (z > max) {
      sum = sum * expf(max - z) + 1.0f;
      max = z;
    } else {
      sum += expf(z - max);
    }
  }
  __device__ __forceinline__ void Merge(float other_max, float other_sum) {
    if (other_max == -INFINITY) return;
    if (max == -INFINITY) {
      max = other_max;
      sum = other_sum;
    } else if (other_max > max) {
      sum = sum * expf(max - other_max) + other_sum;
      max = other_max;
    } else {
      sum += other_sum * expf(other_max - max);
    }
  }
};

// A row's softmax statistics from its per-chunk partials: the maximum, then sum_s sum_s * exp(max_s - max) in
// f64, in chunk order, rounded once. The chunks are a fixed size (ROW_CHUNK on the host), so the result depends on
// the row alone, never on the batch around it or the GPU's SM count (which decide only how many blocks run).
__device__ __forceinline__ void MergeRowStats(const float2* partials, int64_t count, float& max, float& sum) {
  float m = -INFINITY;
  for (int64_t i = 0; i < count; ++i) m = partials[i].x > m ? partials[i].x : m;
  double total = 0.0;
  if (m > -INFINITY) {
    for (int64_t i = 0; i < count; ++i) {
      if (partials[i].x > -INFINITY) {
        total += static_cast<double>(partials[i].y) * exp(static_cast<double>(partials[i].x) - static_cast<double>(m));
      }
    }
  }
  max = m;
  sum = static_cast<float>(total);
}

__device__ __forceinline__ SoftmaxStats WarpReduceStats(SoftmaxStats s) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float m = __shfl_xor_sync(0xFFFFFFFFu, s.max, offset);
    const float t = __shfl_xor_sync(0xFFFFFFFFu, s.sum, offset);
    s.Merge(m, t);
  }
  return s;
}

template <typename T>
__device__ __forceinline__ void RowPartials(const SamplingArgs& a) {
  __shared__ uint64_t key_scratch[kRowThreads / 32];
  __shared__ float2 stats_scratch[kRowThreads / 32];
  __shared__ uint32_t block_flags;
  const int64_t row = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t slot = row * a.splits + split;
  const bool is_draft = row >= a.target_rows;
  const int64_t b = BlockRowOwner(a);
  if (threadIdx.x == 0) block_flags = 0u;
  __syncthreads();

  const bool logits = a.temperature != nullptr;
  const float t = (b >= 0 && logits) ? RowTemperature(a, b, is_draft) : 1.0f;
  const bool temperature_ok = !logits || (isfinite(t) && t >= 0.0f);
  const float threshold = b >= 0 ? RowThresholdOf(a, row) : -INFINITY;
  uint64_t best = 0ull;
  float best_key = -INFINITY;
  SoftmaxStats stats;
  float mass = 0.0f;  // probabilities: this thread's share of the chunk's sum
  uint32_t flags = 0u;
  if (b >= 0 && temperature_ok) {
    const int64_t local_row = is_draft ? row - a.target_rows : row;
    const int64_t node = is_draft ? local_row - a.offsets[b] : local_row - TargetRowStart(a, b);
    const T* values = static_cast<const T*>(is_draft ? a.draft : a.target) + local_row * a.vocab_size;
    const RequestNoise noise{a.seeds[b], a.steps[b]};
    const bool greedy = logits && t == 0.0f;
    const bool race = !is_draft;
    const bool want_stats = logits && !greedy && a.draft != nullptr;
    const int64_t begin = split * a.chunk;
    const int64_t end = begin + a.chunk < a.vocab_size ? begin + a.chunk : a.vocab_size;
    for (int64_t first = begin + 4 * static_cast<int64_t>(threadIdx.x); first < end; first += 4 * kRowThreads) {
      const int n = end - first < 4 ? static_cast<int>(end - first) : 4;
      float v[4], z[4];
      bool may_win = false;
      LoadFour(values, first, n, v);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (i >= n) {
          z[i] = -INFINITY;
          continue;
        }
        if (logits) {
          if (v[i] != v[i] || v[i] == INFINITY) flags |= kFlagBadValue;
          if (v[i] > -INFINITY) flags |= kFlagHasMass;
          z[i] = (greedy || v[i] != v[i]) ? v[i] : __fdiv_rn(v[i], t);
          if (!greedy && isfinite(v[i]) && isinf(z[i])) flags |= kFlagOverflow;
          if (!greedy && z[i] < threshold) z[i] = -INFINITY;  // removed by top-k / top-p
          if (want_stats && isfinite(z[i])) stats.Add(z[i]);
        } else {
          if (!(isfinite(v[i]) && v[i] >= 0.0f)) flags |= kFlagBadValue;
          if (v[i] > 0.0f && isfinite(v[i])) {
            flags |= kFlagHasMass;
            mass += v[i];
          }
          z[i] = v[i];
        }
        if (race && !greedy) {
          // The race bound: a token whose key cannot exceed this thread's best (which has a lower index) is
          // skipped without drawing its noise, as the CPU reference does.
          const double ceiling =
              logits ? (z[i] > -INFINITY ? static_cast<double>(z[i]) + kMaxGumbel : -INFINITY)
                     : (z[i] > 0.0f && isfinite(z[i]) ? static_cast<double>(z[i]) / kMinExponential : -INFINITY);
          may_win = may_win || (ceiling > -INFINITY && ceiling >= static_cast<double>(best_key));
        }
      }
      if (race && greedy) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (i < n) {
            const uint64_t key = ArgmaxKey(v[i], static_cast<uint32_t>(first + i));
            best = key > best ? key : best;
          }
        }
      } else if (race && may_win) {
        const Philox4 block = noise.Block(kNoiseToken, static_cast<uint32_t>(node), static_cast<uint32_t>(first));
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const bool candidate =
              logits ? (i < n && z[i] > -INFINITY && z[i] == z[i]) : (i < n && z[i] > 0.0f && isfinite(z[i]));
          if (!candidate) continue;
          const float e = ExponentialOfDraw(PhiloxWord(block, i), noise, static_cast<uint32_t>(node),
                                            static_cast<uint32_t>(first + i));
          const float key = logits ? __fsub_rn(z[i], DeterministicLn(e)) : __fdiv_rn(z[i], e);
          const uint64_t packed = ArgmaxKey(key, static_cast<uint32_t>(first + i));
          if (packed > best) {
            best = packed;
            best_key = key;
          }
        }
      }
    }
  }
  if (flags != 0u) atomicOr(&block_flags, flags);
  best = BlockReduceMax<kRowThreads>(best, key_scratch);  // its barriers also publish block_flags

  // Probabilities: the chunk's mass, as statistics of max 0 (merging those adds their sums), which the walk
  // checks against 1 (kProbabilitySumTolerance).
  if (!logits && mass > 0.0f) {
    stats.max = 0.0f;
    stats.sum = mass;
  }
  stats = WarpReduceStats(stats);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) stats_scratch[warp] = make_float2(stats.max, stats.sum);
  __syncthreads();
  if (threadIdx.x == 0) {
    SoftmaxStats total;
    for (int w = 0; w < kRowThreads / 32; ++w) total.Merge(stats_scratch[w].x, stats_scratch[w].y);
    if (!is_draft) a.race[slot] = best;
    a.stats[slot] = make_float2(total.max, total.sum);
    a.row_flags[slot] = block_flags;
  }
}

// ---------------------------------------------------------------------------------------------------------
// 3. The walk.
// ---------------------------------------------------------------------------------------------------------

// Everything the walk of one request shares across its block.
struct WalkState {
  int32_t token[kMaxTreeNodes];
  int32_t parent[kMaxTreeNodes];
  int32_t path[kMaxTreeNodes];
  uint8_t has_children[kMaxTreeNodes];
  int32_t kids[kMaxTreeNodes];
  double mass[kMaxTreeNodes + 1];  // mass[l] of residual level l at the current node; mass[0] = 1
  int32_t nodes;
  int32_t status;  // RequestStatusCode of the request's own rules (RequestStatus)
  int32_t node;
  int32_t num_kids;
  int32_t accepted_kid;  // -1 while none
  int32_t path_length;
  int32_t final_token;
  int32_t final_flag;
  int32_t done;
  float p_max, p_sum, q_max, q_sum;
};

// The first of the request's own rules it breaks, by thread 0, in the order of sampling::check_request: offsets,
// node by node its parent and token, depth against the output width, sampling parameters.
__device__ __forceinline__ int CheckRequest(const SamplingArgs& a, int64_t b, WalkState& s) {
  if (!OffsetsAreValid(a, b)) return kRequestOffsets;
  const int64_t first = a.offsets[b];
  s.nodes = static_cast<int32_t>(NodeCount(a, b));
  int32_t depth[kMaxTreeNodes];
  int32_t max_depth = 0;
  for (int i = 0; i < s.nodes; ++i) {
    int32_t parent, token;
    if (IsTree(a)) {
      parent = a.parents[first + i];
      token = i == 0 ? -1 : a.tokens[first + i];
    } else {
      parent = i - 1;
      token = i == 0 ? -1 : a.tokens[first + i - 1];
    }
    if (i == 0 ? parent != -1 : (parent < 0 || parent >= i)) return kRequestParents;
    if (i > 0 && (token < 0 || token >= a.vocab_size)) return kRequestDraftToken;
    s.parent[i] = parent;
    s.token[i] = token;
    s.has_children[i] = 0;
    depth[i] = i == 0 ? 0 : depth[parent] + 1;
    max_depth = depth[i] > max_depth ? depth[i] : max_depth;
  }
  for (int i = 1; i < s.nodes; ++i) s.has_children[s.parent[i]] = 1;
  if (max_depth + 1 > a.emit_width) return kRequestEmitWidth;
  bool greedy = false;
  if (a.temperature != nullptr) {
    const float t = a.temperature[b];
    if (!(isfinite(t) && t >= 0.0f)) return kRequestSamplingParams;
    greedy = t == 0.0f;
  }
  // At temperature 0 the draft rows and the drafter's parameters are not read, so they are not checked.
  if (!greedy && UsesDraftParams(a, a.draft != nullptr)) {
    // A drafter at temperature 0 drafts point masses (no draft rows), so its temperature must be positive.
    const float tq = a.draft_temperature[b];
    if (!(isfinite(tq) && tq > 0.0f) || !RowTopKTopP(a, b, true).ok) return kRequestSamplingParams;
  }
  return RowTopKTopP(a, b, false).ok ? kRequestOk : kRequestSamplingParams;
}

// The rows of request b that the walk may read: owned by it (RowOwner; else kRequestOffsets, as another
// request's broken offsets claim them), then their values acceptable (check_row_values; else kRequestRowValues).
// A draft row is read only by a node with children, and never by a point-mass walk.
__device__ __forceinline__ int RowsStatus(const SamplingArgs& a, int64_t b, const WalkState& s, bool point_mass) {
  const int64_t target_start = TargetRowStart(a, b);
  const int64_t draft_rows = point_mass ? 0 : DraftRowCount(a, b);
  bool bad_owner = false;
  bool bad = false;
  for (int64_t item = threadIdx.x; item < (s.nodes + draft_rows) * a.splits; item += kWalkThreads) {
    const int64_t r = item / a.splits;
    const bool is_draft = r >= s.nodes;
    const int64_t node = is_draft ? r - s.nodes : r;
    if (is_draft && !s.has_children[node]) continue;
    const int64_t row = is_draft ? a.target_rows + a.offsets[b] + node : target_start + node;
    bad_owner = bad_owner || RowOwner(a, row) != b;
    const uint32_t flags = a.row_flags[row * a.splits + item % a.splits];
    bad = bad || (flags & (kFlagBadValue | kFlagOverflow)) != 0u;
  }
  // A row read as a distribution needs mass somewhere in it: every target row, and the draft row of a node
  // with children.
  for (int64_t r = threadIdx.x; r < s.nodes + draft_rows; r += kWalkThreads) {
    const bool is_draft = r >= s.nodes;
    const int64_t node = is_draft ? r - s.nodes : r;
    if (is_draft && !s.has_children[node]) continue;
    const int64_t row = is_draft ? a.target_rows + a.offsets[b] + node : target_start + node;
    uint32_t any = 0u;
    double mass = 0.0;
    for (int64_t split = 0; split < a.splits; ++split) {
      any |= a.row_flags[row * a.splits + split];
      mass += static_cast<double>(a.stats[row * a.splits + split].y);
    }
    bad = bad || (any & kFlagHasMass) == 0u;
    // Probabilities read as a distribution sum to 1 (check_row_values); the row kernel left each chunk's mass.
    bad = bad || (a.temperature == nullptr && fabs(mass - 1.0) > kProbabilitySumTolerance);
  }
  if (__syncthreads_or(bad_owner)) return kRequestOffsets;
  return __syncthreads_or(bad) ? kRequestRowValues : kRequestOk;
}

// The node's probability of token x under a row: softmax of logit / temperature, or the probability as given.
// `threshold_row` indexes a.thresholds (target rows, then draft rows).
template <typename T>
__device__ __forceinline__ float Probability(const SamplingArgs& a, const void* rows, int64_t row, int64_t x, float t,
                                             float max, float sum, int64_t threshold_row) {
  if (a.temperature == nullptr) return static_cast<const float*>(rows)[row * a.vocab_size + x];
  const float z = __fdiv_rn(ToFloat(static_cast<const T*>(rows)[row * a.vocab_size + x]), t);
  const float threshold = RowThresholdOf(a, threshold_row);
  return (z == -INFINITY || z < threshold) ? 0.0f : __fdiv_rn(expf(z - max), sum);
}

// Each drafted token has probability under the draft row of its parent (check_drafted_token): a token whose q is
// 0 cannot have been drawn from q. Read only where draft rows are (a point-mass walk ignores them).
template <typename T>
__device__ __forceinline__ bool DraftedTokensHaveMass(const SamplingArgs& a, int64_t b, const WalkState& s, float tq) {
  bool bad = false;
  for (int i = 1 + threadIdx.x; i < s.nodes; i += kWalkThreads) {
    const int64_t draft_row = a.offsets[b] + s.parent[i];
    float q_max, q_sum;
    MergeRowStats(a.stats + (a.target_rows + draft_row) * a.splits, a.splits, q_max, q_sum);
    const float q = Probability<T>(a, a.draft, draft_row, s.token[i], tq, q_max, q_sum, a.target_rows + draft_row);
    bad = bad || !(q > 0.0f);
  }
  return !__syncthreads_or(bad);
}

// One rejection's step of the residual at a node: r_{l+1}(x) = max(0, r_l(x) / m_l - q(x)), with m_l = `mass`
// (m_0 = 1 divides nothing), r_0 = p. The walk carries r_l in the request's residual row, so each rejection costs
// one pass over the vocabulary, O(V), not a replay of every earlier step for every token (O(l V)).
__device__ __forceinline__ float ResidualStep(float r, float q, double mass) {
  const float scale = static_cast<float>(mass);
  const float base = scale == 1.0f ? r : __fdiv_rn(r, scale);
  const float next = __fsub_rn(base, q);
  return next > 0.0f ? next : 0.0f;
}

template <typename T>
__device__ __forceinline__ void Walk(const SamplingArgs& a) {
  __shared__ WalkState s;
  __shared__ double sum_scratch[kWalkThreads / 32];
  const int64_t b = blockIdx.x;
  const int64_t width = a.emit_width;
  int32_t* emitted = a.emitted + b * width;

  if (threadIdx.x == 0) {
    s.status = CheckRequest(a, b, s);
    if (a.jobs != nullptr) {
      a.jobs[b].node = -1;
      a.tickets[b] = 0u;
    }
  }
  __syncthreads();
  const float t = a.temperature != nullptr ? a.temperature[b] : 1.0f;
  const float tq = a.temperature != nullptr ? RowTemperature(a, b, true) : 1.0f;
  const bool point_mass = a.draft == nullptr || (a.temperature != nullptr && t == 0.0f);
  int status = s.status;
  if (status == kRequestOk) status = RowsStatus(a, b, s, point_mass);
  if (status == kRequestOk && !point_mass && !DraftedTokensHaveMass<T>(a, b, s, tq)) status = kRequestDraftedTokenMass;
  if (threadIdx.x == 0 && a.status != nullptr) a.status[b] = status;
  if (status != kRequestOk) {
    for (int64_t j = threadIdx.x; j < width; j += kWalkThreads) {
      emitted[j] = kRequestInvalid;
      if (a.nodes != nullptr) a.nodes[b * width + j] = kRequestInvalid;
      if (a.flags != nullptr) a.flags[b * width + j] = -1;
    }
    if (threadIdx.x == 0) a.accepted[b] = kRequestInvalid;
    return;
  }

  const int64_t target_start = TargetRowStart(a, b);
  const RequestNoise noise{a.seeds[b], a.steps[b]};
  if (threadIdx.x == 0) {
    s.node = 0;
    s.path_length = 0;
    s.done = 0;
  }
  __syncthreads();

  while (!s.done) {
    const int node = s.node;
    const int64_t target_row = target_start + node;
    if (threadIdx.x == 0) {
      s.num_kids = 0;
      for (int i = node + 1; i < s.nodes; ++i) {
        if (s.parent[i] == node) s.kids[s.num_kids++] = i;
      }
      s.accepted_kid = -1;
    }
    __syncthreads();

    if (point_mass || s.num_kids == 0) {
      if (threadIdx.x == 0) {
        uint64_t best = 0ull;
        for (int64_t split = 0; split < a.splits; ++split) {
          const uint64_t key = a.race[target_row * a.splits + split];
          best = key > best ? key : best;
        }
        const int32_t y = static_cast<int32_t>(ArgmaxKeyIndex(best));
        for (int j = 0; j < s.num_kids && s.accepted_kid < 0; ++j) {
          if (s.token[s.kids[j]] == y) s.accepted_kid = s.kids[j];
        }
        if (s.accepted_kid < 0) {
          s.final_token = y;
          s.final_flag = s.num_kids > 0 ? 0 : -1;
        }
      }
      __syncthreads();
    } else {
      const int64_t draft_row = a.offsets[b] + node;
      if (threadIdx.x == 0) {
        const float2* ps = a.stats + target_row * a.splits;
        const float2* qs = a.stats + (a.target_rows + draft_row) * a.splits;
        MergeRowStats(ps, a.splits, s.p_max, s.p_sum);
        MergeRowStats(qs, a.splits, s.q_max, s.q_sum);
        s.mass[0] = 1.0;
      }
      __syncthreads();
      int level = 0;
      for (int j = 0; j < s.num_kids; ++j) {
        if (threadIdx.x == 0) {
          const int64_t x = s.token[s.kids[j]];
          const float px = Probability<T>(a, a.target, target_row, x, t, s.p_max, s.p_sum, target_row);
          const float qx = Probability<T>(a, a.draft, draft_row, x, tq, s.q_max, s.q_sum, a.target_rows + draft_row);
          const float rx = level == 0 ? px : a.residual_rows[b * a.vocab_size + x];
          const float u =
              UniformFromBits(noise.Bits(kNoiseCoin, static_cast<uint32_t>(node), static_cast<uint32_t>(j)));
          const double lhs = __dmul_rn(__dmul_rn(static_cast<double>(u), static_cast<double>(qx)), s.mass[level]);
          if (lhs < static_cast<double>(rx)) s.accepted_kid = s.kids[j];
        }
        __syncthreads();
        if (s.accepted_kid >= 0) break;
        ++level;
        if (j + 1 < s.num_kids) {
          // The next child is tested against the next residual: one pass steps the row to it (kept in the
          // request's residual row) and sums its mass.
          float* const residual = a.residual_rows + b * a.vocab_size;
          const double previous_mass = s.mass[level - 1];
          double sum = 0.0;
          for (int64_t x = threadIdx.x; x < a.vocab_size; x += kWalkThreads) {
            const float previous =
                level == 1 ? Probability<T>(a, a.target, target_row, x, t, s.p_max, s.p_sum, target_row) : residual[x];
            const float qx = Probability<T>(a, a.draft, draft_row, x, tq, s.q_max, s.q_sum, a.target_rows + draft_row);
            const float rx = ResidualStep(previous, qx, previous_mass);
            residual[x] = rx;
            sum += static_cast<double>(rx);
          }
#pragma unroll
          for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
          if (threadIdx.x % 32 == 0) sum_scratch[threadIdx.x / 32] = sum;
          __syncthreads();
          if (threadIdx.x == 0) {
            double total = 0.0;
            for (int w = 0; w < kWalkThreads / 32; ++w) total += sum_scratch[w];
            s.mass[level] = total;
          }
          __syncthreads();
        }
      }
      if (s.accepted_kid < 0) {
        // Every child rejected: the emitted token is a race over the final residual, split across blocks by
        // launch 4, which overwrites the placeholder written here.
        if (threadIdx.x == 0) {
          ResidualJob& job = a.jobs[b];
          job.node = node;
          job.level = level;
          job.p_max = s.p_max;
          job.p_sum = s.p_sum;
          job.q_max = s.q_max;
          job.q_sum = s.q_sum;
          for (int l = 0; l < level; ++l) job.mass[l] = s.mass[l];
          s.final_token = -1;
          s.final_flag = 0;
        }
        __syncthreads();
      }
    }

    if (threadIdx.x == 0) {
      if (s.accepted_kid >= 0) {
        s.path[s.path_length++] = s.accepted_kid;
        s.node = s.accepted_kid;
      } else {
        s.done = 1;
      }
    }
    __syncthreads();
  }

  const int n = s.path_length;
  for (int64_t j = threadIdx.x; j < width; j += kWalkThreads) {
    emitted[j] = j < n ? s.token[s.path[j]] : j == n ? s.final_token : -1;
    if (a.nodes != nullptr) a.nodes[b * width + j] = j < n ? s.path[j] : -1;
    if (a.flags != nullptr) a.flags[b * width + j] = static_cast<int8_t>(j < n ? 1 : j == n ? s.final_flag : -1);
  }
  if (threadIdx.x == 0) a.accepted[b] = n;
}

// ---------------------------------------------------------------------------------------------------------
// 4. The residual race.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void ResidualRace(const SamplingArgs& a) {
  __shared__ uint64_t key_scratch[kResidualThreads / 32];
  __shared__ double mass[kMaxTreeNodes + 1];
  __shared__ int last;
  const int64_t b = blockIdx.x;
  const int64_t split = blockIdx.y;
  const ResidualJob& job = a.jobs[b];
  const int node = job.node;  // the same for the whole block
  if (node < 0) return;
  const int level = job.level;
  for (int l = threadIdx.x; l < level; l += kResidualThreads) mass[l] = job.mass[l];
  __syncthreads();
  const int64_t target_row = TargetRowStart(a, b) + node;
  const int64_t draft_row = a.offsets[b] + node;
  const float t = a.temperature != nullptr ? a.temperature[b] : 1.0f;
  const float tq = a.temperature != nullptr ? RowTemperature(a, b, true) : 1.0f;
  const RequestNoise noise{a.seeds[b], a.steps[b]};
  const int64_t begin = split * a.residual_chunk;
  const int64_t end = begin + a.residual_chunk < a.vocab_size ? begin + a.residual_chunk : a.vocab_size;
  uint64_t best = 0ull;
  for (int64_t first = begin + 4 * static_cast<int64_t>(threadIdx.x); first < end; first += 4 * kResidualThreads) {
    const Philox4 block = noise.Block(kNoiseToken, static_cast<uint32_t>(node), static_cast<uint32_t>(first));
    for (int i = 0; i < 4 && first + i < end; ++i) {
      const int64_t x = first + i;
      // The final residual r_level, one step from the walk's r_{level - 1} (p when the node rejected one child).
      const float previous = level == 1
                                 ? Probability<T>(a, a.target, target_row, x, t, job.p_max, job.p_sum, target_row)
                                 : a.residual_rows[b * a.vocab_size + x];  // trees only
      const float qx = Probability<T>(a, a.draft, draft_row, x, tq, job.q_max, job.q_sum, a.target_rows + draft_row);
      const float rx = ResidualStep(previous, qx, mass[level - 1]);
      if (rx > 0.0f) {
        const float e =
            ExponentialOfDraw(PhiloxWord(block, i), noise, static_cast<uint32_t>(node), static_cast<uint32_t>(x));
        const uint64_t key = ArgmaxKey(__fdiv_rn(rx, e), static_cast<uint32_t>(x));
        best = key > best ? key : best;
      }
    }
  }
  best = BlockReduceMax<kResidualThreads>(best, key_scratch);
  if (threadIdx.x == 0) {
    a.residual_race[b * a.residual_splits + split] = best;
    __threadfence();  // the partial is visible before the ticket says so
    last = atomicAdd(&a.tickets[b], 1u) == static_cast<uint32_t>(a.residual_splits - 1);
  }
  __syncthreads();
  if (last && threadIdx.x == 0) {
    __threadfence();
    uint64_t total = 0ull;
    for (int64_t s = 0; s < a.residual_splits; ++s) {
      const uint64_t key = __ldcg(&a.residual_race[b * a.residual_splits + s]);
      total = key > total ? key : total;
    }
    if (total == 0ull) {
      // No residual mass (reachable only through rounding): the node's draw from p.
      for (int64_t s = 0; s < a.splits; ++s) {
        const uint64_t key = a.race[target_row * a.splits + s];
        total = key > total ? key : total;
      }
    }
    a.emitted[b * a.emit_width + a.accepted[b]] = static_cast<int32_t>(ArgmaxKeyIndex(total));
  }
}

}  // namespace specdec

// Unmangled entry points, looked up by name from the Rust launcher (src/cuda/sampling.rs).
#define SPECDEC_SAMPLING_KERNELS(suffix, T)                                 \
  extern "C" __global__ void __launch_bounds__(specdec::kThresholdThreads)  \
      SamplingThresholdKernel_##suffix(specdec::SamplingArgs a, int pass) { \
    specdec::ThresholdPass<T>(a, pass);                                     \
  }                                                                         \
  extern "C" __global__ void __launch_bounds__(specdec::kRowThreads, 4)     \
      SamplingRowKernel_##suffix(specdec::SamplingArgs a) {                 \
    specdec::RowPartials<T>(a);                                             \
  }                                                                         \
  extern "C" __global__ void __launch_bounds__(specdec::kWalkThreads, 1)    \
      RejectionWalkKernel_##suffix(specdec::SamplingArgs a) {               \
    specdec::Walk<T>(a);                                                    \
  }                                                                         \
  extern "C" __global__ void __launch_bounds__(specdec::kResidualThreads)   \
      ResidualRaceKernel_##suffix(specdec::SamplingArgs a) {                \
    specdec::ResidualRace<T>(a);                                            \
  }                                                                         \
  SPECDEC_SIM_ENTRY(SamplingThresholdKernel_##suffix)                       \
  SPECDEC_SIM_ENTRY(SamplingRowKernel_##suffix)                             \
  SPECDEC_SIM_ENTRY(RejectionWalkKernel_##suffix)                           \
  SPECDEC_SIM_ENTRY(ResidualRaceKernel_##suffix)
SPECDEC_SAMPLING_KERNELS(f32, float)
SPECDEC_SAMPLING_KERNELS(f16, __half)
SPECDEC_SAMPLING_KERNELS(bf16, __nv_bfloat16)
