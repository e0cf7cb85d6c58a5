// CUDA element-wise passes of the BatchNorm stages: bn_apply (affine + residual + activation) and bn_backward_dy
// (the BN input gradient), for NCHW and channels_last activations, with the semantics of the CPU kernels.
//
// NCHW passes walk the flat tensor in 128-bit packs that may straddle planes (DeepLab's 33x33 maps have odd
// planes), tracking the channel incrementally; channels_last passes keep per-channel values in registers.
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

// ---- element-wise passes ---------------------------------------------------------------------------------
// A pass is a functor: `channel(c)` loads the per-channel coefficients, `fn(chan, a, b, d)` maps up to
// three input values (in opmath) to the output value.

// Per-channel values are loaded once per channel change: scale = weight * invstd and the dy coefficients are
// computed there, in op_t, as the CPU kernels compute them.
template <typename scalar_t>
struct ApplyFn {
  using op_t = at::opmath_type<scalar_t>;
  struct Chan {
    op_t mean, scale, shift;
  };
  const op_t* mean;
  const op_t* invstd;
  const op_t* weight;  // nullptr: 1
  const op_t* bias;    // nullptr: 0
  bool residual;
  bool relu;
  __device__ __forceinline__ Chan channel(int64_t c) const {
    return Chan{mean[c], weight != nullptr ? weight[c] * invstd[c] : invstd[c], bias != nullptr ? bias[c] : op_t(0)};
  }
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
  const op_t* mean;
  const op_t* invstd;
  const op_t* weight;      // nullptr: 1
  const op_t* sum_g;       // training only
  const op_t* sum_g_xhat;  // training only
  op_t count;
  bool training;
  bool relu;
  __device__ __forceinline__ Chan channel(int64_t c) const {
    return Chan{mean[c], dy_coef<op_t>(weight != nullptr ? weight[c] : op_t(1), invstd[c],
                                       training ? sum_g[c] : op_t(0), training ? sum_g_xhat[c] : op_t(0), count,
                                       training)};
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

template <typename scalar_t, typename Fn>
void launch_map(const Fn& fn, const at::Tensor& in0, const at::Tensor& in1, const at::Tensor& in2,
                at::Tensor& out, bool nhwc) {
  constexpr int V = pack_width<scalar_t>();
  const auto g = activation_shape(out);
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

}  // namespace

at::Tensor bn_apply_cuda(const at::Tensor& input_, const at::Tensor& mean, const at::Tensor& invstd,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual_, bool relu) {
  check_apply_args(input_, mean, invstd, weight, bias, residual_);
  const c10::cuda::CUDAGuard device_guard(input_.device());
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const bool has_res = present(residual_);
  const at::Tensor residual = has_res ? as_kernel_layout(*residual_, mf) : at::Tensor();
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(mf));
  if (out.numel() == 0) return out;
  const auto opmath = opmath_dtype(input.scalar_type());
  const at::Tensor mu = opmath_channel_vector(mean, opmath), is = opmath_channel_vector(invstd, opmath);
  const at::Tensor wt = present(weight) ? opmath_channel_vector(*weight, opmath) : at::Tensor();
  const at::Tensor bs = present(bias) ? opmath_channel_vector(*bias, opmath) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_apply_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const ApplyFn<scalar_t> fn{mu.const_data_ptr<op_t>(), is.const_data_ptr<op_t>(),
                               wt.defined() ? wt.const_data_ptr<op_t>() : nullptr,
                               bs.defined() ? bs.const_data_ptr<op_t>() : nullptr, has_res, relu};
    launch_map<scalar_t>(fn, input, residual, at::Tensor(), out, is_nhwc(input));
  });
  return out;
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
  check_dy_args(input, weight, sum_g, sum_g_xhat, count, training);
  at::Tensor dy = at::empty(input.sizes(), input.options().memory_format(mf));
  if (dy.numel() == 0) return dy;
  const auto opmath = opmath_dtype(input.scalar_type());
  const at::Tensor mu = opmath_channel_vector(mean, opmath), is = opmath_channel_vector(invstd, opmath);
  const at::Tensor wt = present(weight) ? opmath_channel_vector(*weight, opmath) : at::Tensor();
  const at::Tensor sg = training ? opmath_channel_vector(*sum_g, opmath) : at::Tensor();
  const at::Tensor sgx = training ? opmath_channel_vector(*sum_g_xhat, opmath) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_dy_cuda", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const DyFn<scalar_t> fn{mu.const_data_ptr<op_t>(),
                            is.const_data_ptr<op_t>(),
                            wt.defined() ? wt.const_data_ptr<op_t>() : nullptr,
                            training ? sg.const_data_ptr<op_t>() : nullptr,
                            training ? sgx.const_data_ptr<op_t>() : nullptr,
                            static_cast<op_t>(count),
                            training,
                            relu};
    launch_map<scalar_t>(fn, grad_out, output, input, dy, is_nhwc(input));
  });
  return dy;
}

}  // namespace deeplab_ops
