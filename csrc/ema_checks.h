// Input checks of the EMA ops, shared by the CPU (csrc/cpu/ema.cpp) and CUDA (csrc/cuda/ema.cu)
// kernels. The Python layer (smart_kernels/ops/ema.py) validates user input with clear messages
// first; these guard the raw ops against misuse (e.g. torch.ops called directly). Metadata only:
// nothing here reads device memory.
#pragma once

#include <ATen/ATen.h>

namespace smart_kernels {

inline bool is_kernel_float(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16;
}

// decay_tensor, if given: defined, 0-d, float32 or float64, on `device`.
inline void check_decay_tensor(const c10::optional<at::Tensor>& decay_tensor,
                               const at::Device& device, const char* op) {
  if (!decay_tensor.has_value()) return;
  const at::Tensor& d = *decay_tensor;
  TORCH_CHECK(d.defined(), "smart_kernels.", op, ": decay_tensor is an undefined tensor");
  TORCH_CHECK(d.dim() == 0, "smart_kernels.", op, ": decay_tensor must be 0-d, got shape ",
              d.sizes());
  TORCH_CHECK(d.scalar_type() == at::kFloat || d.scalar_type() == at::kDouble,
              "smart_kernels.", op, ": decay_tensor must be float32 or float64, got ",
              d.scalar_type());
  TORCH_CHECK(d.device() == device, "smart_kernels.", op,
              ": decay_tensor must be on the tensors' device ", device, ", got ", d.device());
}

// ema_update_'s lists: equal lengths; every pair defined, of one shape, on `device`; a floating
// pair has kernel dtypes and is contiguous (a non-floating pair is copied: any layout).
inline void check_ema_pairs(at::TensorList teacher, at::TensorList student,
                            const at::Device& device) {
  TORCH_CHECK(teacher.size() == student.size(),
              "smart_kernels.ema_update_: teacher and student lists differ in length: ",
              teacher.size(), " vs ", student.size());
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK(t.defined() && s.defined(), "smart_kernels.ema_update_: teacher[", i,
                "] or student[", i, "] is an undefined tensor");
    TORCH_CHECK(t.sizes() == s.sizes(), "smart_kernels.ema_update_: teacher[", i, "] and student[",
                i, "] shapes differ: ", t.sizes(), " vs ", s.sizes());
    TORCH_CHECK(t.device() == device && s.device() == device,
                "smart_kernels.ema_update_: teacher[", i, "] and student[", i,
                "] must be on the device ", device, ", got ", t.device(), " and ", s.device());
    if (!t.is_floating_point()) continue;  // copied with copy_: any layout, any student dtype
    TORCH_CHECK(is_kernel_float(t.scalar_type()), "smart_kernels.ema_update_: teacher[", i,
                "] has unsupported dtype ", t.scalar_type(),
                " (float16, bfloat16, float32, float64 or a non-floating dtype)");
    TORCH_CHECK(is_kernel_float(s.scalar_type()), "smart_kernels.ema_update_: student[", i,
                "] must be float16, bfloat16, float32 or float64 when teacher[", i,
                "] is floating, got ", s.scalar_type());
    TORCH_CHECK(t.is_contiguous() && s.is_contiguous(), "smart_kernels.ema_update_: teacher[", i,
                "] and student[", i, "] must be contiguous");
  }
}

// ema's pair: one shape, both on teacher's device, kernel dtypes.
inline void check_ema_pair(const at::Tensor& teacher, const at::Tensor& student) {
  TORCH_CHECK(teacher.sizes() == student.sizes(),
              "smart_kernels.ema: teacher and student shapes differ: ", teacher.sizes(), " vs ",
              student.sizes());
  TORCH_CHECK(student.device() == teacher.device(),
              "smart_kernels.ema: teacher and student must be on one device, got ",
              teacher.device(), " and ", student.device());
  TORCH_CHECK(is_kernel_float(teacher.scalar_type()) && is_kernel_float(student.scalar_type()),
              "smart_kernels.ema: teacher and student must be float16, bfloat16, float32 or "
              "float64, got ",
              teacher.scalar_type(), " and ", student.scalar_type());
}

}  // namespace smart_kernels
