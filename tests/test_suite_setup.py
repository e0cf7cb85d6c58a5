"""The test suite's own setup (tests/conftest.py, tests/helpers.py): how many workers `-n auto` starts, and
their torch threads."""

import os

import pytest
import torch
from helpers import _MAX_AUTO_WORKERS, auto_workers, available_memory, share_cores_between_workers, usable_cores

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


@pytest.mark.parametrize("workers", [None, "1", "2", "3", "64"])
def test_a_worker_takes_its_share_of_the_cores(monkeypatch, workers):
    saved = torch.get_num_threads()
    if workers is None:
        monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", workers)
    try:
        torch.set_num_threads(5)  # a value the share never gives here: unchanged outside xdist or with one worker
        share_cores_between_workers()
        expected = 5 if workers in (None, "1") else max(1, usable_cores() // int(workers))
        assert torch.get_num_threads() == expected
    finally:
        torch.set_num_threads(saved)
