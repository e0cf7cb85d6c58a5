"""`python -m model --summary ...`: parameters and FLOPs per stage of a DeepLabV3 configuration.

FLOPs are counted by torch.utils.flop_counter (convolutions and matrix products; a multiply-add is 2 FLOPs;
BatchNorm, ReLU, pooling and resizing are not counted) on meta tensors, so nothing is computed or allocated and
any input size is instant. The unfused model is counted: the fused one computes the same function.

    python -m model --summary --backbone resnet50 --output-stride 16 --image-size 513
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deeplab_ops.nn import unfuse_modules
from model.deeplabv3 import DeepLabV3, deeplabv3_resnet
from model.heads import HEADS
from model.resnet import DEPTHS, RESIDUAL_UNITS

INT64_MAX = 2**63 - 1  # PyTorch's sizes are int64: a larger image or batch size is a usage error


def _image_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace("×", "x").split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size must be N or HxW, got {text!r}") from None
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"--image-size must be N or HxW (one or two sizes), got {text!r}")
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--image-size must be N or HxW with positive sizes, got {text!r}")
    if max(sizes) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"--image-size must be N or HxW with sizes of at most 2**63 - 1 (PyTorch's "
                                         f"64-bit sizes), got {text!r}")
    return (sizes[0], sizes[0]) if len(sizes) == 1 else sizes


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if not 1 <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(f"must be in [1, 2**63 - 1] (PyTorch's 64-bit sizes), got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see `python -m model --help`)."""
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summary", action="store_true", help="print parameters and FLOPs per stage")
    p.add_argument("--backbone", choices=[f"resnet{d}" for d in sorted(DEPTHS)], default="resnet50")
    p.add_argument("--output-stride", type=int, default=None, help="8 or 16 (default 16; --preset torchvision: 8)")
    p.add_argument("--multi-grid", type=int, nargs="+", default=None,
                   help="block-4 rate multipliers (default 1 2 4)")
    p.add_argument("--atrous-rates", type=int, nargs="+", default=None,
                   help="ASPP rates (default: 6 12 18 at output stride 16, 12 24 36 at 8)")
    p.add_argument("--head", choices=HEADS, default=None, help="default paper; --preset torchvision: torchvision")
    p.add_argument("--aux-loss", action="store_true", help="add the auxiliary FCN head on block 3")
    p.add_argument("--preset", choices=("torchvision",), default=None, help="torchvision's deeplabv3 exactly")
    p.add_argument("--residual-unit", choices=RESIDUAL_UNITS, default=None, help="default v1.5")
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--width", type=int, default=64,
                   help="the backbone's base width (default 64, ResNet-50/101's; train.py --backbone-width)")
    p.add_argument("--image-size", type=_image_size, default=(513, 513), help="N or HxW (default 513)")
    p.add_argument("--batch-size", type=_batch_size, default=1, help="images (default 1)")
    return p


def _stages(model: DeepLabV3) -> list[tuple[str, list[str]]]:
    """(row label, module names under the model) in forward order."""
    backbone = list(model.backbone._modules)
    stem = [f"backbone.{n}" for n in backbone if not n.startswith("layer") and n != "postnorm"]
    rows = [("stem", stem)]
    rows += [(n, [f"backbone.{n}"]) for n in backbone if n.startswith("layer") or n == "postnorm"]
    rows.append(("aspp", ["classifier.0"]))
    rows.append(("head", [f"classifier.{i}" for i in range(1, len(model.classifier))]))
    if model.aux_classifier is not None:
        rows.append(("aux head", ["aux_classifier"]))
    return rows


def _meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers are meta tensors (no data is copied)."""
    memo: dict[int, object] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def summarize(model: DeepLabV3, image_size: tuple[int, int], batch_size: int = 1) -> list[dict]:
    """Per-stage rows {stage, params, flops, output}: counted on a meta copy of `model`, unfused, in eval mode.
    `model` itself is left as it is (this moved it to meta in place, dropping its weights, and set it to eval)."""
    # The fused ops are custom ops that FlopCounterMode does not count (a fused ResNet-29 counted 0.03% of its
    # FLOPs): count the unfused form of the copy, which computes the same function.
    model = unfuse_modules(_meta_copy(model)).eval()
    outputs: dict[str, tuple[int, ...]] = {}
    hooks = []
    for label, names in _stages(model):
        if names:
            last = model.get_submodule(names[-1])
            hooks.append(last.register_forward_hook(
                lambda m, i, o, label=label: outputs.__setitem__(label, tuple(o.shape))
            ))
    # the input the model takes: its first convolution's channels (3 unless replaced), its parameters' dtype
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    x = torch.empty(batch_size, first.in_channels if first is not None else 3, *image_size, device="meta",
                    dtype=dtype)
    try:
        with FlopCounterMode(display=False, depth=None) as counter:
            result = model(x)
    finally:
        for h in hooks:
            h.remove()
    raw = counter.get_flop_counts()
    root = f"{type(model).__name__}."
    counts = {k.removeprefix(root): sum(v.values()) for k, v in raw.items()}
    params = dict(model.named_parameters())
    rows = []
    for label, names in _stages(model):
        n_params = sum(p.numel() for k, p in params.items() if any(k.startswith(n + ".") for n in names))
        flops = sum(counts.get(n, 0) for n in names)
        rows.append({"stage": label, "params": n_params, "flops": flops, "output": outputs.get(label)})
    rows.append({"stage": "resize", "params": 0, "flops": 0, "output": tuple(result["out"].shape)})
    rows.append({"stage": "total", "params": sum(p.numel() for p in params.values()),
                 "flops": counts.get("Global", 0),
                 "output": tuple(result["out"].shape)})
    return rows


def format_summary(model: DeepLabV3, rows: list[dict], image_size: tuple[int, int], batch_size: int) -> str:
    """The summary table as text."""
    c = model.config
    width = f", width {c['width']}" if c.get("width", 64) != 64 else ""
    head = (f"DeepLabV3 {c['backbone']} ({c['residual_unit']}{width}), output stride {c['output_stride']}, "
            f"block-4 dilations {c['stage_dilations'][3][1]}, ASPP rates {c['atrous_rates']}, head {c['head']}, "
            f"{c['num_classes']} classes{', aux head' if c['aux_loss'] else ''}"
            f"{', preset ' + c['preset'] if c['preset'] else ''}; input {batch_size}x3x{image_size[0]}x{image_size[1]}")
    # One space always separates the columns (at 100000x100000 px the GFLOPs ran into the GMACs).
    lines = [head, f"{'stage':<10}{'params':>14} {'GFLOPs':>11} {'GMACs':>10}  output"]
    for r in rows:
        if r["stage"] == "total":
            lines.append("-" * 60)
        out = "x".join(str(s) for s in r["output"]) if r["output"] else "-"
        lines.append(f"{r['stage']:<10}{r['params']:>14,} {r['flops'] / 1e9:>11.3f} {r['flops'] / 2e9:>10.3f}  {out}")
    lines.append("FLOPs: convolutions and matmuls from torch.utils.flop_counter, 1 multiply-add = 2 FLOPs = 1 MAC; "
                 "BN, ReLU, pooling and resizing not counted.")
    return "\n".join(lines)


# The factory's argument names, as the flags that give them (the errors of deeplabv3_resnet name the arguments).
FLAGS = {"output_stride": "--output-stride", "multi_grid": "--multi-grid", "atrous_rates": "--atrous-rates",
         "head": "--head", "residual_unit": "--residual-unit", "num_classes": "--num-classes", "width": "--width",
         "depth": "--backbone", "preset": "--preset"}


def _flag_of(message: str) -> str | None:
    """The flag a factory error is about: the first argument it names (besides the preset, which names the argument
    it fixes after itself)."""
    found = [(i, name) for name in FLAGS if name != "preset" and (i := message.find(name)) >= 0]
    if found:
        return FLAGS[min(found)[1]]
    return FLAGS["preset"] if "preset" in message else None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parse_args(argv)
    if not args.summary:  # nothing asked: the usage, and the status of a usage error
        parser = build_parser()
        parser.print_help(sys.stderr)
        print(f"{parser.prog}: error: nothing to do: add --summary", file=sys.stderr)
        return 2
    try:
        with torch.device("meta"):
            model: nn.Module = deeplabv3_resnet(
                int(args.backbone.removeprefix("resnet")), num_classes=args.num_classes,
                output_stride=args.output_stride, multi_grid=args.multi_grid, atrous_rates=args.atrous_rates,
                head=args.head, aux_loss=args.aux_loss, preset=args.preset, residual_unit=args.residual_unit,
                width=args.width,
            )
    except ValueError as e:  # a usage error, as argparse reports one: the usage, then the flag and the reason
        return _usage_error(str(e), _flag_of(str(e)))
    except RuntimeError as e:
        if not _overflowed(e):
            raise
        return _usage_error(f"a model of --width {args.width} and --num-classes {args.num_classes} has tensors too "
                            f"large for PyTorch's 64-bit sizes ({_first_line(e)})")
    try:
        rows = summarize(model, args.image_size, args.batch_size)
    except RuntimeError as e:
        if not _overflowed(e):
            raise
        image = "x".join(map(str, args.image_size))
        return _usage_error(f"an input of --batch-size {args.batch_size} and --image-size {image} makes tensors too "
                            f"large for PyTorch's 64-bit sizes ({_first_line(e)})")
    try:
        print(format_summary(model, rows, args.image_size, args.batch_size), flush=True)
    except BrokenPipeError:  # the reader stopped early (`--summary | head -1`): quietly, as `head` expects
        # stdout to /dev/null, so that the interpreter's final flush raises nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _overflowed(e: RuntimeError) -> bool:
    """Whether PyTorch refused a tensor whose size in bytes passes 64 bits ("Storage size calculation overflowed")."""
    return "overflow" in str(e).lower()


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _usage_error(message: str, flag: str | None = None) -> int:
    """Print `message` as argparse prints a usage error (the usage, then the flag and the reason); the exit status."""
    parser = build_parser()
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {f'argument {flag}: ' if flag else ''}{message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
