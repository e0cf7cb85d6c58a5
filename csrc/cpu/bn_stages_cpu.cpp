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

#include "bn_stage_args.h"
#include "common/activation_layout.h"
#include "common/arg_checks.h"
#include "common/bn_math.h"

namespace deeplab_ops {
namespace {

constexpr int64_t kPlaneChunk = 4096;  // NCHW: values per (count, mean, M2) block
constexpr int64_t kRowBlock = 64;      // NHWC: rows (pixels) per block

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

// Element-wise passes: NCHW walks (n, c) planes with per-plane scalars; NHWC walks rows with the
// channel loop innermost. `body(x_offset, c)` is called once per element.
template <typename F>
void for_each_element(const ActivationShape& g, bool nhwc, const F& body) {
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
  const auto g = activation_shape(input);
  const auto opmath = opmath_dtype(input.scalar_type());
  const at::Tensor mu = opmath_channel_vector(mean, opmath), is = opmath_channel_vector(invstd, opmath);
  at::Tensor sum_g = at::zeros({g.c}, input.options().dtype(opmath));
  at::Tensor sum_gx = at::zeros({g.c}, input.options().dtype(opmath));
  if (g.n * g.hw == 0) return {sum_g, sum_gx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* y = input.const_data_ptr<scalar_t>();
    const scalar_t* dz = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    const op_t* mp = mu.const_data_ptr<op_t>();
    const op_t* ip = is.const_data_ptr<op_t>();
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
    op_t* og = sum_g.data_ptr<op_t>();
    op_t* ogx = sum_gx.data_ptr<op_t>();
    at::parallel_for(0, g.c, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        acc_t sg = 0, sgx = 0;
        for (int64_t p = 0; p < parts; ++p) {
          sg += pg[p * g.c + c];
          sgx += pgx[p * g.c + c];
        }
        og[c] = static_cast<op_t>(sg);
        // sum(g * xhat) = invstd * sum(g * (y - mean)): one multiply per channel, not per element.
        ogx[c] = static_cast<op_t>(sgx * static_cast<acc_t>(ip[c]));
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
    std::vector<op_t> mp(g.c);
    std::vector<DyCoef<op_t>> cf(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      mp[c] = static_cast<op_t>(mu.get(c));
      cf[c] = dy_coef<op_t>(wt ? static_cast<op_t>(wt->get(c)) : op_t(1), static_cast<op_t>(is.get(c)),
                            training ? static_cast<op_t>(sg->get(c)) : op_t(0),
                            training ? static_cast<op_t>(sgx->get(c)) : op_t(0), static_cast<op_t>(count), training);
    }
    const scalar_t* y = input.const_data_ptr<scalar_t>();
    const scalar_t* dz = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    scalar_t* o = dy.data_ptr<scalar_t>();
    for_each_element(g, is_nhwc(input), [&](int64_t i, int64_t c) {
      const op_t gi = act_grad<op_t>(static_cast<op_t>(dz[i]), static_cast<op_t>(z[i]), relu);
      o[i] = static_cast<scalar_t>(bn_dy<op_t>(gi, static_cast<op_t>(y[i]), mp[c], cf[c]));
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
