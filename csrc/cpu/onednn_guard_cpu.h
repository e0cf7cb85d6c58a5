// The CPU convolutions that PyTorch's oneDNN computes wrong or crashes on, and the exact route the cpu backend takes
// for them instead. PyTorch 2.14's oneDNN convolution (float32, bfloat16, float16 on the CPU) was measured against
// float64 on 62,000 random small geometries (every layout, with and without bias and gradients; eager F.conv2d alike):
// it returned wrong outputs (up to 1e34 relative) or wrong weight gradients, or died with a segfault in
// brgemm_convolution_fwd_t::perform_outwork, in 114 of them, every one along an axis with stride > 1: an output of one
// position, a kernel wider (with dilation) than the input, or an output position whose taps all fall in the padding
// (float32 crashed only with a bias, bfloat16 with or without one). A second sweep (2026-12-07: 9,000 geometries on
// maps up to 70 wide, dilations up to 18, each run twice) found three more kinds, on larger maps: float32 weight
// gradients 100 % off along a strided axis with a dilated kernel (seen with paddings of 15 and more, 'same' padding
// among them; every float32 strided dilated axis is guarded, its forward too, which costs such a layer 4x in training
// and 8x in eval), and in bfloat16 segfaults, heap corruption and garbage outputs (1e36, NaN, different from one call
// to the next) where an output position reads only padding along an axis of stride 1, or where an axis of stride > 1
// has a kernel of 1 and the other axis a wider one (float16 computed both right, 0 failures in 800). A third sweep, of
// 17,000 random geometries on maps up to 100 wide after the change, found no failure outside the guard. No layer of
// DeepLabV3 at its crop sizes is one (tests/ops/test_onednn_guard.py). The guarded route converts to float64, where
// ATen runs its own (THNN) convolutions, and rounds the result back: the exact value, at a cost that only these
// geometries pay. A fused module's eager fallbacks (a hook on a part, torch.fx, a slice) run torch's nn.Conv2d,
// unguarded, as eager does.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace deeplab_ops {

// Whether a convolution of these CPU tensors (4-D x and weight, groups 1, checked geometry), with or without a
// bias, is one oneDNN mishandles (above): float32, bfloat16 or float16 CPU tensors only (float64 never runs oneDNN).
bool onednn_unsafe_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation);

// conv2d(x, weight, bias, stride, padding, dilation) computed in float64 and rounded to x's dtype, in x's memory
// format.
at::Tensor conv2d_float64(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// The gradients of conv2d(x, weight, ...) with respect to x and weight (each undefined unless wanted), computed in
// float64 and rounded to their tensor's dtype, each in its tensor's memory format.
std::tuple<at::Tensor, at::Tensor> conv2d_backward_float64(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& weight, at::IntArrayRef stride,
                                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                                           bool need_x, bool need_w);

}  // namespace deeplab_ops
