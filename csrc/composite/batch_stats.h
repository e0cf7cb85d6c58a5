// Training statistics of the composites' BatchNorm blocks: per-block partials from the stage kernels, gathered
// over the process group when the BatchNorm is synchronized, merged and finalized by bn_finalize.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "composite/group_collectives.h"

namespace deeplab_ops {

// One BN block in training: its pre-BN values (N, C, H, W), the values per channel on this process, and the
// running statistics to update in place (views of the op's new_running_* outputs; absent: none).
struct TrainingBlock {
  at::Tensor pre;
  double count;
  std::optional<at::Tensor> running_mean;
  std::optional<at::Tensor> running_var;
};

// (mean, invstd) of each block over this process's batch, or over the group's when `group` is given (one
// all-gather for all blocks).
std::vector<std::tuple<at::Tensor, at::Tensor>> training_stats(const std::vector<TrainingBlock>& blocks,
                                                               const std::optional<BnGroup>& group, double momentum,
                                                               double eps);

}  // namespace deeplab_ops
