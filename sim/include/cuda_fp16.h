// The simulator's cuda_fp16.h: __half and __half2 as bit containers with CUDA's conversions and arithmetic,
// each correctly rounded (round to nearest even; NaN becomes the canonical NaN 0x7FFF, as the GPU's cvt does).
#pragma once

#include "specdec_sim/narrow_float.h"

struct __align__(2) __half {
  unsigned short __x;
};
struct __align__(4) __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  return static_cast<float>(specdec_sim::NarrowToDouble(h.__x, specdec_sim::kHalf));
}
inline __half __float2half_rn(float x) { return __half{specdec_sim::DoubleToNarrow(x, 0.0, specdec_sim::kHalf)}; }
inline __half __float2half(float x) { return __float2half_rn(x); }
inline __half __hadd(__half a, __half b) { return __half{specdec_sim::NarrowAdd(a.__x, b.__x, specdec_sim::kHalf)}; }
inline __half __hsub(__half a, __half b) {
  return __half{specdec_sim::NarrowAdd(a.__x, static_cast<unsigned short>(b.__x ^ 0x8000u), specdec_sim::kHalf)};
}
inline __half __hmul(__half a, __half b) { return __half{specdec_sim::NarrowMul(a.__x, b.__x, specdec_sim::kHalf)}; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __half2 __hsub2(__half2 a, __half2 b) { return {__hsub(a.x, b.x), __hsub(a.y, b.y)}; }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
