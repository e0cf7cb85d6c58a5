"""model/: DeepLabV3 on ResNet-50/101 — torchvision compatibility (keys, dilations, function), fused vs unfused
training, output sizes, channels_last, checkpoints, configuration errors and the summary CLI.

Kept light for a 2-core CPU: one ResNet-50 pair built per module, small odd inputs for numerics, meta tensors
for the large output-size checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import randomize_batchnorm
from torch import nn

import model
from deeplab_ops import fusion
from deeplab_ops.nn import fuse_modules
from model.__main__ import main as summary_main

tv_seg = pytest.importorskip("torchvision.models.segmentation")
tv_models = pytest.importorskip("torchvision.models")

ODD_INPUT = (1, 3, 41, 35)




def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def torchvision_pair(tmp_path_factory):
    """torchvision's deeplabv3_resnet50 (random, aux head) and ours with preset="torchvision" loaded from its
    state_dict saved to a local file; plus torchvision's eval output on an odd-sized input."""
    torch.manual_seed(1234)
    tv = randomize_batchnorm(tv_seg.deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)).eval()
    path = tmp_path_factory.mktemp("ckpt") / "deeplabv3_resnet50.pth"
    torch.save(tv.state_dict(), path)
    ours = model.deeplabv3_resnet50(preset="torchvision", aux_loss=True)
    model.load_checkpoint(ours, path)
    x = torch.randn(*ODD_INPUT)
    with torch.no_grad():
        expected = tv(x)
    return tv, ours.eval(), x, expected


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_torchvision_preset_reproduces_torchvision(torchvision_pair, fused):
    tv, ours, x, expected = torchvision_pair
    net = fuse_modules(copy.deepcopy(ours)) if fused else ours
    with torch.no_grad():
        got = net(x)
    assert list(got) == ["out", "aux"]
    for k in ("out", "aux"):
        assert got[k].shape == (*ODD_INPUT[:1], 21, *ODD_INPUT[2:])
        err = _max_rel_err(got[k], expected[k])
        assert err <= 1e-5, f"preset='torchvision' ({'fused' if fused else 'unfused'}) '{k}': max relative error " \
                            f"{err:.3g} > 1e-5 against torchvision"


def test_torchvision_preset_structure_matches_torchvision_exactly():
    # Same keys in the same order, same shapes, same conv geometry (strides, dilations, paddings) module by module.
    for depth, tv_fn in ((50, tv_seg.deeplabv3_resnet50), (101, tv_seg.deeplabv3_resnet101)):
        for aux in (False, True):
            with torch.device("meta"):
                tv = tv_fn(weights=None, weights_backbone=None, aux_loss=aux)
                ours = model.deeplabv3_resnet(depth, preset="torchvision", aux_loss=aux)
            a, b = tv.state_dict(), ours.state_dict()
            assert list(a) == list(b), f"resnet{depth} aux={aux}: keys differ: {set(a) ^ set(b)}"
            assert all(a[k].shape == b[k].shape for k in a)
            tv_convs = {n: m for n, m in tv.named_modules() if isinstance(m, nn.Conv2d)}
            our_convs = {n: m for n, m in ours.named_modules() if isinstance(m, nn.Conv2d)}
            assert tv_convs.keys() == our_convs.keys()
            for n, m in tv_convs.items():
                geometry = lambda c: (c.stride, c.padding, c.dilation, c.kernel_size, c.bias is None)  # noqa: E731
                assert geometry(our_convs[n]) == geometry(m), f"resnet{depth}: {n}"
            n_params = sum(p.numel() for p in ours.parameters())
            if aux:
                weights = tv_seg.DeepLabV3_ResNet50_Weights if depth == 50 else tv_seg.DeepLabV3_ResNet101_Weights
                assert n_params == weights.DEFAULT.meta["num_params"]


def test_backbone_loads_torchvision_imagenet_resnet(torchvision_pair):
    tv, _, _, _ = torchvision_pair
    # torchvision's ImageNet resnet50 state_dict: its keys (checked on meta) with tv's random backbone values.
    with torch.device("meta"):
        imagenet_keys = list(tv_models.resnet50(weights=None).state_dict())
    state = dict(tv.backbone.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    assert sorted(state) == sorted(imagenet_keys)
    net = model.deeplabv3_resnet50(output_stride=16)
    model.load_backbone(net, {"state_dict": state})
    for k, v in tv.backbone.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[k], v), k
    with torch.device("meta"):
        keys101 = set(tv_models.resnet101(weights=None).state_dict()) - {"fc.weight", "fc.bias"}
        assert keys101 == set(model.deeplabv3_resnet101().backbone.state_dict())


def test_backbone_loads_a_state_dict_from_before_pytorch_0_4_1(tmp_path):
    # torchvision's classic ImageNet ResNet files have no num_batches_tracked (added to BatchNorm in 0.4.1), and
    # nn.BatchNorm2d loads them strictly (keeping its counter): load_backbone and load_checkpoint refused them as
    # "53 missing keys" (found by a review).
    torch.manual_seed(0)
    with torch.device("meta"):
        imagenet = tv_models.resnet50(weights=None).state_dict()
    net = model.deeplabv3_resnet50(num_classes=3)
    state = {k: torch.randn(v.shape) if v.is_floating_point() else torch.zeros(v.shape, dtype=v.dtype)
             for k, v in imagenet.items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet50-old.pth")
    model.load_backbone(net, tmp_path / "resnet50-old.pth")
    assert torch.equal(net.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(net.backbone.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    whole = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    model.load_checkpoint(model.deeplabv3_resnet50(num_classes=3), whole)
    with pytest.raises(model.CheckpointMismatchError, match=r"(?s)2 missing keys.*layer1\.0\.bn1\.running_mean"):
        model.load_backbone(net, {k: v for k, v in state.items() if k != "layer1.0.bn1.running_mean"})


def test_load_checkpoint_fine_tunes_on_other_classes_and_hints_a_whole_model_given_as_a_backbone():
    torch.manual_seed(0)
    source = model.deeplabv3_resnet50(num_classes=21, aux_loss=True, width=8)
    target = model.deeplabv3_resnet50(num_classes=5, aux_loss=True, width=8)
    head = target.classifier[1].weight.detach().clone()
    # The model's keys under ignore_prefixes keep their initialisation; one prefix may be given as a string.
    model.load_checkpoint(target, source.state_dict(), ignore_prefixes=("classifier.1.", "aux_classifier.4."))
    assert torch.equal(target.classifier[1].weight, head)
    assert torch.equal(target.backbone.conv1.weight, source.backbone.conv1.weight)
    no_aux = model.deeplabv3_resnet50(num_classes=21, width=8)
    model.load_checkpoint(no_aux, source.state_dict(), ignore_prefixes="aux_classifier.")
    assert torch.equal(no_aux.classifier[1].weight, source.classifier[1].weight)
    with pytest.raises(TypeError, match=r"ignore_prefixes must be a key prefix or a sequence of them"):
        model.load_checkpoint(no_aux, source.state_dict(), ignore_prefixes=[1])
    with pytest.raises(model.CheckpointMismatchError, match=r"whole DeepLabV3 state_dict.*load_checkpoint"):
        model.load_backbone(no_aux, source.state_dict())  # backbone.* and classifier.* keys


def test_strict_key_check_lists_missing_and_unexpected(torchvision_pair, tmp_path):
    tv, _, _, _ = torchvision_pair
    with torch.device("meta"):
        no_aux = model.deeplabv3_resnet50(preset="torchvision", aux_loss=False)
        paper = model.deeplabv3_resnet50()
    state = tv.state_dict()
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(no_aux, state)
    msg = str(info.value)
    assert "0 missing keys" in msg and "unexpected" in msg and "aux_classifier.0.weight" in msg
    assert "aux_loss=True" in msg
    with pytest.raises(model.CheckpointMismatchError) as info:
        model.load_checkpoint(paper, state)
    msg = str(info.value)
    assert "missing" in msg and "classifier.1.bias" in msg and "classifier.2.running_var" in msg
    assert "shape mismatch" in msg or "unexpected" in msg
    small = nn.Sequential(nn.Conv2d(3, 4, 1))
    wrapped = {"model": {f"module.{k}": v for k, v in small.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ddp.pth")
    other = nn.Sequential(nn.Conv2d(3, 4, 1))
    model.load_checkpoint(other, tmp_path / "ddp.pth")
    assert torch.equal(other[0].weight, small[0].weight)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing\.pth \(no such file"):
        model.load_checkpoint(other, tmp_path / "missing.pth")
    with pytest.raises(model.CheckpointMismatchError, match="load_backbone"):
        model.load_checkpoint(paper, {"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)})


@pytest.mark.parametrize("load", ["load_checkpoint", "load_backbone", "read_state_dict"])
def test_unreadable_files_are_named_with_what_is_wrong(tmp_path, load):
    """Every loader reads files through model.checkpoint.load_file (train.py's --checkpoint, --resume and
    --backbone-weights too): an empty, corrupt or non-tensor file, a folder or a missing path raises an error of its
    own type whose one-line message names the file, never torch's advice to load with weights_only=False."""
    import numpy as np

    net = nn.Sequential(nn.Conv2d(3, 4, 1))
    net.backbone = nn.Sequential(nn.Conv2d(3, 4, 1))
    call = {"load_checkpoint": lambda p: model.load_checkpoint(net, p),
            "load_backbone": lambda p: model.load_backbone(net, p),
            "read_state_dict": model.read_state_dict}[load]
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "garbage.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    (tmp_path / "zip.pth").write_bytes(b"PK\x03\x04 0123456789")
    torch.save({"w": np.zeros(3)}, tmp_path / "numpy.pth")
    (tmp_path / "folder").mkdir()
    torch.save(net.state_dict(), tmp_path / "folder" / "weights.pth")
    cases = [
        ("empty.pth", model.CheckpointReadError, "cannot read checkpoint {p}: the file is empty (0 bytes)"),
        ("garbage.pth", model.CheckpointReadError, "cannot read checkpoint {p} (500 bytes): it is corrupt or "
                                                   "truncated, or not a torch.save file (its first bytes are neither a "
                                                   "zip archive (torch.save's format) nor a pickle: an unknown "
                                                   "format)"),
        ("zip.pth", model.CheckpointReadError, "cannot read checkpoint {p} (15 bytes): it is corrupt or truncated, "
                                               "or not a torch.save file (RuntimeError: PytorchStreamReader failed "
                                               "reading zip archive: not a ZIP archive)"),
        ("numpy.pth", model.CheckpointReadError, "cannot read checkpoint {p}: it holds a pickled numpy."),
        ("folder", IsADirectoryError, "cannot read checkpoint {p}: this is a folder; give a checkpoint file in it "
                                      "(it holds weights.pth)"),
        ("missing.pth", FileNotFoundError, "checkpoint not found: {p} (no such file; checkpoints are read from "
                                           "local files)"),
    ]
    for name, exc, message in cases:
        path = tmp_path / name
        with pytest.raises(exc) as info:
            call(path)
        text = str(info.value)
        assert text.startswith(message.format(p=path)), text
        assert "weights_only" not in text and "\n" not in text, text
    # Bad input: a ValueError, and for those who caught training.checkpoint's errors, a RuntimeError too.
    assert issubclass(model.CheckpointReadError, ValueError) and issubclass(model.CheckpointReadError, RuntimeError)


def _global_rel_err(got: dict, want: dict) -> float:
    num = sum(((got[n].double() - want[n].double()) ** 2).sum() for n in want)
    return (num / sum((w.double() ** 2).sum() for w in want.values())).sqrt().item()


def test_fused_and_unfused_one_training_step():
    # ResNet-50 with the torchvision head (dropout) and the aux head: one training forward and backward on a
    # batch of 2 (an optimizer step adds nothing: it maps equal gradients to equal parameters).
    # Tolerance: the float32 gradients of this training step are ill-conditioned (training BatchNorm over few
    # values per channel, ReLU kinks): PyTorch's own float32 gradients are ~4% (relative L2 over all parameters)
    # from the float64 ones. So, as the project does for low precision, the fused float32 gradients must be about
    # as close to float64 as PyTorch's float32 are (within 2x, over all parameters: their ratio spreads 0.87-1.50
    # over seeds 0-3 at one and two threads, 1.50 at this seed with one thread), and every tensor's
    # gradient within 20% of float64's (a missing or wrong gradient path is off by ~100%). The loss and the
    # running statistics after the step are well-conditioned and compared tightly.
    torch.manual_seed(0)
    plain = model.deeplabv3_resnet50(output_stride=16, head="torchvision", aux_loss=True)
    fused = fuse_modules(copy.deepcopy(plain))
    ref = copy.deepcopy(plain).double()
    x = torch.randn(2, 3, 37, 29)
    target = torch.randint(0, 21, (2, 37, 29))
    losses, grads = [], []
    for net in (plain, fused, ref):
        torch.manual_seed(7)  # same dropout masks
        out = net(x.to(next(net.parameters()).dtype))
        loss = F.cross_entropy(out["out"], target) + 0.5 * F.cross_entropy(out["aux"], target)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.double() for n, p in net.named_parameters()})
    assert abs(losses[1] - losses[0]) <= 1e-5 * abs(losses[0]), f"fused loss {losses[1]} != unfused {losses[0]}"
    err_plain, err_fused = _global_rel_err(grads[0], grads[2]), _global_rel_err(grads[1], grads[2])
    assert err_fused <= 2.0 * err_plain + 1e-6, (
        f"fused float32 gradients are {err_fused:.3g} from float64 (relative L2), PyTorch's float32 {err_plain:.3g}"
    )
    for n, want in grads[2].items():
        err = ((grads[1][n] - want).norm() / want.norm().clamp_min(1e-30)).item()
        assert err <= 0.2, f"fused grad {n}: relative L2 error {err:.3g} against float64 > 0.2"
    # Side effects of the step: running statistics (to 1e-3 of each tensor's largest value: the image-pooling
    # branch's BatchNorm over 2 values makes the projection's input sensitive) and num_batches_tracked (exact).
    for (n, a), b in zip(plain.named_buffers(), fused.buffers(), strict=True):
        if a.is_floating_point():
            err = ((b - a).abs().max() / a.abs().max().clamp_min(1e-12)).item()
            assert err <= 1e-3, f"{n} after one step: max difference {err:.3g} of its largest value > 1e-3"
        else:
            assert torch.equal(a, b), f"{n} after one step: {b} != {a}"


def test_output_size_equals_input_size():
    # 97×129 computed for real; 321×321 and 513×513 on meta tensors (shapes only), unfused and fused.
    torch.manual_seed(0)
    net = model.deeplabv3_resnet50(output_stride=16).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 97, 129))["out"].shape == (1, 21, 97, 129)
    for os_ in (16, 8):
        with torch.device("meta"):
            net = model.deeplabv3_resnet101(output_stride=os_, aux_loss=True, num_classes=5).eval()
        for fused in (False, True):
            if fused:
                fuse_modules(net)
            for size in ((321, 321), (513, 513)):
                out = net(torch.empty(2, 3, *size, device="meta"))
                assert out["out"].shape == out["aux"].shape == (2, 5, *size), (os_, fused, size)


def test_low_resolution_logits_and_the_small_backbone():
    # forward(x, upsample=False): the logits before the bilinear resize (what upsample_cross_entropy takes).
    # A narrow network (width 16: 16..128-wide bottlenecks, 512 channels out of block 4, a 64-channel ASPP).
    torch.manual_seed(0)
    net = model.deeplabv3_resnet(29, num_classes=5, aux_loss=True, width=16).eval()
    assert net.backbone.out_channels == 512 and net.classifier[0].project[0].out_channels == 64
    x = torch.randn(1, 3, 45, 38)
    with torch.no_grad():
        full, low = net(x), net(x, upsample=False)
    for k in ("out", "aux"):
        assert low[k].shape[-2:] == (3, 3), (k, low[k].shape)
        torch.testing.assert_close(F.interpolate(low[k], size=(45, 38), mode="bilinear", align_corners=False),
                                   full[k])


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_channels_last(torchvision_pair, fused):
    _, ours, x, expected = torchvision_pair
    net = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    if fused:
        fuse_modules(net)
    with torch.no_grad():
        got = net(x.contiguous(memory_format=torch.channels_last))
    for k in ("out", "aux"):
        err = _max_rel_err(got[k], expected[k])
        assert err <= 1e-5, f"channels_last ({'fused' if fused else 'unfused'}) '{k}': relative error {err:.3g}"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"output_stride": 4}, r"output_stride must be one of \(8, 16\).*got 4"),
        ({"output_stride": 32}, r"output_stride must be one of \(8, 16\).*got 32"),
        ({"multi_grid": (1, 2)}, r"multi_grid must have one rate per unit of block 4 \(3 units\), got \(1, 2\)"),
        ({"multi_grid": (1, 0, 2)}, r"multi_grid must be positive ints"),
        ({"num_classes": 0}, r"num_classes must be an int >= 1, got 0"),
        ({"num_classes": 2.5}, r"num_classes must be an int >= 1, got 2.5"),
        ({"atrous_rates": (6, -1)}, r"atrous_rates must be a non-empty sequence of positive ints"),
        ({"atrous_rates": ()}, r"atrous_rates must be a non-empty"),
        ({"head": "deeplabv3+"}, r"head must be one of \('paper', 'torchvision'\), got 'deeplabv3\+'"),
        ({"preset": "tf"}, r"preset must be one of \(None, 'torchvision'\), got 'tf'"),
        ({"preset": "torchvision", "output_stride": 4}, r"preset='torchvision' fixes output_stride=8.*got output_st"),
        ({"preset": "torchvision", "head": "paper", "atrous_rates": (1, 2, 3)}, r"fixes atrous_rates"),
        ({"residual_unit": "v2"}, r"residual_unit must be one of"),
        ({"memory_efficient": True}, r"memory_efficient=True needs fused=True"),
        ({"width": 0}, r"width must be an int >= 1, got 0"),
        ({"preset": "torchvision", "width": 32}, r"preset='torchvision' fixes width=64"),
        # the defaults of preset=None, given explicitly, are not silently replaced by the preset's values
        ({"preset": "torchvision", "output_stride": 16}, r"fixes output_stride=8 .*got output_stride=16: leave"),
        ({"preset": "torchvision", "head": "paper"}, r"fixes head='torchvision' .*got head='paper'"),
        ({"preset": "torchvision", "multi_grid": [1, 1, 1]}, r"takes no multi_grid \(torchvision.s ResNet has none"),
        ({"preset": "torchvision", "multi_grid": [1, 2, 4]}, r"takes no multi_grid .*got multi_grid=\(1, 2, 4\)"),
        ({"preset": "torchvision", "residual_unit": "preact"}, r"fixes residual_unit='v1.5'"),
    ],
)
def test_bad_configurations_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.deeplabv3_resnet50(**kwargs)


def test_preset_accepts_its_own_values_and_unset_arguments():
    with torch.device("meta"):
        unset = model.deeplabv3_resnet50(preset="torchvision")
        spelled = model.deeplabv3_resnet50(preset="torchvision", output_stride=8, atrous_rates=(12, 24, 36),
                                           head="torchvision", residual_unit="v1.5")
        plain = model.deeplabv3_resnet50()
    assert unset.config == spelled.config
    assert (unset.config["output_stride"], unset.config["head"]) == (8, "torchvision")
    assert plain.config["output_stride"] == 16 and plain.config["head"] == "paper"
    assert plain.config["multi_grid"] == (1, 2, 4) and plain.config["residual_unit"] == "v1.5"


def test_dilations_follow_output_stride_and_multi_grid():
    assert model.stage_dilations((3, 4, 6, 3), 16, (1, 2, 4)) == [(1, (1,) * 3), (2, (1,) * 4), (2, (1,) * 6),
                                                                  (1, (2, 4, 8))]
    assert model.stage_dilations((3, 4, 23, 3), 8, (1, 2, 1)) == [(1, (1,) * 3), (2, (1,) * 4), (1, (2,) * 23),
                                                                  (1, (4, 8, 4))]
    assert model.stage_dilations((3, 4, 6, 3), 8, (1, 2, 4), "torchvision") == [
        (1, (1,) * 3), (2, (1,) * 4), (1, (1,) + (2,) * 5), (1, (2, 4, 4))]
    with torch.device("meta"):
        net = model.deeplabv3_resnet50(output_stride=8, multi_grid=(1, 2, 1))
    layer4 = net.backbone.layer4
    assert [(b.conv2.dilation, b.conv2.padding, b.conv2.stride) for b in layer4] == [
        ((4, 4), (4, 4), (1, 1)), ((8, 8), (8, 8), (1, 1)), ((4, 4), (4, 4), (1, 1))]
    assert {b.conv2.dilation for b in net.backbone.layer3} == {(2, 2)}
    assert net.classifier[0].atrous_rates == (12, 24, 36)
    assert [net.classifier[0].convs[i][0].dilation for i in (1, 2, 3)] == [(12, 12), (24, 24), (36, 36)]
    with torch.device("meta"):
        net = model.deeplabv3_resnet50(atrous_rates=(3, 6))
    assert len(net.classifier[0].convs) == 4 and net.classifier[0].project[0].in_channels == 4 * 256


def test_heads_and_return_type():
    with torch.device("meta"):
        paper = model.deeplabv3_resnet50(num_classes=3)
        tvh = model.deeplabv3_resnet50(num_classes=3, head="torchvision", aux_loss=True)
    assert [type(m) for m in paper.classifier] == [model.ASPP, nn.Conv2d]
    assert not any(isinstance(m, nn.Dropout) for m in paper.classifier.modules())
    assert [type(m) for m in tvh.classifier] == [model.ASPP, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    assert tvh.classifier[0].project[3].p == 0.5 and tvh.aux_classifier[3].p == 0.1
    x = torch.empty(2, 3, 33, 33, device="meta")
    assert list(paper.eval()(x)) == ["out"] and list(tvh.eval()(x)) == ["out", "aux"]


def test_preact_residual_unit_fuses_its_conv_bn_relu_chains():
    torch.manual_seed(0)
    net = randomize_batchnorm(model.deeplabv3_resnet50(residual_unit="preact", num_classes=4)).eval()
    unit = net.backbone.layer2[0]
    assert isinstance(unit, model.PreActBottleneck) and unit.residual.conv2.stride == (2, 2)
    fused = fuse_modules(copy.deepcopy(net))
    assert fusion.is_fused(net.classifier[0]) is False and fusion.is_fused(fused.classifier[0])  # the ASPP op
    bns = [n for n, m in fused.backbone.named_modules() if type(m) is nn.BatchNorm2d]
    # Left unfused: each unit's pre-activation BN and the final post-norm (no conv precedes them).
    assert bns and all(n.endswith("preact.bn") or n == "postnorm.bn" for n in bns), bns
    assert type(fused.backbone.layer1[0].residual.conv1) is fusion.FusedConv2d
    x = torch.randn(1, 3, 33, 25)
    with torch.no_grad():
        want, got = net(x)["out"], fused(x)["out"]
    assert got.shape == (1, 4, 33, 25)
    assert _max_rel_err(got, want) <= 1e-5


def test_fused_flag_builds_a_fused_model_with_the_same_state_dict():
    with torch.device("meta"):
        torch.manual_seed(0)
        a = model.deeplabv3_resnet50(fused=True, aux_loss=True)
        b = model.deeplabv3_resnet50(aux_loss=True)
    assert fusion.is_fused(a.backbone.layer1[0]) and type(a.backbone.conv1) is fusion.FusedConv2d
    assert fusion.is_fused(a.classifier[0]) and type(a.aux_classifier[0]) is fusion.FusedConv2d
    assert list(a.state_dict()) == list(b.state_dict())


def test_summary_cli_matches_torchvision_published_numbers(capsys):
    # torchvision publishes deeplabv3_resnet50: 42,004,074 parameters and 178.722 GFLOPS (multiply-adds) at 520.
    assert summary_main(["--summary", "--preset", "torchvision", "--aux-loss", "--image-size", "520"]) == 0
    text = capsys.readouterr().out
    total = next(line for line in text.splitlines() if line.startswith("total")).split()
    assert total[1] == "42,004,074" and total[3] == "178.722", text
    for stage in ("stem", "layer1", "layer2", "layer3", "layer4", "aspp", "head", "aux head"):
        assert any(line.startswith(stage) for line in text.splitlines()), stage
    assert summary_main(["--summary", "--backbone", "resnet101", "--output-stride", "16", "--image-size", "513"]) == 0
    assert "resnet101" in capsys.readouterr().out
    assert summary_main(["--summary", "--output-stride", "4"]) == 2
    assert "output_stride must be one of (8, 16)" in capsys.readouterr().err
    # --preset with a flag it fixes, typed with another value (the plain default included): refused, not replaced
    assert summary_main(["--summary", "--preset", "torchvision", "--output-stride", "16"]) == 2
    assert "fixes output_stride=8" in capsys.readouterr().err
    assert summary_main([]) == 2  # nothing asked: the usage and a usage error's status (it exited 0 inside --help)
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m model") and err.rstrip().endswith("nothing to do: add --summary")
    for bad in ("0", "-3", "two"):  # a usage error with the usage line, as argparse gives every flag
        with pytest.raises(SystemExit) as e:
            summary_main(["--summary", "--batch-size", bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("usage: python -m model") and "argument --batch-size:" in err
