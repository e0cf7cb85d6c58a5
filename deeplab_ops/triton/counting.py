"""Counting Triton kernel launches (`count_launches`), for the overhead benchmark and the budget tests. Imports no
triton: the package exposes it without loading a kernel module."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple


class Signature(NamedTuple):
    """One JIT specialization: what a GPU compiles one kernel variant for (deeplab_ops.triton.launch)."""

    kernel: str                # "conv_fwd"
    constexprs: tuple          # ((name, value), ...): constexpr arguments, then num_warps and num_stages
    args: tuple                # ((name, type, class), ...): "*float32"/"align16", "i32"/"div16", "==1" or ""


@dataclass
class LaunchCount:
    """Triton kernel launches made by this package in one thread while a `count_launches()` block was active."""

    total: int = 0
    by_kernel: dict[str, int] = field(default_factory=dict)
    signatures: set[Signature] = field(default_factory=set)


_COUNTERS = threading.local()
# Every open block of the process, with the thread it was opened in: autograd runs a CUDA backward in its own device
# thread, where the opening thread's counters are not visible (on the H200 a forward + backward counted only the
# forward's launches). Mutated in place, under _OPEN_LOCK; read without it (a list copy) by worker threads.
_OPEN: list[tuple[LaunchCount, int]] = []
_OPEN_LOCK = threading.Lock()


def _graph_task_running() -> bool:
    import torch

    return torch._C._current_graph_task_id() != -1


def launch_counters() -> list[LaunchCount] | None:
    """The counters a launch in this thread counts in: the thread's own open blocks; in an autograd worker thread
    running a backward (none of its own open, launches not paused), every other thread's; else None."""
    active = getattr(_COUNTERS, "active", None)
    if active:
        return active
    if not _OPEN or getattr(_COUNTERS, "paused", False) or not _graph_task_running():
        return None
    me = threading.get_ident()
    return [c for c, owner in list(_OPEN) if owner != me] or None


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Launches inside the block are not counted anywhere (autotuning's benchmark runs)."""
    saved, saved_paused = getattr(_COUNTERS, "active", None), getattr(_COUNTERS, "paused", False)
    _COUNTERS.active, _COUNTERS.paused = None, True
    try:
        yield
    finally:
        _COUNTERS.active, _COUNTERS.paused = saved, saved_paused


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCount]:
    """Count the Triton kernel launches this package makes in the current thread inside the block, and those of a
    backward that autograd runs for it in its device worker threads (a CUDA backward runs there, not in the thread
    that called backward()).

    Yields a LaunchCount: `.total`, `.by_kernel` (kernel name, e.g. "conv_fwd", -> launches) and `.signatures`,
    the distinct JIT specializations those launches compile on a GPU (kernel, constexpr and config values, argument
    dtypes, integer classes == 1 / divisible by 16 / other, pointer 16-byte alignment): `len(signatures)` is how
    many kernel variants a GPU would compile for the block, predicted on CPU too. Blocks nest (each counts what ran
    inside it); autotuning benchmark runs are not counted. A worker thread's launches cannot be told apart by the
    thread whose backward they serve: they count in every block open in another thread, so where several threads
    count at once, count CUDA backwards one thread at a time (CPU tensors' backward runs in the calling thread and
    is always attributed exactly). Inactive, the cost is one thread-local attribute read and one list check per
    launch.
    """
    counter = LaunchCount()
    active = getattr(_COUNTERS, "active", None)
    if active is None:
        active = _COUNTERS.active = []
    active.append(counter)
    entry = (counter, threading.get_ident())
    with _OPEN_LOCK:
        _OPEN.append(entry)
    try:
        yield counter
    finally:  # by identity: two counters with equal counts compare equal
        del active[next(i for i in range(len(active) - 1, -1, -1) if active[i] is counter)]
        with _OPEN_LOCK:
            del _OPEN[next(i for i in range(len(_OPEN) - 1, -1, -1) if _OPEN[i] is entry)]


def active_counts() -> tuple[LaunchCount, ...]:
    """The `count_launches()` blocks active in this thread, outermost first."""
    return tuple(getattr(_COUNTERS, "active", None) or ())


def record_launch(active: list[LaunchCount], name: str, signature: Callable[[], Signature]) -> None:
    """Called by the launcher once per kernel launch while `active` (this thread's counters) is not empty."""
    sig = signature()
    for counter in active:
        counter.total += 1
        counter.by_kernel[name] = counter.by_kernel.get(name, 0) + 1
        counter.signatures.add(sig)
