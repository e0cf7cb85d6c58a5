// Argument checks and per-channel coefficients shared by the CPU and CUDA BatchNorm stage kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace deeplab_ops {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

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
