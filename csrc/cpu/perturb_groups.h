// The interface between the perturbation ops' CPU glue (perturb.cpp: checks, threading) and
// their group kernels (perturb_groups_impl.h), which are compiled once per instruction set
// (perturb_groups_<isa>.cpp, each in its own namespace) and picked at run time (isa.h).
// No ATen: included by the per-ISA kernels too.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "../perturb_math.h"

namespace smart_kernels {
namespace perturb_cpu {

// Reduction order (perturb.cpp's module comment): lanes of a block, blocks of a chunk, chunks
// of a group. Groups of at most kChunk elements run in one task; larger ones split by chunk.
constexpr int kLanes = 16;
constexpr int64_t kBlock = 1024;
constexpr int64_t kChunk = 16 * kBlock;
constexpr int64_t kTaskElems = 32768;  // elements per task, at least, when groups are small

// A chunk's (or a group's) reduction result, in double. r: the max or the sum; ties and dot:
// only for normalize_bwd.
struct Partial {
  double r = 0, ties = 0, dot = 0;
};

// A group's finished reductions (the factors its output needs), each a value of the
// accumulation dtype held in a double (exact): perturb_step (scale1, factor2), normalize (r),
// normalize_bwd (r, dot, ties). A value no stage sets stays 1.
struct GroupState {
  double v[3] = {1, 1, 1};
};

// The operands of one op call. x / y: normalize (input, -), normalize_bwd (grad_y, x),
// perturb_step (noise, grad). mask: one flag per token of H elements, or nullptr. p: the op's
// parameters (norm, eps; perturb_step: all of them).
struct GroupArgs {
  const void* x;
  const void* y;
  const bool* mask;
  void* out;
  int64_t H;
  perturb::StepParams p;
};

// One op for one dtype, norm and rule, type-erased.
struct GroupKernels {
  int (*stages)(const GroupArgs&);
  // Groups [g0, g1) of L <= kChunk elements: every stage, then the output, group by group.
  void (*groups)(const GroupArgs&, int64_t g0, int64_t g1, int64_t L);
  // Larger groups, a chunk [c0, c1) at a time: stage s's partial, the merge of two partials,
  // the group's state from its total, the output.
  Partial (*reduce)(const GroupArgs&, int s, int64_t c0, int64_t c1, const GroupState&);
  Partial (*merge)(const GroupArgs&, int s, const Partial&, const Partial&);
  void (*finish)(const GroupArgs&, int s, const Partial&, GroupState&);
  void (*apply)(const GroupArgs&, int64_t c0, int64_t c1, const GroupState&);
};

}  // namespace perturb_cpu

// The kernels of each op, one copy per instruction set (dtype: the caller checked it is
// float16, bfloat16, float32 or float64; norm / rule: valid codes).
#define SK_DECLARE_PERTURB_GROUPS(isa)                                                       \
  namespace isa {                                                                            \
  perturb_cpu::GroupKernels normalize_kernels(c10::ScalarType dtype, int norm);              \
  perturb_cpu::GroupKernels normalize_bwd_kernels(c10::ScalarType dtype, int norm);          \
  perturb_cpu::GroupKernels perturb_step_kernels(c10::ScalarType dtype, int norm, int rule); \
  }
SK_DECLARE_PERTURB_GROUPS(base)
SK_DECLARE_PERTURB_GROUPS(avx2)
#undef SK_DECLARE_PERTURB_GROUPS

}  // namespace smart_kernels
