// EMA teacher, CUDA kernels.
//
//   ema_update_:  t_i <- decay * t_i + (1 - decay) * s_i   for every pair i, in place
//   ema:          out  = decay * t   + (1 - decay) * s     (a new tensor in t's dtype)
//   (no gradient here: the functional's autograd, d/dt = decay * g, d/ds = (1 - decay) * g, is
//   registered in smart_kernels/ops/ema.py)
// Arithmetic in the teacher's accumulation dtype acc (fp64 for an fp64 teacher, else fp32; the
// student is converted to acc), written as torch.lerp(t, s, w) with the weight w = 1 - decay:
//   |w| <  0.5:  t + w (s - t)         = fma(w,     s - t, t)
//   |w| >= 0.5:  s - (1 - w) (s - t)   = fma(w - 1, s - t, s)   (w - 1 is exact for w in [0.5, 1])
// This is ATen's lerp formula, fused as nvcc fuses ATen's lerp kernel, so the result is
// t.lerp_(s, 1 - decay) bit for bit (and within a rounding of the reference's unfused
// decay*t + (1-decay)*s, except where that cancels); decay = 1 gives t and decay = 0 gives s
// exactly. Same formula and bits as the CPU kernels (csrc/cpu/ema.cpp).
// w: from decay_tensor (0-d fp32/fp64 on the tensors' device, LOADED IN THE KERNEL: no host
// sync, and a replayed CUDA graph sees a new value written into the same tensor; its value is
// cast to acc, w = 1 - value in acc) if given, else from `decay`: w = acc(1 - decay), the
// difference taken in double (Python's `1 - decay`).
// Non-floating pairs (integer buffers) are copied: t.copy_(s). Zero-element pairs are skipped.
//
// ema_update_ is a multi-tensor kernel: ONE launch per (teacher dtype, student dtype) group for
// the whole list. The floating pairs are cut into chunks of kChunk elements; a table in device
// memory holds one EmaChunk per chunk: (teacher pointer, student pointer), both already advanced
// to the chunk's first element, and the chunk's element count. Block b of a group's launch
// updates chunk b of the group. Loads and stores are 16-byte vectors (for the wider of the two
// dtypes) when both chunk pointers are aligned for them, else scalar; a chunk starts a multiple
// of kChunk elements into its tensor, so its alignment is the tensor's.
// Table cache: a training step passes the same lists every time, so the table is built once and
// kept in a small per-process cache keyed by the device and the exact list of (teacher pointer,
// student pointer, numel, teacher dtype, student dtype) of the floating non-empty pairs. A step
// costs a C++ loop over the pairs to form the key and one lookup: no Python loop and no
// host-to-device upload. On a miss the table is built in pinned host memory and copied
// asynchronously, on the current stream, into a device tensor; the entry keeps both alive.
// Cache and CUDA graphs: a miss while the current stream is being captured records the table
// upload into the graph (a memcpy node from the entry's pinned buffer, replayed each time);
// that buffer is allocated with cudaHostAlloc in relaxed capture mode and never freed. Every
// entry used during a capture is marked and never evicted afterwards: the graph may replay it
// at any time (so the cache grows by the tables of each distinct captured list, which is
// bounded in practice). Otherwise the cache evicts the least recently used entry beyond
// kMaxCachedTables. A table uploaded eagerly on one stream and used on another: the other
// stream waits on the upload's event (during a capture, where that wait is not possible, the
// graph re-uploads the table if the eager upload has not finished yet).
// Launches use the current stream. No host sync on any path: a hit is a key and a lookup; a miss
// adds the table build, a pinned allocation and an async upload.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "../acc_type.h"
#include "../ema_checks.h"

namespace smart_kernels {
namespace {

constexpr int kThreads = 256;           // threads per block
constexpr int64_t kChunk = 16384;       // elements per chunk (a multiple of every vector width)
constexpr int kUnroll = 4;              // vectors in flight per thread
constexpr size_t kMaxCachedTables = 8;  // tables kept that no capture has used

// ---------------------------------------------------------------------------------------------
// Device side.

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Global-memory vector load / store of a Vec (16, 8 or 4 bytes), cached in L2 only: every byte
// is used once. Explicit because the chunk pointers come from memory, so the compiler cannot
// tell that they are global and would emit generic loads.
template <typename V>
__device__ __forceinline__ V load_global(const V* p) {
  static_assert(sizeof(V) == 16 || sizeof(V) == 8 || sizeof(V) == 4, "unsupported vector size");
  V v;
  if constexpr (sizeof(V) == 16) {
    const int4 r = __ldcg(reinterpret_cast<const int4*>(p));
    memcpy(&v, &r, sizeof(V));
  } else if constexpr (sizeof(V) == 8) {
    const int2 r = __ldcg(reinterpret_cast<const int2*>(p));
    memcpy(&v, &r, sizeof(V));
  } else {
    const int r = __ldcg(reinterpret_cast<const int*>(p));
    memcpy(&v, &r, sizeof(V));
  }
  return v;
}

template <typename V>
__device__ __forceinline__ void store_global(V* p, const V& v) {
  static_assert(sizeof(V) == 16 || sizeof(V) == 8 || sizeof(V) == 4, "unsupported vector size");
  if constexpr (sizeof(V) == 16) {
    int4 r;
    memcpy(&r, &v, sizeof(V));
    __stcg(reinterpret_cast<int4*>(p), r);
  } else if constexpr (sizeof(V) == 8) {
    int2 r;
    memcpy(&r, &v, sizeof(V));
    __stcg(reinterpret_cast<int2*>(p), r);
  } else {
    int r;
    memcpy(&r, &v, sizeof(V));
    __stcg(reinterpret_cast<int*>(p), r);
  }
}

// One chunk of one pair: pointers advanced to the chunk's first element; n in [1, kChunk].
struct EmaChunk {
  void* t;
  const void* s;
  int64_t n;
};

// Where the decay comes from: a device fp32 or fp64 scalar (read in the kernel), else the
// host weight w = 1 - decay.
struct DecayArg {
  const float* f32;
  const double* f64;
  double w;
};

template <typename acc_t>
__device__ __forceinline__ acc_t ema_weight(const DecayArg& d) {
  if (d.f32 != nullptr) return acc_t(1) - static_cast<acc_t>(*d.f32);
  if (d.f64 != nullptr) return acc_t(1) - static_cast<acc_t>(*d.f64);
  return static_cast<acc_t>(d.w);
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) {
  return __fma_rn(a, b, c);
}

// The weight in lerp form (module comment): out = fma(c, s - t, small ? t : s).
template <typename acc_t>
struct Lerp {
  acc_t c;
  bool small;
  __device__ __forceinline__ explicit Lerp(acc_t w)
      : c(w > acc_t(-0.5) && w < acc_t(0.5) ? w : w - acc_t(1)),
        small(w > acc_t(-0.5) && w < acc_t(0.5)) {}
  template <typename T, typename S>
  __device__ __forceinline__ T operator()(T t, S s) const {
    const acc_t a = static_cast<acc_t>(t), b = static_cast<acc_t>(s);
    return static_cast<T>(fma_acc(c, b - a, small ? a : b));
  }
};

// Vector width in elements: 16 bytes of the wider dtype.
template <typename T, typename S>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T) > sizeof(S) ? sizeof(T) : sizeof(S));
}

template <typename T, typename S>
__device__ __forceinline__ bool vec_aligned(const void* t, const void* s) {
  constexpr int VEC = vec_width<T, S>();
  return reinterpret_cast<std::uintptr_t>(t) % (sizeof(T) * VEC) == 0 &&
         reinterpret_cast<std::uintptr_t>(s) % (sizeof(S) * VEC) == 0;
}

// ema_update_ on one group: block b updates chunk table[b] in place,
//   t[j] <- lerp(t[j], s[j], w) = decay * t[j] + (1 - decay) * s[j]   (module comment),
// kUnroll 16-byte vectors per thread in flight (all loads, then all stores), a scalar tail.
template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
    ema_update_kernel(const EmaChunk* __restrict__ table, DecayArg decay) {
  using acc_t = typename AccType<T>::type;
  constexpr int VEC = vec_width<T, S>();
  const EmaChunk chunk = table[blockIdx.x];
  const Lerp<acc_t> lerp(ema_weight<acc_t>(decay));
  T* t = static_cast<T*>(chunk.t);
  const S* s = static_cast<const S*>(chunk.s);
  const int n = static_cast<int>(chunk.n);
  int done = 0;
  if (vec_aligned<T, S>(t, s)) {  // uniform over the block
    using TV = Vec<T, VEC>;
    using SV = Vec<S, VEC>;
    TV* tv = reinterpret_cast<TV*>(t);
    const SV* sv = reinterpret_cast<const SV*>(s);
    const int nv = n / VEC;
    for (int base = threadIdx.x; base < nv; base += kThreads * kUnroll) {
      TV a[kUnroll];
      SV b[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads;
        if (i < nv) {
          a[u] = load_global(tv + i);
          b[u] = load_global(sv + i);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * kThreads;
        if (i < nv) {
          TV o;
#pragma unroll
          for (int k = 0; k < VEC; ++k) o.v[k] = lerp(a[u].v[k], b[u].v[k]);
          store_global(tv + i, o);
        }
      }
    }
    done = nv * VEC;
  }
#pragma unroll 1
  for (int j = done + threadIdx.x; j < n; j += kThreads) t[j] = lerp(t[j], s[j]);
}

// ema (functional): out[j] = lerp(t[j], s[j], w) for j < n, grid-stride; VEC-wide when t, s and
// out are all aligned for it (kVec), with a scalar tail.
template <typename T, typename S, bool kVec>
__global__ void __launch_bounds__(kThreads)
    ema_kernel(const T* __restrict__ t, const S* __restrict__ s, T* __restrict__ out, int64_t n,
               DecayArg decay) {
  using acc_t = typename AccType<T>::type;
  constexpr int VEC = kVec ? vec_width<T, S>() : 1;
  const Lerp<acc_t> lerp(ema_weight<acc_t>(decay));
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nv = kVec ? n / VEC : 0;
  if (kVec) {
    using TV = Vec<T, VEC>;
    using SV = Vec<S, VEC>;
    const TV* tv = reinterpret_cast<const TV*>(t);
    const SV* sv = reinterpret_cast<const SV*>(s);
    TV* ov = reinterpret_cast<TV*>(out);
    for (int64_t i = first; i < nv; i += stride) {
      const TV a = tv[i];
      const SV b = sv[i];
      TV o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = lerp(a.v[k], b.v[k]);
      ov[i] = o;
    }
  }
#pragma unroll 1
  for (int64_t j = nv * VEC + first; j < n; j += stride) out[j] = lerp(t[j], s[j]);
}

// ---------------------------------------------------------------------------------------------
// Checks: csrc/ema_checks.h (the Python layer validates user input first).

DecayArg decay_arg(const c10::optional<at::Tensor>& decay_tensor, double decay) {
  DecayArg arg{nullptr, nullptr, 1.0 - decay};
  if (decay_tensor.has_value()) {
    if (decay_tensor->scalar_type() == at::kFloat) {
      arg.f32 = decay_tensor->const_data_ptr<float>();
    } else {
      arg.f64 = decay_tensor->const_data_ptr<double>();
    }
  }
  return arg;
}

// The device of the lists (all pairs on one CUDA device, that of teacher[0]), checked pair by pair.
at::Device check_ema_update(at::TensorList teacher, at::TensorList student,
                            const c10::optional<at::Tensor>& decay_tensor) {
  at::Device device = decay_tensor.has_value() && decay_tensor->defined()
                          ? decay_tensor->device()
                          : at::Device(at::kCUDA);
  if (!teacher.empty() && teacher[0].defined()) device = teacher[0].device();
  TORCH_CHECK(device.is_cuda(), "smart_kernels.ema_update_: expected CUDA tensors, got ", device);
  check_ema_pairs(teacher, student, device);
  check_decay_tensor(decay_tensor, device, "ema_update_");
  return device;
}

// ---------------------------------------------------------------------------------------------
// Dtype dispatch: calls f(T{}, S{}) with the scalar types of the pair (dtypes checked above).

template <typename T, typename F>
void dispatch_student(at::ScalarType sdt, F&& f) {
  switch (sdt) {
    case at::kFloat: return f(T{}, float{});
    case at::kDouble: return f(T{}, double{});
    case at::kHalf: return f(T{}, c10::Half{});
    case at::kBFloat16: return f(T{}, c10::BFloat16{});
    default: TORCH_CHECK(false, "smart_kernels: unsupported student dtype ", sdt);
  }
}

template <typename F>
void dispatch_pair(at::ScalarType tdt, at::ScalarType sdt, F&& f) {
  switch (tdt) {
    case at::kFloat: return dispatch_student<float>(sdt, f);
    case at::kDouble: return dispatch_student<double>(sdt, f);
    case at::kHalf: return dispatch_student<c10::Half>(sdt, f);
    case at::kBFloat16: return dispatch_student<c10::BFloat16>(sdt, f);
    default: TORCH_CHECK(false, "smart_kernels: unsupported teacher dtype ", tdt);
  }
}

// ---------------------------------------------------------------------------------------------
// The chunk-table cache (module comment).

struct PairKey {
  std::uintptr_t t, s;
  int64_t n;
  at::ScalarType tdt, sdt;
  bool operator==(const PairKey& o) const {
    return t == o.t && s == o.s && n == o.n && tdt == o.tdt && sdt == o.sdt;
  }
};

// One launch: the chunks [first, first + count) of the table, all of one dtype pair.
struct Group {
  at::ScalarType tdt, sdt;
  int64_t first, count;
};

struct TableEntry {
  c10::DeviceIndex device = 0;
  uint64_t hash = 0;
  std::vector<PairKey> key;
  std::vector<Group> groups;
  size_t bytes = 0;
  at::Tensor host;               // pinned table from an eager miss (torch's host allocator)
  void* graph_host = nullptr;    // pinned table from a miss during a capture (never freed)
  at::Tensor table;              // the table on the device
  cudaStream_t alloc_stream{};   // the current stream when `table` was allocated
  bool uploaded = false;         // an eager upload has been enqueued,
  cudaStream_t ready_stream{};   // ... on this stream,
  cudaEvent_t ready = nullptr;   // ... and this event follows it
  bool in_graph = false;         // used during a capture: never evicted
  uint64_t last_use = 0;

  const void* host_ptr() const { return graph_host != nullptr ? graph_host : host.data_ptr(); }
  TableEntry() = default;
  TableEntry(const TableEntry&) = delete;
  TableEntry& operator=(const TableEntry&) = delete;
  ~TableEntry() {
    if (ready != nullptr) C10_CUDA_CHECK_WARN(cudaEventDestroy(ready));
  }
};

struct TableCache {
  std::mutex mutex;
  std::list<std::shared_ptr<TableEntry>> entries;
  uint64_t clock = 0;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // leaked: no CUDA calls at process exit
  return *cache;
}

uint64_t hash_key(c10::DeviceIndex device, const std::vector<PairKey>& key) {
  uint64_t h = 0xcbf29ce484222325ull ^ static_cast<uint64_t>(device);
  auto mix = [&h](uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  };
  for (const PairKey& k : key) {
    mix(k.t);
    mix(k.s);
    mix(static_cast<uint64_t>(k.n));
    mix((static_cast<uint64_t>(k.tdt) << 8) | static_cast<uint64_t>(k.sdt));
  }
  return h;
}

// The chunk table of `key`, grouped by dtype pair (groups in order of first appearance).
std::vector<EmaChunk> build_chunks(const std::vector<PairKey>& key, std::vector<Group>& groups) {
  std::vector<EmaChunk> chunks;
  std::vector<bool> taken(key.size(), false);
  for (size_t i = 0; i < key.size(); ++i) {
    if (taken[i]) continue;
    Group g{key[i].tdt, key[i].sdt, static_cast<int64_t>(chunks.size()), 0};
    const int64_t tsize = c10::elementSize(g.tdt), ssize = c10::elementSize(g.sdt);
    for (size_t j = i; j < key.size(); ++j) {
      if (taken[j] || key[j].tdt != g.tdt || key[j].sdt != g.sdt) continue;
      taken[j] = true;
      for (int64_t off = 0; off < key[j].n; off += kChunk) {
        chunks.push_back({reinterpret_cast<char*>(key[j].t) + off * tsize,
                          reinterpret_cast<const char*>(key[j].s) + off * ssize,
                          std::min(kChunk, key[j].n - off)});
      }
    }
    g.count = static_cast<int64_t>(chunks.size()) - g.first;
    TORCH_CHECK(g.count <= std::numeric_limits<int32_t>::max(),
                "smart_kernels.ema_update_: too many chunks for one launch");
    groups.push_back(g);
  }
  return chunks;
}

bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// A new entry for `key`: the table built in pinned memory and a device tensor for it (not yet
// uploaded). During a capture the pinned buffer comes from cudaHostAlloc in relaxed capture mode
// (not from torch's host allocator, whose event bookkeeping is not capture-safe in every torch
// version) and is never freed.
std::shared_ptr<TableEntry> make_entry(c10::DeviceIndex device, uint64_t hash,
                                       std::vector<PairKey> key, bool capturing,
                                       cudaStream_t stream) {
  auto entry = std::make_shared<TableEntry>();
  entry->device = device;
  entry->hash = hash;
  entry->key = std::move(key);
  const std::vector<EmaChunk> chunks = build_chunks(entry->key, entry->groups);
  entry->bytes = chunks.size() * sizeof(EmaChunk);
  if (capturing) {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    C10_CUDA_CHECK(cudaHostAlloc(&entry->graph_host, entry->bytes, cudaHostAllocDefault));
    std::memcpy(entry->graph_host, chunks.data(), entry->bytes);
  } else {
    entry->host = at::empty({static_cast<int64_t>(entry->bytes)},
                            at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(entry->host.data_ptr(), chunks.data(), entry->bytes);
  }
  entry->table = at::empty({static_cast<int64_t>(entry->bytes)},
                           at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device));
  entry->alloc_stream = stream;
  return entry;
}

// Make the device table valid for work enqueued next on `stream` (called under the lock).
void prepare_table(TableEntry& entry, const at::cuda::CUDAStream& stream, bool capturing) {
  if (capturing) {
    entry.in_graph = true;
    bool ready = entry.uploaded;
    if (ready && entry.ready_stream != stream.stream()) {
      // An eager upload on another stream: normally finished long ago (torch.cuda.graph
      // synchronizes before capturing). If not, the graph uploads the table itself.
      const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
      const cudaError_t err = cudaEventQuery(entry.ready);
      if (err == cudaErrorNotReady) {
        (void)cudaGetLastError();  // not an error: clear it
        ready = false;
      } else {
        C10_CUDA_CHECK(err);
      }
    }
    if (!ready) {  // recorded into the graph: re-uploaded (same bytes) at every replay
      C10_CUDA_CHECK(cudaMemcpyAsync(entry.table.data_ptr(), entry.host_ptr(), entry.bytes,
                                     cudaMemcpyHostToDevice, stream.stream()));
    }
    return;
  }
  if (!entry.uploaded) {
    if (entry.host.defined()) {
      // torch's copy records the pinned block's use, so the block outlives the copy.
      entry.table.copy_(entry.host, /*non_blocking=*/true);
    } else {  // built during a capture: its pinned buffer is never freed
      C10_CUDA_CHECK(cudaMemcpyAsync(entry.table.data_ptr(), entry.graph_host, entry.bytes,
                                     cudaMemcpyHostToDevice, stream.stream()));
    }
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&entry.ready, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(entry.ready, stream.stream()));
    entry.ready_stream = stream.stream();
    entry.uploaded = true;
  } else if (entry.ready_stream != stream.stream()) {
    // The upload ran on another stream: order after it.
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), entry.ready, 0));
  }
  if (entry.alloc_stream != stream.stream()) {
    entry.table.record_stream(stream);  // eviction must not recycle it under this stream
  }
}

// The cached entry for `key` (built on a miss), ready for use on `stream`.
std::shared_ptr<TableEntry> lookup_table(c10::DeviceIndex device, std::vector<PairKey> key,
                                         const at::cuda::CUDAStream& stream) {
  const bool capturing = stream_is_capturing(stream.stream());
  const uint64_t hash = hash_key(device, key);
  TableCache& cache = table_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  std::shared_ptr<TableEntry> entry;
  for (const auto& e : cache.entries) {
    if (e->hash == hash && e->device == device && e->key == key) {
      entry = e;
      break;
    }
  }
  if (entry == nullptr) {
    entry = make_entry(device, hash, std::move(key), capturing, stream.stream());
    cache.entries.push_back(entry);
  }
  entry->last_use = ++cache.clock;
  prepare_table(*entry, stream, capturing);
  // Evict the least recently used entries no capture has used, beyond kMaxCachedTables.
  while (true) {
    size_t evictable = 0;
    auto lru = cache.entries.end();
    for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
      if ((*it)->in_graph) continue;
      ++evictable;
      if (lru == cache.entries.end() || (*it)->last_use < (*lru)->last_use) lru = it;
    }
    if (evictable <= kMaxCachedTables) break;
    cache.entries.erase(lru);  // its tensors free stream-ordered (record_stream above)
  }
  return entry;
}

// ---------------------------------------------------------------------------------------------
// Ops.

void ema_update_cuda(at::TensorList teacher, at::TensorList student,
                     const c10::optional<at::Tensor>& decay_tensor, double decay) {
  const at::Device device = check_ema_update(teacher, student, decay_tensor);
  if (teacher.empty()) return;
  const c10::cuda::CUDAGuard guard(device);
  std::vector<PairKey> key;
  key.reserve(teacher.size());
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    if (!t.is_floating_point()) {
      if (t.numel() > 0) t.copy_(s);  // integer buffers: rare, one copy each
      continue;
    }
    if (t.numel() == 0) continue;
    key.push_back({reinterpret_cast<std::uintptr_t>(t.data_ptr()),
                   reinterpret_cast<std::uintptr_t>(s.const_data_ptr()), t.numel(),
                   t.scalar_type(), s.scalar_type()});
  }
  if (key.empty()) return;
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream(device.index());
  const std::shared_ptr<TableEntry> entry = lookup_table(device.index(), std::move(key), stream);
  const DecayArg arg = decay_arg(decay_tensor, decay);
  const auto* table = static_cast<const EmaChunk*>(entry->table.const_data_ptr());
  for (const Group& g : entry->groups) {
    dispatch_pair(g.tdt, g.sdt, [&](auto t_tag, auto s_tag) {
      using T = decltype(t_tag);
      using S = decltype(s_tag);
      ema_update_kernel<T, S><<<static_cast<unsigned>(g.count), kThreads, 0, stream.stream()>>>(
          table + g.first, arg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

at::Tensor ema_cuda(const at::Tensor& teacher, const at::Tensor& student,
                    const c10::optional<at::Tensor>& decay_tensor, double decay) {
  check_ema_pair(teacher, student);
  TORCH_CHECK(teacher.is_cuda(), "smart_kernels.ema: expected CUDA tensors, got ", teacher.device());
  check_decay_tensor(decay_tensor, teacher.device(), "ema");
  const c10::cuda::CUDAGuard guard(teacher.device());
  const at::Tensor t = teacher.contiguous();
  const at::Tensor s = student.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options());
  const int64_t n = t.numel();
  if (n == 0) return out;
  const DecayArg arg = decay_arg(decay_tensor, decay);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 8;
  dispatch_pair(t.scalar_type(), s.scalar_type(), [&](auto t_tag, auto s_tag) {
    using T = decltype(t_tag);
    using S = decltype(s_tag);
    constexpr int VEC = vec_width<T, S>();
    const T* tp = static_cast<const T*>(t.const_data_ptr());
    const S* sp = static_cast<const S*>(s.const_data_ptr());
    T* op = static_cast<T*>(out.data_ptr());
    const bool vec = reinterpret_cast<std::uintptr_t>(tp) % (sizeof(T) * VEC) == 0 &&
                     reinterpret_cast<std::uintptr_t>(sp) % (sizeof(S) * VEC) == 0 &&
                     reinterpret_cast<std::uintptr_t>(op) % (sizeof(T) * VEC) == 0;
    const int64_t work = vec ? (n + VEC - 1) / VEC : n;
    const auto blocks =
        static_cast<unsigned>(std::min<int64_t>((work + kThreads - 1) / kThreads, max_blocks));
    auto kernel = vec ? ema_kernel<T, S, true> : ema_kernel<T, S, false>;
    kernel<<<blocks, kThreads, 0, stream>>>(tp, sp, op, n, arg);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(smart_kernels, CUDA, m) {
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("ema", &ema_cuda);
}

}  // namespace smart_kernels
