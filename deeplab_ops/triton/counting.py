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


@contextlib.contextmanager
def count_launches() -> Iterator[LaunchCount]:
    """Count the Triton kernel launches this package makes in the current thread inside the block.

    Yields a LaunchCount: `.total`, `.by_kernel` (kernel name, e.g. "conv_fwd", -> launches) and `.signatures`,
    the distinct JIT specializations those launches compile on a GPU (kernel, constexpr and config values, argument
    dtypes, integer classes == 1 / divisible by 16 / other, pointer 16-byte alignment): `len(signatures)` is how
    many kernel variants a GPU would compile for the block, predicted on CPU too. Blocks nest (each counts what ran
    inside it); autotuning benchmark runs are not counted. Inactive, the cost is one thread-local attribute read
    per launch.
    """
    counter = LaunchCount()
    active = getattr(_COUNTERS, "active", None)
    if active is None:
        active = _COUNTERS.active = []
    active.append(counter)
    try:
        yield counter
    finally:  # by identity: two counters with equal counts compare equal
        del active[next(i for i in range(len(active) - 1, -1, -1) if active[i] is counter)]


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
