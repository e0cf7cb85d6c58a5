"""Host glue of the triton backend, counted on the CPU profiler (aten ops incl. nested; the interpreter's own work
inside a launch excluded): copies and concatenations per call stay within budget, channels_last activations
pass through without a layout copy, and no host path synchronizes with the device."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from helpers import CUDA, TRITON_DEVICE, needs_triton
from torch.profiler import ProfilerActivity, profile, record_function

from deeplab_ops.triton import aspp as triton_aspp
from deeplab_ops.triton import conv_bn_relu as triton_cbr

# no_tf32: test_a_weight_reshaped_through_data_is_checked_again compares triton with the reference backend at 1e-4;
# on a GPU both would otherwise use TF32 (cuDNN's default; the triton GEMMs follow cudnn.allow_tf32), errors ~1e-3.
pytestmark = [pytest.mark.gpu, needs_triton, pytest.mark.usefixtures("no_tf32")]
DEVICE = TRITON_DEVICE  # CUDA tensors where a GPU is visible, else CPU tensors in the interpreter
GEO = ([1, 1], [1, 1], [1, 1])


@pytest.fixture
def marked_launches(monkeypatch):
    """Interpreted launches run under a record_function range, so their aten ops can be told apart."""
    if not CUDA:
        import triton.runtime.interpreter as interpreter

        call = interpreter.GridExecutor.__call__

        def marked(self, *args, **kwargs):
            with record_function("triton_launch"):
                return call(self, *args, **kwargs)

        monkeypatch.setattr(interpreter.GridExecutor, "__call__", marked)


def _glue(fn) -> Counter:
    fn()  # warm: packed weights, stencil and rate tables
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.events())
    launches = [(e.time_range.start, e.time_range.end) for e in events if e.name == "triton_launch"]
    return Counter(e.name for e in events if e.name.startswith("aten::")
                   and not any(s <= e.time_range.start and e.time_range.end <= t for s, t in launches))


def _conv_inputs(channels_last: bool):
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 9, 9, device=DEVICE).to(memory_format=mf)
    w = torch.randn(16, 16, 3, 3, device=DEVICE)
    stats = [torch.rand(16, device=DEVICE) + 0.5, torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE),
             torch.rand(16, device=DEVICE) + 0.5]
    return x, w, stats


def _aspp_inputs(channels_last: bool, c=16, rates=(2, 3)):
    mf = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 16, 9, 9, device=DEVICE).to(memory_format=mf)
    cws = [torch.randn(c, 16, 1, 1, device=DEVICE)] + [torch.randn(c, 16, 3, 3, device=DEVICE) for _ in rates]
    nbn = (len(rates) + 3) * c
    rest = [torch.randn(c, 16, 1, 1, device=DEVICE), torch.randn(c, (len(rates) + 2) * c, 1, 1, device=DEVICE),
            torch.rand(nbn, device=DEVICE) + 0.5, torch.randn(nbn, device=DEVICE), torch.randn(nbn, device=DEVICE),
            torch.rand(nbn, device=DEVICE) + 0.5]
    return x, cws, rest, list(rates)


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_conv_bn_relu_copies(marked_launches, channels_last):
    x, w, (g, b, rm, rv) = _conv_inputs(channels_last)
    conversions = 0 if channels_last else 1  # per activation crossing the boundary
    for training in (True, False):
        glue = _glue(lambda t=training: triton_cbr.forward(x, w, g, b, rm, rv, *GEO, t, 0.1, 1e-5, None, True))
        # in: x; out: out (conv_out, which only the backward reads, stays channels_last)
        assert glue["aten::copy_"] == 2 * conversions and glue["aten::cat"] == 0, (training, glue)
    o = triton_cbr.forward(x, w, g, b, rm, rv, *GEO, True, 0.1, 1e-5, None, True)
    dz = torch.randn_like(o[0])
    glue = _glue(lambda: triton_cbr.backward(dz, x, w, g, o[1], o[0], o[2], o[3], *GEO, True, True,
                                             [True, True, True, True, False]))
    # in: grad_out, out, x; out: grad_x. The weight gradient is summed into its layout: no copy.
    assert glue["aten::copy_"] == 4 * conversions and glue["aten::cat"] == 0, glue
    glue = _glue(lambda: triton_cbr.conv_bias_act(x, w, b, None, *GEO, True))
    assert glue["aten::copy_"] == 2 * conversions, glue
    # the memory-efficient recompute of conv_out: x in, conv_out channels_last as the forward's
    glue = _glue(lambda: triton_cbr.conv_bias_act(x, w, None, None, *GEO, False))
    assert glue["aten::copy_"] == conversions, glue


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "nchw"])
def test_aspp_glue_budget(marked_launches, channels_last):
    x, cws, (pw, prw, bw, bb, rm, rv), rates = _aspp_inputs(channels_last)
    conversions = 0 if channels_last else 1
    train = _glue(lambda: triton_aspp.forward(x, cws, pw, prw, bw, bb, rm, rv, rates, True, 0.1, 1e-5))
    # Layout: x in, out out (branch_out and project_out, which only the backward reads, stay channels_last). The
    # pooling branch's (N, C) BN partials: one copy (M2 = 0).
    assert train["aten::cat"] == 0 and train["aten::copy_"] <= 2 * conversions + 1, train
    evaluation = _glue(lambda: triton_aspp.forward(x, cws, pw, prw, bw, bb, rm, rv, rates, False, 0.1, 1e-5))
    # + the saved running mean (an output must not alias the buffer) and the invstd/scale math on (B+2)*C values
    assert evaluation["aten::cat"] == 0 and evaluation["aten::copy_"] <= 2 * conversions + 3, evaluation
    o = triton_aspp.forward(x, cws, pw, prw, bw, bb, rm, rv, rates, True, 0.1, 1e-5)
    dz = torch.randn_like(o[0])
    bwd = _glue(lambda: triton_aspp.backward(dz, x, cws, pw, prw, bw, bb, o[1], o[2], o[3], o[0], o[4], o[5], rates,
                                             True, [True, True, True]))
    # Layout: grad_out, out, x in; grad_x out; plus the pooling branch's (N, C) and (C,) vector math (5 small
    # copies today). No cat: the projection weight's gradient is written in place, branch and pooling columns.
    assert bwd["aten::cat"] == 0 and bwd["aten::copy_"] <= 4 * conversions + 5, bwd


def test_host_paths_do_not_synchronize(monkeypatch):
    """No .item(), .tolist(), bool/int/float of a tensor or nonzero in the forward and backward host code (each
    would wait for the device)."""

    def refuse(name, original):
        def guarded(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("deeplab_ops.triton"):
                raise AssertionError(f"{caller} calls Tensor.{name}: a host synchronization")
            return original(self, *args, **kwargs)

        return guarded

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name, getattr(torch.Tensor, name)))
    x, w, (g, b, rm, rv) = _conv_inputs(True)
    for training in (True, False):
        o = triton_cbr.forward(x, w, g, b, rm, rv, *GEO, training, 0.1, 1e-5, None, True)
        triton_cbr.backward(torch.randn_like(o[0]), x, w, g, o[1], o[0], o[2], o[3], *GEO, training, True, [True] * 5)
    xa, cws, (pw, prw, bw, bb, arm, arv), rates = _aspp_inputs(True)
    for training in (True, False):
        o = triton_aspp.forward(xa, cws, pw, prw, bw, bb, arm, arv, rates, training, 0.1, 1e-5)
        triton_aspp.backward(torch.randn_like(o[0]), xa, cws, pw, prw, bw, bb, o[1], o[2], o[3], o[0], o[4], o[5],
                             rates, training, [True, True, True])


# ---- the twins' argument checks: once per call -------------------------------------------------------------------


@pytest.fixture
def twin_checks(monkeypatch):
    """Counts of each triton twin's own argument check (deeplab_ops.triton.validate_with), by op."""
    import deeplab_ops  # noqa: F401  (installs the checks)
    from deeplab_ops.triton import _VALIDATORS

    counts = Counter()
    for op, check in list(_VALIDATORS.items()):
        def counted(*args, _op=op, _check=check, **kwargs):
            counts[_op] += 1
            return _check(*args, **kwargs)

        monkeypatch.setitem(_VALIDATORS, op, counted)
    return counts


def test_front_door_calls_are_checked_once(twin_checks):
    """A front door checks its arguments and its triton twin does not check them again (forward, the eval fold's
    first and cached calls, the memory-efficient recompute, backward); a direct call of a twin is checked."""
    import deeplab_ops

    x, w, (g, b, rm, rv) = _conv_inputs(True)
    params = [t.requires_grad_() for t in (w.clone(), g.clone(), b.clone())]
    xg = x.clone().requires_grad_()
    for efficient in (False, True):
        out = deeplab_ops.conv_bn_relu(xg, params[0], params[1], params[2], rm, rv, padding=1, backend="triton",
                                       memory_efficient=efficient)
        out.sum().backward()
    with torch.no_grad():
        for _ in range(2):  # the full path (folds and caches), then the cached fold's fast path
            deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=False, backend="triton")
    xa, cws, (pw, prw, bw, bb, arm, arv), rates = _aspp_inputs(True)
    cws = [c.requires_grad_() for c in cws]
    for training in (True, False):
        deeplab_ops.aspp(xa, cws, pw, prw, bw, bb, arm, arv, rates=rates, training=training,
                         backend="triton").sum().backward()
    logits = torch.randn(2, 3, 4, 5, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 3, (2, 9, 11), device=DEVICE)
    deeplab_ops.upsample_cross_entropy(logits, target, backend="triton").backward()
    assert not twin_checks, twin_checks  # every twin was called, none checked again

    torch.ops.deeplab_ops.triton_conv_bn_relu_forward(x, w, g, b, rm, rv, *GEO, True, 0.1, 1e-5, None, True)
    torch.ops.deeplab_ops.triton_upsample_cross_entropy_forward(logits.detach(), target, 255, False, "mean")
    assert twin_checks == {"triton_conv_bn_relu_forward": 1, "triton_upsample_cross_entropy_forward": 1}


def test_a_failed_front_door_call_leaves_the_twins_checking(monkeypatch):
    """The mark a front door sets around its triton call is cleared when the call raises: a later direct call
    with bad arguments is refused by the twin's check, not run."""
    import deeplab_ops
    from deeplab_ops.triton import _CHECKED

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(triton_cbr, "forward", broken)
    x, w, (g, b, rm, rv) = _conv_inputs(True)
    with pytest.raises(RuntimeError, match="kernel failed"):
        deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, backend="triton")
    assert not _CHECKED.by_caller
    with pytest.raises(ValueError, match="residual"):
        torch.ops.deeplab_ops.triton_conv_bn_relu_forward(x, w, g, b, rm, rv, *GEO, True, 0.1, 1e-5,
                                                          torch.randn(2, 16, 4, 4, device=DEVICE), True)


def test_a_weight_reshaped_through_data_is_checked_again():
    """`weight.data = a view of the same storage` keeps data_ptr and the version counter: the cached eval fold
    is keyed on the shape too, so the next call folds again and its checks see the new shape (the triton twin,
    which the front door's mark lets skip its own check, never gets the stale fold)."""
    import deeplab_ops

    w = torch.randn(4, 3, 3, 3, device=DEVICE)
    g, b, rm, rv = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE), torch.randn(4, device=DEVICE), \
        torch.rand(4, device=DEVICE) + 0.5
    with torch.no_grad():
        deeplab_ops.conv_bn_relu(torch.randn(1, 3, 6, 6, device=DEVICE), w, g, b, rm, rv, padding=1,
                                 training=False, backend="triton")
        w.data = w.data[:, :2]
        x = torch.randn(1, 2, 6, 6, device=DEVICE)
        out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=False, backend="triton")
        want = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=False, backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_a_dispatch_mode_does_not_inherit_the_front_doors_mark():
    """A TorchDispatchMode sees (and may change) a front door's arguments before the twin runs: under one the twin
    checks what it gets."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import deeplab_ops

    class SwapResidual(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.deeplab_ops.triton_conv_bn_relu_forward.default:
                args = list(args)
                args[12] = torch.randn(2, 16, 4, 4, device=DEVICE)
            return func(*args, **(kwargs or {}))

    x, w, (g, b, rm, rv) = _conv_inputs(True)
    with SwapResidual(), pytest.raises(ValueError, match="residual"):
        deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, residual=torch.randn(2, 16, 9, 9, device=DEVICE),
                                 backend="triton")
