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

  // Adversarial perturbation on embeddings x: [..., T, H] (contiguous). Codes (perturb_math.h):
  // norm 0 = inf, 1 = l2, 2 = l1; scope 0 = token (a group is one row of H, the last dim),
  // 1 = sequence (a group is T*H, the last two dims); rule 0 = paper, 1 = normalize_sum.
  // Arithmetic in fp32 (fp64 for fp64); outputs in the input dtype.
  // normalize: y = x / (max|x| + eps) (inf), x / (||x||_2 + eps) (l2), sign(x) (l1), per group.
  m.def("normalize(Tensor x, int norm, int scope, float eps) -> Tensor");
  // The gradient of normalize given grad_y (same shape as x); zeros for l1.
  m.def("normalize_bwd(Tensor grad_y, Tensor x, int norm, int scope, float eps) -> Tensor");
  // One ascent step: the new noise (never differentiated). noise, grad: same shape and dtype;
  // mask: bool [...,T] (= noise.shape[:-1]) or None, False = a token with zero noise that is
  // left out of every group norm. radius: +inf = no projection.
  m.def(
      "perturb_step(Tensor noise, Tensor grad, Tensor? mask, float step_size, float radius, "
      "int norm, int scope, int rule, float eps) -> Tensor");
  // N(0, std^2) noise shaped like `like` (its dtype and device), zero where mask is False
  // (mask: bool like.shape[:-1]). seed: 0-d int64 on like's device (read in-kernel: no sync);
  // element i is output i % 4 of Philox4x32-10(key = seed, counter = i / 4) + Box-Muller
  // (perturb_math.h), the same numbers on CPU and CUDA.
  m.def("init_noise(Tensor like, Tensor? mask, Tensor seed, float std) -> Tensor");

  // EMA teacher: teacher[i] <- decay * teacher[i] + (1 - decay) * student[i], in place, for
  // every pair (same shape, same device, contiguous; a floating teacher may differ in dtype
  // from its student, e.g. fp32 teacher / bf16 student; non-floating pairs are copied).
  // decay: decay_tensor (0-d fp32/fp64 on the tensors' device, read in-kernel) if given, else
  // `decay`. On CUDA: one launch per (teacher dtype, student dtype) combination.
  m.def(
      "ema_update_(Tensor(a!)[] teacher, Tensor[] student, Tensor? decay_tensor, float decay) "
      "-> ()");
  // Functional: decay * teacher + (1 - decay) * student (same shape; result in teacher's
  // dtype). No autograd here: smart_kernels/ops/ema.py registers it.
  m.def("ema(Tensor teacher, Tensor student, Tensor? decay_tensor, float decay) -> Tensor");
}

}  // namespace smart_kernels
