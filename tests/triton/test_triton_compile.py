"""The GPU code paths compile for Ampere and Hopper without a GPU: `triton.compile` for GPUTarget sm_80 / sm_90
builds every kernel of the engine, the BatchNorm stages and ASPP, in each epilogue mode, from the autotune lists
the launchers use (the first configuration; every one with -m slow)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deeplab_ops.triton import aspp, conv_engine

_COMPILE_SCRIPT = r"""
import sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from deeplab_ops.triton import aspp as A, bn_kernels as B, conv_engine as E
from deeplab_ops.triton.launch import kernel_name

STAT = ("part", "coef", "mean", "scale", "shift", "bias", "dxp", "invstd", "hyper", "rm_", "rv_", "gamma", "beta",
        "count", "pm", "sum_")

def pointer_types(fn, dt, st):
    return {a: ("i32" if a in ("rates_ptr", "pairs_ptr") else st if any(s in a for s in STAT) else dt)
            for a in fn.arg_names if a.endswith("_ptr")}

def build(fn, dt, st, consts, arch, config=None):
    kwargs = dict(config.kwargs) if config is not None else {}
    ptrs = pointer_types(fn, dt, st)
    sig = {a: "constexpr" if a in consts or a in kwargs else ("*" + ptrs[a] if a in ptrs else "i32")
           for a in fn.arg_names}
    opts = dict(num_warps=config.num_warps, num_stages=config.num_stages) if config is not None else {}
    triton.compile(ASTSource(fn, sig, constexprs={**consts, **kwargs}), target=GPUTarget("cuda", arch, 32),
                   options=opts)

FWD = dict(KH=3, KW=3, HAS_RES=True, RELU=True)
MODES = {  # epilogue / prologue modes per kernel: every branch of the constexpr flags that runs in practice
    "conv_fwd": [dict(FWD, TRAINING=True, EVAL_BN=False, HAS_GAMMA=False, HAS_BIAS=False, STORE_Y=True,
                      COUNT_PAIRS=True),
                 dict(FWD, TRAINING=False, EVAL_BN=True, HAS_GAMMA=True, HAS_BIAS=True, STORE_Y=True,
                      COUNT_PAIRS=False),
                 dict(FWD, TRAINING=False, EVAL_BN=False, HAS_GAMMA=False, HAS_BIAS=True, STORE_Y=False,
                      COUNT_PAIRS=False)],
    "conv_dgrad": [dict(KH=3, KW=3, RELU=True, COUNT_PAIRS=True)],
    "conv_wgrad": [dict(KH=3, KW=3, RELU=True, COUNT_PAIRS=True)],
    "aspp_branch_fwd": [dict(TRAINING=True, COUNT_PAIRS=True), dict(TRAINING=False, COUNT_PAIRS=False)],
    "aspp_branch_dgrad": [dict(COUNT_PAIRS=True)],
    "aspp_branch_wgrad": [dict(COUNT_PAIRS=True)],
    "aspp_project_fwd": [dict(TRAINING=True), dict(TRAINING=False)],
    "aspp_project_dgrad": [{}],
    "aspp_project_wgrad": [{}],
}

full = sys.argv[1] == "all"
for dt, arch in (("fp16", 90), ("fp32", 80), ("bf16", 90), ("fp64", 80)):
    if not full and dt in ("bf16", "fp64"):
        continue
    st, acc = ("fp64", tl.float64) if dt == "fp64" else ("fp32", tl.float32)
    common = dict(ACC_DTYPE=acc, DOT_PRECISION="tf32" if dt == "fp32" else "ieee")
    for spec in [*E.KERNELS.values(), *A.KERNELS.values()]:
        name = kernel_name(spec.kernel)
        configs = spec.hopper if arch >= 90 else spec.ampere
        for cfg in (configs if full else configs[:1]):
            for mode in MODES[name]:
                build(spec.kernel, dt, st, dict(common, **mode), arch, cfg)
    bn_modes = {"bn_finalize": dict(HAS_GAMMA=True, HAS_BETA=True, HAS_RUNNING=True, ACC_DTYPE=acc, BLOCK_P=64),
                "bn_apply": dict(HAS_RES=True, RELU=True, BLOCK_M=64),
                "bn_bwd_reduce": dict(RELU=True, STORE_G=True, ACC_DTYPE=acc, BLOCK_M=64),
                "bn_bwd_finalize": dict(TRAINING=True, HAS_GAMMA=True, ACC_DTYPE=acc)}
    for name, kernel in B.KERNELS.items():
        build(kernel, dt, st, dict(bn_modes[name], BLOCK_C=64), arch)
"""


def _compile_for_gpus(which: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real JIT functions, not interpreted
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, which], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def test_kernels_compile_for_ampere_and_hopper():
    """Every kernel in every mode, fp16 on sm_90 and fp32-with-TF32 on sm_80, in its first configuration."""
    _compile_for_gpus("first")


@pytest.mark.slow
def test_every_autotune_config_compiles():
    """Every configuration of both lists, fp16/fp32/bf16/fp64: none fails to compile (shared memory is checked
    at launch, where tuning drops configurations that do not fit)."""
    _compile_for_gpus("all")


@pytest.mark.parametrize("module", [conv_engine, aspp], ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_autotune_configs_are_valid(module):
    sizes = {"C_in": 3, "C_out": 5, "C": 5, "BC": 20, "HW": 81, "H": 9, "W": 9, "H_out": 9, "W_out": 9, "SPLITS": 1,
             "stride_h": 1, "stride_w": 1}
    for name, spec in module.KERNELS.items():
        assert spec.interpreter, name
        for configs in (spec.hopper, spec.ampere):
            assert configs, name
            for c in configs:
                blocks = [v for k, v in c.kwargs.items() if k.startswith("BLOCK_") and k not in ("BLOCK_H", "BLOCK_W")]
                assert min(blocks) >= 16, (name, c)  # tl.dot's minimum on GPUs
                if "BLOCK_H" in c.kwargs and "BLOCK_K" in c.kwargs:  # pixel tiles feed the MMA's M
                    assert c.kwargs["BLOCK_H"] * c.kwargs["BLOCK_W"] >= 16, (name, c)
            # Few channels keep only the narrow configurations, never none; many keep a choice.
            small = spec.prune(configs, sizes)
            assert small and all(c.kwargs["BLOCK_N"] == 16 for c in small), (name, small)
            assert len(spec.prune(configs, dict.fromkeys(sizes, 256))) > 1, name
            assert set(spec.bucketed) | set(spec.exact) <= set(sizes), name  # the cache key's sizes exist
