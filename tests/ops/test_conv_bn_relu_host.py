"""The host path of a fused conv + BN + ReLU call: what is validated or resolved once is exact (a cache never lets a
bad argument through, nor keeps a backend choice the environment changed), the modules read their parameters as
getattr does, and a steady-state call's Python work is counted (counts, never times)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TRITON_DEVICE, package_frames, python_calls, triton_test
from torch import nn

import deeplab_ops
from deeplab_ops import backends
from deeplab_ops.nn import FusedConvBNReLU, fuse_modules
from deeplab_ops.ops import conv_bn_relu as op_module


def _args():
    torch.manual_seed(0)
    return (torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.rand(4) + 0.5, torch.randn(4), torch.zeros(4),
            torch.ones(4))


def _call(**kwargs):
    return deeplab_ops.conv_bn_relu(*_args(), **{"padding": 1, "backend": "cpu", **kwargs})


@pytest.mark.parametrize("good, bad, exc, pattern", [
    (dict(relu=True), dict(relu=1), TypeError, r"relu must be a bool, got 1"),
    (dict(training=True), dict(training=1), TypeError, r"training must be a bool, got 1"),
    (dict(stride=1), dict(stride=1.0), TypeError, r"stride must be an int or a pair of ints, got 1.0"),
    (dict(stride=(1, 1)), dict(stride=(True, 1)), TypeError, r"stride must be an int or a pair of ints"),
    (dict(padding=(1, 1)), dict(padding=[1, 1.0]), TypeError, r"padding must be an int or a pair of ints"),
    (dict(momentum=1), dict(momentum=True), ValueError, r"momentum must be a number in \[0, 1\], got True"),
], ids=["relu", "training", "stride-float", "stride-bool", "padding-float", "momentum-bool"])
def test_a_validated_configuration_lets_no_equal_but_bad_value_through(good, bad, exc, pattern):
    """1 == True == 1.0 hash alike: the configuration validated once must not answer for them."""
    _call(**good)  # validated and cached
    _call(**good)
    with pytest.raises(exc, match=pattern):
        _call(**bad)


def test_backend_choice_follows_the_environment(monkeypatch):
    calls = []
    real = op_module.reference.conv_bn_relu
    monkeypatch.setattr(op_module.reference, "conv_bn_relu", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected = _call(backend=None)  # auto on CPU tensors: the cpu backend (remembered)
    assert not calls
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    torch.testing.assert_close(_call(backend=None), expected)
    assert len(calls) == 1, "DEEPLAB_OPS_BACKEND=reference set after a call with backend=None was not followed"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="DEEPLAB_OPS_BACKEND='bogus' is not a backend"):
        _call(backend=None)
    monkeypatch.delenv(backends.ENV_VAR)
    _call(backend=None)
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):  # a failure is not remembered
        _call(backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call"):
        _call(backend="cuda")


@triton_test
def test_a_backend_with_per_call_rules_is_resolved_every_call():
    """triton's rules depend on the call's tensors (half types in the interpreter, int32 sizes): never cached."""
    x, w = torch.randn(2, 3, 6, 6, device=TRITON_DEVICE), torch.randn(4, 3, 3, 3, device=TRITON_DEVICE)
    geometry = ((1, 1), (1, 1), (1, 1))
    call = dict(x=x, weight=w, stride=geometry[0], padding=geometry[1], dilation=geometry[2])
    assert backends.resolve_remembered("triton", "conv_bn_relu", x.device, False, **call) == "triton"
    assert all(key[1] != "triton" for key in backends._RESOLVED)
    with pytest.raises(RuntimeError, match="has no synchronized BatchNorm"):
        backends.resolve_remembered("triton", "conv_bn_relu", x.device, True, **call)


class _ShadowedWeightBN(nn.BatchNorm2d):
    """A BatchNorm whose `weight` is a property: the fused call must read what getattr gives."""

    @property
    def weight(self):
        w = self.__dict__["_parameters"].get("weight")
        if w is None:  # while nn.Module registers it
            raise AttributeError("weight")
        return w * 2


def _eager(conv, bn, x, residual=None):
    y = bn(conv(x))
    return torch.relu(y if residual is None else y + residual)


@pytest.mark.parametrize("kind", ["property", "parametrization"])
def test_fused_module_reads_bn_parameters_as_getattr_does(kind):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).double()
    if kind == "property":
        bn = _ShadowedWeightBN(4).double()
    else:
        bn = nn.BatchNorm2d(4).double()
        nn.utils.parametrize.register_parametrization(bn, "weight", nn.Softplus())
    with torch.no_grad():
        bn.bias.normal_()
        if kind == "property":  # its reset_parameters wrote into the property's temporary
            bn._parameters["weight"].uniform_(0.5, 1.5)
    conv_e, bn_e = copy.deepcopy(conv), copy.deepcopy(bn)
    fused = FusedConvBNReLU.from_modules(conv, bn, backend="cpu")
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(fused(x), _eager(conv_e, bn_e, x))
    fused(x).sum().backward()
    _eager(conv_e, bn_e, x).sum().backward()
    for (name, p), p_e in zip(fused.named_parameters(), list(conv_e.parameters()) + list(bn_e.parameters()),
                              strict=True):
        torch.testing.assert_close(p.grad, p_e.grad, msg=name)
    torch.testing.assert_close(bn.running_mean, bn_e.running_mean)


class _Block(nn.Module):
    """A post-activation residual block (the shape fuse_modules recognises)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.downsample = None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_fused_block_uses_modules_replaced_after_fusion():
    torch.manual_seed(0)
    block = fuse_modules(_Block(4).double(), backend="cpu")
    eager = copy.deepcopy(block)
    deeplab_ops.nn.unfuse_modules(eager)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    block(x)
    eager(x)
    new_conv = nn.Conv2d(4, 4, 1, bias=False).double()
    block.conv2 = new_conv
    eager.conv2 = copy.deepcopy(new_conv)
    torch.testing.assert_close(block(x), eager(x))


# ---- counts of a steady-state call's Python work ----------------------------------------------------------------

# Python frames of deeplab_ops per steady-state layer forward (measured 18-19 on the cpu backend: module glue, checks,
# the layout rule (common.conv_layout), backend choice, the front door; the op's autograd is C++; the BatchNorm tensors'
# checks are one frame, ops.conv_bn_relu._plain_bn); the backward runs none (the C++ node calls the backward op).
_FORWARD_FRAMES = 19
_BACKWARD_FRAMES = 0


@pytest.mark.parametrize("kind", ["FusedConvBNReLU", "fused chain", "fused block"])
def test_steady_state_layer_python_work(kind):
    """No nn.Module.__getattr__ (a failed attribute lookup first) and a bounded number of deeplab_ops frames per
    fused layer, forward and backward."""
    torch.manual_seed(0)
    if kind == "FusedConvBNReLU":
        model, layers = FusedConvBNReLU(4, 4, 3, padding=1, backend="cpu"), 1
    elif kind == "fused chain":
        model = fuse_modules(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()),
                             backend="cpu", channels_last=False)
        layers = 1
    else:
        model, layers = fuse_modules(_Block(4), backend="cpu", channels_last=False), 2
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    for _ in range(2):
        model(x).sum().backward()
    forward = python_calls(lambda: model(x))
    out = model(x).sum()
    backward = python_calls(out.backward)
    getattr_calls = sum(n for (file, name), n in forward.items() if name == "__getattr__" and "torch/nn" in file)
    assert getattr_calls == 0, sorted(k for k in forward if k[1] == "__getattr__")
    assert package_frames(forward) <= _FORWARD_FRAMES * layers, sorted(forward.items())
    assert package_frames(backward) <= _BACKWARD_FRAMES * layers, sorted(backward.items())


def _bn_layouts():
    """BatchNorm tensors of 4 channels laid out every way a caller may give them: separate, slices of one buffer
    at every offset (overlapping or not), the same tensor twice, expanded, strided, non-float, on meta."""
    buffer = torch.arange(24, dtype=torch.float32)
    sep = [torch.rand(4) + 0.5 for _ in range(4)]
    yield "separate", sep
    for step in range(0, 6):  # slices of one buffer `step` values apart: overlapping below 4
        yield f"buffer step {step}", [buffer[i * step:i * step + 4] for i in range(4)]
    for i in range(4):
        for j in range(4):
            if i != j:
                same = list(sep)
                same[j] = same[i]
                yield f"{j} is {i}", same
    for i in range(4):
        for name, t in (("expanded", torch.ones(1).expand(4)), ("strided", torch.zeros(8)[::2]),
                        ("half", torch.ones(4, dtype=torch.float16)), ("long", torch.ones(4, dtype=torch.long)),
                        ("3 values", torch.ones(3)), ("2-d", torch.ones(4, 1)), ("meta", torch.ones(4, device="meta")),
                        ("None", None), ("list", [1.0] * 4)):
            odd = list(sep)
            odd[i] = t
            yield f"{name} at {i}", odd


@pytest.mark.parametrize("training", [True, False])
def test_one_sweep_bn_check_passes_only_what_the_per_tensor_checks_pass(training):
    """check_args passes the usual call's BatchNorm tensors in one sweep (_plain_bn) and sends anything else to the
    per-tensor checks: whatever the sweep passes, the per-tensor checks pass too (it never lets a tensor through
    that they refuse, an overlap of the written running statistics included), and it passes the usual layouts."""
    passed = []
    for name, (w, b, m, v) in _bn_layouts():
        if op_module._plain_bn(w, b, m, v, 4, torch.device("cpu"), torch.float32, training):
            op_module._check_bn(w, b, m, v, 4, torch.device("cpu"), torch.float32, training)  # raises if wrong
            passed.append(name)
    assert "separate" in passed and "buffer step 4" in passed and "buffer step 5" in passed
    overlapping = {"buffer step 0", "buffer step 1", "buffer step 2", "buffer step 3", "2 is 3", "3 is 2"}
    assert not overlapping & set(passed) if training else overlapping <= set(passed), passed
