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

// `grad` with `param`'s strides where the two differ only in dimensions of size 1 (a 1 x 1 weight created
// channels_last has strides (C_in, 1, C_in, C_in), the same memory as the contiguous (C_in, 1, 1, 1)): a view, no
// copy. DistributedDataParallel's buckets and optimizers that compare strides then see the parameter's own layout
// (DDP warns "grad strides do not match bucket view strides" otherwise). Any other grad is returned as it is.
inline at::Tensor strided_like_param(const at::Tensor& grad, const at::Tensor& param) {
  if (!grad.defined() || grad.sizes() != param.sizes() || grad.strides() == param.strides()) return grad;
  for (int64_t d = 0; d < grad.dim(); ++d) {
    if (grad.size(d) != 1 && grad.stride(d) != param.stride(d)) return grad;
  }
  return grad.as_strided(param.sizes(), param.strides(), grad.storage_offset());
}

// An activation as N planes of C channels of H*W values each.
struct ActivationShape {
  int64_t n, c, hw;
};

inline ActivationShape activation_shape(const at::Tensor& t) {
  return {t.size(0), t.size(1), t.size(2) * t.size(3)};
}

}  // namespace deeplab_ops
