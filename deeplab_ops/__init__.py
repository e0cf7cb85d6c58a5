"""deeplab_ops: fused Triton and C++/CUDA ops for DeepLabV3 with exact BatchNorm semantics: conv_bn_relu, aspp,
upsample_cross_entropy, the deeplab_ops.nn modules, available_backends and the reference oracle (docs/ops.md).
Importing compiles nothing and touches no GPU.
"""

# ruff: noqa: I001  (order matters: load _C, then the modules that register kernels for its ops)
from deeplab_ops import _extension

# Raises an ImportError that says how to rebuild when _C is missing or stale; only `python -m deeplab_ops` goes on
# without it, to report why.
if _extension.load_for_package():
    from deeplab_ops.ops import bn_stages as _bn_stages  # noqa: F401  (fake kernels of the stage ops)
    from deeplab_ops.ops.conv_bn_relu import conv_bn_relu
    from deeplab_ops.ops.aspp import aspp
    from deeplab_ops.ops.upsample_ce import upsample_cross_entropy
    from deeplab_ops.backends import BACKENDS, auto_backend, available_backends
    from deeplab_ops import reference
    from deeplab_ops import triton as _triton  # noqa: F401  (registers the triton kernels; imports no triton)
    from deeplab_ops import nn

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "aspp", "auto_backend", "available_backends", "conv_bn_relu", "nn", "reference",
    "upsample_cross_entropy", "__version__",
]
