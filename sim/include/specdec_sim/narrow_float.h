// Rounding to the 16-bit float formats, shared by the simulator's cuda_fp16.h and cuda_bf16.h.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

namespace specdec_sim {

// A narrow binary format: `mantissa` stored bits, exponent bias `bias`, `exponent_bits` exponent bits.
struct NarrowFormat {
  int mantissa;
  int exponent_bits;
  int bias;
  uint16_t canonical_nan;
};
constexpr NarrowFormat kHalf{10, 5, 15, 0x7FFF};
constexpr NarrowFormat kBfloat16{7, 8, 127, 0x7FFF};

// The value of a narrow format's bits, exactly (every f16 and bf16 value is a double).
inline double NarrowToDouble(uint16_t bits, NarrowFormat f) {
  const int exp_field = (bits >> f.mantissa) & ((1 << f.exponent_bits) - 1);
  const uint32_t mant = bits & ((1u << f.mantissa) - 1);
  const double sign = (bits & 0x8000u) ? -1.0 : 1.0;
  if (exp_field == (1 << f.exponent_bits) - 1) return mant ? NAN : sign * INFINITY;
  if (exp_field == 0) return sign * ldexp(static_cast<double>(mant), 1 - f.bias - f.mantissa);
  return sign * ldexp(static_cast<double>(mant | (1u << f.mantissa)), exp_field - f.bias - f.mantissa);
}

// hi + lo (|lo| below half an ulp of hi in double, as from an exact two-sum) rounded to nearest even in the
// narrow format, with overflow to infinity, gradual underflow, and NaN to the canonical NaN. `lo` only breaks
// ties and exact-looking cases, so the result is the correctly rounded hi + lo.
inline uint16_t DoubleToNarrow(double hi, double lo, NarrowFormat f) {
  if (hi != hi) return f.canonical_nan;
  const uint16_t sign = signbit(hi) ? 0x8000u : 0u;
  if (isinf(hi)) return sign | static_cast<uint16_t>(((1u << f.exponent_bits) - 1) << f.mantissa);
  if (hi == 0.0) return sign;
  const double a = fabs(hi);
  const double rest = hi < 0 ? -lo : lo;
  int e;
  frexp(a, &e);  // a = m 2^e, m in [0.5, 1)
  // The unit in the last place at a's magnitude: 2^(e - 1 - mantissa), not below the subnormal ulp.
  int ulp_exp = e - 1 - f.mantissa;
  const int min_ulp_exp = 1 - f.bias - f.mantissa;
  if (ulp_exp < min_ulp_exp) ulp_exp = min_ulp_exp;
  // a / ulp = integral + fraction, both exact; |rest / ulp| is below half the fraction's granularity, so it
  // decides only an exact tie (a value just below an integer still rounds to that integer).
  const double scaled = ldexp(a, -ulp_exp);
  double integral = floor(scaled);
  const double fraction = scaled - integral;
  const double rest_scaled = ldexp(rest, -ulp_exp);
  const bool up =
      fraction > 0.5 || (fraction == 0.5 && (rest_scaled > 0 || (rest_scaled == 0 && fmod(integral, 2.0) == 1.0)));
  if (up) integral += 1.0;
  // integral * 2^ulp_exp is the rounded magnitude; encode it.
  const double rounded = ldexp(integral, ulp_exp);
  const double largest =
      ldexp(static_cast<double>((2u << f.mantissa) - 1), (1 << f.exponent_bits) - 2 - f.bias - f.mantissa);
  if (rounded > largest) return sign | static_cast<uint16_t>(((1u << f.exponent_bits) - 1) << f.mantissa);
  if (rounded == 0.0) return sign;
  int re;
  frexp(rounded, &re);
  const int biased = re - 1 + f.bias;
  if (biased <= 0) {  // subnormal
    return sign | static_cast<uint16_t>(ldexp(rounded, f.bias - 1 + f.mantissa));
  }
  const uint32_t mant = static_cast<uint32_t>(ldexp(rounded, f.mantissa - (re - 1))) & ((1u << f.mantissa) - 1);
  return sign | static_cast<uint16_t>((biased << f.mantissa) | mant);
}

// a op b in the narrow format: the exact result (a two-sum or a product in double) rounded once.
inline uint16_t NarrowAdd(uint16_t a, uint16_t b, NarrowFormat f) {
  const double x = NarrowToDouble(a, f), y = NarrowToDouble(b, f);
  const double s = x + y;
  const double bb = s - x;
  const double err = (x - (s - bb)) + (y - bb);
  return DoubleToNarrow(s, isfinite(s) ? err : 0.0, f);
}
inline uint16_t NarrowMul(uint16_t a, uint16_t b, NarrowFormat f) {
  const double x = NarrowToDouble(a, f), y = NarrowToDouble(b, f);
  const double p = x * y;  // exact: 11 x 11 or 8 x 8 significant bits
  return DoubleToNarrow(p, 0.0, f);
}

}  // namespace specdec_sim
