// int4 weights (W4A16) of a self-speculative drafter: on-GPU requantization after every weight update, and the
// GEMV / skinny GEMM y[M, N] = x[M, K] W^T for M = 1..16 (src/int4/mod.rs and docs/int4-format.md specify the
// format and the rounding rule; src/cpu/int4.rs is the reference these kernels must match).
//
// The format. W[N, K] in groups of g = 32, 64 or 128 columns of a row, each with a scale s (fp16 or bf16) and a
// zero z (a byte, 0..15): W[n, k] = (q - z) * s. Codes are stored in tiles of 16 rows x 64 columns (512 bytes),
// row tiles outermost. Lane l of a tile holds 16 bytes: rows r = l / 4 and r + 8, columns 8 (l % 4) .. + 8 of
// each 32-column half. Word t of a lane covers columns c = 32 (t / 2) + 8 (l % 4) + 4 (t % 2) + d (d = 0..3) of
// both rows, the code of (row r + 8 rho, d) in nibble 4 (d % 2) + 2 (d / 2) + rho. So:
//   * one 16-byte load per lane moves 512 contiguous bytes per warp;
//   * nibbles i and i + 4 of a word, masked and OR-ed with an exponent ("magic number": 0x6400 is fp16 1024,
//     0x4300 is bf16 128), are the half2 of 1024 + q (or 128 + q), and subtracting 1024 + z gives q - z exactly;
//     the four half2 of a word are a lane's A registers of an m16n8k16 tensor-core MMA, with the weights as the
//     MMA's M side and the activations (x^T) as its N side: up to 8 activation rows per MMA, 2 MMAs for M <= 16;
//   * a lane's activations for a tile are 8 consecutive columns of each half: two 16-byte loads per row of x;
//   * each half of a tile lies in one group, so the MMA accumulates integer weights times activations exactly in
//     fp32, and the group's scale is applied to the fp32 partial sum: the result's only roundings are fp32
//     accumulation and the final conversion (Marlin-style kernels round every dequantized weight to fp16/bf16).
//
// Kernels.
//   1. Int4QuantizeKernel_<in>_<scale>: one warp per (16-row tile, span of max(64, g) columns). Each lane loads
//      its 2 rows x 16 (or 32) weights, a quad of lanes (one row pair) reduces the group's min and max by
//      shuffles, and the lane computes scales, zeros and codes with correctly rounded f32 operations (__f*_rn, no
//      FMA), writing whole 16-byte lane words. Given scales and zeros (GPTQ, AWQ) skip the reduction. Reads W once
//      and writes N K / 2 bytes plus metadata.
//   2. Int4GemvKernel_<act>_<scale>_m<8|16>_r<R>: one block of 8 warps per R row tiles; the warps split the K
//      tiles round-robin, each loading R weight words per K tile (R = 1, 2 or 4; larger R reuses the activation
//      fragments across more rows where N leaves enough blocks to fill the device), and the 8 partial results
//      are summed in shared memory in a fixed order (deterministic; no atomics). The group size is a template
//      parameter (dispatched once per launch), so a chunk's scales and zeros are loaded with its weights, and
//      each warp requests its next chunk (weights and metadata) before it multiplies the current one: two chunks
//      in flight per warp. When N gives fewer blocks than SMs, K is split over gridDim.y (up to 8 ways, at least
//      8 chunks per split) and Int4GemvSplitSumKernel adds the fp32 partials in split order: deterministic on
//      one GPU, though the split count, and so the fp32 rounding, follows the device's SM count.
//
// Napkin math (H100, 3.35 TB/s). 8192 x 28672, g128, M = 1: 117.4 MB of codes + 3.7 MB of scales and zeros =
// 121 MB -> 36 us at the copy bandwidth. Bytes in flight: at ~700 ns of DRAM latency, 3.35 TB/s needs ~2.3 MB
// in flight, 18 KB per SM (4.8 TB/s on an H200: 25 KB). A warp holds 2 chunks x R x 512 bytes of weights in
// flight; with nvcc 13.0 at sm_90 (registers -> blocks per SM) that is m8: r1 64 -> 4 blocks, 32 KB per SM;
// r2 80 -> 3, 48 KB; r4 148 -> 1, 32 KB; m16: r1 80 -> 3, 24 KB; r2 120 -> 2, 32 KB; r4 185 -> 1, 32 KB.
// Per 16-byte load a lane does 12 logic ops, 8 half2 subtractions and 4 MMAs (8 for M > 8): ~1/4 of the issue
// slots at full bandwidth, so M = 16 costs about what M = 1 costs.
// Activations (x, 64 KB at M = 16, K = 4096... 917 KB at K = 28672) are read by every block from L2.
// Requantizing an 8B model (~7 G weights in linear layers, bf16): 14 GB read + 3.6 GB written = 5.3 ms.

#include "common.cuh"

namespace specdec {

constexpr int kTileCols = 64;
constexpr int kLanesPerTile = 32;
constexpr int kGemvWarps = 8;
constexpr int kQuantizeWarps = 8;

// ---------------------------------------------------------------------------------------------------------
// Element types: 16-bit floats, their pairs, and the magic exponent that turns a nibble into 2^e + q.
// ---------------------------------------------------------------------------------------------------------
template <typename T>
struct Half16;
template <>
struct Half16<__half> {
  using Pair = __half2;
  static constexpr uint32_t kMagic = 0x6400u;  // 1024.0
  static constexpr uint16_t kNaN = 0x7E00u;
  __device__ static __half FromFloat(float x) { return __float2half_rn(x); }
};
template <>
struct Half16<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x4300u;  // 128.0
  static constexpr uint16_t kNaN = 0x7FC0u;
  __device__ static __nv_bfloat16 FromFloat(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
__device__ __forceinline__ T HalfFromBits(uint16_t bits) {
  T v;
  memcpy(&v, &bits, 2);
  return v;
}

template <typename T>
__device__ __forceinline__ uint16_t HalfBits(T v) {
  uint16_t bits;
  memcpy(&bits, &v, 2);
  return bits;
}

// Nibble of (row r + 8 rho, column offset d) in a lane word.
__device__ __forceinline__ int NibbleOf(int d, int rho) { return 4 * (d & 1) + 2 * (d >> 1) + rho; }

// =========================================================================================================
// 1. Quantization (round to nearest; the rule of src/int4/mod.rs, operation for operation).
// =========================================================================================================

// clamp(v + z, 0, 15), NaN to 0, exactly as int4::quantize_value / clamp_code.
__device__ __forceinline__ uint32_t ClampCode(float v, uint32_t z) {
  v = __fadd_rn(v, static_cast<float>(z));
  if (v >= 15.0f) return 15u;
  if (v >= 0.0f) return static_cast<uint32_t>(v);
  return 0u;
}

// 1 / s if s is usable (positive, finite, finite reciprocal), else 0.
__device__ __forceinline__ float ScaleReciprocal(float s) {
  const float r = __fdiv_rn(1.0f, s);
  return (s > 0.0f && isfinite(s) && isfinite(r)) ? r : 0.0f;
}

template <typename In>
__device__ __forceinline__ void Unpack8(const uint4& raw, float* out) {
  const In* v = reinterpret_cast<const In*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = ToFloat(v[i]);
}

// Warp per (row tile, span of max(64, kGroup) columns).
template <typename In, typename S, int kGroup>
__device__ __forceinline__ void Int4Quantize(const In* __restrict__ weights, int64_t n, int64_t k,
                                             const S* __restrict__ given_scales,
                                             const uint8_t* __restrict__ given_zeros, uint4* __restrict__ packed,
                                             S* __restrict__ scales, uint8_t* __restrict__ zeros) {
  constexpr int kChunks = kGroup == 128 ? 2 : 1;
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kQuantizeWarps + threadIdx.x / 32;
  const int64_t chunks_per_row = k / kTileCols;
  const int64_t spans_per_row = chunks_per_row / kChunks;
  if (warp >= (n / 16) * spans_per_row) return;
  const int64_t tile_row = warp / spans_per_row;
  const int64_t first_chunk = (warp % spans_per_row) * kChunks;
  const int quad_row = lane / 4, quad_pos = lane % 4;

  // values[c][rho][h][i]: chunk c, row r + 8 rho, half h, column 32 h + 8 quad_pos + i of the chunk.
  float values[kChunks][2][2][8];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int rho = 0; rho < 2; ++rho) {
      const int64_t row = tile_row * 16 + quad_row + 8 * rho;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t col = (first_chunk + c) * kTileCols + 32 * h + 8 * quad_pos;
        Unpack8<In>(__ldg(reinterpret_cast<const uint4*>(weights + row * k + col)), values[c][rho][h]);
      }
    }
  }

  // Per (rho, piece) scale reciprocal and zero; a piece is a half chunk (g = 32), a chunk (g = 64) or the span.
  constexpr int kPieces = 2 * kChunks;
  constexpr int kHalvesPerGroup = kGroup / 32;
  float reciprocal[2][kPieces];
  uint32_t zero[2][kPieces];
#pragma unroll
  for (int rho = 0; rho < 2; ++rho) {
    const int64_t row = tile_row * 16 + quad_row + 8 * rho;
#pragma unroll
    for (int piece = 0; piece < kPieces; ++piece) {
      const int first_half = piece - piece % kHalvesPerGroup;  // first half of this piece's group
      const int64_t meta = ((first_chunk * 2 + first_half) * 32 / kGroup) * n + row;
      if (given_scales != nullptr) {
        reciprocal[rho][piece] = ScaleReciprocal(ToFloat(given_scales[meta]));
        zero[rho][piece] = given_zeros[meta];
        continue;
      }
      if (piece != first_half) {  // same group as an earlier piece
        reciprocal[rho][piece] = reciprocal[rho][first_half];
        zero[rho][piece] = zero[rho][first_half];
        continue;
      }
      float lo = 0.0f, hi = 0.0f;
      bool finite = true;
#pragma unroll
      for (int h = 0; h < kPieces; ++h) {
        if (h < first_half || h >= first_half + kHalvesPerGroup) continue;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float w = values[h / 2][rho][h % 2][i];
          finite = finite && isfinite(w);
          lo = w < lo ? w : lo;
          hi = w > hi ? w : hi;
        }
      }
#pragma unroll
      for (int offset = 1; offset < 4; offset <<= 1) {  // the quad holding this row pair
        const float other_lo = __shfl_xor_sync(0xFFFFFFFFu, lo, offset);
        const float other_hi = __shfl_xor_sync(0xFFFFFFFFu, hi, offset);
        finite = __shfl_xor_sync(0xFFFFFFFFu, finite, offset) && finite;
        lo = other_lo < lo ? other_lo : lo;
        hi = other_hi > hi ? other_hi : hi;
      }
      S scale = Half16<S>::FromFloat(__fdiv_rn(__fsub_rn(hi, lo), 15.0f));
      float r = 0.0f;
      uint32_t z = 0;
      if (!finite || !isfinite(ToFloat(scale))) {
        scale = HalfFromBits<S>(Half16<S>::kNaN);
      } else {
        r = ScaleReciprocal(ToFloat(scale));
        if (r == 0.0f) {
          scale = Half16<S>::FromFloat(1.0f);
          r = 1.0f;
        }
        z = ClampCode(rintf(__fmul_rn(-lo, r)), 0);
      }
      reciprocal[rho][piece] = r;
      zero[rho][piece] = z;
      if (quad_pos == 0) {
        scales[meta] = scale;
        zeros[meta] = static_cast<uint8_t>(z);
      }
    }
  }

#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    uint32_t words[4];
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      const int h = t / 2, piece = 2 * c + h;
      uint32_t word = 0;
#pragma unroll
      for (int d = 0; d < 4; ++d) {
#pragma unroll
        for (int rho = 0; rho < 2; ++rho) {
          const float r = reciprocal[rho][piece];
          const uint32_t code =
              r == 0.0f ? 0u : ClampCode(rintf(__fmul_rn(values[c][rho][h][4 * (t % 2) + d], r)), zero[rho][piece]);
          word |= code << (4 * NibbleOf(d, rho));
        }
      }
      words[t] = word;
    }
    packed[(tile_row * chunks_per_row + first_chunk + c) * kLanesPerTile + lane] =
        make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// =========================================================================================================
// 2. GEMV / skinny GEMM.
// =========================================================================================================

__device__ __forceinline__ uint4 LoadStreaming(const uint4* p) {
#ifdef SPECDEC_SIM
  return specdec_sim::LoadGlobalNc(p);
#else
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
#endif
}

// (a & b) | c in one instruction.
__device__ __forceinline__ uint32_t AndOr(uint32_t a, uint32_t b, uint32_t c) {
#ifdef SPECDEC_SIM
  return specdec_sim::Lop3(a, b, c, 0xEA);
#else
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
#endif
}

// The A registers (q - z, exact) of one lane word; zero_pair[rho] is the pair (magic | z_rho) for both halves.
template <typename A>
__device__ __forceinline__ void Dequantize(uint32_t word, const uint32_t* zero_pair, uint32_t* a) {
  using Pair = typename Half16<A>::Pair;
  constexpr uint32_t kMagicPair = Half16<A>::kMagic * 0x10001u;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t biased = AndOr(word >> (4 * i), 0x000F000Fu, kMagicPair);
    Pair diff = __hsub2(*reinterpret_cast<const Pair*>(&biased), *reinterpret_cast<const Pair*>(&zero_pair[i & 1]));
    a[i] = *reinterpret_cast<uint32_t*>(&diff);
  }
}

// What one warp needs of one K chunk (64 columns) of its row tiles from HBM: the weight words and the scales and
// zeros of the chunk's groups (one group for g = 64 and 128, two for g = 32). The loop below loads the next
// chunk's ChunkData before it multiplies the current one, so two chunks of weights are in flight per warp.
template <typename A, typename S, int kMTiles, int kRowTiles, int kGroup>
struct ChunkData {
  static constexpr int kGroups = kGroup == 32 ? 2 : 1;  // groups in a 64-column chunk
  uint4 w[kRowTiles];
  uint32_t scale_bits[kRowTiles][kGroups];  // rows r and r + 8: low and high 16 bits
  uint32_t zero_pair[kRowTiles][kGroups][2];

  __device__ __forceinline__ void Load(const uint4* __restrict__ packed, const S* __restrict__ scales,
                                       const uint8_t* __restrict__ zeros, int64_t n, int64_t chunks, int64_t first_tile,
                                       int64_t chunk, int lane) {
    const int quad_row = lane / 4, quad_pos = lane % 4;
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
      w[rt] = LoadStreaming(packed + ((first_tile + rt) * chunks + chunk) * kLanesPerTile + lane);
      const int64_t row0 = (first_tile + rt) * 16 + quad_row;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int64_t meta = ((chunk * kTileCols + 32 * g) / kGroup) * n + row0;
        scale_bits[rt][g] =
            static_cast<uint32_t>(HalfBits(scales[meta])) | (static_cast<uint32_t>(HalfBits(scales[meta + 8])) << 16);
#pragma unroll
        for (int rho = 0; rho < 2; ++rho) {
          zero_pair[rt][g][rho] = (Half16<A>::kMagic | (zeros[meta + 8 * rho] & 0xFu)) * 0x10001u;
        }
      }
    }
  }
};

// A lane's activation fragments for one K chunk: row mt * 8 + quad_row of x, columns 8 quad_pos .. + 8 of each
// half (zeros past row m). Small and read by every block, so they come from L2 and are loaded as they are used.
template <typename A, int kMTiles>
__device__ __forceinline__ void LoadActivations(const A* __restrict__ x, int m, int64_t k, int64_t chunk, int lane,
                                                uint4 (&xb)[kMTiles][2]) {
  const int quad_row = lane / 4, quad_pos = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    const int row = mt * 8 + quad_row;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      xb[mt][h] = row < m
                      ? __ldg(reinterpret_cast<const uint4*>(x + row * k + chunk * kTileCols + 32 * h + 8 * quad_pos))
                      : make_uint4(0, 0, 0, 0);
    }
  }
}

template <typename A, typename S, int kMTiles, int kRowTiles, int kGroup>
__device__ __forceinline__ void Int4GemvGroups(const uint4* __restrict__ packed, const S* __restrict__ scales,
                                               const uint8_t* __restrict__ zeros, const A* __restrict__ x,
                                               A* __restrict__ y, int m, int64_t n, int64_t k,
                                               float* __restrict__ k_partial,
                                               float (*partial)[kRowTiles][kMTiles][4][32]) {
  using Chunk = ChunkData<A, S, kMTiles, kRowTiles, kGroup>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t chunks = k / kTileCols;
  const int64_t first_tile = static_cast<int64_t>(blockIdx.x) * kRowTiles;
  // Split K: block (x, s) takes chunks [begin, end) of K, s = 0 .. gridDim.y - 1 (one split when N fills the
  // device); its warps take them round-robin.
  const int64_t per_split = (chunks + gridDim.y - 1) / gridDim.y;
  const int64_t begin = blockIdx.y * per_split;
  const int64_t end = begin + per_split < chunks ? begin + per_split : chunks;

  float acc[kRowTiles][kMTiles][4];
#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[rt][mt][i] = 0.0f;

  Chunk current, next;
  if (begin + warp < end) current.Load(packed, scales, zeros, n, chunks, first_tile, begin + warp, lane);
  for (int64_t chunk = begin + warp; chunk < end; chunk += kGemvWarps) {
    // The warp's next chunk is requested before this one's MMAs, so its loads overlap them.
    if (chunk + kGemvWarps < end) {
      next.Load(packed, scales, zeros, n, chunks, first_tile, chunk + kGemvWarps, lane);
    }
    uint4 xb[kMTiles][2];
    LoadActivations<A, kMTiles>(x, m, k, chunk, lane, xb);
#pragma unroll
    for (int rt = 0; rt < kRowTiles; ++rt) {
      const uint32_t words[4] = {current.w[rt].x, current.w[rt].y, current.w[rt].z, current.w[rt].w};
      float group_acc[kMTiles][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int g = kGroup == 32 ? h : 0;  // each half of a chunk lies in one group
        if (h == 0 || kGroup == 32) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) group_acc[mt][i] = 0.0f;
        }
#pragma unroll
        for (int t = 2 * h; t < 2 * h + 2; ++t) {
          uint32_t a[4];
          Dequantize<A>(words[t], current.zero_pair[rt][g], a);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            const uint4& v = xb[mt][h];
            const uint32_t b0 = (t % 2 == 0) ? v.x : v.z;
            const uint32_t b1 = (t % 2 == 0) ? v.y : v.w;
            Mma16816<A>(group_acc[mt], a, b0, b1);
          }
        }
        if (h == 1 || kGroup == 32) {  // the group's part in this chunk is complete: scale it in fp32
          const float scale0 = ToFloat(HalfFromBits<S>(static_cast<uint16_t>(current.scale_bits[rt][g])));
          const float scale1 = ToFloat(HalfFromBits<S>(static_cast<uint16_t>(current.scale_bits[rt][g] >> 16)));
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            acc[rt][mt][0] = fmaf(scale0, group_acc[mt][0], acc[rt][mt][0]);
            acc[rt][mt][1] = fmaf(scale0, group_acc[mt][1], acc[rt][mt][1]);
            acc[rt][mt][2] = fmaf(scale1, group_acc[mt][2], acc[rt][mt][2]);
            acc[rt][mt][3] = fmaf(scale1, group_acc[mt][3], acc[rt][mt][3]);
          }
        }
      }
    }
    if (chunk + kGemvWarps < end) current = next;  // the last chunk has no next: nothing to copy
  }

#pragma unroll
  for (int rt = 0; rt < kRowTiles; ++rt)
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][rt][mt][i][lane] = acc[rt][mt][i];
  __syncthreads();

  // Sum the warps in a fixed order; C fragment element i of lane l is row l / 4 + 8 (i / 2), column (activation
  // row) 2 (l % 4) + i % 2 of its 16 x 8 tile.
  constexpr int kOutputs = kRowTiles * kMTiles * 4 * 32;
  for (int e = threadIdx.x; e < kOutputs; e += kGemvWarps * 32) {
    const int l = e % 32, i = (e / 32) % 4, mt = (e / 128) % kMTiles, rt = e / (128 * kMTiles);
    const int xrow = mt * 8 + 2 * (l % 4) + i % 2;
    if (xrow >= m) continue;
    float sum = 0.0f;
#pragma unroll
    for (int wv = 0; wv < kGemvWarps; ++wv) sum += partial[wv][rt][mt][i][l];
    const int64_t row = (first_tile + rt) * 16 + l / 4 + 8 * (i / 2);
    if (gridDim.y == 1) {
      y[xrow * n + row] = Half16<A>::FromFloat(sum);
    } else {
      k_partial[(static_cast<int64_t>(blockIdx.y) * m + xrow) * n + row] = sum;  // summed by Int4GemvSplitSum
    }
  }
}

// The group size is a template parameter (no branch on it in the loop, and a chunk's metadata is loaded with
// its weights); one entry point per type and tile shape dispatches on it once.
template <typename A, typename S, int kMTiles, int kRowTiles>
__device__ __forceinline__ void Int4Gemv(const uint4* __restrict__ packed, const S* __restrict__ scales,
                                         const uint8_t* __restrict__ zeros, const A* __restrict__ x, A* __restrict__ y,
                                         int m, int64_t n, int64_t k, int group, float* k_partial) {
  // One array for the three instantiations (each would otherwise get its own shared memory).
  __shared__ float partial[kGemvWarps][kRowTiles][kMTiles][4][32];
  if (group == 32) {
    Int4GemvGroups<A, S, kMTiles, kRowTiles, 32>(packed, scales, zeros, x, y, m, n, k, k_partial, partial);
  } else if (group == 64) {
    Int4GemvGroups<A, S, kMTiles, kRowTiles, 64>(packed, scales, zeros, x, y, m, n, k, k_partial, partial);
  } else {
    Int4GemvGroups<A, S, kMTiles, kRowTiles, 128>(packed, scales, zeros, x, y, m, n, k, k_partial, partial);
  }
}

// y[i] = the sum of the K splits' partials of output i, in split order (deterministic: no atomics).
template <typename A>
__device__ __forceinline__ void Int4GemvSplitSum(const float* __restrict__ k_partial, A* __restrict__ y,
                                                 int64_t outputs, int splits) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= outputs) return;
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s) sum += k_partial[s * outputs + i];
  y[i] = Half16<A>::FromFloat(sum);
}

}  // namespace specdec

// Entry points: C names for the driver API.
#define SPECDEC_INT4_QUANTIZE(suffix, In, S)                                                                 \
  extern "C" __global__ void __launch_bounds__(specdec::kQuantizeWarps * 32)                                 \
      Int4QuantizeKernel_##suffix(const In* weights, int64_t n, int64_t k, int group, const S* given_scales, \
                                  const uint8_t* given_zeros, uint4* packed, S* scales, uint8_t* zeros) {    \
    if (group == 32) {                                                                                       \
      specdec::Int4Quantize<In, S, 32>(weights, n, k, given_scales, given_zeros, packed, scales, zeros);     \
    } else if (group == 64) {                                                                                \
      specdec::Int4Quantize<In, S, 64>(weights, n, k, given_scales, given_zeros, packed, scales, zeros);     \
    } else {                                                                                                 \
      specdec::Int4Quantize<In, S, 128>(weights, n, k, given_scales, given_zeros, packed, scales, zeros);    \
    }                                                                                                        \
  }                                                                                                          \
  SPECDEC_SIM_ENTRY(Int4QuantizeKernel_##suffix)

SPECDEC_INT4_QUANTIZE(f16_f16, __half, __half)
SPECDEC_INT4_QUANTIZE(f16_bf16, __half, __nv_bfloat16)
SPECDEC_INT4_QUANTIZE(bf16_f16, __nv_bfloat16, __half)
SPECDEC_INT4_QUANTIZE(bf16_bf16, __nv_bfloat16, __nv_bfloat16)

#define SPECDEC_INT4_GEMV(suffix, A, S, kMTiles, kRowTiles)                                                        \
  extern "C" __global__ void __launch_bounds__(specdec::kGemvWarps * 32)                                           \
      Int4GemvKernel_##suffix(const uint4* packed, const S* scales, const uint8_t* zeros, const A* x, A* y, int m, \
                              int64_t n, int64_t k, int group, float* k_partial) {                                 \
    specdec::Int4Gemv<A, S, kMTiles, kRowTiles>(packed, scales, zeros, x, y, m, n, k, group, k_partial);           \
  }                                                                                                                \
  SPECDEC_SIM_ENTRY(Int4GemvKernel_##suffix)

#define SPECDEC_INT4_GEMV_ROW_TILES(suffix, A, S, kMTiles) \
  SPECDEC_INT4_GEMV(suffix##_r1, A, S, kMTiles, 1)         \
  SPECDEC_INT4_GEMV(suffix##_r2, A, S, kMTiles, 2)         \
  SPECDEC_INT4_GEMV(suffix##_r4, A, S, kMTiles, 4)

#define SPECDEC_INT4_GEMV_M(suffix, A, S)           \
  SPECDEC_INT4_GEMV_ROW_TILES(suffix##_m8, A, S, 1) \
  SPECDEC_INT4_GEMV_ROW_TILES(suffix##_m16, A, S, 2)

SPECDEC_INT4_GEMV_M(f16_f16, __half, __half)
SPECDEC_INT4_GEMV_M(f16_bf16, __half, __nv_bfloat16)
SPECDEC_INT4_GEMV_M(bf16_f16, __nv_bfloat16, __half)
SPECDEC_INT4_GEMV_M(bf16_bf16, __nv_bfloat16, __nv_bfloat16)

#define SPECDEC_INT4_GEMV_SPLIT_SUM(suffix, A)                                                     \
  extern "C" __global__ void __launch_bounds__(256)                                                \
      Int4GemvSplitSumKernel_##suffix(const float* k_partial, A* y, int64_t outputs, int splits) { \
    specdec::Int4GemvSplitSum<A>(k_partial, y, outputs, splits);                                   \
  }                                                                                                \
  SPECDEC_SIM_ENTRY(Int4GemvSplitSumKernel_##suffix)

SPECDEC_INT4_GEMV_SPLIT_SUM(f16, __half)
SPECDEC_INT4_GEMV_SPLIT_SUM(bf16, __nv_bfloat16)
