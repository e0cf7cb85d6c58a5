// The backward of a float32 CPU convolution whose taps mostly fall in the padding: an ASPP branch on a map not much
// larger than its rate (rate 18 on a 33 x 33 map: 41 % of the taps land in the image). oneDNN's forward skips the
// padding taps (channels_last, cpu/conv_layout_cpu.h) but its backward runs every tap, at about 5x the forward's
// time there. Here:
//   - the input gradient is the forward convolution of dy with the weight flipped and transposed
//     (dx[ci] = sum_co conv(dy[co], flip(w[co, ci])) with padding dilation * (k - 1) - padding), run channels_last
//     by oneDNN, which skips the taps that fall outside dy;
//   - the weight gradient is one GEMM per tap, dW[:, :, ky, kx] = dy^T x over the output positions whose input
//     position lies in the image (gathered channels_last), and nothing over the others.
// Same sums as the dense backward, in another order (float32 rounding of the same size; tests/ops check both
// gradients against float64).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace deeplab_ops {

// Whether conv_taps_backward should run for conv2d(x, weight, stride, padding, dilation) (a float32 CPU dy of its
// output's shape): float32 CPU x and weight, groups 1, stride 1, a kernel larger than 1 x 1, padding at most
// dilation * (k - 1) (the input gradient's convolution needs padding >= 0), at least 32 channels each way, oneDNN
// enabled, float32 matmuls at full precision (cpu/conv_layout_cpu.h: full_float32_matmul), and at most half the
// (position, tap) pairs inside the image.
bool conv_taps_backward_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation);

// The gradients of conv2d(x, weight, stride=1, padding, dilation) with respect to x (in x's memory format) and
// weight (in the weight's), each undefined unless wanted. dy: the output's shape, any strides.
std::tuple<at::Tensor, at::Tensor> conv_taps_backward(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& weight, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool need_x, bool need_w);

}  // namespace deeplab_ops
