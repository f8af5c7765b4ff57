// Adversarial perturbation ops (normalize, normalize_bwd, perturb_step, init_noise), CPU kernels.
//
// x, noise d, grad g: [..., T, H] contiguous, split into G groups of L elements (token scope:
// L = H, the last dim; sequence scope: L = T * H, the last two dims). mask: one flag per token
// of H elements (shape x.shape[:-1]); a False token contributes 0 to every reduction and gets 0.
// Per group (elementwise math in ../perturb_math.h, shared with the CUDA kernels):
//   normalize     inf: y = x / (m + eps), m = max|x|;  l2: y = x / (n + eps), n = ||x||_2;
//                 l1: y = sign(x)
//   normalize_bwd (g = dL/dy, dot = <g, x>, c = #{j : |x_j| = m}):
//                 inf: dx_j = g_j / (m + eps) - dot / (m + eps)^2 * sign(x_j) [|x_j| = m] / c
//                 l2:  dx_j = g_j / (n + eps) - x_j * dot / (n (n + eps)^2)   (0 if n = 0)
//                 l1:  dx = 0
//   perturb_step  paper: s = d + step * normalize(g) (stage 1 reduces g), then inf: clamp to
//                 [-radius, radius]; l2 / l1: stage 2 reduces ||s||_2 / ||s||_1 and rescales
//                 the group to norm <= radius (radius = +inf: no projection, no stage 2).
//                 normalize_sum: out = normalize(d + step * g) (stage 1 reduces d + step * g).
//   init_noise    element i = std * (Box-Muller of Philox4x32-10(key = seed, counter = i / 4))
//                 [i % 4], 0 where masked.
//
// Reduction order (fixed, so results do not depend on the thread count): a group is cut into
// chunks of kChunk elements and each chunk into blocks of kBlock (from the group's start); in a
// block, element i goes to lane (i - block start) % kLanes (a masked element is skipped, which
// equals adding the reduction's identity 0), the lanes are folded in order, the block results are
// folded in order in double, and the chunk results likewise. Groups of at most kChunk elements:
// one task per group runs all its stages while the group is in cache (parallel over groups).
// Larger groups: each stage reduces its chunks in parallel into a buffer, folds them per group,
// then the output is written in parallel over chunks. normalize_bwd reduces in one pass
// (max|x|, its tie count c, <g, x>) for inf or (sum x^2, <g, x>) for l2; (max, count) pairs
// merge by keeping the count of the larger max (the sum of both when equal). Max reductions
// propagate NaN (nan_max), as torch.amax does. With a mask that keeps every token the results
// are bit-identical to no mask.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../acc_type.h"
#include "../perturb_math.h"

namespace smart_kernels {
namespace {

using perturb::kInf;
using perturb::kL1;
using perturb::kL2;
using perturb::kNormalizeSum;
using perturb::kPaper;
using perturb::kSequence;
using perturb::kToken;
using perturb::nan_max;
using perturb::StepParams;

// Inline every call of the hot loops (GCC otherwise keeps e.g. step_output out of line in some
// instantiations, and a call in a loop stops its vectorization).
#if defined(__GNUC__)
#define SK_FLATTEN __attribute__((flatten))
#else
#define SK_FLATTEN
#endif

constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;
constexpr int64_t kChunk = 16 * kBlock;
constexpr int64_t kTaskElems = 32768;  // elements per task, at least, when groups are small

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

// A chunk's (or a group's) reduction result, in double. r: the max or the sum; ties and dot:
// only for normalize_bwd.
struct Partial {
  double r = 0, ties = 0, dot = 0;
};

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

// ---- the group driver -----------------------------------------------------------------------

// Runs an op on G groups of L elements. The op defines State (per group, default-constructed),
// stages() (number of reductions), reduce(stage, c0, c1, state) -> Partial of a chunk,
// merge(stage, a, b) -> Partial, finish(stage, total, state) and apply(c0, c1, state).
template <typename Op>
void run_groups(const Op& op, int64_t G, int64_t L) {
  using State = typename Op::State;
  if (G == 0 || L == 0) return;
  const int stages = op.stages();
  if (L <= kChunk) {
    const int64_t grain = std::max<int64_t>(1, kTaskElems / L);
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      for (int64_t gi = g0; gi < g1; ++gi) {
        const int64_t c0 = gi * L, c1 = c0 + L;
        State st{};
        for (int s = 0; s < stages; ++s) op.finish(s, op.reduce(s, c0, c1, st), st);
        op.apply(c0, c1, st);
      }
    });
    return;
  }
  const int64_t per_group = (L + kChunk - 1) / kChunk, total = G * per_group;
  std::vector<State> states(G);
  std::vector<Partial> parts(total);
  const auto bounds = [&](int64_t k, int64_t* c0, int64_t* c1) {
    const int64_t gi = k / per_group;
    *c0 = gi * L + (k % per_group) * kChunk;
    *c1 = std::min(*c0 + kChunk, (gi + 1) * L);
  };
  for (int s = 0; s < stages; ++s) {
    at::parallel_for(0, total, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        int64_t c0, c1;
        bounds(k, &c0, &c1);
        parts[k] = op.reduce(s, c0, c1, states[k / per_group]);
      }
    });
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t gi = g0; gi < g1; ++gi) {
        Partial t = parts[gi * per_group];
        for (int64_t j = 1; j < per_group; ++j) t = op.merge(s, t, parts[gi * per_group + j]);
        op.finish(s, t, states[gi]);
      }
    });
  }
  at::parallel_for(0, total, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      int64_t c0, c1;
      bounds(k, &c0, &c1);
      op.apply(c0, c1, states[k / per_group]);
    }
  });
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
    acc_t r = 0;
  };
  const scalar_t* x;
  scalar_t* y;
  int64_t H;
  double eps;

  int stages() const { return NORM == kL1 ? 0 : 1; }
  SK_FLATTEN Partial reduce(int, int64_t c0, int64_t c1, const State&) const {
    const scalar_t* xp = x;
    if constexpr (NORM == kInf) {
      const auto term = [xp](int64_t i) {
        const acc_t v = static_cast<acc_t>(xp[i]);
        return v < acc_t(0) ? -v : v;
      };
      return {fold_chunk<acc_t>(c0, c1, H, nullptr, term,
                                [](auto a, auto b) { return nan_max(a, b); }),
              0, 0};
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
    const scalar_t* xp = x;
    scalar_t* yp = y;
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
    acc_t r = 0, dot = 0, ties = 1;
  };
  const scalar_t* g;
  const scalar_t* x;
  scalar_t* dx;
  int64_t H;
  double eps;

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
    const scalar_t* gp = g;
    const scalar_t* xp = x;
    scalar_t* op = dx;
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
    acc_t scale1 = 1, factor2 = 1;
  };
  const scalar_t* d;
  const scalar_t* g;
  const bool* mask;
  scalar_t* out;
  int64_t H;
  StepParams p;  // norm = NORM, rule = RULE
  int ids[2];
  int n_stages;

  PerturbStepOp(const scalar_t* d_, const scalar_t* g_, const bool* mask_, scalar_t* out_,
                int64_t H_, const StepParams& params)
      : d(d_), g(g_), mask(mask_), out(out_), H(H_), p(params), ids{0, 0}, n_stages(0) {
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
    const scalar_t* dp = d;
    const scalar_t* gp = g;
    scalar_t* op = out;
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

// ---- glue -----------------------------------------------------------------------------------

template <typename F>
void dispatch_norm(int64_t norm, const F& f) {
  switch (norm) {
    case kInf:
      f(std::integral_constant<int, kInf>{});
      break;
    case kL2:
      f(std::integral_constant<int, kL2>{});
      break;
    default:
      f(std::integral_constant<int, kL1>{});
      break;
  }
}

void check_codes(int64_t norm, int64_t scope) {
  TORCH_CHECK(norm >= kInf && norm <= kL1,
              "smart_kernels: norm must be 0 (inf), 1 (l2) or 2 (l1), got ", norm);
  TORCH_CHECK(scope == kToken || scope == kSequence,
              "smart_kernels: scope must be 0 (token) or 1 (sequence), got ", scope);
}

void check_float_input(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "smart_kernels: ", name, " must be float16, bfloat16, float32 or float64, got ", dt);
}

// The group layout of x: (G, L, H).
struct Layout {
  int64_t G, L, H;
};

Layout check_grouped(const at::Tensor& x, const char* name, int64_t scope) {
  check_float_input(x, name);
  TORCH_CHECK(x.is_contiguous(), "smart_kernels: ", name, " must be contiguous");
  TORCH_CHECK(x.dim() >= (scope == kSequence ? 2 : 1), "smart_kernels: ", name, " must have at ",
              "least ", scope == kSequence ? 2 : 1, " dims for this scope, got ", x.dim(), "-D");
  const int64_t H = x.size(-1);
  const int64_t L = scope == kSequence ? H * x.size(-2) : H;
  return {L == 0 ? 0 : x.numel() / L, L, H};
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.sizes() == b.sizes(), "smart_kernels: ", na, " and ", nb, " shapes differ: ",
              a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "smart_kernels: ", na, " and ", nb,
              " dtypes differ");
  TORCH_CHECK(a.device() == b.device(), "smart_kernels: ", na, " and ", nb, " devices differ");
  TORCH_CHECK(b.is_contiguous(), "smart_kernels: ", nb, " must be contiguous");
}

// The mask's data (nullptr without one) after checking it is bool [like.shape[:-1]].
const bool* checked_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& like) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool, "smart_kernels: mask must be bool, got ",
              mask->scalar_type());
  TORCH_CHECK(mask->device() == like.device(), "smart_kernels: mask is on another device");
  TORCH_CHECK(like.dim() >= 1, "smart_kernels: a mask needs an input with at least 1 dim");
  const auto tokens = like.sizes().slice(0, like.dim() - 1);
  TORCH_CHECK(mask->sizes() == tokens, "smart_kernels: mask must have shape ", tokens, ", got ",
              mask->sizes());
  TORCH_CHECK(mask->is_contiguous(), "smart_kernels: mask must be contiguous");
  return like.numel() == 0 ? nullptr : mask->data_ptr<bool>();
}

at::Tensor normalize_cpu(const at::Tensor& x, int64_t norm, int64_t scope, double eps) {
  check_codes(norm, scope);
  const Layout lay = check_grouped(x, "x", scope);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_cpu", [&] {
    dispatch_norm(norm, [&](auto nc) {
      const NormalizeOp<scalar_t, decltype(nc)::value> op{x.data_ptr<scalar_t>(),
                                                          y.data_ptr<scalar_t>(), lay.H, eps};
      run_groups(op, lay.G, lay.L);
    });
  });
  return y;
}

at::Tensor normalize_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, int64_t norm,
                             int64_t scope, double eps) {
  check_codes(norm, scope);
  const Layout lay = check_grouped(x, "x", scope);
  check_same(x, grad_y, "x", "grad_y");
  if (norm == kL1) return at::zeros(x.sizes(), x.options());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_bwd_cpu", [&] {
        const scalar_t* g = grad_y.data_ptr<scalar_t>();
        const scalar_t* xp = x.data_ptr<scalar_t>();
        scalar_t* out = dx.data_ptr<scalar_t>();
        if (norm == kInf) {
          run_groups(NormalizeBwdOp<scalar_t, kInf>{g, xp, out, lay.H, eps}, lay.G, lay.L);
        } else {
          run_groups(NormalizeBwdOp<scalar_t, kL2>{g, xp, out, lay.H, eps}, lay.G, lay.L);
        }
      });
  return dx;
}

at::Tensor perturb_step_cpu(const at::Tensor& noise, const at::Tensor& grad,
                            const c10::optional<at::Tensor>& mask, double step_size,
                            double radius, int64_t norm, int64_t scope, int64_t rule,
                            double eps) {
  check_codes(norm, scope);
  TORCH_CHECK(rule == kPaper || rule == kNormalizeSum,
              "smart_kernels: rule must be 0 (paper) or 1 (normalize_sum), got ", rule);
  const Layout lay = check_grouped(noise, "noise", scope);
  check_same(noise, grad, "noise", "grad");
  const bool* mask_p = checked_mask(mask, noise);
  at::Tensor out = at::empty(noise.sizes(), noise.options());
  if (noise.numel() == 0) return out;
  StepParams params{step_size, radius, eps, static_cast<int>(norm), static_cast<int>(rule)};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, noise.scalar_type(), "perturb_step_cpu", [&] {
        const scalar_t* d = noise.data_ptr<scalar_t>();
        const scalar_t* g = grad.data_ptr<scalar_t>();
        scalar_t* o = out.data_ptr<scalar_t>();
        dispatch_norm(norm, [&](auto nc) {
          constexpr int kNorm = decltype(nc)::value;
          if (rule == kPaper) {
            run_groups(PerturbStepOp<scalar_t, kNorm, kPaper>(d, g, mask_p, o, lay.H, params),
                       lay.G, lay.L);
          } else {
            run_groups(
                PerturbStepOp<scalar_t, kNorm, kNormalizeSum>(d, g, mask_p, o, lay.H, params),
                lay.G, lay.L);
          }
        });
      });
  return out;
}

// init_noise: element i = std * box_muller4(philox4x32_10(i / 4, seed))[i % 4], 0 where its
// token (i / H) is masked; std is applied in the accumulation dtype.
at::Tensor init_noise_cpu(const at::Tensor& like, const c10::optional<at::Tensor>& mask,
                          const at::Tensor& seed, double std) {
  check_float_input(like, "like");
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "smart_kernels: seed must be a 0-d int64 CPU tensor");
  const bool* mask_p = checked_mask(mask, like);
  at::Tensor out = at::empty(like.sizes(), like.options());
  const int64_t N = like.numel();
  if (N == 0) return out;
  const int64_t H = like.dim() >= 1 ? like.size(-1) : 1;
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());  // a CPU tensor: no sync
  const int64_t blocks = (N + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "init_noise_cpu",
                                  [&] {
    using acc_t = typename AccType<scalar_t>::type;
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t sd = static_cast<acc_t>(std);
    at::parallel_for(0, blocks, 2048, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        float z[4];
        perturb::box_muller4(perturb::philox4x32_10(static_cast<uint64_t>(k), key), z);
        const int64_t i0 = 4 * k, n = std::min<int64_t>(4, N - i0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = i0 + j;
          const bool kept = mask_p == nullptr || mask_p[i / H];
          o[i] = kept ? static_cast<scalar_t>(sd * static_cast<acc_t>(z[j])) : scalar_t(0);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CPU, m) {
  m.impl("normalize", &normalize_cpu);
  m.impl("normalize_bwd", &normalize_bwd_cpu);
  m.impl("perturb_step", &perturb_step_cpu);
  m.impl("init_noise", &init_noise_cpu);
}

}  // namespace smart_kernels
