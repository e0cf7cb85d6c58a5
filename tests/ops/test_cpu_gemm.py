"""The float32 GEMM kernel of the cpu backend's Winograd convolution (csrc/cpu/gemm_cpu.h), through the op cpu_gemm:
against float64 on odd shapes (rows, inner sizes across its 256-deep blocks, columns that leave part of a 32-column
panel), and bit for bit across the ways a caller splits it (rows, column panels, threads). tests/ops/test_cpu_isa.py
checks the AVX2 and AVX-512 builds give the same bits (the baseline build runs ATen's mm)."""

from __future__ import annotations

import pytest
import torch

import deeplab_ops  # noqa: F401  (loads the extension)

_ops = torch.ops.deeplab_ops

SHAPES = [(1, 1, 1), (7, 3, 5), (9, 256, 32), (17, 257, 33), (31, 513, 81), (8, 2048, 256), (50, 100, 200),
          (13, 0, 40), (0, 5, 7), (6, 7, 0), (300, 37, 96)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(shape):
    m, inner, n = shape
    g = torch.Generator().manual_seed(m * 1000 + inner + n)
    a, b = torch.randn(m, inner, generator=g), torch.randn(inner, n, generator=g)
    want = a.double() @ b.double()
    # one float32 rounding per multiply-add: at most inner * 2^-24 of the sum of |products| (with room)
    bound = (a.double().abs() @ b.double().abs()) * (inner + 1) * 2.0**-24 + 1e-30
    for row_block, panel_block in ((8, 0), (1, 1), (5, 2), (1000, 0)):
        got = _ops.cpu_gemm(a, b, row_block, panel_block)
        assert got.shape == (m, n) and got.dtype == torch.float32
        err = (got.double() - want).abs()
        assert bool((err <= bound).all()), f"{shape} blocks {row_block}/{panel_block}: max error {err.max()}"


def test_strided_operands():
    # a transposed a and a sliced b: the op reads them as the values they hold
    g = torch.Generator().manual_seed(3)
    a = torch.randn(70, 45, generator=g).t()  # 45 x 70, column-major
    b = torch.randn(70, 100, generator=g)[:, ::3]  # 70 x 34, strided
    torch.testing.assert_close(_ops.cpu_gemm(a, b, 4), (a.double() @ b.double()).float(), rtol=1e-5, atol=1e-5)


def test_same_bits_for_every_split_and_thread_count():
    # every element is one multiply-add chain in the order of the inner dimension, however the rows and panels are
    # split and whichever thread runs them
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(45, 700, generator=g), torch.randn(700, 110, generator=g)
    want = _ops.cpu_gemm(a, b, 1000)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for row_block, panel_block in ((1, 1), (3, 0), (8, 2), (13, 3), (45, 1)):
                got = _ops.cpu_gemm(a, b, row_block, panel_block)
                assert torch.equal(got, want), f"{n} threads, blocks {row_block}/{panel_block}"
    finally:
        torch.set_num_threads(threads)


def test_blocks_larger_than_the_matrix_are_the_whole_of_it():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(5, 7, generator=g), torch.randn(7, 40, generator=g)
    want = _ops.cpu_gemm(a, b, 5)
    for row_block, panel_block in ((2**63 - 1, 0), (1, 2**63 - 1), (2**62, 2**62)):
        assert torch.equal(_ops.cpu_gemm(a, b, row_block, panel_block), want), (row_block, panel_block)


def test_special_values():
    # inf and nan propagate as in a sum of products; zero times inf is nan
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0], [float("nan"), 0.0]])
    b = torch.tensor([[float("inf"), 1.0], [1.0, -1.0]])
    got = _ops.cpu_gemm(a, b, 2)
    assert got[0, 0] == float("inf") and got[0, 1] == -1.0
    assert torch.isnan(got[1, 0]) and got[1, 1] == -1.0
    assert torch.isnan(got[2]).all()


@pytest.mark.parametrize("bad, match", [
    (lambda: _ops.cpu_gemm(torch.randn(3), torch.randn(3, 2), 1), "must be matrices"),
    (lambda: _ops.cpu_gemm(torch.randn(2, 3), torch.randn(4, 2), 1), r"a's columns \(3\) must equal b's rows \(4\)"),
    (lambda: _ops.cpu_gemm(torch.randn(2, 3).double(), torch.randn(3, 2), 1), "float32 CPU"),
    (lambda: _ops.cpu_gemm(torch.randn(2, 3), torch.randn(3, 2), 0), "row_block must be at least 1, got 0"),
    (lambda: _ops.cpu_gemm(torch.randn(2, 3), torch.randn(3, 2), 1, -1), "panel_block must be non-negative"),
], ids=["vector", "inner", "dtype", "row_block", "panel_block"])
def test_bad_arguments_are_named(bad, match):
    with pytest.raises(RuntimeError, match=match):
        bad()
