// Winograd convolution for the cpu backend: float32 3x3 convolutions with stride 1 (any padding and dilation) as
// F(4x4, 3x3), F(3x3, 3x3) or F(2x2, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016),
// with the eval epilogue (bias, residual, ReLU) fused into the output transform. A dilated convolution is d_h * d_w
// undilated ones on the output's polyphase grids, so the tiles of each grid are gathered with the dilation's step.
// The multiplications are GEMMs per block of tiles on the extension's own kernel (cpu/gemm_cpu.h), (m + 2)^2
// products of [tiles x C_in] by [C_in x C_out], against 9 * m^2 as many for direct convolution: 4x fewer for F(4x4,
// 3x3), 3.24x for F(3x3, 3x3), 2.25x for F(2x2, 3x3). Stride 2 (dilation 1) splits each axis into its even inputs,
// an F(4, 2) with the kernel's outer taps, and its odd ones, which multiply the centre tap: 81 products per 4 x 4
// output tile against 144; an output of 4t + 1 rows or columns has its last one computed directly (at most 9
// products per pixel), not by a row of tiles. The tile size is the one that computes the fewest products over the
// map's tiles: a grid of 9 x 9 pixels (a 33 x 33 map at dilation 4) is 9 tiles of F(3x3) but would be 9 tiles of
// F(4x4) with a padded row and column. Where every grid is at most 3 pixels along each axis (a map at most three
// dilations across, padding == dilation: the ASPP's rate 18 on a 33 x 33 map), "short grids" compute each grid
// whole with the minimal algorithm for its length: 3 products per 2 pixels along an axis (a 2 x 2 Toeplitz
// product, where direct convolution does 4), F(3, 3) on 3-pixel grids, the centre tap on 1-pixel ones.
//
// Inference only (no gradient computed): its rounding, about ten times oneDNN's, is amplified in a training step's
// gradients (docs/kernels.md). Used where the tile count makes it cheaper than oneDNN's direct convolution
// (winograd_plan); elsewhere, and for every other dtype, ATen's convolution runs. DEEPLAB_OPS_CPU_WINOGRAD=0 turns
// it off (read per call).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace deeplab_ops {

// The output tile size m (4, 3 or 2) that winograd_conv3x3 would use for this convolution, 1 for short grids, -4 for
// stride-2 4 x 4 tiles, or 0 where ATen's convolution should run: not a float32 CPU 3x3 convolution with groups 1
// and stride 1 (or 2 without dilation), too few channels for the GEMMs to pay, or tiles so sparse on the dilated
// grids that the transforms cost more than they save.
int winograd_plan(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation);

// act(conv2d(x, weight, bias, stride=1, padding, dilation) [+ residual]) with output tile size m, or short grids
// for m = 1, or stride 2 (dilation 1) for m = -4 (winograd_plan's answer), written in out_format. x, weight: float32 CPU, weight [C_out, C_in, 3, 3];
// bias [C_out] or none; residual the output's shape or none. The transformed weight is kept for the next call with this weight tensor
// in its current state (same tensor, storage, shape and version counter) if the weight was registered with
// winograd_cache_allow, as the eval path registers the folded weights it caches (deeplab_ops.common.derived's
// tensors, under the same rule: writes through `.data` are not seen; clear_derived() clears this cache too).
at::Tensor winograd_conv3x3(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& residual, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool relu, int m, at::MemoryFormat out_format);

// `weight` in channels_last: itself where it is; where may_keep (a call with no gradient: a training step reads its
// weight itself, since a write through `.data` bumps no version counter), the copy kept in the transformed-weight
// cache for a registered weight (winograd_cache_allow, same rule); a fresh copy otherwise.
at::Tensor channels_last_weight(const at::Tensor& weight, bool may_keep);

// Whether channels_last_weight(weight, true) keeps `weight`'s copy (a registered weight).
bool channels_last_weight_kept(const at::Tensor& weight);

// The transformed-weight cache (ops winograd_cache_allow, winograd_cache_info, winograd_cache_clear): registering a
// weight whose transforms may be kept (held weakly), {entries, bytes, hits, misses}, and emptying it.
void winograd_cache_allow(const at::Tensor& weight);
std::vector<int64_t> winograd_cache_info();
void winograd_cache_clear();
// Forgets these weights: their kept transforms and their registration (deeplab_ops.common.release_derived, before a
// module's tensors are converted or loaded); and the transforms of weights whose storage has been freed (as the plan
// of every float32 3x3 convolution without gradient does). The cache holds no reference on a weight tensor, weak or
// strong (torch.utils.swap_tensors refuses a tensor with a weak reference): its storage, weakly.
void winograd_cache_release(at::TensorList weights);

}  // namespace deeplab_ops
