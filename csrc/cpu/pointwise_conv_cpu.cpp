#include "cpu/pointwise_conv_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstdint>

#include "bn_stage_args.h"
#include "cpu/gemm_cpu.h"
#include "cpu/isa_dispatch.h"

namespace deeplab_ops {
namespace {

constexpr int64_t kMinOutput = int64_t{1} << 18;  // output values; below, ATen's convolution (conv_bias_act.cpp)
constexpr int64_t kRowBlock = 96;                  // output channels per tile: a multiple of both ISAs' 8 and 6 rows
constexpr int64_t kPanelBlock = 4;                 // 32-column panels per tile: 128 pixels

// The epilogue on rows [r0, r1) and columns [j0, j1) of one image's (cout x hw) output: + bias, + residual, ReLU,
// in that order (conv_bias_act's generic path adds the residual and applies the ReLU after the biased convolution).
// Inlined into run_isa's body: its loop vectorizes for the ISA's registers (the same operations, the same bits).
DLO_INLINE void epilogue(float* y, const float* bias, const float* residual, bool relu, int64_t hw, int64_t r0,
                         int64_t r1, int64_t j0, int64_t j1) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = y + r * hw;
    const float b = bias != nullptr ? bias[r] : 0.f;
    const float* res = residual != nullptr ? residual + r * hw : nullptr;
    for (int64_t j = j0; j < j1; ++j) {
      float v = row[j] + b;
      if (res != nullptr) v += res[j];
      // NaN stays NaN (as relu_): the comparison is false for it
      row[j] = relu && v < 0.f ? 0.f : v;
    }
  }
}

}  // namespace

bool nchw_pointwise_applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding) {
  if (!x.is_cpu() || x.scalar_type() != at::kFloat || x.dim() != 4 || weight.dim() != 4) return false;
  if (weight.size(2) != 1 || weight.size(3) != 1 || weight.size(1) != x.size(1)) return false;
  // Widening layers only (C_out >= C_in: a bottleneck's last 1x1, the residual's side). Narrowing ones (1024 -> 256,
  // 2048 -> 512 at 33 x 33) measured 0.82-0.88x ATen's convolution + epilogue at 2 threads on this project's EPYC,
  // where the widening ones measured 1.15-3.3x (docs/kernels.md).
  if (weight.size(0) < weight.size(1)) return false;
  if (stride[0] != 1 || stride[1] != 1 || padding[0] != 0 || padding[1] != 0) return false;
  // An NCHW x: contiguous, and not a tensor that is also channels_last (C = 1 or H = W = 1), which runs as it is.
  if (!x.is_contiguous() || x.suggest_memory_format() != at::MemoryFormat::Contiguous) return false;
  // The weight as a dense (cout, cin) row-major matrix: a contiguous 1x1 weight (a channels_last one is that too).
  if (weight.stride(1) != 1 || weight.stride(0) != weight.size(1)) return false;
  if (present(bias) && !bias->is_contiguous()) return false;
  // (its shape checked by the caller, conv_bias_act_cpu)
  if (present(residual) && !residual->is_contiguous()) return false;
  if (x.size(0) * weight.size(0) * x.size(2) * x.size(3) < kMinOutput) return false;
  return packed_gemm_is_float32();
}

at::Tensor nchw_pointwise_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, bool relu) {
  RECORD_FUNCTION("deeplab_ops::pointwise_conv_nchw", std::vector<c10::IValue>());
  const int64_t n = x.size(0), cin = x.size(1), hw = x.size(2) * x.size(3), cout = weight.size(0);
  const int64_t panels = gemm_panels(hw);
  at::Tensor out = at::empty({n, cout, x.size(2), x.size(3)}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor packed = at::empty({gemm_packed_size(cin, hw)}, x.options());
  const float* w = weight.const_data_ptr<float>();
  const float* b = present(bias) ? bias->const_data_ptr<float>() : nullptr;
  const float* res = present(residual) ? residual->const_data_ptr<float>() : nullptr;
  float* pk = packed.mutable_data_ptr<float>();
  const int64_t row_parts = (cout + kRowBlock - 1) / kRowBlock, panel_parts = (panels + kPanelBlock - 1) / kPanelBlock;
  const auto isa = cpu_isa::kernel_isa();
  for (int64_t i = 0; i < n; ++i) {
    const float* xi = x.const_data_ptr<float>() + i * cin * hw;
    float* yi = out.mutable_data_ptr<float>() + i * cout * hw;
    const float* ri = res != nullptr ? res + i * cout * hw : nullptr;
    // the image (cin rows of hw pixels) as the GEMM's B
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) { gemm_pack_panels(xi, hw, cin, hw, pk, p0, p1); });
    at::parallel_for(0, row_parts * panel_parts, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t / panel_parts * kRowBlock, p0 = t % panel_parts * kPanelBlock;
        const int64_t r1 = std::min(cout, r0 + kRowBlock), p1 = std::min(panels, p0 + kPanelBlock);
        packed_gemm(w + r0 * cin, cin, pk, cin, hw, yi + r0 * hw, hw, r1 - r0, p0, p1);
        cpu_isa::run_isa(
            isa,
            [&](int64_t, int64_t, auto) {
              epilogue(yi, b, ri, relu, hw, r0, r1, p0 * kGemmPanel, std::min(hw, p1 * kGemmPanel));
            },
            0, 1);
      }
    });
  }
  return out;
}

}  // namespace deeplab_ops
