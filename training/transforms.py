"""Joint image/mask transforms: the same geometry applied to both, bilinear for the image, nearest for the mask.

The DeepLab training pipeline: random scale (0.5-2.0) → pad to the crop size (image with the mean colour, mask
with the ignore label 255) → random crop → horizontal flip → normalize. All randomness comes from a
`random.Random` passed per sample, so a sample's augmentation is a function of its seed alone (see
training.loop.StreamSampler): resuming a run replays exactly the same crops.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F

from training.palette import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensors(image: np.ndarray, mask: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H, W, 3) uint8 and (H, W) uint8 → float (3, H, W) in [0, 1] and int64 (H, W)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:  # divided by 255 below: a float image in [0, 1] would become nearly black
        raise ValueError(f"image must be uint8 (values 0-255), got dtype {image.dtype}")
    if 0 in image.shape[:2]:  # no pixel: a training crop would be all padding, a resize fails inside torch
        raise ValueError(f"image must have at least one pixel, got an empty one of shape {image.shape}")
    img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    if mask is None:
        return img, None
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape[:2]}")
    if mask.dtype.kind not in "ui":  # a float mask would be truncated to class indices
        raise ValueError(f"mask must hold integer class indices, got dtype {mask.dtype}")
    return img, torch.from_numpy(np.ascontiguousarray(mask)).long()


def normalize(img: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    m = torch.tensor(mean, dtype=img.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=img.dtype).view(-1, 1, 1)
    return (img - m) / s


MAX_SIDE = 2**31 - 1  # the longest side a resize here makes: beyond it no image of this pipeline could be allocated


class ScaledImageTooLarge(MemoryError):
    """A scale that makes an image too large to allocate (--scale-range, --eval-scales): raised before the resize,
    whose sizes would overflow inside torch (an OverflowError or TypeError from deep in its C++) past 2**63."""


def scaled_size(h: int, w: int, s: float) -> tuple[int, int]:
    """An (h, w) image's size at scale s: each side rounded half up, at least 1 (the size F.interpolate gets from
    the training and the multi-scale evaluation alike). ScaledImageTooLarge past MAX_SIDE a side."""
    sh, sw = h * s + 0.5, w * s + 0.5  # (floats: inf for a huge s, which int() would refuse)
    if not (sh <= MAX_SIDE and sw <= MAX_SIDE):
        raise ScaledImageTooLarge(f"scale {s:g} makes a {h}x{w} image {h * s:.4g}x{w * s:.4g} pixels, beyond "
                                  f"{MAX_SIDE} a side")
    return max(1, int(sh)), max(1, int(sw))


def _linear_taps(in_size: int, out_size: int):
    """Source rows/columns and weights of a linear resize, align_corners=False (F.interpolate's convention):
    output pixel d samples the input at (d + 0.5)·in/out − 0.5, clamped to the image, between pixels i0 and i1."""
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    w1 = (src - i0).float()
    return i0, i1, 1.0 - w1, w1


def _bilinear(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (C, H, W), align_corners=False, no antialiasing: F.interpolate's function, computed with
    gathers and elementwise products and sums (each rounded once), so that every value is the same at any thread
    count. F.interpolate's CPU bilinear kernel rounds differently depending on how its work is split between
    threads: a DataLoader worker (one thread) would give other last bits than the main process."""
    x = img.permute(1, 2, 0)  # (H, W, C): rows and columns are gathered whole
    for dim, out in ((0, size[0]), (1, size[1])):
        i0, i1, w0, w1 = _linear_taps(x.shape[dim], out)
        shape = (-1, 1, 1) if dim == 0 else (-1, 1)
        lo = x.index_select(dim, i0).mul_(w0.to(x.dtype).view(shape))
        x = lo.add_(x.index_select(dim, i1).mul_(w1.to(x.dtype).view(shape)))
    return x.permute(2, 0, 1)


def resize_pair(img: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int]):
    """Bilinear (align_corners=False) image, nearest-exact mask: pixel centres map identically for both.

    The image's values do not depend on torch's thread count (see _bilinear): a sample is the same in the main
    process and in any DataLoader worker."""
    img = _bilinear(img, size)
    if mask is not None:
        mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
    return img, mask


class TrainTransform:
    """Random scale → pad (mean / ignore) → random crop → horizontal flip → normalize."""

    def __init__(self, crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, ignore_index: int = IGNORE_INDEX) -> None:
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < min <= max, got {scale_range}")
        if not math.isfinite(hi):
            raise ValueError(f"scale_range must be finite, got {scale_range}")
        self.crop_size, self.scale_range, self.flip = crop_size, (float(lo), float(hi)), flip
        self.mean, self.std, self.ignore_index = mean, std, ignore_index

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: random.Random):
        if not all(hasattr(rng, m) for m in ("uniform", "randint", "random")):  # None: an index without a seed
            raise TypeError(f"TrainTransform needs rng, a random.Random seeded per sample (a sample's crop is a "
                            f"function of its seed), got {type(rng).__name__}; index loop.AugmentedDataset with "
                            "(index, sample_seed) pairs, as loop.StreamSampler yields them")
        if mask is None:
            raise ValueError("TrainTransform needs the sample's mask, got None (EvalTransform takes images alone)")
        img, lbl = to_tensors(image, mask)
        h, w = lbl.shape
        lo, hi = self.scale_range
        if hi > lo or lo != 1.0:
            s = rng.uniform(lo, hi)
            img, lbl = resize_pair(img, lbl, scaled_size(h, w, s))
        img = normalize(img, self.mean, self.std)  # padding with 0 after this is padding with the mean colour
        c = self.crop_size
        h, w = lbl.shape
        ph, pw = max(c - h, 0), max(c - w, 0)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0.0)
            lbl = F.pad(lbl, (0, pw, 0, ph), value=self.ignore_index)
        h, w = lbl.shape
        y0, x0 = rng.randint(0, h - c), rng.randint(0, w - c)
        img, lbl = img[:, y0:y0 + c, x0:x0 + c], lbl[y0:y0 + c, x0:x0 + c]
        if self.flip and rng.random() < 0.5:
            img, lbl = img.flip(-1), lbl.flip(-1)
        return img.contiguous(), lbl.contiguous()


class EvalTransform:
    """Normalize only: evaluation runs at the image's own size."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        self.mean, self.std = mean, std

    def __call__(self, image: np.ndarray, mask: np.ndarray | None, rng: random.Random | None = None):
        img, lbl = to_tensors(image, mask)
        return normalize(img, self.mean, self.std), lbl


def pad_collate(batch, ignore_index: int = IGNORE_INDEX):
    """Stack (image, mask, name) samples of different sizes: pad bottom/right with 0 (the mean) and ignore.

    Returns images (N, 3, H, W), masks (N, H, W), sizes [(h, w)], names.
    """
    h = max(b[0].shape[1] for b in batch)
    w = max(b[0].shape[2] for b in batch)
    images = batch[0][0].new_zeros((len(batch), 3, h, w))
    masks = torch.full((len(batch), h, w), ignore_index, dtype=torch.long)
    sizes, names = [], []
    for i, (img, lbl, name) in enumerate(batch):
        ih, iw = img.shape[1:]
        images[i, :, :ih, :iw] = img
        if lbl is not None:
            masks[i, :ih, :iw] = lbl
        sizes.append((ih, iw))
        names.append(name)
    return images, masks, sizes, names
