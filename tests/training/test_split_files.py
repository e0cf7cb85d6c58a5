"""Split lists naming an image twice, UTF-8 byte-order marks and other encodings
in the list files, and a folder photo stored upside down (EXIF Orientation 3) beside its upright mask."""

import numpy as np
import pytest
from PIL import Image

from training import datasets
from training.palette import palette_bytes


def _folder(tmp_path, names=("a", "b", "c"), size=(20, 30)):
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    (tmp_path / "classes.txt").write_text("background\nthing\n")
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{n}.png")
        Image.fromarray(rng.integers(0, 2, size).astype(np.uint8), mode="L").save(tmp_path / "masks" / f"{n}.png")
    return tmp_path


def _voc(tmp_path, ids=("2007_000001", "2007_000002")):
    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    for i in ids:
        Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        m = Image.fromarray(np.zeros((12, 16), np.uint8), mode="P")
        m.putpalette(palette_bytes())
        m.save(voc / "SegmentationClass" / f"{i}.png")
    return voc


def test_a_split_list_naming_an_image_twice_is_refused_naming_both_lines(tmp_path):
    # It was kept twice: the image trained twice as often and counted twice in the validation scores, silently.
    root = _folder(tmp_path / "f")
    (root / "val.txt").write_text("a\n\nb\na.png\n")
    with pytest.raises(ValueError, match=r"lines 1 and 4 both name the image 'a' \('a' and 'a.png'\)"):
        datasets.FolderSegmentation(str(root), "val")
    (root / "val.txt").write_text("a\nb\n")
    assert [n for n, _, _ in datasets.FolderSegmentation(str(root), "val").items] == ["a", "b"]

    voc = _voc(tmp_path / "v")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000001\r\n2007_000002\r\n 2007_000001 \r\n")
    with pytest.raises(ValueError, match="lines 1 and 3 both name the image '2007_000001'"):
        datasets.VOCSegmentation(str(voc), "val")


def test_list_files_with_a_byte_order_mark_or_in_another_encoding(tmp_path):
    # Notepad's UTF-8 starts with a byte-order mark: it was read into the first name (VOC: "image file not found:
    # …/JPEGImages/2007_000001.jpg" for a file that is there; classes.txt: class 0 named '\ufeffbackground').
    voc = _voc(tmp_path / "v")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n2007_000002\n", encoding="utf-8-sig")
    assert [n for n, _, _ in datasets.VOCSegmentation(str(voc), "val").items] == ["2007_000001", "2007_000002"]

    root = _folder(tmp_path / "f")
    (root / "classes.txt").write_text("background\nthing\n", encoding="utf-8-sig")
    (root / "val.txt").write_text("a\n", encoding="utf-8-sig")
    ds = datasets.FolderSegmentation(str(root), "val")
    assert ds.classes == ("background", "thing") and [n for n, _, _ in ds.items] == ["a"]

    # A list in another encoding is named (it was a bare "'utf-8' codec can't decode byte …", no file named).
    (root / "val.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"split list .*val.txt is not UTF-8 text"):
        datasets.FolderSegmentation(str(root), "val")
    (root / "classes.txt").write_bytes("background\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"class list .*classes.txt is not UTF-8 text"):
        datasets.read_class_list(str(root / "classes.txt"))


def test_an_upside_down_phone_photo_pairs_with_its_upright_mask(tmp_path):
    # Stored upside down with EXIF Orientation 3, annotated as viewers (and --predict) show it: the same size either
    # way, so the size check kept the stored pixels, 180 degrees from the mask. A mask of the stored size that does
    # not fit the upright view (Orientation 6, a tool that ignores the tag) still pairs with the stored pixels.
    root = _folder(tmp_path, names=())
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:6, :10] = 255  # a white patch at the stored top left: at the bottom right once upright
    upright = stored[::-1, ::-1]
    for name, orientation, mask in (("flipped", 3, upright[..., 0] > 0), ("sideways", 6, stored[..., 0] > 0)):
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(stored).save(root / "images" / f"{name}.png", exif=exif)
        Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "masks" / f"{name}.png")
    (root / "train.txt").write_text("flipped\nsideways\n")
    ds = datasets.FolderSegmentation(str(root), "train")
    image, mask, _ = ds[0]
    assert np.array_equal(image, upright) and np.array_equal(image[..., 0] > 0, mask == 1)
    image, mask, _ = ds[1]
    assert np.array_equal(image, stored) and np.array_equal(image[..., 0] > 0, mask == 1)
    # A mask that fits neither view names both sizes.
    Image.fromarray(np.zeros((10, 10), np.uint8), mode="L").save(root / "masks" / "sideways.png")
    with pytest.raises(datasets.BadDataFile, match=r"is 10x10 but image .*sideways.png is 30x20 \(20x30 turned up"):
        ds[1]
