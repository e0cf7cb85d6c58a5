// CUDA kernels of the BatchNorm stages, for NCHW and channels_last activations: the twin of
// csrc/cpu/bn_cpu.cpp, with the same per-element math (common/bn_math.h) and the same semantics
// (inputs, output dtypes and memory formats, empty inputs, NaN propagation).
//
// Layouts. NCHW: a channel is N planes of H*W contiguous values. Reductions give a block one channel and
// a range of planes (or one piece of each plane when N is small); element-wise passes walk the flat tensor
// in 128-bit packs that may straddle planes (DeepLab's 33x33 maps have odd planes), tracking the channel
// incrementally. channels_last: a channel is a column of an (N*H*W, C) matrix; threads run along C with
// VEC channels each (per-channel values in registers), blocks run over rows.
//
// Reductions are two-level and deterministic: each block writes one partial per channel, (count, mean,
// M2) or (sum g, sum g * (y - mean)), to a workspace, and a second kernel merges a channel's partials in a
// fixed order, in double. No atomics, so results are bitwise reproducible run to run.
//
// Accumulation is in at::opmath_type (float for half/bfloat16/float, double for double). No fast-math:
// divisions and square roots are IEEE-rounded (setup.py never passes --use_fast_math).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10's CUDA headers, not ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS headers that a
// bare toolkit (or a CI image) may lack, and these kernels need only the stream, guard and error checks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/bn_math.h"
#include "common/checks.h"
#include "bn_stage_args.h"

namespace deeplab_ops {
namespace {

constexpr int kThreads = 256;     // every kernel: 256 threads (1-D, or TX x TY with TX * TY == 256)
constexpr int kWarp = 32;
constexpr int kBlocksPerSm = 8;   // 8 x 256 = 2048 resident threads per SM on sm_80 / sm_90
constexpr int kChunkRows = 4;     // NHWC statistics: rows per thread merged as one exact two-pass chunk
// Values one thread folds sequentially per block, at most (about): bounds the rounding growth of the
// sequential float sums in bn_backward_reduce and keeps Welford counts exact integers in float.
constexpr int64_t kMaxSerial = 1024;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

template <typename T>
C10_HOST_DEVICE inline T imin(T a, T b) {
  return a < b ? a : b;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// 128-bit packs: 4 floats, 2 doubles, 8 halves / bfloat16s per load and store.
template <typename scalar_t>
constexpr int pack_width() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack<T, V>*>(p + i);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p + i) = v;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool is_nhwc(const at::Tensor& t) { return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast; }

struct Geometry {
  int64_t n, c, hw;
};

Geometry geometry(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2) * t.size(3)}; }

// SMs of the current device (the caller's CUDAGuard has set it); sizes grids to fill the GPU.
int sm_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return std::max(sms, 1);
}

// ---- warp / block merges ----------------------------------------------------------------------------
// Tree merges with a fixed pairing (lane i takes lane i + d), so the result does not depend on timing.

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> warp_merge(Welford<acc_t> w) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d >>= 1) {
    const Welford<acc_t> o{__shfl_down_sync(0xffffffffu, w.count, d), __shfl_down_sync(0xffffffffu, w.mean, d),
                           __shfl_down_sync(0xffffffffu, w.m2, d)};
    w = welford_merge(w, o);
  }
  return w;  // lane 0 holds the warp's merge
}

template <typename acc_t>
__device__ __forceinline__ void warp_sum2(acc_t& a, acc_t& b) {
#pragma unroll
  for (int d = kWarp / 2; d > 0; d >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, d);
    b += __shfl_down_sync(0xffffffffu, b, d);
  }
}

// 1-D blocks of kThreads: the block's merge, valid in thread 0.
template <typename acc_t>
__device__ Welford<acc_t> block_merge(Welford<acc_t> w) {
  __shared__ acc_t sh[3][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  w = warp_merge(w);
  if (lane == 0) {
    sh[0][warp] = w.count;
    sh[1][warp] = w.mean;
    sh[2][warp] = w.m2;
  }
  __syncthreads();
  if (warp == 0) {
    w = lane < static_cast<int>(blockDim.x) / kWarp ? Welford<acc_t>{sh[0][lane], sh[1][lane], sh[2][lane]}
                                                     : welford_empty<acc_t>();
    w = warp_merge(w);
  }
  return w;
}

template <typename acc_t>
__device__ void block_sum2(acc_t& a, acc_t& b) {
  __shared__ acc_t sh[2][kWarp];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  warp_sum2(a, b);
  if (lane == 0) {
    sh[0][warp] = a;
    sh[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    const bool have = lane < static_cast<int>(blockDim.x) / kWarp;
    a = have ? sh[0][lane] : acc_t(0);
    b = have ? sh[1][lane] : acc_t(0);
    warp_sum2(a, b);
  }
}

// Exact statistics of V values by two passes over registers. Merging one such chunk per V values calls
// welford_merge's division once per V values instead of welford_push's once per value: the division is
// what would make the statistics pass compute-bound for 16-bit inputs. V is a power of two, so the
// mean's division is an exact scaling.
template <typename acc_t, int V>
__device__ __forceinline__ Welford<acc_t> chunk_welford(const acc_t (&v)[V]) {
  acc_t sum = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) sum += v[k];
  const acc_t mean = sum / acc_t(V);
  acc_t m2 = 0;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const acc_t d = v[k] - mean;
    m2 += d * d;
  }
  return Welford<acc_t>{acc_t(V), mean, m2};
}

// ---- NCHW reductions: blocks over (channel, plane group, plane piece) ----------------------------------

// How one channel's N planes are cut into blocks. Partial p = group * pieces + piece; its count is the
// same for every channel.
struct PlaneSplit {
  int64_t groups;  // plane groups per channel
  int64_t planes;  // planes per group (the last group may have fewer)
  int64_t pieces;  // pieces per plane
  int64_t piece;   // values per piece (the last piece may have fewer)
};

PlaneSplit plane_split(const Geometry& g, int vec) {
  const int64_t per_channel = g.n * g.hw;
  // Enough blocks to fill the GPU, but at least 4 packs per thread, and at most ~kMaxSerial values per
  // thread (which wins over the first two).
  const int64_t fill = ceil_div(static_cast<int64_t>(sm_count()) * kBlocksPerSm, g.c);
  const int64_t by_work = std::max<int64_t>(1, per_channel / (static_cast<int64_t>(kThreads) * vec * 4));
  const int64_t by_serial = ceil_div(per_channel, kThreads * kMaxSerial);
  const int64_t s = std::max(std::min(fill, by_work), by_serial);
  PlaneSplit p;
  if (s <= g.n) {
    p.planes = ceil_div(g.n, s);
    p.groups = ceil_div(g.n, p.planes);
    p.pieces = 1;
    p.piece = g.hw;
  } else {
    p.planes = 1;
    p.groups = g.n;
    p.piece = ceil_div(ceil_div(g.hw, ceil_div(s, g.n)), vec) * vec;
    p.pieces = ceil_div(g.hw, p.piece);
  }
  TORCH_INTERNAL_ASSERT(p.planes * std::min(p.piece, g.hw) <= std::numeric_limits<int32_t>::max());
  return p;
}

// Visits the values [a0, a1) of flat arrays whose bases are 16-byte aligned, with the whole block: the
// unaligned head and tail one value per thread (`scalar(i)`), the body one aligned VEC-pack per thread
// per iteration (`packed(i)`, i a multiple of VEC). With VEC == 1 everything is body.
template <int VEC, typename Scalar, typename Packed>
__device__ __forceinline__ void visit_range(int64_t a0, int64_t a1, const Scalar& scalar, const Packed& packed) {
  int64_t v0 = (a0 + VEC - 1) / VEC * VEC, v1 = a1 / VEC * VEC;
  if (v0 >= v1) v0 = v1 = a1;  // no whole pack inside: all of it (< 2 * VEC values) is head
  const int64_t t = threadIdx.x;
  if (t < v0 - a0) scalar(a0 + t);
  for (int64_t i = v0 + t * VEC; i < v1; i += static_cast<int64_t>(blockDim.x) * VEC) packed(i);
  if (t < a1 - v1) scalar(v1 + t);
}

// Visits channel c's values at positions [i0, i1) of planes [n0, n1) with the whole block. Planes of at
// least kThreads values go plane by plane through visit_range (128-bit packs). Smaller planes (7x7, 1x1,
// ...) would leave most threads idle that way, so their values are dealt out one per thread across planes
// instead; a block then holds at most ~2 * kThreads * kMaxSerial values (plane_split), so 32-bit indices.
template <int VEC, typename Scalar, typename Packed>
__device__ __forceinline__ void visit_channel(int64_t n0, int64_t n1, int64_t i0, int64_t i1, int64_t channels,
                                              int64_t c, int64_t hw, const Scalar& scalar, const Packed& packed) {
  if (hw < kThreads) {
    const uint32_t width = static_cast<uint32_t>(i1 - i0);
    const uint32_t count = static_cast<uint32_t>(n1 - n0) * width;
    for (uint32_t j = threadIdx.x; j < count; j += blockDim.x) {
      const uint32_t q = j / width;
      scalar(((n0 + q) * channels + c) * hw + i0 + (j - q * width));
    }
    return;
  }
  for (int64_t img = n0; img < n1; ++img) {
    const int64_t base = (img * channels + c) * hw;
    visit_range<VEC>(base + i0, base + i1, scalar, packed);
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_stats_nchw_kernel(const scalar_t* __restrict__ x, int64_t n, int64_t channels, int64_t hw, PlaneSplit split,
                         acc_t* __restrict__ ws_count, acc_t* __restrict__ ws_mean, acc_t* __restrict__ ws_m2) {
  const int64_t b = blockIdx.x;
  const int64_t piece = b % split.pieces;
  const int64_t group = (b / split.pieces) % split.groups;
  const int64_t c = b / (split.pieces * split.groups);
  const int64_t i0 = piece * split.piece, i1 = imin(hw, i0 + split.piece);
  const int64_t n0 = group * split.planes, n1 = imin(n, n0 + split.planes);
  Welford<acc_t> w = welford_empty<acc_t>();
  const auto scalar = [&](int64_t i) { w = welford_push(w, static_cast<acc_t>(x[i])); };
  const auto packed = [&](int64_t i) {
    const Pack<scalar_t, VEC> p = load_pack<VEC>(x, i);
    if constexpr (VEC == 1) {
      w = welford_push(w, static_cast<acc_t>(p.v[0]));
    } else {
      acc_t v[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) v[k] = static_cast<acc_t>(p.v[k]);
      w = welford_merge(w, chunk_welford(v));
    }
  };
  visit_channel<VEC>(n0, n1, i0, i1, channels, c, hw, scalar, packed);
  w = block_merge(w);
  if (threadIdx.x == 0) {
    const int64_t slot = (group * split.pieces + piece) * channels + c;
    ws_count[slot] = w.count;
    ws_mean[slot] = w.mean;
    ws_m2[slot] = w.m2;
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_nchw_kernel(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z,
                          const scalar_t* __restrict__ y, const acc_t* __restrict__ mean, bool relu, int64_t n,
                          int64_t channels, int64_t hw, PlaneSplit split, acc_t* __restrict__ ws_g,
                          acc_t* __restrict__ ws_gx) {
  const int64_t b = blockIdx.x;
  const int64_t piece = b % split.pieces;
  const int64_t group = (b / split.pieces) % split.groups;
  const int64_t c = b / (split.pieces * split.groups);
  const int64_t i0 = piece * split.piece, i1 = imin(hw, i0 + split.piece);
  const int64_t n0 = group * split.planes, n1 = imin(n, n0 + split.planes);
  const acc_t m = mean[c];
  acc_t sg = 0, sgx = 0;
  const auto one = [&](scalar_t dzi, scalar_t zi, scalar_t yi) {
    const acc_t gi = act_grad<acc_t>(static_cast<acc_t>(dzi), static_cast<acc_t>(zi), relu);
    sg += gi;
    sgx += gi * (static_cast<acc_t>(yi) - m);
  };
  const auto scalar = [&](int64_t i) { one(dz[i], z[i], y[i]); };
  const auto packed = [&](int64_t i) {
    const Pack<scalar_t, VEC> pd = load_pack<VEC>(dz, i), pz = load_pack<VEC>(z, i), py = load_pack<VEC>(y, i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) one(pd.v[k], pz.v[k], py.v[k]);
  };
  visit_channel<VEC>(n0, n1, i0, i1, channels, c, hw, scalar, packed);
  block_sum2(sg, sgx);
  if (threadIdx.x == 0) {
    const int64_t slot = (group * split.pieces + piece) * channels + c;
    ws_g[slot] = sg;
    ws_gx[slot] = sgx;
  }
}

// ---- NHWC reductions: TX x TY blocks, threads along C (VEC channels each), blocks over rows ------------

// Block shape for NHWC: tx threads along C (VEC channels each, at most a warp), ty = kThreads / tx along rows.
struct ChannelTiling {
  int tx, ty;
  int64_t tiles;  // channel tiles: gridDim.y
};

ChannelTiling channel_tiling(int64_t channels, int vec) {
  ChannelTiling t;
  const int64_t packs = ceil_div(channels, vec);
  t.tx = 1;
  while (t.tx < packs && t.tx < kWarp) t.tx *= 2;
  t.ty = kThreads / t.tx;
  t.tiles = ceil_div(packs, t.tx);
  TORCH_CHECK(t.tiles <= kMaxGridY, "deeplab_ops: too many channels for the CUDA kernels: ", channels);
  return t;
}

// Row blocks of an NHWC reduction (gridDim.x, one partial each): enough to fill the GPU, at least
// `min_rows_per_thread` rows per thread, at most ~kMaxSerial (which wins).
struct RowBlocks {
  int64_t count;
  int64_t rows;  // rows per block (the last block may have fewer)
};

RowBlocks row_blocks(int64_t rows, const ChannelTiling& t, int64_t min_rows_per_thread) {
  const int64_t fill = ceil_div(static_cast<int64_t>(sm_count()) * kBlocksPerSm, t.tiles);
  const int64_t by_work = std::max<int64_t>(1, rows / (t.ty * min_rows_per_thread));
  const int64_t by_serial = ceil_div(rows, t.ty * kMaxSerial);
  const int64_t want = std::max(std::min(fill, by_work), by_serial);
  RowBlocks b;
  b.rows = ceil_div(rows, want);
  b.count = ceil_div(rows, b.rows);
  TORCH_CHECK(b.count <= kMaxGridX, "deeplab_ops: activation too large for the CUDA kernels: ", rows, " rows");
  return b;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_stats_nhwc_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t channels, int64_t block_rows,
                         acc_t* __restrict__ ws_count, acc_t* __restrict__ ws_mean, acc_t* __restrict__ ws_m2) {
  // [field][k][thread]: consecutive threads hit consecutive banks.
  __shared__ acc_t sh[3][VEC][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * TX + tx) * VEC;
  const bool active = c0 < channels;  // VEC > 1 only when channels % VEC == 0: a pack is all in or all out
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * block_rows, r1 = imin(rows, r0 + block_rows);
  Welford<acc_t> w[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) w[k] = welford_empty<acc_t>();
  if (active) {
    int64_t r = r0 + ty;
    // kChunkRows rows at a time: kChunkRows independent loads in flight, one merge per chunk.
    for (; r + (kChunkRows - 1) * TY < r1; r += kChunkRows * TY) {
      acc_t v[VEC][kChunkRows];
#pragma unroll
      for (int j = 0; j < kChunkRows; ++j) {
        const Pack<scalar_t, VEC> p = load_pack<VEC>(x, (r + j * TY) * channels + c0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[k][j] = static_cast<acc_t>(p.v[k]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = welford_merge(w[k], chunk_welford(v[k]));
    }
    for (; r < r1; r += TY) {
      const Pack<scalar_t, VEC> p = load_pack<VEC>(x, r * channels + c0);
#pragma unroll
      for (int k = 0; k < VEC; ++k) w[k] = welford_push(w[k], static_cast<acc_t>(p.v[k]));
    }
  }
  // Merge down the TY rows of threads: a tree with a fixed pairing (row ty takes row ty + s).
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sh[0][k][tid] = w[k].count;
    sh[1][k][tid] = w[k].mean;
    sh[2][k][tid] = w[k].m2;
  }
  for (int s = TY / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
      const int other = tid + s * TX;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        w[k] = welford_merge(w[k], Welford<acc_t>{sh[0][k][other], sh[1][k][other], sh[2][k][other]});
        sh[0][k][tid] = w[k].count;
        sh[1][k][tid] = w[k].mean;
        sh[2][k][tid] = w[k].m2;
      }
    }
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t slot = static_cast<int64_t>(blockIdx.x) * channels + c0 + k;
      ws_count[slot] = w[k].count;
      ws_mean[slot] = w[k].mean;
      ws_m2[slot] = w[k].m2;
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    bn_reduce_nhwc_kernel(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z,
                          const scalar_t* __restrict__ y, const acc_t* __restrict__ mean, bool relu, int64_t rows,
                          int64_t channels, int64_t block_rows, acc_t* __restrict__ ws_g, acc_t* __restrict__ ws_gx) {
  __shared__ acc_t sh[2][VEC][kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int tid = ty * TX + tx;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * TX + tx) * VEC;
  const bool active = c0 < channels;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * block_rows, r1 = imin(rows, r0 + block_rows);
  acc_t sg[VEC], sgx[VEC], m[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sg[k] = sgx[k] = acc_t(0);
    m[k] = active ? mean[c0 + k] : acc_t(0);
  }
  if (active) {
#pragma unroll 2
    for (int64_t r = r0 + ty; r < r1; r += TY) {
      const int64_t i = r * channels + c0;
      const Pack<scalar_t, VEC> pd = load_pack<VEC>(dz, i), pz = load_pack<VEC>(z, i), py = load_pack<VEC>(y, i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t gi = act_grad<acc_t>(static_cast<acc_t>(pd.v[k]), static_cast<acc_t>(pz.v[k]), relu);
        sg[k] += gi;
        sgx[k] += gi * (static_cast<acc_t>(py.v[k]) - m[k]);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < VEC; ++k) {
    sh[0][k][tid] = sg[k];
    sh[1][k][tid] = sgx[k];
  }
  for (int s = TY / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (ty < s) {
      const int other = tid + s * TX;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sg[k] += sh[0][k][other];
        sgx[k] += sh[1][k][other];
        sh[0][k][tid] = sg[k];
        sh[1][k][tid] = sgx[k];
      }
    }
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const int64_t slot = static_cast<int64_t>(blockIdx.x) * channels + c0 + k;
      ws_g[slot] = sg[k];
      ws_gx[slot] = sgx[k];
    }
  }
}

// ---- second level: one warp per channel merges its P partials, in double, in a fixed order -------------

template <typename acc_t, typename stat_t>
__global__ void __launch_bounds__(kThreads)
    stats_combine_kernel(const acc_t* __restrict__ count, const acc_t* __restrict__ mean,
                         const acc_t* __restrict__ m2, int64_t parts, int64_t channels, stat_t* __restrict__ out_mean,
                         stat_t* __restrict__ out_m2) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (c >= channels) return;  // uniform per warp
  Welford<double> w = welford_empty<double>();
  for (int64_t p = lane; p < parts; p += kWarp) {
    const int64_t i = p * channels + c;
    w = welford_merge(w, Welford<double>{static_cast<double>(count[i]), static_cast<double>(mean[i]),
                                         static_cast<double>(m2[i])});
  }
  w = warp_merge(w);
  if (lane == 0) {
    out_mean[c] = static_cast<stat_t>(w.mean);
    out_m2[c] = static_cast<stat_t>(w.m2);
  }
}

template <typename acc_t, typename stat_t>
__global__ void __launch_bounds__(kThreads)
    sums_combine_kernel(const acc_t* __restrict__ part_g, const acc_t* __restrict__ part_gx, int64_t parts,
                        int64_t channels, const stat_t* __restrict__ invstd, stat_t* __restrict__ out_g,
                        stat_t* __restrict__ out_gx) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / kWarp) + threadIdx.x / kWarp;
  if (c >= channels) return;
  double sg = 0, sgx = 0;
  for (int64_t p = lane; p < parts; p += kWarp) {
    sg += static_cast<double>(part_g[p * channels + c]);
    sgx += static_cast<double>(part_gx[p * channels + c]);
  }
  warp_sum2(sg, sgx);
  if (lane == 0) {
    out_g[c] = static_cast<stat_t>(sg);
    // sum(g * xhat) = invstd * sum(g * (y - mean)): one multiply per channel, not per element.
    out_gx[c] = static_cast<stat_t>(sgx * static_cast<double>(invstd[c]));
  }
}

// ---- finalize: one thread per channel, in double, exactly as bn_finalize_cpu ---------------------------

__global__ void __launch_bounds__(kThreads)
    bn_finalize_kernel(const double* __restrict__ count, const double* __restrict__ mean,
                       const double* __restrict__ m2, int64_t parts, int64_t channels, double* running_mean,
                       double* running_var, double momentum, double eps, double* __restrict__ out_mean,
                       double* __restrict__ out_invstd) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  Welford<double> w = welford_empty<double>();
  for (int64_t p = 0; p < parts; ++p) {
    w = welford_merge(w, Welford<double>{count[p], mean[p * channels + c], m2[p * channels + c]});
  }
  const bool update = running_mean != nullptr;
  const Finalized<double> f =
      bn_finalize_channel<double>(w, update ? running_mean[c] : 0.0, update ? running_var[c] : 0.0, momentum, eps);
  out_mean[c] = f.mean;
  out_invstd[c] = f.invstd;
  if (update) {
    running_mean[c] = f.running_mean;
    running_var[c] = f.running_var;
  }
}

// ---- element-wise passes ---------------------------------------------------------------------------------
// A pass is a functor: `channel(c)` loads the per-channel coefficients, `fn(chan, a, b, d)` maps up to
// three input values (in opmath) to the output value.

template <typename scalar_t>
struct ApplyFn {
  using op_t = at::opmath_type<scalar_t>;
  struct Chan {
    op_t mean, scale, shift;
  };
  const op_t* mean;
  const op_t* scale;
  const op_t* shift;
  bool residual;
  bool relu;
  __device__ __forceinline__ Chan channel(int64_t c) const { return Chan{mean[c], scale[c], shift[c]}; }
  __device__ __forceinline__ op_t operator()(const Chan& ch, op_t x, op_t r, op_t) const {
    op_t v = bn_affine<op_t>(x, ch.mean, ch.scale, ch.shift);
    if (residual) v += r;
    return relu_if<op_t>(v, relu);
  }
};

template <typename scalar_t>
struct DyFn {
  using op_t = at::opmath_type<scalar_t>;
  struct Chan {
    op_t mean;
    DyCoef<op_t> coef;
  };
  const op_t* coef;  // (4, C): mean, k, a, b (dy_coefficients)
  int64_t channels;
  bool relu;
  __device__ __forceinline__ Chan channel(int64_t c) const {
    return Chan{coef[c], DyCoef<op_t>{coef[channels + c], coef[2 * channels + c], coef[3 * channels + c]}};
  }
  __device__ __forceinline__ op_t operator()(const Chan& ch, op_t dz, op_t z, op_t y) const {
    return bn_dy<op_t>(act_grad<op_t>(dz, z, relu), y, ch.mean, ch.coef);
  }
};

// NCHW: block b maps the flat values [b * tile, (b + 1) * tile); each thread one VEC-pack per step of
// kThreads * VEC values. The (plane offset, channel) of a pack is stepped without divisions; a pack that
// lies inside one plane (the common case) uses one channel's coefficients, one that straddles planes
// walks them value by value. Coefficients are reloaded only when the channel changes.
template <typename scalar_t, int VEC, typename Fn>
__global__ void __launch_bounds__(kThreads)
    map_nchw_kernel(Fn fn, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
                    const scalar_t* __restrict__ in2, scalar_t* __restrict__ out, int64_t numel, int64_t hw,
                    int64_t channels, int64_t tile) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(blockDim.x) * VEC;
  const int64_t block0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t end = imin(numel, block0 + tile);
  int64_t e = block0 + static_cast<int64_t>(threadIdx.x) * VEC;
  if (e >= end) return;
  int64_t off = e % hw, c = (e / hw) % channels;
  const int64_t step_off = step % hw, step_c = (step / hw) % channels;
  int64_t loaded = c;
  typename Fn::Chan ch = fn.channel(c);
  for (; e < end; e += step) {
    op_t a[VEC], b[VEC], d[VEC];
    const bool full = e + VEC <= numel;  // only the tensor's last pack can be partial
    if (full) {
      const Pack<scalar_t, VEC> pa = load_pack<VEC>(in0, e);
      Pack<scalar_t, VEC> pb, pd;
      if (in1 != nullptr) pb = load_pack<VEC>(in1, e);
      if (in2 != nullptr) pd = load_pack<VEC>(in2, e);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        a[k] = static_cast<op_t>(pa.v[k]);
        b[k] = in1 != nullptr ? static_cast<op_t>(pb.v[k]) : op_t(0);
        d[k] = in2 != nullptr ? static_cast<op_t>(pd.v[k]) : op_t(0);
      }
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const bool ok = e + k < numel;
        a[k] = ok ? static_cast<op_t>(in0[e + k]) : op_t(0);
        b[k] = ok && in1 != nullptr ? static_cast<op_t>(in1[e + k]) : op_t(0);
        d[k] = ok && in2 != nullptr ? static_cast<op_t>(in2[e + k]) : op_t(0);
      }
    }
    Pack<scalar_t, VEC> o;
    if (off + VEC <= hw) {
      if (c != loaded) {
        loaded = c;
        ch = fn.channel(c);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = static_cast<scalar_t>(fn(ch, a[k], b[k], d[k]));
    } else {
      int64_t o_off = off, cc = c;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (cc != loaded) {
          loaded = cc;
          ch = fn.channel(cc);
        }
        o.v[k] = static_cast<scalar_t>(fn(ch, a[k], b[k], d[k]));
        if (++o_off == hw) {
          o_off = 0;
          if (++cc == channels) cc = 0;
        }
      }
    }
    if (full) {
      store_pack<VEC>(out, e, o);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        if (e + k < numel) out[e + k] = o.v[k];
      }
    }
    // Advance by `step` values: off < hw and step_off < hw, so at most one plane carry; c, step_c < C and
    // the carry adds 1, so at most one wrap.
    off += step_off;
    c += step_c;
    if (off >= hw) {
      off -= hw;
      ++c;
    }
    if (c >= channels) c -= channels;
  }
}

// NHWC: thread (tx, ty) of block (bx, by) owns channels [c0, c0 + VEC) with their coefficients in
// registers and maps rows by + ty, stepping over the grid's rows. A warp reads 32 * 16 contiguous bytes.
template <typename scalar_t, int VEC, typename Fn>
__global__ void __launch_bounds__(kThreads)
    map_nhwc_kernel(Fn fn, const scalar_t* __restrict__ in0, const scalar_t* __restrict__ in1,
                    const scalar_t* __restrict__ in2, scalar_t* __restrict__ out, int64_t rows, int64_t channels) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= channels) return;  // VEC > 1 only when channels % VEC == 0: a pack is all in or all out
  typename Fn::Chan ch[VEC];
#pragma unroll
  for (int k = 0; k < VEC; ++k) ch[k] = fn.channel(c0 + k);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; r < rows; r += stride) {
    const int64_t i = r * channels + c0;
    const Pack<scalar_t, VEC> pa = load_pack<VEC>(in0, i);
    Pack<scalar_t, VEC> pb, pd, o;
    if (in1 != nullptr) pb = load_pack<VEC>(in1, i);
    if (in2 != nullptr) pd = load_pack<VEC>(in2, i);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const op_t b = in1 != nullptr ? static_cast<op_t>(pb.v[k]) : op_t(0);
      const op_t d = in2 != nullptr ? static_cast<op_t>(pd.v[k]) : op_t(0);
      o.v[k] = static_cast<scalar_t>(fn(ch[k], static_cast<op_t>(pa.v[k]), b, d));
    }
    store_pack<VEC>(out, i, o);
  }
}

// ---- host launchers ------------------------------------------------------------------------------------

template <typename scalar_t, typename Fn>
void launch_map(const Fn& fn, const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& in2,
                at::Tensor& out, bool nhwc) {
  constexpr int V = pack_width<scalar_t>();
  const auto g = geometry(out);
  const scalar_t* p0 = in0.const_data_ptr<scalar_t>();
  const scalar_t* p1 = in1.defined() ? in1.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* p2 = in2.defined() ? in2.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* po = out.data_ptr<scalar_t>();
  const bool aligned =
      aligned16(p0) && aligned16(po) && (p1 == nullptr || aligned16(p1)) && (p2 == nullptr || aligned16(p2));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (!nhwc) {
    const int64_t numel = out.numel();
    const int vec = aligned ? V : 1;
    const int64_t step = static_cast<int64_t>(kThreads) * vec;
    // 1 to 8 steps per thread: one resident wave when the tensor is small, fewer, longer blocks when large.
    const int64_t steps = std::clamp<int64_t>(numel / (step * sm_count() * kBlocksPerSm), 1, 8);
    const int64_t tile = steps * step;
    const int64_t blocks = ceil_div(numel, tile);
    TORCH_CHECK(blocks <= kMaxGridX, "deeplab_ops: activation too large for the CUDA kernels: ", numel, " values");
    if (aligned) {
      map_nchw_kernel<scalar_t, V><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(fn, p0, p1, p2, po, numel, g.hw, g.c, tile);
    } else {
      map_nchw_kernel<scalar_t, 1><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(fn, p0, p1, p2, po, numel, g.hw, g.c, tile);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t rows = g.n * g.hw;
    const bool packed = aligned && g.c % V == 0;
    const int vec = packed ? V : 1;
    const ChannelTiling t = channel_tiling(g.c, vec);
    // Grid-stride over rows: ~4 waves of blocks, each thread keeps its coefficients for many rows.
    const int64_t waves = ceil_div(static_cast<int64_t>(sm_count()) * kBlocksPerSm * 4, t.tiles);
    const int64_t blocks_x = std::min(ceil_div(rows, t.ty), waves);
    const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(t.tiles));
    const dim3 block(t.tx, t.ty);
    if (packed) {
      map_nhwc_kernel<scalar_t, V><<<grid, block, 0, stream>>>(fn, p0, p1, p2, po, rows, g.c);
    } else {
      map_nhwc_kernel<scalar_t, 1><<<grid, block, 0, stream>>>(fn, p0, p1, p2, po, rows, g.c);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Second-level kernels: one warp per channel.
unsigned combine_blocks(int64_t channels) { return static_cast<unsigned>(ceil_div(channels, kThreads / kWarp)); }

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input_) {
  DLO_CHECK_ACTIVATION(input_);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const auto g = geometry(input);
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  at::Tensor mean = at::empty({g.c}, input.options().dtype(stat_dtype));
  at::Tensor m2 = at::empty({g.c}, input.options().dtype(stat_dtype));
  if (g.n * g.hw == 0) {
    mean.fill_(NAN);
    m2.zero_();
    return {mean, m2};
  }
  if (g.c == 0) return {mean, m2};
  const bool nhwc = is_nhwc(input);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = pack_width<scalar_t>();
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const bool aligned = aligned16(x);
    int64_t parts;
    at::Tensor ws;
    if (!nhwc) {
      const PlaneSplit split = plane_split(g, aligned ? V : 1);
      parts = split.groups * split.pieces;
      const int64_t blocks = g.c * parts;
      TORCH_CHECK(blocks <= kMaxGridX, "deeplab_ops: activation too large for the CUDA kernels: ", input.sizes());
      ws = at::empty({3, parts, g.c}, input.options().dtype(stat_dtype));
      acc_t* w = ws.data_ptr<acc_t>();
      const int64_t pc = parts * g.c;
      if (aligned) {
        bn_stats_nchw_kernel<scalar_t, acc_t, V>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, g.n, g.c, g.hw, split, w, w + pc, w + 2 * pc);
      } else {
        bn_stats_nchw_kernel<scalar_t, acc_t, 1>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(x, g.n, g.c, g.hw, split, w, w + pc, w + 2 * pc);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t rows = g.n * g.hw;
      const bool packed = aligned && g.c % V == 0;
      const ChannelTiling t = channel_tiling(g.c, packed ? V : 1);
      const RowBlocks rb = row_blocks(rows, t, 2 * kChunkRows);
      parts = rb.count;
      ws = at::empty({3, parts, g.c}, input.options().dtype(stat_dtype));
      acc_t* w = ws.data_ptr<acc_t>();
      const int64_t pc = parts * g.c;
      const dim3 grid(static_cast<unsigned>(rb.count), static_cast<unsigned>(t.tiles));
      const dim3 block(t.tx, t.ty);
      if (packed) {
        bn_stats_nhwc_kernel<scalar_t, acc_t, V>
            <<<grid, block, 0, stream>>>(x, rows, g.c, rb.rows, w, w + pc, w + 2 * pc);
      } else {
        bn_stats_nhwc_kernel<scalar_t, acc_t, 1>
            <<<grid, block, 0, stream>>>(x, rows, g.c, rb.rows, w, w + pc, w + 2 * pc);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const acc_t* w = ws.const_data_ptr<acc_t>();
    const int64_t pc = parts * g.c;
    stats_combine_kernel<acc_t, acc_t><<<combine_blocks(g.c), kThreads, 0, stream>>>(
        w, w + pc, w + 2 * pc, parts, g.c, mean.data_ptr<acc_t>(), m2.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cuda(const at::Tensor& count, const at::Tensor& mean,
                                                    const at::Tensor& m2,
                                                    const std::optional<at::Tensor>& running_mean,
                                                    const std::optional<at::Tensor>& running_var, double momentum,
                                                    double eps) {
  check_finalize_args(count, mean, m2, running_mean, running_var);
  TORCH_CHECK(mean.is_cuda(), "deeplab_ops: bn_finalize on CUDA needs the mean partials on a CUDA device, got ",
              mean.device());
  const c10::cuda::CUDAGuard device_guard(mean.device());
  const int64_t parts = mean.size(0), channels = mean.size(1);
  const auto stat_dtype = mean.scalar_type();
  // Everything in double on mean's device (count and m2 may come from elsewhere: the checks do not pin
  // their device). Partials are few, so this costs nothing next to the statistics pass.
  const at::Tensor cnt = count.to(mean.device(), at::kDouble).contiguous();
  const at::Tensor mu = mean.to(at::kDouble).contiguous();
  const at::Tensor sq = m2.to(mean.device(), at::kDouble).contiguous();
  const bool update = running_mean.has_value() && running_mean->defined();
  at::Tensor rm, rv;
  if (update) {
    rm = running_mean->to(at::kDouble).contiguous();
    rv = running_var->to(at::kDouble).contiguous();
  }
  at::Tensor save_mean = at::empty({channels}, mean.options().dtype(at::kDouble));
  at::Tensor save_invstd = at::empty({channels}, mean.options().dtype(at::kDouble));
  if (channels > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    bn_finalize_kernel<<<static_cast<unsigned>(ceil_div(channels, kThreads)), kThreads, 0, stream>>>(
        cnt.const_data_ptr<double>(), mu.const_data_ptr<double>(), sq.const_data_ptr<double>(), parts, channels,
        update ? rm.data_ptr<double>() : nullptr, update ? rv.data_ptr<double>() : nullptr, momentum, eps,
        save_mean.data_ptr<double>(), save_invstd.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (update) {
    running_mean->copy_(rm);
    running_var->copy_(rv);
  }
  return {save_mean.to(stat_dtype), save_invstd.to(stat_dtype)};
}

at::Tensor bn_apply_cuda(const at::Tensor& input_, const at::Tensor& mean, const at::Tensor& scale,
                         const at::Tensor& shift, const std::optional<at::Tensor>& residual_, bool relu) {
  check_apply_args(input_, mean, scale, shift, residual_);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const bool has_res = residual_.has_value() && residual_->defined();
  const at::Tensor residual = has_res ? as_kernel_layout(*residual_, mf) : at::Tensor();
  at::Tensor out = at::empty_like(input, input.options(), mf);
  if (out.numel() == 0) return out;
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  const at::Tensor mu = channel_vector(mean, stat_dtype), sc = channel_vector(scale, stat_dtype),
                   sh = channel_vector(shift, stat_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_apply_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const ApplyFn<scalar_t> fn{mu.const_data_ptr<op_t>(), sc.const_data_ptr<op_t>(), sh.const_data_ptr<op_t>(),
                               has_res, relu};
    launch_map<scalar_t>(fn, input, residual, at::Tensor(), out, is_nhwc(input));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(const at::Tensor& grad_out_, const at::Tensor& output_,
                                                           const at::Tensor& input_, const at::Tensor& mean,
                                                           const at::Tensor& invstd, bool relu) {
  check_backward_args(grad_out_, output_, input_, mean, invstd);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const at::Tensor grad_out = as_kernel_layout(grad_out_, mf);
  const at::Tensor output = as_kernel_layout(output_, mf);
  const auto g = geometry(input);
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  const at::Tensor mu = channel_vector(mean, stat_dtype), is = channel_vector(invstd, stat_dtype);
  at::Tensor sum_g = at::empty({g.c}, input.options().dtype(stat_dtype));
  at::Tensor sum_gx = at::empty({g.c}, input.options().dtype(stat_dtype));
  if (g.n * g.hw == 0 || g.c == 0) {
    sum_g.zero_();
    sum_gx.zero_();
    return {sum_g, sum_gx};
  }
  const bool nhwc = is_nhwc(input);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int V = pack_width<scalar_t>();
    const scalar_t* y = input.const_data_ptr<scalar_t>();
    const scalar_t* dz = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    const acc_t* mp = mu.const_data_ptr<acc_t>();
    const bool aligned = aligned16(y) && aligned16(dz) && aligned16(z);
    int64_t parts;
    at::Tensor ws;
    if (!nhwc) {
      const PlaneSplit split = plane_split(g, aligned ? V : 1);
      parts = split.groups * split.pieces;
      const int64_t blocks = g.c * parts;
      TORCH_CHECK(blocks <= kMaxGridX, "deeplab_ops: activation too large for the CUDA kernels: ", input.sizes());
      ws = at::empty({2, parts, g.c}, input.options().dtype(stat_dtype));
      acc_t* w = ws.data_ptr<acc_t>();
      const int64_t pc = parts * g.c;
      if (aligned) {
        bn_reduce_nchw_kernel<scalar_t, acc_t, V>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(dz, z, y, mp, relu, g.n, g.c, g.hw, split, w, w + pc);
      } else {
        bn_reduce_nchw_kernel<scalar_t, acc_t, 1>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(dz, z, y, mp, relu, g.n, g.c, g.hw, split, w, w + pc);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t rows = g.n * g.hw;
      const bool packed = aligned && g.c % V == 0;
      const ChannelTiling t = channel_tiling(g.c, packed ? V : 1);
      const RowBlocks rb = row_blocks(rows, t, 8);
      parts = rb.count;
      ws = at::empty({2, parts, g.c}, input.options().dtype(stat_dtype));
      acc_t* w = ws.data_ptr<acc_t>();
      const int64_t pc = parts * g.c;
      const dim3 grid(static_cast<unsigned>(rb.count), static_cast<unsigned>(t.tiles));
      const dim3 block(t.tx, t.ty);
      if (packed) {
        bn_reduce_nhwc_kernel<scalar_t, acc_t, V>
            <<<grid, block, 0, stream>>>(dz, z, y, mp, relu, rows, g.c, rb.rows, w, w + pc);
      } else {
        bn_reduce_nhwc_kernel<scalar_t, acc_t, 1>
            <<<grid, block, 0, stream>>>(dz, z, y, mp, relu, rows, g.c, rb.rows, w, w + pc);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const acc_t* w = ws.const_data_ptr<acc_t>();
    const int64_t pc = parts * g.c;
    sums_combine_kernel<acc_t, acc_t><<<combine_blocks(g.c), kThreads, 0, stream>>>(
        w, w + pc, parts, g.c, is.const_data_ptr<acc_t>(), sum_g.data_ptr<acc_t>(), sum_gx.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g, sum_gx};
}

at::Tensor bn_backward_dy_cuda(const at::Tensor& grad_out_, const at::Tensor& output_, const at::Tensor& input_,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sum_g,
                               const std::optional<at::Tensor>& sum_g_xhat, double count, bool relu,
                               bool training) {
  check_backward_args(grad_out_, output_, input_, mean, invstd);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const at::Tensor grad_out = as_kernel_layout(grad_out_, mf);
  const at::Tensor output = as_kernel_layout(output_, mf);
  const auto g = geometry(input);
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  const at::Tensor coef = dy_coefficients(mean, invstd, weight, sum_g, sum_g_xhat, count, training, g.c, stat_dtype);
  at::Tensor dy = at::empty_like(input, input.options(), mf);
  if (dy.numel() == 0) return dy;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_dy_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const DyFn<scalar_t> fn{coef.const_data_ptr<op_t>(), g.c, relu};
    launch_map<scalar_t>(fn, grad_out, output, input, dy, is_nhwc(input));
  });
  return dy;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_dy", &bn_backward_dy_cuda);
}

}  // namespace deeplab_ops
