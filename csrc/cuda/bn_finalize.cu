// CUDA finalize of the BatchNorm stages: merge per-part (count, mean, M2) partials, write the normalizing
// statistics and the updated running statistics into the caller's buffers (or, in eval, the running statistics'
// mean and invstd). One thread per channel, in double, exactly as the CPU kernel.
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

// ---- finalize: one thread per channel, in double, exactly as bn_finalize_cpu ---------------------------

// mean/m2 (parts, C) at strides (ps, cs) in op_t, counts (parts,) at stride ns (nullptr: every part holds
// `count` values); running statistics in run_t (nullptr: none).
template <typename op_t, typename run_t>
__global__ void __launch_bounds__(kThreads)
    bn_finalize_kernel(const op_t* __restrict__ mean, const op_t* __restrict__ m2, int64_t ps, int64_t cs,
                       const op_t* __restrict__ counts, int64_t ns, double count, int64_t parts, int64_t channels,
                       const run_t* __restrict__ running_mean, const run_t* __restrict__ running_var, double momentum,
                       double eps, op_t* __restrict__ save_mean, op_t* __restrict__ save_invstd,
                       run_t* __restrict__ new_running_mean, run_t* __restrict__ new_running_var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  if (mean == nullptr) {  // eval: the running statistics normalize
    save_mean[c] = static_cast<op_t>(static_cast<double>(running_mean[c]));
    save_invstd[c] = static_cast<op_t>(1.0 / ::sqrt(static_cast<double>(running_var[c]) + eps));
    return;
  }
  Welford<double> w = welford_empty<double>();
  for (int64_t p = 0; p < parts; ++p) {
    const double n = counts != nullptr ? static_cast<double>(counts[p * ns]) : count;
    w = welford_merge(w, Welford<double>{n, static_cast<double>(mean[p * ps + c * cs]),
                                         static_cast<double>(m2[p * ps + c * cs])});
  }
  const bool update = running_mean != nullptr;
  const Finalized<double> f = bn_finalize_channel<double>(
      w, update ? static_cast<double>(running_mean[c]) : 0.0, update ? static_cast<double>(running_var[c]) : 0.0,
      momentum, eps);
  save_mean[c] = static_cast<op_t>(f.mean);
  save_invstd[c] = static_cast<op_t>(f.invstd);
  if (update) {
    new_running_mean[c] = static_cast<run_t>(f.running_mean);
    new_running_var[c] = static_cast<run_t>(f.running_var);
  }
}

}  // namespace

void bn_finalize_cuda(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
                      const std::optional<at::Tensor>& counts, double count,
                      const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                      double momentum, double eps, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                      const at::Tensor& new_running_mean, const at::Tensor& new_running_var) {
  check_finalize_args(mean, m2, counts, count, running_mean, running_var, save_mean, save_invstd, new_running_mean,
                      new_running_var, momentum, eps);
  TORCH_CHECK(save_mean.is_cuda(), "deeplab_ops: bn_finalize on CUDA needs save_mean on a CUDA device, got ",
              save_mean.device());
  const c10::cuda::CUDAGuard device_guard(save_mean.device());
  const int64_t channels = save_mean.size(0);
  if (channels == 0) return;
  const bool training = present(mean);
  const bool update = training && present(running_mean);
  // The outputs are written through plain indexing: make them contiguous first (they are the composites' fresh
  // buffers or slices of them, so this is a no-op there).
  TORCH_CHECK(save_mean.is_contiguous() && save_invstd.is_contiguous(),
              "deeplab_ops: save_mean and save_invstd must be contiguous");
  if (update) {
    TORCH_CHECK(new_running_mean.is_contiguous() && new_running_var.is_contiguous(),
                "deeplab_ops: new_running_mean and new_running_var must be contiguous");
  }
  const bool parted = training && mean->dim() == 2;
  const int64_t parts = training ? (parted ? mean->size(0) : 1) : 0;
  const int64_t ps = parted ? mean->stride(0) : 0, cs = training ? mean->stride(parted ? 1 : 0) : 0;
  TORCH_CHECK(!training || (m2->strides() == mean->strides()),
              "deeplab_ops: mean and m2 must have the same strides, got ", mean->strides(), " and ", m2->strides());
  const at::Tensor rm = present(running_mean) ? running_mean->contiguous() : at::Tensor();
  const at::Tensor rv = present(running_var) ? running_var->contiguous() : at::Tensor();
  const auto run_dtype = present(running_mean) ? running_mean->scalar_type() : save_mean.scalar_type();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(save_mean.scalar_type(), "bn_finalize_cuda", [&] {
    using op_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_dtype, "bn_finalize_cuda_running", [&] {
      using run_t = scalar_t;
      const bool has_running = rm.defined();
      bn_finalize_kernel<op_t, run_t><<<static_cast<unsigned>(ceil_div(channels, kThreads)), kThreads, 0, stream>>>(
          training ? mean->const_data_ptr<op_t>() : nullptr, training ? m2->const_data_ptr<op_t>() : nullptr, ps, cs,
          parted ? counts->const_data_ptr<op_t>() : nullptr, parted ? counts->stride(0) : 0, count, parts, channels,
          has_running && (update || !training) ? rm.const_data_ptr<run_t>() : nullptr,
          has_running && (update || !training) ? rv.const_data_ptr<run_t>() : nullptr, momentum, eps,
          save_mean.data_ptr<op_t>(), save_invstd.data_ptr<op_t>(),
          update ? new_running_mean.data_ptr<run_t>() : nullptr, update ? new_running_var.data_ptr<run_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace deeplab_ops
