// CPU kernels of the BatchNorm stages (at::parallel_for), for NCHW and channels_last activations.
//
// Precision: reductions accumulate in double for float inputs (at::acc_type on CPU), element-wise passes compute
// in the opmath type. Statistics are two-level: each block of values gives an exact (count, mean, M2) by two passes
// over data that is still in cache, and blocks are merged with Chan's formula.
//
// Speed:
// - Every kernel is compiled for the baseline ISA, AVX2 and AVX-512 (a target attribute on the function that runs
//   a thread's share, everything below it inlined) and runs the one that torch's own CPU kernels use
//   (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY overrides; cpu/isa_dispatch.h). Multiply-adds are never
//   contracted into FMAs (setup.py compiles with -ffp-contract=off), so every ISA gives the same bits.
// - One parallel region per call, and none for a pass of at most kParallelWork (reductions) or kParallelMap
//   (element-wise) values, at most one thread per that many values above: on such small passes the fork/join of the
//   OpenMP threads costs more than it saves.
// - Contiguous reductions keep kLanes independent partial sums (one running sum would be a chain of dependent
//   double additions, latency-bound); NCHW reductions run one channel per work item, its N planes into the same
//   lanes, so no per-plane partials are merged; channels_last passes walk spans of whole rows of up to kTile values
//   (tiled_length), not row by row.
// The summation order is fixed by the shape alone (lanes, blocks, spans), never by the thread count
// or the ISA: results are reproducible run to run, for any number of threads and on any CPU.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "bn_stage_args.h"
#include "cpu/isa_dispatch.h"
#include "common/activation_layout.h"
#include "common/arg_checks.h"
#include "common/bn_math.h"

namespace deeplab_ops {
namespace {

constexpr int kLanes = 16;               // independent partial sums of a contiguous reduction
constexpr int64_t kGradBuf = 1024;       // values of act_grad(dz, z) computed ahead of a reduction (multiple of kLanes)
constexpr int64_t kStatBlock = 8192;     // values per two-pass (count, mean, M2) block
constexpr int64_t kReduceBlock = 16384;  // NHWC: values per row block of the backward reduction
constexpr int64_t kMinBlockRows = 32;    // NHWC: rows per block at least, where that fits in kMaxBlockValues
constexpr int64_t kMaxBlockValues = 65536;  // (a wide block still in the core's L2 for a second pass)
constexpr int64_t kParallelWork = 32768; // a reduction of at most this many values runs on one thread
constexpr int64_t kParallelMap = 65536;  // the same for an element-wise pass (less work per value)
constexpr int64_t kTile = 256;           // NHWC: values per span of whole rows (tiled_length)

using namespace cpu_isa;

// ---- threading ------------------------------------------------------------------------------------------------

// f(begin, end, width) over the items [0, items) of `work` values each, in kernel_isa()'s build, split over at most
// one thread per min_work values (so none for a pass of at most min_work values).
template <typename F>
void parallel_items(int64_t items, int64_t work, const F& f, int64_t min_work = kParallelWork) {
  const Isa isa = kernel_isa();
  const int64_t grain = std::max<int64_t>(1, min_work / std::max<int64_t>(work, 1));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) { run_isa(isa, f, begin, end); });
}

// f(width) on this thread, in kernel_isa()'s build.
template <typename F>
void serial_kernel(const F& f) {
  run_isa(kernel_isa(), [&](int64_t, int64_t, auto width) { f(width); }, 0, 1);
}

// ---- loop shapes shared by the kernels ----------------------------------------------------------------------

// kLanes partial sums held as kLanes / kPer vectors of kBytes (GCC/clang vector extension), kBytes the width of the
// ISA's registers (run_isa passes it): they stay in registers, and lane j is the same value on every target, so
// every ISA adds the same values in the same order. (Arrays of partial sums vectorize only when the compiler's SLP
// pass happens to find them; a vector wider than the registers lives in memory.) Lanes are passed by reference: a
// vector argument by value would change with the target's ABI.
#if defined(__GNUC__) || defined(__clang__)
template <typename T, int kBytes>
struct VecOf {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int kPer = kBytes / static_cast<int>(sizeof(T));
};
#else
template <typename T, int kBytes>
struct VecOf {
  typedef T type;
  static constexpr int kPer = 1;
};
#endif

template <typename acc_t, int kBytes>
struct Lanes {
  using V = typename VecOf<acc_t, kBytes>::type;
  static constexpr int kPer = VecOf<acc_t, kBytes>::kPer;
  static constexpr int kVecs = kLanes / kPer;
  static_assert(kVecs * kPer == kLanes, "kLanes must be a multiple of the values per vector");
  V v[kVecs] = {};

  DLO_INLINE acc_t get(int j) const {
    if constexpr (kPer == 1) {
      return v[j];
    } else {
      return v[j / kPer][j % kPer];
    }
  }
  DLO_INLINE void set(int j, acc_t x) {
    if constexpr (kPer == 1) {
      v[j] = x;
    } else {
      v[j / kPer][j % kPer] = x;
    }
  }
  DLO_INLINE void zero() {
    for (int k = 0; k < kVecs; ++k) v[k] = V{};
  }
  // The kLanes consecutive values p[0..kLanes), converted to acc_t.
  template <typename scalar_t>
  DLO_INLINE void load(const scalar_t* __restrict__ p) {
    for (int j = 0; j < kLanes; ++j) set(j, static_cast<acc_t>(p[j]));
  }
  DLO_INLINE void add(const Lanes& o) {
    for (int k = 0; k < kVecs; ++k) v[k] += o.v[k];
  }
  DLO_INLINE void subtract(acc_t b) {
    for (int k = 0; k < kVecs; ++k) v[k] -= b;
  }
  DLO_INLINE void add_product(const Lanes& a, const Lanes& b) {
    for (int k = 0; k < kVecs; ++k) v[k] += a.v[k] * b.v[k];
  }
  // The kLanes partial sums plus the tails' sums `tail` (lane by lane), added in a fixed tree.
  DLO_INLINE acc_t total(const acc_t* tail) const {
    acc_t t[kLanes];
    for (int j = 0; j < kLanes; ++j) t[j] = get(j) + tail[j];
    for (int w = kLanes / 2; w >= 1; w /= 2) {
      for (int j = 0; j < w; ++j) t[j] += t[j + w];
    }
    return t[0];
  }
};

// vec(i) for the whole vectors of kLanes values at i = 0, kLanes, ... of a run [0, len) (into the Lanes), then
// tail(i, j) for the values i left, j = i % kLanes (into scalar sums tail[j]: building a vector of a run's short
// tail costs more than adding its values one by one).
template <typename Vec, typename Tail>
DLO_INLINE void for_lanes(int64_t len, const Vec& vec, const Tail& tail) {
  const int64_t full = len - len % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) vec(i);
  for (int64_t i = full; i < len; ++i) tail(i, static_cast<int>(i - full));
}

// The gradient at the BN output of n contiguous values, g = act_grad(dz, z), into g: a select of two loaded values
// in the storage type, which vectorizes (with the conversion to the accumulation type inside the select, the
// compiler branches per value instead).
template <typename scalar_t>
DLO_INLINE void masked_grad(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z, scalar_t* __restrict__ g,
                            int64_t n) {
  using op_t = at::opmath_type<scalar_t>;
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t d = dz[i], zv = z[i];
    g[i] = static_cast<scalar_t>(act_grad<op_t>(d, zv, true));
  }
}

// act_grad(dz, z) as the opmath type for element-wise passes (no accumulation-type conversion in the select).
template <bool kRelu, typename scalar_t>
DLO_INLINE at::opmath_type<scalar_t> grad_at(scalar_t dz, scalar_t z) {
  using op_t = at::opmath_type<scalar_t>;
  return act_grad<op_t>(static_cast<op_t>(dz), static_cast<op_t>(z), kRelu);
}

// std::vector storage aligned to 64 bytes, for the arrays that the vector loops load and store (per-channel values,
// partial sums, buffers): a full-width vector access then never straddles two cache lines.
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}  // implicit: the allocator rebind protocol
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const {
    return false;
  }
};
template <typename T>
using AlignedVector = std::vector<T, Aligned64<T>>;

// NHWC reductions split the N * HW rows into blocks of a fixed number of rows (so that the order of the sums depends
// on the shape only), each block giving two per-channel partials, then merged in block order.
struct RowBlocks {
  int64_t rows, block, blocks;
  int64_t first(int64_t b) const { return b * block; }
  int64_t count(int64_t b) const { return std::min(rows, (b + 1) * block) - b * block; }
};

// Rows per block: about block_values values, and at least kMinBlockRows rows where those fit in kMaxBlockValues.
// Closing a block costs work per channel (its partials folded, written, merged in order); with few rows per block
// of wide rows (8 rows of 1024 channels at kStatBlock) that was as much as the block's own sums: bn_stats on
// 1 x 1024 x 33 x 33 channels_last spent 45 % of its time there (this project's EPYC, one thread).
inline int64_t block_rows(int64_t block_values, int64_t c) {
  return std::max<int64_t>({1, block_values / c, std::min(kMinBlockRows, kMaxBlockValues / c)});
}

// kernel(offset, rows, a_row, b_row, scratch) per block of block_rows(block_values, C) rows, on the threads,
// writing the block's two partials (C values each) into its rows of the (blocks, C) arrays a and b. scratch is a
// Scratch(C), one per thread's share of the blocks (not one allocation per block).
template <typename Scratch, typename acc_t, typename Kernel>
RowBlocks row_block_partials(const ActivationShape& g, int64_t block_values, AlignedVector<acc_t>& a,
                             AlignedVector<acc_t>& b, const Kernel& kernel) {
  const int64_t rows = g.n * g.hw, block = block_rows(block_values, g.c);
  const RowBlocks rb{rows, block, (rows + block - 1) / block};
  a.resize(rb.blocks * g.c);
  b.resize(rb.blocks * g.c);
  parallel_items(rb.blocks, block * g.c, [&](int64_t begin, int64_t end, auto) {
    Scratch scratch(g.c);
    for (int64_t i = begin; i < end; ++i) {
      kernel(rb.first(i) * g.c, rb.count(i), a.data() + i * g.c, b.data() + i * g.c, scratch);
    }
  });
  return rb;
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

// channels_last rows are walked in spans of tiled_length(c) values (the most whole rows that fit in kTile values,
// one row when c > kTile), each one loop against per-channel values repeated to that length (tile_channels) or
// into partial sums per position of the span (fold_span): no loop per row of few channels, and in a reduction the
// load-add-store chain of each partial sum advances once per span, not once per row.
inline int64_t tiled_length(int64_t c) { return c * std::max<int64_t>(1, kTile / c); }

// Per-channel values v[0..c) repeated to tiled_length(c) values.
template <typename Vector>
void tile_channels(Vector& v, int64_t c) {
  const int64_t n = tiled_length(c);
  v.resize(n);
  for (int64_t i = c; i < n; ++i) v[i] = v[i - c];
}

// f(offset, n) over [0, total) in spans of `span` values.
template <typename F>
DLO_INLINE void for_spans(int64_t total, int64_t span, const F& f) {
  for (int64_t s = 0; s < total; s += span) f(s, std::min(span, total - s));
}

// Each channel's total of the partial sums per position of a span (position p holds channel p % c), added in
// order, into out[0..c). A span of one row (c >= kTile / 2) holds the totals already: copied, in a loop that
// vectorizes (a loop over channels with the positions' loop inside does not).
template <typename acc_t>
DLO_INLINE void fold_span(const acc_t* __restrict__ s, int64_t span, int64_t c, acc_t* __restrict__ out) {
  if (span == c) {
    std::copy(s, s + c, out);
    return;
  }
  for (int64_t k = 0; k < c; ++k) {
    acc_t t = s[k];
    for (int64_t p = k + c; p < span; p += c) t += s[p];
    out[k] = t;
  }
}

// The scratch of a thread's channels_last reduction blocks (row_block_partials): two partial sums per position of a
// span, and a span of act_grad values.
template <typename acc_t, typename scalar_t>
struct SpanScratch {
  explicit SpanScratch(int64_t c) : sums(2 * tiled_length(c)), values(tiled_length(c)) {}
  AlignedVector<acc_t> sums;
  AlignedVector<scalar_t> values;
};

// ---- bn_stats ------------------------------------------------------------------------------------------------

// Two-pass (count, mean, M2) of `runs` runs of `len` values, run r at p + r * stride, in kLanes partial sums.
template <int kBytes, typename scalar_t, typename acc_t>
DLO_INLINE Welford<acc_t> runs_stats(const scalar_t* __restrict__ p, int64_t stride, int64_t runs, int64_t len) {
  Lanes<acc_t, kBytes> s, v;
  acc_t tail[kLanes] = {};
  // for_lanes over every run: vec(q + i) for the whole vectors, tail(q + i, j) for the values left.
  const auto each_run = [&](const auto& vec, const auto& tail_value) {
    for (int64_t r = 0; r < runs; ++r) {
      const scalar_t* __restrict__ q = p + r * stride;
      for_lanes(
          len, [&](int64_t i) { vec(q + i); }, [&](int64_t i, int j) { tail_value(q + i, j); });
    }
  };
  each_run(
      [&](const scalar_t* q) {
        v.load(q);
        s.add(v);
      },
      [&](const scalar_t* q, int j) { tail[j] += static_cast<acc_t>(*q); });
  const acc_t count = static_cast<acc_t>(runs * len);
  const acc_t mean = s.total(tail) / count;
  s.zero();
  std::fill(tail, tail + kLanes, acc_t(0));
  each_run(
      [&](const scalar_t* q) {
        v.load(q);
        v.subtract(mean);
        s.add_product(v, v);
      },
      [&](const scalar_t* q, int j) {
        const acc_t d = static_cast<acc_t>(*q) - mean;
        tail[j] += d * d;
      });
  return Welford<acc_t>{count, mean, s.total(tail)};
}

// NCHW: the statistics of one channel, in blocks of whole planes (planes up to kStatBlock values) or of chunks of
// one plane (larger planes).
template <int kBytes, typename scalar_t, typename acc_t>
DLO_INLINE Welford<acc_t> channel_stats(const scalar_t* x, const ActivationShape& g, int64_t c) {
  const int64_t chunk = std::min(g.hw, kStatBlock), per = std::max<int64_t>(1, kStatBlock / g.hw);
  const int64_t stride = g.c * g.hw;
  Welford<acc_t> w = welford_empty<acc_t>();
  for (int64_t n0 = 0; n0 < g.n; n0 += per) {
    for (int64_t s = 0; s < g.hw; s += chunk) {
      w = welford_merge(w, runs_stats<kBytes, scalar_t, acc_t>(x + n0 * stride + c * g.hw + s, stride,
                                                               std::min(per, g.n - n0), std::min(chunk, g.hw - s)));
    }
  }
  return w;
}

// NHWC: (mean, M2) per channel of `rows` rows of c values, by two passes over spans of whole rows; scratch holds
// 2 * tiled_length(c) values.
template <typename scalar_t, typename acc_t>
DLO_INLINE void rows_stats(const scalar_t* __restrict__ x, int64_t rows, int64_t c, acc_t* __restrict__ mu,
                           acc_t* __restrict__ m2, acc_t* __restrict__ scratch) {
  const int64_t span = tiled_length(c);
  acc_t* __restrict__ s = scratch;           // a partial sum per position
  acc_t* __restrict__ mt = scratch + span;   // the means, tiled
  std::fill(s, s + span, acc_t(0));
  for_spans(rows * c, span, [&](int64_t o, int64_t n) {
    for (int64_t k = 0; k < n; ++k) s[k] += static_cast<acc_t>(x[o + k]);
  });
  fold_span(s, span, c, mu);
  for (int64_t k = 0; k < c; ++k) mu[k] /= static_cast<acc_t>(rows);
  for (int64_t p = 0; p < span; p += c) std::copy(mu, mu + c, mt + p);
  std::fill(s, s + span, acc_t(0));
  for_spans(rows * c, span, [&](int64_t o, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      const acc_t d = static_cast<acc_t>(x[o + k]) - mt[k];
      s[k] += d * d;
    }
  });
  fold_span(s, span, c, m2);
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& input_) {
  check_stats_args(input_);
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
      parallel_items(g.c, g.n * g.hw, [&](int64_t begin, int64_t end, auto width) {
        for (int64_t c = begin; c < end; ++c) {
          const Welford<acc_t> w = channel_stats<decltype(width)::value, scalar_t, acc_t>(x, g, c);
          mean_p[c] = static_cast<op_t>(w.mean);
          m2_p[c] = static_cast<op_t>(w.m2);
        }
      });
      return;
    }
    // Blocks of rows, each an exact (mean, M2) per channel; then the blocks merged in order, per channel.
    AlignedVector<acc_t> bmean, bm2;
    using Scratch = SpanScratch<acc_t, scalar_t>;
    const RowBlocks rb = row_block_partials<Scratch>(
        g, kStatBlock, bmean, bm2, [&](int64_t o, int64_t n, acc_t* mu, acc_t* sq, Scratch& scratch) {
          rows_stats<scalar_t, acc_t>(x + o, n, g.c, mu, sq, scratch.sums.data());
        });
    serial_kernel([&](auto) {
      acc_t* __restrict__ mu = bmean.data();
      acc_t* __restrict__ sq = bm2.data();
      for (int64_t b = 1; b < rb.blocks; ++b) {
        const acc_t na = static_cast<acc_t>(rb.first(b));
        const acc_t nb = static_cast<acc_t>(rb.count(b));
        const acc_t* __restrict__ bmu = mu + b * g.c;
        const acc_t* __restrict__ bsq = sq + b * g.c;
        for (int64_t c = 0; c < g.c; ++c) {
          const Welford<acc_t> w = welford_merge(Welford<acc_t>{na, mu[c], sq[c]}, Welford<acc_t>{nb, bmu[c], bsq[c]});
          mu[c] = w.mean;
          sq[c] = w.m2;
        }
      }
      for (int64_t c = 0; c < g.c; ++c) {
        mean_p[c] = static_cast<op_t>(mu[c]);
        m2_p[c] = static_cast<op_t>(sq[c]);
      }
    });
  });
  return {mean, m2};
}

// ---- bn_finalize ---------------------------------------------------------------------------------------------

// In double whatever the storage dtype, exactly as the CUDA kernel: merge, finalize, write.
void bn_finalize_cpu(const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
                     const std::optional<at::Tensor>& counts, double count,
                     const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                     double momentum, double eps, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                     const at::Tensor& new_running_mean, const at::Tensor& new_running_var) {
  check_finalize_args(mean, m2, counts, count, running_mean, running_var, save_mean, save_invstd, new_running_mean,
                      new_running_var, momentum, eps);
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

// ---- element-wise passes (bn_apply, bn_backward_dy) -------------------------------------------------------------

// The runs of an activation that element-wise passes walk: NCHW, one contiguous (n, c) plane of hw values per call
// of plane(offset, c); channels_last, rows(offset, count) for `count` consecutive rows of C values.
template <typename Plane, typename Rows>
void for_each_run(const ActivationShape& g, bool nhwc, const Plane& plane, const Rows& rows) {
  if (!nhwc) {
    parallel_items(
        g.n * g.c, g.hw,
        [&](int64_t begin, int64_t end, auto) {
          for (int64_t p = begin; p < end; ++p) plane(p * g.hw, p % g.c);
        },
        kParallelMap);
  } else {
    parallel_items(
        g.n * g.hw, g.c, [&](int64_t begin, int64_t end, auto) { rows(begin * g.c, end - begin); }, kParallelMap);
  }
}

// z = act((x - mean) * scale + shift [+ r]) over one contiguous run of one channel.
template <bool kRelu, bool kResidual, typename scalar_t, typename op_t>
DLO_INLINE void apply_run(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, scalar_t* __restrict__ z,
                          int64_t len, op_t mean, op_t scale, op_t shift) {
  for (int64_t i = 0; i < len; ++i) {
    op_t v = bn_affine<op_t>(static_cast<op_t>(x[i]), mean, scale, shift);
    if (kResidual) v += static_cast<op_t>(r[i]);
    z[i] = static_cast<scalar_t>(relu_if<op_t>(v, kRelu));
  }
}

// The same over `rows` channels_last rows of c values, with per-channel mean, scale, shift tiled (tile_channels).
template <bool kRelu, bool kResidual, typename scalar_t, typename op_t>
DLO_INLINE void apply_rows(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, scalar_t* __restrict__ z,
                           int64_t rows, int64_t c, const op_t* __restrict__ mean, const op_t* __restrict__ scale,
                           const op_t* __restrict__ shift) {
  for_spans(rows * c, tiled_length(c), [&](int64_t o, int64_t n) {
    for (int64_t k = 0; k < n; ++k) {
      op_t v = bn_affine<op_t>(static_cast<op_t>(x[o + k]), mean[k], scale[k], shift[k]);
      if (kResidual) v += static_cast<op_t>(r[o + k]);
      z[o + k] = static_cast<scalar_t>(relu_if<op_t>(v, kRelu));
    }
  });
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
    AlignedVector<op_t> mp(g.c), sp(g.c), hp(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      mp[c] = static_cast<op_t>(mu.get(c));
      const op_t inv = static_cast<op_t>(is.get(c));
      sp[c] = wt ? static_cast<op_t>(wt->get(c)) * inv : inv;
      hp[c] = bs ? static_cast<op_t>(bs->get(c)) : op_t(0);
    }
    if (is_nhwc(input)) {
      for (auto* v : {&mp, &sp, &hp}) tile_channels(*v, g.c);
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

// ---- backward ------------------------------------------------------------------------------------------------

// The three activations of a backward stage, checked, in input's kernel layout.
struct BackwardActivations {
  at::Tensor grad_out, output, input;
  ActivationShape g;
};

BackwardActivations backward_activations(const at::Tensor& grad_out, const at::Tensor& output,
                                         const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd) {
  check_backward_args(grad_out, output, input, mean, invstd);
  const auto mf = input.suggest_memory_format();
  BackwardActivations a{as_kernel_layout(grad_out, mf), as_kernel_layout(output, mf), as_kernel_layout(input, mf),
                        {}};
  a.g = activation_shape(a.input);
  return a;
}

// NCHW: (sum g, sum g * (y - mean)) of one channel, g = act_grad(dz, z), its N planes into the same kLanes sums.
template <int kBytes, bool kRelu, typename scalar_t, typename acc_t>
DLO_INLINE void channel_reduce(const scalar_t* dz, const scalar_t* z, const scalar_t* y, const ActivationShape& g,
                               int64_t c, acc_t mean, acc_t& sum_g, acc_t& sum_gy) {
  alignas(64) scalar_t buf[kGradBuf];
  Lanes<acc_t, kBytes> sg, sgy, gv, yv;
  acc_t tg[kLanes] = {}, tgy[kLanes] = {};
  for (int64_t n = 0; n < g.n; ++n) {
    const int64_t o = (n * g.c + c) * g.hw;
    // Chunks of kGradBuf values (a multiple of kLanes): value i of the plane still goes to lane i % kLanes.
    for (int64_t s = 0; s < g.hw; s += kGradBuf) {
      const int64_t len = std::min(kGradBuf, g.hw - s);
      const scalar_t* __restrict__ gs = dz + o + s;
      if (kRelu) {
        masked_grad(dz + o + s, z + o + s, buf, len);
        gs = buf;
      }
      const scalar_t* __restrict__ ys = y + o + s;
      for_lanes(
          len,
          [&](int64_t i) {
            gv.load(gs + i);
            yv.load(ys + i);
            sg.add(gv);
            yv.subtract(mean);
            sgy.add_product(gv, yv);
          },
          [&](int64_t i, int j) {
            const acc_t gi = static_cast<acc_t>(gs[i]);
            tg[j] += gi;
            tgy[j] += gi * (static_cast<acc_t>(ys[i]) - mean);
          });
    }
  }
  sum_g = sg.total(tg);
  sum_gy = sgy.total(tgy);
}

// NHWC: the same sums per channel over `rows` rows of c values, written to sg and sgy, over spans of whole rows
// with the means tiled (mt); scratch holds 2 * tiled_length(c) values, buf tiled_length(c).
template <bool kRelu, typename scalar_t, typename acc_t>
DLO_INLINE void rows_reduce(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z,
                            const scalar_t* __restrict__ y, int64_t rows, int64_t c, const acc_t* __restrict__ mt,
                            acc_t* __restrict__ sg, acc_t* __restrict__ sgy, acc_t* __restrict__ scratch,
                            scalar_t* __restrict__ buf) {
  const int64_t span = tiled_length(c);
  acc_t* __restrict__ a = scratch;
  acc_t* __restrict__ b = scratch + span;
  std::fill(scratch, scratch + 2 * span, acc_t(0));
  for_spans(rows * c, span, [&](int64_t o, int64_t n) {
    const scalar_t* __restrict__ gs = dz + o;
    if (kRelu) {
      masked_grad(dz + o, z + o, buf, n);
      gs = buf;
    }
    const scalar_t* __restrict__ ys = y + o;
    for (int64_t k = 0; k < n; ++k) {
      const acc_t gi = static_cast<acc_t>(gs[k]);
      a[k] += gi;
      b[k] += gi * (static_cast<acc_t>(ys[k]) - mt[k]);
    }
  });
  fold_span(a, span, c, sg);
  fold_span(b, span, c, sgy);
}

std::tuple<at::Tensor, at::Tensor> bn_backward_reduce_cpu(const at::Tensor& grad_out_, const at::Tensor& output_,
                                                          const at::Tensor& input_, const at::Tensor& mean,
                                                          const at::Tensor& invstd, bool relu) {
  const BackwardActivations t = backward_activations(grad_out_, output_, input_, mean, invstd);
  const ActivationShape& g = t.g;
  const auto opmath = opmath_dtype(t.input.scalar_type());
  at::Tensor sum_g = at::empty({g.c}, t.input.options().dtype(opmath));
  at::Tensor sum_gx = at::empty({g.c}, t.input.options().dtype(opmath));
  if (g.n * g.hw == 0) {
    sum_g.zero_();
    sum_gx.zero_();
    return {sum_g, sum_gx};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.input.scalar_type(), "bn_backward_reduce_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, false>;
    using op_t = at::opmath_type<scalar_t>;
    const scalar_t* y = t.input.const_data_ptr<scalar_t>();
    const scalar_t* dz = t.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = t.output.const_data_ptr<scalar_t>();
    const ChannelValues mu(mean), is(invstd);
    AlignedVector<acc_t> mp(g.c), ip(g.c);
    for (int64_t c = 0; c < g.c; ++c) {
      mp[c] = static_cast<acc_t>(static_cast<op_t>(mu.get(c)));
      ip[c] = static_cast<acc_t>(static_cast<op_t>(is.get(c)));
    }
    op_t* og = sum_g.data_ptr<op_t>();
    op_t* ogx = sum_gx.data_ptr<op_t>();
    // sum(g * xhat) = invstd * sum(g * (y - mean)): one multiply per channel, not per element.
    const auto write = [&](int64_t c, acc_t sg, acc_t sgy) {
      og[c] = static_cast<op_t>(sg);
      ogx[c] = static_cast<op_t>(sgy * ip[c]);
    };
    with_flag(relu, [&](auto relu_c) {
      constexpr bool kRelu = decltype(relu_c)::value;
      if (!is_nhwc(t.input)) {
        parallel_items(g.c, g.n * g.hw, [&](int64_t begin, int64_t end, auto width) {
          for (int64_t c = begin; c < end; ++c) {
            acc_t sg, sgy;
            channel_reduce<decltype(width)::value, kRelu>(dz, z, y, g, c, mp[c], sg, sgy);
            write(c, sg, sgy);
          }
        });
        return;
      }
      // Blocks of rows, each a partial per channel; then the partials added in block order, per channel.
      AlignedVector<acc_t> pg, pgy, mt(mp);
      tile_channels(mt, g.c);
      using Scratch = SpanScratch<acc_t, scalar_t>;
      const RowBlocks rb = row_block_partials<Scratch>(
          g, kReduceBlock, pg, pgy, [&](int64_t o, int64_t n, acc_t* a, acc_t* b, Scratch& scratch) {
            rows_reduce<kRelu>(dz + o, z + o, y + o, n, g.c, mt.data(), a, b, scratch.sums.data(),
                               scratch.values.data());
          });
      serial_kernel([&](auto) {
        acc_t* __restrict__ sg = pg.data();
        acc_t* __restrict__ sgy = pgy.data();
        for (int64_t b = 1; b < rb.blocks; ++b) {
          for (int64_t c = 0; c < g.c; ++c) {
            sg[c] += sg[b * g.c + c];
            sgy[c] += sgy[b * g.c + c];
          }
        }
      });
      for (int64_t c = 0; c < g.c; ++c) write(c, pg[c], pgy[c]);
    });
  });
  return {sum_g, sum_gx};
}

// dy = bn_dy(act_grad(dz, z), y) over one contiguous run of one channel. kCentred: the channel's coefficient b is
// nonzero, so dy reads y; otherwise (b = 0) bn_dy is k * (g - a) and y is not even loaded.
template <bool kRelu, bool kCentred, typename scalar_t, typename op_t>
DLO_INLINE void dy_run(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z,
                       const scalar_t* __restrict__ y, scalar_t* __restrict__ o, int64_t len, op_t mean,
                       DyCoef<op_t> cf) {
  if (!kCentred) cf.b = op_t(0);  // already 0: says so to the compiler
  for (int64_t i = 0; i < len; ++i) {
    const op_t gi = grad_at<kRelu>(dz[i], z[i]);
    o[i] = static_cast<scalar_t>(bn_dy<op_t>(gi, kCentred ? static_cast<op_t>(y[i]) : op_t(0), mean, cf));
  }
}

// How a channels_last dy pass treats the per-channel coefficient b (bn_dy's two forms).
enum class DyForm { kConstant, kCentred, kMixed };  // every b = 0 / every b != 0 / some of each

// The same over `rows` channels_last rows of c values with per-channel coefficients (k, a, b) and means, tiled
// (tile_channels). kMixed
// writes bn_dy as k * (g - a - (y' - mean) * b) with y' = mean where b = 0: the product is then exactly 0 and
// (g - a) - 0 is g - a, so this is bn_dy for every channel, as a select of two loaded values (which vectorizes).
template <bool kRelu, DyForm kForm, typename scalar_t, typename op_t>
DLO_INLINE void dy_rows(const scalar_t* __restrict__ dz, const scalar_t* __restrict__ z,
                        const scalar_t* __restrict__ y, scalar_t* __restrict__ o, int64_t rows, int64_t c,
                        const op_t* __restrict__ mean, const op_t* __restrict__ k, const op_t* __restrict__ a,
                        const op_t* __restrict__ b) {
  for_spans(rows * c, tiled_length(c), [&](int64_t base, int64_t n) {
    for (int64_t j = 0; j < n; ++j) {
      const op_t gj = grad_at<kRelu>(dz[base + j], z[base + j]);
      if (kForm == DyForm::kConstant) {
        o[base + j] = static_cast<scalar_t>(k[j] * (gj - a[j]));
      } else if (kForm == DyForm::kCentred) {
        o[base + j] = static_cast<scalar_t>(k[j] * (gj - a[j] - (static_cast<op_t>(y[base + j]) - mean[j]) * b[j]));
      } else {
        const op_t yv = static_cast<op_t>(y[base + j]), mv = mean[j], bv = b[j];
        const op_t yc = bv == op_t(0) ? mv : yv;
        o[base + j] = static_cast<scalar_t>(k[j] * (gj - a[j] - (yc - mv) * bv));
      }
    }
  });
}

at::Tensor bn_backward_dy_cpu(const at::Tensor& grad_out_, const at::Tensor& output_, const at::Tensor& input_,
                              const at::Tensor& mean, const at::Tensor& invstd,
                              const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& sum_g,
                              const std::optional<at::Tensor>& sum_g_xhat, double count, bool relu,
                              bool training) {
  const BackwardActivations t = backward_activations(grad_out_, output_, input_, mean, invstd);
  const ActivationShape& g = t.g;
  check_dy_args(t.input, weight, sum_g, sum_g_xhat, count, training);
  at::Tensor dy = at::empty(t.input.sizes(), t.input.options().memory_format(t.input.suggest_memory_format()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.input.scalar_type(), "bn_backward_dy_cpu", [&] {
    using op_t = at::opmath_type<scalar_t>;
    // Per-channel coefficients (common/bn_math.h dy_coef), in op_t as the CUDA kernel computes them.
    const ChannelValues mu(mean), is(invstd);
    std::optional<ChannelValues> wt, sg, sgx;
    if (present(weight)) wt.emplace(*weight);
    if (training) {
      sg.emplace(*sum_g);
      sgx.emplace(*sum_g_xhat);
    }
    AlignedVector<op_t> mp(g.c), kp(g.c), ap(g.c), bp(g.c);
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
    if (is_nhwc(t.input)) {
      for (auto* v : {&mp, &kp, &ap, &bp}) tile_channels(*v, g.c);
    }
    const scalar_t* y = t.input.const_data_ptr<scalar_t>();
    const scalar_t* dz = t.grad_out.const_data_ptr<scalar_t>();
    const scalar_t* z = t.output.const_data_ptr<scalar_t>();
    scalar_t* o = dy.data_ptr<scalar_t>();
    with_flag(relu, [&](auto relu_c) {
      constexpr bool kRelu = decltype(relu_c)::value;
      for_each_run(
          g, is_nhwc(t.input),
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
