"""Found by a black-box review with real data layouts:

- a VOC-coloured palette mask whose indices were renumbered (PIL's quantize() or convert("P"), an image editor's
  re-save) was read as class indices: person pixels became class 1 (aeroplane), the ignore border class 0, with no
  word. Where the classes are VOC's it is refused now, naming the moved indices; elsewhere VOC's colours for other
  classes are the user's choice, and a palette of the mask's own colours is the user's everywhere.
- the VOC layout read its JPEGs without their EXIF Orientation tag (the folder layout and --predict honour it): a
  sideways photo (Orientation 6) with a mask drawn upright, as annotation tools exporting VOC's layout draw it, failed
  mid-run. It pairs now; where both views fit a mask, the VOC layout keeps its convention, the stored pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from training import datasets
from training.palette import IGNORE_INDEX, VOC_CLASSES, palette_bytes, voc_colormap


def _classes():
    mask = np.zeros((8, 10), np.uint8)
    mask[2:5, 2:6] = 15  # person
    mask[6:, 7:] = 1  # aeroplane
    mask[0] = IGNORE_INDEX
    return mask


def test_a_renumbered_voc_palette_mask_is_refused_for_voc_classes(tmp_path):
    rgb = voc_colormap()[_classes()]
    Image.fromarray(rgb).quantize(colors=8).save(tmp_path / "quantized.png")
    with pytest.raises(datasets.BadDataFile, match=r"quantized\.png: a palette PNG whose colours are all PASCAL VOC "
                                                   r"palette colours, but at other indices \(index \d has the colour "
                                                   r"of VOC index (15|255|1|0)"):
        datasets.read_index_mask(str(tmp_path / "quantized.png"), 21, voc_classes=True)
    # The same file in a dataset of other classes: VOC's colours for its own, compacted classes are the user's
    # choice (a review: a [background, person, car] folder dataset in VOC colours at indices 0, 1, 2).
    assert datasets.read_index_mask(str(tmp_path / "quantized.png"), 21).max() <= 3


def test_a_folder_dataset_of_vocs_classes_refuses_a_renumbered_mask(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(voc_colormap()[_classes()]).quantize(colors=8).save(tmp_path / "masks" / "a.png")
    (tmp_path / "val.txt").write_text("a\n")
    (tmp_path / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    with pytest.raises(datasets.BadDataFile, match="its indices were renumbered"):
        datasets.FolderSegmentation(str(tmp_path), "val")[0]
    (tmp_path / "classes.txt").write_text("background\nperson\ncar\nplane\n")
    assert datasets.FolderSegmentation(str(tmp_path), "val")[0][1].shape == (8, 10)


def test_palettes_that_are_no_renumbering_are_read_as_stored(tmp_path):
    # one colour at two indices (an all-black palette, or a binary mask whose palette repeats a VOC colour): no
    # renumbering maps two classes to one
    flat = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    flat.putpalette([0, 0, 0] * 256)
    flat.save(tmp_path / "flat.png")
    assert datasets.read_index_mask(str(tmp_path / "flat.png"), 21, voc_classes=True).max() == 1


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


def test_voc_photo_stored_sideways_pairs_with_its_upright_mask(tmp_path):
    # Orientation 6, 20x30 stored: a mask of the upright view (30x20) fits only the photo turned upright; it failed
    # mid-run with a size mismatch.
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:5, :5] = 255  # a white corner, stored at the top left
    mask = (np.rot90(stored, k=-1)[..., 0] > 127).astype(np.uint8)  # drawn on the view an annotation tool shows
    image, got, _ = _voc_with(tmp_path, stored, 6, mask)[0]
    assert image.shape[:2] == mask.shape == got.shape == (30, 20)
    assert ((image[..., 0] > 127) == mask.astype(bool)).mean() > 0.99


@pytest.mark.parametrize("orientation", [3, 6])
def test_voc_mask_of_the_stored_pixels_pairs_with_them(tmp_path, orientation):
    # VOC's convention (its own and SBD's annotations, tools that ignore the tag): where the stored pixels fit the
    # mask they are the image, also where the upright view has the same size (Orientation 3) - a review found an
    # upright-first rule misaligning such masks in the VOC layout.
    stored = np.zeros((20, 30, 3), np.uint8)
    stored[:5, :5] = 255
    mask = (stored[..., 0] > 127).astype(np.uint8)
    image, _, _ = _voc_with(tmp_path, stored, orientation, mask)[0]
    assert image.shape[:2] == (20, 30) and ((image[..., 0] > 127) == mask.astype(bool)).mean() > 0.99
