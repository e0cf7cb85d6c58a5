"""Eval in the dtypes whose BatchNorm is not folded into the weight (float16/bfloat16: conv_bn_relu.FOLDED_DTYPES).
With nothing to differentiate, the front door runs the op conv_bn_relu_eval: the forward's `out` in eval, with no
conv_out, statistics or running-statistic outputs (the triton kernel stores the output alone). These tests pin that
it is the forward's `out` bit for bit, that the eval fast path takes it once its parameters are validated (as it
takes a cached fold), that it follows every parameter change, and what it costs per call (counts)."""

from __future__ import annotations

import pytest
import torch
from helpers import HALF_PARAMS, cuda_test, device_for, triton_test
from test_eval_fast_path import _Counted as CountedChecks
from torch import nn

import deeplab_ops
from deeplab_ops.nn import FusedConvBNReLU
from deeplab_ops.ops import conv_bn_relu as op_module

_ops = torch.ops.deeplab_ops
CL = torch.channels_last


def _inputs(dtype, layout, variant, device="cpu", bn_dtype=None, stride=1):
    """x (2, 5, 9, 7), a 3x3 weight to 6 channels (dilation 2, padding 2, `stride`) and moved BatchNorm tensors."""
    g = torch.Generator().manual_seed(3)
    bn_dtype = bn_dtype or dtype
    x = torch.randn(2, 5, 9, 7, generator=g).to(dtype)
    w = (torch.randn(6, 5, 3, 3, generator=g) * 0.3).to(dtype)
    gamma, beta = (torch.rand(6, generator=g) + 0.5).to(bn_dtype), torch.randn(6, generator=g).to(bn_dtype)
    rm, rv = torch.randn(6, generator=g).to(bn_dtype), (torch.rand(6, generator=g) + 0.3).to(bn_dtype)
    if variant == "no_affine":
        gamma = beta = None
    ho, wo = (9 - 1) // stride + 1, (7 - 1) // stride + 1
    res = torch.randn(2, 6, ho, wo, generator=g).to(dtype) if variant == "residual" else None
    if layout == "cl":
        x = x.contiguous(memory_format=CL)
        res = res.contiguous(memory_format=CL) if res is not None else None
    to = (lambda t: t if t is None else t.to(device))
    return [to(t) for t in (x, w, gamma, beta, rm, rv, res)], ([stride] * 2, [2, 2], [2, 2]), variant != "no_relu"


def _both(prefix, tensors, geometry, relu, eps=1e-3):
    """(the forward op's out in eval, the eval op's output)."""
    x, w, gamma, beta, rm, rv, res = tensors
    fwd = getattr(_ops, f"{prefix}conv_bn_relu_forward")(x, w, gamma, beta, rm, rv, *geometry, False, 0.1, eps, res,
                                                         relu)
    return fwd[0], getattr(_ops, f"{prefix}conv_bn_relu_eval")(x, w, gamma, beta, rm, rv, *geometry, eps, res, relu)


def _same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride(), (actual.stride(), expected.stride())
    assert torch.equal(actual, expected), (actual.double() - expected.double()).abs().max()


@pytest.mark.parametrize("variant", ["plain", "residual", "no_relu", "no_affine"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_cpu_eval_op_is_the_forward_out_bit_for_bit(dtype, layout, variant):
    _same(*reversed(_both("", *_inputs(dtype, layout, variant))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stride", [1, 2])
def test_cpu_eval_op_with_float32_batchnorm_tensors(dtype, stride):
    _same(*reversed(_both("", *_inputs(dtype, "cl", "residual", bn_dtype=torch.float32, stride=stride))))


@cuda_test
@pytest.mark.parametrize("variant", ["plain", "residual", "no_affine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_eval_op_is_the_forward_out_bit_for_bit(dtype, variant):
    _same(*reversed(_both("", *_inputs(dtype, "cl", variant, device="cuda", bn_dtype=torch.float32))))


@triton_test
@pytest.mark.parametrize("dtype", HALF_PARAMS)  # (float16 also in the interpreter, on CPU tensors)
def test_triton_half_eval_op_is_the_forward_out_bit_for_bit(dtype):
    _same(*reversed(_both("triton_", *_inputs(dtype, "cl", "residual", device=device_for("triton"),
                                              bn_dtype=torch.float32))))


@triton_test
@pytest.mark.parametrize("variant", ["plain", "residual", "no_affine"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_triton_eval_op_is_the_forward_out_bit_for_bit(layout, variant):
    """The same kernel and epilogue as the eval forward, storing only the output (float32 here; the half dtypes
    above)."""
    _same(*reversed(_both("triton_", *_inputs(torch.float32, layout, variant, device=device_for("triton")))))


@triton_test
def test_triton_eval_op_stores_no_conv_out(monkeypatch):
    from deeplab_ops.triton import conv_bn_relu as triton_cbr

    seen = []
    real = triton_cbr.conv_forward
    monkeypatch.setattr(triton_cbr, "conv_forward", lambda *a, **k: seen.append(k["store_y"]) or real(*a, **k))
    tensors, geometry, relu = _inputs(torch.float32, "cl", "plain", device=device_for("triton"))
    x, w, gamma, beta, rm, rv, res = tensors
    _ops.triton_conv_bn_relu_eval(x, w, gamma, beta, rm, rv, *geometry, 1e-3, res, relu)
    assert seen == [False]


def test_eval_op_errors_name_the_argument():
    (x, w, gamma, beta, rm, rv, _), geometry, _ = _inputs(torch.bfloat16, "cl", "plain")
    with pytest.raises(RuntimeError, match="running_var"):
        _ops.conv_bn_relu_eval(x, w, gamma, beta, rm, rv[:5], *geometry, 1e-3, None, True)
    with pytest.raises(RuntimeError, match="eps"):
        _ops.conv_bn_relu_eval(x, w, gamma, beta, rm, rv, *geometry, -1.0, None, True)
    with pytest.raises(RuntimeError, match="residual"):
        _ops.conv_bn_relu_eval(x, w, gamma, beta, rm, rv, *geometry, 1e-3, torch.randn(2, 6, 9, 6), True)


@triton_test
def test_triton_eval_op_checks_its_arguments():
    (x, w, gamma, beta, rm, rv, _), geometry, _ = _inputs(torch.float32, "cl", "plain", device=device_for("triton"))
    with pytest.raises(ValueError, match=r"running_var must have shape \(6,\)"):
        _ops.triton_conv_bn_relu_eval(x, w, gamma, beta, rm, rv[:5], *geometry, 1e-3, None, True)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        _ops.triton_conv_bn_relu_eval(x, w, gamma, beta, rm, rv, *geometry, 0.0, None, True)


# ---- the front door -------------------------------------------------------------------------------------------


def _pair(dtype=torch.bfloat16, cin=3, cout=4):
    """A fused module in eval with moved running statistics, and the eager module holding the same state."""
    torch.manual_seed(0)
    fused = FusedConvBNReLU(cin, cout, 3, padding=1, backend="cpu")
    fused.train()
    fused(torch.randn(4, cin, 7, 7))
    with torch.no_grad():
        fused[1].weight.uniform_(0.5, 1.5)
        fused[1].bias.uniform_(-0.5, 0.5)
    eager = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    eager.load_state_dict(fused.state_dict())
    return fused.to(dtype).eval(), eager.to(dtype).eval()


class _Counted(CountedChecks):
    """The full path's checks (`calls`, test_eval_fast_path's counter) and each op the front door runs (`ops`)."""

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch)
        self.ops = []
        for table, name in ((op_module.EVAL, "eval"), (op_module.FORWARD, "forward"),
                            (op_module.CONV_BIAS_ACT, "conv_bias_act")):
            for backend, op in list(table.items()):
                monkeypatch.setitem(table, backend, self._counting(op, name))

    def _counting(self, op, name):
        def run(*args, **kwargs):
            self.ops.append(name)
            return op(*args, **kwargs)

        return run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_module_eval_runs_the_eval_op_then_the_fast_path(monkeypatch, dtype):
    fused, eager = _pair(dtype)
    x = torch.randn(2, 3, 7, 7).to(dtype)
    counted = _Counted(monkeypatch)
    with torch.no_grad():
        outs = [fused(x) for _ in range(3)]
        expected = eager(x)
    assert counted.calls == 1 and counted.ops == ["eval"] * 3, (counted.calls, counted.ops)
    for out in outs[1:]:
        _same(out, outs[0])
    torch.testing.assert_close(outs[0], expected, rtol=1.6e-2, atol=1e-2)
    # the forward op's out, as a call with a gradient to compute gives it (there: the autograd's forward)
    with torch.no_grad():
        forward_out = op_module.FORWARD["cpu"](x, fused[0].weight, fused[1].weight, fused[1].bias,
                                               fused[1].running_mean, fused[1].running_var, [1, 1], [1, 1], [1, 1],
                                               False, 0.1, fused[1].eps, None, True)[0]
    _same(outs[0], forward_out)


def test_half_functional_eval_and_with_gradients(monkeypatch):
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16).contiguous(memory_format=CL)
    res = torch.randn(2, 4, 7, 7, dtype=torch.bfloat16).contiguous(memory_format=CL)
    conv, bn = fused[0], fused[1]
    counted = _Counted(monkeypatch)

    def call():
        return deeplab_ops.conv_bn_relu(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                        padding=1, training=False, residual=res, backend="cpu")

    with torch.no_grad():
        a, b = call(), call()
    with_grad = call()  # the parameters want a gradient: the forward op, through the autograd
    assert counted.calls == 2 and counted.ops == ["eval", "eval", "forward"], counted.ops
    assert with_grad.requires_grad
    _same(a, b)
    _same(a, with_grad.detach())
    assert a.is_contiguous(memory_format=CL)


def test_half_eval_follows_every_parameter_change():
    fused, eager = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16)

    def check(what):
        eager.load_state_dict(fused.state_dict())
        fused.eval(), eager.eval()
        with torch.no_grad():
            first, again, expected = fused(x), fused(x), eager(x)
        _same(again, first)
        torch.testing.assert_close(first, expected, rtol=1.6e-2, atol=1e-2, msg=what)

    check("first")
    with torch.no_grad():
        fused[1].running_mean.add_(0.5)
        fused[1].weight.mul_(2)
    check("after in-place writes")
    fused.load_state_dict({k: v + 0.25 if v.is_floating_point() else v for k, v in fused.state_dict().items()})
    check("after load_state_dict")
    fused[0].weight = nn.Parameter(torch.randn_like(fused[0].weight))
    check("after replacing the conv's weight")
    fused[1].running_var = torch.rand(4, dtype=torch.bfloat16) + 0.1
    check("after replacing a running-statistics buffer")
    fused[1].eps = 0.5
    eager[1].eps = 0.5
    check("after changing eps")
    fused[1].running_var = torch.rand(5, dtype=torch.bfloat16) + 0.1  # a bad buffer: the full path's error
    with torch.no_grad(), pytest.raises(ValueError, match=r"running_var must have shape \(4,\)"):
        fused(x)


def test_half_eval_compiles_fullgraph():
    """A traced call runs the eval op itself (its fake kernel gives the output's shape and layout)."""
    torch._dynamo.reset()
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16).contiguous(memory_format=CL)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        expected = fused(x)
        out = compiled(x)
    _same(out, expected)



def test_half_model_under_autocast_of_its_dtype_takes_the_fast_path(monkeypatch):
    """Autocast in the model's own dtype casts nothing: the call is what it is outside autocast (validated once,
    then the fast path), and so is its result; a float32 model under the same autocast still casts per call."""
    fused, eager = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16)
    counted = _Counted(monkeypatch)
    with torch.no_grad():
        expected = fused(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = [fused(x) for _ in range(2)]
            eager_amp = eager(x)
    assert counted.calls == 1 and counted.ops == ["eval"] * 3, (counted.calls, counted.ops)
    for out in outs:
        _same(out, expected)
    torch.testing.assert_close(outs[0], eager_amp, rtol=1.6e-2, atol=1e-2)
    fused32, _ = _pair(torch.float32)
    before = counted.calls
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            assert fused32(x.float()).dtype == torch.bfloat16
    assert counted.calls == before + 2, (before, counted.calls)



def _random_cases(seed: int, dtypes, count: int, device="cpu"):
    """`count` random calls: odd shapes, kernel sizes (non-square too), strides, paddings and dilations, both
    layouts, with and without residual / ReLU / affine, BatchNorm tensors in x's dtype (or float32 for half x)."""
    rng = torch.Generator().manual_seed(100 + seed)

    def pick(*values):
        return values[int(torch.randint(len(values), (1,), generator=rng))]

    cases = []
    while len(cases) < count:
        dtype = pick(*dtypes)
        bn_dtype = pick(dtype, torch.float32) if dtype in (torch.bfloat16, torch.float16) else dtype
        n, cin, cout = pick(1, 2, 3), pick(1, 3, 8, 17), pick(1, 4, 9)
        kh, kw = pick(1, 3, 5), pick(1, 3, 2)
        stride, dilation = [pick(1, 2, 3), pick(1, 2)], [pick(1, 2, 4), pick(1, 3)]
        padding = [pick(0, 1, dilation[0] * (kh // 2)), pick(0, 2, dilation[1] * (kw // 2))]
        h, w = pick(5, 9, 16), pick(6, 11)
        ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        if ho < 1 or wo < 1:
            continue
        x = torch.randn(n, cin, h, w, generator=rng).to(dtype)
        wt = (torch.randn(cout, cin, kh, kw, generator=rng) * 0.3).to(dtype)
        gamma, beta = torch.rand(cout, generator=rng) + 0.5, torch.randn(cout, generator=rng)
        rm, rv = torch.randn(cout, generator=rng), torch.rand(cout, generator=rng) + 0.1
        gamma, beta, rm, rv = (t.to(bn_dtype) for t in (gamma, beta, rm, rv))
        if pick(True, False):
            gamma = beta = None
        res = torch.randn(n, cout, ho, wo, generator=rng).to(dtype) if pick(True, False) else None
        if pick(True, False):
            x = x.contiguous(memory_format=CL)
        tensors = [t if t is None else t.to(device) for t in (x, wt, gamma, beta, rm, rv, res)]
        cases.append((tensors, (stride, padding, dilation), pick(True, False), pick(1e-5, 1e-3)))
    return cases


@pytest.mark.parametrize("seed", range(6))
def test_cpu_eval_op_is_the_forward_out_on_random_geometries(seed):
    """... and within the half dtype's rounding of deeplab_ops.reference computed in float64."""
    from deeplab_ops import reference

    for tensors, geometry, relu, eps in _random_cases(seed, (torch.bfloat16, torch.float16), 5):
        fwd, out = _both("", tensors, geometry, relu, eps)
        _same(out, fwd)
        x, w, gamma, beta, rm, rv, res = (t if t is None else t.double() for t in tensors)
        stride, padding, dilation = geometry
        ref = reference.conv_bn_relu(x, w, gamma, beta, rm, rv, stride=stride, padding=padding, dilation=dilation,
                                     training=False, eps=eps, residual=res, relu=relu)
        # the conv output rounds once to the half dtype before BatchNorm scales it (as eager's): up to an ulp of
        # |y| times the scale, plus the output's own rounding
        ulp = torch.finfo(out.dtype).eps
        scale = (1.0 if gamma is None else gamma.abs().max()) / (rv.min() + eps) ** 0.5
        y_max = torch.nn.functional.conv2d(x, w, None, stride, padding, dilation).abs().max()
        torch.testing.assert_close(out.double(), ref, rtol=ulp, atol=float(ulp * (scale * y_max + 1)))


@triton_test
@pytest.mark.parametrize("seed", range(2))
def test_triton_eval_op_is_the_forward_out_on_random_geometries(seed):
    """float32 in the interpreter (half dtypes on a GPU); float64 too."""
    dtypes = (torch.float32, torch.float64) + ((torch.bfloat16, torch.float16) if device_for("triton") == "cuda"
                                               else ())
    for tensors, geometry, relu, eps in _random_cases(seed, dtypes, 3, device=device_for("triton")):
        _same(*reversed(_both("triton_", tensors, geometry, relu, eps)))
