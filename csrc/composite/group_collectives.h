// Synchronized BatchNorm (nn.SyncBatchNorm semantics) for the composites: the functional collectives of
// torch.distributed (_c10d_functional), called through the dispatcher so that the group's backend (gloo, NCCL)
// runs them on the tensors' device, without Python. Statistics travel as packed per-channel vectors in the
// opmath dtype: one collective per synchronization point, whatever the number of BatchNorm blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace deeplab_ops {

// The torch.distributed group a training BatchNorm synchronizes over; absent: this process's batch only.
struct BnGroup {
  std::string name;
  int64_t size = 1;
};

// The group named by the ops' group_name argument in training (eval ignores it); nullopt when the statistics
// need no synchronization (no name, or a group of one process). Fails with the name when no such group exists.
std::optional<BnGroup> bn_group(const std::optional<c10::string_view>& group_name, bool training);

// One BN block's per-channel partials on this process: `count` values per channel, their mean and M2.
struct BlockPartials {
  double count;
  at::Tensor mean;  // (C,)
  at::Tensor m2;    // (C,)
};

// Every process's partials of every block, gathered in one collective: for each block, (counts (P,), means (P, C),
// m2s (P, C)), the layout bn_finalize merges (Chan's formula over the P processes).
std::vector<std::tuple<at::Tensor, at::Tensor, at::Tensor>> all_gather_partials(
    const std::vector<BlockPartials>& blocks, const BnGroup& group);

// One BN block's backward sums on this process over `count` values per channel.
struct BlockSums {
  at::Tensor sum_g;       // (C,)
  at::Tensor sum_g_xhat;  // (C,)
  double count;
};

// The sums of every block summed over the group and divided by the group's total count, in one all-reduce:
// for each block (mean_g, mean_g_xhat) = (sum g, sum g * xhat) / n, to pass to bn_backward_dy with count 1. The
// count travels with the sums, so processes may hold different batch sizes and no host sync reads it back.
std::vector<std::tuple<at::Tensor, at::Tensor>> all_reduce_mean_sums(const std::vector<BlockSums>& blocks,
                                                                     const BnGroup& group);

}  // namespace deeplab_ops
