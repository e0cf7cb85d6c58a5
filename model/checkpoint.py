"""Load checkpoints from local files (never downloads): DeepLabV3 state_dicts and ImageNet ResNet backbones.

* :func:`load_checkpoint` loads a whole model's state_dict: ours, or torchvision's deeplabv3_resnet50/101
  (aux_classifier included) into a ``preset="torchvision"`` model.
* :func:`load_backbone` initialises ``model.backbone`` from torchvision's ImageNet resnet50/101 state_dict (its
  ``fc.*`` classifier is dropped).

A file may hold a raw state_dict or a dict with the state_dict under "model" or "state_dict" (training
checkpoints); a "module." (DistributedDataParallel) or "_orig_mod." (torch.compile) prefix on every key is removed.
Keys are checked strictly: the error lists every missing key, unexpected key and shape mismatch, with hints that name
the factory argument the checkpoint needs and its value (num_classes, width, depth, head, the number of
atrous_rates, aux_loss; a prefix that only some keys carry, or one not removed, such as a wrapper's "model."). Tensors
that cannot load (meta, sparse, quantized, complex into real) and a model on the meta device are refused before
anything is copied, so a failed load leaves the model as it was. Fused and unfused models have the same keys, so
either loads what the other saved.

Every file is read through :func:`load_file` (``training.checkpoint`` and ``train.py`` too): a missing file raises
FileNotFoundError, a folder IsADirectoryError, and a file that is empty, corrupt (a zip record whose bytes fail the
CRC-32 that torch.save wrote, which torch.load does not check) or truncated, not a torch.save
file, or (read weights-only) holding other objects than tensors :class:`CheckpointReadError`; each message names the
file and says what is wrong with it.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence

import torch
from torch import nn

Tensor = torch.Tensor

StateDictSource = str | os.PathLike | Mapping[str, Tensor]

IMAGENET_CLASSIFIER_KEYS = ("fc.weight", "fc.bias")
# Where a training checkpoint keeps the state_dict, and the key prefixes that wrappers add to every key.
WRAPPER_KEYS = ("model", "state_dict")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not match the model; the message lists every difference."""


class CheckpointReadError(ValueError, RuntimeError):
    """A checkpoint file that exists but cannot be read: empty, corrupt or truncated, not a torch.save file, or
    holding objects a weights-only load does not build. A ValueError (the file is bad input), and a RuntimeError
    as well, which training.checkpoint.load_checkpoint raised for these before."""


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")


def _folder_hint(path: str) -> str:
    try:
        found = sorted(f for f in os.listdir(path) if f.lower().endswith(CHECKPOINT_SUFFIXES)
                       and os.path.isfile(os.path.join(path, f)))
    except OSError:
        found = []
    if not found:
        return ""
    return f" (it holds {', '.join(found[:5])}" + (f" and {len(found) - 5} more" if len(found) > 5 else "") + ")"


def _load_error_detail(e: BaseException) -> str:
    """One line of what torch.load said, without its weights-only advice (re-running with weights_only=False is
    no remedy for a damaged file, and unsafe for an untrusted one)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        rest = text.split("WeightsUnpickler error:", 1)[1].strip()
        text = rest.splitlines()[0] if rest else "weights-only unpickling failed"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0].split(". ")[0].rstrip(".") if lines else ""  # torch's zip errors run on
    # "[enforce fail at inline_container.cc:180] " alone (a zip archive that is not a torch.save file) says nothing
    if not re.sub(r"\[enforce fail at [^\]]*\]", "", first).strip():
        first = "not a PyTorch archive" if "inline_container" in first else "(no message)"
    return f"{type(e).__name__}: {first}"


def load_file(path: str | os.PathLike, *, weights_only: bool = True, map_location="cpu", advice: str = "") -> object:
    """torch.load(path), with every way a file can fail to load reported in one line that names it.

    Raises FileNotFoundError (no such file), IsADirectoryError (a folder) or CheckpointReadError (empty, corrupt or
    truncated, not a torch.save file; with weights_only, objects other than tensors, numbers, strings and
    containers). `advice` is appended to the messages of files that exist but cannot be read (what to do instead).
    A path starting with "~" that names no file as written is read from the user's home folder.
    """
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a file path (a str, bytes or os.PathLike), got {type(path).__name__} "
                        f"{path!r}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if path.startswith("~") and not os.path.lexists(path):
        # "~/runs/best.pt" from Python code or a `--flag=~/...` the shell did not expand: the user's home, as a shell
        # would read it (a file literally named "~..." in the current folder is still read as itself).
        path = os.path.expanduser(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot read checkpoint {path}: this is a folder; give a checkpoint file in it"
                                f"{_folder_hint(path)}")
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (no such file; checkpoints are read from local files)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path} is a broken symbolic link (to "
                                f"{os.readlink(path)!r}); checkpoints are read from local files")
    if not os.path.isfile(path):
        raise CheckpointReadError(f"cannot read checkpoint {path}: it is not a regular file (a device, pipe or "
                                  "socket); give a checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointReadError(f"cannot read checkpoint {path}: the file is empty (0 bytes){advice}")
    damaged = _damaged_record(path)
    if damaged:
        raise CheckpointReadError(f"cannot read checkpoint {path} ({size} bytes): it is corrupt: {damaged} (the bytes "
                                  f"on disk are not those saved){advice}")
    try:
        with warnings.catch_warnings():  # a non-torch pickle read weights-only warns of its protocol, then fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=weights_only)
    except PermissionError:
        raise PermissionError(f"cannot read checkpoint {path}: permission denied (the file exists; check its "
                              "permissions)") from None
    except Exception as e:
        # "Unsupported global: GLOBAL x.Y was not an allowed global", or for a module torch blocks outright (os,
        # posix, subprocess, ...: a file crafted to run code) "unsupported GLOBAL posix.system whose module posix is
        # blocked": both are refusals of an object, not a damaged file.
        # (an object of a class allowed by name but built otherwise: "... allowlisted via `add_safe_globals`, but got
        # <class 'numpy.dtypes.Float64DType'>")
        found = (re.search(r"unsupported (?:global: )?GLOBAL (.*?) (?:was not an allowed global|whose module)",
                           str(e), re.IGNORECASE | re.DOTALL)
                 or re.search(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>", str(e))
                 if weights_only else None)
        # a name garbled by damage to the pickle ("torch.\x00\x00ge") is no object the file was saved with
        if found and all(part.isidentifier() for part in found.group(1).split(".")):
            raise CheckpointReadError(
                f"cannot read checkpoint {path}: it holds a pickled {found.group(1)}, and checkpoints are read "
                "weights-only (tensors, numbers, strings and their containers: no code from the file runs); save "
                "the tensors alone, e.g. torch.save(model.state_dict(), PATH)") from None
        if _is_safetensors(path):  # torch.load names it, then asks for a package it would not use either
            raise CheckpointReadError(
                f"cannot read checkpoint {path}: it is a safetensors file, which is read here only as torch.save "
                "files are: load it with safetensors.torch.load_file(path) and give the state_dict it returns "
                "(model.load_checkpoint takes one), or torch.save that state_dict") from None
        raise CheckpointReadError(
            f"cannot read checkpoint {path} ({size} bytes): it is corrupt or truncated, or not a torch.save file "
            f"({_foreign_start(path) or _load_error_detail(e)}){advice}") from None


def _foreign_start(path: str) -> str | None:
    """What the file's first bytes say where they are neither a zip archive (torch.save's format) nor a pickle (its
    legacy one): torch.load's own words for such a file are a bare "KeyError: 101" (the byte it read as an opcode).
    None for a file that starts as a torch.save file does (its damage is torch.load's to describe)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head.startswith(b"PK") or head[:1] == b"\x80":
        return None
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # binary, or a multi-byte character cut by the 512 bytes read
        text = head[:e.start].decode("utf-8") if e.start >= len(head) - 3 else None
    textual = text is not None and all(c.isprintable() or c in "\r\n\t" for c in text)
    return ("its first bytes are neither a zip archive (torch.save's format) nor a pickle: "
            + ("it reads as text" if textual else "an unknown format"))


def _is_safetensors(path: str) -> bool:
    """Whether the file starts as a safetensors file does: an 8-byte little-endian header length, then a JSON
    object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000


def _damaged_record(path: str) -> str | None:
    """The first record of a torch.save zip archive whose CRC-32 does not match its bytes, described; None when every
    record matches or the file is no zip archive (torch.load reports those). torch.load checks no CRC: a flipped bit
    in a tensor's bytes loaded silently as a wrong weight."""
    if not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as e:
        return f"its zip archive cannot be read ({e})"
    except (OSError, NotImplementedError, RuntimeError):
        return None  # unreadable or of a kind zipfile does not take: torch.load says what it makes of it
    return f"record {bad!r} fails its CRC-32 check" if bad else None


def read_state_dict(source: StateDictSource) -> dict[str, Tensor]:
    """The state_dict in `source`: a path to a local file (loaded on CPU, weights only, by :func:`load_file`, whose
    errors name the file) or a mapping.

    Unwraps {"model": …} / {"state_dict": …} and removes a "module." / "_orig_mod." prefix present on every key.
    """
    what = "state_dict"
    if isinstance(source, str | bytes | os.PathLike):
        path = os.fsdecode(source)
        what = repr(path)
        obj = load_file(path, weights_only=True)
    else:
        obj = source
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint {what} must hold a state_dict (a mapping of names to tensors), got "
                        f"{type(obj).__name__}")
    wrapped = [w for w in WRAPPER_KEYS if isinstance(obj.get(w), Mapping)]
    # The first wrapper entry that holds tensors ({"model": {"name": ...}, "state_dict": {...}}: the state_dict),
    # else the first one (whose contents the errors below describe).
    holding = [w for w in wrapped if any(isinstance(v, torch.Tensor) for v in obj[w].values())]
    taken = ""  # the wrapper key taken, as an index expression for the hints below
    if wrapped:
        taken = f"[{(holding or wrapped)[0]!r}]"
        obj = obj[(holding or wrapped)[0]]
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad and len(bad) == len(obj):  # not a state_dict at all: say what it holds and where one is looked for
        raise TypeError(
            f"checkpoint {what} holds no state_dict: expected a mapping of names to tensors, or a dict with one under "
            f"{' or '.join(repr(w) for w in WRAPPER_KEYS)}; it holds a dict of {_describe_entries(obj)}"
            + _nested_hint(obj, "torch.load(PATH, weights_only=True)" if what != "state_dict" else "checkpoint",
                           taken))
    if bad:
        raise TypeError(f"checkpoint {what}: expected a mapping of str to tensors; entries {bad[:5]!r} are not")
    state = dict(obj)
    # DistributedDataParallel's "module." and torch.compile's "_orig_mod." (either order, when both wrap the model)
    stripped = True
    while state and stripped:
        stripped = False
        for wrapper_prefix in WRAPPER_PREFIXES:
            if all(k.startswith(wrapper_prefix) for k in state):
                state = {k[len(wrapper_prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _describe_entries(obj: Mapping, limit: int = 8) -> str:
    items = [f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:limit]]
    more = f", … ({len(obj) - limit} more)" if len(obj) > limit else ""
    return (", ".join(items) + more) if items else "no entries"


def _nested_hint(obj: Mapping, source: str, taken: str = "") -> str:
    """Where a state_dict sits under another key ({"weights": state_dict}): name it, as `source` indexed by the
    wrapper key already `taken` and that key ({"state_dict": {"model": …}}: source['state_dict']['model'])."""
    for k, v in obj.items():
        if isinstance(v, Mapping) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
            return f"; its entry {k!r} looks like one: pass {source}{taken}[{k!r}] instead"
    return ""


def _format_keys(keys: Sequence[str], limit: int = 30) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


def _counter_of_an_old_batchnorm(key: str, state: Mapping[str, Tensor], old_format: bool) -> bool:
    """Whether `key` is the num_batches_tracked of a BatchNorm whose other tensors `state` holds, in a state_dict of
    the format before PyTorch 0.4.1 (`old_format`: it holds no counter at all; torchvision's classic ImageNet ResNet
    files), which nn.BatchNorm2d loads as it is, keeping its own counter. One counter missing from a state_dict that
    has the others is a missing key."""
    head, dot, last = key.rpartition(".")
    return old_format and last == "num_batches_tracked" and f"{head}{dot}running_mean" in state


def check_keys(model: nn.Module, state: Mapping[str, Tensor], prefix: str = "",
               ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Raise CheckpointMismatchError listing missing keys, unexpected keys and shape mismatches, if any. The model's
    keys starting with one of `ignore_prefixes` need not be in `state`, nor do the batch counters of BatchNorms in a
    state_dict of before PyTorch 0.4.1 (which has none)."""
    expected = model.state_dict()
    old_format = not any(k.rpartition(".")[2] == "num_batches_tracked" for k in state)
    missing = [k for k in expected if k not in state and not (ignore_prefixes and k.startswith(ignore_prefixes))
               and not _counter_of_an_old_batchnorm(k, state, old_format)]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{prefix}{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [
        f"checkpoint does not match the model ({type(model).__name__}): {len(missing)} missing keys, "
        f"{len(unexpected)} unexpected keys, {len(shapes)} shape mismatches"
    ]
    if missing:
        lines.append(f"  missing (in the model, not in the checkpoint): {_format_keys([prefix + k for k in missing])}")
    if unexpected:
        lines.append(
            f"  unexpected (in the checkpoint, not in the model): {_format_keys([prefix + k for k in unexpected])}"
        )
    if shapes:
        lines.append("  shape mismatches: " + "; ".join(shapes[:30]))
    lines += _hints(missing, unexpected, shapes, prefix,
                    _architecture_hints(model, expected, state, prefix, ignore_prefixes), ignore_prefixes)
    lines += [f"  hint: {h}" for h in _prefix_hints(missing, unexpected, state, prefix)]
    raise CheckpointMismatchError("\n".join(lines))


def check_loadable(model: nn.Module, state: Mapping[str, Tensor], prefix: str = "") -> None:
    """Raise before anything is copied where load_state_dict would fail part-way (leaving the model half loaded) or
    load nothing: a model whose tensors are on the meta device (copying into them is a no-op), checkpoint tensors
    with no data (meta), in a sparse or quantized layout, or complex where the model's are real (the imaginary part
    would be dropped). Run after check_keys (keys and shapes already match)."""
    expected = model.state_dict()
    empty = [k for k, v in expected.items() if k in state and v.is_meta]
    if empty:
        raise ValueError(
            f"the model's tensors are on the meta device (shapes only, no data: {len(empty)} of them, e.g. "
            f"{prefix}{empty[0]}), so loading would copy nothing into them; build the model on a real device, or give "
            "it storage first with model.to_empty(device='cpu')")
    problems: dict[str, list[str]] = {}
    for k, v in state.items():
        if k not in expected:
            continue
        if v.is_meta:
            why = "meta tensors (shapes, no data: saved from a model built on the meta device)"
        elif v.layout != torch.strided:
            why = f"{v.layout} tensors (dense tensors only: save them with .to_dense())"
        elif v.is_quantized:
            why = f"quantized {v.dtype} tensors (save them with .dequantize())"
        elif v.is_complex() and not expected[k].is_complex():
            why = f"{v.dtype} tensors where the model's are real (their imaginary parts would be dropped)"
        else:
            continue
        problems.setdefault(why, []).append(prefix + k)
    if problems:
        raise CheckpointMismatchError(
            "checkpoint holds tensors that cannot load into the model (nothing was loaded): "
            + "; ".join(f"{why}: {_format_keys(keys, 5)}" for why, keys in problems.items()))


def _prefixed_keys(missing: Sequence[str], unexpected: Sequence[str]) -> dict[str, list[str]]:
    """prefix -> the unexpected keys that are missing keys under that prefix (the shortest one each)."""
    missing_set = set(missing)
    found: dict[str, list[str]] = {}
    for k in unexpected:
        parts = k.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in missing_set:
                found.setdefault(".".join(parts[:i]) + ".", []).append(k)
                break
    return found


def _prefix_hints(missing: Sequence[str], unexpected: Sequence[str], state: Mapping[str, Tensor],
                  prefix: str) -> list[str]:
    """Where unexpected keys are the model's missing keys under a prefix (a wrapper's "model.", a "module." that only
    some keys carry), name the prefix: a wrapper prefix is removed only when every key has it."""
    hints = []
    for head, keys in sorted(_prefixed_keys(missing, unexpected).items(), key=lambda item: -len(item[1]))[:3]:
        carrying = sum(1 for k in state if k.startswith(head))
        removed = (f"a {head!r} prefix is removed only when every key carries it" if head in WRAPPER_PREFIXES
                   else f"only {' and '.join(repr(w) for w in WRAPPER_PREFIXES)} prefixes are removed, when every key "
                   "carries one")
        hints.append(f"{len(keys)} unexpected keys are the model's own with a {head!r} prefix (checkpoint key "
                     f"{keys[0]!r} is the model's {prefix}{keys[0][len(head):]}); {carrying} of the checkpoint's "
                     f"{len(state)} keys carry it, and {removed}: remove it, e.g. "
                     f"{{k.removeprefix({head!r}): v for k, v in state.items()}}")
    return hints


def _units_per_stage(state: Mapping[str, Tensor], base: str) -> tuple[int, ...]:
    """Units in layer1 … layer4 of the ResNet whose keys start with `base` ("backbone." or "")."""
    return tuple(len({k[len(f"{base}layer{i}."):].split(".")[0] for k in state if k.startswith(f"{base}layer{i}.")})
                 for i in range(1, 5))


def _depth_name(units: tuple[int, ...]) -> str:
    from model.resnet import DEPTHS

    depth = next((d for d, u in DEPTHS.items() if u == units), None)
    return f"resnet{depth}" if depth is not None else "a depth model/ does not build"


def _logits_key(keys, head: str) -> str | None:
    """The logits conv's weight of a head ("classifier" or "aux_classifier"): its last weight."""
    weights = [k for k in keys if k.startswith(f"{head}.") and k.endswith(".weight")]
    return weights[-1] if weights else None


def _head_style(state: Mapping[str, Tensor]) -> str | None:
    """'paper' (ASPP → 1×1 logits: classifier.1.bias) or 'torchvision' (ASPP → 3×3 conv-BN-ReLU → 1×1 logits:
    classifier.2.running_mean, classifier.4.bias), 'fcn' (no ASPP: a 3×3 conv, classifier.0.weight, then
    BN-ReLU-dropout → 1×1 logits, torchvision's fcn_resnet50/101), None when the state_dict has none of them."""
    first = state.get("classifier.0.weight")
    if (first is not None and first.dim() == 4 and tuple(first.shape[2:]) == (3, 3) and "classifier.4.weight" in state
            and not any(k.startswith("classifier.0.convs.") for k in state)):
        return "fcn"
    if "classifier.2.running_mean" in state and "classifier.4.bias" in state:
        return "torchvision"
    if "classifier.1.bias" in state and "classifier.2.weight" not in state:
        return "paper"
    return None


def _architecture_hints(model: nn.Module, expected: Mapping[str, Tensor], state: Mapping[str, Tensor],
                        prefix: str, ignore_prefixes: tuple[str, ...] = ()) -> tuple[list[str], bool]:
    """What the checkpoint's network is where the model's differs, named as the factory argument to change, with
    both values: depth (units per stage), width, head, the number of ASPP rates, num_classes. Returns the hints and
    whether a classifier shape mismatch was explained. A hint to pass ignore_prefixes names the caller's
    `ignore_prefixes` too (what to pass, not what to add)."""
    hints: list[str] = []
    explained = False
    if not state:
        return ["the checkpoint's state_dict is empty (no keys at all): it holds no weights"], explained
    config = getattr(model, "config", None) or {}
    # The backbone: "backbone.layer1.…" in a whole model, "layer1.…" in a backbone (load_backbone).
    base = "backbone." if any(k.startswith("backbone.") for k in expected) else ""
    ours, theirs = _units_per_stage(expected, base), _units_per_stage(state, base)
    if all(theirs) and all(ours) and ours != theirs:
        depth = _depth_name(theirs)
        build = f": build the model with deeplabv3_resnet({depth[6:]}, ...)" if depth.startswith("resnet") else ""
        hints.append(f"the checkpoint's backbone has {theirs} units per stage ({depth}), the model's {ours} "
                     f"({_depth_name(ours)}){build}")
    stem = f"{base}conv1.weight"
    if (stem in state and stem in expected and state[stem].dim() == 4
            and state[stem].shape[0] != expected[stem].shape[0]):
        explained = True  # every later shape follows the width, the classifier's included
        hints.append(f"the checkpoint's backbone has width {state[stem].shape[0]} ({prefix}{stem} "
                     f"{tuple(state[stem].shape)}), the model's width={expected[stem].shape[0]}: build the model with "
                     f"width={state[stem].shape[0]}")
    if base:  # a whole DeepLabV3: its heads
        ours_head, their_head = _head_style(expected), _head_style(state)
        if their_head == "fcn" and ours_head != "fcn":
            explained = True
            # its auxiliary head too where this model has none or other logits (fcn_resnet50's 21 classes): the
            # one tuple that loads
            aux = _logits_key(expected, "aux_classifier")
            drop_aux = any(k.startswith("aux_classifier.") for k in state) and (
                aux is None or aux not in state or state[aux].shape != expected[aux].shape)
            drop = (*ignore_prefixes, "classifier.", *(("aux_classifier.",) if drop_aux else ()))
            hints.append("the checkpoint is an FCN's (torchvision's fcn_resnet50/101: a 3x3 conv head, no ASPP), not "
                         f"a DeepLabV3's: no head here loads it; pass ignore_prefixes={drop!r} to load the rest (the "
                         "backbone) and keep this model's head" + ("s" if drop_aux else "") + " as built")
        elif ours_head and their_head and ours_head != their_head:
            explained = True
            preset = (" (preset='torchvision' for torchvision's deeplabv3_resnet50/101 checkpoints)"
                      if their_head == "torchvision" else "")
            hints.append(f"the checkpoint has the {their_head!r} head and the model the {ours_head!r} one: build the "
                         f"model with head={their_head!r}{preset}")
        branches = lambda d: {k.split(".")[3] for k in d if k.startswith("classifier.0.convs.")}  # noqa: E731
        n_ours, n_theirs = len(branches(expected)), len(branches(state))
        if n_ours and n_theirs and n_ours != n_theirs:
            explained = True
            rates = config.get("atrous_rates")
            hints.append(f"the checkpoint's ASPP has {n_theirs - 2} atrous rates, the model's {n_ours - 2}"
                         f"{f' (atrous_rates={rates})' if rates else ''}: build the model with {n_theirs - 2} "
                         "atrous_rates (a checkpoint does not record the rates themselves)")
        if ours_head == their_head:
            logits = [k for k in (_logits_key(expected, h) for h in ("classifier", "aux_classifier")) if k]
            differ = [k for k in logits if k in state and state[k].dim() == expected[k].dim()
                      and state[k].shape[0] != expected[k].shape[0] and state[k].shape[1:] == expected[k].shape[1:]]
            if differ:
                explained = True
                theirs_n, ours_n = state[differ[0]].shape[0], expected[differ[0]].shape[0]
                drop = tuple(k[: -len("weight")] for k in logits if k in state)
                hints.append(f"the checkpoint was trained for {theirs_n} classes ({differ[0]} "
                             f"{tuple(state[differ[0]].shape)}), the model has num_classes={ours_n}: build it with "
                             f"num_classes={theirs_n}, or pass ignore_prefixes={(*ignore_prefixes, *drop)!r} to "
                             f"fine-tune the rest on {ours_n} classes")
    return hints, explained


def _hints(missing: list[str], unexpected: list[str], shapes: list[str], prefix: str,
           architecture: tuple[list[str], bool] = ([], False), ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    hints, explained = list(architecture[0]), architecture[1]
    if any(k.startswith("aux_classifier.") for k in unexpected):
        hints.append("the checkpoint has an auxiliary head: build the model with aux_loss=True, or pass "
                     f"ignore_prefixes={(*ignore_prefixes, 'aux_classifier.')!r}")
    # (not where the checkpoint holds the head under a wrapper prefix: _prefix_hints names that)
    prefixed = {k[len(head):] for head, keys in _prefixed_keys(missing, unexpected).items() for k in keys}
    if any(k.startswith("aux_classifier.") and k not in prefixed for k in missing):
        hints.append("the model has an auxiliary head that the checkpoint lacks: build it with aux_loss=False")
    if not prefix and any(k in IMAGENET_CLASSIFIER_KEYS for k in unexpected):
        hints.append("this looks like an ImageNet ResNet state_dict: use load_backbone(model, ...)")
    if not explained and any(s.startswith(f"{prefix}classifier.") or s.startswith(f"{prefix}aux_classifier.")
                             for s in shapes):
        hints.append("a classifier's shape differs: check num_classes, head and atrous_rates")
    preact_missing = any(".residual." in k or ".preact." in k for k in missing)
    preact_unexpected = any(".residual." in k or ".preact." in k for k in unexpected)
    if preact_missing and not preact_unexpected:
        hints.append("the model uses residual_unit='preact' and the checkpoint the v1.5 bottleneck (torchvision's "
                     "ImageNet ResNets are v1.5): build the model with residual_unit='v1.5'")
    elif preact_unexpected and not preact_missing:
        hints.append("the checkpoint uses residual_unit='preact' and the model the v1.5 bottleneck: build the model "
                     "with residual_unit='preact'")
    elif preact_missing:
        hints.append("one side uses residual_unit='preact' and the other the v1.5 bottleneck")
    return [f"  hint: {h}" for h in hints]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's, DataParallel's or DistributedDataParallel's wrapper (any nesting): the one
    whose state_dict keys carry no "_orig_mod." / "module." prefix, and whose parameters the wrapper runs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (a DeepLabV3, wrapped or not), got {type(model).__name__}")
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule (its class is not public)
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
        elif isinstance(model, wrappers) and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def _naming(source: StateDictSource):
    """A mismatch found in a file's state_dict names the file (a long script may load several)."""
    try:
        yield
    except CheckpointMismatchError as e:
        if not isinstance(source, (str, os.PathLike)):
            raise
        raise CheckpointMismatchError(f"{os.fspath(source)}: {e}") from None


def load_checkpoint(
    model: nn.Module, source: StateDictSource, *, ignore_prefixes: Sequence[str] = ()
) -> nn.Module:
    """Load a whole-model state_dict into `model` with a strict key and shape check.

    Args:
        model: e.g. ``model.deeplabv3_resnet50(preset="torchvision", aux_loss=True)`` for torchvision's
            deeplabv3_resnet50 state_dict; fused or not; wrapped or not (torch.compile, DataParallel,
            DistributedDataParallel: the model inside is loaded, as the checkpoint's prefixes are removed).
        source: path to a local file, or a state_dict.
        ignore_prefixes: a key prefix, or several: checkpoint keys starting with one are dropped, and the model's
            keep their initialisation (e.g. "aux_classifier." to load torchvision's checkpoint into a model without
            the auxiliary head; "classifier.4." to fine-tune on another number of classes). An empty prefix, or
            prefixes that drop every key of the checkpoint, are refused (ValueError): nothing would load.

    Returns:
        `model`.
    """
    inner = unwrap_model(model)  # a TypeError naming `model` for what is no module, before the file is read
    if isinstance(ignore_prefixes, str):
        ignore_prefixes = (ignore_prefixes,)
    if not isinstance(ignore_prefixes, Sequence) or not all(isinstance(p, str) for p in ignore_prefixes):
        raise TypeError(f"ignore_prefixes must be a key prefix or a sequence of them (e.g. ('aux_classifier.',)), "
                        f"got {ignore_prefixes!r}")
    prefixes = tuple(ignore_prefixes)
    if "" in prefixes:
        raise ValueError(f"ignore_prefixes={ignore_prefixes!r} holds an empty prefix, which every key starts with: "
                         "the whole checkpoint would be dropped and nothing loaded; give key prefixes such as "
                         "'aux_classifier.'")
    state = read_state_dict(source)
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)} if prefixes else state
    if state and not kept:
        raise ValueError(f"ignore_prefixes={ignore_prefixes!r} drops every key of the checkpoint ({len(state)} keys, "
                         f"e.g. {next(iter(state))!r}): nothing would be loaded")
    state = kept
    with _naming(source):
        check_keys(inner, state, ignore_prefixes=prefixes)
        check_loadable(inner, state)
    # Strict but for what check_keys allows (the keys it ignores; old BatchNorms' counters, which load as they are)
    inner.load_state_dict(state, strict=not prefixes)
    return model


def load_backbone(model: nn.Module, source: StateDictSource) -> nn.Module:
    """Initialise ``model.backbone`` from an ImageNet ResNet state_dict (torchvision's resnet50/101).

    The ImageNet classifier (fc.weight, fc.bias) is dropped; every other key must match the backbone exactly
    (the v1.5 backbone has torchvision's names). Heads keep their initialisation. A wrapped model (torch.compile,
    DataParallel, DistributedDataParallel) has the model inside it loaded.

    Returns:
        `model`.
    """
    backbone = getattr(unwrap_model(model), "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"model must have a .backbone module (a DeepLabV3), got {type(model).__name__}")
    state = {k: v for k, v in read_state_dict(source).items() if k not in IMAGENET_CLASSIFIER_KEYS}
    if any(k.startswith("backbone.") for k in state):
        raise CheckpointMismatchError(
            "the checkpoint's keys start with 'backbone.': it is a whole DeepLabV3 state_dict, not an ImageNet "
            "ResNet one; use load_checkpoint(model, ...)"
        )
    with _naming(source):
        check_keys(backbone, state, prefix="backbone.")
        check_loadable(backbone, state, prefix="backbone.")
    backbone.load_state_dict(state, strict=True)
    return model
