"""Counting Triton kernel launches (`count_launches`), for the overhead benchmark and the budget tests. Imports no
triton: the package exposes it without loading a kernel module."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class LaunchCount:
    """Triton kernel launches made by this package in one thread while a `count_launches()` block was active."""

    total: int = 0
    by_kernel: dict[str, int] = field(default_factory=dict)


_COUNTERS = threading.local()


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCount]:
    """Count the Triton kernel launches this package makes in the current thread inside the block.

    Yields a LaunchCount: `.total` and `.by_kernel` (kernel name, e.g. "conv_fwd", -> launches). Blocks nest
    (each counts what ran inside it); autotuning benchmark runs are not counted. Inactive, the cost is one
    thread-local attribute read per launch.
    """
    counter = LaunchCount()
    active = getattr(_COUNTERS, "active", None)
    if active is None:
        active = _COUNTERS.active = []
    active.append(counter)
    try:
        yield counter
    finally:
        active.remove(counter)


def record_launch(name: str) -> None:
    """Called by the launchers once per kernel launch."""
    active = getattr(_COUNTERS, "active", None)
    if active:
        for counter in active:
            counter.total += 1
            counter.by_kernel[name] = counter.by_kernel.get(name, 0) + 1
