// act(conv2d(x, weight, bias) [+ residual]), act = ReLU or identity: the eval path of conv + BN with the BN folded
// into weight and bias by the caller, and the plain convolution that the memory-efficient backward recomputes.
// The epilogue runs in place on the convolution's output, so the op allocates nothing but that output.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/ConvUtils.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>
#include <torch/version.h>

#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/arg_checks.h"
#include "composite/stage_calls.h"
#include "cpu/conv_layout_cpu.h"
#include "cpu/onednn_guard_cpu.h"
#include "cpu/pointwise_conv_cpu.h"
#include "cpu/winograd_cpu.h"

namespace deeplab_ops {
namespace {

void check_conv_bias_act_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv_geometry_args(x, weight, stride, padding, dilation);
  if (present(bias)) {
    DLO_CHECK_CHANNEL_VECTOR(*bias, weight.size(0));
    DLO_CHECK_SAME_DEVICE(*bias, x);
    DLO_CHECK_SAME_DTYPE(*bias, x);
  }
}

void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& out) {
  if (!present(residual)) return;
  DLO_CHECK_SAME_SHAPE(*residual, out);
  DLO_CHECK_SAME_DTYPE(*residual, out);
  DLO_CHECK_SAME_DEVICE(*residual, out);
}

// Whether ATen would run this CPU convolution with THNN's dilated kernel (what it picks for small dilated inputs,
// e.g. batch 1 in evaluation, instead of oneDNN). That kernel adds a bias image by image and channel by channel
// (measured: 190 us against 110 us without the bias at 1x128x8x8, 3x3, dilation 2), so the bias then joins the
// epilogue instead.
bool bias_after_slow_dilated(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  if (!present(bias) || !x.is_cpu() || (dilation[0] == 1 && dilation[1] == 1)) return false;
  const c10::SymInt zero(0);
  const std::vector<c10::SymInt> out_pad{zero, zero};
  return at::native::select_conv_backend(x, weight, bias, c10::fromIntArrayRefSlow(stride),
                                         c10::fromIntArrayRefSlow(padding), c10::fromIntArrayRefSlow(dilation),
                                         false, out_pad, c10::SymInt(1), std::nullopt) ==
         at::native::ConvBackend::SlowDilated2d;
}

// The same at::convolution call (and layout) as conv_bn_relu_forward's conv_out, then the epilogue in place.
at::Tensor conv_bias_act_generic(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const auto mf = x.suggest_memory_format();
  const bool bias_later = bias_after_slow_dilated(x, weight, bias, stride, padding, dilation);
  at::Tensor out = at::convolution(x, weight, bias_later ? std::nullopt : bias, stride, padding, dilation, false,
                                   {0, 0}, 1)
                       .contiguous(mf);
  check_residual(residual, out);
  if (bias_later) out.add_(bias->view({1, -1, 1, 1}));
  if (present(residual)) out.add_(*residual);
  if (relu) out.relu_();
  return out;
}

// oneDNN's convolution with the bias, the residual sum and the ReLU as post-ops (mkldnn::_convolution_pointwise and
// its .binary form, the ops Inductor's CPU backend calls): the output is written once, in the input's channels_last
// layout, with the values of oneDNN's convolution followed by add_ and relu_. For channels_last float32 with a ReLU.
// Not for NCHW: oneDNN reorders NCHW to its blocked layout, and there at::convolution (which picks the THNN kernel
// for 1x1 convolutions on one thread) measured faster. at::convolution also picks THNN for channels_last 1x1 on one
// thread, converting the layout in and out: this path is up to 2x faster there. Not for small outputs either: the
// post-op convolution costs more per call than the epilogue passes it saves (measured on this project's Xeon,
// at::convolution + add_ + relu_ against it, same process: 8x64x17x17 1x1 with a residual 116 against 130 us, 141
// against 164 on one thread; 8x16x17x17 3x3 stride 2 90 against 95; from about 2^18 output values it wins:
// 4x64x33x33 3x3 935 against 1111 us, 2x256x33x33 1x1 599 against 706).
constexpr int64_t kPointwiseMinOutput = int64_t{1} << 18;

bool mkldnn_pointwise_applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, bool relu, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  if (!relu || x.scalar_type() != at::kFloat || !x.is_cpu()) return false;
  if (c10::multiply_integers(at::native::conv_output_size(x.sizes(), weight.sizes(), padding, stride, dilation)) <
      kPointwiseMinOutput) {
    return false;
  }
  if (!at::hasMKLDNN() || !at::globalContext().userEnabledMkldnn()) return false;
  if (x.suggest_memory_format() != at::MemoryFormat::ChannelsLast) return false;
  // The weight channels_last too (as a channels_last model's is; a 1x1 weight is both): oneDNN would copy any other
  // into x's layout on every call.
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast) || !weight.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return false;
  }
  if (present(bias) && !bias->is_contiguous()) return false;
  return !present(residual) || residual->is_contiguous(at::MemoryFormat::ChannelsLast);
}

std::optional<at::Tensor> conv_bias_act_mkldnn(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias,
                                               const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation) {
  using Unary = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                           at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                           c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);
  using Binary = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                            std::optional<at::Scalar>, std::optional<c10::string_view>,
                            c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);
  // Looked up once; absent from a torch built without oneDNN (then the generic path runs).
  static const auto unary = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  static const auto binary = c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", "binary"});
  const c10::List<std::optional<at::Scalar>> no_scalars;
  if (!present(residual)) {
    if (!unary.has_value()) return std::nullopt;
    return unary->typed<Unary>().call(x, weight, bias, padding, stride, dilation, 1, "relu", no_scalars, "");
  }
  if (!binary.has_value()) return std::nullopt;
  check_conv_residual(*residual, x, weight, stride, padding, dilation);
  return binary->typed<Binary>().call(x, *residual, weight, bias, padding, stride, dilation, 1, "add", std::nullopt,
                                      "relu", no_scalars, "");
}

// oneDNN's convolution with the epilogue as post-ops where that pays, else ATen's and the epilogue in place.
at::Tensor conv_bias_act_direct(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  if (mkldnn_pointwise_applies(x, weight, bias, residual, relu, stride, padding, dilation)) {
    if (auto out = conv_bias_act_mkldnn(x, weight, bias, residual, stride, padding, dilation)) return *out;
  }
  return conv_bias_act_generic(x, weight, bias, residual, stride, padding, dilation, relu);
}

at::Tensor conv_bias_act_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  check_conv_bias_act_args(x, weight, bias, stride, padding, dilation);
  // The residual checked before any path runs: the same message whichever one the call's size and layout pick.
  if (present(residual)) check_conv_residual(*residual, x, weight, stride, padding, dilation);
  if (onednn_unsafe_conv(x, weight, stride, padding, dilation)) {  // (cpu/onednn_guard_cpu.h)
    at::Tensor out = conv2d_float64(x, weight, bias, stride, padding, dilation);
    if (present(residual)) out.add_(*residual);
    if (relu) out.relu_();
    return out;
  }
  // Winograd for the eval path (BatchNorm folded: a bias, usually a ReLU); the plain form (no bias, residual or ReLU)
  // is the memory-efficient recompute of a training forward's convolution and runs that convolution, ATen's.
  const bool plain = !present(bias) && !present(residual) && !relu;
  if (const int m = plain ? 0 : winograd_plan(x, weight, stride, padding, dilation)) {
    // The eval path's folded weights (deeplab_ops.common.derived) have their transforms kept (winograd_cache_allow).
    return winograd_conv3x3(x, weight, bias, residual, padding, dilation, relu, m, x.suggest_memory_format());
  }
  // NCHW 1x1 layers as one GEMM per image, no layout conversion (cpu/pointwise_conv_cpu.h); eval only, as Winograd.
  if (!plain && nchw_pointwise_applies(x, weight, bias, residual, stride, padding)) {
    return nchw_pointwise_conv(x, weight, bias, residual, relu);
  }
  // The plain form (the recompute of a training forward's convolution) converts its weight as that forward did.
  if (nchw_conv_via_channels_last(x, weight, stride, padding, dilation, !plain)) {
    constexpr auto kCL = at::MemoryFormat::ChannelsLast;
    const std::optional<at::Tensor> r =
        present(residual) ? std::optional<at::Tensor>(change_layout(*residual, kCL)) : std::nullopt;
    return change_layout(conv_bias_act_direct(change_layout(x, kCL), channels_last_weight(weight, !plain), bias, r,
                                              stride, padding, dilation, relu),
                         at::MemoryFormat::Contiguous);
  }
  return conv_bias_act_direct(x, weight, bias, residual, stride, padding, dilation, relu);
}

#ifdef DEEPLAB_OPS_WITH_CUDA
// cuDNN's fused conv + bias (+ z) + ReLU (at::cudnn_convolution_relu / _add_relu) saves the epilogue's two passes
// over the output. It computes in x's dtype with float accumulation for float16/bfloat16/float32, lays the output
// out channels_last when x or weight is (cudnn_conv_suggest_memory_format) and indexes with 32 bits (input, weight,
// residual and output); it ignores cuDNN's determinism settings and mishandles a residual that aliases x
// (pytorch/pytorch#62926). Calls outside that take the generic path, so the output is always in x's memory format.
bool cudnn_fused_applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& residual,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  if (!relu) return false;  // cuDNN's fused forms all end in ReLU
  const auto dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kHalf && dtype != at::kBFloat16) return false;
  auto& ctx = at::globalContext();
  if (!ctx.userEnabledCuDNN() || !ctx.hasCuDNN()) return false;
  if (ctx.deterministicCuDNN() || ctx.deterministicAlgorithms()) return false;
  const bool x_nhwc = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const bool w_nhwc = weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  if (w_nhwc && !x_nhwc) return false;  // cuDNN would write channels_last for an NCHW x
  constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
  if (x.numel() > kMax32 || weight.numel() > kMax32) return false;
  if (c10::multiply_integers(at::native::conv_output_size(x.sizes(), weight.sizes(), padding, stride, dilation)) >
      kMax32) {
    return false;
  }
  if (present(residual) && (residual->numel() > kMax32 || residual->is_alias_of(x))) return false;
  return true;
}

// Configurations cuDNN found no fused engine for ("unable to find an engine", CUDNN_STATUS_NOT_SUPPORTED): they
// take the generic path from then on instead of failing the plan search on every call.
using FusedKey = std::vector<int64_t>;

FusedKey fused_key(const at::Tensor& x, const at::Tensor& weight, bool residual, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  FusedKey key{static_cast<int64_t>(x.scalar_type()), static_cast<int64_t>(x.suggest_memory_format()),
               static_cast<int64_t>(weight.suggest_memory_format()), residual, x.device().index()};
  for (const auto dims : {x.sizes(), weight.sizes(), stride, padding, dilation}) {
    key.insert(key.end(), dims.begin(), dims.end());
  }
  return key;
}

// A failure of the device itself (an illegal address, a device-side assert, a lost context) is the caller's to see:
// remembering the configuration as unfused and recomputing it generically would hide it behind the generic path's
// own error or, for a fault that does not stick, a result computed after it. torch 2.8 throws these as
// c10::AcceleratorError; older torch as a c10::Error from C10_CUDA_CHECK, whose message starts "CUDA error".
bool is_device_failure(const c10::Error& error) {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (dynamic_cast<const c10::AcceleratorError*>(&error) != nullptr) return true;
#endif
  const std::string& message = error.msg();
  return message.find("CUDA error") != std::string::npos ||
         message.find("CUDNN_STATUS_EXECUTION_FAILED") != std::string::npos;
}

std::mutex unfused_mutex;
std::set<FusedKey> unfused;  // bounded by the configurations a process runs; a few integers each

at::Tensor conv_bias_act_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  check_conv_bias_act_args(x, weight, bias, stride, padding, dilation);
  if (present(residual)) check_conv_residual(*residual, x, weight, stride, padding, dilation);
  if (!cudnn_fused_applies(x, weight, residual, stride, padding, dilation, relu)) {
    return conv_bias_act_generic(x, weight, bias, residual, stride, padding, dilation, relu);
  }
  const FusedKey key = fused_key(x, weight, present(residual), stride, padding, dilation);
  {
    const std::lock_guard<std::mutex> lock(unfused_mutex);
    if (unfused.count(key)) return conv_bias_act_generic(x, weight, bias, residual, stride, padding, dilation, relu);
  }
  const auto mf = x.suggest_memory_format();
  try {
    if (!present(residual)) {
      return at::cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, 1).contiguous(mf);
    }
    return at::cudnn_convolution_add_relu(x, weight, *residual, at::Scalar(1.0), bias, stride, padding, dilation, 1)
        .contiguous(mf);
  } catch (const c10::OutOfMemoryError&) {
    throw;  // the generic path would need the same memory
  } catch (const c10::Error& error) {
    if (is_device_failure(error)) throw;
    // No fused engine for this configuration (a host-side error: nothing was launched).
    const std::lock_guard<std::mutex> lock(unfused_mutex);
    unfused.insert(key);
  }
  return conv_bias_act_generic(x, weight, bias, residual, stride, padding, dilation, relu);
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, CPU, m) { m.impl("conv_bias_act", &conv_bias_act_cpu); }

#ifdef DEEPLAB_OPS_WITH_CUDA
TORCH_LIBRARY_IMPL(deeplab_ops, CUDA, m) { m.impl("conv_bias_act", &conv_bias_act_cuda); }
#endif

}  // namespace deeplab_ops
