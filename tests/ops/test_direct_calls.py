"""Direct torch.ops.deeplab_ops calls are checked in C++ with the front door's rules (docs/errors.md: "calls that
bypass the Python front door are checked again in C++"), and running statistics made under torch.inference_mode()
are updated outside it as eager F.batch_norm updates them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TRITON_DEVICE, triton_param

import deeplab_ops

ops = torch.ops.deeplab_ops
GEO = ([1, 1], [1, 1], [1, 1])


def _cbr_forward(x=None, weight=None, bn_weight="ones", bn_bias="zeros", running_mean="zeros", running_var="ones",
                 training=True, momentum=0.1, eps=1e-5):
    x = torch.randn(2, 3, 6, 6) if x is None else x
    weight = torch.randn(4, 3, 3, 3, dtype=x.dtype) if weight is None else weight
    defaults = {"ones": torch.ones(4), "zeros": torch.zeros(4)}
    vectors = [defaults[v] if isinstance(v, str) else v
               for v in (bn_weight, bn_bias, running_mean, running_var)]
    return ops.conv_bn_relu_forward(x, weight, *vectors, *GEO, training, momentum, eps, None, True)


def _aspp_args(dtype=torch.float32, c=3, cin=5, rates=(2, 5)):
    x = torch.randn(2, cin, 7, 6).to(dtype)
    cws = [torch.randn(c, cin, 1, 1).to(dtype)] + [torch.randn(c, cin, 3, 3).to(dtype) for _ in rates]
    k = (len(rates) + 3) * c
    return dict(x=x, conv_weights=cws, pool_weight=torch.randn(c, cin, 1, 1).to(dtype),
                project_weight=torch.randn(c, (len(rates) + 2) * c, 1, 1).to(dtype), bn_weight=torch.rand(k) + 0.5,
                bn_bias=torch.randn(k), running_mean=torch.zeros(k), running_var=torch.ones(k), rates=list(rates),
                training=True, momentum=0.1, eps=1e-5)


def _aspp_forward(**over):
    a = _aspp_args()
    a.update(over)
    return ops.aspp_forward(*a.values())


# ---- momentum and eps --------------------------------------------------------------------------------------------

BAD_MOMENTUM = [1.5, -0.1, math.nan, math.inf]
BAD_EPS = [0.0, -1e-5, math.nan, math.inf]


@pytest.mark.parametrize("momentum", BAD_MOMENTUM, ids=str)
def test_conv_bn_relu_forward_refuses_momentum_outside_0_1(momentum):
    with pytest.raises(RuntimeError, match=r"deeplab_ops: momentum must be a number in \[0, 1\], got"):
        _cbr_forward(momentum=momentum)
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):  # the front door's rule
        deeplab_ops.conv_bn_relu(torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), None, None, None, None,
                                 momentum=momentum, backend="cpu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("eps", BAD_EPS, ids=str)
def test_conv_bn_relu_forward_refuses_eps_not_finite_positive(eps, training):
    with pytest.raises(RuntimeError, match=r"deeplab_ops: eps must be a finite number > 0, got"):
        _cbr_forward(eps=eps, training=training)


@pytest.mark.parametrize("momentum, eps", [(1.5, 1e-5), (math.nan, 1e-5), (0.1, 0.0), (0.1, math.nan)], ids=str)
def test_aspp_forward_refuses_bad_momentum_and_eps(momentum, eps):
    with pytest.raises(RuntimeError, match=r"deeplab_ops: (momentum|eps) must be a"):
        _aspp_forward(momentum=momentum, eps=eps)


@pytest.mark.parametrize("momentum, eps", [(2.0, 1e-5), (math.nan, 1e-5), (0.1, -1.0), (0.1, math.nan)], ids=str)
def test_bn_finalize_refuses_bad_momentum_and_eps(momentum, eps):
    out = [torch.empty(3) for _ in range(4)]
    with pytest.raises(RuntimeError, match=r"deeplab_ops: (momentum|eps) must be a"):
        ops.bn_finalize(torch.zeros(3), torch.ones(3), None, 10.0, torch.zeros(3), torch.ones(3), momentum, eps, *out)


def test_the_boundary_values_pass():
    """momentum 0 and 1 (and a tiny eps) are valid, as at the front door."""
    for momentum in (0.0, 1.0):
        _cbr_forward(momentum=momentum, eps=1e-300)
        _aspp_forward(momentum=momentum)
    out = [torch.empty(3) for _ in range(4)]
    ops.bn_finalize(torch.zeros(3), torch.ones(3), None, 10.0, torch.zeros(3), torch.ones(3), 1.0, 1e-5, *out)


# ---- the BatchNorm tensors' dtypes -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bn_weight", "bn_bias", "running_mean", "running_var", "all"])
def test_conv_bn_relu_forward_refuses_float64_batchnorm_tensors_with_float32_x(which):
    names = ("bn_weight", "bn_bias", "running_mean", "running_var")
    over = {n: torch.zeros(4, dtype=torch.float64) for n in names if which in (n, "all")}
    if which == "running_mean":
        over["running_var"] = torch.ones(4, dtype=torch.float64)  # the pair in one dtype: only x's rule is broken
    first = next(n for n in names if n in over)
    with pytest.raises(RuntimeError, match=rf"deeplab_ops: {first} has dtype Double but x has dtype Float; "
                                           r"expected Float$"):
        _cbr_forward(**over)


def test_conv_bn_relu_forward_refuses_mixed_batchnorm_dtypes():
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="deeplab_ops: bn_bias has dtype BFloat16 but the other BatchNorm tensors "
                                           "have Float"):
        _cbr_forward(x=x, bn_bias=torch.zeros(4, dtype=torch.bfloat16))


def test_conv_bn_relu_forward_takes_float32_batchnorm_tensors_with_half_x():
    x = torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)
    out, _, _, _, new_rm, _ = _cbr_forward(x=x)
    assert out.dtype == torch.bfloat16 and new_rm.dtype == torch.float32
    _cbr_forward(x=x, **{n: torch.ones(4, dtype=torch.bfloat16)
                         for n in ("bn_weight", "bn_bias", "running_mean", "running_var")})


@pytest.mark.parametrize("which", ["bn_weight", "running_mean"])
def test_aspp_forward_refuses_float64_batchnorm_tensors_with_float32_x(which):
    over = {which: torch.zeros(15, dtype=torch.float64)}
    if which == "running_mean":
        over["running_var"] = torch.ones(15, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=rf"deeplab_ops: {which} has dtype Double but x has dtype Float"):
        _aspp_forward(**over)


def test_aspp_forward_refuses_mixed_batchnorm_dtypes():
    with pytest.raises(RuntimeError, match="deeplab_ops: running_mean has dtype BFloat16 but the other BatchNorm "
                                           "tensors have Float"):
        a = _aspp_args(dtype=torch.bfloat16)
        a["running_mean"] = a["running_mean"].bfloat16()
        ops.aspp_forward(*a.values())


def _cbr_backward(**over):
    torch.manual_seed(0)
    x, w = torch.randn(2, 4, 8, 8), torch.randn(6, 4, 3, 3)
    out, conv_out, mean, invstd, _, _ = ops.conv_bn_relu_forward(x, w, torch.ones(6), torch.zeros(6), None, None,
                                                                 *GEO, True, 0.1, 1e-5, None, True)
    a = dict(grad_out=torch.randn_like(out), x=x, weight=w, bn_weight=torch.ones(6), conv_out=conv_out, out=out,
             save_mean=mean, save_invstd=invstd, stride=[1, 1], padding=[1, 1], dilation=[1, 1], training=True,
             relu=True, output_mask=[True, True, True, True, False])
    a.update(over)
    return ops.conv_bn_relu_backward(*a.values())


@pytest.mark.parametrize("which", ["bn_weight", "save_mean", "save_invstd"])
def test_conv_bn_relu_backward_refuses_saved_tensors_of_another_dtype(which):
    with pytest.raises(RuntimeError, match=rf"deeplab_ops: {which} has dtype Double but x has dtype Float"):
        _cbr_backward(**{which: torch.ones(6, dtype=torch.float64)})
    _cbr_backward()  # the forward's own


def _aspp_saved():
    a = _aspp_args()
    out, branch, pool, proj, mean, invstd, _, _ = ops.aspp_forward(*a.values())
    return dict(grad_out=torch.randn_like(out), x=a["x"], conv_weights=a["conv_weights"],
                pool_weight=a["pool_weight"], project_weight=a["project_weight"], bn_weight=a["bn_weight"],
                bn_bias=a["bn_bias"], branch_out=branch, pool_out=pool, project_out=proj, out=out, save_mean=mean,
                save_invstd=invstd, rates=a["rates"], training=True, output_mask=[True, True, True])


@pytest.mark.parametrize("which", ["bn_weight", "save_mean"])
def test_aspp_backward_refuses_saved_tensors_of_another_dtype(which):
    b = _aspp_saved()
    ops.aspp_backward(*b.values())
    b[which] = b[which].double()
    with pytest.raises(RuntimeError, match=rf"deeplab_ops: {which} has dtype Double but x has dtype Float"):
        ops.aspp_backward(*b.values())


def test_aspp_forward_keeps_one_pre_bn_tensor_per_branch():
    """The composite's branch_out: one (N, C, H, W) tensor per conv branch, each the branch's convolution of x (no
    buffer joins them), in x's memory format."""
    for layout in (torch.contiguous_format, torch.channels_last):
        a = _aspp_args()
        a["x"] = a["x"].contiguous(memory_format=layout)
        branch = ops.aspp_forward(*a.values())[1]
        assert isinstance(branch, list) and len(branch) == 3
        for b, (t, w) in enumerate(zip(branch, a["conv_weights"], strict=True)):
            r = (1, *a["rates"])[b]
            want = torch.nn.functional.conv2d(a["x"], w, padding=0 if b == 0 else r, dilation=r)
            torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)
            assert t.is_contiguous(memory_format=layout), (b, t.stride())


@pytest.mark.parametrize("case", ["count", "shape", "dtype", "buffer"])
def test_aspp_backward_refuses_a_branch_out_not_the_forwards(case):
    """The composite backward reads branch_out per branch: a list of another length, or a tensor of another shape or
    dtype (a triton twin's one buffer among them), is refused naming it, never read out of bounds."""
    b = _aspp_saved()
    ops.aspp_backward(*b.values())
    branch = b["branch_out"]
    n, c, h, w = branch[0].shape
    b["branch_out"] = {"count": branch[:2], "shape": [branch[0], branch[1][:, :, :5], branch[2]],
                       "dtype": [branch[0], branch[1].double(), branch[2]],
                       "buffer": [torch.cat(branch, 1)]}[case]
    message = {"count": r"branch_out must hold 3 tensors .* got 2",
               "shape": rf"branch_out\[1\] must have shape \({n}, {c}, {h}, {w}\) \(the forward's\), "
                        rf"got \[{n}, {c}, 5, {w}\]",
               "dtype": r"branch_out\[1\] is Double on cpu but x is Float on cpu",
               "buffer": r"branch_out must hold 3 tensors .* got 1"}[case]
    with pytest.raises(RuntimeError, match=message):
        ops.aspp_backward(*b.values())


# ---- aspp_forward's x and weight messages ------------------------------------------------------------------------


def test_aspp_forward_refuses_an_integer_x_naming_it():
    a = _aspp_args()
    for k in ("x", "pool_weight", "project_weight"):
        a[k] = a[k].long()
    a["conv_weights"] = [w.long() for w in a["conv_weights"]]
    with pytest.raises(RuntimeError, match="deeplab_ops: x must be float16, bfloat16, float32 or float64, got Long"):
        ops.aspp_forward(*a.values())


def test_aspp_forward_names_the_conv_weight_of_another_dtype():
    a = _aspp_args()
    a["conv_weights"][1] = a["conv_weights"][1].double()
    with pytest.raises(RuntimeError, match=r"deeplab_ops: conv_weights\[1\] has dtype Double but x has dtype Float"):
        ops.aspp_forward(*a.values())


# ---- running statistics that are inference tensors ---------------------------------------------------------------
# A model built (or loaded) under torch.inference_mode() has inference-tensor buffers. Recalibrating its BatchNorm
# statistics outside inference mode with no graph (training=True under no_grad) works in eager: F.batch_norm writes
# them inside its kernel. With a graph, eager refuses them (inference tensors cannot be saved for backward).

BACKENDS = ["cpu", triton_param("triton", id="triton")]


def _inference(*tensors):
    with torch.inference_mode():
        return [t.clone() for t in tensors]


# no_tf32: float32 compared at 1e-4 (statistics 1e-5) with eager or the reference; on a GPU the triton backend and
# cuDNN would use TF32 by default, rounding each product's inputs differently (~1e-3).
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("grad_mode", [False, True], ids=["no_grad", "grad_mode_nothing_requires_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_relu_updates_inference_running_statistics_as_eager(backend, grad_mode):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 8, 8, device=dev), torch.randn(4, 3, 3, 3, device=dev)
    g, b = torch.rand(4, device=dev) + 0.5, torch.randn(4, device=dev)
    rm, rv = _inference(torch.randn(4, device=dev), torch.rand(4, device=dev) + 0.5)
    want_rm, want_rv = _inference(rm, rv)
    with torch.set_grad_enabled(grad_mode):
        want = F.relu(F.batch_norm(F.conv2d(x, w, padding=1), want_rm, want_rv, g, b, True, 0.1, 1e-5))
        out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=True, backend=backend)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rm, want_rm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv, want_rv, atol=1e-5, rtol=1e-5)
    assert rm.is_inference() and not torch.equal(rm, _inference(torch.zeros(4, device=dev))[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_bn_relu_refuses_inference_running_statistics_with_a_graph_as_eager(backend):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    x, w = torch.randn(2, 3, 8, 8, device=dev, requires_grad=True), torch.randn(4, 3, 3, 3, device=dev)
    rm, rv = _inference(torch.zeros(4, device=dev), torch.ones(4, device=dev))
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        F.batch_norm(F.conv2d(x, w, padding=1), rm, rv, None, None, True)
    with pytest.raises(RuntimeError, match="[Ii]nference tensor"):
        deeplab_ops.conv_bn_relu(x, w, None, None, rm, rv, padding=1, training=True, backend=backend)


# no_tf32: float32 compared at 1e-4 (statistics 1e-5) with eager or the reference; on a GPU the triton backend and
# cuDNN would use TF32 by default, rounding each product's inputs differently (~1e-3).
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("form", ["list", "packed_list", "tensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_aspp_updates_inference_running_statistics_as_the_reference(backend, form):
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    torch.manual_seed(0)
    c, cin, rates = 4, 3, (2,)
    nb = len(rates) + 3
    x = torch.randn(2, cin, 8, 8, device=dev)
    cws = [torch.randn(c, cin, 1, 1, device=dev)] + [torch.randn(c, cin, 3, 3, device=dev) for _ in rates]
    pw, pj = torch.randn(c, cin, 1, 1, device=dev), torch.randn(c, (len(rates) + 2) * c, 1, 1, device=dev)
    bw = [torch.rand(c, device=dev) + 0.5 for _ in range(nb)]
    bb = [torch.randn(c, device=dev) for _ in range(nb)]
    rm0, rv0 = torch.randn(nb * c, device=dev), torch.rand(nb * c, device=dev) + 0.5
    want_rm, want_rv = list(rm0.clone().chunk(nb)), list(rv0.clone().chunk(nb))
    with torch.no_grad():
        want = deeplab_ops.aspp(x, cws, pw, pj, bw, bb, want_rm, want_rv, rates=rates, backend="reference")
    whole_rm, whole_rv = _inference(rm0, rv0)  # inference tensors, as a model built under inference_mode keeps
    if form == "tensor":
        rm, rv = whole_rm, whole_rv
    elif form == "packed_list":  # back to back in one storage (what deeplab_ops.nn's fused ASPP keeps)
        rm, rv = list(whole_rm.chunk(nb)), list(whole_rv.chunk(nb))
    else:
        rm, rv = [_inference(t)[0] for t in rm0.chunk(nb)], [_inference(t)[0] for t in rv0.chunk(nb)]
    with torch.no_grad():
        out = deeplab_ops.aspp(x, cws, pw, pj, bw, bb, rm, rv, rates=rates, backend=backend)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    got_rm = rm if isinstance(rm, torch.Tensor) else torch.cat(rm)
    got_rv = rv if isinstance(rv, torch.Tensor) else torch.cat(rv)
    torch.testing.assert_close(got_rm, torch.cat(want_rm), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_rv, torch.cat(want_rv), atol=1e-5, rtol=1e-5)
