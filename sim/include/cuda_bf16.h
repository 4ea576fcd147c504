// The simulator's cuda_bf16.h: __nv_bfloat16 and __nv_bfloat162 as bit containers with CUDA's conversions and
// arithmetic, each correctly rounded (round to nearest even; NaN becomes the canonical NaN 0x7FFF).
#pragma once

#include "specdec_sim/narrow_float.h"

struct __align__(2) __nv_bfloat16 {
  unsigned short __x;
};
struct __align__(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  return static_cast<float>(specdec_sim::NarrowToDouble(h.__x, specdec_sim::kBfloat16));
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  return __nv_bfloat16{specdec_sim::DoubleToNarrow(x, 0.0, specdec_sim::kBfloat16)};
}
inline __nv_bfloat16 __float2bfloat16(float x) { return __float2bfloat16_rn(x); }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat16{specdec_sim::NarrowAdd(a.__x, b.__x, specdec_sim::kBfloat16)};
}
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat16{
      specdec_sim::NarrowAdd(a.__x, static_cast<unsigned short>(b.__x ^ 0x8000u), specdec_sim::kBfloat16)};
}
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __nv_bfloat16{specdec_sim::NarrowMul(a.__x, b.__x, specdec_sim::kBfloat16)};
}
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hsub(a.x, b.x), __hsub(a.y, b.y)}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
