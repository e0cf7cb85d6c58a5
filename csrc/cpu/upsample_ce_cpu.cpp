// CPU kernels of upsample_cross_entropy (at::parallel_for, float32 and float64): the cross-entropy of bilinearly
// upsampled logits without the (N, K, H, W) upsampled tensor. Same math as the Triton and CUDA kernels
// (deeplab_ops/triton/upsample_ce.py), laid out for a CPU's vector units: work runs row by row, class by class,
// with the pixels of an output row as the inner (vectorized) loop.
//   forward   one task per block of output rows: the low-res rows a row reads are interpolated along x once
//             (reused by the next output rows), the output row is their y blend; then per pixel logsumexp and
//             the target logit; saves the per-pixel logsumexp; per-row partial sums, merged in row order
//             (deterministic for any thread count).
//   backward  gather form, one task per block of 8 low-res rows of one image: walks the output rows whose
//             stencil touches the block, sums dz = g * (softmax - onehot) of each row into the block's rows (at
//             output width, y-weighted), then spreads each summed row to the low-res columns. Every output element
//             has one owner: no atomics, deterministic. A pixel is recomputed only where its two low-res rows lie
//             in two blocks.
// Accumulation in at::acc_type (double for float on CPU), exponentials in the opmath type; the stencil (source
// index, neighbours, weights) in PyTorch's opmath type, with its formula, so the neighbours are PyTorch's. Each
// task runs in the baseline, AVX2 or AVX-512 build (cpu/isa_dispatch.h), all of which give the same bits.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/upsample_stencil.h"
#include "cpu/isa_dispatch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace deeplab_ops {
namespace {

using upsample_ce::Reduction;
using upsample_ce::parse_reduction;

constexpr int64_t kLowResRowBlock = 8;  // backward: low-res rows per task

template <typename opmath_t>
struct AxisStencil {
  std::vector<int64_t> i0, i1, start, end;
  std::vector<opmath_t> l0, l1;
};

template <typename opmath_t>
AxisStencil<opmath_t> axis_stencil(int64_t in, int64_t out, bool align_corners) {
  AxisStencil<opmath_t> s;
  s.i0.resize(out), s.i1.resize(out), s.l0.resize(out), s.l1.resize(out), s.start.resize(in), s.end.resize(in);
  upsample_ce::bilinear_axis_stencil(in, out, align_corners, /*cpu_rule=*/true, s.i0.data(), s.i1.data(),
                                     s.start.data(), s.end.data(), s.l0.data(), s.l1.data());
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

// exp in the opmath type. float32: range reduction by ln 2 (split in two parts, the first exact in few bits) and
// the degree-7 Taylor polynomial of e^r on |r| <= ln2/2 (truncation below 0.1 ulp), scaled by 2^n built from its
// exponent bits: within about 1 ulp of expf, and with no library call, so the loops over a row's pixels
// vectorize. Below -87.33 it returns 0 (expf would return a denormal under 1.2e-38), above 88.72 infinity, NaN for
// NaN; on (88, 88.72] exp(88) (the clamp keeps 2^n a normal float; the callers pass z - max <= 0). float64 (the
// gradcheck dtype) uses std::exp.
template <typename opmath_t>
inline opmath_t exp_opmath(opmath_t x) {
  return std::exp(x);
}

template <>
inline float exp_opmath<float>(float x) {
  // NaN -> -87.33, the underflow cut below: the integer part is always defined, n >= -126 (a normal 2^n)
  float xc = x >= -87.33f ? x : -87.33f;
  xc = xc <= 88.0f ? xc : 88.0f;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float n = (xc * 1.44269504088896341f + round_magic) - round_magic;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float v = p * scale;
  return x != x ? x : (x < -87.33f ? 0.0f : (x > 88.72f ? std::numeric_limits<float>::infinity() : v));
}

// One low-res row (all K classes, `plane` apart from class to class) interpolated along x to the output width:
// dst[c][ox] = lx0[ox] * row[c0[ox]] + lx1[ox] * row[c1[ox]] (PyTorch's inner product pair).
template <typename scalar_t, typename acc_t>
void interpolate_x(const scalar_t* row, int64_t k, int64_t plane, int64_t W,
                                          const int64_t* c0, const int64_t* c1, const acc_t* lx0,
                                          const acc_t* lx1, acc_t* dst) {
  for (int64_t c = 0; c < k; ++c) {
    const scalar_t* p = row + c * plane;
    acc_t* d = dst + c * W;
    for (int64_t ox = 0; ox < W; ++ox) {
      d[ox] = lx0[ox] * static_cast<acc_t>(p[c0[ox]]) + lx1[ox] * static_cast<acc_t>(p[c1[ox]]);
    }
  }
}

// An output row from the two x-interpolated low-res rows it reads: z = ly0 * h0 + ly1 * h1 (PyTorch's outer pair).
template <typename acc_t>
void blend_rows(const acc_t* __restrict h0, const acc_t* __restrict h1, acc_t ly0, acc_t ly1,
                                       int64_t n, acc_t* __restrict z) {
  for (int64_t e = 0; e < n; ++e) z[e] = ly0 * h0[e] + ly1 * h1[e];
}

// Bilinear interpolation in two passes, with PyTorch's nesting of the products (columns inside, rows outside):
// a low-res row is first interpolated along x to the output width (once, reused by every output row that reads
// it), then each output row is ly0 * row(i0) + ly1 * row(i1). Layout of a row buffer: [K][W], in acc_t.
template <typename scalar_t, typename acc_t>
struct RowInterpolator {
  const scalar_t* x;  // logits, contiguous (N, K, h, w)
  int64_t k, h, w, W;
  const int64_t* c0;  // per output column: its two low-res columns and their weights
  const int64_t* c1;
  const acc_t* lx0;
  const acc_t* lx1;
  std::vector<acc_t> buf[2];
  int64_t key[2] = {-1, -1};

  RowInterpolator(const scalar_t* x_, int64_t k_, int64_t h_, int64_t w_, int64_t W_, const int64_t* c0_,
                  const int64_t* c1_, const acc_t* lx0_, const acc_t* lx1_)
      : x(x_), k(k_), h(h_), w(w_), W(W_), c0(c0_), c1(c1_), lx0(lx0_), lx1(lx1_) {
    buf[0].resize(k * W);
    buf[1].resize(k * W);
  }

  void fill(acc_t* dst, int64_t b, int64_t i) const {
    interpolate_x(x + (b * k * h + i) * w, k, h * w, W, c0, c1, lx0, lx1, dst);
  }

  // The x-interpolated low-res rows i0 and i1 of image b (i1 == i0 or i0 + 1; i0 non-decreasing from call to
  // call, so each row is interpolated once per run of output rows).
  std::pair<const acc_t*, const acc_t*> rows(int64_t b, int64_t i0, int64_t i1) {
    const int64_t k0 = b * h + i0, k1 = b * h + i1;
    if (key[0] != k0) {
      if (key[1] == k0) {
        std::swap(buf[0], buf[1]);
        std::swap(key[0], key[1]);
      } else {
        fill(buf[0].data(), b, i0);
        key[0] = k0;
      }
    }
    if (k1 == k0) return {buf[0].data(), buf[0].data()};
    if (key[1] != k1) {
      fill(buf[1].data(), b, i1);
      key[1] = k1;
    }
    return {buf[0].data(), buf[1].data()};
  }

  // z[c][ox] of output row oy of image b.
  void output_row(int64_t b, int64_t i0, int64_t i1, acc_t ly0, acc_t ly1, acc_t* z) {
    const auto [h0, h1] = rows(b, i0, i1);
    blend_rows(h0, h1, ly0, ly1, k * W, z);
  }
};

// Per pixel of a row, the logsumexp's two parts: m = max_c z and, in s, log(sum_c exp(z - m)). Class by class over
// the row, so the inner loops run over pixels (vectorized); each pixel's sum adds its classes in order.
template <typename acc_t, typename opmath_t>
void row_logsumexp(const acc_t* __restrict z, int64_t k, int64_t W, acc_t* __restrict m, acc_t* __restrict s) {
  for (int64_t ox = 0; ox < W; ++ox) m[ox] = -std::numeric_limits<acc_t>::infinity(), s[ox] = acc_t(0);
  for (int64_t c = 0; c < k; ++c) {
    const acc_t* zc = z + c * W;
    for (int64_t ox = 0; ox < W; ++ox) m[ox] = m[ox] < zc[ox] ? zc[ox] : m[ox];
  }
  for (int64_t c = 0; c < k; ++c) {
    const acc_t* zc = z + c * W;
    for (int64_t ox = 0; ox < W; ++ox) s[ox] += static_cast<acc_t>(exp_opmath(static_cast<opmath_t>(zc[ox] - m[ox])));
  }
  for (int64_t ox = 0; ox < W; ++ox) s[ox] = std::log(s[ox]);
}

// One output row's dz = g * (softmax(z) - onehot), class by class, added y-weighted into the block rows v0
// (weight wy0) and v1 (wy1) the row reads (nullptr: outside the task's block). dz overwrites z; m and s are scratch
// (W). Ignored pixels (label < 0 here) add nothing, whatever their logits. softmax = exp(z - m) / sum_c exp(z_c - m)
// with m = max_c z recomputed here from the very z of the forward (acc_t): exact, whatever the logits' magnitude.
// (The forward's logsumexp is stored in the logits' dtype: for float32 rebuilt from it, it is off by up to
// |max| * 2^-24, which for logits beyond about 1e9 overflows or underflows every exp(z - lse) and made the
// gradient NaN.)
template <typename acc_t, typename opmath_t>
void softmax_grad_row(acc_t* __restrict z, acc_t* __restrict m, const acc_t* __restrict g,
                      const int64_t* __restrict label, int64_t k, int64_t W, acc_t wy0, acc_t* v0, acc_t wy1,
                      acc_t* v1, acc_t* __restrict s) {
  for (int64_t ox = 0; ox < W; ++ox) s[ox] = acc_t(0), m[ox] = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < k; ++c) {
    const acc_t* zc = z + c * W;
    for (int64_t ox = 0; ox < W; ++ox) m[ox] = m[ox] < zc[ox] ? zc[ox] : m[ox];
  }
  for (int64_t c = 0; c < k; ++c) {
    acc_t* e = z + c * W;
    for (int64_t ox = 0; ox < W; ++ox) {
      e[ox] = static_cast<acc_t>(exp_opmath(static_cast<opmath_t>(e[ox] - m[ox])));
      s[ox] += e[ox];
    }
  }
  for (int64_t ox = 0; ox < W; ++ox) s[ox] = g[ox] / s[ox];  // g / sum: one division per pixel
  for (int64_t c = 0; c < k; ++c) {
    acc_t* dz = z + c * W;
    for (int64_t ox = 0; ox < W; ++ox) {
      // An ignored pixel (label -1, g 0) gives 0, or NaN where its z is not finite: eager's log_softmax backward
      // (g - exp(out) * sum g) carries that NaN to the logits, and so does this.
      dz[ox] = s[ox] * dz[ox] - (label[ox] == c ? g[ox] : acc_t(0));
    }
    if (v0) {
      acc_t* r = v0 + c * W;
      for (int64_t ox = 0; ox < W; ++ox) r[ox] += wy0 * dz[ox];
    }
    if (v1) {
      acc_t* r = v1 + c * W;
      for (int64_t ox = 0; ox < W; ++ox) r[ox] += wy1 * dz[ox];
    }
  }
}

// Both axes' stencils of a call, and the x weights widened to acc_t for the row loops.
template <typename opmath_t, typename acc_t>
struct Stencils {
  AxisStencil<opmath_t> ys, xs;
  std::vector<acc_t> lx0, lx1;
  Stencils(int64_t h, int64_t H, int64_t w, int64_t W, bool align_corners)
      : ys(axis_stencil<opmath_t>(h, H, align_corners)), xs(axis_stencil<opmath_t>(w, W, align_corners)),
        lx0(xs.l0.begin(), xs.l0.end()), lx1(xs.l1.begin(), xs.l1.end()) {}
};

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
  // The logsumexp as its two parts (the op's contract, csrc/ops.cpp): lse[0] the maximum, lse[1] the log-sum.
  at::Tensor lse = at::empty({2, n, H, W}, logits.options().dtype(opmath));
  const int64_t plane = n * H * W;
  at::Tensor loss = reduction == Reduction::kNone ? at::empty({n, H, W}, logits.options()) : at::Tensor();
  at::Tensor valid_count = at::empty({}, logits.options().dtype(opmath));
  at::Tensor total;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "upsample_cross_entropy_forward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using opmath_t = at::opmath_type<scalar_t>;
    const Stencils<opmath_t, acc_t> st(h, H, w, W, align_corners);
    const auto &ys = st.ys, &xs = st.xs;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    scalar_t* lse_p = lse.data_ptr<scalar_t>();
    scalar_t* loss_p = reduction == Reduction::kNone ? loss.data_ptr<scalar_t>() : nullptr;
    const int64_t rows = n * H;
    std::vector<acc_t> row_sum(rows, acc_t(0));
    std::vector<int64_t> row_count(rows, 0), row_bad(rows, -1);
    const auto isa = cpu_isa::kernel_isa();
    auto body = [&](int64_t begin, int64_t end, auto /*vector width*/) {
      RowInterpolator<scalar_t, acc_t> interp(x, k, h, w, W, xs.i0.data(), xs.i1.data(), st.lx0.data(),
                                              st.lx1.data());
      std::vector<acc_t> z(k * W), m(W), s(W);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, oy = row % H;
        interp.output_row(b, ys.i0[oy], ys.i1[oy], static_cast<acc_t>(ys.l0[oy]), static_cast<acc_t>(ys.l1[oy]),
                          z.data());
        row_logsumexp<acc_t, opmath_t>(z.data(), k, W, m.data(), s.data());
        acc_t sum = 0;
        int64_t count = 0;
        for (int64_t ox = 0; ox < W; ++ox) {
          const int64_t pix = row * W + ox;
          const int64_t label = t[pix];
          lse_p[pix] = static_cast<scalar_t>(m[ox]);
          lse_p[plane + pix] = static_cast<scalar_t>(s[ox]);
          acc_t px = 0;
          if (label != ignore_index) {
            if (label < 0 || label >= k) {
              if (row_bad[row] < 0) row_bad[row] = pix;
              continue;
            }
            px = (m[ox] - z[label * W + ox]) + s[ox];
            sum += px;
            ++count;
          }
          if (loss_p) loss_p[pix] = static_cast<scalar_t>(px);
        }
        row_sum[row] = sum;
        row_count[row] = count;
      }
    };
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(W * k, 1)),
                     [&](int64_t begin, int64_t end) { cpu_isa::run_isa(isa, body, begin, end); });
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
  upsample_ce::check_backward_shapes(grad_, target, lse_, reduction, std::string(reduction_));
  at::Tensor grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "upsample_cross_entropy_backward_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using opmath_t = at::opmath_type<scalar_t>;
    const Stencils<opmath_t, acc_t> st(h, H, w, W, align_corners);
    const auto &ys = st.ys, &xs = st.xs;
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    const int64_t* t = target.const_data_ptr<int64_t>();
    // The per-pixel grad is read in the logits' dtype (widened to acc_t exactly, value by value): no conversion
    // copy per call; other dtypes (direct op calls) are converted once. lse (checked above, the op's contract) is
    // not read: each pixel's maximum is recomputed from the same z as the forward's, in acc_t (softmax_grad_row).
    const auto dtype = logits.scalar_type();
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
    // block, in order. Each pixel's dz = g * (softmax - onehot) once per block (twice only for output rows between
    // two blocks); the y-weighted dz of the output rows is summed per low-res row at output width, then spread to
    // the low-res columns (the transpose of the x interpolation) once per low-res row. Each low-res row's sums run
    // over the same output rows and columns in the same order whatever the blocks and threads: deterministic.
    const int64_t blocks_per_image = (h + kLowResRowBlock - 1) / kLowResRowBlock;
    const auto isa = cpu_isa::kernel_isa();
    auto body = [&](int64_t begin, int64_t end, auto /*vector width*/) {
      RowInterpolator<scalar_t, acc_t> interp(x, k, h, w, W, xs.i0.data(), xs.i1.data(), st.lx0.data(),
                                              st.lx1.data());
      std::vector<acc_t> z(k * W), g(W), m(W), sums(W), v(kLowResRowBlock * k * W), a(w);
      std::vector<int64_t> label(W);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks_per_image;
        const int64_t ia = (task % blocks_per_image) * kLowResRowBlock, ie = std::min(h, ia + kLowResRowBlock);
        std::fill(v.begin(), v.end(), acc_t(0));
        for (int64_t oy = ys.start[ia]; oy < ys.end[ie - 1]; ++oy) {
          const int64_t i0 = ys.i0[oy], i1 = ys.i1[oy];
          // Weight of each block row in output row oy. Where i0 == i1 (the last row; every row of an axis of equal
          // sizes) both terms go to that row one after the other (v1 == v0), as eager's upsample backward adds them:
          // l0 * dz + l1 * dz, NaN for an infinite dz where (l0 + l1) * dz would be infinite.
          const bool in0 = i0 >= ia && i0 < ie, in1 = i1 >= ia && i1 < ie;
          const acc_t wy0 = in0 ? static_cast<acc_t>(ys.l0[oy]) : acc_t(0);
          const acc_t wy1 = in1 ? static_cast<acc_t>(ys.l1[oy]) : acc_t(0);
          // A weight-0 row is not skipped: 0 * a NaN dz reaches the logits, as in eager's upsample backward.
          if (!in0 && !in1) continue;
          const int64_t row_pix = (b * H + oy) * W;
          for (int64_t ox = 0; ox < W; ++ox) {
            const int64_t lab = t[row_pix + ox];
            if (lab == ignore_index) {
              label[ox] = -1, g[ox] = acc_t(0);
              continue;
            }
            TORCH_CHECK_INDEX(lab >= 0 && lab < k, "deeplab_ops.upsample_cross_entropy: target has label ", lab,
                              " at flat position ", row_pix + ox, "; expected labels in [0, ", k,
                              ") or ignore_index=", ignore_index);
            label[ox] = lab;
            g[ox] = g_p ? static_cast<acc_t>(g_p[row_pix + ox]) : g_all;
          }
          interp.output_row(b, i0, i1, static_cast<acc_t>(ys.l0[oy]), static_cast<acc_t>(ys.l1[oy]), z.data());
          acc_t* v0 = in0 ? v.data() + (i0 - ia) * k * W : nullptr;
          acc_t* v1 = in1 ? v.data() + (i1 - ia) * k * W : nullptr;
          softmax_grad_row<acc_t, opmath_t>(z.data(), m.data(), g.data(), label.data(), k, W, wy0, v0, wy1, v1,
                                            sums.data());
        }
        for (int64_t i = ia; i < ie; ++i) {
          for (int64_t c = 0; c < k; ++c) {
            const acc_t* r = v.data() + ((i - ia) * k + c) * W;
            std::fill(a.begin(), a.end(), acc_t(0));
            for (int64_t ox = 0; ox < W; ++ox) {
              a[xs.i0[ox]] += st.lx0[ox] * r[ox];
              a[xs.i1[ox]] += st.lx1[ox] * r[ox];
            }
            scalar_t* out = dx + ((b * k + c) * h + i) * w;
            for (int64_t j = 0; j < w; ++j) out[j] = static_cast<scalar_t>(a[j]);
          }
        }
      }
    };
    at::parallel_for(0, n * blocks_per_image, 1,
                     [&](int64_t begin, int64_t end) { cpu_isa::run_isa(isa, body, begin, end); });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CPU, m) {
  m.impl("upsample_cross_entropy_forward", &upsample_cross_entropy_forward_cpu);
  m.impl("upsample_cross_entropy_backward", &upsample_cross_entropy_backward_cpu);
}

}  // namespace deeplab_ops
