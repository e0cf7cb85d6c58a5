// The convolutions of the device-generic composites (conv_bn_relu, aspp) without bias: the cpu backend's Winograd
// convolution where winograd_plan takes the call (float32 channels-last 3x3, stride 1, cpu/winograd_cpu.h), else
// ATen's (oneDNN / cuDNN). Forward, and the input and weight gradients of the backward.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cpu/winograd_cpu.h"

namespace deeplab_ops {

// conv2d(x, weight, stride, padding, dilation) in memory format mf.
inline at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, at::MemoryFormat mf) {
  if (const int m = winograd_plan(x, weight, stride, padding, dilation)) {
    return winograd_conv3x3(x, weight, std::nullopt, std::nullopt, padding, dilation, false, m, mf);
  }
  return at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1).contiguous(mf);
}

// The gradients of conv2d_forward with respect to x (in x's memory format) and weight (in the weight's), each
// undefined unless wanted; dy may be a strided view.
inline std::tuple<at::Tensor, at::Tensor> conv2d_backward(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& weight, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          bool need_x, bool need_w) {
  at::Tensor grad_x, grad_w;
  if (need_x) {
    if (auto gx = winograd_conv3x3_grad_input(dy, x, weight, stride, padding, dilation)) grad_x = std::move(*gx);
  }
  const bool aten_x = need_x && !grad_x.defined();
  if (aten_x || need_w) {
    auto grads = at::convolution_backward(dy, x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
                                          {aten_x, need_w, false});
    // The gradients keep their tensor's memory format (cuDNN/oneDNN may return weight grads in x's).
    if (aten_x) grad_x = std::get<0>(grads).contiguous(x.suggest_memory_format());
    if (need_w) grad_w = std::get<1>(grads).contiguous(weight.suggest_memory_format());
  }
  return {grad_x, grad_w};
}

}  // namespace deeplab_ops
