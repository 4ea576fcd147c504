// The samplers' randomness: Philox4x32-10 keyed by a request's seed, indexed by its step, the tree node and the
// token. A bit-for-bit mirror of src/sampling/noise.rs (the CPU reference): same counter layout, same uniform,
// and the same logarithm as a fixed sequence of correctly rounded float operations. The __f*_rn intrinsics
// keep nvcc from contracting a multiply and an add into an FMA, which would change the bits.
#pragma once

#include <stdint.h>

namespace specdec {

enum NoiseDomain : uint32_t { kNoiseToken = 0, kNoiseCoin = 1, kNoiseTokenLow = 2 };

struct Philox4 {
  uint32_t x, y, z, w;
};

__device__ __forceinline__ Philox4 Philox4x32_10(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2,
                                                 uint32_t c3) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return {c0, c1, c2, c3};
}

// The noise source of one request.
struct RequestNoise {
  uint64_t seed, step;

  // The Philox block holding draw `index` of `domain` at `node` (word index % 4 of it).
  __device__ __forceinline__ Philox4 Block(NoiseDomain domain, uint32_t node, uint32_t index) const {
    return Philox4x32_10(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), index / 4,
                         (static_cast<uint32_t>(domain) << 16) | node, static_cast<uint32_t>(step),
                         static_cast<uint32_t>(step >> 32));
  }

  __device__ __forceinline__ uint32_t Bits(NoiseDomain domain, uint32_t node, uint32_t index) const {
    const Philox4 b = Block(domain, node, index);
    switch (index % 4) {
      case 0:
        return b.x;
      case 1:
        return b.y;
      case 2:
        return b.z;
      default:
        return b.w;
    }
  }
};

__device__ __forceinline__ uint32_t PhiloxWord(const Philox4& b, int lane) {
  return lane == 0 ? b.x : lane == 1 ? b.y : lane == 2 ? b.z : b.w;
}

// (2m + 1) / 2^24 with m the top 23 bits: exact, in (0, 1).
__device__ __forceinline__ float UniformFromBits(uint32_t bits) {
  return __fmul_rn(static_cast<float>((bits >> 9) * 2u + 1u), 1.0f / 16777216.0f);
}

// 2 atanh(s) = 2 (s + s^3/3 + ... + s^9/9) for |s| <= 0.172 (noise::two_atanh): the series both logarithms share.
__device__ __forceinline__ float TwoAtanh(float s) {
  const float s2 = __fmul_rn(s, s);
  float series = __fadd_rn(1.0f / 7.0f, __fmul_rn(s2, 1.0f / 9.0f));
  series = __fadd_rn(1.0f / 5.0f, __fmul_rn(s2, series));
  series = __fadd_rn(1.0f / 3.0f, __fmul_rn(s2, series));
  series = __fmul_rn(s2, series);
  const float two_s = __fadd_rn(s, s);
  return __fadd_rn(two_s, __fmul_rn(two_s, series));
}

// ln(x) for positive, normal, finite x: x = 2^e f, f in [sqrt(1/2), sqrt(2)), ln f = 2 atanh(s) by its series.
__device__ __forceinline__ float DeterministicLn(float x) {
  const float kSqrt2 = 1.41421356237309504880f;
  const float kLn2Hi = 0.69314575f;
  const float kLn2Lo = 1.4286068e-6f;
  const uint32_t bits = __float_as_uint(x);
  int e = static_cast<int>((bits >> 23) & 0xFFu) - 127;
  float f = __uint_as_float((bits & 0x007FFFFFu) | 0x3F800000u);
  if (f > kSqrt2) {
    f = __fmul_rn(f, 0.5f);
    e += 1;
  }
  const float s = __fdiv_rn(__fsub_rn(f, 1.0f), __fadd_rn(f, 1.0f));
  const float ln_f = TwoAtanh(s);
  const float ef = static_cast<float>(e);
  return __fadd_rn(__fmul_rn(ef, kLn2Hi), __fadd_rn(ln_f, __fmul_rn(ef, kLn2Lo)));
}

// noise::exponential_of_draw: the Exp(1) draw of a token from its 64 random bits r = high << 32 | low,
// E = -ln(1 - t) with t = 2^-(lz+1) (1 + (2m + 1) / 2^23), lz = min(clz(r), 40), m the 22 bits after r's leading
// one. The low word (Philox of kNoiseTokenLow) is drawn only when the high word has 10 or more leading zeros, 1
// token in 1024: a rare, short divergence. E is in [4.5e-13, 16.7] and known to 2^-22 relative at every size, so
// ties at the top of the race are negligible (see the Rust documentation for the bound).
__device__ __forceinline__ float ExponentialOfDraw(uint32_t high, const RequestNoise& noise, uint32_t node,
                                                   uint32_t token) {
  uint32_t lz = static_cast<uint32_t>(__clz(static_cast<int>(high))), m;
  if (lz <= 9) {
    m = (high >> (9 - lz)) & 0x3FFFFFu;
  } else {
    const uint64_t r = (static_cast<uint64_t>(high) << 32) | noise.Bits(kNoiseTokenLow, node, token);
    lz = min(static_cast<uint32_t>(__clzll(static_cast<long long>(r))), 40u);
    m = static_cast<uint32_t>(r >> (41 - lz)) & 0x3FFFFFu;
  }
  const float t = __uint_as_float(((126u - lz) << 23) | (2u * m + 1u));
  if (lz >= 2) {
    // t < 1/4: -ln(1 - t) = 2 atanh(s), s = t / (2 - t), by its odd series (no cancellation in 1 - t).
    return TwoAtanh(__fdiv_rn(t, __fsub_rn(2.0f, t)));
  }
  return -DeterministicLn(__fsub_rn(1.0f, t));
}

// Lower bound on every ExponentialOfDraw (noise::MIN_EXPONENTIAL): race keys are at most w / kMinExponential
// or z + kMaxGumbel (noise::MAX_GUMBEL >= -ln(kMinExponential)).
constexpr double kMinExponential = 4.5e-13;
constexpr double kMaxGumbel = 28.43;

}  // namespace specdec
