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

inline std::tuple<at::Tensor, at::Tensor> call_bn_finalize(const at::Tensor& count, const at::Tensor& mean,
                                                    const at::Tensor& m2, const std::optional<at::Tensor>& rm,
                                                    const std::optional<at::Tensor>& rv, double momentum, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deeplab_ops::bn_finalize", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, double, double)>();
  return op.call(count, mean, m2, rm, rv, momentum, eps);
}

inline at::Tensor call_bn_apply(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& scale,
                         const at::Tensor& shift, const std::optional<at::Tensor>& residual, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("deeplab_ops::bn_apply", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, bool)>();
  return op.call(input, mean, scale, shift, residual, relu);
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
