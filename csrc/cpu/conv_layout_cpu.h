// Activation layouts for the cpu backend's float32 convolutions. oneDNN's convolution skips the taps that fall in
// the padding only in channels_last: on NCHW it runs them all (in its blocked layout), so a dilated convolution on
// a map not much larger than its dilation (the ASPP's rate-18 branch on a 33 x 33 map: 41 % of the taps land in
// the image) runs about 2x faster channels_last. An NCHW input there is converted in, and the output back, by
// cache-blocked transposes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace deeplab_ops {

// A dense float32 [N, C, H, W] tensor in memory format `to` (NCHW or channels_last): per image a [H*W, C] <->
// [C, H*W] transpose in blocks; t itself where it already is. Other tensors, and one strided in `to`'s order (a
// channel slice): t.contiguous(to).
at::Tensor change_layout(const at::Tensor& t, at::MemoryFormat to);

// Whether ATen's float32 matmuls on the CPU multiply in float32 (not bfloat16 or TF32), read per call: the setting
// can change at any time. A convolution is meant to stay float32 whatever it says, so the convolutions built on
// ATen's GEMMs (Winograd's, the tap-skipping weight gradient) run only where it holds.
bool full_float32_matmul();

// The (output position, tap) pairs along one axis of a convolution whose input position lies inside the input:
// out positions, k taps, 0 <= o * stride - pad + dil * t < size.
int64_t valid_taps(int64_t size, int64_t out, int64_t pad, int64_t dil, int64_t k, int64_t stride);

// Whether conv2d(x, weight, stride, padding, dilation) with an NCHW x runs faster converted to channels_last and
// back: float32 on the CPU through oneDNN, groups 1, stride 1, at most 72 % of its taps inside the input (85 % at
// a dilation of 8 or more), and enough multiplies per converted value that the conversions cost less than the
// taps saved.
// weight_kept: the call takes the weight's channels_last copy from the cache (else a weight that is not
// channels_last is converted per call, and counted).
bool nchw_conv_via_channels_last(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool weight_kept);

}  // namespace deeplab_ops
