// Accumulation type of a kernel input: fp64 for fp64 inputs, fp32 otherwise. No ATen: this is
// included by the per-ISA CPU kernels too (csrc/cpu/sym_kl_rows.h).
#pragma once

#include <cstdint>

namespace smart_kernels {

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

// Per-row statistics saved by the sym_kl forward for its backward, in the accumulation dtype:
// (m_a, m_b, log s_a, log s_b, KL(P||Q), KL(Q||P)) with m the offsets subtracted (row max) and s
// the sums of e^(x - m); log P = (a - m_a) - log s_a. Offset and log-sum are kept apart so
// that log P is as exact as log_softmax's (a single lse would be rounded at the logits' scale).
constexpr int64_t kStatsPerRow = 6;

}  // namespace smart_kernels
