"""Checkpoints and models as users bring them: torchvision's deeplabv3 and ImageNet ResNet state_dicts (float64,
eval and training, the aux head), files as wrappers write them (train.py's "model", DDP's "module.", torch.compile's
"_orig_mod.", half precision, another device's tag, BatchNorms of before PyTorch 0.4.1, legacy files, pickled
modules and code), fused <-> unfused <-> torchvision round trips, the fused model's folded-BN caches after loads and
conversions, and the factories' / CLI's refusals. Small networks where torchvision's are not needed."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from helpers import randomize_batchnorm
from torch import nn

import model
from model.__main__ import main as summary_main

tv_seg = pytest.importorskip("torchvision.models.segmentation")
tv_models = pytest.importorskip("torchvision.models")




def _small(fused: bool = False, **kwargs) -> model.DeepLabV3:
    kwargs = {"width": 8, "num_classes": 3, "aux_loss": True, **kwargs}
    return model.deeplabv3_resnet(29, fused=fused, **kwargs)


@pytest.fixture(scope="module")
def small_state():
    torch.manual_seed(0)
    return randomize_batchnorm(_small()).state_dict()


def _outputs(net: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    net.eval()
    with torch.no_grad():
        return dict(net(x))


def _assert_same_outputs(got: dict, want: dict, tol: float) -> None:
    """Max absolute error relative to the largest output value, per output."""
    assert got.keys() == want.keys()
    for k in want:
        err = ((got[k].double() - want[k].double()).abs().max() / want[k].double().abs().max()).item()
        assert err <= tol, f"'{k}': max relative error {err:.3g} > {tol}"


# ---- torchvision's deeplabv3: eval and training, fused and unfused, float64 ----------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_torchvision_deeplabv3_of_other_classes_without_aux_head_matches_in_eval_and_training(tmp_path, fused):
    torch.manual_seed(3)
    tv = randomize_batchnorm(
        tv_seg.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=False))
    path = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), path)
    ours = model.load_checkpoint(model.deeplabv3_resnet50(num_classes=5, fused=fused, preset="torchvision"), path)
    tv, ours = tv.double(), ours.double()
    x = torch.randn(2, 3, 37, 29, dtype=torch.float64)
    _assert_same_outputs(_outputs(ours, x), _outputs(tv, x), tol=1e-10)
    tv.train(), ours.train()
    torch.manual_seed(5)
    want = tv(x)["out"]  # the head's dropout draws under one seed in both
    torch.manual_seed(5)
    got = ours(x)["out"]
    assert (got - want).abs().max().item() <= 1e-10
    theirs, mine = tv.state_dict(), ours.state_dict()
    assert theirs.keys() == mine.keys()
    for k in theirs:  # the running statistics and batch counters are updated alike
        assert torch.allclose(mine[k], theirs[k], rtol=0, atol=1e-10), k


def test_fused_state_dict_loads_into_torchvision_and_back(tmp_path):
    torch.manual_seed(4)
    fused = randomize_batchnorm(
        model.deeplabv3_resnet50(num_classes=4, aux_loss=True, fused=True, preset="torchvision"))
    path = tmp_path / "fused.pt"
    torch.save(fused.state_dict(), path)
    tv = tv_seg.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=4, aux_loss=True)
    tv.load_state_dict(torch.load(path, weights_only=True), strict=True)
    path2 = tmp_path / "tv.pt"
    torch.save(tv.state_dict(), path2)
    unfused = model.load_checkpoint(model.deeplabv3_resnet50(num_classes=4, aux_loss=True, preset="torchvision"),
                                    path2)
    x = torch.randn(1, 3, 33, 27)
    want = _outputs(tv, x)
    _assert_same_outputs(_outputs(unfused, x), want, tol=0)
    _assert_same_outputs(_outputs(fused, x), want, tol=1e-5)


# ---- load_backbone: torchvision's ImageNet ResNet -----------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    torch.manual_seed(6)
    path = tmp_path_factory.mktemp("imagenet") / "resnet50.pth"
    torch.save(tv_models.resnet50(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("output_stride,multi_grid,fused", [(16, None, False), (8, (1, 1, 1), True),
                                                            (16, (2, 2, 2), True)])
def test_load_backbone_takes_every_weight_at_any_output_stride_and_multi_grid(resnet50_file, output_stride,
                                                                              multi_grid, fused):
    net = model.deeplabv3_resnet50(output_stride=output_stride, multi_grid=multi_grid, fused=fused)
    model.load_backbone(net, resnet50_file)
    theirs = torch.load(resnet50_file, weights_only=True)
    mine = net.backbone.state_dict()
    assert mine.keys() == theirs.keys() - {"fc.weight", "fc.bias"}
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


@pytest.mark.parametrize("kwargs,hint", [
    ({"residual_unit": "preact"}, "the model uses residual_unit='preact' and the checkpoint the v1.5 bottleneck "
                                  "(torchvision's ImageNet ResNets are v1.5): build the model with "
                                  "residual_unit='v1.5'"),
    ({"width": 32}, "the model's width=32: build the model with width=64"),
])
def test_load_backbone_into_a_model_it_cannot_fit_says_which_argument_to_change(resnet50_file, kwargs, hint):
    net = model.deeplabv3_resnet50(**kwargs)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_backbone(net, resnet50_file)
    assert hint in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


# ---- files as users have them -------------------------------------------------------------------------------------

def _save_with_location(obj, path, location: str) -> None:
    """torch.save as on a machine whose tensors live on `location` ("cuda:1"): the file records that device."""
    import torch.serialization as serialization

    original = serialization.location_tag
    serialization.location_tag = lambda storage: location
    try:
        torch.save(obj, path)
    finally:
        serialization.location_tag = original


@pytest.mark.parametrize("wrap", ["train.py", "ddp", "compile", "ddp+compile", "compile+ddp", "half", "bfloat16",
                                  "legacy", "no-num_batches_tracked", "cuda-tag", "pathlib"])
def test_wrapped_and_converted_files_load(tmp_path, small_state, wrap):
    state = small_state
    path = tmp_path / "ckpt.pt"
    prefixed = {"ddp": "module.", "compile": "_orig_mod.", "ddp+compile": "module._orig_mod.",
                "compile+ddp": "_orig_mod.module."}
    if wrap == "train.py":
        obj = {"model": state, "optimizer": {"state": {}}, "iteration": 3, "args": {"lr": 0.1}}
    elif wrap in prefixed:
        obj = {prefixed[wrap] + k: v for k, v in state.items()}
    elif wrap in ("half", "bfloat16"):
        dtype = torch.float16 if wrap == "half" else torch.bfloat16
        obj = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    elif wrap == "no-num_batches_tracked":
        obj = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    else:
        obj = state
    if wrap == "cuda-tag":
        _save_with_location(obj, path, "cuda:1")
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=wrap != "legacy")
    source = path if wrap == "pathlib" else str(path)
    x = torch.randn(2, 3, 33, 33)
    want = _outputs(model.load_checkpoint(_small(), {k: v.float() if v.is_floating_point() else v
                                                     for k, v in model.read_state_dict(path).items()}), x)
    for fused in (False, True):
        net = model.load_checkpoint(_small(fused=fused), source)
        assert all(p.dtype == torch.float32 for p in net.parameters())
        _assert_same_outputs(_outputs(net, x), want, tol=1e-5)


def test_a_path_starting_with_a_tilde_is_read_from_the_home_folder(tmp_path, small_state, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    torch.save(small_state, tmp_path / "best.pt")
    net = model.load_checkpoint(_small(), "~/best.pt")
    assert torch.equal(net.backbone.conv1.weight, small_state["backbone.conv1.weight"])
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pt"):
        model.load_checkpoint(_small(), "~/nothing.pt")


def test_the_wrapper_entry_that_holds_the_tensors_is_taken(tmp_path, small_state):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"name": "deeplabv3", "depth": 29}, "state_dict": small_state}, path)
    net = model.load_checkpoint(_small(), path)
    assert torch.equal(net.backbone.conv1.weight, small_state["backbone.conv1.weight"])


@pytest.mark.parametrize("prefix,on_every_key", [("module.", False), ("model.", True)])
def test_keys_under_a_prefix_that_is_not_removed_are_named_with_the_prefix(small_state, prefix, on_every_key):
    state = {(prefix + k if on_every_key or i % 2 else k): v for i, (k, v) in enumerate(small_state.items())}
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_small(), state)
    n = sum(1 for k in state if k.startswith(prefix))
    assert (f"hint: {n} unexpected keys are the model's own with a {prefix!r} prefix" in str(info.value)
            and f"{n} of the checkpoint's {len(state)} keys carry it" in str(info.value)
            and f"k.removeprefix({prefix!r})" in str(info.value)), str(info.value)


class _RunsCode:
    """Unpickling calls os.mkdir(marker): what a crafted checkpoint does with os.system."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_file_that_would_run_code_is_refused_by_name_and_runs_nothing(tmp_path, legacy):
    marker = tmp_path / "code_ran"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": _RunsCode(str(marker))}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(model.CheckpointReadError) as info:
        model.load_checkpoint(_small(), path)
    assert not marker.exists()
    message = str(info.value)
    # os.mkdir is posix.mkdir, a module torch blocks outright: not "corrupt or truncated"
    assert "it holds a pickled posix.mkdir" in message and "no code from the file runs" in message, message
    assert "corrupt" not in message


def test_a_whole_pickled_module_is_refused_and_says_to_save_the_state_dict(tmp_path):
    path = tmp_path / "net.pt"
    torch.save(_small(), path)
    with pytest.raises(model.CheckpointReadError, match=r"it holds a pickled model\.deeplabv3\.DeepLabV3.*"
                                                        r"torch\.save\(model\.state_dict\(\), PATH\)"):
        model.load_checkpoint(_small(), path)


def test_training_checkpoints_are_read_without_running_code(tmp_path):
    """training.checkpoint read train.py's checkpoints (--resume, --checkpoint, --eval-only) with weights_only=False:
    a file whose pickle calls a function ran it. Now weights-only: refused, nothing runs; a checkpoint with the
    numpy random state as an array (written before it was kept as a tensor) still loads."""
    import numpy as np

    from training import checkpoint as training_checkpoint

    marker = tmp_path / "code_ran"
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "iteration": 1, "args": _RunsCode(str(marker))}, path)
    with pytest.raises(model.CheckpointReadError, match="it holds a pickled"):
        training_checkpoint.load_checkpoint(str(path))
    assert not marker.exists(), "loading the checkpoint ran code the file holds"
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    torch.save({"model": {}, "rng": {"numpy": (name, keys, pos, has_gauss, cached)}}, path)
    loaded = training_checkpoint.load_checkpoint(str(path))["rng"]["numpy"][1]
    assert isinstance(loaded, np.ndarray) and (loaded == keys).all()
    assert not marker.exists(), "loading the checkpoint ran code the file holds"


# ---- tensors that cannot load: refused before anything is copied --------------------------------------------------

def _meta(v: torch.Tensor) -> torch.Tensor:
    return torch.empty(v.shape, dtype=v.dtype, device="meta")


@pytest.mark.parametrize("bad,words", [
    (_meta, "meta tensors (shapes, no data: saved from a model built on the meta device): classifier.1.weight"),
    (lambda v: v.to_sparse(), "torch.sparse_coo tensors (dense tensors only: save them with .to_dense()): "
                              "classifier.1.weight"),
    (lambda v: v.to(torch.complex64), "torch.complex64 tensors where the model's are real"),
], ids=["meta", "sparse", "complex"])
def test_tensors_that_cannot_load_are_refused_with_the_model_unchanged(small_state, bad, words):
    state = dict(small_state)
    state["classifier.1.weight"] = bad(state["classifier.1.weight"])  # the last tensor the load copies
    net = _small()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(model.CheckpointMismatchError, match="nothing was loaded") as info:
        model.load_checkpoint(net, state)
    assert words in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_loading_into_a_model_on_the_meta_device_is_refused_not_a_silent_no_op(small_state):
    with torch.device("meta"):
        net = _small()
    with pytest.raises(ValueError, match=r"the model's tensors are on the meta device .*model\.to_empty"):
        model.load_checkpoint(net, small_state)


# ---- the fused model's folded-BatchNorm caches follow every change ------------------------------------------------

def test_fused_model_follows_loads_in_place_changes_and_conversions(small_state):
    torch.manual_seed(8)
    plain, fused = _small(), _small(fused=True)
    x = torch.randn(2, 3, 33, 33)

    def check(tol=1e-5):
        _assert_same_outputs(_outputs(fused, x.to(next(fused.parameters()).dtype)),
                             _outputs(plain, x.to(next(plain.parameters()).dtype)), tol)

    fused.eval()
    fused(x)  # caches built from the initial weights
    for net in (plain, fused):
        net.load_state_dict(small_state)
    check()
    other = randomize_batchnorm(_small()).state_dict()
    for net in (plain, fused):
        model.load_checkpoint(net, other)
    check()
    with torch.no_grad():
        for net in (plain, fused):
            net.backbone.bn1.weight.mul_(1.5)
            net.classifier[0].project[1].running_var.mul_(2)
            net.aux_classifier[1].bias.add_(0.3)
    check()
    for net in (plain, fused):
        net.train().eval().requires_grad_(False)
        with torch.no_grad():
            net.backbone.layer2[0].bn1.weight.mul_(0.7)
    check()
    for net in (plain, fused):
        net.double()
        with torch.no_grad():
            net.backbone.layer3[0].bn2.bias.add_(0.1)
    check(tol=1e-10)
    for net in (plain, fused):
        net.to(torch.float32).to(memory_format=torch.channels_last)
        net.load_state_dict(small_state)
    check()
    for net in (plain, fused):
        net.load_state_dict(copy.deepcopy(other), assign=True)
    check()


# ---- factories and CLI --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"multi_grid": {4, 1, 2}}, r"multi_grid must be an ordered sequence of positive ints .*got a set \{1, 2, 4\}"),
    ({"atrous_rates": {18, 6, 12}}, r"atrous_rates must be an ordered sequence .*got a set"),
    ({"multi_grid": "124"}, r"multi_grid must be a sequence of positive ints, got '124'"),
])
def test_unordered_or_string_rates_are_refused_by_name(kwargs, message):
    with torch.device("meta"), pytest.raises(ValueError, match=message):
        model.deeplabv3_resnet50(**kwargs)


def test_cli_image_size_of_three_parts_says_so(capsys):
    with pytest.raises(SystemExit) as info:
        summary_main(["--summary", "--image-size", "1x1x1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --image-size: --image-size must be N or HxW (one or two sizes), got '1x1x1'" in err


def test_a_mismatch_in_a_file_names_the_file(tmp_path):
    """model.load_checkpoint / load_backbone of a file whose keys do not fit said "checkpoint does not match the
    model" without the file's name (read errors named it)."""
    net = model.deeplabv3_resnet50(num_classes=3, width=8)
    other = model.deeplabv3_resnet50(num_classes=5, width=8)
    torch.save(other.state_dict(), tmp_path / "five.pt")
    with pytest.raises(model.CheckpointMismatchError) as e:
        model.load_checkpoint(net, tmp_path / "five.pt")
    assert str(e.value).startswith(f"{tmp_path / 'five.pt'}: checkpoint does not match the model (DeepLabV3): ")
    with pytest.raises(model.CheckpointMismatchError) as e:
        model.load_checkpoint(net, other.state_dict())
    assert str(e.value).startswith("checkpoint does not match the model (DeepLabV3): ")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "resnet.pt")
    with pytest.raises(model.CheckpointMismatchError) as e:
        model.load_backbone(net, str(tmp_path / "resnet.pt"))
    assert str(e.value).startswith(f"{tmp_path / 'resnet.pt'}: checkpoint does not match the model (")
