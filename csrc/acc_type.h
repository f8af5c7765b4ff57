// Accumulation type of a kernel input: fp64 for fp64 inputs, fp32 otherwise. No ATen: this is
// included by the per-ISA CPU kernels too (csrc/cpu/sym_kl_rows.h).
#pragma once

namespace smart_kernels {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

}  // namespace smart_kernels
