// Activation layouts for the cpu backend's float32 convolutions. oneDNN's convolution skips the taps that fall in
// the padding only in channels_last: on NCHW it runs them all (in its blocked layout), so a dilated convolution on
// a map not much larger than its dilation (the ASPP's rate-18 branch on a 33 x 33 map: 41 % of the taps land in
// the image) runs about 2x faster channels_last. An NCHW input there is converted in, and the output back, by
// cache-blocked transposes.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <optional>

namespace deeplab_ops {

// A dense float32 [N, C, H, W] tensor in memory format `to` (NCHW or channels_last): per image a [H*W, C] <->
// [C, H*W] transpose in blocks; t itself where it already is. Other tensors, and one strided in `to`'s order (a
// channel slice): t.contiguous(to).
at::Tensor change_layout(const at::Tensor& t, at::MemoryFormat to);

// d[j * ldd + i] = s[i * lds + j] for i < rows, j < cols, on the calling thread, in the cache blocks change_layout
// uses: a [rows, cols] float32 matrix (row stride lds) transposed into d (row stride ldd).
void transpose_blocked(const float* s, int64_t lds, float* d, int64_t ldd, int64_t rows, int64_t cols);

// x in channels_last, converted (change_layout) on the first get() and kept for the next: one conversion for the
// several convolutions of one op call that read the same x (the ASPP's branches). x must outlive it.
class ChannelsLastOnce {
 public:
  explicit ChannelsLastOnce(const at::Tensor& x) : x_(x) {}
  const at::Tensor& get() {
    if (!cl_.defined()) cl_ = change_layout(x_, at::MemoryFormat::ChannelsLast);
    return cl_;
  }

 private:
  const at::Tensor& x_;
  at::Tensor cl_;
};

// weight [C_out, C_in, k_h, k_w] flipped in both spatial axes with its channel axes swapped, channels_last:
// out[ci, co, ky, kx] = weight[co, ci, k_h - 1 - ky, k_w - 1 - kx], the weight of the convolution that computes an
// input gradient. Float32 by cache-blocked transposes (ATen's flip and copy took 20-48 ms on a 2048 -> 256 3 x 3
// weight, against the gradient's own 40).
at::Tensor flipped_transposed_weight(const at::Tensor& weight);

// Whether ATen's float32 matmuls on the CPU multiply in float32 (not bfloat16 or TF32), read per call: the setting
// can change at any time. A convolution is meant to stay float32 whatever it says, so the convolutions built on
// ATen's GEMMs (Winograd's, the tap-skipping weight gradient) run only where it holds.
bool full_float32_matmul();

// The (output position, tap) pairs along one axis of a convolution whose input position lies inside the input:
// out positions, k taps, 0 <= o * stride - pad + dil * t < size.
int64_t valid_taps(int64_t size, int64_t out, int64_t pad, int64_t dil, int64_t k, int64_t stride);

// The (position, tap) pairs of conv2d(x, weight, stride=1, padding, dilation) whose input lies in the image, the
// output positions, and the pairs' fraction of positions * k_h * k_w; none unless the convolution is one both
// sparse-tap routes can take: float32 CPU tensors, 4-D, groups 1, stride 1, padding >= 0, dilation >= 1, a kernel
// larger than 1 x 1, a non-empty output, oneDNN enabled.
struct TapPairs {
  double pairs, positions, fraction;
};
std::optional<TapPairs> sparse_tap_pairs(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation);

// Whether oneDNN's channels_last convolution takes this dilated kernel: it fails (SIGFPE in its blocking) at a
// dilation of 2**31 - 1, where its NCHW convolution, which eager runs for an NCHW x, computes. The routes that take
// an NCHW x through channels_last are not taken where the dilated extent does not fit an int32.
inline bool channels_last_extent_ok(const at::Tensor& weight, at::IntArrayRef dilation) {
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  return dilation[0] * (weight.size(2) - 1) < kMax32 && dilation[1] * (weight.size(3) - 1) < kMax32;
}

// Whether conv2d(x, weight, stride, padding, dilation) with an NCHW x runs faster converted to channels_last and
// back: float32 on the CPU through oneDNN, groups 1, stride 1, at most 72 % of its taps inside the input (85 % at
// a dilation of 8 or more), and enough multiplies per converted value that the conversions cost less than the
// taps saved.
// may_keep_weight: the call may take the weight's kept channels_last copy (channels_last_weight, a call with no
// gradient); a weight that is not channels_last and not kept is converted per call, and counted.
bool nchw_conv_via_channels_last(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool may_keep_weight);

}  // namespace deeplab_ops
