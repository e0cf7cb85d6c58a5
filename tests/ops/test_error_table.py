"""docs/errors.md's "Errors" table is true: every row's call raises the exception and message the table states, and
every condition tested here has a row. The table is read from docs/errors.md, so the two cannot drift apart.

Each CASES entry is `id: fn(d)`, where d is a fresh temporary folder; the folder's path appears as DIR in the table.
"""

from __future__ import annotations

import functools
import os
import re
import warnings

import numpy as np
import pytest
import torch
from helpers import ROOT as _ROOT
from PIL import Image
from torch import nn

import deeplab_ops
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, check_fusable, fused_aspp_forward

ROOT = str(_ROOT)
ops = torch.ops.deeplab_ops


def read_error_table(path: str = os.path.join(ROOT, "docs", "errors.md")) -> dict[str, tuple[str, str]]:
    """id -> (exception name, message) from the table rows of docs/errors.md's "## Errors" section."""
    text = open(path, encoding="utf-8").read()
    start = text.index("\n## Errors")
    end = text.find("\n## ", start + 1)
    rows = {}
    for line in text[start:end if end > 0 else None].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not line.startswith("| `") or len(cells) != 5:
            continue
        ident, _where, _condition, exc, message = cells
        assert ident not in rows, f"docs/errors.md: duplicate id {ident}"
        message = message.strip("`").replace("\\|", "|")
        rows[ident.strip("`")] = (exc.strip("`"), message[:-2] if message.endswith(" …") else message)
    return rows


# ---- calls ------------------------------------------------------------------------------------------------------


def cbr(**over):
    a = dict(x=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), bn_weight=torch.rand(4),
             bn_bias=torch.randn(4), running_mean=torch.zeros(4), running_var=torch.ones(4), stride=1, padding=1,
             dilation=1, training=True, momentum=0.1, eps=1e-5, residual=None, relu=True, backend="cpu")
    a.update(over)
    pos = [a.pop(k) for k in ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var")]
    return deeplab_ops.conv_bn_relu(*pos, **a)


def aspp_args(n=2, cin=5, c=3, h=7, w=6, rates=(2, 5), dtype=torch.float32):
    x = torch.randn(n, cin, h, w, dtype=dtype)
    cws = [torch.randn(c, cin, 1, 1, dtype=dtype)] + [torch.randn(c, cin, 3, 3, dtype=dtype) for _ in rates]
    nb = len(rates) + 3
    return dict(x=x, conv_weights=cws, pool_weight=torch.randn(c, cin, 1, 1, dtype=dtype),
                project_weight=torch.randn(c, (len(rates) + 2) * c, 1, 1, dtype=dtype),
                bn_weights=[torch.rand(c, dtype=dtype) + 0.5 for _ in range(nb)],
                bn_biases=[torch.randn(c, dtype=dtype) for _ in range(nb)],
                running_means=[torch.zeros(c, dtype=dtype) for _ in range(nb)],
                running_vars=[torch.ones(c, dtype=dtype) for _ in range(nb)], rates=rates)


def aspp(**over):
    a = aspp_args()
    a.update(over)
    a.setdefault("backend", "cpu")
    pos = [a.pop(k) for k in ("x", "conv_weights", "pool_weight", "project_weight", "bn_weights", "bn_biases",
                              "running_means", "running_vars")]
    return deeplab_ops.aspp(*pos, **a)


def uce(**over):
    a = dict(logits=torch.randn(2, 3, 4, 5), target=torch.randint(0, 3, (2, 9, 11)), ignore_index=255,
             align_corners=False, reduction="mean", backend="cpu")
    a.update(over)
    return deeplab_ops.upsample_cross_entropy(a.pop("logits"), a.pop("target"), **a)


def aspp_item(key, i, value):
    a = aspp_args()
    a[key] = list(a[key])
    a[key][i] = value
    return aspp(**{key: a[key]})


def double_backward(fn):
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
    g.sum().backward()


def forward_ad(fn, x):
    """fn on x made a forward-mode dual tensor (a tangent attached)."""
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        fn(fwAD.make_dual(x, torch.randn_like(x)))


def func_grad(fn, x):
    """torch.func.grad of fn(x).sum() (a reverse-mode transform wraps x)."""
    torch.func.grad(lambda t: fn(t).sum())(x)


def torchvision_aspp(change):
    from torchvision.models.segmentation.deeplabv3 import ASPP

    m = ASPP(4, (2, 3), 3)
    change(m)
    return fused_aspp_forward(m, torch.randn(2, 4, 6, 6))


def fit(**cfg):
    from test_training_loop import TinySeg, _cfg, _train_set

    from training import loop

    return loop.fit(TinySeg(), cfg.pop("train_set", None) or _train_set(), _cfg(**cfg), torch.device("cpu"),
                    resume=cfg.pop("resume", None))


def fit_resume(resume):
    from test_training_loop import TinySeg, _cfg, _train_set

    from training import loop

    return loop.fit(TinySeg(), _train_set(), _cfg(iterations=2), torch.device("cpu"), resume=resume)


def _renumbered_palette_png(d):
    # person (VOC class 15) stored as index 1, background as 0: what quantize() makes of a two-colour VOC mask
    from training.palette import voc_colormap

    cmap = voc_colormap()
    im = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    im.putpalette([*cmap[0], *cmap[15]])
    path = f"{d}/m.png"
    im.save(path)
    return path


def png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def folder(d, names=("a", "b"), classes="background\nthing\n", lists=True):
    os.makedirs(f"{d}/data/images", exist_ok=True)
    os.makedirs(f"{d}/data/masks", exist_ok=True)
    for n in names:
        png(f"{d}/data/images/{n}.png", np.zeros((8, 8, 3), np.uint8))
        png(f"{d}/data/masks/{n}.png", np.zeros((8, 8), np.uint8), "L")
    if classes is not None:
        open(f"{d}/data/classes.txt", "w").write(classes)
    if lists:
        open(f"{d}/data/train.txt", "w").write("\n".join(names) + "\n")
    return f"{d}/data"


def voc(d, split_ids=("a",), val_ids=("b",), aug=False):
    r = f"{d}/VOC2012"
    os.makedirs(f"{r}/ImageSets/Segmentation", exist_ok=True)
    for i in set(split_ids) | set(val_ids):
        png(f"{r}/JPEGImages/{i}.jpg", np.zeros((8, 8, 3), np.uint8))
        png(f"{r}/SegmentationClass/{i}.png", np.zeros((8, 8), np.uint8), "L")
    open(f"{r}/ImageSets/Segmentation/train.txt", "w").write("\n".join(split_ids) + "\n")
    open(f"{r}/ImageSets/Segmentation/val.txt", "w").write("\n".join(val_ids) + "\n")
    if aug:
        for i in set(split_ids) | set(val_ids):
            png(f"{r}/SegmentationClassAug/{i}.png", np.zeros((8, 8), np.uint8), "L")
    return r


def _mat(d, labels) -> str:
    """An SBD-style .mat label file (GTcls.Segmentation) holding `labels`: its path."""
    from scipy.io import savemat

    path = f"{d}/m.mat"
    savemat(path, {"GTcls": {"Segmentation": labels}})
    return path


def _sbd_without_scipy(d):
    """train_aug with one label only in SBD's .mat files, built while scipy cannot be imported."""
    import sys
    from unittest import mock

    r = voc(d, split_ids=("a",), val_ids=("c",))
    os.makedirs(f"{d}/sbd/cls")
    png(f"{r}/JPEGImages/b.jpg", np.zeros((8, 8, 3), np.uint8))
    _mat(f"{d}/sbd", np.ones((4, 4), np.uint8))
    os.rename(f"{d}/sbd/m.mat", f"{d}/sbd/cls/b.mat")
    open(f"{d}/sbd/train.txt", "w").write("b\n")
    open(f"{d}/sbd/val.txt", "w").write("c\n")
    with mock.patch.dict(sys.modules, {"scipy": None, "scipy.io": None}):
        return _datasets().VOCSegmentation(r, "train_aug", sbd_root=f"{d}/sbd")


def _jpeg_named_png(d) -> str:
    path = f"{d}/m.png"
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(path, format="JPEG")
    return path


def _datasets():
    from training import datasets

    return datasets


def _ckpt():
    from training import checkpoint

    return checkpoint


def _ckpt_with_a_flipped_byte(d) -> str:
    """A train.py-shaped checkpoint whose one tensor's first byte changed on disk after the save."""
    import struct
    import zipfile

    path = _ckpt_file(d, obj={"model": {"w": torch.zeros(4)}})
    record = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith("/data/0"))
    data = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data[record.header_offset + 30 + name_len + extra_len] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return path


def _ckpt_file(d, data: bytes | None = None, obj=None):
    path = f"{d}/ckpt.pt"
    if obj is not None:
        torch.save(obj, path)
    else:
        open(path, "wb").write(data)
    return path


def _dead_worker(d):
    import signal

    ds = _datasets()
    root = folder(d, names=("a", "b", "c", "d"))
    real = ds.read_image

    def read_image(path, **kwargs):
        if path.endswith("c.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, **kwargs)

    ds.read_image = read_image
    try:
        from test_training_loop import TinySeg, _cfg

        from training import loop
        from training.transforms import TrainTransform

        train_set = loop.AugmentedDataset(ds.FolderSegmentation(root, "train"), TrainTransform(8, (1.0, 1.0), False))
        loop.fit(TinySeg(2), train_set, _cfg(batch_size=2, iterations=2, num_workers=1), torch.device("cpu"))
    finally:
        ds.read_image = real


def _nan_loss(d):
    from test_robustness import NaNAt
    from test_training_loop import TinySeg, _cfg, _train_set

    from training import loop

    loop.fit(NaNAt(TinySeg(), at=2), _train_set(), _cfg(out_dir=f"{d}/run", checkpoint_every=1), torch.device("cpu"))



def _inference_statistics_with_a_graph():
    """A training call with a graph on running statistics made under torch.inference_mode(): refused before either
    is written (running_mean was written, then the call failed on its version counter, running_var left as it was)."""
    with torch.inference_mode():
        rm, rv = torch.zeros(4), torch.ones(4)
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    try:
        deeplab_ops.conv_bn_relu(x, torch.randn(4, 3, 3, 3), None, None, rm, rv, backend="cpu")
    finally:
        assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4)), (rm, rv)

CASES = {
    # conv_bn_relu: the Python front door (deeplab_ops/ops/conv_bn_relu.py)
    "cbr-x-type": lambda d: cbr(x=[[1.0]]),
    "cbr-weight-type": lambda d: cbr(weight=None),
    "cbr-x-rank": lambda d: cbr(x=torch.randn(3, 8, 8)),
    "cbr-x-dtype": lambda d: cbr(x=torch.ones(2, 3, 8, 8, dtype=torch.int64)),
    "cbr-weight-rank": lambda d: cbr(weight=torch.randn(4, 3, 3)),
    "cbr-weight-device": lambda d: cbr(weight=torch.randn(4, 3, 3, 3, device="meta")),
    "cbr-weight-dtype": lambda d: cbr(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)),
    "cbr-grouped": lambda d: cbr(x=torch.randn(2, 4, 8, 8), weight=torch.randn(4, 2, 3, 3)),
    "cbr-channels": lambda d: cbr(weight=torch.randn(4, 5, 3, 3)),
    "cbr-zero-size": lambda d: cbr(weight=torch.randn(0, 3, 3, 3)),
    "triton-empty-batch": lambda d: _triton_forward(x=torch.randn(0, 3, 8, 8)),
    "cbr-empty-map": lambda d: cbr(x=torch.randn(2, 3, 0, 5), weight=torch.randn(4, 3, 1, 1), padding=1),
    "triton-twin-cpu": lambda d: _with_env("TRITON_INTERPRET", "0", lambda: ops.triton_upsample_cross_entropy_forward(
        torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long), -100, False, "mean")),
    "cbr-pair": lambda d: cbr(stride=1.5),
    "cbr-stride": lambda d: cbr(stride=0),
    "cbr-dilation": lambda d: cbr(dilation=(1, 0)),
    "cbr-padding": lambda d: cbr(padding=-1),
    "cbr-geometry-range": lambda d: cbr(dilation=2**31),
    "cbr-output-size": lambda d: cbr(x=torch.randn(2, 3, 2, 2), padding=0),
    "cbr-training-type": lambda d: cbr(training="yes"),
    "cbr-relu-type": lambda d: cbr(relu=1),
    "cbr-momentum": lambda d: cbr(momentum=1.5),
    "cbr-eps": lambda d: cbr(eps=0.0),
    "cbr-bn-type": lambda d: cbr(bn_weight=[1.0] * 4),
    "cbr-bn-shape": lambda d: cbr(bn_weight=torch.rand(5)),
    "cbr-bn-device": lambda d: cbr(running_var=torch.ones(4, device="meta")),
    "cbr-bn-dtype": lambda d: cbr(bn_weight=torch.rand(4, dtype=torch.float64)),
    "cbr-bn-mixed": lambda d: cbr(x=torch.randn(2, 3, 8, 8, dtype=torch.bfloat16),
                                  weight=torch.randn(4, 3, 3, 3, dtype=torch.bfloat16),
                                  bn_bias=torch.randn(4, dtype=torch.bfloat16)),
    "cbr-running-pair": lambda d: cbr(running_var=None),
    "cbr-dense": lambda d: cbr(x=torch.randn(2, 3, 8, 8).to_sparse()),
    "cbr-running-grad": lambda d: cbr(running_mean=torch.zeros(4, requires_grad=True)),
    "cbr-running-expanded": lambda d: cbr(running_mean=torch.zeros(1).expand(4)),
    "cbr-running-shared": lambda d: (lambda buf: cbr(running_mean=buf[0:4], running_var=buf[2:6]))(torch.ones(6)),
    "cbr-running-param-shared": lambda d: (lambda t: cbr(bn_weight=t, running_var=t))(torch.ones(4)),
    "cbr-eval-running": lambda d: cbr(training=False, running_mean=None, running_var=None),
    "cbr-one-value": lambda d: cbr(x=torch.randn(1, 3, 1, 1), weight=torch.randn(4, 3, 1, 1), padding=0),
    "cbr-residual-type": lambda d: cbr(residual=1.0),
    "cbr-residual-shape": lambda d: cbr(residual=torch.randn(2, 4, 8, 7)),
    "cbr-residual-device": lambda d: cbr(residual=torch.randn(2, 4, 8, 8, device="meta")),
    "cbr-residual-dtype": lambda d: cbr(residual=torch.randn(2, 4, 8, 8, dtype=torch.float64)),
    "cbr-memory-efficient": lambda d: cbr(memory_efficient="no"),
    "cbr-double-backward": lambda d: double_backward(
        lambda x: cbr(x=x, weight=torch.randn(2, 3, 3, 3, dtype=torch.float64), bn_weight=None, bn_bias=None,
                      running_mean=None, running_var=None)),
    "cbr-forward-ad": lambda d: forward_ad(lambda x: cbr(x=x), torch.randn(2, 3, 8, 8)),
    "cbr-func-grad": lambda d: func_grad(lambda x: cbr(x=x), torch.randn(2, 3, 8, 8)),
    "cbr-vmap-statistics": lambda d: torch.vmap(lambda x: cbr(x=x), randomness="same")(torch.randn(3, 2, 3, 8, 8)),
    # backend choice (deeplab_ops/backends.py)
    "backend-unknown": lambda d: cbr(backend="cudnn"),
    "backend-env-unknown": lambda d: _with_env("DEEPLAB_OPS_BACKEND", "bogus", lambda: cbr(backend=None)),
    "cpu-winograd-env": lambda d: _with_env("DEEPLAB_OPS_CPU_WINOGRAD", "off", lambda: _no_grad_eval_cbr()),
    "autotune-env": lambda d: _with_env("DEEPLAB_OPS_AUTOTUNE", "sometimes", deeplab_ops.common.env_autotune_mode),
    "backend-cannot-run": lambda d: cbr(backend="cuda"),
    "backend-triton-no-interpreter": lambda d: _with_env("TRITON_INTERPRET", "0", lambda: cbr(backend="triton")),
    "backend-auto-cannot-run": lambda d: _auto_triton_only(),
    "backend-device": lambda d: deeplab_ops.available_backends("tpu"),
    "process-group-type": lambda d: cbr(process_group="world"),
    "process-group-non-member": lambda d: cbr(process_group=torch.distributed.GroupMember.NON_GROUP_MEMBER),
    # aspp: the Python front door (deeplab_ops/ops/aspp.py)
    "aspp-x": lambda d: aspp(x=torch.randn(5, 7, 6)),
    "aspp-x-dtype": lambda d: aspp(x=torch.ones(2, 5, 7, 6, dtype=torch.int32)),
    "aspp-rates": lambda d: aspp(rates=(2, 0)),
    "aspp-rates-range": lambda d: aspp(rates=(2**31, 5)),
    "aspp-zero-size": lambda d: aspp(**aspp_args(c=0)),
    "aspp-empty": lambda d: aspp(x=torch.randn(2, 5, 0, 6)),
    "aspp-list": lambda d: aspp(conv_weights=aspp_args()["conv_weights"][:-1]),
    "aspp-list-item": lambda d: aspp_item("bn_weights", 1, [1.0]),
    "aspp-x-channels": lambda d: aspp(x=torch.randn(2, 4, 7, 6)),
    "aspp-conv-rank": lambda d: aspp_item("conv_weights", 0, torch.randn(3, 5)),
    "aspp-conv-shape": lambda d: aspp_item("conv_weights", 1, torch.randn(3, 5, 1, 1)),
    "aspp-pool-shape": lambda d: aspp(pool_weight=torch.randn(3, 4, 1, 1)),
    "aspp-project-shape": lambda d: aspp(project_weight=torch.randn(3, 7, 1, 1)),
    "aspp-weight-device": lambda d: aspp(pool_weight=torch.randn(3, 5, 1, 1, device="meta")),
    "aspp-weight-dtype": lambda d: aspp(pool_weight=torch.randn(3, 5, 1, 1, dtype=torch.float64)),
    "aspp-x-weights-dtype": lambda d: FusedASPP(5, (2, 5), 3, backend="cpu")(torch.randn(2, 5, 7, 6).bfloat16()),
    "aspp-bn-shape": lambda d: aspp_item("running_means", 0, torch.zeros(4)),
    "aspp-bn-device": lambda d: aspp_item("bn_biases", 2, torch.zeros(3, device="meta")),
    "aspp-bn-dtype": lambda d: aspp_item("bn_weights", 0, torch.ones(3, dtype=torch.float64)),
    "aspp-bn-mixed": lambda d: aspp(**{k: v for k, v in aspp_args(dtype=torch.bfloat16).items() if k != "bn_weights"},
                                    bn_weights=[torch.ones(3)] * 5),
    "aspp-running-pair": lambda d: aspp(running_vars=None),
    "aspp-dense": lambda d: aspp(pool_weight=torch.randn(3, 5, 1, 1).to_sparse()),
    "aspp-running-grad": lambda d: aspp_item("running_means", 1, torch.zeros(3, requires_grad=True)),
    "aspp-running-shared": lambda d: (lambda t: aspp(running_means=[t] + [torch.zeros(3) for _ in range(4)],
                                                     running_vars=[t] + [torch.ones(3) for _ in range(4)]))(
        torch.ones(3)),
    "aspp-running-param-shared": lambda d: (lambda t: aspp(bn_weights=[t] + [torch.ones(3) for _ in range(4)],
                                                           running_vars=[t] + [torch.ones(3) for _ in range(4)]))(
        torch.ones(3)),
    "aspp-training-type": lambda d: aspp(training=1),
    "aspp-eval-running": lambda d: aspp(training=False, running_means=None, running_vars=None),
    "aspp-batch-1": lambda d: aspp(x=torch.randn(1, 5, 7, 6)),
    "aspp-momentum": lambda d: aspp(momentum=-0.1),
    "aspp-eps": lambda d: aspp(eps=-1.0),
    "aspp-double-backward": lambda d: double_backward(lambda x: aspp(**{
        **aspp_args(cin=3, h=5, w=5, dtype=torch.float64), "x": x})),
    "aspp-memory-efficient-type": lambda d: aspp(memory_efficient=1),
    "aspp-forward-ad": lambda d: forward_ad(lambda x: aspp(x=x), aspp_args()["x"]),
    "aspp-func-grad": lambda d: func_grad(lambda x: aspp(x=x), torch.randn(2, 5, 7, 6)),
    "cbr-memory-efficient-type": lambda d: cbr(memory_efficient="yes"),
    # upsample_cross_entropy (deeplab_ops/ops/upsample_ce.py)
    "uce-logits-type": lambda d: uce(logits=[1.0]),
    "uce-target-type": lambda d: uce(target=None),
    "uce-logits-rank": lambda d: uce(logits=torch.randn(3, 4, 5)),
    "uce-logits-dtype": lambda d: uce(logits=torch.zeros(2, 3, 4, 5, dtype=torch.int32)),
    "uce-target-rank": lambda d: uce(target=torch.zeros(2, 1, 9, 11, dtype=torch.int64)),
    "uce-target-dtype": lambda d: uce(target=torch.zeros(2, 9, 11, dtype=torch.int32)),
    "uce-dense": lambda d: uce(target=torch.randint(0, 3, (2, 9, 11)).to_sparse()),
    "uce-target-device": lambda d: uce(target=torch.zeros(2, 9, 11, dtype=torch.int64, device="meta")),
    "uce-batch": lambda d: uce(target=torch.zeros(3, 9, 11, dtype=torch.int64)),
    "uce-classes": lambda d: uce(logits=torch.randn(2, 0, 4, 5)),
    "uce-empty-map": lambda d: uce(target=torch.zeros(2, 0, 11, dtype=torch.int64)),
    "uce-ignore-type": lambda d: uce(ignore_index=1.5),
    "uce-ignore-range": lambda d: uce(ignore_index=2**63),
    "uce-align-type": lambda d: uce(align_corners=1),
    "uce-reduction": lambda d: uce(reduction="avg"),
    "uce-label-range": lambda d: uce(target=torch.full((2, 9, 11), 7, dtype=torch.int64)),
    "uce-forward-ad": lambda d: forward_ad(lambda x: uce(logits=x), torch.randn(2, 3, 4, 5)),
    "uce-func-grad": lambda d: func_grad(lambda x: uce(logits=x), torch.randn(2, 3, 4, 5)),
    "uce-double-backward": lambda d: double_backward(lambda x: uce(logits=x)),
    "uce-int32": lambda d: uce(logits=torch.empty(1, 2**31, 1, 1, device="meta"),
                               target=torch.zeros(1, 1, 1, dtype=torch.int64, device="meta")),
    "nn-aspp-memory-efficient-type": lambda d: FusedASPP(4, (1,), 2, memory_efficient="yes"),
    "nn-jit-script": lambda d: _script(FusedConvBNReLU(3, 4, 3)),
    # nn modules and model fusion checks (deeplab_ops/nn.py)
    "nn-conv-type": lambda d: check_fusable(nn.Linear(2, 2), nn.BatchNorm2d(2)),
    "nn-bn-type": lambda d: check_fusable(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm1d(2)),
    "nn-conv-bias": lambda d: check_fusable(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)),
    "nn-groups": lambda d: check_fusable(nn.Conv2d(2, 2, 1, groups=2, bias=False), nn.BatchNorm2d(2)),
    "nn-padding-mode": lambda d: check_fusable(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect", bias=False),
                                               nn.BatchNorm2d(2)),
    "nn-num-features": lambda d: check_fusable(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(2)),
    "nn-same-padding": lambda d: check_fusable(nn.Conv2d(2, 2, 2, padding="same", bias=False), nn.BatchNorm2d(2)),
    "nn-relu-type": lambda d: FusedConvBNReLU.from_modules(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2),
                                                           relu="yes"),
    "nn-aspp-rates": lambda d: FusedASPP(4, (2, 0)),
    "nn-aspp-rates-type": lambda d: FusedASPP(4, 6),
    "nn-aspp-out-channels": lambda d: FusedASPP(4, (6,), out_channels=0),
    "nn-aspp-in-channels": lambda d: FusedASPP(0, (6,)),
    "nn-cbr-geometry": lambda d: FusedConvBNReLU(3, 4, 3, stride=0),
    "nn-cbr-padding": lambda d: FusedConvBNReLU(3, 4, 3, padding=(1, -1)),
    "nn-cbr-channels": lambda d: FusedConvBNReLU(0, 4, 3),
    "nn-cbr-backend": lambda d: FusedConvBNReLU(3, 4, 3, backend="bogus"),
    "nn-bn-momentum": lambda d: FusedConvBNReLU(3, 4, 3, momentum=2.0),
    "nn-bn-eps": lambda d: FusedConvBNReLU.from_modules(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=0.0)),
    "nn-aspp-dropout": lambda d: FusedASPP(4, (2,), dropout=1.0),
    "nn-aspp-branches": lambda d: torchvision_aspp(lambda m: setattr(m, "convs", nn.ModuleList(list(m.convs)[-1:]))),
    "nn-aspp-branch-conv": lambda d: torchvision_aspp(lambda m: setattr(m.convs[0][0], "stride", (2, 2))),
    "nn-aspp-rate-conv": lambda d: torchvision_aspp(lambda m: setattr(m.convs[1][0], "padding", (1, 1))),
    "nn-aspp-pooling": lambda d: torchvision_aspp(lambda m: m.convs.__setitem__(3, m.convs[0])),
    "nn-aspp-shared-bn": lambda d: torchvision_aspp(lambda m: setattr(m.convs[1][1], "eps", 1e-3)),
    "nn-aspp-affine": lambda d: torchvision_aspp(lambda m: (setattr(m.project[1], "weight", None),
                                                           setattr(m.project[1], "bias", None))),
    "nn-sync-no-dist": lambda d: deeplab_ops.nn.sync_batchnorm(nn.Sequential()),
    "nn-aspp-mixed-mode": lambda d: _mixed_mode_aspp(),
    "nn-aspp-module-type": lambda d: fused_aspp_forward(nn.Conv2d(4, 3, 1), torch.randn(2, 4, 6, 6)),
    "nn-aspp-branch-type": lambda d: torchvision_aspp(lambda m: m.convs.__setitem__(0, nn.Conv2d(4, 3, 1))),
    "nn-aspp-x-channels": lambda d: FusedASPP(5, [1], 4)(torch.randn(2, 6, 7, 7)),
    "nn-x-channels": lambda d: FusedConvBNReLU(5, 4, 3, padding=1)(torch.randn(2, 6, 7, 7)),
    "nn-fused-conv-type": lambda d: deeplab_ops.nn.fused_conv_bn(nn.Linear(2, 2), nn.BatchNorm2d(2),
                                                                 torch.randn(2, 2, 4, 4), training=True),
    "nn-fused-bn-type": lambda d: deeplab_ops.nn.bn_call_args(nn.Linear(2, 2), True),
    "nn-pack-bn-type": lambda d: deeplab_ops.nn.pack_batchnorms([nn.Linear(2, 2)]),
    "nn-model-type": lambda d: deeplab_ops.nn.fuse_modules("m"),
    "nn-fuse-backend": lambda d: deeplab_ops.nn.fuse_modules(nn.Sequential(), backend="x"),
    "nn-fuse-memory-efficient": lambda d: deeplab_ops.nn.fuse_modules(nn.Sequential(), memory_efficient=1),
    "nn-fuse-channels-last": lambda d: deeplab_ops.nn.fuse_modules(nn.Sequential(), channels_last=1),
    # direct torch.ops.deeplab_ops calls: the C++ boundary (csrc/common/arg_checks.h,
    # csrc/composite/conv_bn_relu.cpp, csrc/composite/aspp.cpp)
    "cpp-activation": lambda d: ops.bn_stats(torch.randn(3, 4)),
    "cpp-channel-vector": lambda d: ops.bn_apply(torch.randn(2, 3, 4, 4), torch.zeros(2), torch.ones(3), None, None,
                                                 None, True),
    "cpp-same-shape": lambda d: ops.bn_apply(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), None, None,
                                             torch.randn(2, 3, 4, 5), True),
    "cpp-same-dtype": lambda d: ops.bn_apply(torch.randn(2, 3, 4, 4), torch.zeros(3), torch.ones(3), None, None,
                                             torch.randn(2, 3, 4, 4, dtype=torch.float64), True),
    "cpp-partials": lambda d: ops.bn_finalize(torch.zeros(3), torch.zeros(3), torch.ones(1), 0.0, None, None, 0.1,
                                              1e-5, *(torch.empty(3) for _ in range(4))),
    "cpp-no-partials": lambda d: ops.bn_finalize(torch.zeros(0, 3), torch.zeros(0, 3), torch.ones(0), 0.0, None,
                                                 None, 0.1, 1e-5, *(torch.empty(3) for _ in range(4))),
    "cpp-count-shape": lambda d: ops.bn_finalize(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(2), 0.0, None,
                                                 None, 0.1, 1e-5, *(torch.empty(3) for _ in range(4))),
    "cpp-count-positive": lambda d: ops.bn_backward_dy(*([torch.randn(2, 3, 4, 4)] * 3), torch.zeros(3), torch.ones(3),
                                                       None, torch.zeros(3), torch.zeros(3), 0.0, True, True),
    "cpp-stage-dtype": lambda d: ops.bn_apply(torch.randn(2, 3, 4, 4), torch.zeros(3, dtype=torch.long), torch.ones(3),
                                              None, None, None, True),
    "cpp-save-dtype": lambda d: ops.bn_finalize(None, None, None, 0.0, torch.zeros(3), torch.ones(3), 0.1, 1e-5,
                                                torch.empty(3), torch.empty(3, dtype=torch.half), torch.empty(0),
                                                torch.empty(0)),
    "cpp-stage-channels": lambda d: ops.bn_apply(torch.randn(2, 4, 4, 4), torch.zeros(3), torch.ones(3), None, None,
                                                 None, True),
    "cpp-dy-sums": lambda d: ops.bn_backward_dy(*([torch.randn(2, 3, 4, 4)] * 3), torch.zeros(3), torch.ones(3), None,
                                                None, None, 32.0, True, True),
    "cpp-weight-rank": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3), *_cpp_tail()),
    "cpp-weight-channels": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 5, 1, 1),
                                                              *_cpp_tail()),
    "cpp-geometry-length": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1),
                                                              *_cpp_tail(stride=[1])),
    "cpp-stride": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1),
                                                     *_cpp_tail(stride=[0, 1])),
    "cpp-dilation": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1),
                                                       *_cpp_tail(dilation=[1, 0])),
    "cpp-padding": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1),
                                                      *_cpp_tail(padding=[-1, 0])),
    "cpp-running-pair": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1),
                                                           *_cpp_tail(running_mean=torch.zeros(3))),
    "cpp-eval-running": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1),
                                                           *_cpp_tail(training=False)),
    "cpp-x-dtype": lambda d: ops.conv_bn_relu_forward(torch.ones(2, 3, 4, 4, dtype=torch.int64),
                                                      torch.ones(3, 3, 3, 3, dtype=torch.int64), *_cpp_tail()),
    "cpp-window": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 6, 6), torch.randn(3, 3, 3, 3),
                                                     *_cpp_tail(dilation=(5, 5))),
    "cpp-empty-output": lambda d: ops.conv_bn_relu_forward(torch.randn(0, 3, 4, 4), torch.randn(3, 3, 3, 3),
                                                           *_cpp_tail()),
    "cpp-one-value": lambda d: ops.conv_bn_relu_forward(torch.randn(1, 3, 1, 1), torch.randn(3, 3, 1, 1),
                                                        *_cpp_tail()),
    "cpp-bwd-conv-out": lambda d: _cpp_backward(stride=[2, 2]),
    "cpp-bwd-empty": lambda d: _cpp_backward(x=torch.randn(0, 4, 8, 8), conv_out=torch.randn(0, 6, 8, 8),
                                             out=torch.randn(0, 6, 8, 8), grad_out=torch.randn(0, 6, 8, 8)),
    "cpp-residual-shape": lambda d: ops.conv_bn_relu_forward(
        torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1), None, None, None, None, [1, 1], [0, 0], [1, 1], True, 0.1,
        1e-5, torch.randn(2, 3, 4, 5), True),
    "cpp-aspp-saved": lambda d: _cpp_aspp_backward(pool_out=torch.randn(2, 4)),
    # the triton twins called directly: the front door's checks (deeplab_ops.triton.validate_with)
    "triton-direct-args": lambda d: ops.triton_conv_bn_relu_forward(
        torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3), torch.ones(6), torch.zeros(6), None, None, [1, 1], [1, 1],
        [1, 1], True, 0.1, 1e-5, torch.randn(2, 6, 4, 4), True),
    "triton-bwd-saved-shape": lambda d: _triton_backward(stride=[2, 2]),
    "triton-bwd-output-mask": lambda d: _triton_backward(output_mask=[True, True, True]),
    "triton-aspp-saved-shape": lambda d: _triton_aspp_backward(branch_out=[torch.randn(2, 6, 7, 6)]),
    "triton-half-cpu": lambda d: _triton_forward(x=torch.randn(2, 3, 8, 8, dtype=torch.bfloat16),
                                                 weight=torch.randn(6, 3, 3, 3, dtype=torch.bfloat16)),
    "triton-uce-saved-shape": lambda d: ops.triton_upsample_cross_entropy_backward(
        torch.ones(()), torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 9, 11)), torch.zeros(2, 4, 11),
        torch.ones(()), 255, False, "mean"),
    "cpp-aspp-empty": lambda d: _cpp_aspp(x=torch.randn(2, 5, 0, 6)),
    "cpp-aspp-weights": lambda d: _cpp_aspp(conv_weights=aspp_args()["conv_weights"][:-1]),
    "cpp-aspp-rates": lambda d: _cpp_aspp(rates=[2, 0]),
    "cpp-aspp-conv-shape": lambda d: _cpp_aspp(conv_weights=[torch.randn(3, 5, 1, 1)] * 3),
    "cpp-aspp-pool-shape": lambda d: _cpp_aspp(pool_weight=torch.randn(3, 4, 1, 1)),
    "cpp-aspp-batch-1": lambda d: _cpp_aspp(x=torch.randn(1, 5, 7, 6)),
    "cpp-aspp-eval-running": lambda d: _cpp_aspp(training=False, running_mean=None, running_var=None),
    "cpp-momentum": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1),
                                                       *_cpp_tail(momentum=1.5)),
    "cpp-eps": lambda d: _cpp_aspp(eps=0.0),
    "cbr-running-inference": lambda d: _inference_statistics_with_a_graph(),
    "cpp-bn-dtype": lambda d: ops.conv_bn_relu_forward(torch.randn(2, 3, 4, 4), torch.randn(3, 3, 1, 1), *_cpp_tail(
        running_mean=torch.zeros(3, dtype=torch.float64), running_var=torch.ones(3, dtype=torch.float64))),
    "cpp-bn-mixed": lambda d: ops.conv_bn_relu_forward(
        torch.randn(2, 3, 4, 4, dtype=torch.bfloat16), torch.randn(3, 3, 1, 1, dtype=torch.bfloat16), torch.ones(3),
        torch.zeros(3, dtype=torch.bfloat16), None, None, [1, 1], [0, 0], [1, 1], True, 0.1, 1e-5, None, True),
    "cpp-eval-grad": lambda d: ops.conv_bn_relu_eval(
        torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(3, 3, 1, 1), None, None, torch.zeros(3), torch.ones(3),
        [1, 1], [0, 0], [1, 1], 1e-5, None, True),
    "cpp-aspp-x-dtype": lambda d: _cpp_aspp(**{k: v.long() for k, v in aspp_args().items()
                                               if k in ("x", "pool_weight", "project_weight")}),
    "cpp-aspp-conv-dtype": lambda d: _cpp_aspp(conv_weights=[torch.randn(3, 5, 1, 1)] + [
        torch.randn(3, 5, 3, 3, dtype=torch.float64), torch.randn(3, 5, 3, 3)]),
    # training: checkpoints (training/checkpoint.py)
    "ckpt-missing": lambda d: _ckpt().load_checkpoint(f"{d}/nothing.pt"),
    "ckpt-empty": lambda d: _ckpt().load_checkpoint(_ckpt_file(d, b"")),
    "ckpt-corrupt": lambda d: _ckpt().load_checkpoint(_ckpt_file(d, b"PK\x03\x04 0123456789")),
    "ckpt-crc": lambda d: _ckpt().load_checkpoint(_ckpt_with_a_flipped_byte(d)),
    "ckpt-not-train": lambda d: _ckpt().load_checkpoint(_ckpt_file(d, obj=[1, 2, 3])),
    "ckpt-not-resumable": lambda d: fit_resume({"model": {}}),
    # training: torchrun's environment (training/distributed.py)
    "dist-env-missing": lambda d: _with_env("WORLD_SIZE", "2", lambda: _with_env("RANK", "", _dist().env_dist_info)),
    "dist-env-value": lambda d: _with_env("WORLD_SIZE", "x", _dist().env_dist_info),
    # training: the loop (training/loop.py)
    "loop-nan-loss": _nan_loss,
    "loop-batch-1": lambda d: fit(batch_size=1),
    "loop-fp16-cpu": lambda d: fit(amp="fp16"),
    "loop-resume-beyond": lambda d: _resume_beyond(d),
    "loop-world-size": lambda d: _loop().StreamSampler(10, 5, 0, 0, 1, rank=0, world_size=2),
    "loop-empty-train": lambda d: _loop().StreamSampler(0, 4, 0, 0, 1),
    "loop-worker-crash": _dead_worker,
    # training: datasets (training/datasets.py)
    "data-image-missing": lambda d: _datasets().read_image(f"{d}/no.jpg"),
    "data-image-unreadable": lambda d: _datasets().read_image(_ckpt_file(d, b"not an image")),
    "data-mask-missing": lambda d: _datasets().read_index_mask(f"{d}/no.png"),
    "data-mask-rgb": lambda d: _datasets().read_index_mask(png(f"{d}/m.png", np.zeros((4, 4, 3), np.uint8))),
    "data-mask-unreadable": lambda d: _datasets().read_index_mask(_ckpt_file(d, b"not an image")),
    "data-mask-values": lambda d: _datasets().read_index_mask(
        png(f"{d}/m.tif", np.full((4, 4), 300, np.int32), "I")),
    "data-mask-classes": lambda d: _datasets().read_index_mask(png(f"{d}/m.png", np.full((4, 4), 7, np.uint8), "L"),
                                                               num_classes=3),
    "data-mask-jpeg": lambda d: _datasets().read_index_mask(_jpeg_named_png(d)),
    "data-mask-palette-renumbered": lambda d: _datasets().read_index_mask(_renumbered_palette_png(d),
                                                                          voc_classes=True),
    "data-image-8-in-16": lambda d: _datasets().read_image(png(f"{d}/x.png", np.full((4, 4), 200, np.uint16))),
    "data-sbd-no-scipy": _sbd_without_scipy,
    "tf-image-empty": lambda d: _transforms().to_tensors(np.zeros((0, 5, 3), np.uint8), None),
    "tf-train-rng": lambda d: _transforms().TrainTransform(4)(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8),
                                                              None),
    "data-sbd-missing": lambda d: _datasets().read_sbd_mat(f"{d}/no.mat"),
    "data-sbd-unreadable": lambda d: _datasets().read_sbd_mat(_ckpt_file(d, b"not a mat file")),
    "data-split-missing": lambda d: _datasets().read_split(f"{d}/no.txt"),
    "data-split-empty": lambda d: _datasets().read_split(_ckpt_file(d, b"\n\n")),
    "data-classes-missing": lambda d: _datasets().read_class_list(f"{d}/no.txt"),
    "data-classes-few": lambda d: _datasets().read_class_list(_ckpt_file(d, b"background\n")),
    "data-classes-many": lambda d: _datasets().read_class_list(
        _ckpt_file(d, "\n".join(f"c{i}" for i in range(256)).encode())),
    "data-synthetic-split": lambda d: _datasets().SyntheticShapes("dev"),
    "data-synthetic-size": lambda d: _datasets().SyntheticShapes(size=8),
    "data-synthetic-length": lambda d: _datasets().SyntheticShapes(length=0),
    "data-synthetic-index": lambda d: _datasets().SyntheticShapes(length=3)[3],
    "data-voc-root": lambda d: _datasets().VOCSegmentation(str(d)),
    "data-sbd-root": lambda d: _datasets().VOCSegmentation(voc(d), "train_aug", sbd_root=str(d)),
    "data-voc-no-aug": lambda d: _datasets().VOCSegmentation(voc(d), "train_aug"),
    "data-voc-aug-val": lambda d: _aug_with_val(d),
    "data-voc-file-missing": lambda d: _voc_missing_image(d),
    "data-folder-dirs": lambda d: _datasets().FolderSegmentation(str(d)),
    "data-folder-unknown": lambda d: _folder_unknown(d),
    "data-folder-no-split": lambda d: _datasets().FolderSegmentation(folder(d), "test"),
    "data-folder-empty-split": lambda d: _datasets().FolderSegmentation(folder(d, names=("a",), lists=False), "val"),
    "data-folder-no-images": lambda d: _datasets().FolderSegmentation(folder(d, names=(), lists=False), "val"),
    "data-sbd-classes": lambda d: _datasets().read_sbd_mat(_mat(d, np.full((4, 4), 30, np.uint8)), num_classes=21),
    "data-sbd-values": lambda d: _datasets().read_sbd_mat(_mat(d, np.full((4, 4), 300, np.uint16))),
    "data-mask-fraction": lambda d: _datasets().read_sbd_mat(_mat(d, np.full((4, 4), 1.5))),
    "data-mask-dtype": lambda d: _datasets().read_sbd_mat(_mat(d, np.full((4, 4), 1 + 1j))),
    "data-folder-mask-missing": lambda d: _folder_mask_missing(d),
    "data-size-mismatch": lambda d: _folder_size_mismatch(d),
    # training: transforms and metrics (training/transforms.py, training/metrics.py)
    "tf-image-shape": lambda d: _transforms().to_tensors(np.zeros((4, 4), np.uint8), None),
    "tf-mask-shape": lambda d: _transforms().to_tensors(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.uint8)),
    "tf-crop-size": lambda d: _transforms().TrainTransform(0),
    "tf-scale-range": lambda d: _transforms().TrainTransform(32, scale_range=(2.0, 1.0)),
    "metrics-shape": lambda d: _metrics().confusion_matrix(torch.zeros(2, 3), torch.zeros(2, 4), 3),
    "metrics-target": lambda d: _metrics().confusion_matrix(torch.zeros(2, 3), torch.full((2, 3), 4), 3),
    "metrics-pred": lambda d: _metrics().confusion_matrix(torch.full((2, 3), 5), torch.zeros(2, 3), 3),
    "metrics-num-classes": lambda d: _metrics().SegmentationMetrics(0),
    "metrics-class-names": lambda d: _metrics().SegmentationMetrics(3, ["a", "b"]),
}


def _transforms():
    from training import transforms

    return transforms


def _metrics():
    from training import metrics

    return metrics


def _resume_beyond(d):
    fit(out_dir=f"{d}/run", iterations=2)
    from test_training_loop import TinySeg, _cfg, _train_set

    from training import loop

    resume = _ckpt().load_checkpoint(f"{d}/run/last.pt")
    loop.fit(TinySeg(), _train_set(), _cfg(iterations=1), torch.device("cpu"), resume=resume)


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's deprecation notice (torch >= 2.10)
        torch.jit.script(module)


def _with_env(name, value, fn):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _triton_forward(**over):
    a = dict(x=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), bn_weight=None, bn_bias=None,
             running_mean=None, running_var=None, stride=[1, 1], padding=[1, 1], dilation=[1, 1], training=True,
             momentum=0.1, eps=1e-5, residual=None, relu=True)
    a.update(over)
    return ops.triton_conv_bn_relu_forward(*a.values())


def _auto_triton_only():
    """upsample_cross_entropy with backend=None when the automatic choice for CPU tensors is triton alone and the
    Triton interpreter is off: nothing it considers can run the call (on a GPU build: CUDA tensors without kernels)."""
    from deeplab_ops import backends

    real, remembered = backends.auto_candidates, backends._RESOLVED
    backends.auto_candidates = lambda device: ("triton",)
    backends._RESOLVED = {}  # (choices remembered under the real candidates)
    try:
        return _with_env("TRITON_INTERPRET", "0", lambda: uce(backend=None))
    finally:
        backends.auto_candidates, backends._RESOLVED = real, remembered


def _mixed_mode_aspp():
    m = FusedASPP(4, [2], 3)
    m.convs[1][1].eval()
    return fused_aspp_forward(m, torch.randn(2, 4, 6, 6))  # (a FusedASPP's own forward runs its children instead)


def _no_grad_eval_cbr():
    with torch.no_grad():  # the eval fold: conv_bias_act, which asks whether Winograd may run
        return cbr(training=False)


def _cpp_tail(stride=(1, 1), padding=(0, 0), dilation=(1, 1), training=True, running_mean=None, running_var=None,
              momentum=0.1, eps=1e-5):
    return (None, None, running_mean, running_var, list(stride), list(padding), list(dilation), training, momentum,
            eps, None, True)


def _cpp_backward(op=None, **over):
    """conv_bn_relu_backward (or `op`, its triton twin) on a forward's saved tensors (x 2x4x8x8, 3x3 weight, padding
    1), with `over` changed. The triton twin checks its arguments before any kernel runs, interpreter or not."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    out, conv_out, mean, invstd, _, _ = ops.conv_bn_relu_forward(x, w, torch.ones(6), torch.zeros(6), None, None,
                                                                 [1, 1], [1, 1], [1, 1], True, 0.1, 1e-5, None, True)
    a = dict(grad_out=torch.randn_like(out), x=x, weight=w, bn_weight=torch.ones(6), conv_out=conv_out, out=out,
             save_mean=mean, save_invstd=invstd, stride=[1, 1], padding=[1, 1], dilation=[1, 1], training=True,
             relu=True, output_mask=[True, True, True, True, False])
    a.update(over)
    return (op or ops.conv_bn_relu_backward)(*a.values())


def _triton_backward(**over):
    return _cpp_backward(ops.triton_conv_bn_relu_backward, **over)


def _triton_aspp_backward(**over):
    a = aspp_args()
    x, cws, c = a["x"], a["conv_weights"], 3
    n, _, h, w = x.shape
    b = dict(grad_out=torch.randn(n, c, h, w), x=x, conv_weights=cws, pool_weight=a["pool_weight"],
             project_weight=a["project_weight"], bn_weight=torch.cat(a["bn_weights"]),
             bn_bias=torch.cat(a["bn_biases"]), branch_out=[torch.randn(n, 3 * c, h, w)], pool_out=torch.randn(n, c),
             project_out=torch.randn(n, c, h, w), out=torch.randn(n, c, h, w), save_mean=torch.zeros(5 * c),
             save_invstd=torch.ones(5 * c), rates=list(a["rates"]), training=True, output_mask=[True, True, True])
    b.update(over)
    return ops.triton_aspp_backward(*b.values())


def _cpp_aspp_backward(**over):
    """aspp_backward (the composite's) on aspp_forward's outputs for aspp_args(), with `over` changed."""
    a = aspp_args()
    f = dict(x=a["x"], conv_weights=a["conv_weights"], pool_weight=a["pool_weight"],
             project_weight=a["project_weight"], bn_weight=torch.cat(a["bn_weights"]),
             bn_bias=torch.cat(a["bn_biases"]))
    out, branch, pool, proj, mean, invstd, _, _ = ops.aspp_forward(*f.values(), None, None, list(a["rates"]), True,
                                                                   0.1, 1e-5)
    b = dict(grad_out=torch.randn_like(out), **f, branch_out=branch, pool_out=pool, project_out=proj, out=out,
             save_mean=mean, save_invstd=invstd, rates=list(a["rates"]), training=True, output_mask=[True, True, True])
    b.update(over)
    return ops.aspp_backward(*b.values())


def _cpp_aspp(training=True, running_mean="default", running_var="default", momentum=0.1, eps=1e-5, **over):
    a = aspp_args()
    a.update(over)
    rm = torch.cat(a["running_means"]) if isinstance(running_mean, str) else running_mean
    rv = torch.cat(a["running_vars"]) if isinstance(running_var, str) else running_var
    return ops.aspp_forward(a["x"], a["conv_weights"], a["pool_weight"], a["project_weight"],
                            torch.cat(a["bn_weights"]), torch.cat(a["bn_biases"]), rm, rv, list(a["rates"]),
                            training, momentum, eps)


def _dist():
    from training import distributed

    return distributed


def _loop():
    from training import loop

    return loop


def _aug_with_val(d):
    r = voc(d, split_ids=("a",), val_ids=("b",), aug=True)
    open(f"{r}/ImageSets/Segmentation/train_aug.txt", "w").write("a\nb\n")
    _datasets().VOCSegmentation(r, "train_aug")


def _voc_missing_image(d):
    r = voc(d)
    os.unlink(f"{r}/JPEGImages/a.jpg")
    _datasets().VOCSegmentation(r, "train")


def _folder_unknown(d):
    root = folder(d)
    open(f"{root}/train.txt", "w").write("a\nzz\n")
    _datasets().FolderSegmentation(root, "train")


def _folder_mask_missing(d):
    root = folder(d)
    os.unlink(f"{root}/masks/b.png")
    _datasets().FolderSegmentation(root, "train")


def _folder_size_mismatch(d):
    root = folder(d)
    png(f"{root}/masks/b.png", np.zeros((5, 8), np.uint8), "L")
    _datasets().FolderSegmentation(root, "train")[1]


def run_case(ident: str, tmp_path) -> BaseException:
    """The exception a case raises, with tmp_path shown as DIR in its message."""
    torch.manual_seed(0)
    case = CASES[ident]
    if ident.startswith("triton-") and ident != "triton-twin-cpu":
        # The twins' own checks, which run before any kernel: on CPU tensors they pass the device rule only in the
        # interpreter, which a GPU machine leaves off (there such a call is refused as `triton-twin-cpu` says).
        case = functools.partial(_with_env, "TRITON_INTERPRET", "1", functools.partial(case, tmp_path))
    else:
        case = functools.partial(case, tmp_path)
    try:
        case()
    except BaseException as e:  # noqa: BLE001 (any exception is the answer)
        return e
    raise AssertionError(f"{ident}: no error raised")


def normalized(e: BaseException, tmp_path) -> str:
    text = re.sub(r"\s+", " ", str(e).replace(str(tmp_path), "DIR"))
    return re.sub(r"pid(\(s\))? \d+", r"pid\1 PID", text)


TABLE = read_error_table()


@pytest.mark.parametrize("ident", sorted(TABLE))
def test_readme_error_row(ident, tmp_path):
    exc_name, message = TABLE[ident]
    assert ident in CASES, f"docs/errors.md row {ident} has no case in tests/test_error_table.py CASES"
    error = run_case(ident, tmp_path)
    names = [c.__name__ for c in type(error).__mro__]
    assert exc_name in names, f"{ident}: raised {type(error).__name__} ({error}), docs/errors.md says {exc_name}"
    text = normalized(error, tmp_path)
    assert re.sub(r"\s+", " ", message) in text, f"{ident}: table message\n  {message}\nnot in the error\n  {text}"


def test_every_case_has_a_readme_row():
    missing = sorted(set(CASES) - set(TABLE))
    assert not missing, f"conditions tested here but missing from docs/errors.md's Errors table: {missing}"
