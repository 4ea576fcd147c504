// Tree-attention verification over a paged KV cache, with the tree's KV appended and rotated in the same launch,
// and accepted-path KV compaction. Semantics and rules: src/attention/mod.rs; CPU reference: src/cpu/attention.rs.
//
// What it computes. Request b has L_b cached tokens (k_cache, v_cache: [pages, page_size, Hkv, D], through its
// row of page_table) and a tree of T_b <= 64 nodes (parents[i] < i, -1 for a root). Node i's query (q head h)
// attends to the L_b prefix keys of KV head h / group and to its ancestors and itself, whose keys and values
// come from this call's k and v (rotated at position L_b + depth(i) when RoPE is on). The same launch writes
// those keys and values to the cache at slots L_b + i.
//
// Structure (TreeAttentionKernel, grid = (splits, Hkv * row_chunks, B)):
//   * A block owns 16 * kRowWarps query rows of one KV head of one request: rows are (node, q head in the
//     group) pairs, so the T x group rows that share a KV head share every KV tile the block loads. T = 64 at
//     group 4 is 256 rows: two blocks of 128 rows (kRowWarps = 8), which load the same tiles at the same time and
//     so mostly from L2.
//   * Its warps split each tile of kKeysPerTile keys between them (kKeyWarps = warps / kRowWarps): a decode
//     step (16 rows) still has four warps pulling and multiplying keys. Their partial softmax states are merged
//     in shared memory at the end.
//   * Long prefixes are split over gridDim.x blocks; each writes an fp32 partial and its log-sum-exp, and
//     TreeAttentionMergeKernel combines them exactly. With one split the block writes the output itself. A request
//     uses at most one split per tile of its prefix (UsedSplits): the blocks of the rest return at once.
//   * Prefix tiles go through a two-stage cp.async pipeline and are never masked: only the last tile of a
//     split checks the key bound. The tree's keys form the last tile(s) of the last split; their mask is the
//     64-bit ancestor set of each row's node, built in shared memory from the parent array. Nothing the kernel
//     reads or allocates depends on L beyond the cache itself.
//   * QK^T and PV are m16n8k16 tensor-core MMAs (fp32 accumulation); probabilities are rounded to the element
//     type for PV, as every flash-attention kernel does; the tests' tolerance covers that rounding.
//
// Napkin math (Llama-3-8B layer: Hq 32, Hkv 8, D 128, bf16; L = 8k, T = 16, B = 16): KV read once, 4 KiB per
// cached token per request = 512 MiB: 160 us at 3.35 TB/s (H100). Compute: 2 x 2 x 16 x 32 x 8192 x 128 per
// request = 2.1 GFLOP, 34 GFLOP in all: 35 us at ~1 PFLOP/s dense bf16, so the kernel is memory-bound up to
// T x group ~ 300 rows per KV head; at T = 64 (256 rows) the MMAs must overlap the loads to stay near the floor.
//
// Validation: every block checks its request's offsets, parents, prefix length, page-table entries and RoPE
// positions (CheckTreeRequest, the rules of TreeAttentionShape::check_request) before touching anything, so no
// index from the caller's arrays is ever used unchecked. A failing request writes nothing to the cache, NaN to
// its rows of out and lse (when its offsets are valid), and its status to request_status[b] if asked.
//
// TreeKvCompactKernel (grid = (B, Hkv, layers <= 128)): each block moves one request's accepted entries of one KV
// head in one layer: all sources are read into shared memory before any destination is written, so overlapping
// moves are safe; entries already in place are skipped.

#include "common.cuh"

namespace specdec {

constexpr int kMaxTree = 64;  // tree::MAX_TREE_NODES: the root and 63 drafts, one bit of an ancestor set each

// The kernel's arguments, passed by value; build.rs generates the host's mirror from this definition.
struct TreeAttentionParams {
  const void* q;
  const void* k;
  const void* v;
  const int* token_offsets;
  const int* parents;
  const int* prefix_lens;
  const int* page_table;
  void* k_cache;
  void* v_cache;
  const float* cos_sin;  // null: no RoPE
  void* out;
  float* lse;           // may be null
  int* request_status;  // may be null
  float* partial_out;   // [splits, N, Hq, D]; null with one split
  float* partial_lse;   // [splits, N, Hq]
  int num_requests;
  int num_tokens;
  int num_q_heads;
  int num_kv_heads;
  int group;
  int max_tree;
  int num_pages;
  int page_size_log2;
  int pages_per_request;
  int max_position;
  int rope_style;  // 0 NeoX, 1 GPT-J
  int num_splits;
  int row_chunks;
  float scale_log2;  // softmax_scale * log2(e)
};

// ---------------------------------------------------------------------------------------------------------
// Validation shared by both kernels: the request's slots and the pages holding them.
// ---------------------------------------------------------------------------------------------------------

// Checks offsets[b] .. offsets[b + 1] (ordered, inside 0..=limit, at most max_size apart). Any thread.
// The difference is taken in 64 bits: two int32 offsets can be more than INT32_MAX apart, and that overflow in
// 32 bits would be undefined before the checks could refuse it.
__device__ __forceinline__ bool CheckOffsets(const int* offsets, int b, int limit, int max_size, int& first,
                                             int& size) {
  const int64_t lo = offsets[b], hi = offsets[b + 1];
  const int64_t span = hi - lo;
  const bool ok = lo >= 0 && lo <= limit && hi >= lo && hi <= limit && span <= max_size;
  first = ok ? static_cast<int>(lo) : 0;
  size = ok ? static_cast<int>(span) : 0;
  return ok;
}

// Checks that prefix_len + extent slots fit the request's pages and that the pages they use are real pages.
// Whole block; returns the status.
__device__ int CheckSlots(const int* prefix_lens, const int* page_table, int b, int extent, int num_pages,
                          int page_size_log2, int pages_per_request, int& prefix_len) {
  prefix_len = prefix_lens[b];
  const int64_t capacity = static_cast<int64_t>(pages_per_request) << page_size_log2;
  if (prefix_len < 0 || static_cast<int64_t>(prefix_len) + extent > capacity) return kRequestPrefixLen;
  const int used =
      static_cast<int>(((static_cast<int64_t>(prefix_len) + extent + (1 << page_size_log2) - 1) >> page_size_log2));
  const int* row = page_table + static_cast<int64_t>(b) * pages_per_request;
  bool bad = false;
  for (int p = threadIdx.x; p < used; p += blockDim.x) bad |= row[p] < 0 || row[p] >= num_pages;
  return __syncthreads_or(bad) ? kRequestPageTable : kRequestOk;
}

// The request whose rows hold token `row`: the last request whose first row is at or before it (a binary search
// over token_offsets), accepted only if that request's offsets are valid and the row lies in its range; -1 else.
// With valid offsets everywhere this is the row's request. When another request's offsets are broken, two
// requests with valid offsets of their own may claim one row: the search gives it to one at most, and the other
// is flagged (kRequestOffsets), so no row is computed or written twice. The rule of TreeAttentionShape::token_owner
// and of RowOwner in rejection_sampling.cu. Any thread.
__device__ int TokenOwner(const TreeAttentionParams& p, int row) {
  if (p.num_requests <= 0) return -1;
  int lo = 0, hi = p.num_requests - 1;
  while (lo < hi) {
    const int mid = lo + (hi - lo + 1) / 2;
    if (p.token_offsets[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  int first, size;
  if (!CheckOffsets(p.token_offsets, lo, p.num_tokens, p.max_tree, first, size)) return -1;
  return row >= first && row < first + size ? lo : -1;
}

// The request's tree: ancestor sets and depths in shared memory, and the status of its rules. Whole block.
__device__ int CheckTreeRequest(const TreeAttentionParams& p, int b, int& first_row, int& tree_size, int& prefix_len,
                                uint64_t* ancestors, int* depths) {
  __shared__ int status;
  if (!CheckOffsets(p.token_offsets, b, p.num_tokens, p.max_tree, first_row, tree_size)) return kRequestOffsets;
  bool foreign = false;
  for (int i = threadIdx.x; i < tree_size; i += blockDim.x) foreign |= TokenOwner(p, first_row + i) != b;
  if (__syncthreads_or(foreign)) return kRequestOffsets;
  if (threadIdx.x == 0) {
    status = kRequestOk;
    int deepest = 0;
    for (int i = 0; i < tree_size; ++i) {
      const int parent = p.parents[first_row + i];
      if (parent < -1 || parent >= i) {
        status = kRequestParents;
        break;
      }
      depths[i] = parent < 0 ? 0 : depths[parent] + 1;
      ancestors[i] = (parent < 0 ? 0ull : ancestors[parent]) | (1ull << i);
      deepest = max(deepest, depths[i]);
    }
    depths[kMaxTree] = deepest;
  }
  __syncthreads();
  if (status != kRequestOk) return status;
  const int slots = CheckSlots(p.prefix_lens, p.page_table, b, tree_size, p.num_pages, p.page_size_log2,
                               p.pages_per_request, prefix_len);
  if (slots != kRequestOk) return slots;
  if (p.cos_sin != nullptr && tree_size > 0 && static_cast<int64_t>(prefix_len) + depths[kMaxTree] >= p.max_position) {
    return kRequestRopePosition;
  }
  return kRequestOk;
}

// The splits request b's prefix actually uses: one per tile of kKeys prefix keys, at least 1 (the last one also
// takes the tree), at most the launch's. The attention blocks of later splits return at once and the merge reads
// only these, so a short prefix in a launch planned for long ones costs neither loads nor partials. A function of
// the raw prefix_lens[b] alone (validated or not), so the attention and merge kernels always agree.
__device__ __forceinline__ int UsedSplits(const TreeAttentionParams& p, int b, int keys_per_tile) {
  const int64_t prefix_len = p.prefix_lens[b];
  const int64_t tiles = prefix_len > 0 ? (prefix_len + keys_per_tile - 1) / keys_per_tile : 1;
  return static_cast<int>(min(static_cast<int64_t>(p.num_splits), tiles));
}

// ---------------------------------------------------------------------------------------------------------
// Shared-memory tiles: rows of D elements in 16-byte chunks, chunk c of row r stored at chunk c ^ (r % 8), so
// that the eight rows an ldmatrix reads at one column hit eight different bank groups.
// ---------------------------------------------------------------------------------------------------------
template <int D>
__device__ __forceinline__ int SwizzledOffset(int row, int col) {
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t* r, uint32_t address) {
#ifdef SPECDEC_SIM
  specdec_sim::LdMatrix(r, address, 4, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, uint32_t address) {
#ifdef SPECDEC_SIM
  specdec_sim::LdMatrix(r, address, 4, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
#endif
}

// 16 bytes global -> shared, asynchronously; a false `valid` writes zeros and reads nothing.
__device__ __forceinline__ void CopyAsync16(void* shared, const void* global, bool valid) {
#ifdef SPECDEC_SIM
  specdec_sim::CpAsync(SharedAddress(shared), global, 16, valid ? 16 : 0);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(SharedAddress(shared)), "l"(global),
               "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void CopyAsyncCommit() {
#ifdef SPECDEC_SIM
  specdec_sim::CpAsyncCommit();
#else
  asm volatile("cp.async.commit_group;");
#endif
}

template <int kPending>
__device__ __forceinline__ void CopyAsyncWait() {
#ifdef SPECDEC_SIM
  specdec_sim::CpAsyncWait(kPending);
#else
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending));
#endif
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi) {
  T pair[2] = {FromFloat<T>(lo), FromFloat<T>(hi)};
  return *reinterpret_cast<uint32_t*>(pair);
}

// The element indices (a, b) rotated together by frequency j, and the rotation itself (the documented rule:
// f32, round to nearest, no fused multiply-add).
template <int D>
__device__ __forceinline__ void RopePair(int style, int j, int& a, int& b) {
  a = style == 0 ? j : 2 * j;
  b = style == 0 ? j + D / 2 : 2 * j + 1;
}

__device__ __forceinline__ void Rotate(float& x, float& y, float c, float s) {
  const float rx = __fsub_rn(__fmul_rn(x, c), __fmul_rn(y, s));
  const float ry = __fadd_rn(__fmul_rn(y, c), __fmul_rn(x, s));
  x = rx;
  y = ry;
}

// Copies (and rotates, when `angles` is not null) one head of D elements from global `src` into shared row
// `row` of `tile`, and to global `also` when not null. The calling threads share the pairs: `lane` of `lanes`.
template <typename T, int D>
__device__ __forceinline__ void LoadHead(const T* src, const float* angles, int style, T* tile, int row, T* also,
                                         int lane, int lanes) {
  for (int j = lane; j < D / 2; j += lanes) {
    int a, b;
    RopePair<D>(style, j, a, b);
    T ta = src[a], tb = src[b];
    if (angles != nullptr) {
      float x = ToFloat(ta), y = ToFloat(tb);
      Rotate(x, y, angles[j], angles[D / 2 + j]);
      ta = FromFloat<T>(x);
      tb = FromFloat<T>(y);
    }
    tile[SwizzledOffset<D>(row, a)] = ta;
    tile[SwizzledOffset<D>(row, b)] = tb;
    if (also != nullptr) {
      also[a] = ta;
      also[b] = tb;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// The attention kernel.
// ---------------------------------------------------------------------------------------------------------

template <int D>
struct TileConfig {
  // D = 256 uses 32-key tiles so that every configuration fits the 99 KiB of shared memory of sm_86 / sm_89.
  static constexpr int kKeysPerTile = D == 256 ? 32 : 64;
};

template <int D, int kRowWarps>
struct AttentionConfig {
  static constexpr int kWarps = kRowWarps < 4 ? 4 : kRowWarps;
  static constexpr int kKeyWarps = kWarps / kRowWarps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16 * kRowWarps;
  static constexpr int kKeys = TileConfig<D>::kKeysPerTile;
  static constexpr int kWarpKeys = kKeys / kKeyWarps;  // keys of a tile one warp multiplies
  static_assert(kWarpKeys % 16 == 0, "each warp takes whole 16-key steps");
  // Shared memory (elements of T): Q rows, then K and V tiles in two stages.
  static constexpr int kQElements = kRows * D;
  static constexpr int kTileElements = kKeys * D;
  static constexpr size_t SharedBytes(size_t element) { return (kQElements + 4 * kTileElements) * element; }
};

enum class KeyMask { kNone, kBound, kTree };

// One warp's running softmax state for its 16 rows: this thread holds rows lane/4 and lane/4 + 8.
template <int D>
struct SoftmaxState {
  float o[D / 8][4];
  float m[2];
  float l[2];
};

// Multiplies one warp's 16 rows by its keys of the tile in shared memory and folds them into `state`.
// kMask kBound: keys at or after `key_end` (tile-relative) are invisible. kTree: key j of the tile is tree node
// `tree_base + j`, visible to a row whose node's ancestor set holds it.
template <typename T, int D, int kRowWarps, KeyMask kMask>
__device__ __forceinline__ void AttendTile(SoftmaxState<D>& st, const T* sq, const T* sk, const T* sv, int key_end,
                                           int tree_base, const uint64_t* row_ancestors, float scale_log2) {
  using Config = AttentionConfig<D, kRowWarps>;
  // A warp's keys of the tile are taken 32 at a time: more would hold too many scores in registers.
  constexpr int kStepKeys = Config::kWarpKeys < 32 ? Config::kWarpKeys : 32;
  constexpr int kNTiles = kStepKeys / 8;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int row_warp = warp % kRowWarps;
#pragma unroll 1
  for (int step = 0; step < Config::kWarpKeys / kStepKeys; ++step) {
    const int key_base = (warp / kRowWarps) * Config::kWarpKeys + step * kStepKeys;

    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;

#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      {
        const int m = lane / 8;
        const int row = row_warp * 16 + (m % 2) * 8 + lane % 8;
        const int col = kk * 16 + (m / 2) * 8;
        LdMatrixX4(a, SharedAddress(sq + SwizzledOffset<D>(row, col)));
      }
#pragma unroll
      for (int n = 0; n < kNTiles; n += 2) {
        uint32_t b[4];
        const int m = lane / 8;
        const int key = key_base + n * 8 + (m / 2) * 8 + lane % 8;
        const int col = kk * 16 + (m % 2) * 8;
        LdMatrixX4(b, SharedAddress(sk + SwizzledOffset<D>(key, col)));
        Mma16816<T>(s[n], a, b[0], b[1]);
        Mma16816<T>(s[n + 1], a, b[2], b[3]);
      }
    }

    // Scale to log2 units, mask, and update the running max and sum of each of this thread's two rows.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key_base + n * 8 + (lane % 4) * 2 + (e & 1);
        float x = s[n][e] * scale_log2;
        if constexpr (kMask == KeyMask::kBound) {
          if (key >= key_end) x = -INFINITY;
        } else if constexpr (kMask == KeyMask::kTree) {
          const int node = tree_base + key;
          if (node >= kMaxTree || !((row_ancestors[e / 2] >> node) & 1ull)) x = -INFINITY;
        }
        s[n][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    }
    float alpha[2], base[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xFFFFFFFFu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xFFFFFFFFu, tile_max[r], 2));
      const float m_new = fmaxf(st.m[r], tile_max[r]);
      // A row that has seen no visible key yet keeps m = -inf; subtracting 0 then keeps every p at 0, not NaN.
      base[r] = m_new == -INFINITY ? 0.0f : m_new;
      alpha[r] = exp2f(st.m[r] - base[r]);
      st.m[r] = m_new;
      st.l[r] *= alpha[r];
    }
#pragma unroll
    for (int d = 0; d < D / 8; ++d) {
      st.o[d][0] *= alpha[0];
      st.o[d][1] *= alpha[0];
      st.o[d][2] *= alpha[1];
      st.o[d][3] *= alpha[1];
    }

    // P (rounded to T) times V: the accumulator layout of two adjacent 8-key tiles is the A layout of a 16-key step.
#pragma unroll
    for (int n = 0; n < kNTiles; n += 2) {
      float p[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          p[h][e] = exp2f(s[n + h][e] - base[e / 2]);
          st.l[e / 2] += p[h][e];
        }
      }
      const uint32_t a[4] = {PackPair<T>(p[0][0], p[0][1]), PackPair<T>(p[0][2], p[0][3]),
                             PackPair<T>(p[1][0], p[1][1]), PackPair<T>(p[1][2], p[1][3])};
#pragma unroll
      for (int d = 0; d < D / 8; d += 2) {
        uint32_t b[4];
        const int m = lane / 8;
        const int key = key_base + n * 8 + (m % 2) * 8 + lane % 8;
        const int col = d * 8 + (m / 2) * 8;
        LdMatrixX4Trans(b, SharedAddress(sv + SwizzledOffset<D>(key, col)));
        Mma16816<T>(st.o[d], a, b[0], b[1]);
        Mma16816<T>(st.o[d + 1], a, b[2], b[3]);
      }
    }
  }
}

template <typename T, int D, int kRowWarps>
__device__ void TreeAttention(const TreeAttentionParams& p) {
  using Config = AttentionConfig<D, kRowWarps>;
  constexpr int kKeys = Config::kKeys;
  constexpr int kChunksPerRow = D / 8;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  T* sq = reinterpret_cast<T*>(shared_raw);
  // Stage s of the K tile is at sk(s), of the V tile at sv(s).
  T* const tiles_base = sq + Config::kQElements;
  auto sk = [&](int stage) { return tiles_base + stage * Config::kTileElements; };
  auto sv = [&](int stage) { return tiles_base + (2 + stage) * Config::kTileElements; };
  __shared__ uint64_t ancestors[kMaxTree];
  __shared__ int depths[kMaxTree + 1];
  __shared__ float row_m[Config::kWarps][16];
  __shared__ float row_l[Config::kWarps][16];

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / p.row_chunks;
  const int row_chunk = blockIdx.y % p.row_chunks;
  const int b = blockIdx.z;
  const int hq = p.num_q_heads;
  const int hkv = p.num_kv_heads;
  const int page_size = 1 << p.page_size_log2;
  const int used_splits = UsedSplits(p, b, kKeys);
  if (split >= used_splits) return;  // uniform across the block, before any barrier

  int first_row, tree_size, prefix_len;
  const int status = CheckTreeRequest(p, b, first_row, tree_size, prefix_len, ancestors, depths);
  if (split == 0 && blockIdx.y == 0 && threadIdx.x == 0 && p.request_status != nullptr) {
    p.request_status[b] = status;
  }
  // This block's rows: (node, q head of the group) pairs, node-major.
  const int row_begin = row_chunk * Config::kRows;
  auto row_node = [&](int r) { return (row_begin + r) / p.group; };
  auto row_head = [&](int r) { return kv_head * p.group + (row_begin + r) % p.group; };
  auto row_valid = [&](int r) { return row_node(r) < tree_size; };

  if (status != kRequestOk) {
    if (status == kRequestOffsets) return;  // the request's rows are unknown, or another request's
    for (int r = threadIdx.x / 32; r < Config::kRows; r += Config::kWarps) {
      if (!row_valid(r)) continue;
      const int64_t token = first_row + row_node(r);
      const int head = row_head(r);
      if (p.num_splits > 1) {
        if (threadIdx.x % 32 == 0)
          p.partial_lse[(split * static_cast<int64_t>(p.num_tokens) + token) * hq + head] = NAN;
        continue;
      }
      T* out = static_cast<T*>(p.out) + (token * hq + head) * D;
      for (int d = threadIdx.x % 32; d < D; d += 32) out[d] = FromFloat<T>(NAN);
      if (p.lse != nullptr && threadIdx.x % 32 == 0) p.lse[token * hq + head] = NAN;
    }
    return;
  }
  if (row_begin >= tree_size * p.group) return;  // a chunk beyond this request's tree

  // The prefix range of this split: whole tiles, the last used split also takes the tree.
  // In 64 bits: prefix_len may be near INT32_MAX, and split * per_split beyond it.
  const int64_t per_split =
      ((static_cast<int64_t>(prefix_len) + used_splits - 1) / used_splits + kKeys - 1) / kKeys * kKeys;
  const int key_begin = static_cast<int>(min(static_cast<int64_t>(prefix_len), split * per_split));
  const int key_end = static_cast<int>(min(static_cast<int64_t>(prefix_len), key_begin + per_split));
  const bool takes_tree = split == used_splits - 1;
  const bool appends = takes_tree && row_chunk == 0;

  // Q rows (rotated), zeros for rows beyond the tree.
  for (int r = threadIdx.x / 32; r < Config::kRows; r += Config::kWarps) {
    const int lane = threadIdx.x % 32;
    if (!row_valid(r)) {
      for (int c = lane; c < D; c += 32) sq[SwizzledOffset<D>(r, c)] = FromFloat<T>(0.0f);
      continue;
    }
    const int node = row_node(r);
    const int64_t token = first_row + node;
    const float* angles =
        p.cos_sin == nullptr ? nullptr : p.cos_sin + (static_cast<int64_t>(prefix_len) + depths[node]) * D;
    LoadHead<T, D>(static_cast<const T*>(p.q) + (token * hq + row_head(r)) * D, angles, p.rope_style, sq, r, nullptr,
                   lane, 32);
  }

  SoftmaxState<D> st;
#pragma unroll
  for (int d = 0; d < D / 8; ++d) st.o[d][0] = st.o[d][1] = st.o[d][2] = st.o[d][3] = 0.0f;
  st.m[0] = st.m[1] = -INFINITY;
  st.l[0] = st.l[1] = 0.0f;

  // The ancestor sets of this thread's two rows (for the tree tiles).
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int my_row = (warp % kRowWarps) * 16 + lane / 4;
  uint64_t my_ancestors[2] = {0ull, 0ull};

  // Prefix tiles: cp.async, two stages, one tile ahead.
  const T* k_cache = static_cast<const T*>(p.k_cache);
  const T* v_cache = static_cast<const T*>(p.v_cache);
  const int* pages = p.page_table + static_cast<int64_t>(b) * p.pages_per_request;
  auto load_prefix_tile = [&](int tile_begin, int stage) {
    for (int i = threadIdx.x; i < kKeys * kChunksPerRow; i += Config::kThreads) {
      const int key = i / kChunksPerRow;
      const int chunk = i % kChunksPerRow;
      const int slot = tile_begin + key;
      const bool valid = slot < key_end;
      int64_t at = 0;
      if (valid) {
        const int64_t page = pages[slot >> p.page_size_log2];
        at = ((page * page_size + (slot & (page_size - 1))) * hkv + kv_head) * D + chunk * 8;
      }
      const int offset = SwizzledOffset<D>(key, chunk * 8);
      CopyAsync16(sk(stage) + offset, k_cache + at, valid);
      CopyAsync16(sv(stage) + offset, v_cache + at, valid);
    }
  };
  const int tiles = (key_end - key_begin + kKeys - 1) / kKeys;
  if (tiles > 0) load_prefix_tile(key_begin, 0);
  CopyAsyncCommit();
  __syncthreads();  // Q rows are in shared memory
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load_prefix_tile(key_begin + (t + 1) * kKeys, (t + 1) & 1);
    CopyAsyncCommit();
    CopyAsyncWait<1>();
    __syncthreads();
    const int tile_begin = key_begin + t * kKeys;
    if (tile_begin + kKeys <= key_end) {
      AttendTile<T, D, kRowWarps, KeyMask::kNone>(st, sq, sk(t & 1), sv(t & 1), kKeys, 0, my_ancestors, p.scale_log2);
    } else {
      AttendTile<T, D, kRowWarps, KeyMask::kBound>(st, sq, sk(t & 1), sv(t & 1), key_end - tile_begin, 0, my_ancestors,
                                                   p.scale_log2);
    }
    __syncthreads();
  }

  // The tree's keys and values, from this call's k and v (rotated), appended to the cache by one block.
  if (takes_tree) {
    for (int r = 0; r < 2; ++r) {
      const int node = row_node(my_row + 8 * r);
      my_ancestors[r] = row_valid(my_row + 8 * r) ? ancestors[node] : 0ull;
    }
    T* k_out = static_cast<T*>(p.k_cache);
    T* v_out = static_cast<T*>(p.v_cache);
    for (int tree_base = 0; tree_base < tree_size; tree_base += kKeys) {
      for (int key = warp; key < kKeys; key += Config::kWarps) {
        const int node = tree_base + key;
        if (node >= tree_size) {
          for (int c = lane; c < D; c += 32) {
            sk(0)[SwizzledOffset<D>(key, c)] = FromFloat<T>(0.0f);
            sv(0)[SwizzledOffset<D>(key, c)] = FromFloat<T>(0.0f);
          }
          continue;
        }
        const int64_t token = first_row + node;
        const int slot = prefix_len + node;
        const int64_t page = pages[slot >> p.page_size_log2];
        const int64_t at = ((page * page_size + (slot & (page_size - 1))) * hkv + kv_head) * D;
        const float* angles =
            p.cos_sin == nullptr ? nullptr : p.cos_sin + (static_cast<int64_t>(prefix_len) + depths[node]) * D;
        const T* k_src = static_cast<const T*>(p.k) + (token * hkv + kv_head) * D;
        const T* v_src = static_cast<const T*>(p.v) + (token * hkv + kv_head) * D;
        LoadHead<T, D>(k_src, angles, p.rope_style, sk(0), key, appends ? k_out + at : nullptr, lane, 32);
        LoadHead<T, D>(v_src, nullptr, 0, sv(0), key, appends ? v_out + at : nullptr, lane, 32);
      }
      __syncthreads();
      AttendTile<T, D, kRowWarps, KeyMask::kTree>(st, sq, sk(0), sv(0), kKeys, tree_base, my_ancestors, p.scale_log2);
      __syncthreads();
    }
  }

  // Epilogue: every warp's raw state to shared memory (over the K/V tiles), then one pass per row combines the
  // key warps and writes the output (or this split's partial) with whole-row stores.
  // Row x of `so` holds its 8-float chunk c at chunk (c + x) % (D / 8): the 8 rows a warp's lanes store at once
  // (lane / 4) then fall in 8 different chunks, and each half-warp's float2 stores cover 32 distinct banks (rows
  // at one stride of D floats would all hit the same 8 banks, an 8-way conflict). Reads of 32 consecutive
  // columns of one row stay conflict-free: 4 consecutive chunks, rotated.
  float* so = reinterpret_cast<float*>(sk(0));  // [warps][16][D], chunks rotated by row
  auto so_at = [&](int x, int col) { return x * D + ((((col >> 3) + x) % (D / 8)) << 3) + (col & 7); };
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st.l[r] += __shfl_xor_sync(0xFFFFFFFFu, st.l[r], 1);
    st.l[r] += __shfl_xor_sync(0xFFFFFFFFu, st.l[r], 2);
  }
  if (lane % 4 == 0) {
    row_m[warp][lane / 4] = st.m[0];
    row_m[warp][lane / 4 + 8] = st.m[1];
    row_l[warp][lane / 4] = st.l[0];
    row_l[warp][lane / 4 + 8] = st.l[1];
  }
#pragma unroll
  for (int d = 0; d < D / 8; ++d) {
    const int col = d * 8 + (lane % 4) * 2;
    const int top = warp * 16 + lane / 4;
    *reinterpret_cast<float2*>(so + so_at(top, col)) = make_float2(st.o[d][0], st.o[d][1]);
    *reinterpret_cast<float2*>(so + so_at(top + 8, col)) = make_float2(st.o[d][2], st.o[d][3]);
  }
  __syncthreads();

  for (int r = warp; r < Config::kRows; r += Config::kWarps) {
    if (!row_valid(r)) continue;
    const int row_warp = r / 16;
    float m = -INFINITY;
#pragma unroll
    for (int kw = 0; kw < Config::kKeyWarps; ++kw) m = fmaxf(m, row_m[kw * kRowWarps + row_warp][r % 16]);
    const float base = m == -INFINITY ? 0.0f : m;
    float weight[Config::kKeyWarps];
    float l = 0.0f;
#pragma unroll
    for (int kw = 0; kw < Config::kKeyWarps; ++kw) {
      const int w = kw * kRowWarps + row_warp;
      weight[kw] = exp2f(row_m[w][r % 16] - base);
      l += row_l[w][r % 16] * weight[kw];
    }
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    const float lse = l > 0.0f ? (base + log2f(l)) * 0.69314718055994531f : -INFINITY;
    const int64_t token = first_row + row_node(r);
    const int head = row_head(r);
    for (int d = lane; d < D; d += 32) {
      float acc = 0.0f;
#pragma unroll
      for (int kw = 0; kw < Config::kKeyWarps; ++kw) {
        acc += so[so_at((kw * kRowWarps + row_warp) * 16 + r % 16, d)] * weight[kw];
      }
      acc *= inv_l;
      if (p.num_splits > 1) {
        p.partial_out[((split * static_cast<int64_t>(p.num_tokens) + token) * hq + head) * D + d] = acc;
      } else {
        static_cast<T*>(p.out)[(token * hq + head) * D + d] = FromFloat<T>(acc);
      }
    }
    if (lane == 0) {
      if (p.num_splits > 1) {
        p.partial_lse[(split * static_cast<int64_t>(p.num_tokens) + token) * hq + head] = lse;
      } else if (p.lse != nullptr) {
        p.lse[token * hq + head] = lse;
      }
    }
  }
}

// Combines the splits of each (node, q head) of every request with valid offsets: one warp per pair.
template <typename T, int D>
__device__ void TreeAttentionMerge(const TreeAttentionParams& p) {
  constexpr int kWarps = 4;
  const int b = blockIdx.y;
  int first_row, tree_size;
  if (!CheckOffsets(p.token_offsets, b, p.num_tokens, p.max_tree, first_row, tree_size)) return;
  const int pair = blockIdx.x * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int node = pair / p.num_q_heads;
  const int head = pair % p.num_q_heads;
  if (node >= tree_size) return;
  const int64_t token = first_row + node;
  if (TokenOwner(p, static_cast<int>(token)) != b) return;  // a row another request owns (kRequestOffsets)
  const int64_t stride = static_cast<int64_t>(p.num_tokens) * p.num_q_heads;
  const int64_t at = token * p.num_q_heads + head;

  // Lane s holds split s's log-sum-exp (splits <= 32); the splits the request did not use wrote nothing.
  const int used_splits = UsedSplits(p, b, TileConfig<D>::kKeysPerTile);
  const float own = lane < used_splits ? p.partial_lse[lane * stride + at] : -INFINITY;
  const bool any_nan = __any_sync(0xFFFFFFFFu, own != own);
  float m = own;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, offset));
  const float base = m == -INFINITY ? 0.0f : m;
  const float own_weight = own == -INFINITY ? 0.0f : expf(own - base);
  float total = own_weight;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xFFFFFFFFu, total, offset);

  T* out = static_cast<T*>(p.out) + at * D;
  for (int d = lane; d < D; d += 32) {
    float acc = 0.0f;
    for (int s = 0; s < used_splits; ++s) {
      const float w = __shfl_sync(0xFFFFFFFFu, own_weight, s);
      if (w != 0.0f) acc += w * p.partial_out[(s * stride + at) * D + d];
    }
    out[d] = FromFloat<T>(any_nan ? NAN : acc / total);
  }
  if (lane == 0 && p.lse != nullptr) p.lse[at] = any_nan ? NAN : base + logf(total);
}

// ---------------------------------------------------------------------------------------------------------
// Compaction.
// ---------------------------------------------------------------------------------------------------------

constexpr int kMaxLayers = 128;

// build.rs generates the host's mirror of this block from its definition. The layers' cache pointers travel by value
// (checked for null and alignment on the host), so a captured CUDA graph holds them and nothing is copied per call.
struct CompactionParams {
  void* k_caches[kMaxLayers];
  void* v_caches[kMaxLayers];
  const int* accepted_offsets;
  const int* accepted_nodes;
  const int* prefix_lens;
  const int* page_table;
  int* request_status;  // may be null
  int num_accepted;
  int num_kv_heads;
  int num_pages;
  int page_size_log2;
  int pages_per_request;
};

constexpr int kCompactThreads = 128;

// The rules of CompactionShape::check_request. Whole block.
__device__ int CheckCompactionRequest(const CompactionParams& p, int b, int& first, int& count, int& prefix_len) {
  if (!CheckOffsets(p.accepted_offsets, b, p.num_accepted, kMaxTree, first, count)) return kRequestOffsets;
  bool bad = false;
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    const int node = p.accepted_nodes[first + j];
    const int previous = j == 0 ? -1 : p.accepted_nodes[first + j - 1];
    bad |= node <= previous || node >= kMaxTree;
  }
  if (__syncthreads_or(bad)) return kRequestParents;
  const int extent = count == 0 ? 0 : p.accepted_nodes[first + count - 1] + 1;
  return CheckSlots(p.prefix_lens, p.page_table, b, extent, p.num_pages, p.page_size_log2, p.pages_per_request,
                    prefix_len);
}

template <typename T, int D>
__device__ void TreeKvCompact(const CompactionParams& p) {
  __shared__ __align__(16) T staged[kMaxTree * D];
  const int b = blockIdx.x;
  const int head = blockIdx.y;
  const int layer = blockIdx.z;
  int first, count, prefix_len;
  const int status = CheckCompactionRequest(p, b, first, count, prefix_len);
  if (head == 0 && layer == 0 && threadIdx.x == 0 && p.request_status != nullptr) p.request_status[b] = status;
  if (status != kRequestOk) return;
  const int page_size = 1 << p.page_size_log2;
  const int* pages = p.page_table + static_cast<int64_t>(b) * p.pages_per_request;
  auto row_of = [&](int slot) {
    const int64_t page = pages[slot >> p.page_size_log2];
    return ((page * page_size + (slot & (page_size - 1))) * p.num_kv_heads + head) * D;
  };
  constexpr int kVector = 16 / sizeof(T);
  for (int which = 0; which < 2; ++which) {
    T* cache = static_cast<T*>(which == 0 ? p.k_caches[layer] : p.v_caches[layer]);
    // Read every moving source before writing any destination: a destination may be a later source.
    for (int i = threadIdx.x; i < count * (D / kVector); i += kCompactThreads) {
      const int j = i / (D / kVector);
      const int node = p.accepted_nodes[first + j];
      if (node == j) continue;
      const int c = i % (D / kVector);
      reinterpret_cast<uint4*>(staged + j * D)[c] =
          reinterpret_cast<const uint4*>(cache + row_of(prefix_len + node))[c];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < count * (D / kVector); i += kCompactThreads) {
      const int j = i / (D / kVector);
      if (p.accepted_nodes[first + j] == j) continue;
      const int c = i % (D / kVector);
      reinterpret_cast<uint4*>(cache + row_of(prefix_len + j))[c] = reinterpret_cast<const uint4*>(staged + j * D)[c];
    }
    __syncthreads();
  }
}

}  // namespace specdec

// ---------------------------------------------------------------------------------------------------------
// Entry points: TreeAttentionKernel_<dtype>_d<D>_r<row warps>, TreeAttentionMergeKernel_<dtype>_d<D>,
// TreeKvCompactKernel_d<D> (compaction moves 16-bit elements; the dtype does not matter).
// ---------------------------------------------------------------------------------------------------------
#define SPECDEC_TREE_ATTENTION(NAME, T, D, R)                                            \
  extern "C" __global__ void __launch_bounds__(specdec::AttentionConfig<D, R>::kThreads) \
      TreeAttentionKernel_##NAME##_d##D##_r##R(const specdec::TreeAttentionParams p) {   \
    specdec::TreeAttention<T, D, R>(p);                                                  \
  }                                                                                      \
  SPECDEC_SIM_ENTRY(TreeAttentionKernel_##NAME##_d##D##_r##R)

#define SPECDEC_TREE_ATTENTION_DTYPE(NAME, T)                                        \
  SPECDEC_TREE_ATTENTION(NAME, T, 64, 1)                                             \
  SPECDEC_TREE_ATTENTION(NAME, T, 64, 2)                                             \
  SPECDEC_TREE_ATTENTION(NAME, T, 64, 4)                                             \
  SPECDEC_TREE_ATTENTION(NAME, T, 64, 8)                                             \
  SPECDEC_TREE_ATTENTION(NAME, T, 128, 1)                                            \
  SPECDEC_TREE_ATTENTION(NAME, T, 128, 2)                                            \
  SPECDEC_TREE_ATTENTION(NAME, T, 128, 4)                                            \
  SPECDEC_TREE_ATTENTION(NAME, T, 128, 8)                                            \
  SPECDEC_TREE_ATTENTION(NAME, T, 256, 2)                                            \
  SPECDEC_TREE_ATTENTION(NAME, T, 256, 4)                                            \
  extern "C" __global__ void __launch_bounds__(128)                                  \
      TreeAttentionMergeKernel_##NAME##_d64(const specdec::TreeAttentionParams p) {  \
    specdec::TreeAttentionMerge<T, 64>(p);                                           \
  }                                                                                  \
  extern "C" __global__ void __launch_bounds__(128)                                  \
      TreeAttentionMergeKernel_##NAME##_d128(const specdec::TreeAttentionParams p) { \
    specdec::TreeAttentionMerge<T, 128>(p);                                          \
  }                                                                                  \
  extern "C" __global__ void __launch_bounds__(128)                                  \
      TreeAttentionMergeKernel_##NAME##_d256(const specdec::TreeAttentionParams p) { \
    specdec::TreeAttentionMerge<T, 256>(p);                                          \
  }                                                                                  \
  SPECDEC_SIM_ENTRY(TreeAttentionMergeKernel_##NAME##_d64)                           \
  SPECDEC_SIM_ENTRY(TreeAttentionMergeKernel_##NAME##_d128)                          \
  SPECDEC_SIM_ENTRY(TreeAttentionMergeKernel_##NAME##_d256)

SPECDEC_TREE_ATTENTION_DTYPE(f16, __half)
SPECDEC_TREE_ATTENTION_DTYPE(bf16, __nv_bfloat16)

#define SPECDEC_TREE_KV_COMPACT(D)                                       \
  extern "C" __global__ void __launch_bounds__(specdec::kCompactThreads) \
      TreeKvCompactKernel_d##D(const specdec::CompactionParams p) {      \
    specdec::TreeKvCompact<__half, D>(p);                                \
  }                                                                      \
  SPECDEC_SIM_ENTRY(TreeKvCompactKernel_d##D)

SPECDEC_TREE_KV_COMPACT(64)
SPECDEC_TREE_KV_COMPACT(128)
SPECDEC_TREE_KV_COMPACT(256)
