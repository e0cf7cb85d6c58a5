"""upsample_cross_entropy against its reference (F.interpolate bilinear + F.cross_entropy): forward and gradient
over odd shapes, up- and downsampling factors (integer and not), K = 1..40, both align_corners, all reductions,
ignore labels sprinkled and all-ignored; gradcheck; opcheck; argument errors; what the op saves and allocates;
GPU-only half-precision and large-shape tests."""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import CUDA, TRITON_DEVICE, backend_param, cuda_test, device_for, triton_param, triton_test

import deeplab_ops
from deeplab_ops import reference
from deeplab_ops.common import interpreter_active

_ops = torch.ops.deeplab_ops
REDUCTIONS = ("mean", "sum", "none")
# Every backend on the device it runs on (device_for): triton on CUDA tensors where a GPU is visible.
BACKENDS = ("reference", "cpu", backend_param("triton"))
FUSED = ("cpu", backend_param("triton"))

# (N, K, h, w, H, W): odd sizes; factors 1..8 and non-integer; downsampling; 1x1 grids; K = 1 and K > 32 (the
# Triton kernels' class blocks).
CASES = [
    (2, 5, 4, 5, 13, 11),
    (1, 1, 3, 4, 7, 9),
    (2, 21, 3, 3, 17, 16),
    (1, 3, 7, 6, 4, 5),
    (2, 4, 5, 5, 5, 5),
    (1, 6, 2, 3, 16, 24),
    (1, 3, 1, 1, 5, 4),
    (1, 2, 4, 3, 1, 1),
    (3, 7, 4, 4, 8, 8),
    (1, 40, 2, 2, 5, 7),
]


def _ids(case):
    return "x".join(str(v) for v in case)


def make_inputs(case, dtype=torch.float64, device="cpu", ignore_index=255, ignore_frac=0.2):
    n, k, h, w, big_h, big_w = case
    logits = (torch.randn(n, k, h, w, dtype=dtype, device=device) * 2).requires_grad_()
    target = torch.randint(0, k, (n, big_h, big_w), device=device)
    target[torch.rand(n, big_h, big_w, device=device) < ignore_frac] = ignore_index
    return logits, target


def _compare(got, want, what, atol, rtol):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    err = (got.double() - want.double()).abs()
    tol = atol + rtol * want.double().abs()
    bad = ~(err <= tol) & ~(got.isnan() & want.isnan())
    if bad.any():
        idx = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} values differ; max abs error {err.max().item():.3e}; "
            f"first at {idx}: got {got[idx].item()!r}, want {want[idx].item()!r}"
        )


def _check_against_reference(case, backend, align_corners, reduction, dtype=torch.float64, atol=1e-10,
                             rtol=1e-10, ignore_index=255):
    logits, target = make_inputs(case, dtype=dtype, device=device_for(backend), ignore_index=ignore_index)
    got = deeplab_ops.upsample_cross_entropy(logits, target, ignore_index, align_corners, reduction, backend=backend)
    ref_logits = logits.detach().double().requires_grad_()
    want = reference.upsample_cross_entropy(ref_logits, target, ignore_index, align_corners, reduction)
    tag = f"{backend} {_ids(case)} align_corners={align_corners} {reduction} {dtype}"
    _compare(got, want.to(dtype), f"loss ({tag})", atol, rtol)
    grad_out = torch.randn_like(want)
    (grad,) = torch.autograd.grad(got, logits, grad_out.to(dtype))
    (grad_want,) = torch.autograd.grad(want, ref_logits, grad_out)
    _compare(grad, grad_want.to(dtype), f"dlogits ({tag})", atol, rtol)


# ---- against the reference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_matches_reference_float64(backend, case):
    for align_corners in (False, True):
        for reduction in REDUCTIONS:
            _check_against_reference(case, backend, align_corners, reduction)


# triton: every case on CUDA tensors, one in the interpreter (slow).
_FLOAT32 = [("cpu", CASES[0]), ("cpu", CASES[2]), ("cpu", CASES[5])] + [
    triton_param("triton", case) for case in (CASES if CUDA else CASES[5:6])]


@pytest.mark.parametrize("backend,case", _FLOAT32, ids=lambda v: _ids(v) if isinstance(v, tuple) else v)
def test_matches_reference_float32(backend, case):
    # The float32 reference materializes and rounds the upsampled logits; ours interpolates in float32 (triton)
    # or double (cpu): a few ulps of the logits' scale.
    for align_corners in (False, True):
        for reduction in REDUCTIONS:
            _check_against_reference(case, backend, align_corners, reduction, dtype=torch.float32, atol=2e-5,
                                     rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 0, 3])
def test_other_ignore_index(backend, ignore_index):
    # ignore_index inside [0, K) ignores that class, as PyTorch does.
    _check_against_reference((2, 5, 3, 4, 9, 10), backend, False, "mean", ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored(backend, reduction):
    logits, target = make_inputs((2, 4, 3, 3, 7, 8), device=device_for(backend), ignore_frac=1.0)
    got = deeplab_ops.upsample_cross_entropy(logits, target, reduction=reduction, backend=backend)
    want = reference.upsample_cross_entropy(logits, target, reduction=reduction)
    if reduction == "mean":
        assert got.isnan() and want.isnan(), f"mean over no pixel: got {got}, PyTorch gives {want} (NaN)"
    _compare(got, want, f"all-ignored {reduction}", 0, 0)
    (grad,) = torch.autograd.grad(got.sum() if reduction == "none" else got, logits)
    assert torch.equal(grad, torch.zeros_like(grad)), "all-ignored gradient must be exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(backend, reduction):
    logits, target = make_inputs((0, 3, 4, 4, 8, 8), device=device_for(backend))
    got = deeplab_ops.upsample_cross_entropy(logits, target, reduction=reduction, backend=backend)
    want = reference.upsample_cross_entropy(logits, target, reduction=reduction)
    _compare(got, want, f"empty batch {reduction}", 0, 0)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    assert grad.shape == logits.shape


def test_auto_backend_on_cpu_is_cpu(monkeypatch):
    monkeypatch.delenv("DEEPLAB_OPS_BACKEND", raising=False)
    from deeplab_ops import backends

    logits, target = make_inputs((1, 3, 2, 2, 4, 4))
    assert backends.resolve(None, "upsample_cross_entropy", logits.device, logits=logits, target=target) == "cpu"
    got = deeplab_ops.upsample_cross_entropy(logits, target)
    _compare(got, reference.upsample_cross_entropy(logits, target), "auto", 1e-12, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_on_cpu_runs_on_cpu_triton_refuses_bfloat16(dtype):
    logits, target = make_inputs((1, 3, 2, 2, 4, 4), dtype=torch.float32)
    # Without the interpreter (a GPU machine), triton refuses every CPU tensor first; the interpreter runs float16
    # (Triton >= 3.6) and refuses bfloat16 (stored as raw bits).
    if interpreter_active() and dtype == torch.float16:
        got = deeplab_ops.upsample_cross_entropy(logits.to(dtype), target, backend="triton")
        want = reference.upsample_cross_entropy(logits.to(dtype).double(), target)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)
    else:
        why = "bfloat16 runs on CUDA tensors only" if interpreter_active() else "CPU tensors only in the Triton"
        with pytest.raises(RuntimeError, match=why):
            deeplab_ops.upsample_cross_entropy(logits.to(dtype), target, backend="triton")
    got = deeplab_ops.upsample_cross_entropy(logits.to(dtype), target)  # auto: cpu, as float32
    assert got.dtype == dtype
    want = reference.upsample_cross_entropy(logits.to(dtype).float(), target).to(dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the stencil is PyTorch's ---------------------------------------------------------------------------------


@pytest.mark.parametrize("align_corners", [False, True])
def test_stencil_tables_reproduce_interpolate(align_corners):
    # Interpolating with the tables (neighbours, weights) equals F.interpolate for every size pair up to 24, up
    # and down, integer and non-integer ratios: same source indices, clamping and scale-from-sizes.
    from deeplab_ops.triton.upsample_ce import axis_tables

    sizes = range(1, 25)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        for in_size in sizes:
            x = torch.randn(1, 1, 1, in_size, dtype=dtype)
            for out_size in sizes:
                i0, i1, l0, l1, start, end, *_ = axis_tables(in_size, out_size, align_corners, dtype,
                                                            torch.device("cpu"))
                mine = l0 * x[0, 0, 0, i0.long()] + l1 * x[0, 0, 0, i1.long()]
                theirs = torch.nn.functional.interpolate(x, size=(1, out_size), mode="bilinear",
                                                         align_corners=align_corners)[0, 0, 0]
                _compare(mine, theirs, f"{in_size}->{out_size} align_corners={align_corners} {dtype}", tol, tol)
                # The gather ranges hold exactly the outputs that read each low-res index.
                for i in range(in_size):
                    readers = ((i0 == i) | (i1 == i)).nonzero().flatten().tolist()
                    assert readers == list(range(int(start[i]), int(end[i]))), (in_size, out_size, i)


# ---- random shapes --------------------------------------------------------------------------------------------


def _random_cases(count, max_k=21, max_low=6, max_factor=8):
    # From the global generator, which conftest seeds per test: fresh shapes per test, replayable on failure.
    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,)))

    cases = []
    for _ in range(count):
        h, w = ri(1, max_low), ri(1, max_low)
        # Output sizes from a random real factor in [1/2, max_factor]: non-integer ratios and downsampling.
        fy, fx = (0.5 + (max_factor - 0.5) * float(torch.rand(1)) for _ in range(2))
        cases.append(((ri(1, 3), ri(1, max_k), h, w, max(1, round(h * fy)), max(1, round(w * fx))),
                      bool(ri(0, 1)), REDUCTIONS[ri(0, 2)]))
    return cases


@pytest.mark.parametrize("backend,count,max_factor", [("cpu", 30, 8), triton_param("triton", 3, 4)])
def test_random_shapes(backend, count, max_factor):
    for case, align_corners, reduction in _random_cases(count, max_factor=max_factor):
        _check_against_reference(case, backend, align_corners, reduction)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_cpu_float32_wide_rows_and_wide_logit_range(scale):
    # The CPU kernels' float32 exp (its own, vectorized) over softmax arguments from 0 down past its underflow
    # (scale 40: differences of a few hundred), on rows wider than a vector, odd widths, against the float64
    # reference; gradients relative to their largest value.
    torch.manual_seed(7)
    for n, k, h, w, big_h, big_w in [(2, 21, 5, 9, 37, 131), (1, 3, 4, 3, 29, 23)]:
        logits = (torch.randn(n, k, h, w) * scale).requires_grad_()
        target = torch.randint(0, k, (n, big_h, big_w))
        target[torch.rand(n, big_h, big_w) < 0.2] = 255
        for reduction in REDUCTIONS:
            got = deeplab_ops.upsample_cross_entropy(logits, target, 255, False, reduction, backend="cpu")
            ref_logits = logits.detach().double().requires_grad_()
            want = reference.upsample_cross_entropy(ref_logits, target, 255, False, reduction)
            _compare(got, want.float(), f"loss {reduction} scale {scale}", 1e-5 * scale, 2e-6)
            grad_out = torch.randn_like(want)
            (grad,) = torch.autograd.grad(got, logits, grad_out.float())
            (grad_want,) = torch.autograd.grad(want, ref_logits, grad_out)
            _compare(grad, grad_want.float(), f"dlogits {reduction} scale {scale}",
                     1e-6 * grad_want.abs().max().item(), 1e-5)


def test_cpu_float32_gradient_as_accurate_as_eager_at_large_logits():
    # The forward's logsumexp is stored in float32 (|lse| * 2^-24 off); the backward recomputes the logits in
    # double, so exp(z - lse) alone carried that error into every probability (6e-5 at logits ~1e3, 2.8e-4 at 1e4,
    # against eager's 3e-7): the backward divides it out. Truth: float64 on the same float32 logits.
    torch.manual_seed(0)
    n, k, h, w, big_h, big_w = 2, 4, 3, 3, 5, 6
    target = torch.randint(0, k, (n, big_h, big_w))
    up = torch.nn.functional.interpolate
    for scale in (30.0, 1e3, 1e4):
        x = torch.randn(n, k, h, w) * scale
        truth = x.double().requires_grad_()
        torch.nn.functional.cross_entropy(up(truth, size=(big_h, big_w), mode="bilinear"), target,
                                          reduction="sum").backward()
        eager = x.clone().requires_grad_()
        torch.nn.functional.cross_entropy(up(eager, size=(big_h, big_w), mode="bilinear"), target,
                                          reduction="sum").backward()
        ours = x.clone().requires_grad_()
        deeplab_ops.upsample_cross_entropy(ours, target, reduction="sum", backend="cpu").backward()
        err_eager = (eager.grad.double() - truth.grad).abs().max().item()
        err_ours = (ours.grad.double() - truth.grad).abs().max().item()
        assert err_ours <= max(2 * err_eager, 1e-6), (scale, err_ours, err_eager)


def test_cpu_float32_exp_just_above_its_underflow():
    # Softmax arguments between -87.33 (below it the CPU kernels' exp returns 0) and -87: the range reduction
    # clamped its input at -87 and returned exp(-87) for all of them (1.35x too large at -87.3). The non-target
    # class's gradient is that exp alone; identity interpolation (align_corners, the same size) leaves it bare.
    # Truth: float64 on the same float32 logits.
    d = torch.linspace(-87.32, -86.99, 12)
    x = torch.zeros(1, 2, 3, 4)
    x[0, 1] = d.view(3, 4)
    target = torch.zeros(1, 3, 4, dtype=torch.long)
    ours = x.clone().requires_grad_()
    deeplab_ops.upsample_cross_entropy(ours, target, align_corners=True, reduction="sum", backend="cpu").backward()
    truth = torch.exp(d.double() - torch.log1p(torch.exp(d.double()))).view(3, 4)
    rel = ((ours.grad[0, 1].double() - truth).abs() / truth).max().item()
    assert rel <= 1e-5, f"dlogits of the class at -87.3..-87: {rel:.3g} relative off"


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), backend_param("cuda")])
@pytest.mark.parametrize("shift", [0.0, 100.0, 1000.0, 3000.0])
def test_large_logits_as_exact_as_eager(backend, shift):
    # Confident pixels at large logits: the target's gradient is p - 1 with 1 - p ~ 7e-3. A logsumexp saved as one
    # rounded float32 (m + log s, |m| * 2^-24 off) put that error into every probability: 4e-3 relative on those
    # gradients at logits ~1e3, 100x eager's. Saved as its two parts, (z - m) - log s is exact near the maximum, as
    # log_softmax is. align_corners with the same size: the interpolation is the identity, so the logsumexp is the
    # only rounding that differs from eager's. Truth: float64 on the same float32 logits.
    torch.manual_seed(0)
    n, k, h, w = 2, 21, 13, 17
    target = torch.randint(0, k, (n, h, w))
    x = torch.randn(n, k, h, w) + shift
    x.scatter_(1, target[:, None], 8 + shift)

    def run(fn, logits, tgt):
        logits = logits.clone().requires_grad_()
        loss = fn(logits, tgt)
        loss.backward(torch.ones_like(loss))
        return loss.detach().double().cpu(), logits.grad.double().cpu()

    def eager(logits, tgt):
        up = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=True)
        return torch.nn.functional.cross_entropy(up, tgt, reduction="none")

    def ours(logits, tgt):
        return deeplab_ops.upsample_cross_entropy(logits, tgt, align_corners=True, reduction="none", backend=backend)

    def rel(got, want):
        return ((got - want).abs() / want.abs().clamp_min(1e-30)).max().item()

    loss64, grad64 = run(eager, x.double(), target)
    loss_e, grad_e = run(eager, x, target)
    device = device_for(backend)
    loss_o, grad_o = run(ours, x.to(device), target.to(device))
    assert rel(loss_o, loss64) <= 3 * rel(loss_e, loss64) + 1e-6, (rel(loss_o, loss64), rel(loss_e, loss64))
    assert rel(grad_o, grad64) <= 3 * rel(grad_e, grad64) + 1e-6, (rel(grad_o, grad64), rel(grad_e, grad64))


def test_reference_backend_under_torch_func_and_vmap():
    # The errors of the fused backends under torch.func say: backend='reference' there. Its label scan read the
    # target's memory (numpy), which a transform's tensors do not have.
    torch.manual_seed(0)
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    t = torch.randint(0, 4, (2, 7, 6))
    t[0, 0, 0] = 255

    def eager(x, t=t):
        up = torch.nn.functional.interpolate(x, size=(7, 6), mode="bilinear")
        return torch.nn.functional.cross_entropy(up, t, ignore_index=255)

    def ours(x, t=t):
        return deeplab_ops.upsample_cross_entropy(x, t, ignore_index=255, backend="reference")

    v = torch.randn_like(x)
    tol = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(torch.func.grad(ours)(x), torch.func.grad(eager)(x), **tol)
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(eager)(x), **tol)
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (v,))[1], torch.func.jvp(eager, (x,), (v,))[1], **tol)
    targets = t.unsqueeze(0).expand(3, -1, -1, -1)
    torch.testing.assert_close(torch.vmap(lambda tt: ours(x, tt))(targets),
                               torch.vmap(lambda tt: eager(x, tt))(targets), **tol)


@pytest.mark.parametrize("backend", ["reference", "cpu", backend_param("triton")])
def test_compiles_fullgraph(backend):
    # The label scan of a CPU target (numpy, a branch on data) ran while torch.compile traced the reference and
    # triton backends: "Data-dependent branching". Traced, the graph holds the op (reference: F.cross_entropy).
    device = device_for(backend)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, device=device, requires_grad=True)
    t = torch.randint(0, 3, (2, 9, 7), device=device)
    fn = torch.compile(lambda x, t: deeplab_ops.upsample_cross_entropy(x, t, backend=backend), fullgraph=True,
                       backend="aot_eager")
    got = fn(x, t)
    (g,) = torch.autograd.grad(got, x)
    want = reference.upsample_cross_entropy(x, t)
    (g_want,) = torch.autograd.grad(want, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_bitwise_same_for_any_thread_count(dtype):
    # Row partial sums merged in order (forward), one owner per low-res row block (backward): the same bits
    # whether one thread runs every task or several share them.
    torch.manual_seed(3)
    logits = torch.randn(3, 21, 17, 13, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 21, (3, 129, 101))
    target[torch.rand(3, 129, 101) < 0.1] = 255
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for reduction in REDUCTIONS:
                loss = deeplab_ops.upsample_cross_entropy(logits, target, reduction=reduction, backend="cpu")
                (grad,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
                results.append((threads, reduction, loss, grad))
    finally:
        torch.set_num_threads(saved)
    for threads, reduction, loss, grad in results[len(REDUCTIONS):]:
        one_loss, one_grad = next((r[2], r[3]) for r in results if r[0] == 1 and r[1] == reduction)
        assert torch.equal(loss, one_loss), f"loss ({reduction}) differs between 1 and {threads} threads"
        assert torch.equal(grad, one_grad), f"dlogits ({reduction}) differ between 1 and {threads} threads"


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED)
def test_random_shapes_many(backend):
    for case, align_corners, reduction in _random_cases(60, max_k=40, max_low=9):
        _check_against_reference(case, backend, align_corners, reduction)


# ---- gradcheck, opcheck --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("align_corners", [False, True])
def test_gradcheck(backend, reduction, align_corners):
    logits, target = make_inputs((1, 3, 2, 3, 4, 3), device=device_for(backend))

    def fn(x):
        return deeplab_ops.upsample_cross_entropy(x, target, 255, align_corners, reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["", triton_param("triton_")])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(prefix, reduction):
    logits, target = make_inputs((2, 3, 2, 3, 5, 4), device=TRITON_DEVICE if prefix else "cpu")
    fwd = getattr(_ops, f"{prefix}upsample_cross_entropy_forward").default
    bwd = getattr(_ops, f"{prefix}upsample_cross_entropy_backward").default
    torch.library.opcheck(fwd, (logits, target, 255, False, reduction))
    loss, lse, count = fwd(logits.detach(), target, 255, False, reduction)
    grad = torch.randn_like(loss)
    torch.library.opcheck(bwd, (grad, logits.detach(), target, lse, count, 255, True, reduction))


# ---- argument errors ------------------------------------------------------------------------------------------


def _good():
    return torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 8, 8))


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: {**a, "logits": a["logits"][0]}, ValueError, r"logits must be a 4-D \(N, K, h, w\).*\(3, 4, 4\)"),
        (lambda a: {**a, "target": a["target"][0]}, ValueError, r"target must be a 3-D .*\(8, 8\)"),
        (lambda a: {**a, "target": a["target"].int()}, TypeError, r"dtype torch.int32; expected torch.int64"),
        (lambda a: {**a, "target": a["target"].float()}, TypeError, r"target has dtype torch.float32"),
        (lambda a: {**a, "target": a["target"][:1]}, ValueError, r"target has batch size 1 .* logits has 2"),
        (lambda a: {**a, "logits": a["logits"].long()}, TypeError, r"logits has dtype torch.int64"),
        (lambda a: {**a, "logits": a["logits"][:, :0]}, ValueError, r"logits has 0 classes"),
        (lambda a: {**a, "target": a["target"][:, :0]}, ValueError, r"target spatial size 0x8"),
        (lambda a: {**a, "reduction": "avg"}, ValueError, r"reduction='avg'; expected one of \('none', 'mean',"),
        (lambda a: {**a, "align_corners": 1}, TypeError, r"align_corners must be a bool, got 1"),
        (lambda a: {**a, "align_corners": None}, TypeError, r"align_corners must be a bool, got None"),
        (lambda a: {**a, "ignore_index": 2.5}, TypeError, r"ignore_index must be an int, got 2.5"),
        (lambda a: {**a, "ignore_index": True}, TypeError, r"ignore_index must be an int, got True"),
        (lambda a: {**a, "logits": [1.0]}, TypeError, r"logits must be a torch.Tensor, got list"),
        (lambda a: {**a, "backend": "nope"}, ValueError, r"backend='nope' is not a backend"),
        (lambda a: {**a, "target": a["target"].to("meta")}, ValueError, r"target is on meta but logits is on cpu"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_arguments(mutate, exc, match):
    logits, target = _good()
    args = mutate({"logits": logits, "target": target, "ignore_index": 255, "align_corners": False,
                   "reduction": "mean", "backend": None})
    backend = args.pop("backend")
    with pytest.raises(exc, match=match):
        deeplab_ops.upsample_cross_entropy(**args, backend=backend)


# On CPU tensors every backend raises (triton: in the interpreter); on CUDA an out-of-range label gives NaN
# (test_gpu_bad_label_is_nan_and_auto_backend, test_triton_bad_label_gives_nan_without_reading_out_of_range).
_ON_CPU = pytest.param("triton", marks=pytest.mark.skipif(
    not interpreter_active(), reason="triton on CPU tensors runs only in the Triton interpreter, which is off here "
    "(a GPU run covers triton's CUDA behaviour: NaN for a bad label)"))


@pytest.mark.parametrize("backend", ("reference", "cpu", _ON_CPU))
@pytest.mark.parametrize("label", [3, -1, 254])
def test_label_out_of_range_raises_on_cpu(backend, label):
    logits, target = _good()
    target[1, 2, 5] = label
    ours = (rf"^deeplab_ops.upsample_cross_entropy: target has label {label} at position \(1, 2, 5\); "
            r"expected labels in \[0, 3\)")
    with pytest.raises(IndexError, match=ours):  # the reference backend too: one message on every backend
        deeplab_ops.upsample_cross_entropy(logits, target, backend=backend)


def test_cpu_op_checks_labels_itself():
    # Direct op calls (no Python front door) raise too.
    logits, target = _good()
    target[0, 7, 7] = 9
    with pytest.raises(IndexError, match=r"label 9 at position \(0, 7, 7\)"):
        _ops.upsample_cross_entropy_forward(logits, target, 255, False, "mean")
    with pytest.raises(RuntimeError, match=r"reduction='avg'"):
        _ops.upsample_cross_entropy_forward(logits, target, 255, False, "avg")


@triton_test
def test_triton_bad_label_gives_nan_without_reading_out_of_range():
    # The GPU behaviour (no device-side check), through the triton kernels directly (CPU tensors: the interpreter).
    from deeplab_ops.triton import upsample_ce

    logits, target = (t.to(TRITON_DEVICE) for t in _good())
    target[0, 0, 0] = 7
    loss, lse, count = upsample_ce.forward(logits, target, 255, False, "none")
    assert loss[0, 0, 0].isnan() and not loss.view(-1)[1:].isnan().any()
    grad = upsample_ce.backward(torch.ones_like(loss), logits, target, lse, count, 255, False, "none")
    assert grad[0, :, 0, 0].isnan().all() and not grad[1].isnan().any()


# ---- memory: no (N, K, H, W) tensor ------------------------------------------------------------------------


def _saved_bytes(fn):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("backend", FUSED)
def test_saves_no_upsampled_tensor(backend):
    # What autograd keeps between forward and backward: the low-res logits, the labels, the per-pixel
    # logsumexp as its max and log-sum (2, N, H, W) and a count; the reference keeps (N, K, H, W) tensors (the
    # upsampled logits and its log-softmax). Proves the saved set only, not the peak (see test_peak_allocation_cpu).
    n, k, h, w, big_h, big_w = case = (2, 21, 4, 4, 32, 32)
    logits, target = make_inputs(case, dtype=torch.float32, device=device_for(backend))
    upsampled = n * k * big_h * big_w * 4
    out, ours = _saved_bytes(lambda: deeplab_ops.upsample_cross_entropy(logits, target, backend=backend))
    expected = logits.numel() * 4 + target.numel() * 8 + 2 * n * big_h * big_w * 4 + 4
    assert ours == expected, f"saved {ours} bytes, expected {expected} (logits + target + lse + count)"
    assert ours < upsampled, f"saved {ours} bytes >= one upsampled tensor ({upsampled} bytes)"
    _, ref = _saved_bytes(lambda: reference.upsample_cross_entropy(logits, target))
    assert ref >= upsampled, f"the reference saves {ref} bytes: the test no longer shows the difference"


def test_peak_allocation_cpu():
    # Every CPU allocation made through the c10 allocator during forward + backward (profiler memory events),
    # none as large as the upsampled logits. Does not see the kernels' std::vector scratch (O(K * w) per thread
    # in the backward, O(K) per thread and O(N * H) per call in the forward).
    n, k, h, w, big_h, big_w = case = (2, 21, 6, 6, 48, 48)
    logits, target = make_inputs(case, dtype=torch.float32)
    upsampled = n * k * big_h * big_w * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = deeplab_ops.upsample_cross_entropy(logits, target, backend="cpu")
        loss.backward()
    allocs = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert allocs, "the profiler recorded no allocation: the check is void"
    assert max(allocs) < upsampled / 4, f"an allocation of {max(allocs)} bytes (upsampled logits: {upsampled})"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        reference.upsample_cross_entropy(logits, target).backward()
    ref_max = max(e.cpu_memory_usage for e in prof.events())
    assert ref_max >= upsampled, f"the reference's largest allocation is {ref_max}: the check cannot tell"


# ---- the Triton kernels compile for GPUs (no GPU needed: Triton compiles ahead of time) --------------------------

_COMPILE_SCRIPT = r"""
import sys
sys.path.insert(0, "tests/triton")
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from test_triton_compile import ast_source
from deeplab_ops.triton import upsample_ce as U

def build(fn, ptrs, consts, arch, warps):
    sig = {a: "constexpr" if a in consts else ("*" + ptrs[a] if a in ptrs else "i32") for a in fn.arg_names}
    triton.compile(ast_source(fn, sig, consts, {}), target=GPUTarget("cuda", arch, 32),
                   options=dict(num_warps=warps))

# the GPU launchers' configurations for 21 classes upsampled 8x (16 output columns per low-res column)
block_p, fwd_k, fwd_warps = U.fwd_config(21)
block_q, block_x, bwd_k, bwd_warps = U.bwd_config(21, 16)

for dt, arch in (("fp16", 90), ("fp32", 80), ("bf16", 90), ("fp64", 80)):
    st, acc = ("fp64", tl.float64) if dt == "fp64" else ("fp32", tl.float32)
    tables = dict(y0_ptr="i32", y1_ptr="i32", x0_ptr="i32", x1_ptr="i32", ly0_ptr=st, ly1_ptr=st, lx0_ptr=st,
                  lx1_ptr=st)
    for per_pixel in (True, False):
        build(U._uce_fwd_kernel, dict(x_ptr=dt, t_ptr="i64", lse_ptr=st, loss_ptr=st, psum_ptr=st,
              pcnt_ptr="i32", **tables), dict(PER_PIXEL=per_pixel, ACC=acc, BLOCK_P=block_p, BLOCK_K=fwd_k),
              arch, fwd_warps)
        build(U._uce_bwd_kernel, dict(x_ptr=dt, t_ptr="i64", lse_ptr=st, g_ptr=st, dx_ptr=dt,
              ys_ptr="i32", ye_ptr="i32", xs_ptr="i32", xe_ptr="i32", **tables),
              dict(PER_PIXEL=per_pixel, ACC=acc, BLOCK_Q=block_q, BLOCK_X=block_x, BLOCK_K=bwd_k), arch, bwd_warps)
print("ok")
"""


def test_triton_kernels_compile_for_ampere_and_hopper():
    """Both kernels, both output modes, fp16/bf16 on sm_90 and fp32/fp64 on sm_80, with GPU tile sizes: the
    interpreter does not check what only the compiler does (types, static ifs, reshapes)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions, not interpreted
    from helpers import ROOT

    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          cwd=ROOT)  # the script imports tests/triton/test_triton_compile.py's ast_source
    assert done.returncode == 0, done.stderr[-4000:]


# ---- GPU ------------------------------------------------------------------------------------------------------

# (triton on CUDA tensors: test_matches_reference_float64 / _float32 run there where a GPU is visible)


@pytest.mark.parametrize("backend", ["cuda"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@cuda_test
def test_gpu_matches_reference(backend, case, dtype):
    for align_corners in (False, True):
        for reduction in REDUCTIONS:
            tol = 1e-10 if dtype == torch.float64 else 2e-5
            logits, target = make_inputs(case, dtype=dtype, device="cuda")
            got = deeplab_ops.upsample_cross_entropy(logits, target, 255, align_corners, reduction, backend=backend)
            ref_logits = logits.detach().double().requires_grad_()
            want = reference.upsample_cross_entropy(ref_logits, target, 255, align_corners, reduction)
            tag = f"{backend} {_ids(case)} {align_corners} {reduction} {dtype}"
            _compare(got, want.to(dtype), f"loss ({tag})", tol, tol)
            grad_out = torch.randn_like(want)
            (grad,) = torch.autograd.grad(got, logits, grad_out.to(dtype))
            (grad_want,) = torch.autograd.grad(want, ref_logits, grad_out)
            _compare(grad, grad_want.to(dtype), f"dlogits ({tag})", tol, tol)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@cuda_test
def test_gpu_half(backend, dtype, reduction):
    # Error against float64 at most 2x the reference-computed-in-half error (plus a floor for exact zeros).
    logits, target = make_inputs((4, 21, 17, 17, 129, 129), dtype=torch.float32, device="cuda")
    x64 = logits.detach().double().requires_grad_()
    want = reference.upsample_cross_entropy(x64, target, reduction=reduction)
    grad_out = torch.rand_like(want) if reduction == "none" else torch.ones_like(want)
    (g64,) = torch.autograd.grad(want, x64, grad_out)
    xh = logits.detach().to(dtype).requires_grad_()
    ref_h = reference.upsample_cross_entropy(xh, target, reduction=reduction)
    (gh,) = torch.autograd.grad(ref_h, xh, grad_out.to(dtype))
    xo = logits.detach().to(dtype).requires_grad_()
    got = deeplab_ops.upsample_cross_entropy(xo, target, reduction=reduction, backend=backend)
    (go,) = torch.autograd.grad(got, xo, grad_out.to(dtype))
    assert got.dtype == dtype and go.dtype == dtype
    if reduction == "mean" and not ref_h.isfinite().all() and want.to(dtype).isfinite().all():
        # PyTorch's half 'mean' accumulates its 4 x 129 x 129 pixel losses in half: the sum passes 65504 and the mean,
        # about 4, comes out inf (an H200, float16). Ours accumulates in float32 and is finite, as the mean is. The
        # reference in half is then its per-pixel losses (computed in half) averaged in float64.
        with torch.no_grad():
            per_pixel = reference.upsample_cross_entropy(xh, target, reduction="none")
        ref_h = per_pixel.double().sum() / (target != 255).sum()
    for what, ours, theirs, exact in (("loss", got, ref_h, want), ("dlogits", go, gh, g64)):
        if not torch.isfinite(theirs).all():
            # float16's 'sum' over 4 x 129 x 129 pixels (~2e5) is beyond its largest value (65504): the reference in
            # half overflows to inf where float64 does not, and ours must overflow where it does, not compute NaN
            assert torch.isfinite(exact).all(), f"{what}: the float64 reference is not finite"
            assert torch.equal(ours.isinf(), theirs.isinf()) and torch.equal(ours.isnan(), theirs.isnan()), \
                f"{what}: ours overflows at other places than the reference in {dtype}"
            finite = torch.isfinite(theirs)
            ours, theirs, exact = ours[finite], theirs[finite], exact[finite]
            if exact.numel() == 0:
                continue
        err = (ours.double() - exact).abs().max().item()
        ref_err = (theirs.double() - exact).abs().max().item()
        floor = 1e-3 * exact.abs().max().item()
        assert err <= 2 * ref_err + floor, f"{what}: error {err:.3e} vs reference-in-{dtype} {ref_err:.3e}"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@cuda_test
def test_gpu_large_memory_and_time(backend):
    # VOC-like: 8 x 21 x 65 x 65 logits -> 513 x 513 labels. Peak extra memory during forward + backward stays
    # far below one upsampled tensor (8 * 21 * 513^2 * 4 B = 177 MB).
    n, k, h, w, big_h, big_w = case = (8, 21, 65, 65, 513, 513)
    logits, target = make_inputs(case, dtype=torch.float32, device="cuda")
    upsampled = n * k * big_h * big_w * 4
    loss = deeplab_ops.upsample_cross_entropy(logits, target, backend=backend)  # warm-up (compiles)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = deeplab_ops.upsample_cross_entropy(logits, target, backend=backend)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < upsampled / 4, f"peak extra memory {peak} bytes; one upsampled tensor is {upsampled}"
    x64 = logits.detach().double().requires_grad_()
    want = reference.upsample_cross_entropy(x64, target)
    (g64,) = torch.autograd.grad(want, x64)
    assert math.isclose(loss.item(), want.item(), rel_tol=1e-5), (loss.item(), want.item())
    _compare(grad.double(), g64, f"large dlogits ({backend})", 1e-9, 1e-4)
    print(f"{backend}: forward + backward {elapsed * 1e3:.2f} ms, peak extra {peak / 2**20:.1f} MiB")


@cuda_test
def test_gpu_bad_label_is_nan_and_auto_backend():
    logits, target = make_inputs((2, 3, 4, 4, 8, 8), dtype=torch.float32, device="cuda")
    target[0, 0, 0] = 3
    for backend in ("cuda", "triton"):
        loss = deeplab_ops.upsample_cross_entropy(logits, target, backend=backend)
        assert loss.isnan(), f"{backend}: an out-of-range label must give NaN on CUDA, got {loss}"


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), backend_param("cuda")])
@pytest.mark.parametrize("masked", [1, 8])
def test_leading_minus_inf_classes_give_eager_loss(backend, masked):
    # Classes masked out with -inf logits (a label set restricted per image): the CUDA kernel's one-pass logsumexp
    # computed exp(-inf - (-inf)) = NaN while every class so far was -inf (class 0 masked: NaN loss and gradients
    # where F.cross_entropy is finite); the Triton kernel did per block of classes (dec 1 reviews).
    device = device_for(backend)
    torch.manual_seed(0)
    logits = torch.randn(2, 21, 8, 8, dtype=torch.float64, device=device) * 3
    logits[:, :masked] = float("-inf")
    target = torch.randint(masked, 21, (2, 3, 3), device=device)  # 8x8 -> 3x3: every bilinear weight > 0
    x = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    got = deeplab_ops.upsample_cross_entropy(x, target, backend=backend)
    want = F.cross_entropy(F.interpolate(ref, size=(3, 3), mode="bilinear", align_corners=False), target)
    assert torch.isfinite(want)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    got.backward()
    want.backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-9, atol=1e-9)


@cuda_test
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_a_new_configuration_neither_synchronizes_nor_enters_a_capture_unwarmed(backend):
    """The stencil tables' first copy to the GPU was a blocking copy: a host synchronization per new configuration
    (an evaluation over images of many sizes paid one per size), and a first call inside a CUDA-graph capture failed
    the capture with CUDA's own error. Now the copy is asynchronous (pinned memory, an event for other streams) and
    the capture case is refused by name."""
    warm_logits, warm_target = make_inputs((2, 5, 6, 7, 23, 29), dtype=torch.float32, device="cuda")
    deeplab_ops.upsample_cross_entropy(warm_logits, warm_target, backend=backend).backward()  # kernels compiled
    logits, target = make_inputs((2, 5, 6, 7, 31, 37), dtype=torch.float32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = deeplab_ops.upsample_cross_entropy(logits, target, backend=backend)
        (grad,) = torch.autograd.grad(loss, logits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    x = logits.detach().clone().requires_grad_()
    want = F.cross_entropy(F.interpolate(x, size=(31, 37), mode="bilinear", align_corners=False), target,
                           ignore_index=255)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-4, atol=1e-6)
    # on another stream, first read: it waits for the copies (event) and gives the same result
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        again = deeplab_ops.upsample_cross_entropy(logits.detach(), target, backend=backend)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(again, loss.detach(), rtol=0, atol=0)
    logits, target = make_inputs((2, 5, 6, 7, 41, 43), dtype=torch.float32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"first call of an upsampling from \d+ to (41|43) \(align_corners=False\) "
                                           r"inside a CUDA-graph capture.*before capturing"):
        with torch.cuda.graph(graph):
            deeplab_ops.upsample_cross_entropy(logits.detach(), target, backend=backend)


@cuda_test
def test_cuda_backward_refuses_saved_tensors_elsewhere_and_counts_exactly():
    # The CUDA backward read lse / grad / valid_count through raw device pointers: a CPU tensor from a direct
    # torch.ops call was read as a device address (illegal memory access), and an empty valid_count for 'mean'
    # broadcast grad to an empty tensor whose first value the kernel read (dec 1, a static review).
    logits = torch.randn(2, 3, 4, 4, device="cuda")
    target = torch.randint(0, 3, (2, 8, 8), device="cuda")
    loss, lse, valid = _ops.upsample_cross_entropy_forward(logits, target, 255, False, "mean")
    grad = torch.ones((), device="cuda")
    with pytest.raises(RuntimeError, match="lse is on cpu but logits is on cuda"):
        _ops.upsample_cross_entropy_backward(grad, logits, target, lse.cpu(), valid, 255, False, "mean")
    with pytest.raises(RuntimeError, match="grad is on cpu but logits is on cuda"):
        _ops.upsample_cross_entropy_backward(grad.cpu(), logits, target, lse, valid, 255, False, "mean")
    with pytest.raises(RuntimeError, match="valid_count must be one value"):
        _ops.upsample_cross_entropy_backward(grad, logits, target, lse, valid.new_empty(0), 255, False, "mean")


@pytest.mark.parametrize("lse_shape, grad_shape, reduction, says", [
    ((2, 4, 11), (), "mean",
     "lse must have shape (2, 2, 9, 11) (the forward's max and log-sum planes), got [2, 4, 11]"),
    ((2, 2, 9, 11), (3,), "sum", "grad must have one element for reduction='sum', got shape [3]"),
    ((2, 2, 9, 11), (2, 9), "none", "grad must have shape [2, 9, 11] for reduction='none', got [2, 9]"),
])
def test_the_cpu_backward_op_called_directly_checks_its_saved_tensors(lse_shape, grad_shape, reduction, says):
    # (the front door never passes these wrong; a direct torch.ops call may: one check, shared with the CUDA op)
    logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 9, 11))
    with pytest.raises(RuntimeError, match=re.escape(says)):
        torch.ops.deeplab_ops.upsample_cross_entropy_backward(torch.ones(grad_shape), logits, target,
                                                              torch.zeros(lse_shape), torch.ones(()), 255, False,
                                                              reduction)
