"""Segmentation datasets: a built-in synthetic set, PASCAL VOC 2012 + SBD (train_aug / val), and a user folder.

Every dataset returns ``(image, mask, name)``: image (H, W, 3) uint8 RGB, mask (H, W) uint8 class indices with
255 = ignore, name a string. Joint augmentation happens in training/transforms.py. Files are checked at
construction (a missing file is named before training starts); a file that fails to decode later is named too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import unicodedata
import warnings
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from training.palette import IGNORE_INDEX, VOC_CLASSES, voc_colormap

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# A split list's 'JPEGImages/x.jpg SegmentationClassAug/x.png' line: an image path, whitespace, a label path (either
# may hold spaces)
_PAIR = re.compile(r"(.+?(?:" + "|".join(re.escape(e) for e in IMAGE_EXTENSIONS) + r"))\s+(\S.*\.(?:png|mat))",
                   re.IGNORECASE)


def is_image_name(name: str) -> bool:
    """A file name a folder of images counts: an image extension (any case), not hidden (a dot-file: macOS's
    "._x.jpg" resource forks beside every copied image, which no image reader decodes)."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def unread_image_files(folder: str, names: list[str]) -> str | None:
    """A one-line account of the files among `names` (entries of `folder`) in an image format PIL knows but the
    folder readers skip (.gif, .ppm, .jp2, ...): a user who put them there expects them read. None when there are
    none (other files, say a README, are no images to miss)."""
    Image.init()
    known = {ext: kind for ext, kind in Image.registered_extensions().items()
             if kind in Image.OPEN and kind not in _NOT_IMAGES}
    unread = [n for n in names if not n.startswith(".") and os.path.splitext(n)[1].lower() in known
              and not is_image_name(n) and os.path.isfile(os.path.join(folder, n))]
    if not unread:
        return None
    kinds = sorted({os.path.splitext(n)[1].lower() for n in unread})
    many = len(unread) > 1
    it = "them" if many else "it"
    renamed = [k for k in kinds if known[k] in ("JPEG", "PNG")]  # .jfif, .jpe, .apng: a format read, another name
    return (f"{len(unread)} file{'s' if many else ''} in {folder} (e.g. {unread[0]!r}) {'are' if many else 'is'} in "
            f"a format not read here ({', '.join(kinds)}; read: {', '.join(IMAGE_EXTENSIONS)}) and skipped: convert "
            f"{it} to PNG or JPEG to use {it}"
            + (f" (a {'/'.join(renamed)} file is a JPEG or PNG already: rename it)" if renamed else ""))


# PIL formats that open no picture a user puts beside photos: stubs needing a handler (BUFR, GRIB, HDF5), Windows
# metafiles, MPEG (identified only), EPS (needs Ghostscript).
_NOT_IMAGES = frozenset({"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "EPS"})


# ---- file reading with errors that name the file ---------------------------------------------------------------


class DataFileError(Exception):
    """A sample's file that cannot be used (missing, undecodable, or holding bad values); the message names it.
    train.py turns it into a one-line exit; the concrete classes are also the built-in error they refine."""


class MissingDataFile(DataFileError, FileNotFoundError):
    pass


class UnreadableDataFile(DataFileError, RuntimeError):
    pass


class BadDataFile(DataFileError, ValueError):
    pass


class MissingReader(DataFileError, ImportError):
    """A dataset's files need a package that is not installed (scipy for SBD's .mat labels)."""


_WARNED_LARGE: list[str] = []  # the first image above PIL's decompression-bomb warning limit, once per process


@contextlib.contextmanager
def _opened(path: str):
    """Image.open(path) as a context; beside PIL's warning for an image above its pixel limit (Image.MAX_IMAGE_PIXELS,
    89.5 MP: "could be decompression bomb DOS attack", naming no file; train.py shows this one instead) a DataWarning
    naming the file, said once per process; above twice the limit PIL refuses to open it (DecompressionBombError),
    which _bomb_hint explains. (The warnings filters are left alone: changing them, even for a moment, makes every
    warning shown once per place show again.)"""
    im = Image.open(path)
    with im:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and im.width * im.height > limit and not _WARNED_LARGE:
            _WARNED_LARGE.append(path)
            warnings.warn(f"image {path} is {im.width}x{im.height} ({im.width * im.height:,} pixels), above PIL's "
                          f"limit of {limit:,} for reading without this warning (a guard against decompression "
                          "bombs); read anyway, slowly: cut such images into tiles (said once per process; each "
                          "DataLoader worker is one)", DataWarning, stacklevel=4)
        yield im


def _bomb_hint(e: Exception) -> str:
    return ("; PIL refuses images above twice its pixel limit (Image.MAX_IMAGE_PIXELS) as possible decompression "
            "bombs: cut it into tiles (training reads --crop-size crops of it anyway)"
            if isinstance(e, Image.DecompressionBombError) else "")


def read_image(path: str, exif_orientation: bool = False) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8; errors name the file. exif_orientation: turn it upright as its EXIF
    Orientation tag says (as image viewers show a phone photo); else its pixels as stored."""
    if not os.path.isfile(path):
        raise MissingDataFile(f"image file not found: {path}" + (" (a folder of that name)" if os.path.isdir(path)
                                                                 else ""))
    try:
        with _opened(path) as im:
            if exif_orientation and im.getexif().get(0x0112, 1) != 1:  # 0x0112: Orientation; 1: upright already
                im = ImageOps.exif_transpose(im)  # (it copies an upright image whole: not called for one)
            if im.mode in WIDE_MODES:  # convert("RGB") would clip every value above 255 to white
                return _rgb_from_wide(im, path)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except BadDataFile:
        raise
    except Exception as e:  # PIL raises several types for truncated or foreign files
        raise UnreadableDataFile(f"cannot read image {path}: {type(e).__name__}: {e}{_bomb_hint(e)}") from e


class DataWarning(UserWarning):
    """A warning about the data (an image, a mask, a folder's names): train.py prints it as one `warning:` line."""


_WARNED_DARK: list[str] = []  # the first image read nearly black (_rgb_from_wide): warned about once per process
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # single-channel images with more than 8 bits


def _rgb_from_wide(im: Image.Image, path: str) -> np.ndarray:
    """A 16-bit grayscale image (PIL mode I;16*, or I holding 0..65535) as 8-bit RGB, scaled by 255/65535; a
    32-bit integer or float image has no range to scale from and is refused, naming the file and its mode; so is
    one whose largest value is 1 to 255 (8-bit data in a 16-bit file: scaled, it would be black). One whose largest
    value is 256 to 4095 reads nearly black (at most 16 of 255): a 10- or 12-bit sensor's data, or a dark 16-bit
    image; a warning (once per process) says so and how to scale the first."""
    values = np.asarray(im, dtype=np.float64)
    if im.mode == "F" or (im.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535)):
        raise BadDataFile(f"image {path} is a {'float' if im.mode == 'F' else '32-bit integer'} image (PIL mode "
                          f"{im.mode}); expected 8-bit or 16-bit RGB or grayscale: convert it to 8-bit first")
    top = values.max() if values.size else 0
    kind = '16-bit' if im.mode.startswith('I;16') else 'wide'
    if 0 < top <= 255:  # scaled by 255/65535 every pixel would be 0 or 1: black
        raise BadDataFile(f"image {path} is a {kind} grayscale image (PIL mode {im.mode}) whose values all lie in "
                          f"[0, 255] (max {top:.0f}): 8-bit data stored with more bits? Scaled from 16 bits to 8 it "
                          "would be black: save it as an 8-bit image")
    if top <= 4095 and top and not _WARNED_DARK:
        _WARNED_DARK.append(path)
        warnings.warn(f"image {path} is a {kind} grayscale image (PIL mode {im.mode}) whose values all lie in "
                      f"[0, 4095] (max {top:.0f}): scaled from 16 bits to 8 it reads nearly black (brightest "
                      f"{round(top * 255 / 65535)} of 255). If it holds 10- or 12-bit data (a sensor's), scale it "
                      "to 8 bits by its own range (e.g. values * 255 / 4095 for 12-bit data) and save that (said "
                      "once per process; each DataLoader worker is one)", DataWarning, stacklevel=3)
    gray = np.rint(values * (255.0 / 65535.0)).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def image_for_mask(image_path: str, mask: np.ndarray, mask_path: str, kind: str, *, upright_first: bool = True
                   ) -> np.ndarray:
    """The image that `mask` labels, for a photo with an EXIF Orientation tag (a phone's, stored sideways or upside
    down): turned upright, as image viewers, annotation tools and --predict show it, or as stored (tools that ignore
    the tag, and VOC's and SBD's own annotations). Where only one of the two views has the mask's size, that one;
    where both have it (Orientation 2, 3 or 4, or a square image), the upright view if `upright_first` (the folder
    layout: checking the size alone would pair an upside-down photo unturned with its upright mask, 180 degrees
    apart), else the stored pixels (the VOC layout: its convention). `kind` names the mask in the error ("mask",
    "label")."""
    image = read_image(image_path, exif_orientation=upright_first)
    if mask.shape == image.shape[:2]:
        return image
    other = read_image(image_path, exif_orientation=not upright_first)
    if other.shape[:2] == mask.shape:
        return other
    stored, upright = (other, image) if upright_first else (image, other)
    raise BadDataFile(f"{kind} {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                      f"{stored.shape[1]}x{stored.shape[0]}"
                      + (f" ({upright.shape[1]}x{upright.shape[0]} turned upright as its EXIF Orientation tag says)"
                         if stored.shape != upright.shape else ""))


LOSSY_FORMATS = ("JPEG", "MPO")  # PIL's names of formats that always store lossy pixels (MPO: multi-picture JPEG)


def read_index_mask(path: str, num_classes: int | None = None, *, voc_classes: bool = False) -> np.ndarray:
    """A class-index mask (palette 'P' or grayscale 'L'/'I' PNG) as (H, W) uint8; errors name the file.

    Palette PNGs store class indices directly (VOC's SegmentationClass); an RGB mask is refused with a hint,
    because mapping colours back to classes is ambiguous; so is a file holding JPEG data, whatever its name.
    voc_classes: the mask's classes are PASCAL VOC's (the VOC layout, or a folder dataset whose class list is VOC's):
    a palette mask in VOC's colours whose indices were renumbered is then refused (`_refuse_renumbered_palette`).
    """
    if not os.path.isfile(path):
        raise MissingDataFile(f"mask file not found: {path}" + (" (a folder of that name)" if os.path.isdir(path)
                                                                else ""))
    try:
        with _opened(path) as im:
            mode = im.mode
            if im.format in LOSSY_FORMATS:  # whatever the file's name says (x.png that holds JPEG data)
                raise BadDataFile(
                    f"the file holds {im.format} data, whose lossy compression changes class indices along every "
                    "edge (stray values that may still be valid classes); expected a lossless PNG of class indices: "
                    "save the mask as PNG from its source, not converted from a JPEG"
                )
            if mode in ("RGB", "RGBA"):
                raise BadDataFile(
                    f"mask is an {mode} colour image; expected a palette (P) or single-channel index PNG whose pixel "
                    f"values are class indices (255 = ignore){_colour_mask_hint(np.asarray(im.convert('RGB')))}"
                )
            depth_scale = _low_depth_scale(im)
            arr = np.asarray(im)
            if depth_scale > 1:  # PIL spreads 2- and 4-bit gray over 0..255; a mask's samples are class indices
                arr = arr // depth_scale
            if voc_classes and mode == "P" and arr.ndim == 2:
                _refuse_renumbered_palette(im.getpalette(), arr)
    except ValueError as e:  # (BadDataFile too: named with the file here)
        raise BadDataFile(f"bad mask {path}: {e}") from e
    except Exception as e:
        raise UnreadableDataFile(f"cannot read mask {path}: {type(e).__name__}: {e}{_bomb_hint(e)}") from e
    if arr.ndim != 2:
        raise BadDataFile(f"bad mask {path}: expected a single-channel image, got shape {arr.shape}")
    return class_index_mask(arr, path, num_classes)


def _low_depth_scale(im: Image.Image) -> int:
    """What PIL multiplied a 2- or 4-bit grayscale PNG's samples by (85, 17; its raw modes L;2 and L;4, read before
    the pixels are loaded), 1 for every other image: a 2-bit mask holding classes 0-2 read as 0, 85 and 170."""
    if im.format != "PNG" or im.mode != "L" or not im.tile:
        return 1
    raw = im.tile[0][3]
    raw = raw[0] if isinstance(raw, tuple) and raw else raw
    return {"L;2": 85, "L;4": 17}.get(raw, 1)


@functools.cache
def _voc_codes() -> dict[tuple[int, int, int], int]:
    """(r, g, b) -> its index in PASCAL VOC's palette."""
    return {tuple(int(v) for v in c): i for i, c in enumerate(voc_colormap())}


def _refuse_renumbered_palette(palette: list[int] | None, arr: np.ndarray) -> None:
    """For masks of PASCAL VOC's classes: refuse a palette mask whose used colours are distinct VOC colours, some at
    another index than VOC's: a VOC-coloured mask whose indices were renumbered (PIL's quantize() or convert("P"),
    an image editor's re-save), so its pixel values are not the classes its colours show. A colour of the mask's own
    (not VOC's), or one colour at two indices (no renumbering maps two classes to one), leaves it as it is."""
    if not palette:
        return
    codes = _voc_codes()
    moved, seen = [], set()
    for index in np.flatnonzero(np.bincount(arr.ravel(), minlength=256)).tolist():
        voc = codes.get(tuple(palette[3 * index:3 * index + 3]))
        if voc is None or voc in seen:
            return  # a colour of the mask's own palette, or a palette that is no renumbering of VOC's
        seen.add(voc)
        if voc != index:
            moved.append(f"index {index} has the colour of VOC index {voc}")
    if moved:
        raise BadDataFile(
            "a palette PNG whose colours are all PASCAL VOC palette colours, but at other indices "
            f"({', '.join(moved[:4])}{', ...' if len(moved) > 4 else ''}): its indices were renumbered (PIL's "
            "quantize() or convert('P'), or an image editor, reorders a palette), so its pixel values are not the "
            "classes its colours show. Rebuild it: each colour's index in training.palette.voc_colormap() as the "
            "pixel value. If the palette is your own and the pixel values are the classes, save the mask as a "
            "grayscale (L) PNG")


def _colour_mask_hint(rgb: np.ndarray) -> str:
    """What an RGB mask most likely is, and how to convert it (for the error that refuses it)."""
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
        return ("; its three channels are equal everywhere: a single-channel mask saved as RGB: save its first "
                "channel as a grayscale (L) PNG")
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    codes = _voc_codes()
    indices = [codes.get(tuple(int(v) for v in c)) for c in colours]
    if all(i is not None for i in indices):
        return (f"; its {len(colours)} colours are all PASCAL VOC palette colours (classes {sorted(indices)}): a VOC-"
                "style mask saved as RGB: convert each colour to its index in training.palette.voc_colormap() and "
                "save the indices as a palette or grayscale PNG")
    return ""


def class_index_mask(arr: np.ndarray, path: str, num_classes: int | None = None) -> np.ndarray:
    """A decoded mask's values checked as class indices and returned as uint8: integers in [0, 255], each below
    `num_classes` or the ignore label 255. Every mask reader (PNG, SBD .mat) goes through it; errors name `path`."""
    if arr.dtype.kind == "f":  # a float TIFF, a MATLAB double: whole numbers only, never truncated silently
        fractional = ~np.isfinite(arr) | (arr != np.round(arr))
        if fractional.any():
            raise BadDataFile(f"bad mask {path}: values must be whole-number class indices, got "
                              f"{arr[fractional].flat[0]}")
    elif arr.dtype.kind not in "biu":
        raise BadDataFile(f"bad mask {path}: values must be class indices, got an array of dtype {arr.dtype}")
    if arr.max(initial=0) > 255 or arr.min(initial=0) < 0:
        raise BadDataFile(f"bad mask {path}: values must be class indices in [0, 255], got [{arr.min()}, {arr.max()}]")
    arr = arr.astype(np.uint8)
    if num_classes is not None:
        bad = (arr >= num_classes) & (arr != IGNORE_INDEX)
        if bad.any():
            raise BadDataFile(
                f"bad mask {path}: class indices {sorted(np.unique(arr[bad]).tolist())} are >= num_classes="
                f"{num_classes} (and not the ignore label {IGNORE_INDEX})"
            )
    return arr


def read_sbd_mat(path: str, num_classes: int | None = None) -> np.ndarray:
    """The class mask of an SBD ``dataset/cls/*.mat`` file (GTcls.Segmentation) as (H, W) uint8, its values
    checked as read_index_mask checks a PNG's (never wrapped to 8 bits)."""
    if not os.path.isfile(path):
        raise MissingDataFile(f"SBD label file not found: {path}")
    try:
        from scipy.io import loadmat

        mat = loadmat(path, mat_dtype=False, squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except Exception as e:
        raise UnreadableDataFile(f"cannot read SBD label {path} (expected a struct GTcls with field Segmentation): "
                           f"{type(e).__name__}: {e}") from e
    if seg.ndim != 2:
        raise BadDataFile(f"bad SBD label {path}: GTcls.Segmentation has shape {seg.shape}, expected (H, W)")
    return class_index_mask(seg, path, num_classes)


def _read_text_lines(path: str, what: str) -> list[str]:
    """A text file's lines without their line ends, read as UTF-8 whatever the locale; a byte-order mark (Windows
    Notepad writes one) is dropped, not left in the first name; a file in another encoding is named."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e}): save it as UTF-8") from None


def read_split(path: str) -> list[tuple[int, str]]:
    """(line number, entry) for every non-blank line of a split list file, the entry without its line end (a name
    may hold spaces and dots; how an entry names an image is the dataset's to say: _list_ids for VOC, _folder_names
    for a folder; the line numbers name a repeated image's two lines)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split list not found: {path}")
    entries = [(n, line) for n, line in enumerate(_read_text_lines(path, "split list"), 1) if line.strip()]
    if not entries:
        raise ValueError(f"split list {path} is empty")
    return entries


def _refuse_repeats(path: str, numbered_names: Iterable[tuple[int, str, str]]) -> None:
    """Refuse a split list that names an image twice (as the same or another spelling: `x` and `x.jpg`): the
    image would count twice, in training and in the validation scores. numbered_names: (line, entry, name)."""
    first: dict[str, tuple[int, str]] = {}
    for line, entry, name in numbered_names:
        if name in first:
            line0, entry0 = first[name]
            same = f"{entry0.strip()!r}" + ("" if entry0.strip() == entry.strip() else f" and {entry.strip()!r}")
            raise ValueError(f"split list {path}: lines {line0} and {line} both name the image {name!r} ({same}); "
                             "list each image once: a repeated one would count twice in training and in the "
                             "validation scores")
        first[name] = (line, entry)


def _check_exist(paths: Sequence[str], what: str) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{what} file not found: {missing[0]}{more}{_case_hint(missing[0])}")


def _case_hint(path: str) -> str:
    """'; FOLDER has X, a name that differs only in case ...' when the folder of a file not found holds files whose
    names differ from its name only in case (x.JPG for x.jpg, IMG3.png for img3.png); else ''."""
    folder, name = os.path.split(path)
    try:
        key = _nfc(name).casefold()
        twins = sorted(f for f in os.listdir(folder or ".") if f != name and _nfc(f).casefold() == key)
    except OSError:
        return ""
    return (f"; {folder or '.'} has {', '.join(twins)}, a name that differs only in case (names are matched with "
            "their case: rename the file)" if twins else "")


# ---- which file a crashed DataLoader worker was reading --------------------------------------------------------


def describe_source(dataset, index: int) -> str:
    """The file(s) behind sample `index`, looking through wrappers (Subset, objects with a `.dataset`)."""
    while True:
        if isinstance(dataset, torch.utils.data.Subset):
            dataset, index = dataset.dataset, dataset.indices[index]
        elif hasattr(dataset, "source"):
            return dataset.source(index)
        elif getattr(dataset, "dataset", None) is not None:
            dataset = dataset.dataset
        else:
            return f"sample {index} of {type(dataset).__name__}"


class WorkerCrashError(DataFileError, RuntimeError):
    """A DataLoader worker died (signal or exit) while reading; the message names the file."""


_WORKER_CRASH = re.compile(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\)")


def _crash_pids(error: BaseException) -> list[int] | None:
    """The worker pids a DataLoader crash error names ("DataLoader worker (pid(s) ...) exited unexpectedly", "...
    (pid N) is killed by signal"), or None when `error` is not one."""
    match = _WORKER_CRASH.search(str(error)) if isinstance(error, RuntimeError) else None
    return None if match is None else [int(p) for p in re.findall(r"\d+", match.group(1))]


class ReadTracker:
    """Records, in shared memory, the sample each DataLoader worker is reading, so that a worker killed outright
    (a segfault in an image decoder, the OOM killer: no Python exception, only "DataLoader worker exited
    unexpectedly") is reported with the file it was reading.

    `dataset` is the wrapped dataset to give the DataLoader; run the loop over the loader's iterator inside
    `with tracker.reporting(batches):` to get the iterator shut down when the block ends and a worker crash re-raised
    as WorkerCrashError naming the file. With num_workers=0 it changes nothing: errors are raised in this process and
    name their file.
    """

    def __init__(self, dataset, num_workers: int) -> None:
        self.inner = dataset
        self.dataset = _Tracked(dataset, max(1, num_workers)) if num_workers > 0 else dataset

    def reading(self, pids: Iterable[int] | None = None) -> list[str]:
        """What the workers (those with the given pids, or all) were reading and had not finished."""
        if self.dataset is self.inner:
            return []
        wanted = set(pids) if pids else None
        return [f"{describe_source(self.inner, index)} (worker pid {pid})" for index, pid in self.dataset.slots.tolist()
                if index >= 0 and (wanted is None or pid in wanted)]

    def explain(self, error: BaseException, crashed: Sequence[tuple[int, int]] = (),
                workers: Sequence[int] | None = None) -> BaseException | None:
        """A worker-crash error naming the file being read, or None when `error` is not a crash of this loader's
        workers.

        crashed: (pid, exit code) of the workers that died on their own (`shut_down`'s answer). A worker that dies
        while this process is fetching a batch it sent can surface as the transport's error instead of DataLoader's
        "worker ... exited unexpectedly" (its socket closed before it was a zombie: ConnectionRefusedError from
        unpickling the batch); with a crashed worker, such an error raised inside the loader (torch.utils.data,
        multiprocessing) is reported as the crash. workers: the pids of the loader this tracker feeds (None:
        unknown); a crash DataLoader reports of another loader's worker (the training loader's, during an
        evaluation inside fit) is left to that loader's tracker."""
        if isinstance(error, WorkerCrashError):
            return None
        text = str(error)
        pids = _crash_pids(error)
        if pids is not None:
            if workers is not None and not set(pids) & set(workers):
                return None
        elif crashed and isinstance(error, (RuntimeError, OSError, EOFError)) and _raised_in_loader(error):
            pids = [pid for pid, _ in crashed]
            died = ", ".join(f"pid {pid} {_exit_status(code)}" for pid, code in crashed)
            text = f"DataLoader worker ({died}) while the loader was running ({type(error).__name__}: {text})"
        else:
            return None
        files = self.reading(pids) or self.reading()
        where = "; ".join(files) if files else "no sample in flight (it died between samples)"
        return WorkerCrashError(f"{text.strip().rstrip('.')}. It was reading: {where}")

    @contextlib.contextmanager
    def reporting(self, batches=None) -> Iterator[None]:
        """Shut `batches` (a DataLoader iterator; None: none) down when the block ends, normally or by an error, and
        re-raise a worker crash inside the block (DataLoader reports it from next() or from its SIGCHLD handler,
        wherever the main thread is) with the file the worker was reading. The iterator is shut down before the
        error is explained: the workers' exit codes tell which crashed, and a worker dying meanwhile (several can be
        killed at once) is reported as a crash too, not as DataLoader's bare error."""
        workers = [w.pid for w in getattr(batches, "_workers", ())] or None
        try:
            yield
        except Exception as e:
            better = self.explain(e, self._shut_down(batches, workers), workers)
            if better is None:
                raise
            raise better from e
        finally:
            self._shut_down(batches, workers)

    def _shut_down(self, batches, workers: Sequence[int] | None) -> list[tuple[int, int]]:
        """shut_down(batches), a crash that DataLoader's SIGCHLD handler raises around it explained."""
        try:
            return shut_down(batches)
        except RuntimeError as late:
            better = self.explain(late, (), workers)
            if better is None:
                raise
            raise better from late


def _raised_in_loader(error: BaseException) -> bool:
    """Whether `error` was raised inside the data loading machinery (torch.utils.data, multiprocessing)."""
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if module.startswith(("torch.utils.data", "multiprocessing", "torch.multiprocessing")):
            return True
        tb = tb.tb_next
    return False


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def shut_down(batches) -> list[tuple[int, int]]:
    """Shut down a DataLoader iterator's workers now, with the method its finalizer calls (a single-process iterator,
    or None, has none), and return (pid, exit code) of the workers that died on their own: killed by a signal other
    than the shutdown's SIGTERM, or exited with an error. For the end of a loop an error may leave: the finalizer
    runs only when the error's traceback, whose frames hold the iterator, is freed, and until then a crashed
    worker's pid stays registered and DataLoader's SIGCHLD handler raises "DataLoader worker ... is killed" wherever
    the main thread is (in a CI run: in pytest's own reporting, an INTERNALERROR). The shutdown keeps the pids on the
    handler until its end (so that a worker killed mid-shutdown cannot hang it); the crash the handler raises from
    inside it for one of the iterator's workers is taken here: the shutdown's own cleanup has run, and the dead
    worker's exit code reports it."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is None:
        return []
    workers = getattr(batches, "_workers", ())
    try:
        shutdown()
    except RuntimeError as e:
        pids = _crash_pids(e)  # (another loader's worker: raised on, for its own report)
        if pids is None or not set(pids) <= {w.pid for w in workers}:
            raise
    return [(w.pid, w.exitcode) for w in workers if w.exitcode not in (None, 0, -signal.SIGTERM)]


class _Tracked(torch.utils.data.Dataset):
    def __init__(self, dataset, slots: int) -> None:
        self.dataset = dataset
        # (index being read or -1, worker pid) per worker; shared memory, so the parent sees the workers' writes.
        self.slots = torch.full((slots, 2), -1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        info = torch.utils.data.get_worker_info()
        slot = self.slots[info.id if info is not None else 0]
        slot[0], slot[1] = key[0] if isinstance(key, tuple) else key, os.getpid()
        item = self.dataset[key]
        slot[0] = -1  # left set when reading raised: the parent may report it with the error
        return item


# ---- synthetic shapes ------------------------------------------------------------------------------------------

SHAPES = ("disc", "square", "triangle", "ring", "cross")
TEXTURES = ("hstripes", "vstripes", "checker", "dots")
SYNTHETIC_CLASSES = ("background",) + tuple(f"{s}-{t}" for s in SHAPES for t in TEXTURES)
_SPLIT_IDS = {"train": 1, "val": 2, "test": 3}


class SyntheticShapes:
    """A deterministic 21-class segmentation set: 5 shapes x 4 textures on textured backgrounds.

    Class = 1 + 4·shape + texture. Each object gets two random colours, so colour alone says nothing: the class
    is the texture (horizontal stripes, vertical stripes, checkerboard, dots; period 6-10 px) together with the
    outline (disc, square, triangle, ring, cross). Objects vary in size (radius 20-42% of the image), overlap
    (later objects occlude earlier ones; a ring's hole shows what lies below) and may be cut by the border.
    The background is a smooth random colour field with low-contrast diagonal stripes and pixel noise.
    Image i of a split is a pure function of (seed, split, i), generated on the fly.
    """

    classes = SYNTHETIC_CLASSES

    def __init__(self, split: str = "train", size: int = 64, length: int = 2000, seed: int = 0,
                 max_objects: int = 3) -> None:
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.split, self.size, self.length, self.seed, self.max_objects = split, size, length, seed, max_objects
        # What every image of this size shares, computed once: the pixel coordinates as a column (rows) and a row
        # (columns), broadcast against each other only in each formula's last step (a shape's or texture's terms
        # depend on the row or the column alone), the background's bilinear weights and its stripes' coordinate.
        # The images are the same bits as computing all of it per image on full grids, the same float operations
        # on the same values (tests/training/test_training_data.py holds them to that form). Read-only: no image
        # is made in them.
        self._y = np.arange(size, dtype=np.float32)[:, None]
        self._x = np.arange(size, dtype=np.float32)[None, :]
        idx = np.linspace(0, 3, size, dtype=np.float32)
        i0 = np.minimum(idx.astype(np.int64), 2)
        f = (idx - i0)[:, None]
        self._bilinear = (i0, i0 + 1, (1 - f)[..., None], f[..., None], (1 - f.T)[..., None], f.T[..., None])
        self._diagonals = {d: self._x + d * self._y for d in (1.0, -1.0)}  # (size, size) float32 each
        for a in (self._y, self._x, *self._bilinear, *self._diagonals.values()):
            a.setflags(write=False)

    def __len__(self) -> int:
        return self.length

    def source(self, index: int) -> str:
        return f"synthetic image {index} of split {self.split!r} (seed {self.seed}, generated, no file)"

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} synthetic images")
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])
        image = self._background(rng)
        mask = np.zeros((self.size, self.size), dtype=np.uint8)
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            shape, texture = int(rng.integers(len(SHAPES))), int(rng.integers(len(TEXTURES)))
            inside = self._shape(rng, SHAPES[shape])
            pattern = self._texture(rng, TEXTURES[texture])
            c1, c2 = self._colour_pair(rng)
            image[inside] = np.where(pattern[inside][:, None], c1, c2)
            mask[inside] = 1 + shape * len(TEXTURES) + texture
        noise = rng.normal(0.0, 0.04, image.shape).astype(np.float32)
        image += noise  # (float64 image, in place: the same sums as image + noise)
        image *= 255.0
        image += 0.5
        return np.clip(image, 0, 255, out=image).astype(np.uint8), mask, f"synthetic_{self.split}_{index:06d}"

    def _background(self, rng) -> np.ndarray:
        grid = rng.uniform(0.0, 1.0, (4, 4, 3)).astype(np.float32)
        # Bilinear upsampling of a 4x4 random colour grid: a smooth field with no edges a shape could be mistaken for.
        i0, i1, r0, r1, c0, c1 = self._bilinear
        rows = grid[i0] * r0 + grid[i1] * r1  # (s, 4, 3)
        field = np.take(rows, i0, axis=1) * c0 + np.take(rows, i1, axis=1) * c1  # (s, s, 3) float64, C order
        period = rng.uniform(5.0, 9.0)
        direction = 1.0 if rng.random() < 0.5 else -1.0
        stripes = ((self._diagonals[direction] + rng.uniform(0, period)) % period) < period / 2
        field *= 0.8
        field += 0.1
        field += np.where(stripes, 0.08, -0.08)[..., None]
        return np.clip(field, 0.0, 1.0, out=field)

    def _shape(self, rng, name: str) -> np.ndarray:
        s = self.size
        r = rng.uniform(0.2, 0.42) * s
        cy, cx = rng.uniform(0.1 * s, 0.9 * s, 2)
        dy, dx = self._y - cy, self._x - cx  # a column and a row: each result below broadcasts to (s, s)
        if name == "disc":
            return dx * dx + dy * dy <= r * r
        if name == "square":
            return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
        if name == "triangle":  # apex up; symmetric under horizontal flip
            return (dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)
        if name == "ring":
            d2 = dx * dx + dy * dy
            return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
        if name == "cross":
            arm = 0.33 * r
            return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
        raise ValueError(f"unknown shape {name!r}")

    def _texture(self, rng, name: str) -> np.ndarray:
        period = float(rng.integers(6, 11))
        oy, ox = rng.uniform(0, period, 2)
        s = self.size
        ty, tx = (self._y + oy) % period < period / 2, (self._x + ox) % period < period / 2  # a column, a row
        if name == "hstripes":
            return np.broadcast_to(ty, (s, s))
        if name == "vstripes":
            return np.broadcast_to(tx, (s, s))
        if name == "checker":
            return ty ^ tx
        if name == "dots":
            cy, cx = (self._y + oy) % period - period / 2, (self._x + ox) % period - period / 2
            return cy * cy + cx * cx <= (0.3 * period) ** 2
        raise ValueError(f"unknown texture {name!r}")

    @staticmethod
    def _colour_pair(rng) -> tuple[np.ndarray, np.ndarray]:
        # Two random colours far enough apart that the texture is visible.
        while True:
            c1, c2 = rng.uniform(0.0, 1.0, (2, 3)).astype(np.float32)
            if np.abs(c1 - c2).sum() >= 0.6:
                return c1, c2


# ---- PASCAL VOC 2012 (+ SBD) -----------------------------------------------------------------------------------


def _find_voc_root(root: str) -> str:
    """Accept the VOC2012 folder itself, VOCdevkit/, or the folder that holds VOCdevkit/."""
    for cand in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(cand, "JPEGImages")):
            return cand
    raise FileNotFoundError(
        f"--data-root {root}: no JPEGImages/ found there, in {root}/VOC2012 or in {root}/VOCdevkit/VOC2012; "
        "expected the PASCAL VOC 2012 folder (JPEGImages, SegmentationClass, ImageSets/Segmentation)")


def _find_sbd_root(root: str) -> str:
    """Accept SBD's benchmark_RELEASE/ or its dataset/ folder (cls/, img/, train.txt, val.txt)."""
    for cand in (root, os.path.join(root, "dataset"), os.path.join(root, "benchmark_RELEASE", "dataset")):
        if os.path.isdir(os.path.join(cand, "cls")):
            return cand
    raise FileNotFoundError(f"--sbd-root {root}: no cls/ folder found there or in {root}/dataset; expected SBD's "
                            "benchmark_RELEASE/dataset with cls/*.mat, train.txt and val.txt")


def _list_ids(path: str, unique: bool = False) -> list[str]:
    """Ids of a VOC or SBD list file; lines may be bare ids (VOC's hold no spaces, a user's export may: the line
    without its outer whitespace is the id) or 'JPEGImages/x.jpg SegmentationClassAug/x.png' pairs, whose first
    path gives the id. unique: refuse an id listed twice (a list that gives a split's images in order; lists read
    as sets need not)."""
    numbered = []
    for n, line in read_split(path):
        entry = line.strip()
        pair = _PAIR.fullmatch(entry)
        stem, ext = os.path.splitext(os.path.basename(pair.group(1) if pair else entry))
        numbered.append((n, line, stem if ext.lower() in IMAGE_EXTENSIONS + (".mat",) else stem + ext))
    if unique:
        _refuse_repeats(path, numbered)
    return [i for _, _, i in numbered]


def _aug_labels(aug_dir: str) -> dict[str, str]:
    """id -> path of each PNG label in SegmentationClassAug/, the extension in any case (x.PNG); hidden files (macOS's
    "._x.png" beside every copied file) and folders are not labels."""
    labels = {}
    for f in sorted(os.listdir(aug_dir)):
        stem, ext = os.path.splitext(f)
        if ext.lower() == ".png" and not f.startswith(".") and os.path.isfile(os.path.join(aug_dir, f)):
            if ext == ".png" or stem not in labels:  # x.png, where x.PNG is there too (the name a list gives)
                labels[stem] = os.path.join(aug_dir, f)
    return labels


class VOCSegmentation:
    """PASCAL VOC 2012 segmentation: `val` (1,449), `train` (1,464), `trainval`, and `train_aug` (10,582).

    train_aug = (SBD train ∪ SBD val ∪ VOC train) − VOC val, the DeepLab training set. Its labels come from
    either the common pre-converted PNGs (DATA_ROOT/SegmentationClassAug/*.png, with
    ImageSets/Segmentation/train_aug.txt when present) or SBD itself (--sbd-root: cls/*.mat), where VOC's own
    PNG is used for images that have one and SBD's .mat for the rest.
    """

    classes = VOC_CLASSES

    def __init__(self, root: str, split: str = "train_aug", sbd_root: str | None = None) -> None:
        self.root = _find_voc_root(root)
        self.split = split
        seg_lists = os.path.join(self.root, "ImageSets", "Segmentation")
        aug_dir = os.path.join(self.root, "SegmentationClassAug")
        items: list[tuple[str, str, str]] = []  # (name, image path, label path)
        if split != "train_aug":
            for i in _list_ids(os.path.join(seg_lists, f"{split}.txt"), unique=True):
                items.append((i, self._jpeg(i), os.path.join(self.root, "SegmentationClass", f"{i}.png")))
        else:
            val_ids = set(_list_ids(os.path.join(seg_lists, "val.txt")))
            if sbd_root is not None:
                sbd = _find_sbd_root(sbd_root)
                voc_train = _list_ids(os.path.join(seg_lists, "train.txt"))
                ids = set(_list_ids(os.path.join(sbd, "train.txt"))) | set(_list_ids(os.path.join(sbd, "val.txt")))
                ids = sorted((ids | set(voc_train)) - val_ids)
                voc_labelled = set(voc_train)
                unfound: list[tuple[str, str]] = []  # (VOC's path, SBD's path) of images in neither folder
                for i in ids:
                    voc_png = os.path.join(self.root, "SegmentationClass", f"{i}.png")
                    label = voc_png if i in voc_labelled else os.path.join(sbd, "cls", f"{i}.mat")
                    image = self._jpeg(i)
                    if not os.path.isfile(image):
                        sbd_image = os.path.join(sbd, "img", f"{i}.jpg")
                        if os.path.isfile(sbd_image):
                            image = sbd_image
                        else:
                            unfound.append((image, sbd_image))
                    items.append((i, image, label))
                if unfound:
                    more = f" (and {len(unfound) - 1} more)" if len(unfound) > 1 else ""
                    raise MissingDataFile(f"image file not found: {unfound[0][0]}, nor SBD's {unfound[0][1]}{more}")
            elif os.path.isdir(aug_dir) and (aug_labels := _aug_labels(aug_dir)):
                listed = os.path.join(seg_lists, "train_aug.txt")
                if os.path.isfile(listed):
                    ids = _list_ids(listed, unique=True)
                else:
                    ids = [i for i in sorted(aug_labels) if i not in val_ids]
                overlap = val_ids.intersection(ids)
                if overlap:  # (only a list file can: the folder's own list leaves val out)
                    images = f"{len(overlap)} image{'s' if len(overlap) > 1 else ''}"
                    raise ValueError(f"{listed} lists {images} of VOC's val split (e.g. {sorted(overlap)[0]}, in "
                                     f"{os.path.join(seg_lists, 'val.txt')}); train_aug must exclude VOC val")
                items = [(i, self._jpeg(i), aug_labels.get(i, os.path.join(aug_dir, f"{i}.png"))) for i in ids]
            else:
                raise FileNotFoundError(
                    f"split train_aug needs SBD labels: pass --sbd-root (SBD's benchmark_RELEASE) or put the "
                    f"pre-converted PNG labels in {aug_dir}")
        if not items:
            raise ValueError(f"VOC split {split!r} under {self.root} has no images")
        _check_exist([p for _, p, _ in items], "image")
        _check_exist([p for _, _, p in items], "label")
        mats = sum(p.endswith(".mat") for _, _, p in items)
        if mats:  # refused now, not at the first .mat sample drawn (whose error blamed the file)
            try:
                import scipy.io  # noqa: F401
            except ImportError as e:
                raise MissingReader(
                    f"--sbd-root {sbd_root}: {mats} of the {len(items)} {split} images have their labels only in "
                    f"SBD's MATLAB files ({sbd}/cls/*.mat), which are read with scipy, and scipy cannot be imported "
                    f"({type(e).__name__}: {e}): pip install scipy, or use the pre-converted PNG labels in "
                    f"{aug_dir} instead of --sbd-root") from None
        self.items = items

    def _jpeg(self, i: str) -> str:
        return os.path.join(self.root, "JPEGImages", f"{i}.jpg")

    def source(self, index: int) -> str:
        _, image_path, label_path = self.items[index]
        return f"{image_path} (label {label_path})"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        name, image_path, label_path = self.items[index]
        if label_path.endswith(".mat"):
            mask = read_sbd_mat(label_path, num_classes=len(self.classes))
        else:
            mask = read_index_mask(label_path, num_classes=len(self.classes), voc_classes=True)
        return image_for_mask(image_path, mask, label_path, "label", upright_first=False), mask, name


# ---- a user's folder -------------------------------------------------------------------------------------------


def read_class_list(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class list not found: {path} (one class name per line; line i is class index i, "
                                "line 0 usually 'background')")
    lines = [line.strip() for line in _read_text_lines(path, "class list")]
    while lines and not lines[-1]:  # blank lines at the end
        lines.pop()
    if "" in lines:  # a blank line would shift every later class index by one
        raise ValueError(f"class list {path}: line {lines.index('') + 1} is blank; line i names class index i, so a "
                         "blank line would shift the classes after it: remove it, or name the class")
    names = lines
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        key = _nfc(name)  # 'café' composed and decomposed look alike
        if key in first:  # the metrics report per class by name: two alike would be told apart by index only
            same = repr(name) if names[first[key]] == name else f"{names[first[key]]!r} and {name!r} (the same in " \
                "Unicode's composed form)"
            raise ValueError(f"class list {path}: lines {first[key] + 1} and {i + 1} both name {same}; each class "
                             "needs a name of its own")
        first[key] = i
    if len(names) < 2:
        raise ValueError(f"class list {path} names {len(names)} classes; need at least 2")
    if len(names) > 255:
        raise ValueError(f"class list {path} names {len(names)} classes; at most 255 fit in an 8-bit mask with 255 "
                         "as the ignore label")
    return names


def _folder_names(list_file: str, by_stem: dict[str, str], images_dir: str) -> list[str]:
    """The image names a folder dataset's split list gives, one per line.

    An entry is matched exactly against the names (each file name in images/ without its final extension: the
    name of `scan.000.png` is `scan.000`, of `my img.png` `my img`); whitespace around it is dropped when the entry
    as written names no image. An entry that is not a name but an image's whole file name (`x.jpg`) or a path
    ending in one (`images/x.jpg`, or an 'images/x.jpg masks/x.png' pair) gives that image. Anything else is refused,
    naming the entry: a split is never guessed; so is an image named twice (_refuse_repeats).
    """
    by_file = {_nfc(os.path.basename(path)): stem for stem, path in by_stem.items()}
    by_nfc = {_nfc(stem): stem for stem in by_stem}

    def name_of(entry: str) -> str | None:
        stripped = entry.strip()
        for name in (entry, stripped):
            if name in by_stem:
                return name
        if _nfc(stripped) in by_nfc:  # the same letters, composed otherwise (a name typed vs one saved by macOS)
            return by_nfc[_nfc(stripped)]
        pair = _PAIR.fullmatch(stripped)  # 'images/x.jpg masks/x.png', spaces inside the paths too
        for path in (stripped, pair.group(1) if pair else stripped):  # x.jpg, images/x.jpg, a pair's image
            if _nfc(os.path.basename(path)) in by_file:
                return by_file[_nfc(os.path.basename(path))]
        return None

    numbered, unknown = [], []
    for line, entry in read_split(list_file):
        name = name_of(entry)
        if name is None:
            unknown.append(entry.strip())
        else:
            numbered.append((line, entry, name))
    if unknown:
        raise FileNotFoundError(f"{list_file} lists {unknown[0]!r} but {images_dir} has no image of that name"
                                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    _refuse_repeats(list_file, numbered)
    return [name for _, _, name in numbered]


def _nfc(name: str) -> str:
    """A name in Unicode's composed form (NFC): macOS stores file names decomposed (NFD: 'e' + a combining
    accent), most editors write composed text, and the two spellings look the same. Names are matched in this
    form (an image with its mask, a split list's entry with an image)."""
    return unicodedata.normalize("NFC", name)


def _masks_by_stem(masks_dir: str) -> dict[str, str]:
    """NFC name -> mask path for every PNG in `masks_dir`, the extension matched in any case (x.png, x.PNG);
    folders and hidden files are not masks."""
    found: dict[str, str] = {}
    for f in sorted(os.listdir(masks_dir)):
        stem, ext = os.path.splitext(f)
        path = os.path.join(masks_dir, f)
        if ext.lower() != ".png" or f.startswith(".") or os.path.isdir(path):
            continue  # (dot-files: macOS's "._x.png" beside every copied mask)
        if _nfc(stem) in found:
            raise ValueError(f"folder dataset: two masks named {stem!r}: {found[_nfc(stem)]} and {path}; keep one")
        found[_nfc(stem)] = path
    return found


_WARNED_BLACK_AND_WHITE: set[str] = set()  # mask folders warned about, once per process
_WARNED_DECOMPOSED: set[str] = set()  # folder datasets whose hash split was warned about, once per process
_WARNED_UNREAD: set[str] = set()  # image folders whose unread formats were warned about, once per process


def _warn_black_and_white_masks(root: str, mask_paths: Sequence[str], sample: int = 4) -> None:
    """Warn when the first masks hold 0 and 255 only, 255 on a large part of them: a black-and-white mask whose
    white (255) is meant as the foreground, which this layout reads as the ignore label: never trained, never
    scored, and the metrics (background alone) look perfect. A warning, since 255 may mean ignore; a mask that
    cannot be read is left to the read that names it."""
    folder = os.path.dirname(os.path.abspath(mask_paths[0]))
    if folder in _WARNED_BLACK_AND_WHITE:
        return
    white = total = 0
    for path in mask_paths[:sample]:
        try:
            mask = read_index_mask(path)
        except DataFileError:
            return
        if not np.isin(mask, (0, IGNORE_INDEX)).all():
            return
        white, total = white + int((mask == IGNORE_INDEX).sum()), total + mask.size
    if total and white >= 0.05 * total:
        _WARNED_BLACK_AND_WHITE.add(folder)
        warnings.warn(
            f"folder dataset {root}: its first masks ({', '.join(os.path.basename(p) for p in mask_paths[:sample])}) "
            f"hold only the values 0 and 255, 255 on {100 * white / total:.0f}% of their pixels; 255 is the ignore "
            "label (neither trained nor scored): if white (255) marks the foreground, save it as class 1 (mask // 255"
            " with 'background' and your class in classes.txt); if 255 means 'ignore' there, all is well",
            DataWarning, stacklevel=3)


class FolderSegmentation:
    """A user's dataset: ROOT/images/<name>.<jpg|png|...> with ROOT/masks/<name>.png, and a class list.

    Masks are palette or single-channel PNGs (extension in any case) whose values are class indices (255 =
    ignore). Names must be unique (x.png and x.jpg in images/ is refused). Splits come from ROOT/<split>.txt (one
    name per line) when it exists; `train` without train.txt is every image val.txt does not list; without any
    list files, a deterministic 90/10 split by a hash of each name gives `train` and `val` (docs/training.md).
    """

    def __init__(self, root: str, split: str = "train", classes_file: str | None = None) -> None:
        images_dir, masks_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        for d in (images_dir, masks_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"folder dataset: {d} does not exist (expected {root}/images and "
                                        f"{root}/masks)")
        self.classes = tuple(read_class_list(classes_file or os.path.join(root, "classes.txt")))
        by_stem: dict[str, str] = {}
        by_nfc: dict[str, str] = {}  # NFC name -> name: x.png and x.jpg, or two spellings of one name, are refused
        entries = sorted(os.listdir(images_dir))
        for f in entries:
            path = os.path.join(images_dir, f)
            if is_image_name(f) and not os.path.isdir(path):  # a folder `x.png` is no image
                stem = os.path.splitext(f)[0]
                if _nfc(stem) in by_nfc:
                    first = by_stem[by_nfc[_nfc(stem)]]
                    raise ValueError(f"folder dataset: two images named {stem!r}: {first} and {path}; a name "
                                     "(the file name without its extension) must be unique, since it pairs the image "
                                     f"with {masks_dir}/{stem}.png: rename or remove one of them")
                by_stem[stem], by_nfc[_nfc(stem)] = path, stem
        unread = unread_image_files(images_dir, entries)
        if unread and by_stem and images_dir not in _WARNED_UNREAD:  # (no images at all: the error says it)
            _WARNED_UNREAD.add(images_dir)
            warnings.warn(f"folder dataset {root}: {unread}", DataWarning, stacklevel=2)
        if not by_stem:
            what = (f"holds no images: its {len(entries)} entries (e.g. {entries[0]!r}) are not image files"
                    if entries else "is empty")
            raise FileNotFoundError(
                f"folder dataset {root}: the images folder {images_dir} {what}; put the images there "
                f"({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}), each with its mask {masks_dir}/<name>.png"
                + (f" ({unread})" if unread else ""))
        masks_by_stem = _masks_by_stem(masks_dir)
        list_file = os.path.join(root, f"{split}.txt")
        if os.path.isfile(list_file):
            names = _folder_names(list_file, by_stem, images_dir)
        elif split == "train" and os.path.isfile(val_file := os.path.join(root, "val.txt")):
            held_out = set(_folder_names(val_file, by_stem, images_dir))  # no train.txt: every image val.txt omits
            names = [n for n in sorted(by_stem) if n not in held_out]
            if not names:
                raise ValueError(
                    f"folder dataset {root}: split 'train' has no images: without a train.txt it is every image "
                    f"{val_file} does not list, and it lists all {len(by_stem)} images in {images_dir}; leave some "
                    "out of it, or write the training images' names to " + os.path.join(root, "train.txt"))
        elif split in ("train", "val") and not os.path.isfile(os.path.join(root, "train.txt")):
            import zlib

            # os.fsencode: the name's bytes on disk (UTF-8 for a UTF-8 name; a name in another encoding, which
            # Python reads with surrogate escapes, has no UTF-8 form: n.encode() raised UnicodeEncodeError). The
            # bytes as stored, not NFC's: hashing NFC would move the split of every run made before it.
            names = [n for n in sorted(by_stem) if (zlib.crc32(os.fsencode(n)) % 10 == 0) == (split == "val")]
            decomposed = [n for n in by_stem if _nfc(n) != n]
            if decomposed and root not in _WARNED_DECOMPOSED:
                _WARNED_DECOMPOSED.add(root)
                warnings.warn(
                    f"folder dataset {root}: {len(decomposed)} image names (e.g. {decomposed[0]!r}) are in decomposed "
                    "Unicode form (as macOS stores some): the automatic 90/10 split hashes the names' bytes, so a "
                    "copy of this folder with composed names would split differently; write the validation names to "
                    f"{os.path.join(root, 'val.txt')} to pin the split", DataWarning, stacklevel=2)
            if not names:
                raise ValueError(
                    f"folder dataset {root}: the automatic 90/10 split (by a hash of each name) left split {split!r} "
                    f"empty ({len(by_stem)} images in {images_dir}); with few images, write the validation images' "
                    f"names to {os.path.join(root, 'val.txt')} (one name per line, without the extension): the "
                    "other images then form the training split")
        else:
            raise FileNotFoundError(f"split list not found: {list_file}")
        if not names:
            raise ValueError(f"folder dataset {root}: split {split!r} has no images")
        self.items = [(n, by_stem[n], masks_by_stem.get(_nfc(n), os.path.join(masks_dir, f"{n}.png")))
                      for n in names]
        missing = [n for n in names if _nfc(n) not in masks_by_stem]
        if missing:
            n = missing[0]
            others = sorted(f + (" (a folder)" if os.path.isdir(os.path.join(masks_dir, f)) else "")
                            for f in os.listdir(masks_dir) if _nfc(os.path.splitext(f)[0]) == _nfc(n))
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            hint = (f"; {masks_dir} has {', '.join(others)}, but masks must be PNG files (lossless class indices)"
                    if others else _case_hint(os.path.join(masks_dir, n + ".png")))
            raise FileNotFoundError(f"mask file not found: {os.path.join(masks_dir, n + '.png')}{more}{hint}")
        # A link whose target is gone is listed but is no file: named now, not when training first reads it.
        _check_exist([p for _, p, _ in self.items], "image")
        _check_exist([p for _, _, p in self.items], "mask")
        _warn_black_and_white_masks(root, [p for _, _, p in self.items])

    def source(self, index: int) -> str:
        _, image_path, mask_path = self.items[index]
        return f"{image_path} (mask {mask_path})"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        name, image_path, mask_path = self.items[index]
        mask = read_index_mask(mask_path, num_classes=len(self.classes), voc_classes=self.classes == VOC_CLASSES)
        return image_for_mask(image_path, mask, mask_path, "mask"), mask, name
