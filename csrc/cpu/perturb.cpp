// Adversarial perturbation ops (normalize, normalize_bwd, perturb_step, init_noise), CPU kernels.
//
// x, noise d, grad g: [..., T, H] contiguous, split into G groups of L elements (token scope:
// L = H, the last dim; sequence scope: L = T * H, the last two dims). mask: one flag per token
// of H elements (shape x.shape[:-1]); a False token contributes 0 to every reduction and gets 0.
// Per group (elementwise math in ../perturb_math.h, shared with the CUDA kernels):
//   normalize     inf: y = x / (m + eps), m = max|x|;  l2: y = x / (n + eps), n = ||x||_2;
//                 l1: y = sign(x)
//   normalize_bwd (g = dL/dy, dot = <g, x>, c = #{j : |x_j| = m}):
//                 inf: dx_j = g_j / (m + eps) - dot / (m + eps)^2 * sign(x_j) [|x_j| = m] / c
//                 l2:  dx_j = g_j / (n + eps) - x_j * dot / (n (n + eps)^2)   (0 if n = 0)
//                 l1:  dx = 0
//   perturb_step  paper: s = d + step * normalize(g) (stage 1 reduces g), then inf: clamp to
//                 [-radius, radius]; l2 / l1: stage 2 reduces ||s||_2 / ||s||_1 and rescales
//                 the group to norm <= radius (radius = +inf: no projection, no stage 2).
//                 normalize_sum: out = normalize(d + step * g) (stage 1 reduces d + step * g).
//   init_noise    element i = std * (Box-Muller of Philox4x32-10(key = seed, counter = i / 4))
//                 [i % 4], 0 where masked.
//
// Reduction order (fixed, so results do not depend on the thread count): a group is cut into
// chunks of kChunk elements and each chunk into blocks of kBlock (from the group's start); in a
// block, element i goes to lane (i - block start) % kLanes (a masked element is skipped, which
// equals adding the reduction's identity 0), the lanes are folded in order, the block results are
// folded in order in double, and the chunk results likewise. Groups of at most kChunk elements:
// one task per group runs all its stages while the group is in cache (parallel over groups).
// Larger groups: each stage reduces its chunks in parallel into a buffer, folds them per group,
// then the output is written in parallel over chunks. normalize_bwd reduces in one pass
// (max|x|, its tie count c, <g, x>) for inf or (sum x^2, <g, x>) for l2; (max, count) pairs
// merge by keeping the count of the larger max (the sum of both when equal). Max reductions
// propagate NaN (nan_max), as torch.amax does; max|v| (normalize and perturb_step, inf) runs as
// an integer max of the bit patterns with the sign cleared, exact in any order. With a mask
// that keeps every token the results are bit-identical to no mask.
// This file holds the checks and the threading; the group kernels (the reductions of a chunk,
// the output) are in perturb_groups_impl.h, compiled once per instruction set
// (perturb_groups_<isa>.cpp): the AVX2 + FMA copy runs when the CPU has them (isa.h; FMA
// contracts d + step * u there), the baseline copy otherwise or with SMART_KERNELS_CPU_ISA=base.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../acc_type.h"
#include "../perturb_math.h"
#include "isa.h"
#include "perturb_groups.h"

namespace smart_kernels {
namespace {

using perturb::kInf;
using perturb::kL1;
using perturb::kNormalizeSum;
using perturb::kPaper;
using perturb::kSequence;
using perturb::kToken;
using perturb::StepParams;
using perturb_cpu::GroupArgs;
using perturb_cpu::GroupKernels;
using perturb_cpu::GroupState;
using perturb_cpu::kChunk;
using perturb_cpu::kTaskElems;
using perturb_cpu::Partial;

// ---- the group driver -----------------------------------------------------------------------

// The kernels of this CPU's instruction set (isa.h).
template <typename Fn, typename... Args>
GroupKernels pick(Fn base_fn, Fn avx2_fn, Args... args) {
  return cpu_use_avx2() ? avx2_fn(args...) : base_fn(args...);
}

// Runs an op on G groups of L elements (module comment): groups of at most kChunk elements one
// task per run of groups, larger ones stage by stage over chunks.
void run_groups(const GroupKernels& k, const GroupArgs& args, int64_t G, int64_t L) {
  if (G == 0 || L == 0) return;
  if (L <= kChunk) {
    const int64_t grain = std::max<int64_t>(1, kTaskElems / L);
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) { k.groups(args, g0, g1, L); });
    return;
  }
  const int stages = k.stages(args);
  const int64_t per_group = (L + kChunk - 1) / kChunk, total = G * per_group;
  std::vector<GroupState> states(G);
  std::vector<Partial> parts(total);
  const auto bounds = [&](int64_t c, int64_t* c0, int64_t* c1) {
    const int64_t gi = c / per_group;
    *c0 = gi * L + (c % per_group) * kChunk;
    *c1 = std::min(*c0 + kChunk, (gi + 1) * L);
  };
  for (int s = 0; s < stages; ++s) {
    at::parallel_for(0, total, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t c = k0; c < k1; ++c) {
        int64_t c0, c1;
        bounds(c, &c0, &c1);
        parts[c] = k.reduce(args, s, c0, c1, states[c / per_group]);
      }
    });
    // Per group: fold its chunks' partials in order (a few per group: no threads needed).
    for (int64_t gi = 0; gi < G; ++gi) {
      Partial t = parts[gi * per_group];
      for (int64_t j = 1; j < per_group; ++j) t = k.merge(args, s, t, parts[gi * per_group + j]);
      k.finish(args, s, t, states[gi]);
    }
  }
  at::parallel_for(0, total, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t c = k0; c < k1; ++c) {
      int64_t c0, c1;
      bounds(c, &c0, &c1);
      k.apply(args, c0, c1, states[c / per_group]);
    }
  });
}

// ---- glue -----------------------------------------------------------------------------------

void check_codes(int64_t norm, int64_t scope) {
  TORCH_CHECK(norm >= kInf && norm <= kL1,
              "smart_kernels: norm must be 0 (inf), 1 (l2) or 2 (l1), got ", norm);
  TORCH_CHECK(scope == kToken || scope == kSequence,
              "smart_kernels: scope must be 0 (token) or 1 (sequence), got ", scope);
}

void check_float_input(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "smart_kernels: ", name, " must be float16, bfloat16, float32 or float64, got ", dt);
}

// The group layout of x: (G, L, H).
struct Layout {
  int64_t G, L, H;
};

Layout check_grouped(const at::Tensor& x, const char* name, int64_t scope) {
  check_float_input(x, name);
  TORCH_CHECK(x.is_contiguous(), "smart_kernels: ", name, " must be contiguous");
  TORCH_CHECK(x.dim() >= (scope == kSequence ? 2 : 1), "smart_kernels: ", name, " must have at ",
              "least ", scope == kSequence ? 2 : 1, " dims for this scope, got ", x.dim(), "-D");
  const int64_t H = x.size(-1);
  const int64_t L = scope == kSequence ? H * x.size(-2) : H;
  return {L == 0 ? 0 : x.numel() / L, L, H};
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.sizes() == b.sizes(), "smart_kernels: ", na, " and ", nb, " shapes differ: ",
              a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "smart_kernels: ", na, " and ", nb,
              " dtypes differ");
  TORCH_CHECK(a.device() == b.device(), "smart_kernels: ", na, " and ", nb, " devices differ");
  TORCH_CHECK(b.is_contiguous(), "smart_kernels: ", nb, " must be contiguous");
}

// The mask's data (nullptr without one) after checking it is bool [like.shape[:-1]].
const bool* checked_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& like) {
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kBool, "smart_kernels: mask must be bool, got ",
              mask->scalar_type());
  TORCH_CHECK(mask->device() == like.device(), "smart_kernels: mask is on another device");
  TORCH_CHECK(like.dim() >= 1, "smart_kernels: a mask needs an input with at least 1 dim");
  const auto tokens = like.sizes().slice(0, like.dim() - 1);
  TORCH_CHECK(mask->sizes() == tokens, "smart_kernels: mask must have shape ", tokens, ", got ",
              mask->sizes());
  TORCH_CHECK(mask->is_contiguous(), "smart_kernels: mask must be contiguous");
  return like.numel() == 0 ? nullptr : mask->data_ptr<bool>();
}

at::Tensor normalize_cpu(const at::Tensor& x, int64_t norm, int64_t scope, double eps) {
  check_codes(norm, scope);
  const Layout lay = check_grouped(x, "x", scope);
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  const GroupArgs args{x.data_ptr(), nullptr, nullptr, y.data_ptr(), lay.H,
                       StepParams{0, 0, eps, static_cast<int>(norm), kPaper}};
  run_groups(pick(&base::normalize_kernels, &avx2::normalize_kernels, x.scalar_type(),
                  static_cast<int>(norm)),
             args, lay.G, lay.L);
  return y;
}

at::Tensor normalize_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x, int64_t norm,
                             int64_t scope, double eps) {
  check_codes(norm, scope);
  const Layout lay = check_grouped(x, "x", scope);
  check_same(x, grad_y, "x", "grad_y");
  if (norm == kL1) return at::zeros(x.sizes(), x.options());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  const GroupArgs args{grad_y.data_ptr(), x.data_ptr(), nullptr, dx.data_ptr(), lay.H,
                       StepParams{0, 0, eps, static_cast<int>(norm), kPaper}};
  run_groups(pick(&base::normalize_bwd_kernels, &avx2::normalize_bwd_kernels, x.scalar_type(),
                  static_cast<int>(norm)),
             args, lay.G, lay.L);
  return dx;
}

at::Tensor perturb_step_cpu(const at::Tensor& noise, const at::Tensor& grad,
                            const c10::optional<at::Tensor>& mask, double step_size,
                            double radius, int64_t norm, int64_t scope, int64_t rule,
                            double eps) {
  check_codes(norm, scope);
  TORCH_CHECK(rule == kPaper || rule == kNormalizeSum,
              "smart_kernels: rule must be 0 (paper) or 1 (normalize_sum), got ", rule);
  const Layout lay = check_grouped(noise, "noise", scope);
  check_same(noise, grad, "noise", "grad");
  const bool* mask_p = checked_mask(mask, noise);
  at::Tensor out = at::empty(noise.sizes(), noise.options());
  if (noise.numel() == 0) return out;
  const GroupArgs args{
      noise.data_ptr(), grad.data_ptr(), mask_p, out.data_ptr(), lay.H,
      StepParams{step_size, radius, eps, static_cast<int>(norm), static_cast<int>(rule)}};
  run_groups(pick(&base::perturb_step_kernels, &avx2::perturb_step_kernels, noise.scalar_type(),
                  static_cast<int>(norm), static_cast<int>(rule)),
             args, lay.G, lay.L);
  return out;
}

// init_noise: element i = std * box_muller4(philox4x32_10(i / 4, seed))[i % 4], 0 where its
// token (i / H) is masked; std is applied in the accumulation dtype.
at::Tensor init_noise_cpu(const at::Tensor& like, const c10::optional<at::Tensor>& mask,
                          const at::Tensor& seed, double std) {
  check_float_input(like, "like");
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "smart_kernels: seed must be a 0-d int64 CPU tensor");
  const bool* mask_p = checked_mask(mask, like);
  at::Tensor out = at::empty(like.sizes(), like.options());
  const int64_t N = like.numel();
  if (N == 0) return out;
  const int64_t H = like.dim() >= 1 ? like.size(-1) : 1;
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());  // a CPU tensor: no sync
  const int64_t blocks = (N + 3) / 4;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "init_noise_cpu",
                                  [&] {
    using acc_t = typename AccType<scalar_t>::type;
    scalar_t* o = out.data_ptr<scalar_t>();
    const acc_t sd = static_cast<acc_t>(std);
    at::parallel_for(0, blocks, 2048, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        float z[4];
        perturb::box_muller4(perturb::philox4x32_10(static_cast<uint64_t>(k), key), z);
        const int64_t i0 = 4 * k, n = std::min<int64_t>(4, N - i0);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t i = i0 + j;
          const bool kept = mask_p == nullptr || mask_p[i / H];
          o[i] = kept ? static_cast<scalar_t>(sd * static_cast<acc_t>(z[j])) : scalar_t(0);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CPU, m) {
  m.impl("normalize", &normalize_cpu);
  m.impl("normalize_bwd", &normalize_bwd_cpu);
  m.impl("perturb_step", &perturb_step_cpu);
  m.impl("init_noise", &init_noise_cpu);
}

}  // namespace smart_kernels
