// The backward of a float32 CPU convolution (stride 1) by other routes than oneDNN's convolution_backward, each
// gradient where its route is the faster one (conv_taps_backward_plan; and, any stride, oneDNN's own weight gradient
// run on NCHW copies of a channels_last x: nchw_weight_grad below):
//   - the input gradient: the forward convolution of dy with the weight flipped and transposed
//     (dx[ci] = sum_co conv(dy[co], flip(w[co, ci])) with padding dilation * (k - 1) - padding), run channels_last.
//     oneDNN's channels_last backward-data is this same convolution (bit for bit), so the route serves an NCHW x,
//     whose backward-data oneDNN runs in its blocked layout over every tap, padding included;
//   - the weight gradient: one GEMM per tap, dW[:, :, ky, kx] = dy^T x over the output positions whose input
//     position lies in the image (gathered channels_last), and nothing over the others. oneDNN's backward-weights
//     runs every tap, and with many channels runs well below the GEMM's pace even where every tap is inside.
// Same sums as the dense backward, in another order (float32 rounding of the same size; tests/ops check both
// gradients against float64).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace deeplab_ops {

// Which gradients of conv2d(x, weight, stride, padding, dilation) conv_taps_backward computes (a float32 CPU dy of
// its output's shape); the others run oneDNN's backward. Neither unless: float32 CPU x and weight, groups 1,
// stride 1, a kernel larger than 1 x 1, at least 32 channels each way, oneDNN enabled. The input gradient also
// needs an NCHW x and padding at most dilation * (k - 1) (the flipped convolution's padding is not negative); the
// weight gradient float32 matmuls at full precision (cpu/conv_layout_cpu.h: full_float32_matmul).
struct TapsBackwardPlan {
  bool input = false;
  bool weight = false;
};
TapsBackwardPlan conv_taps_backward_plan(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation);

// Whether the weight gradient of conv2d(x, weight, stride, ..., dilation) (out_positions: its output's
// H_out * W_out), where oneDNN's backward computes it, runs from NCHW copies of a channels_last x and of dy:
// oneDNN's channels_last backward-weights of a float32 convolution larger than 1 x 1, strided or dilated, runs well
// below its NCHW (blocked) one wherever an image carries much work (conv_taps_cpu.cpp has the measurements), while
// its channels_last backward-data keeps pace. Needs float32 CPU tensors and oneDNN enabled.
// Taken on AMD's CPUs only (kAuto): on Intel's the channels_last weight gradient was measured to keep pace.
bool nchw_weight_grad(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef dilation, int64_t out_positions);

// Where nchw_weight_grad's route is taken, process-wide: kAuto by the CPU's vendor (above), kAlways wherever its
// other rules allow on any CPU, kNever nowhere. For tests (the route's results on every machine) and measurements.
enum class NchwWeightGradRoute : int { kAuto = 0, kAlways = 1, kNever = 2 };
// Sets the route's mode ("auto", "always", "never") where one is given; returns the mode in effect before the call.
std::string nchw_weight_grad_route(std::optional<c10::string_view> mode);

// The gradients of conv2d(x, weight, stride=1, padding, dilation) with respect to x (in x's memory format) and
// weight (in the weight's), each undefined unless wanted, by the routes above. dy: the output's shape, any strides;
// x_cl: x in channels_last, or undefined (converted here where the weight gradient needs it).
std::tuple<at::Tensor, at::Tensor> conv_taps_backward(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& x_cl, const at::Tensor& weight,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation, bool need_x,
                                                      bool need_w);

}  // namespace deeplab_ops
