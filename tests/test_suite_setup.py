"""The test suite's own setup (tests/conftest.py, tests/helpers.py): how many workers `-n auto` starts, and
their torch threads."""

import os

import pytest
import torch
from helpers import _MAX_AUTO_WORKERS, auto_workers, available_memory

GIB = 1 << 30


def test_auto_workers_follow_the_cores_within_memory_and_a_cap():
    assert auto_workers(2, 24 * GIB) == 2  # the CI machine: 2 cores, 24 GiB
    assert auto_workers(16, 128 * GIB) == 8  # the GPU machine: as benchmarks/gpu_suite.sh's -n 8
    assert auto_workers(64, 512 * GIB) == _MAX_AUTO_WORKERS
    assert auto_workers(32, 8 * GIB) == 8 // 3  # memory binds first
    assert auto_workers(8, 1 * GIB) == 1  # never none
    assert auto_workers(4, None) == 4  # memory unknown


def test_available_memory_is_read_where_the_system_says_it():
    memory = available_memory()
    if os.path.exists("/proc/meminfo"):
        assert memory is not None and memory > 0
    else:
        assert memory is None


def test_a_worker_uses_its_share_of_the_cores():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers <= 1:
        pytest.skip("runs under pytest-xdist with several workers (-n auto on a machine with several cores)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert torch.get_num_threads() == max(1, cores // workers)
