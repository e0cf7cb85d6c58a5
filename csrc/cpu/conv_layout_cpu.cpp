// Activation layout changes for the cpu backend's convolutions (cpu/conv_layout_cpu.h).
#include "cpu/conv_layout_cpu.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/version.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <string>

#include "cpu/isa_dispatch.h"
#include "cpu/winograd_cpu.h"

namespace deeplab_ops {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// change_layout's blocks: measured on this project's Xeon, 64 x 64 blocks 0.37-0.45 ms per 4 MB, 32 x 32 0.5.
constexpr int64_t kB = 64;

// d[j * ldd + i] = s[i * lds + j] for i < rows, j < cols: 4 x 4 register transposes (SSE, on every x86-64) where
// a whole one fits, single floats at the edges.
void transpose_block_sse(const float* s, int64_t lds, float* d, int64_t ldd, int64_t rows, int64_t cols) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= rows; i += 4) {
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
      const float* p = s + i * lds + j;
      __m128 r0 = _mm_loadu_ps(p), r1 = _mm_loadu_ps(p + lds), r2 = _mm_loadu_ps(p + 2 * lds),
             r3 = _mm_loadu_ps(p + 3 * lds);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* q = d + j * ldd + i;
      _mm_storeu_ps(q, r0);
      _mm_storeu_ps(q + ldd, r1);
      _mm_storeu_ps(q + 2 * ldd, r2);
      _mm_storeu_ps(q + 3 * ldd, r3);
    }
    for (; j < cols; ++j)
      for (int64_t ii = i; ii < i + 4; ++ii) d[j * ldd + ii] = s[ii * lds + j];
  }
#endif
  for (; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) d[j * ldd + i] = s[i * lds + j];
}

#ifdef DLO_X86_KERNELS
// The same by 8 x 8 register transposes (AVX) where a whole one fits: per value half the loads and stores and
// three quarters of the shuffles of the 4 x 4 form. Rows left over (fewer than 8) go to the 4 x 4 form.
__attribute__((target("avx2"))) void transpose_block_avx2(const float* s, int64_t lds, float* d, int64_t ldd,
                                                          int64_t rows, int64_t cols) {
  int64_t i = 0;
  for (; i + 8 <= rows; i += 8) {
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      const float* p = s + i * lds + j;
      __m256 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(p + k * lds);
      // pairs of rows interleaved, then pairs of pairs: u[4h + q] holds column q (low half) and q + 4 (high
      // half) of rows 4h .. 4h + 3
      __m256 t[8], u[8];
      for (int h = 0; h < 2; ++h) {
        t[4 * h] = _mm256_unpacklo_ps(r[4 * h], r[4 * h + 1]);
        t[4 * h + 1] = _mm256_unpackhi_ps(r[4 * h], r[4 * h + 1]);
        t[4 * h + 2] = _mm256_unpacklo_ps(r[4 * h + 2], r[4 * h + 3]);
        t[4 * h + 3] = _mm256_unpackhi_ps(r[4 * h + 2], r[4 * h + 3]);
        u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      float* q = d + j * ldd + i;
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_ps(q + k * ldd, _mm256_permute2f128_ps(u[k], u[4 + k], 0x20));
        _mm256_storeu_ps(q + (k + 4) * ldd, _mm256_permute2f128_ps(u[k], u[4 + k], 0x31));
      }
    }
    for (; j < cols; ++j)
      for (int64_t ii = i; ii < i + 8; ++ii) d[j * ldd + ii] = s[ii * lds + j];
  }
  if (i < rows) transpose_block_sse(s + i * lds, lds, d + i, ldd, rows - i, cols);
}
#endif

using TransposeBlock = void (*)(const float*, int64_t, float*, int64_t, int64_t, int64_t);

// The block transpose for this machine: the 8 x 8 form where torch's kernels use AVX2 or AVX-512.
TransposeBlock transpose_block_kernel() {
#ifdef DLO_X86_KERNELS
  if (cpu_isa::kernel_isa() != cpu_isa::Isa::kBase) return transpose_block_avx2;
#endif
  return transpose_block_sse;
}

// Taps whose input position lies in the image, at most: above this oneDNN's NCHW convolution was as fast as its
// channels_last one plus the conversions. Measured on this project's Xeon (AVX-512, 2 cores), float32 3x3
// convolutions with a ReLU, NCHW against channels_last (no conversion), same process: 2048 -> 256 on 33 x 33 at
// dilation 18 (41 % of the taps) 38.1 against 17.3 ms, 256 -> 256 5.5 against 2.2; 2048 -> 256 on 65 x 65 at
// dilation 24 (57 %) 150 against 85, dilation 36 (40 %) 146 against 66; 512 -> 512 on 33 x 33 at dilation 8 (70 %)
// 20.2 against 12.7; but at dilation 6 (78 %) 26.9 against 31.0 and dilation 2 (96 %) 32.9 against 39.8.
constexpr double kMaxValidFraction = 0.72;
// ... or this many with a dilation of at least kLargeDilation, where oneDNN's NCHW convolution is slower per tap
// than its dense one (2048 -> 256 on 65 x 65, batch 1: dilation 12 (77 %) 156 ms, dilation 1 131): at dilation 12
// (77 %) 156 against 110 ms (1024 -> 256: 69.9 against 51.7; 256 -> 256: 18.1 against 11.8), 512 -> 512 at
// dilation 8 (84 %) 69.1 against 50.8; but at dilation 6 (88 %) 121 against 124 and 512 -> 512 at dilation 4
// (92 %) 54.9 against 57.3.
constexpr double kMaxValidFractionDilated = 0.85;
constexpr int64_t kLargeDilation = 8;
// Multiplies (the taps inside the image) per value converted (x in, the output out, an NCHW weight whose
// channels_last copy is not kept) at least. Measured with 2048 -> 256 weights converted per call (a training
// forward), against the NCHW convolution: rate 18 on 1 x 2048 x 33 x 33 (288 multiplies per converted value) 28.6
// against 38.0 ms, 2 x 2048 x 33 x 33 (428) 0.6-0.7x the time; but rate 12 on 4 x 2048 x 17 x 17 (207) 1.14x and
// rate 6 on 8 x 2048 x 9 x 9 (152) 1.41x the time.
constexpr double kMinMacsPerConverted = 250.0;

}  // namespace

void transpose_blocked(const float* s, int64_t lds, float* d, int64_t ldd, int64_t rows, int64_t cols) {
  const TransposeBlock transpose_block = transpose_block_kernel();
  for (int64_t r0 = 0; r0 < rows; r0 += kB) {
    for (int64_t c0 = 0; c0 < cols; c0 += kB) {
      transpose_block(s + r0 * lds + c0, lds, d + c0 * ldd + r0, ldd, std::min(kB, rows - r0), std::min(kB, cols - c0));
    }
  }
}

// A dense float32 [N, C, H, W] tensor's layout changed between NCHW and channels_last: per image a [H*W, C] <->
// [C, H*W] transpose in 64 x 64 blocks, each read and written within a few cache lines. ATen's copy walks one
// side with a stride of C or H * W (measured on a 1 x 64 x 129 x 129 map: channels_last to NCHW 2.7 ms, against
// the convolution's 3 ms).
at::Tensor change_layout(const at::Tensor& t, at::MemoryFormat to) {
  if (t.is_contiguous(to)) return t;
  // Others, and a strided tensor already laid out as `to` (a channel slice), by ATen's copy.
  if (t.dim() != 4 || t.scalar_type() != at::kFloat || !t.is_cpu() || t.suggest_memory_format() == to ||
      (to != at::MemoryFormat::Contiguous && to != at::MemoryFormat::ChannelsLast)) {
    return t.contiguous(to);
  }
  const int64_t n = t.size(0), c = t.size(1), hw = t.size(2) * t.size(3);
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(to));
  const bool to_nchw = to == at::MemoryFormat::Contiguous;
  const at::Tensor src_t = t.contiguous(to_nchw ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const float* src = src_t.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  // Source rows and columns: [hw, c] to NCHW, [c, hw] to channels_last.
  const int64_t rows = to_nchw ? hw : c, cols = to_nchw ? c : hw;
  const int64_t rb = ceil_div(rows, kB), cb = ceil_div(cols, kB);
  const TransposeBlock transpose_block = transpose_block_kernel();
  at::parallel_for(0, n * rb * cb, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t img = b / (rb * cb), rem = b % (rb * cb);
      const int64_t r0 = rem / cb * kB, c0 = rem % cb * kB;
      transpose_block(src + img * hw * c + r0 * cols + c0, cols, dst + img * hw * c + c0 * rows + r0, rows,
                      std::min(kB, rows - r0), std::min(kB, cols - c0));
    }
  });
  return out;
}


at::Tensor flipped_transposed_weight(const at::Tensor& weight) {
  constexpr auto kCL = at::MemoryFormat::ChannelsLast;
  if (weight.dim() != 4 || weight.scalar_type() != at::kFloat || !weight.is_cpu()) {
    return weight.flip({2, 3}).transpose(0, 1).contiguous(kCL);
  }
  // [co][tap][ci] in memory; per tap a [co, ci] -> [ci, co] transpose in blocks, the tap flipped
  const at::Tensor w = change_layout(weight, kCL);
  const int64_t cout = w.size(0), cin = w.size(1), taps = w.size(2) * w.size(3);
  at::Tensor out = at::empty({cin, cout, w.size(2), w.size(3)}, w.options().memory_format(kCL));
  const float* src = w.const_data_ptr<float>();
  float* dst = out.mutable_data_ptr<float>();
  // Blocks of kR output by kC input channels, every tap in turn. The rows' strides are multiples of 1 KiB (taps *
  // channels * 4 bytes), so a block's rows share a few cache sets: 16 destination rows stay within their ways.
  // Measured on a 256 x 2048 x 3 x 3 weight, one thread: 64 x 64 blocks 8.2-10.3 ms, 64 x 16 6.1-7.1 ms.
  constexpr int64_t kR = 64, kC = 16;
  const int64_t rb = ceil_div(cout, kR), cb = ceil_div(cin, kC);
  const TransposeBlock transpose_block = transpose_block_kernel();
  at::parallel_for(0, rb * cb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b / cb * kR, c0 = b % cb * kC;
      for (int64_t t = 0; t < taps; ++t) {
        transpose_block(src + r0 * taps * cin + (taps - 1 - t) * cin + c0, taps * cin,
                        dst + c0 * taps * cout + t * cout + r0, taps * cout, std::min(kR, cout - r0),
                        std::min(kC, cin - c0));
      }
    }
  });
  return out;
}


bool full_float32_matmul() {
  auto& ctx = at::globalContext();
  // Whether oneDNN's float32 matmuls run at full precision. From torch 2.9 its own setting says so (an enum from
  // 2.10, a string in 2.9), the global one ("medium" shows there as "bf16") included; reading the legacy global
  // setting there would raise after any new-API setting that differs from it (e.g. CUDA's matmul TF32). Before
  // 2.9 the legacy setting alone decides.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  const auto p = ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
  return p != at::Float32Precision::BF16 && p != at::Float32Precision::TF32;
#elif TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR == 9
  const std::string p = ctx.float32Precision("mkldnn", "matmul");
  return p != "bf16" && p != "tf32";
#else
  return ctx.float32MatmulPrecision() != at::Float32MatmulPrecision::MEDIUM;
#endif
}


int64_t valid_taps(int64_t size, int64_t out, int64_t pad, int64_t dil, int64_t k, int64_t stride) {
  int64_t taps = 0;
  for (int64_t t = 0; t < k; ++t) {
    // o * stride - pad + dil * t in [0, size): o in [lo, hi)
    const int64_t off = dil * t - pad;
    const int64_t lo = off >= 0 ? 0 : ceil_div(-off, stride);
    const int64_t hi = std::min(out, size - off <= 0 ? int64_t{0} : ceil_div(size - off, stride));
    taps += std::max<int64_t>(0, hi - lo);
  }
  return taps;
}

std::optional<TapPairs> sparse_tap_pairs(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  if (!x.is_cpu() || !weight.is_cpu() || x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) {
    return std::nullopt;
  }
  if (x.dim() != 4 || weight.dim() != 4 || weight.size(1) != x.size(1) || x.numel() == 0) return std::nullopt;
  if (stride.size() != 2 || padding.size() != 2 || dilation.size() != 2 || stride[0] != 1 || stride[1] != 1) {
    return std::nullopt;
  }
  if (padding[0] < 0 || padding[1] < 0 || dilation[0] < 1 || dilation[1] < 1) return std::nullopt;
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return std::nullopt;
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t ho = x.size(2) + 2 * padding[0] - dilation[0] * (kh - 1);
  const int64_t wo = x.size(3) + 2 * padding[1] - dilation[1] * (kw - 1);
  if (kh * kw <= 1 || ho < 1 || wo < 1) return std::nullopt;
  const double pairs = static_cast<double>(valid_taps(x.size(2), ho, padding[0], dilation[0], kh, 1)) *
                       static_cast<double>(valid_taps(x.size(3), wo, padding[1], dilation[1], kw, 1));
  const double positions = static_cast<double>(ho * wo);
  return TapPairs{pairs, positions, pairs / (static_cast<double>(kh * kw) * positions)};
}

bool nchw_conv_via_channels_last(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool may_keep_weight) {
  if (!x.is_cpu() || x.suggest_memory_format() != at::MemoryFormat::Contiguous || !x.is_contiguous()) return false;
  if (!channels_last_extent_ok(weight, dilation)) return false;
  const auto taps = sparse_tap_pairs(x, weight, stride, padding, dilation);
  if (!taps) return false;
  const bool dilated = std::max(dilation[0], dilation[1]) >= kLargeDilation;
  if (taps->fraction > (dilated ? kMaxValidFractionDilated : kMaxValidFraction)) return false;
  const double n = static_cast<double>(x.size(0));
  const double cin = static_cast<double>(x.size(1)), cout = static_cast<double>(weight.size(0));
  double converted = n * (cin * static_cast<double>(x.size(2) * x.size(3)) + cout * taps->positions);
  // The cache is consulted last (a lock): only a call that passed every other test.
  const bool weight_converted = !weight.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                                !(may_keep_weight && channels_last_weight_kept(weight));
  if (weight_converted) converted += static_cast<double>(weight.numel());  // on every call
  return n * cin * cout * taps->pairs >= kMinMacsPerConverted * converted;
}

}  // namespace deeplab_ops
