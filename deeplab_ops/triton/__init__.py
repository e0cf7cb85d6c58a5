"""Triton kernels (the implicit-GEMM engine). Importing this package must not import triton."""
