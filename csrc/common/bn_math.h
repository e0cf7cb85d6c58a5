// Per-element and per-channel BatchNorm math shared by the CPU and CUDA kernels (C10_HOST_DEVICE), so
// the CPU tests exercise the same formulas the GPU runs. acc_t is float or double.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace deeplab_ops {

// Partial statistics of a block of values: count, mean and M2 = sum((v - mean)^2).
template <typename acc_t>
struct Welford {
  acc_t count;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t>
C10_HOST_DEVICE inline Welford<acc_t> welford_empty() {
  return Welford<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
}

// Welford's update with one value.
template <typename acc_t>
C10_HOST_DEVICE inline Welford<acc_t> welford_push(Welford<acc_t> w, acc_t v) {
  w.count += acc_t(1);
  const acc_t delta = v - w.mean;
  w.mean += delta / w.count;
  w.m2 += delta * (v - w.mean);
  return w;
}

// Chan et al.'s merge of two partials. It only combines centred quantities, so activations with a
// large mean and a small spread keep their variance (E[v^2] - E[v]^2 would cancel catastrophically).
template <typename acc_t>
C10_HOST_DEVICE inline Welford<acc_t> welford_merge(Welford<acc_t> a, Welford<acc_t> b) {
  const acc_t n = a.count + b.count;
  if (b.count == acc_t(0)) return a;
  if (a.count == acc_t(0)) return b;
  const acc_t delta = b.mean - a.mean;
  const acc_t fb = b.count / n;
  Welford<acc_t> r;
  r.count = n;
  r.mean = a.mean + delta * fb;
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * fb;
  return r;
}

// ReLU that propagates NaN as torch.relu does (NaN < 0 is false).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t relu_if(acc_t v, bool relu) {
  return (relu && v < acc_t(0)) ? acc_t(0) : v;
}

// BN apply in the centred form (v - mean) * scale + shift. The expanded form v * scale + (shift -
// mean * scale) loses the low bits of v when |mean| >> std, so it is never used.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_affine(acc_t v, acc_t mean, acc_t scale, acc_t shift) {
  return (v - mean) * scale + shift;
}

// The gradient that reaches the BN output through the activation: torch's threshold_backward, which
// zeroes it where z <= 0 only, so a NaN output passes its gradient on (as F.relu's backward does).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t act_grad(acc_t dz, acc_t z, bool relu) {
  return (relu && z <= acc_t(0)) ? acc_t(0) : dz;
}

// Per-channel coefficients of the BN input gradient, dy = k * (g - a - (y - mean) * b):
//   k = weight * invstd, a = sum(g) / n, b = invstd * sum(g * xhat) / n  (training);
//   k = weight * invstd, a = b = 0                                         (eval: constant affine).
template <typename acc_t>
struct DyCoef {
  acc_t k;
  acc_t a;
  acc_t b;
};

template <typename acc_t>
C10_HOST_DEVICE inline DyCoef<acc_t> dy_coef(acc_t weight, acc_t invstd, acc_t sum_g, acc_t sum_g_xhat,
                                             acc_t count, bool training) {
  DyCoef<acc_t> c;
  c.k = weight * invstd;
  if (training) {
    c.a = sum_g / count;
    c.b = invstd * sum_g_xhat / count;
  } else {
    c.a = acc_t(0);
    c.b = acc_t(0);
  }
  return c;
}

// b = 0 (eval, or a zero sum): dy does not depend on y, as in torch's eval BatchNorm backward; a NaN/Inf y
// must not turn (y - mean) * 0 into NaN there.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t bn_dy(acc_t g, acc_t y, acc_t mean, DyCoef<acc_t> c) {
  return c.b == acc_t(0) ? c.k * (g - c.a) : c.k * (g - c.a - (y - mean) * c.b);
}

// Statistics of a channel from its merged partials, and the running-statistics update that
// F.batch_norm does: running_var uses the unbiased variance m2 / (n - 1).
template <typename acc_t>
struct Finalized {
  acc_t mean;
  acc_t invstd;
  acc_t running_mean;
  acc_t running_var;
};

template <typename acc_t>
C10_HOST_DEVICE inline Finalized<acc_t> bn_finalize_channel(Welford<acc_t> w, acc_t running_mean,
                                                            acc_t running_var, acc_t momentum, acc_t eps) {
  Finalized<acc_t> f;
  f.mean = w.mean;
  const acc_t var = w.count > acc_t(0) ? w.m2 / w.count : acc_t(0);
  f.invstd = acc_t(1) / ::sqrt(var + eps);
  const acc_t unbiased = w.count > acc_t(1) ? w.m2 / (w.count - acc_t(1)) : acc_t(NAN);
  // No value at all (every process of a synchronized group held an empty batch): the running statistics stay as
  // they are, as for an empty batch without a group (decided here, on the device: no host synchronization).
  const bool seen = w.count > acc_t(0);
  f.running_mean = seen ? (acc_t(1) - momentum) * running_mean + momentum * w.mean : running_mean;
  f.running_var = seen ? (acc_t(1) - momentum) * running_var + momentum * unbiased : running_var;
  return f;
}

}  // namespace deeplab_ops
