"""The test suite's own setup (tests/conftest.py): how many workers `-n auto` starts, and their torch threads."""

import os

import conftest
import pytest
import torch

GIB = 1 << 30


def test_auto_workers_follow_the_cores_within_memory_and_a_cap():
    assert conftest.auto_workers(2, 24 * GIB) == 2  # the CI machine: 2 cores, 24 GiB
    assert conftest.auto_workers(16, 128 * GIB) == 16  # the GPU machine
    assert conftest.auto_workers(64, 512 * GIB) == conftest._MAX_AUTO_WORKERS
    assert conftest.auto_workers(32, 8 * GIB) == 8 // 3  # memory binds first
    assert conftest.auto_workers(8, 1 * GIB) == 1  # never none
    assert conftest.auto_workers(4, None) == 4  # memory unknown


def test_available_memory_is_read_where_the_system_says_it():
    memory = conftest._available_memory()
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
