"""CUDA graphs and host synchronizations on a GPU (issue 12, item 4: every op capturable, no sync, no per-call host
tensor, no Python state that a replay would skip).

- A training step (forward, backward, SGD step) of each fused module, of the fused loss and of a fused DeepLabV3 with
  the fused loss, captured once in a CUDA graph and replayed with new inputs, computes what the same steps compute
  run eagerly on a twin: outputs, input gradients, parameters after the step, running statistics, batch counters.
  The replays also see parameters the optimizer changed in place (packed weights and BatchNorm tensors are rebuilt
  inside the graph, never cached from the capture).
- A captured eval forward reads the weights and running statistics as they are at each replay (the folded
  BatchNorm is computed in the graph).
- Steady-state calls synchronize nothing: torch.cuda.set_sync_debug_mode("error") turns every synchronizing CUDA
  call torch makes (a blocking copy either way, item(), nonzero, a stream or device synchronize) into an error.

GPU only: these need CUDA's graphs and streams; the rest of the suite covers the same ops on CPU.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers import cuda_test, randomize_batchnorm
from torch import nn

import deeplab_ops
import model
from deeplab_ops.nn import FusedASPP, FusedConvBNReLU, fuse_modules

BACKENDS = ["cuda", "triton"]
STEPS = 3
LR = 0.05
# Same backend, same kernels and configurations on both sides; TF32 off and cuDNN's deterministic algorithms, so
# that the only differences left are the order of the triton kernels' split reductions (fixed) and cuBLAS's.
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(autouse=True)
def _untimed_triton(monkeypatch):
    """Triton kernels launch their first pruned configuration, untimed: one compile per kernel key, so the GPU
    suite's minutes go to these checks rather than to tuning (other tests time them). The choices stay here: a
    cache of their own, dropped after the test."""
    from deeplab_ops.triton import launch

    monkeypatch.setattr(launch, "TUNED", {})
    previous = launch.set_autotune("off")
    yield
    launch.set_autotune(previous)


def _conv_case(backend: str, memory_efficient: bool):
    torch.manual_seed(0)
    m = FusedConvBNReLU(8, 16, 3, padding=2, dilation=2, backend=backend, memory_efficient=memory_efficient)
    randomize_batchnorm(m)
    m = m.cuda()

    def inputs(seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(2, 8, 9, 11, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
        residual = torch.randn(2, 16, 9, 11, device="cuda", generator=g)
        grad = torch.randn(2, 16, 9, 11, device="cuda", generator=g)
        return x, residual, grad

    def step(module, x, residual, grad):
        out = module(x, residual)
        out.backward(grad)
        return out

    return m, inputs, step, 2  # x and the residual take gradients


def _aspp_case(backend: str, memory_efficient: bool):
    torch.manual_seed(0)
    m = FusedASPP(8, (1, 2, 3), 16, backend=backend, memory_efficient=memory_efficient)
    randomize_batchnorm(m)
    m = m.cuda()

    def inputs(seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        return (torch.randn(2, 8, 9, 11, device="cuda", generator=g),
                torch.randn(2, 16, 9, 11, device="cuda", generator=g))

    def step(module, x, grad):
        out = module(x)
        out.backward(grad)
        return out

    return m, inputs, step, 1


def _model_case(backend: str, memory_efficient: bool):
    torch.manual_seed(0)
    net = model.deeplabv3_resnet(29, num_classes=3, width=4, output_stride=8)
    randomize_batchnorm(net)
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # a replay draws new masks, not the eager twin's
    fuse_modules(net, backend=backend, memory_efficient=memory_efficient)
    net = net.cuda()

    def inputs(seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(2, 3, 33, 33, device="cuda", generator=g)
        target = torch.randint(0, 3, (2, 33, 33), device="cuda", generator=g)
        target[0, :4] = 255  # ignored pixels
        return x, target

    def step(module, x, target):
        logits = module(x, upsample=False)["out"]
        loss = deeplab_ops.upsample_cross_entropy(logits, target, backend=backend)
        loss.backward()
        return loss

    return net, inputs, step, 1


CASES = {"conv_bn_relu": _conv_case, "aspp": _aspp_case, "deeplabv3": _model_case}


@contextlib.contextmanager
def _no_tf32():
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous


def _leaves(tensors, n_leaf: int) -> list[torch.Tensor]:
    """Copies of `tensors`, the first `n_leaf` taking gradients (compared too)."""
    return [t.clone().requires_grad_(i < n_leaf) for i, t in enumerate(tensors)]


def _compare(what: str, got, want) -> None:
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _compare_state(step: int, graphed: nn.Module, eager: nn.Module) -> None:
    for (name, p), q in zip(graphed.named_parameters(), eager.parameters(), strict=True):
        _compare(f"step {step}: parameter {name} after SGD", p, q)
    for (name, b), c in zip(graphed.named_buffers(), eager.buffers(), strict=True):
        if b.is_floating_point():
            _compare(f"step {step}: buffer {name}", b, c)
        else:
            assert torch.equal(b, c), f"step {step}: buffer {name}: {b} != {c}"


@cuda_test
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saving", "lean"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_captured_training_step_replays_as_the_eager_steps(backend, case, memory_efficient):
    with _no_tf32():
        graphed, inputs, step, n_leaf = CASES[case](backend, memory_efficient)
        static = _leaves(inputs(1), n_leaf)
        opt = torch.optim.SGD(graphed.parameters(), lr=LR)
        # Warm-up on a side stream (what torch.cuda.graph's documentation asks): kernels compiled and tuned, the
        # loss's stencil tables built, before the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                for s in static[:n_leaf]:
                    s.grad = None
                step(graphed, *static)
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        eager = copy.deepcopy(graphed)
        eager_opt = torch.optim.SGD(eager.parameters(), lr=LR)

        opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it writes
        for s in static[:n_leaf]:
            s.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = step(graphed, *static)
            opt.step()

        for i in range(STEPS):
            fresh = inputs(100 + i)
            with torch.no_grad():
                for s, f in zip(static, fresh, strict=True):
                    s.copy_(f)
            graph.replay()
            args = _leaves(fresh, n_leaf)
            eager_opt.zero_grad(set_to_none=True)
            want = step(eager, *args)
            eager_opt.step()
            torch.cuda.synchronize()
            _compare(f"step {i}: output", static_out, want)
            for k in range(n_leaf):
                _compare(f"step {i}: gradient of input {k}", static[k].grad, args[k].grad)
            _compare_state(i, graphed, eager)


@cuda_test
@pytest.mark.parametrize("case", ["conv_bn_relu", "aspp", "deeplabv3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_captured_eval_forward_reads_the_weights_of_each_replay(backend, case):
    with _no_tf32():
        graphed, inputs, _, _ = CASES[case](backend, False)
        graphed.eval()
        eager = copy.deepcopy(graphed)

        def forward(module, args):
            if case == "conv_bn_relu":
                return module(args[0], args[1])
            if case == "aspp":
                return module(args[0])
            return module(args[0])["out"]

        static = [t.clone() for t in inputs(1)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):
                forward(graphed, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = forward(graphed, static)

        for i in range(STEPS):
            fresh = inputs(100 + i)
            with torch.no_grad():
                for s, f in zip(static, fresh, strict=True):
                    s.copy_(f)
                if i:  # weights and running statistics changed in place, as an optimizer or a load would
                    for module in (graphed, eager):
                        for p in module.parameters():
                            p.mul_(1.0 + 0.1 * i)
                        for name, b in module.named_buffers():
                            if name.endswith("running_var"):
                                b.mul_(1.5)
                graph.replay()
                want = forward(eager, fresh)
            torch.cuda.synchronize()
            _compare(f"replay {i}: eval output", static_out, want)


@cuda_test
@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saving", "lean"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_state_calls_never_synchronize(backend, case, memory_efficient):
    """Training steps (forward, backward, running statistics), then an eval forward, after a warm-up: no
    synchronizing CUDA call, momentum=None BatchNorm (a factor of the host-known batch count) included."""
    module, inputs, step, n_leaf = CASES[case](backend, memory_efficient)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    args = _leaves(inputs(1), n_leaf)

    def calls():
        module.train()
        for _ in range(2):
            step(module, *args)
        module.eval()
        with torch.no_grad():
            module(*args[:n_leaf]) if case == "conv_bn_relu" else module(args[0])

    calls()  # warm-up: kernels compiled and tuned, the batch counts read once, tables built
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        calls()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
