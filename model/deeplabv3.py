"""DeepLabV3 (Chen et al. 2017): ResNet backbone → ASPP head → logits bilinearly resized to the input size.

Factories :func:`deeplabv3_resnet50` and :func:`deeplabv3_resnet101` build the paper's configurations, or with
``preset="torchvision"`` exactly torchvision's deeplabv3_resnet50/101 (same module names, shapes and function).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence, Set

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from deeplab_ops.fusion import fuse_modules, fused_config
from model.aspp import ASPP, RATES_BY_OUTPUT_STRIDE, check_rates
from model.checks import INT32_MAX, check_int, check_ordered
from model.heads import HEADS, DeepLabHead, FCNHead
from model.resnet import DEPTHS, RESIDUAL_UNITS, ResNet, check_backbone_args

Tensor = torch.Tensor

PRESETS = (None, "torchvision")
DEFAULT_MULTI_GRID = (1, 2, 4)
# What preset="torchvision" fixes (torchvision.models.segmentation.deeplabv3_resnet50/101).
TORCHVISION_PRESET = {"output_stride": 8, "atrous_rates": (12, 24, 36), "head": "torchvision"}


@torch.fx.wrap  # traced (torch.fx, create_feature_extractor) as one call: the check runs on the traced module's input
def check_image_batch(x: Tensor, dtype: torch.dtype | None = None) -> None:
    """Refuse what is not a floating-point (N, C, H, W) batch of `dtype` (the model's: its stem weight's; autocast
    casts for itself), naming it (the first convolution checks C)."""
    if x.dim() != 4:
        raise ValueError(f"x must be an (N, C, H, W) image batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        # Unfused, PyTorch says only "expected scalar type Byte but found Float" for a uint8 image batch.
        raise TypeError(f"x must be a floating-point image batch (normalized, in the model's dtype), got dtype "
                        f"{x.dtype}: convert it first, e.g. x.float() / 255 before normalizing")
    if dtype is not None and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        # Unfused, PyTorch says only "expected scalar type Double but found Float".
        raise TypeError(f"x has dtype {x.dtype} but the model's weights have dtype {dtype}: convert one to the other "
                        f"(x.to({dtype}) or model.to({x.dtype})), or run under torch.autocast")


@torch.fx.wrap  # traced as one call, so that `upsample` stays an input of the traced module
def resize_logits(logits: Tensor, size, upsample: bool) -> Tensor:
    """`logits` bilinearly resized to `size` (align_corners=False, as torchvision), or as they are."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False) if upsample else logits


class DeepLabV3(nn.Module):
    """Backbone → classifier → bilinear resize to the input size; an optional auxiliary head on block 3.

    Returns ``{"out": logits}``, plus ``"aux"`` when built with an auxiliary classifier, as torchvision does.
    ``forward(x, upsample=False)`` returns the logits at the feature resolution instead (input / output stride),
    for a loss that upsamples on the fly (`deeplab_ops.upsample_cross_entropy`).
    Module names are torchvision's: ``backbone``, ``classifier``, ``aux_classifier``.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier
        self.config: dict = {}

    def forward(self, x: Tensor, upsample: bool = True) -> dict[str, Tensor]:
        if not isinstance(upsample, bool | torch.fx.Proxy):  # 'no' or None would resize (or not) by truthiness
            if not (isinstance(upsample, Tensor) and upsample.dtype == torch.bool and upsample.dim() == 0
                    and (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())):
                raise TypeError(f"upsample must be a bool, got {upsample!r}")
            upsample = bool(upsample)  # (torch.onnx.export's TorchScript exporter passes the default as a tensor)
        first = next(self.parameters(), None)  # the stem's weight: O(1), where a walk to the first Conv2d passed
        check_image_batch(x, None if first is None else first.dtype)  # every fused module first
        if isinstance(x, torch.fx.Proxy) or (self.training and x.shape[0] == 1):  # traced: the check is recorded
            self._check_batch(x)
        size = x.shape[-2:]
        features = self.backbone(x)
        result: OrderedDict[str, Tensor] = OrderedDict()
        result["out"] = resize_logits(self.classifier(features["out"]), size, upsample)
        if self.aux_classifier is not None:
            result["aux"] = resize_logits(self.aux_classifier(features["aux"]), size, upsample)
        return result

    def _check_batch(self, x: Tensor) -> None:
        """Refuse a batch the classifier's ASPP refuses (batch 1 with its image-pooling BatchNorm training) before
        the backbone runs: its BatchNorms would otherwise have updated their running statistics and batch counters
        for a call that fails, a change a caller that catches the error and skips the batch does not expect."""
        for module in self.classifier.modules():
            if isinstance(module, ASPP):
                cfg = fused_config(module)
                if cfg is None or cfg.process_group is None:  # a synchronized fused ASPP pools every process's batch
                    module.check_batch(x)


def _as_int_if_integral(value):
    """An integral number (int, numpy integer) as an int; anything else (None, 8.0, "16", True) unchanged, for the
    checks to refuse by name."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _ints_if_integral(values):
    """A sequence of integral numbers as a tuple of ints; anything else unchanged, for the checks to refuse."""
    if values is None or isinstance(values, str | bytes):
        return values
    if isinstance(values, Set | Mapping):
        return values  # unordered: refused by _check_ordered
    try:
        items = tuple(values)
    except TypeError:
        return values
    if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
        return tuple(int(v) for v in items)
    return values


def _check_preset_args(**given) -> None:
    """preset="torchvision" fixes these arguments: each must be left unset (None) or equal the preset's value."""
    fixed = {**TORCHVISION_PRESET, "residual_unit": "v1.5"}
    for name, value in given.items():
        if isinstance(value, list):
            value = tuple(value)
        if value is not None and name == "multi_grid":
            # torchvision's ResNet has no multi-grid: its layer4 blocks run dilations 2, 4, 4 at output stride 8. Even
            # preset=None's default (1, 2, 4), given explicitly, would be silently replaced: refused like the others.
            raise ValueError(
                f"preset='torchvision' takes no multi_grid (torchvision's ResNet has none: its layer4 blocks run "
                f"dilations 2, 4, 4), got multi_grid={value!r}: leave multi_grid unset or use preset=None"
            )
        if value is not None and value != fixed[name]:
            raise ValueError(
                f"preset='torchvision' fixes {name}={fixed[name]!r} (torchvision's deeplabv3), got {name}={value!r}: "
                f"leave {name} unset or use preset=None"
            )


def deeplabv3_resnet(
    depth: int,
    *,
    num_classes: int = 21,
    output_stride: int | None = None,
    multi_grid: Sequence[int] | None = None,
    atrous_rates: Sequence[int] | None = None,
    head: str | None = None,
    aux_loss: bool = False,
    fused: bool = False,
    preset: str | None = None,
    residual_unit: str | None = None,
    memory_efficient: bool = False,
    width: int = 64,
) -> DeepLabV3:
    """Build DeepLabV3 on a ResNet-`depth` backbone; see :func:`deeplabv3_resnet50` for the arguments.

    width: the backbone's base width (64: ResNet-50/101's); the ASPP and head get 4 x width channels (256 at 64).
    A smaller width gives a small network for CPU runs (train.py's synthetic default).
    """
    depth = _as_int_if_integral(depth)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth not in DEPTHS:  # 50.0 made "resnet50.0"
        raise ValueError(f"depth must be one of {tuple(DEPTHS)}, got {depth!r}")
    num_classes = check_int(num_classes, "num_classes")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if residual_unit is not None and residual_unit not in RESIDUAL_UNITS:
        raise ValueError(f"residual_unit must be one of {RESIDUAL_UNITS}, got {residual_unit!r}")
    if not isinstance(aux_loss, bool):
        raise TypeError(f"aux_loss must be a bool, got {aux_loss!r}")
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be a bool, got {fused!r}")
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient must be a bool, got {memory_efficient!r}")
    if memory_efficient and not fused:
        raise ValueError("memory_efficient=True needs fused=True: it is a mode of the fused ops")
    pattern = "paper"
    width = check_int(width, "width", maximum=INT32_MAX // 32, why="layer4 has 32 x width channels, a 32-bit int")
    # 8.0 passed `output_stride in (8, 16)` and was kept as a float (config, checkpoints); numpy ints were refused
    # in multi_grid / atrous_rates. Integral values become ints; the rest is refused below, by name.
    output_stride = _as_int_if_integral(output_stride)
    check_ordered(multi_grid, "multi_grid")
    check_ordered(atrous_rates, "atrous_rates")
    multi_grid, atrous_rates = _ints_if_integral(multi_grid), _ints_if_integral(atrous_rates)
    if preset == "torchvision" and depth not in (50, 101):
        raise ValueError(f"preset='torchvision' is torchvision's deeplabv3_resnet50/101: depth must be 50 or 101, got "
                         f"depth={depth}")
    if preset == "torchvision" and width != 64:
        raise ValueError(f"preset='torchvision' fixes width=64 (torchvision's ResNet), got width={width}")
    if preset == "torchvision":
        _check_preset_args(output_stride=output_stride, multi_grid=multi_grid, atrous_rates=atrous_rates, head=head,
                           residual_unit=residual_unit)
        output_stride, atrous_rates, head = (TORCHVISION_PRESET[k] for k in ("output_stride", "atrous_rates", "head"))
        multi_grid, pattern = DEFAULT_MULTI_GRID, "torchvision"
    # Unset (None): the defaults of preset=None.
    output_stride = 16 if output_stride is None else output_stride
    multi_grid = DEFAULT_MULTI_GRID if multi_grid is None else multi_grid
    head = "paper" if head is None else head
    residual_unit = "v1.5" if residual_unit is None else residual_unit
    check_backbone_args(DEPTHS[depth], output_stride, multi_grid, pattern)
    rates = RATES_BY_OUTPUT_STRIDE[output_stride] if atrous_rates is None else check_rates(atrous_rates)

    backbone = ResNet(
        depth, output_stride=output_stride, multi_grid=multi_grid, residual_unit=residual_unit,
        dilation_pattern=pattern, return_aux=aux_loss, width=width,
    )
    classifier = DeepLabHead(backbone.out_channels, num_classes, rates, style=head, channels=4 * width)
    aux_classifier = FCNHead(backbone.aux_channels, num_classes) if aux_loss else None
    model = DeepLabV3(backbone, classifier, aux_classifier)
    model.config = {
        "backbone": f"resnet{depth}", "num_classes": num_classes, "output_stride": output_stride,
        "multi_grid": tuple(multi_grid) if pattern == "paper" else None, "atrous_rates": rates, "head": head,
        "aux_loss": aux_loss, "preset": preset, "residual_unit": residual_unit, "width": width,
        "stage_dilations": backbone.stage_dilations,
    }
    if fused:
        fuse_modules(model, memory_efficient=memory_efficient)
    return model


def deeplabv3_resnet50(
    num_classes: int = 21,
    output_stride: int | None = None,
    multi_grid: Sequence[int] | None = None,
    atrous_rates: Sequence[int] | None = None,
    head: str | None = None,
    aux_loss: bool = False,
    fused: bool = False,
    *,
    preset: str | None = None,
    residual_unit: str | None = None,
    memory_efficient: bool = False,
    width: int = 64,
) -> DeepLabV3:
    """DeepLabV3 with a ResNet-50 backbone.

    Args:
        num_classes: logits channels (>= 1); 21 for PASCAL VOC.
        output_stride: 16 or 8 (input size / feature size); strides beyond it become dilation. None: 16.
        multi_grid: block-4 rate multipliers, one per unit: block-4 dilations = base rate × multi_grid. None:
            (1, 2, 4).
        atrous_rates: ASPP rates; None: (6, 12, 18) at output stride 16, (12, 24, 36) at 8.
        head: "paper" (ASPP → 1×1 logits) or "torchvision" (ASPP with dropout → 3×3 conv-BN-ReLU → 1×1 logits).
            None: "paper".
        aux_loss: add torchvision's auxiliary FCN head on block 3; the forward then returns "out" and "aux".
        fused: run every conv → BN (→ add) → ReLU on deeplab_ops ops (same state_dict as unfused).
        preset: "torchvision" reproduces torchvision's deeplabv3_resnet50 exactly (output stride 8 with its
            dilation pattern, rates (12, 24, 36), its head); output_stride, multi_grid, atrous_rates, head and
            residual_unit must then be left unset (None) or equal the preset's values (a ValueError otherwise,
            never a value silently replaced).
        residual_unit: "v1.5" (torchvision's bottleneck) or "preact" (full pre-activation unit). None: "v1.5".
        memory_efficient: with fused=True, the fused ops save no pre-BN activations for the backward (see
            deeplab_ops.conv_bn_relu's memory_efficient).
        width: the backbone's base width (64, ResNet-50's); ASPP and head get 4 x width channels.

    Returns:
        The model, in training mode, with torchvision's initialisation of the backbone.
    """
    return deeplabv3_resnet(
        50, num_classes=num_classes, output_stride=output_stride, multi_grid=multi_grid, atrous_rates=atrous_rates,
        head=head, aux_loss=aux_loss, fused=fused, preset=preset, residual_unit=residual_unit,
        memory_efficient=memory_efficient, width=width,
    )


def deeplabv3_resnet101(
    num_classes: int = 21,
    output_stride: int | None = None,
    multi_grid: Sequence[int] | None = None,
    atrous_rates: Sequence[int] | None = None,
    head: str | None = None,
    aux_loss: bool = False,
    fused: bool = False,
    *,
    preset: str | None = None,
    residual_unit: str | None = None,
    memory_efficient: bool = False,
    width: int = 64,
) -> DeepLabV3:
    """DeepLabV3 with a ResNet-101 backbone; arguments as :func:`deeplabv3_resnet50`."""
    return deeplabv3_resnet(
        101, num_classes=num_classes, output_stride=output_stride, multi_grid=multi_grid, atrous_rates=atrous_rates,
        head=head, aux_loss=aux_loss, fused=fused, preset=preset, residual_unit=residual_unit,
        memory_efficient=memory_efficient, width=width,
    )
