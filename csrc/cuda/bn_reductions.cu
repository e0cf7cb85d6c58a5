// CUDA reductions of the BatchNorm stages: bn_stats (per-channel mean and M2) and bn_backward_reduce (per-channel
// sum g and sum g * xhat), for NCHW and channels_last activations, with the semantics of the CPU kernels
// (csrc/cpu/bn_stages_cpu.cpp).
//
// Layouts. NCHW: a channel is N planes of H*W contiguous values; a block takes one channel and a range of planes
// (or one piece of each plane when N is small). channels_last: a channel is a column of an (N*H*W, C) matrix;
// threads run along C with VEC channels each, blocks run over rows.
//
// Two levels, deterministic: each block writes one partial per channel, (count, mean, M2) or (sum g,
// sum g * (y - mean)), to a workspace, and a second kernel merges a channel's partials in a fixed order, in double.
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

#include "bn_stage_args.h"
#include "common/activation_layout.h"
#include "common/arg_checks.h"
#include "common/bn_math.h"
#include "cuda/bn_stages_cuda.h"
#include "cuda/device_helpers.cuh"

namespace deeplab_ops {
namespace {

// ---- NCHW reductions: blocks over (channel, plane group, plane piece) ----------------------------------

// How one channel's N planes are cut into blocks. Partial p = group * pieces + piece; its count is the
// same for every channel.
struct PlaneSplit {
  int64_t groups;  // plane groups per channel
  int64_t planes;  // planes per group (the last group may have fewer)
  int64_t pieces;  // pieces per plane
  int64_t piece;   // values per piece (the last piece may have fewer)
};

PlaneSplit plane_split(const ActivationShape& g, int vec) {
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

unsigned combine_blocks(int64_t channels) { return static_cast<unsigned>(ceil_div(channels, kThreads / kWarp)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input_) {
  check_stats_args(input_);  // (DLO_CHECK_ACTIVATION(input_) would name it input_)
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const auto g = activation_shape(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  at::Tensor mean = at::empty({g.c}, input.options().dtype(opmath));
  at::Tensor m2 = at::empty({g.c}, input.options().dtype(opmath));
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
      ws = at::empty({3, parts, g.c}, input.options().dtype(opmath));
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
      ws = at::empty({3, parts, g.c}, input.options().dtype(opmath));
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

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(const at::Tensor& grad_out_, const at::Tensor& output_,
                                                           const at::Tensor& input_, const at::Tensor& mean,
                                                           const at::Tensor& invstd, bool relu) {
  check_backward_args(grad_out_, output_, input_, mean, invstd);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const at::Tensor grad_out = as_kernel_layout(grad_out_, mf);
  const at::Tensor output = as_kernel_layout(output_, mf);
  const auto g = activation_shape(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  const at::Tensor mu = opmath_channel_vector(mean, opmath), is = opmath_channel_vector(invstd, opmath);
  at::Tensor sum_g = at::empty({g.c}, input.options().dtype(opmath));
  at::Tensor sum_gx = at::empty({g.c}, input.options().dtype(opmath));
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
      ws = at::empty({2, parts, g.c}, input.options().dtype(opmath));
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
      ws = at::empty({2, parts, g.c}, input.options().dtype(opmath));
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

}  // namespace deeplab_ops
