"""Op glue: schemas live in csrc/ops.cpp; these modules add fake kernels, autograd and the public functionals."""
