"""The DeepLab training augmentation (training/transforms.py) as a reproduction needs it: image and mask stay aligned
through scale, pad, crop and flip; padding is the mean colour (0 after normalization) and 255; scales, crop offsets
and flips are uniform; a sample is a function of its seed alone, whatever the thread count or --workers."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training import loop
from training.datasets import SyntheticShapes
from training.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    TrainTransform,
    _bilinear,
    _linear_taps,
    pad_collate,
    resize_pair,
    to_tensors,
)


class _threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def _coords(h, w):
    """An image whose red channel is the row and green the column (both < 256), and a mask of row*w+col mod 251."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy, xx, np.full((h, w), 9)], -1).astype(np.uint8)
    return img, ((yy * w + xx) % 251).astype(np.uint8)


def _decode(img_t, channel):
    v = img_t[channel] * IMAGENET_STD[channel] + IMAGENET_MEAN[channel]
    return torch.round(v * 255).long()


# ---- determinism ---------------------------------------------------------------------------------------------


def test_a_sample_does_not_depend_on_the_thread_count():
    # F.interpolate's CPU bilinear kernel rounds differently with 1 and 2 threads; a DataLoader worker runs one
    # thread, the main process (--workers 0) torch's default: the "same sample stream for any --workers" was not.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (137, 171, 3), dtype=np.uint8)
    mask = rng.integers(0, 21, (137, 171)).astype(np.uint8)
    tf = TrainTransform(100, (0.5, 2.0))
    out = {}
    for n in (1, 2):
        with _threads(n):
            out[n] = [tf(img, mask, random.Random(s)) for s in range(8)]
    for (a_img, a_lbl), (b_img, b_lbl) in zip(out[1], out[2], strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_lbl, b_lbl)


def test_the_sample_stream_is_the_same_for_any_workers_and_after_a_resume():
    ds = loop.AugmentedDataset(SyntheticShapes("train", 40, 16, seed=1), TrainTransform(32, scale_range=(0.5, 2.0)))

    def stream(workers, start=0, stop=3):
        sampler = loop.StreamSampler(len(ds), 4, 3, start, stop)
        return list(torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                                collate_fn=loop._collate_train))

    with _threads(2):  # the main process at 2 threads, the worker at 1
        main, worker, resumed = stream(0), stream(1), stream(0, start=1)
    for a, b in zip(main, worker, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for a, b in zip(main[1:], resumed, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---- geometry ------------------------------------------------------------------------------------------------


def test_bilinear_is_f_interpolate_function():
    rng = np.random.default_rng(1)
    for h, w, oh, ow in [(1, 1, 5, 3), (7, 9, 7, 9), (37, 45, 1, 1), (10, 10, 20, 20), (10, 10, 5, 5),
                         *(tuple(int(v) for v in rng.integers(1, 60, 4)) for _ in range(30))]:
        x = torch.from_numpy(rng.random((3, h, w), dtype=np.float32))
        ref = F.interpolate(x[None], size=(oh, ow), mode="bilinear", align_corners=False)[0]
        got = _bilinear(x, (oh, ow))
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert torch.allclose(got, ref, atol=2e-5, rtol=0), (h, w, oh, ow)
    x = torch.rand(3, 7, 9)
    assert torch.equal(_bilinear(x, (7, 9)), x)


def test_mask_pixel_is_the_image_pixels_nearest_bilinear_tap():
    # The mask takes the source pixel holding the output pixel's centre; the image blends the two taps around it.
    # They agree: the mask's pixel is always one of the image's taps, with weight >= 1/2 (a tie is 1/2 each).
    rng = np.random.default_rng(2)
    for _ in range(40):
        n_in, n_out = (int(v) for v in rng.integers(1, 90, 2))
        m = np.arange(n_in, dtype=np.uint8)[None, :].repeat(2, 0)
        _, lbl = resize_pair(*to_tensors(np.zeros((2, n_in, 3), np.uint8), m), (2, n_out))
        i0, i1, w0, w1 = _linear_taps(n_in, n_out)
        nearest = lbl[0]
        weight = torch.where(nearest == i0, w0, torch.where(nearest == i1, w1, torch.zeros_like(w0)))
        assert torch.all((nearest == i0) | (nearest == i1)), (n_in, n_out)
        assert torch.all(weight >= 0.5 - 1e-6), (n_in, n_out)


def test_crop_is_an_exact_window_with_uniform_offsets_and_the_flip_is_joint():
    h, w, c = 20, 23, 16
    img, mask = _coords(h, w)
    tf = TrainTransform(c, scale_range=(1.0, 1.0), flip=True)
    counts_y, counts_x, flips = np.zeros(h - c + 1), np.zeros(w - c + 1), 0
    n = 1400
    for seed in range(n):
        out_img, out_lbl = tf(img, mask, random.Random(seed))
        rows, cols = _decode(out_img, 0), _decode(out_img, 1)
        y0 = int(rows[0, 0])
        flipped = bool(cols[0, 0] > cols[0, -1])
        if flipped:
            out_img, out_lbl, cols = out_img.flip(-1), out_lbl.flip(-1), cols.flip(-1)
        x0 = int(cols[0, 0])
        assert torch.equal(rows, torch.arange(y0, y0 + c)[:, None].expand(c, c))
        assert torch.equal(cols, torch.arange(x0, x0 + c)[None, :].expand(c, c))
        assert torch.equal(out_lbl, torch.from_numpy(mask[y0:y0 + c, x0:x0 + c]).long())
        counts_y[y0] += 1
        counts_x[x0] += 1
        flips += flipped
    for counts in (counts_y, counts_x):  # every offset, the last one included, about equally often
        expected = n / len(counts)
        assert counts.min() > 0 and ((counts - expected) ** 2 / expected).sum() < 25
    assert abs(flips / n - 0.5) < 0.05


def test_scales_are_uniform_and_padding_is_the_mean_and_255():
    h, w = 30, 20
    img, mask = _coords(h, w)
    tf = TrainTransform(64, scale_range=(0.5, 2.0), flip=False)  # the crop holds the whole scaled image
    heights = []
    for seed in range(600):
        out_img, out_lbl = tf(img, mask, random.Random(seed))
        valid = out_lbl != 255
        sh, sw = int(valid.any(1).sum()), int(valid.any(0).sum())
        assert valid[:sh, :sw].all() and not valid[sh:].any() and not valid[:, sw:].any()  # content at top-left
        assert abs(sh / h - sw / w) < 0.1  # one scale for both axes
        assert torch.all(out_img[:, sh:] == 0) and torch.all(out_img[:, :, sw:] == 0)  # the normalized mean
        heights.append(sh)
    s = np.array(heights) / h
    assert 0.48 <= s.min() and s.max() <= 2.0
    assert abs(s.mean() - 1.25) < 0.05 and abs(np.median(s) - 1.25) < 0.08
    assert abs(np.mean(s < 0.875) - 0.25) < 0.06 and abs(np.mean(s > 1.625) - 0.25) < 0.06


def test_tiny_scales_and_images_smaller_than_the_crop():
    img, mask = _coords(3, 2)
    tf = TrainTransform(16, scale_range=(0.01, 0.01))
    out_img, out_lbl = tf(img, mask, random.Random(0))
    assert out_img.shape == (3, 16, 16) and out_lbl.shape == (16, 16)
    valid = out_lbl != 255
    assert int(valid.sum()) == 1 and bool(valid[0, 0] or valid[0, -1])  # one pixel, at the top (flipped or not)
    assert int((out_img != 0).any(0).sum()) == 1  # one pixel of content, the rest the mean
    out_img, out_lbl = TrainTransform(16, scale_range=(1.0, 1.0), flip=False)(img, mask, random.Random(0))
    assert torch.equal(out_lbl[:3, :2], torch.from_numpy(mask).long()) and torch.all(out_lbl[3:] == 255)


# ---- input checks --------------------------------------------------------------------------------------------


def test_non_uint8_images_and_float_masks_are_refused():
    mask = np.zeros((4, 5), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        TrainTransform(4)(np.full((4, 5, 3), 0.5, np.float32), mask, random.Random(0))  # would be divided by 255
    with pytest.raises(ValueError, match="uint8"):
        EvalTransform()(np.full((4, 5, 3), 1000, np.uint16), None)
    with pytest.raises(ValueError, match="integer class indices"):
        EvalTransform()(np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 0.99))
    img, lbl = EvalTransform()(np.zeros((4, 5, 3), np.uint8), np.full((4, 5), 7, np.int32))
    assert lbl.dtype == torch.int64 and torch.all(lbl == 7)


def test_scale_range_must_be_finite():
    with pytest.raises(ValueError, match="finite"):
        TrainTransform(16, scale_range=(0.5, float("inf")))


# ---- evaluation ----------------------------------------------------------------------------------------------


def test_eval_transform_and_pad_collate_round_trip():
    rng = np.random.default_rng(3)
    samples = []
    for h, w in ((5, 7), (8, 3), (1, 1)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img, lbl = EvalTransform()(image, rng.integers(0, 21, (h, w)).astype(np.uint8))
        ref = (torch.from_numpy(image).permute(2, 0, 1).double() / 255
               - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)) \
            / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
        assert img.dtype == torch.float32 and img.shape == (3, h, w) and torch.allclose(img.double(), ref, atol=1e-6)
        samples.append((img, lbl, f"{h}x{w}"))
    samples.append((samples[0][0], None, "unlabelled"))
    images, masks, sizes, names = pad_collate(samples)
    assert images.shape == (4, 3, 8, 7) and masks.shape == (4, 8, 7) and masks.dtype == torch.int64
    assert sizes == [(5, 7), (8, 3), (1, 1), (5, 7)] and names[-1] == "unlabelled"
    for i, (img, lbl, _) in enumerate(samples):
        h, w = sizes[i]
        assert torch.equal(images[i, :, :h, :w], img)
        assert torch.equal(masks[i, :h, :w], lbl if lbl is not None else torch.full((h, w), 255))
        pad = torch.ones(8, 7, dtype=torch.bool)
        pad[:h, :w] = False
        assert torch.all(images[i][:, pad] == 0) and torch.all(masks[i][pad] == 255)
