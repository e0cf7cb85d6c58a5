// Run a CPU kernel body in the build for the widest ISA that torch's own CPU kernels use on this machine
// (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY overrides): the body is a generic lambda
// f(begin, end, width) inlined (flatten) into a function compiled for the baseline ISA, AVX2 or AVX-512, so its
// loops vectorize for that ISA without -march flags. The extension is compiled with -ffp-contract=off (setup.py):
// no a * b + c becomes an FMA, so every ISA computes the same operations and gives the same bits.
#pragma once

#include <ATen/Version.h>

#include <cstdint>
#include <string>
#include <type_traits>

#if defined(__GNUC__) || defined(__clang__)
#define DLO_INLINE inline __attribute__((always_inline))
#define DLO_FLATTEN __attribute__((flatten))
#else
#define DLO_INLINE inline
#define DLO_FLATTEN
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define DLO_X86_KERNELS 1
#if defined(__clang__)
#define DLO_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#else  // GCC would otherwise use 256-bit vectors for the loops it vectorizes itself
#define DLO_AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"
#endif
#endif

namespace deeplab_ops {
namespace cpu_isa {

enum class Isa { kBase, kAvx2, kAvx512 };

// The widest ISA that torch's own CPU kernels use here (its choice, so ATEN_CPU_CAPABILITY applies to these too).
inline Isa kernel_isa() {
  static const Isa isa = [] {
#ifdef DLO_X86_KERNELS
    const std::string cap = at::get_cpu_capability();
    __builtin_cpu_init();
    if (cap == "AVX512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if ((cap == "AVX512" || cap == "AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::kAvx2;
    }
#endif
    return Isa::kBase;
  }();
  return isa;
}

// f(begin, end, width) compiled for one ISA: f and all it calls are inlined here, so that the target applies to
// its loops; width (a std::integral_constant) is the bytes of the ISA's vector registers.
template <int kBytes>
using Width = std::integral_constant<int, kBytes>;

template <typename F>
DLO_FLATTEN void run_base(const F& f, int64_t begin, int64_t end) {
  f(begin, end, Width<16>{});
}
#ifdef DLO_X86_KERNELS
template <typename F>
__attribute__((target("avx2,fma"))) DLO_FLATTEN void run_avx2(const F& f, int64_t begin, int64_t end) {
  f(begin, end, Width<32>{});
}
template <typename F>
__attribute__((target(DLO_AVX512_TARGET))) DLO_FLATTEN void run_avx512(const F& f, int64_t begin, int64_t end) {
  f(begin, end, Width<64>{});
}
#endif

template <typename F>
inline void run_isa(Isa isa, const F& f, int64_t begin, int64_t end) {
#ifdef DLO_X86_KERNELS
  if (isa == Isa::kAvx512) return run_avx512(f, begin, end);
  if (isa == Isa::kAvx2) return run_avx2(f, begin, end);
#endif
  run_base(f, begin, end);
}

}  // namespace cpu_isa
}  // namespace deeplab_ops
