"""Argument checks shared by the model's modules and factories: each names the argument, its value and what was
expected, and takes numpy integers as ints."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Set

# Channel counts, atrous rates and dilations become cuDNN descriptor fields and Triton kernel arguments, which are
# 32-bit ints: a larger one cannot run anywhere (unchecked, it ended in an overflow deep inside PyTorch).
from deeplab_ops.common import INT32_MAX


def check_int(value, name: str, minimum: int = 1, maximum: int = INT32_MAX,
              why: str = "a 32-bit int: cuDNN and the kernels take it as one") -> int:
    """`value` as an int in [minimum, maximum] (a numpy integer becomes an int), or a ValueError naming `name` (and
    `why` the maximum is what it is)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum} ({why}), got {value!r}")
    return int(value)


def check_ordered(value, name: str) -> None:
    """Refuse a set (or dict) for a per-unit or per-branch sequence: its iteration order is not the order written
    ({4, 1, 2} iterates 1, 2, 4), so the rates would silently be other ones than the caller meant."""
    if isinstance(value, Set | Mapping):
        raise ValueError(f"{name} must be an ordered sequence of positive ints (a tuple or list: the order gives each "
                         f"unit or branch its rate), got a {type(value).__name__} {value!r}")
