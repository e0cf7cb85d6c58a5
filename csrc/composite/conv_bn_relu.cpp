// The composite fused conv + BN (+ residual) + ReLU of the cpu and cuda backends: ATen's convolution (oneDNN /
// cuDNN) plus the BN stage ops, called through the dispatcher so that each device's stage kernels run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <utility>

#include "common/activation_layout.h"
#include "common/arg_checks.h"
#include "composite/batch_stats.h"
#include "composite/conv_calls.h"
#include "composite/group_collectives.h"
#include "composite/stage_calls.h"

namespace deeplab_ops {
namespace {

void check_conv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
                     const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
                     const std::optional<at::Tensor>& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation, bool training, double momentum, double eps) {
  check_conv_geometry_args(x, weight, stride, padding, dilation);
  check_bn_hyper(momentum, eps);
  const int64_t cout = weight.size(0);
  const std::pair<const std::optional<at::Tensor>*, const char*> vectors[] = {
      {&bn_weight, "bn_weight"}, {&bn_bias, "bn_bias"}, {&running_mean, "running_mean"}, {&running_var, "running_var"}};
  std::optional<at::ScalarType> bn_dtype;  // the BatchNorm tensors share one dtype: x's, or float32 for half x
  for (const auto& [t, name] : vectors) {
    if (present(*t)) {
      check_channel_vector(**t, name, cout);
      check_same_device(**t, name, x, "x");
      bn_dtype = check_bn_dtype(**t, name, x.scalar_type(), bn_dtype);
    }
  }
  TORCH_CHECK(present(running_mean) == present(running_var),
              "deeplab_ops: running_mean and running_var must be given together; only ",
              present(running_mean) ? "running_mean" : "running_var", " was given");
  TORCH_CHECK(training || present(running_mean),
              "deeplab_ops: eval mode (training=False) needs running_mean and running_var");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_forward(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool training, double momentum, double eps, const std::optional<at::Tensor>& residual,
    bool relu, std::optional<c10::string_view> group_name, bool /*memory_efficient: read by the autograd node*/) {
  check_conv_args(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, training,
                  momentum, eps);
  // Here, not by bn_apply, which would compare it with the convolution output it names `input`.
  if (present(residual)) check_conv_residual(*residual, x, weight, stride, padding, dilation);
  const auto mf = x.suggest_memory_format();
  // ATen's convolution: this op runs in training and for eval with a gradient (no-gradient eval folds BatchNorm
  // into conv_bias_act); conv_bias_act's plain form, the memory-efficient recompute, runs the same.
  const at::Tensor y = conv2d_forward(x, weight, stride, padding, dilation, mf, /*inference=*/false);
  const int64_t count = y.size(0) * y.size(2) * y.size(3);
  // With a group, a process may hold an empty batch or one value per channel (nn.SyncBatchNorm allows both): it
  // takes part in the statistics' collectives with what it has.
  const auto group = bn_group(group_name, training);
  TORCH_CHECK(count > 0 || group, "deeplab_ops: the convolution output is empty, shape ", y.sizes());
  // The outputs are allocated once here and the stages write them: no per-call copies or conversions.
  const auto opts = x.options().dtype(opmath_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({y.size(1)}, opts), invstd = at::empty({y.size(1)}, opts);
  // Running statistics updated out of place (the op is functional); empty unless training updates them.
  const bool update = training && present(running_mean);
  const auto running_opts = present(running_mean) ? running_mean->options() : opts;
  at::Tensor new_rm = at::empty({update ? y.size(1) : 0}, running_opts);
  at::Tensor new_rv = at::empty({update ? y.size(1) : 0}, running_opts);
  if (training) {
    TORCH_CHECK(count > 1 || group,
                "deeplab_ops: training BatchNorm needs more than 1 value per channel, got output shape ", y.sizes());
    // (its stages check their arguments: with a group, the statistics' collectives run in between)
    training_stats({{y, static_cast<double>(count), running_mean, running_var, mean, invstd, new_rm, new_rv}}, group,
                   momentum, eps);
  }
  // Every stage argument below is checked above or made here: the stages skip their checks.
  const StageArgsChecked checked;
  if (!training) {
    call_bn_finalize(std::nullopt, std::nullopt, std::nullopt, 0.0, running_mean, running_var, momentum, eps, mean,
                     invstd, new_rm, new_rv);
  }
  at::Tensor out = call_bn_apply(y, mean, invstd, bn_weight, bn_bias, residual, relu);
  return {out, y, mean, invstd, new_rm, new_rv};
}

// Eval with nothing to differentiate, where BatchNorm is not folded into the weight (float16/bfloat16: the folded
// weight would round every product once more than eager's conv -> BatchNorm): the forward's `out` in eval, with no
// conv_out, statistics or running-statistic outputs to allocate or return. Same convolution call and stages as the
// forward, so the same bits.
at::Tensor conv_bn_relu_eval(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
                             const std::optional<at::Tensor>& bn_bias, const at::Tensor& running_mean,
                             const at::Tensor& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, double eps, const std::optional<at::Tensor>& residual,
                             bool relu) {
  const std::optional<at::Tensor> rm = running_mean, rv = running_var;
  check_conv_args(x, weight, bn_weight, bn_bias, rm, rv, stride, padding, dilation, /*training=*/false,
                  /*momentum=*/0.0, eps);
  if (present(residual)) check_conv_residual(*residual, x, weight, stride, padding, dilation);
  const at::Tensor y = conv2d_forward(x, weight, stride, padding, dilation, x.suggest_memory_format(),
                                      /*inference=*/false);
  TORCH_CHECK(y.numel() > 0, "deeplab_ops: the convolution output is empty, shape ", y.sizes());
  const auto opts = x.options().dtype(opmath_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({y.size(1)}, opts), invstd = at::empty({y.size(1)}, opts);
  const auto empty_opts = running_mean.options();
  const StageArgsChecked checked;  // every stage argument is checked above or made here
  call_bn_finalize(std::nullopt, std::nullopt, std::nullopt, 0.0, rm, rv, 0.0, eps, mean, invstd,
                   at::empty({0}, empty_opts), at::empty({0}, empty_opts));
  return call_bn_apply(y, mean, invstd, bn_weight, bn_bias, residual, relu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_relu_backward(
    const at::Tensor& grad_out_, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& conv_out, const at::Tensor& out,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool training, bool relu, std::array<bool, 5> output_mask,
    std::optional<c10::string_view> group_name) {
  // Every argument checked here, under its own name: the stage ops called below would name them as theirs
  // (input, output, mean, invstd, weight), and skip their own checks (StageArgsChecked).
  check_conv_geometry_args(x, weight, stride, padding, dilation);
  check_conv_output(x, weight, stride, padding, dilation, conv_out);
  DLO_CHECK_SAME_DTYPE(conv_out, x);
  DLO_CHECK_SAME_DEVICE(conv_out, x);
  {
    const at::Tensor& grad_out = grad_out_;
    DLO_CHECK_SAME_SHAPE(grad_out, conv_out);
    DLO_CHECK_SAME_SHAPE(out, conv_out);
    DLO_CHECK_SAME_DTYPE(grad_out, x);
    DLO_CHECK_SAME_DTYPE(out, x);
    DLO_CHECK_SAME_DEVICE(grad_out, x);
    DLO_CHECK_SAME_DEVICE(out, x);
  }
  // The saved statistics and bn_weight: one value per output channel, in the dtypes the forward gives them (the
  // triton twin's rule too).
  const int64_t cout = weight.size(0);
  // Training's input gradient divides by the count of values per channel, N * H_out * W_out (with a group, the
  // group's count: a process may hold an empty batch).
  TORCH_CHECK(!training || conv_out.numel() > 0 || group_name.has_value(),
              "deeplab_ops: training BatchNorm's backward needs values in conv_out, got shape ", conv_out.sizes());
  if (present(bn_weight)) {
    check_channel_vector(*bn_weight, "bn_weight", cout);
    check_same_device(*bn_weight, "bn_weight", x, "x");
    check_bn_dtype(*bn_weight, "bn_weight", x.scalar_type());
  }
  DLO_CHECK_CHANNEL_VECTOR(save_mean, cout);
  DLO_CHECK_CHANNEL_VECTOR(save_invstd, cout);
  DLO_CHECK_SAME_DEVICE(save_mean, x);
  DLO_CHECK_SAME_DEVICE(save_invstd, x);
  check_bn_dtype(save_mean, "save_mean", x.scalar_type());
  check_bn_dtype(save_invstd, "save_invstd", x.scalar_type());
  const auto mf = conv_out.suggest_memory_format();
  const at::Tensor grad_out = change_layout(grad_out_, mf);
  const bool need_dy = output_mask[0] || output_mask[1];
  at::Tensor sum_g, sum_gx;
  if ((training && need_dy) || output_mask[2] || output_mask[3]) {
    const StageArgsChecked checked;  // every argument checked above
    std::tie(sum_g, sum_gx) = call_bn_backward_reduce(grad_out, out, conv_out, save_mean, save_invstd, relu);
  }
  at::Tensor grad_x, grad_w;
  if (need_dy) {
    double count = static_cast<double>(conv_out.size(0) * conv_out.size(2) * conv_out.size(3));
    std::optional<at::Tensor> dy_sum_g, dy_sum_gx;
    if (training) {
      dy_sum_g = sum_g;
      dy_sum_gx = sum_gx;
      if (const auto group = bn_group(group_name, training)) {
        // The input gradient uses the group's sums and count; grad_bn_* stay local (DDP averages them).
        std::tie(dy_sum_g, dy_sum_gx) = all_reduce_mean_sums({{sum_g, sum_gx, count}}, *group)[0];
        count = 1.0;
      }
    }
    const at::Tensor dy = [&] {
      const StageArgsChecked checked;  // checked above, or the sums made here
      return call_bn_backward_dy(grad_out, out, conv_out, save_mean, save_invstd, bn_weight, dy_sum_g, dy_sum_gx,
                                 count, relu, training);
    }();
    std::tie(grad_x, grad_w) = conv2d_backward(dy, x, weight, stride, padding, dilation, output_mask[0],
                                               output_mask[1]);
  }
  at::Tensor grad_res;
  if (output_mask[4]) {
    grad_res = relu ? at::threshold_backward(grad_out, out, 0) : grad_out.clone();
  }
  return {grad_x, grad_w, output_mask[2] ? sum_gx : at::Tensor(), output_mask[3] ? sum_g : at::Tensor(), grad_res};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CPU, m) {
  m.impl("conv_bn_relu_forward", &conv_bn_relu_forward);
  m.impl("conv_bn_relu_backward", &conv_bn_relu_backward);
  m.impl("conv_bn_relu_eval", &conv_bn_relu_eval);
}

#ifdef DEEPLAB_OPS_WITH_CUDA
TORCH_LIBRARY_IMPL(deeplab_ops, CUDA, m) {
  m.impl("conv_bn_relu_forward", &conv_bn_relu_forward);
  m.impl("conv_bn_relu_backward", &conv_bn_relu_backward);
  m.impl("conv_bn_relu_eval", &conv_bn_relu_eval);
}
#endif

}  // namespace deeplab_ops
