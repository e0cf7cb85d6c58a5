// CPU kernels of upsample_cross_entropy (at::parallel_for, float32 and float64): the cross-entropy of bilinearly
// upsampled logits without the (N, K, H, W) upsampled tensor. Same algorithm as the Triton and CUDA kernels
// (deeplab_ops/triton/upsample_ce.py has the math):
//   forward   one task per block of output rows: each pixel's K logits are interpolated into a K-vector, then
//             logsumexp and the target logit; saves the per-pixel logsumexp; per-row partial sums, merged in
//             row order (deterministic for any thread count).
//   backward  gather form, one task per block of 8 low-res rows of one image: walks the output rows whose
//             stencil touches the block and adds each pixel's dz = g * (softmax - onehot) to the low-res rows and
//             columns it reads. Every output element has one owner: no atomics, deterministic. A pixel is
//             recomputed only where its two low-res rows lie in two blocks.
// Accumulation in at::acc_type (double for float on CPU), exponentials in the opmath type; the stencil (source
// index, neighbours, weights) in PyTorch's opmath type, with its formula, so the neighbours are PyTorch's.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/upsample_stencil.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

namespace deeplab_ops {
namespace {

using upsample_ce::Reduction;
using upsample_ce::parse_reduction;

constexpr int64_t kLowResRowBlock = 8;  // backward: low-res rows per task

// exp(v) of a logit minus the max or the logsumexp (v <= 0 up to rounding), in the opmath type as the CUDA and
// Triton kernels compute it (expf for float32: several times cheaper than exp in double); sums stay in acc_t.
template <typename opmath_t, typename acc_t>
inline opmath_t softmax_exp(acc_t v) {
  return std::exp(static_cast<opmath_t>(v));
}

template <typename opmath_t>
struct AxisStencil {
  std::vector<int64_t> i0, i1, start, end;
  std::vector<opmath_t> l0, l1;
};

template <typename opmath_t>
AxisStencil<opmath_t> axis_stencil(int64_t in, int64_t out, bool align_corners) {
  AxisStencil<opmath_t> s;
  s.i0.resize(out), s.i1.resize(out), s.l0.resize(out), s.l1.resize(out), s.start.resize(in), s.end.resize(in);
  upsample_ce::bilinear_axis_stencil(in, out, align_corners, s.i0.data(), s.i1.data(), s.start.data(),
                                     s.end.data(), s.l0.data(), s.l1.data());
  return s;
}

void check_uce_args(const at::Tensor& logits, const at::Tensor& target) {
  upsample_ce::check_args(logits, target);
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble,
              "deeplab_ops.upsample_cross_entropy: the CPU kernels take float32 or float64 logits, got ",
              logits.scalar_type());
}

// The value of a one-element CPU tensor, read in place: on the CPU its memory is the host's, so this is no host
// synchronization and runs no aten op (Tensor::item() would run _local_scalar_dense).
double read_one_value(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "deeplab_ops.upsample_cross_entropy: ", name, " must be on the CPU with the "
              "logits, got a tensor on ", t.device());
  TORCH_CHECK(t.numel() == 1, "deeplab_ops.upsample_cross_entropy: ", name, " must have one element, got shape ",
              t.sizes());
  double v = 0;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, t.scalar_type(), "read_one_value",
                             [&] { v = static_cast<double>(*t.const_data_ptr<scalar_t>()); });
  return v;
}

[[noreturn]] void raise_bad_label(const at::Tensor& target, int64_t flat, int64_t k, int64_t ignore_index) {
  const int64_t hw = target.size(1) * target.size(2);
  const int64_t label = target.reshape({-1})[flat].item<int64_t>();
  TORCH_CHECK_INDEX(false, "deeplab_ops.upsample_cross_entropy: target has label ", label, " at position (",
                    flat / hw, ", ", (flat % hw) / target.size(2), ", ", flat % target.size(2),
                    "); expected labels in [0, ", k, ") (K = logits.shape[1]) or ignore_index=", ignore_index);
}

// z[k] for one output pixel: PyTorch's nesting of the products (rows outside, columns inside).
template <typename scalar_t, typename acc_t, typename opmath_t>
inline void interpolate(const scalar_t* x, int64_t k, int64_t plane, int64_t o00, int64_t o01, int64_t o10,
                        int64_t o11, opmath_t ly0, opmath_t ly1, opmath_t lx0, opmath_t lx1, acc_t* z) {
  for (int64_t c = 0; c < k; ++c) {
    const scalar_t* p = x + c * plane;
    z[c] = static_cast<acc_t>(ly0) * (static_cast<acc_t>(lx0) * static_cast<acc_t>(p[o00]) +
                                      static_cast<acc_t>(lx1) * static_cast<acc_t>(p[o01])) +
           static_cast<acc_t>(ly1) * (static_cast<acc_t>(lx0) * static_cast<acc_t>(p[o10]) +
                                      static_cast<acc_t>(lx1) * static_cast<acc_t>(p[o11]));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> upsample_cross_entropy_forward_cpu(const at::Tensor& logits_,
                                                                                 const at::Tensor& target_,
                                                                                 int64_t ignore_index,
                                                                                 bool align_corners,
                                                                                 c10::string_view reduction_) {
  check_uce_args(logits_, target_);
  const Reduction reduction = parse_reduction(std::string(reduction_));
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor target = target_.contiguous();
  const int64_t n = logits.size(0), k = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  const auto opmath = logits.scalar_type();  // float32 or float64: its own opmath type
  at::Tensor lse = at::empty({n, H, W}, logits.options().dtype(opmath));
  at::Tensor loss = reduction == Reduction::kNone ? at::empty({n, H, W}, logits.options()) : at::Tensor();
  at::Tensor valid_count = at::empty({}, logits.options().dtype(opmath));
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "upsample_cross_entropy_forward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using opmath_t = at::opmath_type<scalar_t>;
    const auto ys = axis_stencil<opmath_t>(h, H, align_corners);
    const auto xs = axis_stencil<opmath_t>(w, W, align_corners);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* loss_p = reduction == Reduction::kNone ? loss.data_ptr<scalar_t>() : nullptr;
    const int64_t rows = n * H;
    std::vector<acc_t> row_sum(rows, acc_t(0));
    std::vector<int64_t> row_count(rows, 0), row_bad(rows, -1);
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(W * k, 1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(k);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, oy = row % H;
        const scalar_t* xb = x + b * k * h * w;
        const int64_t r0 = ys.i0[oy] * w, r1 = ys.i1[oy] * w;
        acc_t sum = 0;
        int64_t count = 0;
        for (int64_t ox = 0; ox < W; ++ox) {
          const int64_t pix = row * W + ox;
          const int64_t label = t[pix];
          interpolate(xb, k, h * w, r0 + xs.i0[ox], r0 + xs.i1[ox], r1 + xs.i0[ox], r1 + xs.i1[ox], ys.l0[oy],
                      ys.l1[oy], xs.l0[ox], xs.l1[ox], z.data());
          acc_t m = -std::numeric_limits<acc_t>::infinity();
          for (int64_t c = 0; c < k; ++c) m = std::max(m, z[c]);
          acc_t s = 0;
          for (int64_t c = 0; c < k; ++c) s += static_cast<acc_t>(softmax_exp<opmath_t>(z[c] - m));
          const acc_t l = m + std::log(s);
          lse_p[pix] = static_cast<scalar_t>(l);
          acc_t px = 0;
          if (label != ignore_index) {
            if (label < 0 || label >= k) {
              if (row_bad[row] < 0) row_bad[row] = pix;
              continue;
            }
            px = l - z[label];
            sum += px;
            ++count;
          }
          if (loss_p) loss_p[pix] = static_cast<scalar_t>(px);
        }
        row_sum[row] = sum;
        row_count[row] = count;
      }
    });
    for (int64_t row = 0; row < rows; ++row) {
      if (row_bad[row] >= 0) raise_bad_label(target, row_bad[row], k, ignore_index);
    }
    acc_t sum = 0;
    int64_t count = 0;
    for (int64_t row = 0; row < rows; ++row) {
      sum += row_sum[row];
      count += row_count[row];
    }
    // The scalar outputs are written in place, as the kernels write the others (no fill_ op per call).
    *valid_count.data_ptr<scalar_t>() = static_cast<scalar_t>(count);
    if (reduction != Reduction::kNone) {
      // mean over no valid pixel: 0 / 0 = NaN, as PyTorch.
      const acc_t value = reduction == Reduction::kMean ? sum / static_cast<acc_t>(count) : sum;
      total = at::empty({}, logits.options());
      *total.data_ptr<scalar_t>() = static_cast<scalar_t>(value);
    }
  });
  return {reduction == Reduction::kNone ? loss : total, lse, valid_count};
}

at::Tensor upsample_cross_entropy_backward_cpu(const at::Tensor& grad_, const at::Tensor& logits_,
                                               const at::Tensor& target_, const at::Tensor& lse_,
                                               const at::Tensor& valid_count, int64_t ignore_index,
                                               bool align_corners, c10::string_view reduction_) {
  check_uce_args(logits_, target_);
  const Reduction reduction = parse_reduction(std::string(reduction_));
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor target = target_.contiguous();
  const int64_t n = logits.size(0), k = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int64_t H = target.size(1), W = target.size(2);
  TORCH_CHECK(lse_.sizes() == target.sizes(), "deeplab_ops.upsample_cross_entropy: lse must have shape ",
              target.sizes(), " (like target), got ", lse_.sizes());
  if (reduction == Reduction::kNone) {
    TORCH_CHECK(grad_.sizes() == target.sizes(), "deeplab_ops.upsample_cross_entropy: grad must have shape ",
                target.sizes(), " for reduction='none', got ", grad_.sizes());
  } else {
    TORCH_CHECK(grad_.numel() == 1, "deeplab_ops.upsample_cross_entropy: grad must have one element for reduction='",
                std::string(reduction_), "', got shape ", grad_.sizes());
  }
  at::Tensor grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "upsample_cross_entropy_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using opmath_t = at::opmath_type<scalar_t>;
    const auto ys = axis_stencil<opmath_t>(h, H, align_corners);
    const auto xs = axis_stencil<opmath_t>(w, W, align_corners);
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    // lse and the per-pixel grad are read in the logits' dtype, as the forward writes them (widened to acc_t
    // exactly, value by value): no conversion copy per call. Other dtypes (direct op calls) are converted once.
    const auto dtype = logits.scalar_type();
    const at::Tensor lse = lse_.scalar_type() == dtype ? lse_.contiguous() : lse_.to(dtype).contiguous();
    const scalar_t* lse_p = lse.const_data_ptr<scalar_t>();
    at::Tensor grad_px;
    const scalar_t* g_p = nullptr;
    acc_t g_all = 0;
    if (reduction == Reduction::kNone) {
      grad_px = grad_.scalar_type() == dtype ? grad_.contiguous() : grad_.to(dtype).contiguous();
      g_p = grad_px.const_data_ptr<scalar_t>();
    } else {
      g_all = static_cast<acc_t>(read_one_value(grad_, "grad"));
      if (reduction == Reduction::kMean) g_all /= static_cast<acc_t>(read_one_value(valid_count, "valid_count"));
    }
    scalar_t* dx = grad_logits.data_ptr<scalar_t>();
    // One task per block of kLowResRowBlock low-res rows (b, i): the output rows whose stencil touches a row of the
    // block, in order; each pixel's dz once per block (twice only for output rows between two blocks), added to the
    // block's rows. Each low-res row's sum runs over the same output rows in the same order whatever the blocks.
    const int64_t blocks_per_image = (h + kLowResRowBlock - 1) / kLowResRowBlock;
    at::parallel_for(0, n * blocks_per_image, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> z(k), dz(k), acc(kLowResRowBlock * k * w);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks_per_image;
        const int64_t ia = (task % blocks_per_image) * kLowResRowBlock, ie = std::min(h, ia + kLowResRowBlock);
        const scalar_t* xb = x + b * k * h * w;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t oy = ys.start[ia]; oy < ys.end[ie - 1]; ++oy) {
          const int64_t i0 = ys.i0[oy], i1 = ys.i1[oy];
          // Weight of each block row in output row oy (both terms when i0 == i1, at the last row).
          const bool in0 = i0 >= ia && i0 < ie, in1 = i1 >= ia && i1 < ie && i1 != i0;
          const acc_t wy0 = in0 ? static_cast<acc_t>(ys.l0[oy]) + (i1 == i0 ? static_cast<acc_t>(ys.l1[oy]) : acc_t(0))
                                : acc_t(0);
          const acc_t wy1 = in1 ? static_cast<acc_t>(ys.l1[oy]) : acc_t(0);
          if (wy0 == acc_t(0) && wy1 == acc_t(0)) continue;
          const int64_t r0 = i0 * w, r1 = i1 * w;
          for (int64_t ox = 0; ox < W; ++ox) {
            const int64_t pix = (b * H + oy) * W + ox;
            const int64_t label = t[pix];
            if (label == ignore_index) continue;
            TORCH_CHECK_INDEX(label >= 0 && label < k, "deeplab_ops.upsample_cross_entropy: target has label ",
                              label, " at flat position ", pix, "; expected labels in [0, ", k,
                              ") or ignore_index=", ignore_index);
            const acc_t g = g_p ? static_cast<acc_t>(g_p[pix]) : g_all;
            interpolate(xb, k, h * w, r0 + xs.i0[ox], r0 + xs.i1[ox], r1 + xs.i0[ox], r1 + xs.i1[ox], ys.l0[oy],
                        ys.l1[oy], xs.l0[ox], xs.l1[ox], z.data());
            const acc_t l = static_cast<acc_t>(lse_p[pix]);
            for (int64_t c = 0; c < k; ++c) {
              dz[c] = g * (static_cast<acc_t>(softmax_exp<opmath_t>(z[c] - l)) - (c == label ? acc_t(1) : acc_t(0)));
            }
            const int64_t c0 = xs.i0[ox], c1 = xs.i1[ox];
            const acc_t lx0 = static_cast<acc_t>(xs.l0[ox]), lx1 = static_cast<acc_t>(xs.l1[ox]);
            for (const auto& [in, row, wy] : {std::tuple<bool, int64_t, acc_t>{in0, i0, wy0}, {in1, i1, wy1}}) {
              if (!in || wy == acc_t(0)) continue;
              acc_t* a = acc.data() + (row - ia) * k * w;
              const acc_t w0 = wy * lx0, w1 = wy * lx1;
              for (int64_t c = 0; c < k; ++c) {
                a[c * w + c0] += w0 * dz[c];
                a[c * w + c1] += w1 * dz[c];
              }
            }
          }
        }
        for (int64_t i = ia; i < ie; ++i) {
          const acc_t* a = acc.data() + (i - ia) * k * w;
          for (int64_t c = 0; c < k; ++c) {
            scalar_t* out = dx + ((b * k + c) * h + i) * w;
            for (int64_t j = 0; j < w; ++j) out[j] = static_cast<scalar_t>(a[c * w + j]);
          }
        }
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CPU, m) {
  m.impl("upsample_cross_entropy_forward", &upsample_cross_entropy_forward_cpu);
  m.impl("upsample_cross_entropy_backward", &upsample_cross_entropy_backward_cpu);
}

}  // namespace deeplab_ops
