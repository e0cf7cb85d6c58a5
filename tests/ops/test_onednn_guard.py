"""The CPU convolution geometries PyTorch's oneDNN computes wrong or crashes on (csrc/cpu/onednn_guard_cpu.h): the
cpu and reference backends compute them in float64 and match float64 eager, forward and gradients, in training and
eval, where eager float32 returns garbage or dies; the guard's C++ predicate and its Python twin agree; and no layer
of the DeepLabV3 network is one of them (the guarded route costs nothing there)."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from deeplab_ops.reference import _onednn_unsafe

# Found by a sweep of random geometries against float64 (PyTorch 2.14.1, this project's Xeon): x shape, weight
# shape, stride, padding, dilation, x channels_last, dtype, what eager's oneDNN did.
CASES = [
    ((3, 1, 9, 1), (4, 1, 3, 1), (1, 3), (2, 2), (1, 4), True, "float32"),  # segfault with a bias
    ((2, 2, 9, 1), (4, 2, 1, 1), (1, 2), (0, 3), (1, 2), False, "float32"),  # segfault with a bias
    ((3, 3, 1, 1), (4, 3, 4, 1), (3, 3), (6, 2), (1, 2), False, "float32"),  # segfault with a bias
    ((3, 2, 2, 2), (1, 2, 4, 1), (1, 3), (2, 1), (1, 4), True, "float32"),  # segfault with a bias
    ((1, 1, 4, 4), (4, 1, 5, 5), (1, 3), (1, 1), (1, 1), True, "float32"),  # output off by 98 %
    ((2, 1, 8, 3), (3, 1, 7, 7), (1, 2), (6, 2), (1, 1), False, "float32"),  # output off by 1e19
    ((1, 1, 16, 4), (17, 1, 4, 5), (1, 3), (2, 1), (1, 1), False, "float32"),  # output off by 146 %
    ((3, 5, 5, 1), (3, 5, 5, 1), (3, 2), (6, 3), (3, 2), True, "bfloat16"),  # segfault without a bias
    ((1, 2, 16, 2), (4, 2, 3, 5), (1, 3), (1, 3), (3, 1), True, "bfloat16"),  # weight gradient off by 5e12
    ((2, 1, 3, 1), (17, 1, 7, 5), (1, 3), (6, 2), (1, 1), True, "bfloat16"),  # output off by 439x
    # a second sweep (larger maps, dilations up to 18): a strided axis with a dilated kernel (float32), an axis of
    # stride 1 with an output reading only padding, a strided 1-tap axis beside a wider one (bfloat16)
    ((2, 6, 4, 68), (12, 6, 1, 7), (1, 2), (0, 18), (1, 6), True, "float32"),  # weight gradient off by 100 %
    ((1, 16, 29, 50), (4, 16, 7, 7), (1, 2), (0, 22), (1, 4), False, "float32"),  # weight gradient off by 143 %
    ((1, 4, 4, 7), (4, 4, 2, 3), (1, 1), (6, 1), (12, 1), False, "bfloat16"),  # segfault
    ((1, 32, 22, 22), (32, 32, 1, 3), (3, 1), (0, 12), (1, 12), False, "bfloat16"),  # output off by 300 %, at random
    ((1, 16, 46, 30), (4, 16, 1, 5), (2, 1), (0, 12), (1, 6), True, "bfloat16"),  # output off by 1e35
]

_CHILD = r"""
import json, sys, torch, torch.nn.functional as F
import deeplab_ops
ops = torch.ops.deeplab_ops
worst = {}
for xs, ws, s, p, d, cl, dt in json.loads(sys.argv[1]):
    dtype = getattr(torch, dt)
    g = torch.Generator().manual_seed(0)
    x64, w64 = torch.randn(xs, generator=g, dtype=torch.float64), torch.randn(ws, generator=g, dtype=torch.float64)
    b64 = torch.randn(ws[0], generator=g, dtype=torch.float64)
    c = ws[0]
    f64 = dict(generator=g, dtype=torch.float64)
    gamma, beta = torch.rand(c, **f64) + 0.5, torch.randn(c, **f64)
    rm, rv = torch.randn(c, **f64) * 0.1, torch.rand(c, **f64) + 0.5
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    def rel(a, b):
        return float((a.double() - b).abs().max() / max(b.abs().max().item(), 1.0))
    # the eval path's op, with the folded bias and a ReLU
    x = x64.to(dtype)
    x = x.to(memory_format=torch.channels_last) if cl else x
    want = F.conv2d(x64, w64, b64, s, p, d).relu()
    key = f"{xs} {ws} {dt}"
    worst[key + " conv_bias_act"] = rel(ops.conv_bias_act(x, w64.to(dtype), b64.to(dtype), None, s, p, d, True), want)
    # the public op on both backends, training (with gradients) and eval
    for backend in ("cpu", "reference"):
        for training in (True, False):
            if training and xs[0] * want.shape[2] * want.shape[3] == 1:
                continue
            leaves64 = [t.clone().requires_grad_() for t in (x64, w64, gamma, beta)]
            ref = F.batch_norm(F.conv2d(leaves64[0], leaves64[1], None, s, p, d), rm.clone(), rv.clone(),
                               leaves64[2], leaves64[3], training)
            go = torch.randn(ref.shape, generator=g, dtype=torch.float64)
            want_grads = torch.autograd.grad(ref, leaves64, go)
            leaves = [t.detach().to(dtype).requires_grad_() for t in (x64, w64)] + [
                t.detach().clone().requires_grad_() for t in (gamma.float(), beta.float())]
            if cl:
                leaves[0] = leaves[0].detach().to(memory_format=torch.channels_last).requires_grad_()
            out = deeplab_ops.conv_bn_relu(*leaves, rm.float(), rv.float(), stride=s, padding=p, dilation=d,
                                           training=training, relu=False, backend=backend)
            grads = torch.autograd.grad(out, leaves, go.to(dtype))
            worst[f"{key} {backend} training={training} out"] = rel(out, ref)
            for name, a, b in zip(("x", "weight", "bn_weight", "bn_bias"), grads, want_grads):
                worst[f"{key} {backend} training={training} grad {name}"] = rel(a, b)
    worst = {k: (v, tol) for k, v in worst.items()}
    print(json.dumps(worst))
    worst = {}
"""


def test_the_guarded_geometries_match_float64_on_the_cpu_and_reference_backends():
    """Each geometry is one eager float32/bfloat16 computes wrong or crashes on; a child process runs them (a
    regression would segfault), with glibc's heap checks on."""
    env = {**__import__("os").environ, "MALLOC_CHECK_": "3"}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(CASES)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"rc {done.returncode}: {done.stdout[-1000:]}{done.stderr[-2000:]}"
    lines = done.stdout.strip().splitlines()
    assert len(lines) == len(CASES), done.stdout
    bad = {k: v for line in lines for k, (v, tol) in json.loads(line).items() if not v <= tol}
    assert not bad, bad


def _geometries(n: int, seed: int):
    rng = random.Random(seed)
    while n:
        k = (rng.choice([1, 2, 3, 5, 7]), rng.choice([1, 2, 3, 5, 7]))
        s, p, d = ((rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3])), (rng.choice([0, 1, 3, 6]), rng.choice(
            [0, 1, 3, 6])), (rng.choice([1, 2, 4]), rng.choice([1, 2, 4])))
        hw = (rng.choice([1, 2, 3, 5, 9, 33]), rng.choice([1, 2, 3, 5, 9, 33]))
        if all((hw[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 >= 1 for i in range(2)):
            n -= 1
            yield (1, 2) + hw, (3, 2) + k, s, p, d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_python_twin_decides_as_the_cpu_backend(dtype):
    ops = torch.ops.deeplab_ops
    seen = set()
    for xs, ws, s, p, d in _geometries(3000, 0):
        x, w = torch.empty(xs, dtype=dtype), torch.empty(ws, dtype=dtype)
        want = ops.onednn_unsafe_plan(x, w, s, p, d)
        assert _onednn_unsafe(x, w, s, p, d) == want, (xs, ws, s, p, d)
        seen.add(want)
    assert seen == ({False} if dtype == torch.float64 else {False, True})  # float64 never runs oneDNN


def test_the_twins_agree_where_no_output_fits():
    """A kernel wider than the padded input by less than the stride: no output (rounded down, as Python's //),
    though C++'s division toward zero would count one."""
    x, w = torch.empty(1, 2, 1, 5), torch.empty(3, 2, 2, 3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, w = x.to(dtype), w.to(dtype)
        assert not torch.ops.deeplab_ops.onednn_unsafe_plan(x, w, (2, 1), (0, 0), (1, 1))
        assert not _onednn_unsafe(x, w, (2, 1), (0, 0), (1, 1))


def test_each_new_rule_routes_only_the_dtype_it_was_measured_in():
    """The second sweep's kinds: a strided dilated axis (float32's weight gradients), an output reading only padding
    along a stride-1 axis and a strided 1-tap axis beside a wider one (bfloat16's crashes); float16 computed all of
    them right, bfloat16 the first."""
    kinds = {  # x shape, weight shape, stride, padding, dilation: the dtypes routed
        ((2, 6, 4, 68), (12, 6, 1, 7), (1, 2), (0, 18), (1, 6)): {torch.float32},
        ((1, 4, 4, 7), (4, 4, 2, 3), (1, 1), (6, 1), (12, 1)): {torch.bfloat16},
        ((1, 32, 22, 22), (32, 32, 1, 3), (3, 1), (0, 12), (1, 12)): {torch.bfloat16},
    }
    for (xs, ws, s, p, d), routed in kinds.items():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x, w = torch.empty(xs, dtype=dtype), torch.empty(ws, dtype=dtype)
            assert torch.ops.deeplab_ops.onednn_unsafe_plan(x, w, s, p, d) == (dtype in routed), (xs, dtype)
            assert _onednn_unsafe(x, w, s, p, d) == (dtype in routed), (xs, dtype)


def _deeplab_geometries():
    """Every convolution geometry of DeepLabV3-ResNet50 (output stride 8 and 16) at a 513 x 513 and a 65 x 65 crop:
    (input size, C_in, kernel, stride, padding, dilation)."""
    layers = {8: ((1, 1), (2, 1), (1, 2), (1, 4)), 16: ((1, 1), (2, 1), (2, 1), (1, 2))}  # (stride, dilation)
    for size in (513, 65):
        for output_stride, strides in layers.items():
            yield size, 3, 7, 2, 3, 1  # the stem
            h = ((size + 6 - 7) // 2 + 2 - 3) // 2 + 1  # after the stem and the max pool
            for stride, dil in strides:
                yield h, 64, 1, 1, 0, 1
                yield h, 64, 3, stride, dil, dil  # the first block's 3x3: "same" padding
                yield h, 64, 1, stride, 0, 1  # its downsample
                h = (h - 1) // stride + 1
                yield h, 64, 3, 1, dil, dil  # the other blocks' 3x3
            for rate in (6, 12, 18) if output_stride == 16 else (12, 24, 36):
                yield h, 64, 3, 1, rate, rate  # the ASPP's branches
            yield h, 64, 3, 1, 1, 1  # the head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_no_deeplab_layer_takes_the_float64_route(dtype):
    for size, cin, k, s, p, d in _deeplab_geometries():
        x, w = torch.empty(2, cin, size, size, dtype=dtype), torch.empty(8, cin, k, k, dtype=dtype)
        assert not torch.ops.deeplab_ops.onednn_unsafe_plan(x, w, (s, s), (p, p), (d, d)), (size, k, s, p)
        assert not _onednn_unsafe(x, w, (s, s), (p, p), (d, d)), (size, k, s, p)
