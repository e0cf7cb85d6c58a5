// The convolutions of the device-generic composites (conv_bn_relu, aspp) without bias: ATen's (oneDNN / cuDNN),
// or for inference the cpu backend's Winograd convolution where winograd_plan takes the call (float32 3x3,
// stride 1, cpu/winograd_cpu.h). Forward, and the input and weight gradients of the backward: ATen's, or on the
// CPU each gradient by the cpu backend's own route where that is faster (cpu/conv_taps_cpu.h). Winograd never
// runs in a training step (its rounding would reach the gradients).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <initializer_list>
#include <optional>
#include <tuple>

#include "cpu/conv_layout_cpu.h"
#include "cpu/conv_taps_cpu.h"
#include "cpu/onednn_guard_cpu.h"
#include "cpu/winograd_cpu.h"

namespace deeplab_ops {

// Whether no gradient can flow from a call on these tensors: grad mode off, or none requires grad. (Called below
// Autograd, where the tensors still say whether autograd tracks them; aspp's Python autograd Function calls its op
// with grad mode on, deeplab_ops/ops/aspp.py.)
inline bool inference_call(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return true;
  for (const auto* t : tensors) {
    if (t->defined() && t->requires_grad()) return false;
  }
  return true;
}

// conv2d(x, weight, stride, padding, dilation) in memory format mf; Winograd allowed where `inference`. An NCHW
// float32 CPU x is run channels_last where oneDNN skips the padding taps only there (cpu/conv_layout_cpu.h), taken
// from x_cl where given (a conversion shared by the convolutions of one call on the same x).
inline at::Tensor conv2d_forward(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, at::MemoryFormat mf,
                                 bool inference, ChannelsLastOnce* x_cl = nullptr) {
  if (x.size(0) == 0) {  // an empty batch (a process's share under a synchronized BatchNorm): no kernel runs
    const auto out = [&](int d) {
      return (x.size(d + 2) + 2 * padding[d] - dilation[d] * (weight.size(d + 2) - 1) - 1) / stride[d] + 1;
    };
    return at::empty({0, weight.size(0), out(0), out(1)}, x.options().memory_format(mf));
  }
  if (onednn_unsafe_conv(x, weight, stride, padding, dilation)) {  // (cpu/onednn_guard_cpu.h)
    return change_layout(conv2d_float64(x, weight, std::nullopt, stride, padding, dilation), mf);
  }
  if (inference) {
    if (const int m = winograd_plan(x, weight, stride, padding, dilation)) {
      // Winograd reads x channels_last: the call's shared conversion where there is one
      return winograd_conv3x3(x_cl ? x_cl->get() : x, weight, std::nullopt, std::nullopt, padding, dilation, false, m,
                              mf);
    }
  }
  // The kept channels_last weight only where no gradient is computed (channels_last_weight).
  if (nchw_conv_via_channels_last(x, weight, stride, padding, dilation, inference)) {
    constexpr auto kCL = at::MemoryFormat::ChannelsLast;
    const at::Tensor y = at::convolution(x_cl ? x_cl->get() : change_layout(x, kCL),
                                         channels_last_weight(weight, inference), std::nullopt, stride, padding,
                                         dilation, false, {0, 0}, 1);
    return change_layout(y, mf);
  }
  return change_layout(at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1), mf);
}

// The gradients of conv2d(x, weight, ...) with respect to x (in x's memory format) and weight (in the weight's),
// each undefined unless wanted; dy may be a strided view. ATen's (oneDNN / cuDNN), or on the CPU the cpu
// backend's routes for the gradients where they are faster (cpu/conv_taps_cpu.h), which read x channels_last:
// from x_cl where given, as conv2d_forward.
// PyTorch 2.14's oneDNN weight gradient of a strided 1 x 1 convolution with few input channels corrupts the heap
// (2-8 input channels, channels_last, even maps: a segfault, an abort or a hang; eager F.conv2d too; measured on this
// project's Xeon, a margin to 16 here). A 1 x 1 convolution with stride s and padding p reads x only at
// (i*s - p, j*s - p): it is the stride-1 convolution of that subsample (the same products in the same order), and
// x's gradient is the subsample's, scattered back with zeros elsewhere.
inline bool subsample_strided_1x1(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride) {
  return x.is_cpu() && weight.size(2) == 1 && weight.size(3) == 1 && (stride[0] > 1 || stride[1] > 1) &&
         x.size(1) < 16;
}

inline std::tuple<at::Tensor, at::Tensor> conv2d_backward_subsampled(const at::Tensor& dy, const at::Tensor& x,
                                                                     const at::Tensor& weight, at::IntArrayRef stride,
                                                                     at::IntArrayRef padding, bool need_x,
                                                                     bool need_w) {
  const auto format = x.suggest_memory_format();
  const bool padded = padding[0] > 0 || padding[1] > 0;
  const at::Tensor xp = padded ? at::constant_pad_nd(x, {padding[1], padding[1], padding[0], padding[0]}) : x;
  const int64_t rows = (dy.size(2) - 1) * stride[0] + 1, cols = (dy.size(3) - 1) * stride[1] + 1;
  const auto pick = [&](const at::Tensor& t) {
    return t.slice(2, 0, rows, stride[0]).slice(3, 0, cols, stride[1]);
  };
  const at::Tensor sub = pick(xp).contiguous(format);
  auto grads = at::convolution_backward(dy, sub, weight, std::nullopt, {1, 1}, {0, 0}, {1, 1}, false, {0, 0}, 1,
                                        {need_x, need_w, false});
  at::Tensor grad_x, grad_w;
  if (need_x) {
    at::Tensor gxp = at::zeros(xp.sizes(), x.options().memory_format(format));
    pick(gxp).copy_(std::get<0>(grads));
    grad_x = padded ? gxp.slice(2, padding[0], padding[0] + x.size(2))
                          .slice(3, padding[1], padding[1] + x.size(3))
                          .contiguous(format)
                    : gxp;
  }
  if (need_w) grad_w = change_layout(std::get<1>(grads), weight.suggest_memory_format());
  return {grad_x, grad_w};
}

inline std::tuple<at::Tensor, at::Tensor> conv2d_backward(const at::Tensor& dy, const at::Tensor& x,
                                                          const at::Tensor& weight, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          bool need_x, bool need_w,
                                                          ChannelsLastOnce* x_cl = nullptr) {
  if (x.size(0) == 0) {  // an empty batch: no input to differentiate, a zero weight gradient
    return {need_x ? at::empty_like(x) : at::Tensor(), need_w ? at::zeros_like(weight) : at::Tensor()};
  }
  if (onednn_unsafe_conv(x, weight, stride, padding, dilation)) {  // (cpu/onednn_guard_cpu.h)
    return conv2d_backward_float64(dy, x, weight, stride, padding, dilation, need_x, need_w);
  }
  if (need_w && subsample_strided_1x1(x, weight, stride)) {
    return conv2d_backward_subsampled(dy, x, weight, stride, padding, need_x, need_w);
  }
  at::Tensor grad_x, grad_w;
  bool taps_x = false, taps_w = false;
  if ((need_x || need_w) && dy.is_cpu() && dy.scalar_type() == at::kFloat) {
    const TapsBackwardPlan plan = conv_taps_backward_plan(x, weight, stride, padding, dilation);
    taps_x = need_x && plan.input;
    taps_w = need_w && plan.weight;
    if (taps_x || taps_w) {
      const at::Tensor xc = taps_w && x_cl ? x_cl->get() : at::Tensor();
      std::tie(grad_x, grad_w) = conv_taps_backward(dy, x, xc, weight, padding, dilation, taps_x, taps_w);
    }
  }
  const bool aten_x = need_x && !taps_x;
  bool aten_w = need_w && !taps_w;
  if (aten_w && dy.scalar_type() == at::kFloat &&
      nchw_weight_grad(x, weight, stride, dilation, dy.size(2) * dy.size(3))) {
    // A channels_last x's weight gradient from NCHW copies (cpu/conv_taps_cpu.h); its input gradient below stays
    // channels_last, where oneDNN's backward-data keeps pace.
    // The weight's values do not enter its own gradient (a NaN-filled weight gives the same bits): a channels_last
    // weight is stood in for by an NCHW buffer of its shape rather than transposed (oneDNN would otherwise run
    // channels_last again).
    constexpr auto kNCHW = at::MemoryFormat::Contiguous;
    const at::Tensor w_nchw = weight.is_contiguous() ? weight : at::empty(weight.sizes(), weight.options());
    const at::Tensor gw = std::get<1>(at::convolution_backward(change_layout(dy, kNCHW), change_layout(x, kNCHW),
                                                               w_nchw, std::nullopt, stride, padding, dilation, false,
                                                               {0, 0}, 1, {false, true, false}));
    grad_w = change_layout(gw, weight.suggest_memory_format());
    aten_w = false;
  }
  if (aten_x || aten_w) {
    auto grads = at::convolution_backward(dy, x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
                                          {aten_x, aten_w, false});
    // The gradients keep their tensor's memory format (cuDNN/oneDNN may return weight grads in x's); where one must
    // be converted, change_layout's blocked transposes on float32 CPU tensors (ATen's copy took 8.3 ms to convert
    // a 512 x 512 x 3 x 3 weight gradient to channels_last on this project's Xeon).
    if (aten_x) grad_x = change_layout(std::get<0>(grads), x.suggest_memory_format());
    if (aten_w) grad_w = change_layout(std::get<1>(grads), weight.suggest_memory_format());
  }
  return {grad_x, grad_w};
}

}  // namespace deeplab_ops
