// The composite fused ASPP used by the cpu and cuda backends: ATen convolutions (oneDNN / cuDNN) plus the
// BN stage ops. All conv branches' BatchNorms run as one (N, B*C, H, W) pass; the pooling branch enters the
// projection as a per-(image, channel) bias; normalized branch outputs are recomputed in backward, not saved.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace deeplab_ops {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aspp_forward(const at::Tensor& x, at::TensorList conv_weights, const at::Tensor& pool_weight,
             const at::Tensor& project_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
             const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
             at::IntArrayRef rates, bool training, double momentum, double eps);

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aspp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList conv_weights, const at::Tensor& pool_weight,
    const at::Tensor& project_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& branch_out, const at::Tensor& pool_out, const at::Tensor& project_out, const at::Tensor& out,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, at::IntArrayRef rates, bool training,
    std::array<bool, 3> output_mask);

}  // namespace deeplab_ops
