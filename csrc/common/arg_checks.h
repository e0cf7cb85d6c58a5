// Argument checks at the C++ boundary, naming the argument, its value and what was expected. The Python front door (deeplab_ops/ops/) validates first with
// friendlier messages; these guard direct torch.ops calls against out-of-bounds memory access.
#pragma once

#include <ATen/ATen.h>

// Each names its tensors as written at the call, without an optional's dereference (`*running_mean`: running_mean).
#define DLO_ARG(t) ::deeplab_ops::arg_name(#t)

#define DLO_CHECK_ACTIVATION(t)                                                                            \
  do {                                                                                                       \
    TORCH_CHECK((t).defined(), "deeplab_ops: ", DLO_ARG(t), " must be a tensor, got None");                  \
    TORCH_CHECK((t).dim() == 4, "deeplab_ops: ", DLO_ARG(t), " must be a 4-D (N, C, H, W) tensor, got shape ", \
                (t).sizes());                                                                                \
  } while (0)

#define DLO_CHECK_SAME_SHAPE(t, ref)                                                               \
  TORCH_CHECK((t).sizes() == (ref).sizes(), "deeplab_ops: ", DLO_ARG(t), " must have shape ", (ref).sizes(), \
              " (like ", DLO_ARG(ref), "), got ", (t).sizes())

#define DLO_CHECK_SAME_DEVICE(t, ref)                                                                   \
  TORCH_CHECK((t).device() == (ref).device(), "deeplab_ops: ", DLO_ARG(t), " is on ", (t).device(), " but ", \
              DLO_ARG(ref), " is on ", (ref).device())

#define DLO_CHECK_SAME_DTYPE(t, ref)                                                                   \
  TORCH_CHECK((t).scalar_type() == (ref).scalar_type(), "deeplab_ops: ", DLO_ARG(t), " has dtype ",   \
              (t).scalar_type(), " but ", DLO_ARG(ref), " has dtype ", (ref).scalar_type())

#define DLO_CHECK_CHANNEL_VECTOR(t, channels) ::deeplab_ops::check_channel_vector((t), DLO_ARG(t), (channels))

namespace deeplab_ops {

constexpr const char* arg_name(const char* s) {
  while (*s == '*') ++s;
  return s;
}

inline void check_channel_vector(const at::Tensor& t, const char* name, int64_t channels) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == channels, "deeplab_ops: ", name, " must be a 1-D tensor of ", channels,
              " values (one per channel), got shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "deeplab_ops: ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "deeplab_ops: ", name, " must be a 4-D (N, C, H, W) tensor, got shape ", t.sizes());
}

}  // namespace deeplab_ops
