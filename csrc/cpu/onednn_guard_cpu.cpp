// The geometries oneDNN mishandles and their float64 route (cpu/onednn_guard_cpu.h).
#include "cpu/onednn_guard_cpu.h"

#include <cstdint>

namespace deeplab_ops {
namespace {

// Whether some output position along one axis reads only padding: none of its k taps lands in [0, size).
bool position_in_padding(int64_t size, int64_t out, int64_t pad, int64_t dil, int64_t k, int64_t stride) {
  for (int64_t o = 0; o < out; ++o) {
    bool reads_input = false;
    for (int64_t t = 0; t < k && !reads_input; ++t) {
      const int64_t pos = o * stride - pad + t * dil;
      reads_input = pos >= 0 && pos < size;
    }
    if (!reads_input) return true;
  }
  return false;
}

}  // namespace

bool onednn_unsafe_conv(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto dtype = x.scalar_type();
  if (!x.is_cpu() || (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  const bool bf16 = dtype == at::kBFloat16;
  int64_t out[2];
  for (int d = 0; d < 2; ++d) {  // the output size, rounded down (as the Python twin's //)
    const int64_t span = x.size(d + 2) + 2 * padding[d] - dilation[d] * (weight.size(d + 2) - 1) - 1;
    if (span < 0) return false;  // no output: nothing for any convolution to compute
    out[d] = span / stride[d] + 1;
  }
  for (int d = 0; d < 2; ++d) {
    const int64_t size = x.size(d + 2), k = weight.size(d + 2), o = out[d];
    if (stride[d] == 1) {  // bfloat16: segfaults
      if (bf16 && position_in_padding(size, o, padding[d], dilation[d], k, 1)) return true;
      continue;
    }
    if (o == 1 || dilation[d] * (k - 1) + 1 > size) return true;
    if (position_in_padding(size, o, padding[d], dilation[d], k, stride[d])) return true;
    if (dtype == at::kFloat && k > 1 && dilation[d] > 1) return true;  // float32: wrong weight gradients
    if (bf16 && k == 1 && weight.size(3 - d) > 1) return true;  // bfloat16: segfaults, garbage outputs
  }
  return false;
}

at::Tensor conv2d_float64(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto d = at::kDouble;
  const std::optional<at::Tensor> b = bias.has_value() && bias->defined() ? std::optional(bias->to(d)) : std::nullopt;
  return at::convolution(x.to(d).contiguous(), weight.to(d).contiguous(), b, stride, padding, dilation, false,
                         {0, 0}, 1)
      .to(x.scalar_type())
      .contiguous(x.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor> conv2d_backward_float64(const at::Tensor& dy, const at::Tensor& x,
                                                           const at::Tensor& weight, at::IntArrayRef stride,
                                                           at::IntArrayRef padding, at::IntArrayRef dilation,
                                                           bool need_x, bool need_w) {
  const auto d = at::kDouble;
  auto grads = at::convolution_backward(dy.to(d).contiguous(), x.to(d).contiguous(), weight.to(d).contiguous(),
                                        std::nullopt, stride, padding, dilation, false, {0, 0}, 1,
                                        {need_x, need_w, false});
  at::Tensor grad_x, grad_w;
  if (need_x) grad_x = std::get<0>(grads).to(x.scalar_type()).contiguous(x.suggest_memory_format());
  if (need_w) grad_w = std::get<1>(grads).to(weight.scalar_type()).contiguous(weight.suggest_memory_format());
  return {grad_x, grad_w};
}

}  // namespace deeplab_ops
