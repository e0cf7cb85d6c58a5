"""The triton backend of the fused ASPP op against the reference and torchvision's ASPP: forward, every gradient
(x, every conv weight, pooling and projection weights, every BatchNorm weight and bias) and the running
statistics, training and eval, NCHW and channels_last; float64 gradcheck; opcheck; the padding-tap schedule of
the one-launch branch kernels; fp16/bf16 and TF32 where a GPU is visible.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1), about
a millisecond per tile operation: channels are tiny (C_in 8, C 4, batch 2) and the default run takes a chosen
subset of the (rates x size x mode x layout) matrix; `-m slow` runs all of it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    CUDA,
    HALF_PARAMS,
    TRITON_DEVICE,
    assert_close,
    assert_module_matches,
    needs_triton,
    tolerances,
    triton_test,
)
from torchvision.models.segmentation.deeplabv3 import ASPP

import deeplab_ops
from deeplab_ops import backends, reference
from deeplab_ops.nn import FusedASPP

DEVICE = TRITON_DEVICE  # CUDA tensors where a GPU is visible, else CPU tensors in the interpreter
ops = torch.ops.deeplab_ops
import deeplab_ops.triton.aspp as triton_aspp  # noqa: E402  (triton is a requirement: fail, never skip)

pytestmark = [pytest.mark.usefixtures("no_tf32"), pytest.mark.gpu, needs_triton]


def _inputs(n=2, cin=8, c=4, h=9, w=9, rates=(6, 12, 18), dtype=torch.float32, device=DEVICE,
            channels_last=False):
    """Fresh random ASPP inputs: x, conv weights, pool and projection weights, per-BN lists (weights, biases,
    running means, running vars). BatchNorm tensors stay float32 for half-type activations, as under autocast."""
    g = dict(dtype=dtype, device=device)
    x = torch.randn(n, cin, h, w, **g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    conv_ws = [torch.randn(c, cin, 1, 1, **g) / cin ** 0.5]
    conv_ws += [torch.randn(c, cin, 3, 3, **g) / (9 * cin) ** 0.5 for _ in rates]
    pool_w = torch.randn(c, cin, 1, 1, **g) / cin ** 0.5
    proj_w = torch.randn(c, (len(rates) + 2) * c, 1, 1, **g) / ((len(rates) + 2) * c) ** 0.5
    gb = dict(dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype, device=device)
    nb = len(rates) + 3
    bws = [torch.rand(c, **gb) + 0.5 for _ in range(nb)]
    bbs = [torch.randn(c, **gb) for _ in range(nb)]
    rms = [torch.randn(c, **gb) * 0.1 for _ in range(nb)]
    rvs = [torch.rand(c, **gb) + 0.5 for _ in range(nb)]
    return x, conv_ws, pool_w, proj_w, bws, bbs, rms, rvs


def _leaf_names(rates):
    nb = len(rates) + 3
    return (["x", "conv_weights[0] (1x1)"] + [f"conv_weights[{i + 1}] (rate {r})" for i, r in enumerate(rates)]
            + ["pool_weight", "project_weight"] + [f"bn_weights[{i}]" for i in range(nb)]
            + [f"bn_biases[{i}]" for i in range(nb)])


def _run(backend, tensors, rates, training, dtype=None, grad=None):
    """(out, running stats, gradients of every leaf) of one aspp call on copies of `tensors` in `dtype`."""
    x, cws, pw, prw, bws, bbs, rms, rvs = tensors

    def leaf(t, dt):
        return t.detach().clone(memory_format=torch.preserve_format).to(dt).requires_grad_()

    adt = dtype or x.dtype
    sdt = torch.float64 if adt == torch.float64 else torch.float32  # BatchNorm tensors: fp32 for half types
    x_, cws_, pw_, prw_ = leaf(x, adt), [leaf(t, adt) for t in cws], leaf(pw, adt), leaf(prw, adt)
    bws_, bbs_ = [leaf(t, sdt) for t in bws], [leaf(t, sdt) for t in bbs]
    rms_, rvs_ = [t.clone().to(sdt) for t in rms], [t.clone().to(sdt) for t in rvs]
    kw = dict(rates=rates, training=training, momentum=0.1, eps=1e-5)
    if backend == "reference":
        out = reference.aspp(x_, cws_, pw_, prw_, bws_, bbs_, rms_, rvs_, **kw)
    else:
        out = deeplab_ops.aspp(x_, cws_, pw_, prw_, bws_, bbs_, rms_, rvs_, backend=backend, **kw)
    leaves = [x_, *cws_, pw_, prw_, *bws_, *bbs_]
    grads = torch.autograd.grad(out, leaves, grad.to(adt)) if grad is not None else []
    return out, rms_ + rvs_, list(grads)


def _compare(size, rates, training, channels_last, *, cin=8, c=4, dtype=torch.float32):
    """The triton backend in `dtype` against the float64 reference on the same inputs."""
    tensors = _inputs(cin=cin, c=c, h=size, w=size + 2, rates=rates, dtype=dtype, channels_last=channels_last)
    what = f"rates {rates} at {size}x{size + 2} {'train' if training else 'eval'}{' CL' if channels_last else ''}"
    atol, rtol = tolerances(dtype)
    grad = torch.randn(2, c, size, size + 2, dtype=torch.float64, device=DEVICE)
    out, stats, grads = _run("triton", tensors, rates, training, grad=grad)
    exp, exp_stats, exp_grads = _run("reference", tensors, rates, training, dtype=torch.float64, grad=grad)
    assert out.dtype == dtype
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"{what}: output strides {out.stride()}"
    assert_close(out, exp, f"{what}: output", atol, rtol)
    for i, (a, b) in enumerate(zip(stats, exp_stats, strict=True)):
        kind = "running_mean" if i < len(stats) // 2 else "running_var"
        assert_close(a, b, f"{what}: {kind}[{i % (len(stats) // 2)}]", atol, rtol)
    for name, a, b in zip(_leaf_names(rates), grads, exp_grads, strict=True):
        assert_close(a, b, f"{what}: grad {name}", atol * 10, rtol * 10)
    assert grads[0].is_contiguous(memory_format=fmt), f"{what}: grad x strides {grads[0].stride()}"


# The matrix of the issue: rates (6, 12, 18) and (12, 24, 36) at 33x33, 17x17 and 9x9 (rates beyond the map:
# whole branches reduce to their centre tap), training and eval, NCHW and channels_last. The default run takes
# a subset that still covers every size, both rate sets, both modes and both layouts; `-m slow` the rest.
RATES = [(6, 12, 18), (12, 24, 36)]
DEFAULT = [
    (33, (6, 12, 18), True, False),
    (17, (12, 24, 36), True, True),
    (9, (12, 24, 36), False, True),
    (9, (6, 12, 18), True, False),
    (17, (6, 12, 18), False, False),
]
FULL = [(s, r, t, cl) for s, r, t, cl in itertools.product([33, 17, 9], RATES, [True, False], [False, True])]


def _id(case):
    size, rates, training, cl = case
    return f"{size}-{'-'.join(map(str, rates))}-{'train' if training else 'eval'}{'-CL' if cl else ''}"


@pytest.mark.parametrize("case", DEFAULT, ids=_id)
def test_triton_matches_reference(case):
    _compare(*case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in FULL if c not in DEFAULT], ids=_id)
def test_triton_matches_reference_full_matrix(case):
    _compare(*case)


@pytest.mark.slow
@pytest.mark.parametrize("rates", [(3,), (1, 2, 3, 4)], ids=str)
def test_any_number_of_rates_and_channel_blocks(rates):
    # More than one 16-wide channel block in every GEMM dimension (C_in 20, C 18: B*C = 36 to 90).
    tensors = _inputs(cin=20, c=18, h=11, w=7, rates=rates)
    grad = torch.randn(2, 18, 11, 7, dtype=torch.float64, device=DEVICE)
    for training in (True, False):
        out, stats, grads = _run("triton", tensors, rates, training, grad=grad)
        exp, exp_stats, exp_grads = _run("reference", tensors, rates, training, dtype=torch.float64, grad=grad)
        assert_close(out, exp, f"rates {rates} output", 2e-4, 2e-4)
        for name, a, b in zip(_leaf_names(rates), grads, exp_grads, strict=True):
            assert_close(a, b, f"rates {rates} grad {name}", 2e-3, 2e-3)


def _torchvision_pair(cin, rates, cout):
    tv = ASPP(cin, rates, cout)
    tv.project[3].p = 0.0
    with torch.no_grad():
        for name, p in tv.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 4 else 1.0))
            if p.dim() == 1 and name.endswith("weight"):
                p.abs_().add_(0.5)
        for name, b in tv.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
    fused = FusedASPP(cin, rates, cout, backend="triton")
    fused.load_state_dict(tv.state_dict())
    return tv.to(DEVICE), fused.to(DEVICE)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_module_matches_torchvision(training):
    """FusedASPP(backend="triton") against torchvision's ASPP: output, every parameter's gradient, every buffer."""
    rates = (6, 12, 18)
    tv, fused = _torchvision_pair(6, rates, 4)
    tv.train(training)
    fused.train(training)
    x = torch.randn(2, 6, 17, 13, device=DEVICE).contiguous(memory_format=torch.channels_last)
    assert_module_matches(fused, tv, x, f"torchvision {'train' if training else 'eval'}")


@pytest.mark.parametrize("training", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["train", "eval"])
def test_triton_gradcheck(training):
    rates = (1, 3)
    x, cws, pw, prw, bws, bbs, rms, rvs = _inputs(cin=3, c=2, h=5, w=4, rates=rates, dtype=torch.float64)
    # Every parameter in one flat tensor: fast_mode checks a random projection of the whole Jacobian, and two
    # inputs keep that to a handful of interpreted calls.
    shapes = [t.shape for t in (*cws, pw, prw, *bws, *bbs)]
    params = torch.cat([t.flatten() for t in (*cws, pw, prw, *bws, *bbs)]).requires_grad_()
    nc, nb = len(cws), len(bws)

    def f(x, params):
        ts = [t.view(shape) for t, shape in zip(params.split([s.numel() for s in shapes]), shapes, strict=True)]
        cws_, (pw_, prw_), bws_, bbs_ = ts[:nc], ts[nc:nc + 2], ts[nc + 2:nc + 2 + nb], ts[nc + 2 + nb:]
        return deeplab_ops.aspp(x, cws_, pw_, prw_, bws_, bbs_, [t.clone() for t in rms], [t.clone() for t in rvs],
                                rates=rates, training=training, backend="triton")

    assert torch.autograd.gradcheck(f, [x.requires_grad_(), params], fast_mode=True)


def test_triton_opcheck():
    rates = (2, 5)
    x, cws, pw, prw, bws, bbs, rms, rvs = _inputs(cin=5, c=3, h=7, w=6, rates=rates, channels_last=True)
    for t in (x, *cws, pw, prw):
        t.requires_grad_()
    bw, bb = torch.cat(bws).requires_grad_(), torch.cat(bbs).requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_autograd_registration")
    args = (x, cws, pw, prw, bw, bb, torch.cat(rms), torch.cat(rvs), list(rates), True, 0.1, 1e-5)
    torch.library.opcheck(ops.triton_aspp_forward.default, args, test_utils=utils)
    fwd = ops.triton_aspp_forward(x.detach(), [w.detach() for w in cws], pw.detach(), prw.detach(), bw.detach(),
                                  bb.detach(), torch.cat(rms), torch.cat(rvs), list(rates), True, 0.1, 1e-5)
    out, branch, pool_pre, proj, mean, invstd, _, _ = fwd
    bwd = (torch.randn_like(out), x.detach(), [w.detach() for w in cws], pw.detach(), prw.detach(), bw.detach(),
           bb.detach(), branch, pool_pre, proj, out, mean, invstd, list(rates), True, [True, True, True])
    torch.library.opcheck(ops.triton_aspp_backward.default, bwd, test_utils=("test_schema", "test_faketensor"))


def test_outputs_match_the_composite_contract():
    """Every output of triton_aspp_forward (pre-BN branches, pooling, projection, statistics, running stats)
    equals the cpu/cuda composite's, and the backward ops agree under a partial output_mask."""
    rates = (2, 4)
    x, cws, pw, prw, bws, bbs, rms, rvs = _inputs(cin=4, c=3, h=6, w=7, rates=rates, dtype=torch.float64)
    args = (x, cws, pw, prw, torch.cat(bws), torch.cat(bbs), torch.cat(rms), torch.cat(rvs), list(rates), True,
            0.1, 1e-5)
    ours = ops.triton_aspp_forward(*args)
    theirs = ops.aspp_forward(*args)
    names = ["out", "branch_out", "pool_out", "project_out", "save_mean", "save_invstd", "new_running_mean",
             "new_running_var"]
    for name, a, b in zip(names, ours, theirs, strict=True):
        if name == "branch_out":  # as each twin keeps it: one buffer (triton), one tensor per branch (composite)
            assert len(a) == 1 and len(b) == len(cws), name
            a, b = a[0], torch.cat(b, 1)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, name, 1e-10, 1e-10)
    out, branch, pool_pre, proj, mean, invstd, _, _ = ours
    grad = torch.randn_like(out)
    for mask in ([True, False, False], [False, True, False], [False, False, True]):
        bwd = [grad, x, cws, pw, prw, torch.cat(bws), torch.cat(bbs), branch, pool_pre, proj, out, mean, invstd,
               list(rates), True, mask]
        got = ops.triton_aspp_backward(*bwd)
        bwd[7] = list(branch[0].split(3, 1))  # the same values, one tensor per branch
        want = ops.aspp_backward(*bwd)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            if isinstance(b, (list, tuple)):
                assert len(a) == len(b), (mask, i)
                for j, (aa, bb_) in enumerate(zip(a, b, strict=True)):
                    assert_close(aa, bb_, f"mask {mask} output {i}[{j}]", 1e-10, 1e-10)
            elif b is None:
                assert a is None, (mask, i)
            else:
                assert_close(a, b, f"mask {mask} output {i}", 1e-10, 1e-10)


def _column_major(w: torch.Tensor) -> torch.Tensor:
    """A (C_out, C_in, 1, 1) weight's values with the input channels outermost in memory (strides (1, C_out, ...)):
    what a weight built from a transposed matrix holds."""
    return w.flatten(1).t().contiguous().t().view(w.shape)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_weights_in_any_layout(training):
    """The 1x1 weights column-major and the 3x3 ones channels_last compute what contiguous ones do: the kernels read
    the weights' packed copies, row-major whatever the parameters' strides (the pooling kernels once read a
    column-major projection weight's pooling columns transposed)."""
    rates = (2, 3)
    x, cws, pw, prw, bws, bbs, rms, rvs = _inputs(cin=6, c=5, h=7, w=6, rates=rates, dtype=torch.float64)
    odd = [_column_major(cws[0])] + [w.contiguous(memory_format=torch.channels_last) for w in cws[1:]]
    tensors = (x, odd, _column_major(pw), _column_major(prw), bws, bbs, rms, rvs)
    assert tensors[3].stride()[0] == 1 and tensors[2].stride()[0] == 1
    grad = torch.randn(2, 5, 7, 6, dtype=torch.float64, device=DEVICE)
    out, stats, grads = _run("triton", tensors, rates, training, grad=grad)
    exp, exp_stats, exp_grads = _run("reference", tensors, rates, training, grad=grad)
    assert_close(out, exp, "output", 1e-10, 1e-10)
    for a, b in zip(stats, exp_stats, strict=True):
        assert_close(a, b, "running statistics", 1e-10, 1e-10)
    for name, a, b in zip(_leaf_names(rates), grads, exp_grads, strict=True):
        assert_close(a, b, f"grad {name}", 1e-9, 1e-9)


def _pool_case(n, c, dtype, off):
    """Random pooling-branch tensors: pool (N, C) in `dtype`, every BN's mean, invstd, scale, shift (opmath) with
    the pooling BN at channels off .. off + C, the projection's (C, C) pooling columns (opmath)."""
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    g = dict(dtype=stat, device=DEVICE)
    k = off + c + 3  # (channels beside the block: never read as the block's)
    mean, invstd = torch.randn(k, **g), torch.rand(k, **g) + 0.5
    scale, shift = (torch.rand(k, **g) + 0.5) * invstd, torch.randn(k, **g)
    pool = torch.randn(n, c, dtype=dtype, device=DEVICE)
    w = torch.randn(c, c, **g) / c ** 0.5
    return pool, (mean, invstd, scale, shift), w


def _pool_z(pool, mean, scale, shift, sl):
    # The forward's normalized pooling output: relu(BN(pool)) rounded to pool's dtype (in float64 from there).
    z = torch.relu((pool.double() - mean[sl].double()) * scale[sl].double() + shift[sl].double())
    return z.to(pool.dtype).double()


def _pool_tolerance(dtype) -> float:
    # float32 / float64 arithmetic; in half precision z's rounding to x's dtype may differ by one unit in the last
    # place where the kernel's float32 z and the float64 reference's lie on either side of a rounding boundary.
    return {torch.float64: 1e-12, torch.float32: 2e-5}.get(dtype, 4 * torch.finfo(dtype).eps)


# N and C around the kernels' blocks (16 images, 16 to 64 channels): one, several and ragged blocks.
POOL_SHAPES = [(2, 1), (2, 5), (17, 33), (35, 70)]


@pytest.mark.parametrize("n,c", POOL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_PARAMS], ids=str)
def test_pooling_bias_kernel(n, c, dtype):
    """The forward's pooling branch after its BN statistics, one launch: relu(BN(pool)) rounded to x's dtype, times
    the projection's pooling columns (what `z_p @ w.t()` computed on the host before)."""
    off = 7
    pool, (mean, _, scale, shift), w = _pool_case(n, c, dtype, off)
    got = triton_aspp.pool_bias(pool, mean, scale, shift, w, off)
    exp = _pool_z(pool, mean, scale, shift, slice(off, off + c)) @ w.double().t()
    assert got.dtype == w.dtype and got.shape == (n, c)
    tol = _pool_tolerance(dtype)
    assert_close(got, exp, f"pooling bias N={n} C={c} {dtype}", tol, tol)
    pool[0, 0] = float("nan")  # NaN propagates through the ReLU (torch.relu's rule) into every output of image 0
    got = triton_aspp.pool_bias(pool, mean, scale, shift, w, off)
    assert got[0].isnan().all() and not got[1:].isnan().any()


@pytest.mark.parametrize("n,c", POOL_SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_PARAMS], ids=str)
def test_pooling_backward_kernel(n, c, training, dtype):
    """The pooling branch's BN + ReLU backward, one launch, against its formulas in float64: g = dbias @ w through
    the ReLU (a NaN output passes the gradient, as threshold_backward), the BN sums into their block of the op's
    sums (nothing else written), dy = scale * (g - sum g / N - xhat * sum(g * xhat) / N) (eval: scale * g), and z."""
    off = 5
    pool, (mean, invstd, scale, shift), w = _pool_case(n, c, dtype, off)
    dbias = torch.randn(n, c, dtype=w.dtype, device=DEVICE)
    sums = (torch.full_like(mean, 7.0), torch.full_like(mean, 7.0))
    dy, z = triton_aspp.pool_backward(dbias, w, pool, (mean, invstd, scale, shift), sums, off, training)
    sl = slice(off, off + c)
    exp_z = _pool_z(pool, mean, scale, shift, sl)
    xhat = (pool.double() - mean[sl].double()) * invstd[sl].double()
    g = torch.where(exp_z <= 0, 0.0, dbias.double() @ w.double())
    sg, sgx = g.sum(0), (g * xhat).sum(0)
    k = scale[sl].double()
    exp_dy = k * (g - sg / n - xhat * sgx / n) if training else k * g
    what = f"pooling backward N={n} C={c} {'train' if training else 'eval'} {dtype}"
    tol = _pool_tolerance(dtype)
    assert_close(z, exp_z, f"{what}: z", tol, tol)
    assert_close(dy, exp_dy, f"{what}: dy", tol, tol)
    assert_close(sums[0][sl], sg, f"{what}: sum g", tol, tol)
    assert_close(sums[1][sl], sgx, f"{what}: sum g * xhat", tol, tol)
    for t in sums:  # the other BatchNorms' channels untouched
        assert (t[:off] == 7).all() and (t[off + c:] == 7).all(), what
    # A NaN pre-BN value: its z is NaN, which passes the gradient (threshold_backward zeroes only where z <= 0), so
    # in eval its dy is scale * (dbias @ w), finite; in training its xhat makes the channel's sums, and so that
    # channel's dy, NaN. Every other channel is as before.
    pool[0, 0] = float("nan")
    dy, z = triton_aspp.pool_backward(dbias, w, pool, (mean, invstd, scale, shift), sums, off, training)
    assert z[0, 0].isnan() and not z.flatten()[1:].isnan().any(), what
    gz = (dbias.double() @ w.double())[0, 0] * scale[off].double()
    if training:
        assert dy[:, 0].isnan().all() and sums[1][off].isnan(), what
    else:
        assert_close(dy[0, 0], gz, f"{what}: dy at a NaN z", tol, tol)
    if c > 1:
        assert_close(dy[:, 1:], exp_dy[:, 1:], f"{what}: dy beside the NaN", tol, tol)


def test_batch_of_one_in_training_is_a_clear_error():
    x, cws, pw, prw, bws, bbs, rms, rvs = _inputs(n=1, h=5, w=5, rates=(2,))
    with pytest.raises(ValueError, match="batch of 2 or more"):
        deeplab_ops.aspp(x, cws, pw, prw, bws, bbs, rms, rvs, rates=(2,), backend="triton")
    out = deeplab_ops.aspp(x, cws, pw, prw, bws, bbs, rms, rvs, rates=(2,), training=False, backend="triton")
    exp = reference.aspp(x, cws, pw, prw, bws, bbs, rms, rvs, rates=(2,), training=False)
    assert_close(out, exp, "batch-1 eval", 2e-4, 2e-4)


def test_support_reasons_and_dispatch():
    x = torch.randn(2, 4, 5, 5, device=DEVICE)
    call = dict(x=x, rates=(2, 3), training=True, channels=4)
    assert backends.not_supported_reasons("triton", "aspp", x.device, **call) == []
    if not CUDA:  # the interpreter: bfloat16 refused (stored as raw bits), float16 runs (Triton >= 3.6)
        half = dict(call, x=x.bfloat16())
        assert any("interpreter" in r for r in backends.not_supported_reasons("triton", "aspp", x.device, **half))
        assert backends.not_supported_reasons("triton", "aspp", x.device, **dict(call, x=x.half())) == []
    big = dict(call, channels=2**31 // (2 * 25 * 3) + 1)
    assert any("int32" in r for r in backends.not_supported_reasons("triton", "aspp", x.device, **big))


def test_import_is_light():
    import subprocess
    import sys

    code = ("import sys, deeplab_ops; assert 'triton' not in sys.modules; "
            "assert 'deeplab_ops.triton.aspp' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- padding-tap skipping ---------------------------------------------------------------------------------


def _geometric_triples(h, w, rates, block_h, block_w, dgrad=False):
    """(computed, dense) (tile, tap, branch) triples from every pixel's coordinates: a 3x3 tap of rate r is
    needed for a tile iff some pixel of it reads (dgrad: is reached from) a real pixel through it."""
    computed = dense = 0
    sign = -1 if dgrad else 1
    for r0 in range(0, h, block_h):
        for c0 in range(0, w, block_w):
            computed, dense = computed + 1, dense + 1  # the 1x1 branch
            for rate in rates:
                for i in range(3):
                    for j in range(3):
                        dense += 1
                        rows = any(0 <= y + sign * (i - 1) * rate < h for y in range(r0, min(r0 + block_h, h)))
                        cols = any(0 <= x + sign * (j - 1) * rate < w for x in range(c0, min(c0 + block_w, w)))
                        computed += rows and cols
    return computed, dense


@pytest.mark.parametrize("rates", RATES, ids=str)
def test_schedule_matches_the_geometry_33x33(rates):
    """The host schedule (what the kernels decide per tile) against every pixel's coordinates."""
    for block in ((8, 16), (16, 16), (4, 4), (32, 32)):
        for pass_ in ("forward", "dgrad", "wgrad"):
            expected = _geometric_triples(33, 33, rates, *block, dgrad=pass_ == "dgrad")
            assert triton_aspp.schedule((2, 1, 33, 33), rates, *block, pass_) == (2 * expected[0], 2 * expected[1])
    computed, dense = triton_aspp.schedule((1, 1, 33, 33), rates, 1, 1)
    assert computed < dense


@pytest.mark.parametrize(
    "size,rates,block",
    [(17, (6, 12, 18), (8, 8)), pytest.param(9, (12, 24, 36), (4, 4), marks=pytest.mark.slow),
     pytest.param(33, (6, 12, 18), (8, 16), marks=pytest.mark.slow)],
    ids=str,
)
def test_kernels_compute_the_scheduled_triples(size, rates, block):
    """The one-launch branch kernels compute exactly the scheduled (tile, tap, branch) triples, in forward, dgrad
    and wgrad (counted by the kernels themselves: one atomic per computed triple, wgrad's split programs their loops'
    trip counts), and skip the others."""
    shape = (1, 1, size, size)
    x = torch.randn(shape, device=DEVICE)
    cws = [torch.randn(1, 1, 1, 1, device=DEVICE)] + [torch.randn(1, 1, 3, 3, device=DEVICE) for _ in rates]
    counted = triton_aspp.count_computed_pairs(x, cws, rates, *block)
    for pass_, count in counted.items():
        computed, dense = triton_aspp.schedule(shape, rates, *block, pass_)
        assert (computed, dense) == _geometric_triples(size, size, rates, *block, dgrad=pass_ == "dgrad")
        assert count == computed < dense, (pass_, count, computed, dense)
    if size == 17:
        # 8x8 tiles of a 17x17 map: a rate-18 tap reaches past the map from every tile, so that branch computes
        # its centre tap only; rates 6 and 12 keep some outer taps.
        tiles = 3 * 3
        only_18 = triton_aspp.schedule(shape, (18,), *block)[0] - tiles
        assert only_18 == tiles
    if size == 9:
        # Rates beyond the map: every 3x3 branch reduces to its centre tap, on every tile.
        tiles = (9 // 4 + 1) ** 2
        assert counted["forward"] == tiles * (1 + len(rates))


# The AOT compiles for sm_80 / sm_90 and the configuration lists: tests/test_triton_compile.py.


# ---- GPU only: half types and TF32 ------------------------------------------------------------------------

GPU_CASES = [(33, (6, 12, 18), True), (17, (12, 24, 36), False), (33, (12, 24, 36), True)]


def _gpu_runs(size, rates, training, runs, cin=64, c=32, device="cuda"):
    """One set of inputs, one run per entry of `runs`: (dtype, backend) or (dtype, backend, allow_tf32), the last
    setting cuDNN's TF32 flag for that run (restored after it)."""
    tensors = _inputs(cin=cin, c=c, h=size, w=size, rates=rates, dtype=torch.float64, device=device,
                      channels_last=True)
    grad = torch.randn(2, c, size, size, dtype=torch.float64, device=device)
    results = []
    for dtype, backend, *tf32 in runs:
        previous = torch.backends.cudnn.allow_tf32
        if tf32:
            torch.backends.cudnn.allow_tf32 = tf32[0]
        try:
            out, stats, grads = _run(backend, tensors, rates, training, dtype=dtype, grad=grad)
        finally:
            torch.backends.cudnn.allow_tf32 = previous
        results.append([out.double(), *(s.double() for s in stats), *(g.double() for g in grads)])
    return results


@triton_test
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if not CUDA and c[0] > 17 else c
                                  for c in GPU_CASES], ids=str)  # (the interpreter: ~50 s for each 33x33 case)
@pytest.mark.parametrize("dtype", HALF_PARAMS, ids=str)
def test_half_error_within_twice_the_reference_error(case, dtype):
    """float16 runs in the interpreter too (common.interpreter_dtype_refusal): there on CPU tensors."""
    exact, ref_half, ours = _gpu_runs(*case, [(torch.float64, "reference"), (dtype, "reference"), (dtype, "triton")],
                                      device=TRITON_DEVICE)
    for i, (e, r, o) in enumerate(zip(exact, ref_half, ours, strict=True)):
        ref_err = (r - e).abs().max().item()
        our_err = (o - e).abs().max().item()
        assert our_err <= 2 * ref_err + 1e-6 * e.abs().max().item(), (
            f"{case} {dtype} output {i}: triton error {our_err:.3g} > 2x the reference-in-{dtype} error {ref_err:.3g}"
        )


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="TF32 needs a GPU")
def test_tf32_follows_cudnn_allow_tf32(monkeypatch):
    # All four runs on the same inputs (each _gpu_runs call draws new ones: compared across calls, the TF32 bound
    # held trivially and the float32 one failed by the whole output's scale on the H200)
    case = GPU_CASES[0]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", torch.backends.cudnn.allow_tf32)  # restored after
    exact, ref_tf32, ours_tf32, ours_ieee = _gpu_runs(*case, [
        (torch.float64, "reference"), (torch.float32, "reference", True), (torch.float32, "triton", True),
        (torch.float32, "triton", False)])
    for i, (e, r, t, f) in enumerate(zip(exact, ref_tf32, ours_tf32, ours_ieee, strict=True)):
        scale = max(e.abs().max().item(), 1.0)
        # at most twice cuDNN's error with TF32 allowed, or TF32's own rounding scale (cuDNN may pick float32
        # kernels for some passes even then)
        assert (t - e).abs().max().item() <= max(2 * (r - e).abs().max().item(), 4e-3 * scale), f"tf32 output {i}"
        assert (f - e).abs().max().item() <= 2e-3 * scale, f"allow_tf32=False must give float32 accuracy, output {i}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_auto_picks_triton_on_cuda():
    x = torch.randn(2, 8, 9, 9, device="cuda")
    assert backends.resolve(None, "aspp", x.device, x=x, rates=(2,), training=True, channels=4) == "triton"
    _compare(9, (6, 12, 18), True, True)
