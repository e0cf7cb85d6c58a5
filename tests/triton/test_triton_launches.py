"""The launch counter (`deeplab_ops.triton.count_launches`): what the overhead benchmark reads."""

from __future__ import annotations

import subprocess
import sys
import threading

import torch
from helpers import CUDA

import deeplab_ops
import deeplab_ops.triton as dtriton
from deeplab_ops.triton import conv_bn_relu as triton_cbr

DEVICE = "cuda" if CUDA else "cpu"


def _conv_inputs(n=2, c_in=3, c_out=4, h=5, w=6):
    x = torch.randn(n, c_in, h, w, device=DEVICE)
    weight = torch.randn(c_out, c_in, 3, 3, device=DEVICE)
    gamma, beta = torch.rand(c_out, device=DEVICE) + 0.5, torch.randn(c_out, device=DEVICE)
    rm, rv = torch.randn(c_out, device=DEVICE), torch.rand(c_out, device=DEVICE) + 0.5
    return x, weight, gamma, beta, rm, rv


def _forward(training: bool):
    x, weight, gamma, beta, rm, rv = _conv_inputs()
    return triton_cbr.forward(x, weight, gamma, beta, rm, rv, [1, 1], [1, 1], [1, 1], training, 0.1, 1e-5, None,
                              True)


def test_counts_training_and_eval_forward_launches():
    with dtriton.count_launches() as train:
        _forward(True)
    assert train.total == 3, train.by_kernel
    assert train.by_kernel == {"conv_fwd": 1, "bn_finalize": 1, "bn_apply": 1}
    with dtriton.count_launches() as evaluation:
        _forward(False)
    assert evaluation.total == 1 and evaluation.by_kernel == {"conv_fwd": 1}


def test_counts_through_the_public_op_and_nests():
    x, weight, gamma, beta, rm, rv = _conv_inputs()
    with dtriton.count_launches() as outer:
        deeplab_ops.conv_bn_relu(x, weight, gamma, beta, rm, rv, training=False, backend="triton")
        with dtriton.count_launches() as inner:
            _forward(False)
    assert inner.total == 1
    assert outer.total == 2 and outer.by_kernel == {"conv_fwd": 2}
    assert sum(outer.by_kernel.values()) == outer.total


def test_inactive_counter_sees_nothing_and_other_threads_are_not_counted():
    _forward(False)  # no block active: nothing to record into
    with dtriton.count_launches() as counter:
        worker = threading.Thread(target=_forward, args=(False,))
        worker.start()
        worker.join()
    assert counter.total == 0 and counter.by_kernel == {}


def test_counter_import_imports_no_triton():
    code = ("import sys, deeplab_ops.triton as t; assert 'triton' not in sys.modules\n"
            "with t.count_launches() as c: pass\n"
            "assert c.total == 0 and c.by_kernel == {} and 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tuned_configurations_are_cached_by_bucket(monkeypatch):
    """On a GPU a kernel is tuned once per key (dtype, constexprs, channel counts and map size bucketed to powers
    of two, exact strides); later calls reuse the cached configuration and say which one they ran with."""
    from deeplab_ops.triton import conv_engine, launch

    tuned = []

    def fake_tune(spec, device, sizes, run):
        tuned.append(dict(sizes))
        return {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 16, "BLOCK_K": 16, "tag": len(tuned)}

    monkeypatch.setattr(launch, "_interpreter_active", lambda: False)
    monkeypatch.setattr(launch, "_tune", fake_tune)
    monkeypatch.setattr(launch, "_TUNED", {})
    spec = conv_engine.KERNELS["fwd"]
    cuda = torch.device("cuda", 0)
    meta = dict(KH=3, KW=3, TRAINING=True)

    def pick(c_in=64, c_out=64, hw=33, stride=1, dtype=torch.float16, **flags):
        sizes = dict(C_in=c_in, C_out=c_out, H_out=hw, W_out=hw, stride_h=stride, stride_w=stride)
        return launch.tuned_config(spec, cuda, dtype, sizes, dict(meta, **flags), lambda cfg: None)["tag"]

    first = pick()
    assert pick(c_in=60, hw=40) == first == 1  # same buckets (64 channels, 64-pixel rows): no new tuning
    assert pick(c_in=65) == 2                  # 128-channel bucket
    assert pick(stride=2) == 3                 # strides are exact
    assert pick(dtype=torch.bfloat16) == 4
    assert pick(TRAINING=False) == 5           # another epilogue is another kernel
    assert pick(c_in=60, hw=40) == 1 and len(tuned) == 5
    # CPU tensors (the interpreter) never tune: the fixed configuration.
    assert launch.tuned_config(spec, torch.device("cpu"), torch.float32, {}, meta, None) == spec.interpreter
