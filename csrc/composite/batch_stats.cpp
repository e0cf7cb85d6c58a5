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
    // One value per channel over the whole group is refused as it is without a group (the unbiased running
    // variance would be NaN, the model's statistics lost), where the check costs no device synchronization: on CPU
    // tensors. On a GPU it would cost one per layer; nn.SyncBatchNorm does not check it either (docs/ops.md). Every
    // process gathered the same counts, so every one raises here: none is left waiting in a collective.
    if (!blocks.empty() && blocks[0].pre.device().is_cpu()) {
      for (size_t i = 0; i < blocks.size(); ++i) {
        TORCH_CHECK_VALUE(std::get<0>(parts[i]).sum().item<double>() != 1.0,
                          "deeplab_ops: training BatchNorm needs more than 1 value per channel over the process "
                          "group's batches, got 1 (", blocks[i].count, " on this process, shape ",
                          blocks[i].pre.sizes(), "); use larger batches, or freeze the BatchNorm layers (call "
                          ".eval() on them)");
      }
    }
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
