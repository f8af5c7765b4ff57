// Adversarial perturbation ops on embeddings, CUDA kernels: normalize, normalize_bwd,
// perturb_step, init_noise. The per-element math is perturb_math.h (shared with the CPU kernels).
//
// A contiguous tensor [..., T, H] is cut into G groups of L consecutive elements: token scope
// L = H (one row), sequence scope L = T * H. Per group, with eps > 0:
//   normalize      inf: y = x / (m + eps), m = max|x| (NaN propagates, as torch.amax)
//                  l2:  y = x / (n + eps), n = ||x||_2
//                  l1:  y = sign(x)
//   normalize_bwd  (g = dL/dy, dot = <g, x>, c = #{j : |x_j| = m}, the ties of the max)
//                  inf: dx_j = g_j / (m + eps) - dot / (m + eps)^2 * sign(x_j) [|x_j| = m] / c
//                  l2:  dx_j = g_j / (n + eps) - x_j dot / (n (n + eps)^2)   (0 for n = 0)
//                  l1:  dx = 0
//   perturb_step   (d = noise, g = grad; a masked token has d = g = 0 in every reduction and
//                  gets 0)
//                  paper:         s = d + step * normalize(g)          (stage 1 reduces g)
//                                 inf: out = clamp(s, -radius, radius)
//                                 l2 / l1: out = s * min(1, radius / ||s||) (stage 2 reduces s)
//                                 radius = +inf: out = s
//                  normalize_sum: out = normalize(d + step * g)        (stage 1 reduces d + step g)
//   init_noise     element i = std * BoxMuller(Philox4x32-10(key = seed, counter = i / 4))[i % 4],
//                  0 where masked.
// normalize_bwd is normalize's gradient; perturb_step and init_noise are never differentiated.
//
// Layout. Groups of up to kFusedMaxGroup elements get ONE fused kernel: a warp per group (8
// groups per block) when the group is at most kBatch * 32 vectors, else a block per group with
// about kBatch vectors per thread. Each pass (stage-1 reduction, optional stage 2, apply) walks
// the group with 16-byte vector loads/stores (a scalar head up to the first 16-byte boundary, a
// scalar tail; all scalar when the pointers' misalignments differ), issuing kBatch loads per
// thread before using them; the reductions are warp-shuffle + shared-memory all-reduces; the
// later passes re-read the group from L1/L2 (the paper rule's stage 1, which reads only grad,
// prefetches noise into L2), so DRAM sees each input once and the output once. Larger groups
// (sequence scope) are split into at most kMaxChunks chunks per group: a kernel over
// (group, chunk) blocks writes per-chunk partials to a workspace; the next kernel first reduces
// its group's partials in a fixed order (every block of a group gets the same bits:
// deterministic, no float atomics) and then computes stage-2 partials or the output.
// Accumulation in fp32 (fp64 for fp64); outputs in the input dtype. Indexing: int64 for flat
// offsets, 32-bit inside a group / chunk (< 2^30 elements). Launches on the current stream; no
// host synchronization (init_noise reads its seed in the kernel): CUDA-graph capturable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "../acc_type.h"
#include "../perturb_math.h"

namespace smart_kernels {
namespace {

namespace pm = perturb;

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;
constexpr int64_t kFusedMaxGroup = 16384;  // groups up to this many elements: one fused kernel
constexpr int kFusedMaxThreads = 512;
constexpr int kWarpGroupsPerBlock = 8;  // warp-per-group mode: 8 groups (warps) per block
constexpr int kSplitThreads = 256;
constexpr int64_t kSplitChunk = 16384;  // target elements per block in the split path
constexpr int64_t kMaxChunks = 1024;    // bounds the partials each split block re-reduces
constexpr int64_t kMaxChunkLength = int64_t(1) << 29;  // (rounded up by < 16): < 2^30
constexpr int kNoiseThreads = 256;
constexpr int kBatch = 2;  // 16-byte loads in flight per thread and input in a pass
constexpr int64_t kMaxGrid = int64_t(1) << 30;  // more work than this many blocks: grid-stride

template <typename T>
struct TypeIdentity {
  using type = T;
};
template <typename T>
using NoDeduce = typename TypeIdentity<T>::type;  // keeps an argument out of deduction (nullptr)

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Hint: fetch the 16 bytes at p into L2 now (the fused perturb_step reads noise only in its last
// pass; this overlaps that DRAM read with the stage-1 reduction). No architectural effect.
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
}

// ---- memory access ------------------------------------------------------------------------------
// A pass walks n elements starting at flat index begin (n < 2^30: a fused group or a split
// chunk, so offsets inside it are 32-bit), spread over the blockDim.x threads of its group
// (threadIdx.x): a scalar head up to the first 16-byte boundary, VEC-wide vectors (16 bytes), a
// scalar tail. r0: flat element e of every pointer of the pass is 16-byte aligned iff
// (e + r0) % VEC == 0 (the host checks that all pointers share it; else vec = false: all scalar).

// Scalar elements before the first aligned one (all n when !vec).
template <int VEC>
__device__ __forceinline__ int head_length(int64_t begin, int n, bool vec, int r0) {
  if (!vec) return n;
  const int h = static_cast<int>((VEC - (begin + r0) % VEC) % VEC);
  return h < n ? h : n;
}

// One load: K consecutive values of input a and of input b (raw input dtype).
template <typename T, int K>
struct Frag {
  static constexpr int kWidth = K;
  Vec<T, K> a, b;
};

// K values at p + j: one 16-byte read-only (ld.global.nc) load for K = VEC (aligned, inside the
// pass), else scalar loads. The inputs are never written while a kernel runs (outputs are fresh).
template <int K, typename T>
__device__ __forceinline__ Vec<T, K> load_vec(const T* __restrict__ p, int j) {
  Vec<T, K> v;
  if constexpr (K * sizeof(T) == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p + j));
    static_assert(sizeof(raw) == sizeof(v), "16-byte vectors");
    memcpy(&v, &raw, sizeof(v));
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) v.v[k] = p[j + k];
  }
  return v;
}

template <int K, typename T, typename acc_t>
__device__ __forceinline__ void store_vec(T* __restrict__ p, int j, const acc_t (&v)[K]) {
  Vec<T, K> x;
#pragma unroll
  for (int k = 0; k < K; ++k) x.v[k] = static_cast<T>(v[k]);
  *reinterpret_cast<Vec<T, K>*>(p + j) = x;  // K = VEC: aligned (head_length); K = 1: scalar
}

template <int K, typename T>
__device__ __forceinline__ Frag<T, K> load_frag(const T* __restrict__ a, const T* __restrict__ b,
                                                const T* pf, int j) {
  Frag<T, K> f;
  f.a = load_vec<K>(a, j);
  if (b != nullptr) {
    f.b = load_vec<K>(b, j);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) f.b.v[k] = T(0);
    if (K > 1 && pf != nullptr) prefetch_l2(pf + j);
  }
  return f;
}

// One pass over the n elements at flat index begin, reading a (and b unless nullptr; a, b, pf
// are the tensors' base pointers): use(j, frag) for each piece, j = offset from begin,
// frag.kWidth = VEC or 1 elements (frag.b = zeros when b is nullptr). Each thread first issues the
// loads of kBatch vectors, then uses them, so kBatch 16-byte loads per input and thread are in
// flight at once. pf (only when b is nullptr): prefetch the same vectors of pf into L2 for a
// later pass.
template <int VEC, typename T, typename Use>
__device__ __forceinline__ void for_range(int64_t begin, int n, bool vec, int r0, const T* a,
                                          const NoDeduce<T>* b, const NoDeduce<T>* pf,
                                          Use&& use) {
  a += begin;
  if (b != nullptr) b += begin;
  if (pf != nullptr) pf += begin;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int head = head_length<VEC>(begin, n, vec, r0);
  for (int j = tid; j < head; j += nthreads) use(j, load_frag<1>(a, b, pf, j));
  const int nvec = (n - head) / VEC;  // 0 unless vec
  for (int i = tid; i < nvec; i += kBatch * nthreads) {
    Frag<T, VEC> f[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int iu = i + u * nthreads;
      if (iu < nvec) f[u] = load_frag<VEC>(a, b, pf, head + iu * VEC);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int iu = i + u * nthreads;
      if (iu < nvec) use(head + iu * VEC, f[u]);
    }
  }
  for (int j = head + nvec * VEC + tid; j < n; j += nthreads) use(j, load_frag<1>(a, b, pf, j));
}

// Zeros to the n elements at flat index begin (the same layout, nothing read).
template <typename T>
__device__ __forceinline__ void write_zeros(T* out, int64_t begin, int n, bool vec, int r0) {
  constexpr int VEC = 16 / sizeof(T);
  out += begin;
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int head = head_length<VEC>(begin, n, vec, r0);
  const int nvec = (n - head) / VEC;
  Vec<T, VEC> z;
#pragma unroll
  for (int k = 0; k < VEC; ++k) z.v[k] = T(0);
  for (int j = tid; j < head; j += nthreads) out[j] = T(0);
  for (int i = tid; i < nvec; i += nthreads) {
    *reinterpret_cast<Vec<T, VEC>*>(out + head + i * VEC) = z;
  }
  for (int j = head + nvec * VEC + tid; j < n; j += nthreads) out[j] = T(0);
}

// keep[k], k < n: whether flat element e + k (inside the tensor) belongs to an unmasked token;
// mask has one flag per H elements (nullptr: every token kept). One division per call.
template <int K>
__device__ __forceinline__ void keep_flags(const bool* __restrict__ mask, int64_t H, int64_t e,
                                           int n, bool (&keep)[K]) {
  if (mask == nullptr) {
#pragma unroll
    for (int k = 0; k < K; ++k) keep[k] = true;
    return;
  }
  int64_t t = e / H, r = e - t * H;
  bool cur = mask[t];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (k < n && r == H) {  // element e + k starts token t + 1 (it exists: k < n)
      ++t;
      r = 0;
      cur = mask[t];
    }
    keep[k] = cur;
    ++r;
  }
}

// ---- reductions ---------------------------------------------------------------------------------

// Statistics of normalize_bwd: max |x| with its tie count, <g, x> and sum x^2.
template <typename acc_t>
struct MaxTies {
  acc_t m;
  long long ties;
  acc_t dot;
  acc_t ss;
};

// max (NaN-propagating, perturb_math.h) or sum. Both commutative, so a butterfly leaves every
// lane with the same value.
template <typename acc_t>
struct MaxOrSum {
  bool is_max;
  __device__ __forceinline__ acc_t operator()(acc_t a, acc_t b) const {
    return is_max ? pm::nan_max(a, b) : a + b;
  }
};

// Merge of MaxTies: the larger max keeps its ties, equal maxima add theirs; NaN wins (ties are
// then irrelevant: every output of the group is NaN).
template <typename acc_t>
struct MergeMaxTies {
  __device__ __forceinline__ MaxTies<acc_t> operator()(const MaxTies<acc_t>& a,
                                                       const MaxTies<acc_t>& b) const {
    MaxTies<acc_t> r;
    r.dot = a.dot + b.dot;
    r.ss = a.ss + b.ss;
    if (a.m == b.m) {
      r.m = a.m;
      r.ties = a.ties + b.ties;
    } else if (a.m > b.m || a.m != a.m) {
      r.m = a.m;
      r.ties = a.ties;
    } else {
      r.m = b.m;
      r.ties = b.ties;
    }
    return r;
  }
};

__device__ __forceinline__ float shfl_xor(float v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
__device__ __forceinline__ double shfl_xor(double v, int off) {
  return __shfl_xor_sync(0xffffffffu, v, off);
}
template <typename acc_t>
__device__ __forceinline__ MaxTies<acc_t> shfl_xor(const MaxTies<acc_t>& s, int off) {
  MaxTies<acc_t> o;
  o.m = __shfl_xor_sync(0xffffffffu, s.m, off);
  o.ties = __shfl_xor_sync(0xffffffffu, s.ties, off);
  o.dot = __shfl_xor_sync(0xffffffffu, s.dot, off);
  o.ss = __shfl_xor_sync(0xffffffffu, s.ss, off);
  return o;
}

// All-reduce over the blockDim.x threads of one group; every one of them gets the result.
// Warp mode (blockDim.x == 32): shuffles only, no barrier (the warps of a block work on
// different groups). Block mode (blockDim.x > 32, blockDim.y == 1): every thread of the block
// calls it (all of them share the group); smem holds kMaxWarps entries (blockDim.x <= 1024) and
// may be reused after return. The merge order is fixed: deterministic.
template <typename S, typename Merge>
__device__ __forceinline__ S group_allreduce(S s, S* smem, Merge merge) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) s = merge(s, shfl_xor(s, off));
  if (blockDim.x == kWarp) return s;
  const int warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  if (threadIdx.x % kWarp == 0) smem[warp] = s;
  __syncthreads();
  s = smem[0];
  for (int w = 1; w < nwarps; ++w) s = merge(s, smem[w]);
  __syncthreads();  // everyone has read smem: it can be reused
  return s;
}

// The split path's reduction of a group's per-chunk partials (n of them, in chunk order),
// block mode. Every block of the group runs the same code with the same blockDim on the same
// partials, so all of them get bitwise the same result.
template <typename S, typename Merge>
__device__ __forceinline__ S reduce_partials(const S* __restrict__ parts, int64_t n, S identity,
                                             S* smem, Merge merge) {
  S s = identity;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s = merge(s, parts[i]);
  return group_allreduce(s, smem, merge);
}

// Calls fn(b, grp, begin, n) for each block b < nblocks of the split path that this CUDA block
// owns (grid-stride: there may be more than the grid): group grp, its chunk b % nch = n elements
// at flat index begin (n >= 1 since nch = ceil(L / C); n <= C < 2^30).
template <typename Fn>
__device__ __forceinline__ void for_split_blocks(int64_t nblocks, int64_t nch, int64_t C,
                                                 int64_t L, const Fn& fn) {
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t grp = b / nch;
    const int64_t offset = (b - grp * nch) * C;
    fn(b, grp, grp * L + offset, static_cast<int>(L - offset < C ? L - offset : C));
  }
}

// ---- perturb_step passes over n elements at flat index begin (one group or chunk) ---------------
// (masked elements: d = g = 0 in the reductions, output 0; their values are never used, so
// inf/NaN in a masked token cannot leak out.)

// Stage 1: max |v| (inf) or sum v^2 (l2) of v = g (paper) or d + step g (normalize_sum).
// prefetch_d: the paper rule's stage 1 reads only g; prefetch d into L2 for the apply pass.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
__device__ __forceinline__ acc_t perturb_stage1(const scalar_t* d, const scalar_t* g,
                                                const bool* mask, int64_t H, int64_t begin,
                                                int n, bool vec, int r0, const pm::StepParams& p,
                                                bool prefetch_d) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const bool is_max = p.norm == pm::kInf;
  const bool need_d = p.rule != pm::kPaper;
  acc_t r = 0;
  // frag.a = g, frag.b = d (zeros when not needed)
  for_range<VEC>(begin, n, vec, r0, g, need_d ? d : nullptr, prefetch_d ? d : nullptr,
                 [&](int j, const auto& f) {
    constexpr int K = std::decay_t<decltype(f)>::kWidth;
    bool keep[K];
    keep_flags(mask, H, begin + j, K, keep);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t gv = static_cast<acc_t>(f.a.v[k]), dv = static_cast<acc_t>(f.b.v[k]);
      const acc_t t = keep[k] ? pm::stage1_term(dv, gv, p) : acc_t(0);
      r = is_max ? pm::nan_max(r, t) : r + t;
    }
  });
  return r;
}

// Stage 2 (paper rule, l2 / l1, finite radius): sum s^2 (l2) or |s| (l1), s = d + step u.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t perturb_stage2(const scalar_t* d, const scalar_t* g,
                                                const bool* mask, int64_t H, int64_t begin,
                                                int n, bool vec, int r0, acc_t scale1,
                                                const pm::StepParams& p) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  acc_t r = 0;
  // frag.a = d, frag.b = g
  for_range<VEC>(begin, n, vec, r0, d, g, nullptr, [&](int j, const auto& f) {
    constexpr int K = std::decay_t<decltype(f)>::kWidth;
    bool keep[K];
    keep_flags(mask, H, begin + j, K, keep);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t dv = static_cast<acc_t>(f.a.v[k]), gv = static_cast<acc_t>(f.b.v[k]);
      r += keep[k] ? pm::stage2_term(dv, gv, scale1, p) : acc_t(0);
    }
  });
  return r;
}

// out = step_output(d, g, scale1, factor2) (0 where masked).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void perturb_apply(const scalar_t* d, const scalar_t* g,
                                              const bool* mask, int64_t H, scalar_t* out,
                                              int64_t begin, int n, bool vec, int r0,
                                              acc_t scale1, acc_t factor2,
                                              const pm::StepParams& p) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  scalar_t* o = out + begin;
  // frag.a = d, frag.b = g
  for_range<VEC>(begin, n, vec, r0, d, g, nullptr, [&](int j, const auto& f) {
    constexpr int K = std::decay_t<decltype(f)>::kWidth;
    bool keep[K];
    keep_flags(mask, H, begin + j, K, keep);
    acc_t v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t dv = static_cast<acc_t>(f.a.v[k]), gv = static_cast<acc_t>(f.b.v[k]);
      v[k] = keep[k] ? pm::step_output(dv, gv, scale1, factor2, p) : acc_t(0);
    }
    store_vec(o, j, v);
  });
}

// perturb_step, fused (L <= kFusedMaxGroup): per group, in one launch,
//   r1 = stage-1 reduction (max |v| or sum v^2), scale1 = 1 / (r1 or sqrt(r1) + eps)
//   r2 = stage-2 sum (paper, l2 / l1, finite radius), factor2 = min(1, radius / ||s||)
//   out = step_output(d, g, scale1, factor2)   (perturb_math.h; 0 where masked)
// NORM is a template argument so the per-element branches on the norm fold away. Token scope
// (L == H): a group is one token, so a masked group is written as zeros without reading it.
template <typename scalar_t, int NORM>
__global__ void __launch_bounds__(kFusedMaxThreads)
    perturb_step_fused_kernel(const scalar_t* __restrict__ d, const scalar_t* __restrict__ g,
                              const bool* __restrict__ mask, scalar_t* __restrict__ out,
                              int64_t G, int64_t L, int64_t H, pm::StepParams p, bool vec,
                              int r0) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t smem[kMaxWarps];
  p.norm = NORM;
  const MaxOrSum<acc_t> merge1{NORM == pm::kInf};
  const MaxOrSum<acc_t> sum{false};
  const bool prefetch_d = p.rule == pm::kPaper;
  const int n = static_cast<int>(L);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  // grp is uniform over the threads of a group (a warp, or the whole block in block mode).
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; grp < G;
       grp += stride) {
    const int64_t begin = grp * L;
    const bool* m = mask;
    if (mask != nullptr && L == H) {
      if (!mask[grp]) {
        write_zeros(out, begin, n, vec, r0);
        continue;
      }
      m = nullptr;  // the whole group is kept
    }
    acc_t scale1 = 1, factor2 = 1;
    if (pm::has_stage1(p)) {
      const acc_t r1 = group_allreduce(
          perturb_stage1(d, g, m, H, begin, n, vec, r0, p, prefetch_d), smem, merge1);
      scale1 = pm::stage1_scale(r1, p);
    }
    if (pm::has_stage2(p)) {
      const acc_t r2 =
          group_allreduce(perturb_stage2(d, g, m, H, begin, n, vec, r0, scale1, p), smem, sum);
      factor2 = pm::stage2_factor(r2, p);
    }
    perturb_apply(d, g, m, H, out, begin, n, vec, r0, scale1, factor2, p);
  }
}

// perturb_step, split path, kernel 1: ws1[b] = stage-1 reduction of block b's chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    perturb_step_split_stage1_kernel(const scalar_t* __restrict__ d,
                                     const scalar_t* __restrict__ g,
                                     const bool* __restrict__ mask, int64_t L, int64_t H,
                                     int64_t nch, int64_t C, int64_t nblocks, pm::StepParams p,
                                     bool vec, int r0,
                                     typename AccType<scalar_t>::type* __restrict__ ws1) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t smem[kMaxWarps];
  const MaxOrSum<acc_t> merge1{p.norm == pm::kInf};
  for_split_blocks(nblocks, nch, C, L, [&](int64_t b, int64_t grp, int64_t begin, int n) {
    const acc_t r =
        group_allreduce(perturb_stage1(d, g, mask, H, begin, n, vec, r0, p, false), smem, merge1);
    if (threadIdx.x == 0) ws1[b] = r;
  });
}

// perturb_step, split path, kernel 2 (only when stage 2 exists): scale1 from the group's ws1
// partials (fixed order), then ws2[b] = stage-2 sum of block b's chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    perturb_step_split_stage2_kernel(const scalar_t* __restrict__ d,
                                     const scalar_t* __restrict__ g,
                                     const bool* __restrict__ mask, int64_t L, int64_t H,
                                     int64_t nch, int64_t C, int64_t nblocks, pm::StepParams p,
                                     bool vec, int r0,
                                     const typename AccType<scalar_t>::type* __restrict__ ws1,
                                     typename AccType<scalar_t>::type* __restrict__ ws2) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t smem[kMaxWarps];
  const MaxOrSum<acc_t> merge1{p.norm == pm::kInf};
  const MaxOrSum<acc_t> sum{false};
  for_split_blocks(nblocks, nch, C, L, [&](int64_t b, int64_t grp, int64_t begin, int n) {
    acc_t scale1 = 1;
    if (pm::has_stage1(p)) {
      scale1 = pm::stage1_scale(reduce_partials(ws1 + grp * nch, nch, acc_t(0), smem, merge1), p);
    }
    const acc_t r =
        group_allreduce(perturb_stage2(d, g, mask, H, begin, n, vec, r0, scale1, p), smem, sum);
    if (threadIdx.x == 0) ws2[b] = r;
  });
}

// perturb_step, split path, last kernel: scale1 / factor2 from the group's partials (fixed
// order: the same bits in every block of the group, and as in kernel 2), then the output.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    perturb_step_split_apply_kernel(const scalar_t* __restrict__ d,
                                    const scalar_t* __restrict__ g,
                                    const bool* __restrict__ mask, scalar_t* __restrict__ out,
                                    int64_t L, int64_t H, int64_t nch, int64_t C,
                                    int64_t nblocks, pm::StepParams p, bool vec, int r0,
                                    const typename AccType<scalar_t>::type* __restrict__ ws1,
                                    const typename AccType<scalar_t>::type* __restrict__ ws2) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t smem[kMaxWarps];
  const MaxOrSum<acc_t> merge1{p.norm == pm::kInf};
  const MaxOrSum<acc_t> sum{false};
  for_split_blocks(nblocks, nch, C, L, [&](int64_t b, int64_t grp, int64_t begin, int n) {
    acc_t scale1 = 1, factor2 = 1;
    if (pm::has_stage1(p)) {
      scale1 = pm::stage1_scale(reduce_partials(ws1 + grp * nch, nch, acc_t(0), smem, merge1), p);
    }
    if (pm::has_stage2(p)) {
      factor2 = pm::stage2_factor(reduce_partials(ws2 + grp * nch, nch, acc_t(0), smem, sum), p);
    }
    perturb_apply(d, g, mask, H, out, begin, n, vec, r0, scale1, factor2, p);
  });
}

// ---- normalize ----------------------------------------------------------------------------------

// r = max |x| (inf, NaN-propagating) or sum x^2 (l2) over the n elements at begin.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
__device__ __forceinline__ acc_t normalize_stats(const scalar_t* x, int64_t begin, int n,
                                                 bool vec, int r0, int norm) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const bool is_max = norm == pm::kInf;
  acc_t r = 0;
  for_range<VEC>(begin, n, vec, r0, x, nullptr, nullptr, [&](int, const auto& f) {
    constexpr int K = std::decay_t<decltype(f)>::kWidth;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t xv = static_cast<acc_t>(f.a.v[k]);
      const acc_t a = xv < acc_t(0) ? -xv : xv;
      r = is_max ? pm::nan_max(r, a) : r + xv * xv;
    }
  });
  return r;
}

// y = normalize_output(x, r) over the n elements at begin.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void normalize_apply(const scalar_t* x, scalar_t* y, int64_t begin,
                                                int n, bool vec, int r0, acc_t r, int norm,
                                                double eps) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  scalar_t* o = y + begin;
  for_range<VEC>(begin, n, vec, r0, x, nullptr, nullptr, [&](int j, const auto& f) {
    constexpr int K = std::decay_t<decltype(f)>::kWidth;
    acc_t v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      v[k] = pm::normalize_output(static_cast<acc_t>(f.a.v[k]), r, norm, eps);
    }
    store_vec(o, j, v);
  });
}

// normalize, fused (L <= kFusedMaxGroup): per group r = max|x| (inf) / sum x^2 (l2) / none (l1),
// y = x / (r + eps) (inf), x / (sqrt(r) + eps) (l2), sign(x) (l1).
template <typename scalar_t>
__global__ void __launch_bounds__(kFusedMaxThreads)
    normalize_fused_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t G,
                           int64_t L, int norm, double eps, bool vec, int r0) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t smem[kMaxWarps];
  const MaxOrSum<acc_t> merge{norm == pm::kInf};
  const int n = static_cast<int>(L);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; grp < G;
       grp += stride) {
    const int64_t begin = grp * L;
    acc_t r = 0;
    if (norm != pm::kL1) {
      r = group_allreduce(normalize_stats(x, begin, n, vec, r0, norm), smem, merge);
    }
    normalize_apply(x, y, begin, n, vec, r0, r, norm, eps);
  }
}

// normalize, split path, kernel 1 (not for l1): ws[b] = the reduction over block b's chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    normalize_split_stats_kernel(const scalar_t* __restrict__ x, int64_t L, int64_t nch,
                                 int64_t C, int64_t nblocks, int norm, bool vec, int r0,
                                 typename AccType<scalar_t>::type* __restrict__ ws) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t smem[kMaxWarps];
  const MaxOrSum<acc_t> merge{norm == pm::kInf};
  for_split_blocks(nblocks, nch, C, L, [&](int64_t b, int64_t grp, int64_t begin, int n) {
    const acc_t r = group_allreduce(normalize_stats(x, begin, n, vec, r0, norm), smem, merge);
    if (threadIdx.x == 0) ws[b] = r;
  });
}

// normalize, split path, kernel 2: r from the group's partials (fixed order; none for l1), then y.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    normalize_split_apply_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y,
                                 int64_t L, int64_t nch, int64_t C, int64_t nblocks, int norm,
                                 double eps, bool vec, int r0,
                                 const typename AccType<scalar_t>::type* __restrict__ ws) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ acc_t smem[kMaxWarps];
  const MaxOrSum<acc_t> merge{norm == pm::kInf};
  for_split_blocks(nblocks, nch, C, L, [&](int64_t b, int64_t grp, int64_t begin, int n) {
    acc_t r = 0;
    if (norm != pm::kL1) r = reduce_partials(ws + grp * nch, nch, acc_t(0), smem, merge);
    normalize_apply(x, y, begin, n, vec, r0, r, norm, eps);
  });
}

// ---- normalize_bwd (inf / l2; l1's gradient is zeros, no kernel) ------------------------------

// One pass over the n elements at begin: max |x| with its ties, <g, x>, sum x^2.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
__device__ __forceinline__ MaxTies<acc_t> normalize_bwd_stats(const scalar_t* gy,
                                                              const scalar_t* x, int64_t begin,
                                                              int n, bool vec, int r0) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  MaxTies<acc_t> s{acc_t(0), 0, acc_t(0), acc_t(0)};
  // frag.a = x, frag.b = g
  for_range<VEC>(begin, n, vec, r0, x, gy, nullptr, [&](int, const auto& f) {
    constexpr int K = std::decay_t<decltype(f)>::kWidth;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t xv = static_cast<acc_t>(f.a.v[k]), gv = static_cast<acc_t>(f.b.v[k]);
      const acc_t a = xv < acc_t(0) ? -xv : xv;
      if (a == s.m) {
        ++s.ties;
      } else if (a > s.m || a != a) {  // a NaN takes over (and stays: NaN is == / < nothing)
        s.m = a;
        s.ties = 1;
      }
      s.dot += gv * xv;
      s.ss += xv * xv;
    }
  });
  return s;
}

// dx = normalize_grad(g, x, r, dot, ties) over the n elements at begin; r = max|x| (inf) or
// sum x^2 (l2).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void normalize_bwd_apply(const scalar_t* gy, const scalar_t* x,
                                                    scalar_t* dx, int64_t begin, int n, bool vec,
                                                    int r0, const MaxTies<acc_t>& s, int norm,
                                                    double eps) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const acc_t r = norm == pm::kInf ? s.m : s.ss;
  const acc_t ties = static_cast<acc_t>(s.ties);
  const acc_t dot = s.dot;
  scalar_t* o = dx + begin;
  // frag.a = x, frag.b = g
  for_range<VEC>(begin, n, vec, r0, x, gy, nullptr, [&](int j, const auto& f) {
    constexpr int K = std::decay_t<decltype(f)>::kWidth;
    acc_t v[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const acc_t xv = static_cast<acc_t>(f.a.v[k]), gv = static_cast<acc_t>(f.b.v[k]);
      v[k] = pm::normalize_grad(gv, xv, r, dot, ties, norm, eps);
    }
    store_vec(o, j, v);
  });
}

// normalize_bwd, fused (L <= kFusedMaxGroup): per group one stats pass (m = max|x| with
// c = #ties, dot = <g, x>, ss = sum x^2), then
//   inf: dx = g / (m + eps) - dot / (m + eps)^2 * sign(x) [|x| = m] / c
//   l2:  dx = g / (n + eps) - x dot / (n (n + eps)^2),  n = sqrt(ss)
template <typename scalar_t>
__global__ void __launch_bounds__(kFusedMaxThreads)
    normalize_bwd_fused_kernel(const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x,
                               scalar_t* __restrict__ dx, int64_t G, int64_t L, int norm,
                               double eps, bool vec, int r0) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ MaxTies<acc_t> smem[kMaxWarps];
  const MergeMaxTies<acc_t> merge;
  const int n = static_cast<int>(L);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t grp = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; grp < G;
       grp += stride) {
    const int64_t begin = grp * L;
    const MaxTies<acc_t> s =
        group_allreduce(normalize_bwd_stats(gy, x, begin, n, vec, r0), smem, merge);
    normalize_bwd_apply(gy, x, dx, begin, n, vec, r0, s, norm, eps);
  }
}

// normalize_bwd, split path, kernel 1: ws[b] = the stats of block b's chunk.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads)
    normalize_bwd_split_stats_kernel(const scalar_t* __restrict__ gy,
                                     const scalar_t* __restrict__ x, int64_t L, int64_t nch,
                                     int64_t C, int64_t nblocks, bool vec, int r0,
                                     MaxTies<typename AccType<scalar_t>::type>* __restrict__ ws) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ MaxTies<acc_t> smem[kMaxWarps];
  const MergeMaxTies<acc_t> merge;
  for_split_blocks(nblocks, nch, C, L, [&](int64_t b, int64_t grp, int64_t begin, int n) {
    const MaxTies<acc_t> s =
        group_allreduce(normalize_bwd_stats(gy, x, begin, n, vec, r0), smem, merge);
    if (threadIdx.x == 0) ws[b] = s;
  });
}

// normalize_bwd, split path, kernel 2: the group's stats from its partials (fixed order), then dx.
template <typename scalar_t>
__global__ void __launch_bounds__(kSplitThreads) normalize_bwd_split_apply_kernel(
    const scalar_t* __restrict__ gy, const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
    int64_t L, int64_t nch, int64_t C, int64_t nblocks, int norm, double eps, bool vec, int r0,
    const MaxTies<typename AccType<scalar_t>::type>* __restrict__ ws) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ MaxTies<acc_t> smem[kMaxWarps];
  const MergeMaxTies<acc_t> merge;
  const MaxTies<acc_t> identity{acc_t(0), 0, acc_t(0), acc_t(0)};
  for_split_blocks(nblocks, nch, C, L, [&](int64_t b, int64_t grp, int64_t begin, int n) {
    const MaxTies<acc_t> s = reduce_partials(ws + grp * nch, nch, identity, smem, merge);
    normalize_bwd_apply(gy, x, dx, begin, n, vec, r0, s, norm, eps);
  });
}

// ---- init_noise ---------------------------------------------------------------------------------

// Thread q: one Philox4x32-10 call (key = *seed, counter = q) -> 4 normals (Box-Muller) ->
// elements 4q .. 4q+3 (those < numel): out = std * n, 0 where the element's token is masked.
// vec4: out is aligned for 4-element stores.
template <typename scalar_t>
__global__ void __launch_bounds__(kNoiseThreads)
    init_noise_kernel(scalar_t* __restrict__ out, const bool* __restrict__ mask,
                      const int64_t* __restrict__ seed, int64_t numel, int64_t H, double stdv,
                      bool vec4) {
  using acc_t = typename AccType<scalar_t>::type;
  const uint64_t key = static_cast<uint64_t>(*seed);
  const acc_t sd = static_cast<acc_t>(stdv);
  const int64_t nquads = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < nquads;
       q += stride) {
    float n[4];
    pm::box_muller4(pm::philox4x32_10(static_cast<uint64_t>(q), key), n);
    const int64_t e = 4 * q;
    const int cnt = numel - e < 4 ? static_cast<int>(numel - e) : 4;
    bool keep[4];
    keep_flags(mask, H, e, cnt, keep);
    acc_t v[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = keep[k] ? sd * static_cast<acc_t>(n[k]) : acc_t(0);
    if (vec4 && cnt == 4) {
      Vec<scalar_t, 4> o;
#pragma unroll
      for (int k = 0; k < 4; ++k) o.v[k] = static_cast<scalar_t>(v[k]);
      *reinterpret_cast<Vec<scalar_t, 4>*>(out + e) = o;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (k < cnt) out[e + k] = static_cast<scalar_t>(v[k]);
      }
    }
  }
}

// ---- host side ----------------------------------------------------------------------------------

void check_float(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "smart_kernels: ", name, " must be float16, bfloat16, float32 or float64, got ", dt);
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb) {
  TORCH_CHECK(a.sizes() == b.sizes(), "smart_kernels: ", na, " and ", nb, " shapes differ: ",
              a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "smart_kernels: ", na, " and ", nb,
              " dtypes differ");
  TORCH_CHECK(a.device() == b.device(), "smart_kernels: ", na, " and ", nb, " devices differ");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "smart_kernels: ", na, " and ", nb,
              " must be contiguous");
}

void check_norm(int64_t norm) {
  TORCH_CHECK(norm == pm::kInf || norm == pm::kL2 || norm == pm::kL1,
              "smart_kernels: norm must be 0 (inf), 1 (l2) or 2 (l1), got ", norm);
}

// Groups of a tensor [..., T, H]: G groups of L consecutive elements (token: L = H; sequence:
// L = T * H); H = the token length (the mask's unit).
struct Groups {
  int64_t G, L, H;
};

Groups groups_of(const at::Tensor& x, int64_t scope) {
  TORCH_CHECK(scope == pm::kToken || scope == pm::kSequence,
              "smart_kernels: scope must be 0 (token) or 1 (sequence), got ", scope);
  const int64_t min_dim = scope == pm::kSequence ? 2 : 1;
  TORCH_CHECK(x.dim() >= min_dim, "smart_kernels: ", scope == pm::kSequence ? "sequence" : "token",
              " scope needs a tensor of at least ", min_dim, " dims, got ", x.dim());
  const int64_t H = x.size(-1);
  const int64_t L = scope == pm::kToken ? H : H * x.size(-2);
  return {L > 0 ? x.numel() / L : 0, L, H};
}

// The mask (bool, x.shape[:-1], x's device) made contiguous, or an undefined tensor.
at::Tensor checked_mask(const c10::optional<at::Tensor>& mask, const at::Tensor& x) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mask->scalar_type() == at::kBool, "smart_kernels: mask must be bool, got ",
              mask->scalar_type());
  TORCH_CHECK(x.dim() >= 1 && mask->sizes() == x.sizes().slice(0, x.dim() - 1),
              "smart_kernels: mask must have shape ",
              x.dim() >= 1 ? x.sizes().slice(0, x.dim() - 1) : x.sizes(), " (x.shape[:-1]), got ",
              mask->sizes());
  TORCH_CHECK(mask->device() == x.device(), "smart_kernels: mask is on another device");
  return mask->contiguous();
}

// Whether all pointers (of scalar_t) share one 16-byte misalignment; r0 = it, in elements.
template <typename scalar_t>
bool common_alignment(std::initializer_list<const void*> ptrs, int* r0) {
  int r = -1;
  *r0 = 0;
  for (const void* p : ptrs) {
    const auto addr = reinterpret_cast<std::uintptr_t>(p);
    if (addr % sizeof(scalar_t) != 0) return false;
    const int ri = static_cast<int>(addr % 16 / sizeof(scalar_t));
    if (r >= 0 && ri != r) return false;
    r = ri;
  }
  *r0 = r < 0 ? 0 : r;
  return true;
}

struct Launch {
  dim3 grid, block;
};

// Fused kernels: a warp per group (8 groups per block) for groups of at most kBatch * 32
// vectors, else a block per group with about kBatch vectors per thread (one batch of loads; at
// most kFusedMaxThreads threads).
Launch fused_launch(int64_t G, int64_t L, int vec_width) {
  const int64_t vecs = (L + vec_width - 1) / vec_width;
  if (vecs <= kBatch * kWarp) {
    const int64_t blocks = (G + kWarpGroupsPerBlock - 1) / kWarpGroupsPerBlock;
    return {dim3(static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid)),
            dim3(kWarp, kWarpGroupsPerBlock)};
  }
  int64_t threads = ((vecs + kBatch - 1) / kBatch + kWarp - 1) / kWarp * kWarp;
  threads = threads < kFusedMaxThreads ? threads : kFusedMaxThreads;
  return {dim3(static_cast<unsigned>(G < kMaxGrid ? G : kMaxGrid)),
          dim3(static_cast<unsigned>(threads))};
}

// Split path: nch chunks of C elements per group (the last one shorter), nblocks = nch * G
// blocks of kSplitThreads threads (grid-stride beyond kMaxGrid).
struct SplitPlan {
  int64_t nch, C, nblocks;
  unsigned grid;
};

SplitPlan split_plan(int64_t G, int64_t L) {
  int64_t nch = (L + kSplitChunk - 1) / kSplitChunk;
  nch = nch < 1 ? 1 : (nch > kMaxChunks ? kMaxChunks : nch);
  const int64_t min_nch = (L + kMaxChunkLength - 1) / kMaxChunkLength;  // 32-bit chunk offsets
  nch = nch > min_nch ? nch : min_nch;
  int64_t C = (L + nch - 1) / nch;
  C = (C + 15) / 16 * 16;  // chunks start on vector boundaries (relative to the group)
  nch = (L + C - 1) / C;   // every chunk non-empty
  const int64_t nblocks = nch * G;
  return {nch, C, nblocks, static_cast<unsigned>(nblocks < kMaxGrid ? nblocks : kMaxGrid)};
}

at::Tensor normalize_cuda(const at::Tensor& x, int64_t norm, int64_t scope, double eps) {
  check_float(x, "x");
  TORCH_CHECK(x.is_contiguous(), "smart_kernels: x must be contiguous");
  check_norm(norm);
  const Groups gs = groups_of(x, scope);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int nm = static_cast<int>(norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    int r0;
    const bool vec = common_alignment<scalar_t>({xp, yp}, &r0);
    if (gs.L <= kFusedMaxGroup) {
      const Launch l = fused_launch(gs.G, gs.L, VEC);
      normalize_fused_kernel<scalar_t>
          <<<l.grid, l.block, 0, stream>>>(xp, yp, gs.G, gs.L, nm, eps, vec, r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const SplitPlan sp = split_plan(gs.G, gs.L);
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor ws = at::empty({nm == pm::kL1 ? 0 : sp.nblocks}, acc_opts);
    acc_t* wsp = ws.data_ptr<acc_t>();
    if (nm != pm::kL1) {
      normalize_split_stats_kernel<scalar_t><<<sp.grid, kSplitThreads, 0, stream>>>(
          xp, gs.L, sp.nch, sp.C, sp.nblocks, nm, vec, r0, wsp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    normalize_split_apply_kernel<scalar_t><<<sp.grid, kSplitThreads, 0, stream>>>(
        xp, yp, gs.L, sp.nch, sp.C, sp.nblocks, nm, eps, vec, r0, wsp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor normalize_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x, int64_t norm,
                              int64_t scope, double eps) {
  check_float(x, "x");
  check_pair(grad_y, x, "grad_y", "x");
  check_norm(norm);
  const Groups gs = groups_of(x, scope);
  const at::cuda::OptionalCUDAGuard guard(x.device());
  if (norm == pm::kL1) return at::zeros(x.sizes(), x.options());  // sign(x) has gradient 0
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return dx;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int nm = static_cast<int>(norm);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "normalize_bwd_cuda",
                                  [&] {
    using acc_t = typename AccType<scalar_t>::type;
    using Stats = MaxTies<acc_t>;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    int r0;
    const bool vec = common_alignment<scalar_t>({gp, xp, dxp}, &r0);
    if (gs.L <= kFusedMaxGroup) {
      const Launch l = fused_launch(gs.G, gs.L, VEC);
      normalize_bwd_fused_kernel<scalar_t>
          <<<l.grid, l.block, 0, stream>>>(gp, xp, dxp, gs.G, gs.L, nm, eps, vec, r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const SplitPlan sp = split_plan(gs.G, gs.L);
    // Workspace of Stats as raw bytes (the caching allocator aligns it to far more than 8).
    at::Tensor ws = at::empty({sp.nblocks * static_cast<int64_t>(sizeof(Stats))},
                              x.options().dtype(at::kByte));
    Stats* wsp = reinterpret_cast<Stats*>(ws.data_ptr<uint8_t>());
    normalize_bwd_split_stats_kernel<scalar_t><<<sp.grid, kSplitThreads, 0, stream>>>(
        gp, xp, gs.L, sp.nch, sp.C, sp.nblocks, vec, r0, wsp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    normalize_bwd_split_apply_kernel<scalar_t><<<sp.grid, kSplitThreads, 0, stream>>>(
        gp, xp, dxp, gs.L, sp.nch, sp.C, sp.nblocks, nm, eps, vec, r0, wsp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

at::Tensor perturb_step_cuda(const at::Tensor& noise, const at::Tensor& grad,
                             const c10::optional<at::Tensor>& mask, double step_size,
                             double radius, int64_t norm, int64_t scope, int64_t rule,
                             double eps) {
  check_float(noise, "noise");
  check_pair(noise, grad, "noise", "grad");
  check_norm(norm);
  TORCH_CHECK(rule == pm::kPaper || rule == pm::kNormalizeSum,
              "smart_kernels: rule must be 0 (paper) or 1 (normalize_sum), got ", rule);
  const Groups gs = groups_of(noise, scope);
  const at::Tensor mask_c = checked_mask(mask, noise);
  const at::cuda::OptionalCUDAGuard guard(noise.device());
  at::Tensor out = at::empty(noise.sizes(), noise.options());
  if (noise.numel() == 0) return out;
  const bool* mp = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const pm::StepParams p{step_size, radius, eps, static_cast<int>(norm), static_cast<int>(rule)};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, noise.scalar_type(),
                                  "perturb_step_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* dp = noise.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int r0;
    const bool vec = common_alignment<scalar_t>({dp, gp, op}, &r0);
    if (gs.L <= kFusedMaxGroup) {
      const Launch l = fused_launch(gs.G, gs.L, VEC);
      auto kernel = norm == pm::kInf  ? perturb_step_fused_kernel<scalar_t, pm::kInf>
                    : norm == pm::kL2 ? perturb_step_fused_kernel<scalar_t, pm::kL2>
                                      : perturb_step_fused_kernel<scalar_t, pm::kL1>;
      kernel<<<l.grid, l.block, 0, stream>>>(dp, gp, mp, op, gs.G, gs.L, gs.H, p, vec, r0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const SplitPlan sp = split_plan(gs.G, gs.L);
    const auto acc_opts = noise.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const bool s1 = pm::has_stage1(p), s2 = pm::has_stage2(p);
    at::Tensor ws1 = at::empty({s1 ? sp.nblocks : 0}, acc_opts);
    at::Tensor ws2 = at::empty({s2 ? sp.nblocks : 0}, acc_opts);
    acc_t* ws1p = ws1.data_ptr<acc_t>();
    acc_t* ws2p = ws2.data_ptr<acc_t>();
    if (s1) {
      perturb_step_split_stage1_kernel<scalar_t><<<sp.grid, kSplitThreads, 0, stream>>>(
          dp, gp, mp, gs.L, gs.H, sp.nch, sp.C, sp.nblocks, p, vec, r0, ws1p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (s2) {
      perturb_step_split_stage2_kernel<scalar_t><<<sp.grid, kSplitThreads, 0, stream>>>(
          dp, gp, mp, gs.L, gs.H, sp.nch, sp.C, sp.nblocks, p, vec, r0, ws1p, ws2p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    perturb_step_split_apply_kernel<scalar_t><<<sp.grid, kSplitThreads, 0, stream>>>(
        dp, gp, mp, op, gs.L, gs.H, sp.nch, sp.C, sp.nblocks, p, vec, r0, ws1p, ws2p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor init_noise_cuda(const at::Tensor& like, const c10::optional<at::Tensor>& mask,
                           const at::Tensor& seed, double stdv) {
  check_float(like, "like");
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1,
              "smart_kernels: seed must be a 0-d int64 tensor");
  TORCH_CHECK(seed.device() == like.device(), "smart_kernels: seed must be on like's device");
  const at::Tensor mask_c = checked_mask(mask, like);
  const at::cuda::OptionalCUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t H = like.dim() >= 1 ? like.size(-1) : 1;
  const bool* mp = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const int64_t* sp = seed.data_ptr<int64_t>();
  const int64_t nquads = (numel + 3) / 4;
  const int64_t blocks = (nquads + kNoiseThreads - 1) / kNoiseThreads;
  const unsigned grid = static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, like.scalar_type(), "init_noise_cuda",
                                  [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    const bool vec4 = reinterpret_cast<std::uintptr_t>(op) % (4 * sizeof(scalar_t)) == 0;
    init_noise_kernel<scalar_t>
        <<<grid, kNoiseThreads, 0, stream>>>(op, mp, sp, numel, H, stdv, vec4);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CUDA, m) {
  m.impl("normalize", &normalize_cuda);
  m.impl("normalize_bwd", &normalize_bwd_cuda);
  m.impl("perturb_step", &perturb_step_cuda);
  m.impl("init_noise", &init_noise_cuda);
}

}  // namespace smart_kernels
