"""Fine-tuning and deployment scenarios through the module layer (deeplab_ops/modules.py, fusion.py): each test
compares a fused model with the same unfused eager model (forward, gradients, BatchNorm running statistics and
num_batches_tracked) in a scenario that once differed or crashed."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fusion import _randomize
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

from deeplab_ops.nn import FusedASPP, fuse_modules


def _assert_same_state(fused: nn.Module, plain: nn.Module, what: str) -> None:
    sf, sp = fused.state_dict(), plain.state_dict()
    assert list(sf) == list(sp), what
    for k in sp:
        torch.testing.assert_close(sf[k], sp[k], rtol=1e-9, atol=1e-9, msg=f"{what}: {k}")


def _assert_same_in_modes(fused: nn.Module, plain: nn.Module, x: torch.Tensor, what: str,
                          modes=(True, False)) -> None:
    """Both modules called in each mode in turn (training, eval, ...): the same output and the same state after."""
    for training in modes:
        for m in (plain, fused):
            m.train(training)
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)
        _assert_same_state(fused, plain, f"{what} training={training}")


def _conv_pair(padding) -> tuple[nn.Module, nn.Module]:
    """(an eager 3 -> 4 conv -> BN -> ReLU chain, a FusedConvBNReLU with its state), float64."""
    from deeplab_ops.nn import FusedConvBNReLU

    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=padding, bias=False), nn.BatchNorm2d(4),
                                     nn.ReLU())).double()
    fused = FusedConvBNReLU(3, 4, 3, padding=padding).double()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def _aspp_pair(kind: str) -> tuple[nn.Module, nn.Module]:
    """(eager torchvision ASPP, the same ASPP fused), float64, dropout 0."""
    torch.manual_seed(0)
    plain = _randomize(TorchvisionASPP(4, (1, 2), out_channels=3)).double()
    plain.project[3].p = 0.0
    if kind == "fuse_modules":
        fused = fuse_modules(copy.deepcopy(plain))
    else:
        fused = FusedASPP(4, (1, 2), out_channels=3).double()
        fused.load_state_dict(plain.state_dict())
    return plain, fused


@pytest.mark.parametrize("kind", ["fuse_modules", "FusedASPP"])
def test_aspp_built_under_inference_mode_runs_outside_it_as_eager(kind):
    # Once wrong: a model built (or loaded) under torch.inference_mode() has inference tensors; eager runs
    # it in eval under no_grad, and trains its BatchNorms under inference_mode. The fused ASPP moved its BatchNorm
    # tensors into one storage (pack_batchnorms), which made inference tensors unusable outside inference mode:
    # every call raised "Inference tensors do not track version counter".
    with torch.inference_mode():
        plain, fused = _aspp_pair(kind)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    for m in (plain, fused):
        m.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)
    for m in (plain, fused):
        m.train()
    for step in range(2):
        with torch.inference_mode():
            torch.testing.assert_close(fused(x + step), plain(x + step), rtol=1e-9, atol=1e-9)
        _assert_same_state(fused, plain, f"training step {step} under inference_mode")
    for m in (plain, fused):
        m.eval()
    with torch.no_grad():  # the statistics learnt under inference_mode, used outside it
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)


def test_aspp_with_inference_mode_buffers_only_runs_as_eager_in_eval():
    # The same with only the BatchNorm buffers made under inference_mode (statistics loaded there into fresh
    # tensors), the parameters normal ones: eval with gradients and frozen BatchNorm fine-tuning work in the fused
    # ASPP (eager may refuse to save an inference tensor for backward; the fused op saves none).
    plain, fused = _aspp_pair("FusedASPP")
    for m in (plain, fused):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                for name, t in list(bn._buffers.items()):
                    with torch.inference_mode():
                        bn._buffers[name] = t.clone()
        m.eval()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)
    fused.train()
    fused.apply(lambda m: m.eval() if isinstance(m, nn.BatchNorm2d) else None)  # frozen BatchNorm, convs trained
    out = fused(x)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(x), rtol=1e-9, atol=1e-9)
    out.sum().backward()
    assert all(p.grad is not None for p in fused.parameters() if p.requires_grad)


def _halving_forward(module: nn.Module) -> None:
    """Set a forward on the instance, as accelerate's add_hook_to_module (device maps, offloading) or a monkeypatch
    does: module(x) runs it, not the class's forward."""
    original = module.forward

    def forward(*args, **kwargs):
        return original(*args, **kwargs) * 0.5

    module.forward = forward


def _block_model() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, Bottleneck

    down = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    return nn.Sequential(BasicBlock(4, 4), Bottleneck(4, 2, stride=2, downsample=down))


@pytest.mark.parametrize("part", ["0.conv1", "0.bn2", "0.relu", "1.conv3", "1.bn1"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_forward_set_on_a_residual_block_part_runs_as_eager(part, when):
    # Once wrong: a fused residual block computed conv → BatchNorm → ReLU itself and ignored a forward set
    # on the instance of one of its parts (fused chains and FusedConvBNReLU honour it): a silently different result.
    torch.manual_seed(0)
    plain = _randomize(_block_model()).double()
    fused = copy.deepcopy(plain)
    if when == "after":
        fuse_modules(fused)
    for m in (plain, fused):
        _halving_forward(dict(m.named_modules())[part])
    if when == "before":
        fuse_modules(fused)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_p, out_f = plain(xp), fused(xf)
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-9)
    out_p.sum().backward()
    out_f.sum().backward()
    torch.testing.assert_close(xf.grad, xp.grad, rtol=1e-9, atol=1e-9)
    _assert_same_state(fused, plain, part)


@pytest.mark.parametrize("part", ["convs.1.0", "convs.1.1", "convs.0.2", "convs.2.0", "project.1", "project.3",
                                  "convs.1"])
@pytest.mark.parametrize("kind", ["fuse_modules", "FusedASPP"])
def test_a_forward_set_on_an_aspp_part_runs_as_eager(kind, part):
    # Once wrong: the fused ASPP op ignored a forward set on the instance of a branch, conv, BatchNorm,
    # ReLU or dropout (accelerate's hooks, a monkeypatch): a silently different result.
    plain, fused = _aspp_pair(kind)
    for m in (plain, fused):
        _halving_forward(dict(m.named_modules())[part])
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    _assert_same_in_modes(fused, plain, x, f"{part}")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_a_residual_block_conv_replaced_by_one_with_asymmetric_same_padding_runs_as_eager():
    # Once wrong: a fused residual block whose conv was replaced after fusing by one with padding='same'
    # that needs asymmetric padding (an even kernel) raised the fused op's ValueError instead of running the conv
    # as the block does (fused chains and FusedConvBNReLU run it unfused).
    torch.manual_seed(0)
    plain = _randomize(_block_model()).double()
    fused = fuse_modules(copy.deepcopy(plain))
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 2, padding="same", bias=False).double()
    plain[0].conv2 = conv
    fused[0].conv2 = copy.deepcopy(conv)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-9, atol=1e-9)
    _assert_same_state(fused, plain, "same padding")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kernel", [5, 2], ids=["odd-kernel", "even-kernel"])
@pytest.mark.parametrize("kind", ["FusedConvBNReLU", "fuse_modules"])
@pytest.mark.parametrize("as_parameter", [True, False], ids=["parameter", "plain-tensor"])
def test_a_same_padding_convs_weight_replaced_by_another_kernel_size_computes_as_eager(kind, kernel, as_parameter):
    # Once wrong: padding='same' was worked out from conv.kernel_size, which a weight of another size (replaced after
    # building: surgery, a checkpoint loaded with assign=True) leaves as built, while F.conv2d pads for the weight it
    # runs. A 5x5 weight on a 3x3 'same' conv gave a smaller output silently; an even one, which needs the asymmetric
    # padding the op does not compute, ran fused with the 3x3's padding instead of running the children.
    plain, fused = _conv_pair("same")
    if kind == "fuse_modules":
        fused = fuse_modules(copy.deepcopy(plain))
    weight = torch.randn(4, 3, kernel, kernel, dtype=torch.float64) * 0.3
    for m in (plain, fused):
        if as_parameter:
            m[0].weight = nn.Parameter(weight.clone())
        else:  # a plain tensor attribute (not in _parameters)
            del m[0].weight
            m[0].weight = weight.clone()
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    _assert_same_in_modes(fused, plain, x, f"kernel {kernel}", modes=(True, False, True))


@pytest.mark.parametrize("attr, value", [("padding", [1, 1]), ("stride", [2, 2]), ("dilation", [2, 2])])
def test_a_conv_geometry_set_to_a_list_computes_as_eager(attr, value):
    # Once a crash: a conv's stride, padding or dilation set to a list after construction (nn.Conv2d and F.conv2d
    # take one) raised "unhashable type: 'list'" from the fused module's geometry cache.
    plain, fused = _conv_pair(1)
    for m in (plain, fused):
        setattr(m[0], attr, list(value))
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    _assert_same_in_modes(fused, plain, x, f"{attr}={value}")


def test_a_batchnorm_shared_by_a_fused_aspp_and_a_fused_conv_is_seen_updated_by_the_aspp():
    # Once wrong: a fused ASPP counts its BatchNorms' batches with one add through a view of the first counter, so
    # the other counters' versions did not move as each BatchNorm's own add_(1) moves it; the eval fold a
    # FusedConvBNReLU sharing one of those BatchNorms had cached (it watches the counter's version: torch's
    # batch_norm writes the statistics without a version bump) stayed that of the old statistics.
    from deeplab_ops.nn import FusedConvBNReLU

    torch.manual_seed(0)
    # float32 (float64 folds are never cached)
    fused_aspp = FusedASPP(4, (1, 2), out_channels=3, dropout=0.0)
    plain_aspp = TorchvisionASPP(4, (1, 2), out_channels=3)
    plain_aspp.project[3].p = 0.0
    plain_aspp.load_state_dict(fused_aspp.state_dict())
    plain_conv = _randomize(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3),
                                          nn.ReLU()))
    fused_conv = FusedConvBNReLU(3, 3, 3, padding=1)
    fused_conv.load_state_dict(plain_conv.state_dict())
    for aspp, conv in ((plain_aspp, plain_conv), (fused_aspp, fused_conv)):
        conv[1] = aspp.convs[2][1]  # the rate-2 branch's BatchNorm
    x, x4 = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        for conv in (plain_conv, fused_conv):
            conv.eval()
        torch.testing.assert_close(fused_conv(x), plain_conv(x), rtol=1e-5, atol=1e-5)  # the fold cached
        for aspp, conv in ((plain_aspp, plain_conv), (fused_aspp, fused_conv)):
            aspp.train()(x4 * 2 + 1)
            conv.eval()  # (the shared BatchNorm too)
        for k, v in plain_aspp.state_dict().items():
            torch.testing.assert_close(fused_aspp.state_dict()[k], v, rtol=1e-5, atol=1e-5, msg=k)
        torch.testing.assert_close(fused_conv(x), plain_conv(x), rtol=1e-5, atol=1e-5)


def test_a_same_padding_convs_spectral_norm_moves_as_eager():
    # Found by a review: working padding='same' out from the weight evaluated a parametrized weight once more per
    # call (4 evaluations per training call, 5 in eval), and spectral_norm's power iteration, which each training
    # evaluation runs, left its vectors elsewhere than eager's after a few calls.
    from torch.nn.utils.parametrizations import spectral_norm

    plain, fused = _conv_pair("same")
    for m in (plain, fused):
        spectral_norm(m[0])
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 7, dtype=torch.float64)
    _assert_same_in_modes(fused, plain, x, "spectral_norm", modes=(True, True, True, False, True))
