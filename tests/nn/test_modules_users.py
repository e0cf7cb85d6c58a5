"""deeplab_ops.nn's modules used directly, as a user building a network of their own does: every constructor and
classmethod argument, the nn.Module protocol and BatchNorm semantics, against the eager modules they replace
(nn.Sequential(Conv2d, BatchNorm2d, ReLU), torchvision's ASPP), in float64."""

from __future__ import annotations

import copy
import io
import pickle
import re

import pytest
import torch
from helpers import TRITON_DEVICE, needs_triton
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, fuse_modules

D = torch.float64
BACKENDS = ("cpu", "reference")


def _eager_copy(fused: nn.Module) -> nn.Sequential:
    """The unfused Sequential of deep copies of a FusedConvBNReLU's children (the same parameters and buffers)."""
    return nn.Sequential(*[copy.deepcopy(child) for child in fused._modules.values()])


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-10, msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [
    {}, {"relu": False}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}, {"eps": 0.3},
    {"momentum": 1.0}, {"momentum": 0.0}, {"padding": "same", "dilation": 2}, {"padding": "valid", "stride": 2},
    {"kernel_size": (3, 1), "padding": (1, 0), "stride": (2, 1), "dilation": (1, 2)},
], ids=str)
def test_every_constructor_argument_computes_what_eager_computes(backend, kwargs):
    torch.manual_seed(0)
    args = {"kernel_size": 3, "padding": 1, **kwargs}
    fused = FusedConvBNReLU(3, 4, dtype=D, backend=backend, **args)
    eager = _eager_copy(fused)
    for training in (True, False, True):
        fused.train(training), eager.train(training)
        for n in (4, 1, 3):  # different batch sizes: the running statistics' updates differ
            x = torch.randn(n, 3, 7, 6, dtype=D)
            torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=1e-10)
    _assert_same_state(fused, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn_kwargs", [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None},
                                       {"eps": 1e-3}], ids=str)
def test_from_modules_runs_the_given_modules_as_eager(backend, bn_kwargs):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=D), nn.BatchNorm2d(4, dtype=D, **bn_kwargs)
    eager = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn), nn.ReLU())
    fused = FusedConvBNReLU.from_modules(conv, bn, backend=backend)
    assert fused[0] is conv and fused[1] is bn
    for training in (True, True, False, True):
        x = torch.randn(3, 3, 6, 6, dtype=D)
        fused.train(training), eager.train(training)
        torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=1e-10)
    _assert_same_state(fused, eager)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"backend": "gpu"}, ValueError, "backend='gpu' is not a backend"),
    ({"memory_efficient": "yes"}, TypeError, "memory_efficient must be a bool, got 'yes'"),
    ({"memory_efficient": 1}, TypeError, "memory_efficient must be a bool, got 1"),
], ids=str)
def test_from_modules_checks_backend_and_memory_efficient_when_built(kwargs, error, message):
    # As the constructor does: not at the first call, and never shown in the repr as an option it took
    # (memory_efficient='yes' was shown as memory_efficient=True).
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        FusedConvBNReLU.from_modules(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), **kwargs)


@pytest.mark.parametrize("dropout", ["0.5", None, [0.5], True])
def test_fused_aspp_names_a_dropout_that_is_not_a_number(dropout):
    # was: TypeError "'<=' not supported between instances of 'float' and 'str'", naming nothing
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got "):
        FusedASPP(4, (1, 2), 3, dropout=dropout)


def test_fused_aspp_takes_a_numpy_dropout():
    np = pytest.importorskip("numpy")
    assert FusedASPP(4, (1,), 3, dropout=np.float32(0.5)).project[3].p == pytest.approx(0.5)


@pytest.mark.parametrize("idx", [slice(None, 2), slice(0, 3), slice(1, None), slice(None, None, 2)], ids=str)
def test_a_slice_is_the_plain_sequential_of_those_children(idx):
    # nn.Sequential builds a slice as self.__class__(OrderedDict(...)): FusedConvBNReLU's constructor cannot take
    # that (TypeError: missing 'out_channels' and 'kernel_size'). The slice holds the same modules and computes what
    # the eager Sequential's slice computes.
    torch.manual_seed(0)
    fused = FusedConvBNReLU(3, 4, 3, padding=1, dtype=D)
    eager = _eager_copy(fused)
    part, eager_part = fused[idx], eager[idx]
    assert type(part) is nn.Sequential
    assert list(part._modules) == list(eager_part._modules)
    assert all(a is b for a, b in zip(part, list(fused._modules.values())[idx], strict=True))
    x = torch.randn(2, 3, 5, 5, dtype=D) if idx.start in (None, 0) else torch.randn(2, 4, 5, 5, dtype=D)
    torch.testing.assert_close(part.train()(x), eager_part.train()(x), rtol=0, atol=1e-10)
    assert isinstance(fused[0], nn.Conv2d) and isinstance(fused[-1], nn.ReLU)  # integer indexing unchanged


def test_state_dict_protocol_and_copies_match_eager():
    torch.manual_seed(0)
    fused = FusedConvBNReLU(3, 4, 3, padding=1, dtype=D)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False, dtype=D), nn.BatchNorm2d(4, dtype=D), nn.ReLU())
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in eager.named_modules()]
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in eager.named_parameters()]
    fused.load_state_dict(eager.state_dict(), strict=True)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    x = torch.randn(2, 3, 5, 5, dtype=D)
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)), torch.load(buffer, weights_only=False)):
        assert type(copied) is FusedConvBNReLU
        torch.testing.assert_close(copied.train()(x), eager.train()(x), rtol=0, atol=1e-10)
        eager.load_state_dict(fused.state_dict())  # back, for the next copy


@pytest.mark.parametrize("where", ["", "0", "1", "2"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_hooks_on_the_module_and_its_children_fire_as_eager(where, kind):
    torch.manual_seed(0)
    fused = FusedConvBNReLU(3, 4, 3, padding=1, dtype=D)
    eager = _eager_copy(fused)
    calls = []
    for model, tag in ((fused, "fused"), (eager, "eager")):
        getattr(model.get_submodule(where), f"register_{kind}_hook")(lambda *_, tag=tag: calls.append(tag))
    x = torch.randn(2, 3, 5, 5, dtype=D, requires_grad=True)
    y_fused, y_eager = fused.train()(x), eager.train()(x)
    (y_fused.sum() + y_eager.sum()).backward()
    torch.testing.assert_close(y_fused, y_eager, rtol=0, atol=1e-10)
    assert calls.count("fused") == calls.count("eager") == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_steps_partial_freezing_and_parametrizations_follow_eager(backend):
    torch.manual_seed(0)
    fused = FusedConvBNReLU(3, 4, 3, padding=1, dtype=D, backend=backend)
    eager = _eager_copy(fused)
    for model in (fused, eager):
        nn.utils.parametrizations.weight_norm(model[0])
        model[1].bias.requires_grad_(False)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fused, eager)]
    for step in range(4):
        x = torch.randn(3, 3, 5, 5, dtype=D)
        for model, opt in zip((fused, eager), opts, strict=True):
            model.train(step % 2 == 0)  # eval steps use the cached fold, which must follow the in-place updates
            opt.zero_grad()
            (model(x) ** 2).sum().backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    assert fused[1].bias.grad is None
    x = torch.randn(2, 3, 5, 5, dtype=D)
    torch.testing.assert_close(fused.eval()(x), eager.eval()(x), rtol=0, atol=1e-10)
    _assert_same_state(fused, eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_fused_aspp_follows_torchvision_aspp_through_training(backend, dropout):
    torch.manual_seed(0)
    fused = FusedASPP(4, (1, 2), 3, dropout=dropout, backend=backend).double()
    eager = ASPP(4, (1, 2), 3).double()
    eager.project[3] = nn.Dropout(dropout)
    eager.load_state_dict(fused.state_dict(), strict=True)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (fused, eager)]
    for n in (2, 3, 4):
        x = torch.randn(n, 4, 6, 5, dtype=D)
        for model, opt in zip((fused, eager), opts, strict=True):
            opt.zero_grad()
            torch.manual_seed(n)  # the same dropout mask
            (model.train()(x) ** 2).sum().backward()
            opt.step()
    x = torch.randn(2, 4, 5, 5, dtype=D)
    torch.testing.assert_close(fused.eval()(x), eager.eval()(x), rtol=0, atol=1e-10)
    _assert_same_state(fused, eager)


def test_training_on_one_value_per_channel_is_refused_and_changes_nothing():
    fused = FusedConvBNReLU(3, 4, 3, dtype=D)
    before = copy.deepcopy(fused.state_dict())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused.train()(torch.randn(1, 3, 3, 3, dtype=D))
    for key, value in fused.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.usefixtures("no_tf32")  # float32 tolerances: cuDNN's TF32 default off on a GPU
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None, "affine": False}, {"track_running_stats": False},
                                    {"stride": 2, "padding": (1, 0)}], ids=str)
@pytest.mark.gpu
@needs_triton
def test_triton_backend_module_follows_eager(kwargs):
    torch.manual_seed(0)
    fused = FusedConvBNReLU(3, 4, 3, **{"padding": 1, **kwargs}, backend="triton", device=TRITON_DEVICE)
    eager = _eager_copy(fused)
    for n in (2, 3):
        x = torch.randn(n, 3, 5, 5, device=TRITON_DEVICE).to(memory_format=torch.channels_last)
        torch.testing.assert_close(fused.train()(x), eager.train()(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.eval()(x), eager.eval()(x), rtol=1e-4, atol=1e-4)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---- a new user's review, 2026-12-04 ------------------------------------------------------------------------------

def _uneven_aspps():
    from torchvision.models.segmentation.deeplabv3 import ASPPConv
    branch = ASPP(16, [2], out_channels=8)  # one 3x3 branch 4 channels wide, the projection taking 8 + 4 + 8
    branch.convs[1] = ASPPConv(16, 4, 2)
    branch.project[0] = nn.Conv2d(20, 8, 1, bias=False)
    project = ASPP(16, [2], out_channels=8)  # the projection 12 channels wide
    project.project[0], project.project[1] = nn.Conv2d(24, 12, 1, bias=False), nn.BatchNorm2d(12)
    return {"branch": branch, "project": project}


@pytest.mark.parametrize("which", ["branch", "project"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_an_aspp_of_uneven_widths_is_not_fused_as_one_and_computes_as_eager(which, training):
    # fuse_modules fused an ASPP whose branches (or projection) have other widths than convs.0, and every call then
    # raised "conv_weights[1] must have shape (8, 16, 3, 3), got (4, 16, 3, 3)"; a FusedASPP given such a child too
    from deeplab_ops.modules import aspp_fusable
    from deeplab_ops.nn import fuse_modules
    torch.manual_seed(0)
    eager = _uneven_aspps()[which].to(D).train(training)
    assert not aspp_fusable(eager)
    fused = fuse_modules(copy.deepcopy(eager))
    x = torch.randn(2, 16, 9, 9, dtype=D)
    torch.manual_seed(1)
    expected = eager(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fused(x), expected)
    _assert_same_state(fused, eager)
    swapped = FusedASPP(16, [2], out_channels=8).to(D).train(training)
    if which == "project":
        swapped.project[0], swapped.project[1] = (copy.deepcopy(eager.project[0]), copy.deepcopy(eager.project[1]))
        assert swapped(x).shape == (2, 12, 9, 9)  # runs its children one by one


# ---- parts the fused ops do not compute: a forward of their own, another BatchNorm, int geometry -------------------

class _ScaledBranch(nn.Sequential):  # the same children, another computation
    def forward(self, x):
        return 2.0 * super().forward(x)


class _ClampedProject(nn.Sequential):
    def forward(self, x):
        return super().forward(x).clamp(max=0.1)


class _GlobalMaxPool(nn.AdaptiveAvgPool2d):
    def forward(self, x):
        return torch.nn.functional.adaptive_max_pool2d(x, self.output_size)


def _replace(module: nn.Module, part: str) -> None:
    if part == "branch":
        module.convs[1] = _ScaledBranch(*module.convs[1])
    elif part == "project":
        module.project = _ClampedProject(*module.project)
    else:
        module.convs[2][0] = _GlobalMaxPool(1)


@pytest.mark.parametrize("part", ["branch", "project", "pooling"])
def test_aspp_part_replaced_by_one_with_a_forward_of_its_own_runs_that_forward(part):
    # The fused op kept running after a first call: the replacement's forward was silently skipped (off by 0.5-1.1).
    from deeplab_ops.nn import fuse_modules

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    eager = ASPP(3, [2], 4).to(D).eval()
    fused = FusedASPP(3, [2], 4, dropout=0.5, backend="cpu").to(D).eval()
    fused.load_state_dict(eager.state_dict())
    swapped = fuse_modules(copy.deepcopy(eager), backend="cpu")
    with torch.no_grad():
        for module in (fused, swapped):
            module(x)  # the structure validated and cached
        for module in (eager, fused, swapped):
            _replace(module, part)
        for module in (fused, swapped):
            torch.testing.assert_close(module(x), eager(x), rtol=0, atol=1e-12)


def test_fuse_modules_leaves_an_aspp_with_another_pooling_unfused():
    from deeplab_ops.nn import fuse_modules, fused_config

    eager = ASPP(3, [2], 4).to(D).eval()
    eager.convs[2][0] = _GlobalMaxPool(1)
    x = torch.randn(2, 3, 6, 6, dtype=D)
    fused = fuse_modules(copy.deepcopy(eager), backend="cpu")
    assert fused_config(fused) is None  # its branches' chains fused one by one, the ASPP itself not
    with torch.no_grad():  # (the branches' fused chains round otherwise than eager's: float64 rounding apart)
        torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("change", ["leaky", "appended"])
def test_fused_aspp_forward_refuses_a_part_the_op_does_not_compute(change):
    # It returned the ReLU ASPP's result for a LeakyReLU branch or one with a module appended (off by up to 21).
    from deeplab_ops.nn import fused_aspp_forward

    module = ASPP(3, [2], 4).to(D).eval()
    if change == "leaky":
        module.convs[1][2] = nn.LeakyReLU(0.3)
    else:
        module.convs[1].append(nn.Identity())
    with pytest.raises(ValueError, match=r"convs.1 must end in an nn.ReLU after its BatchNorm"):
        fused_aspp_forward(module, torch.randn(2, 3, 6, 6, dtype=D), backend="cpu")


class _StandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return torch.nn.functional.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class _HalvedBN(nn.BatchNorm2d):
    def forward(self, x):
        return 0.5 * super().forward(x)


@pytest.mark.parametrize(("conv", "bn", "message"), [
    (lambda: _StandardizedConv(3, 4, 3, bias=False), lambda: nn.BatchNorm2d(4),
     r"conv is a _StandardizedConv with a forward of its own"),
    (lambda: nn.Conv2d(3, 4, 3, bias=False), lambda: _HalvedBN(4), r"bn is a _HalvedBN with a forward of its own"),
    (lambda: nn.Conv2d(3, 4, 3, bias=False), lambda: nn.BatchNorm1d(4),
     r"bn must be (a 2-D BatchNorm|an nn.BatchNorm2d)"),
])
def test_fused_conv_bn_and_check_fusable_refuse_modules_computing_something_else(conv, bn, message):
    # fused_conv_bn computed a plain conv / BatchNorm2d for these (off by 16 and 0.7; BatchNorm1d took 4-D input).
    from deeplab_ops.nn import check_fusable, fused_conv_bn

    c, b = conv().to(D), bn().to(D).eval()
    with pytest.raises(TypeError, match=message):
        fused_conv_bn(c, b, torch.randn(2, 3, 6, 6, dtype=D), training=False, backend="cpu")
    if type(c) is nn.Conv2d:
        with pytest.raises(TypeError, match=message):
            check_fusable(c, b)


@pytest.mark.parametrize("attr,value", [("stride", 2), ("dilation", 2), ("padding", 2)])
def test_a_conv_geometry_set_to_a_plain_int_is_computed(attr, value):
    # nn.Conv2d takes `conv.stride = 2` (backbone surgery writes it); fused it was "'int' object is not iterable".
    from deeplab_ops.nn import fuse_modules

    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).to(D)
    fused = fuse_modules(copy.deepcopy(eager), backend="cpu")
    single = FusedConvBNReLU(4, 4, 3, padding=1, backend="cpu").to(D)
    single.load_state_dict(eager.state_dict())
    x = torch.randn(2, 4, 9, 9, dtype=D)
    for module in (eager[0], fused[0], single[0]):
        setattr(module, attr, value)
    expected = eager(x)  # training: one running-statistics update each
    for module in (fused, single):
        torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(module[1].running_mean, eager[1].running_mean, rtol=0, atol=1e-14)


@pytest.mark.parametrize("momentum", [1.5, -0.1])
def test_fuse_modules_leaves_a_batchnorm_of_a_momentum_outside_0_1_unfused(momentum):
    # PyTorch runs it; fused, the first training call failed with "momentum must be a number in [0, 1]", no layer named.
    from deeplab_ops.nn import check_fusable, fuse_modules, is_fused

    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, momentum=momentum),
                          nn.ReLU()).to(D)
    with pytest.raises(ValueError, match=rf"bn has momentum={momentum}; the fused op takes None or a number"):
        check_fusable(eager[0], eager[1])
    fused = fuse_modules(copy.deepcopy(eager), backend="cpu")
    assert not is_fused(fused[0])
    x = torch.randn(2, 3, 6, 6, dtype=D)
    torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=0)
    torch.testing.assert_close(fused[1].running_mean, eager[1].running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["chain", "block"])
def test_a_momentum_set_outside_0_1_after_fusing_runs_unfused(kind):
    # A fused chain or residual block whose BatchNorm momentum is set to 1.5 after fusing (PyTorch's BatchNorm
    # computes with it): the first training call failed with "momentum must be a number in [0, 1]" naming no layer
    # (a fused ASPP fell back; fuse_modules leaves such a pair unfused). Now the parts run unfused, as eager's (an
    # eps of True likewise); a momentum set back, or a NumPy float, runs fused. (A FusedConvBNReLU, which refuses
    # such a momentum when built, refuses it at its call too: tests/ops/test_eval_fast_path.py.)
    import torchvision

    import deeplab_ops.modules as fused_modules
    from deeplab_ops.nn import fuse_modules

    torch.manual_seed(0)
    if kind == "block":
        eager = torchvision.models.resnet.BasicBlock(4, 4).to(D)
    else:
        eager = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).to(D)
    fused = fuse_modules(copy.deepcopy(eager), backend="cpu")
    bns = [m for m in fused.modules() if isinstance(m, nn.BatchNorm2d)]
    eager_bns = [m for m in eager.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(2, 4, 6, 6, dtype=D)
    import numpy as np

    settings = [(1.5, 1e-5, False), (0.3, 1e-5, True), (np.float64(0.2), np.float32(1e-3), True),
                (0.3, True, False), (float("nan"), 1e-5, False)]  # eps=True: PyTorch's 1.0, the op refuses a bool
    for momentum, eps, runs_fused in settings:
        for m in bns + eager_bns:
            m.momentum, m.eps = momentum, eps
        calls = []
        real = fused_modules.conv_bn_relu
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(fused_modules, "conv_bn_relu",
                          lambda *a, calls=calls, real=real, **k: calls.append(1) or real(*a, **k))
            torch.testing.assert_close(fused(x), eager(x), rtol=0, atol=1e-12)
        assert bool(calls) == runs_fused, (momentum, eps, calls)
        for a, b in zip(bns, eager_bns, strict=True):
            torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=1e-14, equal_nan=True)


def test_fused_modules_take_numpy_channel_counts_and_refuse_zero():
    # nn.Conv2d takes a NumPy int for its channels; the fused modules' build-time checks (operator.index) do too, and
    # refuse 0 or a bool naming the argument (0 used to fail only at the first forward).
    import numpy as np

    from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

    block = FusedConvBNReLU(np.int64(3), np.int32(4), 3, padding=1, backend="cpu").to(D)
    aspp = FusedASPP(np.int64(3), (2,), out_channels=np.int64(4), backend="cpu").to(D).eval()
    x = torch.randn(1, 3, 5, 5, dtype=D)
    assert block(x).shape == (1, 4, 5, 5) and aspp(x).shape == (1, 4, 5, 5)
    for build, message in ((lambda: FusedConvBNReLU(3, 0, 3), "out_channels must be an int >= 1, got 0"),
                           (lambda: FusedConvBNReLU(True, 4, 3), "in_channels must be an int >= 1, got True"),
                           (lambda: FusedASPP(0, (2,)), "in_channels must be an int >= 1, got 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            build()


def test_is_fused_answers_for_the_module_itself_as_docs_ops_md_says():
    # A Sequential whose conv -> BatchNorm -> ReLU was fused runs the chain in its own forward: fused itself (a fused
    # subclass of its class), as its conv, BatchNorm and ReLU are; a container that only holds it is not (docs/ops.md
    # said "not a container" of both).
    from deeplab_ops.nn import fuse_modules, is_fused

    def chain():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())

    fused = fuse_modules(nn.Sequential(chain(), nn.Identity()), backend="cpu")
    assert is_fused(fused[0]) and isinstance(fused[0], nn.Sequential)
    assert all(is_fused(m) for m in fused[0])
    assert not is_fused(fused) and not is_fused(fused[1])
    assert any(is_fused(m) for m in fused.modules())


@pytest.mark.parametrize("kwargs, says", [
    (dict(momentum=2.0), "bn has momentum=2.0; the fused op takes None or a number in [0, 1]"),
    (dict(momentum=float("nan")), "bn has momentum=nan"),
    (dict(momentum=-0.1), "bn has momentum=-0.1"),
    (dict(eps=0.0), "bn has eps=0.0; the fused op takes a finite number > 0"),
    (dict(eps=-1e-5), "bn has eps=-1e-05"),
    (dict(eps=float("nan")), "bn has eps=nan"),
    (dict(eps=float("inf")), "bn has eps=inf"),
])
def test_a_fused_block_refuses_batchnorm_numbers_the_op_cannot_run_when_built(kwargs, says):
    """FusedConvBNReLU(momentum=2.0 / NaN, eps <= 0 / NaN / inf) was built, and failed only at its first forward;
    fuse_modules fused a pair with eps=0, whose forward then failed: the constructor refuses them, and fusing
    leaves such a pair as it is (its eager forward runs)."""
    with pytest.raises(ValueError, match=re.escape(says)):
        FusedConvBNReLU(3, 4, 3, **kwargs)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, **kwargs), nn.ReLU())
    fused = fuse_modules(copy.deepcopy(model))
    assert type(fused[0]) is nn.Conv2d and type(fused[1]) is nn.BatchNorm2d
    assert FusedConvBNReLU(3, 4, 3, momentum=None, eps=1e-3)[1].momentum is None  # (the cumulative average runs)
