"""Found by a black-box review with real data layouts:

- a VOC-coloured palette mask whose indices were renumbered (PIL's quantize() or convert("P"), an image editor's
  re-save) was read as class indices: person pixels became class 1 (aeroplane), the ignore border class 0, with no
  word. It is refused now, naming the moved indices; a palette of the mask's own colours is still the user's.
- the VOC layout read its JPEGs without their EXIF Orientation tag (the folder layout and --predict honour it): an
  upside-down photo (Orientation 3) trained 180 degrees from its upright mask, a sideways one (6) failed mid-run.
  Annotation tools export datasets in VOC's layout; VOC's own JPEGs carry no such tag.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training import datasets
from training.palette import IGNORE_INDEX, palette_bytes, voc_colormap


def _classes():
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 2:6] = 15  # person
    mask[6:, 7:] = 1  # aeroplane
    mask[0] = IGNORE_INDEX
    return mask


def test_a_renumbered_voc_palette_mask_is_refused(tmp_path):
    rgb = voc_colormap()[_classes()]
    Image.fromarray(rgb).quantize(colors=8).save(tmp_path / "quantized.png")
    with pytest.raises(datasets.BadDataFile, match=r"quantized\.png: a palette PNG whose colours are all PASCAL VOC "
                                                   r"palette colours, but at other indices \(index \d has the colour "
                                                   r"of VOC index (15|255|1|0)"):
        datasets.read_index_mask(str(tmp_path / "quantized.png"), 21)


def test_voc_palette_masks_and_palettes_of_their_own_are_read_as_stored(tmp_path):
    mask = _classes()
    voc = Image.fromarray(mask, "P")
    voc.putpalette(palette_bytes())
    voc.save(tmp_path / "voc.png")
    np.testing.assert_array_equal(datasets.read_index_mask(str(tmp_path / "voc.png"), 21), mask)
    # the user's own colours (pure red for class 1): the indices are the classes
    own = Image.fromarray((mask == 15).astype(np.uint8), "P")
    own.putpalette([0, 0, 0, 255, 0, 0])
    own.save(tmp_path / "own.png")
    np.testing.assert_array_equal(datasets.read_index_mask(str(tmp_path / "own.png"), 2), mask == 15)
    # VOC colours at other indices beside one of the mask's own: its own palette, accepted
    mixed = Image.fromarray(np.array([[0, 1], [2, 2]], np.uint8), "P")
    mixed.putpalette([*voc_colormap()[0], *voc_colormap()[15], 255, 0, 0])
    mixed.save(tmp_path / "mixed.png")
    assert datasets.read_index_mask(str(tmp_path / "mixed.png"), 16).max() == 2


def _voc_with(tmp_path, stored: np.ndarray, orientation: int, mask: np.ndarray):
    voc = tmp_path / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / d).mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(voc / "JPEGImages" / "2007_000001.jpg", exif=exif, quality=100)
    m = Image.fromarray(mask, "P")
    m.putpalette(palette_bytes())
    m.save(voc / "SegmentationClass" / "2007_000001.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n")
    return datasets.VOCSegmentation(str(voc), "val")


@pytest.mark.parametrize(("orientation", "turn"), [(3, 2), (6, -1)], ids=["upside-down", "sideways"])
def test_voc_photo_with_an_exif_orientation_pairs_with_its_upright_mask(tmp_path, orientation, turn):
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:5, :5] = 255  # a white corner, stored at the top left
    upright = np.rot90(stored, k=turn)
    mask = (upright[..., 0] > 127).astype(np.uint8)  # drawn on the view an annotation tool shows
    image, got, _ = _voc_with(tmp_path, stored, orientation, mask)[0]
    assert image.shape[:2] == mask.shape == got.shape
    assert ((image[..., 0] > 127) == mask.astype(bool)).mean() > 0.99


def test_voc_mask_of_the_stored_pixels_pairs_with_them(tmp_path):
    # A tool that ignores the tag drew the mask on the stored pixels: they pair as stored (as in the folder layout).
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:5, :5] = 255
    mask = (stored[..., 0] > 127).astype(np.uint8)
    image, _, _ = _voc_with(tmp_path, stored, 6, mask)[0]
    assert image.shape[:2] == (20, 30) and ((image[..., 0] > 127) == mask.astype(bool)).mean() > 0.99
