"""ResNet-50/101 backbones for DeepLabV3: v1.5 bottleneck or full pre-activation unit, strides traded for dilation.

The v1.5 backbone has torchvision's module names (``conv1, bn1, relu, maxpool, layer1 … layer4``, blocks with
``conv1 … bn3, relu, downsample``), so torchvision's ImageNet resnet50/101 state_dicts (less ``fc.*``) load into
it and torchvision's deeplabv3 checkpoints into ``backbone.*``.

Output stride (Chen et al. 2017, sec. 3.1): the stage whose stride would take the feature map past the output
stride keeps stride 1 and dilates its 3×3 convs instead, doubling the rate each time; block 4 (layer4) uses
``base rate × multi_grid[i]`` for its i-th unit (multi-grid, sec. 3.2): at output stride 16, (1, 2, 4) gives
rates (2, 4, 8). torchvision's pattern differs: the first unit of a dilated stage keeps the previous stage's
rate, and there is no multi-grid (deeplabv3_resnet50: layer3 (1, 2, 2, …), layer4 (2, 4, 4)).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from model.checks import INT32_MAX

Tensor = torch.Tensor

# 50 and 101 as in the paper and torchvision; 29 (two units per stage, three in block 4 for the multi-grid
# (1, 2, 4)) is a small network for CPU runs.
DEPTHS: dict[int, tuple[int, int, int, int]] = {29: (2, 2, 2, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
OUTPUT_STRIDES = (8, 16)
RESIDUAL_UNITS = ("v1.5", "preact")
DILATION_PATTERNS = ("paper", "torchvision")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    """3×3 convolution whose padding equals its dilation (output size = input size / stride)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1×1 convolution."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision's): 1×1 → 3×3 (stride, dilation) → 1×1 ×4, each conv → BN, then
    ``relu(bn3(conv3(·)) + shortcut)``. Attribute names are torchvision's, so its checkpoints load."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class PreActBottleneck(nn.Module):
    """Full pre-activation bottleneck (He et al. 2016, "Identity Mappings"; TF-slim's resnet_v2 unit).

    ``pre = relu(bn(x))``; ``out = conv3(relu(bn2(conv2(relu(bn1(conv1(pre)))))))``; returns ``out + shortcut``
    with ``shortcut = x``, or a 1×1 projection of ``pre`` when the shape changes. As in TF-slim, the last conv and
    the projection have a bias and no BatchNorm. Unlike TF-slim (stride in a stage's last unit), the stride sits
    on the first unit's 3×3 conv, as in the v1.5 layout. The conv-BN-ReLU pairs live in the ``residual``
    Sequential, which deeplab_ops fusion recognises; the pre-activation and the add stay unfused.
    """

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.preact = nn.Sequential(OrderedDict(bn=nn.BatchNorm2d(in_channels), relu=nn.ReLU(inplace=True)))
        self.residual = nn.Sequential(
            OrderedDict(
                conv1=conv1x1(in_channels, width),
                bn1=nn.BatchNorm2d(width),
                relu1=nn.ReLU(inplace=True),
                conv2=conv3x3(width, width, stride, dilation),
                bn2=nn.BatchNorm2d(width),
                relu2=nn.ReLU(inplace=True),
                conv3=conv1x1(width, out_channels, bias=True),
            )
        )
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = conv1x1(in_channels, out_channels, stride, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.preact(x)
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        return self.residual(pre) + shortcut


def stage_dilations(
    depths: Sequence[int], output_stride: int, multi_grid: Sequence[int], pattern: str = "paper"
) -> list[tuple[int, tuple[int, ...]]]:
    """(stride, per-unit dilations) of layer1 … layer4 for an output stride.

    The stem (stride-2 conv and max pool) brings the stride to 4; layer1 keeps it; each later stage either
    strides by 2 or, once the output stride is reached, dilates by 2 more. `pattern` "paper" dilates every unit
    of a dilated stage and multiplies layer4's rates by `multi_grid`; "torchvision" gives a dilated stage's first
    unit the previous rate and ignores `multi_grid`.
    """
    check_backbone_args(depths, output_stride, multi_grid, pattern)
    # (numpy integers taken as ints, as model/checks.py's checks take them: plain ints in the stages)
    depths, output_stride, multi_grid = tuple(map(int, depths)), int(output_stride), tuple(map(int, multi_grid))
    stages = [(1, (1,) * depths[0])]
    current_stride, rate = 4, 1
    for n in depths[1:]:
        if current_stride * 2 <= output_stride:
            current_stride *= 2
            stages.append((2, (1,) * n))
            continue
        previous, rate = rate, rate * 2
        first = previous if pattern == "torchvision" else rate
        stages.append((1, (first,) + (rate,) * (n - 1)))
    if pattern == "paper":
        stride4, rates4 = stages[3]
        stages[3] = (stride4, tuple(r * m for r, m in zip(rates4, multi_grid, strict=True)))
    return stages


def check_backbone_args(depths: Sequence[int], output_stride: int, multi_grid: Sequence[int], pattern: str) -> None:
    """Raise a ValueError naming the argument for a configuration the backbone cannot build."""
    def integral(n) -> bool:  # an int or a numpy integer, not a bool (nor 8.0: a float was kept as one)
        return isinstance(n, numbers.Integral) and not isinstance(n, bool)

    if len(depths) != 4 or any(not integral(n) or n < 1 for n in depths):
        raise ValueError(f"depths must be 4 positive ints (units per stage), got {tuple(depths)!r}")
    # 8.0 == 8, but a float stride was kept as one (config, checkpoints): ints only, as for num_classes and width.
    if not integral(output_stride) or output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be one of {OUTPUT_STRIDES} (DeepLabV3 trades layer4's, or layer3's and layer4's, "
            f"strides for dilation), got {output_stride!r}"
        )
    if pattern not in DILATION_PATTERNS:
        raise ValueError(f"dilation pattern must be one of {DILATION_PATTERNS}, got {pattern!r}")
    try:
        if isinstance(multi_grid, str | bytes):  # '124' iterated as ('1', '2', '4'), named so in the error
            raise TypeError
        grid = tuple(multi_grid)
    except TypeError:
        raise ValueError(f"multi_grid must be a sequence of positive ints, got {multi_grid!r}") from None
    if len(grid) != depths[3]:
        raise ValueError(
            f"multi_grid must have one rate per unit of block 4 ({depths[3]} units), got {grid!r} "
            f"(length {len(grid)}); the paper's default is (1, 2, 4)"
        )
    if any(not integral(m) or m < 1 for m in grid):
        raise ValueError(f"multi_grid must be positive ints, got {grid!r}")
    base = 32 // output_stride  # layer4's rate before multi_grid
    if max(grid) * base > INT32_MAX:
        raise ValueError(f"multi_grid must keep block 4's dilations ({base} x multi_grid at output stride "
                         f"{output_stride}) within 32 bits (<= 2**31 - 1: cuDNN and the kernels take them as ints), "
                         f"got {grid!r}")


class ResNet(nn.Sequential):
    """ResNet backbone as an ordered chain of named stages that returns a dict of features.

    v1.5: ``conv1 (7×7, stride 2) → bn1 → relu → maxpool → layer1 … layer4`` (torchvision's names).
    preact (TF-slim resnet_v2): ``conv1 (7×7, stride 2, bias) → maxpool → layer1 … layer4 → postnorm (BN, ReLU)``.

    `forward` runs the children in order and returns ``{"out": last stage, "aux": layer3}`` ("aux" only with
    `return_aux`), as torchvision's IntermediateLayerGetter does: `deeplab_ops_chain` tells deeplab_ops's
    fuse_modules so, and it fuses the stem.

    Args:
        depth: 50 or 101.
        output_stride: 8 or 16.
        multi_grid: layer4's per-unit rate multipliers (pattern "paper"), one per unit.
        residual_unit: "v1.5" (Bottleneck) or "preact" (PreActBottleneck).
        dilation_pattern: "paper" or "torchvision" (see :func:`stage_dilations`).
        return_aux: also return layer3's output as "aux".
        width: channels of the stem and of block 1's bottleneck (64 in ResNet-50/101; each block doubles it,
            and a bottleneck's output is 4x its width); smaller widths make small networks for CPU runs.
    """

    deeplab_ops_chain = "return_layers"  # deeplab_ops.fusion: the forward is IntermediateLayerGetter's

    def __init__(
        self,
        depth: int = 50,
        *,
        output_stride: int = 16,
        multi_grid: Sequence[int] = (1, 2, 4),
        residual_unit: str = "v1.5",
        dilation_pattern: str = "paper",
        return_aux: bool = False,
        width: int = 64,
    ) -> None:
        # 50.0 == 50 would build a ResNet-50 whose depth reads 50.0 (the factory refuses it too): ints only
        if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth not in DEPTHS:
            raise ValueError(f"depth must be one of {tuple(DEPTHS)}, got {depth!r}")
        depth = int(depth)
        if residual_unit not in RESIDUAL_UNITS:
            raise ValueError(f"residual_unit must be one of {RESIDUAL_UNITS}, got {residual_unit!r}")
        depths = DEPTHS[depth]
        stages = stage_dilations(depths, output_stride, multi_grid, dilation_pattern)
        preact = residual_unit == "preact"
        block = PreActBottleneck if preact else Bottleneck
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1:
            raise ValueError(f"width must be an int >= 1, got {width!r}")
        width = int(width)
        layers["conv1"] = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=preact)
        if not preact:
            layers["bn1"] = nn.BatchNorm2d(width)
            layers["relu"] = nn.ReLU(inplace=True)
        layers["maxpool"] = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = width
        for i, (stride, dilations) in enumerate(stages):
            planes = width * 2**i
            units = []
            for j, dilation in enumerate(dilations):
                units.append(block(in_channels, planes, stride if j == 0 else 1, dilation))
                in_channels = planes * block.expansion
            layers[f"layer{i + 1}"] = nn.Sequential(*units)
        if preact:
            layers["postnorm"] = nn.Sequential(
                OrderedDict(bn=nn.BatchNorm2d(in_channels), relu=nn.ReLU(inplace=True))
            )
        super().__init__(layers)
        self.out_channels = in_channels
        self.aux_channels = in_channels // 2
        self.return_layers = {("postnorm" if preact else "layer4"): "out"}
        if return_aux:
            self.return_layers["layer3"] = "aux"
        self.stage_dilations = stages
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation: He (fan_out) for convs, BN at identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self._modules.items():
            x = module(x)
            if name in self.return_layers:
                features[self.return_layers[name]] = x
        return features
