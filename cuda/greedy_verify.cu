// Greedy verification (temperature 0) of a batch of drafted token chains.
//
// What it computes. Request b drafted k_b tokens d_b[0..k_b) (k_b = offsets[b+1] - offsets[b], ragged, 0
// allowed). The target model scored k_b + 1 positions: rows offsets[b] + b + j, j = 0..k_b, of a logits tensor
// [sum_b (k_b + 1), V]. Let a_j be the argmax of row j (ties to the lowest index).
// The request accepts the longest prefix with d_b[j] == a_j, n_b drafts, and emits n_b + 1 tokens:
// a_0 .. a_{n_b} (the accepted drafts, then the correction at the first mismatch, or the bonus token after
// all k_b). Outputs: accepted[b] = n_b, emitted[b, 0..W) = those tokens then -1 padding.
//
// Per-request validation, in this order (the CPU backend applies the same rules, src/greedy.rs): offsets[b] <=
// offsets[b+1], both in [0, num_draft_tokens], offsets[0] = 0 and offsets[B] = num_draft_tokens (checked with
// the first and the last request); every draft id in [0, V); k_b + 1 <= W; each of the k_b + 1 rows free of
// NaN and +inf with a finite logit (its maximum, in the argmax order where NaN is above +inf, is finite). A
// request that breaks a rule gets accepted[b] = -1, a row of -1 and, when request_status is given, the rule's
// code there; no memory outside the documented arrays is read or written either way, whatever the offsets say.
//
// Two launches:
//   1. GreedyRowArgmaxKernel: grid (rows, splits). Block (r, s) reduces a 64-bit argmax key over one vocabulary
//      chunk of row r into partials[r * splits + s]. Splitting the vocabulary keeps small batches from waiting
//      on one block walking a whole row; the key max is associative, so results do not depend on the split.
//   2. GreedyAcceptKernel: one warp per request reduces the partials of its rows in order, stops at the first
//      mismatch, and writes the outputs.
//
// Napkin math (B = 64, k = 4, V = 128256, bf16): the logits are read once, 320 rows x 256.5 KB = 82 MB; that is
// 17 us at H200's 4.8 TB/s and 24.5 us at H100's 3.35 TB/s. Partials and outputs are a few KB. Arithmetic is a
// compare per element: memory-bound by a factor of ~100.

#include "common.cuh"

namespace specdec {

constexpr int kArgmaxThreads = 256;
constexpr int kAcceptThreads = 256;
constexpr int kRequestInvalid = -1;
// Argmax-order keys of +inf and -inf: a row's maximum key at or above the first (NaN or +inf) or at the second
// (every element -inf) makes the row unusable.
constexpr uint32_t kPositiveInfinityKey = 0xFF800000u;
constexpr uint32_t kNegativeInfinityKey = 0x007FFFFFu;

template <typename T>
__device__ __forceinline__ void GreedyRowArgmax(const T* __restrict__ logits, int64_t vocab_size, int64_t chunk,
                                                uint64_t* __restrict__ partials) {
  __shared__ uint64_t scratch[kArgmaxThreads / 32];
  const int64_t row = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t begin = split * chunk;
  const int64_t end = begin + chunk < vocab_size ? begin + chunk : vocab_size;
  const T* row_logits = logits + row * vocab_size;

  uint64_t best = 0ull;
  ForEachInRange<T, kArgmaxThreads>(row_logits, begin, end, [&](float x, int64_t i) {
    const uint64_t key = ArgmaxKey(x, static_cast<uint32_t>(i));
    best = key > best ? key : best;
  });
  best = BlockReduceMax<kArgmaxThreads>(best, scratch);
  if (threadIdx.x == 0) partials[row * gridDim.y + split] = best;
}

// The first rule request b's offsets, draft ids and width break, or kRequestOk. Evaluated by every lane of the
// request's warp.
__device__ __forceinline__ int GreedyRequestStatus(const int32_t* __restrict__ draft_offsets,
                                                   const int32_t* __restrict__ draft_tokens, int64_t b,
                                                   int64_t num_requests, int64_t num_draft_tokens, int64_t vocab_size,
                                                   int64_t emit_width) {
  const int64_t first = draft_offsets[b];
  const int64_t last = draft_offsets[b + 1];
  if (first < 0 || first > last || last > num_draft_tokens) return kRequestOffsets;
  if ((b == 0 && first != 0) || (b == num_requests - 1 && last != num_draft_tokens)) return kRequestOffsets;
  bool ok = true;
  for (int64_t j = first + threadIdx.x % 32; j < last; j += 32) {
    const int32_t token = draft_tokens[j];
    ok = ok && token >= 0 && token < vocab_size;
  }
  if (!__all_sync(0xFFFFFFFFu, ok)) return kRequestDraftToken;
  return last - first + 1 > emit_width ? kRequestEmitWidth : kRequestOk;
}

// The request whose logits rows hold row r: the last request whose rows start (draft_offsets[b] + b) at or before
// it, accepted only if its offsets are valid and r lies in its rows; -1 else. When a request's offsets are broken,
// two others may claim one row: the search gives it to one at most (GreedyShape::row_owner; the sampler's RowOwner).
__device__ __forceinline__ int64_t GreedyRowOwner(const int32_t* __restrict__ draft_offsets, int64_t num_requests,
                                                  int64_t num_draft_tokens, int64_t r) {
  if (num_requests <= 0) return -1;
  int64_t lo = 0, hi = num_requests - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (static_cast<int64_t>(draft_offsets[mid]) + mid <= r) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int64_t first = draft_offsets[lo];
  const int64_t last = draft_offsets[lo + 1];
  if (first < 0 || first > last || last > num_draft_tokens) return -1;
  if ((lo == 0 && first != 0) || (lo == num_requests - 1 && last != num_draft_tokens)) return -1;
  return r >= first + lo && r <= last + lo ? lo : -1;
}

// Row r's argmax key, the max of its partials, on every lane of the warp.
__device__ __forceinline__ uint64_t RowArgmaxKey(const uint64_t* __restrict__ partials, int32_t splits, int64_t r) {
  const uint64_t* row_partials = partials + r * splits;
  uint64_t best = 0ull;
  for (int s = threadIdx.x % 32; s < splits; s += 32) best = row_partials[s] > best ? row_partials[s] : best;
  return WarpReduceMax(best);
}

__device__ __forceinline__ void GreedyAccept(const int32_t* __restrict__ draft_offsets,
                                             const int32_t* __restrict__ draft_tokens,
                                             const uint64_t* __restrict__ partials, int32_t splits,
                                             int64_t num_requests, int64_t num_draft_tokens, int64_t vocab_size,
                                             int64_t emit_width, int32_t* __restrict__ accepted_counts,
                                             int32_t* __restrict__ emitted_tokens,
                                             int32_t* __restrict__ request_status) {
  const int64_t b = (static_cast<int64_t>(blockIdx.x) * kAcceptThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (b >= num_requests) return;  // whole warps exit together
  int32_t* emitted = emitted_tokens + b * emit_width;

  int status =
      GreedyRequestStatus(draft_offsets, draft_tokens, b, num_requests, num_draft_tokens, vocab_size, emit_width);
  const int64_t first_draft = status == kRequestOk ? draft_offsets[b] : 0;
  const int64_t num_drafts = status == kRequestOk ? draft_offsets[b + 1] - first_draft : 0;
  const int64_t first_row = first_draft + b;
  // Its rows are its own (not claimed through another request's broken offsets), then every row's values are
  // checked, not only those up to the first mismatch: the sampler's order and rules.
  bool foreign = false;
  for (int64_t j = lane; status == kRequestOk && j <= num_drafts; j += 32) {
    foreign = foreign || GreedyRowOwner(draft_offsets, num_requests, num_draft_tokens, first_row + j) != b;
  }
  if (__any_sync(0xFFFFFFFFu, foreign)) status = kRequestOffsets;
  for (int64_t j = 0; status == kRequestOk && j <= num_drafts; ++j) {
    const uint32_t max_key = static_cast<uint32_t>(RowArgmaxKey(partials, splits, first_row + j) >> 32);
    if (max_key >= kPositiveInfinityKey || max_key == kNegativeInfinityKey) status = kRequestRowValues;
  }
  if (lane == 0 && request_status != nullptr) request_status[b] = status;
  if (status != kRequestOk) {
    for (int64_t j = lane; j < emit_width; j += 32) emitted[j] = kRequestInvalid;
    if (lane == 0) accepted_counts[b] = kRequestInvalid;
    return;
  }

  int64_t accepted = num_drafts;
  for (int64_t j = 0; j <= num_drafts; ++j) {
    const int32_t argmax = static_cast<int32_t>(ArgmaxKeyIndex(RowArgmaxKey(partials, splits, first_row + j)));
    if (lane == 0) emitted[j] = argmax;
    if (j < num_drafts && draft_tokens[first_draft + j] != argmax) {
      accepted = j;
      break;
    }
  }
  for (int64_t j = accepted + 1 + lane; j < emit_width; j += 32) emitted[j] = -1;
  if (lane == 0) accepted_counts[b] = static_cast<int32_t>(accepted);
}

}  // namespace specdec

// Unmangled entry points, looked up by name from the Rust launcher (src/cuda/greedy.rs).
#define SPECDEC_GREEDY_ARGMAX(suffix, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(specdec::kArgmaxThreads) GreedyRowArgmaxKernel_##suffix(   \
      const T* __restrict__ logits, int64_t vocab_size, int64_t chunk, uint64_t* __restrict__ partials) { \
    specdec::GreedyRowArgmax<T>(logits, vocab_size, chunk, partials);                                     \
  }                                                                                                       \
  SPECDEC_SIM_ENTRY(GreedyRowArgmaxKernel_##suffix)
SPECDEC_GREEDY_ARGMAX(f32, float)
SPECDEC_GREEDY_ARGMAX(f16, __half)
SPECDEC_GREEDY_ARGMAX(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(specdec::kAcceptThreads)
    GreedyAcceptKernel(const int32_t* __restrict__ draft_offsets, const int32_t* __restrict__ draft_tokens,
                       const uint64_t* __restrict__ partials, int32_t splits, int64_t num_requests,
                       int64_t num_draft_tokens, int64_t vocab_size, int64_t emit_width,
                       int32_t* __restrict__ accepted_counts, int32_t* __restrict__ emitted_tokens,
                       int32_t* __restrict__ request_status) {
  specdec::GreedyAccept(draft_offsets, draft_tokens, partials, splits, num_requests, num_draft_tokens, vocab_size,
                        emit_width, accepted_counts, emitted_tokens, request_status);
}
SPECDEC_SIM_ENTRY(GreedyAcceptKernel)
