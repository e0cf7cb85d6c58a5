"""The ops called from several Python threads at once on CPU give the results they give one call at a time:
forward, gradients and running statistics, per backend; a shared eval-mode module too."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import Case, assert_close, make_inputs

import deeplab_ops
from deeplab_ops import backends
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

THREADS = 4
CPU = torch.device("cpu")


# The Triton interpreter keeps the launch grid in one process-wide builder, so two interpreted launches from two
# threads would corrupt each other ("InterpreterError: ValueError('x >= grid_dim[0]')"): deeplab_ops/triton
# serializes calls on CPU tensors with a lock, which these tests exercise.
def _triton_param(op: str, **call):
    try:
        reasons = backends.not_supported_reasons("triton", op, CPU, **call)
    except TypeError:
        reasons = []
    return pytest.param("triton", marks=pytest.mark.skip(reason="; ".join(reasons))) if reasons else "triton"


CONV_BACKENDS = ["reference", "cpu", _triton_param(
    "conv_bn_relu", x=torch.randn(2, 2, 5, 5), weight=torch.randn(2, 2, 3, 3), stride=(1, 1), padding=(1, 1),
    dilation=(1, 1), training=True, residual=None)]
ASPP_BACKENDS = ["reference", "cpu", _triton_param("aspp", x=torch.randn(2, 2, 5, 5), rates=(1, 2), training=True)]


def _concurrently(fn, jobs):
    """Run fn(job) for every job on THREADS threads that start together; results in job order."""
    barrier = threading.Barrier(min(THREADS, len(jobs)))

    def run(indexed):
        i, job = indexed
        if i < THREADS:
            barrier.wait(timeout=60)
        return fn(job)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, enumerate(jobs)))


def _conv_job(case: Case, backend: str, seed: int):
    torch.manual_seed(seed)  # the inputs only; the threads draw nothing else
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64)
    return (case, backend, (x, w, g, b, rm, rv, res))


def _run_conv(job):
    case, backend, (x, w, g, b, rm, rv, res) = job
    leaves = [t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, w, g, b)]
    rm, rv = rm.clone(), rv.clone()
    out = deeplab_ops.conv_bn_relu(*leaves, rm, rv, stride=case.stride, padding=case.pad, dilation=case.dilation,
                                   training=case.training, residual=res, relu=case.relu, backend=backend)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out) * 0.5 + out.detach())
    return out.detach(), rm, rv, grads


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_bn_relu_from_threads(backend):
    small = backend == "triton"
    cases = [Case(2, 3, 6, 5, 4, dilation=2, residual=True), Case(2, 4, 7, 7, 3, stride=2, channels_last=True),
             Case(1, 2, 5, 6, 2, k=1, training=False), Case(3, 3, 4, 4, 4, relu=False)]
    if not small:
        cases = [Case(c.n, c.cin * 4, c.h * 2, c.w * 2, c.cout * 4, c.k, c.stride, c.dilation, None, c.residual,
                      c.relu, c.training, c.channels_last) for c in cases] * 2
    jobs = [_conv_job(c, backend, seed) for seed, c in enumerate(cases)]
    expected = [_run_conv(j) for j in jobs]  # one at a time
    got = _concurrently(_run_conv, jobs)
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        what = f"{backend} job {i} [{jobs[i][0]}]"
        assert_close(a[0], e[0], f"{what} output", 1e-12, 1e-12)
        assert_close(a[1], e[1], f"{what} running_mean", 1e-12, 1e-12)
        assert_close(a[2], e[2], f"{what} running_var", 1e-12, 1e-12)
        for name, ga, ge in zip(("x", "weight", "bn_weight", "bn_bias"), a[3], e[3], strict=True):
            assert_close(ga, ge, f"{what} grad {name}", 1e-12, 1e-12)


def _run_aspp(job):
    backend, module, x = job
    x = x.clone().requires_grad_()
    out = module(x)
    (gx,) = torch.autograd.grad(out, x, out.detach() + 1.0)
    return out.detach(), gx, {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("backend", ASPP_BACKENDS)
def test_aspp_from_threads(backend):
    """Every thread its own FusedASPP in training (running statistics updated): as one call at a time."""
    small = backend == "triton"
    cin, c, size = (3, 2, 6) if small else (16, 8, 17)

    def make(seed):
        torch.manual_seed(seed)
        m = FusedASPP(cin, (1, 3, 6), c, backend=backend).double()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.3)
        return m

    n_jobs = THREADS if small else 2 * THREADS
    xs = [torch.randn(2, cin, size, size + 1, dtype=torch.float64) for _ in range(n_jobs)]
    expected = [_run_aspp((backend, make(i), xs[i])) for i in range(n_jobs)]
    got = _concurrently(_run_aspp, [(backend, make(i), xs[i]) for i in range(n_jobs)])
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(a[0], e[0], f"{backend} aspp job {i} output", 1e-12, 1e-12)
        assert_close(a[1], e[1], f"{backend} aspp job {i} grad x", 1e-12, 1e-12)
        for k in e[2]:
            assert_close(a[2][k], e[2][k], f"{backend} aspp job {i} {k}", 1e-12, 1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_shared_eval_module_from_threads(backend):
    """One module in eval mode (nothing mutated) called from every thread at once."""
    torch.manual_seed(0)
    block = FusedConvBNReLU(8, 8, 3, padding=2, dilation=2, backend=backend).double().eval()
    with torch.no_grad():
        block[1].running_mean.normal_()
        block[1].running_var.uniform_(0.5, 1.5)
    xs = [torch.randn(2, 8, 15, 13, dtype=torch.float64) for _ in range(3 * THREADS)]
    expected = [block(x) for x in xs]
    got = _concurrently(block, xs)
    for i, (a, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(a, e, f"shared module job {i}", 1e-12, 1e-12)
