// Symmetric KL / KL on rows of logits, CPU kernels.
//
// Per row (a = input, b = target, V entries): P = softmax(a), Q = softmax(b),
// d = log P - log Q = (a - lse_a) - (b - lse_b).
//   sym_kl  L = sum_j (P_j - Q_j) d_j = KL(P||Q) + KL(Q||P) = E_P[a-b] - E_Q[a-b]
//   kl      L = KL(Q||P) = E_Q[b-a] + lse_a - lse_b
// Forward: ONE read of both rows, in chunks that stay in L1, with online (rescaled) sums
//   s_a = sum e^(a-m_a), t_a = sum e^(a-m_a) (a-b) (likewise for b), so E_P[a-b] = t_a / s_a.
//   A position where both logits are -inf has weight 0 in both and contributes 0.
// Backward (second read, grad g of the row value):
//   mode 0 (sym, full):      dL/da = g (P (d - KL(P||Q)) + P - Q),  dL/db = -g (Q (d + KL(Q||P)) + P - Q)
//   mode 1 (sym, stop_grad): dL/da = g (P - Q),                     dL/db = g (Q - P)
//   mode 2 (kl):             dL/da = g (P - Q),                     dL/db = g Q (-d - KL(Q||P))
//   where P (resp. Q) is 0 the P (d - ...) term is 0 (no 0 * inf).
// Rows run in parallel (at::parallel_for); the inner loops are branch-free and auto-vectorize.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "vexp.h"

namespace smart_kernels {
namespace {

constexpr int64_t kChunk = 2048;

// Online state of one softmax: running max m, s = sum e^(x-m), t = sum e^(x-m) (a-b).
template <typename acc_t>
struct Online {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  acc_t s = 0;
  acc_t t = 0;
  // Raise the running max to cover a chunk whose max is cm; returns the offset to subtract.
  acc_t raise(acc_t cm) {
    if (cm > m) {
      const acc_t f = m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : vexp(m - cm);
      s *= f;
      t *= f;
      m = cm;
    }
    // While every value so far is -inf, offset 0 makes e^(-inf - 0) = 0 instead of NaN.
    return m == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m;
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
    acc_t* st = stats + 4 * r;
    if (mask != nullptr && !mask[r]) {
      rows[r] = 0;
      st[0] = st[1] = st[2] = st[3] = 0;
      continue;
    }
    const scalar_t* a = a_base + r * sa;
    const scalar_t* b = b_base + r * sb;
    Online<acc_t> pa, pb;
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
      const acc_t oa = pa.raise(cma);
      const acc_t ob = pb.raise(cmb);
      acc_t s_a = 0, t_a = 0, s_b = 0, t_b = 0;
#pragma omp simd reduction(+ : s_a, t_a, s_b, t_b)
      for (int64_t j = 0; j < n; ++j) {
        const acc_t diff = fa[j] - fb[j];
        const acc_t ea = vexp(fa[j] - oa);
        const acc_t eb = vexp(fb[j] - ob);
        s_a += ea;
        t_a += ea == acc_t(0) ? acc_t(0) : ea * diff;
        s_b += eb;
        t_b += eb == acc_t(0) ? acc_t(0) : eb * diff;
      }
      pa.s += s_a;
      pa.t += t_a;
      pb.s += s_b;
      pb.t += t_b;
    }
    const acc_t lse_a = pa.m + std::log(pa.s);
    const acc_t lse_b = pb.m + std::log(pb.s);
    const acc_t ep = pa.t / pa.s;  // E_P[a-b]
    const acc_t eq = pb.t / pb.s;  // E_Q[a-b]
    st[0] = lse_a;
    st[1] = lse_b;
    st[2] = ep - (lse_a - lse_b);  // KL(P||Q)
    st[3] = (lse_a - lse_b) - eq;  // KL(Q||P)
    rows[r] = mode == 2 ? st[3] : ep - eq;
  }
}

template <typename scalar_t, int64_t MODE>
void bwd_rows(const scalar_t* a_base, const scalar_t* b_base, int64_t sa, int64_t sb,
              const bool* mask, const typename AccType<scalar_t>::type* grad_rows, int64_t sg,
              const typename AccType<scalar_t>::type* stats, int64_t V, int64_t begin,
              int64_t end, scalar_t* ga_base, scalar_t* gb_base) {
  using acc_t = typename AccType<scalar_t>::type;
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
    const acc_t g = grad_rows[r * sg];
    const acc_t* st = stats + 4 * r;
    const acc_t lse_a = st[0], lse_b = st[1], kl_pq = st[2], kl_qp = st[3];
    if (ga != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const acc_t lp = static_cast<acc_t>(a[j]) - lse_a;
        const acc_t lq = static_cast<acc_t>(b[j]) - lse_b;
        const acc_t p = vexp(lp);
        const acc_t q = vexp(lq);
        acc_t v = p - q;
        if constexpr (MODE == 0) v += p == acc_t(0) ? acc_t(0) : p * (lp - lq - kl_pq);
        ga[j] = static_cast<scalar_t>(g * v);
      }
    }
    if (gb != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) {
        const acc_t lp = static_cast<acc_t>(a[j]) - lse_a;
        const acc_t lq = static_cast<acc_t>(b[j]) - lse_b;
        const acc_t p = vexp(lp);
        const acc_t q = vexp(lq);
        acc_t v;
        if constexpr (MODE == 0) {
          v = (q - p) - (q == acc_t(0) ? acc_t(0) : q * (lp - lq + kl_qp));
        } else if constexpr (MODE == 1) {
          v = q - p;
        } else {
          v = q == acc_t(0) ? acc_t(0) : q * (lq - lp - kl_qp);
        }
        gb[j] = static_cast<scalar_t>(g * v);
      }
    }
  }
}

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / V); }

std::tuple<at::Tensor, at::Tensor> sym_kl_fwd_cpu(const at::Tensor& input, const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& mask,
                                                  int64_t mode) {
  check_rows_pair(input, target, mask, mode);
  const int64_t N = input.size(0), V = input.size(1);
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor rows = at::empty({N}, input.options().dtype(acc));
  at::Tensor stats = at::empty({N, 4}, input.options().dtype(acc));
  if (N == 0) return {rows, stats};
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_p = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sym_kl_fwd_cpu",
                                  [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* a = input.data_ptr<scalar_t>();
    const scalar_t* b = target.data_ptr<scalar_t>();
    acc_t* rows_p = rows.data_ptr<acc_t>();
    acc_t* stats_p = stats.data_ptr<acc_t>();
    const int64_t sa = input.stride(0), sb = target.stride(0);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      fwd_rows<scalar_t>(a, b, sa, sb, mask_p, V, mode, begin, end, rows_p, stats_p);
    });
  });
  return {rows, stats};
}

std::tuple<at::Tensor, at::Tensor> sym_kl_bwd_cpu(const at::Tensor& grad_rows,
                                                  const at::Tensor& input, const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& mask,
                                                  const at::Tensor& stats, int64_t mode,
                                                  bool need_input, bool need_target) {
  check_rows_pair(input, target, mask, mode);
  check_bwd_extra(grad_rows, input, stats);
  const int64_t N = input.size(0), V = input.size(1);
  at::Tensor ga = need_input ? at::empty({N, V}, input.options()) : at::empty({0}, input.options());
  at::Tensor gb = need_target ? at::empty({N, V}, input.options()) : at::empty({0}, input.options());
  if (N == 0 || !(need_input || need_target)) return {ga, gb};
  at::Tensor g = grad_rows.to(stats.scalar_type());
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_p = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sym_kl_bwd_cpu",
                                  [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* a = input.data_ptr<scalar_t>();
    const scalar_t* b = target.data_ptr<scalar_t>();
    const acc_t* g_p = g.data_ptr<acc_t>();
    const acc_t* st = stats.data_ptr<acc_t>();
    scalar_t* ga_p = need_input ? ga.data_ptr<scalar_t>() : nullptr;
    scalar_t* gb_p = need_target ? gb.data_ptr<scalar_t>() : nullptr;
    const int64_t sa = input.stride(0), sb = target.stride(0), sg = g.stride(0);
    at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
      if (mode == 0) {
        bwd_rows<scalar_t, 0>(a, b, sa, sb, mask_p, g_p, sg, st, V, begin, end, ga_p, gb_p);
      } else if (mode == 1) {
        bwd_rows<scalar_t, 1>(a, b, sa, sb, mask_p, g_p, sg, st, V, begin, end, ga_p, gb_p);
      } else {
        bwd_rows<scalar_t, 2>(a, b, sa, sb, mask_p, g_p, sg, st, V, begin, end, ga_p, gb_p);
      }
    });
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CPU, m) {
  m.impl("sym_kl_fwd", &sym_kl_fwd_cpu);
  m.impl("sym_kl_bwd", &sym_kl_bwd_cpu);
}

}  // namespace smart_kernels
