"""deeplab_ops.fusion: fuse_modules / unfuse_modules on any model — same function, same gradients, same
side effects (running statistics, num_batches_tracked), same state_dict; torchvision's models included."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import TRITON_DEVICE, assert_close, backend_param, cuda_test, device_for, triton_test
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

from deeplab_ops import fusion, modules
from deeplab_ops.nn import fuse_modules, unfuse_modules

# float32 on CPU: the fused op normalizes with the same statistics in a different summation order.
ATOL, RTOL = 1e-5, 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-4, 1e-4


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights and BatchNorm statistics, so that eval mode is not an identity BN."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
                if m.track_running_stats:
                    m.running_mean.normal_(0.0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def _assert_same_state(a: nn.Module | dict, b: nn.Module | dict, what: str) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert list(sa) == list(sb), f"{what}: state_dict keys differ: {set(sa) ^ set(sb)}"
    for k in sa:
        if sa[k].is_floating_point():
            assert_close(sa[k], sb[k], f"{what}: {k}", ATOL, RTOL)
        else:
            assert torch.equal(sa[k], sb[k]), f"{what}: {k}: {sa[k]} != {sb[k]}"


def _count(model: nn.Module, cls: type) -> int:
    return sum(type(m) is cls for m in model.modules())


class _Head(nn.Module):
    """A chain inside a longer Sequential (as torchvision's DeepLabHead), a downsample-like pair (no ReLU), a
    conv with a bias (not fusable), torchvision's BasicBlock, Bottleneck and ASPP, and a BN-variant zoo."""

    def __init__(self, bn_kwargs: dict) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            nn.Identity(),
            nn.Conv2d(4, 8, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(8, **bn_kwargs),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1, stride=2, bias=False),
            nn.BatchNorm2d(8, **bn_kwargs),
            nn.Conv2d(8, 8, 3, padding=1, bias=True),
            nn.BatchNorm2d(8, **bn_kwargs),
            nn.ReLU(),
        )
        self.basic = BasicBlock(8, 8)
        down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16, **bn_kwargs))
        self.bottleneck = Bottleneck(8, 4, stride=2, downsample=down, dilation=1)
        self.aspp = TorchvisionASPP(16, (1, 2), out_channels=4)
        for branch in [*self.aspp.convs, self.aspp.project]:
            i = next(i for i, m in enumerate(branch) if isinstance(m, nn.BatchNorm2d))
            branch[i] = nn.BatchNorm2d(4, **bn_kwargs)

    def forward(self, x):
        return self.aspp(self.bottleneck(self.basic(self.seq(x))))


@pytest.mark.parametrize(
    "bn_kwargs", [{}, {"momentum": None}, {"track_running_stats": False}, {"affine": False}], ids=str
)
def test_small_model_same_forward_gradients_and_running_stats(bn_kwargs):
    # float64: the fused model computes the same function, so gradients agree to float64 rounding (in float32 a
    # BatchNorm bias gradient summed over a mean-shifted batch differs by summation order alone, ~1e-3).
    plain = _randomize(_Head(bn_kwargs)).double()
    fused = fuse_modules(copy.deepcopy(plain))
    # The chain, the downsample pair and both torchvision blocks are fused; the conv with a bias is not.
    assert type(fused.seq[1]) is fusion.FusedConv2d and type(fused.seq[3]) is fusion.FusedAwayReLU
    assert type(fused.seq[4]) is fusion.FusedConv2d and type(fused.seq[6]) is nn.Conv2d
    assert type(fused.seq[7]) is nn.BatchNorm2d and type(fused.seq[8]) is nn.ReLU
    assert fusion.is_fused(fused.basic) and fusion.is_fused(fused.bottleneck)
    assert isinstance(fused.bottleneck, Bottleneck)
    # The ASPP runs on the fused ASPP op when its BatchNorms are affine (else its branches fuse as chains).
    if bn_kwargs.get("affine", True):
        assert fusion.is_fused(fused.aspp) and isinstance(fused.aspp, TorchvisionASPP)
    else:
        assert not fusion.is_fused(fused.aspp) and type(fused.aspp.convs[1][0]) is fusion.FusedConv2d
    # frozen_bn: a training model with every BatchNorm in eval mode (the fused ASPP op runs in eval BN mode).
    for step, mode in enumerate(["train", "train", "frozen_bn", "eval"]):
        for m in (plain, fused):
            m.train(mode != "eval")
            if mode == "frozen_bn":
                for bn in m.modules():
                    if isinstance(bn, nn.BatchNorm2d):
                        bn.eval()
        x = torch.randn(2, 4, 13, 11, dtype=torch.float64) + step
        xp, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)  # the same dropout mask in the ASPP's projection
        out_p = plain(xp)
        torch.manual_seed(step)
        out_f = fused(xf)
        assert_close(out_f, out_p, f"step {step} ({mode}) output", ATOL, RTOL)
        g = torch.randn_like(out_p)
        out_p.backward(g)
        out_f.backward(g)
        assert_close(xf.grad, xp.grad, f"step {step} ({mode}) grad x", GRAD_ATOL, GRAD_RTOL)
        for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
            assert_close(q.grad, p.grad, f"step {step} ({mode}) grad {name}", GRAD_ATOL, GRAD_RTOL)
            p.grad = q.grad = None
        _assert_same_state(fused, plain, f"step {step} ({mode})")


def test_torchvision_deeplabv3_fused_equals_unfused_and_unfuse_restores():
    from torchvision.models.segmentation import deeplabv3_resnet50

    model = _randomize(deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=True)).eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    n_bn = _count(model, nn.BatchNorm2d)
    x = torch.randn(1, 3, 41, 35)
    with torch.no_grad():
        expected = model(x)
        fuse_modules(model)
        # Every BatchNorm of backbone (stem included), ASPP, head and aux head is fused into its conv.
        blocks = [m for m in model.modules() if fusion.is_fused(m) and isinstance(m, Bottleneck)]
        assert len(blocks) == 16 and fusion.is_fused(model.classifier[0])  # the ASPP, on the fused ASPP op
        assert _count(model, fusion.FusedAwayBatchNorm2d) + 3 * len(blocks) + 6 == n_bn
        assert type(model.backbone.relu) is fusion.FusedAwayReLU
        state = model.state_dict()
        assert list(state) == list(keys), "fusing changed the state_dict keys"
        assert all(torch.equal(state[k], v) for k, v in keys.items()), "fusing changed state_dict values"
        got = model(x)
        for k in ("out", "aux"):
            err = ((got[k] - expected[k]).abs().max() / expected[k].abs().max()).item()
            assert err <= 1e-5, f"fused torchvision deeplabv3_resnet50 '{k}': max relative error {err:.3g} > 1e-5"
        unfuse_modules(model)
        assert not any(fusion.is_fused(m) for m in model.modules())
        assert _count(model, nn.BatchNorm2d) == n_bn and type(model.backbone.relu) is nn.ReLU
        again = model(x)
    for k in ("out", "aux"):
        assert torch.equal(again[k], expected[k]), f"unfused '{k}' differs from the original model"


def test_idempotent_and_backend_choice():
    plain = _randomize(_Head({})).eval()
    fused = fuse_modules(copy.deepcopy(plain))
    types = [type(m) for m in fused.modules()]
    fuse_modules(fused)
    assert [type(m) for m in fused.modules()] == types
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        want = plain(x)
        fuse_modules(fused, backend="reference")
        assert fusion.fused_config(fused.seq[1]).backend == "reference"
        assert fusion.fused_config(fused.aspp).backend == "reference"
        assert_close(fused(x), want, "backend='reference'", ATOL, RTOL)
        # 'auto' names the automatic choice, as in the ops and the fused modules (fuse_modules refused it)
        fuse_modules(fused, backend="auto")
        assert fusion.fused_config(fused.aspp).backend == "auto"
        assert_close(fused(x), want, "backend='auto'", ATOL, RTOL)
    unfuse_modules(fused)
    unfuse_modules(fused)
    assert [type(m) for m in fused.modules()] == [type(m) for m in plain.modules()]
    with pytest.raises(ValueError, match="backend='bogus'"):
        fuse_modules(fused, backend="bogus")
    with pytest.raises(TypeError, match="nn.Module"):
        fuse_modules(torch.zeros(1))


@triton_test
@pytest.mark.usefixtures("no_tf32")
def test_triton_backend_fuses_every_module():
    # Every backend has ASPP kernels: the triton one too (on CUDA tensors, or the Triton interpreter).
    plain = _randomize(_Head({})).eval().to(TRITON_DEVICE)
    fused = fuse_modules(copy.deepcopy(plain), backend="triton")
    assert fusion.is_fused(fused.aspp) and fusion.fused_config(fused.aspp).backend == "triton"
    assert fusion.fused_config(fused.seq[1]).backend == "triton"
    x = torch.randn(2, 4, 9, 9, device=TRITON_DEVICE)
    with torch.no_grad():
        assert_close(fused(x), plain(x), "backend='triton'", 1e-4, 1e-4)


def test_checkpoints_move_between_forms():
    a = _randomize(_Head({}))
    b = fuse_modules(_Head({}))
    b.load_state_dict(a.state_dict())  # unfused → fused
    c = _Head({})
    c.load_state_dict(b.state_dict())  # fused → unfused
    _assert_same_state(c, a, "round trip")
    assert [k for k in b.state_dict()] == [k for k in a.state_dict()]


def test_left_alone_when_not_exactly_conv_bn():
    class MyBN(nn.BatchNorm2d):
        pass

    shared_conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1, bias=False, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False), MyBN(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False, padding_mode="reflect"), nn.BatchNorm2d(4),
        shared_conv, nn.BatchNorm2d(4), nn.Sequential(shared_conv),
    )
    fuse_modules(model)
    assert not any(fusion.is_fused(m) for m in model.modules())


@pytest.mark.parametrize("inplace", [False, True], ids=["relu", "relu-inplace"])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["plain", "memory-efficient"])
def test_returned_intermediate_is_not_fused_away(inplace, memory_efficient):
    """A torchvision IntermediateLayerGetter returning a BatchNorm's output still sees that output: its conv → BN
    runs as one fused op without the ReLU (which runs on its own, in place or not), forward, gradients and running
    statistics as unfused; a returned conv output leaves its chain unfused."""
    from torchvision.models._utils import IntermediateLayerGetter

    torch.manual_seed(0)
    body = nn.Sequential()
    body.add_module("conv", nn.Conv2d(3, 4, 3, bias=False))
    body.add_module("bn", nn.BatchNorm2d(4))
    body.add_module("relu", nn.ReLU(inplace=inplace))
    body.add_module("conv2", nn.Conv2d(4, 4, 1, bias=False))
    body.add_module("bn2", nn.BatchNorm2d(4))
    body.add_module("act", nn.ReLU6(inplace=inplace))
    plain = _randomize(IntermediateLayerGetter(body, {"bn": "mid", "act": "out"})).train()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu", memory_efficient=memory_efficient)
    assert type(fused.conv) is fusion.FusedConv2d and type(fused.bn) is fusion.FusedAwayBatchNorm2d
    assert not fusion.fused_config(fused.conv).relu and type(fused.relu) is nn.ReLU
    x = torch.randn(2, 3, 7, 6)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = plain(xa), fused(xb)
    for key in ("mid", "out"):
        assert_close(b[key], a[key], f"returned {key}", ATOL, RTOL)
    (a["mid"].square().sum() + a["out"].sum()).backward()
    (b["mid"].square().sum() + b["out"].sum()).backward()
    assert_close(xb.grad, xa.grad, "input gradient", GRAD_ATOL, GRAD_RTOL)
    _assert_same_state(fused, plain, "bn returned")

    conv_kept = fuse_modules(IntermediateLayerGetter(copy.deepcopy(body), {"conv": "mid", "bn2": "out"}))
    assert type(conv_kept.conv) is nn.Conv2d and type(conv_kept.conv2) is fusion.FusedConv2d
    relu_kept = _randomize(IntermediateLayerGetter(copy.deepcopy(body), {"relu": "mid", "bn2": "out"})).eval()
    fused = fuse_modules(copy.deepcopy(relu_kept))
    assert type(fused.conv) is fusion.FusedConv2d and type(fused.relu) is fusion.FusedAwayReLU
    with torch.no_grad():
        got, want = fused(x), relu_kept(x)
    assert_close(got["mid"], want["mid"], "returned relu output", ATOL, RTOL)


def test_fused_model_deepcopies_and_pickles():
    model = fuse_modules(_randomize(_Head({})).eval())
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        want = model(x)
        copied = copy.deepcopy(model)
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        for other, what in ((copied, "deepcopy"), (loaded, "pickle")):
            assert fusion.is_fused(other.bottleneck) and type(other.seq[1]) is fusion.FusedConv2d, what
            # The fused conv's BatchNorm is the copy's own, not the original's.
            assert fusion.fused_config(other.seq[1]).bn is other.seq[2], what
            assert torch.equal(other(x), want), what
            unfuse_modules(other)
            assert type(other.bottleneck) is Bottleneck, what


def test_aspp_pooling_branch_batch_one_in_training():
    from model.aspp import ASPP

    x1 = torch.randn(1, 8, 5, 5)
    for fused in (False, True):
        aspp = ASPP(8, (1, 2), out_channels=4)
        if fused:
            fuse_modules(aspp)
        with pytest.raises(ValueError, match="batch of (at least 2|2 or more).*eval"):
            aspp(x1)
        aspp.convs[-1][2].eval()  # frozen BN in the pooling branch: batch 1 is fine
        assert aspp(x1).shape == (1, 4, 5, 5)
        aspp.eval()
        assert aspp(x1).shape == (1, 4, 5, 5)
    for backend in (None, "triton"):  # the fused ASPP op; conv_bn_relu chains (the error comes before any kernel)
        tv = fuse_modules(TorchvisionASPP(8, (1, 2), out_channels=4), backend=backend).to(device_for(backend))
        with pytest.raises(ValueError, match="batch of 2 or more"):
            tv(x1.to(device_for(backend)))


@pytest.mark.parametrize("mode", ["frozen_bn", "mixed_bn"])
def test_fused_aspp_runs_the_op_under_frozen_bn_and_the_original_under_mixed_modes(monkeypatch, mode):
    plain = _randomize(TorchvisionASPP(6, (1, 2), out_channels=4)).train()
    fused = fuse_modules(copy.deepcopy(plain))
    bns = lambda m: [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]  # noqa: E731
    for m in (plain, fused):
        for b in (bns(m) if mode == "frozen_bn" else bns(m)[:2]):
            b.eval()
    calls = []
    real = modules.aspp
    monkeypatch.setattr(modules, "aspp", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(2, 6, 9, 7)
    torch.manual_seed(0)
    want = plain(x)
    torch.manual_seed(0)
    assert_close(fused(x), want, mode, ATOL, RTOL)
    assert len(calls) == (1 if mode == "frozen_bn" else 0)
    _assert_same_state(fused, plain, mode)


def _block(cls):
    return cls(16, 16) if cls is BasicBlock else cls(16, 4)


_CHANGES = {
    "leaky relu": lambda m: setattr(m, "relu", nn.LeakyReLU(0.5)),
    "frozen bn": lambda m: setattr(m, "bn1", __import__("torchvision").ops.FrozenBatchNorm2d(m.bn1.num_features)),
    "identity bn": lambda m: setattr(m, "bn2", nn.Identity()),
    "biased conv": lambda m: setattr(m, "conv1", nn.Conv2d(16, m.conv1.out_channels, m.conv1.kernel_size,
                                                           padding=m.conv1.padding)),
    "aspp leaky relu": lambda m: m.project.__setitem__(2, nn.LeakyReLU(0.5)),
    "aspp bn eps": lambda m: m.convs[1].__setitem__(1, nn.BatchNorm2d(4, eps=0.3)),
    "aspp biased conv": lambda m: m.convs[0].__setitem__(0, nn.Conv2d(8, 4, 1)),
}


class _StandardizedConv(nn.Conv2d):
    """A weight-standardized convolution (a Conv2d subclass with its own forward)."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def _stem_conv(m):
    return _StandardizedConv(3, 4, 3, bias=False)


_CHAIN_EDITS = {
    "relu replaced": lambda m: m.__setitem__(2, nn.LeakyReLU(0.5)),
    "bn replaced": lambda m: m.__setitem__(1, nn.BatchNorm2d(4)),
    "conv replaced": lambda m: m.__setitem__(0, _stem_conv(m)),
    "conv deleted": lambda m: m.__delitem__(0) or m.insert(0, nn.Conv2d(3, 4, 3, bias=False)),
    "relu deleted": lambda m: m.__delitem__(2),
    "module inserted": lambda m: m.insert(1, nn.Identity()),
    "convert_sync_batchnorm": lambda m: nn.SyncBatchNorm.convert_sync_batchnorm(m),
    # nn.Sequential.__delitem__ gives the container a new _modules dict: a later change must still be seen
    "last deleted, conv replaced": lambda m: m.__delitem__(3) or m.__setitem__(0, _stem_conv(m)),
    # a forward set on an instance (monkeypatching; accelerate's hooks do so)
    "relu forward set": lambda m: setattr(m[2], "forward", lambda x, f=m[2].forward: f(x) * 3),
    "conv forward set": lambda m: setattr(m[0], "forward", lambda x, f=m[0].forward: f(x) + 0.5),
    # the conv changed into one the fused op does not compute
    "conv bias added": lambda m: setattr(m[0], "bias", nn.Parameter(torch.randn(4))),
    "conv reflect padding": lambda m: setattr(m[0], "padding_mode", "reflect"),
}


def _two_training_calls(plain: nn.Module, fused: nn.Module, x: torch.Tensor, what: str) -> None:
    """Two forward + backward calls of each model on x: outputs and input gradients equal (parameter gradients
    accumulate over both, for the caller to compare)."""
    for call in range(2):
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ya, yb = plain(xa), fused(xb)
        assert_close(yb, ya, f"{what}, call {call}: output", ATOL, RTOL)
        ya.square().sum().backward()
        yb.square().sum().backward()
        assert_close(xb.grad, xa.grad, f"{what}, call {call}: input gradient", GRAD_ATOL, GRAD_RTOL)


# (nn.SyncBatchNorm trains on CUDA tensors only: the unfused reference of that change runs in eval here)
@pytest.mark.parametrize("change, training", [(c, t) for c in _CHAIN_EDITS for t in (False, True)
                                              if not (t and c == "convert_sync_batchnorm")])
def test_a_chain_changed_after_fusing_computes_what_the_changed_model_computes(change, training):
    """A conv → BN → ReLU chain fused into its conv, then changed in its container (a module replaced, deleted or
    inserted; nn.SyncBatchNorm.convert_sync_batchnorm): the chain runs one module after the other, so what runs is
    what the container holds (outputs, gradients, running statistics as the same change on the unfused model);
    copies and pickles keep running fused."""
    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 1, bias=False))).train(training)
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    x = torch.randn(2, 3, 6, 6)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for copied in (copy.deepcopy(fused), torch.load(buffer, weights_only=False)):
        assert_close(copied(x), copy.deepcopy(plain)(x), "a copy of the fused chain", ATOL, RTOL)
    torch.manual_seed(1)
    _CHAIN_EDITS[change](plain)
    torch.manual_seed(1)
    _CHAIN_EDITS[change](fused)
    fused.load_state_dict(plain.state_dict())  # a new module's fresh parameters: the same in both
    plain.train(training), fused.train(training)
    _two_training_calls(plain, fused, x, change)
    for (name, pa), pb in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert_close(pb.grad, pa.grad, f"{change}: {name}.grad", GRAD_ATOL, GRAD_RTOL)
    _assert_same_state(fused, plain, change)
    unfuse_modules(fused)
    fuse_modules(fused, backend="cpu")
    with torch.no_grad():
        assert_close(fused.eval()(x), plain.eval()(x), f"{change}, fused again", ATOL, RTOL)


def _one_shot(module, seen):
    """A forward hook that records the output once and removes itself (a common probe)."""
    def hook(m, args, out):
        seen.append(out.detach().clone())
        handle.remove()
    handle = module.register_forward_hook(hook)


@pytest.mark.parametrize("part", [0, 1, 2], ids=["conv", "bn", "relu"])
def test_a_hook_that_removes_itself_mid_chain_leaves_the_chain_unfused_for_that_call(part):
    """A one-shot hook on a chain's conv, BatchNorm or ReLU: the call that runs it runs the whole chain unfused (the
    decision is made once per chain and call, not per module: the BatchNorm and ReLU were skipped after the hook on
    the conv removed itself); the next call runs fused; outputs, gradients and statistics as unfused."""
    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 1, bias=False))).train()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    seen = {"plain": [], "fused": []}
    _one_shot(plain[part], seen["plain"])
    _one_shot(fused[part], seen["fused"])
    x = torch.randn(2, 3, 6, 6)
    _two_training_calls(plain, fused, x, "one-shot hook")
    assert_close(seen["fused"][0], seen["plain"][0], "what the hook saw", ATOL, RTOL)
    _assert_same_state(fused, plain, "one-shot hook")


def test_a_chain_called_by_hand_inside_its_containers_call_computes_the_unfused_value():
    """A hook inside the container's call (on its last conv) that calls the chain's conv by hand: that call is a
    plain convolution (the container's own call does not make the conv fused anywhere else)."""
    torch.manual_seed(0)
    fused = fuse_modules(_randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                                  nn.Conv2d(4, 4, 1, bias=False))).eval(), backend="cpu")
    x = torch.randn(2, 3, 6, 6)
    got = []
    fused[3].register_forward_pre_hook(lambda m, args: got.append(fused[0](x)) and None)
    with torch.no_grad():
        fused(x)
        want = torch.nn.functional.conv2d(x, fused[0].weight)
    assert_close(got[0], want, "the conv called from a hook", ATOL, RTOL)


@pytest.mark.parametrize("layer", ["conv1", "bn1"])
def test_return_layers_changed_after_fusing_gets_the_unfused_intermediate(layer):
    """torchvision's IntermediateLayerGetter whose return_layers is changed after fusing to name a chain's conv or
    BatchNorm: that chain runs unfused, so the returned intermediate (and its gradients) are the unfused ones."""
    from torchvision.models._utils import IntermediateLayerGetter

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1, self.relu = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 1)

    torch.manual_seed(0)
    plain = _randomize(IntermediateLayerGetter(Net(), {"conv2": "out"})).train()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    assert type(fused.conv1) is fusion.FusedConv2d
    for m in (plain, fused):
        m.return_layers = {layer: "feat", "conv2": "out"}
    x = torch.randn(2, 3, 6, 6)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = plain(xa), fused(xb)
    for key in ("feat", "out"):
        assert_close(b[key], a[key], f"{layer}: {key}", ATOL, RTOL)
    (a["feat"].square().sum() + a["out"].sum()).backward()
    (b["feat"].square().sum() + b["out"].sum()).backward()
    assert_close(xb.grad, xa.grad, "input gradient", GRAD_ATOL, GRAD_RTOL)
    _assert_same_state(fused, plain, layer)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_fused_chain_sliced_or_iterated_by_hand_computes_the_unfused_values(training):
    """A slice of a fused Sequential (a VGG feature extractor cut before a ReLU, or after its conv) and its children
    called one by one compute what the unfused ones do: a fused conv runs fused only inside its container's call."""
    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU())).train(training)
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    x = torch.randn(2, 3, 7, 7)
    for cut in range(1, 7):
        assert_close(fused[:cut](x), plain[:cut](x), f"[:{cut}]", ATOL, RTOL)
    a = b = x
    for pm, fm in zip(plain, fused, strict=True):
        a, b = pm(a), fm(b)
        assert_close(b, a, f"child {type(pm).__name__} called by hand", ATOL, RTOL)
    assert_close(fused(x), plain(x), "the whole chain", ATOL, RTOL)
    _assert_same_state(fused, plain, "sliced and iterated")


def _probe(name, seen):
    def hook(module, args, out):
        seen[name] = out.detach().clone()
        return out * 2  # a hook that changes the output: the model's result follows it
    return hook


@pytest.mark.parametrize("kind", ["forward", "full backward"])
def test_a_hook_on_a_fused_chain_conv_sees_the_convolution(kind):
    """A hook on a fused chain's conv (a Grad-CAM-style probe on `downsample.0`) sees the convolution's output, as
    unfused, and what it returns is what the BatchNorm and ReLU get; a full backward hook sees the convolution's
    gradients. (It saw, and changed, the fused conv → BN → ReLU output.) The fused path resumes when it is removed."""
    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))).train()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    seen: dict = {}
    handles = []
    for name, m in (("plain", plain), ("fused", fused)):
        for i in (0, 3):
            if kind == "forward":
                handles.append(m[i].register_forward_hook(_probe(f"{name}{i}", seen)))
            else:
                handles.append(m[i].register_full_backward_hook(
                    lambda mod, gin, gout, key=f"{name}{i}": seen.__setitem__(key, gout[0].clone())))
    x = torch.randn(2, 3, 7, 6)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, want = fused(xs[0]), plain(xs[1])
    assert_close(out, want, f"{kind} hooks on the fused convs", ATOL, RTOL)
    g = torch.randn_like(want)
    out.backward(g), want.backward(g)
    assert_close(xs[0].grad, xs[1].grad, "input gradient", GRAD_ATOL, GRAD_RTOL)
    for i in (0, 3):
        assert_close(seen[f"fused{i}"], seen[f"plain{i}"], f"what the hook on conv {i} saw", GRAD_ATOL, GRAD_RTOL)
    _assert_same_state(fused, plain, f"{kind} hooks")
    for h in handles:
        h.remove()
    calls = []
    real = fusion.fused_conv_bn
    fusion.fused_conv_bn = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        assert_close(fused(x), plain(x), "hooks removed", ATOL, RTOL)
    finally:
        fusion.fused_conv_bn = real
    assert len(calls) == 2


@pytest.mark.parametrize("kind", ["fuse_modules", "FusedASPP"])
def test_aspp_with_cumulative_average_batchnorms_at_different_counts_runs_unfused(kind):
    """momentum=None BatchNorms whose num_batches_tracked differ (one frozen for a while, a checkpoint) cannot run as
    the fused op's one cumulative factor: the fused ASPP runs its children (it raised an error whose two BatchNorms
    printed alike); the functional form raises, naming the counters."""
    from deeplab_ops.nn import FusedASPP, fused_aspp_forward

    torch.manual_seed(0)
    plain = _randomize(TorchvisionASPP(4, (1, 2), out_channels=4)).train()
    plain.project[3].p = 0.0
    if kind == "FusedASPP":
        fused = FusedASPP(4, (1, 2), 4, backend="cpu")
        fused.load_state_dict(plain.state_dict())
    else:
        fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    for m in (plain, fused):
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.momentum = None
    x = torch.randn(2, 4, 6, 5)
    assert_close(fused(x), plain(x), "equal counters: the fused op", ATOL, RTOL)
    for m in (plain, fused):
        m.project[1].num_batches_tracked.fill_(7)
    for step in range(2):
        assert_close(fused(x), plain(x), f"different counters, step {step}", ATOL, RTOL)
    _assert_same_state(fused, plain, "cumulative averages")
    with pytest.raises(ValueError, match=r"num_batches_tracked: the cumulative average.*num_batches_tracked=9"):
        fused_aspp_forward(fused, x)


def test_a_conv_parametrized_after_fusing_unfuses():
    """torch.nn.utils.parametrize on a fused conv derives a class from FusedConv2d: unfuse_modules gives it back
    Conv2d as its base (the parametrization stays), so its BatchNorm is not applied twice; fusing again leaves the
    parametrized conv alone, as it does one parametrized before fusing."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2

    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())).train()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    for m in (plain, fused):
        parametrize.register_parametrization(m[0], "weight", Double())
    x = torch.randn(2, 3, 5, 5)
    assert_close(fused(x), plain(x), "parametrized fused conv", ATOL, RTOL)
    unfuse_modules(fused)
    assert not any(fusion.is_fused(m) for m in fused.modules())
    assert isinstance(fused[0], nn.Conv2d) and not isinstance(fused[0], fusion.FusedConv2d)
    assert type(fused[0]).__name__ == "ParametrizedConv2d" and parametrize.is_parametrized(fused[0], "weight")
    assert_close(fused(x), plain(x), "unfused", ATOL, RTOL)
    fuse_modules(fused, backend="cpu")
    assert_close(fused(x), plain(x), "fused again", ATOL, RTOL)
    _assert_same_state(fused, plain, "parametrized")
    # A deep copy shares the derived class: unfusing one leaves the other fused and right.
    plain2 = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
    one = fuse_modules(copy.deepcopy(plain2), backend="cpu")
    parametrize.register_parametrization(one[0], "weight", Double())
    parametrize.register_parametrization(plain2[0], "weight", Double())
    two = copy.deepcopy(one)
    assert type(two[0]) is type(one[0])
    unfuse_modules(two)
    assert isinstance(one[0], fusion.FusedConv2d) and not isinstance(two[0], fusion.FusedConv2d)
    with torch.no_grad():
        for m in (one, two):
            assert_close(m(x), plain2(x), "a deep copy unfused, the original fused", ATOL, RTOL)
    parametrize.remove_parametrizations(two[0], "weight")
    assert type(two[0]) is nn.Conv2d


def test_the_boundary_leaves_cpu_outputs_and_containers_as_they_are():
    """On CPU the channels_last boundary returns the model's own output objects (a defaultdict or a list subclass
    failed to be rebuilt: TypeError); on CUDA only containers holding a converted tensor are rebuilt."""
    import collections

    class Tagged(list):
        def __init__(self, items, tag):
            super().__init__(items)
            self.tag = tag

    Pair = collections.namedtuple("Pair", "a b")

    class M(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind = kind
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            y = self.body(x)
            if self.kind == "defaultdict":
                out = collections.defaultdict(list)
                out["out"] = y
                return out
            return {"tagged": lambda: Tagged([y], "t"), "namedtuple": lambda: Pair(y, 1), "list": lambda: [y, (y,)],
                    "dict": lambda: {"out": y}}[self.kind]()

    x = torch.randn(2, 3, 5, 5)
    for kind in ("defaultdict", "tagged", "namedtuple", "list", "dict"):
        m = M(kind)
        returned: list = []
        m.register_forward_hook(lambda mod, args, out, seen=returned: seen.append(out))  # before the boundary's
        fuse_modules(m, backend="cpu")
        out = m(x)
        assert out is returned[0], kind
    t = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    for value in (collections.defaultdict(list, a=t), Tagged([t], "t"), Pair(t, 1), [t, (t,)], {"a": t}):
        assert fusion._nchw(value) is value  # CPU tensors: nothing to convert


def _se_block():
    class SE(BasicBlock):
        def __init__(self):
            super().__init__(8, 8)
            self.gate = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            out = super().forward(x)
            return out * torch.sigmoid(self.gate(out.mean((2, 3), keepdim=True)))
    return SE()


def _scaled_block():
    class Scaled(BasicBlock):
        def forward(self, x):
            return super().forward(x) * 0.5
    return Scaled(8, 8)


def _extra_child_block():
    block = BasicBlock(8, 8)
    block.drop = nn.Dropout(0.0)
    return block


class _ReZeroBlock(nn.Module):
    """torchvision's BasicBlock names, with a learned gain on the residual branch (ReZero / LayerScale)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.downsample = nn.ReLU(inplace=True), None
        self.alpha = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) * self.alpha + x)


def _gain_aspp():
    class Gained(TorchvisionASPP):
        def __init__(self):
            super().__init__(8, (1, 2), 4)
            self.register_buffer("gain", torch.tensor(2.0))
    return Gained()


def _aspp_subclass():
    class Tapped(TorchvisionASPP):
        def forward(self, x):
            return super().forward(x) + 1
    return Tapped(8, (1, 2), 4)


@pytest.mark.parametrize("make", [_se_block, _scaled_block, _extra_child_block, _ReZeroBlock, _aspp_subclass,
                                  _gain_aspp],
                         ids=["squeeze-excitation subclass", "overridden forward", "extra child", "own parameter",
                              "ASPP subclass", "ASPP own buffer"])
def test_blocks_whose_forward_may_differ_are_left_alone(make):
    """A residual block or ASPP whose forward may compute something else than the fused one (a subclass that
    overrides its base's forward, a block with another child, or with a parameter or buffer of its own) is not
    fused as a whole (an SE block lost its gate, a ReZero block its gain, silently); its conv → BN chains still
    may be."""
    torch.manual_seed(0)
    plain = _randomize(make()).train()
    if hasattr(plain, "project"):
        plain.project[3].p = 0.0
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    assert fusion.fused_config(fused) is None
    x = torch.randn(2, 8, 6, 5)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, want = fused(xs[0]), plain(xs[1])
    assert_close(out, want, make.__name__, ATOL, RTOL)
    out.sum().backward(), want.sum().backward()
    assert_close(xs[0].grad, xs[1].grad, f"{make.__name__}: input gradient", GRAD_ATOL, GRAD_RTOL)
    _assert_same_state(fused, plain, make.__name__)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("change", list(_CHANGES))
def test_a_part_replaced_after_fusing_runs_as_the_original_does(change, training):
    """A residual block's or ASPP's part replaced after fuse_modules by one the fused op does not compute (another
    activation, a FrozenBatchNorm2d, a biased conv, BatchNorms of other settings) runs as the original module runs
    it: same output, gradients and running statistics (the block computed ReLU for a LeakyReLU, silently, and the
    ASPP did so too; a FrozenBatchNorm2d or biased conv raised)."""
    torch.manual_seed(0)
    if change.startswith("aspp"):
        plain, x = TorchvisionASPP(8, (1, 2), out_channels=4), torch.randn(2, 8, 7, 6)
        plain.project[3].p = 0.0
    else:
        plain, x = (_block(Bottleneck if "relu" in change or "frozen" in change else BasicBlock),
                    torch.randn(2, 16, 7, 6))
    plain = _randomize(plain).train(training)
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    fused(x)  # its structure seen (and cached) before the change
    plain(x)
    torch.manual_seed(1)
    for m in (plain, fused):
        _CHANGES[change](m)
    fused.load_state_dict(plain.state_dict())
    plain.train(training), fused.train(training)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, want = fused(xs[0]), plain(xs[1])
    assert_close(out, want, change, ATOL, RTOL)
    g = torch.randn_like(want)
    out.backward(g), want.backward(g)
    assert_close(xs[0].grad, xs[1].grad, f"{change}: input gradient", GRAD_ATOL, GRAD_RTOL)
    _assert_same_state(fused, plain, change)


# no_tf32: float32 gradients compared at 1e-4; on CUDA, cuDNN (both models) and the triton GEMMs would use TF32 by
# default (~1e-3 relative error each, not the same rounding on both sides).
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend", [backend_param(b) for b in ("cpu", "cuda", "triton", "reference")])
@pytest.mark.parametrize("kind", ["fuse_modules", "FusedASPP"])
def test_fused_aspp_trains_its_batchnorms_with_frozen_convolutions(backend, kind):
    """Only the BatchNorms train (every conv weight frozen, the input needs no gradient): the fused ASPP still
    builds a graph and gives torchvision's BatchNorm gradients (the per-BatchNorm parameters went to the op in a
    tuple, which torch's requires-grad test skips: no graph, no gradient, silently)."""
    from deeplab_ops.nn import FusedASPP

    device = device_for(backend)
    plain = _randomize(TorchvisionASPP(6, (1, 2), out_channels=4)).to(device).train()
    plain.project[3].p = 0.0  # no dropout: the two draw their masks differently
    if kind == "FusedASPP":
        fused = FusedASPP(6, (1, 2), 4, dropout=0.0, backend=backend).to(device)
        fused.load_state_dict(plain.state_dict())
    else:
        fused = fuse_modules(copy.deepcopy(plain), backend=backend, channels_last=False)
    for m in (plain, fused):
        for p in m.parameters():
            p.requires_grad_(p.dim() == 1)  # BatchNorm weights and biases only
    x = torch.randn(2, 6, 9, 7, device=device)
    torch.manual_seed(0)
    want = plain(x)
    torch.manual_seed(0)
    got = fused(x)
    assert got.grad_fn is not None, "no graph: the BatchNorm parameters would get no gradient"
    grad = torch.randn_like(want)
    want.backward(grad)
    got.backward(grad)
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters(), strict=True):
        if pp.requires_grad:
            assert_close(pf.grad, pp.grad, f"{backend} {kind}: grad {name}", 1e-4, 1e-4)


def _grad_stride_mismatches(net: nn.Module) -> list:
    return [(n, tuple(p.stride()), tuple(p.grad.stride())) for n, p in net.named_parameters()
            if p.grad is not None and p.grad.stride() != p.stride()]


@pytest.mark.parametrize("backend", [backend_param(b) for b in ("cpu", "cuda", "triton", "reference")])
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["", "memory_efficient"])
def test_grads_have_their_parameters_strides_in_a_channels_last_model(backend, memory_efficient):
    """A channels_last fused network (1 x 1 and 3 x 3 conv-BN-ReLU, an ASPP): every parameter's gradient has the
    parameter's own strides (1 x 1 weights included, whose channels_last strides differ from the contiguous ones
    only in size-1 dimensions), as eager PyTorch gives them; DistributedDataParallel warns "grad strides do not
    match bucket view strides" otherwise. On the cpu backend the whole DeepLabV3 too."""
    from model import deeplabv3_resnet
    from model.aspp import ASPP

    device = device_for(backend)
    torch.manual_seed(0)
    small = nn.Sequential(nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          ASPP(8, (1, 2), out_channels=4))
    cases = [(small, (2, 6, 6, 7), lambda out: out)]
    fuse_modules(small, backend=backend, memory_efficient=memory_efficient)
    assert fusion.fused_config(small[6]) is not None  # the ASPP runs on the fused op
    if backend == "cpu":
        cases.append((deeplabv3_resnet(29, num_classes=3, output_stride=8, width=8, fused=True,
                                       memory_efficient=memory_efficient), (2, 3, 33, 33), lambda out: out["out"]))
    for net, shape, pick in cases:
        net = net.to(device, memory_format=torch.channels_last)
        x = torch.randn(*shape, device=device).contiguous(memory_format=torch.channels_last)
        pick(net(x)).sum().backward()
        assert not _grad_stride_mismatches(net), _grad_stride_mismatches(net)
        assert all(p.grad is not None for p in net.parameters())


def _weight_layouts(net: nn.Module) -> dict:
    return {n: p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for n, p in net.named_parameters() if p.dim() == 4 and p.shape[-1] > 1}


def test_channels_last_boundary_leaves_cpu_models_alone():
    # The boundary is CUDA's: a CPU model's weights keep their layout, its input and output theirs.
    net = _randomize(_Head({}))
    before = {n: p.stride() for n, p in net.named_parameters()}
    fuse_modules(net, backend="cpu")
    assert {n: p.stride() for n, p in net.named_parameters()} == before
    out = net.eval()(torch.randn(2, 4, 12, 12))
    assert out.is_contiguous() and {n: p.stride() for n, p in net.named_parameters()} == before


@cuda_test
@pytest.mark.parametrize("fuse_on_cuda", [True, False], ids=["fused-on-cuda", "moved-after-fusing"])
def test_channels_last_boundary_on_cuda(fuse_on_cuda):
    # A model fused on CUDA has channels_last conv weights at once (before a DistributedDataParallel wrapper records
    # their strides); one moved there after fusing gets them on its first CUDA call. Either way the output comes
    # back NCHW and equals the unfused model's, with gradients of the weights' own strides.
    torch.manual_seed(0)
    plain = _randomize(_Head({})).cuda()
    # no dropout: it draws its mask in memory order, so a channels_last activation drops other elements than NCHW
    # (the H200 run of 2026-12-04 failed here on that alone; without it the outputs agree to 1e-6)
    plain.aspp.project[3].p = 0.0
    net = copy.deepcopy(plain) if fuse_on_cuda else copy.deepcopy(plain).cpu()
    fuse_modules(net, backend="cuda")
    assert all(_weight_layouts(net).values()) is fuse_on_cuda, _weight_layouts(net)
    net = net.cuda()
    x = torch.randn(2, 4, 12, 12, device="cuda")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        out, ref = net(x), plain(x)
        assert all(_weight_layouts(net).values()), _weight_layouts(net)
        assert out.is_contiguous()
        assert_close(out, ref, "fused model on CUDA", 1e-4, 1e-4)
        out.sum().backward()
    assert not _grad_stride_mismatches(net), _grad_stride_mismatches(net)


@pytest.mark.parametrize("part", ["bn", "relu"])
@pytest.mark.parametrize("hook", ["forward pre-hook", "full backward hook"])
def test_a_pre_or_backward_hook_on_a_fused_away_module_sees_the_unfused_values(part, hook):
    """A forward pre-hook that changes a chain's BatchNorm's (or ReLU's) input, or a full backward hook there: the
    chain runs unfused, so the hook acts where it would unfused (not after the fused BatchNorm and ReLU) and sees
    the unfused gradients; outputs, input and parameter gradients and running statistics as unfused."""
    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.Conv2d(4, 4, 1, bias=False))).train()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    seen = {}
    for name, model in (("plain", plain), ("fused", fused)):
        module = model[1] if part == "bn" else model[2]
        if hook == "forward pre-hook":
            module.register_forward_pre_hook(lambda m, args: (args[0] * 0.5 + 0.25,))
        else:
            module.register_full_backward_hook(
                lambda m, gin, gout, name=name: seen.setdefault(name, []).append((gin[0].clone(), gout[0].clone())))
    x = torch.randn(2, 3, 6, 6)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = plain(xa), fused(xb)
    assert_close(yb, ya, f"{hook} on the {part}: output", ATOL, RTOL)
    ya.square().sum().backward()
    yb.square().sum().backward()
    assert_close(xb.grad, xa.grad, "input gradient", GRAD_ATOL, GRAD_RTOL)
    for (name, pa), pb in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert_close(pb.grad, pa.grad, f"{name}.grad", GRAD_ATOL, GRAD_RTOL)
    _assert_same_state(fused, plain, hook)
    if hook == "full backward hook":
        for (gin_a, gout_a), (gin_b, gout_b) in zip(seen["plain"], seen["fused"], strict=True):
            assert_close(gin_b, gin_a, "the hook's grad_input", GRAD_ATOL, GRAD_RTOL)
            assert_close(gout_b, gout_a, "the hook's grad_output", GRAD_ATOL, GRAD_RTOL)


def test_forward_hooks_on_fused_away_and_inner_modules_still_run():
    """A hook on a chain's fused-away ReLU or BatchNorm, or on a residual block's or an ASPP's part, makes that
    chain, block or ASPP run unfused, so the hook sees the unfused value (the BatchNorm's output before the ReLU);
    hooks added after fusing behave the same; unfusing keeps them. The outputs equal the unfused model's
    throughout."""
    torch.manual_seed(0)
    plain = _randomize(_Head({})).eval()
    fused = copy.deepcopy(plain)
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, []).append(out.detach().clone())
        return hook

    relu, bn = fused.seq[3], fused.seq[2]
    relu.register_forward_hook(record("chain relu"))
    fuse_modules(fused, backend="cpu")
    assert type(fused.seq[3]) is fusion.FusedAwayReLU and fused.seq[3] is relu
    bn.register_forward_hook(record("chain bn"))  # after fusing
    x = torch.randn(2, 4, 12, 12)
    with torch.no_grad():
        want = plain(x)
        assert_close(fused(x), want, "fused model with chain hooks", ATOL, RTOL)
        expected_bn = plain.seq[2](plain.seq[1](x))
        expected_relu = plain.seq[3](expected_bn)
    assert_close(seen["chain relu"][0], expected_relu, "the chain ReLU's hook", ATOL, RTOL)
    assert_close(seen["chain bn"][0], expected_bn, "the fused-away BatchNorm's hook", ATOL, RTOL)
    for name, part in (("block bn2", fused.bottleneck.bn2), ("block relu", fused.bottleneck.relu),
                       ("aspp branch bn", fused.aspp.convs[1][1]), ("aspp pool relu", fused.aspp.convs[-1][3])):
        seen.clear()
        handle = part.register_forward_hook(record(name))
        with torch.no_grad():
            assert_close(fused(x), want, f"fused model with a hook on {name}", ATOL, RTOL)
        assert seen.get(name), f"the hook on {name} did not run"
        handle.remove()
    # the unfused values the block's hook saw: bn2's output in the unfused block
    seen.clear()
    fused.bottleneck.bn2.register_forward_hook(record("bn2"))
    plain_seen = []
    plain.bottleneck.bn2.register_forward_hook(lambda m, a, out: plain_seen.append(out.detach().clone()))
    with torch.no_grad():
        fused(x), plain(x)
    assert_close(seen["bn2"][0], plain_seen[0], "the block's bn2 hook", ATOL, RTOL)
    unfuse_modules(fused)
    assert type(fused.seq[3]) is nn.ReLU and fused.seq[3] is relu and relu._forward_hooks


def test_a_container_declaring_its_chain_forward_runs_its_stem_fused(monkeypatch):
    """model.resnet.ResNet (an nn.Sequential whose forward returns a dict, declaring deeplab_ops_chain =
    "return_layers") runs its stem conv → BN → ReLU as one fused op; the same forward unfused gives the same
    features."""
    from model.resnet import ResNet

    torch.manual_seed(0)
    plain = _randomize(ResNet(50, width=4, return_aux=True)).eval()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    calls = []
    real = fusion.fused_conv_bn
    monkeypatch.setattr(fusion, "fused_conv_bn", lambda conv, *a, **k: calls.append(conv) or real(conv, *a, **k))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = fused(x), plain(x)
    assert list(got) == list(want)
    for key in want:
        assert_close(got[key], want[key], key, ATOL, RTOL)
    assert calls and calls[0] is fused.conv1


def test_a_sequential_that_chooses_its_children_by_iter_is_left_as_it_runs():
    """An nn.Sequential subclass overriding __iter__ (nn.Sequential's forward walks iter(self)) decides what runs:
    its chains are not fused, and it computes what it did."""
    class FirstThree(nn.Sequential):
        def __iter__(self):
            return iter(list(self._modules.values())[:3])

    torch.manual_seed(0)
    plain = _randomize(FirstThree(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 1, bias=False))).eval()
    fused = fuse_modules(copy.deepcopy(plain), backend="cpu")
    assert type(fused) is FirstThree and type(fused[0]) is nn.Conv2d
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert_close(fused(x), plain(x), "FirstThree", ATOL, RTOL)
