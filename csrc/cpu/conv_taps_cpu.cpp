// The cpu backend's own routes for a convolution's gradients (cpu/conv_taps_cpu.h).
#include "cpu/conv_taps_cpu.h"

#include <ATen/Context.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include "cpu/conv_layout_cpu.h"

namespace deeplab_ops {
namespace {

// Channels on each side at least: thinner GEMMs and convolutions run too far from the machine's peak.
constexpr int64_t kMinChannels = 32;

// Measured on this project's Xeon (AVX-512, 2 cores), float32 3 x 3, batch 1, a whole conv_bn_relu forward +
// backward with each route on and off in the same process, one thread, CPU time (tests and benchmarks run two; the
// machine was shared, so times of one configuration are the minimum of several):
//
// The weight gradient's GEMMs: in either layout where at most half the (position, tap) pairs are inside the image
// (2048 -> 256 at rate 18 on 33 x 33, 41 %: 311 against 143 ms channels_last, 253 against 159 NCHW; rate 36 on
// 65 x 65: 1172 against 403, 1280 against 810) ...
constexpr double kMaxValidFraction = 0.5;
// ... and channels_last up to this fraction with at least kWideIn input and kWideOut output channels, where
// oneDNN's weight gradient runs every tap at about the GEMMs' pace per product (2048 -> 256 on 33 x 33 at rate 6,
// 77 %: 252 against 222 ms; rate 12, 57 %: 226 against 183; 65 x 65 at rate 12, 77 %: 947 against 755). Not NCHW
// (there oneDNN's one backward call for both gradients is cheaper than two halves: the same rows 0.95-1.04x), nor
// denser (512 -> 512 on 65 x 65 at dilation 4, 92 %: 1.07x; on 33 x 33 at dilation 2, 1.00x; 1024 -> 256 dense
// 1.00x), nor thinner (256 -> 256 dense on 33 x 33 0.87x, 64 -> 64 on 129 x 129 0.70x: oneDNN's own weight
// gradient is faster there than GEMMs over long, thin matrices).
constexpr double kMaxValidFractionWide = 0.8;
constexpr int64_t kWideIn = 512, kWideOut = 256;
// The input gradient channels_last, for an NCHW x with a horizontal dilation of at least this: oneDNN's NCHW
// backward-data slows down 2-5x from there (256 -> 256 on 33 x 33 at dilation (1, 28) 5.0 ms, (1, 29) 11.9 against
// 4.0 channels_last; 2048 -> 256 on 65 x 65 at (1, 28) 264, (1, 29) 594 against 221; on 129 x 129 already at
// (1, 24): 256 against 119), while below it the channels_last convolution's 1.1-1.3x is spent on the
// conversions and on the second oneDNN call for the weight gradient.
constexpr int64_t kMinDilationNchwInput = 24;
// The weight gradient of a strided or dilated convolution of a channels_last x from NCHW copies of x and dy where an
// image's output positions times both channel counts reach this. Measured on the AMD EPYC (AVX-512, 2 cores) of
// 2026-12-01, float32 3 x 3, batch 1, oneDNN's channels_last backward-weights against its NCHW one, the weight
// gradient alone (2 threads; 1 thread): 512 -> 512 on 65 x 65 at dilation 4 145 against 116 ms (356 against 226);
// 256 -> 256 on 65 x 65 at dilation 2 50.0 against 27.3 (85.3 against 54.9); 512 -> 512 on 33 x 33 at dilation 2
// 31.1 against 28.0 (82.8 against 56.7); 2048 -> 256 on 33 x 33 at dilation 6 98.2 against 75.6; 128 -> 128 at
// stride 2 on 129 x 129 13.2 against 7.7 (49.2 against 18.5). A whole conv_bn_relu forward + backward against eager
// channels_last (conv_bn_relu_bench.py, two runs, ratios before -> after): 512 -> 512 on 65 x 65 at dilation 4
// 0.98 / 1.08 -> 1.27 / 1.20, 256 -> 256 on 65 x 65 at dilation 2 1.01 / 0.99 -> 1.09 / 1.06, the stride-2 row
// 1.02 / 1.00 -> 1.11 / 1.16. Not dense stride-1 convolutions: there the weight gradient alone ran faster NCHW
// too (64 -> 64 on 129 x 129 9.7 against 7.8 ms), but the layer lost 3-18 % (64 -> 64 on 129 x 129, 128 -> 128 on
// 65 x 65, 256 -> 256 on 33 x 33). Below the threshold channels_last is as fast or faster (64 -> 64 on 65 x 65,
// batch 2: 3.6 against 3.7; 128 -> 128 on 17 x 17, batch 8: 3.1 against 3.4); 1 x 1 weights gain nothing either
// way. The copies (x, dy, and a channels_last weight's gradient back) are cache-blocked transposes.
// On Intel's CPUs the route is not taken (NchwWeightGradRoute::kAuto): on this project's Xeon (a 2-core Xeon with
// AVX-512 and AMX, 2026-12-05; oneDNN's jit:avx512_core backward-weights on the channels_last tensors) the
// channels_last weight gradient kept pace with the NCHW one, 128 -> 128 at stride 2 on 129 x 129 5.5 against 5.9
// ms, 256 -> 256 on 65 x 65 at dilation 2 18.5 against 19.2, and the layers lost the copies: a whole conv_bn_relu
// forward + backward against eager channels_last, route on / off in the same build, two runs each, the stride-2 row
// 0.80, 0.97x / 1.07, 1.11x, 256 -> 256 on 65 x 65 at dilation 2 0.99, 1.01 / 1.02, 1.01, 512 -> 512 on 33 x 33 at
// dilation 2 1.00, 0.99 / 1.03, 1.01, at dilation 4 0.99, 0.96 / 1.00, 1.01, on 65 x 65 at dilation 4 1.01, 1.01 /
// 1.01, 1.03. Measured on one machine of each vendor, so the vendor decides; other CPUs (no x86) keep oneDNN's.
constexpr int64_t kMinNchwWeightGradWork = int64_t{1} << 26;

bool cpu_is_amd() {
  static const bool amd = [] {
#if defined(__x86_64__) || defined(__i386__)
    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    char vendor[13] = {};
    std::memcpy(vendor, &ebx, 4);
    std::memcpy(vendor + 4, &edx, 4);
    std::memcpy(vendor + 8, &ecx, 4);
    return std::strcmp(vendor, "AuthenticAMD") == 0 || std::strcmp(vendor, "HygonGenuine") == 0;
#else
    return false;
#endif
  }();
  return amd;
}

std::atomic<int> nchw_weight_grad_mode{static_cast<int>(NchwWeightGradRoute::kAuto)};

constexpr const char* kRouteNames[] = {"auto", "always", "never"};

}  // namespace

std::string nchw_weight_grad_route(std::optional<c10::string_view> mode) {
  int next = -1;
  if (mode.has_value()) {
    for (int i = 0; i < 3; ++i) {
      if (*mode == kRouteNames[i]) next = i;
    }
    TORCH_CHECK(next >= 0, "nchw_weight_grad_route: mode must be 'auto', 'always' or 'never', got '",
                std::string(*mode), "'");
  }
  const int before = next >= 0 ? nchw_weight_grad_mode.exchange(next) : nchw_weight_grad_mode.load();
  return kRouteNames[before];
}

TapsBackwardPlan conv_taps_backward_plan(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  TapsBackwardPlan plan;
  const auto taps = sparse_tap_pairs(x, weight, stride, padding, dilation);
  if (!taps) return plan;
  const int64_t cin = x.size(1), cout = weight.size(0);
  if (cin < kMinChannels || cout < kMinChannels) return plan;
  const bool nchw = x.suggest_memory_format() == at::MemoryFormat::Contiguous;
  const bool padded_within =
      padding[0] <= dilation[0] * (weight.size(2) - 1) && padding[1] <= dilation[1] * (weight.size(3) - 1);
  plan.input =
      nchw && padded_within && dilation[1] >= kMinDilationNchwInput && channels_last_extent_ok(weight, dilation);
  const bool wide = !nchw && cin >= kWideIn && cout >= kWideOut && taps->fraction <= kMaxValidFractionWide;
  plan.weight = (taps->fraction <= kMaxValidFraction || wide) && full_float32_matmul();
  return plan;
}

bool nchw_weight_grad(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef dilation, int64_t out_positions) {
  if (x.dim() != 4 || weight.dim() != 4 || !x.is_cpu() || x.scalar_type() != at::kFloat ||
      weight.scalar_type() != at::kFloat) {
    return false;
  }
  if (weight.size(1) != x.size(1) || weight.size(2) * weight.size(3) == 1) return false;  // grouped, or 1 x 1
  if (x.suggest_memory_format() != at::MemoryFormat::ChannelsLast) return false;
  if (stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1) return false;
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  const auto route = static_cast<NchwWeightGradRoute>(nchw_weight_grad_mode.load(std::memory_order_relaxed));
  if (route == NchwWeightGradRoute::kNever || (route == NchwWeightGradRoute::kAuto && !cpu_is_amd())) return false;
  return out_positions * x.size(1) * weight.size(0) >= kMinNchwWeightGradWork;
}

std::tuple<at::Tensor, at::Tensor> conv_taps_backward(const at::Tensor& dy, const at::Tensor& x,
                                                      const at::Tensor& x_cl, const at::Tensor& weight,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation, bool need_x,
                                                      bool need_w) {
  constexpr auto kCL = at::MemoryFormat::ChannelsLast;
  const int64_t cin = x.size(1), cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t h = x.size(2), w = x.size(3), ho = dy.size(2), wo = dy.size(3);
  const at::Tensor dy_cl = change_layout(dy, kCL);
  at::Tensor grad_x, grad_w;
  if (need_x) {
    grad_x = at::convolution(dy_cl, flipped_transposed_weight(weight), std::nullopt, {1, 1},
                             {dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1]}, dilation,
                             false, {0, 0}, 1);
    grad_x = change_layout(grad_x, x.suggest_memory_format());
  }
  if (need_w) {
    // [N, H, W, C] views of the channels_last tensors: a tap's positions are a box of them.
    const at::Tensor xv = (x_cl.defined() ? x_cl : change_layout(x, kCL)).permute({0, 2, 3, 1});
    const at::Tensor dv = dy_cl.permute({0, 2, 3, 1});
    // Each tap's GEMM writes its [C_out, C_in] slice of the channels_last gradient in place (row stride
    // k_h * k_w * C_in).
    grad_w = at::empty(weight.sizes(), weight.options().memory_format(kCL));
    for (int64_t ky = 0; ky < kh; ++ky) {
      const int64_t oy = ky * dilation[0] - padding[0];
      const int64_t i0 = std::max<int64_t>(0, -oy), i1 = std::min(ho, h - oy);
      for (int64_t kx = 0; kx < kw; ++kx) {
        const int64_t ox = kx * dilation[1] - padding[1];
        const int64_t j0 = std::max<int64_t>(0, -ox), j1 = std::min(wo, w - ox);
        at::Tensor tap = grad_w.select(3, kx).select(2, ky);
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
    grad_w = change_layout(grad_w, weight.suggest_memory_format());
  }
  return {grad_x, grad_w};
}

}  // namespace deeplab_ops
