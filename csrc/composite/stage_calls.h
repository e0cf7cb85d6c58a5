// Calls of the BN stage ops through the dispatcher, for the device-generic composites (conv_bn_relu, aspp):
// the tensors' device picks the CPU or CUDA stage kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

#include "bn_stage_args.h"

namespace deeplab_ops {

// The BN stage ops, looked up once and called through the dispatcher (so CPU and CUDA kernels are
// picked by the tensors' device).
inline std::tuple<at::Tensor, at::Tensor> call_bn_stats(const at::Tensor& input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deeplab_ops::bn_stats", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(input);
}

inline void call_bn_finalize(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
                             const std::optional<at::Tensor>& counts, double count,
                             const std::optional<at::Tensor>& running_mean,
                             const std::optional<at::Tensor>& running_var, double momentum, double eps,
                             const at::Tensor& save_mean, const at::Tensor& save_invstd,
                             const at::Tensor& new_running_mean, const at::Tensor& new_running_var) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deeplab_ops::bn_finalize", "")
                       .typed<void(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                                   const std::optional<at::Tensor>&, double, double, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  op.call(mean, m2, counts, count, running_mean, running_var, momentum, eps, save_mean, save_invstd,
          new_running_mean, new_running_var);
}

inline at::Tensor call_bn_apply(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deeplab_ops::bn_apply", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                         const std::optional<at::Tensor>&, bool)>();
  return op.call(input, mean, invstd, weight, bias, residual, relu);
}

inline std::tuple<at::Tensor, at::Tensor> call_bn_backward_reduce(const at::Tensor& grad_out, const at::Tensor& output,
                                                           const at::Tensor& input, const at::Tensor& mean,
                                                           const at::Tensor& invstd, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deeplab_ops::bn_backward_reduce", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, bool)>();
  return op.call(grad_out, output, input, mean, invstd, relu);
}

inline at::Tensor call_bn_backward_dy(const at::Tensor& grad_out, const at::Tensor& output, const at::Tensor& input,
                               const at::Tensor& mean, const at::Tensor& invstd,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sum_g,
                               const std::optional<at::Tensor>& sum_g_xhat, double count, bool relu, bool training) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("deeplab_ops::bn_backward_dy", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, double, bool, bool)>();
  return op.call(grad_out, output, input, mean, invstd, weight, sum_g, sum_g_xhat, count, relu, training);
}

}  // namespace deeplab_ops
