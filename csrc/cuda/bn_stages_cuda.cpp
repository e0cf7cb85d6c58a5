// Registers the CUDA BatchNorm stage kernels. deeplab_ops._extension.cuda_kernels_compiled() checks for the
// CUDA bn_apply kernel: this file is compiled only in the CUDA build.
#include <torch/library.h>

#include "cuda/bn_stages_cuda.h"

namespace deeplab_ops {

TORCH_LIBRARY_IMPL(deeplab_ops, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_apply", &bn_apply_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_dy", &bn_backward_dy_cuda);
}

}  // namespace deeplab_ops
