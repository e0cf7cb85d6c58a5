"""The library's caches in long-running jobs: a dropped fused model is freed at once (no reference cycle waits for
the cyclic garbage collector, with its parameters and cached folds), deep copies and pickles of a fused chain keep
their BatchNorm linked to their own conv, the checked-configuration cache stays bounded and keeps caching when a
momentum=None BatchNorm brings a new momentum every step, and class-keyed caches keep no class alive."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deeplab_ops import common, fusion, modules
from deeplab_ops.nn import FusedConvBNReLU, fuse_modules, unfuse_modules
from deeplab_ops.ops import conv_bn_relu as cbr_op


def _chain() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())


class _Block(nn.Module):
    """A post-activation residual block fuse_modules recognises (traced with torch.fx when fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.relu, self.downsample = nn.ReLU(), None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


@pytest.fixture
def no_gc():
    """The cyclic garbage collector off: what only it would free stays alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize("make", [_chain, lambda: nn.Sequential(_Block(), _Block())], ids=["chain", "block"])
def test_dropped_fused_model_is_freed_without_the_cyclic_collector(no_gc, make):
    # A fused chain's BatchNorm referred to its conv strongly (the conv's config holds the BatchNorm: a cycle), and
    # fusing a residual block left its torch.fx tracer (a cycle) holding the block: a dropped fused model, its
    # parameters and its cached folds waited for the cyclic collector (a hyper-parameter sweep's GPU memory).
    model = fuse_modules(make(), backend="cpu").eval()
    assert fusion.is_fused(model[0]) or fusion.is_fused(model)
    with torch.no_grad():
        model(torch.randn(1, 3 if make is _chain else 4, 6, 6))
    entries = common.derived_cache_info()["entries"]
    assert entries >= 2
    params = [weakref.ref(p) for p in model.parameters()]
    del model
    assert [r for r in params if r() is not None] == []
    assert common.derived_cache_info()["entries"] <= entries - 2  # the folds went with them


def test_copies_of_a_fused_chain_link_their_own_conv():
    model = fuse_modules(_chain(), backend="cpu")
    link = model[1].__dict__[fusion._CONV_ATTR]
    assert link.ref() is model[0]
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert other[1].__dict__[fusion._CONV_ATTR].ref() is other[0]
        assert other[2].__dict__[fusion._CONV_ATTR].ref() is other[0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded[1].__dict__[fusion._CONV_ATTR].ref() is loaded[0]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(loaded(x), model(x))
    unfuse_modules(model)
    assert fusion._CONV_ATTR not in model[1].__dict__ and type(model[1]) is nn.BatchNorm2d


def test_checked_configs_stay_bounded_and_keep_caching(monkeypatch):
    # momentum=None: a new momentum 1 / (n + 1) every training step. The cache filled up for good at 4096 entries,
    # and every configuration first seen afterwards (a new model of a sweep) was checked again on every call.
    monkeypatch.setattr(cbr_op, "_CONFIGS", {})
    model = fuse_modules(_chain(), backend="cpu")
    for bn in (model[1], model[4]):
        bn.momentum = None
    for _ in range(3):
        model(torch.randn(2, 3, 4, 4))
    for n in range(5000):  # the configurations of 5000 more steps, without running them
        cbr_op.checked_config(1, 1, 1, True, 1.0 / (n + 4), 1e-5, True)
    assert len(cbr_op._CONFIGS) <= 4096
    calls = []
    monkeypatch.setattr(cbr_op, "_check_config", lambda *a: calls.append(a) or _unchecked(*a))
    new = FusedConvBNReLU(3, 4, 3, padding=1, eps=1e-3, backend="cpu")
    for _ in range(3):
        new(torch.randn(2, 3, 4, 4))
    assert len(calls) == 1  # checked once, then cached


_unchecked = cbr_op._check_config


class _Scale(nn.Module):
    def forward(self, w):
        return w * 1.0


def test_class_keyed_caches_keep_no_class_alive():
    # torch's parametrize derives one class per module it parametrizes: reads_directly's cache and the unfused
    # classes fuse/unfuse derive kept every such class of every model built and dropped.
    classes = []
    for _ in range(10):
        m = FusedConvBNReLU(3, 4, 3, padding=1, backend="cpu").eval()
        parametrize.register_parametrization(m[0], "weight", _Scale())
        s = fuse_modules(_chain(), backend="cpu").eval()
        parametrize.register_parametrization(s[0], "weight", _Scale())
        with torch.no_grad():
            m(torch.randn(1, 3, 5, 5))
            s(torch.randn(1, 3, 5, 5))
        unfuse_modules(s)
        classes += [weakref.ref(type(m[0])), weakref.ref(type(s[0]))]
        del m, s
    gc.collect()
    assert sum(r() is not None for r in classes) <= 5  # all 20 before (torch itself may hold a few a while)
    assert len(fusion._UNFUSED_DERIVED) <= 3
    assert all(entry[0]() is not None for entry in modules._DIRECT.values())


def test_reads_directly_is_not_fooled_by_a_reused_id():
    class A(nn.Conv2d):
        pass

    assert modules.reads_directly(A, modules._CONV_TENSORS)
    key = (id(A), modules._CONV_TENSORS)
    del A
    gc.collect()
    assert key not in modules._DIRECT

    class B(nn.Conv2d):
        weight = property(lambda self: self._parameters["weight"] * 2)

    modules._DIRECT[(id(B), modules._CONV_TENSORS)] = (weakref.ref(nn.Conv2d), True)  # a stale entry at B's id
    assert not modules.reads_directly(B, modules._CONV_TENSORS)


def test_a_fused_away_batchnorm_run_on_its_own_compiles():
    # Its weak link to the conv is followed inside a torch.compile graph (no graph break).
    model = fuse_modules(_chain(), backend="cpu")
    model[1].register_forward_hook(lambda module, args, out: out)  # the BatchNorm runs on its own
    x = torch.randn(2, 3, 5, 5)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_fused_subclasses_of_a_users_classes_are_freed_with_their_models():
    # fuse_modules derives a fused subclass per user class it fuses (a container of chains, a residual block); the
    # map of them held every class of every model made in a loop (classes defined per model, as factories do).
    refs = []
    for _ in range(10):
        class Net(nn.Sequential):
            pass

        class Block(_Block):
            pass

        model = fuse_modules(Net(*_chain(), Block()), backend="cpu").eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 5, 5))
        refs += [weakref.ref(Net), weakref.ref(Block), weakref.ref(type(model)), weakref.ref(type(model[-1]))]
        assert type(model) is not Net and type(model[-1]) is not Block  # fused subclasses
        del model, Net, Block
    gc.collect()
    # all 40 before; the last model's four may outlive it a while (torch.fx's tracing of its block)
    assert sum(r() is not None for r in refs) <= 4


def test_a_fused_subclass_is_made_once_per_class_while_used():
    models = [fuse_modules(nn.Sequential(_Block()), backend="cpu") for _ in range(3)]
    assert len({type(m[0]) for m in models}) == 1
    assert fusion._fused_class_of(models[0][0]) is type(models[1][0])


def test_back_to_training_drops_what_eval_calls_cached():
    # One validation pass cached each layer's folded weight and, on the cpu backend, its kept Winograd transforms;
    # training makes them stale at its first step, yet they were held (a copy of the weights and ~4x more in
    # transforms) until the next validation.
    common.clear_derived()
    chain = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
    model = nn.Sequential(FusedConvBNReLU(32, 32, 3, padding=1, backend="cpu"), fuse_modules(chain, backend="cpu"))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 32, 33, 33))
    assert common.derived_cache_info()["entries"] == 2
    assert torch.ops.deeplab_ops.winograd_cache_info()[1] > 0  # bytes of kept transforms
    model.train()
    assert common.derived_cache_info()["entries"] == 0
    assert torch.ops.deeplab_ops.winograd_cache_info()[:2] == [0, 0]
    model.train()  # already training: nothing to drop, nothing read
    # torch.compile's wrapper sets its module's `training` before Module.train reaches it: dropped all the same
    compiled = torch.compile(model[0])
    compiled.eval()
    with torch.no_grad():
        model[0](torch.randn(1, 32, 33, 33))  # (eager: a compiled call caches nothing)
    assert common.derived_cache_info()["entries"] == 1
    compiled.train()
    assert common.derived_cache_info()["entries"] == 0
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 32, 33, 33))  # cached again
    assert common.derived_cache_info()["entries"] == 2


def _eval_layer_with_kept_transforms() -> FusedConvBNReLU:
    """A cpu-backend eval layer after one call: its fold cached, the fold's Winograd transform kept (nothing else)."""
    common.clear_derived()
    model = FusedConvBNReLU(32, 32, 3, padding=1, backend="cpu").eval()
    with torch.no_grad():
        model(torch.randn(1, 32, 33, 33))
    assert torch.ops.deeplab_ops.winograd_cache_info()[1] > 0
    return model


def test_a_deleted_models_kept_transforms_go_at_the_next_call_without_gradient():
    # They were dropped only at the next lookup of a registered weight's transform: a process that went on with
    # other convolutions (another model's, not registered) held a deleted model's transforms (up to 1 GiB).
    model = _eval_layer_with_kept_transforms()
    del model  # its parameters, their cached fold and the fold's transform go
    with torch.no_grad():
        torch.ops.deeplab_ops.conv_bias_act(torch.randn(1, 32, 33, 33), torch.randn(32, 32, 3, 3), None, None,
                                            [1, 1], [1, 1], [1, 1], True)
    assert torch.ops.deeplab_ops.winograd_cache_info()[:2] == [0, 0]


def test_a_conversion_frees_the_kept_transforms_of_the_folds_it_drops():
    # model.bfloat16() dropped the float32 folds, but their kept transforms stayed (a bfloat16 call never asks the
    # float32 plan that drops a freed weight's): the conversion's release drops them.
    model = _eval_layer_with_kept_transforms()
    model.bfloat16()
    assert torch.ops.deeplab_ops.winograd_cache_info()[:2] == [0, 0]


def test_the_derived_cache_is_bounded_oldest_first(monkeypatch):
    # Entries go when a source's storage is freed; a storage kept alive by a view (a state_dict of a deleted model,
    # tensors loaded with assign=True from a state dict still held) would keep the entries of tensors long gone, so
    # the cache is bounded: the oldest stored go first beyond its entry count or its bytes.
    common.clear_derived()
    monkeypatch.setattr(common, "_DERIVED_MAX_ENTRIES", 3)
    sources = [torch.randn(4) for _ in range(5)]
    values = [common.derived(("bounded", i), (t,), lambda t=t: t * 2) for i, t in enumerate(sources)]
    info = common.derived_cache_info()
    assert info["entries"] == 3 and info["bytes"] == 3 * 16
    assert [key[0][1] for key in common._DERIVED] == [2, 3, 4]  # the newest kept
    assert common.derived(("bounded", 4), (sources[4],), lambda: None) is values[4]
    monkeypatch.setattr(common, "_DERIVED_MAX_BYTES", 40)
    common.derived(("bounded", 5), (sources[0],), lambda: sources[0] * 3)
    assert common.derived_cache_info()["entries"] == 2 and common.derived_cache_info()["bytes"] == 32
    del sources[4], values[4]  # the newest entry's storage freed: evicted, its bytes counted out
    assert common.derived_cache_info()["entries"] == 1 and common.derived_cache_info()["bytes"] == 16
    common.clear_derived()
    assert common.derived_cache_info()["bytes"] == 0
