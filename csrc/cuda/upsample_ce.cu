// CUDA kernels of upsample_cross_entropy: the cross-entropy of bilinearly upsampled logits without the
// (N, K, H, W) upsampled tensor. The twin of csrc/cpu/upsample_ce_cpu.cpp and of the Triton kernels
// (deeplab_ops/triton/upsample_ce.py has the math).
//
//   forward   one thread per output pixel: interpolates its K logits from the 4 low-res neighbours, one-pass
//             logsumexp (one exp per class), the target logit; stores the per-pixel logsumexp as its maximum and
//             log-sum (two opmath planes, so that z - logsumexp is as exact as log_softmax's) and the
//             per-pixel loss ("none") or one (sum, count) partial per block, merged on the host in block
//             order (deterministic).
//   backward  gather form, one thread per low-res element (n, k, i, j), j fastest so that a warp shares its
//             output rows: sums wy * wx * g * (exp((z_k - max) - logsum) - [k == t]) over the output pixels whose stencil
//             reads (i, j), recomputing z_k there. Every output element has one writer: no atomics (which at
//             upsampling factor s would put ~(2s)^2 pixels on each address), bitwise reproducible; the cost
//             is ~4x the forward's interpolation work, reading cache-resident low-res logits.
//
// Stencils: PyTorch's upsample_bilinear2d source index (scale from the sizes; clamp at 0 without align_corners)
// in at::opmath_type, computed on the host (H + W + h + w entries) once per configuration and cached on the
// device: a call after the first does no host work and no copy (CUDA-graph capturable). Labels outside [0, K) other than ignore_index are not checked on the device (that
// would cost a synchronization per call): their pixels get a NaN loss and a NaN gradient, and nothing is read
// out of range. Accumulation in float for half/bfloat16/float logits, double for double.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "common/upsample_stencil.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

namespace deeplab_ops {
namespace {

constexpr int kThreads = 256;

using upsample_ce::Reduction;
using upsample_ce::parse_reduction;

void check_uce_args(const at::Tensor& logits, const at::Tensor& target) {
  upsample_ce::check_args(logits, target);
  // At most 2**31 - 1 elements, as the front door (deeplab_ops/ops/upsample_ce.py): every offset the kernels form
  // in int (p < P, e < total, n * K * hw widened, k * hw, (n * H + oy) * W) is then below the element count, and
  // the last block's thread index, ceil(P / 256) * 256 - 1, is at most 2**31 - 1.
  TORCH_CHECK(logits.numel() <= std::numeric_limits<int32_t>::max() &&
                  target.numel() <= std::numeric_limits<int32_t>::max(),
              "deeplab_ops.upsample_cross_entropy: logits ", logits.sizes(), " or target ", target.sizes(),
              " has 2**31 or more elements; the kernels index with int32");
}

// Per-axis stencil on the device: int32 [i0 (out), i1 (out), start (in), end (in)] and opmath [l0, l1] (out);
// `ready`: recorded on `stream` (the allocating one) after the tables' asynchronous copies.
struct AxisStencil {
  at::Tensor idx, weight;
  std::shared_ptr<CUevent_st> ready;  // (ATen's CUDAEvent header needs cuSPARSE's headers: a raw event)
  cudaStream_t stream;
};

template <typename opmath_t>
AxisStencil build_axis_stencil(int64_t in, int64_t out, bool align_corners, const at::Device& device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &status));
  TORCH_CHECK(status == cudaStreamCaptureStatusNone, "upsample_cross_entropy: first call of an upsampling from ", in,
              " to ", out, " (align_corners=", align_corners ? "True" : "False", ") inside a CUDA-graph capture: its "
              "stencil tables are built on the host and copied to the GPU on a configuration's first call, which a "
              "capture cannot hold; call the op once with these sizes before capturing (a warm-up)");
  // Pinned host memory: the copy below is asynchronous (no host sync); the caching host allocator keeps the buffer
  // until the copy is done.
  const auto cpu = at::TensorOptions().device(at::kCPU).pinned_memory(true);
  at::Tensor idx = at::empty({2 * out + 2 * in}, cpu.dtype(at::kInt));
  at::Tensor weight = at::empty({2 * out}, cpu.dtype(c10::CppTypeToScalarType<opmath_t>::value));
  int32_t* i0 = idx.data_ptr<int32_t>();
  int32_t* i1 = i0 + out;
  int32_t* start = i1 + out;
  int32_t* end = start + in;
  opmath_t* l0 = weight.data_ptr<opmath_t>();
  opmath_t* l1 = l0 + out;
  upsample_ce::bilinear_axis_stencil(in, out, align_corners, /*cpu_rule=*/false, i0, i1, start, end, l0, l1);
  // Once per configuration (the tables are cached): afterwards a call does no host work and no host-to-device
  // copy, so it may be captured in a CUDA graph, and any stream may read the tables.
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  AxisStencil built{idx.to(device, idx.scalar_type(), /*non_blocking=*/true),
                    weight.to(device, weight.scalar_type(), /*non_blocking=*/true), nullptr, stream};
  cudaEvent_t ready = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
  built.ready.reset(ready, [](cudaEvent_t e) { cudaEventDestroy(e); });
  C10_CUDA_CHECK(cudaEventRecord(ready, stream));
  return built;
}

// Tables cached per (in, out, align_corners, opmath dtype, device); DeepLab training uses one or two
// configurations, an evaluation over images of many sizes a few per size. The cache itself is never destroyed (a
// static holding CUDA memory must not be freed after the CUDA context); past 1024 entries it starts afresh. The
// caching allocator reuses a freed table's memory on the stream it was allocated on only, so every use records the
// stream that reads it (free where it is the allocating stream): a table evicted while a kernel on another stream
// still reads it is not handed out before that kernel is done. A table read inside a CUDA-graph capture is also kept
// for good (`captured`): the graph keeps its address, and a replay after the table's eviction would read memory the
// allocator had handed to other tensors.
template <typename opmath_t>
AxisStencil axis_stencil(int64_t in, int64_t out, bool align_corners, const at::Device& device) {
  using Key = std::tuple<int64_t, int64_t, bool, int, int>;
  static auto* cache = new std::map<Key, AxisStencil>();
  static auto* captured = new std::map<const void*, AxisStencil>();
  static std::mutex mutex;
  const Key key{in, out, align_corners, static_cast<int>(c10::CppTypeToScalarType<opmath_t>::value),
                static_cast<int>(device.index())};
  // Called with `mutex` held.
  const auto used_on = [&device](AxisStencil s) {
    const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
    s.idx.record_stream(stream);
    s.weight.record_stream(stream);
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
    if (status != cudaStreamCaptureStatusNone) {
      captured->emplace(s.idx.data_ptr(), s);  // (torch.cuda.graph synchronizes the device before capturing)
    } else if (stream.stream() != s.stream) {
      // another stream waits for the copies (asynchronous, on the allocating stream)
      C10_CUDA_CHECK(cudaStreamWaitEvent(stream.stream(), s.ready.get(), 0));
    }
    return s;
  };
  {
    const std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache->find(key);
    if (it != cache->end()) return used_on(it->second);
  }
  AxisStencil built = build_axis_stencil<opmath_t>(in, out, align_corners, device);
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache->size() >= 1024) cache->clear();
  return used_on(cache->emplace(key, built).first->second);
}

// Products and sums rounded one by one (the _rn intrinsics are never contracted into an fma): the backward rebuilds
// each z and subtracts the forward's saved maximum, so both kernels must compute z bit for bit alike. nvcc
// contracts a * b + c by default, and may do so differently in two kernels; z a rounding above the maximum gave
// an infinite gradient at logits of 1e20 in the Triton kernels on an H200 (deeplab_ops/triton/upsample_ce.py).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

template <typename scalar_t, typename opmath_t>
__device__ __forceinline__ opmath_t interp(const scalar_t* __restrict__ plane, int o00, int o01, int o10, int o11,
                                           opmath_t ly0, opmath_t ly1, opmath_t lx0, opmath_t lx1) {
  // PyTorch's nesting of the products: rows outside, columns inside.
  const opmath_t top = add_rn(mul_rn(lx0, static_cast<opmath_t>(plane[o00])),
                              mul_rn(lx1, static_cast<opmath_t>(plane[o01])));
  const opmath_t bottom = add_rn(mul_rn(lx0, static_cast<opmath_t>(plane[o10])),
                                 mul_rn(lx1, static_cast<opmath_t>(plane[o11])));
  return add_rn(mul_rn(ly0, top), mul_rn(ly1, bottom));
}

template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kThreads)
    uce_forward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ target,
                       const int32_t* __restrict__ yidx, const opmath_t* __restrict__ yw,
                       const int32_t* __restrict__ xidx, const opmath_t* __restrict__ xw,
                       opmath_t* __restrict__ max_out, opmath_t* __restrict__ logs_out, scalar_t* __restrict__ loss_out,
                       opmath_t* __restrict__ psum, int32_t* __restrict__ pcnt, int P, int K, int h, int w, int H,
                       int W, int64_t ignore_index) {
  const int p = blockIdx.x * kThreads + threadIdx.x;
  opmath_t loss = 0;
  int valid = 0;
  if (p < P) {
    const int n = p / (H * W), oy = (p / W) % H, ox = p % W;
    const int y0 = yidx[oy], y1 = yidx[H + oy], x0 = xidx[ox], x1 = xidx[W + ox];
    const opmath_t ly0 = yw[oy], ly1 = yw[H + oy], lx0 = xw[ox], lx1 = xw[W + ox];
    const int o00 = y0 * w + x0, o01 = y0 * w + x1, o10 = y1 * w + x0, o11 = y1 * w + x1;
    const int hw = h * w;
    const scalar_t* xb = x + static_cast<int64_t>(n) * K * hw;
    const int64_t t = target[p];
    // One-pass logsumexp: one exp per class, rescaling the running sum when the maximum grows.
    opmath_t m = -std::numeric_limits<opmath_t>::infinity(), s = 0, zt = 0;
    for (int k = 0; k < K; ++k) {
      const opmath_t z = interp<scalar_t, opmath_t>(xb + k * hw, o00, o01, o10, o11, ly0, ly1, lx0, lx1);
      if (k == t) zt = z;
      if (z > m) {
        s = s * ::exp(m - z) + opmath_t(1);
        m = z;
      } else if (z != m || m != -std::numeric_limits<opmath_t>::infinity()) {
        s += ::exp(z - m);  // also propagates NaN logits into s
      }  // else -inf while every class so far is -inf: adds exp(-inf) = 0, where exp(z - m) would be NaN
    }
    const opmath_t log_s = ::log(s);
    max_out[p] = m;
    logs_out[p] = log_s;
    if (t != ignore_index) {
      valid = 1;
      // (m - zt) + log s: the rounding of m + log s (up to |m| * 2^-24 in float) never enters.
      loss = (t < 0 || t >= K) ? std::numeric_limits<opmath_t>::quiet_NaN() : (m - zt) + log_s;
    }
    if (loss_out != nullptr) loss_out[p] = static_cast<scalar_t>(loss);
  }
  if (psum == nullptr) return;
  // Block tree reduction with a fixed pairing: deterministic partials.
  __shared__ opmath_t ssum[kThreads];
  __shared__ int32_t scnt[kThreads];
  ssum[threadIdx.x] = loss;
  scnt[threadIdx.x] = valid;
  __syncthreads();
  for (int d = kThreads / 2; d > 0; d >>= 1) {
    if (threadIdx.x < d) {
      ssum[threadIdx.x] += ssum[threadIdx.x + d];
      scnt[threadIdx.x] += scnt[threadIdx.x + d];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    psum[blockIdx.x] = ssum[0];
    pcnt[blockIdx.x] = scnt[0];
  }
}

template <typename scalar_t, typename opmath_t>
__global__ void __launch_bounds__(kThreads)
    uce_backward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ target,
                        const opmath_t* __restrict__ max_in, const opmath_t* __restrict__ logs_in,
                        const opmath_t* __restrict__ grad, bool per_pixel,
                        const int32_t* __restrict__ yidx, const opmath_t* __restrict__ yw,
                        const int32_t* __restrict__ xidx, const opmath_t* __restrict__ xw,
                        scalar_t* __restrict__ dx, int total, int K, int h, int w, int H, int W,
                        int64_t ignore_index) {
  const int e = blockIdx.x * kThreads + threadIdx.x;
  if (e >= total) return;
  const int hw = h * w;
  const int j = e % w, i = (e / w) % h, k = (e / hw) % K, n = e / (hw * K);
  const int ys = yidx[2 * H + i], ye = yidx[2 * H + h + i];
  const int xs = xidx[2 * W + j], xe = xidx[2 * W + w + j];
  const scalar_t* plane = x + (static_cast<int64_t>(n) * K + k) * hw;
  const opmath_t g_all = per_pixel ? opmath_t(0) : grad[0];
  opmath_t acc = 0;
  for (int oy = ys; oy < ye; ++oy) {
    const int y0 = yidx[oy], y1 = yidx[H + oy];
    const opmath_t ly0 = yw[oy], ly1 = yw[H + oy];
    // Weight of low-res row i in output row oy: both terms when i0 == i1 == i (the last row).
    const opmath_t wy = (y0 == i ? ly0 : opmath_t(0)) + (y1 == i ? ly1 : opmath_t(0));
    const int row = (n * H + oy) * W;
    for (int ox = xs; ox < xe; ++ox) {
      const int x0 = xidx[ox], x1 = xidx[W + ox];
      const opmath_t lx0 = xw[ox], lx1 = xw[W + ox];
      const opmath_t wx = (x0 == j ? lx0 : opmath_t(0)) + (x1 == j ? lx1 : opmath_t(0));
      const int pix = row + ox;
      const int64_t t = target[pix];
      // Weight-0 neighbours and ignored pixels too (weight or g 0): a NaN z there (a non-finite logit) reaches
      // this logit as NaN, as eager's log_softmax and upsample backward carry it (0 * NaN).
      const bool ignored = t == ignore_index;
      opmath_t g = ignored ? opmath_t(0) : per_pixel ? grad[pix] : g_all;
      if (!ignored && (t < 0 || t >= K)) g = std::numeric_limits<opmath_t>::quiet_NaN();
      const opmath_t z = interp<scalar_t, opmath_t>(plane, y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1,
                                                    ly0, ly1, lx0, lx1);
      // (z - max) - log-sum: exact near the maximum (Sterbenz), as PyTorch's log_softmax.
      const opmath_t d = ::exp((z - max_in[pix]) - logs_in[pix]) - (t == k ? opmath_t(1) : opmath_t(0));
      acc += wy * wx * g * d;
    }
  }
  dx[e] = static_cast<scalar_t>(acc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_cross_entropy_forward_cuda(const at::Tensor& logits_,
                                                                                  const at::Tensor& target_,
                                                                                  int64_t ignore_index,
                                                                                  bool align_corners,
                                                                                  c10::string_view reduction_) {
  check_uce_args(logits_, target_);
  const Reduction reduction = parse_reduction(std::string(reduction_));
  const c10::cuda::CUDAGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor target = target_.contiguous();
  const int64_t n = logits.size(0), k = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  const auto opmath = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t P = n * H * W;
  const int64_t blocks = (P + kThreads - 1) / kThreads;
  const bool per_pixel = reduction == Reduction::kNone;
  // The logsumexp as its two parts (the op's contract, csrc/ops.cpp): lse[0] the maximum, lse[1] the log-sum.
  at::Tensor lse = at::empty({2, n, H, W}, logits.options().dtype(opmath));
  at::Tensor loss = per_pixel ? at::empty({n, H, W}, logits.options()) : at::Tensor();
  // Every block writes its own partials (no fill kernel needed).
  at::Tensor psum = at::empty({per_pixel ? 0 : blocks}, logits.options().dtype(opmath));
  at::Tensor pcnt = at::empty({per_pixel ? 0 : blocks}, logits.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "upsample_cross_entropy_forward_cuda",
                                  [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    if (P == 0) return;
    const AxisStencil ys = axis_stencil<opmath_t>(h, H, align_corners, logits.device());
    const AxisStencil xs = axis_stencil<opmath_t>(w, W, align_corners, logits.device());
    uce_forward_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), ys.idx.const_data_ptr<int32_t>(),
        ys.weight.const_data_ptr<opmath_t>(), xs.idx.const_data_ptr<int32_t>(), xs.weight.const_data_ptr<opmath_t>(),
        lse.data_ptr<opmath_t>(), lse.data_ptr<opmath_t>() + P, per_pixel ? loss.data_ptr<scalar_t>() : nullptr,
        per_pixel ? nullptr : psum.data_ptr<opmath_t>(), per_pixel ? nullptr : pcnt.data_ptr<int32_t>(),
        static_cast<int>(P), static_cast<int>(k), static_cast<int>(h), static_cast<int>(w), static_cast<int>(H),
        static_cast<int>(W), ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (per_pixel) {
    at::Tensor count = target.ne(ignore_index).sum().to(opmath);
    return {loss, lse, count};
  }
  // Partials merged in block order, in double: deterministic, and exact counts. The mean divides by the exact
  // int64 count (as the CPU kernel does), not by the opmath count, which float rounds above 2**24 pixels.
  const at::Tensor count_exact = pcnt.sum(at::kLong);
  at::Tensor count = count_exact.to(opmath);
  at::Tensor total = psum.sum(at::kDouble);
  at::Tensor value = reduction == Reduction::kMean ? total / count_exact.to(at::kDouble) : total;
  return {value.to(logits.scalar_type()), lse, count};
}

at::Tensor upsample_cross_entropy_backward_cuda(const at::Tensor& grad_, const at::Tensor& logits_,
                                                const at::Tensor& target_, const at::Tensor& lse_,
                                                const at::Tensor& valid_count, int64_t ignore_index,
                                                bool align_corners, c10::string_view reduction_) {
  check_uce_args(logits_, target_);
  const Reduction reduction = parse_reduction(std::string(reduction_));
  const c10::cuda::CUDAGuard guard(logits_.device());
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor target = target_.contiguous();
  const int64_t n = logits.size(0), k = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  upsample_ce::check_backward_shapes(grad_, target, lse_, reduction, std::string(reduction_));
  // The kernel reads lse, grad and (for "mean") valid_count through raw device pointers: a tensor on another
  // device (a CPU tensor from a direct torch.ops call) would be read as a device address (illegal memory access).
  TORCH_CHECK(lse_.device() == logits.device(), "deeplab_ops.upsample_cross_entropy: lse is on ", lse_.device(),
              " but logits is on ", logits.device());
  TORCH_CHECK(grad_.device() == logits.device(), "deeplab_ops.upsample_cross_entropy: grad is on ", grad_.device(),
              " but logits is on ", logits.device());
  const bool per_pixel = reduction == Reduction::kNone;
  if (reduction == Reduction::kMean) {
    // One value (an empty valid_count would broadcast grad to an empty tensor, whose grad[0] the kernel reads).
    TORCH_CHECK(valid_count.numel() == 1 && valid_count.device() == logits.device(),
                "deeplab_ops.upsample_cross_entropy: valid_count must be one value on ", logits.device(),
                " for reduction='mean', got shape ", valid_count.sizes(), " on ", valid_count.device());
  }
  const auto opmath = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor lse = lse_.to(opmath).contiguous();
  // dL/dloss per pixel ("none") or one value on the device (grad / count for "mean"): no host synchronization.
  at::Tensor grad = grad_.to(opmath).contiguous();
  if (reduction == Reduction::kMean) grad = grad.reshape({}) / valid_count.to(opmath);
  at::Tensor dx = at::empty_like(logits, at::MemoryFormat::Contiguous);
  const int64_t total = dx.numel();
  if (total == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "upsample_cross_entropy_backward_cuda",
                                  [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const AxisStencil ys = axis_stencil<opmath_t>(h, H, align_corners, logits.device());
    const AxisStencil xs = axis_stencil<opmath_t>(w, W, align_corners, logits.device());
    const int64_t blocks = (total + kThreads - 1) / kThreads;
    uce_backward_kernel<scalar_t, opmath_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), lse.const_data_ptr<opmath_t>(),
        lse.const_data_ptr<opmath_t>() + n * H * W, grad.const_data_ptr<opmath_t>(), per_pixel, ys.idx.const_data_ptr<int32_t>(),
        ys.weight.const_data_ptr<opmath_t>(), xs.idx.const_data_ptr<int32_t>(), xs.weight.const_data_ptr<opmath_t>(),
        dx.data_ptr<scalar_t>(), static_cast<int>(total), static_cast<int>(k), static_cast<int>(h),
        static_cast<int>(w), static_cast<int>(H), static_cast<int>(W), ignore_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CUDA, m) {
  m.impl("upsample_cross_entropy_forward", &upsample_cross_entropy_forward_cuda);
  m.impl("upsample_cross_entropy_backward", &upsample_cross_entropy_backward_cuda);
}

}  // namespace deeplab_ops
