// The composite fused ASPP of the cpu and cuda backends: ATen convolutions (oneDNN / cuDNN) plus the BN stage
// ops. Each conv branch keeps its own pre-BN output (no buffer joins them) and the projection sums its per-branch
// 1x1 convolutions; the pooling branch enters the projection as a per-(image, channel) bias; normalized branch
// outputs are recomputed in backward, not saved.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/activation_layout.h"
#include "common/arg_checks.h"
#include "composite/batch_stats.h"
#include "composite/conv_calls.h"
#include "composite/group_collectives.h"
#include "composite/stage_calls.h"

namespace deeplab_ops {
namespace {

struct AsppShape {
  int64_t n, cin, h, w, c, branches;  // branches: the conv branches (1x1 + one per rate)
};

AsppShape check_aspp_args(const at::Tensor& x, at::TensorList conv_weights, const at::Tensor& pool_weight,
                         const at::Tensor& project_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
                         at::IntArrayRef rates, bool synchronized) {
  DLO_CHECK_ACTIVATION(x);
  // Before anything reads x (its image pooling's mean would fail with aten's message, naming no argument).
  DLO_CHECK_FLOATING(x);
  AsppShape g{x.size(0), x.size(1), x.size(2), x.size(3), 0, static_cast<int64_t>(conv_weights.size())};
  TORCH_CHECK(g.branches == static_cast<int64_t>(rates.size()) + 1, "deeplab_ops: aspp needs 1 + len(rates) = ",
              rates.size() + 1, " conv weights (the 1x1 branch, then one 3x3 per rate), got ", g.branches);
  // conv_weights[0] (the 1x1 branch) gives the branch width the loop checks every weight against.
  TORCH_CHECK(conv_weights[0].dim() == 4, "deeplab_ops: conv_weights[0] must be 4-D (C, C_in=", g.cin,
              ", 1, 1), got shape ", conv_weights[0].sizes());
  g.c = conv_weights[0].size(0);
  for (int64_t b = 0; b < g.branches; ++b) {
    const int64_t k = b == 0 ? 1 : 3;
    const auto& w = conv_weights[b];
    TORCH_CHECK(w.dim() == 4 && w.size(0) == g.c && w.size(1) == g.cin && w.size(2) == k && w.size(3) == k,
                "deeplab_ops: conv_weights[", b, "] must have shape (", g.c, ", ", g.cin, ", ", k, ", ", k, "), got ",
                w.sizes());
    TORCH_CHECK(w.device() == x.device(), "deeplab_ops: conv_weights[", b, "] is on ", w.device(), " but x is on ",
                x.device());
    TORCH_CHECK(w.scalar_type() == x.scalar_type(), "deeplab_ops: conv_weights[", b, "] has dtype ", w.scalar_type(),
                " but x has dtype ", x.scalar_type());
    if (b > 0) TORCH_CHECK(rates[b - 1] >= 1, "deeplab_ops: rates must be >= 1, got ", rates);
  }
  TORCH_CHECK(pool_weight.dim() == 4 && pool_weight.size(0) == g.c && pool_weight.size(1) == g.cin &&
                  pool_weight.size(2) == 1 && pool_weight.size(3) == 1,
              "deeplab_ops: pool_weight must have shape (", g.c, ", ", g.cin, ", 1, 1), got ", pool_weight.sizes());
  TORCH_CHECK(project_weight.dim() == 4 && project_weight.size(0) == g.c &&
                  project_weight.size(1) == (g.branches + 1) * g.c && project_weight.size(2) == 1 &&
                  project_weight.size(3) == 1,
              "deeplab_ops: project_weight must have shape (", g.c, ", ", (g.branches + 1) * g.c, ", 1, 1), got ",
              project_weight.sizes());
  DLO_CHECK_SAME_DEVICE(pool_weight, x);
  DLO_CHECK_SAME_DEVICE(project_weight, x);
  DLO_CHECK_SAME_DTYPE(pool_weight, x);
  DLO_CHECK_SAME_DTYPE(project_weight, x);
  const int64_t k = (g.branches + 2) * g.c;
  DLO_CHECK_CHANNEL_VECTOR(bn_weight, k);
  DLO_CHECK_CHANNEL_VECTOR(bn_bias, k);
  DLO_CHECK_SAME_DEVICE(bn_weight, x);
  DLO_CHECK_SAME_DEVICE(bn_bias, x);
  // The BatchNorm tensors share one dtype: x's, or float32 for half x (the running statistics: aspp_forward).
  check_bn_dtype(bn_bias, "bn_bias", x.scalar_type(), check_bn_dtype(bn_weight, "bn_weight", x.scalar_type()));
  // A synchronized process may hold an empty batch (nn.SyncBatchNorm allows it): it takes part in the collectives.
  TORCH_CHECK((g.n >= 1 || synchronized) && g.h >= 1 && g.w >= 1, "deeplab_ops: aspp needs a non-empty input, got ",
              x.sizes());
  return g;
}

// Channels [start, start + len) of a per-channel vector, or of the K = (branches + 2) * C BatchNorm channels: the
// view t.slice(0, start, start + len), made as one as_strided below the ADInplaceOrView key (no view metadata, no
// version counter shared with t; some 60 such views per training forward, 30 per backward). Only for the stage
// ops' arguments, which they read or write through the data and keep no reference to: such a view never reaches
// the caller, autograd (the op runs below its Autograd key; its autograd is deeplab_ops/ops/aspp.py's Function) or
// a saved tensor. It does not carry t's requires_grad, which nothing below Autograd here reads but the ATen
// convolutions (their backend choice): project_weight's columns stay ordinary narrow views.
at::Tensor block(const at::Tensor& t, int64_t start, int64_t len) {
  at::AutoDispatchBelowADInplaceOrView internal_view;
  const int64_t stride = t.stride(0);
  return t.as_strided({len}, {stride}, t.storage_offset() + start * stride);
}

std::optional<at::Tensor> block(const std::optional<at::Tensor>& t, int64_t start, int64_t len) {
  if (!present(t)) return std::nullopt;
  return block(*t, start, len);
}

// One BatchNorm block's slices of the statistics and parameters, taken once per call.
struct BlockBN {
  at::Tensor mean, invstd, weight, bias;
};

// Block b (channels [b * c, (b + 1) * c)) of the K BatchNorm channels, for blocks [0, blocks).
std::vector<BlockBN> block_bns(const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& bn_weight,
                               const at::Tensor& bn_bias, int64_t blocks, int64_t c) {
  std::vector<BlockBN> bns;
  bns.reserve(blocks);
  for (int64_t b = 0; b < blocks; ++b) {
    bns.push_back({block(mean, b * c, c), block(invstd, b * c, c), block(bn_weight, b * c, c),
                   block(bn_bias, b * c, c)});
  }
  return bns;
}

// The conv branches normalized (BatchNorm + ReLU), each by its block of the statistics and parameters.
std::vector<at::Tensor> normalized_branches(at::TensorList branch, const std::vector<BlockBN>& bns) {
  std::vector<at::Tensor> z;
  z.reserve(branch.size());
  for (size_t b = 0; b < branch.size(); ++b) {
    z.push_back(call_bn_apply(branch[b], bns[b].mean, bns[b].invstd, bns[b].weight, bns[b].bias, std::nullopt, true));
  }
  return z;
}

// The projection's 1x1 convolution over the normalized conv branches: sum over b of conv(z[b], its C input
// channels of project_weight), in memory format mf. float32 / float64: one convolution per branch, accumulated in
// place (nothing joins the branches); float16 / bfloat16: one convolution over their concatenation, so that the
// sum is rounded to the half type once, as a single convolution over every branch rounds it.
at::Tensor branch_projection(at::TensorList z, const at::Tensor& project_weight, int64_t c, at::MemoryFormat mf) {
  const auto conv1x1 = [&](const at::Tensor& input, int64_t start, int64_t len) {
    return change_layout(at::convolution(input, project_weight.narrow(1, start, len), std::nullopt, {1, 1}, {0, 0},
                                         {1, 1}, false, {0, 0}, 1),
                         mf);
  };
  const int64_t branches = static_cast<int64_t>(z.size());
  if (at::isReducedFloatingType(z[0].scalar_type())) return conv1x1(at::cat(z, 1), 0, branches * c);
  at::Tensor proj = conv1x1(z[0], 0, c);
  for (int64_t b = 1; b < branches; ++b) proj.add_(conv1x1(z[b], b * c, c));
  return proj;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
aspp_forward(const at::Tensor& x, at::TensorList conv_weights, const at::Tensor& pool_weight,
             const at::Tensor& project_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
             const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
             at::IntArrayRef rates, bool training, double momentum, double eps,
             std::optional<c10::string_view> group_name, bool /*memory_efficient: read by the Python autograd*/) {
  const auto group = bn_group(group_name, training);
  const AsppShape g =
      check_aspp_args(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, rates, group.has_value());
  const int64_t bc = g.branches * g.c, k = bc + 2 * g.c;
  TORCH_CHECK(present(running_mean) == present(running_var),
              "deeplab_ops: running_mean and running_var must be given together; only ",
              present(running_mean) ? "running_mean" : "running_var", " was given");
  TORCH_CHECK(training || present(running_mean), "deeplab_ops: aspp in eval mode needs running statistics");
  check_bn_hyper(momentum, eps);
  if (present(running_mean)) {
    DLO_CHECK_CHANNEL_VECTOR(*running_mean, k);
    DLO_CHECK_CHANNEL_VECTOR(*running_var, k);
    DLO_CHECK_SAME_DEVICE(*running_mean, x);
    DLO_CHECK_SAME_DEVICE(*running_var, x);
    check_bn_dtype(*running_mean, "running_mean", x.scalar_type(), bn_weight.scalar_type());
    check_bn_dtype(*running_var, "running_var", x.scalar_type(), bn_weight.scalar_type());
  }
  TORCH_CHECK(!training || g.n > 1 || group,
              "deeplab_ops: aspp in training mode needs a batch of 2 or more: its image-pooling branch has one value "
              "per channel and image, so BatchNorm over a batch of 1 is undefined. Use a batch of 2 or more, or "
              "eval mode / frozen BatchNorm");
  const auto mf = x.suggest_memory_format();
  const double hw_count = static_cast<double>(g.n * g.h * g.w);

  // Conv branches, one pre-BN tensor each (branch_out): each branch is normalized by its own BatchNorm, so no
  // buffer joins them (ATen's convolutions could not write into one anyway: they have no output-buffer form).
  std::vector<at::Tensor> branch;
  branch.reserve(g.branches);
  // Eval with no gradient to compute may run the 3x3 branches by Winograd (cpu backend, composite/conv_calls.h).
  bool inference = !training && inference_call({&x, &pool_weight, &project_weight, &bn_weight, &bn_bias});
  for (const auto& w : conv_weights) inference = inference && inference_call({&w});
  ChannelsLastOnce x_cl(x);  // for the branches that run an NCHW x channels_last: converted once
  for (int64_t b = 0; b < g.branches; ++b) {
    const int64_t r = b == 0 ? 1 : rates[b - 1];
    branch.push_back(conv2d_forward(x, conv_weights[b], {1, 1}, {b == 0 ? 0 : r, b == 0 ? 0 : r}, {r, r}, mf,
                                    inference, &x_cl));
  }
  // Image pooling: mean over H x W, then its 1x1 conv as a matmul: (N, Cin) x (Cin, C).
  const at::Tensor pool_pre = at::mm(x.mean({2, 3}), pool_weight.reshape({g.c, g.cin}).t());
  const at::Tensor pool4 = pool_pre.view({g.n, g.c, 1, 1});

  // Outputs allocated once; the finalize stage writes each block's slice of them (no cat, no clone).
  const auto opts = x.options().dtype(opmath_dtype(x.scalar_type()));
  const at::Tensor save_mean = at::empty({k}, opts), save_invstd = at::empty({k}, opts);
  const bool update = training && present(running_mean);
  const auto running_opts = present(running_mean) ? running_mean->options() : opts;
  const at::Tensor new_rm = at::empty({update ? k : 0}, running_opts);
  const at::Tensor new_rv = at::empty({update ? k : 0}, running_opts);
  // A block's slices of the statistics outputs: [start, start + len).
  auto training_block = [&](const at::Tensor& pre, double count, int64_t start, int64_t len) {
    return TrainingBlock{pre, count, block(running_mean, start, len), block(running_var, start, len),
                         block(save_mean, start, len), block(save_invstd, start, len),
                         update ? block(new_rm, start, len) : new_rm, update ? block(new_rv, start, len) : new_rv};
  };
  if (training) {
    // Every branch's statistics (conv branches, then pooling) in one collective.
    std::vector<TrainingBlock> blocks;
    blocks.reserve(g.branches + 1);
    for (int64_t b = 0; b < g.branches; ++b) blocks.push_back(training_block(branch[b], hw_count, b * g.c, g.c));
    blocks.push_back(training_block(pool4, static_cast<double>(g.n), bc, g.c));
    training_stats(blocks, group, momentum, eps);
  } else {
    call_bn_finalize(std::nullopt, std::nullopt, std::nullopt, 0.0, running_mean, running_var, momentum, eps,
                     save_mean, save_invstd, new_rm, new_rv);
  }
  // The blocks: the conv branches, the pooling branch, the projection.
  const std::vector<BlockBN> bns = block_bns(save_mean, save_invstd, bn_weight, bn_bias, g.branches + 2, g.c);
  const std::vector<at::Tensor> z = normalized_branches(branch, bns);
  const BlockBN& bn_p = bns[g.branches];
  const at::Tensor z_p = call_bn_apply(pool4, bn_p.mean, bn_p.invstd, bn_p.weight, bn_p.bias, std::nullopt, true);

  // Projection: 1x1 conv over the conv branches + the pooling branch as a per-(image, channel) bias, added in
  // place.
  const at::Tensor w_pool = project_weight.narrow(1, bc, g.c).reshape({g.c, g.c});
  at::Tensor proj = branch_projection(z, project_weight, g.c, mf);
  proj.add_(at::mm(z_p.view({g.n, g.c}), w_pool.t()).view({g.n, g.c, 1, 1}));
  const int64_t po = bc + g.c;
  if (training) training_stats({training_block(proj, hw_count, po, g.c)}, group, momentum, eps);
  const BlockBN& bn_o = bns[g.branches + 1];
  at::Tensor out = call_bn_apply(proj, bn_o.mean, bn_o.invstd, bn_o.weight, bn_o.bias, std::nullopt, true);
  return {out, branch, pool_pre, proj, save_mean, save_invstd, new_rm, new_rv};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aspp_backward(
    const at::Tensor& grad_out, const at::Tensor& x, at::TensorList conv_weights, const at::Tensor& pool_weight,
    const at::Tensor& project_weight, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    at::TensorList branch, const at::Tensor& pool_pre, const at::Tensor& proj, const at::Tensor& out,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, at::IntArrayRef rates, bool training,
    std::array<bool, 3> output_mask, std::optional<c10::string_view> group_name) {
  // With a group, each BN's input gradient uses the group's sums and count (bn_backward_dy with count 1 on the
  // all-reduced means); grad_bn_weight / grad_bn_bias stay this process's sums (DDP averages them).
  const auto group = bn_group(group_name, training);
  const AsppShape g =
      check_aspp_args(x, conv_weights, pool_weight, project_weight, bn_weight, bn_bias, rates, group.has_value());
  const int64_t bc = g.branches * g.c, po = bc + g.c;
  TORCH_CHECK(static_cast<int64_t>(branch.size()) == g.branches, "deeplab_ops: branch_out must hold ", g.branches,
              " tensors (the forward's pre-BN conv branches, one per conv weight), got ", branch.size());
  for (int64_t b = 0; b < g.branches; ++b) {
    TORCH_CHECK(branch[b].sizes() == at::IntArrayRef({g.n, g.c, g.h, g.w}), "deeplab_ops: branch_out[", b,
                "] must have shape (", g.n, ", ", g.c, ", ", g.h, ", ", g.w, ") (the forward's), got ",
                branch[b].sizes());
    TORCH_CHECK(branch[b].device() == x.device() && branch[b].scalar_type() == x.scalar_type(),
                "deeplab_ops: branch_out[", b, "] is ", branch[b].scalar_type(), " on ", branch[b].device(),
                " but x is ", x.scalar_type(), " on ", x.device(), "; expected the forward's");
  }
  // The forward's other tensors, checked here under their own names (the stage ops would name them input, output):
  // grad_out, out and project_out (N, C, H, W), pool_out (N, C), in x's dtype, on x's device.
  const std::vector<int64_t> nchw{g.n, g.c, g.h, g.w}, nc{g.n, g.c};
  const std::pair<const at::Tensor*, const char*> saved[] = {
      {&grad_out, "grad_out"}, {&out, "out"}, {&proj, "project_out"}, {&pool_pre, "pool_out"}};
  for (const auto& [t, name] : saved) {
    const bool pooled = t == &pool_pre;
    const at::IntArrayRef want = pooled ? at::IntArrayRef(nc) : at::IntArrayRef(nchw);
    TORCH_CHECK(t->sizes() == want, "deeplab_ops: ", name, " must have shape (", g.n, ", ", g.c,
                pooled ? "" : ", " + std::to_string(g.h) + ", " + std::to_string(g.w), ") (the forward's), got ",
                t->sizes());
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), "deeplab_ops: ", name, " is ",
                t->scalar_type(), " on ", t->device(), " but x is ", x.scalar_type(), " on ", x.device(),
                "; expected the forward's");
  }
  // The forward's statistics: one value per BatchNorm channel, on x's device, in the dtype the forward gives them.
  DLO_CHECK_CHANNEL_VECTOR(save_mean, po + g.c);
  DLO_CHECK_CHANNEL_VECTOR(save_invstd, po + g.c);
  DLO_CHECK_SAME_DEVICE(save_mean, x);
  DLO_CHECK_SAME_DEVICE(save_invstd, x);
  check_bn_dtype(save_mean, "save_mean", x.scalar_type());
  check_bn_dtype(save_invstd, "save_invstd", x.scalar_type());
  const auto mf = x.suggest_memory_format();
  const double hw_count = static_cast<double>(g.n * g.h * g.w);
  // The blocks: the conv branches, the pooling branch, the projection.
  const std::vector<BlockBN> bns = block_bns(save_mean, save_invstd, bn_weight, bn_bias, g.branches + 2, g.c);
  const BlockBN &bn_p = bns[g.branches], &bn_o = bns[g.branches + 1];
  const at::Tensor g_out = change_layout(grad_out, mf);

  // Projection BN.
  auto [sg_o, sgx_o] = call_bn_backward_reduce(g_out, out, proj, bn_o.mean, bn_o.invstd, true);
  at::Tensor dsg_o = sg_o, dsgx_o = sgx_o;
  double count_o = hw_count;
  if (group) {
    std::tie(dsg_o, dsgx_o) = all_reduce_mean_sums({{sg_o, sgx_o, hw_count}}, *group)[0];
    count_o = 1.0;
  }
  const at::Tensor dy_o = call_bn_backward_dy(g_out, out, proj, bn_o.mean, bn_o.invstd, bn_o.weight, dsg_o, dsgx_o,
                                              count_o, true, training);
  // The normalized branch outputs, recomputed from the pre-BN ones (cheaper than keeping them).
  const std::vector<at::Tensor> z = normalized_branches(branch, bns);
  const at::Tensor pool4 = pool_pre.view({g.n, g.c, 1, 1});
  const at::Tensor z_p = call_bn_apply(pool4, bn_p.mean, bn_p.invstd, bn_p.weight, bn_p.bias, std::nullopt, true);
  // Projection conv, per branch (its input and its weight columns), and the pooling bias.
  std::vector<at::Tensor> dz(g.branches), grad_project_parts;
  if (output_mask[1]) grad_project_parts.reserve(g.branches + 1);
  for (int64_t b = 0; b < g.branches; ++b) {
    auto grads = at::convolution_backward(dy_o, z[b], project_weight.narrow(1, b * g.c, g.c), std::nullopt, {1, 1},
                                          {0, 0}, {1, 1}, false, {0, 0}, 1, {true, output_mask[1], false});
    dz[b] = change_layout(std::get<0>(grads), mf);
    if (output_mask[1]) grad_project_parts.push_back(std::move(std::get<1>(grads)));
  }
  const at::Tensor w_pool = project_weight.narrow(1, bc, g.c).reshape({g.c, g.c});
  const at::Tensor dbias = dy_o.sum({2, 3});  // (N, C): the pooling branch's share, summed over H x W
  const at::Tensor dz_p = at::mm(dbias, w_pool).view({g.n, g.c, 1, 1});
  at::Tensor grad_project_weight;
  if (output_mask[1]) {
    // One copy: the weight gradient is one tensor, its parts come from separate products.
    grad_project_parts.push_back(at::mm(dbias.t(), z_p.view({g.n, g.c})).view({g.c, g.c, 1, 1}));
    grad_project_weight = change_layout(at::cat(grad_project_parts, 1), project_weight.suggest_memory_format());
  }

  // Pooling branch BN (over the batch) and each conv branch's BN.
  auto [sg_p, sgx_p] = call_bn_backward_reduce(dz_p, z_p, pool4, bn_p.mean, bn_p.invstd, true);
  std::vector<at::Tensor> sg_b(g.branches), sgx_b(g.branches);
  for (int64_t b = 0; b < g.branches; ++b) {
    std::tie(sg_b[b], sgx_b[b]) = call_bn_backward_reduce(dz[b], z[b], branch[b], bns[b].mean, bns[b].invstd, true);
  }
  std::vector<at::Tensor> grad_conv;
  at::Tensor grad_x, grad_pool_weight;
  if (output_mask[0] || output_mask[1]) {
    std::vector<at::Tensor> dsg_b = sg_b, dsgx_b = sgx_b;
    at::Tensor dsg_p = sg_p, dsgx_p = sgx_p;
    double count_p = static_cast<double>(g.n), count_b = hw_count;
    if (group) {
      std::vector<BlockSums> sums{{sg_p, sgx_p, static_cast<double>(g.n)}};
      for (int64_t b = 0; b < g.branches; ++b) sums.push_back({sg_b[b], sgx_b[b], hw_count});
      const auto reduced = all_reduce_mean_sums(sums, *group);
      std::tie(dsg_p, dsgx_p) = reduced[0];
      for (int64_t b = 0; b < g.branches; ++b) std::tie(dsg_b[b], dsgx_b[b]) = reduced[b + 1];
      count_p = count_b = 1.0;
    }
    const at::Tensor dy_p = call_bn_backward_dy(dz_p, z_p, pool4, bn_p.mean, bn_p.invstd, bn_p.weight, dsg_p, dsgx_p,
                                                count_p, true, training)
                                .view({g.n, g.c});
    if (output_mask[1]) grad_pool_weight = at::mm(dy_p.t(), x.mean({2, 3})).view({g.c, g.cin, 1, 1});
    ChannelsLastOnce x_cl(x);  // for the branches whose weight gradient reads x channels_last: converted once
    for (int64_t b = 0; b < g.branches; ++b) {
      const int64_t r = b == 0 ? 1 : rates[b - 1];
      const at::Tensor dy_b = call_bn_backward_dy(dz[b], z[b], branch[b], bns[b].mean, bns[b].invstd, bns[b].weight,
                                                  dsg_b[b], dsgx_b[b], count_b, true, training);
      auto [gx, gw] = conv2d_backward(dy_b, x, conv_weights[b], {1, 1}, {b == 0 ? 0 : r, b == 0 ? 0 : r}, {r, r},
                                      output_mask[0], output_mask[1], &x_cl);
      if (output_mask[0]) {
        if (b == 0) {
          grad_x = change_layout(gx, mf);
        } else {
          grad_x.add_(gx);
        }
      }
      if (output_mask[1]) grad_conv.push_back(gw);
    }
    if (output_mask[0]) {
      // The pooling branch's gradient is spread evenly over H x W: added as a broadcast, never materialized.
      // The 1 / (H * W) rides on add_'s alpha: a scalar division would convert a wrapped 0-d tensor per call.
      const at::Tensor dpooled = at::mm(dy_p, pool_weight.reshape({g.c, g.cin}));
      grad_x.add_(dpooled.view({g.n, g.cin, 1, 1}), 1.0 / static_cast<double>(g.h * g.w));
    }
  }
  at::Tensor grad_bn_weight, grad_bn_bias;
  if (output_mask[2]) {
    sgx_b.insert(sgx_b.end(), {sgx_p, sgx_o});
    sg_b.insert(sg_b.end(), {sg_p, sg_o});
    grad_bn_weight = at::cat(sgx_b);
    grad_bn_bias = at::cat(sg_b);
  }
  for (size_t b = 0; b < grad_conv.size(); ++b) grad_conv[b] = strided_like_param(grad_conv[b], conv_weights[b]);
  return {grad_x, grad_conv, strided_like_param(grad_pool_weight, pool_weight),
          strided_like_param(grad_project_weight, project_weight), grad_bn_weight, grad_bn_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CPU, m) {
  m.impl("aspp_forward", &aspp_forward);
  m.impl("aspp_backward", &aspp_backward);
}

#ifdef DEEPLAB_OPS_WITH_CUDA
TORCH_LIBRARY_IMPL(deeplab_ops, CUDA, m) {
  m.impl("aspp_forward", &aspp_forward);
  m.impl("aspp_backward", &aspp_backward);
}
#endif

}  // namespace deeplab_ops
