// The one autograd of conv_bn_relu: the Autograd kernel of conv_bn_relu_forward (the cpu and cuda composites) and of
// its twin triton_conv_bn_relu_forward (the Triton kernels, registered from Python). A network calls this op once
// per convolution layer, so its graph node is C++: the Python autograd.Function it replaces cost ~35 us of host time
// per layer forward and ~50 us per backward (apply, ctx bookkeeping, argument boxing), as much as a small layer's
// kernels. The aspp and upsample_cross_entropy ops, called once per step, keep theirs in Python (deeplab_ops/ops/).
//
// What the backward needs besides grad_out: x, weight, bn_weight, the output z (with the ReLU, for its mask), the
// statistics, and the pre-BN conv output y. The saving policy decides where y comes from:
//   saved      (memory_efficient=false) y is saved by the forward.
//   recompute  (memory_efficient=true)  nothing activation-sized beyond x and z is kept; when the backward reads y
//              (training BatchNorm: dy = k*(g - a - xhat*b) needs xhat everywhere; eval BatchNorm with a bn_weight
//              gradient: dgamma = sum g*xhat) it is recomputed by the twin's own convolution (conv_bias_act), exact
//              and with no host synchronization; otherwise (eval/frozen BatchNorm, no bn_weight gradient:
//              dy = gamma*invstd*g) nothing is recomputed and z stands in for y, which is then not read.
// The backward op runs past the Autograd key, except while a graph of the gradient is built (create_graph=True):
// then it goes through its own Autograd kernel (deeplab_ops/ops/dispatch.py), which refuses double backward.
//
// conv_bn_relu_eval (eval's output alone, for dtypes whose BatchNorm is not folded) has no backward: the front door
// calls it only with nothing to differentiate. Its Autograd kernel refuses an input that needs a gradient (autograd's
// fallback would only warn and leave the gradients None) and forward-mode tangents, then runs the op.
//
// Running statistics: when it builds a node, the forward writes the op's updated running statistics into the caller's
// running_mean / running_var itself, before anything is saved for the backward (the front door writes them only for a
// call that built no node: the output does not require grad). As eager BatchNorm updates them inside its op, before
// autograd saves its tensors: torch.utils.checkpoint(use_reentrant=False) stops its recomputation inside the packing
// of a region's last saved tensor, which would otherwise skip the update of the region's last fused layer.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

namespace deeplab_ops {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using ForwardSig = ForwardOutputs(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                                  const OptTensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, double,
                                  double, const OptTensor&, bool, std::optional<c10::string_view>, bool);
using BackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, bool, std::array<bool, 5>,
    std::optional<c10::string_view>);
using ConvSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, at::IntArrayRef,
                       at::IntArrayRef, at::IntArrayRef, bool);
using EvalSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&, const Tensor&,
                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, double, const OptTensor&, bool);

// The ops of one twin: "" (cpu, cuda) or "triton_".
struct TwinOps {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
  c10::TypedOperatorHandle<ConvSig> conv;
};

enum Twin : int64_t { kComposite = 0, kTriton = 1 };

TwinOps find_twin(const std::string& prefix) {
  auto& d = c10::Dispatcher::singleton();
  return {d.findSchemaOrThrow(("deeplab_ops::" + prefix + "conv_bn_relu_forward").c_str(), "").typed<ForwardSig>(),
          d.findSchemaOrThrow(("deeplab_ops::" + prefix + "conv_bn_relu_backward").c_str(), "").typed<BackwardSig>(),
          d.findSchemaOrThrow(("deeplab_ops::" + prefix + "conv_bias_act").c_str(), "").typed<ConvSig>()};
}

const TwinOps& twin_ops(int64_t twin) {
  static const std::array<TwinOps, 2> ops{find_twin(""), find_twin("triton_")};
  return ops[twin];
}

// The non-tensor arguments, as the forward receives them.
struct Config {
  int64_t twin;
  at::IntArrayRef stride, padding, dilation;
  bool training;
  double momentum, eps;
  bool relu;
  std::optional<c10::string_view> group_name;
  bool memory_efficient;
  // Where forward puts the op's six results. Only `out` is the node's output: the other five are not
  // differentiable, and a node with outputs marked non-differentiable cannot run under compiled autograd.
  ForwardOutputs* result;
};

bool needs_grad(const Tensor& t) { return t.requires_grad(); }
bool needs_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }
bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

// saved_data keys.
constexpr const char* kTwin = "twin";
constexpr const char* kGeometry = "geometry";  // stride, padding, dilation: 6 ints
constexpr const char* kFlags = "flags";        // training | relu << 1 | memory_efficient << 2
constexpr const char* kGroup = "group_name";   // only when given
constexpr const char* kEdges = "edges";        // input edge of x, weight, bn_weight, bn_bias, residual (-1: none)
constexpr const char* kDtypes = "dtypes";      // bn_weight's and bn_bias's dtypes (-1: none)

struct ConvBNReLUFunction : public torch::autograd::Function<ConvBNReLUFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bn_weight,
                               const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
                               const OptTensor& residual, const Config& c) {
    ForwardOutputs& r = *c.result;
    // Statistics made under torch.inference_mode() cannot be updated by a call that records a graph (eager
    // BatchNorm refuses them too, changing nothing): refused before anything runs. The copies below would write
    // running_mean, then fail on its version counter, leaving running_var as it was.
    TORCH_CHECK(!(c.training && given(running_mean) &&
                  (running_mean->is_inference() || (given(running_var) && running_var->is_inference()))),
                "deeplab_ops: running_mean and running_var are inference tensors (made under torch.inference_mode()): "
                "a training forward that records a graph cannot update them (eager BatchNorm refuses them too); "
                "clone them outside inference mode (bn.running_mean = bn.running_mean.clone(), and running_var), or "
                "run the update under torch.no_grad()");
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      r = twin_ops(c.twin).forward.call(x, weight, bn_weight, bn_bias, running_mean, running_var, c.stride, c.padding,
                                        c.dilation, c.training, c.momentum, c.eps, residual, c.relu, c.group_name,
                                        c.memory_efficient);
    }
    const auto& [out, conv_out, mean, invstd, new_rm, new_rv] = r;
    if (c.training && given(running_mean) && new_rm.defined()) {
      // Above ADInplaceOrView: the writes bump the statistics' version counters (the eval fold's cache reads them).
      at::AutoDispatchBelowAutograd no_autograd;
      running_mean->copy_(new_rm);
      running_var->copy_(new_rv);
    }
    // The output only with the ReLU, whose mask the backward reads: without it BatchNorm's backward needs its
    // input, not its output, so the caller may write the output in place (an in-place ReLU6, `+=`), as after
    // eager BatchNorm.
    ctx->save_for_backward({x, weight, bn_weight.value_or(Tensor()), c.memory_efficient ? Tensor() : conv_out,
                            c.relu ? out : Tensor(), mean, invstd});
    // The inputs' edges count only the tensors given (apply skips a None): x, weight, then the optional ones in
    // argument order (running_mean and running_var take edges too).
    int64_t next = 2;
    const int64_t bn_weight_edge = given(bn_weight) ? next++ : -1;
    const int64_t bn_bias_edge = given(bn_bias) ? next++ : -1;
    next += static_cast<int64_t>(given(running_mean)) + static_cast<int64_t>(given(running_var));
    const int64_t residual_edge = given(residual) ? next : -1;
    ctx->saved_data[kTwin] = c.twin;
    ctx->saved_data[kGeometry] = std::vector<int64_t>{c.stride[0], c.stride[1], c.padding[0], c.padding[1],
                                                      c.dilation[0], c.dilation[1]};
    ctx->saved_data[kFlags] = static_cast<int64_t>(c.training) | static_cast<int64_t>(c.relu) << 1 |
                              static_cast<int64_t>(c.memory_efficient) << 2;
    if (c.group_name.has_value()) ctx->saved_data[kGroup] = std::string(*c.group_name);
    ctx->saved_data[kEdges] = std::vector<int64_t>{0, 1, bn_weight_edge, bn_bias_edge, residual_edge};
    ctx->saved_data[kDtypes] = std::vector<int64_t>{
        given(bn_weight) ? static_cast<int64_t>(bn_weight->scalar_type()) : -1,
        given(bn_bias) ? static_cast<int64_t>(bn_bias->scalar_type()) : -1};
    return {out};
  }

  // One gradient per forward argument: x, weight, bn_weight, bn_bias, running_mean, running_var, residual, config.
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(8);
    Tensor grad_out = grad_outputs[0];
    const auto edges = ctx->saved_data.at(kEdges).toIntVector();
    std::array<bool, 5> mask{};  // x, weight, bn_weight, bn_bias, residual
    bool any = false;
    for (size_t i = 0; i < mask.size(); ++i) {
      mask[i] = edges[i] >= 0 && ctx->needs_input_grad(static_cast<size_t>(edges[i]));
      any = any || mask[i];
    }
    if (!any) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& weight = saved[1];
    const OptTensor bn_weight = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    Tensor conv_out = saved[3];
    Tensor out = saved[4];
    const auto& ops = twin_ops(ctx->saved_data.at(kTwin).toInt());
    const auto geometry = ctx->saved_data.at(kGeometry).toIntVector();
    const at::IntArrayRef stride(geometry.data(), 2), padding(geometry.data() + 2, 2), dilation(geometry.data() + 4, 2);
    const int64_t flags = ctx->saved_data.at(kFlags).toInt();
    const bool training = flags & 1, relu = flags & 2, memory_efficient = flags & 4;
    std::optional<std::string> group;
    if (const auto it = ctx->saved_data.find(kGroup); it != ctx->saved_data.end()) group = it->second.toStringRef();
    const std::optional<c10::string_view> group_name =
        group.has_value() ? std::optional<c10::string_view>(*group) : std::nullopt;
    // The Triton kernels read x channels_last: where x is not, the recompute and the weight gradient would each
    // convert it. Converted once here instead, and x's gradients go back in x's format (as the op returns them).
    Tensor x_in = x;
    const bool recompute = memory_efficient && (training || mask[2]);
    if (recompute && ctx->saved_data.at(kTwin).toInt() == kTriton && x.dim() == 4 &&
        !x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      x_in = x.contiguous(at::MemoryFormat::ChannelsLast);
    }
    if (recompute) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      conv_out = ops.conv.call(x_in, weight, std::nullopt, std::nullopt, stride, padding, dilation, false);
    } else if (memory_efficient) {
      // Not read: dy = gamma * invstd * g; a tensor of the output's shape and layout, which the backward takes its
      // memory format from. Without the ReLU that is the incoming gradient, in x's layout: converted once here (an
      // NCHW gradient of a channels_last layer made the backward run NCHW and sum in another order).
      if (!relu) grad_out = grad_out.contiguous(x.suggest_memory_format());
      conv_out = relu ? out : grad_out;
    }
    if (!relu) out = conv_out;  // not read without the ReLU (no mask): a tensor of the output's shape
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> r;
    if (at::GradMode::is_enabled()) {  // create_graph=True: the backward op's Autograd kernel refuses
      r = ops.backward.call(grad_out, x_in, weight, bn_weight, conv_out, out, saved[5], saved[6], stride, padding,
                            dilation, training, relu, mask, group_name);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      r = ops.backward.call(grad_out, x_in, weight, bn_weight, conv_out, out, saved[5], saved[6], stride, padding,
                            dilation, training, relu, mask, group_name);
    }
    auto& [gx, gw, gg, gb, gr] = r;
    if (!x_in.is_same(x)) {
      const auto x_format = x.suggest_memory_format();
      if (gx.defined()) gx = gx.contiguous(x_format);
      if (gr.defined()) gr = gr.contiguous(x_format);
    }
    // The BatchNorm gradients come in the statistics' dtype: each goes back in its parameter's.
    const auto dtypes = ctx->saved_data.at(kDtypes).toIntVector();
    if (gg.defined() && dtypes[0] >= 0 && gg.scalar_type() != static_cast<at::ScalarType>(dtypes[0])) {
      gg = gg.to(static_cast<at::ScalarType>(dtypes[0]));
    }
    if (gb.defined() && dtypes[1] >= 0 && gb.scalar_type() != static_cast<at::ScalarType>(dtypes[1])) {
      gb = gb.to(static_cast<at::ScalarType>(dtypes[1]));
    }
    grads[0] = gx;
    grads[1] = gw;
    grads[2] = gg;
    grads[3] = gb;
    grads[6] = gr;
    return grads;
  }
};

bool has_forward_grad(const Tensor& t) { return t._fw_grad(/*level=*/0).defined(); }
bool has_forward_grad(const OptTensor& t) { return given(t) && has_forward_grad(*t); }

// The Autograd kernel: a graph node when one is being built, else the op itself past the Autograd key.
template <int64_t kTwinIndex>
ForwardOutputs conv_bn_relu_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bn_weight,
                                     const OptTensor& bn_bias, const OptTensor& running_mean,
                                     const OptTensor& running_var, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool training, double momentum, double eps,
                                     const OptTensor& residual, bool relu, std::optional<c10::string_view> group_name,
                                     bool memory_efficient) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "deeplab_ops: stride, padding and dilation must have two values each, got ", stride, ", ", padding,
              " and ", dilation);
  // Forward-mode AD would otherwise pass through unseen (no node is built for tangents alone): refuse it.
  TORCH_CHECK(!(has_forward_grad(x) || has_forward_grad(weight) || has_forward_grad(bn_weight) ||
                has_forward_grad(bn_bias) || has_forward_grad(residual)),
              "deeplab_ops.conv_bn_relu does not support forward-mode AD (torch.autograd.forward_ad dual tensors, "
              "torch.func.jvp); use backend='reference' for it");
  if (at::GradMode::is_enabled() && (needs_grad(x) || needs_grad(weight) || needs_grad(bn_weight) ||
                                     needs_grad(bn_bias) || needs_grad(residual))) {
    ForwardOutputs r;
    const Config c{kTwinIndex, stride, padding, dilation, training, momentum, eps, relu, group_name,
                   memory_efficient, &r};
    std::get<0>(r) = ConvBNReLUFunction::apply(x, weight, bn_weight, bn_bias, running_mean, running_var, residual,
                                               c)[0];
    return r;
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return twin_ops(kTwinIndex).forward.call(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                                           dilation, training, momentum, eps, residual, relu, group_name,
                                           memory_efficient);
}

template <int64_t kTwinIndex>
Tensor conv_bn_relu_eval_autograd(const Tensor& x, const Tensor& weight, const OptTensor& bn_weight,
                                  const OptTensor& bn_bias, const Tensor& running_mean, const Tensor& running_var,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, double eps,
                                  const OptTensor& residual, bool relu) {
  const char* op = kTwinIndex == kTriton ? "deeplab_ops::triton_conv_bn_relu_eval" : "deeplab_ops::conv_bn_relu_eval";
  const std::pair<const char*, OptTensor> inputs[] = {{"x", x},           {"weight", weight},
                                                      {"bn_weight", bn_weight}, {"bn_bias", bn_bias},
                                                      {"running_mean", running_mean}, {"running_var", running_var},
                                                      {"residual", residual}};
  for (const auto& [name, t] : inputs) {
    TORCH_CHECK(!has_forward_grad(t), op, " does not support forward-mode AD (", name,
                " carries a tangent); call deeplab_ops.conv_bn_relu with backend='reference' for it");
    TORCH_CHECK(!(at::GradMode::is_enabled() && needs_grad(t)), op, " computes eval's output with nothing to ",
                "differentiate, but ", name, " requires grad; call deeplab_ops.conv_bn_relu(..., training=False), ",
                "which differentiates eval calls, or run this under torch.no_grad()");
  }
  static const auto eval = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(op, "")
                               .typed<EvalSig>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return eval.call(x, weight, bn_weight, bn_bias, running_mean, running_var, stride, padding, dilation, eps, residual,
                   relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(deeplab_ops, Autograd, m) {
  m.impl("conv_bn_relu_forward", &conv_bn_relu_autograd<kComposite>);
  m.impl("triton_conv_bn_relu_forward", &conv_bn_relu_autograd<kTriton>);
  m.impl("conv_bn_relu_eval", &conv_bn_relu_eval_autograd<kComposite>);
  m.impl("triton_conv_bn_relu_eval", &conv_bn_relu_eval_autograd<kTriton>);
}

}  // namespace deeplab_ops
