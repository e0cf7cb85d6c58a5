// The cpu backend's eval convolution for NCHW float32 1x1 layers (stride 1, no padding): act(W x + bias
// [+ residual]) as one GEMM per image on the Winograd convolutions' GEMM kernel (cpu/gemm_cpu.h). In NCHW an image
// is already the (C_in x H*W) matrix the product needs and its output the (C_out x H*W) matrix the GEMM writes, so
// nothing is converted; oneDNN runs NCHW through its blocked layout and back (docs/kernels.md, "NCHW 1x1").
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace deeplab_ops {

// Whether nchw_pointwise_conv takes conv2d(x, weight, stride, padding) with this bias and residual: float32 CPU, x
// and the residual contiguous NCHW, a 1x1 weight whose (C_out, C_in) matrix is dense with C_out >= C_in, stride 1,
// no padding, the GEMM
// kernel multiplying in float32 (packed_gemm_is_float32) and an output of at least 2^18 values (below that ATen's
// convolution costs less per call than the packing).
bool nchw_pointwise_applies(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef stride,
                            at::IntArrayRef padding);

// act(conv2d(x, weight) + bias [+ residual]), act = ReLU or identity, NCHW out. Each image's x is packed into the
// GEMM's 32-column panels; each (row block, panel block) tile of the output gets its epilogue right after its
// product, while it is in cache. Profiler scope: deeplab_ops::pointwise_conv_nchw.
at::Tensor nchw_pointwise_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual, bool relu);

}  // namespace deeplab_ops
