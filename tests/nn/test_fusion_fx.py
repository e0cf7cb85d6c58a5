"""fuse_modules applied to models users already have: blocks named like torchvision's that compute something else,
and torch.fx symbolic tracing (torchvision's create_feature_extractor) of fused models and modules. The oracle is
the same model unfused: forward, every gradient, the BatchNorm state."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close
from test_fusion import _randomize
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.models.resnet import BasicBlock, Bottleneck, resnet18
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

import model
from deeplab_ops import fusion
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, fuse_modules

TOL = 1e-10  # float64


def _assert_same_training(plain: nn.Module, fused: nn.Module, x: torch.Tensor, what: str, steps: int = 2) -> None:
    """Training steps (forward, every gradient, running statistics and counters), then eval, fused vs plain."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (plain, fused)]
    for step in range(steps):
        outs = []
        for m, opt in zip((plain, fused), opts, strict=True):
            m.train()
            opt.zero_grad()
            out = m(x)
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
            outs.append(out)
        assert_close(outs[1], outs[0], f"{what}: step {step} output", TOL, TOL)
        for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
            assert_close(q.grad, p.grad, f"{what}: step {step} grad {name}", TOL, TOL)
        for (name, b), c in zip(plain.named_buffers(), fused.buffers(), strict=True):
            if b.is_floating_point():
                assert_close(c, b, f"{what}: step {step} {name}", TOL, TOL)
            else:
                assert torch.equal(c, b), f"{what}: step {step} {name}"
        for opt in opts:
            opt.step()
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert_close(fused(x), plain(x), f"{what}: eval output", TOL, TOL)


# ---- blocks named like torchvision's whose forward computes something else ----------------------------------


class _PreActBasicBlock(nn.Module):
    """bearpaw/pytorch-classification's pre-activation BasicBlock (models/cifar/preresnet.py): torchvision's
    attribute names (conv1, bn1, conv2, bn2, relu, downsample), but BN → ReLU → conv and no ReLU after the add."""

    def __init__(self, inplanes: int, planes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.downsample = None

    def forward(self, x):
        residual = x
        out = self.bn1(x)
        out = self.relu(out)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return out


class _ReluBeforeAdd(nn.Module):
    """torchvision's names; the last ReLU applied before the add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu, self.downsample = nn.ReLU(inplace=True), None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out))) + x


class _DropPathInTraining(nn.Module):
    """torchvision's names and forward, plus a branch taken in training only (a stochastic-depth scale read from a
    plain attribute): fused, training would lose it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu, self.downsample = nn.ReLU(inplace=True), None
        self.survival = 0.5

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.training:
            out = out * self.survival
        return self.relu(out + x)


class _MMStyleBasicBlock(nn.Module):
    """mmcv/mmseg's BasicBlock layout: the norms registered as bn1/bn2 and read through properties, the add in an
    inner function behind a checkpoint switch: the same function as torchvision's, fused."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm1_name, self.norm2_name = "bn1", "bn2"
        self.add_module(self.norm1_name, nn.BatchNorm2d(c))
        self.add_module(self.norm2_name, nn.BatchNorm2d(c))
        self.relu, self.downsample, self.with_cp = nn.ReLU(inplace=True), None, False

    @property
    def norm1(self):
        return getattr(self, self.norm1_name)

    @property
    def norm2(self):
        return getattr(self, self.norm2_name)

    def forward(self, x):
        def _inner_forward(x):
            identity = x
            out = self.relu(self.norm1(self.conv1(x)))
            out = self.norm2(self.conv2(out))
            if self.downsample is not None:
                identity = self.downsample(x)
            out += identity
            return out

        out = torch.utils.checkpoint.checkpoint(_inner_forward, x) if self.with_cp and x.requires_grad else (
            _inner_forward(x))
        return self.relu(out)


@pytest.mark.parametrize("make", [lambda: nn.Sequential(_PreActBasicBlock(4, 4), _PreActBasicBlock(4, 4)),
                                  lambda: _ReluBeforeAdd(4), lambda: _DropPathInTraining(4)],
                         ids=["pre-activation block", "relu before the add", "training-only branch"])
def test_a_block_named_like_torchvisions_that_computes_otherwise_is_not_fused(make):
    torch.manual_seed(0)
    plain = _randomize(make()).double()
    fused = fuse_modules(copy.deepcopy(plain))
    assert not any(fusion.fused_config(m) is not None and fusion.fused_config(m).depth for m in fused.modules())
    _assert_same_training(plain, fused, torch.randn(2, 4, 6, 5, dtype=torch.float64), "block")


@pytest.mark.parametrize("make", [lambda: BasicBlock(4, 4), lambda: Bottleneck(16, 4),
                                  lambda: Bottleneck(8, 4, stride=2, downsample=nn.Sequential(
                                      nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))),
                                  lambda: model.Bottleneck(8, 2, stride=2), lambda: _MMStyleBasicBlock(4)],
                         ids=["torchvision BasicBlock", "torchvision Bottleneck", "torchvision Bottleneck downsample",
                              "model.Bottleneck", "mmcv-style BasicBlock"])
def test_blocks_that_compute_torchvisions_function_are_still_fused(make):
    torch.manual_seed(0)
    plain = _randomize(make()).double()
    fused = fuse_modules(copy.deepcopy(plain))
    assert fusion.fused_config(fused) is not None and fusion.fused_config(fused).depth in (2, 3)
    _assert_same_training(plain, fused, torch.randn(2, plain.conv1.in_channels, 6, 5, dtype=torch.float64), "block")


# ---- ASPP-shaped modules: fused as an ASPP only where their forward computes torchvision's ----------------------


def _cbr(cin, cout, k, d=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=0 if k == 1 else d, dilation=d, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class _Pool(nn.Sequential):
    """torchvision's ASPPPooling's computation in a class of its own."""

    def __init__(self, cin, cout):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        size = x.shape[-2:]
        for m in self:
            x = m(x)
        return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _ScaledPool(_Pool):
    def forward(self, x):
        return nn.functional.interpolate(self[3](self[2](self[1](self[0](x)))) * 2, size=x.shape[-2:],
                                         mode="bilinear")


class _CopiedASPP(nn.Module):
    """torchvision's ASPP's computation in a class of its own: fused."""

    def __init__(self, c, pool=_Pool):
        super().__init__()
        self.convs = nn.ModuleList([_cbr(c, c, 1), _cbr(c, c, 3, 2), pool(c, c)])
        self.project = nn.Sequential(nn.Conv2d(3 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
        res = []
        for conv in self.convs:
            res.append(conv(x))
        return self.project(torch.cat(res, dim=1))


class _ResidualASPP(_CopiedASPP):
    def forward(self, x):
        return x + super().forward(x)


class _ReversedASPP(_CopiedASPP):
    def forward(self, x):
        return self.project(torch.cat([b(x) for b in reversed(self.convs)], 1))


class _OtherForward(nn.Module):
    """The same children as _CopiedASPP, another forward (no base forward overridden: only the data flow tells)."""

    def __init__(self, c):
        super().__init__()
        self.convs = nn.ModuleList([_cbr(c, c, 1), _cbr(c, c, 3, 2), _Pool(c, c)])
        self.project = nn.Sequential(nn.Conv2d(3 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return self.project(torch.cat([self.convs[0](x), self.convs[1](x), self.convs[2](x * 2)], 1))


def _no_dropout(module: nn.Module) -> nn.Module:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # (compared step by step: the two would draw different masks)
    return module


def _aspp_fused(module: nn.Module) -> bool:
    return any(fusion._fused_class_of(m) is not None and type(m).fused_kind == "aspp" for m in module.modules())


@pytest.mark.parametrize("make", [lambda: _ResidualASPP(4), lambda: _ReversedASPP(4), lambda: _OtherForward(4),
                                  lambda: _CopiedASPP(4, pool=_ScaledPool)],
                         ids=["residual around it", "branches reversed", "one branch on 2x", "scaled pooling"])
def test_an_aspp_shaped_module_that_computes_otherwise_is_not_fused_as_an_aspp(make):
    # Before, fuse_modules fused any module with ASPP's children and ran the fused ASPP op in place of its forward
    # (a residual around it: max difference 3.7 in float32).
    torch.manual_seed(0)
    plain = _no_dropout(_randomize(nn.Sequential(make())).double())
    fused = fuse_modules(copy.deepcopy(plain))
    assert not _aspp_fused(fused)
    _assert_same_training(plain, fused, torch.randn(2, 4, 7, 6, dtype=torch.float64), "aspp")


@pytest.mark.parametrize("make", [lambda: TorchvisionASPP(4, (2, 3), 4), lambda: model.aspp.ASPP(4, (2, 3), 4),
                                  lambda: _CopiedASPP(4)], ids=["torchvision ASPP", "model ASPP", "a copied ASPP"])
def test_aspps_that_compute_torchvisions_function_are_still_fused(make):
    torch.manual_seed(0)
    plain = _no_dropout(_randomize(nn.Sequential(make())).double())
    fused = fuse_modules(copy.deepcopy(plain))
    assert _aspp_fused(fused)
    _assert_same_training(plain, fused, torch.randn(2, 4, 7, 6, dtype=torch.float64), "aspp")


# ---- forwards that write their module's state: never fused, never run at fuse time ---------------------------------


class _RecordingBlock(nn.Module):
    """A BasicBlock (torchvision's names and data flow, a class of its own) that also records its mid feature or
    counts its calls (deep supervision, feature capture): the fused forward would do neither."""

    def __init__(self, c, how):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu, self.downsample = nn.ReLU(), None
        self.how, self.feats, self.calls, self.last = how, [], 0, None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        if self.how == "append":
            self.feats.append(out)
        elif self.how == "count":
            self.calls += 1
        else:
            self.last = out
        return self.relu(self.bn2(self.conv2(out)) + x)


class _RecordingASPP(nn.Module):
    """torchvision's ASPP (a class of its own) that keeps the last input's shape."""

    def __init__(self, c):
        super().__init__()
        self.convs = nn.ModuleList([_cbr(c, c, 1), _cbr(c, c, 3, 2), _Pool(c, c)])
        self.project = nn.Sequential(nn.Conv2d(3 * c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.seen = None

    def forward(self, x):
        self.seen = x.shape
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


@pytest.mark.parametrize("make", [lambda: _RecordingBlock(4, "append"), lambda: _RecordingBlock(4, "count"),
                                  lambda: _RecordingBlock(4, "assign"), lambda: _RecordingASPP(4)],
                         ids=["block appends", "block counts", "block assigns", "aspp assigns"])
def test_a_forward_that_writes_its_module_is_not_fused_nor_run_by_fusing(make):
    # Before, the block was fused (its data flow is a BasicBlock's): fusing traced it on the user's module, leaving
    # torch.fx Proxies in its list and attribute and a count of 2, and the fused forward recorded nothing.
    torch.manual_seed(0)
    plain = _no_dropout(_randomize(nn.Sequential(make())).double())
    fused = fuse_modules(copy.deepcopy(plain))
    state = {k: v for k, v in vars(fused[0]).items() if k in ("feats", "calls", "last", "seen")}
    assert state == {k: v for k, v in vars(plain[0]).items() if k in state}, state  # untouched by fusing
    assert fusion.fused_config(fused[0]) is None or not fusion.fused_config(fused[0]).depth
    assert not _aspp_fused(fused)
    _assert_same_training(plain, fused, torch.randn(2, 4, 7, 6, dtype=torch.float64), "recording")
    a, b = vars(plain[0]), vars(fused[0])
    assert len(a.get("feats", ())) == len(b.get("feats", ())) and a.get("calls") == b.get("calls")
    assert type(a.get("last")) is type(b.get("last")) and a.get("seen") == b.get("seen")


# ---- torch.fx symbolic tracing (torchvision's create_feature_extractor) -------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_create_feature_extractor_of_a_fused_model(training):
    """A fused torchvision ResNet traces as the unfused one does (same node names) and the extracted features,
    gradients and running statistics are the unfused model's."""
    torch.manual_seed(0)
    plain = _randomize(resnet18(num_classes=3)).double().train(training)
    fused = fuse_modules(copy.deepcopy(plain))
    assert get_graph_node_names(fused) == get_graph_node_names(plain)
    nodes = {"layer2": "mid", "layer3.0.downsample.1": "down", "relu": "stem"}
    fx_plain, fx_fused = create_feature_extractor(plain, nodes), create_feature_extractor(fused, nodes)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    want, got = fx_plain(x), fx_fused(x)
    for k in want:
        assert_close(got[k], want[k], k, TOL, TOL)
    if training:
        sum(v.sum() for v in want.values()).backward()
        sum(v.sum() for v in got.values()).backward()
        for (name, p), q in zip(fx_plain.named_parameters(), fx_fused.parameters(), strict=True):
            if p.grad is not None:
                assert_close(q.grad, p.grad, name, TOL, TOL)
    for (name, b), c in zip(fx_plain.named_buffers(), fx_fused.buffers(), strict=True):
        assert_close(c.double(), b.double(), name, TOL, TOL)


def test_symbolic_trace_of_fused_modules_and_a_fused_chain():
    """FusedConvBNReLU, FusedASPP, a fused torchvision ASPP and a fused Sequential chain trace symbolically
    (torch.fx), and the traced module computes what they compute, in training and eval."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = FusedConvBNReLU(3, 4, 3, padding=1)
            self.b = FusedASPP(4, [1, 2], 4)
            self.c = TorchvisionASPP(4, [1, 2], 4)
            self.d = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.d(self.c(self.b(self.a(x))))

    torch.manual_seed(0)
    net = fuse_modules(_randomize(Net()).double())
    net.c.project[3].p = 0.0
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    for training in (True, False):
        net.train(training)
        traced = torch.fx.symbolic_trace(net)
        want = copy.deepcopy(net)
        assert_close(traced(x), want(x), f"training={training}", TOL, TOL)


def test_symbolic_trace_of_a_bare_fused_block_and_the_residual_it_left_out():
    """symbolic_trace(FusedConvBNReLU(...)) itself: its residual argument (default None) was traced as given, and the
    traced module's add failed every call without one (TypeError: Tensor + NoneType). It is now traced as left out:
    the unfused Sequential's three calls, and a residual given to the traced module is refused, not dropped (also
    after eliminate_dead_code). A module that passes a residual traces the add; a traced FusedASPP has torchvision's
    ASPP's nodes in torchvision's order."""
    torch.manual_seed(0)
    block = _randomize(FusedConvBNReLU(4, 4, 3, padding=1)).double()
    x, r = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for training in (True, False):
        block.train(training)
        traced = torch.fx.symbolic_trace(block)
        calls = [n.target for n in traced.graph.nodes if n.op == "call_module"]
        assert calls == ["0", "1", "2"] and "add" not in {n.name for n in traced.graph.nodes}
        want = copy.deepcopy(block)
        assert_close(traced(x), want(x), f"training={training}", TOL, TOL)
        traced.graph.eliminate_dead_code()
        traced.recompile()
        with pytest.raises(ValueError, match="residual: got a tensor, but this module is a torch.fx trace of a "
                                             "FusedConvBNReLU called without one"):
            traced(x, r)

    class PassesResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = block

        def forward(self, x, r):
            return self.block(x, r)

    class PassesAnOptionalResidual(PassesResidual):
        def forward(self, x, identity=None):
            return self.block(x, identity)

    for outer in (PassesResidual(), PassesAnOptionalResidual()):
        traced = torch.fx.symbolic_trace(outer)
        assert "add" in {n.name for n in traced.graph.nodes}
        assert_close(traced(x, r), copy.deepcopy(outer)(x, r), "residual", TOL, TOL)
    nodes = [[(n.op, str(n.target)) for n in torch.fx.symbolic_trace(m).graph.nodes]
             for m in (TorchvisionASPP(4, [1, 2], 4), FusedASPP(4, [1, 2], 4, dropout=0.5))]
    assert nodes[1] == nodes[0]


class _StochasticDepthBlock(nn.Module):
    """A BasicBlock (torchvision's names and data flow, a class of its own) with stochastic depth: in training it is
    skipped (the identity) when a Python or NumPy random draw is below p. Traced along one draw's branch, its graph
    looked like a BasicBlock's, and the fused forward never skipped."""

    def __init__(self, c, source):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu, self.downsample, self.source, self.p = nn.ReLU(), None, source, 0.5

    def forward(self, x):
        if self.training:
            import random

            import numpy as np

            # the legacy global generator: what such a block uses (and what fusing must leave as it was)
            draw = random.random() if self.source == "random" else float(np.random.rand())  # noqa: NPY002
            if draw < self.p:
                return x
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


@pytest.mark.parametrize("source", ["random", "numpy"])
def test_a_forward_that_draws_python_random_numbers_is_not_fused_and_fusing_draws_none(source):
    import random

    import numpy as np

    torch.manual_seed(0)
    plain = _randomize(nn.Sequential(_StochasticDepthBlock(4, source))).double()
    random.seed(7), np.random.seed(7)  # noqa: NPY002
    states = random.getstate(), np.random.get_state()  # noqa: NPY002
    fused = fuse_modules(copy.deepcopy(plain))
    assert random.getstate() == states[0] and all(
        bool((a == b).all()) if hasattr(a, "shape") else a == b
        for a, b in zip(np.random.get_state(), states[1], strict=True))  # noqa: NPY002
    assert fusion.fused_config(fused[0]) is None or not fusion.fused_config(fused[0]).depth
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    for seed in range(6):  # the same draws, the same branches: both skip, or both compute the block
        outs = []
        for m in (plain, fused):
            random.seed(seed), np.random.seed(seed)  # noqa: NPY002
            outs.append(m(x))
        assert_close(outs[1], outs[0], f"seed {seed}", TOL, TOL)
