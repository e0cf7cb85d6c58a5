"""model/ as a user meets it — checkpoint loading (silent no-op loads,
torch.compile's key prefix, errors that name the argument and both values), the factories' argument checks, the
input check, and `python -m model` / `summarize`. Tiny networks (ResNet-29 of width 4) and meta tensors only."""

from __future__ import annotations

import warnings

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
    # With prefixes given already, the hint is what to pass: theirs and the new ones (it named only the new ones,
    # which taken literally would drop the caller's).
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=True, num_classes=21), tiny_state, ignore_prefixes="aux_classifier.")
    assert "or pass ignore_prefixes=('aux_classifier.', 'classifier.1.') to fine-tune" in str(info.value), info.value
    no_aux = {k: v for k, v in tiny_state.items() if not k.startswith("aux_classifier.")}
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=False, num_classes=3), tiny_state, ignore_prefixes="classifier.1.")
    assert ("build the model with aux_loss=True, or pass ignore_prefixes=('classifier.1.', 'aux_classifier.')"
            in str(info.value)), info.value
    model.load_checkpoint(_tiny(aux_loss=False, num_classes=3), no_aux)  # (the model loads what the hint drops)


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


def test_an_fcn_checkpoint_is_named_as_one(tiny_state):
    # torchvision's fcn_resnet50/101 head (a 3x3 conv, BN, 1x1 logits: classifier.0.weight, classifier.1.bias, no
    # classifier.2.weight) read as the 'paper' head: "build the model with head='paper'", which fails again.
    from model.heads import FCNHead

    fcn = {k: v for k, v in tiny_state.items() if not k.startswith("classifier.")}
    fcn |= {f"classifier.{k}": v for k, v in FCNHead(tiny_state["aux_classifier.0.weight"].shape[1] * 2, 3)
            .state_dict().items()}
    hint = ("hint: the checkpoint is an FCN's (torchvision's fcn_resnet50/101: a 3x3 conv head, no ASPP), not a "
            "DeepLabV3's: no head here loads it; pass ignore_prefixes=('classifier.',) to load the rest (the "
            "backbone) and keep this model's head as built")
    for head in ("paper", "torchvision"):
        net = _tiny(aux_loss=True, head=head)
        with pytest.raises(model.CheckpointMismatchError) as info:
            model.load_checkpoint(net, fcn)
        assert _hints(info.value) == [hint], info.value
        model.load_checkpoint(net, fcn, ignore_prefixes=("classifier.",))  # what the hint says loads
        assert torch.equal(net.state_dict()["backbone.conv1.weight"], fcn["backbone.conv1.weight"])
    # fine-tuning on other classes (fcn_resnet50's are 21, with an aux head): the tuple drops the aux head too (it
    # named 'classifier.' alone, which failed again on the aux logits' shape)
    for aux in (True, False):
        net = _tiny(aux_loss=aux, num_classes=5)
        with pytest.raises(model.CheckpointMismatchError) as info:
            model.load_checkpoint(net, fcn)
        assert ("pass ignore_prefixes=('classifier.', 'aux_classifier.') to load the rest (the backbone) and keep "
                "this model's heads as built") in str(info.value), info.value
        model.load_checkpoint(net, fcn, ignore_prefixes=("classifier.", "aux_classifier."))
    # a head with classifier.0.weight that is no FCN's 3x3 conv (a 1x1 classifier) is not named an FCN
    plain = {k: v for k, v in fcn.items() if not k.startswith("classifier.")} | {
        "classifier.0.weight": torch.zeros(3, fcn["classifier.0.weight"].shape[1], 1, 1),
        "classifier.0.bias": torch.zeros(3)}
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=True), plain)
    assert "FCN" not in str(info.value), info.value


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


# ---- torch.fx, wrapped models, other inputs (a new user's review, 2026-12-04) --------------------------------------

@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_symbolic_trace_of_the_model_computes_it_and_keeps_its_checks(fused, training):
    # torch.fx.symbolic_trace (and so torchvision's create_feature_extractor) failed on the model, fused or not:
    # "symbolically traced variables cannot be used as inputs to control flow" (its input and batch-1 checks, and
    # `upsample`, were Python ifs on the traced input).
    torch.manual_seed(0)
    net = _tiny(fused=fused, aux_loss=True).train(training)
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(2, 3, 33, 47)
    plain = _tiny(aux_loss=True).train(training)  # the traced graph records the unfused modules
    plain.load_state_dict(net.state_dict())
    torch.manual_seed(1)  # the same dropout masks (the auxiliary head's, in training)
    expected = plain(x)
    torch.manual_seed(1)
    with torch.no_grad():
        got = traced(x)
    for key in ("out", "aux"):
        torch.testing.assert_close(got[key], expected[key].detach(), rtol=1e-5, atol=1e-5)
    assert traced(x, False)["out"].shape == (2, 3, 3, 3)  # upsample stays an input (output stride 16: 33x47 -> 3x3)
    with pytest.raises(TypeError, match=r"x must be a floating-point image batch"):
        traced(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    if training:  # the batch-1 refusal is kept, before any BatchNorm runs
        before = {k: v.clone() for k, v in traced.state_dict().items()}
        with pytest.raises(ValueError, match=r"ASPP image-pooling branch.*batch 1"):
            traced(x[:1])
        assert all(torch.equal(before[k], v) for k, v in traced.state_dict().items())
    else:
        assert traced(x[:1])["out"].shape == (1, 3, 33, 47)


def test_batch_one_is_refused_early_with_a_forward_set_on_the_pooling_batchnorm():
    """A forward set on the pooling branch's BatchNorm instance (accelerate's hooks, monkeypatching) keeps the early
    batch-1 refusal: only a synchronized fused ASPP's hooked part (marked by deeplab_ops) is its group's to judge."""
    import functools

    from model.aspp import ASPP

    aspp = ASPP(3, (1, 2), 4).train()
    bn = aspp.convs[-1][2]
    bn.forward = functools.partial(torch.nn.BatchNorm2d.forward, bn)
    before = aspp.convs[0][1].running_mean.clone()
    with pytest.raises(ValueError, match=r"ASPP image-pooling branch.*batch 1"):
        aspp(torch.randn(1, 3, 5, 6))
    assert torch.equal(aspp.convs[0][1].running_mean, before)  # refused before any BatchNorm ran


def test_create_feature_extractor_reads_the_model_without_warnings():
    feature_extraction = pytest.importorskip("torchvision.models.feature_extraction")
    import warnings
    net = _tiny()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # train and eval graphs have the same nodes (no "subsequence" warning)
        extractor = feature_extraction.create_feature_extractor(net, ["backbone.layer4", "classifier"])
    out = extractor(torch.randn(2, 3, 32, 32))
    assert out["backbone.layer4"].shape == (2, 4 * 4 * 8, 2, 2) and out["classifier"].shape == (2, 3, 2, 2)


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_a_first_convolution_of_other_channels_is_followed(fused):
    # forward refused anything but (N, 3, H, W): a 4-channel (RGB-D) or 1-channel stem, as torchvision allows
    net = _tiny()
    net.backbone.conv1 = torch.nn.Conv2d(4, 4, 7, 2, 3, bias=False)
    if fused:
        from deeplab_ops.nn import fuse_modules
        fuse_modules(net)
    assert net.eval()(torch.randn(2, 4, 33, 33))["out"].shape == (2, 3, 33, 33)
    with pytest.raises((ValueError, RuntimeError), match=r"4 channels|channels"):
        net(torch.randn(2, 3, 33, 33))
    with pytest.raises(ValueError, match=r"x must be an \(N, C, H, W\) image batch, got shape \(3, 33, 33\)"):
        net(torch.randn(3, 33, 33))
    rows = summarize(net, (33, 33))  # counted with the model's own input channels
    assert rows[-1]["params"] > 0


def test_summarize_counts_a_model_of_any_dtype():
    # a float64 (or half) model failed: "Input type (float) and bias type (double) should be the same"
    rows = {dtype: summarize(_tiny().to(dtype), (33, 33)) for dtype in (torch.float32, torch.float64, torch.bfloat16)}
    flops = {dtype: [r["flops"] for r in r_] for dtype, r_ in rows.items()}
    assert flops[torch.float64] == flops[torch.float32] == flops[torch.bfloat16]


@pytest.mark.parametrize("wrap", ["compile", "DataParallel", "compile(DataParallel)"])
def test_wrapped_models_load_checkpoints_they_saved(tiny_state, wrap, tmp_path):
    # load_checkpoint(torch.compile(net), ...) failed with 230 missing and 230 unexpected keys, even for a file the
    # wrapped model had saved itself (the file's prefixes were removed, the model's kept); load_backbone raised a
    # TypeError for DataParallel.
    def wrapped(net):
        if wrap == "compile":
            return torch.compile(net)
        if wrap == "DataParallel":
            return torch.nn.DataParallel(net)
        return torch.compile(torch.nn.DataParallel(net))

    source = wrapped(_tiny(aux_loss=True))
    assert model.load_checkpoint(source, tiny_state) is source  # a plain state_dict into a wrapped model
    path = tmp_path / "wrapped.pt"
    torch.save(source.state_dict(), path)
    target = wrapped(_tiny(aux_loss=True))
    assert model.load_checkpoint(target, path) is target
    inner = model.unwrap_model(target)
    assert type(inner) is model.DeepLabV3
    # (with one GPU visible DataParallel moves the model there: compared on the CPU)
    assert all(torch.equal(inner.state_dict()[k].cpu(), v) for k, v in tiny_state.items())
    other = wrapped(_tiny(aux_loss=True))
    model.load_backbone(other, {k.removeprefix("backbone."): v for k, v in tiny_state.items()
                                if k.startswith("backbone.")})
    assert torch.equal(model.unwrap_model(other).backbone.conv1.weight.cpu(), tiny_state["backbone.conv1.weight"])


def test_the_torchvision_preset_refuses_other_depths_and_an_explicit_multi_grid(capsys):
    # --preset torchvision --multi-grid 1 2 4 was silently dropped (block-4 dilations 2, 4, 4); resnet29 was
    # accepted though torchvision has no such network
    with pytest.raises(ValueError, match=r"preset='torchvision' is torchvision's deeplabv3_resnet50/101: depth must"):
        model.deeplabv3_resnet(29, preset="torchvision")
    assert summary_main(["--summary", "--preset", "torchvision", "--multi-grid", "1", "2", "4"]) == 2
    assert "preset='torchvision' takes no multi_grid" in capsys.readouterr().err
    assert summary_main(["--summary", "--preset", "torchvision", "--backbone", "resnet29"]) == 2
    assert "depth must be 50 or 101, got depth=29" in capsys.readouterr().err


def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, monkeypatch):
    import zipfile
    with pytest.raises(model.CheckpointReadError, match=r"/dev/null: it is not a regular file"):
        model.load_file("/dev/null")  # was "checkpoint not found ... (no such file)"
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "hi")
    with pytest.raises(model.CheckpointReadError, match=r"\(RuntimeError: not a PyTorch archive\)"):
        model.load_file(archive)  # was "(RuntimeError: [enforce fail at inline_container.cc:180] )"
    link = tmp_path / "best.pt"
    link.symlink_to(tmp_path / "gone.pt")
    with pytest.raises(FileNotFoundError, match=r"best\.pt is a broken symbolic link"):
        model.load_file(link)
    real = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(1)}, real)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(real))
    monkeypatch.setattr(torch, "load", denied)  # as a file this user may not read fails (root reads every file)
    with pytest.raises(PermissionError, match=r"real\.pt: permission denied \(the file exists"):
        model.load_file(real)  # was "it is corrupt or truncated, or not a torch.save file (PermissionError ...)"


@pytest.mark.parametrize("bad", ["net.pt", None, {}])
def test_what_is_no_model_is_named(tiny_state, bad):
    # an AttributeError ("'str' object has no attribute 'state_dict'") for model=path, a common slip
    for load in (model.load_checkpoint, model.load_backbone, lambda m, s: model.unwrap_model(m)):
        with pytest.raises(TypeError, match=r"model must be an nn\.Module \(a DeepLabV3, wrapped or not\), got "):
            load(bad, tiny_state)


# ---- review mends: arguments of the modules, the forward, damaged files, the summary's sizes -----------------------

@pytest.mark.parametrize("rates", [{6, 12, 18}, {6: 1, 12: 2}, frozenset({6, 12})])
def test_aspp_and_head_refuse_unordered_rates_as_the_factory_does(rates):
    # ASPP(8, {6, 12, 18}, 4) built its branches in the set's iteration order (18, 12, 6), silently.
    with pytest.raises(ValueError, match=r"atrous_rates must be an ordered sequence"):
        model.ASPP(8, rates, 4)
    with pytest.raises(ValueError, match=r"atrous_rates must be an ordered sequence"):
        model.DeepLabHead(8, 3, rates)


def test_aspp_takes_numpy_rates_as_ints_and_refuses_rates_past_32_bits():
    aspp = model.ASPP(8, np.array([6, 12]), 4)
    assert aspp.atrous_rates == (6, 12) and all(type(r) is int for r in aspp.atrous_rates)
    assert [b[0].dilation for b in aspp.convs[1:-1]] == [(6, 6), (12, 12)]
    with pytest.raises(ValueError, match=r"atrous_rates must be at most 2147483647 each .*got \(6, 2147483648\)"):
        model.ASPP(8, (6, 2**31), 4)
    for bad in ("6", (6, 0), (6, 1.5), (True,), ()):
        with pytest.raises(ValueError, match=r"atrous_rates"):
            model.ASPP(8, bad, 4)


@pytest.mark.parametrize("dropout", ["0.5", None, 1.0, -0.1, float("nan"), True])
def test_aspp_refuses_a_dropout_that_is_no_probability_by_name(dropout):
    with pytest.raises(ValueError, match=rf"dropout must be a probability in \[0, 1\), got {dropout!r}"):
        model.ASPP(8, (6,), 4, dropout=dropout)


@pytest.mark.parametrize(("build", "name"), [
    (lambda: model.ASPP(0, (6,), 4), "in_channels"),
    (lambda: model.ASPP(8, (6,), 0), "out_channels"),
    (lambda: model.ASPP(8.0, (6,), 4), "in_channels"),
    (lambda: model.DeepLabHead(8, 0, (6,)), "num_classes"),
    (lambda: model.DeepLabHead(8, 3, (6,), channels=0), "channels"),
    (lambda: model.FCNHead(2, 3), "in_channels"),  # in_channels // 4 = 0 inner channels
    (lambda: model.FCNHead(8, 0), "num_classes"),
])
def test_heads_refuse_channel_counts_below_one_by_name(build, name):
    with pytest.raises(ValueError, match=rf"^{name} must be an int >= \d+, got"):
        build()


def test_deeplab_head_names_its_style_argument():
    with pytest.raises(ValueError, match=r"^style must be one of \('paper', 'torchvision'\), got 'tv'"):
        model.DeepLabHead(8, 3, (6,), style="tv")


def test_factory_refuses_sizes_past_32_bits_by_name():
    with pytest.raises(ValueError, match=r"num_classes must be at most 2147483647"):
        _tiny(num_classes=2**31)
    with pytest.raises(ValueError, match=r"width must be at most 67108863 \(layer4 has 32 x width channels"):
        _tiny(width=2**26)
    with pytest.raises(ValueError, match=r"multi_grid must keep block 4's dilations \(2 x multi_grid at output "
                                         r"stride 16\) within 32 bits"):
        _tiny(multi_grid=(1, 2, 2**30))
    assert model.deeplabv3_resnet(29, width=2, num_classes=np.int64(3)).config["num_classes"] == 3


@pytest.mark.parametrize("upsample", ["no", None, 0, 1, torch.tensor(True)])
def test_forward_upsample_must_be_a_bool(upsample):
    # upsample="no" resized (a non-empty string is true), None did not: both silently.
    net = model.deeplabv3_resnet(29, width=2).eval()
    with pytest.raises(TypeError, match=r"^upsample must be a bool, got"):
        net(torch.randn(2, 3, 17, 17), upsample=upsample)


def test_a_traced_forward_takes_upsample_as_a_bool_tensor():
    # torch.onnx.export's TorchScript exporter traces forward with its default upsample=True passed as a 0-d bool
    # tensor: the bool check refused it ("upsample must be a bool, got tensor(True)"), so the model did not export.
    # While torch.jit traces, such a tensor is taken as the bool it holds (outside tracing it stays refused, above).
    net = model.deeplabv3_resnet(29, width=2).eval()
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings
        for upsample in (True, False):
            # (strict: a dict output; no check_trace, which reruns forward untraced, as torch.onnx.export does not)
            traced = torch.jit.trace(net, (x, torch.tensor(upsample)), strict=False, check_trace=False)
            torch.testing.assert_close(traced(x, torch.tensor(upsample))["out"], net(x, upsample=upsample)["out"])


def test_an_input_of_another_dtype_than_the_weights_is_refused_naming_both_unless_autocast():
    # Unfused, PyTorch said only "expected scalar type Double but found Float".
    net = model.deeplabv3_resnet(29, width=2).eval()
    x = torch.randn(2, 3, 17, 17)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the model's weights have dtype "
                                        r"torch.float32: .*x.to\(torch.float32\) or model.to\(torch.float64\)"):
        net(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the input for the convolutions itself
        assert net(x.bfloat16())["out"].shape == (2, 21, 17, 17)
    assert net.double()(x.double())["out"].dtype == torch.float64


def _flip_a_byte_of(path, record_suffix: str, offset: int = 10) -> None:
    import struct
    import zipfile

    info = next(i for i in zipfile.ZipFile(path).infolist() if i.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_whose_tensor_bytes_changed_on_disk_is_refused_not_loaded(tiny_state, tmp_path):
    # torch.load checks no CRC: a flipped bit in a weight loaded silently, as a wrong weight.
    path = tmp_path / "flipped.pt"
    torch.save(tiny_state, path)
    _flip_a_byte_of(path, "/data/0")
    net = _tiny(aux_loss=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(model.CheckpointReadError, match=r"flipped.pt \(\d+ bytes\): it is corrupt: record "
                                                         r"'flipped/data/0' fails its CRC-32 check"):
        model.load_checkpoint(net, path)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_a_garbled_class_name_in_the_pickle_reads_as_damage_not_as_a_pickled_object(tiny_state, tmp_path):
    # A damaged data.pkl (its CRC made to match, as a copy tool that rewrote the archive would) said "it holds a
    # pickled torch., and checkpoints are read weights-only ... save the tensors alone".
    import zipfile

    source, path = tmp_path / "source.pt", tmp_path / "garbled.pt"
    torch.save(tiny_state, source)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as copy:
        for info in original.infolist():
            data = original.read(info)
            if info.filename.endswith("data.pkl"):
                at = data.index(b"ctorch\nFloatStorage")
                data = data[:at + 7] + b"\x00" * 10 + data[at + 17:]
            copy.writestr(info.filename.replace("source/", "garbled/"), data)
    with pytest.raises(model.CheckpointReadError) as info:
        model.load_checkpoint(_tiny(aux_loss=True), path)
    assert "corrupt or truncated" in str(info.value) and "pickled" not in str(info.value), str(info.value)


def test_a_state_dict_nested_two_wrappers_deep_is_pointed_to_by_its_whole_path(tiny_state, tmp_path):
    hint = r"its entry 'model' looks like one: pass checkpoint\['state_dict'\]\['model'\]"
    with pytest.raises(TypeError, match=hint):
        model.load_checkpoint(_tiny(aux_loss=True), {"state_dict": {"model": tiny_state}})
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": {"model": tiny_state}}, path)
    with pytest.raises(TypeError, match=r"pass torch.load\(PATH, weights_only=True\)\['state_dict'\]\['model'\]"):
        model.load_checkpoint(_tiny(aux_loss=True), path)


@pytest.mark.parametrize(("argv", "expected"), [
    (["--image-size", "400000000"], "an input of --batch-size 1 and --image-size 400000000x400000000 makes tensors "
                                    "too large for PyTorch's 64-bit sizes"),
    (["--batch-size", "100000000000000000000"], "argument --batch-size: must be in [1, 2**63 - 1]"),
    (["--image-size", "100000000000000000000"], "argument --image-size: --image-size must be N or HxW with sizes of "
                                                "at most 2**63 - 1"),
    (["--width", "10000000000"], "argument --width: width must be at most 67108863"),
    (["--width", "60000000"], "a model of --width 60000000 and --num-classes 21 has tensors too large"),
    (["--num-classes", "100000000000000000000"], "argument --num-classes: num_classes must be at most 2147483647"),
    (["--atrous-rates", "100000000000000000000"], "argument --atrous-rates: atrous_rates must be at most 2147483647 "
                                                  "each"),
    (["--multi-grid", "1", "2", "1000000000000"], "argument --multi-grid: multi_grid must keep block 4's dilations"),
])
def test_summary_of_sizes_past_pytorchs_arithmetic_is_a_usage_error_naming_the_flag(argv, expected, capsys):
    # each ended in a RuntimeError / TypeError traceback from PyTorch's C++ (exit 1)
    try:
        status = summary_main(["--summary", *argv])
    except SystemExit as e:  # argparse's own errors (a type= check)
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and expected in err and "Traceback" not in err, err


def test_a_wrapper_prefix_on_an_aux_checkpoint_gives_no_false_aux_head_hint(tiny_state):
    # every key under "net.": the hints said "the model has an auxiliary head that the checkpoint lacks: build it
    # with aux_loss=False" (the checkpoint has net.aux_classifier.*) before the prefix hint
    state = {"net." + k: v for k, v in tiny_state.items()}
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=True), state)
    hints = _hints(info.value)
    assert not any("auxiliary head" in h for h in hints), hints
    assert any("with a 'net.' prefix" in h for h in hints), hints
    # a checkpoint that truly lacks the head still gets it
    plain = {k: v for k, v in tiny_state.items() if not k.startswith("aux_classifier.")}
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(_tiny(aux_loss=True), plain)
    assert any("the checkpoint lacks: build it with aux_loss=False" in h for h in _hints(info.value))


def test_summary_into_a_reader_that_stops_early_ends_quietly():
    # `python -m model --summary | head -1`: a BrokenPipeError traceback when head had gone before the table was
    # written (the benchmark scripts already end quietly there)
    import subprocess
    import sys

    from helpers import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "model", "--summary", "--backbone", "resnet29"], cwd=str(ROOT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_the_lower_level_builders_take_ints_as_the_factory_does():
    """model.ResNet(50.0) built a ResNet-50 the factory refuses (a float depth was kept as one), and
    stage_dilations / ResNet refused numpy integers that model/checks.py and the factory take as ints."""
    with pytest.raises(ValueError, match=r"depth must be one of \(29, 50, 101\), got 50\.0"), torch.device("meta"):
        model.ResNet(50.0, width=4)
    stages = model.stage_dilations(np.array([3, 4, 6, 3]), np.int64(16), np.array([1, 2, 4]))
    assert stages == model.stage_dilations([3, 4, 6, 3], 16, [1, 2, 4])
    assert all(type(v) is int for stride, rates in stages for v in (stride, *rates))
    with torch.device("meta"):
        net = model.ResNet(np.int64(29), output_stride=np.int64(8), width=np.int32(4))
    assert net.conv1.out_channels == 4 and type(net.conv1.out_channels) is int


def test_one_batchnorm_counter_missing_is_a_missing_key(tiny_state):
    """The exemption for BatchNorm counters is for state_dicts of before PyTorch 0.4.1, which have none: one
    missing from a state_dict that holds the others loaded without a word (that BatchNorm kept its own count)."""
    net = _tiny(aux_loss=True)
    key = next(k for k in tiny_state if k.endswith("num_batches_tracked"))
    with pytest.raises(model.CheckpointMismatchError, match=rf"(?s)1 missing keys.*{key}"):
        model.load_checkpoint(net, {k: v for k, v in tiny_state.items() if k != key})
    old = {k: v for k, v in tiny_state.items() if not k.endswith("num_batches_tracked")}
    model.load_checkpoint(net, old)  # a file of the old format: every counter absent, loaded


def test_a_safetensors_file_a_text_file_and_a_non_path_are_named(tmp_path):
    """load_file called a safetensors file corrupt ("… safetensors is not installed"), a text file "not a torch.save
    file (KeyError: 101)", and load_file(3) raised os.fspath's TypeError without naming the argument."""
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "w.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    with pytest.raises(model.CheckpointReadError, match=r"it is a safetensors file.*safetensors\.torch\.load_file"):
        model.load_file(tmp_path / "w.safetensors")
    (tmp_path / "notes.pt").write_text("epoch 3: loss 0.41\n")
    with pytest.raises(model.CheckpointReadError, match=r"not a torch\.save file \(its first bytes are neither a zip "
                                                         r"archive \(torch\.save's format\) nor a pickle: it reads as "
                                                         r"text\)$"):
        model.load_file(tmp_path / "notes.pt")
    with pytest.raises(TypeError, match=r"path must be a file path \(a str, bytes or os\.PathLike\), got int 3"):
        model.load_file(3)
