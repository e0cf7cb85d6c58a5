// Argument checks at the C++ boundary, naming the argument, its value and what was expected. The Python front door (deeplab_ops/ops/) validates first with
// friendlier messages; these guard direct torch.ops calls against out-of-bounds memory access.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>

#include <cstddef>
#include <initializer_list>
#include <optional>
#include <string>

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

// One of the four floating dtypes the kernels compute in (float16, bfloat16, float32, float64).
#define DLO_CHECK_FLOATING(t) ::deeplab_ops::check_floating((t), DLO_ARG(t))

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

inline void check_floating(const at::Tensor& t, const char* name) {
  const at::ScalarType d = t.scalar_type();
  TORCH_CHECK(d == at::kHalf || d == at::kBFloat16 || d == at::kFloat || d == at::kDouble, "deeplab_ops: ", name,
              " must be float16, bfloat16, float32 or float64, got ", d);
}

// ---- groups of arguments that must agree --------------------------------------------------------------------------
// Checked against the value most of the group has (the first argument's on a tie), not against one fixed argument:
// where one argument of the group is wrong, the message names that one, whichever it is.

// An argument as the op's schema names it; t null (an absent optional): not part of the group.
struct NamedTensor {
  const at::Tensor* t;
  const char* name;
};

inline NamedTensor named(const at::Tensor& t, const char* name) { return {&t, name}; }
inline NamedTensor named(const std::optional<at::Tensor>& t, const char* name) {
  return {t.has_value() && t->defined() ? &*t : nullptr, name};
}

// The index of the value that most of values[0..n) equal (the first such on a tie).
template <typename T>
size_t majority_index(const T* values, size_t n) {
  size_t best = 0, best_votes = 0;
  for (size_t i = 0; i < n; ++i) {
    size_t votes = 0;
    for (size_t j = 0; j < n; ++j) votes += values[j] == values[i] ? 1 : 0;
    if (votes > best_votes) {
      best = i;
      best_votes = votes;
    }
  }
  return best;
}

// The present tensors of `group` (into `present`) and the one whose key(tensor) most of them share; nullptr when
// none is present. (Small vectors: no heap allocation on the per-call path.)
template <typename Key>
const NamedTensor* majority_of(std::initializer_list<NamedTensor> group, c10::SmallVector<NamedTensor, 8>& present,
                               Key key) {
  c10::SmallVector<decltype(key(at::Tensor())), 8> keys;
  for (const auto& a : group) {
    if (a.t == nullptr) continue;
    present.push_back(a);
    keys.push_back(key(*a.t));
  }
  return present.empty() ? nullptr : &present[majority_index(keys.data(), keys.size())];
}

// The present tensors of `group` have one shape, the one most of them have.
inline void check_same_shapes(std::initializer_list<NamedTensor> group) {
  c10::SmallVector<NamedTensor, 8> g;
  const NamedTensor* ref = majority_of(group, g, [](const at::Tensor& t) { return t.sizes(); });
  for (const auto& a : g) {
    TORCH_CHECK(a.t->sizes() == ref->t->sizes(), "deeplab_ops: ", a.name, " must have shape ", ref->t->sizes(),
                " (like ", ref->name, "), got ", a.t->sizes());
  }
}

// The present tensors of `group` have one dtype, the one most of them have.
inline void check_same_dtypes(std::initializer_list<NamedTensor> group) {
  c10::SmallVector<NamedTensor, 8> g;
  const NamedTensor* ref = majority_of(group, g, [](const at::Tensor& t) { return t.scalar_type(); });
  for (const auto& a : g) {
    TORCH_CHECK(a.t->scalar_type() == ref->t->scalar_type(), "deeplab_ops: ", a.name, " has dtype ",
                a.t->scalar_type(), " but ", ref->name, " has dtype ", ref->t->scalar_type());
  }
}

// The channel count C of an activation (N, C, H, W) and its present per-channel vectors: the count most of them have
// (a vector that is not 1-D counts for none), the activation's on a tie. Then the activation has C channels and every
// vector is 1-D of C floating values. Returns C. (The activation is 4-D: checked first.)
inline int64_t check_channels(const NamedTensor& activation, std::initializer_list<NamedTensor> vectors) {
  c10::SmallVector<int64_t, 8> counts{activation.t->size(1)};
  for (const auto& v : vectors) {
    if (v.t != nullptr && v.t->dim() == 1) counts.push_back(v.t->size(0));
  }
  const int64_t c = counts[majority_index(counts.data(), counts.size())];
  if (activation.t->size(1) != c) {
    std::string have;
    for (const auto& v : vectors) {
      if (v.t == nullptr || v.t->dim() != 1 || v.t->size(0) != c) continue;
      have += (have.empty() ? "" : ", ") + std::string(v.name);
    }
    TORCH_CHECK(false, "deeplab_ops: ", activation.name, " must have ", c, " channels (one per value of ", have,
                "), got shape ", activation.t->sizes());
  }
  for (const auto& v : vectors) {
    if (v.t == nullptr) continue;
    check_channel_vector(*v.t, v.name, c);
    check_floating(*v.t, v.name);
  }
  return c;
}

}  // namespace deeplab_ops
