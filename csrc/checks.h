// Input checks shared by the CPU and CUDA kernels. The Python layer validates user input with
// clear messages first; these guard the raw ops against misuse (e.g. torch.ops called directly).
#pragma once

#include <ATen/ATen.h>

#include "acc_type.h"

namespace smart_kernels {

inline void check_rows_pair(const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& mask, int64_t mode) {
  TORCH_CHECK(input.dim() == 2, "smart_kernels: input must be 2-D [N, V], got ", input.dim(), "-D");
  TORCH_CHECK(input.sizes() == target.sizes(), "smart_kernels: input and target shapes differ: ",
              input.sizes(), " vs ", target.sizes());
  TORCH_CHECK(input.scalar_type() == target.scalar_type(),
              "smart_kernels: input and target dtypes differ");
  TORCH_CHECK(input.device() == target.device(), "smart_kernels: input and target devices differ");
  const auto dt = input.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "smart_kernels: input must be float16, bfloat16, float32 or float64, got ", dt);
  TORCH_CHECK(input.size(1) > 0, "smart_kernels: the last dimension (V) must be > 0");
  TORCH_CHECK(input.size(0) == 0 || input.size(1) == 1 ||
                  (input.stride(1) == 1 && target.stride(1) == 1),
              "smart_kernels: the last dimension must be contiguous");
  TORCH_CHECK(mode >= 0 && mode <= 2, "smart_kernels: mode must be 0, 1 or 2, got ", mode);
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "smart_kernels: mask must be bool");
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == input.size(0),
                "smart_kernels: mask must have shape [N]");
    TORCH_CHECK(mask->device() == input.device(), "smart_kernels: mask is on another device");
  }
}

// Reductions of per-row values (DESIGN §3). The reduced value is sum(rows) * scale with
// scale = 1 for none/sum and 1 / max(counted rows [* V for mean], 1) otherwise; each row's
// gradient is grad_out * scale, so the backward needs only the saved 0-d scale.
enum Reduction : int64_t { kNone = 0, kSum = 1, kBatchMean = 2, kMean = 3 };

inline void check_reduction(int64_t reduction) {
  TORCH_CHECK(reduction >= kNone && reduction <= kMean,
              "smart_kernels: reduction must be 0 (none), 1 (sum), 2 (batchmean) or 3 (mean), "
              "got ", reduction);
}

C10_HOST_DEVICE inline double reduction_scale(int64_t reduction, int64_t count, int64_t V) {
  if (reduction != kBatchMean && reduction != kMean) return 1.0;
  const double divisor = static_cast<double>(count) * (reduction == kMean ? V : 1);
  return 1.0 / (divisor > 1.0 ? divisor : 1.0);
}

inline at::ScalarType acc_type_of(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Outputs of a forward: out ([N] for none, else 0-d), stats [N, kStatsPerRow], scale (0-d).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> alloc_fwd_outputs(const at::Tensor& input,
                                                                        int64_t reduction) {
  const auto opts = input.options().dtype(acc_type_of(input));
  const int64_t N = input.size(0);
  at::Tensor out = reduction == kNone ? at::empty({N}, opts) : at::empty({}, opts);
  return {out, at::empty({N, kStatsPerRow}, opts), at::empty({}, opts)};
}

inline void check_bwd_extra(const at::Tensor& grad_out, const at::Tensor& scale,
                            const at::Tensor& input, const at::Tensor& stats) {
  TORCH_CHECK(grad_out.dim() == 0 || (grad_out.dim() == 1 && grad_out.size(0) == input.size(0)),
              "smart_kernels: grad_out must be 0-d or have shape [N]");
  TORCH_CHECK(scale.dim() == 0, "smart_kernels: scale must be 0-d");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == input.size(0) &&
                  stats.size(1) == kStatsPerRow && stats.is_contiguous(),
              "smart_kernels: stats must be a contiguous [N, ", kStatsPerRow, "] tensor");
  TORCH_CHECK(grad_out.device() == input.device() && stats.device() == input.device() &&
                  scale.device() == input.device(),
              "smart_kernels: grad_out/scale/stats are on another device");
  TORCH_CHECK(stats.scalar_type() == acc_type_of(input) && scale.scalar_type() == acc_type_of(input),
              "smart_kernels: stats/scale have the wrong dtype");
}

}  // namespace smart_kernels
