"""nn.FusedConvBNReLU: a drop-in for nn.Sequential(Conv2d, BatchNorm2d, ReLU) — state_dict, BN semantics."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from helpers import assert_close, assert_module_matches
from torch import nn
from torch.nn import functional as F

from deeplab_ops.nn import FusedConvBNReLU


def _pair(relu=True, **bn_kwargs):
    fused = FusedConvBNReLU(3, 6, 3, stride=1, padding=2, dilation=2, relu=relu, **bn_kwargs)
    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(6, **bn_kwargs),
                          *([nn.ReLU()] if relu else []))
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p))
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _assert_same_state(fused, plain, what):
    a, b = fused.state_dict(), plain.state_dict()
    assert a.keys() == b.keys(), f"{what}: state_dict keys differ: {set(a) ^ set(b)}"
    for k in a:
        assert_close(a[k].double(), b[k].double(), f"{what}: {k}", 1e-6, 1e-5)


@pytest.mark.parametrize("relu", [True, False])
def test_state_dict_round_trip_with_sequential(relu):
    fused, plain = _pair(relu)
    assert list(fused.state_dict()) == ["0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                        "1.num_batches_tracked"]
    plain2 = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), *([nn.ReLU()] if relu else []))
    plain2.load_state_dict(fused.state_dict())
    fused2 = FusedConvBNReLU(3, 6, 3, relu=relu)
    fused2.load_state_dict(plain2.state_dict())
    _assert_same_state(fused2, plain2, "round trip")


@pytest.mark.parametrize(
    "bn_kwargs", [{}, {"momentum": None}, {"momentum": 0.3}, {"track_running_stats": False}, {"affine": False},
                  {"eps": 1e-3}],
    ids=str,
)
@pytest.mark.parametrize("relu", [True, False])
def test_same_behaviour_as_sequential_through_train_and_eval(bn_kwargs, relu):
    fused, plain = _pair(relu, **bn_kwargs)
    for step, training in enumerate([True, True, True, False, True, False]):
        fused.train(training)
        plain.train(training)
        x = torch.randn(2, 3, 9, 8) + step
        xf, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
        of, op = fused(xf), plain(xp)
        assert_close(of, op, f"step {step} output", 1e-5, 1e-5)
        g = torch.randn_like(of)
        of.backward(g)
        op.backward(g)
        assert_close(xf.grad, xp.grad, f"step {step} grad x", 1e-5, 1e-4)
        for (name, pf), pp in zip(fused.named_parameters(), plain.parameters(), strict=True):
            assert_close(pf.grad, pp.grad, f"step {step} grad {name}", 1e-4, 1e-4)
            pf.grad = pp.grad = None
        _assert_same_state(fused, plain, f"step {step}")


@pytest.mark.parametrize("relu", [True, False])
def test_a_frozen_batchnorm_is_followed_as_in_sequential(relu):
    """block.train(); block[1].eval(): the BatchNorm normalizes with its running statistics and leaves them (and
    num_batches_tracked) alone, batch 1 included, as in nn.Sequential; and back to training with block[1].train()."""
    fused, plain = _pair(relu)
    for m in (fused, plain):
        m.train()
        m[1].eval()
    for step, shape in enumerate([(2, 3, 9, 8), (1, 3, 1, 1), (1, 3, 5, 4)]):
        assert_module_matches(fused, plain, torch.randn(shape) + step, f"frozen step {step}")
    assert int(fused[1].num_batches_tracked) == 0
    for m in (fused, plain):
        m[1].train()
    assert_module_matches(fused, plain, torch.randn(2, 3, 9, 8), "unfrozen")
    assert int(fused[1].num_batches_tracked) == 1


def test_residual_input():
    fused, plain = _pair(True)
    x = torch.randn(2, 3, 7, 7)
    r = torch.randn(2, 6, 7, 7)
    out = fused(x, r)
    expected = torch.relu(plain[1](plain[0](x)) + r)
    assert_close(out, expected, "residual output", 1e-5, 1e-5)
    _assert_same_state(fused, plain, "after a residual call")


def test_from_modules_shares_parameters():
    conv, bn = nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5)
    fused = FusedConvBNReLU.from_modules(conv, bn, relu=False)
    assert fused[0] is conv and fused[1] is bn
    assert fused[0].weight.data_ptr() == conv.weight.data_ptr()
    fused(torch.randn(2, 4, 3, 3))
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize(
    "conv, message",
    [
        (nn.Conv2d(4, 5, 3, bias=True), "bias"),
        (nn.Conv2d(4, 4, 3, groups=2, bias=False), "groups=2"),
        (nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect", bias=False), "padding_mode"),
        (nn.Conv2d(4, 5, 4, padding="same", bias=False), "asymmetric"),
    ],
)
def test_from_modules_rejects_what_it_cannot_compute(conv, message):
    with pytest.raises((ValueError, TypeError), match=message):
        FusedConvBNReLU.from_modules(conv, nn.BatchNorm2d(conv.out_channels))


def test_padding_same_and_valid():
    for padding in ("same", "valid"):
        conv = nn.Conv2d(3, 4, 3, padding=padding, dilation=2, bias=False)
        bn = nn.BatchNorm2d(4)
        x = torch.randn(2, 3, 9, 9)
        expected = torch.relu(nn.Sequential(conv, bn)(x))
        bn.num_batches_tracked.zero_()
        bn.reset_running_stats()
        out = FusedConvBNReLU.from_modules(conv, bn)(x)
        assert_close(out, expected, f"padding={padding}", 1e-5, 1e-5)


def test_failed_call_changes_no_state():
    fused = FusedConvBNReLU(3, 6, 1)
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fused(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="x must be a 4-D"):
        fused(torch.randn(3, 9, 9))
    for k, v in fused.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed call"


def test_pack_batchnorms_keeps_values_and_lays_tensors_back_to_back():
    from deeplab_ops.nn import pack_batchnorms

    bns = [nn.BatchNorm2d(3) for _ in range(4)]
    for bn in bns:
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t.data.normal_()
    before = [[t.clone() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)] for bn in bns]
    weights = [bn.weight for bn in bns]
    pack_batchnorms(bns)
    assert all(bn.weight is w for bn, w in zip(bns, weights, strict=True))  # the same Parameters
    for bn, old in zip(bns, before, strict=True):
        for t, o in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), old, strict=True):
            assert torch.equal(t, o)
    for attr in ("weight", "bias", "running_mean", "running_var"):
        ts = [getattr(bn, attr) for bn in bns]
        step = ts[0].numel() * ts[0].element_size()
        assert [t.data_ptr() - ts[0].data_ptr() for t in ts] == [i * step for i in range(len(ts))]
        assert len({t.untyped_storage().data_ptr() for t in ts}) == 1


def test_a_first_call_under_inference_mode_leaves_a_trainable_module():
    # The fused ASPP packs its BatchNorm tensors on its first call; under torch.inference_mode() that must not turn
    # the module's parameters and buffers into inference tensors (a later training step could not save them).
    from deeplab_ops.nn import FusedASPP

    torch.manual_seed(0)
    module = FusedASPP(8, (2, 3), 4, backend="cpu").eval()
    x = torch.randn(2, 8, 7, 7)
    with torch.inference_mode():
        first = module(x)
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    assert not [name for name, t in tensors.items() if t.is_inference()]
    with torch.no_grad():
        assert torch.equal(module(x), first)
    module.train()
    module(x).square().mean().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_a_fused_aspp_leaves_shared_memory_and_foreign_buffers_where_they_are():
    # The fused ASPP re-packs its BatchNorm tensors into one new storage when they are not back to back: after
    # model.share_memory() (Hogwild training) that took them out of shared memory, so other processes' updates were
    # lost (found by a review); tensors living in a larger buffer of someone else's (a flat parameter buffer) would
    # no longer be in it. Both stay where they are; the ASPP computes the same.
    from deeplab_ops.nn import FusedASPP

    torch.manual_seed(0)
    module = FusedASPP(8, (2, 3), 4, backend="cpu")
    module.project[3].p = 0.0
    x = torch.randn(2, 8, 7, 7)
    want = copy.deepcopy(module)(x)
    module.share_memory()
    tensors = list(module.parameters()) + list(module.buffers())
    assert all(t.is_shared() for t in tensors)
    torch.testing.assert_close(module(x), want)
    assert all(t.is_shared() for t in tensors), "a tensor left shared memory"

    module = FusedASPP(8, (2, 3), 4, backend="cpu")
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    flat = torch.zeros(100 * len(bns))  # a foreign layout: every BatchNorm weight a view of one larger buffer
    with torch.no_grad():
        for i, bn in enumerate(bns):
            bn.weight.data = flat[100 * i:100 * i + 4]
            bn.weight.fill_(1.0 + i)
    module(x).sum().backward()
    assert all(bn.weight.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for bn in bns)
    flat.mul_(2)  # the owner's writes still reach the module
    assert torch.equal(bns[1].weight.detach(), torch.full((4,), 4.0))

    # Columns of a caller's (C, number of BatchNorms) tensor, through functional_call: exactly as many bytes as a
    # pack of them, but not one (the update went to a new storage, the caller's tensor stayed zero).
    module = FusedASPP(8, (2, 3), 4, backend="cpu")
    names = [n for n, _ in module.named_buffers() if n.endswith("running_mean")]
    columns = torch.zeros(4, len(names))
    torch.func.functional_call(module, {n: columns[:, i] for i, n in enumerate(names)}, (x,))
    assert (columns != 0).all()


def _assert_ensemble_matches(models: list, x: torch.Tensor) -> list:
    """torch.func.stack_module_state + vmap(functional_call) of `models` on `x` computes (outputs, updated buffers)
    what copies of them run one by one compute; returns those copies."""
    copies = [copy.deepcopy(m) for m in models]
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    got = torch.vmap(lambda p, b: torch.func.functional_call(skeleton, (p, b), (x,)))(params, buffers)
    torch.testing.assert_close(got, torch.stack([m(x) for m in copies]), atol=1e-12, rtol=1e-12)
    for name, b in buffers.items():
        torch.testing.assert_close(b, torch.stack([dict(m.named_buffers())[name] for m in copies]))
    return copies


@pytest.mark.parametrize("training", [False, True])
def test_fused_aspp_ensembles_under_vmap_and_refuses_grad_transforms_clearly(training):
    # torch.func.stack_module_state + vmap(functional_call): PyTorch has no batching fallback for the ASPP op (its
    # Tensor[] arguments): batched, it runs on the reference. Under torch.func.grad, its first call re-packed the
    # BatchNorm tensors into tensors of the transform, which outlived it: a segmentation fault (found by a review).
    from deeplab_ops.nn import FusedASPP

    torch.manual_seed(0)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    models = [FusedASPP(8, (2, 3), 4, backend="cpu").double().train(training) for _ in range(2)]
    for m in models:
        m.project[3].p = 0.0
    copies = _assert_ensemble_matches(models, x)

    module = copies[0]
    with pytest.raises(RuntimeError, match=r"deeplab_ops.aspp cannot run inside torch.func's reverse-mode"):
        torch.func.grad(lambda t: module(t).sum())(x)
    if training:  # a training BatchNorm updates captured buffers, which torch.func.grad refuses (eager's too)
        return
    reference = FusedASPP(8, (2, 3), 4, backend="reference").double().eval()
    reference.load_state_dict(module.state_dict())
    reference.project[3].p = 0.0
    grad = torch.func.grad(lambda t: reference(t).sum())(x)  # what the error says to use
    xg = x.clone().requires_grad_()
    module(xg).sum().backward()
    torch.testing.assert_close(grad, xg.grad, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("form", ["one tensor", "one tensor, batched along dim 1", "a list"])
def test_functional_aspp_under_vmap_updates_batched_running_statistics(backend, form):
    """deeplab_ops.aspp in training under vmap, the running statistics batched (one set per member): as one
    ((len(rates)+3)*C,) tensor, they were left untouched, silently (the reference, which runs a batched call, split it
    into views, and batch_norm's update does not reach a batched tensor through a view). As the calls one by one."""
    import deeplab_ops

    torch.manual_seed(0)
    d, c, cin, rates = torch.float64, 3, 2, (1, 2)
    n_bn = len(rates) + 3
    convs = [torch.randn(c, cin, 1, 1, dtype=d)] + [torch.randn(c, cin, 3, 3, dtype=d) for _ in rates]
    pool, project = torch.randn(c, cin, 1, 1, dtype=d), torch.randn(c, (n_bn - 1) * c, 1, 1, dtype=d)
    gamma, beta = torch.rand(n_bn * c, dtype=d) + 0.5, torch.randn(n_bn * c, dtype=d)
    xs = torch.randn(2, 3, cin, 5, 4, dtype=d)  # 2 members, each a batch of 3
    stats = [torch.randn(2, n_bn * c, dtype=d) * 0.1, torch.rand(2, n_bn * c, dtype=d) + 0.5]
    loop = [t.clone() for t in stats]
    want = torch.stack([deeplab_ops.aspp(xs[i], convs, pool, project, gamma, beta, loop[0][i], loop[1][i],
                                         rates=rates, training=True, backend=backend) for i in range(2)])

    def call(x, *rs):  # rs: the two statistics, or each one's per-BatchNorm tensors
        rm, rv = (rs[0], rs[1]) if len(rs) == 2 else (list(rs[:n_bn]), list(rs[n_bn:]))
        return deeplab_ops.aspp(x, convs, pool, project, gamma, beta, rm, rv, rates=rates, training=True,
                                backend=backend)

    if form == "a list":  # separate tensors, one per BatchNorm, each batched
        parts = [[t[:, i * c:(i + 1) * c].clone() for i in range(n_bn)] for t in stats]
        got = torch.vmap(call)(xs, *parts[0], *parts[1])
        stats = [torch.cat(p, dim=1) for p in parts]
    elif form == "one tensor":
        got = torch.vmap(call)(xs, *stats)
    else:  # the members along the second dimension: a (n_bn * c, 2) tensor each
        moved = [t.t().contiguous() for t in stats]
        got = torch.vmap(call, in_dims=(0, 1, 1))(xs, *moved)
        stats = [t.t() for t in moved]
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for name, g, w in zip(("running_mean", "running_var"), stats, loop, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_conv_bn_relu_under_vmap_ensembles_and_refuses_unbatched_running_statistics(backend):
    """Ensembled FusedConvBNReLU (stacked parameters and buffers) trains under vmap as the models one by one; a
    training call whose running statistics are not batched while its input is gets a clear error before anything
    runs (as F.batch_norm's: PyTorch's batching fallback failed at the in-place update, naming neither), the
    statistics untouched."""
    import deeplab_ops
    from deeplab_ops.nn import FusedConvBNReLU

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    models = [FusedConvBNReLU(3, 4, 3, padding=1, backend=backend).double().train() for _ in range(2)]
    _assert_ensemble_matches(models, x)

    w, rm, rv = torch.randn(4, 3, 3, 3), torch.zeros(4), torch.ones(4)
    message = "deeplab_ops.conv_bn_relu: under vmap" if backend != "reference" else "Batch norm got a batched"
    with pytest.raises(RuntimeError, match=message):
        torch.vmap(lambda xi: deeplab_ops.conv_bn_relu(xi, w, None, None, rm, rv, padding=1, training=True,
                                                       backend=backend))(torch.randn(3, 2, 3, 5, 6))
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))
    with torch.no_grad():  # eval, or no running statistics: nothing updated, nothing to batch
        for stats in ((rm, rv, False), (None, None, True)):
            got = torch.vmap(lambda xi, s=stats: deeplab_ops.conv_bn_relu(
                xi, w, None, None, s[0], s[1], padding=1, training=s[2], backend=backend))(torch.randn(3, 2, 3, 5, 6))
            assert got.shape == (3, 2, 4, 5, 6)


def test_pack_batchnorms_names_a_bad_argument():
    from deeplab_ops.nn import pack_batchnorms

    with pytest.raises(TypeError, match=r"bns\[1\] must be a BatchNorm module .* got Conv2d"):
        pack_batchnorms([nn.BatchNorm2d(2), nn.Conv2d(2, 2, 1)])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("conv, message", [
    (nn.Conv2d(4, 4, 3), "conv has a bias"),
    (nn.Conv2d(4, 4, 3, padding=1, bias=False, padding_mode="reflect"), "padding_mode='reflect'"),
    (nn.Conv2d(4, 4, 3, groups=2, bias=False), "groups=2"),
], ids=["bias", "reflect", "groups"])
def test_fused_conv_bn_refuses_a_conv_it_would_compute_differently(conv, message, training):
    """deeplab_ops.nn.fused_conv_bn on a (conv, bn) pair the op cannot compute exactly raises, in training and in
    eval (where the fold would have dropped the bias or the padding mode silently)."""
    from deeplab_ops.nn import fused_conv_bn

    bn = nn.BatchNorm2d(4).train(training)
    with pytest.raises(ValueError, match=message):
        fused_conv_bn(conv, bn, torch.randn(2, 4, 8, 8), training=training)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(stride=0), ValueError, r"stride must be an int >= 1 or a pair of them, got 0"),
    (dict(dilation=(1, 0)), ValueError, r"dilation must be an int >= 1 or a pair of them, got \(1, 0\)"),
    (dict(stride=1.5), TypeError, r"stride must be an int or a pair of ints, got 1.5"),
    (dict(stride=(1, 1, 1)), TypeError, r"stride must be an int or a pair of ints, got \(1, 1, 1\)"),
    (dict(dilation="2"), TypeError, r"dilation must be an int or a pair of ints, got '2'"),
])
def test_fused_conv_bn_relu_refuses_bad_geometry_when_built(kwargs, error, message):
    """FusedConvBNReLU checks stride and dilation when it is built, with the op's own messages for what is not an int
    or a pair (a triple is not silently taken), and names a value below 1."""
    with pytest.raises(error, match=message):
        FusedConvBNReLU(3, 4, 3, **kwargs)


def test_changed_or_hooked_children_run_as_the_sequential_runs_them():
    """FusedConvBNReLU is a drop-in for nn.Sequential(conv, bn, relu): a child appended, a ReLU replaced (Identity,
    LeakyReLU), a BatchNorm made an nn.SyncBatchNorm, or a hook on a child — then the children run one by one, as
    the Sequential runs them (the residual added before the third); untouched, the fused op runs."""
    torch.manual_seed(0)
    x, r = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)

    def fresh():
        m = FusedConvBNReLU(3, 4, 3, padding=1)
        with torch.no_grad():
            m[1].running_mean.normal_(0, 0.2)
            m[1].running_var.uniform_(0.5, 1.5)
        return m.eval()

    m = fresh()
    m.append(nn.Conv2d(4, 2, 1))
    assert_close(m(x), nn.Sequential(*m)(x), "an appended conv", 1e-6, 1e-6)
    for replacement, act in ((nn.Identity(), lambda t: t), (nn.LeakyReLU(0.1), lambda t: F.leaky_relu(t, 0.1))):
        m = fresh()
        m[2] = replacement
        assert_close(m(x), act(m[1](m[0](x))), f"relu replaced by {replacement}", 1e-6, 1e-6)
        assert_close(m(x, r), act(m[1](m[0](x)) + r), f"{replacement} with a residual", 1e-6, 1e-6)
    m = fresh()
    m[1] = nn.SyncBatchNorm.convert_sync_batchnorm(m[1])  # what the fused op would not synchronize
    assert isinstance(m[1], nn.SyncBatchNorm)
    assert_close(m(x), torch.relu(F.batch_norm(m[0](x), m[1].running_mean, m[1].running_var, m[1].weight, m[1].bias)),
                 "a SyncBatchNorm child (eval)", 1e-5, 1e-5)
    for i in range(3):
        m, seen = fresh(), []
        m[i].register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out.detach().clone()))
        want = nn.Sequential(*m)(x)
        seen.clear()
        assert_close(m(x), want, f"a hook on child {i}", 1e-6, 1e-6)
        assert len(seen) == 1, f"the hook on child {i} ran {len(seen)} times"


class _WeightStandardizedConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardization): not the convolution the fused op computes."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, None)


class _ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward."""

    def forward(self, x):
        return 2 * super().forward(x)


def _doubled_bn_forward(bn):
    """bn with a forward set on the instance (a bound method: a deep copy binds it to the copy)."""
    bn.forward = types.MethodType(lambda self, x: 2 * nn.BatchNorm2d.forward(self, x), bn)
    return bn


# change -> (the child replaced, its replacement, x's channels)
_CHILDREN_THE_OP_DOES_NOT_COMPUTE = {
    "conv subclass": (0, lambda: _WeightStandardizedConv2d(3, 4, 3, padding=1, bias=False), 3),
    "bn subclass": (1, lambda: _ScaledBatchNorm2d(4), 3),
    "bn forward on the instance": (1, lambda: _doubled_bn_forward(nn.BatchNorm2d(4)), 3),
    "biased conv": (0, lambda: nn.Conv2d(3, 4, 3, padding=1), 3),
    "reflect padding": (0, lambda: nn.Conv2d(3, 4, 3, padding=1, bias=False, padding_mode="reflect"), 3),
    "grouped conv": (0, lambda: nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False), 4),
    "asymmetric 'same' padding": (0, lambda: nn.Conv2d(3, 4, 2, padding="same", bias=False), 3),
    "conv replaced by Identity": (0, lambda: nn.Identity(), 4),
    "bn replaced by Identity": (1, lambda: nn.Identity(), 3),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("change", list(_CHILDREN_THE_OP_DOES_NOT_COMPUTE))
def test_a_child_the_op_does_not_compute_runs_as_the_sequential_runs_it(change, training, monkeypatch):
    """A conv or BatchNorm child replaced by one the fused op does not compute — a Conv2d or BatchNorm2d subclass
    with its own forward, a forward set on the instance, a conv with a bias, a non-zero padding mode, groups > 1 or
    asymmetric 'same' padding, an nn.Identity — runs, with the other children, one by one as nn.Sequential runs them:
    output, every gradient and the running statistics; the fused op never sees it (it would compute the plain conv
    and BatchNorm, or raise)."""
    import deeplab_ops.modules

    torch.manual_seed(0)
    index, make, cin = _CHILDREN_THE_OP_DOES_NOT_COMPUTE[change]
    x = torch.randn(2, cin, 8, 8, dtype=torch.float64)
    m = FusedConvBNReLU(3, 4, 3, padding=1)
    m[index] = make()
    m = m.double().train(training)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
    plain = copy.deepcopy(nn.Sequential(*m))
    fused_calls = []
    fused = deeplab_ops.modules.fused_conv_bn
    monkeypatch.setattr(deeplab_ops.modules, "fused_conv_bn", lambda *a, **k: fused_calls.append(1) or fused(*a, **k))
    for step in range(2):
        assert_module_matches(m, plain, x, f"{change} ({'train' if training else 'eval'}), call {step}")
        r = torch.randn(2, 4, 8, 8, dtype=torch.float64)
        with torch.no_grad():
            children = list(plain)
            assert_close(m(x, r), children[2](children[1](children[0](x)) + r), f"{change} with a residual", 1e-6,
                         1e-6)
    assert not fused_calls, f"{change}: the fused op ran {len(fused_calls)} times"
    # untouched (and with a parametrized weight: torch.nn.utils.parametrize derives a class of the conv's), the fused
    # op runs, and computes what the Sequential computes
    m = FusedConvBNReLU(3, 4, 3, padding=1).double().train(training)
    nn.utils.parametrize.register_parametrization(m[0], "weight", nn.Tanh())
    plain = copy.deepcopy(nn.Sequential(*m))
    assert_module_matches(m, plain, torch.randn(2, 3, 8, 8, dtype=torch.float64), "a parametrized conv weight")
    assert fused_calls, "the fused op did not run for a module the op computes"


@pytest.mark.parametrize("kind", ["FusedASPP", "fuse_modules"])
def test_unpack_batchnorms_gives_each_tensor_its_own_storage(kind):
    """A fused ASPP's BatchNorm tensors share storages (packed, from its construction), which safetensors' save_model
    and load_model refuse ("None is covering the entire storage"): unpack_batchnorms gives each its own, values and
    objects kept; the next call packs them again and computes the same."""
    from torchvision.models.segmentation.deeplabv3 import ASPP

    from deeplab_ops.nn import FusedASPP, fuse_modules, unpack_batchnorms

    torch.manual_seed(0)
    module = FusedASPP(8, (1, 2), 4, backend="cpu") if kind == "FusedASPP" else fuse_modules(ASPP(8, (1, 2), 4))
    module.eval()
    x = torch.randn(2, 8, 5, 5)
    want = module(x)

    def shared(m):
        return [k for k, t in m.state_dict().items() if t.untyped_storage().nbytes() != t.numel() * t.element_size()]

    assert shared(module)  # packed where it was built or fused
    before = {k: (t, t.detach().clone()) for k, t in module.state_dict(keep_vars=True).items()}
    assert unpack_batchnorms(module) is module
    assert not shared(module)
    for k, t in module.state_dict(keep_vars=True).items():
        assert t is before[k][0] and torch.equal(t, before[k][1]), k
    assert torch.equal(module(x), want)
    assert shared(module)  # packed again
    with pytest.raises(TypeError, match="module must be an nn.Module, got list"):
        unpack_batchnorms([module])
