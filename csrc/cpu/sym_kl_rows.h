// Symmetric KL / KL on rows of logits, CPU kernels.
//
// Per row (a = input, b = target, V entries): P = softmax(a), Q = softmax(b),
// d = log P - log Q = (a - lse_a) - (b - lse_b).
//   sym_kl  L = sum_j (P_j - Q_j) d_j = KL(P||Q) + KL(Q||P) = E_P[a-b] - E_Q[a-b]
//   kl      L = KL(Q||P) = E_Q[b-a] + lse_a - lse_b
// Forward: ONE read of both rows, in chunks that stay in L1, with online (rescaled) sums over
// the shifted logits x = a - m_a, y = b - m_b (m = running max):
//   s_a = sum e^x,  t_a = sum e^x (x - y),  s_b = sum e^y,  t_b = sum e^y (x - y).
// Then with r = log s_a - log s_b:  KL(P||Q) = t_a/s_a - r,  KL(Q||P) = r - t_b/s_b,
// L = t_a/s_a - t_b/s_b. Using x - y = (a - b) - (m_a - m_b) instead of a - b keeps a per-row
// offset between the logits (softmax ignores it) out of the sums: no cancellation of large terms.
// When a max grows, the sums are rescaled by e^(m_old - m_new) and t is shifted by
// (c_old - c_new) s, c = m_a - m_b. A position where both logits are -inf weighs 0 and
// contributes 0; a row that is all -inf in both inputs has value 0 and gradient 0.
// Backward (second read, grad g of the row value):
//   mode 0 (sym, full):      dL/da = g (P (d - KL(P||Q)) + P - Q),  dL/db = -g (Q (d + KL(Q||P)) + P - Q)
//   mode 1 (sym, stop_grad): dL/da = g (P - Q),                     dL/db = g (Q - P)
//   mode 2 (kl):             dL/da = g (P - Q),                     dL/db = g Q (-d - KL(Q||P))
//   where P (resp. Q) is 0 the P (d - ...) term is 0 (no 0 * inf).
// This header holds the row kernels; it is compiled once per instruction set (sym_kl_rows_*.cpp,
// each in its own namespace SK_CPU_ISA) and csrc/cpu/sym_kl.cpp picks one at run time.
// The inner loops are branch-free and auto-vectorize.
// Include only from sym_kl_rows_<isa>.cpp, after defining SK_CPU_ISA.
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../acc_type.h"

// Everything below (and nothing above: headers shared with other files) gets the target ISA.
#ifdef SK_CPU_ISA_AVX2
#pragma GCC target("avx2,fma")
#endif

namespace smart_kernels {
namespace SK_CPU_ISA {
namespace {

#include "vexp.h"

constexpr int64_t kChunk = 2048;

// Online state of a pair of rows (module comment): running maxima, offsets actually subtracted
// (the max, or 0 while everything so far is -inf: e^(-inf - 0) = 0, not NaN), and the sums.
template <typename acc_t>
struct PairOnline {
  static constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t ma = kNegInf, mb = kNegInf, oa = 0, ob = 0;
  acc_t sa = 0, ta = 0, sb = 0, tb = 0;

  // Raise the maxima to cover a chunk whose maxima are cma, cmb.
  void raise(acc_t cma, acc_t cmb) {
    const acc_t na = std::max(ma, cma), nb = std::max(mb, cmb);
    if (na == ma && nb == mb) return;
    const acc_t noa = na == kNegInf ? acc_t(0) : na, nob = nb == kNegInf ? acc_t(0) : nb;
    const acc_t fa = ma == kNegInf ? acc_t(0) : vexp(ma - na);
    const acc_t fb = mb == kNegInf ? acc_t(0) : vexp(mb - nb);
    const acc_t shift = (oa - ob) - (noa - nob);
    ta = fa * (ta + shift * sa);
    sa *= fa;
    tb = fb * (tb + shift * sb);
    sb *= fb;
    ma = na;
    mb = nb;
    oa = noa;
    ob = nob;
  }

  // Row value and the row's stats (acc_type.h).
  acc_t finish(int64_t mode, acc_t* st) const {
    if (sa == acc_t(0) && sb == acc_t(0)) {  // both rows entirely -inf: nothing contributes
      std::fill(st, st + kStatsPerRow, acc_t(0));
      return 0;
    }
    const acc_t log_sa = std::log(sa), log_sb = std::log(sb);
    const acc_t ep = ta / sa, eq = tb / sb, r = log_sa - log_sb;
    st[0] = oa;
    st[1] = ob;
    st[2] = log_sa;
    st[3] = log_sb;
    st[4] = ep - r;  // KL(P||Q)
    st[5] = r - eq;  // KL(Q||P)
    return mode == 2 ? st[5] : ep - eq;
  }
};

template <typename scalar_t>
void fwd_rows(const scalar_t* a_base, const scalar_t* b_base, int64_t sa, int64_t sb,
              const bool* mask, int64_t V, int64_t mode, int64_t begin, int64_t end,
              typename AccType<scalar_t>::type* rows, typename AccType<scalar_t>::type* stats) {
  using acc_t = typename AccType<scalar_t>::type;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t fa[kChunk];
  acc_t fb[kChunk];
  for (int64_t r = begin; r < end; ++r) {
    acc_t* st = stats + kStatsPerRow * r;
    if (mask != nullptr && !mask[r]) {
      rows[r] = 0;
      std::fill(st, st + kStatsPerRow, acc_t(0));
      continue;
    }
    const scalar_t* a = a_base + r * sa;
    const scalar_t* b = b_base + r * sb;
    PairOnline<acc_t> p;
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
      acc_t cma = kNegInf, cmb = kNegInf;
#pragma omp simd reduction(max : cma, cmb)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t x = static_cast<acc_t>(a[c0 + j]);
        const acc_t y = static_cast<acc_t>(b[c0 + j]);
        fa[j] = x;
        fb[j] = y;
        cma = x > cma ? x : cma;
        cmb = y > cmb ? y : cmb;
      }
      p.raise(cma, cmb);
      const acc_t oa = p.oa, ob = p.ob;
      acc_t s_a = 0, t_a = 0, s_b = 0, t_b = 0;
#pragma omp simd reduction(+ : s_a, t_a, s_b, t_b)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t x = fa[j] - oa;
        const acc_t y = fb[j] - ob;
        const acc_t ea = vexp(x);
        const acc_t eb = vexp(y);
        s_a += ea;
        t_a += ea == acc_t(0) ? acc_t(0) : ea * (x - y);
        s_b += eb;
        t_b += eb == acc_t(0) ? acc_t(0) : eb * (x - y);
      }
      p.sa += s_a;
      p.ta += t_a;
      p.sb += s_b;
      p.tb += t_b;
    }
    rows[r] = p.finish(mode, st);
  }
}

template <typename scalar_t, int64_t MODE>
void bwd_rows(const scalar_t* a_base, const scalar_t* b_base, int64_t sa, int64_t sb,
              const bool* mask, const typename AccType<scalar_t>::type* grad_out, int64_t sg,
              double scale, const typename AccType<scalar_t>::type* stats, int64_t V,
              int64_t begin, int64_t end, scalar_t* ga_base, scalar_t* gb_base) {
  using acc_t = typename AccType<scalar_t>::type;
  // Chunk buffers: converting loads, the math on plain arrays, converting stores. Each loop is
  // simple enough to vectorize for every dtype.
  acc_t fa[kChunk], fb[kChunk], oa[kChunk], ob[kChunk];
  for (int64_t r = begin; r < end; ++r) {
    scalar_t* ga = ga_base == nullptr ? nullptr : ga_base + r * V;
    scalar_t* gb = gb_base == nullptr ? nullptr : gb_base + r * V;
    if (mask != nullptr && !mask[r]) {
      if (ga != nullptr) std::fill(ga, ga + V, scalar_t(0));
      if (gb != nullptr) std::fill(gb, gb + V, scalar_t(0));
      continue;
    }
    const scalar_t* a = a_base + r * sa;
    const scalar_t* b = b_base + r * sb;
    const acc_t g = grad_out[r * sg] * static_cast<acc_t>(scale);
    const acc_t* st = stats + kStatsPerRow * r;
    const acc_t ma = st[0], mb = st[1], log_sa = st[2], log_sb = st[3];
    const acc_t kl_pq = st[4], kl_qp = st[5];
    for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, V - c0);
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        fa[j] = static_cast<acc_t>(a[c0 + j]);
        fb[j] = static_cast<acc_t>(b[c0 + j]);
      }
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t lp = (fa[j] - ma) - log_sa;  // log P, as exact as log_softmax
        const acc_t lq = (fb[j] - mb) - log_sb;
        const acc_t p = vexp(lp);
        const acc_t q = vexp(lq);
        acc_t da = p - q, db;
        if constexpr (MODE == 0) {
          da += p == acc_t(0) ? acc_t(0) : p * (lp - lq - kl_pq);
          db = (q - p) - (q == acc_t(0) ? acc_t(0) : q * (lp - lq + kl_qp));
        } else if constexpr (MODE == 1) {
          db = q - p;
        } else {
          db = q == acc_t(0) ? acc_t(0) : q * (lq - lp - kl_qp);
        }
        oa[j] = g * da;
        ob[j] = g * db;
      }
      if (ga != nullptr) {
        for (int64_t j = 0; j < n; ++j) ga[c0 + j] = static_cast<scalar_t>(oa[j]);
      }
      if (gb != nullptr) {
        for (int64_t j = 0; j < n; ++j) gb[c0 + j] = static_cast<scalar_t>(ob[j]);
      }
    }
  }
}

template <typename F>
void dispatch(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Double: f(double{}); break;
    case c10::ScalarType::Half: f(c10::Half{}); break;
    case c10::ScalarType::BFloat16: f(c10::BFloat16{}); break;
    default: break;  // the caller checked the dtype
  }
}

}  // namespace

void sym_kl_fwd_rows(c10::ScalarType dtype, const void* a, const void* b, int64_t sa, int64_t sb,
                     const bool* mask, int64_t V, int64_t mode, int64_t begin, int64_t end,
                     void* rows, void* stats) {
  dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    fwd_rows<scalar_t>(static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b), sa, sb,
                       mask, V, mode, begin, end, static_cast<acc_t*>(rows),
                       static_cast<acc_t*>(stats));
  });
}

void sym_kl_bwd_rows(c10::ScalarType dtype, const void* a, const void* b, int64_t sa, int64_t sb,
                     const bool* mask, const void* grad_out, int64_t sg, double scale,
                     const void* stats, int64_t V, int64_t mode, int64_t begin, int64_t end,
                     void* ga, void* gb) {
  dispatch(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccType<scalar_t>::type;
    auto run = [&](auto mode_tag) {
      bwd_rows<scalar_t, decltype(mode_tag)::value>(
          static_cast<const scalar_t*>(a), static_cast<const scalar_t*>(b), sa, sb, mask,
          static_cast<const acc_t*>(grad_out), sg, scale, static_cast<const acc_t*>(stats), V,
          begin, end, static_cast<scalar_t*>(ga), static_cast<scalar_t*>(gb));
    };
    if (mode == 0) {
      run(std::integral_constant<int64_t, 0>{});
    } else if (mode == 1) {
      run(std::integral_constant<int64_t, 1>{});
    } else {
      run(std::integral_constant<int64_t, 2>{});
    }
  });
}

}  // namespace SK_CPU_ISA
}  // namespace smart_kernels
