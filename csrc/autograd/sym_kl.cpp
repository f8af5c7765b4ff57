// smart_kernels::sym_kl: the differentiable sym_kl / kl op of the native backend, on logits
// [..., V] with an optional row mask [...].
//
// Forward: flatten to rows [N, V] (a view when the layout allows), then
//   out, stats, scale = sym_kl_fwd(rows_input, rows_target, mask, mode, reduction)
// where the kernel already reduced (checks.h: out = sum(rows) * scale, or the rows for none).
// Backward: grad_input, grad_target = sym_kl_bwd(grad_out, scale, ...), each row's gradient being
// grad_out * scale, computed only for inputs that require it; reshaped back to [..., V].
// The autograd formula lives in C++ so that an eager call is one dispatcher round trip each way
// (a classification head's loss is launch- and overhead-bound). Under torch.compile the same
// code is traced: sym_kl_fwd / sym_kl_bwd have fake implementations (smart_kernels/ops).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../checks.h"

namespace smart_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = c10::optional<at::Tensor>;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd(const at::Tensor& input,
                                                        const at::Tensor& target, const Opt& mask,
                                                        int64_t mode, int64_t reduction) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smart_kernels::sym_kl_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const Opt&, int64_t, int64_t)>();
  return op.call(input, target, mask, mode, reduction);
}

std::tuple<at::Tensor, at::Tensor> call_bwd(const at::Tensor& grad_out, const at::Tensor& scale,
                                            const at::Tensor& input, const at::Tensor& target,
                                            const Opt& mask, const at::Tensor& stats,
                                            int64_t mode, bool need_input, bool need_target) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("smart_kernels::sym_kl_bwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const Opt&, const at::Tensor&, int64_t, bool,
                           bool)>();
  return op.call(grad_out, scale, input, target, mask, stats, mode, need_input, need_target);
}

// [..., V] -> [N, V] with a contiguous last dim.
at::Tensor as_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "smart_kernels::sym_kl: input must have a last dimension");
  const int64_t V = x.size(-1);
  at::Tensor rows = x.reshape({-1, V});
  return (V == 1 || rows.stride(1) == 1) ? rows : rows.contiguous();
}

Opt as_row_mask(const Opt& mask) {
  return mask.has_value() ? Opt(mask->reshape({-1})) : c10::nullopt;
}

at::Tensor shape_output(const at::Tensor& out, const at::Tensor& input, int64_t reduction) {
  return reduction == kNone ? out.view(input.sizes().slice(0, input.dim() - 1)) : out;
}

class SymKLFunction : public torch::autograd::Function<SymKLFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& target, const Opt& mask, int64_t mode,
                            int64_t reduction) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor a = as_rows(input), b = as_rows(target);
    const Opt m = as_row_mask(mask);
    auto [out, stats, scale] = call_fwd(a, b, m, mode, reduction);
    if (m.has_value()) {
      ctx->save_for_backward({a, b, stats, scale, *m});
    } else {
      ctx->save_for_backward({a, b, stats, scale});
    }
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["sizes"] = input.sizes().vec();
    return shape_output(out, input, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // The kernels' gradient is not itself differentiable: refuse rather than return a gradient
    // that silently drops the second-order term.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "smart_kernels sym_kl/kl (native backend): double backward (create_graph=True) "
                "is not supported; use backend=\"reference\" for higher-order gradients");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &a = saved[0], &b = saved[1], &stats = saved[2], &scale = saved[3];
    const Opt mask = saved.size() > 4 ? Opt(saved[4]) : c10::nullopt;
    const bool need_input = ctx->needs_input_grad(0), need_target = ctx->needs_input_grad(1);
    const auto sizes = ctx->saved_data["sizes"].toIntVector();
    at::Tensor g = grad_outputs[0];
    if (g.dim() > 0) g = g.reshape({-1});  // reduction none over leading dims: [N]
    auto [ga, gb] = call_bwd(g, scale, a, b, mask, stats, ctx->saved_data["mode"].toInt(),
                             need_input, need_target);
    return {need_input ? ga.view(sizes) : at::Tensor(), need_target ? gb.view(sizes) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor sym_kl_autograd(const at::Tensor& input, const at::Tensor& target, const Opt& mask,
                           int64_t mode, int64_t reduction) {
  return SymKLFunction::apply(input, target, mask, mode, reduction);
}

// Below autograd (no_grad, inference, tracing): forward only, nothing saved.
at::Tensor sym_kl_forward_only(const at::Tensor& input, const at::Tensor& target,
                               const Opt& mask, int64_t mode, int64_t reduction) {
  auto [out, stats, scale] = call_fwd(as_rows(input), as_rows(target), as_row_mask(mask), mode,
                                      reduction);
  return shape_output(out, input, reduction);
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, Autograd, m) { m.impl("sym_kl", &sym_kl_autograd); }

TORCH_LIBRARY_IMPL(smart_kernels, CompositeExplicitAutograd, m) {
  m.impl("sym_kl", &sym_kl_forward_only);
}

}  // namespace smart_kernels
