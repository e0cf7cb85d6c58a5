"""The fused conv + BN (+ residual) + ReLU op on the cpu backend (and cuda where a GPU is visible) against the
reference: forward, every gradient and the running statistics; gradcheck; opcheck; the statistics' numerics."""

from __future__ import annotations

import pytest
import torch
from helpers import Case, assert_close, cuda_test, make_inputs, run_and_compare

import deeplab_ops
from deeplab_ops import reference

ops = torch.ops.deeplab_ops

# A matrix over everything the op promises, without the full cartesian product (CI has 2 cores).
MATRIX = [
    # 1x1 kernels, tiny and odd spatial sizes, batch 1..4, channels 1..64
    Case(2, 3, 1, 1, 4, k=1),
    Case(1, 1, 1, 2, 1, k=1),
    Case(4, 64, 5, 3, 64, k=1, residual=True),
    Case(3, 7, 9, 11, 5, k=1, relu=False, channels_last=True),
    Case(2, 16, 8, 8, 32, k=1, stride=2, residual=True, channels_last=True),
    # 3x3 with the DeepLab dilations, padding = dilation
    Case(2, 5, 7, 9, 6, dilation=1),
    Case(2, 5, 13, 17, 6, dilation=2, residual=True),
    Case(1, 8, 33, 33, 8, dilation=6, channels_last=True),
    Case(2, 4, 33, 33, 3, dilation=12, relu=False),
    Case(2, 4, 33, 33, 4, dilation=18, residual=True, channels_last=True),
    Case(2, 3, 9, 9, 2, dilation=18),  # rate larger than the map: most taps in padding
    Case(3, 6, 17, 13, 6, stride=2),
    Case(2, 6, 16, 15, 8, stride=2, channels_last=True, residual=True),
    Case(1, 2, 3, 3, 2, k=3, padding=0),  # 1x1 output: batch statistics over N*1*1 = 1 value is invalid, so eval
    # eval mode (running statistics)
    Case(1, 3, 1, 1, 5, k=1, training=False),
    Case(2, 5, 7, 9, 6, dilation=2, training=False, residual=True),
    Case(3, 8, 11, 7, 4, training=False, channels_last=True, relu=False),
    Case(1, 64, 9, 9, 16, dilation=6, training=False),
]
MATRIX[13] = Case(1, 2, 3, 3, 2, k=3, padding=0, training=False)


@pytest.mark.parametrize("case", MATRIX, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_matches_reference(case, dtype):
    run_and_compare(case, "cpu", dtype)


@pytest.mark.parametrize("case", MATRIX[:6], ids=str)
def test_reference_backend_is_the_reference(case):
    run_and_compare(case, "reference", torch.float64)


def test_auto_picks_cpu_for_cpu_tensors():
    run_and_compare(Case(2, 3, 5, 5, 4), None, torch.float32)
    assert deeplab_ops.auto_backend("cpu") == "cpu"


@pytest.mark.parametrize(
    "case",
    [Case(2, 3, 5, 4, 3, residual=True), Case(2, 2, 6, 5, 3, stride=2, dilation=2, channels_last=True),
     Case(1, 3, 4, 4, 2, training=False, residual=True), Case(2, 2, 5, 5, 2, relu=False)],
    ids=str,
)
def test_cpu_gradcheck(case):
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64)
    inputs = [t.requires_grad_() for t in (x, w, g, b)] + ([res.requires_grad_()] if res is not None else [])

    def f(x, w, g, b, *res):
        return deeplab_ops.conv_bn_relu(
            x, w, g, b, rm.clone(), rv.clone(), stride=case.stride, padding=case.pad, dilation=case.dilation,
            training=case.training, residual=res[0] if res else None, relu=case.relu, backend="cpu",
        )

    assert torch.autograd.gradcheck(f, inputs)


def test_large_mean_small_spread_keeps_its_variance():
    """Conv outputs with mean 1e4 and std 0.1: E[y^2] - E[y]^2 in float32 would lose the variance entirely."""
    n, c, h, w = 4, 8, 9, 11
    for channels_last in (False, True):
        x = 1e4 + 0.1 * torch.randn(n, c, h, w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.eye(c).view(c, c, 1, 1)  # the conv output is exactly x
        gamma, beta = torch.rand(c) + 0.5, torch.randn(c)
        rm, rv = torch.zeros(c), torch.ones(c)
        rm64, rv64 = rm.double(), rv.double()
        out = deeplab_ops.conv_bn_relu(x, weight, gamma, beta, rm, rv, relu=False, backend="cpu")
        expected = reference.conv_bn_relu(x.double(), weight.double(), gamma.double(), beta.double(), rm64, rv64,
                                          relu=False)
        # float32 holds y to ~5e-4 at 1e4 and the mean to the same: about 5e-3 of a standard deviation.
        assert_close(out, expected, "normalized output", atol=2e-2, rtol=0)
        assert_close(rv, rv64, "running_var", atol=0, rtol=1e-3)
        m, m2 = ops.bn_stats(x)
        rmean, rm2 = reference.bn_stats(x)
        assert_close(m2 / (n * h * w), rm2 / (n * h * w), "bn_stats variance", atol=0, rtol=1e-4)
        assert_close(m, rmean, "bn_stats mean", atol=0, rtol=1e-7)


# ---- the stage ops, each against its reference ----------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (1, 1, 1, 2), (2, 70, 33, 33), (5, 3, 1, 1)], ids=str)
def test_stage_ops_match_reference(shape, dtype, channels_last):
    mf = torch.channels_last if channels_last else torch.contiguous_format
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    y = (torch.randn(shape, dtype=dtype) * 3 + 2).contiguous(memory_format=mf)
    c = shape[1]
    mean, m2 = ops.bn_stats(y)
    rmean, rm2 = reference.bn_stats(y)
    assert_close(mean, rmean, "bn_stats mean", atol, atol)
    assert_close(m2, rm2, "bn_stats m2", atol, atol)

    # Finalize from 3 partials (as distributed training merges per-process statistics).
    counts = torch.tensor([5.0, 17.0, 2.0], dtype=dtype)
    pm, pm2 = torch.randn(3, c, dtype=dtype), torch.rand(3, c, dtype=dtype) * 10
    rm, rv = torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    fm, fi, nrm, nrv = (torch.empty(c, dtype=dtype) for _ in range(4))
    ops.bn_finalize(pm, pm2, counts, 0.0, rm, rv, 0.3, 1e-5, fm, fi, nrm, nrv)  # running stats: out of place
    em, ei = reference.bn_finalize(counts, pm, pm2, rm_ref, rv_ref, 0.3, 1e-5)
    for a, b, what in ((fm, em, "mean"), (fi, ei, "invstd"), (nrm, rm_ref, "running_mean"),
                       (nrv, rv_ref, "running_var")):
        assert_close(a, b, f"bn_finalize {what}", atol, atol)

    gamma, beta = torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype)
    invstd = torch.rand(c, dtype=dtype) + 0.1
    scale = gamma * invstd
    res = torch.randn(shape, dtype=dtype).contiguous(memory_format=mf)
    for residual in (None, res):
        for relu in (False, True):
            z = ops.bn_apply(y, mean, invstd, gamma, beta, residual, relu)
            assert z.is_contiguous(memory_format=mf)
            assert_close(z, reference.bn_apply(y, mean, scale, beta, residual, relu), "bn_apply", atol, atol)

    z = ops.bn_apply(y, mean, invstd, gamma, beta, res, True)
    dz = torch.randn(shape, dtype=dtype).contiguous(memory_format=mf)
    for relu in (False, True):
        sg, sgx = ops.bn_backward_reduce(dz, z, y, mean, invstd, relu)
        esg, esgx = reference.bn_backward_reduce(dz, z, y, mean, invstd, relu)
        assert_close(sg, esg, "sum_g", atol, atol)
        assert_close(sgx, esgx, "sum_g_xhat", atol, atol)
        count = float(shape[0] * shape[2] * shape[3])
        for training in (True, False):
            for weight in (None, gamma):
                dy = ops.bn_backward_dy(dz, z, y, mean, invstd, weight, sg, sgx, count, relu, training)
                edy = reference.bn_backward_dy(dz, z, y, mean, invstd, weight, esg, esgx, count, relu, training)
                assert dy.is_contiguous(memory_format=mf)
                assert_close(dy, edy, f"bn_backward_dy relu={relu} training={training}", atol, atol)


def test_relu_propagates_nan_like_torch():
    y = torch.randn(2, 3, 4, 5)
    y[0, 1, 2, 3] = float("nan")
    y[1, 2, 0, 0] = float("inf")
    c = y.shape[1]
    z = ops.bn_apply(y, torch.zeros(c), torch.ones(c), None, None, None, True)
    expected = torch.relu(y)
    assert torch.equal(z.isnan(), expected.isnan())
    assert_close(z, expected, "relu with nan/inf", 0, 0)


# ---- opcheck: schema, fake kernels, autograd registration, AOT dispatch --------------------------------


def _forward_args(case: Case, requires_grad=True):
    x, w, g, b, rm, rv, res = make_inputs(case)
    if requires_grad:
        for t in (x, w, g, b, res):
            if t is not None:
                t.requires_grad_()
    p, d, s = [case.pad] * 2, [case.dilation] * 2, [case.stride] * 2
    return (x, w, g, b, rm, rv, s, p, d, case.training, 0.1, 1e-5, res, case.relu, None, False)


OPCHECK_CASES = [Case(2, 3, 7, 6, 4, residual=True), Case(2, 3, 7, 6, 4, dilation=2, channels_last=True),
                 Case(2, 3, 7, 6, 4, training=False, relu=False, stride=2)]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_conv_bn_relu(case):
    args = _forward_args(case)
    torch.library.opcheck(ops.conv_bn_relu_forward.default, args)
    out, conv_out, mean, invstd, _, _ = ops.conv_bn_relu_forward(*[a.detach() if torch.is_tensor(a) else a
                                                                   for a in args])
    x, w, g = args[0].detach(), args[1].detach(), args[2].detach()
    bwd_args = (torch.randn_like(out), x, w, g, conv_out, out, mean, invstd, args[6], args[7], args[8],
                case.training, case.relu, [True, True, True, True, case.residual])
    torch.library.opcheck(ops.conv_bn_relu_backward.default, bwd_args)


def test_opcheck_stage_ops():
    y = torch.randn(2, 5, 4, 3)
    c = 5
    mean, m2 = ops.bn_stats(y)
    invstd = torch.rand(c) + 0.5
    z = ops.bn_apply(y, mean, invstd, torch.randn(c), torch.randn(c), None, True)
    dz = torch.randn_like(y)
    sg, sgx = ops.bn_backward_reduce(dz, z, y, mean, invstd, True)
    torch.library.opcheck(ops.bn_stats.default, (y,))
    outs = tuple(torch.empty(c) for _ in range(4))
    torch.library.opcheck(ops.bn_finalize.default, (mean[None], m2[None], torch.tensor([24.0]), 0.0, torch.zeros(c),
                                                    torch.ones(c), 0.1, 1e-5, *outs))
    torch.library.opcheck(ops.bn_apply.default, (y, mean, invstd, torch.randn(c), torch.randn(c), torch.randn_like(y),
                                                 True))
    torch.library.opcheck(ops.bn_backward_reduce.default, (dz, z, y, mean, invstd, True))
    torch.library.opcheck(ops.bn_backward_dy.default, (dz, z, y, mean, invstd, torch.rand(c), sg, sgx, 24.0, True,
                                                       True))


def test_meta_tensors_give_shapes_without_compute():
    case = Case(2, 3, 513, 511, 8, dilation=12, stride=2, channels_last=True)
    x, w, g, b, rm, rv, _ = (t.to("meta") if t is not None else None for t in make_inputs(case))
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, stride=2, padding=12, dilation=12, backend="cpu")
    assert out.shape == (2, 8, 257, 256) and out.device.type == "meta"
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_double_backward_raises_a_clear_error():
    x, w, g, b, rm, rv, _ = make_inputs(Case(2, 2, 4, 4, 2), torch.float64)
    x.requires_grad_()
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, backend="cpu")
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_running_stats_none_in_training_matches_batch_norm():
    x, w, g, b, _, _, _ = make_inputs(Case(2, 3, 5, 5, 4))
    out = deeplab_ops.conv_bn_relu(x, w, g, b, None, None, padding=1, backend="cpu")
    assert_close(out, reference.conv_bn_relu(x.double(), w.double(), g.double(), b.double(), None, None, padding=1),
                 "output without running stats", 2e-4, 2e-4)


def test_bn_affine_none_is_identity_affine():
    x, w, _, _, rm, rv, _ = make_inputs(Case(2, 3, 5, 5, 4))
    out = deeplab_ops.conv_bn_relu(x, w, None, None, rm.clone(), rv.clone(), padding=1, backend="cpu")
    expected = reference.conv_bn_relu(x.double(), w.double(), None, None, rm.double(), rv.double(), padding=1)
    assert_close(out, expected, "affine=None output", 2e-4, 2e-4)


def test_cpu_bfloat16_with_float32_bn_params():
    case = Case(2, 8, 9, 9, 8, residual=True)
    x, w, g, b, rm, rv, res = make_inputs(case, torch.bfloat16)
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, residual=res, backend="cpu")
    expected = reference.conv_bn_relu(x.double(), w.double(), g.double(), b.double(), None, None, padding=1,
                                      residual=res.double())
    assert out.dtype == torch.bfloat16
    assert_close(out, expected, "bf16 output", 5e-2, 5e-2)


# ---- CUDA backend (runs wherever a GPU is visible) -----------------------------------------------------


@cuda_test
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("case", MATRIX, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_matches_reference(case, dtype):
    run_and_compare(case, "cuda", dtype, device="cuda")


@cuda_test
@pytest.mark.parametrize("case", MATRIX[::2], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_half_error_within_twice_the_reference_error(case, dtype):
    """bf16/fp16: the fused error against a float64 reference is at most 2x the reference-in-dtype error."""
    x, w, g, b, rm, rv, res = make_inputs(case, dtype, "cuda")
    kw = dict(stride=case.stride, padding=case.pad, dilation=case.dilation, training=case.training, relu=case.relu)
    exact = reference.conv_bn_relu(x.double(), w.double(), g.double(), b.double(), rm.double(), rv.double(),
                                   residual=None if res is None else res.double(), **kw)
    in_dtype = reference.conv_bn_relu(x, w, g, b, rm.clone(), rv.clone(), residual=res, **kw)
    ours = deeplab_ops.conv_bn_relu(x, w, g, b, rm.clone(), rv.clone(), residual=res, backend="cuda", **kw)
    ref_err = (in_dtype.double() - exact).abs().max().item()
    our_err = (ours.double() - exact).abs().max().item()
    assert our_err <= 2 * ref_err + 1e-3, f"[{case}] {dtype}: fused error {our_err:.3g} vs reference {ref_err:.3g}"


@cuda_test
def test_cuda_gradcheck():
    case = Case(2, 3, 5, 4, 3, residual=True, channels_last=True)
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64, "cuda")
    inputs = [t.requires_grad_() for t in (x, w, g, b, res)]
    f = lambda x, w, g, b, r: deeplab_ops.conv_bn_relu(x, w, g, b, rm.clone(), rv.clone(), padding=1, residual=r,
                                                      backend="cuda")
    # nondet_tol: the convolution gradients are cuDNN's, whose float64 backward algorithms may sum with atomics
    # (PyTorch's own CUDA conv gradchecks run under cudnn.deterministic), so gradcheck's re-entrancy check (two
    # backward passes compared, exact by default) may see the summation order change the last bits. Bound: the
    # longest sum here is the weight gradient's N*Ho*Wo = 2*5*4 = 40 terms (the input gradient's C_out*3*3 = 27), so
    # |d| <= 40 * 2^-53 * sum|terms| ~ 4.4e-15 * sum|terms|; for one Jacobian row (a one-hot grad_output through the
    # training BatchNorm: one O(1) term, the others O(1/40)) sum|terms| is a few, |d| ~ 1e-14. nondet_tol 1e-12 keeps
    # a ~100x margin and is far below gradcheck's atol (1e-5), which the analytical-vs-numerical check still uses.
    assert torch.autograd.gradcheck(f, inputs, nondet_tol=1e-12)


@cuda_test
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_cuda_opcheck(case):
    args = tuple(a.cuda() if torch.is_tensor(a) else a for a in _forward_args(case, requires_grad=False))
    torch.library.opcheck(ops.conv_bn_relu_forward.default, args)


def test_torch_compile_traces_the_op_and_the_running_stat_update():
    """fullgraph: no graph break; aot_eager: the op's fake kernel, autograd and the buffer copy are traced."""
    case = Case(2, 3, 9, 7, 4, dilation=2, residual=True)
    x, w, g, b, rm, rv, res = make_inputs(case)
    w.requires_grad_()

    def f(x, w, g, b, rm, rv, res):
        return deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=2, dilation=2, residual=res, backend="cpu")

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    rm_c, rv_c = rm.clone(), rv.clone()
    out_c = compiled(x, w, g, b, rm_c, rv_c, res)
    out_e = f(x, w, g, b, rm, rv, res)
    assert_close(out_c, out_e, "compiled output", 1e-6, 1e-6)
    assert_close(rm_c, rm, "compiled running_mean", 1e-6, 1e-6)
    assert_close(rv_c, rv, "compiled running_var", 1e-6, 1e-6)
    (gc,) = torch.autograd.grad(out_c.sum(), w)
    (ge,) = torch.autograd.grad(out_e.sum(), w)
    assert_close(gc, ge, "compiled grad weight", 1e-5, 1e-5)
