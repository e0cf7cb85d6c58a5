"""Segmentation metrics from a dataset-level confusion matrix, and a per-image variant.

Dataset-level (the PASCAL VOC protocol): one (C, C) confusion matrix summed over every pixel of the split, then
    pixel accuracy  = Σ diag / Σ all
    mean accuracy   = mean over classes with ground truth of diag / row-sum
    IoU_c           = diag_c / (row_c + col_c − diag_c);  mIoU = mean over classes with row_c + col_c > 0
    fwIoU           = Σ_c (row_c / Σ all) · IoU_c
Rows are ground truth, columns predictions; pixels labelled `ignore_index` are not counted.

Per-image ("per_image_miou_present"): the mean over images of each image's mIoU, where an image's mIoU averages
only the classes present in it (in its ground truth or its prediction, on pixels not ignored); images without a
pixel to count (every pixel ignore-labelled) are left out of it, and "num_images_per_image_miou" says how many
images it averages. It is usually higher than the dataset-level mIoU because small, hard classes weigh
less. It is not what the DeepLab papers or their TensorFlow reference's eval.py give (tf.metrics.mean_iou: the
dataset-level confusion matrix, as above), so it is shown next to, never instead of, the dataset-level mIoU.

"num_images" is the number of images evaluated, every one (an image whose pixels are all ignore-labelled too);
"num_pixels" the number of pixels counted (not ignore-labelled).

Per-class results are keyed by class name; a name given to more than one class gets its class index appended
("thing [2]"), so that no class's entry replaces another's.
"""

from __future__ import annotations

import unicodedata

import numpy as np
import torch

from training.palette import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction; ignore-labelled pixels skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target has labels outside [0, {num_classes}) other than ignore_index={ignore_index}: "
                         f"range [{int(t.min())}, {int(t.max())}]")
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"pred has labels outside [0, {num_classes}): range [{int(p.min())}, {int(p.max())}]")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _per_image_miou(cm: torch.Tensor) -> float | None:
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    if not present.any():
        return None
    return float((inter[present] / union[present]).mean())


class SegmentationMetrics:
    """Accumulates a dataset-level confusion matrix and the per-image mIoU; `compute()` returns a dict."""

    def __init__(self, num_classes: int, class_names=None, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries but num_classes={num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.reset()

    def reset(self) -> None:
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        # image_count: the images with a pixel to count (the per-image mIoU's denominator); images_seen: every image
        self.image_miou_sum, self.image_count, self.images_seen = 0.0, 0, 0

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (N, H, W) or (H, W) class indices (one entry per image for the per-image metric)."""
        if pred.dim() == 2:
            pred, target = pred[None], target[None]
        for p, t in zip(pred.cpu(), target.cpu(), strict=True):
            cm = confusion_matrix(p, t, self.num_classes, self.ignore_index)
            self.cm += cm
            self.images_seen += 1
            m = _per_image_miou(cm)
            if m is not None:
                self.image_miou_sum += m
                self.image_count += 1

    def merge_(self, cm: torch.Tensor, image_miou_sum: float, image_count: int, images_seen: int) -> None:
        """Add another accumulator's state (e.g. all-reduced across processes). image_count: its images with a pixel
        to count; images_seen: all its images."""
        self.cm += cm.to(self.cm)
        self.image_miou_sum += image_miou_sum
        self.image_count += image_count
        self.images_seen += images_seen

    def compute(self) -> dict:
        return metrics_from_confusion(self.cm, self.class_names) | {
            "per_image_miou_present": self.image_miou_sum / self.image_count if self.image_count else float("nan"),
            "num_images": self.images_seen,
            "num_images_per_image_miou": self.image_count,
        }


def _unique_names(names: list[str]) -> list[str]:
    """Class names as dict keys: a name that more than one class has gets " [index]" appended for each of them."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    keys = [n if counts[n] == 1 else f"{n} [{i}]" for i, n in enumerate(names)]
    taken = set()
    for i, k in enumerate(keys):  # a key may still clash with a given name ("a [1]"): append the index again
        while k in taken:
            k = f"{k} [{i}]"
        keys[i] = k
        taken.add(k)
    return keys


def metrics_from_confusion(cm: torch.Tensor | np.ndarray, class_names=None) -> dict:
    """Pixel accuracy, mean accuracy, mIoU, fwIoU and per-class IoU/accuracy of a (C, C) confusion matrix."""
    cm = torch.as_tensor(cm).double()
    c = cm.shape[0]
    names = _unique_names([str(n) for n in class_names] if class_names is not None else [str(i) for i in range(c)])
    total = cm.sum()
    inter, gt, pr = cm.diag(), cm.sum(1), cm.sum(0)
    union = gt + pr - inter
    has_gt, has_union = gt > 0, union > 0
    iou = torch.where(has_union, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    acc = torch.where(has_gt, inter / gt.clamp(min=1), torch.full_like(inter, float("nan")))
    nan = float("nan")
    return {
        "pixel_accuracy": float(inter.sum() / total) if total > 0 else nan,
        "mean_accuracy": float(acc[has_gt].mean()) if has_gt.any() else nan,
        "miou": float(iou[has_union].mean()) if has_union.any() else nan,
        "fw_iou": float((gt / total * iou.nan_to_num(0.0)).sum()) if total > 0 else nan,
        "per_class_iou": {n: float(v) for n, v in zip(names, iou.tolist(), strict=True)},
        "per_class_accuracy": {n: float(v) for n, v in zip(names, acc.tolist(), strict=True)},
        "num_pixels": int(total),
    }


def _pct(v: float) -> str:
    """A percentage cell, 7 wide; "n/a" for an undefined (NaN) value."""
    return f"{v * 100:7.2f}" if v == v else f"{'n/a':>7}"


def _columns(text: str) -> int:
    """The terminal columns `text` takes: East Asian wide and fullwidth characters take two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _left(text: str, width: int) -> str:
    """`text` padded on the right to `width` terminal columns (str.ljust counts characters)."""
    return text + " " * max(0, width - _columns(text))


def format_table(metrics: dict) -> str:
    """A printable per-class IoU table followed by the summary numbers, in percent (metrics.json keeps the
    fractions); undefined cells print "n/a"."""
    ious, accs = metrics["per_class_iou"], metrics["per_class_accuracy"]
    width = max(12, *(_columns(n) for n in ious))
    lines = [f"{'class':<{width}}  {'IoU %':>7}  {'acc %':>7}"]
    for name, v in ious.items():
        lines.append(f"{_left(name, width)}  {_pct(v)}  {_pct(accs[name])}")
    counted = ""
    if "num_images" in metrics:
        n = metrics["num_images"]
        counted = f": {n} image{'' if n == 1 else 's'} evaluated" + (
            f", {metrics['num_pixels']} pixels counted" if "num_pixels" in metrics else "")
    lines.append(f"{'mIoU':<{width}}  {_pct(metrics['miou'])}   (dataset-level confusion matrix{counted})")
    lines.append(f"{'pixel acc':<{width}}  {_pct(metrics['pixel_accuracy'])}")
    lines.append(f"{'mean acc':<{width}}  {_pct(metrics['mean_accuracy'])}")
    lines.append(f"{'fwIoU':<{width}}  {_pct(metrics['fw_iou'])}")
    if "per_image_miou_present" in metrics:
        over, seen = metrics.get("num_images_per_image_miou"), metrics.get("num_images")
        note = ""
        if over is not None and seen is not None and over != seen:
            left = seen - over
            note = (f"; over {over} of the {seen} images: {left} {'has' if left == 1 else 'have'} every pixel "
                    "ignore-labelled and " + ("is" if left == 1 else "are") + " left out")
        lines.append(f"{'per-img mIoU':<{width}}  {_pct(metrics['per_image_miou_present'])}   "
                     f"(mean of per-image mIoUs over the classes present; not comparable to mIoU{note})")
    return "\n".join(lines)
