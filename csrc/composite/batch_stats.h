// Training statistics of the composites' BatchNorm blocks: per-block partials from the stage kernels, gathered
// over the process group when the BatchNorm is synchronized, merged and finalized by bn_finalize straight into
// the op's output buffers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "composite/group_collectives.h"

namespace deeplab_ops {

// One BN block in training.
struct TrainingBlock {
  at::Tensor pre;                           // pre-BN values (N, C, H, W)
  double count;                             // values per channel on this process
  std::optional<at::Tensor> running_mean;   // the running statistics to update (absent: none)
  std::optional<at::Tensor> running_var;
  at::Tensor save_mean, save_invstd;        // (C,) outputs, written
  at::Tensor new_running_mean, new_running_var;  // (C,) outputs when running statistics are given, else unused
};

// Writes each block's mean and invstd over this process's batch, or over the group's when `group` is given (one
// all-gather for all blocks), and its updated running statistics.
void training_stats(const std::vector<TrainingBlock>& blocks, const std::optional<BnGroup>& group, double momentum,
                    double eps);

}  // namespace deeplab_ops
