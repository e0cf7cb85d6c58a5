"""model/ as a user meets it — checkpoint loading (silent no-op loads,
torch.compile's key prefix, errors that name the argument and both values), the factories' argument checks, the
input check, and `python -m model` / `summarize`. Tiny networks (ResNet-29 of width 4) and meta tensors only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import model
from deeplab_ops import fusion
from model.__main__ import main as summary_main
from model.__main__ import summarize


def _tiny(**kwargs) -> model.DeepLabV3:
    kwargs = {"width": 4, "num_classes": 3, **kwargs}
    return model.deeplabv3_resnet(29, **kwargs)


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(0)
    return _tiny(aux_loss=True).state_dict()


def _hints(error: BaseException) -> list[str]:
    return [line.strip() for line in str(error).splitlines() if line.strip().startswith("hint:")]


# ---- load_checkpoint ----------------------------------------------------------------------------------------------

def test_an_empty_ignore_prefix_or_one_that_drops_every_key_is_refused_not_a_silent_no_op(tiny_state):
    # ignore_prefixes="" matched every key: the whole checkpoint was dropped, nothing loaded, and no error was raised
    # (the model kept its random initialisation).
    net = _tiny(aux_loss=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"ignore_prefixes=.*empty prefix.*nothing loaded"):
        model.load_checkpoint(net, tiny_state, ignore_prefixes="")
    with pytest.raises(ValueError, match=r"ignore_prefixes=.*drops every key of the checkpoint"):
        model.load_checkpoint(net, tiny_state, ignore_prefixes=("backbone.", "classifier.", "aux_classifier."))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # a real prefix still works: the head keeps its initialisation, everything else loads
    other = _tiny(aux_loss=True, num_classes=5)
    model.load_checkpoint(other, tiny_state, ignore_prefixes=("classifier.1.", "aux_classifier.4."))
    assert torch.equal(other.state_dict()["backbone.conv1.weight"], tiny_state["backbone.conv1.weight"])


@pytest.mark.parametrize("wrapper", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_state_dicts_of_compiled_models_load(tiny_state, wrapper):
    # torch.save(torch.compile(net).state_dict()) prefixes every key with "_orig_mod." (under DDP too): it was
    # refused with 230 missing and 230 unexpected keys.
    net = _tiny(aux_loss=True, fused=True)
    model.load_checkpoint(net, {"model": {wrapper + k: v for k, v in tiny_state.items()}})
    assert all(torch.equal(net.state_dict()[k], v) for k, v in tiny_state.items())


def test_a_bytes_path_is_read_as_a_path(tiny_state, tmp_path):
    # os.PathLike and str were paths, bytes was "checkpoint state_dict must hold a state_dict ..., got bytes"
    path = tmp_path / "ck.pt"
    torch.save(tiny_state, path)
    net = _tiny(aux_loss=True)
    model.load_checkpoint(net, bytes(path))
    assert torch.equal(net.state_dict()["classifier.1.weight"], tiny_state["classifier.1.weight"])


def test_a_dict_without_a_state_dict_says_where_one_is_looked_for(tiny_state, tmp_path):
    path = tmp_path / "wrapped.pt"
    torch.save({"weights": tiny_state, "epoch": 3}, path)
    with pytest.raises(TypeError) as info:
        model.load_checkpoint(_tiny(aux_loss=True), path)
    msg = str(info.value)
    assert str(path) in msg and "holds no state_dict" in msg and "'model' or 'state_dict'" in msg, msg
    assert "'weights' (OrderedDict)" in msg and "'epoch' (int)" in msg and "[ 'weights']" not in msg, msg
    assert "its entry 'weights' looks like one" in msg, msg


def test_wrong_num_classes_names_the_argument_and_both_values(tiny_state):
    # was: "hint: a classifier's shape differs: check num_classes, head and atrous_rates" (no value named)
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=True, num_classes=21), tiny_state)
    hints = _hints(info.value)
    assert hints == [
        "hint: the checkpoint was trained for 3 classes (classifier.1.weight (3, 16, 1, 1)), the model has "
        "num_classes=21: build it with num_classes=3, or pass ignore_prefixes=('classifier.1.', 'aux_classifier.4.') "
        "to fine-tune the rest on 21 classes"], hints


def test_wrong_width_depth_head_and_rate_count_are_named(tiny_state):
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=True, width=8), tiny_state)
    assert _hints(info.value) == [
        "hint: the checkpoint's backbone has width 4 (backbone.conv1.weight (4, 3, 7, 7)), the model's width=8: "
        "build the model with width=4"]
    with torch.device("meta"):
        r50 = model.deeplabv3_resnet(50, width=4, num_classes=3, aux_loss=True)
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(r50, tiny_state)
    assert _hints(info.value) == [
        "hint: the checkpoint's backbone has (2, 2, 2, 3) units per stage (resnet29), the model's (3, 4, 6, 3) "
        "(resnet50): build the model with deeplabv3_resnet(29, ...)"]
    # torchvision's head (its deeplabv3 checkpoints) into the paper's head: was "check num_classes, head and ..."
    tv_head = _tiny(head="torchvision").state_dict()
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(), tv_head)
    assert _hints(info.value) == [
        "hint: the checkpoint has the 'torchvision' head and the model the 'paper' one: build the model with "
        "head='torchvision' (preset='torchvision' for torchvision's deeplabv3_resnet50/101 checkpoints)"]
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=True, atrous_rates=(1, 2)), tiny_state)
    assert _hints(info.value) == [
        "hint: the checkpoint's ASPP has 3 atrous rates, the model's 2 (atrous_rates=(1, 2)): build the model with "
        "3 atrous_rates (a checkpoint does not record the rates themselves)"]
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(), {})
    assert _hints(info.value) == ["hint: the checkpoint's state_dict is empty (no keys at all): it holds no weights"]


def test_load_backbone_names_the_depth_and_width_it_fits(tiny_state):
    imagenet = {k.removeprefix("backbone."): v for k, v in tiny_state.items() if k.startswith("backbone.")}
    imagenet["fc.weight"], imagenet["fc.bias"] = torch.zeros(10, 128), torch.zeros(10)
    with torch.device("meta"):
        net = model.deeplabv3_resnet(50, width=8, num_classes=3)
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_backbone(net, imagenet)
    assert _hints(info.value) == [
        "hint: the checkpoint's backbone has (2, 2, 2, 3) units per stage (resnet29), the model's (3, 4, 6, 3) "
        "(resnet50): build the model with deeplabv3_resnet(29, ...)",
        "hint: the checkpoint's backbone has width 4 (backbone.conv1.weight (4, 3, 7, 7)), the model's width=8: "
        "build the model with width=4"]


# ---- the factories and the forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    # 8.0 == 8 passed the check and was kept: config["output_stride"] == 8.0 (num_classes=2.0 is refused)
    ({"output_stride": 8.0}, r"output_stride must be one of \(8, 16\).*got 8\.0"),
    ({"output_stride": "16"}, r"output_stride must be one of \(8, 16\).*got '16'"),
])
def test_output_stride_must_be_an_int(kwargs, message):
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        _tiny(**kwargs)


def test_depth_must_be_an_int():
    # deeplabv3_resnet(50.0) built a network whose config named it "resnet50.0"
    with pytest.raises(ValueError, match=r"depth must be one of \(29, 50, 101\), got 50\.0"), torch.device("meta"):
        model.deeplabv3_resnet(50.0)


def test_numpy_integers_are_accepted_as_ints():
    # np.array([1, 2, 4]) as multi_grid was "multi_grid must be positive ints, got (np.int64(1), ...)"
    with torch.device("meta"):
        net = _tiny(output_stride=np.int64(8), multi_grid=np.array([1, 2, 4]), atrous_rates=(np.int32(3), 6))
    c = net.config
    assert (c["output_stride"], c["multi_grid"], c["atrous_rates"]) == (8, (1, 2, 4), (3, 6))
    assert all(type(v) is int for v in (c["output_stride"], *c["multi_grid"], *c["atrous_rates"]))
    assert c["stage_dilations"][3] == (1, (4, 8, 16))


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_an_integer_image_batch_is_refused_clearly(fused):
    # unfused, PyTorch said "expected scalar type Byte but found Float"
    net = _tiny(fused=fused).eval()
    with pytest.raises(TypeError, match=r"x must be a floating-point image batch .*got dtype torch\.uint8"):
        net(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


# ---- summarize and python -m model --------------------------------------------------------------------------------

def test_summarize_leaves_the_model_alone_and_counts_a_fused_one():
    # summarize(net) moved the caller's model to the meta device (its weights gone) and set it to eval; and a fused
    # model's FLOPs were not counted (the fused ops are custom ops): 1,536 of 5,993,984.
    torch.manual_seed(0)
    net = _tiny().train()
    weight = net.backbone.conv1.weight.detach().clone()
    rows = summarize(net, (64, 64))
    assert net.training and net.backbone.conv1.weight.device.type == "cpu"
    assert torch.equal(net.backbone.conv1.weight, weight)
    fused = _tiny(fused=True)
    fused_rows = summarize(fused, (64, 64))
    assert fusion.is_fused(fused.backbone.layer1[0]) and fused.backbone.conv1.weight.device.type == "cpu"
    assert [(r["stage"], r["params"], r["flops"]) for r in fused_rows] == [
        (r["stage"], r["params"], r["flops"]) for r in rows]


def test_cli_errors_name_the_flag_with_the_usage(capsys):
    # was "python -m model: error: output_stride must be ..." (the Python argument, not the flag; no usage line)
    assert summary_main(["--summary", "--output-stride", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m model")
    assert "python -m model: error: argument --output-stride: output_stride must be one of (8, 16)" in err
    assert summary_main(["--summary", "--preset", "torchvision", "--multi-grid", "1", "1", "1"]) == 2
    assert "error: argument --multi-grid: preset='torchvision' takes no multi_grid" in capsys.readouterr().err
    assert summary_main(["--summary", "--num-classes", "0"]) == 2
    assert "error: argument --num-classes: num_classes must be an int >= 1, got 0" in capsys.readouterr().err


def test_cli_width_and_wide_columns(capsys):
    # --width: train.py's CPU network (ResNet-29 of width 16) could not be summarized
    assert summary_main(["--summary", "--backbone", "resnet29", "--width", "16", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DeepLabV3 resnet29 (v1.5, width 16), output stride 16")
    with torch.device("meta"):
        params = sum(p.numel() for p in model.deeplabv3_resnet(29, width=16).parameters())
    total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert total[1] == f"{params:,}"
    assert summary_main(["--summary", "--width", "0"]) == 2
    assert "error: argument --width: width must be an int >= 1, got 0" in capsys.readouterr().err
    # at 100000x100000 px the GFLOPs and GMACs columns ran together ("3646820.0011823410.001")
    assert summary_main(["--summary", "--image-size", "100000"]) == 0
    total = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("total")).split()
    assert len(total) == 5 and float(total[2]) == pytest.approx(2 * float(total[3]), rel=1e-6), total
