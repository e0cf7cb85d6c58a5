"""The overhead budgets of docs/performance.md, one test per row: what a steady-state call runs besides its kernels,
counted by benchmarks/overhead_bench.py's census (aten ops outside the backend's own kernels, nested ones
included; copies; cat; host syncs; launches). Counts, never times: they are the same on every machine."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers import ROOT, device_for, triton_test  # noqa: E402

BENCH_DIR = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import overhead_bench  # noqa: E402

import deeplab_ops  # noqa: E402

CPU = torch.device("cpu")


def _leaf(t: torch.Tensor, grad: bool) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_(grad)


def _conv_call(mode: str, backend: str = "cpu", memory_efficient: bool = False, residual: bool = False,
               dtype: torch.dtype = torch.float32, layout: torch.memory_format = torch.channels_last):
    """conv_bn_relu at 1x4x4x4 -> 4, 3x3, input (and gradient) in `layout`, `dtype` parameters: (one call, its
    grad leaves), on the device `backend` runs on here (triton: CUDA where a GPU is visible)."""
    grad = mode == "fwd_bwd"
    torch.set_default_device(device_for(backend))
    try:
        return _conv_call_here(mode, backend, memory_efficient, residual, grad, dtype, layout)
    finally:
        torch.set_default_device(None)


def _conv_call_here(mode, backend, memory_efficient, residual, grad, dtype, layout):
    def leaf(t):
        return _leaf(t.to(dtype), grad)

    x = leaf(torch.randn(1, 4, 4, 4).contiguous(memory_format=layout))
    w, gamma, beta = leaf(torch.randn(4, 4, 3, 3)), leaf(torch.rand(4) + 0.5), leaf(torch.randn(4))
    rm, rv = torch.randn(4).to(dtype), (torch.rand(4) + 0.5).to(dtype)
    res = leaf(torch.randn(1, 4, 4, 4).contiguous(memory_format=layout)) if residual else None
    training = mode != "eval_fwd"
    g = torch.randn(1, 4, 4, 4).contiguous(memory_format=layout)

    def call():
        with torch.set_grad_enabled(grad):
            out = deeplab_ops.conv_bn_relu(x, w, gamma, beta, rm, rv, padding=1, training=training, residual=res,
                                           backend=backend, memory_efficient=memory_efficient)
        if grad:
            out.backward(g)

    return call, [t for t in (x, w, gamma, beta, res) if t is not None]


def _aspp_call(mode: str, backend: str = "cpu", memory_efficient: bool = False,
               layout: torch.memory_format = torch.channels_last):
    """aspp at N=2, C_in=8, C=4, 5x5, rates (1, 2, 3), input in `layout`, BatchNorm tensors concatenated, on the
    device `backend` runs on here."""
    torch.set_default_device(device_for(backend))
    try:
        return _aspp_call_here(mode, backend, memory_efficient, layout)
    finally:
        torch.set_default_device(None)


def _aspp_call_here(mode, backend, memory_efficient, layout):
    grad = mode == "fwd_bwd"
    rates, c, cin = (1, 2, 3), 4, 8
    x = _leaf(torch.randn(2, cin, 5, 5).contiguous(memory_format=layout), grad)
    convs = [_leaf(torch.randn(c, cin, 1, 1), grad)] + [_leaf(torch.randn(c, cin, 3, 3), grad) for _ in rates]
    pool, proj = _leaf(torch.randn(c, cin, 1, 1), grad), _leaf(torch.randn(c, 5 * c, 1, 1), grad)
    k = (len(rates) + 3) * c
    gamma, beta = _leaf(torch.rand(k) + 0.5, grad), _leaf(torch.randn(k), grad)
    rm, rv = torch.randn(k), torch.rand(k) + 0.5
    training = mode != "eval_fwd"

    def call():
        with torch.set_grad_enabled(grad):
            out = deeplab_ops.aspp(x, convs, pool, proj, gamma, beta, rm, rv, rates=rates, training=training,
                                   backend=backend, memory_efficient=memory_efficient)
        if grad:
            out.backward(torch.ones_like(out))

    return call, [x, *convs, pool, proj, gamma, beta]


def _aspp_module_call(mode: str, memory_efficient: bool = False):
    """deeplab_ops.nn.FusedASPP (one BatchNorm module per branch, as torchvision's ASPP) at the same shape."""
    grad = mode == "fwd_bwd"
    module = deeplab_ops.nn.FusedASPP(8, (1, 2, 3), 4, backend="cpu", memory_efficient=memory_efficient)
    module.train(mode != "eval_fwd")
    x = _leaf(torch.randn(2, 8, 5, 5).contiguous(memory_format=torch.channels_last), grad)

    def call():
        with torch.set_grad_enabled(grad):
            out = module(x)
        if grad:
            out.backward(torch.ones_like(out))

    return call, [x, *module.parameters()]


def _census(call, params, triton: bool = False, calls: int = 3) -> dict:
    device = params[0].device
    case = overhead_bench.Case(call, params, "", 1)
    for _ in range(2):  # warm-up: caches filled, nothing compiled or allocated for the first time below
        for p in params:
            p.grad = None
        call()
    return overhead_bench.profile_calls(case, device, calls=calls, triton=triton)


def _check(row: dict, *, ops: int | None = None, copies: int | None = None, cat: int = 0,
           views_count: bool = True, views: int | None = None) -> None:
    """syncs == 0, cat <= `cat`, copies <= `copies`, aten ops outside the kernels <= `ops` (view ops included
    unless views_count=False: they write nothing, and the ASPP composite slices its concatenated buffers), view ops
    <= `views` (each one a TensorImpl made and freed on the host)."""
    where = row["census_detail"]
    if views is not None:
        assert row["views"] <= views, f"{row['views']} view ops > {views} ({where})"
    assert row["syncs"] == 0, f"host syncs: {row['sync_ops']} ({where})"
    assert row["cat"] <= cat, f"cat per call: {row['cat']} > {cat} ({where})"
    if copies is not None:
        assert row["copies"] <= copies, f"{row['copies']} copies > {copies} ({where})"
    if ops is not None:
        n = row["aten_ops"] - (0 if views_count else row["views"])
        assert n <= ops, f"{n} aten ops outside the kernels > {ops} ({where})"


# ---- the rows of docs/performance.md, "Budgets" ------------------------------------------------------------


def test_conv_bn_relu_cpu_train_forward():
    """Training forward, channels_last: only the two running-statistic copies, no cat, no sync, <= 8 ops."""
    _check(_census(*_conv_call("train_fwd")), ops=8, copies=2)


def test_conv_bn_relu_cpu_eval_forward():
    """Eval forward without gradients: BatchNorm folded (cached): one conv with bias and ReLU, no copy."""
    row = _census(*_conv_call("eval_fwd"))
    _check(row, ops=4, copies=0)
    assert row["bn_stage_calls"] == 0 and row["conv_calls"] == 1, row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv_bn_relu_cpu_half_eval_forward(dtype):
    """Eval forward without gradients in a half dtype (BatchNorm not folded: conv_bn_relu.FOLDED_DTYPES): the eval
    op, one convolution and two BN stage calls (finalize, apply); the finalize's 4 outputs allocated; no copy."""
    row = _census(*_conv_call("eval_fwd", dtype=dtype))
    _check(row, ops=4, copies=0)
    assert row["bn_stage_calls"] == 2 and row["conv_calls"] == 1, row


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_conv_bn_relu_cpu_backward_never_synchronizes(memory_efficient):
    _check(_census(*_conv_call("fwd_bwd", memory_efficient=memory_efficient, residual=True)))


def test_aspp_cpu_train_forward():
    """Training forward with concatenated BatchNorm tensors, in either layout: no sync; no cat (each conv branch
    keeps its own pre-BN tensor, the projection sums per-branch convolutions); copies: the two running-statistics
    copies and one 0-d dtype conversion inside at::mean (counted as to, _to_copy and copy_); <= 24 ops besides
    views."""
    for layout in (torch.channels_last, torch.contiguous_format):
        _check(_census(*_aspp_call("train_fwd", layout=layout)), ops=24, copies=5, views_count=False, views=95)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_aspp_cpu_backward_never_synchronizes(memory_efficient):
    """No sync; the backward's three cats join per-branch gradients into the op's single outputs: the projection
    weight's, the BatchNorm weights' and biases'. The forward and its memory-efficient recompute join nothing."""
    _check(_census(*_aspp_call("fwd_bwd", memory_efficient=memory_efficient)), cat=3,
           views=241 if memory_efficient else 172)


N_BN = 6  # the ASPP cases' BatchNorms: 1x1 branch, three rates, pooling, projection


def test_aspp_module_train_forward():
    """FusedASPP, separate BatchNorm modules: their tensors are kept back to back (deeplab_ops.nn.pack_batchnorms),
    so no cat of them per call; copies: <= 2 per BatchNorm (measured: one per running statistic for all six, and
    at::mean's 0-d conversion); no cat; <= 24 ops besides views."""
    row = _census(*_aspp_module_call("train_fwd"))
    _check(row, ops=24, copies=2 * N_BN, views_count=False, views=95)


def test_aspp_module_eval_forward():
    row = _census(*_aspp_module_call("eval_fwd"))
    _check(row, ops=24, copies=2 * N_BN, views_count=False, views=57)


@pytest.mark.parametrize("memory_efficient", [False, True])
def test_aspp_module_backward(memory_efficient):
    """Forward + backward: no sync; no cat of BatchNorm parameters or of their gradients (the per-BatchNorm
    gradients are views of the op's): the cats left are the C++ composite backward's three, as with concatenated
    tensors."""
    _check(_census(*_aspp_module_call("fwd_bwd", memory_efficient=memory_efficient)), cat=3,
           views=291 if memory_efficient else 222)


@triton_test
def test_triton_launches():
    """The triton backend's launches per call (interpreter or GPU alike): training forward 3 (conv + statistics
    epilogue, finalize, apply), eval forward 1 (conv with the folded bias epilogue), no sync."""
    train = _census(*_conv_call("train_fwd", backend="triton"), triton=True)
    evalf = _census(*_conv_call("eval_fwd", backend="triton"), triton=True)
    assert (train["triton_launches"], evalf["triton_launches"]) == (3, 1), (train["triton_by_kernel"],
                                                                          evalf["triton_by_kernel"])
    assert train["syncs"] == evalf["syncs"] == 0


# The triton aspp's rows (functional call, concatenated BatchNorm tensors, channels_last float32): launches per call,
# aten ops besides views (the host work around the launches), copies (the running statistics' two, and the 0-d
# conversion of at::mean's divisor, `to` / `_to_copy` / `copy_`, in the forward; the backward's dtype conversions
# and x's of the weight gradient), no cat, no sync. The pooling branch is two aten ops (the mean, the pooling
# conv's mm) and kernels for the rest: its BN statistics (a finalize of one-value partials), its projection bias
# and its backward (before: 54 / 45 / 164 / 216 ops besides views, 9 / 16 / 33 / 40 copies).
TRITON_ASPP_BUDGETS = {  # (mode, memory_efficient): (launches, ops besides views, copies)
    ("train_fwd", False): (7, 36, 5),
    ("eval_fwd", False): (4, 24, 3),
    ("fwd_bwd", False): (15, 101, 11),
    ("fwd_bwd", True): (22, 135, 14),
}


@triton_test
@pytest.mark.parametrize("mode,memory_efficient", list(TRITON_ASPP_BUDGETS), ids=lambda v: str(v))
def test_triton_aspp_host_work(mode, memory_efficient):
    """The triton aspp's launches, aten ops and copies per call (TRITON_ASPP_BUDGETS; docs/performance.md), no cat,
    no sync: forward 7 launches in training (branches, branch finalize, pooling finalize, pooling bias, projection,
    projection finalize, apply), 4 in eval (BN statistics, branches, pooling bias, projection)."""
    launches, ops, copies = TRITON_ASPP_BUDGETS[mode, memory_efficient]
    row = _census(*_aspp_call(mode, backend="triton", memory_efficient=memory_efficient), triton=True, calls=1)
    _check(row, ops=ops, copies=copies, views_count=False)
    assert row["triton_launches"] == launches, row["triton_by_kernel"]


@triton_test
@pytest.mark.parametrize("mode", ["train_fwd", "fwd_bwd"])
def test_triton_upsample_cross_entropy_never_synchronizes(mode):
    """The triton backend decides bad labels in its kernel (NaN) and reads nothing back: no item(), no nonzero,
    in forward or backward (CPU tensors run it in the interpreter; their label check reads host memory)."""
    grad = mode == "fwd_bwd"
    device = device_for("triton")
    logits = _leaf(torch.randn(2, 3, 4, 4, device=device), grad)
    target = torch.randint(0, 3, (2, 8, 8), device=device)
    target[0, 0, 0] = 255

    def call():
        with torch.set_grad_enabled(grad):
            loss = deeplab_ops.upsample_cross_entropy(logits, target, backend="triton")
        if grad:
            loss.backward()

    row = _census(call, [logits], triton=True)
    _check(row)
    assert row["triton_launches"] == 1 + grad, row["triton_by_kernel"]



# ---- NCHW input on triton: one conversion per activation the op reads or returns ---------------------------

_SCALARS = 32  # bytes: 0-d float32 copies of Python scalars wrapped on CPU (a mean's or a division's divisor, <= 0)


def _nchw_row(call_and_params) -> dict:
    # One profiled call: after the warm-up every call's census is the same (for each row here, one call's equals the
    # average of three), and an interpreted ASPP call with its backward takes seconds.
    row = _census(*call_and_params, triton=True, calls=1)
    _check(row)
    return row


@triton_test
@pytest.mark.parametrize("mode,memory_efficient", [("train_fwd", False), ("fwd_bwd", False), ("fwd_bwd", True)])
def test_triton_conv_bn_relu_nchw_conversions(mode, memory_efficient):
    """An NCHW input on triton, whose kernels read and write NHWC: what copy_ writes is one conversion per
    activation the op reads or returns, and the two running-statistic updates. Forward: x and the residual in, out
    back (conv_out, which only the backward reads, stays channels_last). Backward: grad_out, the saved out and x
    (the weight gradient's operand) in, grad_x and grad_residual out; memory_efficient the same: the recompute
    of conv_out (channels_last, as the forward's) and the weight gradient read one conversion of x."""
    act, stats = 1 * 4 * 4 * 4 * 4, 2 * 4 * 4  # 1x4x4x4 float32; two 4-channel running statistics
    conversions = {("train_fwd", False): 3, ("fwd_bwd", False): 8, ("fwd_bwd", True): 8}[mode, memory_efficient]
    row = _nchw_row(_conv_call(mode, backend="triton", residual=True, memory_efficient=memory_efficient,
                               layout=torch.contiguous_format))
    assert row["copy_bytes"] <= conversions * act + stats, (row["copy_bytes"], row["census_detail"])


@triton_test
@pytest.mark.parametrize("mode,memory_efficient", [("train_fwd", False), ("fwd_bwd", False), ("fwd_bwd", True)])
def test_triton_aspp_nchw_conversions(mode, memory_efficient):
    """As above for aspp (N=2, C_in=8, C=4, 5x5): forward x in and out back (branch_out and project_out, which only
    the backward reads, stay channels_last), the two running-statistic updates of the six BatchNorms; backward
    grad_out, the saved out and x in, grad_x out; and at most a few 0-d copies of Python scalars. memory_efficient:
    the same bytes (x converted once for the recompute and the weight gradient; the recompute's out a view)."""
    x, out, stats = 2 * 8 * 25 * 4, 2 * 4 * 25 * 4, 2 * 24 * 4
    budget = x + out + stats + (out + out + x + x if mode == "fwd_bwd" else 0) + _SCALARS
    row = _nchw_row(_aspp_call(mode, backend="triton", memory_efficient=memory_efficient,
                               layout=torch.contiguous_format))
    assert row["copy_bytes"] <= budget, (row["copy_bytes"], row["census_detail"])
