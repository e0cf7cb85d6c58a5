// Host-side pieces of upsample_cross_entropy shared by the CPU and CUDA kernels: the per-axis bilinear stencil
// (PyTorch's upsample_bilinear2d source-index rule) and the argument checks every backend makes.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace deeplab_ops {
namespace upsample_ce {

enum class Reduction { kNone, kMean, kSum };

inline Reduction parse_reduction(const std::string& r) {
  if (r == "none") return Reduction::kNone;
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  TORCH_CHECK(false, "deeplab_ops.upsample_cross_entropy: reduction='", r, "'; expected 'none', 'mean' or 'sum'");
}

// Shapes, dtypes and devices every backend checks; each adds its own limits (dtypes, index width).
inline void check_args(const at::Tensor& logits, const at::Tensor& target) {
  TORCH_CHECK(logits.dim() == 4, "deeplab_ops.upsample_cross_entropy: logits must be a 4-D (N, K, h, w) tensor, got shape ",
              logits.sizes());
  TORCH_CHECK(target.dim() == 3, "deeplab_ops.upsample_cross_entropy: target must be a 3-D (N, H, W) tensor, got shape ",
              target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, "deeplab_ops.upsample_cross_entropy: target has dtype ",
              target.scalar_type(), "; expected int64 (Long) class indices");
  TORCH_CHECK(target.device() == logits.device(), "deeplab_ops.upsample_cross_entropy: target is on ",
              target.device(), " but logits is on ", logits.device());
  TORCH_CHECK(target.size(0) == logits.size(0), "deeplab_ops.upsample_cross_entropy: target has batch size ",
              target.size(0), " but logits has ", logits.size(0));
  TORCH_CHECK(logits.size(1) >= 1 && logits.size(2) >= 1 && logits.size(3) >= 1 && target.size(1) >= 1 &&
                  target.size(2) >= 1,
              "deeplab_ops.upsample_cross_entropy: logits ", logits.sizes(), " and target ", target.sizes(),
              " must have K >= 1 and non-empty spatial sizes");
}

// The backward's own tensors against the forward's target: lse (the forward's max and log-sum planes) and grad (one
// value per pixel for reduction 'none', one in all otherwise). Every backend checks these; the CUDA one adds devices.
inline void check_backward_shapes(const at::Tensor& grad, const at::Tensor& target, const at::Tensor& lse,
                                  Reduction reduction, const std::string& reduction_name) {
  TORCH_CHECK(lse.dim() == 4 && lse.size(0) == 2 && lse.sizes().slice(1) == target.sizes(),
              "deeplab_ops.upsample_cross_entropy: lse must have shape (2, ", target.size(0), ", ", target.size(1),
              ", ", target.size(2), ") (the forward's max and log-sum planes), got ", lse.sizes());
  if (reduction == Reduction::kNone) {
    TORCH_CHECK(grad.sizes() == target.sizes(), "deeplab_ops.upsample_cross_entropy: grad must have shape ",
                target.sizes(), " for reduction='none', got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, "deeplab_ops.upsample_cross_entropy: grad must have one element for reduction='",
                reduction_name, "', got shape ", grad.sizes());
  }
}

// Per-axis bilinear stencil for `in` low-res positions read by `out` output positions, with PyTorch's formula
// in its opmath type (scale from the sizes; without align_corners src = scale * (o + 0.5) - 0.5 clamped at 0),
// so the neighbours are PyTorch's: output o reads i0[o] (weight l0[o]) and i1[o] (weight l1[o]). For each
// low-res index i, the outputs reading it are [start[i], end[i]) (i0 and i1 are non-decreasing, so they are
// contiguous). Arrays: i0, i1, l0, l1 of length out; start, end of length in.
// cpu_rule: PyTorch's CPU kernel reads an axis whose sizes are equal one to one (both neighbours the output's own
// index, weights 1 and 0), where its CUDA kernel reads the next index with weight 0 (as on every other axis): a
// non-finite logit then stays at its pixel on the CPU (0 * inf = NaN spreads to its neighbour on CUDA). Each
// backend follows its device's eager rule.
template <typename index_t, typename opmath_t>
void bilinear_axis_stencil(int64_t in, int64_t out, bool align_corners, bool cpu_rule, index_t* i0, index_t* i1,
                           index_t* start, index_t* end, opmath_t* l0, opmath_t* l1) {
  if (cpu_rule && in == out) {
    for (int64_t o = 0; o < out; ++o) {
      i0[o] = i1[o] = static_cast<index_t>(o);
      l0[o] = opmath_t(1);
      l1[o] = opmath_t(0);
    }
    for (int64_t i = 0; i < in; ++i) {
      start[i] = static_cast<index_t>(i);
      end[i] = static_cast<index_t>(i + 1);
    }
    return;
  }
  opmath_t scale;
  if (align_corners) {
    scale = out > 1 ? static_cast<opmath_t>(in - 1) / static_cast<opmath_t>(out - 1) : opmath_t(0);
  } else {
    scale = static_cast<opmath_t>(in) / static_cast<opmath_t>(out);
  }
  for (int64_t o = 0; o < out; ++o) {
    opmath_t src;
    if (align_corners) {
      src = scale * static_cast<opmath_t>(o);
    } else {
      src = scale * (static_cast<opmath_t>(o) + opmath_t(0.5)) - opmath_t(0.5);
      src = src < opmath_t(0) ? opmath_t(0) : src;
    }
    const int64_t a = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const opmath_t lam = std::min(std::max(src - static_cast<opmath_t>(a), opmath_t(0)), opmath_t(1));
    i0[o] = static_cast<index_t>(a);
    i1[o] = static_cast<index_t>(a + (a < in - 1 ? 1 : 0));
    l1[o] = lam;
    l0[o] = opmath_t(1) - lam;
  }
  for (int64_t i = 0; i < in; ++i) {
    start[i] = static_cast<index_t>(std::lower_bound(i1, i1 + out, static_cast<index_t>(i)) - i1);
    end[i] = static_cast<index_t>(std::upper_bound(i0, i0 + out, static_cast<index_t>(i)) - i0);
  }
}

}  // namespace upsample_ce
}  // namespace deeplab_ops
