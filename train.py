"""DeepLabV3 training, evaluation and inference.

    python train.py --fused-ops                           # built-in synthetic set: trains, evaluates, saves
    python train.py --dataset voc --data-root VOCdevkit/VOC2012 --sbd-root benchmark_RELEASE --fused-ops \\
        --backbone-weights resnet101.pth                # torchvision's ImageNet ResNet-101 state_dict
    python train.py --dataset folder --data-root mydata   # mydata/images, mydata/masks, mydata/classes.txt
    python train.py --eval-only --checkpoint runs/synthetic/best.pt --eval-output-stride 8 --eval-scales ms --eval-flip
    python train.py --predict photos/ --checkpoint runs/voc/best.pt --out masks/
    torchrun --nproc_per_node=2 train.py ...              # DDP with synchronized BatchNorm

After a regular install (pip install .), `python -m train ...` and `torchrun --nproc_per_node=2 -m train ...`.

Defaults follow the dataset: VOC uses the paper's schedule (ResNet-101, crop 513, batch 16, SGD 0.9, lr 0.007 poly
0.9, scale 0.5-2.0, flip, OS 16, 30k iterations; wd 1e-4 on conv weights, BatchNorm as torchvision's); the synthetic
set uses a small CPU-sized recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import pickle
import random
import shutil
import signal
import sys
import threading
import time
import unicodedata
import warnings

import numpy as np
import torch
from PIL import Image

from model.checkpoint import unwrap_model
from training import checkpoint as ckpt_io
from training import datasets, distributed, loop
from training.palette import colorize, palette_bytes
from training.signals import Terminated, raise_terminated, signals_ignored
from training.transforms import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform

MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# Per-dataset defaults for options left unset on the command line. VOC: the paper's recipe.
PRESETS = {
    "voc": dict(crop_size=513, batch_size=16, lr=0.007, iterations=30000, scale_range=(0.5, 2.0),
                backbone="resnet101", eval_every=2000, checkpoint_every=1000, output_stride=16, backbone_width=64),
    "folder": dict(crop_size=513, batch_size=16, lr=0.007, iterations=30000, scale_range=(0.5, 2.0),
                   backbone="resnet101", eval_every=2000, checkpoint_every=1000, output_stride=16, backbone_width=64),
    # Sized for a 2-core CPU: 64 px crops, batch 8, a narrow ResNet-29 (width 16: 16..128-wide bottlenecks, a
    # 64-channel ASPP) at output stride 8, 4000 SGD steps at lr 0.05: about 0.06 s each with --fused-ops on an idle
    # 2-core machine (4 minutes in all), 2-4x that when its cores are shared (docs/training.md). Measured: mIoU
    # 0.52-0.61 on the synthetic validation split (docs/training.md).
    "synthetic": dict(crop_size=64, batch_size=8, lr=0.05, iterations=4000, scale_range=(1.0, 1.0),
                      backbone="smallest", eval_every=0, checkpoint_every=500, output_stride=8, backbone_width=16),
    "synthetic-gpu": dict(crop_size=128, batch_size=16, lr=0.02, iterations=3000, scale_range=(0.75, 1.5),
                          backbone="resnet50", eval_every=1000, checkpoint_every=500, output_stride=16,
                          backbone_width=64),
}


# ---- model -------------------------------------------------------------------------------------------------------


def available_backbones() -> list[str]:
    """ResNet depths model/ offers (resnet50, resnet101, and any smaller one it adds), smallest first."""
    try:
        from model.resnet import DEPTHS
    except ImportError:
        return ["resnet50", "resnet101"]
    return [f"resnet{d}" for d in sorted(DEPTHS)]


def _has_low_res_forward(net: torch.nn.Module) -> bool:
    """Whether the network's forward takes upsample=False (model/'s DeepLabV3, not torchvision's)."""
    import inspect

    core = net.module if isinstance(net, torch.nn.parallel.DistributedDataParallel) else net
    return "upsample" in inspect.signature(core.forward).parameters


def build_model(backbone: str, num_classes: int, output_stride: int, aux_loss: bool, fused: bool,
                memory_efficient: bool = False, width: int = 64) -> torch.nn.Module:
    """The DeepLabV3 network from model/ (torchvision's pieces as a stand-in where model/ is absent)."""
    try:
        from model import deeplabv3_resnet
    except ImportError:
        deeplabv3_resnet = None
    if deeplabv3_resnet is not None:
        if not backbone.startswith("resnet") or not backbone[6:].isdigit():
            raise ValueError(f"backbone must be one of {available_backbones()}, got {backbone!r}")
        return deeplabv3_resnet(int(backbone[6:]), num_classes=num_classes, output_stride=output_stride,
                                aux_loss=aux_loss, fused=fused, memory_efficient=memory_efficient, width=width)
    print("note: model/ has no deeplabv3 factories here; using torchvision's DeepLabV3 as a stand-in", file=sys.stderr)
    if width != 64:
        raise SystemExit(f"--backbone-width {width} needs model/ (torchvision's ResNets have width 64)")
    net = _torchvision_deeplabv3(backbone, num_classes, output_stride, aux_loss)
    if fused:
        from deeplab_ops.nn import fuse_modules

        fuse_modules(net, memory_efficient=memory_efficient)
    return net


def _torchvision_deeplabv3(backbone: str, num_classes: int, output_stride: int, aux_loss: bool) -> torch.nn.Module:
    """Stand-in until model/ lands: torchvision's DeepLabV3 pieces at a chosen output stride (no multi-grid)."""
    from torchvision.models import resnet
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCNHead

    if output_stride not in (8, 16):
        raise ValueError(f"output stride must be 8 or 16, got {output_stride}")
    layers = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}
    if backbone not in layers:
        raise ValueError(f"backbone must be one of {sorted(layers)}, got {backbone!r}")
    net = resnet.ResNet(resnet.Bottleneck, layers[backbone], replace_stride_with_dilation=[False, output_stride == 8,
                                                                                           True])
    returns = {"layer4": "out", "layer3": "aux"} if aux_loss else {"layer4": "out"}
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    return DeepLabV3(IntermediateLayerGetter(net, returns), DeepLabHead(2048, num_classes, rates),
                     FCNHead(1024, num_classes) if aux_loss else None)


def load_backbone_weights(net: torch.nn.Module, path: str) -> None:
    """Initialise the ResNet backbone from a local ImageNet state_dict (torchvision's resnet50/101 .pth), or from
    the backbone of a whole DeepLabV3 state_dict (torchvision's deeplabv3_resnet50/101 file, a train.py checkpoint:
    its `backbone.*` entries; its heads are not loaded, a note says so)."""
    try:
        from model import load_backbone, read_state_dict
    except ImportError:
        load_backbone = None
    if load_backbone is not None:
        state, heads = backbone_state(read_state_dict(path))
        load_backbone(net, state)
        if heads is not None:
            print(f"note: --backbone-weights {path} holds a whole network's state_dict (keys under backbone.): its "
                  f"backbone initialised this run's{' (not loaded: ' + ', '.join(heads) + ')' if heads else ''}",
                  file=sys.stderr)
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)


try:  # a checkpoint file that exists but cannot be read (empty, corrupt): model.checkpoint.load_file raises it
    from model.checkpoint import CheckpointReadError

    _UNREADABLE: tuple[type[BaseException], ...] = (CheckpointReadError,)
except ImportError:
    _UNREADABLE = ()


def backbone_weights_or_exit(net: torch.nn.Module, args) -> None:
    """load_backbone_weights(net, --backbone-weights), with a missing, unreadable or mismatched file stopping the run
    in a few lines that name the flag, and for a ResNet of another depth or width the flags that fit it."""
    path = args.backbone_weights
    try:
        load_backbone_weights(net, path)
    except (OSError, *_UNREADABLE) as e:  # missing, a folder, empty, corrupt: model.checkpoint.load_file's words
        raise SystemExit(f"--backbone-weights {path}: {e}") from None
    except (RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as e:
        lines = str(e).splitlines()
        first = lines[0] if lines else type(e).__name__
        # the loader's hints (a key prefix to remove, the file's units per stage) kept where train.py names no flags
        # that fit; its key lists are not
        hints = "".join(f"\n  {line.strip()}" for line in lines[1:] if line.strip().startswith("hint:"))
        fits = _resnet_flags(path)
        given = f"--backbone {args.backbone} --backbone-width {args.backbone_width}"
        hint = f"; the file holds a {fits}: train with those flags" if fits and fits != given else ""
        raise SystemExit(f"--backbone-weights {path} does not fit {given}{hint} ({first}){'' if hint else hints}") \
            from None


def backbone_state(state: dict) -> tuple[dict, list[str] | None]:
    """(the backbone's state_dict, the other top-level entries) of a whole network's state_dict (keys under
    `backbone.`: torchvision's deeplabv3_resnet50/101 file, a train.py checkpoint); (state, None) for any other."""
    if not any(k.startswith("backbone.") for k in state):
        return state, None
    heads = sorted({k.split(".")[0] for k in state if not k.startswith("backbone.")})
    return {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, heads


def _resnet_flags(path: str) -> str | None:
    """'--backbone resnetD --backbone-width W' for a state_dict of one of model/'s ResNets (torchvision's v1.5
    bottleneck: the blocks per stage of a depth model/ builds, the stem's width, ungrouped 3x3 convolutions as wide as
    the stem at layer1), None for anything else (resnet34's basic blocks, wide ResNets, ResNeXts, ...)."""
    try:
        from model.checkpoint import read_state_dict
        from model.resnet import DEPTHS

        state = backbone_state(read_state_dict(path))[0]
    except Exception:  # noqa: BLE001 (unreadable: the caller reports the load's own error)
        return None
    blocks = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    depth = next((d for d, b in DEPTHS.items() if b == blocks), None)
    stem, conv1, conv2 = (state.get(k) for k in ("conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight"))
    if depth is None or stem is None or conv1 is None or conv2 is None or "layer1.0.conv3.weight" not in state:
        return None
    width = stem.shape[0]
    if conv1.shape[0] != width or conv2.shape[:2] != (width, width):
        return None
    return f"--backbone resnet{depth} --backbone-width {width}"


# ---- data --------------------------------------------------------------------------------------------------------


def build_datasets(args, train: bool = True, note: str = ""):
    """(train, val, class_names) raw datasets for --dataset (train None when `train` is False: --eval-only reads
    the validation split only); a missing or malformed dataset exits with its error, followed by `note`
    (_restored_note: the paths a resumed run read from its checkpoint)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            built = _build_datasets(args, train)
    except (OSError, ValueError) as e:  # OSError: FileNotFoundError, and an unreadable folder (PermissionError)
        raise SystemExit(f"--dataset {args.dataset}: {e}{note}") from None
    for w in caught:  # the datasets' warnings (black-and-white masks, ...) as train.py's own one-line warnings
        if issubclass(w.category, datasets.DataWarning):
            warn(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return built


def _build_datasets(args, train: bool):
    if args.dataset == "synthetic":
        val = datasets.SyntheticShapes("val", args.crop_size, args.synthetic_val_size, seed=args.data_seed)
        tr = datasets.SyntheticShapes("train", args.crop_size, args.synthetic_train_size, seed=args.data_seed) \
            if train else None
        return tr, val, list(datasets.SYNTHETIC_CLASSES)
    if not args.data_root:
        raise SystemExit(f"--dataset {args.dataset} needs --data-root PATH")
    train_split, val_split = split_names(args)
    if args.dataset == "voc":
        val = datasets.VOCSegmentation(args.data_root, val_split, sbd_root=args.sbd_root)
        tr = datasets.VOCSegmentation(args.data_root, train_split, sbd_root=args.sbd_root) if train else None
    else:
        val = datasets.FolderSegmentation(args.data_root, val_split, classes_file=args.classes)
        tr = datasets.FolderSegmentation(args.data_root, train_split, classes_file=args.classes) if train else None
    warn_shared_images(tr, val, train_split, val_split)
    return tr, val, list(val.classes)


def split_names(args) -> tuple[str, str]:
    """(training split, validation split) of --dataset: --train-split / --val-split, else the dataset's defaults
    (VOC trains on train_aug)."""
    if args.dataset == "synthetic":
        return "train", "val"
    return args.train_split or ("train_aug" if args.dataset == "voc" else "train"), args.val_split or "val"


def warn_shared_images(train_set, val_set, train_split: str, val_split: str) -> None:
    """Warn when the training and validation splits share images (two list files naming the same image): the
    validation scores would then measure images the network trains on. A warning, not an error: evaluating on
    training images can be meant (checking that a small set is fitted)."""
    if train_set is None:
        return
    shared = {os.path.realpath(p) for _, p, _ in train_set.items} & {os.path.realpath(p) for _, p, _ in val_set.items}
    if shared:
        warn(f"the training split {train_split!r} and the validation split {val_split!r} share {len(shared)} of "
             f"{len(val_set.items)} validation images (e.g. {sorted(shared)[0]}): the validation scores measure "
             "images the network trains on")


class _Normalized:
    """A raw dataset seen through EvalTransform."""

    def __init__(self, dataset) -> None:
        self.dataset, self.transform = dataset, EvalTransform()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        image, mask, name = self.dataset[i]
        img, lbl = self.transform(image, mask)
        return img, lbl, name


# ---- outputs -----------------------------------------------------------------------------------------------------


def _denormalize(img: torch.Tensor) -> np.ndarray:
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (img * s + m).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


def save_preview(kept, path: str) -> None:
    """A PNG grid: one row per image, columns image | ground truth | prediction (VOC colours), each column as wide as
    the widest image (images of other sizes padded on the right), so the columns line up."""
    if not kept:
        return
    w = max(k[0].shape[-1] for k in kept)

    def cell(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((a.shape[0], w - a.shape[1], 3), np.uint8)], axis=1)

    rows = [np.concatenate([cell(_denormalize(img)), cell(colorize(mask.numpy())), cell(colorize(pred.numpy()))],
                           axis=1) for img, mask, pred in kept]
    grid = np.concatenate(rows, axis=0)
    scale = max(1, 256 // grid.shape[0] + 1) if grid.shape[0] < 256 else 1
    im = Image.fromarray(grid)
    if scale > 1:
        im = im.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    # replaced in one step: a kill or a full disk while it is written leaves the earlier picture, not half of one
    ckpt_io.atomic_write(path, lambda f: im.save(f, format="PNG"))


PREDICT_MARK = ("Software", "deeplab_ops train.py --predict")  # a PNG text chunk in every mask --predict writes


def save_mask_png(pred: np.ndarray, path: str) -> None:
    """A palette PNG: pixel values are class indices, colours are VOC's; marked as written by --predict."""
    from PIL import PngImagePlugin

    im = Image.fromarray(pred.astype(np.uint8), mode="P")
    im.putpalette(palette_bytes())
    info = PngImagePlugin.PngInfo()
    info.add_text(*PREDICT_MARK)
    # Written beside it and renamed over it: a link at `path` (to an earlier mask elsewhere) is replaced, not written
    # through, and an interrupted write leaves no partial mask (cmd_predict removes killed runs' temps once).
    ckpt_io.atomic_write(path, lambda f: im.save(f, format="PNG", pnginfo=info), clean=False)


# ---- commands ----------------------------------------------------------------------------------------------------


def _setup(args) -> tuple[torch.device, distributed.DistInfo]:
    if args.device == "auto":
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = args.device
        if dev_type == "cuda" and not torch.cuda.is_available():  # parse_args refuses it; for callers that do not
            raise SystemExit("--device cuda: no CUDA device is visible")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif dev_type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        info = distributed.init_from_env(dev_type, args.dist_timeout)
    except torch.distributed.DistError as e:
        # Under a multi-node launch, a process that stopped before joining (a flag or data error on its node) leaves
        # the others waiting here, where no agent stops them: one line instead of torch's store traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, torch.distributed.DistStoreError) and "time" in first.lower():  # timed out / wait timeout
            raise SystemExit(
                f"train.py: the process group did not form within --dist-timeout {args.dist_timeout:g} min: a "
                "process stopped before joining (see its message; under a multi-node launch on its own node) or "
                f"never started ({first})") from None
        raise SystemExit(f"train.py: could not form the process group ({first})") from None
    device = torch.device("cuda", info.local_rank) if dev_type == "cuda" else torch.device("cpu")
    random.seed(args.seed)
    np.random.seed(args.seed)  # noqa: NPY002 (the legacy global state, for libraries that use it)
    torch.manual_seed(args.seed)
    return device, info


# The flags that shape the network's weights: a checkpoint trained with other values does not load.
MODEL_FLAGS = ("backbone", "backbone_width", "aux_loss")


def _flag(name: str, value=None, with_value: bool = True) -> str:
    """'--name value' ('--name' alone for a set switch, 'no --name' for an unset one)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}" if with_value else flag


def _weights_mismatch(net: torch.nn.Module, state) -> str | None:
    """Load `state` into `net` strictly; None when it loads, else a one-line summary of why it does not."""
    core = unwrap_model(net)
    try:
        core.load_state_dict(state)
        return None
    except (RuntimeError, TypeError, AttributeError) as e:
        error = e
    try:
        from model.checkpoint import check_keys

        check_keys(core, state)
    except ImportError:
        pass
    except ValueError as e:  # counts of missing / unexpected keys and shape mismatches, and check_keys' hints
        lines = [line.strip() for line in str(e).splitlines()]
        return "; ".join([lines[0]] + [line for line in lines if line.startswith("hint:")])
    lines = str(error).splitlines()
    return lines[0].rstrip(":") if lines else type(error).__name__


def check_weights_fit(net: torch.nn.Module, ckpt: dict, path: str, flag: str, args=None) -> None:
    """Load the checkpoint's weights into `net`, or stop in one line naming the file: for --resume (`args` given)
    the model flags whose values differ from those the checkpoint was trained with, else why the weights do not fit
    the network the checkpoint's own saved flags describe."""
    problem = _weights_mismatch(net, ckpt["model"])
    if problem is None:
        return
    saved = ckpt.get("args") or {}
    own = " ".join(_flag(k, saved[k]) for k in MODEL_FLAGS if saved.get(k) is not None and saved[k] is not False)
    if args is not None:
        differ = [k for k in MODEL_FLAGS if saved.get(k) is not None and saved[k] != getattr(args, k)]
        if differ:
            parts = [f"{_flag(k, saved[k])} (not {getattr(args, k)})" if not isinstance(saved[k], bool) else
                     f"{_flag(k, True)} (which this command lacks)" if saved[k] else f"{_flag(k, False)} (but this "
                     "command gives it)" for k in differ]
            off = [_flag(k, True) for k in differ if saved[k] is False]  # a switch to drop, which `own` cannot say
            wanted = ", ".join(filter(None, (own, "without " + " ".join(off) if off else "")))
            raise SystemExit(f"{flag}: {path} was trained with {', '.join(parts)}: its weights do not fit the network "
                             f"these flags build; resume with the checkpoint's model flags ({wanted}), or start a new "
                             "run in another --out-dir")
        raise SystemExit(f"{flag}: {path} does not fit the network these flags build ({problem})")
    described = f"the network its saved flags describe ({own})" if own else (
        "the network its saved flags describe" if saved else
        "the network this command's flags build (it saved no model flags)")
    raise SystemExit(f"{flag} {path}: its weights do not fit {described}: "
                     f"{problem}; it was not written by this train.py (model.load_checkpoint loads other state_dicts "
                     "into a network you build)")


def _model_from_checkpoint(ckpt: dict, args, output_stride: int, path: str, flag: str) -> torch.nn.Module:
    """The network a train.py checkpoint describes (its saved model flags and class count), with its weights."""
    if not isinstance(ckpt.get("num_classes"), int):
        raise SystemExit(f"{flag} {path}: has no 'num_classes' entry, so it is not a checkpoint train.py wrote "
                         "(model.load_checkpoint loads other state_dicts into a network you build)")
    flags = checkpoint_model_flags(ckpt, args)
    net = build_model(flags["backbone"], ckpt["num_classes"], output_stride, flags["aux_loss"], args.fused_ops,
                      width=flags["backbone_width"])
    check_weights_fit(net, ckpt, path, flag)
    bad = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # (argmax of NaN logits is 0: every pixel background, and the scores of that, without a word)
        raise SystemExit(f"{flag} {path}: {len(bad)} of its tensors hold NaN or infinite values (e.g. {bad[0]}), so "
                         "its outputs mean nothing; a run that diverged saves such weights: give an earlier checkpoint")
    return net


def checkpoint_model_flags(ckpt: dict, args) -> dict:
    """MODEL_FLAGS of the network --eval-only and --predict build from a checkpoint: its saved ones, and for one that
    saved none the command's (its flags or the presets'), as for the backbone."""
    saved = ckpt.get("args") or {}
    return {"backbone": saved.get("backbone") or args.backbone or "resnet101",
            "backbone_width": saved.get("backbone_width") or getattr(args, "backbone_width", None) or 64,
            "aux_loss": bool(saved.get("aux_loss", False))}


def parse_eval_scales(text: str, error=None) -> tuple[float, ...]:
    """--eval-scales: 'ms' or comma-separated finite scales > 0."""
    if text == "ms":
        return MS_SCALES
    try:
        scales = tuple(float(s) for s in text.split(","))
    except ValueError:
        scales = ()
    if not scales or not all(_finite(s) and s > 0 for s in scales):
        message = f"--eval-scales must be 'ms' or comma-separated numbers > 0 (e.g. 0.75,1.0,1.25), got {text!r}"
        if error is None:
            raise SystemExit(message)
        error(message)
    return scales


def _eval_scales(args) -> tuple[float, ...]:
    return parse_eval_scales(args.eval_scales)


def evaluate_split(net, val_set, class_names, device, args, info) -> tuple[dict, list]:
    """(metrics, the first --preview images with their masks and predictions) of `net` on `val_set`."""
    return loop.evaluate(
        net, _Normalized(val_set), len(class_names), class_names, device, batch_size=args.eval_batch_size,
        scales=_eval_scales(args), flip=args.eval_flip, amp=args.amp, channels_last=args.channels_last,
        keep=args.preview, num_workers=args.workers, rank=info.rank, world_size=info.world_size)


def run_eval(net, val_set, class_names, device, args, info, out_dir: str | None, tag: str) -> dict:
    metrics, kept = evaluate_split(net, val_set, class_names, device, args, info)
    if info.is_main and out_dir:
        save_preview(kept, os.path.join(out_dir, f"predictions_{tag}.png"))
    return metrics


def mask_names(files: list[str]) -> dict[str, str]:
    """Input file -> mask file name: `<stem>.png`, or `<file>.png` (x.jpg -> x.jpg.png) for names whose stems
    collide (x.png and x.jpg; compared case-insensitively, as some filesystems do)."""
    stems: dict[str, int] = {}
    for f in files:
        key = os.path.splitext(f)[0].lower()
        stems[key] = stems.get(key, 0) + 1
    return {f: (os.path.splitext(f)[0] if stems[os.path.splitext(f)[0].lower()] == 1 else f) + ".png" for f in files}


def _is_predict_mask(path: str) -> bool:
    """Whether `path` is a mask --predict wrote: a palette PNG with its mark (a VOC-palette PNG alone may be a
    dataset's ground truth, VOC's SegmentationClass)."""
    try:
        with Image.open(path) as im:
            return (im.format == "PNG" and im.mode == "P"
                    and getattr(im, "text", {}).get(PREDICT_MARK[0]) == PREDICT_MARK[1])
    except Exception:
        return False


def plan_predict_outputs(in_dir: str, files: list[str], out: str) -> dict[str, str]:
    """Input path -> mask path for --predict, refusing (before anything is written) the input folder as --out and
    any output that would overwrite an input image (a link to one) or an existing file that is not a mask from an
    earlier --predict run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out {out}: exists and is not a folder")
    if os.path.isdir(out) and os.path.samefile(out, in_dir):
        # Masks beside the photos would replace .png photos, and the next --predict would take them for photos.
        raise SystemExit(f"--predict: refusing to write masks into the input folder {in_dir} (--out {out}): they "
                         "could replace .png photos and would be read as photos by the next run; give --out another "
                         "folder (default predictions/)")
    names = mask_names(files)
    lowered = {}
    for f, name in names.items():
        if name.lower() in lowered:
            raise SystemExit(f"--predict: {lowered[name.lower()]} and {f} in {in_dir} would both write {name}; "
                             "rename one of them")
        lowered[name.lower()] = f
    inputs = {}
    for f in files:
        st = os.stat(os.path.join(in_dir, f))
        inputs[(st.st_dev, st.st_ino)] = os.path.join(in_dir, f)
    plan = {}
    for f, name in names.items():
        target = os.path.join(out, name)
        if os.path.exists(target):
            st = os.stat(target)
            if (st.st_dev, st.st_ino) in inputs:
                raise SystemExit(f"--predict: refusing to write any mask: {target} would overwrite the input image "
                                 f"{inputs[(st.st_dev, st.st_ino)]}; give --out a folder other than {in_dir} "
                                 "(default predictions/)")
            if not _is_predict_mask(target):
                raise SystemExit(f"--predict: refusing to write any mask: {target} exists and is not a mask written "
                                 "by --predict (a ground-truth mask, say); move it away or give --out another folder")
        plan[os.path.join(in_dir, f)] = target
    return plan


def checkpoint_or_exit(path: str, flag: str) -> dict:
    """load_checkpoint, with a missing file, a folder, an empty, corrupt or foreign file reported against the flag
    that named it (load_checkpoint's errors name the file and say what is wrong with it) as a one-line exit, not a
    traceback."""
    try:
        return ckpt_io.load_checkpoint(path)
    except (OSError, RuntimeError, ValueError) as e:
        raise SystemExit(f"{flag} {path}: {e}") from None


def check_classes(ckpt: dict, path: str, class_names: list[str], args, command: str) -> None:
    """Refuse a checkpoint whose classes differ from the dataset's in count, or in order where it saved their names
    (the same names, reordered: a classes.txt with two lines swapped would score, train and predict every class
    under another's name, silently); warn where names differ otherwise (a class renamed). Names compare in Unicode
    NFC, as the datasets compare them."""
    saved_names = ckpt.get("class_names")
    saved_names = list(saved_names) if isinstance(saved_names, (list, tuple)) else None
    saved = ckpt.get("num_classes", len(saved_names) if saved_names is not None else None)
    source = " ".join(_flag(k, getattr(args, k)) for k in ("dataset", "data_root", "classes") if getattr(args, k))
    flag = "--resume" if command == "--resume" else "--checkpoint"
    named = f"{flag} {path}" if command == flag else f"{command}: {flag} {path}"
    if saved is not None and saved != len(class_names):
        hint = (" (--eval-only reads them from the checkpoint where neither --dataset nor --data-root is given)"
                if command == "--eval-only" else "")
        raise SystemExit(f"{named} predicts {saved} classes, but {source} has {len(class_names)}; "
                         f"use a checkpoint trained on this dataset, or the dataset flags it was trained with{hint}")
    if saved_names is None or len(saved_names) != len(class_names):
        return
    nfc = [unicodedata.normalize("NFC", n) if isinstance(n, str) else repr(n) for n in saved_names]
    here = [unicodedata.normalize("NFC", n) for n in class_names]
    differ = [i for i, (a, b) in enumerate(zip(nfc, here, strict=True)) if a != b]
    if not differ:
        return
    shown = ", ".join(f"class {i}: {saved_names[i]!r} there, {class_names[i]!r} here" for i in differ[:3]) + (
        ", ..." if len(differ) > 3 else "")
    if sorted(nfc) == sorted(here):
        raise SystemExit(f"{named} was trained on the classes of {source} in another order ({shown}): its class "
                         f"indices would be read under other classes' names. Put the class list back in the order "
                         f"it was trained with: {saved_names}")
    warn(f"{named} was trained on class names that differ from {source}'s ({shown}); the classes are taken by index, "
         "under this dataset's names")


def _dataset_class_names(args) -> list[str] | None:
    """Class names of an explicitly named dataset (for --predict's check), None when none is named."""
    if args.dataset in ("synthetic", "voc"):
        return list(datasets.SYNTHETIC_CLASSES if args.dataset == "synthetic" else datasets.VOC_CLASSES)
    if args.dataset == "folder" or args.classes:
        if not (args.classes or args.data_root):
            raise SystemExit("--dataset folder needs --data-root PATH (or --classes FILE) to know its classes")
        return datasets.read_class_list(args.classes or os.path.join(args.data_root, "classes.txt"))
    return None


def cmd_predict(args, device, info: distributed.DistInfo, given: set[str] = frozenset()) -> None:
    """Masks for every image of the --predict folder, at the checkpoint's run's evaluation settings unless `given`
    (the flags on the command line) names them."""
    out = args.out or "predictions"
    if not os.path.isdir(args.predict):
        raise SystemExit(f"--predict: not a folder: {args.predict}")
    entries = sorted(os.listdir(args.predict))
    named = [f for f in entries if datasets.is_image_name(f)]
    broken = [f for f in named if os.path.islink(os.path.join(args.predict, f))
              and not os.path.exists(os.path.join(args.predict, f))]
    if broken:  # (as the folder dataset names one: skipped, it would be missing from the output without a word)
        message = (f"--predict: {os.path.join(args.predict, broken[0])} is a broken link (its target "
                   f"{os.readlink(os.path.join(args.predict, broken[0]))!r} does not exist)"
                   + (f", and {len(broken) - 1} more" if len(broken) > 1 else "") + "; no mask was written")
        raise SystemExit(message if info.is_main else 1)  # (every process sees the folder: one says it)
    files = [f for f in named if os.path.isfile(os.path.join(args.predict, f))]
    unread = datasets.unread_image_files(args.predict, entries)
    if unread and info.is_main:
        warn(f"--predict: {unread}")
    nested = [f for f in entries if _holds_images(os.path.join(args.predict, f))]
    below = (f"{len(nested)} of its subfolders ({', '.join(nested[:3])}{', ...' if len(nested) > 3 else ''}) "
             f"{'holds' if len(nested) == 1 else 'hold'} "
             "images, which --predict does not read: it reads the images of one folder, not its subfolders") \
        if nested else ""
    if not files:
        raise SystemExit(f"--predict: no images ({', '.join(datasets.IMAGE_EXTENSIONS)}) in {args.predict}"
                         + (f"; {below}: give one of them" if below else ""))
    if below and info.is_main:
        warn(f"--predict {args.predict}: {below}")
    plan = plan_predict_outputs(args.predict, files, out)
    # Under torchrun every process predicts every world-th image. Every image decodes before any mask is written (a
    # bad file stops the run with none written): the processes agree on that before writing.
    plan = dict(list(plan.items())[info.rank::info.world_size])
    error = None
    for src in plan:
        try:
            datasets.read_image(src, exif_orientation=True)
        except datasets.DataFileError as e:
            error = f"--predict: {e}; no mask was written"
            break
    errors = distributed.all_gather_objects(error) if info.enabled else [error]
    if any(errors):
        raise SystemExit(next(e for e in errors if e) if info.is_main else 1)
    ckpt = checkpoint_or_exit(args.checkpoint, "--checkpoint")
    class_names = _dataset_class_names(args)
    if class_names is not None:
        check_classes(ckpt, args.checkpoint, class_names, args, "--predict")
    os_ = _run_eval_settings(args, ckpt.get("args") or {}, given, info, "predicting")
    net = _model_from_checkpoint(ckpt, args, os_, args.checkpoint, "--checkpoint").to(device).eval()
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    os.makedirs(out, exist_ok=True)
    # what a killed run's mask writes left (save_mask_png's temp files; no mask is ever half-written under its name)
    ckpt_io.remove_stale_temps(out, [os.path.basename(t) for t in plan.values()])
    tf, t0, written = EvalTransform(), time.time(), 0
    earlier_masks = {t for t in plan.values() if os.path.isfile(t)}  # an earlier --predict's (plan allows only those)
    try:
        for src, target in plan.items():
            img, _ = tf(datasets.read_image(src, exif_orientation=True), None)  # upright, as viewers show it
            probs = loop.predict_probs(net, img[None].to(device), _eval_scales(args), args.eval_flip, args.amp,
                                       args.channels_last)
            save_mask_png(probs.argmax(1)[0].cpu().numpy(), target)
            written += 1
    # a photo gone since the first pass (main names it, as any sample's file); another process's failure (torchrun)
    except (datasets.DataFileError, ConnectionError):
        raise
    except (KeyboardInterrupt, OSError) as e:
        # what the folder holds now: this run's masks, and an earlier run's where this one had not reached them
        left = len(earlier_masks - set(list(plan.values())[:written]))
        note = (f"{written} of the {len(plan)} masks{' of this process' if info.enabled else ''} were written to "
                f"{out} before it stopped" + (f"; {left} of the others there are an earlier --predict run's" if left
                                              else ""))
        if isinstance(e, KeyboardInterrupt):
            e.written = note  # (main's report prints it; add_note is Python 3.11's)
            raise
        raise SystemExit(f"train.py: {_os_error_text(e)}; {note}") from None
    if info.enabled:
        written = sum(distributed.all_gather_objects(written))  # and every process has finished
    if not info.is_main:
        return
    names = mask_names(files)
    renamed = sum(1 for f, name in names.items() if name == f + ".png")
    print(f"wrote {written} colour-coded masks (palette PNG, values = class indices) to {out} "
          f"in {time.time() - t0:.1f}s" + (f"; {renamed} of them named <file>.png (e.g. x.jpg.png), since images "
                                          "with the same name and another extension would share <name>.png"
                                          if renamed else ""))
    ours = set(names.values())
    earlier = [f for f in sorted(os.listdir(out)) if f.lower().endswith(".png") and f not in ours
               and _is_predict_mask(os.path.join(out, f))]
    if earlier:
        print(f"note: {out} also holds {len(earlier)} mask{'s' if len(earlier) > 1 else ''} of an earlier --predict "
              f"run that this one did not write (e.g. {earlier[0]}), maybe of another checkpoint: give --out an "
              "empty folder to keep runs apart")


def _holds_images(path: str) -> bool:
    """Whether `path` is a folder with an image --predict would read directly in it."""
    try:
        return os.path.isdir(path) and any(datasets.is_image_name(f) for f in os.listdir(path))
    except OSError:  # (a folder it may not list)
        return False


# The flags that define each dataset's validation split: --eval-only restores them from the checkpoint's saved
# arguments (the ones the user does not give), so it evaluates on what the run validated on.
EVAL_DATASET_FLAGS = {"synthetic": ("dataset", "crop_size", "synthetic_val_size", "data_seed"),
                      "voc": ("dataset", "data_root", "sbd_root", "val_split"),
                      "folder": ("dataset", "data_root", "classes", "val_split")}


def _same_folder(given: str | None, saved: str | None) -> bool:
    """Whether --data-root (None: not given) names the checkpoint's data root, however spelled."""
    if given is None or given == saved:
        return True
    return saved is not None and os.path.realpath(given) == os.path.realpath(saved)


def _restored_note(args, restored: list[str], path: str) -> str:
    """' (…)': which of the dataset flags an --eval-only or --resume error names came from the checkpoint, not the
    command line, and how a relative path in them is read."""
    paths = [k for k in ("data_root", "sbd_root", "classes") if k in restored]
    if not paths:
        return ""
    named = ", ".join(_flag(k, getattr(args, k)) for k in paths)
    relative = [getattr(args, k) for k in paths if not os.path.isabs(getattr(args, k))]
    where = f", read relative to the current folder {os.getcwd()}" if relative else ""
    flags = ", ".join(_flag(k, with_value=False) for k in paths)
    return f" ({named}: saved in the checkpoint {path}{where}; pass {flags} to give the dataset's location)"


def _run_eval_settings(args, saved: dict, given, info, doing: str) -> int:
    """The checkpoint's run's evaluation settings (what its metrics and best.pt were measured with), for
    --eval-only and --predict: --eval-scales (set in `args`) and the output stride (returned) unless `given` (the
    flags on the command line) names them; the first line printed names them, and says to add --eval-flip where the
    run evaluated with it."""
    if "eval_scales" not in given and isinstance(saved.get("eval_scales"), str):
        args.eval_scales = saved["eval_scales"]
    os_ = args.eval_output_stride or saved.get("eval_output_stride") or saved.get("output_stride", 16)
    if info.is_main:
        print(f"{doing} at --eval-output-stride {os_}, --eval-scales {args.eval_scales}"
              + (", --eval-flip" if args.eval_flip else "")
              + (f"; the run evaluated with --eval-flip: add it to {'evaluate' if doing == 'evaluating' else 'predict'}"
                 " as it did" if saved.get("eval_flip") and not args.eval_flip else ""))
    return os_


def cmd_eval_only(args, device, info, given: set[str] = frozenset()) -> None:
    """Evaluate a checkpoint on its run's validation split, at its run's evaluation settings unless `given` (the
    flags on the command line) names them."""
    path = args.checkpoint or os.path.join(args.out_dir or os.path.join("runs", args.dataset or "synthetic"), "best.pt")
    ckpt = checkpoint_or_exit(path, "--checkpoint" if args.checkpoint else "--eval-only (default checkpoint)")
    saved = ckpt.get("args") or {}
    restored = []  # the dataset flags read from the checkpoint
    if args.dataset is None and saved.get("dataset") is not None:  # the kind of dataset it trained on
        args.dataset = saved["dataset"]
        restored.append("dataset")
    if args.dataset == saved.get("dataset") and _same_folder(args.data_root, saved.get("data_root")):
        for key in EVAL_DATASET_FLAGS.get(saved.get("dataset"), ()):
            if getattr(args, key) is None and saved.get(key) is not None:
                setattr(args, key, saved[key])
                restored.append(key)
    # (a data root read from the checkpoint is checked by the dataset, whose error says where the path came from;
    # what is checked here is the command line's: a flag error)
    check_dataset_flags(args, _flag_error, check_root="data_root" not in restored)
    unset = {k for k, v in vars(args).items() if v is None}
    _apply_presets(args, device)
    # The record names what was evaluated: the checkpoint's network and its run's recipe, not the presets' training
    # defaults (a folder run's record said resnet101, 30000 iterations for a ResNet-29 trained 60).
    # (a training flag given here is not read, and warned about: the record keeps the run's; --crop-size, which the
    # synthetic set's validation images are cut at, is this command's where given)
    recipe = {k: saved[k] for k in RECIPE if k in saved and (k in unset or k != "crop_size")}
    try:
        _, val, class_names = _build_datasets(args, train=False)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--dataset {args.dataset}: {e}{_restored_note(args, restored, path)}") from None
    check_classes(ckpt, path, class_names, args, "--eval-only")
    os_ = _run_eval_settings(args, saved, given, info, "evaluating")
    net = _model_from_checkpoint(ckpt, args, os_, path, "--checkpoint" if args.checkpoint else
                                 "--eval-only (default checkpoint)").to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    t0 = time.time()
    metrics, kept = evaluate_split(net, val, class_names, device, args, info)
    recorded = {**vars(args), **recipe, **checkpoint_model_flags(ckpt, args), "eval_output_stride": os_}
    _report(args, info, metrics, {"checkpoint": path, "iteration": ckpt.get("iteration"), "eval_output_stride": os_,
                                  "eval_seconds": round(time.time() - t0, 2)}, "metrics_eval.json", recorded)
    if info.is_main:  # after the metrics; where it cannot be written, the earlier evaluation's goes (not beside these)
        preview = os.path.join(args.out_dir, "predictions_eval.png")
        earlier = os.path.isfile(preview)
        try:
            save_preview(kept, preview)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.remove(preview)
            if isinstance(e, OSError):
                raise SystemExit(f"train.py: {_os_error_text(e)}; the metrics were written to "
                                 f"{os.path.join(args.out_dir, 'metrics_eval.json')}" + (
                                     ", and the earlier predictions_eval.png (of another evaluation) was removed"
                                     if earlier else "")) from None
            raise


def _report(args, info, metrics: dict, extra: dict, filename: str, recorded: dict | None = None) -> None:
    """Print the metrics and write them with `extra` and the flags (`recorded`, else the args) to `filename` in
    --out-dir; an --eval-only rerun names the evaluation it replaces, and removes that one's preview where it
    writes none (--preview 0): a picture of another checkpoint's predictions would stay beside these metrics."""
    if not info.is_main:
        return
    print(loop_format(metrics))
    path = os.path.join(args.out_dir, filename)
    os.makedirs(args.out_dir, exist_ok=True)
    record = _json_safe({"metrics": metrics, **extra, "args": vars(args) if recorded is None else recorded})
    replaced = _earlier_evaluation(path) if args.eval_only else None
    text = json.dumps(record, indent=2, default=str, allow_nan=False)
    ckpt_io.atomic_write(path, lambda f: f.write(text.encode()))
    preview = os.path.join(args.out_dir, "predictions_eval.png")
    if replaced and args.preview == 0 and os.path.isfile(preview):  # (once the metrics that replace it are written)
        os.remove(preview)
        replaced += ", and its predictions_eval.png (--preview 0 draws none)"
    print(f"metrics written to {os.path.abspath(path)}" + (f" (replacing {replaced})" if replaced else ""))


def _earlier_evaluation(path: str) -> str | None:
    """What an earlier --eval-only's record at `path` measured (its checkpoint, settings and mIoU), named when a
    rerun replaces it (an evaluation at other settings would otherwise vanish without a word); None if none."""
    try:
        with open(path) as f:
            old = json.load(f)
        saved = old.get("args") or {}
        miou = (old.get("metrics") or {}).get("miou")
        return (f"the earlier evaluation of {old.get('checkpoint')} at iteration {old.get('iteration')}, "
                f"--eval-output-stride {old.get('eval_output_stride')}, --eval-scales {saved.get('eval_scales')}"
                + (", --eval-flip" if saved.get("eval_flip") else "")
                + (f": mIoU {100 * miou:.2f}" if isinstance(miou, (int, float)) else ""))
    except FileNotFoundError:
        return None
    except Exception:  # (unreadable or not a record of ours: still replaced, and said so)
        return "an earlier file of that name"


def _json_safe(obj):
    """NaN (a class absent from ground truth and predictions) → null, so the file is strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def loop_format(metrics: dict) -> str:
    from training.metrics import format_table

    return format_table(metrics)


def check_bn_batch(args, world_size: int, resumed: tuple | None = None) -> None:
    """Training BatchNorm needs 2 or more images per BatchNorm batch (the ASPP pooling branch has one value per image
    and channel): refused before any work. Across processes every BatchNorm is synchronized (the unfused ones by
    nn.SyncBatchNorm / DistributedBatchNorm2d, the fused ones through the fused ops' process group), so its batch is
    the global one: one image per process trains. `resumed` (restore_run_flags's): a batch size of 1 read from the
    checkpoint of a --freeze-bn run (a switch a resume does not read) is named as such."""
    if world_size == 1 and args.batch_size < 2 and not args.freeze_bn:
        if resumed is not None and "batch_size" in resumed[2]:
            froze = (resumed[1].get("args") or {}).get("freeze_bn")
            how = (", which trained with --freeze-bn (a switch, which a resume takes from the command line only): add "
                   "--freeze-bn to continue it as it ran, or give --batch-size 2 or more" if froze else
                   ": give --batch-size 2 or more, or add --freeze-bn")
            raise SystemExit(f"--resume {resumed[0]}: --batch-size {args.batch_size} comes from the checkpoint's "
                             f"run{how}. {loop.BATCH1_MESSAGE}")
        raise SystemExit(loop.BATCH1_MESSAGE)


# Flags whose change a resumed run does not note: where and how the run reports, not what it computes (the
# sample stream is the same for any --workers; --backbone-weights only initialises, and the checkpoint's weights
# replace it).
NOT_NOTED_ON_RESUME = ("resume", "overwrite", "out_dir", "stop_after", "checkpoint_every", "log_every",
                       "no_tensorboard", "device", "workers", "preview", "eval_only", "checkpoint", "predict", "out",
                       "backbone_weights", "dist_timeout")
LR_SCHEDULE_FLAGS = ("iterations", "lr", "poly_power")


def _same_value(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _value_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def resume_note(saved: dict, args, iteration: int) -> str | None:
    """'note: changed since the checkpoint's run: …' naming every setting the checkpoint records that this resumed
    run changes (None when none does); operational flags (NOT_NOTED_ON_RESUME) aside."""
    changed = [k for k in vars(args) if k in saved and k not in NOT_NOTED_ON_RESUME
               and not _same_value(saved[k], getattr(args, k))
               and not (k in PATH_FLAGS and isinstance(getattr(args, k), str) and _same_folder(getattr(args, k),
                                                                                             saved[k]))]
    if not changed:
        return None
    text = ("note: changed since the checkpoint's run: " +
            ", ".join(f"{_flag(k, with_value=False)} {_value_text(saved[k])} -> {_value_text(getattr(args, k))}"
                      for k in changed) +
            "; the run continues with the new values (a resume repeats an uninterrupted run only with the same ones)")
    if any(k in LR_SCHEDULE_FLAGS for k in changed):
        text += (f"; from iteration {iteration} on, the learning rate follows the poly schedule of --lr {args.lr} over "
                 f"--iterations {args.iterations}")
    return text


def given_flags(argv=None) -> set[str]:
    """The flags (their dests) the command line `argv` (None: sys.argv[1:]) gives, whatever their values."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_known_args(argv)[0]))


# The flags that define a dataset (its location and splits): a resume reads them from its checkpoint only where the
# command line names the same dataset (or none) in the same folder.
DATASET_FLAGS = ("dataset", "data_root", "sbd_root", "classes", "train_split", "val_split", "synthetic_train_size",
                 "synthetic_val_size", "data_seed")


def restore_run_flags(args, given: set[str], device: torch.device) -> tuple[str, dict, list[str]]:
    """--resume, before the presets: load the checkpoint, and give every value flag of its run's recipe that the
    command line does not give (`given`) the run's value, not the preset's, so that `--resume` alone continues the
    run it names (its data, schedule and evaluation); switches (--fused-ops, --no-flip, ...) are as given, and
    resume_note names every setting that differs. Returns (path, checkpoint, the flags read from it that the presets
    would have set otherwise)."""
    if args.out_dir is None:  # the folder check_out_dir checked: it does not follow a dataset read from the checkpoint
        args.out_dir = os.path.join("runs", args.dataset or "synthetic")
    path = os.path.join(args.out_dir, "last.pt") if args.resume == "auto" else args.resume
    ckpt = checkpoint_or_exit(path, "--resume")
    saved = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    switches = {a.dest for a in build_parser()._actions if a.nargs == 0}
    same_data = (args.dataset in (None, saved.get("dataset"))
                 and (args.data_root is None or _same_folder(args.data_root, saved.get("data_root"))))
    # The kind of dataset is the run's unless given (a --data-root of its moved folder alone continues it); its
    # location and splits only where the command line names the same dataset in the same folder (or none).
    keys = [k for k in vars(args) if k in saved and saved[k] is not None and k not in given and k not in switches
            and k not in NOT_NOTED_ON_RESUME and (same_data or k not in DATASET_FLAGS or k == "dataset")
            # (the presets' values of flags its dataset does not read, e.g. a folder run's --synthetic-train-size)
            and k not in unread_dataset_flags(args.dataset or saved.get("dataset"))
            # fp16 autocast needs a CUDA device: a GPU run resumed on a CPU runs as given (resume_note names it)
            and not (k == "amp" and saved[k] == "fp16" and device.type != "cuda")]
    # (only to name what differs from a run without the checkpoint: the dataset against the command line's, the
    # rest against the presets of the run's dataset; a folder run's are not the synthetic set's)
    preset = argparse.Namespace(**vars(args))
    preset.dataset = saved["dataset"] if "dataset" in keys else args.dataset
    _apply_presets(preset, device)
    preset.dataset = args.dataset or "synthetic"  # (what _apply_presets makes of the command line's)
    restored = []
    for k in keys:
        if not _same_value(getattr(preset, k), saved[k]):
            restored.append(k)
        setattr(args, k, saved[k])
    return path, ckpt, restored


# What a training run writes to --out-dir (and tb/'s TensorBoard events): a fresh run into a folder that holds them
# is refused unless --overwrite, which removes them first.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "metrics.json", "predictions_val.png")


def _tb_events(out_dir: str) -> list[str]:
    tb = os.path.join(out_dir, "tb")
    try:
        return sorted(os.path.join("tb", f) for f in os.listdir(tb)
                      if f.startswith("events.out.tfevents.") and os.path.isfile(os.path.join(tb, f)))
    except OSError:
        return []


def earlier_run(out_dir: str) -> list[str]:
    """The files of an earlier training run in `out_dir` (RUN_FILES and TensorBoard events)."""
    return [f for f in RUN_FILES if os.path.isfile(os.path.join(out_dir, f))] + _tb_events(out_dir)


def _describe_run(out_dir: str, files: list[str]) -> str:
    parts = []
    for f in files:
        it = ckpt_io.checkpoint_iteration(os.path.join(out_dir, f)) if f.endswith(".pt") else None
        parts.append(f"{f} at iteration {it}" if it is not None else f)
    events = [f for f in parts if f.startswith("tb" + os.sep)]
    parts = [f for f in parts if f not in events]
    return ", ".join(parts + ([f"{len(events)} TensorBoard event files in tb/"] if events else []))


def check_out_dir(args, error) -> None:
    """The folder the command writes (--out-dir, or --out for --predict) must be one it can create and write in. A
    fresh training run (no --resume) into an --out-dir that holds an earlier run would replace its checkpoints
    and mix the two runs' logs: refused unless --overwrite. So is --resume from another folder's checkpoint into
    it (its saves would replace that run's); --overwrite with --resume from --out-dir itself is a contradiction."""
    # --eval-only's default, runs/DATASET, waits for the checkpoint's dataset: its parent runs/ is checked here (the
    # evaluation would otherwise run to its end, then fail to write its metrics)
    writes = ("--out", args.out or "predictions") if args.predict else (
        ("--out-dir", args.out_dir) if args.out_dir else ("--eval-only's default --out-dir (runs/DATASET):", "runs")) \
        if args.eval_only else ("--out-dir", args.out_dir or os.path.join("runs", args.dataset or "synthetic"))
    problem = ckpt_io.unwritable_folder(writes[1]) if writes[1] else None
    if problem:
        where, why = problem
        error(f"{writes[0]} {writes[1]}: cannot create the folder: {where} {why}" if why == ckpt_io.NOT_A_FOLDER else
              f"{writes[0]} {writes[1]}: cannot write there" + ("" if where == os.path.abspath(writes[1]) else
                                                                 f" (in {where})") + f": {why}")
    if args.predict or args.eval_only:
        return
    out_dir = args.out_dir or os.path.join("runs", args.dataset or "synthetic")
    # (the checkpoint's own folder, a link to it followed: --resume link.pt --overwrite would remove what it names)
    resume_here = args.resume == "auto" or bool(args.resume) and os.path.dirname(
        os.path.realpath(args.resume)) == os.path.realpath(out_dir)
    if args.resume and args.resume != "auto" and args.out_dir is None and not resume_here:
        warn(f"--resume {args.resume} continues into the default --out-dir {out_dir}, not the checkpoint's folder "
             f"{os.path.dirname(args.resume) or '.'}: give --out-dir {os.path.dirname(args.resume) or '.'} to continue "
             "the run there")
    if args.overwrite and resume_here:
        resume = "--resume" if args.resume == "auto" else f"--resume {args.resume}"
        error(f"--overwrite removes the run in --out-dir {out_dir} and {resume} continues it: drop one of them")
    last = os.path.join(out_dir, "last.pt")
    if resume_here and args.resume != "auto" and os.path.isfile(args.resume) and os.path.isfile(last) \
            and not os.path.samefile(args.resume, last):
        # An older checkpoint of the folder (best.pt, a copy): the resumed run's saves would replace the later last.pt
        # and its resume would drop the log's later records; what the user saved stays unless they move it away.
        at, later = ckpt_io.checkpoint_iteration(args.resume), ckpt_io.checkpoint_iteration(last)
        if at is not None and later is not None and later > at:
            error(f"--resume {args.resume} (iteration {at}) continues the run in --out-dir {out_dir} from an earlier "
                  f"point: its saves would replace last.pt at iteration {later} (and the log's records after iteration "
                  f"{at}); give another --out-dir to branch off there (or move last.pt away to rewind this folder), or "
                  "--resume its last.pt")
    lock_out_dir(out_dir, error)
    files = earlier_run(out_dir)
    if files and args.overwrite:
        # an input of this run that is one of the files --overwrite removes (a link to one followed; a link in the
        # folder is removed, not what it names)
        doomed = {}
        for f in files:  # the file unlink removes: what the path names, its last part a link itself if it is one
            path = os.path.join(out_dir, f)
            if not os.path.islink(path):
                doomed[os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))] = f
        reads = [("--backbone-weights", args.backbone_weights)]
        if "classes" not in unread_dataset_flags(args.dataset or "synthetic"):
            reads.append(("--classes", args.classes))
        for flag, path in reads:
            name = doomed.get(os.path.realpath(path)) if path else None
            if name is not None:
                error(f"{flag} {path} is the earlier run's {name} in --out-dir {out_dir}, "
                      "which --overwrite removes before training: copy it out of the folder first, or give another "
                      "--out-dir")
    if not files or args.overwrite:
        return
    if not args.resume:
        resumable = "add --resume to continue it, " if "last.pt" in files else "add "
        error(f"--out-dir {out_dir} holds an earlier run ({_describe_run(out_dir, files)}): {resumable}--overwrite "
              "to replace it (its files are removed), or give another --out-dir")
    if not resume_here and os.path.isfile(args.resume):
        error(f"--out-dir {out_dir} holds an earlier run ({_describe_run(out_dir, files)}), and --resume "
              f"{args.resume} continues a run from another folder, whose saves would replace that run's files: give "
              "another --out-dir, or add --overwrite to remove them")


# The lock on the training run's --out-dir: (descriptor, the folder if the lock created it, else None), or None.
_FOLDER_LOCK: tuple[int, str | None] | None = None


def lock_out_dir(out_dir: str, error) -> None:
    """Lock --out-dir for this training run (its main process: under torchrun, global rank 0), before its contents
    are judged: a second run started into it while this one runs is refused, not let through to replace this one's
    checkpoints and mix its log (the checks above see files only once a run wrote them). main() releases it however
    it ends, and removes the folder if the lock created it and nothing was written."""
    global _FOLDER_LOCK
    release_out_dir()  # (an earlier main() of this process that stopped before its end)
    try:
        if distributed.env_dist_info().rank != 0:
            return
    except ValueError:  # (a malformed torchrun environment: refused by check_args)
        return
    existed = os.path.isdir(out_dir)
    try:
        fd = ckpt_io.lock_folder(out_dir)
    except ckpt_io.FolderBusy:
        error(f"--out-dir {out_dir}: another train.py run is training into it (it holds the folder's lock); wait "
              "for it to end, or give another --out-dir")
    if fd is not None:
        _FOLDER_LOCK = (fd, None if existed else out_dir)


def release_out_dir() -> None:
    global _FOLDER_LOCK
    if _FOLDER_LOCK is not None:
        fd, created = _FOLDER_LOCK
        _FOLDER_LOCK = None
        ckpt_io.unlock_folder(fd)
        if created is not None:
            with contextlib.suppress(OSError):  # (not empty: the run wrote there)
                os.rmdir(created)


def _close_lock_in_child() -> None:
    # A forked process (a DataLoader worker) shares the lock's open file description: its copy of the descriptor
    # is closed (not unlocked, which would unlock the parent's), so that the lock ends with the main process.
    if _FOLDER_LOCK is not None:
        with contextlib.suppress(OSError):
            os.close(_FOLDER_LOCK[0])


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_lock_in_child)


def remove_earlier_run(out_dir: str) -> list[str]:
    """--overwrite: delete the earlier run's files (earlier_run) from `out_dir`; returns their names."""
    removed = []
    for f in earlier_run(out_dir):
        try:
            os.unlink(os.path.join(out_dir, f))
            removed.append(f)
        except FileNotFoundError:
            pass
    return removed


def cmd_train(args, device, info, resumed: tuple | None) -> None:
    """Train; `resumed`: restore_run_flags's (path, checkpoint, flags read from it) for --resume, else None."""
    if args.batch_size % info.world_size:
        came = (f"--resume {resumed[0]}: --batch-size {args.batch_size} (global), which comes from the checkpoint's "
                "run," if resumed is not None and "batch_size" in resumed[2] else
                f"--batch-size {args.batch_size} (global)")
        raise SystemExit(f"{came} must be divisible by the number of processes, {info.world_size}"
                         + (f": give --batch-size a multiple of {info.world_size}, or resume with a number of "
                            f"processes that divides {args.batch_size}" if resumed is not None else ""))
    check_bn_batch(args, info.world_size, resumed)
    train_raw, val_raw, class_names = build_datasets(args, note="" if resumed is None else
                                                     _restored_note(args, resumed[2], resumed[0]))
    if info.is_main:
        splits = split_names(args)
        print(f"data: {args.dataset} {splits[0]} {len(train_raw)} images, {splits[1]} {len(val_raw)} images, "
              f"{len(class_names)} classes; device {device}" + (f", {info.world_size} processes" if info.enabled
                                                                  else ""))
    train_set = loop.AugmentedDataset(train_raw, TrainTransform(args.crop_size, args.scale_range, not args.no_flip))
    net = build_model(args.backbone, len(class_names), args.output_stride, args.aux_loss, args.fused_ops,
                      args.memory_efficient, width=args.backbone_width)
    if args.backbone_weights and resumed is None:
        backbone_weights_or_exit(net, args)
    elif args.backbone_weights:  # (not read: a file that does not fit, or has moved, must not stop the resume)
        if info.is_main:
            print(f"note: --backbone-weights {args.backbone_weights} is not read: --resume continues from "
                  f"{resumed[0]}, whose weights replace it", file=sys.stderr)
    elif (resumed is None and args.dataset != "synthetic" and args.backbone in ("resnet50", "resnet101")
          and args.backbone_width == 64 and info.is_main):
        print(f"note: no --backbone-weights: the {args.backbone} backbone starts from random weights; DeepLabV3's "
              "published results start from ImageNet ones (torchvision's resnet50/101 state_dict: --backbone-weights "
              "PTH, docs/training.md)", file=sys.stderr)
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if args.freeze_bn:
        loop.freeze_batchnorm(net)
    if args.compile:
        # In place (Module.compile): state_dict keys and checkpoints stay those of the plain model.
        net.compile()
    if info.enabled:
        if not args.freeze_bn:
            net = distributed.convert_sync_batchnorm(net, device.type)
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    resume = None
    if args.resume:
        path, resume, restored = resumed
        try:  # before anything reads its entries: one line, not a KeyError
            ckpt_io.check_resumable(resume, "the checkpoint")
        except ValueError as e:
            raise SystemExit(f"--resume {path}: {e}") from None
        check_classes(resume, path, class_names, args, "--resume")
        if resume.get("iteration", 0) > args.iterations:
            raise SystemExit(f"--resume {path}: the checkpoint is at iteration {resume['iteration']}, beyond "
                             f"--iterations {args.iterations}; give --iterations >= {resume['iteration']}")
        check_weights_fit(net, resume, path, "--resume", args)
        try:  # what fit() loads, checked before --overwrite removes the earlier run below
            loop.check_resume_state(net, resume, args.weight_decay)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise SystemExit(f"--resume {path}: {e}") from None
        if info.is_main:
            print(f"resuming {path} at iteration {resume['iteration']}")
            if restored:
                print("note: flags not given, read from the checkpoint's run: " +
                      ", ".join(f"{_flag(k, with_value=False)} {_value_text(getattr(args, k))}" for k in restored))
            note = resume_note(resume.get("args") or {}, args, resume["iteration"])
            if note:
                print(note)
    if info.is_main and args.overwrite:  # every check passed: the earlier run's files go just before training
        removed = remove_earlier_run(args.out_dir)
        if removed:
            print(f"--overwrite: removed the earlier run's {', '.join(removed)} from {os.path.abspath(args.out_dir)}")
    if resume is not None:
        carry_best(path, resume, args.out_dir, info.is_main)
    cfg = loop.TrainConfig(
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, poly_power=args.poly_power, seed=args.seed, amp=args.amp,
        channels_last=args.channels_last, freeze_bn=args.freeze_bn, aux_weight=0.5 if args.aux_loss else 0.0,
        num_workers=args.workers, log_every=args.log_every, eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every, stop_after=args.stop_after, out_dir=args.out_dir,
        fused_loss=args.fused_ops and _has_low_res_forward(net),
        extra_state={"args": vars(args), "num_classes": len(class_names), "class_names": class_names})
    eval_net_cache = {}

    def val_fn(model):
        # Evaluate at --eval-output-stride: a second network with the same weights (state_dicts are identical).
        core = unwrap_model(model)
        if args.eval_output_stride and args.eval_output_stride != args.output_stride:
            if "net" not in eval_net_cache:
                eval_net = build_model(args.backbone, len(class_names), args.eval_output_stride, args.aux_loss,
                                       args.fused_ops, width=args.backbone_width).to(device)
                if args.channels_last:  # as the training network: its kernels run fastest in that layout
                    eval_net = eval_net.to(memory_format=torch.channels_last)
                eval_net_cache["net"] = eval_net
            target = eval_net_cache["net"]
            target.load_state_dict(core.state_dict())
        else:
            target = core
        return run_eval(target, val_raw, class_names, device, args, info, args.out_dir, "val")

    log = loop.MetricsLog(os.path.join(args.out_dir, "metrics.jsonl") if info.is_main else None,
                          os.path.join(args.out_dir, "tb") if info.is_main and not args.no_tensorboard else None,
                          resume_at=None if resume is None else resume["iteration"],
                          eval_pending=loop.resume_evaluates(resume, cfg, validating=True))
    t0 = time.time()
    try:
        result = loop.fit(net, train_set, cfg, device, val_fn=val_fn, resume=resume, rank=info.rank,
                          world_size=info.world_size, log=log)
    except FloatingPointError as e:  # a NaN/Inf loss: the message names the checkpoints and what can get past it
        # Every process stops at the same step (the loss is summed over them); the main one, which wrote the
        # checkpoints, says so, the others exit quietly with status 1.
        raise SystemExit(f"train.py: {e}" if info.is_main else 1) from None
    finally:
        log.close()
    train_s = time.time() - t0
    if info.is_main:
        since = "" if resume is None else f" (this invocation, resumed at iteration {resume['iteration']})"
        print(f"trained to iteration {result.iteration}/{args.iterations} in {train_s:.1f}s{since}; checkpoints in "
              f"{os.path.abspath(args.out_dir)} (last.pt" + (", best.pt" if result.best_metric is not None else "")
              + ")")
    if result.last_metrics is not None and result.iteration == args.iterations:
        # train_seconds: this invocation's (resumed_at: the iteration it started from; None for a whole run). The
        # preview is named where it is: a resumed finished run evaluates nothing, and into another --out-dir it
        # brings its checkpoints, not the preview.
        preview = os.path.join(args.out_dir, "predictions_val.png")
        _report(args, info, result.last_metrics, {"iteration": result.iteration, "train_seconds": round(train_s, 2),
                                                  "resumed_at": None if resume is None else resume["iteration"],
                                                  "best_miou": result.best_metric,
                                                  "best_iteration": result.best_iteration,
                                                  "preview": (preview if args.preview > 0 and os.path.isfile(preview)
                                                              else None)},
                "metrics.json")


def carry_best(resume_path: str, resume: dict, out_dir: str, is_main: bool) -> None:
    """--resume CKPT from another folder into --out-dir: the best.pt that the checkpoint's best metric names comes
    along (copied atomically by the main process), so that --out-dir holds the best.pt its metrics report. Where
    that file is gone (or holds another iteration), the run tracks its best afresh: the checkpoint's best is
    forgotten (in `resume`, on every process alike) and the next evaluation writes best.pt."""
    if resume.get("best_metric") is None:
        return
    src = os.path.join(os.path.dirname(os.path.abspath(resume_path)), "best.pt")
    dst = os.path.join(out_dir, "best.pt")
    if os.path.exists(dst) and os.path.realpath(src) == os.path.realpath(dst):
        return  # resumed in place
    found = ckpt_io.checkpoint_iteration(src) if os.path.isfile(src) else None
    if found is not None and found == resume.get("best_iteration"):
        if is_main:
            with open(src, "rb") as f:
                ckpt_io.atomic_write(dst, lambda out: shutil.copyfileobj(f, out))
            print(f"copied {src} (the best so far, iteration {resume['best_iteration']}) into {out_dir}")
        return
    if is_main:
        why = ("is not there" if not os.path.isfile(src) else
               "cannot be read (or records no iteration)" if found is None else f"holds iteration {found}")
        print(f"note: {src}, the best checkpoint --resume {resume_path} names (iteration "
              f"{resume.get('best_iteration')}), {why}: the best is tracked afresh from this run's evaluations")
    resume["best_metric"] = resume["best_iteration"] = None


# ---- command line ------------------------------------------------------------------------------------------------


# The flags that name a file or folder.
PATH_FLAGS = ("data_root", "sbd_root", "classes", "backbone_weights", "out_dir", "resume", "checkpoint", "predict",
              "out")


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in PATH_FLAGS:
        # "--resume=~/runs/a/last.pt" reaches us unexpanded (the shell expands ~ only at a word's start): read as the
        # user's home, as a shell would (and as model.load_file reads it), before any check compares paths; a file
        # or folder literally named "~..." in the current folder is still read as itself.
        value = getattr(args, name)
        if isinstance(value, str) and value.startswith("~") and not os.path.lexists(value):
            setattr(args, name, os.path.expanduser(value))
    if args.channels_last is None:
        args.channels_last = args.fused_ops
    if args.memory_efficient and not args.fused_ops:
        p.error("--memory-efficient is a mode of the fused ops: add --fused-ops")
    check_args(args, p.error, {k: p.get_default(k) for k in vars(args)})
    return args


def build_parser() -> argparse.ArgumentParser:
    # `python -m train` (a regular install's module) says so in its usage line, not train.py
    prog = "python -m train" if __name__ == "__main__" and __spec__ is not None else None
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["synthetic", "voc", "folder"], default=None,
                   help="synthetic (built in, the default), voc (VOC 2012 + SBD) or folder (images/ + masks/)")
    g.add_argument("--data-root", help="voc: the VOC2012 folder (JPEGImages, SegmentationClass, ImageSets); "
                   "folder: a folder with images/, masks/ and classes.txt")
    g.add_argument("--sbd-root", help="voc: the SBD folder (benchmark_RELEASE or its dataset/ folder) for train_aug; "
                   "not needed with pre-converted SegmentationClassAug PNGs inside --data-root")
    g.add_argument("--classes", help="folder: class-name file, one per line, line i = index i (default "
                   "DATA_ROOT/classes.txt)")
    g.add_argument("--train-split", help="voc: train_aug (default) or train; folder: list name (default train)")
    g.add_argument("--val-split", help="list of the evaluation split (default val)")
    g.add_argument("--synthetic-train-size", type=int, default=None, help="synthetic: training images (default 4000)")
    g.add_argument("--synthetic-val-size", type=int, default=None, help="synthetic: validation images (default 200)")
    g.add_argument("--data-seed", type=int, default=None, help="synthetic: generator seed (default 0)")
    g.add_argument("--workers", type=int, default=None,
                   help="data-loading processes (default 0 on CPU; on GPU the CPU count, at most 8)")

    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=available_backbones(), default=None,
                   help="ResNet depth (default resnet101 for voc/folder; for synthetic on CPU the smallest offered)")
    g.add_argument("--fused-ops", action="store_true",
                   help="run conv+BN+ReLU, ASPP and the loss (upsample + cross-entropy) on deeplab_ops's fused ops")
    g.add_argument("--memory-efficient", action="store_true",
                   help="with --fused-ops: the fused ops keep no pre-BN activations for the backward "
                        "(docs/memory_efficient.md)")
    g.add_argument("--backbone-width", type=int, default=None,
                   help="the ResNet's base width (64, the standard ResNet's, except for synthetic on CPU: a narrow "
                        "network; ASPP and head get 4x this many channels)")
    g.add_argument("--output-stride", type=int, choices=[8, 16], default=None,
                   help="training output stride (16; 8 for synthetic on CPU)")
    g.add_argument("--aux-loss", action="store_true", help="auxiliary FCN head on layer3 (weight 0.5)")
    g.add_argument("--backbone-weights", metavar="PTH", help="initialise the backbone from a local ImageNet ResNet "
                   "state_dict (torchvision's resnet50/101 file; the paper's VOC results start from one), or take "
                   "the backbone of a whole DeepLabV3 state_dict (torchvision's deeplabv3_resnet50/101 file, a "
                   "train.py checkpoint)")

    g = p.add_argument_group("optimisation (defaults depend on --dataset; VOC: the paper's recipe)")
    g.add_argument("--iterations", type=int, help="training iterations (voc: 30000)")
    g.add_argument("--batch-size", type=int, help="global batch size, over all processes (voc: 16)")
    g.add_argument("--crop-size", type=int, help="training crop (voc: 513; synthetic: the image size, 64 on CPU)")
    g.add_argument("--lr", type=float, help="base learning rate (voc: 0.007), poly-decayed to 0")
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4,
                   help="on the convolution and linear weights (not BatchNorm parameters or biases)")
    g.add_argument("--scale-range", type=float, nargs=2, metavar=("MIN", "MAX"), help="random scale (voc: 0.5 2.0)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flip")
    g.add_argument("--freeze-bn", action="store_true", help="BatchNorm in eval mode with frozen affine parameters")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="mixed precision: bf16 on CPU or GPU, fp16 on a CUDA device only")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for the model and inputs (default: on with --fused-ops, whose kernels run "
                        "fastest in NHWC on CPU and GPU alike; off otherwise)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model: the Python between the ops compiles away (the fused ops still run "
                        "their own host code per call: C++ on cpu/cuda, Python launchers on triton); the first steps "
                        "compile")
    g.add_argument("--seed", type=int, default=0, help="seed of the model init, sample order and augmentation")
    g.add_argument("--deterministic", action="store_true",
                   help="torch deterministic algorithms, no cudnn benchmark, no timed Triton autotuning (on CUDA: "
                        "training needs --fused-ops)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-output-stride", type=int, choices=[8, 16], default=None,
                   help="output stride at evaluation (default: the training one; --eval-only, --predict and "
                        "--resume: the run's); 8 as in the paper's best results")
    g.add_argument("--eval-scales", default="1.0", help="comma-separated scales, or 'ms' for 0.5,0.75,...,1.75 "
                   "(default 1.0; --eval-only, --predict and --resume: the run's)")
    g.add_argument("--eval-flip", action="store_true", help="also average the horizontally flipped input")
    g.add_argument("--eval-batch-size", type=int, default=1, help="images per evaluation batch (those of one size go "
                   "through the network together, unpadded: the metrics do not depend on it)")
    g.add_argument("--eval-every", type=int, help="evaluate (and track best.pt) every N iterations; 0: at the end")
    g.add_argument("--preview", type=int, default=8, help="images in the predictions-vs-ground-truth PNG")

    g = p.add_argument_group("run")
    g.add_argument("--out-dir", help="checkpoints, metrics.json, metrics.jsonl, previews (default runs/DATASET); a new "
                   "run refuses one that holds an earlier run (see --resume, --overwrite)")
    g.add_argument("--resume", nargs="?", const="auto", help="continue a run from CKPT (default OUT_DIR/last.pt); "
                   "the lr schedule from there is that of the --lr and --iterations given now")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out-dir that holds an earlier "
                   "one, removing its last.pt, best.pt, metrics.jsonl, metrics.json, predictions_val.png and tb/ "
                   "events first (without it such a folder is refused: --resume continues the run there)")
    g.add_argument("--checkpoint-every", type=int, help="save last.pt every N iterations")
    g.add_argument("--stop-after", type=int, help="stop after N iterations of this invocation (resume later)")
    g.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint (default OUT_DIR/best.pt)")
    g.add_argument("--checkpoint", help="checkpoint for --eval-only / --predict")
    g.add_argument("--predict", metavar="DIR", help="write colour-coded masks for every image in DIR (NAME.png; "
                   "NAME.EXT.png where two images share a name); never overwrites an input or a foreign file")
    g.add_argument("--out", help="--predict: output folder, not DIR itself (default predictions/)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    g.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_MIN, metavar="MINUTES",
                   help="under torchrun: how long a collective waits for the other processes before every process "
                   "stops (a hung process is found after this long; raise it for evaluations much longer than a "
                   "step on one process)")
    g.add_argument("--log-every", type=int, default=20,
                   help="iterations between metrics.jsonl's training records (and, when stderr is not a terminal, "
                        "progress lines)")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard events even when installed")
    return p


MIN_CROP = 16  # the largest output stride: a smaller crop leaves the network less than one feature pixel
MAX_SEED = 2**32 - 1  # NumPy's seeds
FLOAT32_MAX = torch.finfo(torch.float32).max  # the largest --lr / --weight-decay torch's SGD takes


def _finite(v: float) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


# Flags only training reads (the model of --eval-only / --predict comes from the checkpoint), and the evaluation
# flags --predict does not read.
TRAINING_ONLY = ("resume", "overwrite", "stop_after", "checkpoint_every", "iterations", "batch_size", "lr",
                 "poly_power", "momentum", "weight_decay", "scale_range", "no_flip", "freeze_bn", "compile", "backbone",
                 "backbone_width", "backbone_weights", "output_stride", "aux_loss", "memory_efficient", "eval_every")
NOT_PREDICT = ("out_dir", "preview", "eval_batch_size", "workers", "train_split", "val_split", "sbd_root",
               "synthetic_train_size", "synthetic_val_size", "data_seed", "crop_size")
NOT_EVAL_ONLY = ("train_split", "synthetic_train_size")
# What --eval-only records of the checkpoint's run (metrics_eval.json's args): how it trained, every preset included
# (not this command's flags about its own run: --resume, --overwrite, --stop-after).
RECIPE = tuple(k for k in dict.fromkeys((*PRESETS["voc"], *TRAINING_ONLY, *NOT_EVAL_ONLY, "seed", "deterministic"))
               if k not in ("resume", "overwrite", "stop_after"))


def check_args(args, error, defaults: dict | None = None) -> None:
    """Refuse flag values that are out of range or contradict each other (error(message) does not return), and
    warn about flags the chosen command does not read (those that differ from `defaults`, the parser's). Values
    left unset (None) come from the presets later."""
    ints = {  # flag: (minimum, what it means)
        "iterations": (1, "training iterations"), "batch_size": (1, "the global batch size"),
        "stop_after": (1, "iterations to run in this invocation"), "log_every": (1, "iterations between log lines"),
        "checkpoint_every": (1, "iterations between last.pt saves"), "eval_batch_size": (1, "images per batch"),
        "eval_every": (0, "iterations between evaluations; 0 evaluates at the end only"),
        "preview": (0, "images in the preview PNG; 0 for none"), "workers": (0, "data-loading processes"),
        "backbone_width": (1, "the ResNet's base width"), "crop_size": (MIN_CROP, "pixels: the largest output "
                                                                                 "stride, 16; a smaller crop leaves "
                                                                                 "less than one feature pixel"),
        "synthetic_train_size": (1, "images"), "synthetic_val_size": (1, "images"),
    }
    for name, (low, what) in ints.items():
        v = getattr(args, name)
        if v is not None and v < low:
            error(f"--{name.replace('_', '-')} must be >= {low} ({what}), got {v}")
    # An empty value (a shell variable that was not set) is no path: --out-dir "" trained, then saved no checkpoint
    # (the loop read it as "do not save") and failed at the end; --out "" fell back to predictions/ unsaid.
    paths = {"data_root": "the dataset's folder", "sbd_root": "the SBD folder", "classes": "a classes.txt file",
             "train_split": "a split name", "val_split": "a split name", "backbone_weights": "a weights file",
             "out_dir": "the run's folder (created if missing)", "resume": "a checkpoint file, or no value for "
             "OUT_DIR/last.pt", "checkpoint": "a checkpoint file", "predict": "a folder of images",
             "out": "the masks' folder (created if missing)"}
    for name, what in paths.items():
        v = getattr(args, name, None)
        if isinstance(v, str) and not v.strip():
            error(f"--{name.replace('_', '-')} expects {what}, got an empty value {v!r}")
    for name in ("seed", "data_seed"):
        v = getattr(args, name)
        if v is not None and not 0 <= v <= MAX_SEED:
            error(f"--{name.replace('_', '-')} must be in [0, {MAX_SEED}] (NumPy's seed range), got {v}")
    try:  # torchrun's environment (a stray WORLD_SIZE, a value that is not a number): before the checks that read it
        distributed.env_dist_info()
    except ValueError as e:
        error(str(e))
    if (args.batch_size == 1 and not args.freeze_bn and not args.eval_only and not args.predict
            and _world_size() == 1):  # across processes the BatchNorms are synchronized: check_bn_batch
        error(f"--batch-size 1: {loop.BATCH1_MESSAGE}")
    if args.lr is not None and not (_finite(args.lr) and 0 < args.lr <= FLOAT32_MAX):
        error(f"--lr must be a number > 0 and at most {FLOAT32_MAX:.4g} (float32's largest: SGD applies it to the "
              f"float32 weights), got {args.lr}")
    if not (_finite(args.poly_power) and args.poly_power > 0):
        error(f"--poly-power must be a finite number > 0 (the poly schedule's exponent; 0.9 in the paper), got "
              f"{args.poly_power}")
    if not (_finite(args.momentum) and 0 <= args.momentum < 1):
        error(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (_finite(args.dist_timeout) and args.dist_timeout > 0):
        error(f"--dist-timeout must be a finite number of minutes > 0, got {args.dist_timeout}")
    if not (_finite(args.weight_decay) and 0 <= args.weight_decay <= FLOAT32_MAX):
        error(f"--weight-decay must be a number >= 0 and at most {FLOAT32_MAX:.4g} (float32's largest: SGD applies "
              f"it to the float32 weights), got {args.weight_decay}")
    if args.scale_range is not None:
        lo, hi = args.scale_range
        if not (_finite(lo) and _finite(hi) and 0 < lo <= hi):
            error(f"--scale-range MIN MAX must satisfy 0 < MIN <= MAX, got {lo:g} {hi:g}")
    parse_eval_scales(args.eval_scales, error)
    for name in ("out_dir", "out"):
        path = getattr(args, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            error(f"--{name.replace('_', '-')} {path}: exists and is not a folder")
    if args.predict and args.eval_only:
        error("--predict and --eval-only are two commands: drop --eval-only to write masks for the images in "
              f"{args.predict}, or drop --predict to evaluate on the dataset")
    if args.checkpoint and not (args.eval_only or args.predict):
        error(f"--checkpoint {args.checkpoint} is read only by --eval-only and --predict; to continue training from "
              "a checkpoint use --resume CKPT, to initialise the backbone --backbone-weights PTH")
    if args.out and not args.predict:
        error(f"--out {args.out} is --predict's output folder; training and --eval-only write to --out-dir")
    if args.predict and not args.checkpoint:
        error("--predict needs --checkpoint CKPT (the model to run)")
    if args.predict and not os.path.isdir(args.predict):
        error(f"--predict {args.predict}: " + ("not a folder" if os.path.exists(args.predict) else "no such folder")
              + " (expected a folder of images)")
    # Flags that need a device: checked against the devices visible here (--device auto picks CUDA when there is one).
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        error("--device cuda: no CUDA device is visible (use --device cpu, or auto)")
    if args.amp == "fp16" and (args.device == "cpu" or not cuda):
        on = "--device cpu" if args.device == "cpu" else "a CPU (no CUDA device is visible)"
        scaler = "" if args.predict or args.eval_only else " with a GradScaler"
        error(f"--amp fp16 needs a CUDA device (fp16 autocast{scaler}), not {on}; use --amp bf16 or none")
    if args.deterministic and cuda and args.device != "cpu" and not (args.fused_ops or args.predict or args.eval_only):
        # torch.use_deterministic_algorithms(True) raises at the first step, after the data and the model were built
        error("--deterministic on CUDA trains only with --fused-ops: eager PyTorch has no deterministic CUDA kernel "
              "for the 2-D cross-entropy loss (nll_loss2d) or the backward of bilinear upsampling, which torch's "
              "deterministic mode refuses at the first step; the fused upsample + cross-entropy is deterministic. "
              "Add --fused-ops, use --device cpu, or drop --deterministic")
    # The package's environment variables, read by the ops at their first call: checked before any work.
    from deeplab_ops import backends

    try:
        forced = backends.env_backend()
    except ValueError as e:
        error(str(e))
    if forced and (args.fused_ops or args.predict or args.eval_only):
        # the fused ops would refuse it at the first step, after the data and the model were built
        device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
        reasons = backends.available_backends(device)[forced]
        if reasons:
            error(f"DEEPLAB_OPS_BACKEND={forced} cannot run the fused ops on --device {device} "
                  f"({'; '.join(reasons)}): unset it, or name a backend that runs there")
        world = _world_size()
        if forced in ("reference", "triton") and world > 1 and not (args.predict or args.eval_only or args.freeze_bn):
            error(f"DEEPLAB_OPS_BACKEND={forced} cannot train under torchrun: the BatchNorms are synchronized across "
                  f"the {world} processes, which the {forced} backend does not do; unset it (the automatic choice "
                  "takes cpu or cuda there), name cpu or cuda, or add --freeze-bn")
    if args.fused_ops or args.predict or args.eval_only:
        from deeplab_ops.common import env_autotune_mode

        try:
            env_autotune_mode()  # read when the triton backend is first imported (a GPU run's fused ops)
        except ValueError as e:
            error(str(e))
    winograd = os.environ.get("DEEPLAB_OPS_CPU_WINOGRAD")
    if winograd not in (None, "", "0", "1"):
        error(f"DEEPLAB_OPS_CPU_WINOGRAD={winograd!r} is not 0 or 1 (0 turns the cpu backend's Winograd "
              "convolutions off; 1 or unset: on)")
    running = "--predict" if args.predict else "--eval-only" if args.eval_only else None
    given = [k for k in vars(args) if defaults is not None and getattr(args, k) != defaults.get(k)]
    if running:
        for name in given:
            if name in TRAINING_ONLY:
                warn(f"--{name.replace('_', '-')} is a training flag; {running} ignores it (the model comes from "
                     "the checkpoint)")
            elif args.predict and name in NOT_PREDICT:
                warn(f"--{name.replace('_', '-')} is not read by --predict, which writes masks for the images in "
                     f"{args.predict} to --out")
            elif args.eval_only and name in NOT_EVAL_ONLY:
                warn(f"--{name.replace('_', '-')} is not read by --eval-only, which evaluates the validation split")
    if not (args.eval_only or args.resume):  # these take the dataset from the checkpoint: checked once it is known
        check_dataset_flags(args, error)
    world = _world_size()
    if args.batch_size is not None and not (args.eval_only or args.predict) and args.batch_size % world:
        # (after the warnings about the other flags; a batch size read from a --resume checkpoint: cmd_train)
        error(f"--batch-size {args.batch_size} (global) must be divisible by the number of processes, {world}")


def check_dataset_flags(args, error, check_root: bool = True) -> None:
    """Dataset flags the chosen --dataset does not read: --data-root with the synthetic set is refused (a
    forgotten --dataset folder/voc would train on the synthetic set), the others are warned about; folder and voc
    need a --data-root, an existing folder (check_root)."""
    dataset = args.dataset or ("synthetic" if not args.predict else None)
    if args.predict:  # --dataset / --data-root / --classes only check the checkpoint's class count
        if args.dataset is None and args.data_root:
            warn(f"--data-root {args.data_root} is not read by --predict without --dataset folder (which checks the "
                 "checkpoint's class count against DATA_ROOT/classes.txt)")
        if args.dataset == "folder" or args.classes:  # the class list the checkpoint's class count is checked against
            if not (args.classes or args.data_root):
                error("--dataset folder needs --data-root PATH (or --classes FILE) to know its classes")
            if not args.classes:
                _check_data_root(args.data_root, error)
            try:
                datasets.read_class_list(args.classes or os.path.join(args.data_root, "classes.txt"))
            except (OSError, ValueError) as e:
                error(f"--classes {args.classes}: {e}" if args.classes else f"--dataset folder: {e}")
        return
    if args.data_root and dataset == "synthetic":
        error(f"--data-root {args.data_root} is not read by --dataset synthetic" +
              (" (the default)" if args.dataset is None else "") + ": add --dataset folder or --dataset voc")
    if dataset in ("voc", "folder"):
        if not args.data_root:
            error(f"--dataset {dataset} needs --data-root PATH (" + (
                "the VOC2012 folder" if dataset == "voc" else "a folder with images/, masks/ and classes.txt") + ")")
        if check_root:
            _check_data_root(args.data_root, error)
    if dataset == "voc" and args.sbd_root is not None and not (args.eval_only or args.resume):
        # SBD's labels serve the train_aug split only: neither VOC's own train nor val reads them. (Not for
        # --eval-only or --resume, which take a VOC run's --sbd-root from its checkpoint, given or not.)
        splits = [args.val_split or "val", args.train_split or "train_aug"]
        if "train_aug" not in splits:
            warn(f"--sbd-root {args.sbd_root} is read only for the train_aug split, and this run reads "
                 + " and ".join(repr(s) for s in dict.fromkeys(splits)) + "; ignoring it")
    for name in unread_dataset_flags(dataset):
        if args.eval_only and name in NOT_EVAL_ONLY:
            continue  # (check_args said --eval-only does not read it)
        if getattr(args, name) is not None:
            warn(f"--{name.replace('_', '-')} is not read by --dataset {dataset}; ignoring it")


def unread_dataset_flags(dataset: str | None) -> tuple[str, ...]:
    """The dataset flags that --dataset `dataset` does not read."""
    unread = {"sbd_root": dataset != "voc", "classes": dataset != "folder",
              "synthetic_train_size": dataset != "synthetic", "synthetic_val_size": dataset != "synthetic",
              "data_seed": dataset != "synthetic", "train_split": dataset == "synthetic",
              "val_split": dataset == "synthetic"}
    return tuple(name for name, ignored in unread.items() if ignored)


def _check_data_root(path: str, error) -> None:
    if not os.path.isdir(path):
        error(f"--data-root {path}: " + ("not a folder" if os.path.exists(path) else "no such folder"))


def _data_error_text(e: BaseException) -> str:
    """A data error's own message; one re-raised from a DataLoader worker carries the worker's traceback, whose
    last line is "module.Class: message"."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _flag_error(message: str) -> None:
    """argparse's flag error (its usage and `error:` line, status 2) for a check made after parse_args, said once
    per machine under torchrun: the other processes there stop with status 2 in silence."""
    if machine_follower():
        raise SystemExit(2)
    build_parser().error(message)


def warn(text: str) -> None:
    if not machine_follower():
        print(f"warning: {text}", file=sys.stderr)


def _show_warning(shown):
    """warnings.showwarning while main() runs: a DataWarning (an image read while training, evaluating or
    predicting: a 12-bit photo, say) as train.py's own one-line `warning:`, other warnings as `shown` shows them."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, datasets.DataWarning):
            warn(str(message))
        elif issubclass(category, Image.DecompressionBombWarning):  # said with the file's name by a DataWarning
            return
        else:
            shown(message, category, filename, lineno, file, line)
    return show


def _world_size() -> int:
    """The process count torchrun gives (WORLD_SIZE), 1 outside torchrun; a malformed torchrun environment
    (distributed.env_dist_info: check_args refuses it as a usage error first) exits with its one-line message."""
    try:
        return distributed.env_dist_info().world_size
    except ValueError as e:
        raise SystemExit(f"train.py: {e}") from None


def machine_follower() -> bool:
    """Under torchrun, whether this process is not its machine's first (LOCAL_RANK > 0): that one prints the
    warnings and errors every process meets alike (flags, refusals before any work), once per machine. A malformed
    torchrun environment: False (which process is first is unknown, so each says what check_args refuses)."""
    try:
        info = distributed.env_dist_info()
    except ValueError:
        return False
    return info.enabled and info.local_rank != 0


def _apply_presets(args, device: torch.device) -> None:
    if args.dataset is None:
        args.dataset = "synthetic"
    key = "synthetic-gpu" if args.dataset == "synthetic" and device.type == "cuda" else args.dataset
    for name, value in PRESETS[key].items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.backbone == "smallest":
        args.backbone = available_backbones()[0]
    if args.synthetic_train_size is None:
        args.synthetic_train_size = 4000
    if args.synthetic_val_size is None:
        args.synthetic_val_size = 200
    if args.data_seed is None:
        args.data_seed = 0
    if args.workers is None:
        args.workers = 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)
    if args.out_dir is None:
        args.out_dir = os.path.join("runs", args.dataset)


def _is_cpu_out_of_memory(e: RuntimeError) -> bool:
    """PyTorch's CPU allocator failing (a RuntimeError, not a MemoryError)."""
    return "DefaultCPUAllocator: can't allocate memory" in str(e) or "not enough memory" in str(e)


def _saved_checkpoints(args, iterations: bool = False) -> list[str]:
    """The checkpoints a training run has in --out-dir ("last.pt", "best.pt"; with `iterations`, "last.pt
    (iteration N)"), for the one-line messages of a run that stops; [] for --predict and --eval-only."""
    if args.predict or args.eval_only or not args.out_dir:
        return []
    names = [f for f in ("last.pt", "best.pt") if os.path.isfile(os.path.join(args.out_dir, f))]
    if iterations:
        names = [f"{f} (iteration {ckpt_io.checkpoint_iteration(os.path.join(args.out_dir, f))})" for f in names]
    return names


def _how_to_go_on(args) -> str:
    """How a stopped run that saved checkpoints goes on: --resume from its last.pt; where it has none yet (a run
    resumed from another folder's checkpoint, stopped before its first save: only the best.pt it carried over), the
    same command again with --overwrite, which replaces what it carried over."""
    if os.path.isfile(os.path.join(args.out_dir, "last.pt")):
        return "--resume continues from last.pt"
    return "no last.pt was saved yet: the same command with --overwrite starts this run again"


def _out_of_memory_text(args, e: BaseException) -> str:
    """One line for an allocation that failed: the sizes that set the memory, and what the run kept."""
    lines = str(e).strip().splitlines() or [""]
    first = lines[0]
    if first.startswith("Caught ") and len(lines) > 1:  # raised in a loader's worker: the original's last line
        first = lines[-1].split(": ", 1)[-1]
    first = first[:200]
    # The sizes that set the memory of this command (--eval-only and --predict run whole images, no crops)
    keys = ("eval_scales",) if args.predict else ("eval_batch_size", "eval_scales") if args.eval_only else (
        "crop_size", "batch_size", "scale_range", "eval_batch_size", "eval_scales")
    sizes = ", ".join(f"{_flag(k, with_value=False)} {_value_text(getattr(args, k))}" for k in keys
                      if getattr(args, k, None) is not None)
    head = f"train.py: out of memory ({type(e).__name__}: {first})" + (f" with {sizes}" if sizes else "")
    if args.predict or args.eval_only:
        return head + "; lower " + ("--eval-batch-size, " if args.eval_only else "") + (
            "the --eval-scales (scales below 1 shrink the images the network sees) or the images, or run on a GPU "
            "(--device cuda)")
    written = _saved_checkpoints(args)
    kept = f"; the checkpoints written so far ({', '.join(written)}) are in {os.path.abspath(args.out_dir)}" \
        if written else ""
    return (head + "; lower --crop-size (for the synthetic set it is also the image size), --batch-size, the "
            f"--scale-range MAX, or for the evaluations --eval-batch-size or the --eval-scales{kept}")


def _timed_out_text(args, info, e: BaseException) -> str:
    """One line for a process whose wait for the others ran out of --dist-timeout: where in this project it waited
    (a hang of ours shows there), torch's own first line, what the run kept."""
    import traceback

    here = os.path.dirname(os.path.abspath(__file__))
    ours = [f for f in traceback.extract_tb(e.__traceback__)
            if os.path.abspath(f.filename).startswith(here + os.sep) and "site-packages" not in f.filename]
    where = f" in {os.path.relpath(ours[-1].filename, here)}:{ours[-1].lineno} ({ours[-1].name})" if ours else ""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return (f"train.py: process {info.rank} waited --dist-timeout {args.dist_timeout:g} min for the others{where} and "
            f"stopped ({first}): one of them hung (stopped, deadlocked, stuck on a file system) or lags by more than "
            f"that (raise --dist-timeout where one process's evaluation takes that much longer)"
            f"{_intact_text(args) if info.is_main else ''}")


def _os_error_text(e: OSError) -> str:
    """A failed write or read in a stop line: 'No space left on device (PATH)', or the error as it is."""
    return f"{e.strerror} ({e.filename})" if e.strerror and e.filename else f"{type(e).__name__}: {e}"


def _intact_text(args) -> str:
    """'; the checkpoints saved before it are intact: …' (with their iterations, where, and how to go on), or ''
    where the run saved none: the tail of a stop line after an error that left them as they were."""
    written = _saved_checkpoints(args, iterations=True)
    return (f"; the checkpoints saved before it are intact: {', '.join(written)} in {os.path.abspath(args.out_dir)} "
            f"({_how_to_go_on(args)})") if written else ""


def _line_buffered_stdout() -> None:
    """Status lines (stdout) and progress lines (stderr) in the order they were printed, each kept by a crash, where
    stdout is a pipe or a file (`> log 2>&1`, tee, nohup), which Python would otherwise buffer in blocks."""
    stdout = sys.stdout
    if isinstance(stdout, io.TextIOWrapper) and not stdout.line_buffering:
        with contextlib.suppress(ValueError, io.UnsupportedOperation):
            stdout.reconfigure(line_buffering=True)


def main(argv=None) -> None:
    _line_buffered_stdout()
    quiet = machine_follower()
    try:
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            args = parse_args(argv)
            # The folder's contents, not the flags: checked here rather than in parse_args (whose callers need no
            # folder), still before any work and as a flag error (status 2).
            check_out_dir(args, build_parser().error)
        device, info = _setup(args)
    except BaseException:  # (a refusal after --out-dir was locked)
        release_out_dir()
        raise
    # SIGTERM as Ctrl-C (the main thread only can take signals; restored on return: main() may be called in-process).
    # Not under torchrun, which sends it to stop every process when one failed: a process waiting in a collective
    # for the failed one would take it only when the collective returns, and the default ends it at once.
    own_term = threading.current_thread() is threading.main_thread() and not info.enabled
    on_term = signal.signal(signal.SIGTERM, raise_terminated) if own_term else None
    shown = warnings.showwarning
    warnings.showwarning = _show_warning(shown)
    try:
        if args.predict:
            cmd_predict(args, device, info, given_flags(argv))
        elif args.eval_only:
            cmd_eval_only(args, device, info, given_flags(argv))
        else:
            resumed = restore_run_flags(args, given_flags(argv), device) if args.resume else None
            if resumed is not None:  # (a data root read from the checkpoint is checked by the dataset, as below)
                check_dataset_flags(args, _flag_error, check_root="data_root" not in resumed[2])
            _apply_presets(args, device)
            cmd_train(args, device, info, resumed)
    except datasets.DataFileError as e:  # a sample's file, met while training or evaluating: named in one line
        written = _saved_checkpoints(args)
        kept = f"; the checkpoints written so far ({', '.join(written)}) are in {os.path.abspath(args.out_dir)}" \
            if written else ""
        raise SystemExit(f"train.py: {_data_error_text(e)}{kept}") from None
    except OSError as e:  # a write that failed (disk full, a folder made read-only): one line, and what is saved
        if isinstance(e, ConnectionError):  # another process's failure (torchrun): its own message says why
            raise
        raise SystemExit(f"train.py: {_os_error_text(e)}{_intact_text(args)}") from None
    except (MemoryError, torch.OutOfMemoryError) as e:  # e.g. --crop-size 100000: one line, not a traceback
        raise SystemExit(_out_of_memory_text(args, e)) from None
    except RuntimeError as e:
        if _is_cpu_out_of_memory(e):
            raise SystemExit(_out_of_memory_text(args, e)) from None
        if info.enabled and distributed.timed_out(e) and not distributed.lost_peer(e):
            raise SystemExit(_timed_out_text(args, info, e)) from None
        if not (info.enabled and distributed.lost_peer(e)):
            raise
        # Another process stopped (its own message says why) and this one's collective failed: one line from the
        # main process, none from the others, instead of every process's communication traceback.
        reason = str(e).splitlines()[0].split(". ")[0].rstrip(".")
        raise SystemExit("train.py: another process stopped (see its message above, or torchrun's summary for a "
                         f"process that was killed), so this run stopped too ({reason})" if info.is_main else 1
                         ) from None
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM: no traceback; what is saved and how to go on (a save is atomic: an interrupted one left
        # the previous)
        terminated = isinstance(e, Terminated)
        with signals_ignored():  # a second Ctrl-C (reading the checkpoints takes a while) interrupted this report
            if info.is_main:
                if not loop.Progress.end() and sys.stderr.isatty():
                    sys.stderr.write("\n")  # (after the terminal's echoed ^C)
                what = "terminated (SIGTERM)" if terminated else "interrupted"
                if args.predict or args.eval_only:  # what was written, where the command knows it
                    written = getattr(e, "written", None)
                    print(f"train.py: {what}" + (f"; {written}" if written else ""), file=sys.stderr)
                else:
                    saved = _saved_checkpoints(args, iterations=True)
                    print(f"train.py: {what}; "
                          + (f"{', '.join(saved)} in {os.path.abspath(args.out_dir)}: {_how_to_go_on(args)}"
                             if saved else "no checkpoint was saved"), file=sys.stderr)
        raise SystemExit(143 if terminated else 130) from None
    except SystemExit as e:
        # What every process meets alike (a refusal before any work): said once per machine.
        if quiet and isinstance(e.code, str):
            raise SystemExit(1) from None
        raise
    finally:
        loop.Progress.end()  # (before the error or stop line that follows, when a terminal's bar is still open)
        warnings.showwarning = shown
        if own_term:  # (None: a handler not set from Python, the default here)
            signal.signal(signal.SIGTERM, signal.SIG_DFL if on_term is None else on_term)
        release_out_dir()
        if info.enabled:
            torch.distributed.destroy_process_group()
            # Free now what still holds the process group (the model's fused modules and DDP, kept by reference
            # cycles), while the interpreter is whole: left to its shutdown, gloo's teardown aborted a process
            # (SIGABRT, "terminate called without an active exception") after a finished run, in 1 of 6 two-process
            # runs (6 of 20 of a cut-down script), and torchrun then reported the run failed and killed the main
            # process, maybe before its last writes.
            gc.collect()


if __name__ == "__main__":
    sys.exit(main())
