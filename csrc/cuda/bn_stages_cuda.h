// The CUDA kernels of the BatchNorm stage ops (schemas in csrc/ops.cpp), registered in bn_stages_cuda.cpp:
// reductions in bn_reductions.cu, finalize in bn_finalize.cu, element-wise passes in bn_elementwise.cu.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace deeplab_ops {

std::tuple<at::Tensor, at::Tensor> bn_stats_cuda(const at::Tensor& input);

void bn_finalize_cuda(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
                      const std::optional<at::Tensor>& counts, double count,
                      const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                      double momentum, double eps, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                      const at::Tensor& new_running_mean, const at::Tensor& new_running_var);

at::Tensor bn_apply_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                         const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& residual, bool relu);

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& output,
                                                           const at::Tensor& input, const at::Tensor& mean,
                                                           const at::Tensor& invstd, bool relu);

at::Tensor bn_backward_dy_cuda(const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sum_g,
                               const std::optional<at::Tensor>& sum_g_xhat, double count, bool relu, bool training);

}  // namespace deeplab_ops
