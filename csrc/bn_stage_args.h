// Argument checks shared by the CPU and CUDA kernels: the BatchNorm stage ops', the BatchNorm hyper-parameters and
// dtypes, and the fused convolution's geometry, residual and output (the per-tensor building blocks are in
// common/arg_checks.h).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace deeplab_ops {

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// While one is alive on a thread, the BN stage ops called there skip their argument checks (check_*_args below): a
// composite op holds one around the stage calls whose arguments it checked itself, under its own arguments' names,
// or made (the conv_bn_relu forward, eval and backward): the stages' checks would be the same work again on every
// call. Stage ops called by anything else (torch.ops.deeplab_ops.bn_*, the Python stages) check as always.
class StageArgsChecked {
 public:
  StageArgsChecked() : previous_(active_) { active_ = true; }
  ~StageArgsChecked() { active_ = previous_; }
  StageArgsChecked(const StageArgsChecked&) = delete;
  StageArgsChecked& operator=(const StageArgsChecked&) = delete;
  static bool active() { return active_; }

 private:
  bool previous_;
  static inline thread_local bool active_ = false;
};

// bn_stats' input: a 4-D activation of a floating dtype.
void check_stats_args(const at::Tensor& input);
// The other stages' arguments, each message naming the argument as the op's schema does. Arguments that must agree
// (the activations' shapes and dtypes, the per-channel tensors' length) are checked against what most of them have,
// so that the one that differs is named (common/arg_checks.h).
void check_finalize_args(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
                         const std::optional<at::Tensor>& counts, double count,
                         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                         const at::Tensor& save_mean, const at::Tensor& save_invstd,
                         const at::Tensor& new_running_mean, const at::Tensor& new_running_var, double momentum,
                         double eps);
void check_apply_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual);
void check_backward_args(const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& invstd);
void check_dy_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& sum_g, const std::optional<at::Tensor>& sum_g_xhat, double count,
                   bool training);

// BatchNorm's momentum in [0, 1] and eps finite and > 0 (NaN refused): the front door's rule (deeplab_ops/ops/), checked
// again for direct torch.ops calls by every op that takes them (the composites' forwards, bn_finalize).
void check_bn_hyper(double momentum, double eps);

// A BatchNorm tensor's dtype (bn_weight, bn_bias, the running or saved statistics): x's, or float32 when x is
// float16/bfloat16, the front door's rule; with `shared` given, also that dtype (the BatchNorm tensors of one call
// share one). Returns the tensor's dtype.
at::ScalarType check_bn_dtype(const at::Tensor& t, const char* name, at::ScalarType x_dtype,
                              std::optional<at::ScalarType> shared = std::nullopt);

// The convolution arguments every conv composite takes: x 4-D, weight (C_out, x's C_in, kH, kW) on x's device and
// dtype (groups = 1), stride/padding/dilation of two values with stride, dilation >= 1 and padding >= 0.
void check_conv_geometry_args(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation);

// A composite's residual: the convolution output's shape (N, C_out, H_out, W_out) of x, weight, stride, padding and
// dilation (checked by check_conv_geometry_args first), x's dtype and device.
void check_conv_residual(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// The convolution output a backward receives (conv_out) has the shape the geometry gives: (N, C_out, H_out, W_out)
// of x, weight, stride, padding and dilation (checked by check_conv_geometry_args first).
void check_conv_output(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, const at::Tensor& conv_out);

}  // namespace deeplab_ops
