#include "composite/batch_stats.h"

#include "composite/stage_calls.h"

namespace deeplab_ops {

void training_stats(const std::vector<TrainingBlock>& blocks, const std::optional<BnGroup>& group, double momentum,
                    double eps) {
  std::vector<BlockPartials> local;
  local.reserve(blocks.size());
  for (const auto& b : blocks) {
    auto [mean, m2] = call_bn_stats(b.pre);
    local.push_back({b.count, mean, m2});
  }
  if (group.has_value()) {
    const auto parts = all_gather_partials(local, *group);
    for (size_t i = 0; i < blocks.size(); ++i) {
      const auto& b = blocks[i];
      const auto& [counts, means, m2s] = parts[i];
      call_bn_finalize(means, m2s, counts, 0.0, b.running_mean, b.running_var, momentum, eps, b.save_mean,
                       b.save_invstd, b.new_running_mean, b.new_running_var);
    }
    return;
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    const auto& b = blocks[i];
    call_bn_finalize(local[i].mean, local[i].m2, std::nullopt, b.count, b.running_mean, b.running_var, momentum, eps,
                     b.save_mean, b.save_invstd, b.new_running_mean, b.new_running_var);
  }
}

}  // namespace deeplab_ops
