"""The PASCAL VOC colour map: class index → RGB, as the VOC devkit's labelcolormap.m builds it."""

from __future__ import annotations

import numpy as np

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IGNORE_INDEX = 255


def voc_colormap(n: int = 256) -> np.ndarray:
    """(n, 3) uint8: the bit-interleaved VOC palette (0 black, 1 (128,0,0), ..., 255 (224,224,192))."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) integer class indices → (H, W, 3) uint8 RGB with the VOC palette (255, ignore, is cream)."""
    mask = np.asarray(mask)
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"mask values must be in [0, 255], got range [{mask.min()}, {mask.max()}]")
    return voc_colormap()[mask.astype(np.int64)]


def palette_bytes() -> list[int]:
    """The VOC palette flattened for PIL.Image.putpalette (768 ints)."""
    return voc_colormap().reshape(-1).tolist()
