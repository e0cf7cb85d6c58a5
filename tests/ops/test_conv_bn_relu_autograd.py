"""conv_bn_relu's one autograd, the C++ node (csrc/composite/conv_bn_relu_autograd.cpp): every subset of wanted
gradients with every optional input present or absent (the node maps its inputs to autograd edges itself), only the
wanted work done, a retained graph run twice, the memory-efficient recompute, and a node with no Python in it."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import Case, assert_close, make_inputs

import deeplab_ops
from deeplab_ops import reference

NAMES = ("x", "weight", "bn_weight", "bn_bias", "residual")


def _call(fn, tensors: dict, rm, rv, case: Case, **kw):
    return fn(tensors["x"], tensors["weight"], tensors.get("bn_weight"), tensors.get("bn_bias"), rm, rv,
              padding=case.pad, dilation=case.dilation, training=case.training, residual=tensors.get("residual"),
              **kw)


# (bn_weight given, bn_bias given, running statistics given, residual given, training): the optional inputs shift
# the edges of those after them.
PRESENCE = [
    (True, True, True, True, True),
    (False, True, True, True, True),
    (True, False, False, True, True),
    (False, False, True, False, True),
    (True, True, True, True, False),
    (False, True, True, True, False),
]


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saved", "lean"])
@pytest.mark.parametrize("presence", PRESENCE, ids=lambda p: "".join("1" if v else "0" for v in p))
def test_every_subset_of_gradients_matches_the_reference(presence, memory_efficient):
    has_w, has_b, has_stats, has_res, training = presence
    torch.manual_seed(sum(1 << i for i, v in enumerate(presence)))
    case = Case(2, 3, 5, 6, 4, dilation=2, residual=has_res, training=training, channels_last=True)
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64)
    given = {"x": x, "weight": w, "bn_weight": g if has_w else None, "bn_bias": b if has_b else None,
             "residual": res}
    given = {k: v for k, v in given.items() if v is not None}
    if not has_stats:
        rm = rv = None
    names = [n for n in NAMES if n in given]
    for r in range(1, len(names) + 1):
        for wanted in itertools.combinations(names, r):
            tensors = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in given.items()}
            ref_tensors = {k: v.detach().clone().requires_grad_(k in wanted) for k, v in given.items()}
            stats = (None, None) if rm is None else (rm.clone(), rv.clone())
            ref_stats = (None, None) if rm is None else (rm.clone(), rv.clone())
            out = _call(deeplab_ops.conv_bn_relu, tensors, *stats, case, backend="cpu",
                        memory_efficient=memory_efficient)
            ref = _call(reference.conv_bn_relu, ref_tensors, *ref_stats, case)
            grad = torch.randn_like(ref)
            got = torch.autograd.grad(out, [tensors[k] for k in wanted], grad)
            want = torch.autograd.grad(ref, [ref_tensors[k] for k in wanted], grad)
            for name, a, e in zip(wanted, got, want, strict=True):
                assert a is not None, f"{name}: no gradient (wanted {wanted})"
                assert_close(a, e, f"grad {name} (wanted {wanted}, presence {presence})", 1e-9, 1e-9)


def _aten_ops(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def test_only_the_wanted_gradients_are_computed():
    """A gradient of the BatchNorm parameters alone runs no convolution backward and no dy; of x alone, the backward
    op is asked for x's gradient only (the node asks autograd which edges this backward needs, not which inputs
    required grad)."""
    case = Case(2, 4, 6, 6, 4)
    x, w, g, b, rm, rv, _ = make_inputs(case)
    x.requires_grad_()
    w.requires_grad_()
    g.requires_grad_()
    b.requires_grad_()
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, backend="cpu")
    names = _aten_ops(lambda: torch.autograd.grad(out.sum(), [g, b], retain_graph=True))
    assert "aten::convolution_backward" not in names, names
    assert "deeplab_ops::bn_backward_dy" not in names, names
    assert "deeplab_ops::bn_backward_reduce" in names, names
    masks = []
    from torch.utils._python_dispatch import TorchDispatchMode

    class Masks(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.deeplab_ops.conv_bn_relu_backward.default:
                masks.append(tuple(args[13]))  # output_mask: x, weight, bn_weight, bn_bias, residual
            return func(*args, **(kwargs or {}))

    with Masks():
        torch.autograd.grad(out.sum(), [x], retain_graph=True)
    assert masks == [(True, False, False, False, False)], masks


def test_retained_graph_runs_twice_alike():
    case = Case(2, 3, 5, 5, 4, residual=True)
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64)
    leaves = [t.requires_grad_() for t in (x, w, g, b, res)]
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, residual=res, backend="cpu")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, leaves, grad, retain_graph=True)
    second = torch.autograd.grad(out, leaves, grad)
    for a, c in zip(first, second, strict=True):
        assert torch.equal(a, c)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(out, leaves, grad)


def test_the_node_is_cpp_and_the_statistics_are_not_differentiable():
    case = Case(2, 3, 5, 5, 4)
    x, w, g, b, rm, rv, _ = make_inputs(case)
    x.requires_grad_()
    result = torch.ops.deeplab_ops.conv_bn_relu_forward(x, w, g, b, rm, rv, [1, 1], [1, 1], [1, 1], True, 0.1,
                                                        1e-5, None, True)
    out, conv_out, mean, invstd, new_rm, new_rv = result
    assert "ConvBNReLUFunction" in out.grad_fn.name(), out.grad_fn.name()
    assert not any(t.requires_grad for t in (conv_out, mean, invstd, new_rm, new_rv))
    # Only non-differentiable outputs used: nothing flows back.
    assert torch.autograd.grad((out * 0).sum() + mean.sum() * 0, x)[0].abs().sum() == 0


def test_bn_parameter_gradients_come_in_their_dtype():
    """bfloat16 activations with float32 BatchNorm parameters: the statistics' gradients go back as float32, and a
    float64 model's as float64."""
    case = Case(2, 3, 5, 5, 4)
    x, w, g, b, rm, rv, _ = make_inputs(case, torch.bfloat16)
    g.requires_grad_()
    b.requires_grad_()
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, backend="cpu")
    gg, gb = torch.autograd.grad(out.float().sum(), [g, b])
    assert gg.dtype == gb.dtype == torch.float32


def test_compiled_autograd_runs_the_node():
    """The node's only output is `out` (the statistics are plain results, no outputs marked non-differentiable):
    compiled autograd can run its backward (eagerly: a C++ node is not traced), with eager's gradients. Torch 2.6's
    compiled autograd refuses every C++ autograd function not marked traceable, with its own message: checked."""
    case = Case(2, 3, 5, 5, 4, residual=True)
    x, w, g, b, rm, rv, res = make_inputs(case, torch.float64)
    if torch.__version__ < "2.7":
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, g, b, res)]
        out = deeplab_ops.conv_bn_relu(*leaves[:4], rm, rv, padding=1, residual=leaves[4], backend="cpu")
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="potentially unsafe C.. autograd function"):
            with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
                out.sum().backward()
        torch._dynamo.reset()
        return
    for lean in (False, True):
        leaves = [[t.detach().clone().requires_grad_() for t in (x, w, g, b, res)] for _ in range(2)]
        outs = [deeplab_ops.conv_bn_relu(*ls[:4], rm.clone(), rv.clone(), padding=1, residual=ls[4], backend="cpu",
                                         memory_efficient=lean) for ls in leaves]
        outs[0].sum().backward()
        torch._dynamo.reset()
        with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
            outs[1].sum().backward()
        for name, a, e in zip(NAMES, leaves[1], leaves[0], strict=True):
            assert_close(a.grad, e.grad, f"compiled autograd grad {name} (lean={lean})", 1e-12, 1e-12)
    torch._dynamo.reset()


def test_double_backward_refused_through_autograd_grad():
    """A gradient of the gradient asked with torch.autograd.grad reaches the refusing node (its message, not
    'appears to not have been used in the graph')."""
    x, w, g, b, rm, rv, _ = make_inputs(Case(2, 2, 4, 4, 2), torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, backend="cpu")
    (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    for wrt in (x, w):
        with pytest.raises(RuntimeError, match="does not support double backward"):
            torch.autograd.grad(gx.sum(), [wrt], retain_graph=True)


def _aspp_args():
    torch.manual_seed(0)
    c, cin, rates = 3, 4, (2,)
    x = torch.randn(2, cin, 5, 5, dtype=torch.float64)
    cws = [torch.randn(c, cin, 1, 1, dtype=torch.float64), torch.randn(c, cin, 3, 3, dtype=torch.float64)]
    pw = torch.randn(c, cin, 1, 1, dtype=torch.float64)
    prw = torch.randn(c, 3 * c, 1, 1, dtype=torch.float64)
    vec = [torch.rand(c, dtype=torch.float64) + 0.5 for _ in range(4 * len(rates) + 12)]
    return x, cws, pw, prw, vec[:4], vec[4:8], vec[8:12], vec[12:16], rates


@pytest.mark.parametrize("op", ["conv_bn_relu", "conv_bn_relu eval", "aspp", "aspp eval", "upsample_cross_entropy"])
def test_forward_mode_ad_is_refused_clearly(op):
    """The ops have no forward derivative: a tangent (forward_ad dual tensor or torch.func.jvp) gets a clear error,
    never a result whose tangent was silently dropped (the no-graph and eval-fold paths run below Autograd)."""
    import torch.autograd.forward_ad as fwAD

    if op.startswith("conv_bn_relu"):
        x, w, g, b, rm, rv, _ = make_inputs(Case(2, 2, 4, 4, 2), torch.float64)

        def fn(t):
            return deeplab_ops.conv_bn_relu(t, w, g, b, rm.clone(), rv.clone(), padding=1, backend="cpu",
                                            training=not op.endswith("eval"))
    elif op.startswith("aspp"):
        x, cws, pw, prw, bws, bbs, rms, rvs, rates = _aspp_args()

        def fn(t):
            return deeplab_ops.aspp(t, cws, pw, prw, bws, bbs, [r.clone() for r in rms], [r.clone() for r in rvs],
                                    rates=rates, training=not op.endswith("eval"), backend="cpu")
    else:
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        target = torch.randint(0, 3, (2, 8, 8))

        def fn(t):
            return deeplab_ops.upsample_cross_entropy(t, target, backend="cpu")
    name = op.split()[0]
    with fwAD.dual_level(), pytest.raises(RuntimeError, match=f"{name} does not support forward-mode AD"):
        fn(fwAD.make_dual(x, torch.randn_like(x)))
    with pytest.raises(RuntimeError, match=f"{name} does not support forward-mode AD"):
        torch.func.jvp(fn, (x,), (torch.randn_like(x),))
    with fwAD.dual_level():  # no tangent: runs as usual
        assert torch.equal(fn(x), fn(x))


@pytest.mark.parametrize("twin", ["", "triton_"])
@pytest.mark.parametrize("bad", [[1], [1, 1, 1]], ids=["one", "three"])
def test_geometry_lengths_checked_before_either_twin(twin, bad):
    """The Autograd kernel reads stride/padding/dilation as pairs: a list of another length is refused there, for
    both twins (the triton kernels would otherwise take [1, 1, 1] without a word), graph or no graph."""
    x, w, g, b, rm, rv, _ = make_inputs(Case(2, 3, 5, 5, 4))
    op = getattr(torch.ops.deeplab_ops, f"{twin}conv_bn_relu_forward")
    for grad in (False, True):
        with pytest.raises(RuntimeError, match="stride, padding and dilation must have two values each"):
            op(x.clone().requires_grad_(grad), w, g, b, rm, rv, bad, [1, 1], [1, 1], True, 0.1, 1e-5, None, True)
