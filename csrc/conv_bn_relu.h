// The composite fused conv + BN (+ residual) + ReLU used by the cpu and cuda backends: ATen's
// convolution (oneDNN / cuDNN) plus the BN stage ops, called through the dispatcher so that each
// device's stage kernels run. Registered for CPU in csrc/cpu/ and for CUDA in csrc/cuda/.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace deeplab_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool training, double momentum, double eps, const std::optional<at::Tensor>& residual,
    bool relu);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& conv_out, const at::Tensor& out,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool training, bool relu, std::array<bool, 5> output_mask);

// Argument checks shared by the CPU and CUDA stage kernels.
void check_finalize_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var);
void check_apply_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                      const at::Tensor& shift, const std::optional<at::Tensor>& residual);
void check_backward_args(const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& invstd);

// Per-channel coefficients of the BN input gradient as a contiguous (4, C) tensor of `dtype`:
// rows (mean, k, a, b) with dy = k * (g - a - (y - mean) * b), see common/bn_math.h.
at::Tensor dy_coefficients(const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& sum_g, const std::optional<at::Tensor>& sum_g_xhat,
                           double count, bool training, int64_t channels, at::ScalarType dtype);

}  // namespace deeplab_ops
