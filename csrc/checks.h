// Input checks shared by the CPU and CUDA kernels. The Python layer validates user input with
// clear messages first; these guard the raw ops against misuse (e.g. torch.ops called directly).
#pragma once

#include <ATen/ATen.h>

namespace smart_kernels {

// Accumulation type: fp64 for fp64 inputs, fp32 otherwise.
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

inline void check_rows_pair(const at::Tensor& input, const at::Tensor& target,
                            const c10::optional<at::Tensor>& mask, int64_t mode) {
  TORCH_CHECK(input.dim() == 2, "smart_kernels: input must be 2-D [N, V], got ", input.dim(), "-D");
  TORCH_CHECK(input.sizes() == target.sizes(), "smart_kernels: input and target shapes differ: ",
              input.sizes(), " vs ", target.sizes());
  TORCH_CHECK(input.scalar_type() == target.scalar_type(),
              "smart_kernels: input and target dtypes differ");
  TORCH_CHECK(input.device() == target.device(), "smart_kernels: input and target devices differ");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "smart_kernels: input must be floating point");
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

inline void check_bwd_extra(const at::Tensor& grad_rows, const at::Tensor& input,
                            const at::Tensor& stats) {
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == input.size(0),
              "smart_kernels: grad_rows must have shape [N]");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == input.size(0) && stats.size(1) == 4 &&
                  stats.is_contiguous(),
              "smart_kernels: stats must be a contiguous [N, 4] tensor");
  TORCH_CHECK(grad_rows.device() == input.device() && stats.device() == input.device(),
              "smart_kernels: grad_rows/stats are on another device");
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.scalar_type() == acc, "smart_kernels: stats has the wrong dtype");
}

}  // namespace smart_kernels
