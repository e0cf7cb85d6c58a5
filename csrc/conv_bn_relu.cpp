#include "conv_bn_relu.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include "common/checks.h"
#include "stage_calls.h"

namespace deeplab_ops {
namespace {

void check_conv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
                     const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, bool training) {
  DLO_CHECK_ACTIVATION(x);
  TORCH_CHECK(weight.dim() == 4, "deeplab_ops: weight must be 4-D (C_out, C_in, kH, kW), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "deeplab_ops: weight expects ", weight.size(1),
              " input channels (groups=1) but x has ", x.size(1));
  DLO_CHECK_SAME_DEVICE(weight, x);
  DLO_CHECK_SAME_DTYPE(weight, x);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "deeplab_ops: stride, padding and dilation must have two values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, "deeplab_ops: stride must be >= 1, got ", stride);
    TORCH_CHECK(dilation[i] >= 1, "deeplab_ops: dilation must be >= 1, got ", dilation);
    TORCH_CHECK(padding[i] >= 0, "deeplab_ops: padding must be >= 0, got ", padding);
  }
  const int64_t cout = weight.size(0);
  for (const auto* t : {&bn_weight, &bn_bias, &running_mean, &running_var}) {
    if (present(*t)) {
      DLO_CHECK_CHANNEL_VECTOR(**t, cout);
      DLO_CHECK_SAME_DEVICE(**t, x);
    }
  }
  TORCH_CHECK(present(running_mean) == present(running_var),
              "deeplab_ops: running_mean and running_var must be given together");
  TORCH_CHECK(training || present(running_mean), "deeplab_ops: eval mode (training=False) needs running_mean and running_var");
}

}  // namespace

void check_finalize_args(const at::Tensor& count, const at::Tensor& mean, const at::Tensor& m2,
                         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var) {
  TORCH_CHECK(mean.dim() == 2, "deeplab_ops: mean partials must be 2-D (P, C), got shape ", mean.sizes());
  DLO_CHECK_SAME_SHAPE(m2, mean);
  TORCH_CHECK(count.dim() == 1 && count.size(0) == mean.size(0), "deeplab_ops: count must have shape (",
              mean.size(0), ",), got ", count.sizes());
  DLO_CHECK_SAME_DEVICE(m2, mean);
  DLO_CHECK_SAME_DEVICE(count, mean);
  TORCH_CHECK(present(running_mean) == present(running_var),
              "deeplab_ops: running_mean and running_var must be given together");
  if (present(running_mean)) {
    DLO_CHECK_CHANNEL_VECTOR(*running_mean, mean.size(1));
    DLO_CHECK_CHANNEL_VECTOR(*running_var, mean.size(1));
    DLO_CHECK_SAME_DEVICE(*running_mean, mean);
    DLO_CHECK_SAME_DEVICE(*running_var, mean);
  }
}

void check_apply_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                      const at::Tensor& shift, const std::optional<at::Tensor>& residual) {
  DLO_CHECK_ACTIVATION(input);
  const int64_t c = input.size(1);
  DLO_CHECK_CHANNEL_VECTOR(mean, c);
  DLO_CHECK_CHANNEL_VECTOR(scale, c);
  DLO_CHECK_CHANNEL_VECTOR(shift, c);
  DLO_CHECK_SAME_DEVICE(mean, input);
  DLO_CHECK_SAME_DEVICE(scale, input);
  DLO_CHECK_SAME_DEVICE(shift, input);
  if (present(residual)) {
    DLO_CHECK_SAME_SHAPE(*residual, input);
    DLO_CHECK_SAME_DTYPE(*residual, input);
    DLO_CHECK_SAME_DEVICE(*residual, input);
  }
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& invstd) {
  DLO_CHECK_ACTIVATION(input);
  DLO_CHECK_SAME_SHAPE(grad_out, input);
  DLO_CHECK_SAME_SHAPE(output, input);
  DLO_CHECK_SAME_DTYPE(grad_out, input);
  DLO_CHECK_SAME_DTYPE(output, input);
  DLO_CHECK_SAME_DEVICE(grad_out, input);
  DLO_CHECK_SAME_DEVICE(output, input);
  DLO_CHECK_CHANNEL_VECTOR(mean, input.size(1));
  DLO_CHECK_CHANNEL_VECTOR(invstd, input.size(1));
  DLO_CHECK_SAME_DEVICE(mean, input);
  DLO_CHECK_SAME_DEVICE(invstd, input);
}

at::Tensor dy_coefficients(const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& sum_g, const std::optional<at::Tensor>& sum_g_xhat,
                           double count, bool training, int64_t channels, at::ScalarType dtype) {
  const at::Tensor mu = mean.to(dtype);
  const at::Tensor is = invstd.to(dtype);
  const at::Tensor k = present(weight) ? weight->to(dtype) * is : is;
  at::Tensor a, b;
  if (training) {
    TORCH_CHECK(present(sum_g) && present(sum_g_xhat),
                "deeplab_ops: bn_backward_dy in training mode needs sum_g and sum_g_xhat");
    DLO_CHECK_CHANNEL_VECTOR(*sum_g, channels);
    DLO_CHECK_CHANNEL_VECTOR(*sum_g_xhat, channels);
    TORCH_CHECK(count > 0, "deeplab_ops: count must be > 0, got ", count);
    a = sum_g->to(dtype) / count;
    b = is * sum_g_xhat->to(dtype) / count;
  } else {
    a = at::zeros_like(mu);
    b = at::zeros_like(mu);
  }
  return at::stack({mu, k, a, b}).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool training, double momentum, double eps, const std::optional<at::Tensor>& residual,
    bool relu) {
  check_conv_args(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training);
  const auto mf = x.suggest_memory_format();
  const at::Tensor y =
      at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1).contiguous(mf);
  const int64_t count = y.size(0) * y.size(2) * y.size(3);
  TORCH_CHECK(count > 0, "deeplab_ops: the convolution output is empty, shape ", y.sizes());
  const auto stat = opmath_dtype(x.scalar_type());
  at::Tensor mean, invstd;
  // Empty unless training updates running statistics (distinct tensors: outputs must not alias).
  const auto running_dtype = present(running_mean) ? running_mean->scalar_type() : stat;
  at::Tensor new_rm = at::empty({0}, x.options().dtype(running_dtype));
  at::Tensor new_rv = at::empty({0}, x.options().dtype(running_dtype));
  if (training) {
    TORCH_CHECK(count > 1, "deeplab_ops: training BatchNorm needs more than 1 value per channel, got output shape ",
                y.sizes());
    auto [m, m2] = call_bn_stats(y);
    const at::Tensor n = at::full({1}, static_cast<double>(count), m.options());
    std::optional<at::Tensor> rm, rv;
    if (present(running_mean)) {
      new_rm = running_mean->clone();
      new_rv = running_var->clone();
      rm = new_rm;
      rv = new_rv;
    }
    std::tie(mean, invstd) = call_bn_finalize(n, m.unsqueeze(0), m2.unsqueeze(0), rm, rv, momentum, eps);
  } else {
    // Copies: the returned statistics must not alias the running buffers.
    mean = running_mean->to(stat, /*non_blocking=*/false, /*copy=*/true);
    invstd = (running_var->to(stat) + eps).rsqrt();
  }
  const at::Tensor scale = present(bn_weight) ? bn_weight->to(stat) * invstd : invstd.clone();
  const at::Tensor shift = present(bn_bias) ? bn_bias->to(stat, false, true) : at::zeros_like(invstd);
  at::Tensor out = call_bn_apply(y, mean, scale, shift, residual, relu);
  return {out, y, mean, invstd, new_rm, new_rv};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const at::Tensor& grad_out_, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& conv_out, const at::Tensor& out,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool training, bool relu, std::array<bool, 5> output_mask) {
  check_backward_args(grad_out_, out, conv_out, save_mean, save_invstd);
  const auto mf = conv_out.suggest_memory_format();
  const at::Tensor grad_out = grad_out_.contiguous(mf);
  const bool need_dy = output_mask[0] || output_mask[1];
  at::Tensor sum_g, sum_gx;
  if ((training && need_dy) || output_mask[2] || output_mask[3]) {
    std::tie(sum_g, sum_gx) = call_bn_backward_reduce(grad_out, out, conv_out, save_mean, save_invstd, relu);
  }
  at::Tensor grad_x, grad_w;
  if (need_dy) {
    const double count = static_cast<double>(conv_out.size(0) * conv_out.size(2) * conv_out.size(3));
    const at::Tensor dy = call_bn_backward_dy(grad_out, out, conv_out, save_mean, save_invstd, bn_weight,
                                              training ? std::optional<at::Tensor>(sum_g) : std::nullopt,
                                              training ? std::optional<at::Tensor>(sum_gx) : std::nullopt, count,
                                              relu, training);
    auto grads = at::convolution_backward(dy, x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
                                          {output_mask[0], output_mask[1], false});
    // The gradients keep their tensor's memory format (cuDNN/oneDNN may return weight grads in x's).
    if (output_mask[0]) grad_x = std::get<0>(grads).contiguous(x.suggest_memory_format());
    if (output_mask[1]) grad_w = std::get<1>(grads).contiguous(weight.suggest_memory_format());
  }
  at::Tensor grad_res;
  if (output_mask[4]) {
    grad_res = relu ? at::threshold_backward(grad_out, out, 0) : grad_out.clone();
  }
  return {grad_x, grad_w, output_mask[2] ? sum_gx : at::Tensor(), output_mask[3] ? sum_g : at::Tensor(), grad_res};
}

}  // namespace deeplab_ops
