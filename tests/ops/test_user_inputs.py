"""Inputs a user may pass to the three public ops that once gave a wrong result or an unhelpful error: each test
is the regression test of one defect found by fuzzing the ops against eager PyTorch (valid inputs) and with bad
inputs (a clear exception naming the argument)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import backend_param, device_for

import deeplab_ops
from deeplab_ops import common

BACKENDS = ["reference", "cpu", backend_param("triton")]


def _cbr_args(device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, device=device, dtype=dtype)
    w = torch.randn(4, 3, 3, 3, device=device, dtype=dtype) * 0.3
    g = torch.rand(4, device=device, dtype=dtype) + 0.5
    b = torch.randn(4, device=device, dtype=dtype)
    return x, w, g, b, torch.zeros(4, device=device, dtype=dtype), torch.ones(4, device=device, dtype=dtype)


def _aspp_args(device="cpu", rates=(1, 2), cin=3, c=4):
    torch.manual_seed(0)
    nb = len(rates) + 3
    return dict(
        x=torch.randn(2, cin, 5, 6, device=device),
        conv_weights=[torch.randn(c, cin, 1, 1, device=device)]
        + [torch.randn(c, cin, 3, 3, device=device) for _ in rates],
        pool_weight=torch.randn(c, cin, 1, 1, device=device),
        project_weight=torch.randn(c, (len(rates) + 2) * c, 1, 1, device=device),
        bn_weights=[torch.rand(c, device=device) + 0.5 for _ in range(nb)],
        bn_biases=[torch.randn(c, device=device) for _ in range(nb)],
        running_means=[torch.zeros(c, device=device) for _ in range(nb)],
        running_vars=[torch.ones(c, device=device) for _ in range(nb)],
    )


# ---- upsample_cross_entropy: huge float32 logits -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", backend_param("cuda"), backend_param("triton")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_uce_gradient_finite_at_huge_float32_logits(backend, reduction):
    # The cpu backward rebuilt each pixel's logsumexp from the forward's float32 copy of it (off by |max| * 2^-24)
    # and took exp(z - lse) of its double z: beyond logits of about 1e9 every exp overflowed or underflowed, and the
    # gradient was NaN where eager's is finite. On a GPU (H200) the triton backward's z, its products contracted
    # into FMAs unlike the forward's, came out above the saved maximum: an infinite gradient at 1e20. The loss and
    # the gradient must match eager's.
    device = device_for(backend)
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 9, 11), device=device)
    for scale in (1e9, 1e20):
        logits = torch.randn(2, 3, 4, 5, device=device) * scale
        ours = logits.clone().requires_grad_()
        loss = deeplab_ops.upsample_cross_entropy(ours, target, reduction=reduction, backend=backend)
        loss.sum().backward()
        eager = logits.clone().requires_grad_()
        want = F.cross_entropy(F.interpolate(eager, (9, 11), mode="bilinear"), target, reduction=reduction)
        want.sum().backward()
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=scale * 1e-6)  # cancellation in lse - z
        assert not ours.grad.isnan().any(), f"scale {scale}: NaN gradient"
        torch.testing.assert_close(ours.grad, eager.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", backend_param("cuda"), backend_param("triton")])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_uce_non_finite_logits_poison_the_gradient_as_eager(backend, reduction):
    # A -inf, +inf or NaN logit makes its interpolated neighbours NaN (0 * inf in the stencil), ignored pixels
    # included; eager's log_softmax and upsample backward carry that NaN to every logit of the stencils (0 * NaN),
    # ignored pixels and weight-0 neighbours too. The triton and CUDA backwards skipped weight-0 neighbours and
    # ignored pixels: finite gradients where eager's are NaN.
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
        logits[0, 1, 1, 1], logits[1, 2, 3, 4], logits[1, 0, 0, 2] = float("-inf"), float("inf"), float("nan")
        target = torch.randint(0, 3, (2, 8, 9), generator=g)
        target[torch.rand(2, 8, 9, generator=g) < 0.4] = 255
        _assert_non_finite_as_eager(logits, target, backend, reduction, "")


@pytest.mark.parametrize("backend", ["cpu", backend_param("cuda"), backend_param("triton")])
@pytest.mark.parametrize("size", [(4, 5), (4, 10), (8, 5)])
def test_uce_non_finite_logits_at_an_axis_of_equal_sizes_as_eager(backend, size):
    # PyTorch's CPU upsample reads an axis whose sizes are equal one to one (both neighbours the output's own index);
    # the kernels read the next index with weight 0 there too, as CUDA's does: a non-finite logit of a target the
    # logits' size spread its NaN to neighbouring pixels' losses on the cpu backend (and triton on CPU tensors),
    # where eager's stayed at its pixel. Each backend follows the eager rule of its tensors' device.
    g = torch.Generator().manual_seed(5)
    for value in (float("nan"), float("inf"), float("-inf")):
        logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
        logits[0, 2, 1, 1] = logits[1, 0, 3, 4] = value
        target = torch.randint(0, 3, (2, *size), generator=g)
        _assert_non_finite_as_eager(logits, target, backend, "none", f"{value}, ")


def test_uce_cpu_backward_adds_both_terms_of_a_row_read_twice_as_eager():
    # Where an output row's two neighbours are one low-res row (every row of an axis of equal sizes on the CPU rule,
    # the last row otherwise) the cpu backward weighted it once by l0 + l1: an infinite grad_output entry gave inf
    # there, where eager's upsample backward adds l0 * g and l1 * g, 1 * inf + 0 * inf = NaN.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 4, 5, generator=g, dtype=torch.float64)
    for size in ((4, 9), (8, 9)):
        target = torch.randint(0, 3, (1, *size), generator=g)
        go = torch.ones(1, *size, dtype=torch.float64)
        go[0, 1, 3] = go[0, size[0] - 1, 8] = float("inf")
        grads = []
        for backend in ("eager", "cpu"):
            x = logits.clone().requires_grad_()
            if backend == "eager":
                loss = F.cross_entropy(F.interpolate(x, size, mode="bilinear"), target, reduction="none")
            else:
                loss = deeplab_ops.upsample_cross_entropy(x, target, reduction="none", backend=backend)
            loss.backward(go)
            grads.append(x.grad)
        assert torch.equal(grads[1].isnan(), grads[0].isnan()), f"{size}: NaN at other places than eager's"
        assert torch.equal(grads[1].isinf(), grads[0].isinf()), f"{size}: inf at other places than eager's"
        finite = grads[0].isfinite()
        torch.testing.assert_close(grads[1][finite], grads[0][finite], rtol=1e-9, atol=1e-12)


def _assert_non_finite_as_eager(logits, target, backend: str, reduction: str, what: str) -> None:
    """upsample_cross_entropy's loss and logits gradient on `backend` against eager's: non-finite at the same places,
    close elsewhere."""
    device = device_for(backend)
    grads, losses = [], []
    for name in ("eager", backend):
        x = logits.clone().to(device).requires_grad_()
        t = target.to(device)
        if name == "eager":
            loss = F.cross_entropy(F.interpolate(x, tuple(target.shape[1:]), mode="bilinear"), t,
                                   reduction=reduction, ignore_index=255)
        else:
            loss = deeplab_ops.upsample_cross_entropy(x, t, reduction=reduction, backend=backend)
        loss.sum().backward()
        grads.append(x.grad.cpu())
        losses.append(loss.detach().cpu())
    for kind, ours, want in (("gradient", grads[1], grads[0]), ("loss", losses[1], losses[0])):
        assert torch.equal(ours.isnan(), want.isnan()), f"{what}{kind}: NaN at other places than eager's"
        assert torch.equal(ours.isinf(), want.isinf()), f"{what}{kind}: inf at other places than eager's"
        finite = want.isfinite()
        torch.testing.assert_close(ours[finite], want[finite], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_eps_below_float32s_range_leaves_a_constant_channel_finite_as_eager(backend):
    # eps is any finite number > 0. The triton backend's float32 kernels rounded 1e-50 to 0: a channel of zero
    # variance (a constant input) was 0 * inf = NaN, where eager and the cpu backend (float64 finalize) give beta.
    device = device_for(backend)
    x = torch.full((2, 3, 6, 6), 0.7, device=device)
    w = (torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) / 5).to(device)
    g, b = torch.ones(4, device=device), torch.full((4,), 0.1, device=device)
    # (Only finiteness is comparable: y - mean is the rounding error of the mean, times 1/sqrt(eps). Below about
    # 8.6e-78 eager's float32 invstd, 1/sqrt(eps), is infinite: non-finite there as eager is.)
    for eps, finite in ((1e-30, True), (1e-50, True), (1e-70, True), (1e-80, False), (1e-200, False)):
        rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
        want = F.relu(F.batch_norm(F.conv2d(x, w), rm.clone(), rv.clone(), g, b, True, 0.1, eps))
        out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, eps=eps, training=True, backend=backend)
        assert bool(want.isfinite().all()) == bool(out.isfinite().all()) == finite, f"eps={eps}: finite as eager?"
        assert rv.isfinite().all() and torch.equal(rv, torch.full_like(rv, 0.9)), f"eps={eps}: running_var"


# ---- upsample_cross_entropy: a target that is a tensor subclass ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_uce_subclass_target_is_checked_and_computed_as_a_tensor(backend):
    # torchvision.transforms.v2 pipelines yield tv_tensors.Mask targets (a torch.Tensor subclass). The label scan
    # skipped them, and the triton backend, told its arguments were checked, returned a NaN loss for a bad label
    # (the reference raised F.cross_entropy's message instead of the package's).
    from torchvision import tv_tensors

    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    target = torch.randint(0, 3, (2, 7, 9), generator=g)
    target[1, 2, 3] = 255
    loss = deeplab_ops.upsample_cross_entropy(logits, tv_tensors.Mask(target.to(device)), backend=backend)
    want = F.cross_entropy(F.interpolate(logits, (7, 9), mode="bilinear"), target.to(device), ignore_index=255)
    torch.testing.assert_close(loss.as_subclass(torch.Tensor), want)
    target[0, 0, 0] = 9
    if device == "cpu":
        with pytest.raises(IndexError,
                           match=r"target has label 9 at position \(0, 0, 0\); expected labels in \[0, 3\)"):
            deeplab_ops.upsample_cross_entropy(logits, tv_tensors.Mask(target.to(device)), backend=backend)
    else:  # CUDA tensors: the kernel decides, without a host synchronization: a NaN loss (the op's docstring)
        loss = deeplab_ops.upsample_cross_entropy(logits, tv_tensors.Mask(target.to(device)), backend=backend)
        assert loss.isnan().item(), loss


# ---- running statistics that require grad ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("which", ["running_mean", "running_var"])
def test_cbr_running_stats_requiring_grad_refused_like_eager(backend, training, which):
    # F.batch_norm refuses running statistics that require grad while a graph is built; the cpu and triton backends
    # took them and updated them in place behind autograd's back (the reference raised aten's own error).
    x, w, g, b, rm, rv = _cbr_args(device_for(backend))
    stats = {"running_mean": rm, "running_var": rv}
    stats[which].requires_grad_()
    with pytest.raises(ValueError, match=rf"{which} requires grad, but running statistics are buffers"):
        deeplab_ops.conv_bn_relu(x, w, g, b, stats["running_mean"], stats["running_var"], training=training,
                                 backend=backend)


# no_tf32: compared with eager at float32's default tolerance; on a GPU triton and cuDNN would use TF32 by default.
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cbr_running_stats_requiring_grad_accepted_without_grad_mode(backend):
    # ... and, as F.batch_norm, accepted under torch.no_grad(), with the same values and update.
    x, w, g, b, rm, rv = _cbr_args(device_for(backend))
    rm.requires_grad_()
    rv.requires_grad_()
    rm2, rv2 = rm.detach().clone(), rv.detach().clone()
    with torch.no_grad():
        out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=True, backend=backend)
        want = F.relu(F.batch_norm(F.conv2d(x, w, padding=1), rm2, rv2, g, b, True, 0.1, 1e-5))
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(rm.detach(), rm2)
    torch.testing.assert_close(rv.detach(), rv2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("flat", [False, True])
def test_aspp_running_stats_requiring_grad_refused(backend, flat):
    a = _aspp_args(device_for(backend))
    if flat:
        a["running_vars"] = torch.cat(a["running_vars"]).requires_grad_()
        where = "running_vars"
    else:
        a["running_means"][2].requires_grad_()
        where = r"running_means\[2\]"
    with pytest.raises(ValueError, match=rf"{where} requires grad, but running statistics are buffers"):
        deeplab_ops.aspp(**a, rates=(1, 2), training=True, backend=backend)
    with torch.no_grad():  # F.batch_norm's rule: no graph, nothing refused
        deeplab_ops.aspp(**a, rates=(1, 2), training=True, backend=backend)


# ---- running statistics that share memory ---------------------------------------------------------------------


@pytest.mark.usefixtures("no_tf32")  # float32 tolerances: cuDNN's TF32 default off on a GPU
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["expanded-mean", "expanded-var", "overlapping", "same-tensor"])
def test_cbr_running_stats_sharing_memory_refused_in_training(backend, case):
    # The training update writes one value per channel: an expanded view (one element for every channel) or two
    # statistics in one memory cannot hold it. Eager takes some of them and writes whatever the last write leaves;
    # the cpu backend failed in copy_ with an error naming neither. Eval only reads them: accepted there.
    x, w, g, b, rm, rv = _cbr_args(device_for(backend))
    buf = torch.ones(6, device=x.device)
    rm, rv, name = {"expanded-mean": (torch.zeros(1, device=x.device).expand(4), rv, "running_mean has overlapping"),
                    "expanded-var": (rm, torch.ones(1, device=x.device).expand(4), "running_var has overlapping"),
                    "overlapping": (buf[0:4], buf[2:6], "running_mean and running_var share memory"),
                    "same-tensor": (rv, rv, "running_mean and running_var share memory")}[case]
    with pytest.raises(ValueError, match=name):
        deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=True, backend=backend)
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv.abs() + 1, padding=1, training=False, backend=backend)
    want = F.relu(F.batch_norm(F.conv2d(x, w, padding=1), rm, rv.abs() + 1, g, b, False, 0.1, 1e-5))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton")])
def test_cbr_expanded_running_stat_refused_by_name_under_torch_compile(backend):
    # A review found a speed-up of the check skipping it whole while torch.compile traces: the expanded view then
    # failed deep in aten's copy_ with an error naming no argument. The stride test runs on fake tensors too.
    x, w, g, b, _, rv = _cbr_args(device_for(backend))
    rm = torch.zeros(1, device=x.device).expand(4)

    def step(x, rm, rv):
        return deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=True, backend=backend)

    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"running_mean has overlapping memory \(stride 0 over 4 values"):
        torch.compile(step, backend="aot_eager", fullgraph=True)(x, rm, rv)


@pytest.mark.usefixtures("no_tf32")  # float32 tolerances: cuDNN's TF32 default off on a GPU
@pytest.mark.parametrize("backend", BACKENDS)
def test_cbr_interleaved_running_stats_are_updated_like_eager(backend):
    # Two statistics interleaved in one buffer (mean at even, var at odd elements) share an address range but no
    # element: taken, and updated as eager updates its own copies.
    x, w, g, b, rm, rv = _cbr_args(device_for(backend))
    buf = torch.stack([rm, rv], dim=1).flatten()
    ours_m, ours_v = buf[0::2], buf[1::2]
    out = deeplab_ops.conv_bn_relu(x, w, g, b, ours_m, ours_v, padding=1, training=True, backend=backend)
    want = F.relu(F.batch_norm(F.conv2d(x, w, padding=1), rm, rv, g, b, True, 0.1, 1e-5))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours_m, rm)
    torch.testing.assert_close(ours_v, rv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aspp_running_stats_sharing_memory_refused_in_training(backend):
    a = _aspp_args(device_for(backend))
    a["running_vars"][3] = a["running_means"][1]
    with pytest.raises(ValueError, match=r"running_means\[1\] and running_vars\[3\] share memory"):
        deeplab_ops.aspp(**a, rates=(1, 2), training=True, backend=backend)
    a = _aspp_args(device_for(backend))
    a["running_means"] = torch.zeros(1, device=a["x"].device).expand(20)
    with pytest.raises(ValueError, match=r"running_means has overlapping memory \(stride 0 over 20 values"):
        deeplab_ops.aspp(**a, rates=(1, 2), training=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["weight-is-var", "bias-is-mean", "weight-overlaps-mean", "weight-below-mean"])
def test_cbr_bn_parameters_sharing_memory_with_running_stats_refused_in_training(backend, case):
    # Eager's F.batch_norm updates the running statistics before it reads weight and bias, so a bn_weight that is
    # running_var normalizes with the new variance; the cpu and triton kernels read it before the update: their
    # output differed from eager's (by 7.75 in float64) with no error. Refused; weight and bias may share memory
    # with each other (one flat buffer), and eval (nothing written) takes them.
    x, w, g, b, rm, rv = _cbr_args(device_for(backend))
    buf = torch.rand(6, device=x.device) + 0.5
    g, b, rm, rv, name = {"weight-is-var": (rv, b, rm, rv, "running_var and bn_weight share memory"),
                          "bias-is-mean": (g, rm, rm, rv, "running_mean and bn_bias share memory"),
                          "weight-overlaps-mean": (buf[2:6], b, buf[0:4], rv, "running_mean and bn_weight share"),
                          "weight-below-mean": (buf[0:4], b, buf[2:6], rv, "bn_weight and running_mean share")}[case]
    # the advice copies the tensor read, never the statistic (a copy of that would miss its update): it said
    # "running_mean.clone()" where bn_weight lay below running_mean in memory
    read = "bn_bias" if case == "bias-is-mean" else "bn_weight"
    with pytest.raises(ValueError, match=name + rf".*updates running_(mean|var) in place while it reads {read} .*"
                                              rf"e\.g\. {read}\.clone\(\)"):
        deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=True, backend=backend)
    flat = torch.rand(8, device=x.device) + 0.5  # bn_weight and bn_bias in one buffer: fine
    rm, rv = torch.zeros(4, device=x.device), torch.ones(4, device=x.device)
    out = deeplab_ops.conv_bn_relu(x, w, flat[:4], flat[4:], rm, rv, padding=1, training=True, backend=backend)
    want_rm, want_rv = torch.zeros(4, device=x.device), torch.ones(4, device=x.device)
    want = F.relu(F.batch_norm(F.conv2d(x, w, padding=1), want_rm, want_rv, flat[:4], flat[4:], True, 0.1, 1e-5))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm, want_rm)
    torch.testing.assert_close(rv, want_rv)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aspp_bn_parameters_sharing_memory_with_running_stats_refused_in_training(backend):
    a = _aspp_args(device_for(backend))
    a["bn_weights"][2] = a["running_vars"][2]
    with pytest.raises(ValueError, match=r"running_vars\[2\] and bn_weights\[2\] share memory, but training "
                                         r"BatchNorm updates running_vars\[2\] in place while it reads"):
        deeplab_ops.aspp(**a, rates=(1, 2), training=True, backend=backend)
    deeplab_ops.aspp(**a, rates=(1, 2), training=False, backend=backend)  # eval only reads them


def test_running_stats_overlapping_past_a_neighbour_between_them_are_refused():
    # Three interleaved strided views of one buffer: the first and third share elements 4 and 8, the second (between
    # them by address) shares none with either. Only neighbours were compared: no error, the aliased values were
    # overwritten by the training update.
    from deeplab_ops.common import check_running_writable

    big = torch.zeros(64)
    first, between, third = big[0:16:4], big[1:17:4], big[4:12:2]
    with pytest.raises(ValueError, match=r"running_means\[0\] and running_vars\[1\] share memory"):
        check_running_writable((("running_means", [first, torch.zeros(4)]), ("running_vars", [between, third])))
    check_running_writable((("running_means", [first]), ("running_vars", [between])))  # interleaved, disjoint: fine


# ---- non-strided tensors --------------------------------------------------------------------------------------


_SPARSE_CBR = [("x", 0), ("weight", 1), ("bn_weight", 2), ("bn_bias", 3), ("running_mean", 4), ("running_var", 5),
               ("residual", None)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,index", _SPARSE_CBR, ids=[n for n, _ in _SPARSE_CBR])
@pytest.mark.parametrize("training", [True, False])
def test_cbr_sparse_tensor_refused_by_name(backend, name, index, training):
    # A sparse (or mkldnn) tensor reached the dispatcher ("Could not run 'deeplab_ops::conv_bn_relu_forward' with
    # arguments from the 'SparseCPU' backend"), or aten's errors on the reference.
    args = list(_cbr_args(device_for(backend)))
    residual = None
    if index is None:
        residual = torch.randn(2, 4, 6, 5).to_sparse().to(args[0].device)
    else:
        args[index] = args[index].to_sparse()
    with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        with torch.no_grad():
            deeplab_ops.conv_bn_relu(*args, padding=1, training=training, residual=residual, backend=backend)


def test_cbr_sparse_x_refused_on_the_eval_fast_path():
    x, w, g, b, rm, rv = _cbr_args()
    w, g, b = (torch.nn.Parameter(t) for t in (w, g, b))
    with torch.no_grad():
        deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, training=False)  # caches the fold
        with pytest.raises(TypeError, match=r"^x must be a dense \(strided\) tensor, got layout torch._mkldnn"):
            deeplab_ops.conv_bn_relu(x.to_mkldnn(), w, g, b, rm, rv, training=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["x", "conv_weights[1]", "pool_weight", "project_weight", "bn_weights[0]",
                                  "bn_biases", "running_vars[4]"])
def test_aspp_sparse_tensor_refused_by_name(backend, name):
    a = _aspp_args(device_for(backend))
    if name == "bn_biases":
        a["bn_biases"] = torch.cat(a["bn_biases"]).to_sparse()
    elif "[" in name:
        key, i = name[:-1].split("[")
        a[key][int(i)] = a[key][int(i)].to_sparse()
    else:
        a[name] = a[name].to_sparse()
    escaped = name.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(TypeError, match=rf"^{escaped} must be a dense \(strided\) tensor, got layout "
                                        r"torch.sparse_coo"):
        deeplab_ops.aspp(**a, rates=(1, 2), training=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["logits", "target"])
def test_uce_sparse_tensor_refused_by_name(backend, name):
    # The triton and reference backends' label scan failed in numpy ("can't convert Sparse layout tensor to numpy"),
    # the cpu backend in the dispatcher.
    device = device_for(backend)
    args = {"logits": torch.randn(2, 3, 4, 5, device=device),
            "target": torch.randint(0, 3, (2, 9, 11), device=device)}
    args[name] = args[name].to_sparse()
    with pytest.raises(TypeError, match=rf"^{name} must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        deeplab_ops.upsample_cross_entropy(args["logits"], args["target"], backend=backend)


# ---- the triton twins called directly, in the interpreter ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["conv_bn_relu", "conv_bias_act", "aspp", "upsample_cross_entropy"])
def test_triton_twin_refuses_half_cpu_tensors_in_the_interpreter(op, dtype, monkeypatch):
    # The front doors refuse bfloat16 CPU tensors on the triton backend (the interpreter stores bfloat16 as raw bits;
    # float16 before Triton 3.6, whose interpreters were not checked); torch.ops.deeplab_ops.triton_* called directly
    # ran them: triton_conv_bn_relu_forward's output was off by 2 in bfloat16. The refusal comes before any kernel,
    # so it is checked with the interpreter's device rule on every machine (a GPU machine leaves the interpreter
    # off). float16 on a Triton that runs it: refused the same way with an older version given.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if dtype == torch.float16:
        monkeypatch.setattr(common, "_triton_version", lambda: (3, 5))
    ops = torch.ops.deeplab_ops
    x, w = torch.randn(2, 3, 6, 6, dtype=dtype), torch.randn(4, 3, 3, 3, dtype=dtype)
    one = [1, 1]
    calls = {
        "conv_bn_relu": lambda: ops.triton_conv_bn_relu_forward(x, w, None, None, None, None, one, one, one, True,
                                                                0.1, 1e-5, None, True),
        "conv_bias_act": lambda: ops.triton_conv_bias_act(x, w, None, None, one, one, one, True),
        "aspp": lambda: ops.triton_aspp_forward(x, [w[:, :, :1, :1], w], w[:, :, :1, :1],
                                                torch.randn(4, 12, 1, 1, dtype=dtype), torch.ones(16),
                                                torch.zeros(16), None, None, [1], True, 0.1, 1e-5),
        "upsample_cross_entropy": lambda: ops.triton_upsample_cross_entropy_forward(
            x, torch.randint(0, 3, (2, 9, 11)), 255, False, "mean"),
    }
    expected = ("the Triton interpreter stores bfloat16 as raw bits" if dtype == torch.bfloat16 else
                "the Triton interpreter runs float16 from Triton 3.6 \\(this is 3.5\\)")
    with pytest.raises(RuntimeError, match=rf"triton_{op}\w*: {expected}"):
        calls[op]()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_empty_map_is_refused_but_in_an_empty_batch(backend):
    # x of H = 0 with padding passed the front door: triton computed a map of zeros and updated the running statistics
    # from no value; cpu and reference raised aten's own error. Eager refuses it, but for an empty batch, which it
    # computes (an empty output of the padded size), as the op's empty-batch path does.
    device = device_for(backend)
    w = torch.randn(4, 3, 1, 1, device=device)
    rm, rv = torch.full((4,), 0.5, device=device), torch.full((4,), 2.0, device=device)
    with pytest.raises(ValueError, match=r"x has an empty spatial size \(shape \(2, 3, 0, 5\)\); expected H >= 1"):
        deeplab_ops.conv_bn_relu(torch.randn(2, 3, 0, 5, device=device), w, None, None, rm, rv, padding=1,
                                 training=True, backend=backend)
    assert rm.eq(0.5).all() and rv.eq(2.0).all()
    x = torch.randn(0, 3, 0, 5, device=device, requires_grad=True)
    out = deeplab_ops.conv_bn_relu(x, w, None, None, rm, rv, padding=1, training=True, backend=backend)
    assert out.shape == F.conv2d(x.detach(), w, padding=1).shape == (0, 4, 2, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape and rm.eq(0.5).all() and rv.eq(2.0).all()
