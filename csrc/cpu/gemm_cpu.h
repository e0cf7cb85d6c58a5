// A float32 GEMM for the Winograd convolutions' products (csrc/cpu/winograd_cpu.cpp): C = A B with B packed once
// (its transformed weight, kept between calls) and A and C row-major, on the calling thread.
//
// Every output element is one chain of fused multiply-adds in the order of the inner dimension, whatever the vector
// ISA (AVX-512, AVX2), the row and column blocking, the caller's split of the rows or columns over threads and the
// thread count: the same bits in all of these. The baseline build (and machines other than x86) runs ATen's mm per
// panel instead (gemm_cpu.cpp says why): its own bits, and the float32 matmul precision applies there.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace deeplab_ops {

// Columns per panel of a packed B: B as [panels][inner][kPanel] floats, zero in the columns past its width.
constexpr int64_t kGemmPanel = 32;

inline int64_t gemm_panels(int64_t n) { return (n + kGemmPanel - 1) / kGemmPanel; }

// Floats of one packed B of `inner` rows and n columns.
inline int64_t gemm_packed_size(int64_t inner, int64_t n) { return gemm_panels(n) * inner * kGemmPanel; }

// Where element (row i, column j) of a packed B of `inner` rows lies.
inline int64_t gemm_packed_index(int64_t inner, int64_t i, int64_t j) {
  return (j / kGemmPanel) * inner * kGemmPanel + i * kGemmPanel + j % kGemmPanel;
}

// Panels [panel_begin, panel_end) of B[inner x n] (its rows `ldb` floats apart) packed into `packed` (a packed B's
// gemm_packed_size(inner, n) floats): each panel's kGemmPanel columns of every row, zero past n.
void gemm_pack_panels(const float* b, int64_t ldb, int64_t inner, int64_t n, float* packed, int64_t panel_begin,
                      int64_t panel_end);
// C[rows x n] = A[rows x inner] B for C's column panels [panel_begin, panel_end) (columns panel * kGemmPanel on,
// up to n): A's rows `lda` floats apart, C's `ldc`; B packed (gemm_packed_index). Overwrites C there.
void packed_gemm(const float* a, int64_t lda, const float* b, int64_t inner, int64_t n, float* c, int64_t ldc,
                 int64_t rows, int64_t panel_begin, int64_t panel_end);

// One product of packed_gemm_shared: C[rows x n] = A[rows x inner] B, A's and C's first rows.
struct GemmRows {
  const float* a;
  float* c;
  int64_t rows;
};

// packed_gemm for `count` products that multiply by the same B (their A's rows `lda` apart, C's `ldc`), each block
// of B's panels read into cache once for all of them: the Winograd stride-2 transform's elements that share one
// element of U (16 of a tile's 81 multiply the centre tap). Each output element is the same chain of multiply-adds
// as in a packed_gemm of its product alone: the same bits.
void packed_gemm_shared(const GemmRows* parts, int64_t count, int64_t lda, const float* b, int64_t inner, int64_t n,
                        int64_t ldc, int64_t panel_begin, int64_t panel_end);

// One term of packed_gemm_sum: A[rows x inner] (its rows the call's lda apart) times rows [first, first + inner) of
// the packed B.
struct GemmTerm {
  const float* a;
  int64_t first, inner;
};

// C[rows x n] = the sum of `count` terms A_t B[first_t, first_t + inner_t) (inner_t >= 1) of one packed B of `inner`
// rows, for C's column panels [panel_begin, panel_end); overwrites C there (zero where count is 0). In the vector
// builds each output element is one chain of multiply-adds over the terms in order, then each term's columns: the
// bits of packed_gemm over the terms' A side by side and B's rows in the same order (the stride-2 Winograd's edges:
// one term per 3 x 3 tap, read in place from the input, the taps in the padding left out). The baseline build adds
// the terms' ATen products (mm, then addmm_): its own bits.
void packed_gemm_sum(const GemmTerm* terms, int64_t count, int64_t lda, const float* b, int64_t inner, int64_t n,
                     float* c, int64_t ldc, int64_t rows, int64_t panel_begin, int64_t panel_end);

// Whether packed_gemm multiplies in float32 now: always in the vector builds; in the baseline build, ATen's mm, only
// while the float32 matmul precision is not lowered (torch's "medium", oneDNN's "bf16").
bool packed_gemm_is_float32();

// a @ b for float32 CPU matrices through packed_gemm (b packed per call), its rows in GEMMs of `row_block` rows and
// its columns in GEMMs of `panel_block` panels (0: all): the op cpu_gemm, which tests check against float64 and,
// bit for bit, across blockings, thread counts and ISA builds.
at::Tensor cpu_gemm(const at::Tensor& a, const at::Tensor& b, int64_t row_block, int64_t panel_block);

}  // namespace deeplab_ops
