// The tap-skipping backward of the cpu backend's sparse-tap convolutions (cpu/conv_taps_cpu.h).
#include "cpu/conv_taps_cpu.h"

#include <algorithm>

#include "cpu/conv_layout_cpu.h"

namespace deeplab_ops {
namespace {

// (Position, tap) pairs inside the image, at most (against the dense k_h * k_w per position). Measured on this
// project's Xeon (AVX-512, 2 cores), float32 3x3, both gradients against ATen's convolution_backward (oneDNN), same
// process: 2 x 2048 -> 256 on 33 x 33 at dilation 18 (41 % of the pairs) 85 against 180 ms, 2 x 256 -> 256 10.3
// against 15.9; but at dilation 12 (57 %) 113 against 110, 1 x 2048 -> 256 on 65 x 65 at dilation 24 (57 %) 214
// against 220, 1 x 512 -> 512 on 33 x 33 at dilation 8 (70 %) 32 against 32.
constexpr double kMaxValidFraction = 0.5;
// Channels on each side at least: thinner GEMMs and convolutions run too far from the machine's peak.
constexpr int64_t kMinChannels = 32;

}  // namespace

bool conv_taps_backward_applies(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto taps = sparse_tap_pairs(x, weight, stride, padding, dilation);
  if (!taps || taps->fraction > kMaxValidFraction) return false;
  if (x.size(1) < kMinChannels || weight.size(0) < kMinChannels) return false;
  if (padding[0] > dilation[0] * (weight.size(2) - 1) || padding[1] > dilation[1] * (weight.size(3) - 1)) return false;
  // The weight gradient's GEMMs (at::mm) follow the float32 matmul precision; oneDNN's backward stays float32.
  return full_float32_matmul();
}

std::tuple<at::Tensor, at::Tensor> conv_taps_backward(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& weight, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool need_x, bool need_w) {
  constexpr auto kCL = at::MemoryFormat::ChannelsLast;
  const int64_t cin = x.size(1), cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t h = x.size(2), w = x.size(3), ho = dy.size(2), wo = dy.size(3);
  const at::Tensor dy_cl = change_layout(dy, kCL);
  at::Tensor grad_x, grad_w;
  if (need_x) {
    // w_t[ci, co, ky, kx] = w[co, ci, kh - 1 - ky, kw - 1 - kx]
    const at::Tensor w_t = weight.flip({2, 3}).transpose(0, 1).contiguous(kCL);
    grad_x = at::convolution(dy_cl, w_t, std::nullopt, {1, 1},
                             {dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1]}, dilation,
                             false, {0, 0}, 1);
    grad_x = change_layout(grad_x, x.suggest_memory_format());
  }
  if (need_w) {
    // [N, H, W, C] views of the channels_last tensors: a tap's positions are a box of them.
    const at::Tensor xv = change_layout(x, kCL).permute({0, 2, 3, 1});
    const at::Tensor dv = dy_cl.permute({0, 2, 3, 1});
    const at::Tensor taps = at::empty({kh * kw, cout, cin}, x.options());
    for (int64_t ky = 0; ky < kh; ++ky) {
      const int64_t oy = ky * dilation[0] - padding[0];
      const int64_t i0 = std::max<int64_t>(0, -oy), i1 = std::min(ho, h - oy);
      for (int64_t kx = 0; kx < kw; ++kx) {
        const int64_t ox = kx * dilation[1] - padding[1];
        const int64_t j0 = std::max<int64_t>(0, -ox), j1 = std::min(wo, w - ox);
        at::Tensor tap = taps.select(0, ky * kw + kx);
        if (i1 <= i0 || j1 <= j0) {
          tap.zero_();
          continue;
        }
        // reshape copies a box that is not one run of rows (a partial width, or several images)
        const at::Tensor a = dv.slice(1, i0, i1).slice(2, j0, j1).reshape({-1, cout});
        const at::Tensor b = xv.slice(1, i0 + oy, i1 + oy).slice(2, j0 + ox, j1 + ox).reshape({-1, cin});
        at::mm_out(tap, a.t(), b);
      }
    }
    grad_w = taps.view({kh, kw, cout, cin}).permute({2, 3, 0, 1}).contiguous(weight.suggest_memory_format());
  }
  return {grad_x, grad_w};
}

}  // namespace deeplab_ops
