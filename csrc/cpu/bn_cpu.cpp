// CPU kernels of the BatchNorm stages (at::parallel_for), for NCHW and channels_last activations.
//
// Reductions accumulate in double for float inputs (at::acc_type on CPU), element-wise passes compute
// in the opmath type. Statistics are two-level: each block of values gives an exact (count, mean, M2)
// by two passes over data that is still in cache, and blocks are merged with Chan's formula.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "common/bn_math.h"
#include "common/checks.h"
#include "bn_stage_args.h"

namespace deeplab_ops {
namespace {

constexpr int64_t kPlaneChunk = 4096;  // NCHW: values per (count, mean, M2) block
constexpr int64_t kRowBlock = 64;      // NHWC: rows (pixels) per block

bool is_nhwc(const at::Tensor& t) { return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast; }

struct Geometry {
  int64_t n, c, hw;
};

Geometry geometry(const at::Tensor& t) { return {t.size(0), t.size(1), t.size(2) * t.size(3)}; }

// Welford partial of a contiguous run of `len` values, by two passes.
template <typename scalar_t, typename acc_t>
Welford<acc_t> run_stats(const scalar_t* p, int64_t len) {
  acc_t sum = 0;
  for (int64_t i = 0; i < len; ++i) sum += static_cast<acc_t>(p[i]);
  const acc_t mean = sum / static_cast<acc_t>(len);
  acc_t m2 = 0;
  for (int64_t i = 0; i < len; ++i) {
    const acc_t d = static_cast<acc_t>(p[i]) - mean;
    m2 += d * d;
  }
  return Welford<acc_t>{static_cast<acc_t>(len), mean, m2};
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input_) {
  check_activation(input_, "input");
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const auto g = geometry(input);
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  at::Tensor mean = at::empty({g.c}, input.options().dtype(stat_dtype));
  at::Tensor m2 = at::empty({g.c}, input.options().dtype(stat_dtype));
  if (g.n * g.hw == 0) {
    mean.fill_(NAN);
    m2.zero_();
    return {mean, m2};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_stats_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using stat_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    stat_t* mean_p = mean.data_ptr<stat_t>();
    stat_t* m2_p = m2.data_ptr<stat_t>();
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
          mean_p[c] = static_cast<stat_t>(w.mean);
          m2_p[c] = static_cast<stat_t>(w.m2);
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
          acc_t* mu = bmean.data() + b * g.c;
          acc_t* m2b = bm2.data() + b * g.c;
          std::fill(mu, mu + g.c, acc_t(0));
          std::fill(m2b, m2b + g.c, acc_t(0));
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* row = x + r * g.c;
            for (int64_t c = 0; c < g.c; ++c) mu[c] += static_cast<acc_t>(row[c]);
          }
          const acc_t inv = acc_t(1) / static_cast<acc_t>(r1 - r0);
          for (int64_t c = 0; c < g.c; ++c) mu[c] *= inv;
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* row = x + r * g.c;
            for (int64_t c = 0; c < g.c; ++c) {
              const acc_t d = static_cast<acc_t>(row[c]) - mu[c];
              m2b[c] += d * d;
            }
          }
        }
      });
      at::parallel_for(0, g.c, 16, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          Welford<acc_t> w = welford_empty<acc_t>();
          for (int64_t b = 0; b < blocks; ++b) {
            const int64_t cnt = std::min(rows, (b + 1) * kRowBlock) - b * kRowBlock;
            w = welford_merge(w, Welford<acc_t>{static_cast<acc_t>(cnt), bmean[b * g.c + c], bm2[b * g.c + c]});
          }
          mean_p[c] = static_cast<stat_t>(w.mean);
          m2_p[c] = static_cast<stat_t>(w.m2);
        }
      });
    }
  });
  return {mean, m2};
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cpu(const at::Tensor& count, const at::Tensor& mean,
                                                   const at::Tensor& m2,
                                                   const std::optional<at::Tensor>& running_mean,
                                                   const std::optional<at::Tensor>& running_var, double momentum,
                                                   double eps) {
  check_finalize_args(count, mean, m2, running_mean, running_var);
  const int64_t parts = mean.size(0), channels = mean.size(1);
  const auto stat_dtype = mean.scalar_type();
  const at::Tensor cnt = count.to(at::kDouble).contiguous();
  const at::Tensor mu = mean.to(at::kDouble).contiguous();
  const at::Tensor sq = m2.to(at::kDouble).contiguous();
  const bool update = running_mean.has_value() && running_mean->defined();
  at::Tensor rm, rv;
  if (update) {
    rm = running_mean->to(at::kDouble).contiguous();
    rv = running_var->to(at::kDouble).contiguous();
  }
  at::Tensor save_mean = at::empty({channels}, mean.options().dtype(at::kDouble));
  at::Tensor save_invstd = at::empty({channels}, mean.options().dtype(at::kDouble));
  const double* cp = cnt.const_data_ptr<double>();
  const double* mp = mu.const_data_ptr<double>();
  const double* sp = sq.const_data_ptr<double>();
  double* om = save_mean.data_ptr<double>();
  double* oi = save_invstd.data_ptr<double>();
  double* rmp = update ? rm.data_ptr<double>() : nullptr;
  double* rvp = update ? rv.data_ptr<double>() : nullptr;
  at::parallel_for(0, channels, 64, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Welford<double> w = welford_empty<double>();
      for (int64_t p = 0; p < parts; ++p) w = welford_merge(w, Welford<double>{cp[p], mp[p * channels + c], sp[p * channels + c]});
      const Finalized<double> f =
          bn_finalize_channel<double>(w, update ? rmp[c] : 0.0, update ? rvp[c] : 0.0, momentum, eps);
      om[c] = f.mean;
      oi[c] = f.invstd;
      if (update) {
        rmp[c] = f.running_mean;
        rvp[c] = f.running_var;
      }
    }
  });
  if (update) {
    running_mean->copy_(rm);
    running_var->copy_(rv);
  }
  return {save_mean.to(stat_dtype), save_invstd.to(stat_dtype)};
}

// Element-wise passes: NCHW walks (n, c) planes with per-plane scalars; NHWC walks rows with the
// channel loop innermost. `body(x_offset, c)` is called once per element.
template <typename F>
void for_each_element(const Geometry& g, bool nhwc, const F& body) {
  if (!nhwc) {
    at::parallel_for(0, g.n * g.c, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.hw, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t plane = begin; plane < end; ++plane) {
                         const int64_t c = plane % g.c;
                         const int64_t base = plane * g.hw;
                         for (int64_t i = 0; i < g.hw; ++i) body(base + i, c);
                       }
                     });
  } else {
    at::parallel_for(0, g.n * g.hw, std::max<int64_t>(1, 32768 / std::max<int64_t>(g.c, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const int64_t base = r * g.c;
                         for (int64_t c = 0; c < g.c; ++c) body(base + c, c);
                       }
                     });
  }
}

at::Tensor bn_apply_cpu(const at::Tensor& input_, const at::Tensor& mean, const at::Tensor& scale,
                        const at::Tensor& shift, const std::optional<at::Tensor>& residual_, bool relu) {
  check_apply_args(input_, mean, scale, shift, residual_);
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const bool has_res = residual_.has_value() && residual_->defined();
  const at::Tensor residual = has_res ? as_kernel_layout(*residual_, mf) : at::Tensor();
  at::Tensor out = at::empty_like(input, input.options(), mf);
  const auto g = geometry(input);
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  const at::Tensor mu = channel_vector(mean, stat_dtype), sc = channel_vector(scale, stat_dtype),
                   sh = channel_vector(shift, stat_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_apply_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* r = has_res ? residual.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* z = out.data_ptr<scalar_t>();
    const op_t* mp = mu.const_data_ptr<op_t>();
    const op_t* sp = sc.const_data_ptr<op_t>();
    const op_t* hp = sh.const_data_ptr<op_t>();
    for_each_element(g, is_nhwc(input), [&](int64_t i, int64_t c) {
      op_t v = bn_affine<op_t>(static_cast<op_t>(x[i]), mp[c], sp[c], hp[c]);
      if (r != nullptr) v += static_cast<op_t>(r[i]);
      z[i] = static_cast<scalar_t>(relu_if<op_t>(v, relu));
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& grad_out_, const at::Tensor& output_,
                                                          const at::Tensor& input_, const at::Tensor& mean,
                                                          const at::Tensor& invstd, bool relu) {
  check_backward_args(grad_out_, output_, input_, mean, invstd);
  const auto mf = input_.suggest_memory_format();
  const at::Tensor input = as_kernel_layout(input_, mf);
  const at::Tensor grad_out = as_kernel_layout(grad_out_, mf);
  const at::Tensor output = as_kernel_layout(output_, mf);
  const auto g = geometry(input);
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  const at::Tensor mu = channel_vector(mean, stat_dtype), is = channel_vector(invstd, stat_dtype);
  at::Tensor sum_g = at::zeros({g.c}, input.options().dtype(stat_dtype));
  at::Tensor sum_gx = at::zeros({g.c}, input.options().dtype(stat_dtype));
  if (g.n * g.hw == 0) return {sum_g, sum_gx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using stat_t = at::opmath_type<scalar_t>;
    const scalar_t* y = input.const_data_ptr<scalar_t>();
    const scalar_t* dz = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    const stat_t* mp = mu.const_data_ptr<stat_t>();
    const stat_t* ip = is.const_data_ptr<stat_t>();
    // Partials: one per (n, c) plane for NCHW, one per (row block, c) for NHWC; then summed per channel.
    const bool nhwc = is_nhwc(input);
    const int64_t rows = g.n * g.hw;
    const int64_t parts = nhwc ? (rows + kRowBlock - 1) / kRowBlock : g.n;
    std::vector<acc_t> pg(parts * g.c, acc_t(0)), pgx(parts * g.c, acc_t(0));
    if (!nhwc) {
      at::parallel_for(0, g.n * g.c, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t c = plane % g.c;
          const acc_t m = mp[c];
          acc_t sg = 0, sgx = 0;
          for (int64_t i = plane * g.hw, e = i + g.hw; i < e; ++i) {
            const acc_t gi = act_grad<acc_t>(static_cast<acc_t>(dz[i]), static_cast<acc_t>(z[i]), relu);
            sg += gi;
            sgx += gi * (static_cast<acc_t>(y[i]) - m);
          }
          pg[plane] = sg;   // plane = n * C + c: the (parts, C) layout
          pgx[plane] = sgx;
        }
      });
    } else {
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          acc_t* sg = pg.data() + b * g.c;
          acc_t* sgx = pgx.data() + b * g.c;
          for (int64_t r = b * kRowBlock, r1 = std::min(rows, r + kRowBlock); r < r1; ++r) {
            const int64_t base = r * g.c;
            for (int64_t c = 0; c < g.c; ++c) {
              const acc_t gi =
                  act_grad<acc_t>(static_cast<acc_t>(dz[base + c]), static_cast<acc_t>(z[base + c]), relu);
              sg[c] += gi;
              sgx[c] += gi * (static_cast<acc_t>(y[base + c]) - static_cast<acc_t>(mp[c]));
            }
          }
        }
      });
    }
    stat_t* og = sum_g.data_ptr<stat_t>();
    stat_t* ogx = sum_gx.data_ptr<stat_t>();
    at::parallel_for(0, g.c, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        acc_t sg = 0, sgx = 0;
        for (int64_t p = 0; p < parts; ++p) {
          sg += pg[p * g.c + c];
          sgx += pgx[p * g.c + c];
        }
        og[c] = static_cast<stat_t>(sg);
        // sum(g * xhat) = invstd * sum(g * (y - mean)): one multiply per channel, not per element.
        ogx[c] = static_cast<stat_t>(sgx * static_cast<acc_t>(ip[c]));
      }
    });
  });
  return {sum_g, sum_gx};
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
  const auto g = geometry(input);
  const auto stat_dtype = opmath_dtype(input.scalar_type());
  const at::Tensor coef = dy_coefficients(mean, invstd, weight, sum_g, sum_g_xhat, count, training, g.c, stat_dtype);
  at::Tensor dy = at::empty_like(input, input.options(), mf);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_dy_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* y = input.const_data_ptr<scalar_t>();
    const scalar_t* dz = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    scalar_t* o = dy.data_ptr<scalar_t>();
    const op_t* cf = coef.const_data_ptr<op_t>();  // (4, C): mean, k, a, b
    const int64_t C = g.c;
    for_each_element(g, is_nhwc(input), [&](int64_t i, int64_t c) {
      const DyCoef<op_t> dc{cf[C + c], cf[2 * C + c], cf[3 * C + c]};
      const op_t gi = act_grad<op_t>(static_cast<op_t>(dz[i]), static_cast<op_t>(z[i]), relu);
      o[i] = static_cast<scalar_t>(bn_dy<op_t>(gi, static_cast<op_t>(y[i]), cf[c], dc));
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
