// Argument checks at the C++ boundary, naming the argument, its value and what was expected. The Python front door (deeplab_ops/ops/) validates first with
// friendlier messages; these guard direct torch.ops calls against out-of-bounds memory access.
#pragma once

#include <ATen/ATen.h>

#define DLO_CHECK_ACTIVATION(t)                                                                       \
  TORCH_CHECK((t).dim() == 4, "deeplab_ops: ", #t, " must be a 4-D (N, C, H, W) tensor, got shape ", \
              (t).sizes())

#define DLO_CHECK_SAME_SHAPE(t, ref)                                                               \
  TORCH_CHECK((t).sizes() == (ref).sizes(), "deeplab_ops: ", #t, " must have shape ", (ref).sizes(), \
              " (like ", #ref, "), got ", (t).sizes())

#define DLO_CHECK_SAME_DEVICE(t, ref)                                                                   \
  TORCH_CHECK((t).device() == (ref).device(), "deeplab_ops: ", #t, " is on ", (t).device(), " but ", \
              #ref, " is on ", (ref).device())

#define DLO_CHECK_SAME_DTYPE(t, ref)                                                                   \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), "deeplab_ops: ", #t, " has dtype ",           \
              (t).scalar_type(), " but ", #ref, " has dtype ", (ref).scalar_type())

#define DLO_CHECK_CHANNEL_VECTOR(t, channels)                                                        \
  TORCH_CHECK((t).dim() == 1 && (t).numel() == (channels), "deeplab_ops: ", #t,                    \
              " must be a 1-D tensor of ", (channels), " values (one per channel), got shape ", \
              (t).sizes())

namespace deeplab_ops {

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "deeplab_ops: ", name, " must be a 4-D (N, C, H, W) tensor, got shape ", t.sizes());
}

}  // namespace deeplab_ops
