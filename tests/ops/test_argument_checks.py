"""Argument checks at the public surface: half logits on CPU, $DEEPLAB_OPS_BACKEND, device arguments,
process_group, the module arguments and x channels of deeplab_ops.nn, and the range and size checks of aspp and
upsample_cross_entropy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, backend_param, device_for
from torch import nn

import deeplab_ops
from deeplab_ops import backends, reference
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, fused_aspp_forward, fused_conv_bn, sync_batchnorm

PG_ERROR = r"process_group must be a torch.distributed ProcessGroup \(e.g. torch.distributed.group.WORLD\) or None"


# ---- half logits on CPU --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [None, "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_half_logits_on_cpu_run_as_float32(dtype, backend, reduction):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5).to(dtype).requires_grad_()
    target = torch.randint(0, 3, (2, 9, 11))
    target[0, 0, :4] = 255
    assert backends.resolve(backend, "upsample_cross_entropy", logits.device, logits=logits, target=target) == "cpu"
    loss = deeplab_ops.upsample_cross_entropy(logits, target, reduction=reduction, backend=backend)
    assert loss.dtype == dtype
    # The oracle on the same values in float32 (half -> float32 is exact), rounded to the half type.
    exact = logits.detach().float().requires_grad_()
    want = reference.upsample_cross_entropy(exact, target, reduction=reduction)
    torch.testing.assert_close(loss, want.to(dtype), rtol=0, atol=0)
    g = torch.randn(want.shape)
    loss.backward(g.to(dtype))
    want.backward(g.to(dtype).float())
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.float(), exact.grad.to(dtype).float(), rtol=0, atol=0)


def test_auto_choice_error_is_truthful(monkeypatch):
    # Nothing the automatic choice considers can run the call: the message says so and names what can.
    monkeypatch.setattr(backends, "auto_candidates", lambda device: ("triton",))
    monkeypatch.setattr(backends, "_RESOLVED", {})  # (choices remembered under the real candidates)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, target = torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(RuntimeError) as info:
        deeplab_ops.upsample_cross_entropy(logits, target)
    text = str(info.value)
    assert "none of them can run this call; pass backend='reference', which can" in text
    assert "no backend can run" not in text
    assert "reference: can run it" in text


# ---- $DEEPLAB_OPS_BACKEND --------------------------------------------------------------------------------------


def test_env_backend_is_validated_where_read(monkeypatch):
    monkeypatch.setenv("DEEPLAB_OPS_BACKEND", "bogus")
    message = r"DEEPLAB_OPS_BACKEND='bogus' is not a backend; expected one of \('auto', 'reference', 'cpu'"
    with pytest.raises(ValueError, match=message):
        deeplab_ops.auto_backend("cpu")
    with pytest.raises(ValueError, match=message):
        deeplab_ops.upsample_cross_entropy(torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.int64))
    for value, want in (("", "cpu"), ("auto", "cpu"), ("reference", "reference"), ("cpu", "cpu"), ("cuda", None)):
        monkeypatch.setenv("DEEPLAB_OPS_BACKEND", value)
        assert deeplab_ops.auto_backend("cpu") == want, value  # cuda cannot run CPU tensors: None, not "cuda"


def _tool(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEEPLAB_OPS_BACKEND": value, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "deeplab_ops"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_tool_reports_a_bad_env_backend():
    bogus = _tool("bogus")
    assert bogus.returncode == 1
    assert "DEEPLAB_OPS_BACKEND='bogus' is not a backend" in bogus.stdout
    assert "auto picks" not in bogus.stdout
    forced = _tool("cuda")
    line = next(ln for ln in forced.stdout.splitlines() if ln.startswith("auto picks"))
    assert "CPU tensors: none (DEEPLAB_OPS_BACKEND='cuda' cannot run them: it runs CUDA tensors" in line
    if torch.cuda.is_available() and not deeplab_ops.available_backends("cuda")["cuda"]:
        assert forced.returncode == 0, forced.stderr  # CUDA tensors run on it: a setting for this machine
    else:  # it runs no tensor here: every call with backend=None fails, as --help says the tool exits 1 for
        assert forced.returncode == 1, forced.stdout
        assert "error        DEEPLAB_OPS_BACKEND='cuda' runs no tensor here" in forced.stdout
    assert _tool("cpu").returncode == 0


# ---- device arguments --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [deeplab_ops.available_backends, deeplab_ops.auto_backend])
@pytest.mark.parametrize("device", ["tpu", "gpu", None, 1.5])
def test_device_argument_is_named(call, device):
    with pytest.raises(ValueError, match=rf"device={device!r} is not a device; expected a torch.device"):
        call(device)


def test_device_argument_accepts_devices():
    assert deeplab_ops.available_backends(torch.device("cpu"))["cpu"] == []
    assert deeplab_ops.available_backends("cuda:0")["cpu"] == ["it runs CPU tensors, got a tensor on cuda:0"]
    assert deeplab_ops.available_backends(0) == deeplab_ops.available_backends("cuda:0")


# ---- process_group -----------------------------------------------------------------------------------------------


def _cbr(process_group, training=True):
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    return deeplab_ops.conv_bn_relu(x, w, torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4), padding=1,
                                    training=training, process_group=process_group, backend="cpu")


def _aspp(process_group, training=True):
    m = FusedASPP(3, [2], 4).train(training)
    m.process_group = process_group
    return m(torch.randn(2, 3, 6, 6))


def _module_eval(process_group):
    m = FusedConvBNReLU(3, 4, 3, padding=1).eval()
    m.process_group = process_group
    return m(torch.randn(2, 3, 5, 5))


def _check_bad_groups():
    for bad in ("world", 5, object()):
        for call in (_cbr, lambda g: _cbr(g, training=False), _aspp, lambda g: _aspp(g, training=False),
                     _module_eval, lambda g: sync_batchnorm(FusedASPP(3, [2], 4), g)):
            with pytest.raises(TypeError, match=PG_ERROR + f", got {type(bad).__name__} "):
                call(bad)


def test_process_group_type_without_distributed():
    import torch.distributed as dist

    assert not dist.is_initialized()
    _check_bad_groups()
    assert _cbr(None).shape == (2, 4, 5, 5)


def test_process_group_type_with_distributed(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _check_bad_groups()
        # A real group of one process: nothing to synchronize, the call runs and equals the unsynchronized one.
        torch.manual_seed(0)
        synced = _cbr(dist.group.WORLD)
        torch.manual_seed(0)
        torch.testing.assert_close(synced, _cbr(None), rtol=0, atol=0)
        assert _aspp(dist.group.WORLD).shape == (2, 4, 6, 6)
    finally:
        dist.destroy_process_group()


# ---- module arguments and x's channels ------------------------------------------------------------------------


def test_fused_aspp_forward_checks_the_module():
    x = torch.randn(2, 4, 6, 6)
    for module in (nn.Conv2d(4, 3, 1), nn.Sequential(), "aspp"):
        with pytest.raises(TypeError, match=r"module must be an ASPP with torchvision's structure .*, got "):
            fused_aspp_forward(module, x)
    # The functional form refuses a structure the op cannot compute; the module runs such children one by one, as
    # torchvision's ASPP would (tests/ops/test_aspp.py: test_fused_aspp_follows_replaced_or_hooked_children).
    m = FusedASPP(4, [2], 3)
    m.convs[0] = nn.Conv2d(4, 3, 1)
    with pytest.raises(ValueError, match=r"convs.0 must be a Sequential \(conv, BatchNorm, ReLU\), got Conv2d"):
        fused_aspp_forward(m, x)
    assert m(x).shape == (2, 3, 6, 6)
    m = FusedASPP(4, [2], 3)
    m.convs[2] = nn.Sequential(nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match=r"convs.2 must be a Sequential \(pooling, conv, BatchNorm, ReLU\)"):
        fused_aspp_forward(m, x)


def test_fused_conv_bn_checks_the_modules():
    x = torch.randn(2, 2, 4, 4)
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d, got Linear"):
        fused_conv_bn(nn.Linear(2, 2), nn.BatchNorm2d(2), x, training=True)
    with pytest.raises(TypeError, match=r"bn must be a BatchNorm module \(e.g. nn.BatchNorm2d\), got ReLU"):
        fused_conv_bn(nn.Conv2d(2, 2, 1, bias=False), nn.ReLU(), x, training=False)
    for call in (deeplab_ops.nn.bn_call_args, deeplab_ops.nn.bn_step):
        with pytest.raises(TypeError, match=r"bn must be a BatchNorm module .*, got Conv2d"):
            call(nn.Conv2d(2, 2, 1), True)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        sync_batchnorm("model")


@pytest.mark.parametrize("training", [True, False])
def test_x_channels_are_checked_first(training):
    x = torch.randn(2, 6, 7, 7)
    aspp = FusedASPP(5, [1], 4).train(training)
    cbr = FusedConvBNReLU(5, 4, 3, padding=1).train(training)
    before = [t.clone() for t in (*aspp.buffers(), *cbr.buffers())]
    with pytest.raises(ValueError, match=r"x has 6 channels \(shape \(2, 6, 7, 7\)\) but the ASPP module takes 5 "
                                         r"input channels \(in_channels\); expected x of shape \(N, 5, H, W\)"):
        aspp(x)
    with pytest.raises(ValueError, match=r"x has 6 channels \(shape \(2, 6, 7, 7\)\) but conv takes 5 input "
                                         r"channels \(in_channels\)"):
        cbr(x)
    after = [*aspp.buffers(), *cbr.buffers()]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # a refused call changes nothing
    assert aspp(torch.randn(2, 5, 7, 7)).shape == (2, 4, 7, 7)
    assert cbr(torch.randn(2, 5, 7, 7)).shape == (2, 4, 7, 7)


def test_a_cuda_device_where_none_is_visible_runs_no_gpu_backend(monkeypatch):
    """available_backends("cuda") / auto_backend("cuda") on a machine without a visible GPU: cuda and triton say so,
    and the automatic choice is None."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reasons = deeplab_ops.available_backends("cuda")
    for backend in ("cuda", "triton"):
        assert "no CUDA device is visible here" in reasons[backend][0], reasons
    assert deeplab_ops.auto_backend("cuda") is None


def test_sync_batchnorm_unfused_leaves_the_fused_batchnorms_alone(tmp_path):
    """sync_batchnorm(model, unfused=True): every BatchNorm no fused op computes becomes an nn.SyncBatchNorm (its
    tensors shared), the fused-away ones and those inside fused modules stay, so nothing normalizes twice (what
    nn.SyncBatchNorm.convert_sync_batchnorm on a fused model would do); eval output unchanged."""
    import copy

    import torch.distributed as dist

    from deeplab_ops import fusion

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU(),  # biased: unfused
                          FusedConvBNReLU(4, 4, 1))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    want = copy.deepcopy(model)(x)
    deeplab_ops.nn.fuse_modules(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="unfused must be a bool, got 1"):
            sync_batchnorm(model, unfused=1)
        synced = sync_batchnorm(model, unfused=True)
    finally:
        dist.destroy_process_group()
    assert synced is model
    assert type(model[1]) is fusion.FusedAwayBatchNorm2d and type(model[4]) is nn.SyncBatchNorm
    assert type(model[6][1]) is nn.BatchNorm2d and model[6].process_group is not None
    assert len(fusion.fused_batchnorms(model)) == 2
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_any_requires_grad_fallback_matches_torch():
    """The Python stand-in for torch._C._any_requires_grad (torch 2.6 lacks it) answers as torch does: tensors and
    lists of tensors among other arguments; tuples are not looked into (so the ops pass lists)."""
    from deeplab_ops.ops.dispatch import _any_requires_grad_py

    g, n = torch.ones(1, requires_grad=True), torch.ones(1)
    cases = [(), (n,), (g,), (None, 3, "x", n), ([n, n], None), ([n, g],), ((n, g),), (n, [n], 1.0, [g]),
             ([],), ([None, n],), ((g,), n)]
    for args in cases:
        expected = any(isinstance(t, torch.Tensor) and t.requires_grad
                       for a in args for t in (a if isinstance(a, list) else [a]))
        assert _any_requires_grad_py(*args) is expected, args
        if hasattr(torch._C, "_any_requires_grad"):
            assert torch._C._any_requires_grad(*args) is expected, args


# ---- range and size checks: the argument named on every backend, before any kernel ------------------------------


def _aspp_call(cin=3, c=4, rates=(1, 2), backend="cpu", training=True):
    device = device_for(backend)
    x = torch.randn(2, cin, 7, 6, device=device)
    cws = [torch.randn(c, cin, 1, 1, device=device)] + [torch.randn(c, cin, 3, 3, device=device) for _ in rates]
    n_bn = len(rates) + 3
    bn = [[torch.full((c,), v, device=device) for _ in range(n_bn)] for v in (1.0, 0.0, 0.0, 1.0)]
    return deeplab_ops.aspp(x, cws, torch.randn(c, cin, 1, 1, device=device),
                            torch.randn(c, (len(rates) + 2) * c, 1, 1, device=device), *bn, rates=rates,
                            training=training, backend=backend)


ASPP_BACKENDS = ["reference", "cpu", backend_param("triton")]


@pytest.mark.parametrize("backend", ASPP_BACKENDS)
@pytest.mark.parametrize(("cin", "c"), [(3, 0), (0, 4)])
def test_aspp_without_channels_is_refused_naming_the_shapes(backend, cin, c):
    # As conv_bn_relu (cbr-zero-size): a convolution without input or output channels is refused, not computed.
    with pytest.raises(ValueError, match=rf"conv_weights\[0\] shape \({c}, {cin}, 1, 1\) and x shape "
                                         rf"\(2, {cin}, 7, 6\) must have no zero sizes in channels"):
        _aspp_call(cin=cin, c=c, backend=backend)


@pytest.mark.parametrize("backend", ASPP_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("rate", [2**31, 2**62, 2**63, 2**64 + 1])
def test_aspp_rates_over_int32_are_refused_naming_rates(backend, training, rate):
    # The kernels index with 32 bits and the op schema takes int64: conv_bn_relu's bound (cbr-geometry-range).
    with pytest.raises(ValueError, match=rf"rates must be at most 2147483647 \(2\*\*31 - 1\), got \(2, {rate}\)"):
        _aspp_call(rates=(2, rate), backend=backend, training=training)


def test_aspp_rate_at_the_int32_bound_runs():
    # 2**31 - 1 passes the check: every tap of its 3x3 branch but the centre falls in the padding.
    torch.manual_seed(0)
    got = _aspp_call(rates=(2**31 - 1,), training=False)
    torch.manual_seed(0)
    want = _aspp_call(rates=(50,), training=False)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu", backend_param("triton")])
@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 2**70])
def test_ignore_index_outside_int64_is_refused_naming_the_range(backend, ignore_index):
    device = device_for(backend)
    logits, target = torch.randn(2, 3, 4, 5, device=device), torch.randint(0, 3, (2, 9, 11), device=device)
    with pytest.raises(ValueError, match=rf"ignore_index must be in the int64 range \[-2\*\*63, 2\*\*63 - 1\], got "
                                         rf"{ignore_index}"):
        deeplab_ops.upsample_cross_entropy(logits, target, ignore_index=ignore_index, backend=backend)
    # the int64 bounds themselves are labels no pixel has: nothing ignored
    for bound in (2**63 - 1, -(2**63)):
        torch.testing.assert_close(
            deeplab_ops.upsample_cross_entropy(logits, target, ignore_index=bound, backend=backend),
            deeplab_ops.upsample_cross_entropy(logits, target, ignore_index=-100, backend="reference"))


def test_a_backend_that_is_no_name_is_refused_by_name_for_every_op():
    """The remembered backend choice keyed the call on `backend`: a list raised a bare "unhashable type" TypeError
    where the other ops, and before it every op, said the value is not a backend."""
    logits, target = torch.randn(1, 3, 2, 2), torch.zeros(1, 4, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"backend=\['cpu'\] is not a backend; expected one of"):
        deeplab_ops.upsample_cross_entropy(logits, target, backend=["cpu"])

