"""Kernel launches: a per-process cache of tuned configurations and the one place every launch goes through.

On a GPU the first call of a kernel for a key (kernel, device, dtype, constexpr flags, channel counts and map
size bucketed to powers of two, exact strides) times the candidate configurations once and caches the winner;
every later call is a direct launch of the JIT kernel with that configuration: no autotuner lookup, and the
caller gets the configuration it ran with from this call, not from shared autotuner state. Under the interpreter
(and on CPU tensors) the fixed interpreter configuration is used. Every launch is counted for `count_launches`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.testing
from triton.runtime.errors import OutOfResources

from deeplab_ops.common import interpreter_active as _interpreter_active
from deeplab_ops.triton.counting import _COUNTERS
from deeplab_ops.triton.counting import record_launch as _record_launch


def kernel_name(kernel) -> str:
    """"_conv_fwd_kernel" -> "conv_fwd": the name `count_launches` reports."""
    name = kernel.fn.__name__.lstrip("_")
    return name[: -len("_kernel")] if name.endswith("_kernel") else name


def launch_kernel(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """`kernel[grid](*args, **kwargs)`, counted: every launch of this package goes through here."""
    _record_launch(kernel_name(kernel))
    kernel[grid](*args, **kwargs)


class KernelSpec(NamedTuple):
    """A tunable kernel: its configurations per architecture, the pruner, and the sizes that key the cache."""

    kernel: object
    hopper: list            # triton.Config list for sm_90+
    ampere: list            # triton.Config list for sm_80..89 and older
    interpreter: dict       # the interpreter's (and pair counting's) fixed configuration
    prune: Callable         # prune(configs, sizes) -> configs
    bucketed: tuple[str, ...] = ()   # sizes keyed by their next power of two (channels, map sizes)
    exact: tuple[str, ...] = ()      # sizes keyed exactly (strides, split counts)

    def configs(self, hopper: bool) -> list:
        return self.hopper if hopper else self.ampere


def config_dict(config) -> dict:
    """A triton.Config as launch keyword arguments."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


_TUNED: dict[tuple, dict] = {}
_TUNE_LOCK = threading.Lock()


def _hashable(value):
    return value if isinstance(value, (int, float, str, bool, type(None), torch.dtype)) else repr(value)


def _bucket(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def tuned_config(spec: KernelSpec, device: torch.device, dtype: torch.dtype, sizes: dict, meta: dict,
                 run: Callable[[dict], object]) -> dict:
    """The configuration to launch `spec` with. `run(config)` launches the kernel (used only when tuning)."""
    if device.type != "cuda" or _interpreter_active():
        return spec.interpreter
    key = (spec.kernel, device.index, dtype, tuple(sorted((k, _hashable(v)) for k, v in meta.items())),
           tuple(_bucket(sizes[k]) for k in spec.bucketed), tuple(sizes[k] for k in spec.exact))
    config = _TUNED.get(key)
    if config is not None:
        return config
    with _TUNE_LOCK:
        config = _TUNED.get(key)
        if config is None:
            config = _TUNED[key] = _tune(spec, device, sizes, run)
    return config


def _tune(spec: KernelSpec, device: torch.device, sizes: dict, run: Callable[[dict], object]) -> dict:
    hopper = torch.cuda.get_device_capability(device)[0] >= 9
    candidates = [config_dict(c) for c in spec.prune(spec.configs(hopper), sizes)]
    if len(candidates) == 1:
        return candidates[0]
    # Benchmark runs are not counted as launches of the caller.
    saved = getattr(_COUNTERS, "active", None)
    _COUNTERS.active = None
    try:
        timings = []
        for config in candidates:
            try:
                timings.append((triton.testing.do_bench(lambda c=config: run(c), warmup=5, rep=20), config))
            except OutOfResources:
                continue
    finally:
        _COUNTERS.active = saved
    return min(timings, key=lambda t: t[0])[1]


def prune_by_channels(n_arg: str, k_arg: str, n_block: str, k_block: str) -> Callable:
    """Channel blocks wider than the channels waste the MMA: keep the configurations that fit (the smallest if
    none does)."""

    def prune(configs, sizes):
        n_cap = max(16, triton.next_power_of_2(sizes[n_arg]))
        k_cap = max(16, triton.next_power_of_2(sizes[k_arg]))
        kept = [c for c in configs if c.kwargs[n_block] <= n_cap and c.kwargs[k_block] <= k_cap]
        return kept or [min(configs, key=lambda c: c.kwargs[n_block] * c.kwargs[k_block])]

    return prune


def run_tuned(spec: KernelSpec, device: torch.device, dtype: torch.dtype, sizes: dict, meta: dict,
              run: Callable[[dict], object], config: dict | None = None):
    """`run(config)` with `config`, or the cached/tuned configuration: what the launchers call."""
    return run(config if config is not None else tuned_config(spec, device, dtype, sizes, meta, run))
