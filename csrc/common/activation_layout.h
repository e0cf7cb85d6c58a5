// The layouts and dtypes the BatchNorm stage kernels work in: 4-D activations NCHW- or channels_last-contiguous,
// per-channel vectors contiguous in the opmath dtype.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace deeplab_ops {

// The dtype of per-channel statistics and of element-wise arithmetic for activations of dtype `t`:
// float32 for float16/bfloat16/float32, float64 for float64 (at::opmath_type).
inline at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool is_nhwc(const at::Tensor& t) { return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast; }

// NCHW-contiguous or channels_last-contiguous (no copy when already so): the kernels handle exactly these two.
inline at::Tensor as_kernel_layout(const at::Tensor& t, at::MemoryFormat mf) { return t.contiguous(mf); }

// A per-channel vector in `dtype`, contiguous. Converts (one copy) only when the dtype differs: the composites
// pass statistics and BatchNorm parameters that are already in the opmath dtype.
inline at::Tensor opmath_channel_vector(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t.contiguous() : t.to(dtype).contiguous();
}

// An activation as N planes of C channels of H*W values each.
struct ActivationShape {
  int64_t n, c, hw;
};

inline ActivationShape activation_shape(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3)};
}

}  // namespace deeplab_ops
