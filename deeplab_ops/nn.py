"""The public nn namespace: fused modules, and fusion of whole models (one place each: modules.py, fusion.py)."""

from deeplab_ops.fusion import fuse_modules, fused_config, is_fused, sync_batchnorm, unfuse_modules
from deeplab_ops.modules import (
    FusedASPP,
    FusedConvBNReLU,
    aspp_parts,
    bn_call_args,
    bn_step,
    check_fusable,
    fused_aspp_forward,
    fused_conv_bn,
    pack_batchnorms,
    unpack_batchnorms,
)

__all__ = [
    "FusedASPP", "FusedConvBNReLU", "aspp_parts", "bn_call_args", "bn_step", "check_fusable", "fuse_modules",
    "fused_aspp_forward", "fused_config", "fused_conv_bn", "is_fused", "pack_batchnorms", "sync_batchnorm",
    "unfuse_modules", "unpack_batchnorms",
]
