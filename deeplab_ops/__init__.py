"""deeplab_ops: fused Triton and C++/CUDA ops for DeepLabV3 with exact BatchNorm semantics: conv_bn_relu, aspp,
upsample_cross_entropy, the deeplab_ops.nn modules, available_backends and the reference oracle (docs/ops.md).
Importing compiles nothing and touches no GPU.
"""

# ruff: noqa: I001  (order matters: load _C, then the modules that register kernels for its ops)
from deeplab_ops import _extension

_extension.load()

from deeplab_ops.ops import bn_stages as _bn_stages  # noqa: E402,F401  (fake kernels of the stage ops)
from deeplab_ops.ops.conv_bn_relu import conv_bn_relu  # noqa: E402
from deeplab_ops.ops.aspp import aspp  # noqa: E402
from deeplab_ops.ops.upsample_ce import upsample_cross_entropy  # noqa: E402
from deeplab_ops.backends import BACKENDS, auto_backend, available_backends  # noqa: E402
from deeplab_ops import reference  # noqa: E402
from deeplab_ops import triton as _triton  # noqa: E402,F401  (registers the triton kernels; imports no triton)
from deeplab_ops import nn  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "aspp", "auto_backend", "available_backends", "conv_bn_relu", "nn", "reference",
    "upsample_cross_entropy", "__version__",
]
