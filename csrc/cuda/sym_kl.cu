// Symmetric KL / KL on rows of logits, CUDA kernels.
//
// Per row (a = input, b = target, V entries): P = softmax(a), Q = softmax(b),
// d = log P - log Q = (a - lse_a) - (b - lse_b).
//   sym_kl  L = sum_j (P_j - Q_j) d_j = KL(P||Q) + KL(Q||P) = E_P[a-b] - E_Q[a-b]
//   kl      L = KL(Q||P) = E_Q[b-a] + lse_a - lse_b
// Forward: ONE read of both rows. Each thread keeps online (rescaled) sums over the shifted
// logits x = a - m_a, y = b - m_b (m = running max):
//   s_a = sum e^x,  t_a = sum e^x (x - y),  s_b = sum e^y,  t_b = sum e^y (x - y),
// merged across the row by warp shuffles (and shared memory when a row spans several warps).
// With r = log s_a - log s_b: KL(P||Q) = t_a/s_a - r, KL(Q||P) = r - t_b/s_b,
// L = t_a/s_a - t_b/s_b. x - y leaves a per-row offset between the logits (which softmax
// ignores) out of the sums, so nothing large cancels. When a max grows the sums are rescaled by
// e^(m_old - m_new) and t is shifted by (c_old - c_new) s, c = m_a - m_b.
// A position where both logits are -inf weighs 0 and contributes 0; a row that is all -inf in
// both inputs has value 0 and gradient 0. exp is the accurate expf (not __expf): when P ~ Q
// the gradient's P - Q amplifies exp's relative error.
// Backward (second read; g = grad of the row value):
//   mode 0 (sym, full):      dL/da = g (P (d - KL(P||Q)) + P - Q),  dL/db = -g (Q (d + KL(Q||P)) + P - Q)
//   mode 1 (sym, stop_grad): dL/da = g (P - Q),                     dL/db = g (Q - P)
//   mode 2 (kl):             dL/da = g (P - Q),                     dL/db = g Q (-d - KL(Q||P))
//   where P (resp. Q) is 0 the P (d - ...) term is 0 (no 0 * inf).
// Layout: short rows (V <= 2048) get one warp each, 8 rows per block; longer rows one block each.
// The forward's reduction (checks.h) is a second one-block kernel, or, for small problems
// (N * V <= 65536, V <= 2048), everything is one launch of one block.
// Loads and stores are 16-byte vectors when the row layout allows (a scalar head aligns them).
// Accumulation in fp32 (fp64 for fp64 inputs). Launches on the current stream; no host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "../checks.h"

namespace smart_kernels {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;
constexpr int kShortRow = 2048;  // rows up to this length get one warp each
constexpr int kRowsPerBlockShort = 8;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Online statistics of a pair of row pieces (module comment): maxima and the four sums.
template <typename acc_t>
struct PairOnline {
  acc_t ma, mb, sa, ta, sb, tb;

  __device__ void init() {
    ma = mb = neg_inf<acc_t>();
    sa = ta = sb = tb = 0;
  }
  // The offset subtracted: the max, or 0 while everything so far is -inf (e^(-inf - 0) = 0).
  __device__ static acc_t offset(acc_t m) { return m == neg_inf<acc_t>() ? acc_t(0) : m; }
  __device__ acc_t oa() const { return offset(ma); }
  __device__ acc_t ob() const { return offset(mb); }

  // Re-express the sums relative to maxima na >= ma, nb >= mb.
  __device__ void rescale_to(acc_t na, acc_t nb) {
    const acc_t fa = ma == neg_inf<acc_t>() ? acc_t(0) : dexp(ma - na);
    const acc_t fb = mb == neg_inf<acc_t>() ? acc_t(0) : dexp(mb - nb);
    const acc_t shift = (oa() - ob()) - (offset(na) - offset(nb));
    ta = fa * (ta + shift * sa);
    sa *= fa;
    tb = fb * (tb + shift * sb);
    sb *= fb;
    ma = na;
    mb = nb;
  }
  __device__ void raise(acc_t cma, acc_t cmb) {
    const acc_t na = cma > ma ? cma : ma, nb = cmb > mb ? cmb : mb;
    if (na != ma || nb != mb) rescale_to(na, nb);
  }
  // One pair of logits, with the current offsets oa, ob.
  __device__ void add(acc_t a, acc_t b, acc_t oa_, acc_t ob_) {
    const acc_t x = a - oa_, y = b - ob_;
    const acc_t ea = dexp(x), eb = dexp(y);
    sa += ea;
    ta += ea == acc_t(0) ? acc_t(0) : ea * (x - y);
    sb += eb;
    tb += eb == acc_t(0) ? acc_t(0) : eb * (x - y);
  }
  __device__ void merge(PairOnline o) {
    const acc_t na = o.ma > ma ? o.ma : ma, nb = o.mb > mb ? o.mb : mb;
    rescale_to(na, nb);
    o.rescale_to(na, nb);
    sa += o.sa;
    ta += o.ta;
    sb += o.sb;
    tb += o.tb;
  }
  __device__ PairOnline shfl_xor(int off) const {
    PairOnline o;
    o.ma = __shfl_xor_sync(0xffffffffu, ma, off);
    o.mb = __shfl_xor_sync(0xffffffffu, mb, off);
    o.sa = __shfl_xor_sync(0xffffffffu, sa, off);
    o.ta = __shfl_xor_sync(0xffffffffu, ta, off);
    o.sb = __shfl_xor_sync(0xffffffffu, sb, off);
    o.tb = __shfl_xor_sync(0xffffffffu, tb, off);
    return o;
  }
  __device__ void warp_reduce() {
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) merge(shfl_xor(off));
  }
  // Row value and the row's stats (acc_type.h).
  __device__ acc_t finish(int mode, acc_t* st) const {
    if (sa == acc_t(0) && sb == acc_t(0)) {  // both rows entirely -inf: nothing contributes
      for (int k = 0; k < kStatsPerRow; ++k) st[k] = 0;
      return 0;
    }
    const acc_t log_sa = dlog(sa), log_sb = dlog(sb);
    const acc_t ep = ta / sa, eq = tb / sb, r = log_sa - log_sb;
    st[0] = oa();
    st[1] = ob();
    st[2] = log_sa;
    st[3] = log_sb;
    st[4] = ep - r;  // KL(P||Q)
    st[5] = r - eq;  // KL(Q||P)
    return mode == 2 ? st[5] : ep - eq;
  }
};

// Elements [0, count) of a row: VEC-wide groups when aligned, distributed over nthreads.
template <typename scalar_t, int VEC, typename Fn>
__device__ __forceinline__ void for_row(const scalar_t* a, const scalar_t* b, int64_t count,
                                        int64_t head, int tid, int nthreads, Fn&& fn) {
  // fn(index, xs[K], ys[K], K): K consecutive elements starting at index.
  using acc_t = typename AccType<scalar_t>::type;
  for (int64_t j = tid; j < head; j += nthreads) {
    acc_t x = static_cast<acc_t>(a[j]), y = static_cast<acc_t>(b[j]);
    fn(j, &x, &y, 1);
  }
  const int64_t nvec = (count - head) / VEC;
  const auto* av = reinterpret_cast<const Vec<scalar_t, VEC>*>(a + head);
  const auto* bv = reinterpret_cast<const Vec<scalar_t, VEC>*>(b + head);
  for (int64_t i = tid; i < nvec; i += nthreads) {
    const Vec<scalar_t, VEC> va = av[i], vb = bv[i];
    acc_t xs[VEC], ys[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      xs[k] = static_cast<acc_t>(va.v[k]);
      ys[k] = static_cast<acc_t>(vb.v[k]);
    }
    fn(head + i * VEC, xs, ys, VEC);
  }
  for (int64_t j = head + nvec * VEC + tid; j < count; j += nthreads) {
    acc_t x = static_cast<acc_t>(a[j]), y = static_cast<acc_t>(b[j]);
    fn(j, &x, &y, 1);
  }
}

template <int VEC>
__device__ __forceinline__ int64_t head_of(int64_t row_offset, int64_t V) {
  const int64_t h = (VEC - row_offset % VEC) % VEC;
  return h < V ? h : V;
}

// One row's online statistics, accumulated by nthreads threads (tid = 0..nthreads-1), VEC-wide.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void accumulate_row(const scalar_t* a, const scalar_t* b, int64_t V,
                                               int64_t head, int tid, int nthreads,
                                               PairOnline<typename AccType<scalar_t>::type>& p) {
  using acc_t = typename AccType<scalar_t>::type;
  p.init();
  for_row<scalar_t, VEC>(a, b, V, head, tid, nthreads,
                         [&](int64_t, const acc_t* xs, const acc_t* ys, int K) {
    acc_t cma = neg_inf<acc_t>(), cmb = neg_inf<acc_t>();
    for (int k = 0; k < K; ++k) {
      cma = xs[k] > cma ? xs[k] : cma;
      cmb = ys[k] > cmb ? ys[k] : cmb;
    }
    p.raise(cma, cmb);
    const acc_t oa = p.oa(), ob = p.ob();
    for (int k = 0; k < K; ++k) p.add(xs[k], ys[k], oa, ob);
  });
}

template <typename acc_t>
__device__ __forceinline__ void write_masked_row(acc_t* row_value, acc_t* st) {
  *row_value = 0;
  for (int k = 0; k < kStatsPerRow; ++k) st[k] = 0;
}

// Reduction (checks.h), by one whole block: sum of rows in double and counted rows, in a fixed
// order (deterministic); writes scale and, unless reduction is none, out = sum * scale.
template <typename acc_t>
__device__ void block_finalize(const acc_t* rows, const bool* mask, int64_t N, int64_t V,
                               int64_t reduction, acc_t* out, acc_t* scale) {
  __shared__ double sum_smem[kMaxWarps];
  __shared__ long long count_smem[kMaxWarps];
  const int nthreads = blockDim.x * blockDim.y;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  double sum = 0;
  long long count = 0;
  for (int64_t i = tid; i < N; i += nthreads) {
    if (reduction != kNone) sum += static_cast<double>(rows[i]);
    count += mask == nullptr ? 1 : static_cast<long long>(mask[i]);
  }
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    sum += __shfl_down_sync(0xffffffffu, sum, off);
    count += __shfl_down_sync(0xffffffffu, count, off);
  }
  const int lane = tid % kWarp, warp = tid / kWarp, nwarps = nthreads / kWarp;
  if (lane == 0) {
    sum_smem[warp] = sum;
    count_smem[warp] = count;
  }
  __syncthreads();
  if (tid == 0) {
    sum = 0;
    count = 0;
    for (int w = 0; w < nwarps; ++w) {
      sum += sum_smem[w];
      count += count_smem[w];
    }
    const double sc = reduction_scale(reduction, count, V);
    *scale = static_cast<acc_t>(sc);
    if (reduction != kNone) *out = static_cast<acc_t>(sum * sc);
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(1024) sym_kl_fwd_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                                  int64_t sa, int64_t sb, const bool* __restrict__ mask,
                                  int64_t N, int64_t V, int mode,
                                  typename AccType<scalar_t>::type* __restrict__ rows,
                                  typename AccType<scalar_t>::type* __restrict__ stats) {
  using acc_t = typename AccType<scalar_t>::type;
  __shared__ PairOnline<acc_t> smem[kMaxWarps];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= N) return;  // only in warp-per-row mode, where no __syncthreads follows
  acc_t* st = stats + kStatsPerRow * row;
  if (mask != nullptr && !mask[row]) {  // uniform over the threads of a row
    if (threadIdx.x == 0) write_masked_row(rows + row, st);
    return;
  }
  PairOnline<acc_t> p;
  accumulate_row<scalar_t, VEC>(A + row * sa, B + row * sb, V, head_of<VEC>(row * sa, V),
                                threadIdx.x, blockDim.x, p);
  p.warp_reduce();
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  if (nwarps > 1) {  // one row per block: merge the warps through shared memory
    if (lane == 0) smem[warp] = p;
    __syncthreads();
    if (warp != 0) return;
    if (lane < nwarps) {
      p = smem[lane];
    } else {
      p.init();
    }
    p.warp_reduce();
  }
  if (lane == 0) rows[row] = p.finish(mode, st);
}

// The reduction of sym_kl_fwd_kernel's rows: one block.
template <typename acc_t>
__global__ void sym_kl_finalize_kernel(const acc_t* __restrict__ rows,
                                       const bool* __restrict__ mask, int64_t N, int64_t V,
                                       int64_t reduction, acc_t* __restrict__ out,
                                       acc_t* __restrict__ scale) {
  block_finalize(rows, mask, N, V, reduction, out, scale);
}

// Small problems in ONE launch: a single block, one warp per row in turn, then the reduction.
// (A classification head's loss: launch-bound, so one launch instead of two.)
template <typename scalar_t>
__global__ void __launch_bounds__(256) sym_kl_small_kernel(const scalar_t* __restrict__ A,
                                    const scalar_t* __restrict__ B, int64_t sa, int64_t sb,
                                    const bool* __restrict__ mask, int64_t N, int64_t V, int mode,
                                    int64_t reduction,
                                    typename AccType<scalar_t>::type* __restrict__ rows,
                                    typename AccType<scalar_t>::type* __restrict__ stats,
                                    typename AccType<scalar_t>::type* __restrict__ out,
                                    typename AccType<scalar_t>::type* __restrict__ scale) {
  using acc_t = typename AccType<scalar_t>::type;
  for (int64_t row = threadIdx.y; row < N; row += blockDim.y) {
    acc_t* st = stats + kStatsPerRow * row;
    if (mask != nullptr && !mask[row]) {
      if (threadIdx.x == 0) write_masked_row(rows + row, st);
      continue;
    }
    PairOnline<acc_t> p;
    accumulate_row<scalar_t, 1>(A + row * sa, B + row * sb, V, 0, threadIdx.x, kWarp, p);
    p.warp_reduce();
    if (threadIdx.x == 0) rows[row] = p.finish(mode, st);
  }
  __syncthreads();  // the rows are written: reduce them
  block_finalize(rows, mask, N, V, reduction, out, scale);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(1024) sym_kl_bwd_kernel(const typename AccType<scalar_t>::type* __restrict__ grad_out,
                                  int64_t sg,
                                  const typename AccType<scalar_t>::type* __restrict__ scale,
                                  const scalar_t* __restrict__ A,
                                  const scalar_t* __restrict__ B, int64_t sa, int64_t sb,
                                  const bool* __restrict__ mask,
                                  const typename AccType<scalar_t>::type* __restrict__ stats,
                                  scalar_t* __restrict__ GA, scalar_t* __restrict__ GB, int64_t N,
                                  int64_t V, int mode) {
  using acc_t = typename AccType<scalar_t>::type;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= N) return;
  scalar_t* ga = GA == nullptr ? nullptr : GA + row * V;
  scalar_t* gb = GB == nullptr ? nullptr : GB + row * V;
  const bool keep = mask == nullptr || mask[row];
  const acc_t g = keep ? grad_out[row * sg] * scale[0] : acc_t(0);
  const acc_t* st = stats + kStatsPerRow * row;
  const acc_t ma = st[0], mb = st[1], log_sa = st[2], log_sb = st[3];
  const acc_t kl_pq = st[4], kl_qp = st[5];
  const scalar_t* a = A + row * sa;
  const scalar_t* b = B + row * sb;
  for_row<scalar_t, VEC>(a, b, V, head_of<VEC>(row * sa, V), threadIdx.x, blockDim.x,
                         [&](int64_t j, const acc_t* xs, const acc_t* ys, int K) {
    acc_t va[VEC], vb[VEC];
    for (int k = 0; k < K; ++k) {
      const acc_t lp = (xs[k] - ma) - log_sa, lq = (ys[k] - mb) - log_sb;  // log P, log Q
      const acc_t p = dexp(lp), q = dexp(lq);
      acc_t da = p - q, db;
      if (mode == 0) {
        da += p == acc_t(0) ? acc_t(0) : p * (lp - lq - kl_pq);
        db = (q - p) - (q == acc_t(0) ? acc_t(0) : q * (lp - lq + kl_qp));
      } else if (mode == 1) {
        db = q - p;
      } else {
        db = q == acc_t(0) ? acc_t(0) : q * (lq - lp - kl_qp);
      }
      va[k] = keep ? g * da : acc_t(0);  // a masked row gets exact zeros, even from inf inputs
      vb[k] = keep ? g * db : acc_t(0);
    }
    if (K == VEC && VEC > 1) {
      Vec<scalar_t, VEC> oa, ob;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        oa.v[k] = static_cast<scalar_t>(va[k]);
        ob.v[k] = static_cast<scalar_t>(vb[k]);
      }
      if (ga != nullptr) *reinterpret_cast<Vec<scalar_t, VEC>*>(ga + j) = oa;
      if (gb != nullptr) *reinterpret_cast<Vec<scalar_t, VEC>*>(gb + j) = ob;
    } else {
      for (int k = 0; k < K; ++k) {
        if (ga != nullptr) ga[j + k] = static_cast<scalar_t>(va[k]);
        if (gb != nullptr) gb[j + k] = static_cast<scalar_t>(vb[k]);
      }
    }
  });
}

struct Launch {
  dim3 grid, block;
};

Launch launch_shape(int64_t N, int64_t V) {
  if (V <= kShortRow) {
    const int64_t blocks = (N + kRowsPerBlockShort - 1) / kRowsPerBlockShort;
    return {dim3(static_cast<unsigned>(blocks)), dim3(kWarp, kRowsPerBlockShort)};
  }
  const int threads = V <= 16384 ? 256 : (V <= 65536 ? 512 : 1024);
  return {dim3(static_cast<unsigned>(N)), dim3(threads, 1)};
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Fused single-launch path up to these sizes (8 warps take the rows in turn).
constexpr int64_t kSmallElements = 1 << 16;
constexpr int64_t kSmallRows = 512;

std::tuple<at::Tensor, at::Tensor, at::Tensor> sym_kl_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const c10::optional<at::Tensor>& mask,
    int64_t mode, int64_t reduction) {
  check_rows_pair(input, target, mask, mode);
  check_reduction(reduction);
  const at::cuda::OptionalCUDAGuard guard(input.device());
  const int64_t N = input.size(0), V = input.size(1);
  auto [out, stats, scale] = alloc_fwd_outputs(input, reduction);
  at::Tensor rows = reduction == kNone ? out : at::empty({N}, stats.options());
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_p = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool small = V <= kShortRow && N <= kSmallRows && N * V <= kSmallElements;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sym_kl_fwd_cuda",
                                  [&] {
    using acc_t = typename AccType<scalar_t>::type;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* a = input.data_ptr<scalar_t>();
    const scalar_t* b = target.data_ptr<scalar_t>();
    const int64_t sa = input.stride(0), sb = target.stride(0);
    acc_t* rows_p = rows.data_ptr<acc_t>();
    acc_t* stats_p = stats.data_ptr<acc_t>();
    acc_t* out_p = out.data_ptr<acc_t>();
    acc_t* scale_p = scale.data_ptr<acc_t>();
    if (small) {
      sym_kl_small_kernel<scalar_t><<<1, dim3(kWarp, kRowsPerBlockShort), 0, stream>>>(
          a, b, sa, sb, mask_p, N, V, static_cast<int>(mode), reduction, rows_p, stats_p, out_p,
          scale_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    if (N > 0) {
      const Launch L = launch_shape(N, V);
      const bool vec = aligned16(a) && aligned16(b) && (sa - sb) % VEC == 0;
      auto kernel = vec ? sym_kl_fwd_kernel<scalar_t, VEC> : sym_kl_fwd_kernel<scalar_t, 1>;
      kernel<<<L.grid, L.block, 0, stream>>>(a, b, sa, sb, mask_p, N, V, static_cast<int>(mode),
                                             rows_p, stats_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    sym_kl_finalize_kernel<acc_t><<<1, 1024, 0, stream>>>(rows_p, mask_p, N, V, reduction, out_p,
                                                          scale_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, stats, scale};
}

std::tuple<at::Tensor, at::Tensor> sym_kl_bwd_cuda(const at::Tensor& grad_out,
                                                   const at::Tensor& scale,
                                                   const at::Tensor& input,
                                                   const at::Tensor& target,
                                                   const c10::optional<at::Tensor>& mask,
                                                   const at::Tensor& stats, int64_t mode,
                                                   bool need_input, bool need_target) {
  check_rows_pair(input, target, mask, mode);
  check_bwd_extra(grad_out, scale, input, stats);
  const at::cuda::OptionalCUDAGuard guard(input.device());
  const int64_t N = input.size(0), V = input.size(1);
  at::Tensor ga = need_input ? at::empty({N, V}, input.options()) : at::empty({0}, input.options());
  at::Tensor gb = need_target ? at::empty({N, V}, input.options()) : at::empty({0}, input.options());
  if (N == 0 || !(need_input || need_target)) return {ga, gb};
  at::Tensor g = grad_out.to(stats.scalar_type());
  const int64_t sg = g.dim() == 0 ? 0 : g.stride(0);
  at::Tensor mask_c = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mask_p = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  const Launch L = launch_shape(N, V);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sym_kl_bwd_cuda",
                                  [&] {
    using acc_t = typename AccType<scalar_t>::type;
    constexpr int VEC = 16 / sizeof(scalar_t);
    const scalar_t* a = input.data_ptr<scalar_t>();
    const scalar_t* b = target.data_ptr<scalar_t>();
    scalar_t* ga_p = need_input ? ga.data_ptr<scalar_t>() : nullptr;
    scalar_t* gb_p = need_target ? gb.data_ptr<scalar_t>() : nullptr;
    const int64_t sa = input.stride(0), sb = target.stride(0);
    // Outputs are contiguous rows of length V: their misalignment must match the inputs'.
    const bool vec = aligned16(a) && aligned16(b) && (ga_p == nullptr || aligned16(ga_p)) &&
                     (gb_p == nullptr || aligned16(gb_p)) && (sa - V) % VEC == 0 &&
                     (sb - V) % VEC == 0;
    auto kernel = vec ? sym_kl_bwd_kernel<scalar_t, VEC> : sym_kl_bwd_kernel<scalar_t, 1>;
    kernel<<<L.grid, L.block, 0, stream>>>(g.data_ptr<acc_t>(), sg, scale.data_ptr<acc_t>(), a, b,
                                           sa, sb, mask_p, stats.data_ptr<acc_t>(), ga_p, gb_p, N,
                                           V, static_cast<int>(mode));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CUDA, m) {
  m.impl("sym_kl_fwd", &sym_kl_fwd_cuda);
  m.impl("sym_kl_bwd", &sym_kl_bwd_cuda);
}

}  // namespace smart_kernels
