"""The cpu composites called through torch.ops: conv_bias_act against deeplab_ops.reference, and BatchNorm
synchronized over a torch.distributed group (group_name) against the same ops on the concatenated batch.

Shapes are odd on purpose; inputs are fresh random values in float64 and float32, NCHW and channels_last.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import run_two_processes

import deeplab_ops  # noqa: F401  (loads the extension, which registers the ops)
from deeplab_ops import reference

_ops = torch.ops.deeplab_ops

LAYOUTS = [pytest.param(torch.contiguous_format, id="nchw"), pytest.param(torch.channels_last, id="nhwc")]
DTYPES = [pytest.param(torch.float64, 1e-12, id="fp64"), pytest.param(torch.float32, 2e-5, id="fp32")]


def _close(actual, expected, what: str, tol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, msg=lambda m: f"{what}:\n{m}")


# ---- conv_bias_act ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_bias_act_matches_reference(layout, dtype, tol, with_bias, with_residual, relu):
    stride, padding, dilation = (2, 1), (2, 1), (2, 1)
    x = torch.randn(3, 5, 11, 9, dtype=dtype).contiguous(memory_format=layout)
    w = torch.randn(7, 5, 3, 3, dtype=dtype)
    bias = torch.randn(7, dtype=dtype) if with_bias else None
    ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), stride, padding, dilation)
    residual = torch.randn(ref.shape, dtype=dtype).contiguous(memory_format=layout) if with_residual else None
    if residual is not None:
        ref = ref + residual.double()
    if relu:
        ref = F.relu(ref)
    out = _ops.conv_bias_act(x, w, bias, residual, stride, padding, dilation, relu)
    assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
    _close(out.double(), ref, "conv_bias_act", tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_conv_bias_act_without_bias_is_the_forward_conv_out_exactly(layout):
    # The memory-efficient backward recomputes conv_out with conv_bias_act: it must be bitwise the forward's.
    x = torch.randn(2, 4, 9, 7).contiguous(memory_format=layout)
    w = torch.randn(6, 4, 3, 3)
    args = ((1, 1), (2, 2), (2, 2))
    conv_out = _ops.conv_bn_relu_forward(x, w, torch.rand(6), torch.randn(6), None, None, *args, True, 0.1, 1e-5,
                                         None, True)[1]
    again = _ops.conv_bias_act(x, w, None, None, *args, False)
    assert torch.equal(again, conv_out)
    assert again.stride() == conv_out.stride()


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("size", ["large", "small"])
def test_conv_bias_act_channels_last_relu_runs_one_onednn_call_when_large(with_residual, size):
    # channels_last float32 with a ReLU and at least 2^18 output values: bias, residual sum and ReLU are oneDNN
    # post-ops of one convolution call (mkldnn::_convolution_pointwise): no add_/relu_ passes, the output
    # channels_last. Smaller outputs take at::convolution + add_ + relu_ (the post-op call costs more per call than
    # the passes it saves there). The values are conv + add + relu's either way.
    from torch.profiler import ProfilerActivity, profile

    cl = torch.channels_last
    n, hw = (4, 64) if size == "large" else (2, 9)  # 4 x 32 x 64 x 64 = 2^19 output values; 2 x 32 x 9 x 9
    x = torch.randn(n, 8, hw, hw).contiguous(memory_format=cl)
    w = torch.randn(32, 8, 3, 3).contiguous(memory_format=cl)
    bias = torch.randn(32)
    residual = torch.randn(n, 32, hw, hw).contiguous(memory_format=cl) if with_residual else None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = _ops.conv_bias_act(x, w, bias, residual, (1, 1), (2, 2), (2, 2), True)
    names = [e.name for e in prof.events()]
    if size == "small":
        assert "mkldnn::_convolution_pointwise" not in names and "aten::relu_" in names, names
    elif torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        assert "mkldnn::_convolution_pointwise" in names, names
        assert not {"aten::add_", "aten::relu_"} & set(names), names
        # torch 2.11's binary form accumulates into a clone of the residual (oneDNN's sum post-op writes over its
        # second operand): one copy inside the op; torch 2.14's reads it (a binary add post-op): none.
        old_binary = with_residual and tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 14)
        assert names.count("aten::copy_") <= (1 if old_binary else 0), names
    assert out.is_contiguous(memory_format=cl)
    ref = F.conv2d(x.double(), w.double(), bias.double(), 1, 2, 2)
    if residual is not None:
        ref = ref + residual.double()
    _close(out.double(), F.relu(ref), f"conv_bias_act ({size})", 2e-5)
    # The same message on either path, naming the argument and the shape expected
    expected = rf"^deeplab_ops: residual must have shape \[{n}, 32, {hw}, {hw}\] \(the convolution output's\)"
    with pytest.raises(RuntimeError, match=expected):
        _ops.conv_bias_act(x, w, bias, torch.randn(n, 32, hw, hw - 1).contiguous(memory_format=cl), (1, 1), (2, 2),
                           (2, 2), True)
    with pytest.raises(RuntimeError, match=expected):
        _ops.conv_bias_act(x.contiguous(), w, bias, torch.randn(n, 32, hw - 1, hw), (1, 1), (2, 2), (2, 2), True)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv_bias_act_small_dilated_bias_in_the_epilogue(with_residual, dtype):
    # Batch 1, a small dilated input: ATen picks THNN's dilated kernel, whose bias adds run image by image and
    # channel by channel; the composite convolves without the bias and adds it in its epilogue instead.
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 16, 8, 8, dtype=dtype)
    w = torch.randn(16, 16, 3, 3, dtype=dtype)
    bias = torch.randn(16, dtype=dtype)
    backend = torch._C._select_conv_backend(x, w, bias, [1, 1], [2, 2], [2, 2], False, [0, 0], 1, None)
    residual = torch.randn(1, 16, 8, 8, dtype=dtype) if with_residual else None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = _ops.conv_bias_act(x, w, bias, residual, (1, 1), (2, 2), (2, 2), True)
    if backend == torch._C._ConvBackend.SlowDilated2d:
        adds = [e for e in prof.events() if e.name == "aten::add_"]
        assert len(adds) == 1 + with_residual, [e.name for e in prof.events()]
    ref = F.conv2d(x.double(), w.double(), bias.double(), 1, 2, 2)
    if residual is not None:
        ref = ref + residual.double()
    _close(out.double(), F.relu(ref), "conv_bias_act (bias after THNN's dilated conv)",
           1e-12 if dtype == torch.float64 else 2e-5)


def test_conv_bias_act_errors_name_the_argument():
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError, match="bias must be a 1-D tensor of 4 values"):
        _ops.conv_bias_act(x, w, torch.randn(5), None, (1, 1), (1, 1), (1, 1), True)
    with pytest.raises(RuntimeError, match="residual must have shape"):
        _ops.conv_bias_act(x, w, None, torch.randn(2, 4, 4, 5), (1, 1), (1, 1), (1, 1), True)
    with pytest.raises(RuntimeError, match="weight has dtype"):
        _ops.conv_bias_act(x, w.double(), None, None, (1, 1), (1, 1), (1, 1), True)


# ---- group_name: BatchNorm synchronized over 2 gloo processes ------------------------------------------------

# Uneven shares of the batch: the group's count is the sum of different local counts.
SHARES = (slice(0, 2), slice(2, 5))
CONV_ARGS = ((1, 1), (1, 1), (1, 1))
RATES = [1, 2]


def _conv_inputs():
    g = torch.Generator().manual_seed(4321)
    d = dict(generator=g, dtype=torch.float64)
    x = torch.randn(5, 3, 7, 6, **d)
    x = x.contiguous(memory_format=torch.channels_last)
    return dict(x=x, w=torch.randn(5, 3, 3, 3, **d), gamma=torch.rand(5, **d) + 0.5, beta=torch.randn(5, **d),
                rm=torch.randn(5, **d), rv=torch.rand(5, **d) + 0.5, res=torch.randn(5, 5, 7, 6, **d) + 0.3,
                grad=torch.randn(5, 5, 7, 6, **d))


def _conv_step(t, share, group_name):
    x, res, grad = t["x"][share], t["res"][share], t["grad"][share]
    out, conv_out, mean, invstd, new_rm, new_rv = _ops.conv_bn_relu_forward(
        x, t["w"], t["gamma"], t["beta"], t["rm"], t["rv"], *CONV_ARGS, True, 0.1, 1e-5, res, True, group_name)
    grads = _ops.conv_bn_relu_backward(grad, x, t["w"], t["gamma"], conv_out, out, mean, invstd, *CONV_ARGS, True,
                                       True, [True] * 5, group_name)
    return dict(out=out, mean=mean, invstd=invstd, new_rm=new_rm, new_rv=new_rv, grad_x=grads[0],
                grad_w=grads[1], grad_gamma=grads[2], grad_beta=grads[3], grad_res=grads[4])


def _aspp_inputs():
    g = torch.Generator().manual_seed(8765)
    d = dict(generator=g, dtype=torch.float64)
    c, cin, k = 3, 4, (len(RATES) + 3) * 3
    return dict(x=torch.randn(5, cin, 5, 6, **d),
                convs=[torch.randn(c, cin, 1, 1, **d)] + [torch.randn(c, cin, 3, 3, **d) for _ in RATES],
                pool=torch.randn(c, cin, 1, 1, **d), proj=torch.randn(c, (len(RATES) + 2) * c, 1, 1, **d) * 0.5,
                gamma=torch.rand(k, **d) + 0.5, beta=torch.randn(k, **d), rm=torch.randn(k, **d),
                rv=torch.rand(k, **d) + 0.5, grad=torch.randn(5, c, 5, 6, **d))


def _aspp_step(t, share, group_name):
    x, grad = t["x"][share], t["grad"][share]
    out, branch, pool, proj, mean, invstd, new_rm, new_rv = _ops.aspp_forward(
        x, t["convs"], t["pool"], t["proj"], t["gamma"], t["beta"], t["rm"], t["rv"], RATES, True, 0.1, 1e-5,
        group_name)
    gx, gconvs, gpool, gproj, ggamma, gbeta = _ops.aspp_backward(
        grad, x, t["convs"], t["pool"], t["proj"], t["gamma"], t["beta"], branch, pool, proj, out, mean, invstd,
        RATES, True, [True] * 3, group_name)
    return dict(out=out, mean=mean, invstd=invstd, new_rm=new_rm, new_rv=new_rv, grad_x=gx,
                grad_convs=torch.cat([g.flatten() for g in gconvs]), grad_pool=gpool, grad_proj=gproj,
                grad_gamma=ggamma, grad_beta=gbeta)


# Per-batch results (concatenated over the processes), global ones (every process has them), parameter gradients
# (this process's share: summed over the processes they give the global gradient).
PER_BATCH = ("out", "grad_x", "grad_res")
GLOBAL = ("mean", "invstd", "new_rm", "new_rv")


def _group_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        name = dist.group.WORLD.group_name
        results = {}
        for op, inputs, step in (("conv_bn_relu", _conv_inputs, _conv_step), ("aspp", _aspp_inputs, _aspp_step)):
            r = step(inputs(), SHARES[rank], name)
            # numpy arrays travel by value: tensors would be shared memory that dies with this process.
            results[op] = {k: v.contiguous().numpy() for k, v in r.items()}
        queue.put((rank, results))
    except Exception as exc:  # the test fails with this process's error, not with a queue timeout
        queue.put((rank, f"rank {rank}: {type(exc).__name__}: {exc}"))
        raise
    finally:
        dist.destroy_process_group()


def test_group_name_matches_the_ops_on_the_concatenated_batch():
    by_rank = {rank: results for rank, (results,) in run_two_processes(_group_worker).items()}
    tol = 1e-10
    for op, inputs, step in (("conv_bn_relu", _conv_inputs, _conv_step), ("aspp", _aspp_inputs, _aspp_step)):
        whole = step(inputs(), slice(None), None)
        parts = [{k: torch.from_numpy(v) for k, v in by_rank[r][op].items()} for r in (0, 1)]
        for key, expected in whole.items():
            if key in PER_BATCH:
                _close(torch.cat([parts[0][key], parts[1][key]]), expected, f"{op} {key}", tol)
            elif key in GLOBAL:
                for r in (0, 1):
                    _close(parts[r][key], expected, f"{op} {key} on rank {r}", tol)
            else:
                _close(parts[0][key] + parts[1][key], expected, f"{op} {key} summed over the ranks", tol)


def test_group_name_is_ignored_in_eval_and_unknown_groups_are_named():
    t = _conv_inputs()
    args = (t["x"], t["w"], t["gamma"], t["beta"], t["rm"], t["rv"], *CONV_ARGS)
    plain = _ops.conv_bn_relu_forward(*args, False, 0.1, 1e-5, None, True)
    named = _ops.conv_bn_relu_forward(*args, False, 0.1, 1e-5, None, True, "no-such-group")
    assert torch.equal(plain[0], named[0])
    with pytest.raises(RuntimeError, match="group_name='no-such-group'"):
        _ops.conv_bn_relu_forward(*args, True, 0.1, 1e-5, None, True, "no-such-group")


# ---- bn_finalize: the forms the composites use -------------------------------------------------------------


@pytest.mark.parametrize("stat_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("running_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_bn_finalize_partials_and_single_statistics_match_reference(stat_dtype, running_dtype):
    c, parts, momentum, eps = 13, 4, 0.1, 1e-5
    counts = torch.randint(2, 300, (parts,)).to(stat_dtype)
    # Partials as column views of one packed buffer, as the all-gather delivers them: strided reads.
    packed = torch.randn(parts, 1 + 2 * c, dtype=torch.float64).to(stat_dtype)
    packed[:, 0] = counts
    packed[:, 1 + c:] = packed[:, 1 + c:].abs() * counts[:, None]
    mean, m2 = packed[:, 1:1 + c], packed[:, 1 + c:]
    rm, rv = torch.randn(c).to(running_dtype), (torch.rand(c) + 0.5).to(running_dtype)
    rm_ref, rv_ref = rm.double().clone(), rv.double().clone()  # the reference updates them in place
    ref_mean, ref_invstd = reference.bn_finalize(packed[:, 0], mean, m2, rm_ref, rv_ref, momentum, eps)
    tol = 1e-12 if stat_dtype == torch.float64 else 2e-6
    run_tol = {torch.bfloat16: 1e-2, torch.float32: 2e-6}.get(running_dtype, tol)  # stored in running_dtype
    out = [torch.empty(c, dtype=stat_dtype) for _ in range(2)] + [torch.empty(c, dtype=running_dtype) for _ in range(2)]
    _ops.bn_finalize(mean, m2, packed[:, 0], 0.0, rm, rv, momentum, eps, *out)
    for got, want, what, t in zip(out, (ref_mean, ref_invstd, rm_ref, rv_ref),
                                  ("mean", "invstd", "running_mean", "running_var"), (tol, tol, run_tol, run_tol),
                                  strict=True):
        _close(got.double(), want, f"bn_finalize (P, C) {what}", t)
    # One (C,) partial with its count given as a number: the single-process composite's call.
    one = [torch.empty(c, dtype=stat_dtype) for _ in range(2)] + [torch.empty(c, dtype=running_dtype) for _ in range(2)]
    _ops.bn_finalize(mean[0], m2[0], None, float(counts[0]), rm, rv, momentum, eps, *one)
    rm1, rv1 = rm.double().clone(), rv.double().clone()
    want = reference.bn_finalize(packed[:1, 0], mean[:1], m2[:1], rm1, rv1, momentum, eps)
    for got, exp, what, t in zip(one, (*want, rm1, rv1), ("mean", "invstd", "running_mean", "running_var"),
                                 (tol, tol, run_tol, run_tol), strict=True):
        _close(got.double(), exp, f"bn_finalize (C,) {what}", t)


def test_bn_finalize_eval_gives_the_running_statistics():
    c, eps = 9, 1e-3
    rm, rv = torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5
    mean, invstd, empty = torch.empty(c), torch.empty(c), torch.empty(0, dtype=torch.float64)
    _ops.bn_finalize(None, None, None, 0.0, rm, rv, 0.1, eps, mean, invstd, empty, empty)
    _close(mean.double(), rm, "eval mean", 1e-7)
    _close(invstd.double(), (rv + eps).rsqrt(), "eval invstd", 1e-6)


# ---- host overhead: aten ops per call of the composite (CPU profiler) ----------------------------------------

_CONV_OPS = ("aten::convolution", "aten::convolution_backward")
_COPIES = ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::cat", "aten::stack")
_SYNCS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def _aten_ops_outside_conv_and_stages(fn) -> list[str]:
    """Names of the aten ops one steady-state call runs, nested ones included, except the convolution's (and its
    children) and those inside the BatchNorm stage kernels."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = []
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        p = e
        while p is not None and p.name not in _CONV_OPS and not p.name.startswith("deeplab_ops::bn_"):
            p = p.cpu_parent
        if p is None:
            names.append(e.name)
    return names


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_conv_bn_relu_forward_host_op_budget(training):
    # The lead's Python adds two running-stat copy_ to these: 6 in all is the budget of a fused forward.
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 8, 3, 3)
    args = (x, w, torch.rand(12), torch.randn(12), torch.randn(12), torch.rand(12) + 0.5, (1, 1), (1, 1), (1, 1),
            training, 0.1, 1e-5, None, True)
    names = _aten_ops_outside_conv_and_stages(lambda: _ops.conv_bn_relu_forward(*args))
    assert len(names) <= 4, f"aten ops per call outside the convolution and the BN stages: {names}"
    assert not [n for n in names if n in _COPIES + _SYNCS], f"copies or host syncs per call: {names}"


# ---- the CPU BatchNorm stage kernels: every vectorized loop and its tails ---------------------------------------
#
# csrc/cpu/bn_stages_cpu.cpp sums NCHW planes in 16 partial sums (a plane's last values apart), computes act_grad
# ahead in chunks of 1024 values, takes statistics in two-pass blocks of 8192 values, and walks channels_last rows
# in spans of up to 256 values (one row when C > 256): these shapes give planes, rows and blocks shorter than, equal
# to and longer than those, with tails.

# (2, 1024, 9, 11) and (1, 2500, 7, 9): channels_last rows wider than a span, in several row blocks (at least 32
# rows a block, 26 at 2500 channels) folded and merged.
STAGE_SHAPES = [(2, 3, 1, 5), (1, 2, 16, 16), (2, 3, 17, 31), (1, 300, 3, 5), (2, 257, 2, 3), (1, 1, 1, 1031),
                (1, 2, 91, 91), (2, 1024, 9, 11), (1, 2500, 7, 9)]
STAGE_DTYPES = [
    pytest.param(torch.float64, 1e-12, 1e-12, id="fp64"),
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-5, 2e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-5, 1.6e-2, id="bf16"),
]


def _stage_inputs(shape, dtype, layout):
    """y, z = ReLU(BN(y) + shift), a gradient dz, and the statistics of y in the opmath dtype."""
    c = shape[1]
    st = torch.float64 if dtype == torch.float64 else torch.float32
    y = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.7).to(dtype).contiguous(memory_format=layout)
    mean, m2 = reference.bn_stats(y)
    invstd = (m2 / (y.numel() // c) + 1e-5).rsqrt()
    z = reference.bn_apply(y, mean, invstd, torch.randn(c, dtype=torch.float64) * 0.3, None, True)
    z = z.contiguous(memory_format=layout)
    dz = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    return y, z, dz, mean.to(st), invstd.to(st)


def _scaled_close(actual, expected, what, tol, scale):
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol * max(scale, 1.0), rtol=tol,
                               equal_nan=True, msg=lambda m: f"{what}:\n{m}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", STAGE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,stat_tol,out_tol", STAGE_DTYPES)
def test_cpu_stage_kernels_match_reference(shape, layout, dtype, stat_tol, out_tol):
    c = shape[1]
    y, z, dz, mean, invstd = _stage_inputs(shape, dtype, layout)
    st = mean.dtype
    got_mean, got_m2 = _ops.bn_stats(y)
    ref_mean, ref_m2 = reference.bn_stats(y)
    _scaled_close(got_mean, ref_mean, "bn_stats mean", stat_tol, ref_mean.abs().max().item())
    _scaled_close(got_m2, ref_m2, "bn_stats m2", stat_tol, ref_m2.abs().max().item())

    gamma, beta = torch.rand(c, dtype=st) + 0.5, torch.randn(c, dtype=st)
    residual = torch.randn(shape, dtype=torch.float64).to(dtype).contiguous(memory_format=layout)
    for res in (None, residual):
        for relu in (False, True):
            out = _ops.bn_apply(y, mean, invstd, gamma, beta, res, relu)
            assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
            expected = reference.bn_apply(y, mean, (gamma * invstd), beta, res, relu)
            _scaled_close(out, expected, f"bn_apply relu={relu} residual={res is not None}", out_tol, 4.0)

    count = float(y.numel() // c)
    for relu in (False, True):
        sg, sgx = _ops.bn_backward_reduce(dz, z, y, mean, invstd, relu)
        assert sg.dtype == sgx.dtype == st
        esg, esgx = reference.bn_backward_reduce(dz, z, y, mean, invstd, relu)
        g = reference.act_grad(dz, z, relu)
        _scaled_close(sg, esg, f"sum_g relu={relu}", stat_tol, g.abs().sum((0, 2, 3)).max().item())
        _scaled_close(sgx, esgx, f"sum_g_xhat relu={relu}", stat_tol, (g * 3).abs().sum((0, 2, 3)).max().item())
        for training in (True, False):
            dy = _ops.bn_backward_dy(dz, z, y, mean, invstd, gamma, sg, sgx, count, relu, training)
            assert dy.dtype == dtype and dy.is_contiguous(memory_format=layout)
            edy = reference.bn_backward_dy(dz, z, y, mean, invstd, gamma, sg, sgx, count, relu, training)
            _scaled_close(dy, edy, f"bn_backward_dy relu={relu} training={training}", out_tol, 4.0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_dy_channels_with_zero_coefficient_do_not_read_y(layout):
    # Training dy = k * (g - a - xhat * b), b = invstd * sum(g * xhat) / n. A channel whose b is exactly 0 (here:
    # sum_g_xhat = 0) gets k * (g - a) and never reads y, so an infinite y there gives no NaN; the other channels
    # (same call, channels_last rows mix both kinds) use y.
    shape, c = (2, 300, 3, 5), 300
    y, z, dz, mean, invstd = _stage_inputs(shape, torch.float32, layout)
    zero = torch.arange(c) % 3 == 0
    y = y.clone()
    y[:, zero] = float("inf")
    gamma = torch.rand(c) + 0.5
    sg, sgx = torch.randn(c), torch.randn(c)
    sgx[zero] = 0.0
    count = float(y.numel() // c)
    dy = _ops.bn_backward_dy(dz, z, y, mean, invstd, gamma, sg, sgx, count, True, True)
    assert torch.isfinite(dy).all()
    g = reference.act_grad(dz, z, True)
    k, view = (gamma.double() * invstd.double()), (1, -1, 1, 1)
    expected = reference.bn_backward_dy(dz, z, y, mean, invstd, gamma, sg, sgx, count, True, True).double()
    expected[:, zero] = (k.view(view) * (g - sg.double().view(view) / count))[:, zero]
    _scaled_close(dy, expected, "dy with b = 0 in every third channel", 1e-5, 4.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(3, 70, 33, 35), (2, 1030, 9, 10)], ids=str)
def test_cpu_stage_kernels_give_the_same_bits_for_any_thread_count(layout, shape):
    # The summation order depends on the shape only (planes, chunks, partial sums, row blocks).
    y, z, dz, mean, invstd = _stage_inputs(shape, torch.float32, layout)
    count = float(y.numel() // shape[1])
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            stats = _ops.bn_stats(y)
            sums = _ops.bn_backward_reduce(dz, z, y, mean, invstd, True)
            dy = _ops.bn_backward_dy(dz, z, y, mean, invstd, None, *sums, count, True, True)
            results.append((*stats, *sums, dy))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# ---- upsample_cross_entropy on the CPU: no host read through an aten op, no conversion copy ---------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_upsample_cross_entropy_runs_only_its_allocations(reduction):
    # The backward reads grad and valid_count in place (no .item(), i.e. no _local_scalar_dense in the census) and
    # lse and a per-pixel grad in the logits' dtype (no conversion copy); the forward writes its scalars in place.
    from torch.profiler import ProfilerActivity, profile

    logits = torch.randn(2, 5, 7, 9)
    target = torch.randint(0, 5, (2, 25, 33))
    target[0, 3, 4] = 255
    loss, lse, valid = _ops.upsample_cross_entropy_forward(logits, target, 255, False, reduction)
    grad = torch.rand_like(loss)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _ops.upsample_cross_entropy_forward(logits, target, 255, False, reduction)
        _ops.upsample_cross_entropy_backward(grad, logits, target, lse, valid, 255, False, reduction)
    names = [e.name for e in prof.events() if e.name.startswith("aten::")]
    assert set(names) <= {"aten::empty", "aten::empty_like"}, names
    assert len(names) == 5, names  # forward: lse, valid_count, loss or total; backward: grad_logits (+ empty_like's)

    grad_logits = _ops.upsample_cross_entropy_backward(grad, logits, target, lse, valid, 255, False, reduction)
    expected_logits = logits.double().requires_grad_()
    expected = F.cross_entropy(F.interpolate(expected_logits, size=(25, 33), mode="bilinear", align_corners=False),
                               target, ignore_index=255, reduction=reduction)
    expected.backward(grad.double())
    assert valid.item() == target.ne(255).sum().item()
    _close(loss.double(), expected.detach(), "loss", 1e-5)
    _close(grad_logits.double(), expected_logits.grad, "grad_logits", 1e-5)
