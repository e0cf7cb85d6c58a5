"""CUDA-graph capture hazards of deeplab_ops/triton's cached tables.

The triton loss's stencil tables live in an LRU cache (`upsample_ce.axis_tables`, 64 configurations). A launch
captured in a CUDA graph keeps the tables' device addresses; once the cache evicted that entry (more configurations
met afterwards: an evaluation over many image sizes, shapes recorded by torch.compile(mode="reduce-overhead")), the
tables were freed and every replay of the graph read memory the allocator had handed to other tensors (wrong loss
and gradients, or an illegal address). Tables read inside a capture are now kept for the process's lifetime. The
capture is mocked (torch.cuda.is_current_stream_capturing) and the tables built on the CPU: no GPU and no
interpreter are needed (no kernel runs).
"""

from __future__ import annotations

import functools
import gc
import types
import weakref

import pytest
import torch


def _fake_logits(h: int, w: int):
    # What _tables reads of the logits: dtype, shape, device (a CUDA device, so that the capture check applies).
    return types.SimpleNamespace(dtype=torch.float32, shape=(1, 3, h, w), device=torch.device("cuda", 0))


@pytest.fixture
def tiny_cpu_cache(monkeypatch):
    """axis_tables as an LRU of one configuration, its tables built on the CPU; no table kept from earlier tests."""
    from deeplab_ops.triton import upsample_ce

    build = upsample_ce.axis_tables.__wrapped__

    @functools.lru_cache(maxsize=1)
    def axis_tables(in_size, out_size, align_corners, dtype, device):
        # (the last element, the copies' `ready` event on CUDA: a token per entry)
        return *build(in_size, out_size, align_corners, dtype, torch.device("cpu"))[:9], object()

    monkeypatch.setattr(upsample_ce, "axis_tables", axis_tables)
    monkeypatch.setattr(upsample_ce, "current_stream_id", lambda device: 0)
    monkeypatch.setattr(upsample_ce, "_CAPTURED_TABLES", {})
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    return upsample_ce, capturing


def test_tables_read_by_a_capture_outlive_their_cache_entry(tiny_cpu_cache):
    upsample_ce, capturing = tiny_cpu_cache
    capturing[0] = True
    ty, tx = upsample_ce._tables(_fake_logits(4, 5), 16, 20, False)
    captured = [weakref.ref(ty[0]), weakref.ref(tx[0])]
    del ty, tx
    capturing[0] = False
    for size in (6, 7, 8):  # other configurations: the one-entry cache evicts the captured tables
        upsample_ce._tables(_fake_logits(size, size), 2 * size, 2 * size, False)
    gc.collect()
    assert all(ref() is not None for ref in captured), "tables a captured graph reads were freed"


def test_calls_outside_a_capture_keep_nothing(tiny_cpu_cache):
    upsample_ce, _ = tiny_cpu_cache
    ty, _ = upsample_ce._tables(_fake_logits(4, 5), 16, 20, False)
    ref = weakref.ref(ty[0])
    del ty, _
    upsample_ce._tables(_fake_logits(6, 6), 12, 12, False)  # evicts: freed, as before
    gc.collect()
    assert ref() is None and not upsample_ce._CAPTURED_TABLES


def test_a_rebuilt_entry_captured_again_keeps_both(tiny_cpu_cache):
    """Two graphs captured on either side of an eviction read two different table sets of one configuration."""
    upsample_ce, capturing = tiny_cpu_cache
    capturing[0] = True
    first = weakref.ref(upsample_ce._tables(_fake_logits(4, 4), 8, 8, False)[0][0])
    capturing[0] = False
    upsample_ce._tables(_fake_logits(5, 5), 10, 10, False)  # evicts
    capturing[0] = True
    second = weakref.ref(upsample_ce._tables(_fake_logits(4, 4), 8, 8, False)[0][0])
    capturing[0] = False
    upsample_ce._tables(_fake_logits(5, 5), 10, 10, False)  # evicts again
    gc.collect()
    assert first() is not None and second() is not None and first() is not second()


def test_hyper_tensor_fills_on_each_stream_and_never_blocks(monkeypatch):
    # (momentum, eps) on the device: a blocking host-to-device copy per new value (what a first version of the
    # capture fix did) would synchronize every BatchNorm call with momentum=None, whose factor changes every step.
    # Now: kernels fill it on the reading stream (cached per stream), and inside a capture a fresh, uncached one.
    from deeplab_ops.triton import bn_kernels, launch

    fills = []

    def filled(values, dtype, device):
        fills.append(values)
        return torch.tensor(values, dtype=dtype)  # stands for the device tensor the kernels fill

    def no_host_copy(*args, **kwargs):
        raise AssertionError("a host-to-device copy")

    stream = [7]
    capturing = [False]
    monkeypatch.setattr(launch, "_filled", filled)
    monkeypatch.setattr(torch.Tensor, "to", no_host_copy)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: stream[0], raising=False)
    launch._cached_constants.cache_clear()
    cuda = torch.device("cuda", 0)
    a = bn_kernels.hyper_tensor(0.5, 1e-5, torch.float32, cuda)
    assert bn_kernels.hyper_tensor(0.5, 1e-5, torch.float32, cuda) is a and len(fills) == 1  # cached on stream 7
    stream[0] = 8
    assert bn_kernels.hyper_tensor(0.5, 1e-5, torch.float32, cuda) is not a and len(fills) == 2  # its own on 8
    for n in range(5):  # momentum=None: a new factor each step, each filled by kernels
        bn_kernels.hyper_tensor(1.0 / (n + 3), 1e-5, torch.float32, cuda)
    assert len(fills) == 7
    capturing[0] = True
    c1 = bn_kernels.hyper_tensor(0.5, 1e-5, torch.float32, cuda)
    c2 = bn_kernels.hyper_tensor(0.5, 1e-5, torch.float32, cuda)
    assert c1 is not c2 and len(fills) == 9  # inside a capture: never the cached one, never cached
    launch._cached_constants.cache_clear()


def test_tables_read_on_another_stream_are_recorded_on_it(tiny_cpu_cache, monkeypatch):
    """One table entry per configuration serves every stream: warm-up on one stream and a capture on another (what
    torch.cuda.graph does) must find the tables built. A stream other than the allocating one records its use
    (`record_stream`), so that an entry the LRU evicts is not handed out again while that stream's kernels read it."""
    upsample_ce, capturing = tiny_cpu_cache
    monkeypatch.setattr(upsample_ce, "axis_tables", functools.lru_cache(maxsize=8)(upsample_ce.axis_tables.__wrapped__))
    stream = [7]
    recorded, waited = [], []

    class Stream(str):
        def wait_event(self, event):
            waited.append((self, event))

    monkeypatch.setattr(upsample_ce, "current_stream_id", lambda device: stream[0])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(f"stream {stream[0]}"))
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: recorded.append((self, s)), raising=False)
    first = upsample_ce._tables(_fake_logits(4, 5), 16, 20, False)  # built on stream 7
    assert upsample_ce._tables(_fake_logits(4, 5), 16, 20, False)[0] is first[0] and not recorded and not waited
    stream[0] = 8  # eager calls on another stream: the same tables, recorded on it
    again = upsample_ce._tables(_fake_logits(4, 5), 16, 20, False)
    assert again[0] is first[0] and again[1] is first[1]
    assert [s for _, s in recorded] == ["stream 8"] * 12
    assert {id(t) for t, _ in recorded} == {id(t) for t in (*first[0][:6], *first[1][:6])}
    # ... after waiting for the tables' asynchronous copies on their allocating stream (each entry's event)
    assert [(s, id(e)) for s, e in waited] == [("stream 8", id(first[0][9])), ("stream 8", id(first[1][9]))]
    upsample_ce._tables(_fake_logits(4, 5), 16, 20, False)  # recorded once per stream: a use lasts until freed
    assert len(recorded) == 12 and len(waited) == 2
    stream[0] = 9
    capturing[0] = True  # a capture on a third stream: the same tables, kept for good (never freed: nothing to record)
    captured = upsample_ce._tables(_fake_logits(4, 5), 16, 20, False)
    assert captured[0] is first[0] and captured[1] is first[1] and len(recorded) == 12
    assert set(upsample_ce._CAPTURED_TABLES) == {id(first[0]), id(first[1])}


def test_tables_copy_asynchronously_and_a_first_use_inside_a_capture_is_refused(monkeypatch):
    """The tables' first copy to the GPU was a blocking copy (a host synchronization per new configuration: an
    evaluation over images of many sizes paid one per size); now pinned and asynchronous, with an event recorded
    after it for other streams. Inside a capture the first use is refused, naming the fix (a warm-up), where the
    blocking copy had failed the capture with CUDA's own error."""
    from deeplab_ops.triton import upsample_ce

    copies, events = [], []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device) and args[0].type == "cuda":
            copies.append((self.is_pinned_mark, kwargs.get("non_blocking", False)))
            return real_to(self, "cpu")
        return real_to(self, *args, **kwargs)

    class Event:
        def record(self, stream):
            events.append(stream)

    monkeypatch.setattr(torch.Tensor, "is_pinned_mark", False, raising=False)

    def pin_memory(self):
        out = self.clone()
        out.is_pinned_mark = True
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream 7")
    monkeypatch.setattr(upsample_ce, "current_stream_id", lambda device: 7)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    build = upsample_ce.axis_tables.__wrapped__
    cuda = torch.device("cuda", 0)
    tables = build(4, 16, False, torch.float32, cuda)
    assert copies == [(True, True)] * 6 and events == ["stream 7"] and isinstance(tables[9], Event)
    expected = build(4, 16, False, torch.float32, torch.device("cpu"))
    for got, want in zip(tables[:7], expected[:7], strict=True):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))
    capturing[0] = True
    with pytest.raises(RuntimeError, match=r"first call of an upsampling from 4 to 16 \(align_corners=False\) inside "
                                           r"a CUDA-graph capture.*call the op once with these sizes before capturing"):
        build(4, 16, False, torch.float32, cuda)
