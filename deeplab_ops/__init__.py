"""deeplab_ops: fused Triton and CUDA C++ kernels for DeepLabV3 that compute exactly what cuDNN conv + BN + ReLU do.

Public API:
    conv_bn_relu(...)        fused convolution + BatchNorm (+ residual) + ReLU, with autograd
    aspp(...)                fused ASPP (all branches, image pooling as a bias, projection), with autograd
    upsample_cross_entropy   cross-entropy of bilinearly upsampled logits, never materializing them
    nn.FusedConvBNReLU       drop-in for nn.Sequential(Conv2d, BatchNorm2d, ReLU), same state_dict
    available_backends(dev)  which backends can run on a device, and why the others cannot
    reference                the pure-PyTorch oracle of every op

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
