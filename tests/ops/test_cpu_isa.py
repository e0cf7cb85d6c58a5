"""The CPU kernels give the same bits in every ISA build (csrc/cpu/isa_dispatch.h: baseline, AVX2, AVX-512, chosen as
torch's own CPU kernels are, so ATEN_CPU_CAPABILITY selects it) and for any thread count: each case runs in a fresh
process per capability and thread count, and the outputs are compared bit for bit. One exception: the GEMMs of the
Winograd convolution and of the NCHW 1x1 eval convolution, the same bits in the AVX2 and AVX-512 builds, are ATen's
mm in the baseline one (csrc/cpu/gemm_cpu.h), so there they are compared as float32 values."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from helpers import ROOT


# The inputs are made once, in the test's process, and loaded by every run: torch's own float64 reductions (the
# variance, rsqrt) give other bits in other ISA builds on some releases (torch 2.6), which would make the inputs,
# not these kernels, differ.
def _make_inputs(path) -> None:
    g = torch.Generator().manual_seed(5)
    inputs = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float64):
            y = (torch.randn(3, 19, 23, 29, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
            y = y.contiguous(memory_format=layout)
            dz = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
            opmath = torch.float64 if dtype == torch.float64 else torch.float32
            mean = y.double().mean((0, 2, 3)).to(opmath)
            invstd = (y.double().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt().to(opmath)
            w = torch.rand(y.shape[1], generator=g, dtype=torch.float64).to(opmath) + 0.5
            b = torch.randn(y.shape[1], generator=g, dtype=torch.float64).to(opmath)
            inputs[f"{layout} {dtype}"] = (y, dz, mean, invstd, w, b)
    # channels_last rows wider than a span, in several row blocks (the blocks' fold and merge)
    y = (torch.randn(2, 1030, 7, 9, generator=g, dtype=torch.float64) * 2 + 0.5).float()
    y = y.contiguous(memory_format=torch.channels_last)
    dz = torch.randn(y.shape, generator=g).contiguous(memory_format=torch.channels_last)
    mean = y.double().mean((0, 2, 3)).float()
    invstd = (y.double().var((0, 2, 3), unbiased=False) + 1e-5).rsqrt().float()
    w, b = torch.rand(1030, generator=g) + 0.5, torch.randn(1030, generator=g)
    inputs["wide channels_last"] = (y, dz, mean, invstd, w, b)
    for dtype in (torch.float32, torch.float64):
        logits = torch.randn(2, 21, 9, 11, generator=g, dtype=torch.float64).to(dtype)
        target = torch.randint(0, 21, (2, 67, 85), generator=g)
        target[torch.rand(2, 67, 85, generator=g) < 0.1] = 255
        inputs[f"uce {dtype}"] = (logits, target)
    # the Winograd convolution's GEMM (panels of 32 columns: 70 leaves a part panel; 300 inner: two blocks of 256)
    inputs["gemm"] = (torch.randn(37, 300, generator=g), torch.randn(300, 70, generator=g))
    # a Winograd convolution: transforms and GEMMs (48 output channels: a part panel), F(4x4) and short grids
    x = torch.randn(2, 40, 13, 11, generator=g).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(48, 40, 3, 3, generator=g) / 20).contiguous(memory_format=torch.channels_last)
    inputs["winograd"] = (x, weight, torch.randn(48, generator=g))
    x = torch.randn(3, 300, 13, 13, generator=g).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(300, 300, 3, 3, generator=g) / 50).contiguous(memory_format=torch.channels_last)
    inputs["short grids"] = (x, weight, torch.randn(300, generator=g))
    # stride 2: 65 x 33 outputs, whose last row and column run as a direct convolution (strided_edges)
    x = torch.randn(2, 40, 129, 66, generator=g).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(36, 40, 3, 3, generator=g) / 20).contiguous(memory_format=torch.channels_last)
    inputs["stride 2"] = (x, weight, torch.randn(36, generator=g))
    # the NCHW 1x1 eval convolution on the GEMM kernel (2^18 outputs and more; 100 channels: a part row tile)
    x = torch.randn(2, 45, 37, 37, generator=g)
    inputs["pointwise"] = (x, torch.randn(100, 45, 1, 1, generator=g) / 7, torch.randn(100, generator=g),
                           torch.randn(2, 100, 37, 37, generator=g))
    torch.save(inputs, path)


_SCRIPT = r'''
import sys, torch
import deeplab_ops
ops = torch.ops.deeplab_ops
torch.set_num_threads(int(sys.argv[2]))
inputs = torch.load(sys.argv[3])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
for key, value in inputs.items():
    if key.startswith(("uce", "gemm", "winograd", "short grids", "stride 2", "pointwise")):  # run below
        continue
    y, dz, mean, invstd, w, b = value
    c = y.shape[1]
    stats = ops.bn_stats(y)
    z = ops.bn_apply(y, mean, invstd, w, b, None, True)
    sg, sgx = ops.bn_backward_reduce(dz, z, y, mean, invstd, True)
    dy = ops.bn_backward_dy(dz, z, y, mean, invstd, w, sg, sgx, float(y.numel() // c), True, True)
    out[key] = [t.clone() for t in (*stats, z, sg, sgx, dy)]
for dtype in (torch.float32, torch.float64):
    logits, target = inputs[f"uce {dtype}"]
    logits = logits.clone().requires_grad_()
    for reduction in ("sum", "none"):
        loss = deeplab_ops.upsample_cross_entropy(logits, target, reduction=reduction, backend="cpu")
        (grad,) = torch.autograd.grad(loss, logits, torch.ones_like(loss))
        out[f"uce {dtype} {reduction}"] = [loss.detach(), grad]
a, b = inputs["gemm"]
out["gemm"] = [ops.cpu_gemm(a, b, 8), ops.cpu_gemm(a, b, 5, 1)]
for key, stride, dilation, plan in (("winograd", 1, 1, 4), ("short grids", 1, 7, 1), ("stride 2", 2, 1, -4)):
    x, weight, bias = inputs[key]
    ops.winograd_cache_allow(weight)
    s, d = (stride, stride), (dilation, dilation)
    assert ops.winograd_plan(x, weight, s, d, d) == plan, key  # the plan the shape gets: Winograd runs
    with torch.no_grad():
        out[key] = [ops.conv_bias_act(x, weight, bias, None, s, d, d, True)]
x, weight, bias, residual = inputs["pointwise"]
with torch.no_grad():
    out["pointwise"] = [ops.conv_bias_act(x, weight, bias, residual, (1, 1), (0, 0), (1, 1), True)]
torch.save(out, sys.argv[1])
'''


def test_baseline_build_keeps_float32_convolutions_under_a_lowered_matmul_precision():
    # The baseline build's Winograd GEMMs are ATen's mm, which follows the float32 matmul precision: lowered, the plan
    # leaves the convolution to oneDNN (the vector builds' own kernel stays float32 and keeps Winograd).
    script = (
        "import torch, deeplab_ops\n"
        "ops = torch.ops.deeplab_ops\n"
        "x, w = torch.empty(2, 32, 17, 17), torch.empty(32, 32, 3, 3)\n"
        "ops.winograd_cache_allow(w)\n"
        "before = ops.winograd_plan(x, w, (1, 1), (1, 1), (1, 1))\n"
        "torch.set_float32_matmul_precision('medium')\n"
        "print(before, ops.winograd_plan(x, w, (1, 1), (1, 1), (1, 1)))\n")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4", "0"], proc.stdout


# The outputs of the Winograd GEMM kernel: the same bits in the vector builds, ATen's mm's in the baseline one.
_GEMM_KEYS = ("gemm", "winograd", "short grids", "stride 2", "pointwise")


def _run(tmp_path, capability: str | None, threads: int) -> dict:
    path = tmp_path / f"{capability}-{threads}.pt"
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(path), str(threads), str(tmp_path / "inputs.pt")],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


def test_same_bits_in_every_isa_build_and_thread_count(tmp_path):
    _make_inputs(tmp_path / "inputs.pt")
    runs = {(cap, threads): _run(tmp_path, cap, threads) for cap, threads in
            [(None, 1), (None, 2), ("default", 1), ("avx2", 2)]}
    base = runs[(None, 1)]
    # the environment variable reached torch (which names the baseline "NO AVX" before torch 2.7 or so)
    assert runs[("default", 1)]["capability"] in ("DEFAULT", "NO AVX")
    for (cap, threads), got in runs.items():
        for key, tensors in base.items():
            if key == "capability":
                continue
            for i, (a, b) in enumerate(zip(tensors, got[key], strict=True)):
                if cap == "default" and key in _GEMM_KEYS:
                    # the baseline build's GEMMs are ATen's mm (csrc/cpu/gemm_cpu.h): float32 close, not the bits
                    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-4 * max(a.abs().max().item(), 1.0))
                    continue
                assert torch.equal(a, b), f"{key} output {i}: bits differ between the native build, 1 thread, and " \
                                          f"{cap} with {threads}"
