"""The ops called from several Python threads at once give the results they give one call at a time: forward,
gradients and running statistics, per backend (triton on CUDA tensors where a GPU is visible, else in the
interpreter); a shared eval-mode module too. Triton with autotuning on (the interpreter tunes too: launch.py's
"all" mode): correct results, every call's configuration one of its pruned candidates, one tuning per key."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import (
    CUDA,
    TRITON_DEVICE,
    Case,
    assert_close,
    backend_param,
    device_for,
    make_inputs,
    tolerances,
    triton_test,
)

import deeplab_ops
from deeplab_ops import reference
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

THREADS = 4

# The Triton interpreter keeps the launch grid in one process-wide builder, so two interpreted launches from two
# threads would corrupt each other ("InterpreterError: ValueError('x >= grid_dim[0]')"): deeplab_ops/triton
# serializes launches on CPU tensors with a lock, which these tests exercise. On CUDA tensors nothing is serialized.
CONV_BACKENDS = ["reference", "cpu", backend_param("triton")]
ASPP_BACKENDS = CONV_BACKENDS


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
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64, device_for(backend))
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
    device = device_for(backend)
    xs = [torch.randn(2, cin, size, size + 1, dtype=torch.float64, device=device) for _ in range(n_jobs)]
    expected = [_run_aspp((backend, make(i).to(device), xs[i])) for i in range(n_jobs)]
    got = _concurrently(_run_aspp, [(backend, make(i).to(device), xs[i]) for i in range(n_jobs)])
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


# ---- triton with autotuning on ---------------------------------------------------------------------------------

# Channel counts for which the pruned lists keep two or more configurations in half precision (tuning compares
# them; float64 and float32 without TF32 keep one); shapes, strides, dilations, layouts and dtypes vary, and keys
# repeat across threads (two threads may race to tune one key). One epilogue (training, ReLU, no residual) keeps the
# number of kernel variants a GPU compiles small. The output maps are one or two tiles per image at the smallest
# candidate's 4x8 pixels, most of them ragged: the interpreter's time grows with the tiles it runs.
_TUNE_CASES = [Case(2, 64, 5, 3, 64), Case(2, 32, 7, 7, 32, stride=2, channels_last=True),
               Case(2, 64, 3, 5, 64, dilation=2), Case(2, 24, 4, 6, 64)]
_TUNE_DTYPES = [torch.float16, torch.float32] if CUDA else [torch.float16, torch.float64]


@pytest.fixture
def tuning(monkeypatch):
    """A fresh tuning cache with autotuning on ("all": the interpreter tunes too), and a record of every lookup:
    (kernel spec, device, dtype, sizes, meta, the configuration returned) and how often each key was tuned."""
    from deeplab_ops.triton import launch

    monkeypatch.setattr(launch, "TUNED", {})
    previous = launch.set_autotune("gpu" if CUDA else "all")
    lookups, tuned, lock = [], [], threading.Lock()
    real_lookup, real_tune = launch.tuned_config, launch.tune

    def lookup(spec, device, dtype, sizes, meta, run):
        config = real_lookup(spec, device, dtype, sizes, meta, run)
        with lock:
            lookups.append((spec, device, dtype, dict(sizes), dict(meta), config))
        return config

    def tune(spec, device, sizes, run):
        with lock:
            tuned.append(spec.kernel)
        return real_tune(spec, device, sizes, run)

    monkeypatch.setattr(launch, "tuned_config", lookup)
    monkeypatch.setattr(launch, "tune", tune)
    yield launch, lookups, tuned
    launch.set_autotune(previous)


def _tuned_inputs(case: Case, dtype: torch.dtype, seed: int):
    # Made before the threads start: torch's default generator is one for the process, and threads seeding and
    # drawing from it at once draw each other's numbers, so a job's inputs changed from run to run (and one such run
    # failed a float16 case: one channel's grad bn_weight off by 2.0, likely a pre-activation near zero on either
    # side of the ReLU in float16 and in the float64 reference).
    torch.manual_seed(seed)
    return make_inputs(case, dtype, TRITON_DEVICE)


def _tuned_job(args):
    case, dtype, seed, inputs = args
    x, w, g, b, rm, rv, res = inputs
    kw = dict(stride=case.stride, padding=case.pad, dilation=case.dilation, training=case.training, relu=case.relu)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, g, b)]
    rm_ours = rm.clone()
    out = deeplab_ops.conv_bn_relu(*leaves, rm_ours, rv.clone(), residual=res, backend="triton", **kw)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, grad.to(out))
    ref = [t.detach().double().requires_grad_() for t in (x, w, g, b)]
    rm_ref = rm.double()
    expected = reference.conv_bn_relu(*ref, rm_ref, rv.double(), residual=None if res is None else res.double(), **kw)
    want = torch.autograd.grad(expected, ref, grad.to(expected))
    return (out, rm_ours, *grads), (expected, rm_ref, *want)


@triton_test
@pytest.mark.usefixtures("no_tf32")
def test_triton_autotuned_from_threads(tuning):
    launch, lookups, tuned = tuning
    # Each case once, dtypes alternating, and the first two twice (two threads tuning one key at once).
    pairs = [(c, _TUNE_DTYPES[i % 2]) for i, c in enumerate(_TUNE_CASES + _TUNE_CASES[:2])]
    jobs = [(case, dtype, seed, _tuned_inputs(case, dtype, seed)) for seed, (case, dtype) in enumerate(pairs)]
    results = _concurrently(_tuned_job, jobs)
    for (case, dtype, _, _), (got, want) in zip(jobs, results, strict=True):
        atol, rtol = tolerances(dtype)
        for name, a, e in zip(("output", "running_mean", "grad x", "grad weight", "grad bn_weight", "grad bn_bias"),
                              got, want, strict=True):
            scale = 1 if name in ("output", "running_mean") else 10
            assert_close(a, e, f"[{case}] {dtype} {name}", atol * scale, rtol * scale)
    # Every call's configuration is one of its pruned candidates, and the one cached for its key.
    device = torch.device(TRITON_DEVICE, 0) if CUDA else torch.device("cpu")
    keys, compared = set(), 0
    for spec, dev, dtype, sizes, meta, config in lookups:
        options = launch.candidates(spec, dev, sizes)
        assert config in options, f"{launch.kernel_name(spec.kernel)} {sizes}: {config} is not among {options}"
        key = launch.tuning_key(spec, dev, dtype, sizes, meta)
        assert launch.TUNED[key] == config, f"{key}: a call ran {config}, the cache holds {launch.TUNED[key]}"
        keys.add(key)
        compared += len(options) > 1
    assert compared, "no lookup had two candidates: the test does not exercise tuning"
    # One tuning per key, however many threads asked for it at once; one cache entry per key.
    assert len(tuned) == len(keys) == len(launch.TUNED), (len(tuned), len(keys), len(launch.TUNED))
    assert {k[1:3] for k in keys} == {(device.type, device.index)}


_GC_IN_THE_CACHE_LOCK = '''
import gc, weakref
import torch
from deeplab_ops import common

gc.disable()  # collections happen only where this script says
t = torch.randn(4)
common.derived(("t",), (t,), lambda: t * 2)
box = type("Box", (), {})()
box.self, box.t = box, t  # a cycle: t is freed by the cyclic collector only
del t, box
real = weakref.finalize


def finalize_after_a_collection(*args):  # CPython may collect at any allocation: here, inside the cache's lock
    gc.collect()
    return real(*args)


weakref.finalize = finalize_after_a_collection
u = torch.randn(4)
common.derived(("u",), (u,), lambda: u * 2)
assert common.derived_cache_info()["entries"] == 1, common.derived_cache_info()
print("done")
'''


def test_a_garbage_collection_inside_the_cache_lock_does_not_deadlock():
    """A parameter held in a reference cycle (a model that refers to itself, a frame kept by a traceback) is freed
    by the cyclic collector, which may run at any allocation, inside the derived-tensor cache's lock too, where its
    finalizers evict entries. That deadlocked a thread on itself (a plain Lock; found by a review: a loop fusing and
    dropping small models hung within 1000 iterations). In a subprocess, so that a deadlock fails this test and not
    the session."""
    import subprocess
    import sys

    from helpers import ROOT

    try:
        proc = subprocess.run([sys.executable, "-c", _GC_IN_THE_CACHE_LOCK], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("derived() deadlocked: a collection inside its lock ran a finalizer that waits for the lock")
    assert proc.returncode == 0 and proc.stdout.strip() == "done", proc.stdout + proc.stderr
