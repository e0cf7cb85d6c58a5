"""training.metrics against confusion matrices and metrics computed by hand."""

import math

import pytest
import torch

from training.metrics import SegmentationMetrics, confusion_matrix, format_table, metrics_from_confusion


def test_confusion_matrix_by_hand():
    # 3 classes, one ignored pixel (255). Rows are ground truth, columns predictions.
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    cm = confusion_matrix(pred, target, 3)
    expected = torch.tensor([[1, 1, 0],
                             [0, 2, 0],
                             [1, 0, 2]])
    assert torch.equal(cm, expected)


def test_metrics_by_hand():
    cm = torch.tensor([[50, 10, 0],
                       [5, 20, 5],
                       [0, 0, 10]])
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    total = 100
    assert m["pixel_accuracy"] == pytest.approx(80 / total)
    assert m["mean_accuracy"] == pytest.approx((50 / 60 + 20 / 30 + 10 / 10) / 3)
    iou = {"a": 50 / (60 + 55 - 50), "b": 20 / (30 + 30 - 20), "c": 10 / (10 + 15 - 10)}
    assert m["per_class_iou"] == pytest.approx(iou)
    assert m["miou"] == pytest.approx(sum(iou.values()) / 3)
    assert m["fw_iou"] == pytest.approx(0.6 * iou["a"] + 0.3 * iou["b"] + 0.1 * iou["c"])
    assert "mIoU" in format_table(m | {"per_image_miou_present": 0.5})


def test_absent_class_is_excluded_from_means():
    # Class 2 appears neither in ground truth nor prediction: NaN IoU, left out of mIoU and mean accuracy.
    cm = torch.tensor([[3, 1, 0], [1, 3, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm)
    assert math.isnan(m["per_class_iou"]["2"]) and math.isnan(m["per_class_accuracy"]["2"])
    assert m["miou"] == pytest.approx(3 / 5)
    assert m["mean_accuracy"] == pytest.approx(3 / 4)


def test_dataset_level_vs_per_image_present():
    # Image 1: perfect on classes {0, 1}. Image 2: class 2 half right (2 of 4 predicted as 0).
    t1 = torch.tensor([[0, 0], [1, 1]])
    t2 = torch.tensor([[2, 2], [2, 2]])
    p2 = torch.tensor([[2, 2], [0, 0]])
    acc = SegmentationMetrics(3)
    acc.update(torch.stack([t1, p2]), torch.stack([t1, t2]))
    m = acc.compute()
    # Dataset level: cm = [[2,0,0],[0,2,0],[2,0,2]] → IoU 0: 2/4, 1: 1, 2: 2/4.
    assert m["miou"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # Per image over present classes: image 1 → (1 + 1)/2 = 1; image 2: classes {0, 2} present → (0 + 0.5)/2.
    assert m["per_image_miou_present"] == pytest.approx((1.0 + 0.25) / 2)
    assert m["num_images"] == 2


def test_bad_labels_are_named():
    with pytest.raises(ValueError, match="target has labels outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 3)
    with pytest.raises(ValueError, match="does not match"):
        confusion_matrix(torch.zeros(2, 2), torch.zeros(2, 3), 3)


def test_random_matches_dense_loop():
    c = 5
    target = torch.randint(0, c, (3, 7, 9))
    target[0, 0, :4] = 255
    pred = torch.randint(0, c, (3, 7, 9))
    cm = confusion_matrix(pred, target, c)
    ref = torch.zeros(c, c, dtype=torch.int64)
    for t, p in zip(target.flatten().tolist(), pred.flatten().tolist(), strict=True):
        if t != 255:
            ref[t, p] += 1
    assert torch.equal(cm, ref)


def test_table_prints_n_a_for_every_undefined_cell():
    # Class 1 is predicted but absent from the labels: IoU 0, accuracy undefined. Class 2 appears nowhere.
    cm = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 0, 0]])
    m = metrics_from_confusion(cm, ["bg", "cat", "dog"])
    assert m["per_class_iou"]["cat"] == 0.0 and math.isnan(m["per_class_accuracy"]["cat"])
    table = format_table(m | {"per_image_miou_present": float("nan")})
    assert "nan" not in table.lower().replace("n/a", "")
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()}
    assert rows["cat"] == ["0.00", "n/a"] and rows["dog"] == ["n/a", "n/a"] and rows["bg"] == ["75.00", "75.00"]
    assert rows["per-img"][1] == "n/a"


def test_table_columns_line_up_with_wide_class_names():
    """Class names in East Asian wide characters (two terminal columns each) or with combining marks: the numbers
    start at the same terminal column on every row (str.ljust counted characters, so they did not)."""
    import unicodedata

    names = ["背景", "猫", "cafe\u0301", "person", "ｆｕｌｌ"]
    m = metrics_from_confusion(torch.eye(len(names), dtype=torch.long) * 3, names)
    lines = format_table(m).splitlines()[: len(names) + 1]

    def columns(text):
        return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
                   for c in text)

    # the two number columns are fixed-width at the end of each row: equal row widths put them in line
    assert len({columns(line) for line in lines}) == 1, lines
