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
// This file is the op glue: checks, allocation, rows in parallel (at::parallel_for), and the
// choice of instruction set; the row kernels are in sym_kl_rows.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "isa.h"

namespace smart_kernels {

// Row kernels, one copy per instruction set (sym_kl_rows_<isa>.cpp).
#define SK_DECLARE_ROWS(isa)                                                                    \
  namespace isa {                                                                               \
  void sym_kl_fwd_rows(c10::ScalarType, const void*, const void*, int64_t, int64_t, const bool*, \
                       int64_t, int64_t, int64_t, int64_t, void*, void*);                       \
  void sym_kl_bwd_rows(c10::ScalarType, const void*, const void*, int64_t, int64_t, const bool*, \
                       const void*, int64_t, double, const void*, int64_t, int64_t, int64_t,    \
                       int64_t, void*, void*);                                                  \
  }
SK_DECLARE_ROWS(base)
SK_DECLARE_ROWS(avx2)
#undef SK_DECLARE_ROWS

namespace {

int64_t grain_rows(int64_t V) { return std::max<int64_t>(1, 32768 / V); }

// Sum of the row values (in double, in row order: deterministic) and the counted rows.
template <typename acc_t>
void finalize(const acc_t* rows, const bool* mask, int64_t N, int64_t V, int64_t reduction,
              acc_t* out, acc_t* scale_out) {
  const double scale = [&] {
    int64_t count = N;
    if (mask != nullptr) count = std::count(mask, mask + N, true);
    return reduction_scale(reduction, count, V);
  }();
  *scale_out = static_cast<acc_t>(scale);
  if (reduction == kNone) return;
  double total = 0;
  for (int64_t r = 0; r < N; ++r) total += static_cast<double>(rows[r]);
  *out = static_cast<acc_t>(total * scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_kl_fwd_cpu(const at::Tensor& input,
                                                              const at::Tensor& target,
                                                              const c10::optional<at::Tensor>& mask,
                                                              int64_t mode, int64_t reduction) {
  check_rows_pair(input, target, mask, mode);
  check_reduction(reduction);
  const int64_t N = input.size(0), V = input.size(1);
  auto [out, stats, scale] = alloc_fwd_outputs(input, reduction);
  at::Tensor rows = reduction == kNone ? out : at::empty({N}, stats.options());
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_p = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const auto fwd = cpu_use_avx2() ? &avx2::sym_kl_fwd_rows : &base::sym_kl_fwd_rows;
  const void* a = input.data_ptr();
  const void* b = target.data_ptr();
  void* rows_p = rows.data_ptr();
  void* stats_p = stats.data_ptr();
  const int64_t sa = input.stride(0), sb = target.stride(0);
  const auto dtype = input.scalar_type();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    fwd(dtype, a, b, sa, sb, mask_p, V, mode, begin, end, rows_p, stats_p);
  });
  if (dtype == at::kDouble) {
    finalize(rows.data_ptr<double>(), mask_p, N, V, reduction, out.data_ptr<double>(),
             scale.data_ptr<double>());
  } else {
    finalize(rows.data_ptr<float>(), mask_p, N, V, reduction, out.data_ptr<float>(),
             scale.data_ptr<float>());
  }
  return {out, stats, scale};
}

std::tuple<at::Tensor, at::Tensor> sym_kl_bwd_cpu(const at::Tensor& grad_out,
                                                  const at::Tensor& scale, const at::Tensor& input,
                                                  const at::Tensor& target,
                                                  const c10::optional<at::Tensor>& mask,
                                                  const at::Tensor& stats, int64_t mode,
                                                  bool need_input, bool need_target) {
  check_rows_pair(input, target, mask, mode);
  check_bwd_extra(grad_out, scale, input, stats);
  const int64_t N = input.size(0), V = input.size(1);
  at::Tensor ga = need_input ? at::empty({N, V}, input.options()) : at::empty({0}, input.options());
  at::Tensor gb = need_target ? at::empty({N, V}, input.options()) : at::empty({0}, input.options());
  if (N == 0 || !(need_input || need_target)) return {ga, gb};
  at::Tensor g = grad_out.to(stats.scalar_type());
  const int64_t sg = g.dim() == 0 ? 0 : g.stride(0);
  const double scale_v = scale.item<double>();  // a CPU tensor: no device sync
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_p = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const auto bwd = cpu_use_avx2() ? &avx2::sym_kl_bwd_rows : &base::sym_kl_bwd_rows;
  const void* a = input.data_ptr();
  const void* b = target.data_ptr();
  void* ga_p = need_input ? ga.data_ptr() : nullptr;
  void* gb_p = need_target ? gb.data_ptr() : nullptr;
  const int64_t sa = input.stride(0), sb = target.stride(0);
  const auto dtype = input.scalar_type();
  at::parallel_for(0, N, grain_rows(V), [&](int64_t begin, int64_t end) {
    bwd(dtype, a, b, sa, sb, mask_p, g.data_ptr(), sg, scale_v, stats.data_ptr(), V, mode, begin,
        end, ga_p, gb_p);
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CPU, m) {
  m.impl("sym_kl_fwd", &sym_kl_fwd_cpu);
  m.impl("sym_kl_bwd", &sym_kl_bwd_cpu);
}

}  // namespace smart_kernels
