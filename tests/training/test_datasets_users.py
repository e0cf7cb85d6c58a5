"""Datasets as users bring them: image modes and containers, masks saved in lossy or wide formats, folders and
links where files should be, names in other encodings or Unicode forms, SBD without scipy, empty images."""

import os
import random
import sys
import unicodedata
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from training import datasets
from training.palette import palette_bytes
from training.transforms import EvalTransform, TrainTransform, to_tensors


def _folder(root, names=("a", "b", "c"), size=(12, 16), classes="background\nthing\n"):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text(classes)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / "images" / f"{n}.png")
        Image.fromarray(rng.integers(0, 2, size).astype(np.uint8), mode="L").save(root / "masks" / f"{n}.png")
    return root


# ---- images in every mode a user's tools write ------------------------------------------------------------------


def test_image_modes_and_containers_read_as_8_bit_rgb(tmp_path):
    """RGB(A), grayscale (+alpha), palette, CMYK, 1-bit, 16-bit grayscale, in PNG/JPEG/BMP/TIFF/WebP: every one
    reads as (H, W, 3) uint8 with the pixels a viewer shows (alpha dropped, gray repeated, palette looked up)."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    cases = {
        "rgba.png": (Image.fromarray(rgb).convert("RGBA"), rgb),
        "la.png": (Image.fromarray(gray).convert("LA"), np.repeat(gray[..., None], 3, 2)),
        "l.bmp": (Image.fromarray(gray), np.repeat(gray[..., None], 3, 2)),
        "p.png": (Image.fromarray(rgb).convert("P"), np.asarray(Image.fromarray(rgb).convert("P").convert("RGB"))),
        "cmyk.tif": (Image.fromarray(rgb).convert("CMYK"), rgb),
        "bits.png": (Image.fromarray(gray > 127), np.repeat(np.where(gray > 127, 255, 0)[..., None], 3, 2)),
        "deep.png": (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, 2)),
        "rgb.tiff": (Image.fromarray(rgb), rgb),
        "rgb.webp": (Image.fromarray(rgb), None),  # lossy: shape and type only
        "rgb.jpeg": (Image.fromarray(rgb), None),
    }
    for name, (im, expected) in cases.items():
        kwargs = {"lossless": True} if name.endswith(".webp") and expected is not None else {}
        im.save(tmp_path / name, **kwargs)
        out = datasets.read_image(str(tmp_path / name))
        assert out.shape == (6, 9, 3) and out.dtype == np.uint8, name
        if expected is not None:
            np.testing.assert_array_equal(out, expected, err_msg=name)


def test_a_16_bit_image_holding_8_bit_values_is_refused_not_read_black(tmp_path):
    """A uint16 array of 0..255 values saved as PNG (numpy scripts do this) is a 16-bit file; scaled from 16 bits
    every pixel became 0 or 1: a black image, trained on silently. Refused, naming the file; a real 16-bit image
    and an all-black one still read."""
    values = np.arange(48, dtype=np.uint16).reshape(6, 8) * 5  # 0..235
    Image.fromarray(values).save(tmp_path / "eight.png")
    with Image.open(tmp_path / "eight.png") as im:
        assert im.mode == "I;16"
    with pytest.raises(datasets.BadDataFile, match=r"eight\.png is a 16-bit grayscale image .*all lie in "
                                                     r"\[0, 255\] \(max 235\).*save it as an 8-bit image"):
        datasets.read_image(str(tmp_path / "eight.png"))
    Image.fromarray(values * 200).save(tmp_path / "sixteen.png")
    assert datasets.read_image(str(tmp_path / "sixteen.png")).max() == round(235 * 200 * 255 / 65535)
    Image.fromarray(np.zeros((2, 2), np.uint16)).save(tmp_path / "black.png")
    assert datasets.read_image(str(tmp_path / "black.png")).max() == 0


def test_a_16_bit_image_holding_12_bit_values_reads_with_a_warning_not_silently_nearly_black(tmp_path, monkeypatch):
    """A 12-bit sensor's image saved as a 16-bit PNG (0..4095): scaled by 255/65535 its brightest pixel became 16 of
    255, a near-black image trained on silently. It still reads (a dark 16-bit image is valid data, and a refusal
    would stop a run on its first dark frame), with one warning per process naming it and how to scale 12-bit
    data; one value above 4095 makes it a 16-bit image like any."""
    monkeypatch.setattr(datasets, "_WARNED_DARK", [])
    values = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 87)  # 0..4089
    Image.fromarray(values).save(tmp_path / "twelve.png")
    with pytest.warns(UserWarning, match=r"twelve\.png is a 16-bit grayscale image .*all lie in \[0, 4095\] \(max "
                                         r"4089\): .*nearly black \(brightest 16 of 255\).*255 / 4095"):
        assert datasets.read_image(str(tmp_path / "twelve.png")).max() == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets.read_image(str(tmp_path / "twelve.png"))  # said once
        values[0, 0] = 4096
        Image.fromarray(values).save(tmp_path / "sixteen.png")
        assert datasets.read_image(str(tmp_path / "sixteen.png")).max() == 16


# ---- masks ------------------------------------------------------------------------------------------------------


def test_a_mask_holding_jpeg_data_is_refused_whatever_its_name(tmp_path):
    """A mask converted from a JPEG (or saved as JPEG and renamed .png) holds stray values along every edge; when
    they stay below num_classes no class check catches them, and the network trained on the noise silently."""
    m = np.zeros((16, 16), np.uint8)
    m[4:12, 4:12] = 3
    Image.fromarray(m).save(tmp_path / "m.png", format="JPEG", quality=75)
    with Image.open(tmp_path / "m.png") as im:
        decoded = np.asarray(im)
    assert decoded.max() < 21 and not np.array_equal(decoded, m)  # valid VOC classes, wrong pixels
    with pytest.raises(datasets.BadDataFile, match=r"bad mask .*m\.png: the file holds JPEG data.*lossless PNG"):
        datasets.read_index_mask(str(tmp_path / "m.png"), num_classes=21)
    # The same mask as a real PNG (palette or grayscale) reads exactly.
    p = Image.fromarray(m, mode="P")
    p.putpalette(palette_bytes())
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(datasets.read_index_mask(str(tmp_path / "p.png"), num_classes=21), m)


def test_a_jpeg_mask_in_a_folder_dataset_stops_training_naming_it(tmp_path):
    root = _folder(tmp_path / "d")
    m = np.zeros((12, 16), np.uint8)
    m[3:9, 3:9] = 1
    Image.fromarray(m).save(root / "masks" / "b.png", format="JPEG")
    (root / "train.txt").write_text("a\nb\n")
    ds = datasets.FolderSegmentation(str(root), "train")
    ds[0]
    with pytest.raises(datasets.BadDataFile, match=r"masks/b\.png: the file holds JPEG data"):
        ds[1]


# ---- folders and links where files belong -----------------------------------------------------------------------


def test_folders_and_dead_links_in_a_folder_dataset_are_named_before_training(tmp_path):
    """Docs: files are checked before training starts. A dead link in images/ or masks/, or a folder named like a
    mask, passed the construction and stopped training at its first draw (hours in, on a large set)."""
    root = _folder(tmp_path / "d", names=("a", "b"))
    os.symlink(root / "gone.png", root / "images" / "dead.png")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "masks" / "dead.png")
    (root / "train.txt").write_text("a\ndead\n")
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*images/dead\.png"):
        datasets.FolderSegmentation(str(root), "train")

    (root / "train.txt").write_text("a\nb\n")
    os.remove(root / "masks" / "b.png")
    os.symlink(root / "gone.png", root / "masks" / "b.png")
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*masks/b\.png"):
        datasets.FolderSegmentation(str(root), "train")

    os.remove(root / "masks" / "b.png")
    (root / "masks" / "b.png").mkdir()
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*masks/b\.png.*b\.png \(a folder\)"):
        datasets.FolderSegmentation(str(root), "train")


def test_a_folder_named_like_an_image_is_not_an_image(tmp_path):
    root = _folder(tmp_path / "d", names=("a", "b"))
    (root / "images" / "extra.png").mkdir()  # e.g. an export tool's folder
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "masks" / "extra.png")
    (root / "val.txt").write_text("a\n")
    ds = datasets.FolderSegmentation(str(root), "train")
    assert [n for n, _, _ in ds.items] == ["b"]
    for i in range(len(ds)):
        ds[i]
    (root / "val.txt").write_text("extra\n")
    with pytest.raises(FileNotFoundError, match=r"lists 'extra' but .*images has no image of that name"):
        datasets.FolderSegmentation(str(root), "val")


# ---- names ------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="needs a file system that stores any bytes")
def test_a_file_name_in_another_encoding_does_not_crash_the_hash_split(tmp_path):
    """A Latin-1 name (an old Windows zip's café.png) is read by Python with surrogate escapes; the hash split
    encoded it as UTF-8 and crashed (UnicodeEncodeError). The split of UTF-8 names is unchanged."""
    root = _folder(tmp_path / "d", names=[f"im{i}" for i in range(12)])
    images, masks = os.fsencode(root / "images"), os.fsencode(root / "masks")
    os.rename(os.path.join(images, b"im2.png"), os.path.join(images, b"caf\xe9.png"))
    os.rename(os.path.join(masks, b"im2.png"), os.path.join(masks, b"caf\xe9.png"))
    train = datasets.FolderSegmentation(str(root), "train")
    val = datasets.FolderSegmentation(str(root), "val")
    names = sorted(n for n, _, _ in train.items + val.items)
    assert len(names) == 12 and os.fsdecode(b"caf\xe9") in names
    expected_val = sorted(n for n in names if zlib.crc32(os.fsencode(n)) % 10 == 0)
    assert [n for n, _, _ in val.items] == expected_val
    assert [n for n, _, _ in val.items if n.isascii()] == [n for n in expected_val if n.isascii()]
    for ds in (train, val):
        for i in range(len(ds)):
            image, mask, _ = ds[i]
            assert image.shape[:2] == mask.shape


def test_names_match_whatever_their_unicode_composition(tmp_path):
    """macOS stores 'é' decomposed (NFD), an editor writes it composed (NFC): the two look alike. An image saved
    on a Mac, its mask made elsewhere and a hand-written val.txt were 'no image of that name' / 'mask not found'
    although the folder visibly held them."""
    nfd, nfc = unicodedata.normalize("NFD", "café"), unicodedata.normalize("NFC", "café")
    assert nfd != nfc
    root = _folder(tmp_path / "d", names=("a", "b"))
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(root / "images" / f"{nfd}.png")
    Image.fromarray(np.ones((5, 7), np.uint8)).save(root / "masks" / f"{nfc}.png")
    (root / "val.txt").write_text(f"{nfc}\n")
    val = datasets.FolderSegmentation(str(root), "val")
    assert len(val) == 1 and val.items[0][1].endswith(f"{nfd}.png") and val.items[0][2].endswith(f"{nfc}.png")
    image, mask, _ = val[0]
    assert image.shape == (5, 7, 3) and (mask == 1).all()
    assert sorted(n for n, _, _ in datasets.FolderSegmentation(str(root), "train").items) == ["a", "b"]
    # The two spellings of one name in images/ are two files that pair with one mask: refused, as x.png + x.jpg.
    Image.fromarray(np.zeros((5, 7, 3), np.uint8)).save(root / "images" / f"{nfc}.jpg")
    with pytest.raises(ValueError, match="two images named"):
        datasets.FolderSegmentation(str(root), "val")


# ---- SBD without scipy ------------------------------------------------------------------------------------------


def _voc_with_sbd(tmp_path):
    from scipy.io import savemat

    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    sbd = tmp_path / "sbd" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    for i in ("a", "b", "c"):
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
    m = Image.fromarray(np.zeros((8, 10), np.uint8), mode="P")
    m.putpalette(palette_bytes())
    for i in ("a", "c"):
        m.save(voc / "SegmentationClass" / f"{i}.png")
    savemat(sbd / "cls" / "b.mat", {"GTcls": {"Segmentation": np.ones((8, 10), np.uint8)}})
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("c\n")
    (sbd / "train.txt").write_text("b\n")
    (sbd / "val.txt").write_text("c\n")
    return voc, sbd


def test_sbd_labels_without_scipy_are_refused_when_the_dataset_is_built(tmp_path, monkeypatch):
    """Without scipy, train_aug from --sbd-root was built, and training stopped at the first .mat drawn with
    'cannot read SBD label …/b.mat (expected a struct GTcls with field Segmentation): ModuleNotFoundError'."""
    voc, sbd = _voc_with_sbd(tmp_path)
    assert datasets.VOCSegmentation(str(voc), "train_aug", sbd_root=str(sbd))[1][1].max() == 1
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(datasets.MissingReader, match=r"--sbd-root .*: 1 of the 2 train_aug images have their "
                                                     r"labels only in SBD's MATLAB files .*pip install scipy"):
        datasets.VOCSegmentation(str(voc), "train_aug", sbd_root=str(sbd))
    assert isinstance(datasets.MissingReader("x"), (datasets.DataFileError, ImportError))
    # Splits with no .mat label need no scipy.
    assert len(datasets.VOCSegmentation(str(voc), "val", sbd_root=str(sbd))) == 1


# ---- transforms -------------------------------------------------------------------------------------------------


def test_an_empty_image_is_refused_by_the_transforms(tmp_path):
    """An image with no row or column (a library user's array): the training crop was all padding with scale 1,
    a RuntimeError from index_select otherwise."""
    for shape in ((0, 5), (5, 0)):
        image, mask = np.zeros((*shape, 3), np.uint8), np.zeros(shape, np.uint8)
        for scale in ((1.0, 1.0), (0.5, 2.0)):
            with pytest.raises(ValueError, match=r"at least one pixel, got an empty one of shape \(" + str(shape[0])):
                TrainTransform(8, scale)(image, mask, random.Random(0))
        with pytest.raises(ValueError, match="at least one pixel"):
            EvalTransform()(image, mask)
        with pytest.raises(ValueError, match="at least one pixel"):
            to_tensors(image, None)


def test_train_transform_without_a_random_stream_says_what_it_needs():
    image, mask = np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8)
    with pytest.raises(TypeError, match=r"TrainTransform needs rng, a random\.Random seeded per sample.*got NoneType"):
        TrainTransform(4)(image, mask, None)
    with pytest.raises(ValueError, match="TrainTransform needs the sample's mask, got None"):
        TrainTransform(4)(image, None, random.Random(0))
    img, lbl = TrainTransform(4)(image, mask, random.Random(0))
    assert img.shape == (3, 4, 4) and lbl.shape == (4, 4)


def test_an_rgb_mask_is_refused_with_a_hint_of_what_it_is(tmp_path):
    """The refusal says how to convert the two common RGB masks: VOC colours, and gray saved with three channels;
    an RGB mask of other colours gets the plain refusal."""
    from training.palette import voc_colormap

    m = np.array([[0, 1, 15], [15, 255, 0]], np.uint8)
    Image.fromarray(voc_colormap()[m]).save(tmp_path / "voc.png")
    with pytest.raises(datasets.BadDataFile, match=r"voc\.png: mask is an RGB colour image; .*its 4 colours are all "
                                                     r"PASCAL VOC palette colours \(classes \[0, 1, 15, 255\]\)"):
        datasets.read_index_mask(str(tmp_path / "voc.png"), num_classes=21)
    Image.fromarray(np.repeat(m[..., None], 3, 2)).convert("RGBA").save(tmp_path / "gray.png")
    with pytest.raises(datasets.BadDataFile, match=r"RGBA colour image; .*three channels are equal everywhere"):
        datasets.read_index_mask(str(tmp_path / "gray.png"))
    Image.fromarray(np.full((2, 3, 3), (1, 2, 3), np.uint8)).save(tmp_path / "other.png")
    with pytest.raises(datasets.BadDataFile, match=r"class indices \(255 = ignore\)$"):
        datasets.read_index_mask(str(tmp_path / "other.png"))


def _black_and_white_folder(path):
    """A folder dataset of 5 masks drawn white (255) on black, 28% of their pixels; val lists im0."""
    root = _folder(path, names=[f"im{i}" for i in range(5)])
    for i in range(5):
        m = np.zeros((12, 16), np.uint8)
        m[2:8, 3:12] = 255
        Image.fromarray(m).save(root / "masks" / f"im{i}.png")
    (root / "val.txt").write_text("im0\n")
    return root


def test_black_and_white_masks_warn_that_255_is_ignored(tmp_path):
    """Masks drawn white (255) on black for a 2-class set: every foreground pixel was the ignore label, never
    trained or scored, and the metrics (background alone) looked perfect, without a word."""
    root = _black_and_white_folder(tmp_path / "d")
    with pytest.warns(UserWarning, match=r"only the values 0 and 255, 255 on 28% of their pixels; 255 is the ignore "
                                         r"label .*mask // 255"):
        datasets.FolderSegmentation(str(root), "val")
    # VOC-style masks (classes with a thin 255 border) and a second dataset on the same folder: no warning.
    other = _folder(tmp_path / "e", names=("a", "b"))
    m = np.zeros((12, 16), np.uint8)
    m[3:9, 3:9], m[3, 3:9] = 1, 255
    Image.fromarray(m).save(other / "masks" / "a.png")
    (other / "val.txt").write_text("a\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets.FolderSegmentation(str(other), "val")
        datasets.FolderSegmentation(str(other), "train")
        datasets.FolderSegmentation(str(root), "train")  # warned once for this folder already


def test_train_py_prints_dataset_warnings_and_unreadable_folders_in_one_line(tmp_path, capsys, monkeypatch):
    """train.py printed the datasets' warnings in Python's raw format (`train.py:205: UserWarning: …` and a source
    line), and an images/ folder it may not list (PermissionError) was a traceback: now `warning: …` and one line."""
    import types

    import train

    root = _black_and_white_folder(tmp_path / "d")
    args = types.SimpleNamespace(dataset="folder", data_root=str(root), val_split=None, train_split=None,
                                 classes=None)
    train.build_datasets(args)
    err = capsys.readouterr().err
    assert "warning: folder dataset" in err and "255 is the ignore label" in err and "UserWarning" not in err
    assert err.count("warning:") == 1  # the train split on the same folder is not warned again

    listdir = os.listdir

    def refused(path):
        if str(path).endswith("images"):
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", refused)
    with pytest.raises(SystemExit, match=r"--dataset folder: \[Errno 13\] Permission denied: '.*images'"):
        train.build_datasets(args)


def test_decomposed_names_warn_that_the_hash_split_depends_on_their_form(tmp_path):
    """A review found the automatic split hashing the raw name while every other name comparison uses NFC: a copy
    of the dataset whose names changed form splits differently (12 of 40 'café_i' names moved). Hashing NFC instead
    would move the split of every earlier run made on decomposed names, so the split stays, and a warning says so
    and how to pin it (val.txt)."""
    composed = [f"caf\u00e9_{i}" for i in range(40)]
    root = _folder(tmp_path / "nfd", names=[unicodedata.normalize("NFD", n) for n in composed])
    with pytest.warns(UserWarning, match=r"40 image names .* are in decomposed Unicode form .* write the validation "
                                         r"names to .*val\.txt to pin the split"):
        val = datasets.FolderSegmentation(str(root), "val")
    assert [n for n, _, _ in val.items] == sorted(n for n in (unicodedata.normalize("NFD", c) for c in composed)
                                                  if zlib.crc32(os.fsencode(n)) % 10 == 0)  # unchanged
    plain = _folder(tmp_path / "nfc", names=composed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        datasets.FolderSegmentation(str(plain), "val")


# ---- found by a new-user audit of the data paths (2026-12-07) ------------------------------------------------------


def test_voc_list_entries_with_spaces_name_their_whole_image(tmp_path):
    """A VOC list line `my img` (an export that kept its file names) was cut to its first word: with a `my.jpg`
    beside it, that other image was trained on silently; without one, the error named my.jpg. The line is the id;
    'image label' path pairs (spaces inside their paths too) still give their image."""
    voc, _ = _voc_with_sbd(tmp_path)
    m = Image.open(voc / "SegmentationClass" / "a.png")
    for i, value in (("my img", 1), ("my", 2)):
        Image.fromarray(np.full((8, 10, 3), value, np.uint8)).save(voc / "JPEGImages" / f"{i}.jpg")
        m.save(voc / "SegmentationClass" / f"{i}.png")
    lists = voc / "ImageSets/Segmentation"
    (lists / "val.txt").write_text("my img\nc\n")
    assert [it[:2] for it in datasets.VOCSegmentation(str(voc), "val").items] == [
        ("my img", str(voc / "JPEGImages" / "my img.jpg")), ("c", str(voc / "JPEGImages" / "c.jpg"))]
    (lists / "val.txt").write_text("/JPEGImages/my img.jpg /SegmentationClass/my img.png\n my \n")
    assert [it[0] for it in datasets.VOCSegmentation(str(voc), "val").items] == ["my img", "my"]
    (lists / "val.txt").write_text("your img\n")
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*JPEGImages/your img\.jpg$"):
        datasets.VOCSegmentation(str(voc), "val")


def test_voc_train_aug_folder_skips_hidden_files_and_takes_upper_case_png(tmp_path):
    """SegmentationClassAug/ with macOS's `._x.png` stubs counted them as labels (training stopped at one with
    UnidentifiedImageError, or the build named `JPEGImages/._x.jpg`); an `x.PNG` label was skipped silently."""
    voc, _ = _voc_with_sbd(tmp_path)
    aug = voc / "SegmentationClassAug"
    aug.mkdir()
    m = Image.open(voc / "SegmentationClass" / "a.png")
    m.save(aug / "a.png")
    m.save(aug / "a.PNG", format="PNG")  # beside a.png: a.png is the label (the name a list gives)
    m.save(aug / "b.PNG", format="PNG")
    (aug / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (aug / "c.png").mkdir()  # a folder is no label (and c is VOC val)
    ds = datasets.VOCSegmentation(str(voc), "train_aug")
    assert [(i, os.path.basename(label)) for i, _, label in ds.items] == [("a", "a.png"), ("b", "b.PNG")]
    assert ds[1][1].shape == (8, 10)


def test_a_file_not_found_names_one_that_differs_only_in_case(tmp_path):
    voc, _ = _voc_with_sbd(tmp_path)
    os.rename(voc / "JPEGImages" / "c.jpg", voc / "JPEGImages" / "c.JPG")
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*c\.jpg; .*JPEGImages has c\.JPG, a name "
                                                r"that differs only in case \(names are matched with their case"):
        datasets.VOCSegmentation(str(voc), "val")
    root = _folder(tmp_path / "f")
    os.rename(root / "masks" / "b.png", root / "masks" / "B.png")
    (root / "train.txt").write_text("a\nb\n")
    with pytest.raises(FileNotFoundError, match=r"mask file not found: .*masks/b\.png; .*masks has B\.png, a name "
                                                "that differs only in case"):
        datasets.FolderSegmentation(str(root), "train")


def test_an_image_above_pils_pixel_limit_is_named(tmp_path, monkeypatch):
    """PIL's decompression-bomb warning named no file (and printed its own source line); above twice the limit the
    refusal said nothing of what to do. A DataWarning names the image, once per process (PIL's own warning is left
    as it is: train.py shows the DataWarning instead); the refusal says how to get on."""
    monkeypatch.setattr(datasets, "_WARNED_LARGE", [])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "big.png")  # 120 pixels: warned
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(tmp_path / "big_mask.png")
    Image.fromarray(np.zeros((15, 14, 3), np.uint8)).save(tmp_path / "huge.png")  # 210 > 2 x 100: refused
    with pytest.warns(datasets.DataWarning, match=r"image .*big\.png is 12x10 \(120 pixels\), above PIL's limit of "
                                                  r"100 .*cut such images into tiles \(said once per process; each "
                                                  r"DataLoader worker is one\)") as caught:
        assert datasets.read_image(str(tmp_path / "big.png")).shape == (10, 12, 3)
    assert {w.category for w in caught} == {datasets.DataWarning, Image.DecompressionBombWarning}
    with warnings.catch_warnings():
        warnings.simplefilter("error", datasets.DataWarning)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        datasets.read_image(str(tmp_path / "big.png"))
        assert datasets.read_index_mask(str(tmp_path / "big_mask.png"), 2).shape == (10, 12)
    with pytest.raises(datasets.UnreadableDataFile, match=r"cannot read image .*huge\.png: DecompressionBombError: "
                                                          r".*; PIL refuses images above twice its pixel limit .*cut "
                                                          "it into tiles"):
        datasets.read_image(str(tmp_path / "huge.png"))


def test_class_names_alike_in_unicodes_composed_form_are_refused(tmp_path):
    composed = "caf\u00e9"
    decomposed = unicodedata.normalize("NFD", composed)
    (tmp_path / "classes.txt").write_text(f"background\n{composed}\n{decomposed}\n")
    with pytest.raises(ValueError, match=f"lines 2 and 3 both name '{composed}' and '{decomposed}' \\(the same in "
                                         "Unicode's composed form\\)"):
        datasets.read_class_list(str(tmp_path / "classes.txt"))


def _gray_png(path, values, depth):
    """A grayscale PNG of bit depth 1, 2 or 4 (PIL writes only 1 and 8), as libpng and pypng write them."""
    import struct

    rows = b""
    for row in values:
        bits = "".join(format(int(v), f"0{depth}b") for v in row)
        bits += "0" * (-len(bits) % 8)
        rows += b"\x00" + int(bits, 2).to_bytes(len(bits) // 8, "big")

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = values.shape
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_a_low_bit_depth_grayscale_mask_reads_its_class_indices(tmp_path, depth):
    """PIL spreads a 2-bit grayscale PNG's samples 0..3 over 0, 85, 170, 255 (4-bit: x17): a mask of classes 0-2
    was refused as holding 85 and 170, and one of 0 and 3 read class 3 as the ignore label."""
    values = np.arange(24).reshape(4, 6) % min(2 ** depth, 5)
    _gray_png(tmp_path / "m.png", values, depth)
    assert np.array_equal(datasets.read_index_mask(str(tmp_path / "m.png"), 5), values)
    if depth > 1:
        with pytest.raises(datasets.BadDataFile, match=r"class indices \[3(, 4)?\] are >= num_classes=3"):
            datasets.read_index_mask(str(tmp_path / "m.png"), 3)


def test_a_train_split_left_empty_by_val_txt_says_why(tmp_path):
    root = _folder(tmp_path)
    (root / "val.txt").write_text("a\nb\nc\n")
    with pytest.raises(ValueError, match=r"split 'train' has no images: without a train\.txt it is every image .*"
                                         r"val\.txt does not list, and it lists all 3 images"):
        datasets.FolderSegmentation(str(root), "train")


def test_a_folder_list_pair_with_spaces_in_its_paths_names_its_image(tmp_path):
    """A folder dataset's 'images/x.jpg masks/x.png' line was split at its first space, as VOC's lines were: a pair
    whose paths hold spaces was refused here while VOC took it."""
    root = _folder(tmp_path, names=("my img", "b"))
    (root / "val.txt").write_text("images/my img.png masks/my img.png\n")
    assert [it[0] for it in datasets.FolderSegmentation(str(root), "val").items] == ["my img"]
