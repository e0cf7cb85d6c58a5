#include "bn_stage_args.h"

#include "common/checks.h"

namespace deeplab_ops {

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

}  // namespace deeplab_ops
