#include "composite/batch_stats.h"

#include "composite/stage_calls.h"

namespace deeplab_ops {

std::vector<std::tuple<at::Tensor, at::Tensor>> training_stats(const std::vector<TrainingBlock>& blocks,
                                                               const std::optional<BnGroup>& group, double momentum,
                                                               double eps) {
  std::vector<BlockPartials> local;
  local.reserve(blocks.size());
  for (const auto& b : blocks) {
    auto [mean, m2] = call_bn_stats(b.pre);
    local.push_back({b.count, mean, m2});
  }
  std::vector<std::tuple<at::Tensor, at::Tensor>> out;
  out.reserve(blocks.size());
  if (group.has_value()) {
    const auto parts = all_gather_partials(local, *group);
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& [counts, means, m2s] = parts[i];
      out.push_back(call_bn_finalize(counts, means, m2s, blocks[i].running_mean, blocks[i].running_var, momentum,
                                     eps));
    }
    return out;
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    const at::Tensor n = at::full({1}, blocks[i].count, local[i].mean.options());
    out.push_back(call_bn_finalize(n, local[i].mean.unsqueeze(0), local[i].m2.unsqueeze(0), blocks[i].running_mean,
                                   blocks[i].running_var, momentum, eps));
  }
  return out;
}

}  // namespace deeplab_ops
