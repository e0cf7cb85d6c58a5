"""Bad input gets a clear error naming the argument, its value and what was expected; never a crash."""

from __future__ import annotations

import pytest
import torch

import deeplab_ops

ops = torch.ops.deeplab_ops


def _args(**over):
    a = dict(
        x=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), bn_weight=torch.rand(4), bn_bias=torch.randn(4),
        running_mean=torch.zeros(4), running_var=torch.ones(4), stride=1, padding=1, dilation=1, training=True,
        momentum=0.1, eps=1e-5, residual=None, relu=True, backend="cpu",
    )
    a.update(over)
    return a


def _call(**over):
    a = _args(**over)
    positional = [a.pop(k) for k in ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var")]
    return deeplab_ops.conv_bn_relu(*positional, **a)


BAD = [
    ("x rank", dict(x=torch.randn(3, 8, 8)), ValueError, r"x must be a 4-D .* got shape \(3, 8, 8\)"),
    ("weight rank", dict(weight=torch.randn(4, 3, 3)), ValueError, r"weight must be a 4-D .* got shape \(4, 3, 3\)"),
    ("channel mismatch", dict(weight=torch.randn(4, 5, 3, 3)), ValueError, r"weight.shape\[1\]=5 .* 3 channels"),
    ("grouped weight", dict(x=torch.randn(2, 4, 8, 8), weight=torch.randn(4, 2, 3, 3)), ValueError,
     r"grouped convolution \(groups=2\)"),
    ("bn_weight channels", dict(bn_weight=torch.rand(5)), ValueError, r"bn_weight must have shape \(4,\).* \(5,\)"),
    ("bn_bias channels", dict(bn_bias=torch.rand(3)), ValueError, r"bn_bias must have shape \(4,\)"),
    ("running_mean channels", dict(running_mean=torch.rand(2)), ValueError, r"running_mean must have shape \(4,\)"),
    ("running_var rank", dict(running_var=torch.rand(4, 1)), ValueError, r"running_var must have shape \(4,\)"),
    ("mixed devices", dict(weight=torch.randn(4, 3, 3, 3, device="meta")), ValueError,
     r"weight is on meta but x is on cpu"),
    ("mixed devices bn", dict(running_var=torch.ones(4, device="meta")), ValueError,
     r"running_var is on meta but x is on cpu"),
    ("mixed dtypes", dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), TypeError,
     r"weight has dtype torch.float64 but x has dtype torch.float32"),
    ("bn dtype", dict(bn_weight=torch.rand(4, dtype=torch.float64)), TypeError, r"bn_weight has dtype torch.float64"),
    ("integer x", dict(x=torch.ones(2, 3, 8, 8, dtype=torch.int64)), TypeError, r"x has dtype torch.int64"),
    ("stride 0", dict(stride=0), ValueError, r"stride must be >= 1, got \(0, 0\)"),
    ("dilation 0", dict(dilation=(1, 0)), ValueError, r"dilation must be >= 1, got \(1, 0\)"),
    ("negative padding", dict(padding=-1), ValueError, r"padding must be >= 0, got \(-1, -1\)"),
    ("stride type", dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1.5"),
    ("padding triple", dict(padding=(1, 1, 1)), TypeError, r"padding must be an int or a pair of ints"),
    ("output < 1x1", dict(x=torch.randn(2, 3, 2, 2), padding=0), ValueError, r"the output would be 0x0"),
    ("residual shape", dict(residual=torch.randn(2, 4, 8, 7)), ValueError,
     r"residual must have the output's shape \(2, 4, 8, 8\), got \(2, 4, 8, 7\)"),
    ("residual dtype", dict(residual=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError,
     r"residual has dtype torch.float64"),
    ("one value per channel", dict(x=torch.randn(1, 3, 1, 1), padding=0, weight=torch.randn(4, 3, 1, 1)), ValueError,
     r"more than 1 value per channel.*batch of 2 or more"),
    ("eval without running stats", dict(training=False, running_mean=None, running_var=None), ValueError,
     r"running_mean and running_var must be given"),
    ("only running_mean", dict(running_var=None), ValueError, r"must be given together; only running_mean"),
    ("momentum range", dict(momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\], got 1.5"),
    ("momentum None", dict(momentum=None), ValueError, r"momentum must be a number in \[0, 1\], got None"),
    ("eps", dict(eps=0.0), ValueError, r"eps must be a finite number > 0, got 0.0"),
    ("training type", dict(training="yes"), TypeError, r"training must be a bool, got 'yes'"),
    ("x type", dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor, got list"),
    ("unknown backend", dict(backend="cudnn"), ValueError, r"backend='cudnn' is not a backend"),
    ("cuda backend on cpu tensors", dict(backend="cuda"), RuntimeError,
     r"backend='cuda' cannot run this call: it runs CUDA tensors, got a tensor on cpu(.|\n)*cpu: can run it"),
]


@pytest.mark.parametrize("name, over, exc, pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(name, over, exc, pattern):
    state = {k: v.clone() for k, v in _args().items() if k.startswith("running") and v is not None}
    with pytest.raises(exc, match=pattern):
        _call(**over)
    assert all(torch.is_tensor(v) for v in state.values())


def test_failed_call_leaves_running_stats_untouched():
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError):
        _call(running_mean=rm, running_var=rv, residual=torch.randn(1, 1, 1, 1))
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("DEEPLAB_OPS_BACKEND", "reference")
    out = _call(backend=None)
    assert out.shape == (2, 4, 8, 8)
    monkeypatch.setenv("DEEPLAB_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DEEPLAB_OPS_BACKEND='bogus' is not a backend"):
        _call(backend=None)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton.*(interpreter|no Triton kernel)"):
        _call(backend="triton")


def test_direct_op_calls_are_checked_in_cpp():
    """Calls that bypass the Python front door still get an error, not an out-of-bounds access."""
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="mean must be a 1-D tensor of 3 values"):
        ops.bn_apply(y, torch.zeros(2), torch.ones(3), None, None, None, True)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        ops.bn_apply(y, torch.zeros(3), torch.ones(3), None, None, torch.randn(2, 3, 4, 5), True)
    with pytest.raises(RuntimeError, match="input must be a 4-D"):
        ops.bn_stats(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match=r"partials need counts of shape \(1,\)"):
        ops.bn_finalize(torch.zeros(1, 3), torch.zeros(1, 3), torch.ones(2), 0.0, None, None, 0.1, 1e-5,
                        *(torch.empty(3) for _ in range(4)))
    with pytest.raises(RuntimeError, match="weight expects 5 input channels"):
        ops.conv_bn_relu_forward(y, torch.randn(3, 5, 1, 1), None, None, None, None, [1, 1], [0, 0], [1, 1], True,
                                 0.1, 1e-5, None, True)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        ops.conv_bn_relu_forward(torch.randn(1, 3, 1, 1), torch.randn(3, 3, 1, 1), None, None, None, None, [1, 1],
                                 [0, 0], [1, 1], True, 0.1, 1e-5, None, True)
