// CPU kernels of the BatchNorm stages (at::parallel_for), for NCHW and channels_last activations.
//
// Reductions accumulate in double for float inputs (at::acc_type on CPU), element-wise passes compute
// in the opmath type. Statistics are two-level: each block of values gives an exact (count, mean, M2)
// by two passes over data that is still in cache, and blocks are merged with Chan's formula.
//
// Speed: every inner loop is a branch-free pass over contiguous memory with per-channel constants
// hoisted out of it, so that the compiler vectorizes it. Contiguous
// reductions (NCHW planes) keep kLanes independent partial sums: one running sum would be a chain of
// dependent double additions, latency-bound at a few cycles per value. The summation order is fixed by
// the shape alone (planes, chunks, lanes, row blocks), never by the thread count: results are
// reproducible run to run and for any number of threads.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "bn_stage_args.h"
#include "common/activation_layout.h"
#include "common/arg_checks.h"
#include "common/bn_math.h"

namespace deeplab_ops {
namespace {

constexpr int64_t kPlaneChunk = 4096;  // NCHW: values per (count, mean, M2) block
constexpr int64_t kRowBlock = 64;      // NHWC: rows (pixels) per block
constexpr int kLanes = 8;              // independent partial sums of a contiguous reduction
constexpr int64_t kGradBuf = 256;      // values of act_grad(dz, z) computed ahead of a backward pass

// The kLanes partial sums added in a fixed tree.
template <typename acc_t>
inline acc_t lanes_total(const acc_t* s) {
  static_assert(kLanes == 8, "lanes_total adds 8 lanes");
  return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
}

// A per-channel vector or (P, C) matrix of any floating dtype, read and written as double through its strides:
// the finalize stage's inputs and outputs are few values, in whatever dtype the caller keeps them.
class ChannelValues {
 public:
  explicit ChannelValues(const at::Tensor& t)
      : data_(t.data_ptr()), dtype_(t.scalar_type()), s0_(t.stride(0)), s1_(t.dim() > 1 ? t.stride(1) : 0) {
    TORCH_CHECK(dtype_ == at::kFloat || dtype_ == at::kDouble || dtype_ == at::kHalf || dtype_ == at::kBFloat16,
                "deeplab_ops: per-channel values must be a floating dtype, got ", dtype_);
  }
  double get(int64_t i, int64_t j = 0) const {
    const int64_t k = i * s0_ + j * s1_;
    switch (dtype_) {
      case at::kFloat: return static_cast<const float*>(data_)[k];
      case at::kDouble: return static_cast<const double*>(data_)[k];
      case at::kHalf: return static_cast<double>(static_cast<const at::Half*>(data_)[k]);
      default: return static_cast<double>(static_cast<const at::BFloat16*>(data_)[k]);
    }
  }
  void set(int64_t i, double v) const {
    const int64_t k = i * s0_;
    switch (dtype_) {
      case at::kFloat: static_cast<float*>(data_)[k] = static_cast<float>(v); break;
      case at::kDouble: static_cast<double*>(data_)[k] = v; break;
      case at::kHalf: static_cast<at::Half*>(data_)[k] = static_cast<at::Half>(static_cast<float>(v)); break;
      default: static_cast<at::BFloat16*>(data_)[k] = static_cast<at::BFloat16>(static_cast<float>(v)); break;
    }
  }

 private:
  void* data_;
  at::ScalarType dtype_;
  int64_t s0_, s1_;
};

// Welford partial of a contiguous run of `len` values, by two passes (kLanes partial sums each).
template <typename scalar_t, typename acc_t>
Welford<acc_t> run_stats(const scalar_t* __restrict__ p, int64_t len) {
  const int64_t body = len - len % kLanes;
  acc_t s[kLanes] = {};
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) s[j] += static_cast<acc_t>(p[i + j]);
  }
  for (int64_t i = body; i < len; ++i) s[i - body] += static_cast<acc_t>(p[i]);
  const acc_t mean = lanes_total(s) / static_cast<acc_t>(len);
  acc_t q[kLanes] = {};
  for (int64_t i = 0; i < body; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = static_cast<acc_t>(p[i + j]) - mean;
      q[j] += d * d;
    }
  }
  for (int64_t i = body; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - mean;
    q[i - body] += d * d;
  }
  return Welford<acc_t>{static_cast<acc_t>(len), mean, lanes_total(q)};
}

// (mean, M2) per channel of `rows` channels_last rows of `c` values, by two passes; the channel loop is innermost.
template <typename scalar_t, typename acc_t>
void rows_stats(const scalar_t* __restrict__ x, int64_t rows, int64_t c, acc_t* __restrict__ mu,
                acc_t* __restrict__ m2) {
  std::fill(mu, mu + c, acc_t(0));
  std::fill(m2, m2 + c, acc_t(0));
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict__ row = x + r * c;
    for (int64_t k = 0; k < c; ++k) mu[k] += static_cast<acc_t>(row[k]);
  }
  const acc_t inv = acc_t(1) / static_cast<acc_t>(rows);
  for (int64_t k = 0; k < c; ++k) mu[k] *= inv;
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* __restrict__ row = x + r * c;
    for (int64_t k = 0; k < c; ++k) {
      const acc_t d = static_cast<acc_t>(row[k]) - mu[k];
      m2[k] += d * d;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input_) {
  check_activation(input_, "input");
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const auto g = activation_shape(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  at::Tensor mean = at::empty({g.c}, input.options().dtype(opmath));
  at::Tensor m2 = at::empty({g.c}, input.options().dtype(opmath));
  if (g.n * g.hw == 0) {
    mean.fill_(NAN);
    m2.zero_();
    return {mean, m2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    op_t* mean_p = mean.data_ptr<op_t>();
    op_t* m2_p = m2.data_ptr<op_t>();
    if (!is_nhwc(input)) {
      // One partial per (n, c) plane, then a merge over n per channel.
      std::vector<Welford<acc_t>> part(g.n * g.c);
      at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const scalar_t* p = x + plane * g.hw;
          Welford<acc_t> w = welford_empty<acc_t>();
          for (int64_t s = 0; s < g.hw; s += kPlaneChunk) {
            w = welford_merge(w, run_stats<scalar_t, acc_t>(p + s, std::min(kPlaneChunk, g.hw - s)));
          }
          part[plane] = w;
        }
      });
      at::parallel_for(0, g.c, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          Welford<acc_t> w = welford_empty<acc_t>();
          for (int64_t n = 0; n < g.n; ++n) w = welford_merge(w, part[n * g.c + c]);
          mean_p[c] = static_cast<op_t>(w.mean);
          m2_p[c] = static_cast<op_t>(w.m2);
        }
      });
    } else {
      // Blocks of rows; inside a block the channel loop is innermost and contiguous.
      const int64_t rows = g.n * g.hw;
      const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
      std::vector<acc_t> bmean(blocks * g.c), bm2(blocks * g.c);
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t r0 = b * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
          rows_stats<scalar_t, acc_t>(x + r0 * g.c, r1 - r0, g.c, bmean.data() + b * g.c, bm2.data() + b * g.c);
        }
      });
      at::parallel_for(0, g.c, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          Welford<acc_t> w = welford_empty<acc_t>();
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t cnt = std::min(rows, (b + 1) * kRowBlock) - b * kRowBlock;
            w = welford_merge(w, Welford<acc_t>{static_cast<acc_t>(cnt), bmean[b * g.c + c], bm2[b * g.c + c]});
          }
          mean_p[c] = static_cast<op_t>(w.mean);
          m2_p[c] = static_cast<op_t>(w.m2);
        }
      });
    }
  });
  return {mean, m2};
}

// In double whatever the storage dtype, exactly as the CUDA kernel: merge, finalize, write.
void bn_finalize_cpu(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
                     const std::optional<at::Tensor>& counts, double count,
                     const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                     double momentum, double eps, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                     const at::Tensor& new_running_mean, const at::Tensor& new_running_var) {
  check_finalize_args(mean, m2, counts, count, running_mean, running_var, save_mean, save_invstd, new_running_mean,
                      new_running_var);
  const int64_t channels = save_mean.size(0);
  const bool training = present(mean);
  const bool update = training && present(running_mean);
  const ChannelValues out_mean(save_mean), out_invstd(save_invstd);
  if (!training) {
    const ChannelValues rm(*running_mean), rv(*running_var);
    for (int64_t c = 0; c < channels; ++c) {
      out_mean.set(c, rm.get(c));
      out_invstd.set(c, 1.0 / std::sqrt(rv.get(c) + eps));
    }
    return;
  }
  const bool parted = mean->dim() == 2;
  const int64_t parts = parted ? mean->size(0) : 1;
  const ChannelValues mu(*mean), sq(*m2);
  std::optional<ChannelValues> cnt;
  if (parted) cnt.emplace(*counts);
  std::optional<ChannelValues> rm, rv, new_rm, new_rv;
  if (update) {
    rm.emplace(*running_mean);
    rv.emplace(*running_var);
    new_rm.emplace(new_running_mean);
    new_rv.emplace(new_running_var);
  }
  for (int64_t c = 0; c < channels; ++c) {
    Welford<double> w = welford_empty<double>();
    for (int64_t p = 0; p < parts; ++p) {
      w = welford_merge(w, parted ? Welford<double>{cnt->get(p), mu.get(p, c), sq.get(p, c)}
                                  : Welford<double>{count, mu.get(c), sq.get(c)});
    }
    const Finalized<double> f =
        bn_finalize_channel<double>(w, update ? rm->get(c) : 0.0, update ? rv->get(c) : 0.0, momentum, eps);
    out_mean.set(c, f.mean);
    out_invstd.set(c, f.invstd);
    if (update) {
      new_rm->set(c, f.running_mean);
      new_rv->set(c, f.running_var);
    }
  }
}

// f(std::true_type{}) or f(std::false_type{}): a runtime flag as a compile-time constant, so that the inner loops
// of each instantiation have no branch on it.
template <typename F>
void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The runs of an activation that element-wise passes walk: NCHW, one contiguous (n, c) plane of hw values per call
// of plane(offset, c); channels_last, rows(offset, count) for `count` consecutive rows of C values. Planes and rows
// are split over the threads.
template <typename Plane, typename Rows>
void for_each_run(const ActivationShape& g, bool nhwc, const Plane& plane, const Rows& rows) {
  if (!nhwc) {
    at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.hw, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t p = begin; p < end; ++p) plane(p * g.hw, p % g.c);
                     });
  } else {
    at::parallel_for(0, g.n * g.hw, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.c, 1)),
                     [&](int64_t begin, int64_t end) { rows(begin * g.c, end - begin); });
  }
}

// z = act((x - mean) * scale + shift [+ r]) over one contiguous run of one channel.
template <bool kRelu, bool kResidual, typename scalar_t, typename op_t>
void apply_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, scalar_t* __restrict__ z, int64_t len,
               op_t mean, op_t scale, op_t shift) {
  for (int64_t i = 0; i < len; ++i) {
    op_t v = bn_affine<op_t>(static_cast<op_t>(x[i]), mean, scale, shift);
    if (kResidual) v += static_cast<op_t>(r[i]);
    z[i] = static_cast<scalar_t>(relu_if<op_t>(v, kRelu));
  }
}

// The same over `rows` channels_last rows of c values, with per-channel mean, scale, shift.
template <bool kRelu, bool kResidual, typename scalar_t, typename op_t>
void apply_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, scalar_t* __restrict__ z,
                int64_t rows, int64_t c, const op_t* __restrict__ mean, const op_t* __restrict__ scale,
                const op_t* __restrict__ shift) {
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t o = row * c;
    for (int64_t k = 0; k < c; ++k) {
      op_t v = bn_affine<op_t>(static_cast<op_t>(x[o + k]), mean[k], scale[k], shift[k]);
      if (kResidual) v += static_cast<op_t>(r[o + k]);
      z[o + k] = static_cast<scalar_t>(relu_if<op_t>(v, kRelu));
    }
  }
}

at::Tensor bn_apply_cpu(const at::Tensor& input_, const at::Tensor& mean, const at::Tensor& invstd,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& residual_, bool relu) {
  check_apply_args(input_, mean, invstd, weight, bias, residual_);
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const bool has_res = present(residual_);
  const at::Tensor residual = has_res ? as_kernel_layout(*residual_, mf) : at::Tensor();
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(mf));
  const auto g = activation_shape(input);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_apply_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    // scale = weight * invstd and shift = bias per channel, in op_t as the CUDA kernel computes them.
    const ChannelValues mu(mean), is(invstd);
    std::optional<ChannelValues> wt, bs;
    if (present(weight)) wt.emplace(*weight);
    if (present(bias)) bs.emplace(*bias);
    std::vector<op_t> mp(g.c), sp(g.c), hp(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      mp[c] = static_cast<op_t>(mu.get(c));
      const op_t inv = static_cast<op_t>(is.get(c));
      sp[c] = wt ? static_cast<op_t>(wt->get(c)) * inv : inv;
      hp[c] = bs ? static_cast<op_t>(bs->get(c)) : op_t(0);
    }
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = has_res ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* z = out.data_ptr<scalar_t>();
    with_flag(relu, [&](auto relu_c) {
      with_flag(has_res, [&](auto res_c) {
        constexpr bool kRelu = decltype(relu_c)::value, kRes = decltype(res_c)::value;
        for_each_run(
            g, is_nhwc(input),
            [&](int64_t o, int64_t c) {
              apply_run<kRelu, kRes>(x + o, kRes ? r + o : nullptr, z + o, g.hw, mp[c], sp[c], hp[c]);
            },
            [&](int64_t o, int64_t rows) {
              apply_rows<kRelu, kRes>(x + o, kRes ? r + o : nullptr, z + o, rows, g.c, mp.data(), sp.data(),
                                      hp.data());
            });
      });
    });
  });
  return out;
}

// g = act_grad(dz, z) of n contiguous values into g: a select of two loaded values, which vectorizes (with the
// conversion to the accumulation type inside the select, the compiler branches per value instead).
template <bool kRelu, typename scalar_t>
inline void masked_grad(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z, scalar_t* __restrict__ g,
                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t d = dz[i], zv = z[i];
    g[i] = static_cast<scalar_t>(act_grad<at::opmath_type<scalar_t>>(d, zv, kRelu));
  }
}

// (sum g, sum g * (y - mean)) of one contiguous run of one channel, g = act_grad(dz, z): g a buffer of kGradBuf
// values at a time, the sums in kLanes partial sums.
template <bool kRelu, typename scalar_t, typename acc_t>
void reduce_run(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z, const scalar_t* __restrict__ y,
                int64_t len, acc_t mean, acc_t& sum_g, acc_t& sum_gy) {
  alignas(64) scalar_t buf[kGradBuf];
  acc_t sg[kLanes] = {}, sgy[kLanes] = {};
  for (int64_t s = 0; s < len; s += kGradBuf) {
    const int64_t n = std::min(kGradBuf, len - s);
    const scalar_t* __restrict__ g = dz + s;
    if (kRelu) {
      masked_grad<kRelu>(dz + s, z + s, buf, n);
      g = buf;
    }
    const scalar_t* __restrict__ ys = y + s;
    const int64_t body = n - n % kLanes;
    for (int64_t i = 0; i < body; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t gi = static_cast<acc_t>(g[i + j]);
        sg[j] += gi;
        sgy[j] += gi * (static_cast<acc_t>(ys[i + j]) - mean);
      }
    }
    for (int64_t i = body; i < n; ++i) {
      const acc_t gi = static_cast<acc_t>(g[i]);
      sg[i - body] += gi;
      sgy[i - body] += gi * (static_cast<acc_t>(ys[i]) - mean);
    }
  }
  sum_g = lanes_total(sg);
  sum_gy = lanes_total(sgy);
}

// The same sums per channel over `rows` channels_last rows of c values, accumulated into sg and sgy.
template <bool kRelu, typename scalar_t, typename acc_t>
void reduce_rows(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z, const scalar_t* __restrict__ y,
                 int64_t rows, int64_t c, const acc_t* __restrict__ mean, acc_t* __restrict__ sg,
                 acc_t* __restrict__ sgy) {
  alignas(64) scalar_t buf[kGradBuf];
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t k0 = 0; k0 < c; k0 += kGradBuf) {
      const int64_t n = std::min(kGradBuf, c - k0), o = row * c + k0;
      const scalar_t* __restrict__ g = dz + o;
      if (kRelu) {
        masked_grad<kRelu>(dz + o, z + o, buf, n);
        g = buf;
      }
      const scalar_t* __restrict__ ys = y + o;
      const acc_t* __restrict__ m = mean + k0;
      acc_t* __restrict__ a = sg + k0;
      acc_t* __restrict__ b = sgy + k0;
      for (int64_t k = 0; k < n; ++k) {
        const acc_t gi = static_cast<acc_t>(g[k]);
        a[k] += gi;
        b[k] += gi * (static_cast<acc_t>(ys[k]) - m[k]);
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& grad_out_, const at::Tensor& output_,
                                                          const at::Tensor& input_, const at::Tensor& mean,
                                                          const at::Tensor& invstd, bool relu) {
  check_backward_args(grad_out_, output_, input_, mean, invstd);
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const at::Tensor grad_out = as_kernel_layout(grad_out_, mf);
  const at::Tensor output = as_kernel_layout(output_, mf);
  const auto g = activation_shape(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  at::Tensor sum_g = at::empty({g.c}, input.options().dtype(opmath));
  at::Tensor sum_gx = at::empty({g.c}, input.options().dtype(opmath));
  if (g.n * g.hw == 0) {
    sum_g.zero_();
    sum_gx.zero_();
    return {sum_g, sum_gx};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* y = input.const_data_ptr<scalar_t>();
    const scalar_t* dz = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    const ChannelValues mu(mean), is(invstd);
    std::vector<acc_t> mp(g.c);
    for (int64_t c = 0; c < g.c; ++c) mp[c] = static_cast<acc_t>(static_cast<op_t>(mu.get(c)));
    // Partials: one per (n, c) plane for NCHW, one per (row block, c) for NHWC; then summed per channel.
    const bool nhwc = is_nhwc(input);
    const int64_t rows = g.n * g.hw;
    const int64_t parts = nhwc ? (rows + kRowBlock - 1) / kRowBlock : g.n;
    std::vector<acc_t> pg(parts * g.c, acc_t(0)), pgx(parts * g.c, acc_t(0));
    with_flag(relu, [&](auto relu_c) {
      constexpr bool kRelu = decltype(relu_c)::value;
      if (!nhwc) {
        at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
          for (int64_t plane = begin; plane < end; ++plane) {  // plane = n * C + c: the (parts, C) layout
            const int64_t o = plane * g.hw;
            reduce_run<kRelu>(dz + o, z + o, y + o, g.hw, mp[plane % g.c], pg[plane], pgx[plane]);
          }
        });
      } else {
        at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
          for (int64_t b = begin; b < end; ++b) {
            const int64_t r0 = b * kRowBlock, o = r0 * g.c;
            reduce_rows<kRelu>(dz + o, z + o, y + o, std::min(rows, r0 + kRowBlock) - r0, g.c, mp.data(),
                               pg.data() + b * g.c, pgx.data() + b * g.c);
          }
        });
      }
    });
    op_t* og = sum_g.data_ptr<op_t>();
    op_t* ogx = sum_gx.data_ptr<op_t>();
    for (int64_t c = 0; c < g.c; ++c) {
      acc_t sg = 0, sgx = 0;
      for (int64_t p = 0; p < parts; ++p) {
        sg += pg[p * g.c + c];
        sgx += pgx[p * g.c + c];
      }
      og[c] = static_cast<op_t>(sg);
      // sum(g * xhat) = invstd * sum(g * (y - mean)): one multiply per channel, not per element.
      ogx[c] = static_cast<op_t>(sgx * static_cast<acc_t>(static_cast<op_t>(is.get(c))));
    }
  });
  return {sum_g, sum_gx};
}

// dy = bn_dy(act_grad(dz, z), y) over one contiguous run of one channel. kCentred: the channel's coefficient b is
// nonzero, so dy reads y; otherwise (b = 0) bn_dy is k * (g - a) and y is not even loaded.
template <bool kRelu, bool kCentred, typename scalar_t, typename op_t>
void dy_run(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z, const scalar_t* __restrict__ y,
            scalar_t* __restrict__ o, int64_t len, op_t mean, DyCoef<op_t> cf) {
  if (!kCentred) cf.b = op_t(0);  // already 0: says so to the compiler
  for (int64_t i = 0; i < len; ++i) {
    const op_t gi = act_grad<op_t>(static_cast<op_t>(dz[i]), static_cast<op_t>(z[i]), kRelu);
    o[i] = static_cast<scalar_t>(bn_dy<op_t>(gi, kCentred ? static_cast<op_t>(y[i]) : op_t(0), mean, cf));
  }
}

// How a channels_last dy pass treats the per-channel coefficient b (bn_dy's two forms).
enum class DyForm { kConstant, kCentred, kMixed };  // every b = 0 / every b != 0 / some of each

// The same over `rows` channels_last rows of c values with per-channel coefficients (k, a, b) and means. kMixed
// writes bn_dy as k * (g - a - (y' - mean) * b) with y' = mean where b = 0: the product is then exactly 0 and
// (g - a) - 0 is g - a, so this is bn_dy for every channel, as a select of two loaded values (which vectorizes).
template <bool kRelu, DyForm kForm, typename scalar_t, typename op_t>
void dy_rows(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z, const scalar_t* __restrict__ y,
             scalar_t* __restrict__ o, int64_t rows, int64_t c, const op_t* __restrict__ mean,
             const op_t* __restrict__ k, const op_t* __restrict__ a, const op_t* __restrict__ b) {
  alignas(64) scalar_t buf[kGradBuf];
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t j0 = 0; j0 < c; j0 += kGradBuf) {
      const int64_t n = std::min(kGradBuf, c - j0), base = row * c + j0;
      const scalar_t* __restrict__ g = dz + base;
      if (kRelu) {
        masked_grad<kRelu>(dz + base, z + base, buf, n);
        g = buf;
      }
      const scalar_t* __restrict__ ys = y + base;
      scalar_t* __restrict__ os = o + base;
      const op_t* __restrict__ mj = mean + j0;
      const op_t* __restrict__ kj = k + j0;
      const op_t* __restrict__ aj = a + j0;
      const op_t* __restrict__ bj = b + j0;
      for (int64_t j = 0; j < n; ++j) {
        const op_t gj = static_cast<op_t>(g[j]);
        if (kForm == DyForm::kConstant) {
          os[j] = static_cast<scalar_t>(kj[j] * (gj - aj[j]));
        } else if (kForm == DyForm::kCentred) {
          os[j] = static_cast<scalar_t>(kj[j] * (gj - aj[j] - (static_cast<op_t>(ys[j]) - mj[j]) * bj[j]));
        } else {
          const op_t yv = static_cast<op_t>(ys[j]), mv = mj[j], bv = bj[j];
          const op_t yc = bv == op_t(0) ? mv : yv;
          os[j] = static_cast<scalar_t>(kj[j] * (gj - aj[j] - (yc - mv) * bv));
        }
      }
    }
  }
}

at::Tensor bn_backward_dy_cpu(const at::Tensor& grad_out_, const at::Tensor& output_, const at::Tensor& input_,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sum_g,
                              const std::optional<at::Tensor>& sum_g_xhat, double count, bool relu,
                              bool training) {
  check_backward_args(grad_out_, output_, input_, mean, invstd);
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const at::Tensor grad_out = as_kernel_layout(grad_out_, mf);
  const at::Tensor output = as_kernel_layout(output_, mf);
  const auto g = activation_shape(input);
  check_dy_args(input, weight, sum_g, sum_g_xhat, count, training);
  at::Tensor dy = at::empty(input.sizes(), input.options().memory_format(mf));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_dy_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    // Per-channel coefficients (common/bn_math.h dy_coef), in op_t as the CUDA kernel computes them.
    const ChannelValues mu(mean), is(invstd);
    std::optional<ChannelValues> wt, sg, sgx;
    if (present(weight)) wt.emplace(*weight);
    if (training) {
      sg.emplace(*sum_g);
      sgx.emplace(*sum_g_xhat);
    }
    std::vector<op_t> mp(g.c), kp(g.c), ap(g.c), bp(g.c);
    int64_t zero_b = 0;  // channels whose dy does not read y
    for (int64_t c = 0; c < g.c; ++c) {
      mp[c] = static_cast<op_t>(mu.get(c));
      const DyCoef<op_t> cf =
          dy_coef<op_t>(wt ? static_cast<op_t>(wt->get(c)) : op_t(1), static_cast<op_t>(is.get(c)),
                        training ? static_cast<op_t>(sg->get(c)) : op_t(0),
                        training ? static_cast<op_t>(sgx->get(c)) : op_t(0), static_cast<op_t>(count), training);
      kp[c] = cf.k;
      ap[c] = cf.a;
      bp[c] = cf.b;
      zero_b += cf.b == op_t(0) ? 1 : 0;
    }
    const scalar_t* y = input.const_data_ptr<scalar_t>();
    const scalar_t* dz = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    scalar_t* o = dy.data_ptr<scalar_t>();
    with_flag(relu, [&](auto relu_c) {
      constexpr bool kRelu = decltype(relu_c)::value;
      for_each_run(
          g, is_nhwc(input),
          [&](int64_t off, int64_t c) {
            const DyCoef<op_t> cf{kp[c], ap[c], bp[c]};
            if (cf.b == op_t(0)) {
              dy_run<kRelu, false>(dz + off, z + off, y + off, o + off, g.hw, mp[c], cf);
            } else {
              dy_run<kRelu, true>(dz + off, z + off, y + off, o + off, g.hw, mp[c], cf);
            }
          },
          [&](int64_t off, int64_t rows) {
            const auto pass = [&](auto form) {
              dy_rows<kRelu, decltype(form)::value>(dz + off, z + off, y + off, o + off, rows, g.c, mp.data(),
                                                    kp.data(), ap.data(), bp.data());
            };
            if (zero_b == g.c) {
              pass(std::integral_constant<DyForm, DyForm::kConstant>{});
            } else if (zero_b == 0) {
              pass(std::integral_constant<DyForm, DyForm::kCentred>{});
            } else {
              pass(std::integral_constant<DyForm, DyForm::kMixed>{});
            }
          });
    });
  });
  return dy;
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_dy", &bn_backward_dy_cpu);
}

}  // namespace deeplab_ops
