// Every deeplab_ops schema, in one place. Backends register kernels for these names:
//   csrc/cpu/        the BN stage and upsample-CE kernels, TORCH_LIBRARY_IMPL(deeplab_ops, CPU, m)
//   csrc/cuda/       the same for CUDA, TORCH_LIBRARY_IMPL(deeplab_ops, CUDA, m)
//   csrc/composite/  conv_bn_relu, aspp, conv_bias_act: ATen convolutions + the stage ops, registered for CPU and
//                    (CUDA build) CUDA
//   deeplab_ops/triton/  Python kernels for the triton_* ops (torch.library.register_kernel)
// Python adds the fake (meta) kernels and autograd (deeplab_ops/ops/).
//
// Layout conventions: activations are NCHW or channels_last (NHWC) 4-D tensors; outputs keep the
// input's memory format, except the intermediates that only a backward reads (conv_out, branch_out, project_out,
// and conv_bias_act's plain convolution that recomputes conv_out): the triton_ twins return those channels_last,
// the layout their kernels read (no conversion out and back for an NCHW input). Per-channel statistics (mean, m2,
// invstd, sums) are in the "opmath" dtype:
// float32 for float16/bfloat16/float32 activations, float64 for float64.

#include <Python.h>
#include <torch/library.h>
#include <ATen/native/ConvUtils.h>

#include "cpu/conv_layout_cpu.h"
#include "cpu/conv_taps_cpu.h"
#include "cpu/gemm_cpu.h"
#include "cpu/onednn_guard_cpu.h"
#include "cpu/winograd_cpu.h"

extern "C" {
// The extension module only exists to run the static registrations below and in the kernel files.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "deeplab_ops kernels (registered with torch.library)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

// Defines NAME and its twin "triton_" NAME from the one signature text: the cpu/cuda composites and the Triton
// kernels (deeplab_ops/triton/, registered from Python) implement the same contract.
#define DLO_DEF_WITH_TRITON_TWIN(NAME, SIGNATURE) \
  do {                                             \
    m.def(NAME SIGNATURE);                         \
    m.def("triton_" NAME SIGNATURE);               \
  } while (0)

TORCH_LIBRARY(deeplab_ops, m) {
  // ---- BatchNorm stages (shared by every backend that uses an external convolution) -------------
  // Per-channel mean and M2 = sum((y - mean)^2) over (N, H, W), merged from per-block partials
  // (Chan et al.), never from E[y^2] - E[y]^2.
  m.def("bn_stats(Tensor input) -> (Tensor mean, Tensor m2)");
  // The statistics that normalize, written into the caller's buffers (save_mean, save_invstd: (C,), float32 or
  // float64; new_running_mean/var: (C,) in the running statistics' dtype, or empty when there are none), so that
  // the composites allocate each output once and no per-call copies or cats are needed.
  //   training (mean and m2 given): merge the partials with Chan's formula, mean/m2 (C,) over `count` values
  //     each, or (P, C) with counts (P,) (the partials of P processes); update the running statistics out of
  //     place exactly as F.batch_norm does (unbiased variance for running_var, from the merged count).
  //   eval (mean and m2 None): save_mean = running_mean, save_invstd = 1 / sqrt(running_var + eps).
  // Strided mean/m2/counts are read in place (the all-gathered partials are column views of one buffer).
  m.def(
      "bn_finalize(Tensor? mean, Tensor? m2, Tensor? counts, float count, Tensor? running_mean, "
      "Tensor? running_var, float momentum, float eps, Tensor(a!) save_mean, Tensor(b!) save_invstd, "
      "Tensor(c!) new_running_mean, Tensor(d!) new_running_var) -> ()");
  // out = act((input - mean) * invstd * weight + bias [+ residual]); act = ReLU or identity; weight/bias None
  // mean 1/0. Per-channel vectors of any floating dtype (converted to the opmath dtype only when they differ).
  m.def(
      "bn_apply(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
      "bool relu) -> Tensor");
  // g = relu ? grad_out * (output > 0) : grad_out; xhat = (input - mean) * invstd.
  // Returns (sum g, sum g * xhat) per channel.
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor output, Tensor input, Tensor mean, Tensor invstd, "
      "bool relu) -> (Tensor sum_g, Tensor sum_g_xhat)");
  // Gradient w.r.t. the BN input: weight * invstd * (g - sum_g / count - xhat * sum_g_xhat / count) in
  // training, weight * invstd * g in eval (the sums are then ignored and may be None).
  m.def(
      "bn_backward_dy(Tensor grad_out, Tensor output, Tensor input, Tensor mean, Tensor invstd, "
      "Tensor? weight, Tensor? sum_g, Tensor? sum_g_xhat, float count, bool relu, bool training) -> Tensor");

  // ---- Fused conv + BN (+ residual) + ReLU ---------------------------------------------------------
  // Composite backends (cpu, cuda): ATen convolution (oneDNN / cuDNN) + the BN stages above.
  // Returns the output, the pre-BN convolution output, the statistics that backward needs, and the
  // updated running statistics (training with running stats given; else empty tensors). The op is
  // functional, so autograd and torch.compile treat it as such; the Python front door copies the new
  // running statistics into the module's buffers.
  // group_name (training only; ignored in eval): BatchNorm statistics over the batch of every process of that
  // torch.distributed group (nn.SyncBatchNorm semantics). memory_efficient: read by the autograd
  // (csrc/composite/conv_bn_relu_autograd.cpp) to choose what to save; the kernels ignore it.
  DLO_DEF_WITH_TRITON_TWIN(
      "conv_bn_relu_forward",
      "(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var, "
      "int[2] stride, int[2] padding, int[2] dilation, bool training, float momentum, float eps, Tensor? residual, "
      "bool relu, str? group_name=None, bool memory_efficient=False) "
      "-> (Tensor out, Tensor conv_out, Tensor save_mean, Tensor save_invstd, Tensor new_running_mean, "
      "Tensor new_running_var)");
  // output_mask: which of (x, weight, bn_weight, bn_bias, residual) need a gradient; the others are
  // returned undefined (None). With group_name, grad_bn_weight/grad_bn_bias are this process's sums (DDP
  // averages parameter gradients) and grad_x/grad_weight use the sums over the group.
  DLO_DEF_WITH_TRITON_TWIN(
      "conv_bn_relu_backward",
      "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bn_weight, Tensor conv_out, Tensor out, Tensor save_mean, "
      "Tensor save_invstd, int[2] stride, int[2] padding, int[2] dilation, bool training, bool relu, "
      "bool[5] output_mask, str? group_name=None) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bn_weight, Tensor grad_bn_bias, Tensor grad_residual)");
  // act(conv2d(x, weight, bias) [+ residual]), act = ReLU or identity, groups = 1, output in x's memory format.
  // The eval path with BatchNorm folded into weight/bias (on CPU, float32 3x3 calls may run the inference-only
  // Winograd convolution, csrc/cpu/winograd_cpu.h), and (no bias, no residual, no relu) the plain convolution that
  // the memory-efficient backward recomputes: then exactly conv_bn_relu_forward's conv_out (strides included: the
  // triton twin returns that one channels_last). No autograd.
  DLO_DEF_WITH_TRITON_TWIN(
      "conv_bias_act",
      "(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, int[2] dilation, "
      "bool relu) -> Tensor");

  // conv_bn_relu_forward's `out` in eval (BatchNorm from the running statistics), and nothing else: the eval path
  // of the dtypes whose BatchNorm is not folded into the weight (float16/bfloat16), where nothing is differentiated.
  // No conv_out, statistics or running-statistic outputs (the triton kernel then stores only `out`). No autograd.
  DLO_DEF_WITH_TRITON_TWIN(
      "conv_bn_relu_eval",
      "(Tensor x, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, Tensor running_mean, Tensor running_var, "
      "int[2] stride, int[2] padding, int[2] dilation, float eps, Tensor? residual, bool relu) -> Tensor");

  // The cpu backend's cache of Winograd-transformed eval weights (csrc/cpu/winograd_cpu.h): registering a weight
  // whose transforms may be kept (the eval path's cached folds; held weakly), {entries, bytes, hits, misses}, and
  // emptying it (deeplab_ops.common.clear_derived calls it).
  // winograd_plan: the output tile size (4, 3 or 2) the cpu backend's Winograd convolution would run a float32 eval
  // convolution with, 1 for its short grids, -4 for stride-2 tiles, or 0 where oneDNN's convolution runs
  // (csrc/cpu/winograd_cpu.h).
  m.def("winograd_plan(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> int",
        [](const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation) -> int64_t {
          return deeplab_ops::winograd_plan(x, weight, stride, padding, dilation);
        });
  // sparse_taps_plan: whether the cpu backend runs a float32 convolution of an NCHW x channels_last (oneDNN skips
  // the padding taps only there; csrc/cpu/conv_layout_cpu.h), and whether its backward computes the input and the
  // weight gradient by its own routes (csrc/cpu/conv_taps_cpu.h).
  m.def("sparse_taps_plan(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) "
        "-> (bool channels_last, bool input_grad, bool weight_grad)",
        [](const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation) -> std::tuple<bool, bool, bool> {
          const auto backward = deeplab_ops::conv_taps_backward_plan(x, weight, stride, padding, dilation);
          // as a call with no gradient would decide (a registered weight's kept copy costs no conversion)
          return {deeplab_ops::nchw_conv_via_channels_last(x, weight, stride, padding, dilation, true),
                  backward.input, backward.weight};
        });
  // onednn_unsafe_plan: whether the cpu backend computes this CPU convolution in float64 because PyTorch's oneDNN
  // computes it wrong or crashes on it (csrc/cpu/onednn_guard_cpu.h); deeplab_ops.reference's twin
  // (_onednn_unsafe) is tested against it.
  m.def("onednn_unsafe_plan(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> bool",
        [](const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation) -> bool {
          TORCH_CHECK(x.dim() == 4 && weight.dim() == 4 && x.size(1) == weight.size(1),
                      "onednn_unsafe_plan: x (N, C, H, W) and weight (C_out, C, kH, kW) must be 4-D with the same C, "
                      "got shapes ", x.sizes(), " and ", weight.sizes());
          TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                      "onednn_unsafe_plan: stride, padding and dilation must have 2 values each, got ", stride, ", ",
                      padding, " and ", dilation);
          for (int d = 0; d < 2; ++d) {
            TORCH_CHECK(stride[d] >= 1 && dilation[d] >= 1 && padding[d] >= 0, "onednn_unsafe_plan: stride ", stride,
                        " and dilation ", dilation, " must be positive, padding ", padding, " non-negative");
          }
          return deeplab_ops::onednn_unsafe_conv(x, weight, stride, padding, dilation);
        });
  // nchw_weight_grad_plan: whether the cpu backend's backward of a float32 strided or dilated convolution computes
  // the weight gradient of a channels_last x from NCHW copies of x and its output gradient
  // (csrc/cpu/conv_taps_cpu.h; false where the weight gradient takes the per-tap GEMMs of sparse_taps_plan).
  m.def("nchw_weight_grad_plan(Tensor x, Tensor weight, int[2] stride, int[2] padding, int[2] dilation) -> bool",
        [](const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
           at::IntArrayRef dilation) -> bool {
          TORCH_CHECK(x.dim() == 4, "nchw_weight_grad_plan: x must be 4-D (N, C, H, W), got shape ", x.sizes());
          TORCH_CHECK(weight.dim() == 4, "nchw_weight_grad_plan: weight must be 4-D (C_out, C_in, kH, kW), got shape ",
                      weight.sizes());
          TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
                      "nchw_weight_grad_plan: stride, padding and dilation must have 2 values each, got ", stride, ", ",
                      padding, " and ", dilation);
          for (int d = 0; d < 2; ++d) {
            TORCH_CHECK(stride[d] >= 1, "nchw_weight_grad_plan: stride must be positive, got ", stride);
            TORCH_CHECK(dilation[d] >= 1, "nchw_weight_grad_plan: dilation must be positive, got ", dilation);
            TORCH_CHECK(padding[d] >= 0, "nchw_weight_grad_plan: padding must be non-negative, got ", padding);
          }
          if (deeplab_ops::conv_taps_backward_plan(x, weight, stride, padding, dilation).weight) return false;
          const auto out = at::native::conv_output_size(x.sizes(), weight.sizes(), padding, stride, dilation);
          return out[2] > 0 && out[3] > 0 &&
                 deeplab_ops::nchw_weight_grad(x, weight, stride, dilation, out[2] * out[3]);
        });
  // nchw_weight_grad_route: where that route is taken, process-wide (mode 'auto': by the CPU's vendor, 'always',
  // 'never'; None: unchanged); returns the mode before the call. For tests and measurements.
  m.def("nchw_weight_grad_route(str? mode=None) -> str", &deeplab_ops::nchw_weight_grad_route);
  // cpu_gemm: a @ b by the Winograd convolution's float32 GEMM kernel (csrc/cpu/gemm_cpu.h), its rows in GEMMs of
  // row_block rows and its columns in GEMMs of panel_block 32-column panels (0: all); for tests.
  m.def("cpu_gemm(Tensor a, Tensor b, int row_block, int panel_block=0) -> Tensor", &deeplab_ops::cpu_gemm);
  m.def("winograd_cache_allow(Tensor weight) -> ()", &deeplab_ops::winograd_cache_allow);
  m.def("winograd_cache_info() -> int[]", &deeplab_ops::winograd_cache_info);
  m.def("winograd_cache_clear() -> ()", &deeplab_ops::winograd_cache_clear);
  m.def("winograd_cache_release(Tensor[] weights) -> ()", &deeplab_ops::winograd_cache_release);

  // ---- Fused ASPP (atrous spatial pyramid pooling, torchvision's structure) -------------------------
  // Branches: conv_weights[0] is the 1x1 branch, conv_weights[1 + i] the 3x3 branch with dilation =
  // padding = rates[i]; pool_weight the image-pooling branch's 1x1 conv; project_weight the 1x1 projection
  // over the (len(rates) + 2) * C concatenation. The BatchNorm tensors of all branches are concatenated in
  // the order [conv branches..., pooling, projection], each block C channels (K = (len(rates) + 3) * C).
  // The pooling branch enters the projection as a per-(image, channel) bias, never broadcast over H x W.
  // Saved for backward: branch_out (the pre-BN conv branch outputs as the twin keeps them: the cpu/cuda composite
  // one N x C x H x W tensor per branch, the triton twin one N x (len(rates) + 1) * C x H x W buffer), pool_out
  // (pre-BN pooling branch, N x C), project_out (pre-BN projection) and the statistics (K,).
  // group_name / memory_efficient: as for conv_bn_relu_forward; every BatchNorm block is synchronized.
  DLO_DEF_WITH_TRITON_TWIN(
      "aspp_forward",
      "(Tensor x, Tensor[] conv_weights, Tensor pool_weight, Tensor project_weight, Tensor bn_weight, "
      "Tensor bn_bias, Tensor? running_mean, Tensor? running_var, int[] rates, bool training, float momentum, "
      "float eps, str? group_name=None, bool memory_efficient=False) -> (Tensor out, Tensor[] branch_out, "
      "Tensor pool_out, Tensor project_out, Tensor save_mean, Tensor save_invstd, Tensor new_running_mean, "
      "Tensor new_running_var)");
  // output_mask: gradients wanted for (x, the conv weights, the BatchNorm weight and bias).
  DLO_DEF_WITH_TRITON_TWIN(
      "aspp_backward",
      "(Tensor grad_out, Tensor x, Tensor[] conv_weights, Tensor pool_weight, Tensor project_weight, "
      "Tensor bn_weight, Tensor bn_bias, Tensor[] branch_out, Tensor pool_out, Tensor project_out, Tensor out, "
      "Tensor save_mean, Tensor save_invstd, int[] rates, bool training, bool[3] output_mask, "
      "str? group_name=None) -> (Tensor grad_x, Tensor[] grad_conv_weights, Tensor grad_pool_weight, "
      "Tensor grad_project_weight, Tensor grad_bn_weight, Tensor grad_bn_bias)");

  // ---- Cross-entropy of bilinearly upsampled logits (deeplab_ops/ops/upsample_ce.py) -------------------
  // F.cross_entropy(F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners), target,
  // ignore_index, reduction) without materializing the (N, K, H, W) upsampled logits. logits (N, K, h, w),
  // target (N, H, W) int64, reduction "none" | "mean" | "sum". Returns the loss (logits' dtype; (N, H, W) for
  // "none", else 0-d), the per-pixel logsumexp as its two parts, lse (2, N, H, W): lse[0] the maximum over classes
  // of the upsampled logits, lse[1] the log of the sum of exp(z - maximum) (so that the backward's z - logsumexp is
  // as exact as log_softmax's, whatever the logits' magnitude), and the count of non-ignored pixels (0-d), both in
  // the opmath dtype, which the backward uses. Labels outside [0, K) other than ignore_index: an error on CPU, NaN
  // loss/gradient at those pixels on CUDA (no device-side check).
  DLO_DEF_WITH_TRITON_TWIN(
      "upsample_cross_entropy_forward",
      "(Tensor logits, Tensor target, int ignore_index, bool align_corners, str reduction) "
      "-> (Tensor loss, Tensor lse, Tensor valid_count)");
  // grad: dL/dloss ((N, H, W) for "none", else 0-d). Returns dL/dlogits (N, K, h, w) in logits' dtype.
  DLO_DEF_WITH_TRITON_TWIN(
      "upsample_cross_entropy_backward",
      "(Tensor grad, Tensor logits, Tensor target, Tensor lse, Tensor valid_count, int ignore_index, "
      "bool align_corners, str reduction) -> Tensor");
}


// ---- torch.autocast ------------------------------------------------------------------------------------
// Under torch.autocast the ops run in the dtypes of the tensors they are given: autocast casts nothing for them
// (deeplab_ops/ops/ casts a fused layer's inputs to autocast's dtype where eager PyTorch's convolution would run
// in it), and no aten op inside them is autocast either. Without these kernels autocast would fall through to the
// op and then cast the aten calls inside it: a convolution in bfloat16 beside BatchNorm statistics in float32, and
// an op's outputs in mixed dtypes that its backward, which runs outside autocast, cannot combine.
namespace {

void run_without_autocast(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  op.callBoxed(stack);
}

constexpr const char* kComputeOps[] = {
    "bn_stats", "bn_finalize", "bn_apply", "bn_backward_reduce", "bn_backward_dy",
    "conv_bn_relu_forward", "triton_conv_bn_relu_forward", "conv_bn_relu_backward", "triton_conv_bn_relu_backward",
    "conv_bn_relu_eval", "triton_conv_bn_relu_eval",
    "conv_bias_act", "triton_conv_bias_act", "aspp_forward", "triton_aspp_forward", "aspp_backward",
    "triton_aspp_backward", "upsample_cross_entropy_forward", "triton_upsample_cross_entropy_forward",
    "upsample_cross_entropy_backward", "triton_upsample_cross_entropy_backward",
};

void register_autocast(torch::Library& m) {
  for (const char* name : kComputeOps) m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_without_autocast>());
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, AutocastCPU, m) { register_autocast(m); }
TORCH_LIBRARY_IMPL(deeplab_ops, AutocastCUDA, m) { register_autocast(m); }
