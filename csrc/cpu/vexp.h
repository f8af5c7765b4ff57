// exp() written so that GCC/Clang auto-vectorize loops that call it (libm's expf is an opaque call
// that blocks vectorization without -ffast-math). Cephes' expf: Cody-Waite range reduction
// x = n*ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r (about 1 ulp), then scale by 2^n
// through the exponent bits. Special values follow IEEE: exp(-inf) = 0, exp(+inf) = inf,
// exp(nan) = nan; results that would be subnormal flush to 0.
// Internal linkage: each instruction-set variant of the CPU kernels compiles its own copy.
// Loops that call it vectorize only with -fno-trapping-math (setup.py sets it).
// Included inside a namespace by sym_kl_rows.h, which includes <cmath>, <cstdint>, <cstring> and
// <limits> first.
#pragma once

__attribute__((always_inline)) static inline float vexp(float x) {
  constexpr float kHi = 88.7228317f;    // log(FLT_MAX)
  constexpr float kLo = -87.3365479f;   // log(FLT_MIN): below this the result is subnormal
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float xc = x != x ? 0.0f : (x < kLo ? kLo : (x > kHi ? kHi : x));
  float n = (xc * kLog2e + kRound) - kRound;
  float r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  // 2^n with n in [-126, 128]; split in two factors so that n = 128 does not overflow the bits.
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  const int32_t b1 = (n1 + 127) << 23;
  const int32_t b2 = (n2 + 127) << 23;
  float s1, s2;
  std::memcpy(&s1, &b1, sizeof(float));
  std::memcpy(&s2, &b2, sizeof(float));
  float res = y * s1 * s2;
  res = x > kHi ? std::numeric_limits<float>::infinity() : res;
  res = x < kLo ? 0.0f : res;
  return x != x ? x : res;
}

__attribute__((always_inline)) static inline double vexp(double x) { return std::exp(x); }
