"""Review of conv_bn_relu_eval (c24d7ad): the half-dtype eval op, its triton twin and the eval fast path's validation
mark. Pins what holds (eager parity in half dtypes and under autocast, the mark following every parameter change,
tracing, threads, direct calls' errors) and the defects it found, fixed (each test failed before its fix)."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import device_for, triton_test
from test_eval_unfolded import CL, _pair, _same
from torch import nn

import deeplab_ops
from deeplab_ops.common import clear_derived
from deeplab_ops.nn import FusedConvBNReLU

_ops = torch.ops.deeplab_ops
GEOMETRY = ([1, 1], [1, 1], [1, 1])


def _args(dtype=torch.bfloat16, bn_dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 7, generator=g).to(dtype).to(device)
    w = (torch.randn(6, 5, 3, 3, generator=g) * 0.3).to(dtype).to(device)
    vec = [(torch.rand(6, generator=g) + 0.5).to(bn_dtype).to(device) for _ in range(4)]
    return x, w, *vec


# ---- what holds --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_eval_matches_eager_after_dtype_changes_and_with_float32_batchnorm(dtype):
    """bf16 -> the other half dtype (`.half()` after `.bfloat16()`), and a float32 BatchNorm beside the half conv:
    eager's result bit for bit (no residual: the same roundings), through the full path and then the fast path."""
    fused, eager = _pair(torch.bfloat16)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        fused(x.bfloat16())  # the mark for the bfloat16 tensors
    fused.to(dtype), eager.to(dtype)
    with torch.no_grad():
        for _ in range(2):
            _same(fused(x.to(dtype)), eager(x.to(dtype)))
    fused[1].float(), eager[1].float()
    with torch.no_grad():
        for _ in range(2):
            _same(fused(x.to(dtype)), eager(x.to(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_model_under_cpu_autocast_is_eager_autocast(dtype):
    fused, eager = _pair(torch.float32)
    x = torch.randn(2, 3, 7, 7).contiguous(memory_format=CL)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        _same(fused(x), eager(x))
        _same(fused(x), eager(x))


def test_requires_grad_toggles_and_grad_modes_give_the_same_output():
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = fused(x)
    out = fused(x)  # parameters want a gradient: the forward op through the autograd
    assert out.requires_grad
    _same(out.detach(), expected)
    for p in fused.parameters():
        p.requires_grad_(False)
    _same(fused(x), expected)  # grad mode on, nothing to differentiate: the eval op (fast path)
    fused[1].bias.requires_grad_(True)
    out = fused(x)
    assert out.requires_grad
    _same(out.detach(), expected)
    with torch.inference_mode():
        _same(fused(x), expected)


def test_parameters_made_in_inference_mode_run_every_call():
    with torch.inference_mode():
        fused, _ = _pair()
        x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16)
        first = fused(x)
    with torch.no_grad():
        _same(fused(x), first)
        _same(fused(x), first)


def test_direct_eval_op_is_the_forward_out_with_strided_and_expanded_tensors():
    """BatchNorm vectors that are strided or expanded views, a transposed x, an expanded residual."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 7, 9, generator=g).bfloat16().transpose(2, 3)
    w = torch.randn(6, 5, 3, 3, generator=g).bfloat16()
    vec = [(torch.rand(12, generator=g) + 0.5)[::2] for _ in range(3)] + [torch.rand(1, generator=g).expand(6) + 0.5]
    res = torch.randn(1, 6, 1, 1, generator=g).bfloat16().expand(2, 6, 9, 7)
    fwd = _ops.conv_bn_relu_forward(x, w, *vec, *GEOMETRY, False, 0.1, 1e-3, res, True)[0]
    _same(_ops.conv_bn_relu_eval(x, w, *vec, *GEOMETRY, 1e-3, res, True), fwd)


def test_direct_eval_op_errors_for_missing_statistics_and_empty_batch():
    x, w, g, b, rm, rv = _args()
    with pytest.raises(RuntimeError, match="needs running_mean and running_var"):
        _ops.conv_bn_relu_eval(x, w, g, b, None, None, *GEOMETRY, 1e-5, None, True)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be given together"):
        _ops.conv_bn_relu_eval(x, w, g, b, rm, None, *GEOMETRY, 1e-5, None, True)
    with pytest.raises(RuntimeError, match="empty"):
        _ops.conv_bn_relu_eval(x[:0], w, g, b, rm, rv, *GEOMETRY, 1e-5, None, True)
    with pytest.raises(RuntimeError, match="residual has dtype Double"):
        _ops.conv_bn_relu_eval(x, w, g, b, rm, rv, *GEOMETRY, 1e-5, torch.randn(2, 6, 9, 7).double(), True)


@triton_test
def test_direct_triton_eval_op_errors_name_the_argument():
    x, w, g, b, rm, rv = _args(torch.float32, torch.float32, device_for("triton"))
    with pytest.raises(TypeError, match="running_mean must be a torch.Tensor, got NoneType"):
        _ops.triton_conv_bn_relu_eval(x, w, g, b, None, rv, *GEOMETRY, 1e-5, None, True)
    with pytest.raises(ValueError, match="x has an empty batch"):
        _ops.triton_conv_bn_relu_eval(x[:0], w, g, b, rm, rv, *GEOMETRY, 1e-5, None, True)
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(2, 6, 9, 7\)"):
        _ops.triton_conv_bn_relu_eval(x, w, g, b, rm, rv, *GEOMETRY, 1e-5, torch.randn(2, 6, 9, 6, device=x.device),
                                      True)


def test_fresh_module_refuses_running_statistics_that_require_grad():
    """The full path's rule (F.batch_norm refuses them too); the fast path's own is tested below."""
    fused, _ = _pair()
    for p in fused.parameters():
        p.requires_grad_(False)
    fused[1].running_mean.requires_grad_(True)
    with pytest.raises(ValueError, match="running_mean requires grad"):
        fused(torch.randn(2, 3, 7, 7, dtype=torch.bfloat16))


def test_export_and_jit_trace_of_a_bfloat16_module_in_eval():
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16).contiguous(memory_format=CL)
    with torch.no_grad():
        expected = fused(x)
        program = torch.export.export(fused, (x,))
        targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
        assert targets == ["deeplab_ops.conv_bn_relu_eval.default"], targets
        _same(program.module()(x), expected)
        traced = torch.jit.trace(fused, (x,), check_trace=False)
        _same(traced(x), expected)


def test_inductor_compiles_a_bfloat16_module_in_eval():
    torch._dynamo.reset()
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        _same(compiled(x), fused(x))


def test_fast_path_from_threads_with_mixed_grad_modes_and_cache_clears():
    torch.manual_seed(0)
    model = nn.Sequential(*[FusedConvBNReLU(4, 4, 3, padding=1, backend="cpu") for _ in range(3)]).bfloat16().eval()
    xs = [torch.randn(1, 4, 6, 6, dtype=torch.bfloat16) for _ in range(3)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    clear_derived()
    errors = []

    def work(i):
        try:
            for it in range(15):
                j = (i + it) % len(xs)
                if i == 0:  # grad mode on: the forward op through the autograd
                    out = model(xs[j]).detach()
                else:
                    with torch.no_grad():
                        out = model(xs[j])
                if not torch.equal(out, expected[j]):
                    errors.append((i, it))
                if i == 3 and it % 5 == 0:
                    clear_derived()
        except Exception as error:  # reported below
            errors.append((i, repr(error)))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ---- defects found by the review, fixed --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_path_refuses_running_statistics_that_require_grad(dtype):
    fused, _ = _pair(dtype)
    for p in fused.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    with torch.no_grad():
        fused(x)  # the mark (bfloat16) / the fold (float32) cached
    fused[1].running_mean.requires_grad_(True)
    with pytest.raises(ValueError, match="running_mean requires grad"):
        fused(x)


@pytest.mark.parametrize("which", ["running_mean", "residual"])
def test_direct_eval_op_refuses_a_meta_tensor_beside_cpu_ones(which):
    x, w, g, b, rm, rv = _args()
    res = None
    if which == "running_mean":
        rm = rm.to("meta")
    else:
        res = torch.zeros(2, 6, 9, 7, dtype=torch.bfloat16, device="meta")
    with pytest.raises((RuntimeError, ValueError), match="meta"):
        _ops.conv_bn_relu_eval(x, w, g, b, rm, rv, *GEOMETRY, 1e-5, res, True)


def test_direct_eval_op_with_an_input_requiring_grad_is_refused():
    x, w, g, b, rm, rv = _args()
    x.requires_grad_(True)
    with pytest.raises(RuntimeError, match="conv_bn_relu_eval"):  # at the call, or at the backward
        out = _ops.conv_bn_relu_eval(x, w, g, b, rm, rv, *GEOMETRY, 1e-5, None, True)
        out.float().sum().backward()


@triton_test
def test_triton_eval_op_takes_an_eps_beyond_float32_range():
    x, w, g, b, rm, rv = _args(torch.float32, torch.float32, device_for("triton"))
    expected = _ops.conv_bn_relu_eval(*(t.cpu() for t in (x, w, g, b, rm, rv)), *GEOMETRY, 1e300, None, True)
    out = _ops.triton_conv_bn_relu_eval(x, w, g, b, rm, rv, *GEOMETRY, 1e300, None, True)
    torch.testing.assert_close(out.cpu(), expected)


@triton_test
def test_triton_eval_op_with_x_none_names_x():
    _, w, g, b, rm, rv = _args(torch.float32, torch.float32, device_for("triton"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _ops.triton_conv_bn_relu_eval(None, w, g, b, rm, rv, *GEOMETRY, 1e-5, None, True)


def test_functional_half_eval_equals_module():
    """The public function on a module's tensors: the same op, the same bits (and the mark shared)."""
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7, dtype=torch.bfloat16)
    conv, bn = fused[0], fused[1]
    with torch.no_grad():
        expected = fused(x)
        for _ in range(2):
            out = deeplab_ops.conv_bn_relu(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                           padding=1, training=False, eps=bn.eps, backend="cpu")
            _same(out, expected)
