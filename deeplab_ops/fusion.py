"""fuse_modules / unfuse_modules / sync_batchnorm: run a model's conv → BatchNorm (→ residual add) → ReLU chains,
residual blocks and ASPPs on deeplab_ops ops, in place, state_dict unchanged. What is fused, how, and the limits:
docs/ops.md, "Fusing a model".
"""

from __future__ import annotations

import copy
import math
import operator
import random
import sys
import threading
import weakref
from collections import OrderedDict

import torch
import torch.fx
from torch import nn

from deeplab_ops.common import bn_eps_ok, bn_momentum_ok
from deeplab_ops.modules import (
    BN_FORWARDS,
    CONV2D_FORWARDS,
    FusedASPP,
    FusedConvBNReLU,
    ReleasesDerived,
    aspp_fusable,
    aspp_parts,
    check_fusable,
    check_module_options,
    forget_aspp_parts,
    fused_conv_bn,
    reads_directly,
    refuse_scripting,
    run_fused_aspp,
    runnable_aspp_parts,
    settle_after_load,
    settle_aspp,
    symmetric_padding,
    synced_batch_norm,
    unfused_call,
)
from deeplab_ops.ops.dispatch import group_name_of

Tensor = torch.Tensor

__all__ = [
    "FusedAwayBatchNorm2d", "FusedAwayReLU", "FusedConfig", "FusedConv2d", "fuse_modules", "fused_batchnorms",
    "fused_config", "is_fused", "replace_unfused_batchnorms", "sync_batchnorm", "unfuse_modules",
]

_FUSED_ATTR = "_deeplab_ops_fused"  # plain (unregistered) attribute: never part of the state_dict
_LOAD_HOOK_ATTR = "_deeplab_ops_load_hook"  # plain attribute: the id of a fused ASPP's settle_after_load hook


class FusedConfig:
    """How a fused module runs: the absorbed BatchNorm and ReLU (fused convs), the number of conv/BN pairs
    (residual blocks), the backend, whether the fused convs, blocks and ASPPs save no pre-BN activation
    (memory_efficient, see deeplab_ops.conv_bn_relu and deeplab_ops.aspp), and the process group whose processes
    share BatchNorm statistics (set by `deeplab_ops.nn.sync_batchnorm`; None: none). chain (fused convs): the
    (name, module) of the BatchNorm and ReLU it absorbed, which follow it in its container (`_run_chain`)."""

    __slots__ = ("bn", "relu", "depth", "backend", "process_group", "memory_efficient", "chain")

    def __init__(self, *, bn=None, relu=False, depth=0, backend=None, process_group=None,
                 memory_efficient=False, chain=None) -> None:
        self.bn, self.relu, self.depth, self.backend, self.process_group = bn, relu, depth, backend, process_group
        self.memory_efficient, self.chain = memory_efficient, chain

    def __getstate__(self):
        # A process group belongs to this process's distributed run and cannot be pickled: copies do not share it.
        return {"bn": self.bn, "relu": self.relu, "depth": self.depth, "backend": self.backend,
                "memory_efficient": self.memory_efficient, "chain": self.chain}

    def __setstate__(self, state) -> None:
        self.__init__(**state)

    def __deepcopy__(self, memo):
        new = FusedConfig(**copy.deepcopy(self.__getstate__(), memo))
        new.process_group = self.process_group
        return new

    def __repr__(self) -> str:
        return (f"FusedConfig(relu={self.relu}, depth={self.depth}, backend={self.backend!r}, "
                f"memory_efficient={self.memory_efficient}, synchronized={self.process_group is not None})")


def fused_config(module: nn.Module) -> FusedConfig | None:
    """The FusedConfig of a fused conv, residual block or ASPP; None for any other module."""
    return getattr(module, _FUSED_ATTR, None)


_UNFUSED_HINT = "deeplab_ops.nn.unfuse_modules(model)"


def _refuse_scripting(self: nn.Module):
    """`__prepare_scriptable__` of the classes fuse_modules gives modules: torch.jit.script raises a clear error."""
    refuse_scripting(self, _UNFUSED_HINT)


def _traced_call(module: nn.Module, x: torch.fx.Proxy) -> torch.fx.Proxy:
    """What torch.fx symbolic tracing records for an nn.Conv2d, nn.BatchNorm2d or nn.ReLU, one of its leaf modules
    (whose class lives in torch.nn): one call_module node. Their fused-away subclasses live elsewhere, so a tracer
    would otherwise trace into their forward (BatchNorm's checks the input's dim: a TraceError)."""
    return x.tracer.create_proxy("call_module", x.tracer.path_of_module(module), (x,), {})


class FusedConv2d(ReleasesDerived, nn.Conv2d):
    """A Conv2d of a fused conv → BatchNorm (→ ReLU) chain. Its container's forward runs the chain as one fused op
    (`_run_chain`); called on its own (a slice of the container, children called by hand, a hook on it, its
    BatchNorm or ReLU, a changed chain, an nn.DataParallel replica) it is a plain convolution, and its BatchNorm and
    ReLU apply themselves."""

    __prepare_scriptable__ = _refuse_scripting

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _traced_call(self, input)
        if "qconfig" in self.__dict__ and self.__dict__["qconfig"] is not None:
            _refuse_quantization(self)
        return nn.Conv2d.forward(self, input)


def _refuse_quantization(conv: nn.Module) -> None:
    """A fused conv given a qconfig (torch.ao.quantization's eager prepare / prepare_qat): those replace modules by
    their exact class, so the fused conv was left as it is: QAT would train no fake-quantization, and convert gave
    the op quantized tensors (an unclear dtype error). Refused, saying what to do instead."""
    raise RuntimeError(
        "a fused convolution (fuse_modules) has a torch.ao.quantization qconfig, but eager-mode prepare and "
        "prepare_qat replace modules by their exact class and leave fused ones as they are: no fake-quantization "
        "would be trained or observed here, and convert fails; call deeplab_ops.nn.unfuse_modules(model) before "
        "setting qconfig and preparing (or quantize with torch.ao.quantization.quantize_fx, which traces the "
        "unfused graph)")


_CONV_ATTR = "_deeplab_ops_fused_into"  # plain attribute of a fused-away BatchNorm or ReLU: a _ConvLink to the conv


class _ConvLink:
    """A fused-away BatchNorm's or ReLU's link to the conv that applies it: weak (`ref`), since the conv's FusedConfig
    holds the BatchNorm and ReLU (a strong link back would make a reference cycle of every fused chain, and a dropped
    fused model, its parameters and its cached folds would then wait for the cyclic garbage collector). A deep copy
    links to the copy of the conv (made through `memo`: the copied container's conv), a pickle to the unpickled
    conv. (A plain object holding a weakref.ref, not a weakref.ref subclass: torch.compile traces calls of the one,
    not of the other.)"""

    __slots__ = ("ref",)

    def __init__(self, conv: nn.Module) -> None:
        self.ref = weakref.ref(conv)

    def __deepcopy__(self, memo):
        conv = self.ref()
        return _link(None if conv is None else copy.deepcopy(conv, memo))

    def __reduce__(self):
        return _link, (self.ref(),)


def _link(conv):
    return None if conv is None else _ConvLink(conv)


class FusedAwayBatchNorm2d(ReleasesDerived, nn.BatchNorm2d):
    """A BatchNorm2d of a fused chain, applied by the fused op when its container runs the chain fused; called on its
    own, it normalizes as nn.BatchNorm2d (across the process group of a synchronized model)."""

    __prepare_scriptable__ = _refuse_scripting

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            return _traced_call(self, x)
        link = self.__dict__.get(_CONV_ATTR)
        # (a module pickled whole by an earlier version holds the conv itself)
        conv = link.ref() if type(link) is _ConvLink else link
        cfg = None if conv is None or self.__dict__.get("_is_replica", False) else conv.__dict__.get(_FUSED_ATTR)
        group = None if cfg is None else cfg.process_group
        return nn.BatchNorm2d.forward(self, x) if group is None else synced_batch_norm(self, group, x)


# fused_conv_bn computes these stand-ins as the Conv2d and BatchNorm2d they replace
CONV2D_FORWARDS.add(FusedConv2d.forward)
BN_FORWARDS.add(FusedAwayBatchNorm2d.forward)


class FusedAwayReLU(nn.ReLU):
    """A ReLU of a fused chain, applied by the fused op when its container runs the chain fused; called on its own,
    a ReLU."""

    __prepare_scriptable__ = _refuse_scripting

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy):
            return _traced_call(self, input)
        return nn.ReLU.forward(self, input)

    def extra_repr(self) -> str:
        return f"fused into the preceding conv, {super().extra_repr() or 'not inplace'}"


def _run_chain(self: nn.Module, x: Tensor, keep: dict | None):
    """A fused chain container's forward: its children in order, each on the previous one's output, a fused conv
    followed by the BatchNorm (and ReLU) it absorbed computed by one fused op; with `keep` (return_layers), the
    OrderedDict of the outputs it names. A chain runs fused only as it was fused: the same modules in a row (read
    from the container now: one replaced, deleted or inserted after fusing makes it run one module after the other,
    as does a hook or an instance `forward` on any of the three, a conv changed into one the op does not compute, a
    return_layers entry naming the conv or BatchNorm, or an nn.DataParallel replica). (Checks inline: no call per
    child.)"""
    items = list(self._modules.items())
    out = None if keep is None else OrderedDict()
    i, n = 0, len(items)
    # torch.fx symbolic tracing (torchvision's create_feature_extractor): the children one by one, as recorded
    traced = isinstance(x, torch.fx.Proxy)
    while i < n:
        name, m = items[i]
        cfg = m.__dict__.get(_FUSED_ATTR) if isinstance(m, FusedConv2d) and not traced else None
        if cfg is not None and "qconfig" in m.__dict__ and m.__dict__["qconfig"] is not None:
            _refuse_quantization(m)
        fused = (cfg is not None and cfg.chain is not None and i + len(cfg.chain) < n
                 and not m.__dict__.get("_is_replica", False) and "forward" not in m.__dict__ and not (
                     m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                     or (keep is not None and name in keep))
                 # a conv changed after fusing into one the op does not compute; a BatchNorm momentum or eps set
                 # to one the op refuses (modules._check_bn_numbers: momentum=1.5, which PyTorch computes with),
                 # as fuse_modules leaves such a pair unfused
                 and m._parameters.get("bias") is None and m.groups == 1 and m.padding_mode == "zeros"
                 and (type(m.padding) is not str or symmetric_padding(m))
                 # (common.bn_momentum_ok and bn_eps_ok, with no call for the usual float: the budget of Python
                 # work per layer, tests/ops/test_conv_bn_relu_host.py)
                 and ((mom := cfg.bn.momentum) is None
                      or (0.0 <= mom <= 1.0 if type(mom) is float else bn_momentum_ok(mom)))
                 and (0.0 < eps < math.inf if type(eps := cfg.bn.eps) is float else bn_eps_ok(eps)))
        if fused:
            for j, (part_name, part) in enumerate(cfg.chain, start=i + 1):
                if (items[j][0] != part_name or items[j][1] is not part or "forward" in part.__dict__
                        or part._forward_hooks or part._forward_pre_hooks or part._backward_hooks
                        or part._backward_pre_hooks
                        or (keep is not None and j < i + len(cfg.chain) and part_name in keep)):
                    fused = False
                    break
        if fused:
            x = fused_conv_bn(m, cfg.bn, x, training=cfg.bn.training, relu=cfg.relu, backend=cfg.backend,
                              process_group=cfg.process_group, memory_efficient=cfg.memory_efficient)
            i += len(cfg.chain)
            name = items[i][0]
        else:
            x = m(x)
        if keep is not None and name in keep:
            out[keep[name]] = x
        i += 1
    return x if keep is None else out


def _fused_sequential_forward(self: nn.Module, input: Tensor) -> Tensor:
    return _run_chain(self, input, None)


def _fused_return_layers_forward(self: nn.Module, x: Tensor) -> OrderedDict:
    return _run_chain(self, x, self.return_layers)


# ---- residual blocks -----------------------------------------------------------------------------------


_BLOCK_PAIRS = {k: tuple((f"conv{i}", f"bn{i}") for i in range(1, k + 1)) for k in (2, 3)}
_BLOCK_NAMES = {k: tuple(n for pair in pairs for n in pair) + ("downsample",) for k, pairs in _BLOCK_PAIRS.items()}


def _block_parts(self: nn.Module, k: int) -> tuple[list, nn.Module | None]:
    """([(conv_i, bn_i) for i = 1..k], downsample) of a residual block with k conv/BN pairs."""
    pairs = _BLOCK_PAIRS[k]
    if reads_directly(type(self), _BLOCK_NAMES[k]):
        modules = self._modules
        try:
            parts = [(modules[c], modules[b]) for c, b in pairs]
            return parts, modules["downsample"] if "downsample" in modules else self.downsample
        except KeyError:  # one was deleted: getattr says what it says
            pass
    return [(getattr(self, c), getattr(self, b)) for c, b in pairs], self.downsample


def _fused_block_forward(self: nn.Module, x: Tensor) -> Tensor:
    cfg = getattr(self, _FUSED_ATTR)
    if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: what the original forward calls, as recorded
        return type(self).original_class.forward(self, x)
    backend, group, lean = cfg.backend, cfg.process_group, cfg.memory_efficient
    parts, downsample = _block_parts(self, cfg.depth)
    relu = self._modules.get("relu") or getattr(self, "relu", None)
    # A part the op does not compute (replaced after fusing: a LeakyReLU, a FrozenBatchNorm2d or SyncBatchNorm, a
    # biased conv, a conv with asymmetric 'same' padding; a BatchNorm momentum set outside [0, 1]), a forward set on
    # a part's instance (monkeypatching, accelerate's hooks) or a hook on a part: the original forward runs the
    # parts, so that what a user changed or hooked is what runs. (Inline: no call per part on every forward.)
    if (type(relu) is not nn.ReLU or "forward" in relu.__dict__ or relu._forward_hooks or relu._forward_pre_hooks
            or relu._backward_hooks or relu._backward_pre_hooks):
        return unfused_call(self, cfg.process_group, type(self).original_class.forward, x)
    for conv, bn in parts:
        if (type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d
                or "forward" in conv.__dict__ or "forward" in bn.__dict__
                or conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks or conv._backward_pre_hooks
                or bn._forward_hooks or bn._forward_pre_hooks or bn._backward_hooks or bn._backward_pre_hooks
                or conv._parameters.get("bias") is not None or conv.groups != 1 or conv.padding_mode != "zeros"
                or (type(conv.padding) is str and not symmetric_padding(conv))
                # (common.bn_momentum_ok and bn_eps_ok, with no call for the usual float, as in _run_chain)
                or not ((mom := bn.momentum) is None
                        or (0.0 <= mom <= 1.0 if type(mom) is float else bn_momentum_ok(mom)))
                or not (0.0 < eps < math.inf if type(eps := bn.eps) is float else bn_eps_ok(eps))):
            return unfused_call(self, cfg.process_group, type(self).original_class.forward, x)
    out = x
    for conv, bn in parts[:-1]:
        out = fused_conv_bn(conv, bn, out, training=bn.training, relu=True, backend=backend, process_group=group,
                            memory_efficient=lean)
    shortcut = x if downsample is None else downsample(x)
    conv, bn = parts[-1]
    return fused_conv_bn(
        conv, bn, out, training=bn.training, residual=shortcut, relu=True, backend=backend, process_group=group,
        memory_efficient=lean,
    )


def _fused_aspp_forward(self: nn.Module, x: Tensor) -> Tensor:
    cfg = getattr(self, _FUSED_ATTR)
    if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: what the original forward calls, as recorded
        return type(self).original_class.forward(self, x)
    # A child the op does not compute (replaced after fusing) or a hook on a part: the original forward runs the
    # children, so that what a user changed or hooked is what runs.
    # BatchNorms that cannot run as one (mixed modes; with momentum=None, different batch counters) likewise.
    parts = runnable_aspp_parts(self)
    if parts is None:
        return unfused_call(self, cfg.process_group, type(self).original_class.forward, x)
    return run_fused_aspp(self, parts, x, cfg.backend, cfg.process_group, cfg.memory_efficient,
                          unfused=type(self).original_class.forward)


_FORWARDS = {"block": _fused_block_forward, "aspp": _fused_aspp_forward, "sequential": _fused_sequential_forward,
             "return_layers": _fused_return_layers_forward}


def _rebuild_fused(original_class: type, kind: str) -> nn.Module:
    """Unpickling / deepcopy helper: an empty instance of the fused subclass of `original_class`."""
    obj = original_class.__new__(original_class)
    obj.__class__ = _fused_class(original_class, kind)
    return obj


def _reduce_fused(self: nn.Module, protocol: int):
    # The fused subclass is made at run time and cannot be found by name; rebuild it from the original class.
    return _rebuild_fused, (type(self).original_class, type(self).fused_kind), self.__dict__


# (id(original class), kind) -> its fused subclass, held weakly: a subclass holds its original class (its base), so
# neither outlives the fused modules that use them (a user's classes made per model, in a loop, are freed); while an
# entry lives, its original class does, and its id names no other class.
_FUSED_CLASSES: weakref.WeakValueDictionary[tuple[int, str], type] = weakref.WeakValueDictionary()
_FUSED_CLASS_SET: weakref.WeakSet[type] = weakref.WeakSet()  # the values of _FUSED_CLASSES
_FUSED_CLASS_LOCK = threading.Lock()


def _fused_class(cls: type, kind: str) -> type:
    """The subclass of `cls` whose forward is the fused one of `kind` (a key of _FORWARDS), made once while fused
    modules use it."""
    with _FUSED_CLASS_LOCK:
        fused = _FUSED_CLASSES.get((id(cls), kind))
        if fused is not None and fused.original_class is cls:  # (never another class at a reused id)
            return fused
        op = {"aspp": "the fused ASPP op", "block": "deeplab_ops.conv_bn_relu"}.get(
            kind, "deeplab_ops.conv_bn_relu for its conv → BatchNorm (→ ReLU) chains")
        fused = type(
            f"{cls.__name__}Fused",
            (ReleasesDerived, cls),
            {
                "__module__": __name__,
                "__doc__": f"{cls.__module__}.{cls.__qualname__} running on {op}.",
                "forward": _FORWARDS[kind],
                "__reduce_ex__": _reduce_fused,
                "__prepare_scriptable__": _refuse_scripting,
                "original_class": cls,
                "fused_kind": kind,
            },
        )
        _FUSED_CLASSES[(id(cls), kind)] = fused
        _FUSED_CLASS_SET.add(fused)
        return fused


def _fused_class_of(module: nn.Module) -> type | None:
    """The fused residual-block, ASPP or chain-container class `module` is an instance of (its class, or one derived
    from it after fusing, as torch.nn.utils.parametrize derives one); None for any other module."""
    for cls in type(module).__mro__:
        if cls in _FUSED_CLASS_SET:
            return cls
    return None


# ---- recognition ---------------------------------------------------------------------------------------


def _fusable(conv: nn.Module, bn: nn.Module, shared: set[int]) -> bool:
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d or id(conv) in shared or id(bn) in shared:
        return False
    try:
        check_fusable(conv, bn)
    except (TypeError, ValueError):
        return False
    return True


def _overrides_a_forward(cls: type) -> bool:
    """Whether module class `cls` overrides the forward of a module class it derives from (a subclass of a residual
    block or ASPP that adds to its forward: what the fused forward would drop)."""
    return sum("forward" in c.__dict__ for c in cls.__mro__ if issubclass(c, nn.Module) and c is not nn.Module) > 1


def _residual_block_depth(module: nn.Module, shared: set[int]) -> int:
    """K when `module` is a post-activation residual block with K conv/BN pairs (K = 2 or 3), else 0. Not one: a
    module with children besides convI, bnI, relu and downsample (its forward uses them: a squeeze-excitation, a
    drop path), parameters or buffers of its own (a ReZero / LayerScale gain), or a subclass that overrides its base
    class's forward."""
    if type(getattr(module, "relu", None)) is not nn.ReLU or not hasattr(module, "downsample"):
        return 0
    if module.downsample is not None and not isinstance(module.downsample, nn.Module):
        return 0
    k = 3 if hasattr(module, "conv3") else 2
    if hasattr(module, f"conv{k + 1}") or hasattr(module, f"bn{k + 1}"):
        return 0
    if (not set(module._modules) <= set(_BLOCK_NAMES[k]) | {"relu"} or module._parameters or module._buffers
            or _overrides_a_forward(type(module))):
        return 0
    for i in range(1, k + 1):
        if not _fusable(getattr(module, f"conv{i}", None), getattr(module, f"bn{i}", None), shared):
            return 0
    if not _computes_residual_block(module, k):
        return 0
    return k


class _PartsTracer(torch.fx.Tracer):
    """Symbolic tracing of a block's forward with every module it calls as one call_module node (none runs)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (torch.relu, torch.relu_, torch.nn.functional.relu)


def _computes_residual_block(module: nn.Module, k: int) -> bool:
    """Whether `module`'s forward computes what the fused block's does, read from its data flow (torch.fx, its
    parts as leaves, in training and in eval mode, so that a branch taken in one mode only is seen):
    `relu(bnK(convK(…relu(bn1(conv1(x)))…)) + shortcut)`, shortcut = downsample(x) (x where downsample is None),
    and nothing else. Names alone do not tell: a pre-activation unit named like torchvision's (bn1 → relu → conv1,
    no ReLU after the add) or one with the ReLU before the add has the same children. A forward that cannot be
    traced symbolically is not fused as a block (its conv → BN chains still may be)."""
    return _traces_as(module, lambda graph, m: _is_block_graph(graph, k, m.downsample is not None))


def _is_block_graph(graph: torch.fx.Graph, k: int, has_downsample: bool) -> bool:
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    outputs = [n for n in nodes if n.op == "output"]
    if len(inputs) != 1 or len(outputs) != 1 or len(outputs[0].args) != 1:
        return False
    x, seen = inputs[0], set()

    def module_call(node, target):
        ok = (isinstance(node, torch.fx.Node) and node.op == "call_module" and node.target == target
              and len(node.args) == 1 and not node.kwargs)
        if ok:
            seen.add(node)
        return ok

    def relu(node):
        ok = isinstance(node, torch.fx.Node) and len(node.args) == 1 and (
            (node.op == "call_module" and node.target == "relu" and not node.kwargs)
            or (node.op == "call_function" and node.target in _RELUS and set(node.kwargs) <= {"inplace"})
            or (node.op == "call_method" and node.target in ("relu", "relu_") and not node.kwargs))
        if ok:
            seen.add(node)
        return ok

    def shortcut(node):
        return module_call(node, "downsample") and node.args[0] is x if has_downsample else node is x

    out = outputs[0].args[0]
    if not relu(out):
        return False
    add = out.args[0]
    if not (isinstance(add, torch.fx.Node) and len(add.args) == 2 and not add.kwargs and (
            (add.op == "call_function" and add.target in _ADDS)
            or (add.op == "call_method" and add.target in ("add", "add_")))):
        return False
    seen.add(add)
    a, b = add.args
    if shortcut(b):
        node = a
    elif shortcut(a):
        node = b
    else:
        return False
    for i in range(k, 0, -1):
        if i < k:
            if not relu(node):
                return False
            node = node.args[0]
        if not module_call(node, f"bn{i}") or not module_call(node.args[0], f"conv{i}"):
            return False
        node = node.args[0].args[0]
    # the input at the end of the chain, and no other computation anywhere (a gain, a second use of a part)
    return node is x and all(n in seen for n in nodes if n.op not in ("placeholder", "output"))


def _is_aspp(module: nn.Module, shared: set[int]) -> bool:
    """Whether `module` has torchvision's ASPP structure with modules the fused ASPP op computes exactly, none of
    them shared, and no other child (`convs` and `project` only), parameter or buffer of its own, or overridden
    forward of a base class; and whether its forward and its pooling branch's compute torchvision's ASPP (the same
    children can be wired otherwise: a residual around it, the branches concatenated in another order)."""
    if (not aspp_fusable(module) or set(module._modules) != {"convs", "project"} or module._parameters
            or module._buffers or _overrides_a_forward(type(module))):
        return False
    convs, bns, _ = aspp_parts(module)
    if not all(_fusable(c, b, shared) for c, b in zip(convs, bns, strict=True)):
        return False
    *branches, pool = module.convs
    if any(type(m).forward is not nn.Sequential.forward for m in (*branches, module.project)):
        return False
    if not (_declared(pool, "aspp_pooling") or _traces_as(pool, _is_pooling)):
        return False
    return _declared(module, "aspp") or _traces_as(module, _is_aspp_graph)


# torchvision's classes, whose forwards are what the fused ASPP computes (named, not imported: torchvision is
# optional); a class of another library may declare the same with `deeplab_ops_chain = "aspp"` / "aspp_pooling".
_KNOWN_ASPP = {("torchvision.models.segmentation.deeplabv3", "ASPP"): "aspp",
               ("torchvision.models.segmentation.deeplabv3", "ASPPPooling"): "aspp_pooling"}


def _declared(module: nn.Module, kind: str) -> bool:
    """Whether the class whose forward `module` runs declares (or is known) to compute `kind`: a subclass that
    overrides that forward declares nothing by inheriting."""
    owner = next(c for c in type(module).__mro__ if "forward" in c.__dict__)
    return (owner.__dict__.get(CHAIN_ATTR) == kind
            or _KNOWN_ASPP.get((owner.__module__, owner.__qualname__)) == kind)


def _traces_as(module: nn.Module, is_graph) -> bool:
    """Whether `module`'s forward, traced symbolically with its children as leaves in training and in eval mode,
    gives graphs `is_graph` accepts, writes nothing of its module's state and draws no Python-level random number;
    False for a forward the tracer cannot follow. What is traced is a stand-in (_tracing_stand_in): the user's module
    is not run, nor changed, and the random generators are left as they were."""
    rngs = _python_rng_states()
    try:
        for mode in (True, False):
            stand_in, state = _tracing_stand_in(module, mode)
            tracer = _PartsTracer()
            try:
                graph = tracer.trace(stand_in)
            except Exception:  # any forward symbolic tracing cannot follow: left as it is
                return False
            finally:
                # The tracer is a reference cycle (its patched functions' closures) holding the module: dropped
                # here, not when the cyclic garbage collector runs, so a fused model dropped later is freed at once.
                tracer.__dict__.clear()
            if _state_of(stand_in) != state or not is_graph(graph, module):
                return False  # (a forward that records features, counts calls, caches: the fused forward would not)
            if not _same_rng_states(rngs, _python_rng_states()):
                # A forward that draws a Python or NumPy random number (stochastic depth: skip the block when
                # random.random() < p) was traced along one draw's branch: its graph is not the forward.
                return False
        return True
    finally:
        _restore_rng_states(rngs)


def _python_rng_states() -> tuple:
    """The states of Python's `random` and, where imported, NumPy's global generator (torch's are read by graph
    nodes, not drawn while tracing)."""
    np = sys.modules.get("numpy")
    return random.getstate(), (np.random.get_state() if np is not None else None)


def _same_rng_states(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[1] is None or b[1] is None:  # NumPy not imported before (nothing of it drawn then)
        return True
    return all(x == y if not hasattr(x, "shape") else bool((x == y).all()) for x, y in zip(a[1], b[1], strict=True))


def _restore_rng_states(states: tuple) -> None:
    random.setstate(states[0])
    np = sys.modules.get("numpy")
    if np is not None and states[1] is not None:
        np.random.set_state(states[1])


_COPIED = (list, dict, set, OrderedDict)


def _tracing_stand_in(module: nn.Module, training: bool) -> tuple[nn.Module, list]:
    """An instance of `module`'s class with the same children and parameters and its own copy of every other
    attribute (lists, dicts and sets copied, shallowly), in mode `training`, and its state (_state_of): a forward's
    writes to its module (`self.feats.append(out)`, `self.calls += 1`, `self.last = out`) land on the stand-in,
    where the state tells them, and not on the user's module."""
    stand_in = object.__new__(type(module))
    stand_in.__dict__.update({k: copy.copy(v) if type(v) in _COPIED else v for k, v in module.__dict__.items()})
    stand_in.__dict__["training"] = training
    return stand_in, _state_of(stand_in)


def _state_of(module: nn.Module) -> list:
    """What a forward may write in `module` itself: each attribute's identity, and a copied container's contents
    (their identities)."""
    state = []
    for key, value in module.__dict__.items():
        items = value.items() if isinstance(value, dict) else value if type(value) in _COPIED else ()
        state.append((key, id(value), [id(v) if not isinstance(v, tuple) else (v[0], id(v[1])) for v in items]))
    return state


def _is_aspp_graph(graph: torch.fx.Graph, module: nn.Module) -> bool:
    """project(cat([convs.0(x), …, convs.R+1(x)], dim=1)) and nothing else."""
    nodes = list(graph.nodes)
    n = len(module.convs)
    if len(nodes) != n + 4 or nodes[0].op != "placeholder" or nodes[-1].op != "output":
        return False
    x, calls, cat, project, out = nodes[0], nodes[1:n + 1], nodes[n + 1], nodes[n + 2], nodes[n + 3]
    if [(c.op, c.target, c.args, c.kwargs) for c in calls] != [("call_module", f"convs.{i}", (x,), {})
                                                                for i in range(n)]:
        return False
    if not (cat.op == "call_function" and cat.target is torch.cat and 1 <= len(cat.args) <= 2
            and set(cat.kwargs) <= {"dim"} and list(cat.args[0]) == calls):
        return False
    if cat.kwargs.get("dim", cat.args[1] if len(cat.args) == 2 else 0) not in (1, -3):  # the channels
        return False
    return (project.op, project.target, project.args, project.kwargs) == ("call_module", "project", (cat,), {}) \
        and out.args == (project,)


def _is_pooling(graph: torch.fx.Graph, module: nn.Module) -> bool:
    """interpolate(children in order on x, size=x's spatial size) (any mode: from 1 x 1, every mode broadcasts), with
    the size read as x.shape[-2:] or x.shape[2:]; nothing else."""
    nodes = list(graph.nodes)
    if not nodes or nodes[0].op != "placeholder" or nodes[-1].op != "output" or len(nodes[-1].args) != 1:
        return False
    x, seen = nodes[0], set()
    node = nodes[-1].args[0]
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function"
            and node.target is torch.nn.functional.interpolate and len(node.args) == 1):
        return False
    seen.add(node)
    size = node.kwargs.get("size")
    # besides size, mode and align_corners, only interpolate's defaults (what fx records for arguments not given)
    defaults = {"scale_factor": None, "recompute_scale_factor": None, "antialias": False}
    others = {k: v for k, v in node.kwargs.items() if k not in ("size", "mode", "align_corners")}
    if any(k not in defaults or v != defaults[k] for k, v in others.items()) or not isinstance(size, torch.fx.Node):
        return False
    shape = size.args[0] if size.op == "call_function" and size.target is operator.getitem else None
    if not (isinstance(shape, torch.fx.Node) and size.args[1] in (slice(-2, None, None), slice(2, None, None))
            and shape.op == "call_function" and shape.target is getattr and shape.args == (x, "shape")):
        return False
    seen.update((size, shape))
    node = node.args[0]
    for i in range(len(module) - 1, -1, -1):
        if not (isinstance(node, torch.fx.Node) and node.op == "call_module" and node.target == str(i)
                and len(node.args) == 1 and not node.kwargs):
            return False
        seen.add(node)
        node = node.args[0]
    return node is x and all(n in seen for n in nodes[1:-1])


# A container class may declare `deeplab_ops_chain = "sequential"` (its forward is nn.Sequential's: the children in
# order, each on the previous one's output) or "return_layers" (that, returning an OrderedDict of the outputs its
# `return_layers` dict names, as torchvision's IntermediateLayerGetter does): fuse_modules then fuses its chains.
CHAIN_ATTR = "deeplab_ops_chain"


def _chain_kind(module: nn.Module) -> str | None:
    """How `module` runs its children, when it is a container whose forward fuse_modules can run with its chains
    fused: "sequential" (nn.Sequential's forward), "return_layers" (torchvision's IntermediateLayerGetter's), or
    None (any other forward: its children may be called in any order, so its chains are left alone)."""
    cls = type(module)
    declared = getattr(cls, CHAIN_ATTR, None)
    if declared in _CHAIN_FORWARDS:
        return declared
    # (nn.Sequential's forward walks `iter(self)`, IntermediateLayerGetter's `self.items()`: a class overriding
    # those chooses what runs, which _run_chain, walking the children, would not follow)
    if isinstance(module, nn.Sequential) and cls.forward is nn.Sequential.forward and cls.__iter__ is (
            nn.Sequential.__iter__):
        return "sequential"
    if (isinstance(getattr(module, "return_layers", None), dict) and isinstance(module, nn.ModuleDict)
            and cls.forward is _intermediate_layer_getter_forward() and cls.items is nn.ModuleDict.items):
        return "return_layers"
    return None


def _intermediate_layer_getter_forward():
    try:
        from torchvision.models._utils import IntermediateLayerGetter
    except ImportError:  # no torchvision: no IntermediateLayerGetter to recognise
        return None
    return IntermediateLayerGetter.forward


_CHAIN_FORWARDS = ("sequential", "return_layers")


def _shared_modules(model: nn.Module) -> set[int]:
    """ids of modules reachable under more than one name: fusing them would change their other uses."""
    seen: set[int] = set()
    shared: set[int] = set()
    for _, m in model.named_modules(remove_duplicate=False):
        (shared if id(m) in seen else seen).add(id(m))
    return shared


# ---- public API ----------------------------------------------------------------------------------------


def fuse_modules(model: nn.Module, backend: str | None = None, memory_efficient: bool = False,
                 channels_last: bool = True) -> nn.Module:
    """Run every conv → BN (→ residual add) → ReLU of `model` on deeplab_ops.conv_bn_relu, in place.

    The state_dict (keys and values) is unchanged, so checkpoints load into the fused and unfused forms alike.
    Calling it again is harmless (a different `backend` replaces the previous one). See the module docstring for
    what is recognised.

    Args:
        model: any nn.Module.
        backend: the deeplab_ops backend for every fused call ("cpu", "cuda", "triton", "reference"), "auto" for
            the automatic choice per call, or None for $DEEPLAB_OPS_BACKEND's choice where it is set, else the
            automatic one (as for the ops).
        memory_efficient: fused convs, residual blocks and ASPPs save no pre-BN activation for the backward
            (deeplab_ops.conv_bn_relu's and deeplab_ops.aspp's memory_efficient; docs/memory_efficient.md).
        channels_last: on CUDA, run the fused model channels_last end to end (the fused kernels' native layout,
            and cuDNN's for bf16/fp16): a 4-D CUDA input is converted once at `model`'s boundary, 4-D outputs are
            returned in the contiguous (NCHW) format, and the model's conv weights are made channels_last now
            (a model on CUDA) or on its first CUDA call (one moved there later: wrap such a model in
            DistributedDataParallel after that call or after `model.to(memory_format=torch.channels_last)`, so
            that DDP records the weights' final strides). CPU inputs pass unchanged.

    Returns:
        `model`, fused.

    In eval, each fused layer folds its BatchNorm into the convolution once and keeps the result while its
    parameters and buffers are unchanged, as their version counters say: a write that bypasses them (through
    `.data`, as old-style EMA updates and `p.data.clamp_()` do) is not seen; call
    `deeplab_ops.common.clear_derived()` after one (docs/ops.md).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_module_options(backend, memory_efficient)  # (as the fused modules: 'auto' accepted)
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {channels_last!r}")
    unfuse_modules(model)
    shared = _shared_modules(model)
    # deeplab_ops.nn's own fused modules run the fused ops already, with their own settings: left as they are
    inside_aspp = {id(m) for top in model.modules() if isinstance(top, (FusedConvBNReLU, FusedASPP))
                   for m in top.modules()}
    modules = [m for m in model.modules() if id(m) not in inside_aspp]
    for module in modules:
        if id(module) not in inside_aspp and _is_aspp(module, shared):
            inside_aspp.update(id(m) for m in module.modules())
            object.__setattr__(module, _FUSED_ATTR, FusedConfig(backend=backend, memory_efficient=memory_efficient))
            module.__class__ = _fused_class(type(module), "aspp")
            settle_aspp(module)
            handle = module.register_load_state_dict_post_hook(settle_after_load)
            object.__setattr__(module, _LOAD_HOOK_ATTR, handle.id)  # (unfuse_modules removes it)
    for module in modules:
        k = _residual_block_depth(module, shared)
        if k:
            object.__setattr__(module, _FUSED_ATTR,
                               FusedConfig(depth=k, backend=backend, memory_efficient=memory_efficient))
            module.__class__ = _fused_class(type(module), "block")
    for container in modules:
        kind = _chain_kind(container)
        if kind is not None and id(container) not in inside_aspp:
            _fuse_chain(container, kind, backend, shared, memory_efficient)
    if channels_last:
        handles = (model.register_forward_pre_hook(_channels_last_in),
                   model.register_forward_hook(_contiguous_out))
        object.__setattr__(model, _BOUNDARY_ATTR, tuple(h.id for h in handles))
        if any(p.device.type == "cuda" for p in model.parameters()):
            _weights_channels_last(model)  # now, before a DistributedDataParallel wrapper records their strides
    return model


# ---- the model boundary: channels_last inside, NCHW outside (CUDA) -------------------------------------

_BOUNDARY_ATTR = "_deeplab_ops_boundary_hooks"  # plain attribute: the ids of the two hooks fuse_modules added


def _channels_last_in(module: nn.Module, args: tuple):
    if not args or not isinstance(args[0], Tensor) or args[0].dim() != 4 or args[0].device.type != "cuda":
        return None
    # Not inside a CUDA-graph capture: the new storage would come from the graph's pool and the recorded copy would
    # rewrite the weights from freed memory at every replay (undoing optimizer steps); the next eager call does it.
    if (not torch.compiler.is_compiling() and not module.__dict__.get("_deeplab_ops_weights_cl", False)
            and not torch.cuda.is_current_stream_capturing()):
        _weights_channels_last(module)
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def _weights_channels_last(module: nn.Module) -> None:
    """Once per model: its 4-D CUDA parameters channels_last (cuDNN would convert NCHW weights on every call)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 4 and p.device.type == "cuda":
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    object.__setattr__(module, "_deeplab_ops_weights_cl", True)


def _nchw(value):
    """`value` with its 4-D CUDA tensors contiguous (NCHW), looked for in lists, tuples and dicts; a container whose
    values all stay the same objects is returned itself (a CPU model's output passes unchanged)."""
    if isinstance(value, Tensor):
        return value.contiguous() if value.dim() == 4 and value.device.type == "cuda" else value
    # (lists, not generators: torch 2.6's dynamo cannot trace a generator)
    if isinstance(value, dict):
        new = [(k, _nchw(v)) for k, v in value.items()]
        if all([n is v for (_, n), v in zip(new, value.values(), strict=True)]):
            return value
        if type(value) in (dict, OrderedDict):
            return type(value)(new)
        out = copy.copy(value)  # a dict subclass (a defaultdict keeps its factory)
        for k, v in new:
            out[k] = v
        return out
    if isinstance(value, (list, tuple)):
        new = [_nchw(v) for v in value]
        if all([n is v for n, v in zip(new, value, strict=True)]):
            return value
        if type(value) in (list, tuple):
            return type(value)(new)
        if hasattr(value, "_fields"):  # a namedtuple
            return type(value)._make(new)
        if isinstance(value, list):
            out = copy.copy(value)
            out[:] = new
            return out
    return value  # a container it cannot rebuild: as it is


def _contiguous_out(module: nn.Module, args: tuple, output):
    return _nchw(output)


def _remove_boundary(model: nn.Module) -> None:
    for hook_id in model.__dict__.pop(_BOUNDARY_ATTR, ()):
        model._forward_pre_hooks.pop(hook_id, None)
        model._forward_hooks.pop(hook_id, None)
    model.__dict__.pop("_deeplab_ops_weights_cl", None)


def _fuse_chain(container: nn.Module, kind: str, backend: str | None, shared: set[int],
                memory_efficient: bool) -> None:
    names = list(container._modules)
    children = list(container._modules.values())
    keep = set(getattr(container, "return_layers", None) or ())
    i = 0
    while i + 1 < len(children):
        conv, bn = children[i], children[i + 1]
        if names[i] in keep or not _fusable(conv, bn, shared):
            i += 1
            continue
        # a return_layers entry naming the BatchNorm keeps its output: the op then stops there, the ReLU runs alone
        relu = (i + 2 < len(children) and type(children[i + 2]) is nn.ReLU and id(children[i + 2]) not in shared
                and names[i + 1] not in keep)
        absorbed = ((names[i + 1], bn), (names[i + 2], children[i + 2])) if relu else ((names[i + 1], bn),)
        if _fused_class_of(container) is None:
            container.__class__ = _fused_class(type(container), kind)
        object.__setattr__(conv, _FUSED_ATTR, FusedConfig(bn=bn, relu=relu, backend=backend,
                                                          memory_efficient=memory_efficient, chain=absorbed))
        conv.__class__ = FusedConv2d
        bn.__class__ = FusedAwayBatchNorm2d
        link = _ConvLink(conv)
        object.__setattr__(bn, _CONV_ATTR, link)
        if relu:
            children[i + 2].__class__ = FusedAwayReLU
            object.__setattr__(children[i + 2], _CONV_ATTR, link)
        i += 3 if relu else 2


def unfuse_modules(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse_modules`, in place: original classes, forwards and children; state_dict unchanged.

    Returns:
        `model`, unfused (a model that was never fused is returned unchanged).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for module in list(model.modules()):
        _remove_boundary(module)
        forget_aspp_parts(module)
        for fused_cls, plain_cls in _PLAIN.items():
            if isinstance(module, fused_cls):
                _restore_class(module, fused_cls, plain_cls)
                module.__dict__.pop(_CONV_ATTR, None)
                module.__dict__.pop(_FUSED_ATTR, None)
                break
        else:
            fused_cls = _fused_class_of(module)
            if fused_cls is not None:
                _restore_class(module, fused_cls, fused_cls.original_class)
                module.__dict__.pop(_FUSED_ATTR, None)
                hook = module.__dict__.pop(_LOAD_HOOK_ATTR, None)
                if hook is not None:
                    module._load_state_dict_post_hooks.pop(hook, None)
    return model


_PLAIN = {FusedAwayReLU: nn.ReLU, FusedConv2d: nn.Conv2d, FusedAwayBatchNorm2d: nn.BatchNorm2d}


def _restore_class(module: nn.Module, fused_cls: type, plain_cls: type) -> None:
    """Give `module` back its unfused class: plain_cls where its class is fused_cls; where its class was derived from
    fused_cls after fusing (torch.nn.utils.parametrize derives one per module it parametrizes), the same class
    derived from plain_cls instead, so the parametrization stays (a new class, made once: a deep copy of the model
    shares the derived class, which must stay as it is for the copy)."""
    module.__class__ = _unfused_class(type(module), fused_cls, plain_cls)


def _unfused_class(cls: type, fused_cls: type, plain_cls: type) -> type:
    if cls is fused_cls:
        return plain_cls
    if not issubclass(cls, fused_cls):
        return cls
    if cls not in _UNFUSED_DERIVED:
        bases = tuple(_unfused_class(b, fused_cls, plain_cls) for b in cls.__bases__)
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        _UNFUSED_DERIVED[cls] = type(cls.__name__.replace(fused_cls.__name__, plain_cls.__name__), bases, namespace)
    return _UNFUSED_DERIVED[cls]


# A class derived from a fused one -> the same derived from the unfused one; weakly keyed: torch's parametrize derives
# one class per module, and an entry goes with its class (the unfused class made from it does not refer to it).
_UNFUSED_DERIVED: weakref.WeakKeyDictionary[type, type] = weakref.WeakKeyDictionary()


def is_fused(module: nn.Module) -> bool:
    """Whether `module` is a fused conv, a fused-away BatchNorm2d or ReLU, a fused residual block or ASPP, or a
    container whose own forward runs a fused chain (a Sequential of conv → BatchNorm → ReLU, now a fused subclass of
    its class); not a container that only holds fused modules."""
    return isinstance(module, (FusedConv2d, FusedAwayBatchNorm2d, FusedAwayReLU)) or _fused_class_of(module) is not None


def fused_batchnorms(model: nn.Module) -> set[int]:
    """ids of the BatchNorms of `model` whose statistics a fused op computes (fused-away ones, those inside a
    FusedConvBNReLU, FusedASPP or a fused residual block or ASPP): `sync_batchnorm` synchronizes them through the op,
    and nn.SyncBatchNorm must not replace them."""
    owned: set[int] = set()
    for m in model.modules():
        if isinstance(m, FusedAwayBatchNorm2d):
            owned.add(id(m))
        elif isinstance(m, (FusedConvBNReLU, FusedASPP)) or (fused_config(m) is not None
                                                              and not isinstance(m, FusedConv2d)):
            owned.update(id(b) for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    return owned


def sync_batchnorm(model: nn.Module, process_group=None, *, unfused: bool = False) -> nn.Module:
    """Share BatchNorm statistics across the processes of `process_group` (default: the whole world) in every
    fused module of `model` — FusedConvBNReLU, FusedASPP and what `fuse_modules` made — as
    nn.SyncBatchNorm.convert_sync_batchnorm does for unfused BatchNorms. In place; call it after fusing (a later
    `fuse_modules` starts from fresh, unsynchronized fused modules).

    unfused=True also replaces every other nn.BatchNorm2d with an nn.SyncBatchNorm (parameters and buffers
    shared), as nn.SyncBatchNorm.convert_sync_batchnorm would, but leaves the fused ones alone. Prefer it to
    nn.SyncBatchNorm.convert_sync_batchnorm on a fused model: that one replaces the fused ones too, and the chains,
    blocks and ASPPs holding them then run unfused (correct, but slower).

    Returns:
        `model` (a new module only where `model` itself is an unfused BatchNorm2d and unfused=True).
    """
    import torch.distributed as dist

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(unfused, bool):
        raise TypeError(f"unfused must be a bool, got {unfused!r}")
    group_name_of(process_group)  # a TypeError unless None or a ProcessGroup
    if process_group is None and not dist.is_initialized():
        raise RuntimeError("sync_batchnorm needs torch.distributed to be initialized (init_process_group) or an "
                           "explicit process_group")
    group = process_group if process_group is not None else dist.group.WORLD
    for module in model.modules():
        if isinstance(module, (FusedConvBNReLU, FusedASPP)):
            module.process_group = group
        cfg = fused_config(module)
        if cfg is not None:
            cfg.process_group = group
    if not unfused:
        return model
    return replace_unfused_batchnorms(
        model, lambda bn: nn.SyncBatchNorm.convert_sync_batchnorm(bn, process_group))


def replace_unfused_batchnorms(model: nn.Module, convert, owned: set[int] | None = None) -> nn.Module:
    """Every nn.BatchNorm2d of `model` that no fused op computes (not in `owned`, default `fused_batchnorms(model)`)
    replaced by `convert(bn)`, in place; returns `model`, or convert(model) where `model` is such a BatchNorm."""
    if owned is None:
        owned = fused_batchnorms(model)

    def walk(module: nn.Module) -> nn.Module:
        if type(module) is nn.BatchNorm2d and id(module) not in owned:
            return convert(module)
        for name, child in list(module._modules.items()):
            if child is not None:
                new = walk(child)
                if new is not child:
                    module._modules[name] = new
        return module

    return walk(model)
