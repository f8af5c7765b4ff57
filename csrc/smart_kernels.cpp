// smart_kernels._C: every op schema of the native backend, in one place.
//
// The *_fwd / *_bwd ops are raw kernels (CPU and CUDA impls, no autograd); the others are the
// differentiable ops built on them (autograd in csrc/autograd/). smart_kernels/ops/*.py
// registers fake (meta) implementations for all of them and validates user input.
#include <Python.h>
#include <torch/library.h>

// Importing smart_kernels._C loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace smart_kernels {

static bool has_cuda() {
#ifdef SMART_KERNELS_WITH_CUDA
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(smart_kernels, m) {
  // Whether this build carries the CUDA kernels.
  m.def("has_cuda() -> bool", &has_cuda);

  // Symmetric KL / KL family on rows of logits. input, target: [N, V] (last dim contiguous),
  // mask: [N] bool. mode: 0 = sym_kl grad="full", 1 = sym_kl grad="stop_grad", 2 = kl
  // (KL(softmax(target) || softmax(input))). reduction: 0 = none, 1 = sum, 2 = batchmean,
  // 3 = mean (checks.h). Returns (out: [N] for none else 0-d, stats: [N, 6] (acc_type.h),
  // scale: 0-d, the factor d out / d row), all in the accumulation dtype (fp64 for fp64
  // inputs, else fp32). Masked rows contribute 0.
  m.def(
      "sym_kl_fwd(Tensor input, Tensor target, Tensor? mask, int mode, int reduction) -> "
      "(Tensor, Tensor, Tensor)");
  // Gradients given grad_out (the gradient of out: [N] or 0-d): each row's gradient is
  // grad_out[row or 0] * scale. Returns (grad_input, grad_target) in the input dtype; a gradient
  // that is not needed is an empty tensor.
  m.def(
      "sym_kl_bwd(Tensor grad_out, Tensor scale, Tensor input, Tensor target, Tensor? mask, "
      "Tensor stats, int mode, bool need_input, bool need_target) -> (Tensor, Tensor)");
  // Differentiable, on logits [..., V] with mask [...]: returns [...] for none, else 0-d.
  m.def("sym_kl(Tensor input, Tensor target, Tensor? mask, int mode, int reduction) -> Tensor");
}

}  // namespace smart_kernels
