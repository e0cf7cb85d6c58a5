"""DeepLabV3 classifier heads and the auxiliary FCN head, with torchvision's layer indices as key names.

``paper``:       ASPP → 1×1 conv to logits                       (Chen et al. 2017, fig. 5)
``torchvision``: ASPP (dropout 0.5) → 3×3 conv → BN → ReLU → 1×1 conv to logits   (torchvision's DeepLabHead)
aux (FCNHead):   3×3 conv (C → C/4) → BN → ReLU → dropout 0.1 → 1×1 conv to logits, on block 3's output
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from model.aspp import ASPP
from model.checks import check_int

HEADS = ("paper", "torchvision")


class DeepLabHead(nn.Sequential):
    """ASPP followed by the logits layer(s) of the chosen style; index 0 is the ASPP (``classifier.0.*``).

    Args:
        in_channels: channels of the backbone's output.
        num_classes: number of output channels (logits).
        atrous_rates: ASPP's rates.
        style: "paper" or "torchvision" (see the module docstring).
        channels: ASPP and head width (256).
    """

    def __init__(
        self, in_channels: int, num_classes: int, atrous_rates: Sequence[int], style: str = "paper", channels: int = 256
    ) -> None:
        if style not in HEADS:
            raise ValueError(f"style must be one of {HEADS}, got {style!r}")
        in_channels = check_int(in_channels, "in_channels")
        num_classes = check_int(num_classes, "num_classes")
        channels = check_int(channels, "channels")
        if style == "paper":
            super().__init__(ASPP(in_channels, atrous_rates, channels), nn.Conv2d(channels, num_classes, 1))
        else:
            super().__init__(
                ASPP(in_channels, atrous_rates, channels, dropout=0.5),
                nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, num_classes, 1),
            )
        self.style = style


class FCNHead(nn.Sequential):
    """Auxiliary head (torchvision's FCNHead): 3×3 conv → BN → ReLU → dropout 0.1 → 1×1 conv to logits."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        # its inner layer has in_channels // 4 channels: at least one
        inter = check_int(in_channels, "in_channels", minimum=4) // 4
        num_classes = check_int(num_classes, "num_classes")
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(inter, num_classes, 1),
        )
