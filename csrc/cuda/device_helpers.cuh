// Launch constants, 128-bit packs and the warp / block merges shared by the BatchNorm stage kernels.
//
// Accumulation is in at::opmath_type (float for half/bfloat16/float, double for double). No fast-math:
// divisions and square roots are IEEE-rounded (setup.py never passes --use_fast_math). Merges pair lanes in a
// fixed order and no kernel uses atomics, so results are bitwise reproducible run to run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10's CUDA headers, not ATen/cuda/CUDAContext.h: the latter pulls in cuSPARSE/cuBLAS headers that a
// bare toolkit (or a CI image) may lack, and these kernels need only the stream, guard and error checks.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "common/bn_math.h"

namespace deeplab_ops {

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

// SMs of the current device (the caller's CUDAGuard has set it); sizes grids to fill the GPU.
inline int sm_count() {
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

// Block shape of the channels_last kernels (reductions and element-wise passes): tx threads along C (VEC
// channels each, at most a warp), ty = kThreads / tx along rows.
struct ChannelTiling {
  int tx, ty;
  int64_t tiles;  // channel tiles: gridDim.y
};

inline ChannelTiling channel_tiling(int64_t channels, int vec) {
  ChannelTiling t;
  const int64_t packs = ceil_div(channels, vec);
  t.tx = 1;
  while (t.tx < packs && t.tx < kWarp) t.tx *= 2;
  t.ty = kThreads / t.tx;
  t.tiles = ceil_div(packs, t.tx);
  TORCH_CHECK(t.tiles <= kMaxGridY, "deeplab_ops: too many channels for the CUDA kernels: ", channels);
  return t;
}

}  // namespace deeplab_ops
