// The per-element math of the perturbation ops (normalize, perturb_step, init_noise), shared by
// the CPU (csrc/cpu/perturb.cpp) and CUDA (csrc/cuda/perturb.cu) kernels so both compute the
// same thing. Kernels reduce per group (token scope: the last dim H; sequence scope: the last
// two dims T*H) and then apply these functions elementwise. `acc` is float (double for fp64).
//
// normalize (per group):      inf: y = x / (m + eps), m = max|x|
//                             l2:  y = x / (n + eps), n = ||x||_2
//                             l1:  y = sign(x)
// normalize backward (g = dL/dy, dot = <g, x>, c = #{j : |x_j| = m}):
//   inf: dx_j = g_j / (m + eps) - dot / (m + eps)^2 * sign(x_j) [|x_j| = m] / c   (amax's tie split)
//   l2:  dx_j = g_j / (n + eps) - x_j * dot / (n (n + eps)^2)                  (second term 0 if n = 0)
//   l1:  dx_j = 0
// perturb_step (d = noise, g = grad; a masked token has d = g = 0 in every reduction and
// output 0):
//   paper:         u = normalize(g) (stage 1 reduces g), s = d + step * u;
//                  inf: out = clamp(s, -radius, radius)
//                  l2 / l1: stage 2 reduces n = ||s||_2 / ||s||_1, out = s * (n > radius ? radius / n : 1)
//                  (radius = +inf: out = s, no stage 2)
//   normalize_sum: s = d + step * g (stage 1 reduces s), out = normalize(s)
// init_noise: element i is output (i % 4) of Philox4x32-10(key = seed, counter = (i / 4, 0))
//   turned into 4 normals by Box-Muller (two per pair of uniforms), times std.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SK_HD __host__ __device__ __forceinline__
#else
#define SK_HD inline
#endif

namespace smart_kernels {
namespace perturb {

enum Norm : int { kInf = 0, kL2 = 1, kL1 = 2 };
enum Scope : int { kToken = 0, kSequence = 1 };
enum Rule : int { kPaper = 0, kNormalizeSum = 1 };

template <typename acc>
SK_HD acc sign_of(acc x) {
  return x > acc(0) ? acc(1) : (x < acc(0) ? acc(-1) : x);  // sign(0) = 0, sign(NaN) = NaN
}

// max that propagates NaN (fmax drops it; torch.amax keeps it).
template <typename acc>
SK_HD acc nan_max(acc a, acc b) {
  return (a > b || a != a) ? a : b;
}

struct StepParams {
  double step_size;
  double radius;  // +inf: no projection
  double eps;
  int norm;
  int rule;
};

// Stage 1 exists unless the norm is l1 (sign needs no reduction). Its reduction is max of
// |value| (inf) or sum of value^2 (l2).
SK_HD bool has_stage1(const StepParams& p) { return p.norm != kL1; }

// Stage 2 (paper rule, l2 / l1 projection onto the radius ball): sum of s^2 or |s|.
SK_HD bool has_stage2(const StepParams& p) {
  return p.rule == kPaper && p.norm != kInf && p.radius < INFINITY;
}

// Identity of the stage reductions: 0 for both max|.| and sums.
// Stage-1 contribution of one element.
template <typename acc>
SK_HD acc stage1_term(acc d, acc g, const StepParams& p) {
  const acc v = p.rule == kPaper ? g : d + acc(p.step_size) * g;
  return p.norm == kInf ? (v < acc(0) ? -v : v) : v * v;
}

template <typename acc>
SK_HD acc stage1_combine(acc a, acc b, const StepParams& p) {
  return p.norm == kInf ? nan_max(a, b) : a + b;
}

// The factor normalize() multiplies by, from the finished stage-1 reduction.
template <typename acc>
SK_HD acc stage1_scale(acc r1, const StepParams& p) {
  const acc n = p.norm == kInf ? r1 : static_cast<acc>(std::sqrt(r1));
  return acc(1) / (n + acc(p.eps));
}

// s = d + step * normalize(g) (paper rule).
template <typename acc>
SK_HD acc paper_sum(acc d, acc g, acc scale1, const StepParams& p) {
  const acc u = p.norm == kL1 ? sign_of(g) : g * scale1;
  return d + acc(p.step_size) * u;
}

template <typename acc>
SK_HD acc stage2_term(acc d, acc g, acc scale1, const StepParams& p) {
  const acc s = paper_sum(d, g, scale1, p);
  return p.norm == kL2 ? s * s : (s < acc(0) ? -s : s);
}

// The projection factor from the finished stage-2 sum.
template <typename acc>
SK_HD acc stage2_factor(acc r2, const StepParams& p) {
  const acc n = p.norm == kL2 ? static_cast<acc>(std::sqrt(r2)) : r2;
  const acc radius = acc(p.radius);
  return n > radius ? radius / n : acc(1);
}

// The new noise of an unmasked element (a masked one is 0). scale1 / factor2: 1 when the
// stage does not exist.
template <typename acc>
SK_HD acc step_output(acc d, acc g, acc scale1, acc factor2, const StepParams& p) {
  if (p.rule == kNormalizeSum) {
    const acc s = d + acc(p.step_size) * g;
    return p.norm == kL1 ? sign_of(s) : s * scale1;
  }
  const acc s = paper_sum(d, g, scale1, p);
  if (p.norm == kInf) {
    // clamp(s, -r, r), NaN passes through; as max then min (r >= 0): CPU min/max instructions
    const acc r = acc(p.radius);
    const acc lo = -r > s ? -r : s;
    return r < lo ? r : lo;
  }
  return s * factor2;
}

// ---- normalize ------------------------------------------------------------------------------

// y from the finished reduction r (max|x| for inf, sum x^2 for l2; unused for l1).
template <typename acc>
SK_HD acc normalize_output(acc x, acc r, int norm, double eps) {
  if (norm == kL1) return sign_of(x);
  const acc n = norm == kInf ? r : static_cast<acc>(std::sqrt(r));
  return x / (n + acc(eps));
}

// dx from r (as above), dot = <g, x> and, for inf, ties = #{j : |x_j| = max|x|} (>= 1).
template <typename acc>
SK_HD acc normalize_grad(acc g, acc x, acc r, acc dot, acc ties, int norm, double eps) {
  if (norm == kL1) return acc(0);
  if (norm == kInf) {
    const acc den = r + acc(eps);
    const acc ax = x < acc(0) ? -x : x;
    const acc through_max = ax == r ? sign_of(x) / ties : acc(0);
    return g / den - dot / (den * den) * through_max;
  }
  const acc n = static_cast<acc>(std::sqrt(r));
  const acc den = n + acc(eps);
  const acc second = n > acc(0) ? x * dot / (n * den * den) : acc(0);
  return g / den - second;
}

// ---- init_noise: Philox4x32-10 + Box-Muller --------------------------------------------------

struct Philox4 {
  uint32_t v[4];
};

SK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(prod >> 32);
  return static_cast<uint32_t>(prod);
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11), counter (c0, c1, 0, 0), key = seed.
SK_HD Philox4 philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A uniform in (0, 1): 24 random bits, centred in their cell (never 0, so log is finite).
SK_HD float uniform_open01(uint32_t bits) {
  return (static_cast<float>(bits >> 8) + 0.5f) * (1.0f / 16777216.0f);
}

// Four standard normals from one Philox output (Box-Muller on (v0, v1) and (v2, v3)).
SK_HD void box_muller4(const Philox4& r, float out[4]) {
  const float two_pi = 6.283185307179586f;
  for (int pair = 0; pair < 2; ++pair) {
    const float u1 = uniform_open01(r.v[2 * pair]);
    const float u2 = uniform_open01(r.v[2 * pair + 1]);
    const float radius = std::sqrt(-2.0f * std::log(u1));
    const float theta = two_pi * u2;
    out[2 * pair] = radius * std::cos(theta);
    out[2 * pair + 1] = radius * std::sin(theta);
  }
}

}  // namespace perturb
}  // namespace smart_kernels
