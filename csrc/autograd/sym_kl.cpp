// smart_kernels::sym_kl: the differentiable, reduced sym_kl / kl op of the native backend.
//
// Forward: rows, stats = sym_kl_fwd(input, target, mask, mode); reduce rows:
//   none: rows [N];  sum: sum(rows);  batchmean: sum(rows) / max(count, 1);
//   mean: sum(rows) / max(count * V, 1);  count = number of True mask rows (N without a mask).
// Backward: the per-row gradient is grad_out (none), or grad_out / divisor broadcast to [N] as a
// stride-0 view (no [N] temporary); then grad_input, grad_target = sym_kl_bwd(...), computing only
// the gradients whose inputs require them.
// The autograd formula lives in C++ so that an eager call costs one dispatcher round trip each
// way (a classification head's loss is launch- and overhead-bound). Under torch.compile the
// same code is traced: sym_kl_fwd / sym_kl_bwd have fake implementations (ops/sym_kl.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

namespace smart_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

enum Reduction : int64_t { kNone = 0, kSum = 1, kBatchMean = 2, kMean = 3 };

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& input, const at::Tensor& target,
                                            const c10::optional<at::Tensor>& mask, int64_t mode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smart_kernels::sym_kl_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                           int64_t)>();
  return op.call(input, target, mask, mode);
}

std::tuple<at::Tensor, at::Tensor> call_bwd(const at::Tensor& grad_rows, const at::Tensor& input,
                                            const at::Tensor& target,
                                            const c10::optional<at::Tensor>& mask,
                                            const at::Tensor& stats, int64_t mode, bool need_input,
                                            bool need_target) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smart_kernels::sym_kl_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const c10::optional<at::Tensor>&, const at::Tensor&, int64_t, bool,
                           bool)>();
  return op.call(grad_rows, input, target, mask, stats, mode, need_input, need_target);
}

void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= kNone && reduction <= kMean,
              "smart_kernels::sym_kl: reduction must be 0 (none), 1 (sum), 2 (batchmean) or "
              "3 (mean), got ",
              reduction);
}

// Divide a reduced sum by the number of counted rows (times V for "mean"); 0 rows gives 0.
at::Tensor divide_by_count(const at::Tensor& x, const c10::optional<at::Tensor>& mask,
                           int64_t reduction, int64_t N, int64_t V) {
  const int64_t per_row = reduction == kMean ? V : 1;
  if (mask.has_value()) {  // a device tensor: no host sync
    return x / (mask->sum() * per_row).clamp_min(1).to(x.scalar_type());
  }
  return x / static_cast<double>(std::max<int64_t>(N * per_row, 1));
}

at::Tensor reduce_rows(const at::Tensor& rows, const c10::optional<at::Tensor>& mask,
                       int64_t reduction, int64_t V) {
  if (reduction == kNone) return rows;
  at::Tensor total = rows.sum();
  if (reduction == kSum) return total;
  return divide_by_count(total, mask, reduction, rows.size(0), V);
}

class SymKLFunction : public torch::autograd::Function<SymKLFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, const c10::optional<at::Tensor>& mask,
                            int64_t mode, int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [rows, stats] = call_fwd(input, target, mask, mode);
    if (mask.has_value()) {
      ctx->save_for_backward({input, target, stats, *mask});
    } else {
      ctx->save_for_backward({input, target, stats});
    }
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["reduction"] = reduction;
    return reduce_rows(rows, mask, reduction, input.size(1));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &input = saved[0], &target = saved[1], &stats = saved[2];
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    const auto mask = saved.size() > 3 ? c10::optional<at::Tensor>(saved[3]) : c10::nullopt;
    const int64_t N = input.size(0);
    at::Tensor g = grad_outputs[0].to(stats.scalar_type());
    if (reduction == kBatchMean || reduction == kMean) {
      g = divide_by_count(g, mask, reduction, N, input.size(1));
    }
    if (reduction != kNone) g = g.expand({N});
    auto [ga, gb] = call_bwd(g, input, target, mask, stats, mode, need_input, need_target);
    return {need_input ? ga : at::Tensor(), need_target ? gb : at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor sym_kl_autograd(const at::Tensor& input, const at::Tensor& target,
                           const c10::optional<at::Tensor>& mask, int64_t mode,
                           int64_t reduction) {
  check_reduction(reduction);
  return SymKLFunction::apply(input, target, mask, mode, reduction);
}

// Below autograd (no_grad, inference, tracing): forward only, nothing saved.
at::Tensor sym_kl_forward_only(const at::Tensor& input, const at::Tensor& target,
                               const c10::optional<at::Tensor>& mask, int64_t mode,
                               int64_t reduction) {
  check_reduction(reduction);
  auto [rows, stats] = call_fwd(input, target, mask, mode);
  return reduce_rows(rows, mask, reduction, input.size(1));
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, Autograd, m) { m.impl("sym_kl", &sym_kl_autograd); }

TORCH_LIBRARY_IMPL(smart_kernels, CompositeExplicitAutograd, m) {
  m.impl("sym_kl", &sym_kl_forward_only);
}

}  // namespace smart_kernels
