"""The C++ argument checks of the BatchNorm stage ops and of the composites that call them name the argument that is
wrong, as the op's schema names it, with its value and what was expected.

Each case makes one argument of a valid direct torch.ops.deeplab_ops call wrong and expects the message to start with
`deeplab_ops: <that argument>`. Arguments that must agree (the activations' shapes and dtypes, the per-channel
tensors' lengths) are checked against what most of them have, so the one that differs is the one named, whichever it
is; a composite checks the tensors it passes on to a stage op under its own names (conv_bn_relu_backward's bn_weight,
save_mean, out, not the stage op's weight, mean, output). CPU only: the CUDA kernels run the same checks
(csrc/bn_stage_args.cpp)."""

from __future__ import annotations

import pytest
import torch

import deeplab_ops  # noqa: F401 (loads the ops)

ops = torch.ops.deeplab_ops


def _vec(c=3):
    return torch.rand(c) + 0.5


def stats():
    return dict(input=torch.randn(2, 3, 4, 4))


def finalize():
    """Training with (C,) statistics and running statistics to update."""
    return dict(mean=torch.zeros(3), m2=torch.ones(3), counts=None, count=32.0, running_mean=torch.zeros(3),
                running_var=torch.ones(3), momentum=0.1, eps=1e-5, save_mean=torch.empty(3),
                save_invstd=torch.empty(3), new_running_mean=torch.empty(3), new_running_var=torch.empty(3))


def finalize_parts():
    """Training with (P, C) partials and their counts."""
    return dict(finalize(), mean=torch.zeros(2, 3), m2=torch.ones(2, 3), counts=torch.full((2,), 16.0), count=0.0)


def finalize_eval():
    return dict(finalize(), mean=None, m2=None, new_running_mean=torch.empty(0), new_running_var=torch.empty(0))


def apply():
    return dict(input=torch.randn(2, 3, 4, 4), mean=_vec(), invstd=_vec(), weight=_vec(), bias=_vec(),
                residual=torch.randn(2, 3, 4, 4), relu=True)


def reduce():
    return dict(grad_out=torch.randn(2, 3, 4, 4), output=torch.randn(2, 3, 4, 4).relu(),
                input=torch.randn(2, 3, 4, 4), mean=_vec(), invstd=_vec(), relu=True)


def dy():
    r = reduce()
    del r["relu"]
    return dict(r, weight=_vec(), sum_g=_vec(), sum_g_xhat=_vec(), count=32.0, relu=True, training=True)


def _conv():
    return dict(x=torch.randn(2, 4, 8, 8), weight=torch.randn(6, 4, 3, 3))


def cbr_forward():
    return dict(_conv(), bn_weight=_vec(6), bn_bias=_vec(6), running_mean=torch.zeros(6), running_var=torch.ones(6),
                stride=[1, 1], padding=[1, 1], dilation=[1, 1], training=True, momentum=0.1, eps=1e-5,
                residual=torch.randn(2, 6, 8, 8), relu=True)


def cbr_eval():
    a = cbr_forward()
    return {k: a[k] for k in ("x", "weight", "bn_weight", "bn_bias", "running_mean", "running_var", "stride",
                              "padding", "dilation", "eps", "residual", "relu")}


def cbr_backward():
    f = cbr_forward()
    with torch.no_grad():
        out, conv_out, mean, invstd, _, _ = ops.conv_bn_relu_forward(*f.values())
    return dict(grad_out=torch.randn_like(out), x=f["x"], weight=f["weight"], bn_weight=f["bn_weight"],
                conv_out=conv_out, out=out, save_mean=mean, save_invstd=invstd, stride=[1, 1], padding=[1, 1],
                dilation=[1, 1], training=True, relu=True, output_mask=[True, True, True, True, True])


def aspp_forward():
    x, c, rates = torch.randn(2, 5, 7, 6), 3, [2, 5]
    k = (len(rates) + 3) * c
    return dict(x=x, conv_weights=[torch.randn(c, 5, 1, 1)] + [torch.randn(c, 5, 3, 3) for _ in rates],
                pool_weight=torch.randn(c, 5, 1, 1), project_weight=torch.randn(c, (len(rates) + 2) * c, 1, 1),
                bn_weight=_vec(k), bn_bias=_vec(k), running_mean=torch.zeros(k), running_var=torch.ones(k),
                rates=rates, training=True, momentum=0.1, eps=1e-5)


def aspp_backward():
    f = aspp_forward()
    x, rates = f["x"], f["rates"]
    with torch.no_grad():
        out, branch, pool, proj, mean, invstd, _, _ = ops.aspp_forward(*f.values())
    return dict(grad_out=torch.randn_like(out), x=x, conv_weights=f["conv_weights"], pool_weight=f["pool_weight"],
                project_weight=f["project_weight"], bn_weight=f["bn_weight"], bn_bias=f["bn_bias"], branch_out=branch,
                pool_out=pool, project_out=proj, out=out, save_mean=mean, save_invstd=invstd, rates=rates,
                training=True, output_mask=[True, True, True])


CALLS = {"bn_stats": stats, "bn_finalize": finalize, "bn_finalize (P, C)": finalize_parts,
         "bn_finalize (eval)": finalize_eval, "bn_apply": apply, "bn_backward_reduce": reduce, "bn_backward_dy": dy,
         "conv_bn_relu_forward": cbr_forward, "conv_bn_relu_eval": cbr_eval, "conv_bn_relu_backward": cbr_backward,
         "aspp_forward": aspp_forward, "aspp_backward": aspp_backward}


def _call(call: str, args: dict):
    return getattr(ops, call.split(" ")[0])(*args.values())


def _shape(*sizes):
    return lambda t: torch.randn(*sizes, dtype=t.dtype)


def _long(t):
    return t.long()


def _double(t):
    return t.double()


def _float8(t):
    return t.to(torch.float8_e4m3fn)


FLOAT = r"must be float16, bfloat16, float32 or float64, got Long"


def _vector_cases(call, names, c, other):
    """A per-channel vector of another length, rank and dtype (`other`: the argument its dtype is compared with; None:
    any floating dtype is accepted)."""
    cases = []
    for name in names:
        vector = rf"^deeplab_ops: {name} must be a 1-D tensor of {c} values \(one per channel\), got shape "
        cases += [(call, name, _shape(c + 1), vector + rf"\[{c + 1}\]"),
                  (call, name, _shape(1, c), vector + rf"\[1, {c}\]")]
        if other is None:
            cases.append((call, name, _long, rf"^deeplab_ops: {name} {FLOAT}"))
        else:
            cases.append((call, name, _double, rf"^deeplab_ops: {name} has dtype Double but {other} has dtype Float"))
    return cases


def _activation_cases(call, names, like, shape=(2, 3, 4, 4)):
    """An activation of another shape (channels, height) or dtype than the other activations (`like`: the one the
    message compares it with)."""
    n, c, h, w = shape
    cases = []
    for name in names:
        ref = like[name]
        cases += [(call, name, _shape(n, c + 1, h, w),
                   rf"^deeplab_ops: {name} must have shape \[{n}, {c}, {h}, {w}\] \(like {ref}\), got "
                   rf"\[{n}, {c + 1}, {h}, {w}\]"),
                  (call, name, _shape(n, c, h + 1, w),
                   rf"^deeplab_ops: {name} must have shape \[{n}, {c}, {h}, {w}\] \(like {ref}\), got "
                   rf"\[{n}, {c}, {h + 1}, {w}\]"),
                  (call, name, _double, rf"^deeplab_ops: {name} has dtype Double but {ref} has dtype Float")]
    return cases


CASES = [
    # bn_stats
    ("bn_stats", "input", _shape(3, 4, 4), r"^deeplab_ops: input must be a 4-D \(N, C, H, W\) tensor, got shape "
                                            r"\[3, 4, 4\]"),
    ("bn_stats", "input", _long, rf"^deeplab_ops: input {FLOAT}"),
    # bn_finalize: each per-channel tensor against the length the others share (save_mean's included: it was once
    # the reference, and a wrong save_mean was reported as save_invstd's error)
    *_vector_cases("bn_finalize", ["save_mean", "save_invstd", "running_mean", "running_var", "new_running_mean",
                                   "new_running_var"], 3, "<dtype>"),
    ("bn_finalize", "mean", _shape(4), r"^deeplab_ops: mean must have shape \(3,\) or \(P, 3\), got \[4\]"),
    ("bn_finalize", "m2", _shape(4), r"^deeplab_ops: m2 must have shape \[3\] \(like mean\), got \[4\]"),
    ("bn_finalize", "mean", _double, r"^deeplab_ops: mean has dtype Double but save_mean has dtype Float"),
    ("bn_finalize", "m2", _double, r"^deeplab_ops: m2 has dtype Double but save_mean has dtype Float"),
    ("bn_finalize", "save_mean", _long, r"^deeplab_ops: save_mean must be float32 or float64, got Long"),
    ("bn_finalize", "save_invstd", _long, r"^deeplab_ops: save_invstd must be float32 or float64, got Long"),
    ("bn_finalize", "running_mean", _long, rf"^deeplab_ops: running_mean {FLOAT}"),
    ("bn_finalize", "running_var", _long, rf"^deeplab_ops: running_var {FLOAT}"),
    ("bn_finalize", "count", lambda v: 0.0, r"^deeplab_ops: count must be > 0 for \(C,\) statistics, got 0"),
    ("bn_finalize", "counts", lambda v: torch.ones(1), r"^deeplab_ops: counts must be None for \(C,\) statistics"),
    ("bn_finalize", "m2", lambda v: None, r"^deeplab_ops: mean and m2 must be given together .*; only mean was given"),
    ("bn_finalize", "running_var", lambda v: None,
     r"^deeplab_ops: running_mean and running_var must be given together; only running_mean was given"),
    ("bn_finalize (P, C)", "mean", _shape(2, 4),
     r"^deeplab_ops: mean must have shape \(3,\) or \(P, 3\), got \[2, 4\]"),
    ("bn_finalize (P, C)", "m2", _shape(3, 3),
     r"^deeplab_ops: m2 must have shape \[2, 3\] \(like mean\), got \[3, 3\]"),
    ("bn_finalize (P, C)", "save_mean", _shape(4),
     r"^deeplab_ops: save_mean must be a 1-D tensor of 3 values \(one per channel\), got shape \[4\]"),
    ("bn_finalize (P, C)", "counts", _shape(3),
     r"^deeplab_ops: \(P, C\) partials need counts of shape \(2,\), got \[3\]"),
    ("bn_finalize (P, C)", "counts", _double, r"^deeplab_ops: counts has dtype Double but save_mean has dtype Float"),
    ("bn_finalize (eval)", "save_mean", _shape(4),
     r"^deeplab_ops: save_mean must be a 1-D tensor of 3 values \(one per channel\), got shape \[4\]"),
    ("bn_finalize (eval)", "running_var", _shape(2),
     r"^deeplab_ops: running_var must be a 1-D tensor of 3 values \(one per channel\), got shape \[2\]"),
    ("bn_finalize (eval)", "running_mean", _long, rf"^deeplab_ops: running_mean {FLOAT}"),
    # bn_apply: the per-channel vectors of any floating dtype
    ("bn_apply", "input", _shape(2, 4, 4, 4),
     r"^deeplab_ops: input must have 3 channels \(one per value of mean, invstd, weight, bias\), got shape "
     r"\[2, 4, 4, 4\]"),
    ("bn_apply", "input", _long, rf"^deeplab_ops: input {FLOAT}"),
    *_vector_cases("bn_apply", ["mean", "invstd", "weight", "bias"], 3, None),
    ("bn_apply", "residual", _shape(2, 3, 4, 5),
     r"^deeplab_ops: residual must have shape \[2, 3, 4, 4\] \(like input\), got \[2, 3, 4, 5\]"),
    ("bn_apply", "residual", _double, r"^deeplab_ops: residual has dtype Double but input has dtype Float"),
    # bn_backward_reduce / bn_backward_dy: the activation that differs from the other two is named
    *_activation_cases("bn_backward_reduce", ["grad_out", "output", "input"],
                       {"grad_out": "input", "output": "input", "input": "grad_out"}),
    ("bn_backward_reduce", "input", _long, r"^deeplab_ops: input has dtype Long but grad_out has dtype Float"),
    *_vector_cases("bn_backward_reduce", ["mean", "invstd"], 3, None),
    *_activation_cases("bn_backward_dy", ["grad_out", "output", "input"],
                       {"grad_out": "input", "output": "input", "input": "grad_out"}),
    *_vector_cases("bn_backward_dy", ["mean", "invstd", "weight", "sum_g", "sum_g_xhat"], 3, None),
    ("bn_backward_dy", "count", lambda v: 0.0, r"^deeplab_ops: count must be > 0, got 0"),
    ("bn_backward_dy", "sum_g", lambda v: None,
     r"^deeplab_ops: bn_backward_dy in training mode needs sum_g and sum_g_xhat; got sum_g=None"),
    ("bn_backward_dy", "sum_g_xhat", lambda v: None,
     r"^deeplab_ops: bn_backward_dy in training mode needs sum_g and sum_g_xhat; got sum_g_xhat=None"),
    # conv_bn_relu_forward / _eval: the residual against the convolution output (not bn_apply's `input`)
    ("conv_bn_relu_forward", "residual", _shape(2, 6, 8, 7),
     r"^deeplab_ops: residual must have shape \[2, 6, 8, 8\] \(the convolution output's\), got \[2, 6, 8, 7\]"),
    ("conv_bn_relu_forward", "residual", _double, r"^deeplab_ops: residual has dtype Double but x has dtype Float"),
    ("conv_bn_relu_forward", "running_var", lambda v: None,
     r"^deeplab_ops: running_mean and running_var must be given together; only running_mean was given"),
    ("conv_bn_relu_eval", "residual", _shape(2, 5, 8, 8),
     r"^deeplab_ops: residual must have shape \[2, 6, 8, 8\] \(the convolution output's\), got \[2, 5, 8, 8\]"),
    ("conv_bn_relu_eval", "residual", _double, r"^deeplab_ops: residual has dtype Double but x has dtype Float"),
    # conv_bn_relu_backward: its own names, not those of the stage ops it calls (weight, mean, invstd, output, input)
    *_vector_cases("conv_bn_relu_backward", ["bn_weight", "save_mean", "save_invstd"], 6, "x"),
    ("conv_bn_relu_backward", "out", _shape(2, 6, 8, 7),
     r"^deeplab_ops: out must have shape \[2, 6, 8, 8\] \(like conv_out\), got \[2, 6, 8, 7\]"),
    ("conv_bn_relu_backward", "out", _double, r"^deeplab_ops: out has dtype Double but x has dtype Float"),
    ("conv_bn_relu_backward", "grad_out", _shape(2, 7, 8, 8),
     r"^deeplab_ops: grad_out must have shape \[2, 6, 8, 8\] \(like conv_out\), got \[2, 7, 8, 8\]"),
    ("conv_bn_relu_backward", "grad_out", _double, r"^deeplab_ops: grad_out has dtype Double but x has dtype Float"),
    ("conv_bn_relu_backward", "conv_out", _double, r"^deeplab_ops: conv_out has dtype Double but x has dtype Float"),
    ("conv_bn_relu_backward", "conv_out", _shape(2, 6, 8, 7),
     r"^deeplab_ops: conv_out must have shape \[2, 6, 8, 8\] \(x \[2, 4, 8, 8\] convolved with weight "
     r"\[6, 4, 3, 3\] at stride \[1, 1\], padding \[1, 1\], dilation \[1, 1\]\), got \[2, 6, 8, 7\]"),
    # the composites' x: one of the four float dtypes (float8 is floating point too, and passed a bare
    # at::isFloatingType check into aten's convolution, whose error named no argument)
    *[(call, "x", _float8, r"^deeplab_ops: x must be float16, bfloat16, float32 or float64, got Float8_e4m3fn")
      for call in ("conv_bn_relu_forward", "conv_bn_relu_eval", "aspp_forward")],
    # aspp_forward's first branch weight gives the width: checked as 4-D before its size is read
    ("aspp_forward", "conv_weights", lambda v: [torch.tensor(1.0)] + v[1:],
     r"^deeplab_ops: conv_weights\[0\] must be 4-D \(C, C_in=5, 1, 1\), got shape \[\]"),
    # aspp_backward: the saved tensors it passes to the stage ops, under their own names
    *[("aspp_backward", name, _shape(2, 3, 7, 5),
       rf"^deeplab_ops: {name} must have shape \(2, 3, 7, 6\) \(the forward's\), got \[2, 3, 7, 5\]")
      for name in ("grad_out", "out", "project_out")],
    *[("aspp_backward", name, _double,
       rf"^deeplab_ops: {name} is Double on cpu but x is Float on cpu; expected the forward's")
      for name in ("grad_out", "out", "project_out", "pool_out")],
    ("aspp_backward", "pool_out", _shape(2, 4),
     r"^deeplab_ops: pool_out must have shape \(2, 3\) \(the forward's\), got \[2, 4\]"),
    ("aspp_backward", "pool_out", _shape(6),
     r"^deeplab_ops: pool_out must have shape \(2, 3\) \(the forward's\), got \[6\]"),
]

# bn_finalize's per-channel dtypes: the statistics share save_mean's, the running statistics running_mean's.
_DTYPE_PEER = {"save_mean": "save_invstd", "save_invstd": "save_mean", "running_mean": "running_var",
               "running_var": "running_mean", "new_running_mean": "running_mean", "new_running_var": "running_mean"}
CASES = [(call, arg, value, pattern.replace("<dtype>", _DTYPE_PEER.get(arg, "")))
         for call, arg, value, pattern in CASES]


def _ids(cases):
    """call-argument-n: the n-th case of that argument of that call."""
    seen: dict[tuple[str, str], int] = {}
    ids = []
    for call, arg, _, _ in cases:
        n = seen[call, arg] = seen.get((call, arg), -1) + 1
        ids.append(f"{call.replace(' ', '')}-{arg}-{n}")
    return ids


@pytest.mark.parametrize("call", sorted(CALLS))
def test_the_unchanged_calls_run(call):
    _call(call, CALLS[call]())


@pytest.mark.parametrize("call, arg, value, pattern", CASES, ids=_ids(CASES))
def test_the_error_names_the_wrong_argument(call, arg, value, pattern):
    args = CALLS[call]()
    assert arg in args, (call, arg)
    args[arg] = value(args[arg])
    with pytest.raises(RuntimeError, match=pattern) as info:
        _call(call, args)
    assert f" {arg}" in str(info.value) or str(info.value).startswith(f"deeplab_ops: {arg}")


def test_every_tensor_argument_of_the_stage_ops_is_covered():
    """Every tensor argument of the BatchNorm stage ops and of conv_bn_relu_backward has a case here."""
    covered = {(call.split(" ")[0], arg) for call, arg, _, _ in CASES}
    for op in ("bn_stats", "bn_finalize", "bn_apply", "bn_backward_reduce", "bn_backward_dy", "conv_bn_relu_backward"):
        schema = getattr(ops, op).default._schema
        tensors = {a.name for a in schema.arguments if "Tensor" in str(a.type) and "[]" not in str(a.type)}
        if op == "conv_bn_relu_backward":
            tensors -= {"x", "weight"}  # the convolution's, checked as every conv composite's (docs/errors.md cpp-*)
        missing = sorted(t for t in tensors if (op, t) not in covered)
        assert not missing, f"{op}: no case for {missing}"


@pytest.mark.parametrize("composite", ["conv_bn_relu_forward", "conv_bn_relu_eval", "conv_bn_relu_backward"])
def test_stage_ops_check_again_after_a_composite_call(composite):
    """The conv_bn_relu composites check every argument they pass on to the stage ops under their own names, and the
    stages skip their own checks inside them (the same work twice per call otherwise): that holds only during the
    composite's stage calls. Direct stage calls afterwards, after a composite that ran and after one that refused its
    arguments, check as before."""
    args = {"conv_bn_relu_forward": cbr_forward, "conv_bn_relu_eval": cbr_eval,
            "conv_bn_relu_backward": cbr_backward}[composite]()
    _call(composite, args)
    bad = apply()
    bad["mean"] = _vec(4)
    with pytest.raises(RuntimeError, match="^deeplab_ops: mean "):
        _call("bn_apply", bad)
    wrong = dict(args, x=torch.randn(2, 5, 6, 6))  # the composite's own check refuses it
    with pytest.raises(RuntimeError):
        _call(composite, wrong)
    bad = reduce()
    bad["output"] = torch.randn(2, 3, 4, 5)
    with pytest.raises(RuntimeError, match="^deeplab_ops: output "):
        _call("bn_backward_reduce", bad)
