#include "composite/group_collectives.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace deeplab_ops {
namespace {

at::Tensor wait_tensor(const at::Tensor& t) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("_c10d_functional::wait_tensor", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(t);
}

// The group argument of the functional collectives is `str group_name` in torch 2.11 and `Any group_name` (a name
// or a ProcessGroup) in torch 2.14: a typed call matches one schema only (a mismatch is "Tried to access or call an
// operator with a wrong signature"), so they are called boxed, with the name as a string IValue, which both take.
at::Tensor call_collective(const c10::OperatorHandle& op, torch::jit::Stack stack) {
  op.callBoxed(&stack);
  return wait_tensor(stack.at(0).toTensor());
}

// (size * numel,): every process's `t`, in rank order.
at::Tensor all_gather_into_tensor(const at::Tensor& t, const BnGroup& group) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_gather_into_tensor", "");
  return call_collective(op, {t, group.size, c10::IValue(group.name)});
}

at::Tensor all_reduce_sum(const at::Tensor& t, const BnGroup& group) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("_c10d_functional::all_reduce", "");
  return call_collective(op, {t, c10::IValue(std::string("sum")), c10::IValue(group.name)});
}

}  // namespace

std::optional<BnGroup> bn_group(const std::optional<c10::string_view>& group_name, bool training) {
  if (!training || !group_name.has_value()) return std::nullopt;
  const std::string name(group_name->data(), group_name->size());
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(name);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "deeplab_ops: group_name='", name,
                "' names no torch.distributed process group here (expected a registered group's group_name, "
                "e.g. torch.distributed.group.WORLD.group_name): ", e.what());
  }
  const int64_t size = pg->getSize();
  if (size <= 1) return std::nullopt;
  return BnGroup{name, size};
}

std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor>> all_gather_partials(
    const std::vector<BlockPartials>& blocks, const BnGroup& group) {
  // Packed per process as [count_0, mean_0, m2_0, count_1, mean_1, m2_1, ...] in the opmath dtype.
  std::vector<at::Tensor> pieces;
  pieces.reserve(3 * blocks.size());
  for (const auto& b : blocks) {
    pieces.push_back(at::full({1}, b.count, b.mean.options()));
    pieces.push_back(b.mean);
    pieces.push_back(b.m2);
  }
  const at::Tensor local = at::cat(pieces);
  const at::Tensor all = all_gather_into_tensor(local, group).view({group.size, local.numel()});
  std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor>> out;
  out.reserve(blocks.size());
  int64_t offset = 0;
  for (const auto& b : blocks) {
    const int64_t c = b.mean.numel();
    out.emplace_back(all.select(1, offset), all.narrow(1, offset + 1, c), all.narrow(1, offset + 1 + c, c));
    offset += 1 + 2 * c;
  }
  return out;
}

std::vector<std::tuple<at::Tensor, at::Tensor>> all_reduce_mean_sums(const std::vector<BlockSums>& blocks,
                                                                     const BnGroup& group) {
  // Packed as [sum_g_0, sum_g_xhat_0, count_0, sum_g_1, ...].
  std::vector<at::Tensor> pieces;
  pieces.reserve(3 * blocks.size());
  for (const auto& b : blocks) {
    pieces.push_back(b.sum_g);
    pieces.push_back(b.sum_g_xhat);
    pieces.push_back(at::full({1}, b.count, b.sum_g.options()));
  }
  const at::Tensor total = all_reduce_sum(at::cat(pieces), group);
  std::vector<std::tuple<at::Tensor, at::Tensor>> out;
  out.reserve(blocks.size());
  int64_t offset = 0;
  for (const auto& b : blocks) {
    const int64_t c = b.sum_g.numel();
    const at::Tensor means = total.narrow(0, offset, 2 * c).view({2, c}) / total.narrow(0, offset + 2 * c, 1);
    out.emplace_back(means.select(0, 0), means.select(0, 1));
    offset += 2 * c + 1;
  }
  return out;
}

}  // namespace deeplab_ops
