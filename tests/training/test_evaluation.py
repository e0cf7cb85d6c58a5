"""Evaluation: training.metrics and loop.evaluate / loop.predict_probs against independent numpy / plain
PyTorch reimplementations, on small random and adversarial inputs (ignore pixels, absent classes, odd and tiny image
sizes, mixed-size batches, multi-scale + flip, aux heads, channels_last and fused models)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_training_loop import TinySeg
from torch import nn

from training import loop
from training.metrics import SegmentationMetrics, confusion_matrix, metrics_from_confusion

CPU = torch.device("cpu")
MS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


# ---- independent metric reference (numpy, per-pixel loops) ------------------------------------------------------


def ref_confusion(preds, targets, c, ignore=255):
    cm = np.zeros((c, c), dtype=np.int64)
    for p, t in zip(preds, targets, strict=True):
        for pv, tv in zip(np.asarray(p).ravel().tolist(), np.asarray(t).ravel().tolist(), strict=True):
            if tv == ignore:
                continue
            cm[tv, pv] += 1
    return cm


def ref_metrics(preds, targets, c, ignore=255):
    cm = ref_confusion(preds, targets, c, ignore)
    total = cm.sum()
    iou, acc = [], []
    for k in range(c):
        tp, gt, pr = cm[k, k], cm[k, :].sum(), cm[:, k].sum()
        union = gt + pr - tp
        iou.append(tp / union if union else math.nan)
        acc.append(tp / gt if gt else math.nan)
    defined_iou = [v for v in iou if not math.isnan(v)]
    defined_acc = [v for v in acc if not math.isnan(v)]
    fw = sum(cm[k, :].sum() / total * iou[k] for k in range(c) if cm[k, :].sum()) if total else math.nan
    per_image = []
    for p, t in zip(preds, targets, strict=True):
        ci = ref_confusion([p], [t], c, ignore)
        vals = []
        for k in range(c):
            tp, gt, pr = ci[k, k], ci[k, :].sum(), ci[:, k].sum()
            if gt + pr - tp:
                vals.append(tp / (gt + pr - tp))
        if vals:
            per_image.append(sum(vals) / len(vals))
    return {
        "cm": cm,
        "pixel_accuracy": np.trace(cm) / total if total else math.nan,
        "mean_accuracy": sum(defined_acc) / len(defined_acc) if defined_acc else math.nan,
        "miou": sum(defined_iou) / len(defined_iou) if defined_iou else math.nan,
        "fw_iou": fw,
        "iou": iou,
        "acc": acc,
        "per_image": sum(per_image) / len(per_image) if per_image else math.nan,
        "num_images": len(preds),  # every image evaluated
        "num_images_per_image_miou": len(per_image),  # those with a pixel to count
    }


def _same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12, abs=1e-12)


def check_against_reference(preds, targets, c, ignore=255):
    m = SegmentationMetrics(c, ignore_index=ignore)
    for p, t in zip(preds, targets, strict=True):
        m.update(torch.as_tensor(p), torch.as_tensor(t))
    got, want = m.compute(), ref_metrics(preds, targets, c, ignore)
    assert np.array_equal(m.cm.numpy(), want["cm"])
    for key in ("pixel_accuracy", "mean_accuracy", "miou", "fw_iou"):
        assert _same(got[key], want[key]), key
    assert _same(got["per_image_miou_present"], want["per_image"])
    assert got["num_images"] == want["num_images"]
    assert got["num_images_per_image_miou"] == want["num_images_per_image_miou"]
    assert got["num_pixels"] == want["cm"].sum()
    for k in range(c):
        assert _same(got["per_class_iou"][str(k)], want["iou"][k])
        assert _same(got["per_class_accuracy"][str(k)], want["acc"][k])
    return got


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_numpy_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 7))
    preds, targets = [], []
    for _ in range(int(rng.integers(1, 5))):
        h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        t = rng.integers(0, c, (h, w))
        t[rng.random((h, w)) < 0.3] = 255
        # skewed predictions so that some classes are absent from predictions, labels or both
        p = np.where(rng.random((h, w)) < 0.5, t, rng.integers(0, max(1, c - 1), (h, w)))
        p = np.where(t == 255, rng.integers(0, c, (h, w)), p)
        preds.append(p.astype(np.int64))
        targets.append(t.astype(np.int64))
    check_against_reference(preds, targets, c)


def test_metrics_adversarial_cases():
    c = 4
    t1 = np.array([[0, 0, 255], [1, 255, 255]])
    p1 = np.array([[0, 1, 200], [1, 3, 0]])  # out-of-range / other predictions on ignored pixels do not count
    t2 = np.full((2, 3), 255)  # an image with no valid pixel: no per-image mIoU, no pixels
    p2 = np.zeros((2, 3), dtype=np.int64)
    t3 = np.array([[2]])  # a class present only in the labels, one pixel; class 3 only predicted (on ignore: never)
    p3 = np.array([[0]])
    got = check_against_reference([p1, p2, p3], [t1, t2, t3], c)
    assert math.isnan(got["per_class_iou"]["3"]) and math.isnan(got["per_class_accuracy"]["3"])
    assert got["per_class_iou"]["2"] == 0.0 and got["num_images"] == 3 and got["num_images_per_image_miou"] == 2
    # uint8 labels (what a PNG decodes to) give the same counts as int64 ones
    m8 = SegmentationMetrics(c)
    m8.update(torch.as_tensor(p1), torch.as_tensor(t1.astype(np.uint8)))
    assert np.array_equal(m8.cm.numpy(), ref_confusion([p1], [t1], c))
    # everything ignored: every number undefined, nothing crashes
    only_ignored = check_against_reference([p2], [t2], c)
    assert math.isnan(only_ignored["miou"]) and only_ignored["num_pixels"] == 0
    # one class
    check_against_reference([np.zeros((3, 1), dtype=np.int64)], [np.array([[0], [255], [0]])], 1)


def test_labels_out_of_range_are_refused_not_dropped():
    with pytest.raises(ValueError, match="target has labels outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match="target has labels outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 4)
    with pytest.raises(ValueError, match="pred has labels outside"):
        confusion_matrix(torch.tensor([0, 4]), torch.tensor([0, 1]), 4)
    # a different ignore_index: 255 is then an out-of-range label
    with pytest.raises(ValueError, match="target has labels outside"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 1]), 4, ignore_index=0)


def test_metrics_from_confusion_of_a_numpy_matrix():
    cm = np.array([[3, 1, 0], [0, 0, 0], [2, 0, 4]])
    got = metrics_from_confusion(cm)
    assert got["miou"] == pytest.approx((3 / 6 + 0 / 1 + 4 / 6) / 3)
    assert got["mean_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert got["fw_iou"] == pytest.approx(4 / 10 * 3 / 6 + 6 / 10 * 4 / 6)


# ---- prediction: multi-scale / flip reference ------------------------------------------------------------------


def _tiny(seed=0, num_classes=5, fused=False):
    """TinySeg whose BatchNorm statistics are those of random images (momentum None: the cumulative average), so
    that eval mode is not the identity and the predictions vary from pixel to pixel (the default init predicts one
    class everywhere, which hides any mix-up)."""
    torch.manual_seed(seed)
    net = TinySeg(num_classes, fused=fused)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        net.train()
        net(torch.randn(8, 3, 24, 24))
        net.cls.weight.normal_()
        net.cls.bias.zero_()
    return net.eval()


def ref_predict_probs(model, image, scales, flip):
    """One image (3, h, w): resize by each scale (round half up), model, flip back, logits resized (bilinear) to
    (h, w), softmax, mean over every (scale, flip) — the DeepLab reference's multi-scale inference."""
    h, w = image.shape[-2:]
    outs = []
    for s in scales:
        size = (max(1, math.floor(h * s + 0.5)), max(1, math.floor(w * s + 0.5)))
        x = image[None]
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for f in (False, True) if flip else (False,):
            logits = model(x.flip(-1) if f else x)["out"]
            logits = logits.flip(-1) if f else logits
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            outs.append(logits.softmax(1))
    return torch.stack(outs).mean(0)[0]


SIZES = [(13, 7), (1, 9), (9, 1), (1, 1), (17, 30), (8, 8), (2, 5), (24, 11)]


@pytest.mark.parametrize("scales,flip", [((1.0,), True), ((0.5, 1.0, 1.75), False), (MS, True)])
def test_predict_probs_matches_the_reference(scales, flip):
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for h, w in SIZES:
            img = torch.randn(3, h, w, generator=g)
            got = loop.predict_probs(model, img[None], scales, flip)[0]
            want = ref_predict_probs(model, img, scales, flip)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_single_scale_prediction_is_the_plain_forward():
    model = _tiny()
    img = torch.randn(1, 3, 11, 6)
    with torch.no_grad():
        assert torch.equal(loop.predict_probs(model, img).argmax(1), model(img)["out"].argmax(1))


# ---- evaluate: batching, padding, aux, channels_last, fused -----------------------------------------------------


class _Set:
    """(image, mask, name) items already normalized, of the given sizes."""

    def __init__(self, sizes, num_classes, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i, (h, w) in enumerate(sizes):
            img = torch.randn(3, h, w, generator=g)
            mask = torch.randint(0, num_classes, (h, w), generator=g)
            mask[torch.rand(h, w, generator=g) < 0.2] = 255
            self.items.append((img, mask, f"im{i}"))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _evaluate(model, ds, c, **kw):
    return loop.evaluate(model, ds, c, None, CPU, progress=False, **kw)[0]


def _assert_same_metrics(a, b):
    for key in ("pixel_accuracy", "mean_accuracy", "miou", "fw_iou", "per_image_miou_present", "num_pixels"):
        assert _same(a[key], b[key]), (key, a[key], b[key])


@pytest.mark.parametrize("scales,flip", [((1.0,), False), ((0.5, 1.0, 1.75), True)])
def test_evaluate_matches_per_image_reference_and_any_batch_size(scales, flip):
    """Images of different (odd, tiny) sizes: the metrics are those of each image predicted alone, at every
    --eval-batch-size (the padding of a mixed batch must not reach the prediction: the image-pooling branch
    averages over the whole padded input)."""
    c = 5
    model = _tiny(num_classes=c)
    sizes = SIZES + [(13, 7), (8, 8), (13, 7)]  # repeated sizes share a forward pass
    ds = _Set(sizes, c)
    with torch.no_grad():
        preds = [ref_predict_probs(model, img, scales, flip).argmax(0).numpy() for img, _, _ in ds.items]
    assert len(np.unique(np.concatenate([p.ravel() for p in preds]))) >= 3  # not a constant prediction
    want = ref_metrics(preds, [m.numpy() for _, m, _ in ds.items], c)
    for bs in (1, 3, len(sizes)):
        got, kept = loop.evaluate(model, ds, c, None, CPU, batch_size=bs, scales=scales, flip=flip, keep=len(sizes),
                                  progress=False)
        assert got["miou"] == pytest.approx(want["miou"], abs=1e-12), bs
        assert got["per_image_miou_present"] == pytest.approx(want["per_image"], abs=1e-12), bs
        assert got["num_pixels"] == want["cm"].sum()
        assert len(kept) == len(sizes)
        for (img, mask, pred), (want_img, want_mask, _), want_pred in zip(kept, ds.items, preds, strict=True):
            assert torch.equal(img, want_img) and torch.equal(mask, want_mask)
            assert np.array_equal(pred.numpy(), want_pred)


def test_evaluate_ignores_the_aux_head_and_restores_train_mode():
    c = 4
    base = _tiny(num_classes=c)

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = base

        def forward(self, x):
            out = self.net(x)["out"]
            return {"out": out, "aux": -100 * out}

    ds = _Set([(9, 9), (5, 12)], c)
    wrapped = WithAux().train()
    got = _evaluate(wrapped, ds, c, batch_size=2, scales=(0.5, 1.0), flip=True)
    assert wrapped.training and base.training
    _assert_same_metrics(got, _evaluate(base, ds, c, batch_size=2, scales=(0.5, 1.0), flip=True))


def test_channels_last_and_fused_models_predict_as_the_unfused_one():
    c = 5
    plain = _tiny(num_classes=c)
    fused = TinySeg(c, fused=True)
    fused.load_state_dict(plain.state_dict())
    fused.eval()
    g = torch.Generator().manual_seed(3)
    img = torch.randn(2, 3, 19, 13, generator=g)
    want = loop.predict_probs(plain, img, (0.75, 1.0), True)
    for net, cl in ((plain, True), (fused, False), (fused.to(memory_format=torch.channels_last), True)):
        got = loop.predict_probs(net, img, (0.75, 1.0), True, channels_last=cl)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        top2 = want.topk(2, dim=1).values
        decided = (top2[:, 0] - top2[:, 1]) > 1e-4
        assert torch.equal(got.argmax(1)[decided], want.argmax(1)[decided])


# ---- reporting ----------------------------------------------------------------------------------------------------


def test_repeated_class_names_keep_every_class_in_the_per_class_results():
    """A class list may name two classes alike (classes.txt is not checked for it): each class keeps its own
    per-class IoU / accuracy entry and table row, instead of the later one silently replacing the earlier."""
    from training.metrics import format_table

    m = SegmentationMetrics(3, ["bg", "thing", "thing"])
    m.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 1, 2]]))
    got = m.compute()
    assert len(got["per_class_iou"]) == 3 and len(got["per_class_accuracy"]) == 3
    assert sorted(got["per_class_iou"].values()) == pytest.approx(sorted([1.0, 0.5, 0.5]))
    assert list(got["per_class_iou"].values()) == pytest.approx([1.0, 0.5, 0.5])
    table = format_table(got)
    assert len(table.splitlines()) == 1 + 3 + 5


def test_the_per_image_miou_is_not_attributed_to_the_tf_reference():
    """DeepLab's TensorFlow eval.py reports tf.metrics.mean_iou, a streaming (dataset-level) confusion matrix, not a
    mean of per-image mIoUs: labelling the per-image number as the reference's invites comparing it with the
    papers' numbers."""
    from training import metrics as metrics_module
    from training.metrics import format_table

    m = SegmentationMetrics(2)
    m.update(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    table = format_table(m.compute())
    assert "TF-reference" not in table and "TF reference" not in table
    assert "reported" not in (metrics_module.__doc__ or "").split("Per-image", 1)[1].split("\n\n", 1)[0]


def test_deeplabv3_tiny_images_fused_channels_last_and_aux():
    """model/'s DeepLabV3 (aux head on) at 1-pixel and odd sizes, multi-scale + flip: the fused channels_last
    network predicts what the unfused one does, and evaluate scores the main head only."""
    from model import deeplabv3_resnet

    torch.manual_seed(0)
    plain = deeplabv3_resnet(29, num_classes=4, output_stride=8, aux_loss=True, fused=False, width=8).eval()
    fused = deeplabv3_resnet(29, num_classes=4, output_stride=8, aux_loss=True, fused=True, width=8)
    fused.load_state_dict(plain.state_dict())
    fused = fused.eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for h, w in [(1, 1), (1, 9), (9, 1), (17, 30)]:
            x = torch.randn(1, 3, h, w, generator=g)
            want = ref_predict_probs(plain, x[0], (0.5, 1.0, 1.75), True)
            got = loop.predict_probs(fused, x, (0.5, 1.0, 1.75), True, channels_last=True)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    class MainHeadOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = plain

        def forward(self, x):
            return {"out": self.net(x)["out"]}

    ds = _Set([(9, 1), (17, 30), (5, 5)], 4)
    _assert_same_metrics(_evaluate(plain, ds, 4, batch_size=3, scales=(0.5, 1.0), flip=True),
                         _evaluate(MainHeadOnly(), ds, 4, batch_size=3, scales=(0.5, 1.0), flip=True))


def test_the_progress_of_a_distributed_evaluation_never_counts_past_the_dataset(monkeypatch):
    """Process 0 of 2 on 5 images evaluates 3 and showed 'eval 6/5' (its count times the processes)."""
    lines = []
    monkeypatch.setattr(loop.Progress, "line", staticmethod(lambda text, final: lines.append(text)))
    monkeypatch.setattr(loop.dist_utils, "all_reduce_sum", lambda t: t)  # one process standing in for both
    loop.evaluate(_tiny(num_classes=3), _Set([(5, 6)] * 5, 3), 3, None, CPU, rank=0, world_size=2)
    counts = [tuple(map(int, t.split()[1].split("/"))) for t in lines if "/" in t.split()[1]]
    assert counts and all(done <= total == 5 for done, total in counts), lines
