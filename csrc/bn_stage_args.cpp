#include "bn_stage_args.h"

#include "common/arg_checks.h"

#include <ATen/native/ConvUtils.h>

#include <cmath>
#include <utility>
#include <vector>

namespace deeplab_ops {
namespace {

bool is_opmath_float(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

}  // namespace

void check_bn_hyper(double momentum, double eps) {
  // Comparisons that NaN fails.
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "deeplab_ops: momentum must be a number in [0, 1], got ", momentum);
  TORCH_CHECK(eps > 0.0 && std::isfinite(eps), "deeplab_ops: eps must be a finite number > 0, got ", eps);
}

at::ScalarType check_bn_dtype(const at::Tensor& t, const char* name, at::ScalarType x_dtype,
                              std::optional<at::ScalarType> shared) {
  const at::ScalarType d = t.scalar_type();
  const bool half = x_dtype == at::kHalf || x_dtype == at::kBFloat16;
  TORCH_CHECK(d == x_dtype || (half && d == at::kFloat), "deeplab_ops: ", name, " has dtype ", d, " but x has dtype ",
              x_dtype, "; expected ", x_dtype, half ? " or Float" : "");
  TORCH_CHECK(!shared.has_value() || d == *shared, "deeplab_ops: ", name, " has dtype ", d,
              " but the other BatchNorm tensors have ", shared.value_or(d));
  return d;
}

void check_stats_args(const at::Tensor& input) {
  if (StageArgsChecked::active()) return;  // checked by the composite calling the stage
  DLO_CHECK_ACTIVATION(input);
  DLO_CHECK_FLOATING(input);
}

void check_finalize_args(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
                         const std::optional<at::Tensor>& counts, double count,
                         const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                         const at::Tensor& save_mean, const at::Tensor& save_invstd,
                         const at::Tensor& new_running_mean, const at::Tensor& new_running_var,
                         double momentum, double eps) {
  if (StageArgsChecked::active()) return;  // checked by the composite calling the stage
  check_bn_hyper(momentum, eps);
  TORCH_CHECK(present(running_mean) == present(running_var),
              "deeplab_ops: running_mean and running_var must be given together; only ",
              present(running_mean) ? "running_mean" : "running_var", " was given");
  TORCH_CHECK(present(mean) == present(m2), "deeplab_ops: mean and m2 must be given together (training) or both "
              "be None (eval); only ", present(mean) ? "mean" : "m2", " was given");
  if (!present(mean)) {
    TORCH_CHECK(present(running_mean), "deeplab_ops: bn_finalize in eval (mean and m2 None) needs running_mean and "
                "running_var");
  }
  const bool training = present(mean);
  const bool update = training && present(running_mean);
  // The channel count C: the one most of the per-channel tensors have (the statistics' last dimension), so that the
  // one tensor of another length is the one named.
  // (a tensor of another rank counts for none; nor do the new running statistics, which are empty unless updated)
  c10::SmallVector<int64_t, 8> lengths;  // (no heap allocation on the per-call path)
  const auto vote = [&lengths](const at::Tensor& t, bool rows_allowed) {
    if (t.dim() == 1 || (rows_allowed && t.dim() == 2)) lengths.push_back(t.size(-1));
  };
  vote(save_mean, false);
  vote(save_invstd, false);
  if (training) {
    vote(*mean, true);
    vote(*m2, true);
  }
  if (present(running_mean)) {
    vote(*running_mean, false);
    vote(*running_var, false);
  }
  if (update) {
    vote(new_running_mean, false);
    vote(new_running_var, false);
  }
  const int64_t c = lengths.empty() ? (save_mean.dim() > 0 ? save_mean.size(-1) : 0)
                                    : lengths[majority_index(lengths.data(), lengths.size())];
  DLO_CHECK_CHANNEL_VECTOR(save_mean, c);
  DLO_CHECK_CHANNEL_VECTOR(save_invstd, c);
  if (present(running_mean)) {
    DLO_CHECK_CHANNEL_VECTOR(*running_mean, c);
    DLO_CHECK_CHANNEL_VECTOR(*running_var, c);
  }
  if (training) {
    TORCH_CHECK((mean->dim() == 1 || mean->dim() == 2) && mean->size(-1) == c, "deeplab_ops: mean must have shape (",
                c, ",) or (P, ", c, "), got ", mean->sizes());
    check_same_shapes({named(*mean, "mean"), named(*m2, "m2")});
  }
  if (update) {
    DLO_CHECK_CHANNEL_VECTOR(new_running_mean, c);
    DLO_CHECK_CHANNEL_VECTOR(new_running_var, c);
  }
  // The statistics in one dtype, float32 or float64 (the opmath dtype), and the running ones in one floating dtype.
  const bool parted = training && mean->dim() == 2;
  TORCH_CHECK(is_opmath_float(save_mean.scalar_type()), "deeplab_ops: save_mean must be float32 or float64, got ",
              save_mean.scalar_type());
  TORCH_CHECK(is_opmath_float(save_invstd.scalar_type()), "deeplab_ops: save_invstd must be float32 or float64, got ",
              save_invstd.scalar_type());
  check_same_dtypes({named(save_mean, "save_mean"), named(save_invstd, "save_invstd"),
                     named(training ? mean : std::nullopt, "mean"), named(training ? m2 : std::nullopt, "m2"),
                     named(parted ? counts : std::nullopt, "counts")});
  if (present(running_mean)) {
    DLO_CHECK_FLOATING(*running_mean);
    DLO_CHECK_FLOATING(*running_var);
    check_same_dtypes({named(running_mean, "running_mean"), named(running_var, "running_var"),
                       named(update ? std::optional<at::Tensor>(new_running_mean) : std::nullopt, "new_running_mean"),
                       named(update ? std::optional<at::Tensor>(new_running_var) : std::nullopt, "new_running_var")});
    DLO_CHECK_SAME_DEVICE(*running_mean, save_mean);
    DLO_CHECK_SAME_DEVICE(*running_var, save_mean);
  }
  DLO_CHECK_SAME_DEVICE(save_invstd, save_mean);
  if (!training) return;
  DLO_CHECK_SAME_DEVICE(*mean, save_mean);
  DLO_CHECK_SAME_DEVICE(*m2, save_mean);
  if (mean->dim() == 1) {
    TORCH_CHECK(!present(counts), "deeplab_ops: counts must be None for (C,) statistics (their count is `count`), "
                "got shape ", counts->sizes());
    TORCH_CHECK(count > 0, "deeplab_ops: count must be > 0 for (C,) statistics, got ", count);
  } else {
    // (no partials: the CUDA kernel reads an empty tensor's null pointer as eval mode)
    TORCH_CHECK(mean->size(0) > 0, "deeplab_ops: (P, C) partials need at least one row (P >= 1), got shape ",
                mean->sizes());
    TORCH_CHECK(present(counts) && counts->dim() == 1 && counts->size(0) == mean->size(0),
                "deeplab_ops: (P, C) partials need counts of shape (", mean->size(0), ",), got ",
                present(counts) ? counts->sizes() : at::IntArrayRef{});
    DLO_CHECK_SAME_DEVICE(*counts, save_mean);
  }
  if (update) {
    DLO_CHECK_SAME_DEVICE(new_running_mean, save_mean);
    DLO_CHECK_SAME_DEVICE(new_running_var, save_mean);
  }
}

void check_apply_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const std::optional<at::Tensor>& residual) {
  if (StageArgsChecked::active()) return;  // checked by the composite calling the stage
  DLO_CHECK_ACTIVATION(input);
  DLO_CHECK_FLOATING(input);
  check_channels(named(input, "input"), {named(mean, "mean"), named(invstd, "invstd"), named(weight, "weight"),
                                         named(bias, "bias")});
  DLO_CHECK_SAME_DEVICE(mean, input);
  DLO_CHECK_SAME_DEVICE(invstd, input);
  const std::pair<const std::optional<at::Tensor>*, const char*> vectors[] = {{&weight, "weight"}, {&bias, "bias"}};
  for (const auto& [t, name] : vectors) {
    if (present(*t)) check_same_device(**t, name, input, "input");
  }
  if (present(residual)) {
    DLO_CHECK_SAME_SHAPE(*residual, input);
    DLO_CHECK_SAME_DTYPE(*residual, input);
    DLO_CHECK_SAME_DEVICE(*residual, input);
  }
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
                         const at::Tensor& mean, const at::Tensor& invstd) {
  if (StageArgsChecked::active()) return;  // checked by the composite calling the stage
  // The three activations agree with each other (the one that differs from the other two is named), then with the
  // per-channel statistics.
  check_same_shapes({named(input, "input"), named(grad_out, "grad_out"), named(output, "output")});
  DLO_CHECK_ACTIVATION(input);
  check_same_dtypes({named(input, "input"), named(grad_out, "grad_out"), named(output, "output")});
  DLO_CHECK_FLOATING(input);
  DLO_CHECK_SAME_DEVICE(grad_out, input);
  DLO_CHECK_SAME_DEVICE(output, input);
  check_channels(named(input, "input"), {named(mean, "mean"), named(invstd, "invstd")});
  DLO_CHECK_SAME_DEVICE(mean, input);
  DLO_CHECK_SAME_DEVICE(invstd, input);
}

void check_dy_args(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                   const std::optional<at::Tensor>& sum_g, const std::optional<at::Tensor>& sum_g_xhat, double count,
                   bool training) {
  if (StageArgsChecked::active()) return;  // checked by the composite calling the stage
  if (training) {
    TORCH_CHECK(present(sum_g) && present(sum_g_xhat),
                "deeplab_ops: bn_backward_dy in training mode needs sum_g and sum_g_xhat; got ",
                present(sum_g) ? "sum_g_xhat=None" : (present(sum_g_xhat) ? "sum_g=None" : "both None"));
  }
  check_channels(named(input, "input"), {named(weight, "weight"), named(training ? sum_g : std::nullopt, "sum_g"),
                                         named(training ? sum_g_xhat : std::nullopt, "sum_g_xhat")});
  if (present(weight)) DLO_CHECK_SAME_DEVICE(*weight, input);
  if (!training) return;
  DLO_CHECK_SAME_DEVICE(*sum_g, input);
  DLO_CHECK_SAME_DEVICE(*sum_g_xhat, input);
  TORCH_CHECK(count > 0, "deeplab_ops: count must be > 0, got ", count);
}

void check_conv_geometry_args(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  DLO_CHECK_ACTIVATION(x);
  DLO_CHECK_FLOATING(x);
  TORCH_CHECK(weight.dim() == 4, "deeplab_ops: weight must be 4-D (C_out, C_in, kH, kW), got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1), "deeplab_ops: weight expects ", weight.size(1),
              " input channels (groups=1) but x has ", x.size(1));
  DLO_CHECK_SAME_DEVICE(weight, x);
  DLO_CHECK_SAME_DTYPE(weight, x);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "deeplab_ops: stride, padding and dilation must have two values each, got stride=", stride,
              ", padding=", padding, ", dilation=", dilation);
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, "deeplab_ops: stride must be >= 1, got ", stride);
    TORCH_CHECK(dilation[i] >= 1, "deeplab_ops: dilation must be >= 1, got ", dilation);
    TORCH_CHECK(padding[i] >= 0, "deeplab_ops: padding must be >= 0, got ", padding);
  }
  for (int i = 0; i < 2; ++i) {  // the padded input must hold one (dilated) kernel window per axis
    TORCH_CHECK(x.size(2 + i) + 2 * padding[i] >= dilation[i] * (weight.size(2 + i) - 1) + 1,
                "deeplab_ops: the convolution output would be empty: input spatial size ", x.sizes().slice(2),
                " with padding ", padding, " is smaller than the dilated kernel (", weight.sizes().slice(2),
                " at dilation ", dilation, ")");
  }
}

void check_conv_residual(const at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto out = at::native::conv_output_size(x.sizes(), weight.sizes(), padding, stride, dilation);
  TORCH_CHECK(residual.sizes() == at::IntArrayRef(out), "deeplab_ops: residual must have shape ", at::IntArrayRef(out),
              " (the convolution output's), got ", residual.sizes());
  DLO_CHECK_SAME_DTYPE(residual, x);
  DLO_CHECK_SAME_DEVICE(residual, x);
}

void check_conv_output(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, const at::Tensor& conv_out) {
  TORCH_CHECK(conv_out.defined(), "deeplab_ops: conv_out must be a tensor (the forward's convolution output)");
  std::vector<int64_t> expected{x.size(0), weight.size(0), 0, 0};
  for (int i = 0; i < 2; ++i) {
    expected[2 + i] = (x.size(2 + i) + 2 * padding[i] - dilation[i] * (weight.size(2 + i) - 1) - 1) / stride[i] + 1;
  }
  TORCH_CHECK(conv_out.sizes() == at::IntArrayRef(expected), "deeplab_ops: conv_out must have shape ",
              at::IntArrayRef(expected), " (x ", x.sizes(), " convolved with weight ", weight.sizes(), " at stride ",
              stride, ", padding ", padding, ", dilation ", dilation, "), got ", conv_out.sizes());
}

}  // namespace deeplab_ops
