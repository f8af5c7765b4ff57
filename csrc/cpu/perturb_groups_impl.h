// The perturbation ops' group kernels (normalize, normalize_bwd, perturb_step), CPU: the
// reductions of a chunk and the elementwise output. Per group of L elements (token scope: the
// last dim; sequence scope: the last two), a masked token contributing 0 and getting 0:
//   normalize      inf: y = x / (m + eps), m = max|x|;  l2: y = x / (n + eps), n = ||x||_2;
//                  l1: y = sign(x)
//   normalize_bwd  (g = dL/dy, dot = <g, x>, c = #{j : |x_j| = m})
//                  inf: dx_j = g_j / (m + eps) - dot / (m + eps)^2 * sign(x_j) [|x_j| = m] / c
//                  l2:  dx_j = g_j / (n + eps) - x_j * dot / (n (n + eps)^2)   (0 if n = 0)
//   perturb_step   paper: s = d + step * normalize(g); inf: clamp(s, -radius, radius);
//                  l2 / l1: s * min(1, radius / ||s||)  (no gradient: never differentiated)
//                  normalize_sum: normalize(d + step * g)
// The elementwise math is ../perturb_math.h (shared with CUDA); the reduction order and the
// threading are in perturb.cpp (its module comment). This header is compiled once per
// instruction set (perturb_groups_<isa>.cpp, each in its own namespace SK_CPU_ISA) and
// perturb.cpp picks a copy at run time (isa.h). Each op is a template on dtype, norm and rule,
// so the inner loops hold no branch on them: plain loops over contiguous memory (restrict
// pointers) and kLanes-wide lane loops that the compiler vectorizes, bf16 / fp16 converted to
// fp32 in the loop (bf16: a 16-bit shift); max|v| is an integer max over the bits (AbsBits).
// Include only from perturb_groups_<isa>.cpp, after defining SK_CPU_ISA.
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../acc_type.h"
#include "../perturb_math.h"
#include "perturb_groups.h"

// Everything below (and nothing above: headers shared with other files) gets the target ISA.
#ifdef SK_CPU_ISA_AVX2
#pragma GCC target("avx2,fma")
#endif

namespace smart_kernels {
namespace SK_CPU_ISA {
namespace {

using perturb::kInf;
using perturb::kL1;
using perturb::kL2;
using perturb::kNormalizeSum;
using perturb::kPaper;
using perturb::nan_max;
using perturb::StepParams;
using perturb_cpu::GroupArgs;
using perturb_cpu::GroupKernels;
using perturb_cpu::GroupState;
using perturb_cpu::kBlock;
using perturb_cpu::kLanes;
using perturb_cpu::Partial;

// Inline every call of the hot loops (GCC otherwise keeps e.g. step_output out of line in some
// instantiations, and a call in a loop stops its vectorization).
#if defined(__GNUC__)
#define SK_FLATTEN __attribute__((flatten))
#else
#define SK_FLATTEN
#endif

// ---- traversal ------------------------------------------------------------------------------

// Calls fn(l, i) for i in [a, b) with lane l = (i - base) % kLanes. The main loop's body is
// kLanes independent lanes; `omp simd` has GCC vectorize it as a loop (left to the SLP
// vectorizer after full unrolling, the selects of nan_max and of the tie count stay branches).
template <typename Fn>
inline void lane_loop(int64_t a, int64_t b, int64_t base, const Fn& fn) {
  int64_t i = a;
  for (int l = static_cast<int>((a - base) % kLanes); l > 0 && l < kLanes && i < b; ++l, ++i) {
    fn(l, i);
  }
  for (; i + kLanes <= b; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) fn(l, i + l);
  }
  for (int l = 0; i < b; ++l, ++i) fn(l, i);
}

// Calls kept(a, b) / masked(a, b) for the maximal runs of [c0, c1) whose tokens (H elements
// each) are kept / masked; all of [c0, c1) is kept without a mask.
template <typename Kept, typename Masked>
inline void for_each_run(int64_t c0, int64_t c1, int64_t H, const bool* mask, const Kept& kept,
                         const Masked& masked) {
  if (c0 >= c1) return;
  if (mask == nullptr) {
    kept(c0, c1);
    return;
  }
  int64_t r = c0 / H;
  const int64_t r_last = (c1 - 1) / H;
  while (r <= r_last) {
    const bool keep = mask[r];
    const int64_t first = r;
    while (r <= r_last && mask[r] == keep) ++r;
    const int64_t a = std::max(c0, first * H), b = std::min(c1, r * H);
    if (keep) {
      kept(a, b);
    } else {
      masked(a, b);
    }
  }
}

// Visits the kept elements of [c0, c1) block by block: visit(l, i) for each (lane l), then
// block_done() after each block.
template <typename Visit, typename BlockDone>
inline void for_each_block(int64_t c0, int64_t c1, int64_t H, const bool* mask,
                           const Visit& visit, const BlockDone& block_done) {
  for (int64_t b0 = c0; b0 < c1; b0 += kBlock) {
    const int64_t b1 = std::min(b0 + kBlock, c1);
    for_each_run(
        b0, b1, H, mask, [&](int64_t a, int64_t b) { lane_loop(a, b, b0, visit); },
        [](int64_t, int64_t) {});
    block_done();
  }
}

// Fold of combine over term(i) for the kept i of [c0, c1) (identity 0), in the fixed order of
// the module comment. combine is a generic callable (used in acc_t and in double).
template <typename acc_t, typename Term, typename Combine>
SK_FLATTEN double fold_chunk(int64_t c0, int64_t c1, int64_t H, const bool* mask,
                             const Term& term, const Combine& combine) {
  acc_t lanes[kLanes];
  std::fill(lanes, lanes + kLanes, acc_t(0));
  double total = 0;
  for_each_block(
      c0, c1, H, mask, [&](int l, int64_t i) { lanes[l] = combine(lanes[l], term(i)); },
      [&] {
        acc_t block = lanes[0];
        for (int l = 1; l < kLanes; ++l) block = combine(block, lanes[l]);
        total = combine(total, static_cast<double>(block));
        std::fill(lanes, lanes + kLanes, acc_t(0));
      });
  return total;
}

// Max reductions of |v| run on the bit patterns: with the sign bit cleared a float (of any
// width) orders as its bits read as an unsigned integer, and every NaN lies above +inf. So
// max|v| = the value of max(bits(v) & ~sign), NaN if any v is NaN, in one integer max per
// element (vectorized; bf16 / fp16 inputs need no conversion). A max is exact in any order:
// the result equals the lane fold of nan_max over |v| (up to the sign of a zero max, which no
// output depends on).
template <typename T>
struct AbsBits;
template <>
struct AbsBits<float> {
  using type = uint32_t;
  static type of(float v) { return c10::bit_cast<uint32_t>(v) & 0x7FFFFFFFu; }
  static double value(type b) { return c10::bit_cast<float>(b); }
};
template <>
struct AbsBits<double> {
  using type = uint64_t;
  static type of(double v) { return c10::bit_cast<uint64_t>(v) & 0x7FFFFFFFFFFFFFFFull; }
  static double value(type b) { return c10::bit_cast<double>(b); }
};
template <typename T>
struct AbsBits16 {  // bfloat16, float16: 16 bits, the sign bit on top
  using type = uint16_t;
  static type of(T v) { return v.x & 0x7FFFu; }
  static double value(type b) { return static_cast<float>(T(b, T::from_bits())); }
};
template <>
struct AbsBits<c10::BFloat16> : AbsBits16<c10::BFloat16> {};
template <>
struct AbsBits<c10::Half> : AbsBits16<c10::Half> {};

// max |term(i)| over the kept i of [c0, c1) (0 if none; NaN if any is NaN); term(i) returns a
// value of type T.
template <typename T, typename Term>
SK_FLATTEN double max_abs_chunk(int64_t c0, int64_t c1, int64_t H, const bool* mask,
                                const Term& term) {
  using B = AbsBits<T>;
  typename B::type m = 0;
  for_each_run(
      c0, c1, H, mask,
      [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) {
          const typename B::type v = B::of(term(i));
          m = v > m ? v : m;
        }
      },
      [](int64_t, int64_t) {});
  return B::value(m);
}

inline Partial merge_max(const Partial& a, const Partial& b) { return {nan_max(a.r, b.r), 0, 0}; }
inline Partial merge_sum(const Partial& a, const Partial& b) { return {a.r + b.r, 0, 0}; }

// (max, ties) pairs: the count of the larger max (both counts when equal); NaN propagates (its
// count is irrelevant: everything downstream is NaN).
template <typename T>
inline void merge_ties(T& m, T& c, T m2, T c2) {
  const T nm = nan_max(m, m2);
  c = (m == nm ? c : T(0)) + (m2 == nm ? c2 : T(0));
  m = nm;
}

// ---- normalize ------------------------------------------------------------------------------

// Reduction of normalize: max|x| (inf) or sum x^2 (l2); none for l1.
template <typename scalar_t, int NORM>
struct NormalizeOp {
  using acc_t = typename AccType<scalar_t>::type;
  struct State {
    acc_t r;  // max|x| or sum x^2
    explicit State(const GroupState& g) : r(static_cast<acc_t>(g.v[0])) {}
    void store(GroupState& g) const { g.v[0] = r; }
  };
  const scalar_t* x;
  scalar_t* y;
  int64_t H;
  double eps;

  explicit NormalizeOp(const GroupArgs& a)
      : x(static_cast<const scalar_t*>(a.x)), y(static_cast<scalar_t*>(a.out)), H(a.H),
        eps(a.p.eps) {}

  int stages() const { return NORM == kL1 ? 0 : 1; }
  SK_FLATTEN Partial reduce(int, int64_t c0, int64_t c1, const State&) const {
    const scalar_t* xp = x;
    if constexpr (NORM == kInf) {
      return {max_abs_chunk<scalar_t>(c0, c1, H, nullptr, [xp](int64_t i) { return xp[i]; }), 0,
              0};
    } else {
      const auto term = [xp](int64_t i) {
        const acc_t v = static_cast<acc_t>(xp[i]);
        return v * v;
      };
      return {fold_chunk<acc_t>(c0, c1, H, nullptr, term, [](auto a, auto b) { return a + b; }),
              0, 0};
    }
  }
  Partial merge(int, const Partial& a, const Partial& b) const {
    return NORM == kInf ? merge_max(a, b) : merge_sum(a, b);
  }
  void finish(int, const Partial& t, State& st) const { st.r = static_cast<acc_t>(t.r); }
  SK_FLATTEN void apply(int64_t c0, int64_t c1, const State& st) const {
    const acc_t r = st.r;
    const double e = eps;
    const scalar_t* __restrict__ xp = x;
    scalar_t* __restrict__ yp = y;
    for (int64_t i = c0; i < c1; ++i) {
      yp[i] = static_cast<scalar_t>(
          perturb::normalize_output<acc_t>(static_cast<acc_t>(xp[i]), r, NORM, e));
    }
  }
};

// Backward of normalize (inf / l2): one pass reduces (max|x| with its tie count, <g, x>) or
// (sum x^2, <g, x>), then dx = normalize_grad(...).
template <typename scalar_t, int NORM>
struct NormalizeBwdOp {
  using acc_t = typename AccType<scalar_t>::type;
  struct State {
    acc_t r, dot, ties;  // max|x| or sum x^2, <g, x>, #{j : |x_j| = max|x|}
    explicit State(const GroupState& s)
        : r(static_cast<acc_t>(s.v[0])),
          dot(static_cast<acc_t>(s.v[1])),
          ties(static_cast<acc_t>(s.v[2])) {}
    void store(GroupState& s) const {
      s.v[0] = r;
      s.v[1] = dot;
      s.v[2] = ties;
    }
  };
  const scalar_t* g;
  const scalar_t* x;
  scalar_t* dx;
  int64_t H;
  double eps;

  explicit NormalizeBwdOp(const GroupArgs& a)
      : g(static_cast<const scalar_t*>(a.x)), x(static_cast<const scalar_t*>(a.y)),
        dx(static_cast<scalar_t*>(a.out)), H(a.H), eps(a.p.eps) {}

  int stages() const { return 1; }
  SK_FLATTEN Partial reduce(int, int64_t c0, int64_t c1, const State&) const {
    const scalar_t* gp = g;
    const scalar_t* xp = x;
    acc_t m[kLanes], c[kLanes], dot[kLanes];
    std::fill(m, m + kLanes, acc_t(0));
    std::fill(c, c + kLanes, acc_t(0));
    std::fill(dot, dot + kLanes, acc_t(0));
    Partial total;
    for_each_block(
        c0, c1, H, nullptr,
        [&](int l, int64_t i) {
          const acc_t xv = static_cast<acc_t>(xp[i]);
          const acc_t gv = static_cast<acc_t>(gp[i]);
          dot[l] += gv * xv;
          if constexpr (NORM == kInf) {
            const acc_t a = xv < acc_t(0) ? -xv : xv;
            const acc_t nm = nan_max(m[l], a);
            c[l] = a == nm ? (m[l] == nm ? c[l] + acc_t(1) : acc_t(1)) : c[l];
            m[l] = nm;
          } else {
            m[l] += xv * xv;
          }
        },
        [&] {
          acc_t bm = m[0], bc = c[0], bd = dot[0];
          for (int l = 1; l < kLanes; ++l) {
            if constexpr (NORM == kInf) {
              merge_ties(bm, bc, m[l], c[l]);
            } else {
              bm += m[l];
            }
            bd += dot[l];
          }
          const Partial blk{static_cast<double>(bm), static_cast<double>(bc),
                            static_cast<double>(bd)};
          total = merge(0, total, blk);
          std::fill(m, m + kLanes, acc_t(0));
          std::fill(c, c + kLanes, acc_t(0));
          std::fill(dot, dot + kLanes, acc_t(0));
        });
    return total;
  }
  Partial merge(int, const Partial& a, const Partial& b) const {
    Partial t = a;
    if constexpr (NORM == kInf) {
      merge_ties(t.r, t.ties, b.r, b.ties);
    } else {
      t.r += b.r;
    }
    t.dot += b.dot;
    return t;
  }
  void finish(int, const Partial& t, State& st) const {
    st.r = static_cast<acc_t>(t.r);
    st.dot = static_cast<acc_t>(t.dot);
    st.ties = static_cast<acc_t>(t.ties);
  }
  SK_FLATTEN void apply(int64_t c0, int64_t c1, const State& st) const {
    const acc_t r = st.r, dot = st.dot, ties = st.ties;
    const double e = eps;
    const scalar_t* __restrict__ gp = g;
    const scalar_t* __restrict__ xp = x;
    scalar_t* __restrict__ op = dx;
    for (int64_t i = c0; i < c1; ++i) {
      op[i] = static_cast<scalar_t>(perturb::normalize_grad<acc_t>(
          static_cast<acc_t>(gp[i]), static_cast<acc_t>(xp[i]), r, dot, ties, NORM, e));
    }
  }
};

// ---- perturb_step ---------------------------------------------------------------------------

// Stage ids: 1 = stage 1 (normalize's reduction), 2 = stage 2 (the projection's norm).
template <typename scalar_t, int NORM, int RULE>
struct PerturbStepOp {
  using acc_t = typename AccType<scalar_t>::type;
  struct State {
    acc_t scale1, factor2;  // stage 1's normalize factor, stage 2's projection factor
    explicit State(const GroupState& g)
        : scale1(static_cast<acc_t>(g.v[0])), factor2(static_cast<acc_t>(g.v[1])) {}
    void store(GroupState& g) const {
      g.v[0] = scale1;
      g.v[1] = factor2;
    }
  };
  const scalar_t* d;
  const scalar_t* g;
  const bool* mask;
  scalar_t* out;
  int64_t H;
  StepParams p;  // norm = NORM, rule = RULE
  int ids[2];
  int n_stages;

  explicit PerturbStepOp(const GroupArgs& a)
      : d(static_cast<const scalar_t*>(a.x)), g(static_cast<const scalar_t*>(a.y)),
        mask(a.mask), out(static_cast<scalar_t*>(a.out)), H(a.H), p(a.p), ids{0, 0},
        n_stages(0) {
    p.norm = NORM;
    p.rule = RULE;
    if (perturb::has_stage1(p)) ids[n_stages++] = 1;
    if (perturb::has_stage2(p)) ids[n_stages++] = 2;
  }

  int stages() const { return n_stages; }
  SK_FLATTEN Partial reduce(int s, int64_t c0, int64_t c1, const State& st) const {
    const scalar_t* dp = d;
    const scalar_t* gp = g;
    const StepParams q{p.step_size, p.radius, p.eps, NORM, RULE};
    if (ids[s] == 1 && NORM == kInf) {  // max of stage1_term: max|g| or max|d + step * g|
      if constexpr (RULE == kPaper) {
        return {max_abs_chunk<scalar_t>(c0, c1, H, mask, [gp](int64_t i) { return gp[i]; }), 0,
                0};
      } else {
        const acc_t step = static_cast<acc_t>(q.step_size);
        const auto sum = [dp, gp, step](int64_t i) {
          return static_cast<acc_t>(dp[i]) + step * static_cast<acc_t>(gp[i]);
        };
        return {max_abs_chunk<acc_t>(c0, c1, H, mask, sum), 0, 0};
      }
    }
    if (ids[s] == 1) {
      const auto term = [dp, gp, q](int64_t i) {
        return perturb::stage1_term<acc_t>(static_cast<acc_t>(dp[i]), static_cast<acc_t>(gp[i]),
                                           q);
      };
      const auto combine = [q](auto a, auto b) { return perturb::stage1_combine(a, b, q); };
      return {fold_chunk<acc_t>(c0, c1, H, mask, term, combine), 0, 0};
    }
    const acc_t scale1 = st.scale1;
    const auto term = [dp, gp, q, scale1](int64_t i) {
      return perturb::stage2_term<acc_t>(static_cast<acc_t>(dp[i]), static_cast<acc_t>(gp[i]),
                                         scale1, q);
    };
    return {fold_chunk<acc_t>(c0, c1, H, mask, term, [](auto a, auto b) { return a + b; }), 0,
            0};
  }
  Partial merge(int s, const Partial& a, const Partial& b) const {
    return ids[s] == 1 && NORM == kInf ? merge_max(a, b) : merge_sum(a, b);
  }
  void finish(int s, const Partial& t, State& st) const {
    const StepParams q{p.step_size, p.radius, p.eps, NORM, RULE};
    if (ids[s] == 1) {
      st.scale1 = perturb::stage1_scale<acc_t>(static_cast<acc_t>(t.r), q);
    } else {
      st.factor2 = perturb::stage2_factor<acc_t>(static_cast<acc_t>(t.r), q);
    }
  }
  SK_FLATTEN void apply(int64_t c0, int64_t c1, const State& st) const {
    const StepParams q{p.step_size, p.radius, p.eps, NORM, RULE};
    const acc_t scale1 = st.scale1, factor2 = st.factor2;
    const scalar_t* __restrict__ dp = d;
    const scalar_t* __restrict__ gp = g;
    scalar_t* __restrict__ op = out;
    for_each_run(
        c0, c1, H, mask,
        [&](int64_t a, int64_t b) {
          for (int64_t i = a; i < b; ++i) {
            op[i] = static_cast<scalar_t>(perturb::step_output<acc_t>(
                static_cast<acc_t>(dp[i]), static_cast<acc_t>(gp[i]), scale1, factor2, q));
          }
        },
        [&](int64_t a, int64_t b) { std::fill(op + a, op + b, scalar_t(0)); });
  }
};


// ---- type erasure ---------------------------------------------------------------------------

// The GroupKernels of an op type: each entry builds the op from the call's GroupArgs.
template <typename Op>
struct Erased {
  using State = typename Op::State;

  static int stages(const GroupArgs& a) { return Op(a).stages(); }
  SK_FLATTEN static void groups(const GroupArgs& a, int64_t g0, int64_t g1, int64_t L) {
    const Op op(a);
    const int n = op.stages();
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t c0 = gi * L, c1 = c0 + L;
      State st{GroupState{}};
      for (int s = 0; s < n; ++s) op.finish(s, op.reduce(s, c0, c1, st), st);
      op.apply(c0, c1, st);
    }
  }
  static Partial reduce(const GroupArgs& a, int s, int64_t c0, int64_t c1, const GroupState& g) {
    return Op(a).reduce(s, c0, c1, State(g));
  }
  static Partial merge(const GroupArgs& a, int s, const Partial& x, const Partial& y) {
    return Op(a).merge(s, x, y);
  }
  static void finish(const GroupArgs& a, int s, const Partial& t, GroupState& g) {
    State st(g);
    Op(a).finish(s, t, st);
    st.store(g);
  }
  static void apply(const GroupArgs& a, int64_t c0, int64_t c1, const GroupState& g) {
    Op(a).apply(c0, c1, State(g));
  }
  static GroupKernels table() { return {&stages, &groups, &reduce, &merge, &finish, &apply}; }
};

template <typename F>
void dispatch_dtype(c10::ScalarType dtype, const F& f) {
  switch (dtype) {
    case c10::ScalarType::Double: f(double{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: f(float{}); break;  // the caller checked the dtype
  }
}

template <typename F>
void dispatch_norm(int norm, const F& f) {
  switch (norm) {
    case kInf: f(std::integral_constant<int, kInf>{}); break;
    case kL2: f(std::integral_constant<int, kL2>{}); break;
    default: f(std::integral_constant<int, kL1>{}); break;
  }
}

}  // namespace

perturb_cpu::GroupKernels normalize_kernels(c10::ScalarType dtype, int norm) {
  GroupKernels k{};
  dispatch_dtype(dtype, [&](auto tag) {
    dispatch_norm(norm, [&](auto nc) {
      k = Erased<NormalizeOp<decltype(tag), decltype(nc)::value>>::table();
    });
  });
  return k;
}

perturb_cpu::GroupKernels normalize_bwd_kernels(c10::ScalarType dtype, int norm) {
  GroupKernels k{};
  dispatch_dtype(dtype, [&](auto tag) {
    if (norm == kInf) {
      k = Erased<NormalizeBwdOp<decltype(tag), kInf>>::table();
    } else {
      k = Erased<NormalizeBwdOp<decltype(tag), kL2>>::table();
    }
  });
  return k;
}

perturb_cpu::GroupKernels perturb_step_kernels(c10::ScalarType dtype, int norm, int rule) {
  GroupKernels k{};
  dispatch_dtype(dtype, [&](auto tag) {
    dispatch_norm(norm, [&](auto nc) {
      using scalar_t = decltype(tag);
      constexpr int kNorm = decltype(nc)::value;
      if (rule == kPaper) {
        k = Erased<PerturbStepOp<scalar_t, kNorm, kPaper>>::table();
      } else {
        k = Erased<PerturbStepOp<scalar_t, kNorm, kNormalizeSum>>::table();
      }
    });
  });
  return k;
}

}  // namespace SK_CPU_ISA
}  // namespace smart_kernels
