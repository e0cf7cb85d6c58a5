"""The launch counter (`deeplab_ops.triton.count_launches`): what the overhead benchmark reads, the JIT
specializations it predicts; the tuning cache's key; launches on their tensors' device."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading

import pytest
import torch
import triton
from helpers import TRITON_DEVICE, triton_test

import deeplab_ops
import deeplab_ops.triton as dtriton
from deeplab_ops.triton import conv_bn_relu as triton_cbr

DEVICE = TRITON_DEVICE


def _conv_inputs(n=2, c_in=3, c_out=4, h=5, w=6):
    x = torch.randn(n, c_in, h, w, device=DEVICE)
    weight = torch.randn(c_out, c_in, 3, 3, device=DEVICE)
    gamma, beta = torch.rand(c_out, device=DEVICE) + 0.5, torch.randn(c_out, device=DEVICE)
    rm, rv = torch.randn(c_out, device=DEVICE), torch.rand(c_out, device=DEVICE) + 0.5
    return x, weight, gamma, beta, rm, rv


def _forward(training: bool, **shape):
    x, weight, gamma, beta, rm, rv = _conv_inputs(**shape)
    return triton_cbr.forward(x, weight, gamma, beta, rm, rv, [1, 1], [1, 1], [1, 1], training, 0.1, 1e-5, None,
                              True)


@triton_test
def test_counts_training_and_eval_forward_launches():
    with dtriton.count_launches() as train:
        _forward(True)
    assert train.total == 3, train.by_kernel
    assert train.by_kernel == {"conv_fwd": 1, "bn_finalize": 1, "bn_apply": 1}
    with dtriton.count_launches() as evaluation:
        _forward(False)
    assert evaluation.total == 1 and evaluation.by_kernel == {"conv_fwd": 1}


@triton_test
def test_counts_through_the_public_op_and_nests():
    x, weight, gamma, beta, rm, rv = _conv_inputs()
    with dtriton.count_launches() as outer:
        deeplab_ops.conv_bn_relu(x, weight, gamma, beta, rm, rv, training=False, backend="triton")
        with dtriton.count_launches() as inner:
            _forward(False)
    assert inner.total == 1
    assert outer.total == 2 and outer.by_kernel == {"conv_fwd": 2}
    assert sum(outer.by_kernel.values()) == outer.total


@triton_test
def test_inactive_counter_sees_nothing_and_other_threads_are_not_counted():
    _forward(False)  # no block active: nothing to record into
    with dtriton.count_launches() as counter:
        worker = threading.Thread(target=_forward, args=(False,))
        worker.start()
        worker.join()
    assert counter.total == 0 and counter.by_kernel == {}


@triton_test
def test_a_backward_run_by_another_thread_counts_in_the_open_block():
    """Autograd runs a CUDA backward in its device worker thread, not in the thread that called backward(): those
    launches count in the block that is open (on an H200 a forward + backward counted only the forward). Here a
    thread with no block of its own runs the backward (a graph task, as the worker's): counted; its forward is not
    (no graph task), nor the block's own thread's launches twice."""
    logits = torch.randn(2, 3, 4, 4, device=DEVICE, requires_grad=True)
    target = torch.randint(0, 3, (2, 8, 8), device=DEVICE)
    with dtriton.count_launches() as counter:
        loss = deeplab_ops.upsample_cross_entropy(logits, target, backend="triton")
        worker = threading.Thread(target=loss.backward)
        worker.start()
        worker.join()
        other = threading.Thread(target=deeplab_ops.upsample_cross_entropy, args=(logits.detach(), target),
                                 kwargs=dict(backend="triton"))
        other.start()
        other.join()
    assert counter.by_kernel == {"uce_fwd": 1, "uce_bwd": 1}, counter.by_kernel
    assert logits.grad is not None
    with dtriton.count_launches() as after:  # the closed block left nothing behind
        pass
    assert after.total == 0 and not dtriton.counting._OPEN


def test_counter_import_imports_no_triton():
    code = ("import sys, deeplab_ops.triton as t; assert 'triton' not in sys.modules\n"
            "with t.count_launches() as c: pass\n"
            "assert c.total == 0 and c.by_kernel == {} and 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_tuned_configurations_are_cached_by_key(monkeypatch):
    """On a GPU a kernel is tuned once per key (dtype, constexprs, channel counts bucketed to powers of two, exact
    strides; never the spatial size); later calls reuse the cached configuration and say which one they ran
    with."""
    from deeplab_ops.triton import conv_engine, launch

    tuned = []

    def fake_tune(spec, device, sizes, run):
        tuned.append(dict(sizes))
        return {"BLOCK_H": 8, "BLOCK_W": 8, "BLOCK_N": 16, "BLOCK_K": 16, "tag": len(tuned)}

    monkeypatch.setattr(launch, "_interpreter_active", lambda: False)
    monkeypatch.setattr(launch, "tune", fake_tune)
    monkeypatch.setattr(launch, "TUNED", {})
    spec = conv_engine.KERNELS["fwd"]
    cuda = torch.device("cuda", 0)
    meta = dict(KH=3, KW=3, TRAINING=True)

    def pick(c_in=64, c_out=64, hw=33, stride=1, dtype=torch.float16, **flags):
        sizes = dict(C_in=c_in, C_out=c_out, H_out=hw, W_out=hw, stride_h=stride, stride_w=stride)
        return launch.tuned_config(spec, cuda, dtype, sizes, dict(meta, **flags), lambda cfg: None)["tag"]

    first = pick()
    assert pick(c_in=60, hw=40) == first == 1  # same buckets (64 channels): no new tuning
    assert pick(hw=513) == pick(hw=1) == 1     # the map size never re-tunes
    assert pick(c_in=65) == 2                  # 128-channel bucket
    assert pick(stride=2) == 3                 # strides are exact
    assert pick(dtype=torch.bfloat16) == 4
    assert pick(TRAINING=False) == 5           # another epilogue is another kernel
    assert pick(c_in=60, hw=40) == 1 and len(tuned) == 5
    wgrad = conv_engine.KERNELS["wgrad"]
    sizes = dict(C_in=64, C_out=64, H_out=33, W_out=33, stride_h=1, stride_w=1, SPLITS=3)
    assert launch.tuning_key(wgrad, cuda, torch.float16, sizes, meta) == launch.tuning_key(
        wgrad, cuda, torch.float16, dict(sizes, H_out=129, W_out=65, SPLITS=17), meta)  # splits follow the map size
    # CPU tensors (the interpreter) do not tune unless asked to (set_autotune("all")): the fixed configuration.
    assert launch.autotune_mode() == "gpu"
    assert launch.tuned_config(spec, torch.device("cpu"), torch.float32, {}, meta, None) == spec.interpreter


def test_autotune_modes(monkeypatch):
    """"off": no tuning, the first pruned candidate on a GPU; "all": the interpreter tunes among the pruned
    candidates (wall clock) and caches the winner; a bad mode is a clear error."""
    from deeplab_ops.triton import conv_engine, launch

    monkeypatch.setattr(launch, "TUNED", {})
    spec = conv_engine.KERNELS["fwd"]
    sizes = dict(C_in=64, C_out=64, H_out=9, W_out=9, stride_h=1, stride_w=1)
    meta = dict(KH=3, KW=3, TRAINING=True)
    cpu = torch.device("cpu")
    options = launch.candidates(spec, cpu, sizes)
    assert len(options) >= 2 and all(c["BLOCK_N"] <= 64 and c["BLOCK_K"] <= 64 for c in options)
    timed = []
    previous = launch.set_autotune("all")
    try:
        got = launch.tuned_config(spec, cpu, torch.float32, sizes, meta, lambda c: timed.append(c))
        again = launch.tuned_config(spec, cpu, torch.float32, dict(sizes, H_out=40), meta, None)
        assert launch.set_autotune("off") == "all"
        assert launch.tuned_config(spec, cpu, torch.float64, sizes, meta, None) == spec.interpreter
        monkeypatch.setattr(launch, "_interpreter_active", lambda: False)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        untuned = launch.tuned_config(spec, torch.device("cuda", 0), torch.float32, sizes, meta, None)
    finally:
        launch.set_autotune(previous)
    assert timed == options and got in options and again is got  # every candidate ran once; the winner cached
    assert untuned == launch.candidates(spec, torch.device("cuda", 0), sizes)[0]
    with pytest.raises(ValueError, match=r"mode='fast' is not an autotune mode; expected one of \('gpu', 'all'"):
        launch.set_autotune("fast")
    env = {"DEEPLAB_OPS_AUTOTUNE": "sometimes", "PYTHONPATH": ":".join(sys.path)}
    done = subprocess.run([sys.executable, "-c", "import deeplab_ops.triton.launch"], env=env, capture_output=True,
                          text=True)
    assert done.returncode != 0 and "DEEPLAB_OPS_AUTOTUNE='sometimes' is not an autotune mode" in done.stderr


def test_candidates_fit_the_channels():
    """Channel blocks no wider than the channels' next power of 2, and none narrower than 32 along channels that
    number more than 16: the 16 x 16 tile stays for 16 channels or fewer, and as float64's only one; never empty."""
    from deeplab_ops.triton import aspp, conv_engine, launch

    configs = [triton.Config({"BN": n, "BK": k}) for n, k in ((128, 64), (64, 32), (32, 32), (16, 16))]
    prune = launch.prune_by_channels("C_out", "C_in", "BN", "BK")

    def kept(c_out, c_in):
        return [(c.kwargs["BN"], c.kwargs["BK"]) for c in prune(configs, dict(C_out=c_out, C_in=c_in))]

    assert kept(256, 256) == [(128, 64), (64, 32), (32, 32)]
    assert kept(64, 17) == [(64, 32), (32, 32)]
    assert kept(16, 256) == kept(8, 8) == kept(64, 3) == [(16, 16)]  # no 32-wide block fits: the smallest
    assert kept(32, 32) == [(32, 32)]
    for spec in [*conv_engine.KERNELS.values(), *aspp.KERNELS.values()]:
        for hopper in (True, False):
            wide = dict(C_in=256, C_out=512, C=256, BC=1280, elem_size=2, hopper=hopper)
            narrow = [c.kwargs for c in spec.prune(spec.configs(hopper), wide)
                      if min(v for name, v in c.kwargs.items() if name not in ("BLOCK_H", "BLOCK_W")) < 32]
            assert not narrow, (launch.kernel_name(spec.kernel), hopper, narrow)
            fp64 = spec.prune(spec.configs(hopper), dict(wide, elem_size=8))
            assert len(fp64) == 1 and fp64[0] is min(spec.configs(hopper), key=lambda c: conv_engine._product(
                spec.kernel, c)), launch.kernel_name(spec.kernel)


def test_few_input_channels_keep_a_wide_tile():
    """A layer with 16 or fewer channels along the reduction and 33 or more along the output (an RGB stem, 3 -> 64)
    keeps a tile of 64 output channels over at least 64 pixels (sm_90: 128, a wgmma warpgroup's 64 rows twice), not
    the 16 x 16 fallback, in the forward (K = C_in); the dgrad's K is C_out (a 64 -> 3 layer). Layers with more
    channels along the reduction never keep it (the candidates for them are as before)."""
    from deeplab_ops.triton import conv_engine

    for hopper in (True, False):
        for name, sizes in (("fwd", dict(C_in=3, C_out=64)), ("dgrad", dict(C_in=64, C_out=3)),
                            ("fwd", dict(C_in=16, C_out=256))):
            spec = conv_engine.KERNELS[name]
            kept = [c.kwargs for c in spec.prune(spec.configs(hopper), dict(sizes, elem_size=2, hopper=hopper))]
            assert len(kept) == 1, (name, hopper, kept)
            assert kept[0]["BLOCK_K"] == 16 and kept[0]["BLOCK_N"] == 64, (name, hopper, kept)
            assert kept[0]["BLOCK_H"] * kept[0]["BLOCK_W"] >= (128 if hopper else 64), kept
        wide = dict(C_in=256, C_out=256, elem_size=2, hopper=hopper)
        for spec in conv_engine.KERNELS.values():
            assert all(c.kwargs.get("BLOCK_K", 64) > 16 for c in spec.prune(spec.configs(hopper), wide))


def test_no_tuning_inside_a_cuda_graph_capture(monkeypatch):
    """A key first met inside a CUDA-graph capture (where timing would synchronize, which a capture forbids) runs
    the first pruned candidate, untimed and not remembered: the same key outside a capture is tuned as usual."""
    from deeplab_ops.triton import conv_engine, launch

    tuned = []
    monkeypatch.setattr(launch, "_interpreter_active", lambda: False)
    monkeypatch.setattr(launch, "TUNED", {})
    monkeypatch.setattr(launch, "tune", lambda spec, device, sizes, run: tuned.append(sizes) or {"tag": "tuned"})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    spec = conv_engine.KERNELS["fwd"]
    cuda = torch.device("cuda", 0)
    sizes = dict(C_in=64, C_out=64, H_out=33, W_out=33, stride_h=1, stride_w=1)
    meta = dict(KH=3, KW=3, TRAINING=True)
    first = launch.candidates(spec, cuda, sizes)[0]
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == first
    assert not tuned and not launch.TUNED
    capturing[0] = False
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == {"tag": "tuned"} and len(tuned) == 1
    capturing[0] = True  # a tuned key is served inside a capture too
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == {"tag": "tuned"} and len(tuned) == 1


def _hopper_fwd_candidates(monkeypatch):
    """The conv forward's tuning on a pretended sm_90 GPU, with an empty cache: (launch, spec, device, sizes, meta,
    the pruned candidates, at least two)."""
    from deeplab_ops.triton import conv_engine, launch

    monkeypatch.setattr(launch, "_interpreter_active", lambda: False)
    monkeypatch.setattr(launch, "TUNED", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    spec = conv_engine.KERNELS["fwd"]
    cuda = torch.device("cuda", 0)
    sizes = dict(C_in=64, C_out=64, H_out=33, W_out=33, stride_h=1, stride_w=1)
    meta = dict(KH=3, KW=3, TRAINING=True)
    options = launch.candidates(spec, cuda, sizes)
    assert len(options) >= 2
    return launch, spec, cuda, sizes, meta, options


def test_deterministic_algorithms_never_time_configurations(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) (train.py --deterministic) a call runs the first pruned
    candidate, never a timed winner: timings differ between processes, and another tile sums in another order (a
    review found the outputs and BatchNorm statistics of two candidate tiles differ in their last bits)."""
    launch, spec, cuda, sizes, meta, options = _hopper_fwd_candidates(monkeypatch)
    tuned = []
    monkeypatch.setattr(launch, "tune", lambda spec, device, sizes, run: tuned.append(1) or options[-1])
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[-1]  # timed winner
        torch.use_deterministic_algorithms(True)
        assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[0]
        assert launch.tuned_config(spec, cuda, torch.float16, dict(sizes, C_in=128), meta, None) == (
            launch.candidates(spec, cuda, dict(sizes, C_in=128))[0])
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(tuned) == 1
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[-1]  # the timed one again


def test_out_of_memory_while_timing_keeps_the_fastest_timed_so_far(monkeypatch):
    """do_bench allocates a 256 MB cache-flush buffer: on a GPU near full the timing itself runs out of memory. The
    call must not fail for it: the fastest candidate timed before (else the first) runs, and is kept: timing again at
    every call would fail again, each failed allocation emptying the allocator's cache (a review's point)."""
    launch, spec, cuda, sizes, meta, options = _hopper_fwd_candidates(monkeypatch)
    monkeypatch.setattr(launch, "device_guard", lambda device: contextlib.nullcontext())
    assert len(options) >= 3
    timed = []
    out_of_memory_at = [2]

    def time_one(run, config, device):
        if options.index(config) == out_of_memory_at[0]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")
        timed.append(config)
        return 2.0 if config == options[0] else 1.0  # the second is the faster of the two timed

    monkeypatch.setattr(launch, "_time", time_one)
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[1]
    assert timed == options[:2]
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[1] and timed == options[:2]
    out_of_memory_at[0] = 0  # at the first candidate: the first, untimed, kept all the same
    monkeypatch.setattr(launch, "TUNED", {})
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[0]
    assert len(launch.TUNED) == 1 and timed == options[:2]


# ---- winners kept on disk ------------------------------------------------------------------------------------


def _kept_tuning(monkeypatch, tmp_path, gpu_name="NVIDIA H100 80GB HBM3", sms=132):
    """_hopper_fwd_candidates with winners kept in tmp_path and timings faked (the last candidate the fastest):
    (launch, spec, device, sizes, meta, options, the configurations timed)."""
    import types

    launch, spec, cuda, sizes, meta, options = _hopper_fwd_candidates(monkeypatch)
    monkeypatch.setattr(launch, "device_guard", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: types.SimpleNamespace(
        name=gpu_name, major=9, minor=0, multi_processor_count=sms))
    timed = []

    def time_one(run, config, device):
        timed.append(config)
        return 1.0 / (1 + options.index(config))

    monkeypatch.setattr(launch, "_time", time_one)
    monkeypatch.setattr(launch, "_TUNING_CACHE", [str(tmp_path)])
    return launch, spec, cuda, sizes, meta, options, timed


def test_a_kept_winner_serves_a_later_process_untimed(monkeypatch, tmp_path):
    """A timed winner is written to the tuning folder (one JSON file per key, in a subfolder per Triton version and
    kernel sources); a later process (an empty in-memory cache) loads it and times nothing, at any map size of the
    same pixel bucket (a power of 4 of N x H x W). Another pixel bucket, GPU, SM count, candidate list or kernel
    source is a miss, timed again and kept beside it."""
    launch, spec, cuda, sizes, meta, options, timed = _kept_tuning(monkeypatch, tmp_path)
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[-1]
    (entry,) = tmp_path.rglob("*.json")
    assert timed == options and entry.parent.parent == tmp_path and entry.parent == __import__("pathlib").Path(
        launch.kept_folder()) and entry.parent.name.startswith(f"triton-{triton.__version__}-")
    # the entry records every candidate's time beside the winner (the data a shorter candidate list needs)
    kept = __import__("json").loads(entry.read_text())
    assert kept["config"] == options[-1]
    assert kept["timings"] == [{"config": c, "ms": 1.0 / (1 + i)} for i, c in enumerate(options)]
    for same_bucket in (sizes, dict(sizes, H_out=40, W_out=40), dict(sizes, N=1, H_out=64, W_out=64)):
        monkeypatch.setattr(launch, "TUNED", {})  # a new process
        timed.clear()
        assert launch.tuned_config(spec, cuda, torch.float16, same_bucket, meta, None) == options[-1] and not timed
    monkeypatch.setattr(launch, "TUNED", {})
    assert launch.tuned_config(spec, cuda, torch.bfloat16, sizes, meta, None) == options[-1]  # another key
    assert timed == options and len(list(tmp_path.rglob("*.json"))) == 2
    import types

    gpu = types.SimpleNamespace(name="NVIDIA H200", major=9, minor=0, multi_processor_count=132)
    for change, call in (
        (lambda: None, dict(sizes, N=16, H_out=129, W_out=129)),  # a training crop's map: another bucket
        (lambda: monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: gpu), sizes),
        (lambda: setattr(gpu, "multi_processor_count", 114), sizes),
        (lambda: monkeypatch.setattr(
            launch, "candidates", lambda spec, device, sizes, real=launch.candidates: real(spec, device, sizes)[1:]),
         sizes),
        (lambda: monkeypatch.setattr(launch, "_sources_digest", lambda: "an edited kernel"), sizes),
    ):
        change()
        monkeypatch.setattr(launch, "TUNED", {})
        timed.clear()
        launch.tuned_config(spec, cuda, torch.float16, call, meta, None)
        assert timed, "another pixel bucket, GPU, candidate list or source must be timed again"
    assert len(list(tmp_path.rglob("*.json"))) == 7 and not list(tmp_path.rglob("*.tmp"))
    assert len(list(tmp_path.iterdir())) == 2  # the edited sources' winners in a subfolder of their own


def test_a_kept_winner_serves_a_cuda_graph_capture(monkeypatch, tmp_path):
    """A key first met inside a capture (nothing may be timed there) takes a kept winner, read from its file, and
    remembers it; without one, the first candidate, not remembered (test_no_tuning_inside_a_cuda_graph_capture)."""
    launch, spec, cuda, sizes, meta, options, timed = _kept_tuning(monkeypatch, tmp_path)
    launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)
    monkeypatch.setattr(launch, "TUNED", {})
    timed.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[-1] and not timed
    assert list(launch.TUNED.values()) == [options[-1]]
    assert launch.tuned_config(spec, cuda, torch.bfloat16, sizes, meta, None) == options[0] and not timed
    assert len(launch.TUNED) == 1


def test_a_bad_kept_entry_is_timed_again_and_replaced(monkeypatch, tmp_path):
    """A truncated file, another key's entry under this name (a hash collision) or a winner that is no longer a
    candidate are misses: timed again, and the file rewritten."""
    import json

    launch, spec, cuda, sizes, meta, options, timed = _kept_tuning(monkeypatch, tmp_path)
    launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)
    (path,) = tmp_path.rglob("*.json")
    good = json.loads(path.read_text())
    for bad in ("{\"key\": ", json.dumps(dict(good, key="another key")),
                json.dumps(dict(good, config=dict(good["config"], BLOCK_N=48))), "[]"):
        path.write_text(bad)
        monkeypatch.setattr(launch, "TUNED", {})
        timed.clear()
        assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[-1] and timed == options
        assert json.loads(path.read_text()) == good


def test_what_is_not_kept(monkeypatch, tmp_path):
    """Nothing is kept with the folder "off", where the kernel sources cannot be read, for a winner chosen while
    memory ran out during the timing, or for a key with one candidate (nothing timed); a folder that cannot be
    written warns once, after the winner is remembered (a warning filter that raises loses no timing)."""
    import warnings

    launch, spec, cuda, sizes, meta, options, timed = _kept_tuning(monkeypatch, tmp_path)
    monkeypatch.setattr(launch, "_TUNING_CACHE", ["off"])
    assert launch.tuning_cache_dir() is None and launch.kept_folder() is None
    launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)
    assert timed == options and not list(tmp_path.iterdir())
    monkeypatch.setattr(launch, "_TUNING_CACHE", [str(tmp_path)])
    monkeypatch.setattr(launch, "_sources_digest", lambda: None)
    monkeypatch.setattr(launch, "TUNED", {})
    assert launch.kept_folder() is None
    launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    launch, spec, cuda, sizes, meta, options, timed = _kept_tuning(monkeypatch, tmp_path)

    def out_of_memory(run, config, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 256.00 MiB")

    monkeypatch.setattr(launch, "_time", out_of_memory)
    assert launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None) == options[0]
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(launch, "TUNED", {})
    one = dict(sizes, C_in=16, C_out=16)
    assert len(launch.candidates(spec, cuda, one)) == 1
    launch.tuned_config(spec, cuda, torch.float16, one, meta, None)
    assert not list(tmp_path.iterdir())
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(launch, "_TUNING_CACHE", [str(blocker / "tuning")])
    monkeypatch.setattr(launch, "_WRITE_WARNED", set())
    monkeypatch.setattr(launch, "_time", lambda run, config, device: 1.0)
    monkeypatch.setattr(launch, "TUNED", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="cannot be kept in .*a file.*DEEPLAB_OPS_TUNING_CACHE"):
            launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)
        assert len(launch.TUNED) == 1  # remembered before the warning
        launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)
        monkeypatch.setattr(launch, "TUNED", {})
        launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)  # once per folder: no second warning


def test_the_tuning_folder_setting():
    """DEEPLAB_OPS_TUNING_CACHE at import (the tests set it to off: a user's kept winners must not serve them), or
    set_tuning_cache: "" is a folder in Triton's cache folder, "off" none, anything else that folder."""
    from deeplab_ops.triton import launch

    assert os.environ["DEEPLAB_OPS_TUNING_CACHE"] == "off" and launch.tuning_cache_dir() is None
    previous = launch.set_tuning_cache("")
    try:
        default = launch.tuning_cache_dir()
        assert os.path.basename(default) == "deeplab_ops_tuning"
        assert os.path.dirname(default) == str(triton.knobs.cache.dir)
        launch.set_tuning_cache("/some/folder")
        assert launch.tuning_cache_dir() == "/some/folder"
        with pytest.raises(TypeError, match="folder=3 must be a path"):
            launch.set_tuning_cache(3)
    finally:
        launch.set_tuning_cache(previous)
    code = ("import os, torch\n"
            "from deeplab_ops.triton import conv_bn_relu as cbr, launch\n"
            "launch.set_autotune('all')\n"
            "x, w = torch.randn(1, 64, 3, 3).half(), torch.randn(64, 64, 1, 1).half()\n"  # float16: 3 candidates
            "g, b, rm, rv = torch.ones(64), torch.zeros(64), torch.zeros(64), torch.ones(64)\n"
            "times = []\n"
            "real = launch.tune\n"
            "launch.tune = lambda *a: times.append(1) or real(*a)\n"
            "cbr.forward(x, w, g, b, rm, rv, [1, 1], [0, 0], [1, 1], True, 0.1, 1e-5, None, True)\n"
            "print(len(times), len(os.listdir(launch.kept_folder())))\n")
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, DEEPLAB_OPS_TUNING_CACHE=folder, TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join(sys.path))
        runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
                for _ in range(2)]
    first, second = (tuple(int(v) for v in r.stdout.split()) for r in runs)
    assert first[0] >= 1 and first[1] >= 1, runs[0].stdout  # tuned and kept
    assert second == (0, first[1]), runs[1].stdout          # nothing timed in the second process


# ---- JIT specializations --------------------------------------------------------------------------------------


@triton_test
def test_signatures_follow_triton_specialization():
    """Calls that differ only in spatial size compile nothing new, whatever the size's class (1, divisible by 16,
    other): the kernels leave sizes unspecialized (conv_engine._SIZES_UNSPECIALIZED, bn_apply's and bn_finalize's
    row and partial counts). Channel counts stay specialized: 16 channels are another variant than 5."""
    with dtriton.count_launches() as one:
        _forward(True, w=6)
    with dtriton.count_launches() as sizes:
        for h, w in ((5, 6), (5, 7), (16, 16), (1, 32), (7, 1), (9, 48)):
            _forward(True, h=h, w=w)
    assert sizes.total == 6 * one.total == 18
    assert sizes.signatures == one.signatures and len(one.signatures) == 3
    for sig in one.signatures:
        args = {n: c for n, _, c in sig.args}
        for name in ("H", "W", "H_out", "W_out", "M", "P"):
            assert args.get(name, "") == "", (sig.kernel, name, args[name])
    conv = next(s for s in one.signatures if s.kernel == "conv_fwd")
    consts, args = dict(conv.constexprs), {n: (t, c) for n, t, c in conv.args}
    assert consts["KH"] == 3 and consts["TRAINING"] is True and {"BLOCK_H", "num_warps", "num_stages"} <= set(consts)
    assert args["x_ptr"] == ("*float32", "align16") and args["C_in"] == ("i32", "") and args["stride_h"][1] == ""
    with dtriton.count_launches() as channels:  # 16 channels: C_in divisible by 16, another conv variant
        _forward(True, c_in=16, w=6)
    convs = {s for s in channels.signatures | one.signatures if s.kernel == "conv_fwd"}
    assert len(convs) == 2 and {dict((n, c) for n, _, c in s.args)["C_in"] for s in convs} == {"", "div16"}
    with dtriton.count_launches() as evaluation:  # other constexprs (eval BN epilogue): another variant
        _forward(False, w=6)
    assert not evaluation.signatures & one.signatures


@triton_test
def test_padding_dilation_stride_and_split_count_share_one_compiled_conv(monkeypatch):
    """Padding and dilation (every conv kernel), the forward's and the wgrad's strides and the wgrad's split count are
    not specialized (conv_engine._FWD_UNSPECIALIZED, _WGRAD_UNSPECIALIZED): a value of 1, of a multiple of 16 or of
    neither compiles one kernel of each, where each class compiled its own; the dgrad's strides stay specialized (a
    stride of 1 folds its divisions away). The weight gradient is the same whatever the split count."""
    from deeplab_ops import reference
    from deeplab_ops.triton import conv_engine

    x, weight, gamma, beta, rm, rv = _conv_inputs(c_in=16, c_out=16, h=9, w=9)
    grad = {}
    with dtriton.count_launches() as counts:
        for rate, stride, splits in ((1, 1, 1), (2, 2, 16), (16, 1, 3), (2, 2, 1), (1, 1, 5)):
            monkeypatch.setattr(conv_engine, "split_count", lambda device, programs, tiles, s=splits: s)
            st, pd = [stride, stride], [rate, rate]
            out, conv_out, mean, invstd, *_ = triton_cbr.forward(x, weight, gamma, beta, rm, rv, st, pd, pd, True,
                                                                 0.1, 1e-5, None, True)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(rate * 10 + stride)).to(out)
            dw = triton_cbr.backward(g, x, weight, gamma, conv_out, out, mean, invstd, st, pd, pd, True, True,
                                     [True, True, False, False, False])[1]
            xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
            ref = reference.conv_bn_relu(xr, wr, gamma, beta, rm.clone(), rv.clone(), stride=st, padding=pd,
                                         dilation=pd, training=True)
            ref.backward(g)
            torch.testing.assert_close(dw, wr.grad, rtol=1e-4, atol=1e-3)
            grad[(rate, stride, splits)] = dw
    classes = {}
    for s in counts.signatures:
        classes.setdefault(s.kernel, []).append({n: c for n, _, c in s.args})
    assert counts.by_kernel["conv_fwd"] == counts.by_kernel["conv_wgrad"] == counts.by_kernel["conv_dgrad"] == 5
    assert len(classes["conv_fwd"]) == len(classes["conv_wgrad"]) == 1, classes
    fwd, wgrad = classes["conv_fwd"][0], classes["conv_wgrad"][0]
    geometry = ("pad_h", "pad_w", "dil_h", "dil_w", "stride_h", "stride_w")
    assert all(fwd[n] == wgrad[n] == "" for n in geometry) and wgrad["SPLITS"] == ""
    strides = sorted(d["stride_h"] for d in classes["conv_dgrad"])
    assert strides == ["", "==1"] and all(d["pad_h"] == d["dil_h"] == "" for d in classes["conv_dgrad"])
    torch.testing.assert_close(grad[(2, 2, 16)], grad[(2, 2, 1)], rtol=1e-5, atol=1e-4)


@triton_test
def test_relu_and_no_relu_share_one_compiled_backward():
    """The BatchNorm apply, its backward reduction, the dgrad and the wgrad take the ReLU as a runtime flag (a
    select; a masked load of the output in the backward): a layer with ReLU and one without (a bottleneck's last
    conv, a downsample) compile one kernel of each, and both give the reference's output and gradients (without
    ReLU, negative outputs and their gradients pass)."""
    from deeplab_ops import reference

    x, weight, gamma, beta, rm, rv = _conv_inputs(c_in=16, c_out=16, h=7, w=5)
    with dtriton.count_launches() as counts:
        for relu in (True, False):
            one = [1, 1]
            out, conv_out, mean, invstd, *_ = triton_cbr.forward(x, weight, gamma, beta, rm, rv, one, one, one, True,
                                                                 0.1, 1e-5, None, relu)
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(int(relu))).to(out)
            dx, dw = triton_cbr.backward(g, x, weight, gamma, conv_out, out, mean, invstd, one, one, one, True, relu,
                                         [True, True, False, False, False])[:2]
            xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
            ref = reference.conv_bn_relu(xr, wr, gamma, beta, rm.clone(), rv.clone(), padding=one, training=True,
                                         relu=relu)
            ref.backward(g)
            assert (out < 0).any() != relu
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dx, xr.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dw, wr.grad, rtol=1e-4, atol=1e-3)
    shared = ("conv_dgrad", "conv_wgrad", "bn_apply", "bn_bwd_reduce")
    assert all(counts.by_kernel[k] == 2 for k in shared), counts.by_kernel
    kernels = [s.kernel for s in counts.signatures]
    assert all(kernels.count(k) == 1 for k in shared), counts.signatures


@triton_test
@pytest.mark.parametrize("relu", [True, False])
def test_memory_efficient_recompute_runs_the_training_forwards_own_variant(relu):
    """The memory-efficient backward recomputes conv_out through conv_bias_act's plain form (no bias, residual or
    ReLU): the training forward's kernel specialization and configuration, so the same bits and no kernel variant
    of its own (it compiled 6 more for a DeepLabV3-R50 step: 41 against the goal's 40)."""
    x, weight, gamma, beta, rm, rv = _conv_inputs(c_in=5, c_out=6, h=7, w=9)
    with dtriton.count_launches() as forward:
        _, conv_out, *_ = triton_cbr.forward(x, weight, gamma, beta, rm, rv, [1, 1], [1, 1], [1, 1], True, 0.1, 1e-5,
                                             None, relu)
    with dtriton.count_launches() as recompute:
        again = triton_cbr.conv_bias_act(x, weight, None, None, [1, 1], [1, 1], [1, 1], False)
    assert recompute.by_kernel == {"conv_fwd": 1}
    assert recompute.signatures == {s for s in forward.signatures if s.kernel == "conv_fwd"}
    assert torch.equal(again, conv_out)
    with dtriton.count_launches() as fused_eval:  # an epilogue (bias + ReLU: the eval fold) is its own variant
        triton_cbr.conv_bias_act(x, weight, beta, None, [1, 1], [1, 1], [1, 1], True)
    assert not fused_eval.signatures & forward.signatures


def test_argument_classes_match_tritons_own():
    """Two arguments get one class exactly when Triton's specialization (the NVIDIA backend's) says they compile
    to one kernel: integers by width and by == 1 / divisible by 16, tensors by dtype and 16-byte alignment."""
    from triton.runtime import jit  # triton is a requirement: fail, never skip

    from deeplab_ops.triton import launch
    native = getattr(jit, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this Triton has no native_specialize_impl to compare with")
    from triton.backends.compiler import BaseBackend

    base = torch.zeros(64)
    values = [0, 1, 2, 15, 16, 17, 32, 48, 2**31 - 1, 2**31, 2**32, -16, -1, True, False, 0.5, 2.0, None,
              base, base[4:], base[1:], base.double(), base.half(), base.int()[8:]]
    for a in values:
        for b in values:
            ours = launch.arg_class(a) == launch.arg_class(b)
            theirs = native(BaseBackend, a, False, True, True) == native(BaseBackend, b, False, True, True)
            assert ours == theirs, [v if not torch.is_tensor(v) else (v.dtype, v.data_ptr() % 16) for v in (a, b)]


@triton_test
def test_inactive_counting_computes_no_signature(monkeypatch):
    from deeplab_ops.triton import launch

    def boom(*args):
        raise AssertionError("a signature was computed with no count_launches block active")

    monkeypatch.setattr(launch, "launch_signature", boom)
    errors = []
    # A fresh thread: no block active there (conftest may count this one's launches, DEEPLAB_OPS_TEST_SIGNATURES).
    worker = threading.Thread(target=lambda: errors.extend(_try(_forward, False)))
    worker.start()
    worker.join()
    assert not errors, errors


def _try(fn, *args) -> list:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001  (reported by the caller)
        return [e]
    return []


def test_nested_blocks_with_equal_counts_end_in_any_order():
    """Blocks are told apart by identity: an inner block that exits while its counts equal the outer one's stops
    counting (not the outer)."""
    with dtriton.count_launches() as outer:
        with dtriton.count_launches() as inner:
            assert inner == outer  # both empty: equal as values
        from deeplab_ops.triton.counting import active_counts

        assert len(active_counts()) == 1 and active_counts()[-1] is outer


# ---- device guard ---------------------------------------------------------------------------------------------


def test_launch_runs_under_its_tensors_device(monkeypatch):
    """A launch (and tuning) on cuda:1 while cuda:0 is current switches to cuda:1 for the launch only; on the current
    device there is no switch; CPU tensors hold the interpreter lock."""
    from deeplab_ops.triton import launch

    current, entered = [0], []

    @contextlib.contextmanager
    def switch(index):
        entered.append(index)
        saved, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = saved

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", switch)
    seen = []

    class Kernel:
        fn = launch.launch_kernel  # any function: only its name is read

        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append(current[0])

    monkeypatch.setattr(launch, "_device_of", lambda args: args[0])
    launch.launch_kernel(Kernel(), (1,), torch.device("cuda", 1))
    launch.launch_kernel(Kernel(), (1,), torch.device("cuda", 0))
    assert seen == [1, 0] and entered == [1] and current == [0]
    assert launch.device_guard(torch.device("cpu")) is launch.INTERPRETER_LOCK
    assert launch.run_tuned(None, torch.device("cuda", 1), torch.float32, {}, {}, lambda c: current[0], {}) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device_while_first_is_current():
    """A call on cuda:1 while cuda:0 is current: correct results, and the current device is left as it was."""
    from helpers import Case, assert_close, make_inputs

    from deeplab_ops import reference

    case = Case(2, 32, 9, 7, 32, residual=True)
    torch.cuda.set_device(0)
    for dtype in (torch.float32, torch.float64):
        x, w, g, b, rm, rv, res = make_inputs(case, dtype, "cuda:1")
        rm_ref = rm.double()
        out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv.clone(), padding=1, residual=res, backend="triton")
        expected = reference.conv_bn_relu(x.double(), w.double(), g.double(), b.double(), rm_ref, rv.double(),
                                          padding=1, residual=res.double())
        assert out.device == x.device and torch.cuda.current_device() == 0
        assert_close(out, expected, f"cuda:1 {dtype} output", 2e-4 if dtype == torch.float32 else 1e-9, 2e-4)
        assert_close(rm, rm_ref, f"cuda:1 {dtype} running_mean", 2e-4, 2e-4)


# ---- first use: the candidates of a new key compiled at once ---------------------------------------------------


def test_a_new_key_compiles_its_candidates_at_once_then_times_them(monkeypatch):
    """On a GPU, a new tuning key's candidates are compiled together (a first call pays about one compile instead
    of one per candidate: the H200's first calls spent tens of seconds compiling them one by one), then timed."""
    launch, spec, cuda, sizes, meta, options = _hopper_fwd_candidates(monkeypatch)
    monkeypatch.setattr(launch, "device_guard", lambda device: contextlib.nullcontext())
    events = []
    monkeypatch.setattr(launch, "compile_concurrently", lambda run, configs: events.append(("compile", configs)))
    monkeypatch.setattr(launch, "_time", lambda run, config, device: events.append(("time", config)) or 1.0)
    launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)
    assert events == [("compile", options)] + [("time", c) for c in options]
    events.clear()
    launch.tuned_config(spec, cuda, torch.float16, sizes, meta, None)  # cached: nothing compiled or timed
    assert events == []


class _RecordingKernel:
    """A stand-in JIT kernel: what launch_kernel asked of it, and from which thread."""

    def __init__(self):
        self.fn = _RecordingKernel  # kernel_name reads kernel.fn.__name__
        self.compiled, self.launched = [], []

    def warmup(self, *args, grid, **kwargs):
        self.compiled.append(kwargs["BLOCK"])

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(kwargs["BLOCK"])


def test_compile_concurrently_compiles_every_candidate_and_launches_none(monkeypatch):
    from deeplab_ops.triton import launch

    monkeypatch.setattr(launch, "_cores", lambda: 4)
    kernel = _RecordingKernel()
    if launch._async_compile_mode() is None:  # a Triton before 3.6: candidates compile when timed, one by one
        launch.compile_concurrently(lambda cfg: launch.launch_kernel(kernel, (1,), torch.empty(1), **cfg),
                                    [dict(BLOCK=1), dict(BLOCK=2)])
        assert kernel.compiled == [] and kernel.launched == []
        return
    other_thread = []

    def run(cfg):
        if cfg["BLOCK"] == 2:
            raise RuntimeError("this candidate does not compile")  # left to its timing, which raises it again
        if cfg["BLOCK"] == 3:  # another thread's launch meanwhile is a real launch (the flag is this thread's)
            t = threading.Thread(target=lambda: launch.launch_kernel(kernel, (1,), torch.empty(1), BLOCK=30))
            t.start()
            t.join()
            other_thread.append(kernel.launched[:])
        launch.launch_kernel(kernel, (1,), torch.empty(1), BLOCK=cfg["BLOCK"])

    launch.compile_concurrently(run, [dict(BLOCK=b) for b in (1, 2, 3, 4)])
    assert kernel.compiled == [1, 3, 4] and other_thread == [[30]] and kernel.launched == [30]
    launch.launch_kernel(kernel, (1,), torch.empty(1), BLOCK=5)  # the flag is off again
    assert kernel.launched == [30, 5] and kernel.compiled == [1, 3, 4]
    monkeypatch.setattr(launch, "_cores", lambda: 1)  # one core: nothing to gain, nothing done
    launch.compile_concurrently(run, [dict(BLOCK=6), dict(BLOCK=7)])
    assert kernel.compiled == [1, 3, 4] and kernel.launched == [30, 5]


_SM90_COMPILE = r"""
import threading, sys
import torch, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.driver import CudaDriver
from triton.runtime.driver import driver
from deeplab_ops.triton import launch


class Sm90(CudaDriver):  # Triton's JIT path with a stand-in driver: compiles for sm_90, loads and launches nothing
    def __init__(self):
        pass

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


@triton.jit
def scale(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)


driver.set_active(Sm90())
launch._cores = lambda: 4
threads = []
scale.device_caches[0]  # the binder, and the compile function it keeps
compile_fn = scale.compile


def compile_on(*args, **kwargs):
    threads.append(threading.current_thread().name)
    return compile_fn(*args, **kwargs)


scale.compile = compile_on
x, y = torch.randn(1000), torch.empty(1000)
configs = [dict(BLOCK=64, num_warps=2), dict(BLOCK=100, num_warps=4), dict(BLOCK=128, num_warps=4),
           dict(BLOCK=256, num_warps=4)]  # BLOCK=100 does not compile (tl.arange needs a power of 2)
launch.compile_concurrently(lambda cfg: launch.launch_kernel(scale, (4,), x, y, 1000, **cfg), configs)
assert len(threads) == 4 and all(t.startswith("deeplab_ops-compile") for t in threads), threads
compiled = list(scale.device_caches[0][0].values())  # the failed compile left nothing behind
assert len(compiled) == 3, compiled
assert all(type(k).__name__ == "CompiledKernel" and ".target sm_90" in k.asm["ptx"] for k in compiled)
assert sorted(k.metadata.num_warps for k in compiled) == [2, 4, 4]
try:  # compiled again (and failing again) when that candidate is timed, as without the pool
    scale.warmup(x, y, 1000, BLOCK=100, num_warps=4, grid=(4,))
except Exception as e:  # noqa: BLE001
    assert "arange" in str(e) or "power of 2" in str(e), e
else:
    raise AssertionError("BLOCK=100 compiled")
assert len(threads) == 5
print("ok")
"""


def test_candidates_compile_for_sm90_on_a_thread_pool(tmp_path):
    """Triton's own JIT path (a process without the interpreter, a stand-in CUDA driver: kernels compile for sm_90
    with this machine's ptxas, nothing is loaded or launched): compile_concurrently compiles each configuration
    once, on the pool's threads, and leaves finished kernels in the JIT cache, where the timing launches that follow
    find them."""
    from deeplab_ops.triton import launch

    if launch._async_compile_mode() is None:  # the fallback is tested above
        pytest.skip(f"triton {triton.__version__}: no AsyncCompileMode taking ignore_errors (before 3.6), nothing to "
                    "compile concurrently")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = tmp_path / "sm90_compile.py"  # a file: @triton.jit reads its kernel's source
    script.write_text(_SM90_COMPILE)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-3000:]


def test_an_async_compile_mode_without_ignore_errors_is_not_used(monkeypatch):
    """Triton 3.5's AsyncCompileMode takes no ignore_errors (its block raises the first failed compile): candidates
    compile one by one there, as before 3.5."""
    from deeplab_ops.triton import launch

    _async = pytest.importorskip("triton.runtime._async_compile")

    class Mode35:
        def __init__(self, executor):
            self.executor = executor

    monkeypatch.setattr(_async, "AsyncCompileMode", Mode35)
    assert launch._async_compile_mode() is None
    kernel = _RecordingKernel()
    monkeypatch.setattr(launch, "_cores", lambda: 4)
    launch.compile_concurrently(lambda cfg: launch.launch_kernel(kernel, (1,), torch.empty(1), **cfg),
                                [dict(BLOCK=1), dict(BLOCK=2)])
    assert kernel.compiled == [] and kernel.launched == []
