"""The eval fast path (ops/conv_bn_relu.py `eval_fast`): an eval call with nothing to differentiate whose BatchNorm
fold is cached runs with only the checks x and residual can fail. These tests pin that it is taken (counts of the
full checks), that it computes what eager PyTorch computes after every kind of parameter change, and that anything
it cannot vouch for goes to the full path, which raises the same errors as before."""

from __future__ import annotations

import pytest
import torch
from helpers import backend_param, device_for, package_frames, python_calls
from torch import nn

import deeplab_ops
from deeplab_ops import backends
from deeplab_ops.nn import FusedConvBNReLU
from deeplab_ops.ops import conv_bn_relu as op_module


def _pair(cin=3, cout=4, **conv):
    """A fused module in eval with moved running statistics, and the eager module holding the same state."""
    torch.manual_seed(0)
    conv = {"kernel_size": 3, "padding": 1, **conv}
    fused = FusedConvBNReLU(cin, cout, conv.pop("kernel_size"), backend="cpu", **conv)
    fused.train()
    fused(torch.randn(4, cin, 7, 7))  # running statistics move
    with torch.no_grad():
        fused[1].weight.uniform_(0.5, 1.5)
        fused[1].bias.uniform_(-0.5, 0.5)
    eager = nn.Sequential(nn.Conv2d(cin, cout, fused[0].kernel_size, fused[0].stride, fused[0].padding,
                                    fused[0].dilation, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    eager.load_state_dict(fused.state_dict())
    return fused.eval(), eager.eval()


def _close(actual, expected, what=""):
    # folding reorders float32 rounding: errors scale with the pre-activation's magnitude
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=2e-6 * max(expected.abs().max().item(), 1.0),
                               msg=what)


class _Counted:
    """Counts the full path's argument checks (check_args) while installed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = op_module.check_args

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(op_module, "check_args", counted)


def test_module_eval_takes_the_fast_path_once_the_fold_is_cached(monkeypatch):
    fused, eager = _pair()
    counted = _Counted(monkeypatch)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        _close(fused(x), eager(x))
        assert counted.calls == 1  # the first call: checked, folded, cached
        for _ in range(3):
            _close(fused(x), eager(x))
        x2 = torch.randn(5, 3, 9, 11)  # another batch and size: still only the per-call checks
        _close(fused(x2), eager(x2))
    assert counted.calls == 1


def test_functional_eval_takes_the_fast_path(monkeypatch):
    fused, eager = _pair()
    conv, bn = fused[0], fused[1]
    counted = _Counted(monkeypatch)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        for _ in range(3):
            out = deeplab_ops.conv_bn_relu(x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                           padding=1, training=False, backend="cpu")
            _close(out, eager(x))
    assert counted.calls == 1


def test_channels_last_and_residual_on_the_fast_path(monkeypatch):
    fused, eager = _pair(cin=4, cout=4)
    counted = _Counted(monkeypatch)
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    r = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(3):
            out = fused(x, r)
            expected = torch.relu(eager[1](eager[0](x)) + r)
            _close(out, expected)
            assert out.is_contiguous(memory_format=torch.channels_last)
    assert counted.calls == 1


def test_the_fast_path_follows_every_parameter_change():
    fused, eager = _pair()
    x = torch.randn(2, 3, 7, 7)

    def check(what):
        eager.load_state_dict(fused.state_dict())
        fused.eval(), eager.eval()
        with torch.no_grad():
            _close(fused(x), eager(x), what)
            _close(fused(x), eager(x), what + " (cached)")

    check("first")
    opt = torch.optim.SGD(fused.parameters(), lr=0.5)
    fused.train()
    fused(x).sum().backward()  # the training forward moves the running statistics too
    opt.step()
    check("after a training step and an optimizer step")
    fused.load_state_dict({k: v + 0.25 if v.is_floating_point() else v for k, v in fused.state_dict().items()})
    check("after load_state_dict")
    fused[0].weight = nn.Parameter(torch.randn_like(fused[0].weight))
    check("after replacing the conv's weight")
    fused[1].running_var = torch.rand(4) + 0.1
    check("after replacing a running-statistics buffer")
    fused[1].eps = 0.5
    eager[1].eps = 0.5
    check("after changing eps")
    fused.to(memory_format=torch.channels_last)  # `.data` reassigned: a new storage, the same version
    check("after .to(channels_last)")
    fused.double()
    eager.double()
    x = x.double()
    check("after .double()")


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "SGD"])
def test_the_fold_follows_a_fused_optimizer_step(optimizer):
    # A fused step (fused=True) writes the parameters in one kernel without bumping their version counters; the
    # package's optimizer hook bumps them, so the eval fold is rebuilt (it was stale: 88 % off after a fused Adam step).
    fused, eager = _pair()
    x = torch.randn(2, 3, 7, 7)
    fused.eval()
    with torch.no_grad():
        fused(x)  # the fold is cached
    opt = getattr(torch.optim, optimizer)(fused.parameters(), lr=0.5, fused=True)
    for p in fused.parameters():
        p.grad = torch.randn_like(p)
    versions = [p._version for p in fused.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(fused.parameters(), versions, strict=True))
    eager.load_state_dict(fused.state_dict())
    eager.eval()
    with torch.no_grad():
        _close(fused(x), eager(x), f"after a fused {optimizer} step")


def test_the_fold_tells_a_new_storage_at_the_old_address_apart():
    # `.data = other` keeps the version counter; were the old storage freed, the new one could take its address and
    # the fold's (data pointer, version) state would match: the cache holds the sources' storages while it keeps
    # their fold, so the address cannot come back.
    fused, eager = _pair()
    x = torch.randn(2, 3, 7, 7)
    fused.eval(), eager.eval()
    w = fused[0].weight
    with torch.no_grad():
        fused(x)
        for _ in range(8):
            w.data = torch.empty_like(w)  # free the previous storage ...
            w.data = torch.randn_like(w)  # ... whose address the allocator tends to hand out again
            eager[0].weight.copy_(w)
            _close(fused(x), eager(x), "after .data got a new storage")


def test_the_fast_path_follows_a_changed_geometry():
    fused, eager = _pair()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        fused(x)
        for conv in (fused[0], eager[0]):
            conv.stride, conv.dilation, conv.padding = (2, 2), (2, 2), (2, 2)
        out = fused(x)
        assert out.shape == (2, 4, 5, 5)
        _close(out, eager(x))
        fused[0].stride = (0, 1)
        with pytest.raises(ValueError, match=r"stride must be >= 1, got \(0, 1\)"):
            fused(x)


@pytest.mark.parametrize("bad, exc, pattern", [
    (lambda: torch.randn(2, 3, 7, 7, dtype=torch.float64), TypeError,
     "weight has dtype torch.float32 but x has dtype torch.float64"),
    (lambda: torch.randn(2, 5, 7, 7), ValueError, r"x has 5 channels \(shape \(2, 5, 7, 7\)\) but conv takes 3 input"),
    (lambda: torch.randn(3, 7, 7), ValueError, r"x must be a 4-D \(N, C, H, W\) tensor"),
    (lambda: torch.randn(1, 3, 1, 1)[:, :, :0], ValueError, r"x has an empty spatial size \(shape \(1, 3, 0, 1\)\)"),
    (lambda: [1.0], TypeError, "x must be a torch.Tensor, got list"),
], ids=["dtype", "channels", "3-D", "no-output", "not-a-tensor"])
def test_the_fast_path_raises_what_the_full_path_raises(bad, exc, pattern):
    fused, _ = _pair()
    with torch.no_grad():
        fused(torch.randn(2, 3, 7, 7))  # fold cached
        with pytest.raises(exc, match=pattern):
            fused(bad())


@pytest.mark.parametrize("residual, exc, pattern", [
    (lambda: torch.randn(2, 4, 7, 6), ValueError, r"residual must have the output's shape \(2, 4, 7, 7\)"),
    (lambda: torch.randn(2, 4, 7, 7, dtype=torch.float64), TypeError, "residual has dtype torch.float64"),
    (lambda: 3.0, TypeError, "residual must be a torch.Tensor, got float"),
], ids=["shape", "dtype", "not-a-tensor"])
def test_a_bad_residual_on_the_fast_path(residual, exc, pattern):
    fused, _ = _pair(cin=3, cout=4)
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        fused(x, torch.randn(2, 4, 7, 7))
        with pytest.raises(exc, match=pattern):
            fused(x, residual())


def test_eval_with_gradients_is_not_folded():
    """Eval with parameters that require grad and grad mode on (saliency maps, fine-tuning in eval): the full path
    runs the differentiable op, and the gradients are eager's."""
    fused, eager = _pair()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        fused(x)  # the fold is cached
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fused(xf)
    assert out.grad_fn is not None
    out.square().sum().backward()
    eager(xe).square().sum().backward()
    _close(xf.grad, xe.grad)
    _close(fused[0].weight.grad, eager[0].weight.grad)
    _close(fused[1].weight.grad, eager[1].weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16: not folded, conv_bn_relu_eval
def test_forward_ad_is_refused_after_the_fold_is_cached(dtype):
    import torch.autograd.forward_ad as fwAD

    fused, _ = _pair()
    fused.to(dtype)
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    with torch.no_grad():
        fused(x)
    with fwAD.dual_level(), torch.no_grad():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="does not support forward-mode AD"):
            fused(dual)


def test_the_backend_choice_follows_the_environment_on_the_fast_path(monkeypatch):
    fused, eager = _pair()
    fused.backend = None
    x = torch.randn(2, 3, 7, 7)
    calls = []
    real = op_module.reference.conv_bn_relu
    monkeypatch.setattr(op_module.reference, "conv_bn_relu", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with torch.no_grad():
        fused(x), fused(x)
        assert not calls
        monkeypatch.setenv(backends.ENV_VAR, "reference")
        _close(fused(x), eager(x))
        assert calls == [1]


def test_inference_tensors_are_never_cached():
    with torch.inference_mode():
        fused, eager = _pair()
        x = torch.randn(2, 3, 7, 7)
        for _ in range(2):
            _close(fused(x), eager(x))
    assert op_module.cached_derived(("fold", 1e-5), (fused[0].weight, fused[1].weight, fused[1].bias,
                                                     fused[1].running_mean, fused[1].running_var)) is None


def test_float64_is_folded_every_call():
    """float64 is what gradcheck perturbs through `.data` (no version bump): never served from the cache."""
    fused, eager = _pair()
    fused.double(), eager.double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        fused(x)
        fused[0].weight.data[0] += 1.0
        eager[0].weight.data[0] += 1.0
        _close(fused(x), eager(x))


def test_steady_state_eval_python_work():
    """The fast path's Python: module glue, the per-call checks, the cache lookup, the backend choice and the op
    (measured 17 deeplab_ops frames on the cpu backend, the shared helpers and the layout rule included; the full
    path ran 21)."""
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        fused(x), fused(x)
        frames = python_calls(lambda: fused(x))
    assert package_frames(frames) <= 17, sorted(frames.items())


@pytest.mark.parametrize("kind", ["affine=False", "track_running_stats=False", "parametrized weight"])
def test_unusual_modules_in_eval(kind):
    torch.manual_seed(0)
    affine, tracking = kind != "affine=False", kind != "track_running_stats=False"
    fused = FusedConvBNReLU(3, 4, 3, padding=1, backend="cpu", affine=affine, track_running_stats=tracking)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                          nn.BatchNorm2d(4, affine=affine, track_running_stats=tracking), nn.ReLU())
    eager.load_state_dict(fused.state_dict())
    if kind == "parametrized weight":
        for m in (fused, eager):
            torch.nn.utils.parametrize.register_parametrization(m[0], "weight", _Scaled())
    x = torch.randn(2, 3, 7, 7)
    fused.train(), eager.train()
    fused(x), eager(x)
    fused.eval(), eager.eval()
    with torch.no_grad():
        for _ in range(3):
            _close(fused(x), eager(x), kind)
        if kind == "parametrized weight":
            fused[0].parametrizations.weight.original.mul_(2.0)
            eager[0].parametrizations.weight.original.mul_(2.0)
            _close(fused(x), eager(x), kind + " after a change")


class _Scaled(nn.Module):
    def forward(self, w):
        return w * 0.5


@pytest.mark.parametrize("change, exc, pattern", [
    (lambda m: setattr(m[1], "momentum", 7), ValueError, r"momentum must be a number in \[0, 1\], got 7"),
    (lambda m: setattr(m, "apply_relu", 1), TypeError, "relu must be a bool, got 1"),
    (lambda m: setattr(m[1], "eps", True), ValueError, "eps must be a finite number > 0, got True"),
], ids=["momentum", "relu", "eps-bool"])
def test_a_module_configuration_is_checked_on_the_fast_path_too(change, exc, pattern):
    """What the full path refuses in a module's configuration is refused whether or not the fold is cached (eps=True
    would otherwise find eps=1.0's fold: True == 1.0)."""
    fused, _ = _pair()
    fused[1].eps = 1.0
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        fused(x), fused(x)  # cached
        change(fused)
        with pytest.raises(exc, match=pattern):
            fused(x)


def test_rebuilding_after_clear_derived_adds_no_finalizers():
    import gc
    import weakref

    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        # Other tests' cached values and garbage go first, their finalizers run now, and no collection runs during
        # the count (one would run theirs then, and the count would drop: 316 -> 300 after
        # tests/ops/test_memory_efficient.py).
        deeplab_ops.common.clear_derived()
        fused(x)
        gc.collect()
        gc.disable()
        try:
            before = len(weakref.finalize._registry)
            for _ in range(20):
                deeplab_ops.common.clear_derived()
                fused(x)
            after = len(weakref.finalize._registry)
        finally:
            gc.enable()
    assert after == before


def test_a_missing_conv_weight_gets_the_full_paths_error():
    fused, _ = _pair()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        fused(x)
        fused[0].weight = None
        with pytest.raises(TypeError, match="weight must be a torch.Tensor, got NoneType"):
            fused(x)


def _eager_training_call(kind):
    """A training call in which a fused model's BatchNorm runs as torch's own batch_norm (its running statistics
    updated in place without a version bump): (model factory, input shape, the call)."""
    from torchvision.models.feature_extraction import create_feature_extractor
    from torchvision.models.resnet import BasicBlock

    def chain():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())

    def hooked(get):
        def call(m, x):
            handle = get(m).register_forward_hook(lambda *args: None)
            m(x)
            handle.remove()
        return call

    return {
        "hook on a chain's conv": (chain, (4, 3, 8, 8), hooked(lambda m: m[0])),
        "a slice of a chain": (chain, (4, 3, 8, 8), lambda m, x: m[:2](x)),
        "hook on a residual block's BatchNorm": (lambda: BasicBlock(8, 8), (4, 8, 6, 6), hooked(lambda m: m.bn2)),
        "torch.fx feature extractor": (lambda: BasicBlock(8, 8), (4, 8, 6, 6),
                                       lambda m, x: create_feature_extractor(m, {"relu_1": "out"})(x)),
    }[kind]


@pytest.mark.parametrize("kind", ["hook on a chain's conv", "a slice of a chain",
                                  "hook on a residual block's BatchNorm", "torch.fx feature extractor"])
def test_the_fold_follows_running_statistics_torch_updated(kind):
    # torch's batch_norm writes the running statistics without bumping their version counters; the fused model
    # then evaluated with the fold of the old statistics (0.06-0.8 off); it now sees num_batches_tracked move.
    from deeplab_ops.nn import fuse_modules
    make, shape, train_call = _eager_training_call(kind)
    torch.manual_seed(0)
    eager = make()
    fused = fuse_modules(make())
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(*shape)
    eager.eval(), fused.eval()
    with torch.no_grad():
        _close(fused(x), eager(x), "before")  # the fold is cached
        eager.train(), fused.train()
        for m in (eager, fused):
            torch.manual_seed(1)
            train_call(m, torch.randn(*shape) * 2 + 1)
        for a, b in zip(fused.buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(a, b)  # the same statistics, written by torch in both
        eager.eval(), fused.eval()
        _close(fused(x), eager(x), f"after {kind}")
        _close(fused(x), eager(x), f"after {kind} (cached again)")


def test_seeing_torchs_updates_leaves_an_eager_batchnorms_graph_differentiable():
    # The eval call that sees the counter moved drops the cached folds of the statistics; an earlier version bumped
    # their version counters, and the backward of a training forward in which a hooked chain's BatchNorm ran as
    # torch's own (whose graph saves the running statistics) then failed after an eval pass before it.
    from deeplab_ops.nn import fuse_modules
    torch.manual_seed(0)
    fused = fuse_modules(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()),
                         backend="cpu")
    x = torch.randn(2, 3, 8, 8)
    fused.eval()
    with torch.no_grad():
        fused(x)
    fused.train()
    handle = fused[1].register_forward_hook(lambda *args: None)
    loss = fused(x).square().mean()  # the first chain runs unfused: torch's batch_norm, the counter moves
    handle.remove()
    versions = [t._version for t in (fused[1].running_mean, fused[1].running_var)]
    fused.eval()
    with torch.no_grad():
        fused(x)  # sees the counter moved
    assert [t._version for t in (fused[1].running_mean, fused[1].running_var)] == versions
    fused.train()
    loss.backward()
    assert fused[0].weight.grad is not None


@pytest.mark.parametrize("backend", ["cpu", backend_param("triton"), backend_param("cuda")])
@pytest.mark.parametrize("training", [False, True])
def test_a_weight_given_another_view_of_its_storage_is_seen(backend, training):
    # `.data` given a transposed view of the same storage keeps its data pointer, shape and version counter: the
    # cached fold (eval) and the triton backend's packed weight (training too) were used for the old layout.
    torch.manual_seed(0)
    device = device_for(backend)
    x = torch.randn(2, 3, 6, 6, device=device)
    w = nn.Parameter(torch.randn(3, 3, 3, 3, device=device))
    g, b = torch.rand(3, device=device) + 0.5, torch.randn(3, device=device)
    rm, rv = torch.randn(3, device=device), torch.rand(3, device=device) + 0.5
    with torch.no_grad():
        deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=training, backend=backend)
        w.data = w.data.transpose(2, 3)
        rm0, rv0 = rm.clone(), rv.clone()
        out = deeplab_ops.conv_bn_relu(x, w, g, b, rm, rv, padding=1, training=training, backend=backend)
        expected_rm, expected_rv = rm0.clone(), rv0.clone()
        expected = torch.relu(torch.nn.functional.batch_norm(torch.nn.functional.conv2d(x, w, None, 1, 1),
                                                             expected_rm, expected_rv, g, b, training, 0.1, 1e-5))
    _close(out, expected, "after .data = a transposed view")
    torch.testing.assert_close(rm, expected_rm)
    torch.testing.assert_close(rv, expected_rv)


@pytest.mark.parametrize("counter", [True, False], ids=["counter", "no-counter"])
@pytest.mark.parametrize("kind", ["FusedConvBNReLU", "model block"])
def test_the_fold_follows_a_batchnorm_trained_on_its_own_by_torch(kind, counter):
    # A fused module's BatchNorm child put back in training on its own (not through the fused module, whose train()
    # drops its folds) and run by torch (a hook makes the fused module run its children) updates the running
    # statistics without a version bump. num_batches_tracked's version tells; a BatchNorm whose counter is None has
    # nothing that tells, and evaluated with the fold of the old statistics (0.03-0.2 off): its statistics' values
    # are now compared with those the last eval call saw.
    import model

    torch.manual_seed(0)
    if kind == "FusedConvBNReLU":
        fused, _ = _pair()
        eager = nn.Sequential(nn.Conv2d(3, fused[0].out_channels, 3, padding=fused[0].padding, bias=False),
                              nn.BatchNorm2d(fused[0].out_channels), nn.ReLU())
        eager.load_state_dict(fused.state_dict())
        x = torch.randn(2, 3, 7, 7)
        parts = [(m[0], m[1]) for m in (fused, eager)]
    else:
        fused, eager = (model.deeplabv3_resnet(29, num_classes=3, width=4, fused=f) for f in (True, False))
        fused.load_state_dict(eager.state_dict())
        x = torch.randn(2, 3, 17, 17)
        parts = [(m.backbone.layer1[0].conv1, m.backbone.layer1[0].bn1) for m in (fused, eager)]
    out = (lambda m, x: m(x)["out"]) if kind == "model block" else (lambda m, x: m(x))
    for _, bn in parts:
        if not counter:
            bn.num_batches_tracked = None
    fused.eval(), eager.eval()
    with torch.no_grad():
        _close(out(fused, x), out(eager, x), "before")  # the folds are cached
        for (conv, bn), m in zip(parts, (fused, eager), strict=True):
            bn.train()
            handle = conv.register_forward_hook(lambda *args: None)
            out(m, x * 3 + 1)
            handle.remove()
            bn.eval()
        torch.testing.assert_close(parts[0][1].running_mean, parts[1][1].running_mean)
        _close(out(fused, x), out(eager, x), "after")
        _close(out(fused, x), out(eager, x), "after (cached again)")


def test_a_batchnorm_without_counter_keeps_its_fold_while_its_statistics_hold():
    # Found by a review: the first fix dropped the fold of a BatchNorm without counter at every eval call, which
    # scanned the whole cache and rebuilt the fold each time (141 us instead of 23 us per call with 200 other
    # entries). Its statistics' values are compared instead: the fold is kept while they hold.
    from deeplab_ops import common

    fused, _ = _pair()
    fused[1].num_batches_tracked = None
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        first = fused(x)
        before = common.derived_cache_info()
        for _ in range(3):
            torch.testing.assert_close(fused(x), first, rtol=0, atol=0)
        after = common.derived_cache_info()
        assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 3
        fused[1].running_mean.add_(0.5)  # versioned: a miss either way
        fused(x)
        assert common.derived_cache_info()["misses"] == after["misses"] + 1
    # under a FakeTensorMode (outside torch.compile) nothing is compared or kept: a real call after it still runs
    from torch._subclasses.fake_tensor import FakeTensorMode

    del fused[1].__dict__["_deeplab_ops_statistics_seen"]
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
        assert fused(torch.randn(2, 3, 7, 7)).shape == (2, 4, 7, 7)
    with torch.no_grad():
        fused[1].running_mean.add_(0.5)
        assert not torch.equal(fused(x), first)


def test_a_counter_removed_after_the_fold_was_cached_is_seen():
    # Found by a review: the first eval call that saw a BatchNorm without counter only copied its statistics; a fold
    # cached while it had one, then statistics moved by torch's own batch_norm (no version bump), stayed in use.
    fused, eager = _pair()
    x = torch.randn(2, 3, 7, 7)
    with torch.no_grad():
        _close(fused(x), eager(x), "before")  # the fold cached, the counter there
        batches = [torch.randn(2, 4, 5, 5) * 3 + 1 for _ in range(3)]
        for bn in (fused[1], eager[1]):
            bn.num_batches_tracked = None
            bn.train()
            for y in batches:
                bn(y)  # torch's batch_norm: no version bump
            bn.eval()
        _close(fused(x), eager(x), "after")
