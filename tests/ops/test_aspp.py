"""The fused ASPP op and FusedASPP against torchvision's ASPP and the reference: forward, every gradient and
the running statistics, training and eval; gradcheck; opcheck; the batch-1 error."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, assert_module_matches, backend_param, cuda_test, device_for
from torchvision.models.segmentation.deeplabv3 import ASPP

import deeplab_ops
from deeplab_ops import reference
from deeplab_ops.nn import FusedASPP

ops = torch.ops.deeplab_ops


def _randomize(module: torch.nn.Module) -> None:
    """Random weights and BN statistics: never test on the default ones and zeros."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "weight" in name and p.dim() == 4 else 1.0))
            if p.dim() == 1 and name.endswith("weight"):
                p.abs_().add_(0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)


def _pair(cin, rates, cout, dtype=torch.float32, backend=None):
    tv = ASPP(cin, rates, cout).to(dtype)
    tv.project[3].p = 0.0  # dropout compared separately: torchvision's is fixed at 0.5
    _randomize(tv)
    fused = FusedASPP(cin, rates, cout, backend=backend).to(dtype)
    fused.load_state_dict(tv.state_dict())
    return tv, fused


@pytest.mark.parametrize("size", [33, 17, 9])
@pytest.mark.parametrize("rates", [(6, 12, 18), (12, 24, 36)], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torchvision_aspp(size, rates, training):
    cin, cout = 8, 4
    tv, fused = _pair(cin, rates, cout)
    tv.train(training)
    fused.train(training)
    channels_last = size == 17
    x = torch.randn(2, cin, size, size + 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = assert_module_matches(fused, tv, x, f"rates {rates} at {size}x{size + 2} {'train' if training else 'eval'}")
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _functional_inputs(n=2, cin=5, c=3, h=7, w=6, rates=(2, 5), dtype=torch.float64, device="cpu"):
    g = dict(dtype=dtype, device=device)
    x = torch.randn(n, cin, h, w, **g)
    conv_ws = [torch.randn(c, cin, 1, 1, **g)] + [torch.randn(c, cin, 3, 3, **g) for _ in rates]
    pool_w = torch.randn(c, cin, 1, 1, **g)
    proj_w = torch.randn(c, (len(rates) + 2) * c, 1, 1, **g) / 3
    nb = len(rates) + 3
    bws = [torch.rand(c, **g) + 0.5 for _ in range(nb)]
    bbs = [torch.randn(c, **g) for _ in range(nb)]
    rms = [torch.randn(c, **g) * 0.1 for _ in range(nb)]
    rvs = [torch.rand(c, **g) + 0.5 for _ in range(nb)]
    return x, conv_ws, pool_w, proj_w, bws, bbs, rms, rvs, rates


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_functional_matches_reference_float64(training):
    x, cws, pw, prw, bws, bbs, rms, rvs, rates = _functional_inputs()
    leaves = [x, *cws, pw, prw, *bws, *bbs]
    for t in leaves:
        t.requires_grad_()
    rm_ref, rv_ref = [t.clone() for t in rms], [t.clone() for t in rvs]
    out = deeplab_ops.aspp(x, cws, pw, prw, bws, bbs, rms, rvs, rates=rates, training=training, backend="cpu")
    exp = reference.aspp(x, cws, pw, prw, bws, bbs, rm_ref, rv_ref, rates=rates, training=training)
    assert_close(out, exp, "output", 1e-10, 1e-10)
    for i, (a, b) in enumerate(zip(rms + rvs, rm_ref + rv_ref, strict=True)):
        assert_close(a, b, f"running stat {i}", 1e-10, 1e-10)
    grad = torch.randn_like(out)
    for i, (a, b) in enumerate(zip(torch.autograd.grad(out, leaves, grad), torch.autograd.grad(exp, leaves, grad),
                                   strict=True)):
        assert_close(a, b, f"grad of input {i}", 1e-9, 1e-9)


@pytest.mark.parametrize("backend", [backend_param(b) for b in ("cpu", "reference", "triton")])
@pytest.mark.parametrize("forms", ["LLLT", "LLTL", "TTLT", "TLTL", "TTTT"])
def test_each_bn_argument_may_be_a_list_or_one_tensor(backend, forms):
    """bn_weights, bn_biases, running_means, running_vars: each independently a list (one tensor per BatchNorm) or
    one concatenated tensor (L / T in that order): the same output, gradients and running statistics as all lists,
    the caller's tensors updated in place in whichever form it gave them."""
    device = device_for(backend)
    dtype = torch.float64 if backend != "triton" else torch.float32
    x, cws, pw, prw, bws, bbs, rms, rvs, rates = _functional_inputs(dtype=dtype, device=device)
    want_rm, want_rv = [t.clone() for t in rms], [t.clone() for t in rvs]
    want = deeplab_ops.aspp(x, cws, pw, prw, bws, bbs, want_rm, want_rv, rates=rates, training=True, backend=backend)

    def form(parts, letter, grad=False):
        t = torch.cat([p.detach() for p in parts]) if letter == "T" else [p.detach().clone() for p in parts]
        if grad:
            for leaf in [t] if letter == "T" else t:
                leaf.requires_grad_()
        return t

    bw, bb, rm, rv = (form(p, f, grad=i < 2) for i, (p, f) in enumerate(zip((bws, bbs, rms, rvs), forms, strict=True)))
    out = deeplab_ops.aspp(x, cws, pw, prw, bw, bb, rm, rv, rates=rates, training=True, backend=backend)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert_close(out, want, f"output ({forms})", tol, tol)
    for name, got, exp in (("running_means", rm, want_rm), ("running_vars", rv, want_rv)):
        assert_close(got if isinstance(got, torch.Tensor) else torch.cat(got), torch.cat(exp), f"{name} ({forms})",
                     tol, tol)
    grad = torch.randn_like(out)
    leaves = [t for p in (bw, bb) for t in ([p] if isinstance(p, torch.Tensor) else p)]
    got = torch.cat([g.flatten() for g in torch.autograd.grad(out, leaves, grad)])
    ref_leaves = [t.detach().clone().requires_grad_() for t in (*bws, *bbs)]
    ref = deeplab_ops.aspp(x, cws, pw, prw, ref_leaves[:len(bws)], ref_leaves[len(bws):], None, None, rates=rates,
                           training=True, backend=backend)
    assert_close(got, torch.cat([g.flatten() for g in torch.autograd.grad(ref, ref_leaves, grad)]),
                 f"BatchNorm gradients ({forms})", tol * 10, tol * 10)


@pytest.mark.parametrize("backend", [backend_param(b) for b in ("cpu", "reference", "triton")])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_keeps_the_input_memory_format_on_every_backend(backend, training):
    # The reference returned NCHW for a channels_last x (its upsampled pooling branch, from a 1x1 map, made the
    # concatenation NCHW) while cpu and triton return channels_last, as docs/ops.md says.
    device = device_for(backend)
    torch.manual_seed(0)
    module = FusedASPP(3, (1, 2), 4, backend=backend).to(device).train(training)
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 3, 5, 6, device=device).contiguous(memory_format=fmt)
        with torch.no_grad():
            out = module(x)
        assert out.is_contiguous(memory_format=fmt), (fmt, out.stride())
        # a view of a larger map, in its layout (not one dense block): its layout still decides
        view = torch.randn(2, 3, 5, 9, device=device).contiguous(memory_format=fmt)[:, :, :, 1:7]
        with torch.no_grad():
            out = module(view)
        assert out.is_contiguous(memory_format=fmt), ("view", fmt, out.stride())


def test_gradcheck_float64():
    x, cws, pw, prw, bws, bbs, rms, rvs, rates = _functional_inputs(n=2, cin=3, c=2, h=5, w=4, rates=(1, 3))
    leaves = [x, *cws, pw, prw, *bws, *bbs]
    nc, nb = len(cws), len(bws)

    def f(x, *rest):
        cws_, (pw_, prw_), bws_, bbs_ = rest[:nc], rest[nc:nc + 2], rest[nc + 2:nc + 2 + nb], rest[nc + 2 + nb:]
        return deeplab_ops.aspp(x, list(cws_), pw_, prw_, list(bws_), list(bbs_), None, None, rates=rates,
                                backend="cpu")

    assert torch.autograd.gradcheck(f, [t.requires_grad_() for t in leaves])


def test_opcheck():
    x, cws, pw, prw, bws, bbs, rms, rvs, rates = _functional_inputs(dtype=torch.float32)
    for t in [x, *cws, pw, prw]:
        t.requires_grad_()
    bw, bb = torch.cat(bws).requires_grad_(), torch.cat(bbs).requires_grad_()
    for training in (True, False):
        args = (x, cws, pw, prw, bw, bb, torch.cat(rms), torch.cat(rvs), list(rates), training, 0.1, 1e-5)
        torch.library.opcheck(ops.aspp_forward.default, args)
    fwd = ops.aspp_forward(x.detach(), [w.detach() for w in cws], pw.detach(), prw.detach(), bw.detach(),
                           bb.detach(), torch.cat(rms), torch.cat(rvs), list(rates), True, 0.1, 1e-5)
    out, branch, pool_pre, proj, mean, invstd, _, _ = fwd
    bwd = (torch.randn_like(out), x.detach(), [w.detach() for w in cws], pw.detach(), prw.detach(), bw.detach(),
           bb.detach(), branch, pool_pre, proj, out, mean, invstd, list(rates), True, [True, True, True])
    torch.library.opcheck(ops.aspp_backward.default, bwd)


def test_batch_of_one_in_training_is_a_clear_error_and_eval_works():
    fused = FusedASPP(4, (2, 3), 3)
    x = torch.randn(1, 4, 9, 9)
    with pytest.raises(ValueError, match="batch of 2 or more.*eval mode / frozen BatchNorm"):
        fused(x)
    assert all(int(b) == 0 for n, b in fused.named_buffers() if n.endswith("num_batches_tracked"))
    fused.eval()
    assert fused(x).shape == (1, 3, 9, 9)


@pytest.mark.parametrize("rates", [(3,), (1, 2, 3, 4)], ids=str)
def test_any_number_of_rates_and_torchvision_state_dict(rates):
    tv, fused = _pair(6, rates, 4)
    assert list(fused.state_dict()) == list(tv.state_dict())
    x = torch.randn(3, 6, 8, 7)
    assert_close(fused(x), tv(x), f"rates {rates}", 1e-5, 1e-5)


def test_dropout_matches_torchvision_in_training():
    tv = ASPP(6, (2, 3), 4)
    _randomize(tv)
    fused = FusedASPP(6, (2, 3), 4, dropout=0.5)
    fused.load_state_dict(tv.state_dict())
    x = torch.randn(2, 6, 9, 9)
    torch.manual_seed(7)
    expected = tv(x)
    torch.manual_seed(7)
    assert_close(fused(x), expected, "with dropout 0.5", 1e-5, 1e-5)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: a.__setitem__(1, a[1][:-1]), r"conv_weights must be a list of 3 tensors"),
        # one rate short of the 3x3 weights: the message names the rates too, not only conv_weights
        (lambda a: a.__setitem__(8, a[8][:-1]), r"conv_weights must be a list of 2 tensors \(the 1x1 branch, then one "
                                                r"3x3 per rate: rates=\[2\]\), got list of length 3"),
        (lambda a: a.__setitem__(3, torch.randn(3, 7, 1, 1)), r"project_weight must have shape \(3, 12, 1, 1\)"),
        (lambda a: a.__setitem__(4, a[4][:-1]), r"bn_weights must be a list of 5 tensors"),
        (lambda a: a[6].__setitem__(0, torch.zeros(4)), r"running_means\[0\] must have shape \(3,\)"),
        (lambda a: a.__setitem__(0, torch.randn(1, 5, 7, 6)), r"batch of 2 or more"),
        (lambda a: a.__setitem__(8, (2, 0)), r"rates must be a sequence \(tuple, list, range, ...\) of ints >= 1, "
                                             r"got \(2, 0\)"),
        (lambda a: a.__setitem__(8, {2, 5}), r"rates must be a sequence .*got \{2, 5\}"),  # unordered
        (lambda a: a.__setitem__(8, (True, 5)), r"rates must be a sequence .*got \(True, 5\)"),
        (lambda a: a.__setitem__(8, (2.0, 5)), r"rates must be a sequence .*got \(2.0, 5\)"),
        (lambda a: a.__setitem__(8, "25"), r"rates must be a sequence .*got '25'"),
    ],
)
def test_bad_input(change, pattern):
    args = list(_functional_inputs(dtype=torch.float32))
    change(args)
    *tensors, rates = args
    with pytest.raises((ValueError, TypeError), match=pattern):
        deeplab_ops.aspp(*tensors, rates=rates, backend="cpu")


@pytest.mark.parametrize("form", ["range", "list", "numpy", "tensor", "numpy-ints"])
def test_rates_may_be_any_ordered_sequence_of_ints(form):
    # torchvision's ASPP iterates over its rates; aspp refused range(2, 6, 3) with "rates must be a sequence of
    # ints", and FusedASPP refused it with a TypeError.
    import numpy as np

    rates = {"range": range(2, 6, 3), "list": [2, 5], "numpy": np.array([2, 5]), "tensor": torch.tensor([2, 5]),
             "numpy-ints": (np.int64(2), np.int32(5))}[form]
    *tensors, _ = _functional_inputs(dtype=torch.float32)
    want = deeplab_ops.aspp(*tensors, rates=(2, 5), training=False, backend="cpu")
    torch.testing.assert_close(deeplab_ops.aspp(*tensors, rates=rates, training=False, backend="cpu"), want)
    module = FusedASPP(5, rates, 3)
    assert module.atrous_rates == (2, 5) and all(type(r) is int for r in module.atrous_rates)


@cuda_test
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_matches_torchvision(backend, training):
    tv, fused = _pair(16, (6, 12, 18), 8, backend=backend)
    tv, fused = tv.cuda().train(training), fused.cuda().train(training)
    x = torch.randn(2, 16, 33, 33, device="cuda")
    assert_close(fused(x), tv(x), "cuda output", 1e-5, 1e-5)


@pytest.mark.parametrize("bad", ["conv_weights-tensor", "bn_weights-tensor-list", "eps-inf", "eps-nan"])
def test_bad_arguments_are_named_briefly(bad):
    # A tensor given where a list is expected is described by its shape, never its values; eps must be finite
    # (as conv_bn_relu requires).
    x = torch.randn(2, 8, 5, 5)
    args = dict(x=x, conv_weights=[torch.randn(4, 8, 1, 1), torch.randn(4, 8, 3, 3)],
                pool_weight=torch.randn(4, 8, 1, 1), project_weight=torch.randn(4, 12, 1, 1),
                bn_weights=[torch.ones(4)] * 4, bn_biases=[torch.zeros(4)] * 4, running_means=None,
                running_vars=None, rates=(2,))
    expected = {"conv_weights-tensor": r"conv_weights must be a list of 2 tensors .* got a tensor of shape "
                                       r"\(400, 8, 3, 3\)$",
                "bn_weights-tensor-list": r"bn_weights must be a list of 4 tensors .* got list of length 3$",
                "eps-inf": r"eps must be a finite number > 0, got inf",
                "eps-nan": r"eps must be a finite number > 0, got nan"}[bad]
    if bad == "conv_weights-tensor":
        args["conv_weights"] = torch.randn(400, 8, 3, 3)
    elif bad == "bn_weights-tensor-list":
        args["bn_weights"] = [torch.ones(4)] * 3
    else:
        args["eps"] = float(bad.split("-")[1])
    with pytest.raises(ValueError, match=expected) as info:
        deeplab_ops.aspp(**args)
    assert len(str(info.value)) < 300


def test_fused_aspp_follows_replaced_or_hooked_children():
    """FusedASPP runs its current children: a branch conv replaced after a call (the cached structure is seen to be
    stale), one the fused op cannot compute (a biased conv: the children then run one by one, as torchvision's ASPP
    runs them), a LeakyReLU, a hook on a part; torchvision's ASPP with the same children gives the same output."""
    tv, fused = _pair(8, (1, 2), 4)
    tv.eval()
    fused.eval()
    x = torch.randn(2, 8, 9, 9)
    assert_close(fused(x), tv(x), "untouched", 1e-5, 1e-5)
    for where, make in ((("convs", 1, 0), lambda: torch.nn.Conv2d(8, 4, 3, padding=1, bias=False)),
                        (("convs", 1, 0), lambda: torch.nn.Conv2d(8, 4, 3, padding=1, bias=True)),
                        (("convs", 2, 2), lambda: torch.nn.LeakyReLU(0.1)),
                        (("project", 1), lambda: torch.nn.BatchNorm2d(4, eps=1e-3).eval())):
        new = make()
        for m in (tv, fused):
            container = getattr(m, where[0])
            for i in where[1:-1]:
                container = container[i]
            container[where[-1]] = new
        assert_close(fused(x), tv(x), f"{where} replaced by {new}", 1e-5, 1e-5)
    seen = []
    fused.convs[0][1].register_forward_hook(lambda m, args, out: seen.append(out))
    assert_close(fused(x), tv(x), "a hook on the 1x1 branch's BatchNorm", 1e-5, 1e-5)
    assert len(seen) == 1


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compiled_fused_aspp_follows_a_child_replaced_after_an_eager_call(training):
    """An eager call caches the validated structure on the module; a graph compiled after it read the BatchNorms
    through that cache, so its guards never saw project.1 replaced: the compiled module went on running (and, in
    training, updating) the old BatchNorm, silently. Now traced through the module tree: the replacement recompiles."""
    tv, fused = _pair(8, (1, 2), 4)
    tv.train(training)
    fused.train(training)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        fused(x)
        tv(x)  # (the same running-statistic updates)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        compiled(x)
        tv(x)
        new = torch.nn.BatchNorm2d(4).train(training)
        _randomize(new)
        old = fused.project[1]
        fused.project[1] = new
        tv.project[1] = copy.deepcopy(new)
        assert_close(compiled(x), tv(x), "compiled, after project.1 was replaced", 1e-5, 1e-5)
    assert_close(new.running_mean, tv.project[1].running_mean, "the new BatchNorm's running_mean", 1e-6, 1e-6)
    assert int(new.num_batches_tracked) == int(training) and int(old.num_batches_tracked) == 2 * int(training)
