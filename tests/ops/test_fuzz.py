"""Property-based fuzzing of every public op on the reference, cpu and triton backends, against the float64
reference; triton runs on CUDA tensors where a GPU is visible, else in the interpreter on CPU tensors.

conv_bn_relu, aspp, FusedConvBNReLU and FusedASPP (against the unfused torch modules):
random shapes, kernel sizes, strides, dilations (larger than the map too), paddings, residual on and off, ReLU on
and off, training and eval, affine and running statistics present or not, NCHW / channels_last / strided views,
float32 and float64. Forward, every gradient and the running statistics are compared.

The normal run draws a few examples per op (tiny shapes for triton); `pytest -m slow` draws
FUZZ_EXAMPLES (default 300) per op and backend. Hypothesis runs derandomized without a database, so CI
replays the same examples; every failure the fuzzing found is kept below as a regular regression test.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_close, backend_param, device_for
from hypothesis import HealthCheck, given, settings
from hypothesis import note as _note
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

import deeplab_ops
from deeplab_ops import reference
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU

SLOW_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


def fuzz_settings(examples: int):
    """Reproducible: derandomized, no example database, no deadline (the interpreter is slow)."""
    return settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                               HealthCheck.function_scoped_fixture],
    )


def note(value) -> None:
    """Record the case in a hypothesis failure report; a no-op in the plain regression tests."""
    try:
        _note(value)
    except InvalidArgument:
        pass


def backend_params(backends: list[tuple[str, int]]) -> list:
    """(backend, examples) parametrize entries; triton's marked `gpu` and skipped where triton cannot run."""
    return [pytest.param(b, n, marks=backend_param(b).marks if b == "triton" else (), id=b) for b, n in backends]


# ---- conv_bn_relu ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvCall:
    n: int
    cin: int
    cout: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    training: bool
    running: bool  # running statistics given
    affine: bool  # bn_weight / bn_bias given
    residual: bool
    relu: bool
    layout: str  # "nchw", "channels_last" or "strided" (a non-contiguous view)
    dtype: torch.dtype
    momentum: float
    eps: float
    scale: float  # magnitude of x
    shift: float  # mean of x
    seed: int
    memory_efficient: bool = False  # the op's memory_efficient=True path (the reference backend ignores it)

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st_ + 1
            for s, k, st_, p, d in zip((self.h, self.w), self.kernel, self.stride, self.padding, self.dilation,
                                       strict=True)
        )


LIMITS = {  # (max channels, max spatial size, max kernel, max dilation, max stride, max batch)
    "reference": (6, 14, 5, 6, 3, 3),
    "cpu": (6, 14, 5, 6, 3, 3),
    "triton": (4, 9, 3, 4, 2, 2),
}


@st.composite
def conv_calls(draw, backend: str) -> ConvCall:
    max_c, max_hw, max_k, max_d, max_s, max_n = LIMITS[backend]
    n = draw(st.integers(1, max_n))
    cin, cout = draw(st.integers(1, max_c)), draw(st.integers(1, max_c))
    sizes, geometry = [], []
    for _ in range(2):
        k = draw(st.integers(1, max_k))
        d = draw(st.integers(1, max_d)) if k > 1 else draw(st.sampled_from([1, 1, 2]))
        s = draw(st.integers(1, max_s))
        span = d * (k - 1)
        p = draw(st.integers(0, span // 2 + 1))
        lo = max(1, span + 1 - 2 * p)  # the smallest input that still gives an output
        sizes.append(draw(st.integers(lo, max(lo, max_hw))))
        geometry.append((k, s, p, d))
    (kh, sh, ph, dh), (kw, sw, pw, dw) = geometry
    training = draw(st.booleans())
    ho = (sizes[0] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (sizes[1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if n * ho * wo <= 1:
        training = False  # one value per channel: batch statistics are undefined (a checked error, see test_errors)
    return ConvCall(
        n=n, cin=cin, cout=cout, h=sizes[0], w=sizes[1], kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw),
        dilation=(dh, dw), training=training, running=not training or draw(st.booleans()), affine=draw(st.booleans()),
        residual=draw(st.booleans()), relu=draw(st.booleans()),
        layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        momentum=draw(st.sampled_from([0.1, 0.0, 1.0]) | st.floats(0.0, 1.0)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        scale=draw(st.sampled_from([1.0, 1.0, 1e-3, 30.0])),
        shift=draw(st.sampled_from([0.0, 0.0, 2.0, -5.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        memory_efficient=draw(st.sampled_from([False, False, False, True])),
    )


def _layout(t: torch.Tensor, layout: str, device: str = "cpu") -> torch.Tensor:
    t = t.to(device)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: neither NCHW- nor NHWC-contiguous
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=device).normal_()
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


def conv_inputs(c: ConvCall, device: str = "cpu") -> dict:
    """The drawn call's tensors (from its seed, on CPU), moved to `device` in the drawn layout."""
    g = torch.Generator().manual_seed(c.seed)
    ho, wo = c.out_hw
    kh, kw = c.kernel

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x = randn(c.n, c.cin, c.h, c.w) * c.scale + c.shift
    t = {
        "x": _layout(x.to(c.dtype), c.layout, device),
        "weight": (randn(c.cout, c.cin, kh, kw) / (c.cin * kh * kw) ** 0.5).to(c.dtype),
        "bn_weight": (torch.rand(c.cout, generator=g, dtype=torch.float64) + 0.5).to(c.dtype) if c.affine else None,
        "bn_bias": randn(c.cout).to(c.dtype) if c.affine else None,
        "running_mean": (randn(c.cout) * 0.1).to(c.dtype) if c.running else None,
        "running_var": (torch.rand(c.cout, generator=g, dtype=torch.float64) + 0.5).to(c.dtype) if c.running else None,
        "residual": _layout(randn(c.n, c.cout, ho, wo).to(c.dtype), c.layout, device) if c.residual else None,
    }
    return {k: v.to(device) if v is not None else None for k, v in t.items()}


def check_memory_format(out: torch.Tensor, x: torch.Tensor, layout: str) -> None:
    """The output keeps x's memory format (either one where x's sizes make both layouts the same strides)."""
    if layout == "strided":
        return
    cl, nchw = x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()
    if cl and nchw:  # size-1 dimensions: x is both; so must the output be in one of them
        ok = out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)
    else:
        ok = out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert ok, f"output strides {out.stride()} (shape {tuple(out.shape)}) for a {layout} x with strides {x.stride()}"


def _grad_out(expected_z: torch.Tensor, relu: bool, seed: int) -> torch.Tensor:
    """Random output gradient, zero where the float64 pre-activation is within rounding of ReLU's kink (there the
    float32 result may fall on the other side, and the gradients legitimately differ)."""
    g = torch.randn(expected_z.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    g = g.to(expected_z.device)
    if relu:
        z = expected_z.detach()
        g = torch.where(z.abs() <= 1e-4 * max(1.0, z.abs().max().item()), torch.zeros_like(g), g)
    return g


TOLERANCES = {torch.float64: (1e-9, 1e-9, 1e-8, 1e-8), torch.float32: (2e-4, 2e-4, 2e-3, 2e-3)}


def compare(actual: torch.Tensor, exact: torch.Tensor, same_dtype_ref: torch.Tensor | None, what: str, atol: float,
            rtol: float) -> None:
    """`actual` against the float64 `exact`, allowing atol (times the magnitude) plus twice the error the
    reference itself makes in the same dtype: ill-conditioned draws (a large mean over a small spread) are as hard
    for us as for PyTorch's own float32 BatchNorm, and we must be no worse than it."""
    actual, exact = actual.detach().double(), exact.detach().double()
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    finite = exact[exact.isfinite()]
    scale = max(finite.abs().max().item(), 1.0) if finite.numel() else 1.0
    slack = 0.0
    if same_dtype_ref is not None:
        slack = 2 * (same_dtype_ref.detach().double() - exact).abs().nan_to_num(0.0).max().item()
    torch.testing.assert_close(
        actual, exact, atol=atol * scale + slack, rtol=rtol, equal_nan=True,
        msg=lambda m: f"{what} differs from the float64 reference (atol {atol}*{scale:.3g} + 2x the reference's own "
                      f"error in this dtype {slack / 2:.3g}, rtol {rtol}):\n{m}",
    )


CONV_GRAD_NAMES = ["x", "weight", "bn_weight", "bn_bias", "residual"]


def _run_conv(t: dict, c: ConvCall, grad: torch.Tensor, backend: str | None, dtype: torch.dtype):
    """One forward + backward: (out, running_mean, running_var, {name: grad}). backend None: the reference in
    `dtype`, on copies; else the op on the inputs themselves (their layout as drawn)."""
    if backend is None:
        leaves = {k: t[k].detach().to(dtype, copy=True).requires_grad_() if t[k] is not None else None
                  for k in CONV_GRAD_NAMES}
    else:
        leaves = {k: t[k].detach().requires_grad_() if t[k] is not None else None for k in CONV_GRAD_NAMES}
    rm = t["running_mean"].to(dtype, copy=True) if c.running else None
    rv = t["running_var"].to(dtype, copy=True) if c.running else None
    kw = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, training=c.training, momentum=c.momentum,
              eps=c.eps, residual=leaves["residual"], relu=c.relu)
    args = (leaves["x"], leaves["weight"], leaves["bn_weight"], leaves["bn_bias"], rm, rv)
    if backend is None:
        out = reference.conv_bn_relu(*args, **kw)
    else:
        out = deeplab_ops.conv_bn_relu(*args, backend=backend, memory_efficient=c.memory_efficient, **kw)
    present = [k for k in CONV_GRAD_NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in present], grad.to(out.dtype))
    return out, rm, rv, dict(zip(present, grads, strict=True))


def check_conv_call(c: ConvCall, backend: str) -> None:
    note(repr(c))
    t = conv_inputs(c, device_for(backend))
    with torch.no_grad():  # the float64 pre-activation, for the kink mask
        z = reference.conv_bn_relu(
            t["x"].double(), t["weight"].double(), *(t[k].double() if t[k] is not None else None
                                                     for k in ("bn_weight", "bn_bias")),
            *(t[k].double().clone() if c.running else None for k in ("running_mean", "running_var")),
            stride=c.stride, padding=c.padding, dilation=c.dilation, training=c.training, momentum=c.momentum,
            eps=c.eps, residual=t["residual"].double() if c.residual else None, relu=False)
    grad = _grad_out(z, c.relu, c.seed)
    out, rm, rv, grads = _run_conv(t, c, grad, backend, c.dtype)
    exact = _run_conv(t, c, grad, None, torch.float64)
    same = _run_conv(t, c, grad, None, c.dtype) if c.dtype != torch.float64 else (None, None, None, {})
    atol, rtol, gatol, grtol = TOLERANCES[c.dtype]
    assert out.dtype == c.dtype and out.shape == exact[0].shape
    check_memory_format(out, t["x"], c.layout)
    compare(out, exact[0], same[0], f"{backend} output", atol, rtol)
    if c.running:
        compare(rm, exact[1], same[1], f"{backend} running_mean", atol, rtol)
        compare(rv, exact[2], same[2], f"{backend} running_var", atol, rtol)
    for k, g in grads.items():
        compare(g, exact[3][k], same[3].get(k), f"{backend} grad {k}", gatol, grtol)


CONV_BACKENDS = [("reference", 25), ("cpu", 25), ("triton", 5)]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend, examples", backend_params(CONV_BACKENDS))
def test_fuzz_conv_bn_relu(backend, examples):
    _fuzz_conv(backend, examples)


@pytest.mark.slow
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend, examples", backend_params(CONV_BACKENDS))
def test_fuzz_conv_bn_relu_slow(backend, examples):
    _fuzz_conv(backend, SLOW_EXAMPLES)


def _fuzz_conv(backend: str, examples: int) -> None:
    @fuzz_settings(examples)
    @given(conv_calls(backend))
    def run(c):
        check_conv_call(c, backend)

    run()


# ---- aspp --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AsppCall:
    n: int
    cin: int
    c: int
    h: int
    w: int
    rates: tuple[int, ...]
    training: bool
    running: bool
    layout: str
    dtype: torch.dtype
    momentum: float
    eps: float
    seed: int
    memory_efficient: bool = False  # the op's memory_efficient=True path (the reference backend ignores it)


@st.composite
def aspp_calls(draw, max_c: int, max_hw: int) -> AsppCall:
    training = draw(st.booleans())
    n = draw(st.integers(2 if training else 1, 3))
    return AsppCall(
        n=n, cin=draw(st.integers(1, max_c)), c=draw(st.integers(1, max_c)), h=draw(st.integers(1, max_hw)),
        w=draw(st.integers(1, max_hw)),
        rates=tuple(draw(st.lists(st.integers(1, 2 * max_hw), min_size=0, max_size=4))),  # () too: no 3x3 branch
        training=training, running=not training or draw(st.booleans()),
        layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        momentum=draw(st.sampled_from([0.1, 0.0, 1.0]) | st.floats(0.0, 1.0)),
        eps=draw(st.sampled_from([1e-5, 1e-3])), seed=draw(st.integers(0, 2**31 - 1)),
        memory_efficient=draw(st.sampled_from([False, False, False, True])),
    )


def aspp_inputs(a: AsppCall, device: str = "cpu") -> dict:
    """The drawn call's tensors (from its seed, on CPU), moved to `device` (x in the drawn layout)."""
    g = torch.Generator().manual_seed(a.seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(a.dtype).to(device)

    def pos(*shape):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5).to(a.dtype).to(device)

    nb = len(a.rates) + 3
    return {
        "x": _layout(randn(a.n, a.cin, a.h, a.w), a.layout, device),
        "conv_weights": [randn(a.c, a.cin, 1, 1, scale=a.cin ** -0.5)]
        + [randn(a.c, a.cin, 3, 3, scale=(9 * a.cin) ** -0.5) for _ in a.rates],
        "pool_weight": randn(a.c, a.cin, 1, 1, scale=a.cin ** -0.5),
        "project_weight": randn(a.c, (len(a.rates) + 2) * a.c, 1, 1, scale=((len(a.rates) + 2) * a.c) ** -0.5),
        "bn_weights": [pos(a.c) for _ in range(nb)],
        "bn_biases": [randn(a.c) for _ in range(nb)],
        "running_means": [randn(a.c, scale=0.1) for _ in range(nb)] if a.running else None,
        "running_vars": [pos(a.c) for _ in range(nb)] if a.running else None,
    }


def check_aspp_call(a: AsppCall, backend: str) -> None:
    note(repr(a))
    t = aspp_inputs(a, device_for(backend))
    kw = dict(rates=a.rates, training=a.training, momentum=a.momentum, eps=a.eps)

    def run(backend: str | None, dtype: torch.dtype, grad: torch.Tensor | None = None):
        """(out, running_means, running_vars, [(name, grad)]): the op on the drawn tensors (their layout), or
        the reference (backend None) on copies in `dtype`."""
        def leaf(v):
            return (v.detach() if backend is not None else v.detach().to(dtype, copy=True)).requires_grad_()

        x, pw, prw = leaf(t["x"]), leaf(t["pool_weight"]), leaf(t["project_weight"])
        cws, bws, bbs = ([leaf(v) for v in t[k]] for k in ("conv_weights", "bn_weights", "bn_biases"))
        rms = [m.to(dtype, copy=True) for m in t["running_means"]] if a.running else None
        rvs = [v.to(dtype, copy=True) for v in t["running_vars"]] if a.running else None
        args = (x, cws, pw, prw, bws, bbs, rms, rvs)
        out = reference.aspp(*args, **kw) if backend is None else deeplab_ops.aspp(
            *args, backend=backend, memory_efficient=a.memory_efficient, **kw)
        named = [("x", x)] + [(f"conv_weights[{i}]", w) for i, w in enumerate(cws)] + [
            ("pool_weight", pw), ("project_weight", prw)] + [(f"bn_weights[{i}]", w) for i, w in enumerate(bws)] + [
            (f"bn_biases[{i}]", b) for i, b in enumerate(bbs)]
        grads = []
        if grad is not None:
            grads = list(zip([n for n, _ in named], torch.autograd.grad(out, [v for _, v in named], grad.to(dtype)),
                             strict=True))
        return out, rms, rvs, grads

    exact_out = run(None, torch.float64)[0].detach()
    # The final ReLU's kink: no gradient where the float64 output is within rounding of 0.
    grad = torch.randn(exact_out.shape, generator=torch.Generator().manual_seed(a.seed + 1), dtype=torch.float64)
    grad = grad.to(exact_out.device)
    if a.dtype != torch.float64:
        grad = torch.where(exact_out <= 1e-4 * max(1.0, exact_out.abs().max().item()), torch.zeros_like(grad), grad)
    out, rms, rvs, grads = run(backend, a.dtype, grad)
    exact = run(None, torch.float64, grad)
    same = run(None, a.dtype, grad) if a.dtype != torch.float64 else None
    atol, rtol, gatol, grtol = TOLERANCES[a.dtype]
    assert out.dtype == a.dtype and out.shape == exact[0].shape
    if backend != "reference":  # the reference is whatever torch's modules give (degenerate H or W: may be NCHW)
        check_memory_format(out, t["x"], a.layout)
    compare(out, exact[0], same and same[0], f"{backend} aspp output", atol, rtol)
    if a.running:
        for i in range(len(rms)):
            compare(rms[i], exact[1][i], same and same[1][i], f"{backend} aspp running_means[{i}]", atol, rtol)
            compare(rvs[i], exact[2][i], same and same[2][i], f"{backend} aspp running_vars[{i}]", atol, rtol)
    for j, (name, g) in enumerate(grads):
        compare(g, exact[3][j][1], same and same[3][j][1], f"{backend} aspp grad {name}", gatol, grtol)


ASPP_BACKENDS = [("reference", 10), ("cpu", 12), ("triton", 3)]


@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend, examples", backend_params(ASPP_BACKENDS))
def test_fuzz_aspp(backend, examples):
    _fuzz_aspp(backend, examples)


@pytest.mark.slow
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("backend, examples", backend_params(ASPP_BACKENDS))
def test_fuzz_aspp_slow(backend, examples):
    _fuzz_aspp(backend, SLOW_EXAMPLES)


def _fuzz_aspp(backend: str, examples: int) -> None:
    tiny = backend == "triton"

    @fuzz_settings(examples)
    @given(aspp_calls(max_c=4 if tiny else 6, max_hw=9 if tiny else 12))
    def run(a):
        check_aspp_call(a, backend)

    run()


# ---- nn modules against the unfused torch modules ------------------------------------------------------------


@dataclass(frozen=True)
class ModuleCase:
    cin: int
    cout: int
    kernel: int
    stride: int
    padding: int
    dilation: int
    relu: bool
    momentum: float | None
    affine: bool
    track: bool
    modes: tuple[bool, ...]  # training flag of each successive call
    n: int
    h: int
    w: int
    channels_last: bool
    seed: int


@st.composite
def module_cases(draw, max_c: int, max_hw: int) -> ModuleCase:
    k = draw(st.integers(1, 3))
    d = draw(st.integers(1, 3))
    p = draw(st.integers(0, d * (k - 1)))
    lo = max(2, d * (k - 1) + 1 - 2 * p)
    return ModuleCase(
        cin=draw(st.integers(1, max_c)), cout=draw(st.integers(1, max_c)), kernel=k, stride=draw(st.integers(1, 2)),
        padding=p, dilation=d, relu=draw(st.booleans()), momentum=draw(st.sampled_from([0.1, None, 0.5])),
        affine=draw(st.booleans()), track=draw(st.booleans()),
        modes=tuple(draw(st.lists(st.booleans(), min_size=1, max_size=3))), n=draw(st.integers(2, 3)),
        h=draw(st.integers(lo, max(lo, max_hw))), w=draw(st.integers(lo, max(lo, max_hw))),
        channels_last=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _randomize(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.dim() == 4 else 1.0))
            if p.dim() == 1 and name.endswith("weight"):
                p.abs_().add_(0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g, dtype=b.dtype) + 0.5)


def _compare_modules(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, modes, what: str) -> None:
    """Successive calls in the given modes: outputs, input and parameter gradients, and every buffer."""
    g = torch.Generator().manual_seed(int(x.sum().abs().item() * 1000) % 2**31)
    for step, training in enumerate(modes):
        ours.train(training)
        theirs.train(training)
        xo = x.clone(memory_format=torch.preserve_format).requires_grad_()
        xt = x.clone(memory_format=torch.preserve_format).requires_grad_()
        out, expected = ours(xo), theirs(xt)
        tag = f"{what} step {step} ({'train' if training else 'eval'})"
        assert_close(out, expected, f"{tag}: output", 1e-9, 1e-9)
        grad = torch.randn(expected.shape, generator=g, dtype=expected.dtype).to(expected.device)
        out.backward(grad)
        expected.backward(grad)
        assert_close(xo.grad, xt.grad, f"{tag}: grad x", 1e-8, 1e-8)
        for (name, po), pt in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(po.grad, pt.grad, f"{tag}: grad {name}", 1e-8, 1e-8)
            po.grad = pt.grad = None
        for (name, bo), bt in zip(ours.named_buffers(), theirs.buffers(), strict=True):
            assert_close(bo, bt, f"{tag}: buffer {name}", 1e-9, 1e-9)


def check_fused_conv_module(m: ModuleCase, backend: str) -> None:
    note(repr(m))
    g = torch.Generator().manual_seed(m.seed)
    conv = nn.Conv2d(m.cin, m.cout, m.kernel, m.stride, m.padding, m.dilation, bias=False)
    bn = nn.BatchNorm2d(m.cout, momentum=m.momentum, affine=m.affine, track_running_stats=m.track)
    theirs = nn.Sequential(conv, bn, *([nn.ReLU()] if m.relu else [])).double()
    _randomize(theirs, g)
    ours = FusedConvBNReLU(m.cin, m.cout, m.kernel, m.stride, m.padding, m.dilation, relu=m.relu,
                           momentum=m.momentum, affine=m.affine, track_running_stats=m.track, backend=backend).double()
    ours.load_state_dict(theirs.state_dict())
    device = device_for(backend)
    x = torch.randn(m.n, m.cin, m.h, m.w, generator=g, dtype=torch.float64).to(device)
    if m.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare_modules(ours.to(device), theirs.to(device), x, m.modes, f"FusedConvBNReLU[{backend}]")


def check_fused_aspp_module(m: ModuleCase, rates: tuple[int, ...], backend: str) -> None:
    from torchvision.models.segmentation.deeplabv3 import ASPP

    note(repr((m, rates)))
    g = torch.Generator().manual_seed(m.seed)
    theirs = ASPP(m.cin, rates, m.cout).double()
    theirs.project[3].p = 0.0
    _randomize(theirs, g)
    for mod in theirs.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = m.momentum
    ours = FusedASPP(m.cin, rates, m.cout, backend=backend).double()
    ours.load_state_dict(theirs.state_dict())
    for mod in ours.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = m.momentum
    device = device_for(backend)
    x = torch.randn(m.n, m.cin, m.h, m.w, generator=g, dtype=torch.float64).to(device)
    if m.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _compare_modules(ours.to(device), theirs.to(device), x, m.modes, f"FusedASPP[{backend}] rates {rates}")


MODULE_BACKENDS = [("reference", 6), ("cpu", 8), ("triton", 2)]


@pytest.mark.parametrize("backend, examples", backend_params(MODULE_BACKENDS))
def test_fuzz_fused_conv_bn_relu_module(backend, examples):
    _fuzz_conv_module(backend, examples)


@pytest.mark.slow
@pytest.mark.parametrize("backend, examples", backend_params(MODULE_BACKENDS))
def test_fuzz_fused_conv_bn_relu_module_slow(backend, examples):
    _fuzz_conv_module(backend, SLOW_EXAMPLES)


def _fuzz_conv_module(backend: str, examples: int) -> None:
    tiny = backend == "triton"

    @fuzz_settings(examples)
    @given(module_cases(max_c=3 if tiny else 5, max_hw=7 if tiny else 10))
    def run(m):
        check_fused_conv_module(m, backend)

    run()


ASPP_MODULE_BACKENDS = [("reference", 3), ("cpu", 5), ("triton", 1)]


@pytest.mark.parametrize("backend, examples", backend_params(ASPP_MODULE_BACKENDS))
def test_fuzz_fused_aspp_module(backend, examples):
    _fuzz_aspp_module(backend, examples)


@pytest.mark.slow
@pytest.mark.parametrize("backend, examples", backend_params(ASPP_MODULE_BACKENDS))
def test_fuzz_fused_aspp_module_slow(backend, examples):
    _fuzz_aspp_module(backend, SLOW_EXAMPLES)


def _fuzz_aspp_module(backend: str, examples: int) -> None:
    tiny = backend == "triton"

    @fuzz_settings(examples)
    @given(module_cases(max_c=3 if tiny else 5, max_hw=7 if tiny else 10),
           st.lists(st.integers(1, 12), min_size=1, max_size=3))
    def run(m, rates):
        check_fused_aspp_module(m, tuple(rates), backend)

    run()


# ---- regressions: every failure the fuzzing found, as a regular test ---------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu", backend_param("triton")])
def test_aspp_without_rates_backward(backend):
    """Found by fuzzing: an ASPP with no atrous branch (rates=(), torchvision allows it) ran forward on the cpu
    backend but its backward failed: deeplab_ops/ops/aspp.py's backward returned None for the empty `rates` list
    input, and torch.library's autograd wants the inputs' structure (an empty list) there."""
    for training in (True, False):
        check_aspp_call(AsppCall(n=2, cin=3, c=2, h=4, w=5, rates=(), training=training, running=True, layout="nchw",
                                 dtype=torch.float64, momentum=0.1, eps=1e-5, seed=11), backend)
