"""Shared test utilities: where each backend runs (TRITON_DEVICE, the marks), fresh inputs, a fused call against
its reference on the same inputs, and the Python-frame count of a call's host path."""

from __future__ import annotations

import collections
import gc
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import deeplab_ops
from deeplab_ops import reference
from deeplab_ops.common import interpreter_active

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parent.parent  # the repository root

# Where the triton backend runs: CUDA tensors where a GPU is visible, else CPU tensors in the Triton interpreter
# (conftest turns it on; DEEPLAB_OPS_TEST_NO_INTERPRETER=1 leaves it off, and then triton cannot run here).
TRITON_DEVICE = "cuda" if CUDA else "cpu"
TRITON_RUNS = CUDA or interpreter_active()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device; none is visible")
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS,
    reason="needs a GPU: the triton backend runs CPU tensors only in the Triton interpreter, which is off here",
)
# `gpu`: exercises a CUDA or Triton path (`pytest -m gpu`, the GPU suite's first phase). Triton tests run on CUDA
# tensors where a GPU is visible and in the interpreter where none is; CUDA tests are skipped where none is.
TRITON_MARKS = (pytest.mark.gpu, needs_triton)
CUDA_MARKS = (pytest.mark.gpu, needs_cuda)


# The half dtypes of the triton tests: float16 wherever triton runs (the interpreter too, from Triton 3.6:
# deeplab_ops.common.interpreter_dtype_refusal), bfloat16 on a GPU only.
HALF_PARAMS = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not CUDA, reason="bfloat16 needs a GPU (the interpreter stores it as raw bits)"))]


def triton_test(fn):
    """Decorator: a test that runs the triton backend on TRITON_DEVICE (marked `gpu`, skipped where triton cannot
    run)."""
    return pytest.mark.gpu(needs_triton(fn))


def cuda_test(fn):
    """Decorator: a test that needs a CUDA device (marked `gpu`, skipped where none is visible)."""
    return pytest.mark.gpu(needs_cuda(fn))


def triton_param(*values, id: str | None = None):
    """A parametrize entry that runs the triton backend (marked `gpu`, skipped where triton cannot run)."""
    return pytest.param(*values, marks=TRITON_MARKS, id=id)


def cuda_param(*values, id: str | None = None):
    """A parametrize entry that needs a CUDA device (marked `gpu`)."""
    return pytest.param(*values, marks=CUDA_MARKS, id=id)


def backend_param(backend: str):
    """`backend` as a parametrize entry with the marks it needs: triton and cuda are `gpu` tests."""
    if backend == "triton":
        return triton_param(backend)
    if backend == "cuda":
        return cuda_param(backend)
    return backend


def device_for(backend: str) -> str:
    """The device a test builds `backend`'s inputs on: CUDA for cuda, TRITON_DEVICE for triton, else CPU."""
    return {"cuda": "cuda", "triton": TRITON_DEVICE}.get(backend, "cpu")


@dataclass(frozen=True)
class Case:
    n: int
    cin: int
    h: int
    w: int
    cout: int
    k: int = 3
    stride: int = 1
    dilation: int = 1
    padding: int | None = None  # None: dilation * (k // 2), "same"-style as DeepLab uses
    residual: bool = False
    relu: bool = True
    training: bool = True
    channels_last: bool = False

    @property
    def pad(self) -> int:
        return self.dilation * (self.k // 2) if self.padding is None else self.padding

    def __str__(self) -> str:
        return (
            f"{self.n}x{self.cin}x{self.h}x{self.w}->{self.cout} k{self.k} s{self.stride} d{self.dilation} p{self.pad}"
            f"{' res' if self.residual else ''}{'' if self.relu else ' norelu'}"
            f"{' train' if self.training else ' eval'}{' CL' if self.channels_last else ''}"
        )


def make_inputs(case: Case, dtype=torch.float32, device="cpu", mean_shift: float = 0.0):
    """Fresh random inputs for a case: x, conv weight, BN params, running stats, residual (or None)."""
    g = dict(dtype=dtype, device=device)
    x = torch.randn(case.n, case.cin, case.h, case.w, **g)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(case.cout, case.cin, case.k, case.k, **g) / (case.cin * case.k * case.k) ** 0.5
    bn_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    gb = dict(dtype=bn_dtype, device=device)
    bn_weight = torch.rand(case.cout, **gb) + 0.5
    bn_bias = torch.randn(case.cout, **gb) + mean_shift
    running_mean = torch.randn(case.cout, **gb) * 0.1
    running_var = torch.rand(case.cout, **gb) + 0.5
    residual = None
    if case.residual:
        ho = (case.h + 2 * case.pad - case.dilation * (case.k - 1) - 1) // case.stride + 1
        wo = (case.w + 2 * case.pad - case.dilation * (case.k - 1) - 1) // case.stride + 1
        residual = torch.randn(case.n, case.cout, ho, wo, **g)
        if case.channels_last:
            residual = residual.contiguous(memory_format=torch.channels_last)
    return x, weight, bn_weight, bn_bias, running_mean, running_var, residual


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for comparing a fused result in `dtype` with the float64 reference."""
    return {
        torch.float64: (1e-9, 1e-9),
        torch.float32: (2e-4, 2e-4),
        torch.bfloat16: (5e-2, 5e-2),
        torch.float16: (1e-2, 1e-2),
    }[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float) -> None:
    """Compare with a scale-aware tolerance; the failure message says what, where and by how much."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = expected[expected.isfinite()]
    scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, atol=atol * scale, rtol=rtol, equal_nan=True,
        msg=lambda m: f"{what} differs from the reference (atol {atol}*{scale:.3g}, rtol {rtol}):\n{m}",
    )


def run_and_compare(case: Case, backend: str, dtype=torch.float32, device: str | None = None,
                    grads: bool = True) -> None:
    """Forward, every gradient and the running statistics of `backend` against the float64 reference, on `device`
    (default: where `backend` runs, `device_for`)."""
    x, w, gamma, beta, rm, rv, res = make_inputs(case, dtype, device or device_for(backend))
    atol, rtol = tolerances(dtype)

    def prepared(t, dt=None):
        if t is None:
            return None
        t = t.detach().clone(memory_format=torch.preserve_format)
        if dt is not None:
            t = t.to(dt)
        return t.requires_grad_(grads and t.is_floating_point())

    ours = [prepared(t) for t in (x, w, gamma, beta, res)]
    ref = [prepared(t, torch.float64) for t in (x, w, gamma, beta, res)]
    rm_ours, rv_ours = rm.clone(), rv.clone()
    rm_ref, rv_ref = rm.double(), rv.double()
    kw = dict(stride=case.stride, padding=case.pad, dilation=case.dilation, training=case.training,
              momentum=0.1, eps=1e-5, relu=case.relu)
    out = deeplab_ops.conv_bn_relu(ours[0], ours[1], ours[2], ours[3], rm_ours, rv_ours, residual=ours[4],
                                   backend=backend, **kw)
    expected = reference.conv_bn_relu(ref[0], ref[1], ref[2], ref[3], rm_ref, rv_ref, residual=ref[4], **kw)
    assert out.dtype == dtype
    want_cl = case.channels_last
    assert out.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format), (
        f"output memory format: expected {'channels_last' if want_cl else 'contiguous'}, got strides {out.stride()}"
    )
    assert_close(out, expected, f"[{case}] {backend} output", atol, rtol)
    assert_close(rm_ours, rm_ref, f"[{case}] {backend} running_mean", atol, rtol)
    assert_close(rv_ours, rv_ref, f"[{case}] {backend} running_var", atol, rtol)
    if not grads:
        return
    grad_out = torch.randn_like(out)
    names = ["x", "weight", "bn_weight", "bn_bias", "residual"]
    inputs = [(n, a, b) for n, a, b in zip(names, ours, ref, strict=True) if a is not None]
    got = torch.autograd.grad(out, [a for _, a, _ in inputs], grad_out)
    want = torch.autograd.grad(expected, [b for _, _, b in inputs], grad_out.double())
    gatol = atol * 10 if dtype != torch.float64 else atol
    for (name, _, _), g, e in zip(inputs, got, want, strict=True):
        assert_close(g, e, f"[{case}] {backend} grad {name}", gatol, rtol * 10 if dtype != torch.float64 else rtol)


def assert_same_training_step(model, fused, x, target) -> None:
    """One training step of `model` and of its fused copy (same parameters): the same squared-error loss,
    parameter gradients and buffers (running statistics, num_batches_tracked)."""
    losses = []
    for m in (model, fused):
        loss = ((m(x) - target) ** 2).mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), fused.parameters(), strict=True):
        assert_close(q.grad, p.grad, f"grad {name}", 1e-5, 1e-4)
    for (name, b), c in zip(model.named_buffers(), fused.buffers(), strict=True):
        assert_close(c, b, f"buffer {name}", 1e-6, 1e-6)


def assert_module_matches(module, expected_module, x, what: str) -> torch.Tensor:
    """`module` (fused) against `expected_module` (the torch one, same parameters) on x: output, the gradient of x
    and of every parameter for a random output gradient, and the buffers after the call. Returns the output."""
    xe, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    expected, out = expected_module(xe), module(xm)
    assert_close(out, expected, f"{what}: output", 1e-5, 1e-5)
    grad = torch.randn_like(out)
    expected.backward(grad)
    out.backward(grad)
    assert_close(xm.grad, xe.grad, f"{what}: grad x", 1e-4, 1e-4)
    for (name, pm), pe in zip(module.named_parameters(), expected_module.parameters(), strict=True):
        assert_close(pm.grad, pe.grad, f"{what}: grad {name}", 1e-4, 1e-4)
    for (name, bm), be in zip(module.named_buffers(), expected_module.buffers(), strict=True):
        assert_close(bm, be, f"{what}: buffer {name}", 1e-5, 1e-5)
    return out


def python_calls(fn) -> collections.Counter:
    """Python frames entered while `fn` runs, by (file, function): the host-path tests count them (never times)."""
    counts = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            counts[(frame.f_code.co_filename, frame.f_code.co_name)] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counts


PACKAGE_DIR = os.path.dirname(deeplab_ops.__file__)  # a deeplab_ops frame's file starts so


def package_frames(counts: collections.Counter) -> int:
    """How many of `python_calls`' frames are deeplab_ops code."""
    return sum(n for (file, _), n in counts.items() if file.startswith(PACKAGE_DIR))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous of a test's torch.distributed processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collected(target, *args) -> None:
    """target(*args), then a garbage collection: what still holds a destroyed process group through reference cycles
    (fused modules, DDP) is freed while the interpreter is whole; left to its shutdown, gloo's teardown sometimes
    aborts the process (SIGABRT, "terminate called without an active exception") after the test passed."""
    try:
        target(*args)
    finally:
        gc.collect()


def run_two_processes(target, *args, timeout: float = 180) -> dict:
    """Run target(rank, port, *args, queue) in 2 spawned processes (a torch.distributed pair rendezvousing on a
    free port) and return {rank: what it put on the queue after its rank}. A process that puts (rank, "message")
    fails the test with that message (its error, not a queue timeout); every process must exit cleanly."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_collected, args=(target, r, port, *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, *rest = queue.get(timeout=timeout)
            if len(rest) == 1 and isinstance(rest[0], str):
                pytest.fail(rest[0])
            results[rank] = rest
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0, f"a process exited with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return results


class MixedFusedNet(nn.Module):
    """Every kind of fused part in one small float network (3 -> 4 channels, any map of 3x3 or more): a conv chain, a
    residual block and a torchvision ASPP (fuse_modules fuses them), a FusedConvBNReLU, a FusedASPP, and a chain
    whose BatchNorm has momentum=None. Dropout 0: deterministic."""

    def __init__(self):
        from torchvision.models.resnet import BasicBlock
        from torchvision.models.segmentation.deeplabv3 import ASPP

        from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = BasicBlock(8, 8)
        self.aspp = ASPP(8, [1, 2], 6)
        self.aspp.project[3] = nn.Dropout(0.0)
        self.fused_head = FusedConvBNReLU(6, 5, 3, padding=1)
        self.fused_aspp = FusedASPP(5, (1, 3), 4)
        self.fused_aspp.project[3] = nn.Dropout(0.0)
        self.momentum_none = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4, momentum=None),
                                           nn.ReLU())

    def forward(self, x):
        return self.momentum_none(self.fused_aspp(self.fused_head(self.aspp(self.block(self.stem(x))))))


def randomize_batchnorm(net: nn.Module) -> nn.Module:
    """Random BatchNorm parameters and running statistics (eval BN must not be the identity), in place."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(7)
    return net


# The test suite's `-n auto` (pytest-xdist; tests/conftest.py's pytest_xdist_auto_num_workers). Memory one xdist
# worker may take at its peak (a whole-network test, a Triton interpreter run, a train.py child),
# and the most workers `-n auto` starts: one per core otherwise, which on a large workstation would start dozens of
# processes that each import torch and hold their own caches.
_WORKER_BYTES = 3 << 30
_MAX_AUTO_WORKERS = 8


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def auto_workers(count: int, memory: int | None) -> int:
    """xdist's `-n auto` count (one per core), at most _MAX_AUTO_WORKERS and as many as `memory` bytes hold at
    _WORKER_BYTES each (None: unknown, no bound)."""
    count = min(count, _MAX_AUTO_WORKERS)
    if memory is not None:
        count = min(count, memory // _WORKER_BYTES)
    return max(1, count)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cores_between_workers() -> None:
    """Under pytest-xdist (`-n auto`), each worker process takes its share of the cores for torch's intra-op threads
    rather than all of them: on a 2-core machine the suite took 16 min with two workers of two threads each, 12.4
    with one thread each (22.6 in one process). Tests that need a thread count set it themselves and restore it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        torch.set_num_threads(max(1, usable_cores() // workers))
