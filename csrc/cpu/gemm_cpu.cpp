// The packed float32 GEMM of cpu/gemm_cpu.h.
//
// Register blocking: a micro-kernel holds a tile of kRows rows by one 32-column panel of C in registers (AVX-512: 8
// rows by two 16-float vectors; AVX2: 6 rows by two 8-float vectors, a panel in two halves) and runs the inner
// dimension in blocks of kInner, B's panel block (32 KB) staying in L1 while A's rows stream through it: on this
// project's AMD EPYC (Zen 4, one thread) 104-114 GFLOP/s at the Winograd shapes (128-2048 inner, 128-256 columns,
// 72-289 rows; 87-104 where each GEMM reads a fresh 2 MB B), where ATen's mm (MKL) ran 66-78 and oneDNN's inner
// product with a prepacked weight 72-101.
#include "cpu/gemm_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "cpu/conv_layout_cpu.h"
#include "cpu/isa_dispatch.h"

#ifdef DLO_X86_KERNELS
#include <immintrin.h>
#endif

namespace deeplab_ops {
namespace {

constexpr int64_t kInner = 256;  // inner-dimension block: B's panel block of 32 KB, A's rows of the block in L2

// The baseline build (and machines other than x86): ATen's mm (MKL, OpenBLAS, ...) per panel, which reads the
// panel as a row-major [inner x cols] matrix 32 floats a row. A scalar FMA chain per element would give the vector
// kernels' bits, but on x86 without an FMA target each step is a library call: 1 GFLOP/s against mm's ~80, which
// would make Winograd many times slower than the oneDNN convolution it replaces. So this build's bits are mm's.
void gemm_base(const GemmRows* parts, int64_t count, int64_t lda, const float* b, int64_t inner, int64_t n,
               int64_t ldc, int64_t p0, int64_t p1) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  for (int64_t s = 0; s < count; ++s) {
    const GemmRows& part = parts[s];
    const at::Tensor av = at::from_blob(const_cast<float*>(part.a), {part.rows, inner}, {lda, 1}, options);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kGemmPanel, n - p * kGemmPanel);
      const at::Tensor bv =
          at::from_blob(const_cast<float*>(b + p * inner * kGemmPanel), {inner, cols}, {kGemmPanel, 1}, options);
      at::Tensor cv = at::from_blob(part.c + p * kGemmPanel, {part.rows, cols}, {ldc, 1}, options);
      at::mm_out(cv, av, bv);
    }
  }
}

void gemm_sum_base(const GemmTerm* terms, int64_t count, int64_t lda, const float* b, int64_t inner, int64_t n,
                   float* c, int64_t ldc, int64_t rows, int64_t p0, int64_t p1) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min(kGemmPanel, n - p * kGemmPanel);
    at::Tensor cv = at::from_blob(c + p * kGemmPanel, {rows, cols}, {ldc, 1}, options);
    for (int64_t t = 0; t < count; ++t) {
      const at::Tensor av = at::from_blob(const_cast<float*>(terms[t].a), {rows, terms[t].inner}, {lda, 1}, options);
      const at::Tensor bv = at::from_blob(const_cast<float*>(b + p * inner * kGemmPanel + terms[t].first * kGemmPanel),
                                          {terms[t].inner, cols}, {kGemmPanel, 1}, options);
      if (t == 0) {
        at::mm_out(cv, av, bv);
      } else {
        cv.addmm_(av, bv);
      }
    }
  }
}

#ifdef DLO_X86_KERNELS
#define DLO_AVX512_KERNEL __attribute__((target("avx512f,avx2,fma"), always_inline)) inline
#define DLO_AVX2_KERNEL __attribute__((target("avx2,fma"), always_inline)) inline

// R rows of C's panel (columns masked by m0, m1) += or = A's rows [.., k0 + kc) times the panel's block.
template <int R>
DLO_AVX512_KERNEL void tile_avx512(const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc,
                                   bool first, __mmask16 m0, __mmask16 m1) {
  __m512 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, c + r * ldc);
    acc1[r] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, c + r * ldc + 16);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * kGemmPanel), b1 = _mm512_loadu_ps(b + k * kGemmPanel + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      acc0[r] = _mm512_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(av, b1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, acc0[r]);
    _mm512_mask_storeu_ps(c + r * ldc + 16, m1, acc1[r]);
  }
}

template <int R>
DLO_AVX512_KERNEL void rows_avx512(const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc,
                                   int64_t rows, bool first, __mmask16 m0, __mmask16 m1) {
  int64_t i = 0;
  for (; i + R <= rows; i += R) tile_avx512<R>(a + i * lda, lda, b, kc, c + i * ldc, ldc, first, m0, m1);
  const int64_t rest = rows - i;
  a += i * lda, c += i * ldc;
  switch (rest) {  // the last rows, fewer than R
    case 7: return tile_avx512<7>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 6: return tile_avx512<6>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 5: return tile_avx512<5>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 4: return tile_avx512<4>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 3: return tile_avx512<3>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 2: return tile_avx512<2>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 1: return tile_avx512<1>(a, lda, b, kc, c, ldc, first, m0, m1);
    default: return;
  }
}

// The lanes of a panel's two 16-float halves that its first `cols` columns take.
inline std::pair<__mmask16, __mmask16> panel_masks(int64_t cols) {
  return {static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1),
          static_cast<__mmask16>(cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1)};
}

// Each block of B's panel (kInner rows of it, in L1) multiplies every part's rows before the next block.
__attribute__((target("avx512f,avx2,fma"))) void gemm_avx512(const GemmRows* parts, int64_t count, int64_t lda,
                                                             const float* b, int64_t inner, int64_t n, int64_t ldc,
                                                             int64_t p0, int64_t p1) {
  for (int64_t k0 = 0; k0 < inner; k0 += kInner) {
    const int64_t kc = std::min(kInner, inner - k0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kGemmPanel, n - p * kGemmPanel);
      const auto [m0, m1] = panel_masks(cols);
      for (int64_t s = 0; s < count; ++s) {
        rows_avx512<8>(parts[s].a + k0, lda, b + p * inner * kGemmPanel + k0 * kGemmPanel, kc,
                       parts[s].c + p * kGemmPanel, ldc, parts[s].rows, k0 == 0, m0, m1);
      }
    }
  }
}

__attribute__((target("avx512f,avx2,fma"))) void gemm_sum_avx512(const GemmTerm* terms, int64_t count, int64_t lda,
                                                                 const float* b, int64_t inner, int64_t n, float* c,
                                                                 int64_t ldc, int64_t rows, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min(kGemmPanel, n - p * kGemmPanel);
    const auto [m0, m1] = panel_masks(cols);
    for (int64_t t = 0; t < count; ++t) {
      for (int64_t k0 = 0; k0 < terms[t].inner; k0 += kInner) {
        rows_avx512<8>(terms[t].a + k0, lda, b + p * inner * kGemmPanel + (terms[t].first + k0) * kGemmPanel,
                       std::min(kInner, terms[t].inner - k0), c + p * kGemmPanel, ldc, rows, t == 0 && k0 == 0, m0,
                       m1);
      }
    }
  }
}

// AVX2: a panel in two halves of 16 columns, each R rows by two 8-float vectors.
template <int R>
DLO_AVX2_KERNEL void tile_avx2(const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc,
                               bool first, __m256i m0, __m256i m1) {
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) {
    acc0[r] = first ? _mm256_setzero_ps() : _mm256_maskload_ps(c + r * ldc, m0);
    acc1[r] = first ? _mm256_setzero_ps() : _mm256_maskload_ps(c + r * ldc + 8, m1);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * kGemmPanel), b1 = _mm256_loadu_ps(b + k * kGemmPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lda + k);
      acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_maskstore_ps(c + r * ldc, m0, acc0[r]);
    _mm256_maskstore_ps(c + r * ldc + 8, m1, acc1[r]);
  }
}

template <int R>
DLO_AVX2_KERNEL void rows_avx2(const float* a, int64_t lda, const float* b, int64_t kc, float* c, int64_t ldc,
                               int64_t rows, bool first, __m256i m0, __m256i m1) {
  int64_t i = 0;
  for (; i + R <= rows; i += R) tile_avx2<R>(a + i * lda, lda, b, kc, c + i * ldc, ldc, first, m0, m1);
  const int64_t rest = rows - i;
  a += i * lda, c += i * ldc;
  switch (rest) {
    case 5: return tile_avx2<5>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 4: return tile_avx2<4>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 3: return tile_avx2<3>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 2: return tile_avx2<2>(a, lda, b, kc, c, ldc, first, m0, m1);
    case 1: return tile_avx2<1>(a, lda, b, kc, c, ldc, first, m0, m1);
    default: return;
  }
}

// The lanes [0, 8) of an AVX2 mask whose first `cols` lanes are on.
__attribute__((target("avx2,fma"))) __m256i lanes_avx2(int64_t cols) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(cols, 0, 8))), index);
}

__attribute__((target("avx2,fma"))) void gemm_avx2(const GemmRows* parts, int64_t count, int64_t lda,
                                                   const float* b, int64_t inner, int64_t n, int64_t ldc, int64_t p0,
                                                   int64_t p1) {
  for (int64_t k0 = 0; k0 < inner; k0 += kInner) {
    const int64_t kc = std::min(kInner, inner - k0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t cols = std::min(kGemmPanel, n - p * kGemmPanel);
      for (int64_t half = 0; half < 2 && half * 16 < cols; ++half) {
        const int64_t hc = cols - half * 16;
        for (int64_t s = 0; s < count; ++s) {
          rows_avx2<6>(parts[s].a + k0, lda, b + p * inner * kGemmPanel + k0 * kGemmPanel + half * 16, kc,
                       parts[s].c + p * kGemmPanel + half * 16, ldc, parts[s].rows, k0 == 0, lanes_avx2(hc),
                       lanes_avx2(hc - 8));
        }
      }
    }
  }
}
__attribute__((target("avx2,fma"))) void gemm_sum_avx2(const GemmTerm* terms, int64_t count, int64_t lda,
                                                       const float* b, int64_t inner, int64_t n, float* c, int64_t ldc,
                                                       int64_t rows, int64_t p0, int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t cols = std::min(kGemmPanel, n - p * kGemmPanel);
    for (int64_t half = 0; half < 2 && half * 16 < cols; ++half) {
      const int64_t hc = cols - half * 16;
      for (int64_t t = 0; t < count; ++t) {
        for (int64_t k0 = 0; k0 < terms[t].inner; k0 += kInner) {
          rows_avx2<6>(terms[t].a + k0, lda,
                       b + p * inner * kGemmPanel + (terms[t].first + k0) * kGemmPanel + half * 16,
                       std::min(kInner, terms[t].inner - k0), c + p * kGemmPanel + half * 16, ldc, rows,
                       t == 0 && k0 == 0, lanes_avx2(hc), lanes_avx2(hc - 8));
        }
      }
    }
  }
}
#endif

// C's column panels [p0, p1) (columns up to n) of its `rows` rows, zero: an empty sum.
void zero_panels(float* c, int64_t ldc, int64_t rows, int64_t n, int64_t p0, int64_t p1) {
  const int64_t j0 = p0 * kGemmPanel, j1 = std::min(n, p1 * kGemmPanel);
  for (int64_t i = 0; i < rows; ++i) std::fill(c + i * ldc + j0, c + i * ldc + j1, 0.f);
}

}  // namespace

void packed_gemm_sum(const GemmTerm* terms, int64_t count, int64_t lda, const float* b, int64_t inner, int64_t n,
                     float* c, int64_t ldc, int64_t rows, int64_t panel_begin, int64_t panel_end) {
  if (rows <= 0 || panel_begin >= panel_end) return;
  if (count == 0) return zero_panels(c, ldc, rows, n, panel_begin, panel_end);  // an empty sum
  for (int64_t t = 0; t < count; ++t) {  // (an empty term would leave C unset as the first)
    TORCH_CHECK(terms[t].inner >= 1, "packed_gemm_sum: term ", t, " has no columns");
  }
#ifdef DLO_X86_KERNELS
  switch (cpu_isa::kernel_isa()) {
    case cpu_isa::Isa::kAvx512:
      return gemm_sum_avx512(terms, count, lda, b, inner, n, c, ldc, rows, panel_begin, panel_end);
    case cpu_isa::Isa::kAvx2:
      return gemm_sum_avx2(terms, count, lda, b, inner, n, c, ldc, rows, panel_begin, panel_end);
    default:
      break;
  }
#endif
  gemm_sum_base(terms, count, lda, b, inner, n, c, ldc, rows, panel_begin, panel_end);
}

void packed_gemm_shared(const GemmRows* parts, int64_t count, int64_t lda, const float* b, int64_t inner, int64_t n,
                        int64_t ldc, int64_t panel_begin, int64_t panel_end) {
  if (count <= 0 || panel_begin >= panel_end) return;
  if (inner == 0) {  // an empty sum
    for (int64_t s = 0; s < count; ++s) zero_panels(parts[s].c, ldc, parts[s].rows, n, panel_begin, panel_end);
    return;
  }
#ifdef DLO_X86_KERNELS
  switch (cpu_isa::kernel_isa()) {
    case cpu_isa::Isa::kAvx512:
      return gemm_avx512(parts, count, lda, b, inner, n, ldc, panel_begin, panel_end);
    case cpu_isa::Isa::kAvx2:
      return gemm_avx2(parts, count, lda, b, inner, n, ldc, panel_begin, panel_end);
    default:
      break;
  }
#endif
  gemm_base(parts, count, lda, b, inner, n, ldc, panel_begin, panel_end);
}

void packed_gemm(const float* a, int64_t lda, const float* b, int64_t inner, int64_t n, float* c, int64_t ldc,
                 int64_t rows, int64_t panel_begin, int64_t panel_end) {
  if (rows <= 0) return;
  const GemmRows part{a, c, rows};
  packed_gemm_shared(&part, 1, lda, b, inner, n, ldc, panel_begin, panel_end);
}

bool packed_gemm_is_float32() {
#ifdef DLO_X86_KERNELS
  if (cpu_isa::kernel_isa() != cpu_isa::Isa::kBase) return true;
#endif
  return full_float32_matmul();
}

void gemm_pack_panels(const float* b, int64_t ldb, int64_t inner, int64_t n, float* packed, int64_t panel_begin,
                      int64_t panel_end) {
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    const int64_t j0 = p * kGemmPanel, cols = std::min(kGemmPanel, n - j0);
    float* dst = packed + p * inner * kGemmPanel;
    for (int64_t i = 0; i < inner; ++i, dst += kGemmPanel) {
      std::memcpy(dst, b + i * ldb + j0, sizeof(float) * cols);
      std::fill(dst + cols, dst + kGemmPanel, 0.f);
    }
  }
}

at::Tensor cpu_gemm(const at::Tensor& a, const at::Tensor& b, int64_t row_block, int64_t panel_block) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "cpu_gemm: a and b must be matrices, got shapes ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), "cpu_gemm: a's columns (", a.size(1), ") must equal b's rows (", b.size(0),
              ")");
  TORCH_CHECK(a.is_cpu() && b.is_cpu() && a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "cpu_gemm: a and b must be float32 CPU tensors, got ", a.scalar_type(), " on ", a.device(), " and ",
              b.scalar_type(), " on ", b.device());
  TORCH_CHECK(row_block >= 1, "cpu_gemm: row_block must be at least 1, got ", row_block);
  TORCH_CHECK(panel_block >= 0, "cpu_gemm: panel_block must be non-negative (0: every panel), got ", panel_block);
  const int64_t m = a.size(0), inner = a.size(1), n = b.size(1), panels = gemm_panels(n);
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor bp = at::empty({gemm_packed_size(inner, n)}, b.options());
  gemm_pack_panels(bc.const_data_ptr<float>(), n, inner, n, bp.mutable_data_ptr<float>(), 0, panels);
  at::Tensor c = at::empty({m, n}, a.options());
  // blocks larger than the matrix are the whole of it (no overflow in the part counts)
  const int64_t pb = std::max<int64_t>(1, std::min(panel_block == 0 ? panels : panel_block, panels));
  const int64_t rb = std::max<int64_t>(1, std::min(row_block, m));
  const int64_t row_parts = (m + rb - 1) / rb, panel_parts = (panels + pb - 1) / pb;
  const float* ap = ac.const_data_ptr<float>();
  const float* bpp = bp.const_data_ptr<float>();
  float* cp = c.mutable_data_ptr<float>();
  at::parallel_for(0, row_parts * panel_parts, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t / panel_parts * rb, p0 = t % panel_parts * pb;
      packed_gemm(ap + r0 * inner, inner, bpp, inner, n, cp + r0 * n, n, std::min(rb, m - r0), p0,
                  std::min(panels, p0 + pb));
    }
  });
  return c;
}

}  // namespace deeplab_ops
