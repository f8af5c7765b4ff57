// EMA teacher, CPU kernels.
//
//   ema_update_:  t_i <- decay * t_i + (1 - decay) * s_i   for every pair i, in place
//   ema:          out  = decay * t   + (1 - decay) * s     (a new tensor in t's dtype)
//   (no gradient here: the functional's autograd, d/dt = decay * g, d/ds = (1 - decay) * g, is
//   registered in smart_kernels/ops/ema.py)
// Arithmetic in the teacher's accumulation dtype acc (fp64 for an fp64 teacher, else fp32; the
// student is converted to acc), written as torch.lerp(t, s, w) with the weight w = 1 - decay:
//   |w| <  0.5:  t + w (s - t)         = fma(w,     s - t, t)
//   |w| >= 0.5:  s - (1 - w) (s - t)   = fma(w - 1, s - t, s)   (w - 1 is exact for w in [0.5, 1])
// This is ATen's lerp formula, fused as ATen's vectorized CPU kernels fuse it, so the result is
// t.lerp_(s, 1 - decay) bit for bit there (and within a rounding of the reference's unfused
// decay*t + (1-decay)*s, except where that cancels); decay = 1 gives t and decay = 0 gives s
// exactly. The FMA is always a true one (std::fma): every copy below gives the same bits.
// w: from decay_tensor (0-d fp32/fp64 CPU tensor: its value cast to acc, w = 1 - value in acc;
// the reference's `1 - decay.to(acc)`) if given, else from `decay`: w = acc(1 - decay), the
// difference taken in double (Python's `1 - decay`).
// Non-floating pairs (integer buffers) are copied: t.copy_(s). Zero-element pairs are skipped.
//
// Work split: the elements of the floating pairs are numbered 0 .. total-1, pair after pair;
// at::parallel_for splits that flat range and each thread walks the (pair, offset) spans its
// range overlaps. So many tiny tensors and one huge tensor both parallelize, and the result does
// not depend on the number of threads (elementwise, no reduction).
// The inner loops are plain loops over contiguous memory that the compiler vectorizes; on x86-64
// a copy compiled for AVX2 + FMA is chosen at run time when the CPU has them (unless
// SMART_KERNELS_CPU_ISA=base, as for sym_kl). The baseline x86-64 copy (CPUs without FMA) calls
// libm's fma per element: slow, but the same bits.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../acc_type.h"
#include "../ema_checks.h"
#include "isa.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
#define SK_EMA_HAVE_AVX2_COPY 1
#endif

namespace smart_kernels {
namespace {

constexpr int64_t kGrain = 1 << 15;  // elements per parallel_for task at least

// Checks: csrc/ema_checks.h (the Python layer validates user input first).

// ---------------------------------------------------------------------------------------------
// Weights.

// w = 1 - decay for an fp32 and an fp64 teacher (module comment).
struct Weights {
  float w32;
  double w64;
  double for_teacher(at::ScalarType tdt) const { return tdt == at::kDouble ? w64 : w32; }
};

Weights ema_weights(const c10::optional<at::Tensor>& decay_tensor, double decay) {
  if (!decay_tensor.has_value()) {
    return {static_cast<float>(1.0 - decay), 1.0 - decay};
  }
  const at::Tensor& d = *decay_tensor;  // CPU, 0-d: reading it is no device sync
  if (d.scalar_type() == at::kFloat) {
    const float v = *d.const_data_ptr<float>();
    return {1.0f - v, 1.0 - static_cast<double>(v)};
  }
  const double v = *d.const_data_ptr<double>();
  return {1.0f - static_cast<float>(v), 1.0 - v};
}

// ---------------------------------------------------------------------------------------------
// Span kernels: out[j] = lerp(t[j], s[j], w) in acc for j < n (module comment). `w` arrives as a
// double holding an acc value exactly.

template <typename T, typename S>
inline __attribute__((always_inline)) void lerp_inplace(T* __restrict__ t,
                                                        const S* __restrict__ s, int64_t n,
                                                        double w_in) {
  using acc_t = typename AccType<T>::type;
  const acc_t w = static_cast<acc_t>(w_in);
  if (std::abs(w) < acc_t(0.5)) {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = static_cast<acc_t>(t[j]), b = static_cast<acc_t>(s[j]);
      t[j] = static_cast<T>(std::fma(w, b - a, a));
    }
  } else {
    const acc_t c = w - acc_t(1);
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = static_cast<acc_t>(t[j]), b = static_cast<acc_t>(s[j]);
      t[j] = static_cast<T>(std::fma(c, b - a, b));
    }
  }
}

template <typename T, typename S>
inline __attribute__((always_inline)) void lerp_out(const T* __restrict__ t,
                                                    const S* __restrict__ s, T* __restrict__ out,
                                                    int64_t n, double w_in) {
  using acc_t = typename AccType<T>::type;
  const acc_t w = static_cast<acc_t>(w_in);
  if (std::abs(w) < acc_t(0.5)) {
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = static_cast<acc_t>(t[j]), b = static_cast<acc_t>(s[j]);
      out[j] = static_cast<T>(std::fma(w, b - a, a));
    }
  } else {
    const acc_t c = w - acc_t(1);
    for (int64_t j = 0; j < n; ++j) {
      const acc_t a = static_cast<acc_t>(t[j]), b = static_cast<acc_t>(s[j]);
      out[j] = static_cast<T>(std::fma(c, b - a, b));
    }
  }
}

// Type-erased span kernel: out == t for the in-place update.
using SpanFn = void (*)(const void* t, const void* s, void* out, int64_t n, double w);

template <typename T, typename S>
void span_base(const void* t, const void* s, void* out, int64_t n, double w) {
  if (out == t) {
    lerp_inplace<T, S>(static_cast<T*>(out), static_cast<const S*>(s), n, w);
  } else {
    lerp_out<T, S>(static_cast<const T*>(t), static_cast<const S*>(s), static_cast<T*>(out), n,
                   w);
  }
}

#ifdef SK_EMA_HAVE_AVX2_COPY
template <typename T, typename S>
__attribute__((target("avx2,fma"))) void span_avx2(const void* t, const void* s, void* out,
                                                   int64_t n, double w) {
  if (out == t) {
    lerp_inplace<T, S>(static_cast<T*>(out), static_cast<const S*>(s), n, w);
  } else {
    lerp_out<T, S>(static_cast<const T*>(t), static_cast<const S*>(s), static_cast<T*>(out), n,
                   w);
  }
}
#endif

// AVX2 + FMA copy when the CPU has them, unless SMART_KERNELS_CPU_ISA=base (isa.h).
bool use_avx2() {
#ifdef SK_EMA_HAVE_AVX2_COPY
  return cpu_use_avx2();
#else
  return false;
#endif
}

template <typename T, typename S>
SpanFn span_fn_for() {
#ifdef SK_EMA_HAVE_AVX2_COPY
  if (use_avx2()) return &span_avx2<T, S>;
#endif
  return &span_base<T, S>;
}

template <typename T>
SpanFn span_fn_student(at::ScalarType sdt) {
  switch (sdt) {
    case at::kFloat: return span_fn_for<T, float>();
    case at::kDouble: return span_fn_for<T, double>();
    case at::kHalf: return span_fn_for<T, c10::Half>();
    case at::kBFloat16: return span_fn_for<T, c10::BFloat16>();
    default: TORCH_CHECK(false, "smart_kernels: unsupported student dtype ", sdt);
  }
}

SpanFn span_fn(at::ScalarType tdt, at::ScalarType sdt) {
  switch (tdt) {
    case at::kFloat: return span_fn_student<float>(sdt);
    case at::kDouble: return span_fn_student<double>(sdt);
    case at::kHalf: return span_fn_student<c10::Half>(sdt);
    case at::kBFloat16: return span_fn_student<c10::BFloat16>(sdt);
    default: TORCH_CHECK(false, "smart_kernels: unsupported teacher dtype ", tdt);
  }
}

// ---------------------------------------------------------------------------------------------
// Ops.

// One floating pair with elements: its pointers, element sizes, kernel and weight.
struct Span {
  char* t;
  const char* s;
  int64_t tsize, ssize;
  int64_t begin;  // index of its first element in the flat numbering
  int64_t n;
  SpanFn fn;
  double w;
};

void ema_update_cpu(at::TensorList teacher, at::TensorList student,
                    const c10::optional<at::Tensor>& decay_tensor, double decay) {
  check_ema_pairs(teacher, student, at::Device(at::kCPU));
  check_decay_tensor(decay_tensor, at::Device(at::kCPU), "ema_update_");
  const Weights weights = ema_weights(decay_tensor, decay);
  std::vector<Span> spans;
  std::vector<int64_t> ends;  // ends[k] = spans[k].begin + spans[k].n (ascending)
  spans.reserve(teacher.size());
  ends.reserve(teacher.size());
  int64_t total = 0;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    if (!t.is_floating_point()) {
      if (t.numel() > 0) t.copy_(s);
      continue;
    }
    const int64_t n = t.numel();
    if (n == 0) continue;
    spans.push_back({static_cast<char*>(t.data_ptr()), static_cast<const char*>(s.const_data_ptr()),
                     static_cast<int64_t>(t.element_size()),
                     static_cast<int64_t>(s.element_size()), total, n,
                     span_fn(t.scalar_type(), s.scalar_type()),
                     weights.for_teacher(t.scalar_type())});
    total += n;
    ends.push_back(total);
  }
  if (total == 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    // The first span that ends after `begin`, then on through the spans that [begin, end) overlaps.
    size_t k = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
    while (begin < end) {
      const Span& sp = spans[k];
      const int64_t off = begin - sp.begin;
      const int64_t len = std::min(end, sp.begin + sp.n) - begin;
      void* t = sp.t + off * sp.tsize;
      sp.fn(t, sp.s + off * sp.ssize, t, len, sp.w);
      begin += len;
      ++k;
    }
  });
}

at::Tensor ema_cpu(const at::Tensor& teacher, const at::Tensor& student,
                   const c10::optional<at::Tensor>& decay_tensor, double decay) {
  check_ema_pair(teacher, student);
  TORCH_CHECK(teacher.device().is_cpu(), "smart_kernels.ema: expected CPU tensors, got ",
              teacher.device());
  check_decay_tensor(decay_tensor, teacher.device(), "ema");
  const double w = ema_weights(decay_tensor, decay).for_teacher(teacher.scalar_type());
  const at::Tensor t = teacher.contiguous();
  const at::Tensor s = student.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options());
  const int64_t n = t.numel();
  if (n == 0) return out;
  const SpanFn fn = span_fn(t.scalar_type(), s.scalar_type());
  const char* tp = static_cast<const char*>(t.const_data_ptr());
  const char* sp = static_cast<const char*>(s.const_data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t ts = t.element_size(), ss = s.element_size();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    fn(tp + begin * ts, sp + begin * ss, op + begin * ts, end - begin, w);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
  m.impl("ema", &ema_cpu);
}

}  // namespace smart_kernels
