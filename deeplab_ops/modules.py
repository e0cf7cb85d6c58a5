"""nn.Module front ends of the fused ops: FusedConvBNReLU and FusedASPP (torch's state_dict keys and BatchNorm
semantics), and the calls that run existing conv/BN modules on the ops (fused_conv_bn, fused_aspp_forward).
"""

from __future__ import annotations

import collections
import functools
import itertools
import numbers
import operator
import weakref
from typing import NamedTuple

import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.utils import _pair

from deeplab_ops.common import (
    autocast_dtype,
    back_to_back,
    bn_eps_ok,
    bn_momentum_ok,
    check_x_channels,
    conv_layout,
    drop_oldest,
    fake_mode,
    functorch_transform,
    is_functorch_wrapped,
    jit_tracing,
    pair,
    release_derived,
)
from deeplab_ops.ops.aspp import Packed, aspp, checked_rates, is_rate_sequence
from deeplab_ops.ops.conv_bn_relu import checked_config, conv_bn_relu, eval_fast
from deeplab_ops.ops.dispatch import enter_directly, group_name_of

Tensor = torch.Tensor


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """conv.padding as a pair of ints; padding='same' is symmetric only when dilation * (k - 1) is even."""
    if not isinstance(conv.padding, str):
        return _pair(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    pad = []
    kernel = _same_kernel(conv)
    for k, d in zip(kernel, _pair(conv.dilation), strict=True):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(
                f"conv has padding='same' with kernel_size={kernel} and dilation={conv.dilation}, which "
                "needs asymmetric padding; the fused op supports symmetric padding only (use an explicit padding)"
            )
        pad.append(total // 2)
    return tuple(pad)


def _same_kernel(conv: nn.Conv2d) -> tuple[int, int]:
    """The kernel padding='same' pads for: the weight's, as F.conv2d works it out (a weight replaced by one of
    another size leaves conv.kernel_size as built), or conv.kernel_size where the weight is no 4-d tensor of the
    module's own. A parametrized weight is not computed here (its parametrization may have state of its own, as
    spectral_norm's power iteration, which each evaluation moves): conv.kernel_size."""
    weight = conv._parameters.get("weight")
    if weight is None:  # a plain tensor set as the weight (a parametrization is a class property, not here)
        weight = conv.__dict__.get("weight")
    if isinstance(weight, Tensor) and weight.dim() == 4:
        return (weight.shape[2], weight.shape[3])
    return _pair(conv.kernel_size)


def check_fusable(conv: nn.Module, bn: nn.Module) -> None:
    """Raise a clear error unless (conv, bn) is a pair the fused op computes exactly."""
    if type(conv) is not nn.Conv2d:
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"bn must be an nn.BatchNorm2d, got {type(bn).__name__}")
    _check_module_types(conv, bn)  # a BatchNorm2d subclass with a forward of its own
    _check_conv_computable(conv)
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has num_features={bn.num_features} but conv has out_channels={conv.out_channels}")
    _check_bn_numbers(bn)
    _conv_padding(conv)


def _check_bn_numbers(bn: nn.Module) -> None:
    """Raise unless bn's momentum and eps are ones the fused op takes. PyTorch's BatchNorm takes any number for
    either; the op refuses a momentum that is no average's weight and an eps that is not a finite number > 0
    (fusing leaves such a pair unfused; a fused module refuses it when built). Comparisons only: a NaN fails them."""
    momentum = bn.momentum
    if momentum is not None and not bn_momentum_ok(momentum):
        raise ValueError(f"bn has momentum={momentum!r}; the fused op takes None or a number in [0, 1]")
    if not bn_eps_ok(bn.eps):
        raise ValueError(f"bn has eps={bn.eps!r}; the fused op takes a finite number > 0")


def _check_channel_counts(**counts) -> None:
    """Raise unless every count is an int >= 1 (a NumPy int too, as nn.Conv2d takes; not a bool): when a fused
    module is built."""
    for name, value in counts.items():
        try:
            ok = not isinstance(value, bool) and operator.index(value) >= 1
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_conv_computable(conv: nn.Conv2d) -> None:
    """Raise unless the convolution is one the fused op computes: no bias, groups 1, zero padding."""
    if conv.bias is not None:
        raise ValueError(
            "conv has a bias; the fused op needs bias=False (BatchNorm's shift makes a conv bias redundant)"
        )
    if conv.groups != 1:
        raise ValueError(f"conv has groups={conv.groups}; the fused op supports groups=1 only")
    if conv.padding_mode != "zeros":
        raise ValueError(f"conv has padding_mode={conv.padding_mode!r}; the fused op supports 'zeros' only")


def _parametrized_pair(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether conv and bn are an nn.Conv2d and an nn.BatchNorm2d, each that class itself or the class that
    torch.nn.utils.parametrize derived from it (its tensors become properties, its forward is the class's), and no
    bias is parametrized onto the conv (the fused op has no conv bias)."""
    type_of = nn.utils.parametrize.type_before_parametrizations
    return (type_of(conv) is nn.Conv2d and type_of(bn) is nn.BatchNorm2d
            and not nn.utils.parametrize.is_parametrized(conv, "bias"))


def symmetric_padding(conv: nn.Conv2d) -> bool:
    """Whether conv's string padding ('valid', or 'same') is one the fused op computes (symmetric)."""
    try:
        _conv_padding(conv)
    except ValueError:
        return False
    return True


def check_module_options(backend, memory_efficient) -> None:
    """A fused module's backend and memory_efficient, checked when it is built (not at its first call)."""
    from deeplab_ops.backends import BACKENDS, _not_a_backend

    if backend is not None and backend not in ("auto", *BACKENDS):
        raise _not_a_backend("backend", backend)  # the ops' own message
    if not isinstance(memory_efficient, bool):
        raise TypeError(f"memory_efficient must be a bool, got {memory_efficient!r}")


_BatchNorm = nn.modules.batchnorm._BatchNorm


def _bn_type_error(bn, name: str = "bn") -> TypeError:
    """The error for a module given where a BatchNorm module is expected (raised only on that path)."""
    return TypeError(f"{name} must be a BatchNorm module (e.g. nn.BatchNorm2d), got {type(bn).__name__}")


def _check_module_types(conv, bn) -> None:
    """TypeError unless conv is an nn.Conv2d and bn an nn.BatchNorm2d, each computing its class's forward
    (subclasses included: the fused ones, a parametrized one), which is what the fused op computes."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
    if not isinstance(bn, _BatchNorm):
        raise _bn_type_error(bn)
    if not isinstance(bn, nn.BatchNorm2d):  # BatchNorm1d/3d refuse 4-D input themselves
        raise TypeError(f"bn must be a 2-D BatchNorm (nn.BatchNorm2d: the fused op normalizes (N, C, H, W) "
                        f"activations), got {type(bn).__name__}")
    for name, module, base, forwards in (("conv", conv, nn.Conv2d, CONV2D_FORWARDS),
                                         ("bn", bn, nn.BatchNorm2d, BN_FORWARDS)):
        if type(module).forward not in forwards:
            raise TypeError(f"{name} is a {type(module).__name__} with a forward of its own, and the fused op computes "
                            f"{base.__name__}'s: run the modules themselves")


# The forwards of the modules fused_conv_bn computes as a convolution and a BatchNorm: their classes', and those of
# the fused stand-ins deeplab_ops.fusion puts in their place (it adds them), which a fused chain hands to it.
CONV2D_FORWARDS, BN_FORWARDS = {nn.Conv2d.forward}, {nn.BatchNorm2d.forward}
_BN_KEYS = ("bn_weight", "bn_bias", "running_mean", "running_var", "training", "momentum", "eps")
_BN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_CONV_TENSORS = ("weight",)

# (id(cls), names) -> (a weak reference to cls, the answer): a class is not kept alive by this cache (torch's
# parametrize makes one class per module it parametrizes, so a process that builds and drops such models would
# otherwise keep every class); its entry goes with it, and the reference tells a reused id from the class it was.
_DIRECT: dict[tuple, tuple] = {}


def reads_directly(cls: type, names: tuple[str, ...]) -> bool:
    """Whether an instance of nn.Module subclass `cls` gives, for each of `names` it registered (a parameter, buffer
    or submodule), what its _parameters/_buffers/_modules dict holds: nn.Module.__getattr__'s answer, read without
    the failed attribute lookup before it. False when the class looks attributes up its own way (its own
    __getattr__ or __getattribute__) or defines one of `names` itself (a property, as a parametrization adds).
    Worked out once per class; False while torch.compile traces (its graph reads the attributes itself)."""
    if torch.compiler.is_compiling():
        return False
    key = (id(cls), names)
    entry = _DIRECT.get(key)
    if entry is not None and entry[0]() is cls:
        return entry[1]
    direct = (cls.__getattr__ is nn.Module.__getattr__ and cls.__getattribute__ is object.__getattribute__
              and not any(hasattr(cls, n) for n in names))
    _DIRECT[key] = (weakref.ref(cls, lambda _, key=key: _DIRECT.pop(key, None)), direct)
    return direct


def _bn_tensors(bn: nn.Module) -> tuple:
    """bn's (weight, bias, running_mean, running_var, num_batches_tracked), each None where not registered so."""
    if reads_directly(type(bn), _BN_TENSORS):
        try:
            params, buffers = bn._parameters, bn._buffers
            return (params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"],
                    buffers["num_batches_tracked"])
        except KeyError:  # one was deleted: getattr says what it says
            pass
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked


def conv_weight(conv: nn.Module) -> Tensor:
    """conv.weight (from its _parameters dict where that is what getattr returns)."""
    if reads_directly(type(conv), _CONV_TENSORS):
        weight = conv._parameters.get("weight")
        if weight is not None:
            return weight
    return conv.weight


def _bn_call(bn: nn.BatchNorm2d, training: bool) -> tuple:
    """(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, counter) of a fused call that behaves
    as `bn.forward` does in this mode (torch's _BatchNorm.forward: the momentum factor, 1 / num_batches_tracked for
    momentum=None; batch statistics when training or when no running statistics are tracked; running statistics
    passed for update only when tracked). counter: the num_batches_tracked tensor that counts the batch once the
    call succeeded (`bn_step`), or None."""
    weight, bias, rm, rv, tracked = _bn_tensors(bn)
    momentum = bn.momentum
    tracking = bn.track_running_stats
    counter = tracked if training and tracking and tracked is not None else None
    if counter is not None:
        if momentum is None:
            if counter.is_cuda and torch.cuda.is_current_stream_capturing():
                # The factor 1 / (n + 1) would be frozen into the graph (a kernel argument) and the counter's value
                # kept on the host would go stale: every replay would average with the captured n, silently. Eager
                # BatchNorm reads the counter on the host here, which a capture refuses: refuse as clearly.
                raise RuntimeError(
                    f"{type(bn).__name__} with momentum=None (a cumulative average, factor 1 / num_batches_tracked) "
                    "cannot be captured in a CUDA graph: the factor changes every step. Set a momentum, or run "
                    "this BatchNorm outside the graph")
            if torch.compiler.is_compiling():
                # int(counter) would be a data-dependent value in the graph, which the op's float momentum cannot
                # take (the compile failed later with "Expected a value of type 'float' ... found type 'SymFloat'")
                raise RuntimeError(
                    f"{type(bn).__name__} with momentum=None (a cumulative average, factor 1 / num_batches_tracked) "
                    "cannot be traced into a graph (torch.compile, torch.export): the factor is read from the counter "
                    "every step (eager nn.BatchNorm2d cannot be compiled with fullgraph=True either). Set a momentum, "
                    "or leave this module out of the compiled region (torch.compiler.disable)")
            momentum = 1.0 / float(_batches_tracked(counter) + 1)
    elif momentum is None:
        momentum = 0.0
    bn_training = training or (rm is None and rv is None)
    if training and not tracking:
        rm = rv = None
    return weight, bias, rm, rv, bn_training, momentum, bn.eps, counter


# num_batches_tracked values known on the host, so that BatchNorm with momentum=None (the cumulative average, factor
# 1 / num_batches_tracked) reads a CUDA counter from the device once rather than once per call (each read is a host
# synchronization): id(counter) -> (a weak reference to its storage, which evicts the entry when the storage is
# freed, its data pointer, its version, its value): no reference on the counter itself, which swap-on-conversion mode
# could then not swap (common.derived's rule: same storage, address and version, same bytes). Any other write to the
# counter (load_state_dict, in-place ops) changes its version and forces one fresh read; a write through `.data`,
# which PyTorch does not version, is not seen (docs/performance.md). CPU counters are read every call (no sync).
_BATCHES: dict[int, tuple] = {}
_REMEMBERED_DEVICES = ("cuda",)


def _known_batches(counter: Tensor) -> int | None:
    entry = _BATCHES.get(id(counter))
    if (entry is not None and entry[2] == counter._version and entry[1] == counter.data_ptr()
            and entry[0]() is counter.untyped_storage()):
        return entry[3]
    return None


def _batches_tracked(counter: Tensor) -> int:
    """The value of a num_batches_tracked tensor, read from the device only when this module does not know it."""
    if not torch.compiler.is_compiling():
        value = _known_batches(counter)
        if value is not None:
            return value
    value = int(counter)
    _remember_batches(counter, value)
    return value


class ReleasesDerived:
    """A module mixin: what this package caches about its tensors (derived tensors, kept Winograd transforms, known
    batch counts: each watching a tensor's storage, never referring to the tensor, so that PyTorch's
    swap-on-conversion mode can swap it) is dropped before its state is loaded or converted, which makes it stale,
    and what eval calls cached is dropped when the module goes back to training."""

    def _tensors(self) -> list:
        return [*self.parameters(), *self.buffers()]

    def _release(self) -> None:
        tensors = self._tensors()
        release_derived(tensors)
        for t in tensors:
            _BATCHES.pop(id(t), None)
        self.__dict__.pop(_PACKS_ATTR, None)  # (the views a fused ASPP keeps of the old storages: freed with them)

    def train(self, mode: bool = True):
        # The mode this method last set, not self.training: torch.compile's wrapper sets its module's `training`
        # before Module.train reaches it.
        if mode and not self.__dict__.get("_mode_set", self.training):
            # Back to training after eval calls: what they cached (BatchNorm folded into the weights, the cpu
            # backend's kept Winograd transforms) is stale from the first optimizer step on, and would otherwise be
            # held, a copy of the weights and more, until the next eval call replaces it.
            release_derived(self._tensors())
        self.__dict__["_mode_set"] = bool(mode)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._release()
        out = super()._apply(fn, recurse)
        self._settle()  # (a conversion gave each tensor a storage of its own)
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        self._settle()  # (copy.deepcopy gives each parameter a storage of its own)

    def _settle(self) -> None:
        if isinstance(self, FusedASPP) or getattr(type(self), "fused_kind", None) == "aspp":
            settle_aspp(self)

    def _load_from_state_dict(self, *args, **kwargs):
        self._release()
        return super()._load_from_state_dict(*args, **kwargs)


# Counters whose increment a CUDA graph recorded: each replay adds to them with no Python call and no version bump,
# so no value of theirs is kept on the host any more (each momentum=None call reads the device). id -> a weak reference
# to its storage (none to the counter: swap-on-conversion mode swaps it), which drops the entry when that is freed.
_CAPTURED: dict[int, weakref.ref] = {}


def _remember_batches(counter: Tensor, value: int) -> None:
    if counter.device.type not in _REMEMBERED_DEVICES or torch.compiler.is_compiling() or counter.is_inference():
        return
    key = id(counter)
    if key in _CAPTURED:
        return
    storage = weakref.ref(counter.untyped_storage(), lambda _, key=key: _BATCHES.pop(key, None))
    _BATCHES[key] = (storage, counter.data_ptr(), counter._version, value)


def _mark_captured(counters) -> None:
    """Counters counted inside a CUDA-graph capture: their host values forgotten, and never kept again."""
    for c in counters:
        key = id(c)
        _BATCHES.pop(key, None)
        _CAPTURED[key] = weakref.ref(c.untyped_storage(), lambda _, key=key: _CAPTURED.pop(key, None))


def _count_inference(counter: Tensor) -> None:
    """After `counter.add_(1)` raised: a BatchNorm made under torch.inference_mode() (a model built or loaded there)
    trained outside it with no graph (recalibration under no_grad) has inference tensors, which PyTorch refuses to
    update in place outside inference mode, after its kernel wrote them (torch 2.6-2.14: the add is done). The op
    wrote the running statistics as eager's kernel writes them (ops/conv_bn_relu.py), so the batch is counted and the
    refusal dropped, rather than leave the statistics updated and the error raised. (Eager nn.BatchNorm2d raises
    there: its own num_batches_tracked.add_(1), which runs before F.batch_norm, is refused after counting, and its
    running statistics are left as they were.) Any other error is raised again."""
    if not counter.is_inference():
        raise  # the error being handled by the caller


def _capturing(t: Tensor) -> bool:
    """Whether `t` is a CUDA tensor and a CUDA graph is being captured on the current device's current stream."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _count_batch(counter: Tensor) -> None:
    """num_batches_tracked += 1, as nn.BatchNorm2d.forward does, keeping its value known on the host."""
    known = _known_batches(counter) if _BATCHES else None
    try:
        counter.add_(1)
    except RuntimeError:
        _count_inference(counter)
    # Recorded in a CUDA graph, not run: replays run it unseen. The gate is an attribute read per count (not a device
    # object, nor a call); CPU counters pass it only while tests run the CUDA rule on them (_REMEMBERED_DEVICES).
    if (counter.is_cuda or len(_REMEMBERED_DEVICES) > 1) and _capturing(counter):
        _mark_captured((counter,))
    elif known is not None:
        _remember_batches(counter, known + 1)


# What torch.utils.checkpoint(use_reentrant=False) raises to stop a recomputation once the region's last saved tensor
# is packed (private to torch: None where a version has none). The fused ops write their running statistics before
# they save anything, as eager BatchNorm does; a stop raised from their save counts the batch too, as eager's
# BatchNorm counted it before its op.
_STOP_RECOMPUTATION = getattr(torch.utils.checkpoint, "_StopRecomputationError", None)


def _count_if_stopped(error: BaseException, counters) -> None:
    if _STOP_RECOMPUTATION is not None and isinstance(error, _STOP_RECOMPUTATION):
        for counter in counters:
            _count_batch(counter)


def _bn_args(bn: nn.BatchNorm2d, training: bool) -> tuple:
    """(bn_weight, bn_bias, running_mean, running_var, training, momentum, eps) of a fused call that behaves as
    `bn.forward` does in this mode (see `_bn_call`)."""
    return _bn_call(bn, training)[:7]


def bn_call_args(bn: nn.BatchNorm2d, training: bool) -> dict:
    """The BatchNorm arguments of a fused call that behaves as `bn.forward` does in this mode, by name.
    num_batches_tracked is not incremented here: `bn_step` does it after the call succeeded, so a failed call
    changes nothing the user saved."""
    if not isinstance(bn, _BatchNorm):
        raise _bn_type_error(bn)
    return dict(zip(_BN_KEYS, _bn_args(bn, training), strict=True))


def bn_step(bn: nn.BatchNorm2d, training: bool) -> None:
    """Count one training batch, as nn.BatchNorm2d.forward does."""
    if not isinstance(bn, _BatchNorm):
        raise _bn_type_error(bn)
    if training and bn.track_running_stats:
        counter = _bn_tensors(bn)[4]
        if counter is not None:
            _count_batch(counter)


def synced_batch_norm(bn: nn.BatchNorm2d, group, x: Tensor) -> Tensor:
    """`bn.forward(x)` with the training statistics computed across the processes of `group`, as nn.SyncBatchNorm
    computes them, on CPU tensors too: what a synchronized fused op's BatchNorm computes, for a fused module's part
    that runs on its own (hooked, or replaced after fusing). Batch statistics (mean, then the centred sum of
    squares: two passes) are summed over the group with a differentiable all-reduce, so the backward sums the
    statistics' gradients over the group as well; the running variance is unbiased over the global count."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    bn._check_input_dim(x)
    weight, bias, rm, rv, bn_training, momentum, eps, counter = _bn_call(bn, bn.training)
    if not bn_training or dist.get_world_size(group) == 1:
        out = torch.nn.functional.batch_norm(x, rm, rv, weight, bias, bn_training, momentum, eps)
    else:
        c = x.shape[1]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        shape = (1, c, 1, 1)
        local = torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), x.numel() // max(c, 1))])
        total = all_reduce(local, group=group)
        count = total[c:].detach()  # on the device: no host synchronization
        if x.device.type == "cpu" and int(count) == 1:  # (on CPU the look costs no synchronization: as the fused op)
            raise ValueError(
                f"training BatchNorm needs more than 1 value per channel over the process group's batches, got 1 "
                f"({x.numel() // max(c, 1)} on this process, shape {list(x.shape)}); use larger batches, or freeze "
                "the BatchNorm layers (call .eval() on them)")
        mean = total[:c] / count
        centred = xf - mean.view(shape)
        var = all_reduce((centred * centred).sum((0, 2, 3)), group=group) / count
        out = centred * torch.rsqrt(var + eps).view(shape)
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        out = out.to(x.dtype)
        if rm is not None:
            with torch.no_grad():
                # no value in the whole group (every process's batch empty): the statistics stay as they are, as
                # the fused op leaves them (decided on the device: no host synchronization)
                seen = count > 0
                rm.copy_(torch.where(seen, rm * (1 - momentum) + mean.to(rm.dtype) * momentum, rm))
                rv.copy_(torch.where(seen, rv * (1 - momentum)
                                     + (var * count / (count - 1)).to(rv.dtype) * momentum, rv))
    if counter is not None:
        _count_batch(counter)
    return out


def unfused_call(module: nn.Module, process_group, forward, *args) -> Tensor:
    """`forward(module, *args)`: a fused module's children run one by one (a part replaced after fusing or hooked).
    With a process group (`sync_batchnorm`), its nn.BatchNorm2d children, whose statistics the fused op would
    share, compute their training statistics across the group meanwhile (`synced_batch_norm`)."""
    if process_group is None:
        return forward(module, *args)
    bns = [m for m in module.modules() if type(m) is nn.BatchNorm2d and "forward" not in m.__dict__]
    for bn in bns:
        bn.forward = functools.partial(synced_batch_norm, bn, process_group)
        bn.forward.deeplab_ops_synchronized = True  # (model's ASPP pooling branch leaves its batch-1 check to it)
    try:
        return forward(module, *args)
    finally:
        for bn in bns:
            bn.__dict__.pop("forward", None)


def refuse_scripting(module: nn.Module, unfused: str) -> None:
    """What torch.jit.script gets from a fused module (its `__prepare_scriptable__`): a clear error where TorchScript's
    own, raised deep in compiling the Python the fused forwards run (the checks, caches and fallbacks around the ops),
    names neither the module nor what to use instead. `unfused`: how to get the module's unfused form."""
    raise RuntimeError(
        f"torch.jit.script cannot compile {type(module).__name__}: deeplab_ops' fused modules run Python that "
        f"TorchScript does not support. Use torch.compile or torch.export (or torch.jit.trace), or script the "
        f"unfused form where it is scriptable: {unfused} (the same state_dict)")


_GEOMETRY: dict[tuple, tuple] = {}


def _geometry(conv: nn.Conv2d) -> tuple:
    """(stride, padding, dilation) of `conv` as pairs, worked out once per distinct configuration."""
    if torch.compiler.is_compiling():  # a traced graph reads no Python cache (it would guard on it)
        return _pair(conv.stride), _conv_padding(conv), _pair(conv.dilation)
    padding = conv.padding
    # (padding='same' works out from the weight's kernel, which may not be conv.kernel_size: see _same_kernel)
    key = (_same_kernel(conv) if type(padding) is str else conv.kernel_size, conv.stride, padding, conv.dilation)
    try:
        geometry = _GEOMETRY.get(key)
    except TypeError:  # a list set as an attribute after construction (nn.Conv2d takes one): not cached
        return _pair(conv.stride), _conv_padding(conv), _pair(conv.dilation)
    if geometry is None:
        geometry = (_pair(conv.stride), _conv_padding(conv), _pair(conv.dilation))
        if len(_GEOMETRY) >= 4096:  # bounded, the oldest out first (as checked configurations)
            drop_oldest(_GEOMETRY)
        _GEOMETRY[key] = geometry
    return geometry


def _fold_sources(conv: nn.Module, bn_tensors: tuple) -> tuple | None:
    """(conv weight, bn weight, bias, running_mean, running_var), what BatchNorm folds into the conv in eval, as
    getattr gives them (bn_tensors: `_bn_tensors(bn)`); None when bn has no running statistics (it then normalizes
    with the batch's, eval or not) or the conv's weight is not a tensor (the full path refuses it with its error)."""
    weight, (bn_weight, bn_bias, rm, rv, _) = conv_weight(conv), bn_tensors
    if rm is None or rv is None or not isinstance(weight, Tensor):
        return None
    return weight, bn_weight, bn_bias, rm, rv


_COUNTER_SEEN = "_deeplab_ops_counter_seen"  # plain attribute of a BatchNorm: its counter's version at an eval call
_STATISTICS_SEEN = "_deeplab_ops_statistics_seen"  # (of a BatchNorm without counter: its statistics' values, copied)


def _drop_folds_if_statistics_moved(bn: nn.Module, rm, rv) -> None:
    """For a BatchNorm with running statistics and no counter (num_batches_tracked set to None), where nothing tells
    of torch's own updates (its batch_norm writes the statistics without a version bump): what is cached of the
    statistics is dropped when their values differ from those the last eval call saw (a copy kept on the module:
    two comparisons of C values per call), and at the first such call (a fold may have been cached while the
    counter was there). On a GPU, where a comparison read on the host would synchronize, it is dropped at every
    eval call instead (the fold rebuilt per call)."""
    if (not isinstance(rm, Tensor) or not isinstance(rv, Tensor) or rm.device.type == "meta"
            or fake_mode() is not None or functorch_transform() is not None):  # (no values to compare, none kept)
        return
    if rm.device.type != "cpu" or rv.device.type != "cpu":
        release_derived([rm, rv])
        return
    seen = bn.__dict__.get(_STATISTICS_SEEN)
    # (the copy is of CPU tensors, as rm and rv are here)
    if (seen is not None and seen[0].shape == rm.shape and seen[1].shape == rv.shape and seen[0].dtype == rm.dtype
            and seen[1].dtype == rv.dtype and torch.equal(seen[0], rm) and torch.equal(seen[1], rv)):
        return
    release_derived([rm, rv])
    with torch.no_grad(), torch.inference_mode(False):
        bn.__dict__[_STATISTICS_SEEN] = (rm.detach().clone(), rv.detach().clone())


def fused_conv_bn(
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d,
    x: Tensor,
    *,
    training: bool,
    residual: Tensor | None = None,
    relu: bool = True,
    backend: str | None = None,
    process_group=None,
    memory_efficient: bool = False,
) -> Tensor:
    """`act(bn(conv(x)) [+ residual])` through the fused op, with exactly the modules' semantics
    (memory_efficient: see deeplab_ops.conv_bn_relu)."""
    if (getattr(type(conv), "forward", None) not in CONV2D_FORWARDS
            or getattr(type(bn), "forward", None) not in BN_FORWARDS or not isinstance(bn, nn.BatchNorm2d)):
        _check_module_types(conv, bn)
    # what the op would silently drop (the bias read from _parameters: no nn.Module.__getattr__ per call)
    if conv._parameters.get("bias") is not None or conv.padding_mode != "zeros" or conv.groups != 1:
        _check_conv_computable(conv)
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != conv.in_channels:
        check_x_channels(x, conv_weight(conv), "conv")
    if process_group is not None:
        group_name_of(process_group)  # its type checked in eval too, where the op does not use it
    # eval: once the fold is cached (float32/float64; half dtypes: a mark that the parameters passed the full
    # checks, conv_bn_relu_eval running them unfolded), only x and residual are checked; not under torch.autocast
    # for x's device in another dtype, where the op casts x and the weight first (a half dtype: the unfolded path).
    # Autocast for another device, for float64 x, or in x's own dtype (a half model; eval_fast declines a weight or
    # residual autocast would cast) casts nothing here: the fast path stays.
    if not training:
        # torch's own batch_norm updates the running statistics in place without bumping their version counters
        # (its schema marks no write), which the cached eval folds key on. It runs where a fused chain's or block's
        # BatchNorm is called as a module in training: a hook on one of its parts, a slice, a torch.fx view
        # (create_feature_extractor), an nn.DataParallel replica; nn.BatchNorm2d.forward counts that batch with
        # num_batches_tracked.add_(1), which bumps the counter's version. A version other than the one the last eval
        # call saw drops what is cached of the statistics, so that no fold of their old values is used (after a fused
        # training call too, whose fold was stale already). Not by bumping their version counters: an eager
        # BatchNorm's graph saves them, and its backward would then refuse them. (Inline: the eval fast path's
        # Python-work budget.)
        tensors = _bn_tensors(bn)
        counter = tensors[4]
        if counter is not None and not torch.compiler.is_compiling() and not counter.is_inference():
            seen = bn.__dict__.get(_COUNTER_SEEN)
            if seen != counter._version:
                if seen is not None:
                    release_derived([t for t in tensors[2:4] if isinstance(t, Tensor)])
                bn.__dict__[_COUNTER_SEEN] = counter._version
                bn.__dict__.pop(_STATISTICS_SEEN, None)  # (a counter given back: compared anew if it goes again)
        elif counter is None and tensors[2] is not None and not torch.compiler.is_compiling():
            _drop_folds_if_statistics_moved(bn, tensors[2], tensors[3])
    if not training and enter_directly(x) and (not torch._C._is_any_autocast_enabled()
                                               or autocast_dtype(x) in (None, x.dtype)):
        sources = _fold_sources(conv, tensors)
        if sources is not None:
            x = conv_layout(x, sources[0])  # channels_last where x or the weight is, as conv_bn_relu lays it out
            # The configuration as the full path checks it (once per configuration): eval ignores the momentum,
            # which BatchNorm may leave None.
            geometry = checked_config(*_geometry(conv), False, 0.0 if bn.momentum is None else bn.momentum, bn.eps,
                                      relu)
            out = eval_fast(x, *sources, geometry, float(bn.eps), residual, relu, backend)
            if out is not None:
                return out
    bn_weight, bn_bias, rm, rv, bn_training, momentum, eps, counter = _bn_call(bn, training)
    stride, padding, dilation = _geometry(conv)
    try:
        out = conv_bn_relu(
            x, conv_weight(conv), bn_weight, bn_bias, rm, rv, stride=stride, padding=padding, dilation=dilation,
            training=bn_training, momentum=momentum, eps=eps, residual=residual, relu=relu, backend=backend,
            process_group=process_group, memory_efficient=memory_efficient,
        )
    except Exception as error:
        if counter is not None:
            _count_if_stopped(error, (counter,))
        raise
    if counter is not None:  # bn_step: the batch counted once the call succeeded
        if _BATCHES:
            _count_batch(counter)
        else:  # no counter value kept on the host (no CUDA momentum=None BatchNorm): no call for it
            try:
                counter.add_(1)
            except RuntimeError:
                _count_inference(counter)
    return out


class FusedConvBNReLU(ReleasesDerived, nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d (→ + residual) → ReLU as one fused op.

    Children and state_dict keys are those of ``nn.Sequential(nn.Conv2d(..., bias=False), nn.BatchNorm2d(...),
    nn.ReLU())`` (``nn.Sequential(conv, bn)`` when relu=False), so a checkpoint of either loads into the other.
    memory_efficient=True saves no pre-BN activation for the backward (see deeplab_ops.conv_bn_relu).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        relu: bool = True,
        *,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        backend: str | None = None,
        memory_efficient: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {relu!r}")
        check_module_options(backend, memory_efficient)
        _check_channel_counts(in_channels=in_channels, out_channels=out_channels)
        # (nn.Conv2d takes a kernel of 0 and a negative padding, failing at the first forward only.)
        geometry = [("kernel_size", kernel_size, 1), ("stride", stride, 1), ("dilation", dilation, 1)]
        if not isinstance(padding, str):  # 'same' or 'valid': nn.Conv2d checks the string
            geometry.append(("padding", padding, 0))
        for name, value, low in geometry:
            if min(pair(value, name)) < low:  # pair: TypeError naming it for anything but an int or two
                raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {value!r}")
        conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False, device=device, dtype=dtype
        )
        bn = nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        _check_bn_numbers(bn)  # when built, not at the first forward
        super().__init__(conv, bn, *([nn.ReLU()] if relu else []))
        self.apply_relu = relu
        self.backend = backend
        self.memory_efficient = memory_efficient
        self.process_group = None  # set by sync_batchnorm(): statistics shared across processes

    @classmethod
    def from_modules(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True, backend: str | None = None,
        memory_efficient: bool = False,
    ) -> FusedConvBNReLU:
        """Wrap existing modules (their parameters and buffers are shared, not copied)."""
        check_fusable(conv, bn)
        if not isinstance(relu, bool):
            raise TypeError(f"relu must be a bool, got {relu!r}")
        check_module_options(backend, memory_efficient)  # as the constructor checks them: when built
        self = cls.__new__(cls)
        nn.Sequential.__init__(self, conv, bn, *([nn.ReLU()] if relu else []))
        self.apply_relu = relu
        self.backend = backend
        self.memory_efficient = memory_efficient
        self.process_group = None
        return self

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: the children, as nn.Sequential calls them
            if (isinstance(residual, torch.fx.Proxy) and residual.node.op == "placeholder"
                    and residual.node.args == (None,) and getattr(residual.tracer, "root", None) is self):
                # symbolic_trace of this module itself: the residual is the traced forward's argument that
                # defaults to None, traced as left out (an add of it failed every call without one); the traced
                # module refuses one rather than leave it out silently. (A module that passes its own optional
                # argument on traces the add: it was traced to take one.)
                _refuse_residual(residual)
                residual = None
            return self._unfused_forward(x, residual)
        modules = self._modules  # self[0], self[1] without nn.Sequential's indexing
        conv, bn, relu = modules.get("0"), modules.get("1"), modules.get("2")
        # The fused op computes exactly these children: an nn.Conv2d without bias, with groups 1, zero and symmetric
        # padding, an nn.BatchNorm2d and a ReLU if relu=True — those very classes (a subclass's forward may compute
        # anything: a weight-standardized conv, a SyncBatchNorm that nn.SyncBatchNorm.convert_sync_batchnorm put
        # there; torch.nn.utils.parametrize's derived class of one of them is it), no forward set on the instance,
        # nothing appended, and no hooks on them. Otherwise the children run one by one as nn.Sequential runs them
        # (the residual added before the third), so that what a user changed or hooked is what runs. (Inline: no
        # call per child on every forward; only a parametrized child or a string padding calls a helper.) A momentum
        # or eps set to one the op refuses is refused, as when the module was built.
        if (len(modules) != (3 if self.apply_relu else 2)
                or ((type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d)
                    and not _parametrized_pair(conv, bn))
                or (relu is not None and type(relu) is not nn.ReLU)
                or conv._parameters.get("bias") is not None or conv.groups != 1 or conv.padding_mode != "zeros"
                or (type(conv.padding) is str and not symmetric_padding(conv))
                or "forward" in conv.__dict__ or "forward" in bn.__dict__
                or conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks or conv._backward_pre_hooks
                or bn._forward_hooks or bn._forward_pre_hooks or bn._backward_hooks or bn._backward_pre_hooks
                or (relu is not None and ("forward" in relu.__dict__ or relu._forward_hooks
                                          or relu._forward_pre_hooks or relu._backward_hooks
                                          or relu._backward_pre_hooks))):
            return unfused_call(self, self.process_group, type(self)._unfused_forward, x, residual)
        # The BatchNorm's own mode, as nn.Sequential runs it: a frozen BatchNorm (block.train(); block[1].eval())
        # normalizes with its running statistics and leaves them alone.
        return fused_conv_bn(
            conv, bn, x, training=bn.training, residual=residual, relu=self.apply_relu,
            backend=self.backend, process_group=self.process_group,
            memory_efficient=getattr(self, "memory_efficient", False),  # modules pickled before the option
        )

    def __getitem__(self, idx):
        # nn.Sequential builds a slice as self.__class__(OrderedDict(...)), which this constructor cannot take: a slice
        # of the fused block is the plain nn.Sequential of those children (the same modules), computing what the
        # unfused Sequential's slice computes.
        if isinstance(idx, slice):
            return nn.Sequential(collections.OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)

    def __prepare_scriptable__(self):
        refuse_scripting(self, "nn.Sequential(nn.Conv2d(..., bias=False), nn.BatchNorm2d(...), nn.ReLU())")

    def _unfused_forward(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if residual is None:
            return nn.Sequential.forward(self, x)
        children = list(self._modules.values())
        y = children[1](children[0](x)) + residual
        for child in children[2:]:
            y = child(y)
        return y

    def extra_repr(self) -> str:
        return f"relu={self.apply_relu}, backend={self.backend!r}" + (
            ", memory_efficient=True" if getattr(self, "memory_efficient", False) else ""
        )


def _refuse_residual(residual: Tensor | None) -> None:
    """In a torch.fx trace of a FusedConvBNReLU itself (its residual argument traced as left out): refuse one."""
    if residual is not None:
        raise ValueError(
            "residual: got a tensor, but this module is a torch.fx trace of a FusedConvBNReLU called without one, "
            "so its graph adds none; trace a module that passes the residual to it (the residual is then traced "
            "in), or call this one without"
        )


torch.fx.wrap("_refuse_residual")  # recorded in a traced graph as a call, not run once while tracing
if hasattr(torch.fx.node, "has_side_effect"):  # torch >= 2.5: kept by eliminate_dead_code
    torch.fx.node.has_side_effect(_refuse_residual)


def aspp_parts(module: nn.Module) -> tuple[list[nn.Conv2d], list[nn.BatchNorm2d], tuple[int, ...]]:
    """Conv and BN modules of an ASPP with torchvision's structure, in the fused op's order, and its rates:
    ([1×1 branch, one 3×3 per rate, pooling, projection] convs, the BNs in the same order, rates)."""
    convs, bns, rates = [], [], []
    branch_list, project = getattr(module, "convs", None), getattr(module, "project", None)
    if (not isinstance(module, nn.Module) or not isinstance(branch_list, (nn.ModuleList, nn.Sequential))
            or not isinstance(project, nn.Sequential)):
        raise TypeError(
            f"module must be an ASPP with torchvision's structure (convs: a ModuleList of branches, project: a "
            f"Sequential of conv, BatchNorm, ReLU), got {type(module).__name__}"
        )
    branches = list(branch_list)
    for i, branch in enumerate(branches):
        need = 3 if i == len(branches) - 1 else 2
        if not isinstance(branch, nn.Sequential) or len(branch) < need:
            what = "(pooling, conv, BatchNorm, ReLU)" if need == 3 else "(conv, BatchNorm, ReLU)"
            raise ValueError(f"convs.{i} must be a Sequential {what}, got {type(branch).__name__}")
    if len(project) < 2:
        raise ValueError(f"project must be a Sequential (conv, BatchNorm, ReLU, ...), got {len(project)} modules")
    if len(branches) < 2:
        raise ValueError(f"an ASPP needs a 1x1 branch and a pooling branch, got {len(branches)} branches")
    for i, branch in enumerate(branches[:-1]):
        conv, bn = branch[0], branch[1]
        check_fusable(conv, bn)
        k = 1 if i == 0 else 3
        if _pair(conv.kernel_size) != (k, k) or _pair(conv.stride) != (1, 1):
            raise ValueError(f"convs.{i} must be a {k}x{k} stride-1 conv, got {conv}")
        if i == 0:
            _check_pointwise(conv, "convs.0")
        else:
            r = _pair(conv.dilation)[0]
            if _pair(conv.dilation) != (r, r) or _conv_padding(conv) != (r, r):
                raise ValueError(f"convs.{i} must have dilation = padding = rate, got {conv}")
            rates.append(r)
        convs.append(conv)
        bns.append(bn)
    pooling = branches[-1]
    if (type(pooling[0]).forward is not nn.AdaptiveAvgPool2d.forward  # a subclass computing another pooling
            or pooling[0].output_size not in (1, (1, 1))):
        raise ValueError(f"convs.{len(branches) - 1} must be the image-pooling branch, got {pooling}")
    # What the op computes around the convs and BatchNorms: a ReLU after each, dropouts after the projection, and
    # containers that run their children in order (a branch or projection with a forward of its own is not
    # Sequential's, whatever its children: fused, its forward would be skipped).
    for i, branch in enumerate(branches):
        pool = i == len(branches) - 1  # (the pooling branch's own forward is judged by whoever fuses it)
        if len(branch) != (4 if pool else 3) or type(branch[-1]) is not nn.ReLU:
            raise ValueError(f"convs.{i} must end in an nn.ReLU after its BatchNorm, and hold nothing after it (the "
                             f"fused op computes that), got {branch}")
        if not pool and type(branch).forward is not nn.Sequential.forward:
            raise ValueError(f"convs.{i} must run its children in order (nn.Sequential's forward; the fused op "
                             f"computes that), got a {type(branch).__name__} with a forward of its own")
    if len(project) < 3 or type(project[2]) is not nn.ReLU or not all(
            isinstance(m, nn.Dropout) for m in list(project)[3:]):
        raise ValueError(f"project must be (conv, BatchNorm, nn.ReLU) and dropouts (what the fused op computes), got "
                         f"{project}")
    if type(project).forward is not nn.Sequential.forward:
        raise ValueError(f"project must run its children in order (nn.Sequential's forward; the fused op computes "
                         f"that), got a {type(project).__name__} with a forward of its own")
    check_fusable(pooling[1], pooling[2])
    _check_pointwise(pooling[1], f"convs.{len(branches) - 1}.1", stride=False)  # any stride maps 1x1 to 1x1
    convs.append(pooling[1])
    bns.append(pooling[2])
    check_fusable(module.project[0], module.project[1])
    _check_pointwise(module.project[0], "project.0")
    # The op's widths: every branch (the pooling one included) maps the input's C_in channels to the same C, and the
    # projection maps their concatenation, (R + 2) * C channels, to C.
    names = [f"convs.{i}" for i in range(len(branches) - 1)] + [f"convs.{len(branches) - 1}.1"]
    width, c_in = convs[0].out_channels, convs[0].in_channels
    for name, conv in zip(names, convs, strict=True):
        if conv.out_channels != width or conv.in_channels != c_in:
            raise ValueError(f"{name} must map {c_in} to {width} channels as convs.0 does (the fused ASPP's branches "
                             f"have one width), got {conv.in_channels} to {conv.out_channels}")
    project_conv = module.project[0]
    if project_conv.in_channels != len(convs) * width or project_conv.out_channels != width:
        raise ValueError(f"project.0 must map the branches' {len(convs)} x {width} = {len(convs) * width} channels to "
                         f"{width} (the fused ASPP's width), got {project_conv.in_channels} to "
                         f"{project_conv.out_channels}")
    convs.append(project_conv)
    bns.append(module.project[1])
    return convs, bns, tuple(rates)


def _check_pointwise(conv: nn.Conv2d, name: str, stride: bool = True) -> None:
    """Raise unless `conv` is the 1x1 convolution without padding (and, with `stride`, of stride 1) that the fused
    ASPP op computes for the 1x1 branch, the pooling branch and the projection (another padding or stride changes
    the output's size or values: the op would silently compute the plain 1x1 convolution instead)."""
    if (_pair(conv.kernel_size) != (1, 1) or _conv_padding(conv) != (0, 0)
            or (stride and _pair(conv.stride) != (1, 1))):
        what = "1x1 stride-1 conv without padding" if stride else "1x1 conv without padding"
        raise ValueError(f"{name} must be a {what}, got {conv}")


_PARTS_ATTR = "_deeplab_ops_aspp_parts"


def aspp_fusable(module: nn.Module) -> bool:
    """Whether `module` has torchvision's ASPP structure with modules the fused ASPP op computes exactly: branches of
    (conv, BatchNorm2d, ReLU) and a pooling branch (pool, conv, BatchNorm2d, ReLU), a projection of (conv,
    BatchNorm2d, ReLU) and dropouts, the BatchNorms affine with one momentum, eps and tracking."""
    branches, project = getattr(module, "convs", None), getattr(module, "project", None)
    if not isinstance(branches, nn.ModuleList) or not isinstance(project, nn.Sequential) or len(branches) < 2:
        return False
    try:
        _, bns, _ = aspp_parts(module)  # the convs' geometry, the ReLUs, dropouts and the pooling included
    except (TypeError, ValueError, IndexError):
        return False
    if not all(type(b) is nn.BatchNorm2d for b in bns):
        return False
    first = bns[0]
    same = (first.momentum, first.eps, first.track_running_stats)
    return all(b.affine and (b.momentum, b.eps, b.track_running_stats) == same for b in bns)


def _cache_aspp_parts(module: nn.Module) -> tuple:
    """Validate `module`'s ASPP structure (aspp_parts: clear errors) and cache it on the module: (convs, bns, rates,
    extras, (dicts, children), submodules, checks). extras: the modules applied to the op's output; submodules: every
    module under `module`, looked at for hooks on each call; dicts, children: each one's (and `module`'s) `_modules`
    dict and the children it had, so that a child replaced, added or deleted anywhere drops the cache; checks
    (_AsppChecks): what can change in place without a child being replaced (each conv's geometry, padding mode and
    groups, a bias added, the pooling's output size), so that such a change drops it too. `current_aspp_parts`
    compares them per call with C-level maps."""
    convs, bns, rates = aspp_parts(module)
    submodules = tuple(m for m in module.modules() if m is not module)
    parts = (convs, bns, rates, list(module.project)[3:], None, submodules, None)
    if torch.compiler.is_compiling():  # a traced graph writes no module attribute (a side effect), nor reads these
        return parts
    dicts = tuple(m._modules for m in (module, *submodules))
    pool = list(module.convs)[-1][0]
    checks = _AsppChecks(tuple(convs), list(map(_CONV_GEOMETRY, convs)), pool, getattr(pool, "output_size", None))
    parts = (*parts[:4], (dicts, tuple(map(tuple, map(_DICT_VALUES, dicts)))), submodules, checks)
    object.__setattr__(module, _PARTS_ATTR, parts)  # plain attribute: not in the state_dict
    return parts


class _AsppChecks(NamedTuple):
    """What a cached ASPP structure holds only while it stays as validated (aspp_parts refuses a conv with a bias)."""

    convs: tuple
    geometry: list  # _CONV_GEOMETRY of each conv
    pool: nn.Module
    output_size: object


# What of a conv the cached ASPP structure depends on besides its bias, read as one C-level call; the hooks of a
# submodule (any of them non-empty: it runs unfused) and its instance dict (a `forward` set there).
_CONV_GEOMETRY = operator.attrgetter("stride", "padding", "dilation", "padding_mode", "groups")
_PARAMS = operator.attrgetter("_parameters")
_HOOKS = operator.attrgetter("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_INSTANCE_DICT = operator.attrgetter("__dict__")
_DICT_VALUES = dict.values
_REPEAT = itertools.repeat


def runnable_aspp_parts(module: nn.Module) -> tuple | None:
    """The cached ASPP structure of `module` (validated and cached here where none is) when the fused op computes
    what its children compute now; None where a child is one the op does not compute (aspp_fusable) or a submodule
    has a hook (forward, forward-pre, backward): a fused forward then runs the children one by one, so that what a
    user changed or hooked is what runs; so does a forward set on a submodule's instance (monkeypatching,
    accelerate's hooks), which module(x) runs instead of its class's. Per call, with the structure cached: one look
    at each submodule's hooks and instance dict (C-level maps: no frame per submodule)."""
    parts = current_aspp_parts(module)
    if parts is None:
        if not aspp_fusable(module):
            return None
        parts = _cache_aspp_parts(module)
    subs = parts[5]
    if torch.compiler.is_compiling():  # (what dynamo traces: attribute reads, not attrgetter objects)
        for m in subs:
            if (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                    or "forward" in m.__dict__):
                return None
        return parts
    if any(map(any, map(_HOOKS, subs))) or any(map(dict.__contains__, map(_INSTANCE_DICT, subs),
                                                      _REPEAT("forward"))):
        return None
    return parts


def current_aspp_parts(module: nn.Module) -> tuple | None:
    """The ASPP structure cached on `module` while every submodule's children are the ones it was validated with (a
    branch, conv, BatchNorm or dropout replaced, added or deleted drops it: the next call validates anew) and every
    conv is as it was (a bias added, another stride, padding, dilation or padding mode drops it too); None where none
    is cached, and while torch.compile traces: the graph then reaches every child through the module tree, so that
    its guards see a child replaced later (reached through this cache, none did: the graph ran the old one)."""
    if torch.compiler.is_compiling():
        return None
    parts = getattr(module, "__dict__", {}).get(_PARTS_ATTR)
    if parts is None:
        return parts
    if parts[4][0][0] is not module._modules:  # cached on another module: an nn.DataParallel replica copied it
        forget_aspp_parts(module)
        return None
    checks = parts[6]
    # (C-level maps: every `_modules` dict's children as validated, every conv's geometry and bias-free, the
    # pooling's output size; a module pickled with an older cache has no _AsppChecks: validated anew)
    if (type(checks) is not _AsppChecks or tuple(map(tuple, map(_DICT_VALUES, parts[4][0]))) != parts[4][1]
            or list(map(_CONV_GEOMETRY, checks.convs)) != checks.geometry
            or not all(map(operator.is_, map(dict.get, map(_PARAMS, checks.convs), _REPEAT("bias")), _REPEAT(None)))
            or getattr(checks.pool, "output_size", None) != checks.output_size):
        forget_aspp_parts(module)
        return None
    return parts


def forget_aspp_parts(module: nn.Module) -> None:
    """Drop the validated ASPP structure cached on `module` (fuse/unfuse call it; so may a user who rebuilt it)."""
    getattr(module, "__dict__", {}).pop(_PARTS_ATTR, None)


def pack_batchnorms(bns: list[nn.BatchNorm2d]) -> None:
    """Lay out each kind of BatchNorm tensor (weight, bias, running statistics, batch counter) of `bns` back to back
    in one storage, values kept (the tensors stay the same objects; their data moves): the fused ASPP then takes
    them as views, with no cat per call. Kinds already so laid out, or that differ in shape, dtype or device, are
    left alone."""
    bns = list(bns)
    for i, bn in enumerate(bns):
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise _bn_type_error(bn, f"bns[{i}]")
    _pack(list(zip(*(_bn_tensors(bn) for bn in bns), strict=True)))


def settle_aspp(module: nn.Module) -> None:
    """Lay out the BatchNorm tensors of an ASPP the fused op runs (aspp_fusable) back to back now (pack_batchnorms),
    where the module is built, fused or converted (.to(), .cuda(), .half()), not at its first call: what a user
    takes of them before that call (state_dict(), .detach(), a view, a numpy array) then keeps following the module,
    as it does for torchvision's ASPP. Nothing for a module the op does not run, or tensors _pack may not move."""
    if aspp_fusable(module):
        pack_batchnorms(aspp_parts(module)[1])


def settle_after_load(module: nn.Module, incompatible_keys=None) -> None:
    """The load_state_dict post-hook of a fused ASPP: what a load with assign=True gave it (tensors of the state_dict,
    each in a storage of its own) is laid out as where the module is built (settle_aspp), so aliases taken after the
    load keep following it. After an ordinary load, which copies in place, nothing moves."""
    if isinstance(module, ReleasesDerived):
        module._settle()


def unpack_batchnorms(module: nn.Module) -> nn.Module:
    """Give each BatchNorm tensor under `module` (itself included) that shares its storage with others (as
    pack_batchnorms and a fused ASPP, from its construction, lay them out) a storage of its own, values kept (the
    tensors stay the same objects, so optimizers are unaffected): for tools that refuse a state_dict whose tensors
    share a storage none of them covers, such as safetensors' save_model and load_model. A fused ASPP packs them
    again on its next call. Returns `module`."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    with torch.no_grad(), torch.inference_mode(False):
        for m in module.modules():
            if isinstance(m, _BatchNorm):
                for t in _bn_tensors(m):
                    if t is not None and t.untyped_storage().nbytes() != t.numel() * t.element_size():
                        t.data = t.detach().clone()
    return module


def _pack(kinds: list[tuple]) -> list[bool]:
    """pack_batchnorms on the BatchNorms' tensors by kind (`kinds[k]`: every BatchNorm's k-th of _BN_TENSORS), without
    the argument check: the fused ASPP's per-call path, where every kind is usually back to back already. Returns,
    per kind, whether its tensors are back to back now (common.back_to_back, tested once per call here). Outside
    inference mode even when called in it: the module's tensors stay normal ones that a later training step can use.
    Kinds that are not `_movable` stay where they are (the fused ASPP then concatenates them per call); so does
    every kind inside a torch.func transform, whose new tensors are the transform's (wrapped: a module tensor's data
    set to one would outlive the transform, a crash), and under a FakeTensorMode (its stack would be a fake tensor
    with no data: given to a real module's tensors, it would take their values)."""
    if functorch_transform() is not None or fake_mode() is not None:
        return [False] * len(kinds)
    owner = getattr(kinds, "owner", None)
    if owner is not None:  # the fused ASPP's call: what this module's last call verified, if it still holds
        memo = owner.__dict__.get(_PACKS_ATTR)
        if type(memo) is _PackMemo:
            main = kinds[0] + kinds[1] + kinds[2] + kinds[3]
            # (C-level maps: the same tensors, at the same addresses, each contiguous in one dtype, and each kind's
            # first of the same shape: what back_to_back established when the memo was made; the storage cannot
            # have changed under an unchanged address, as the memo's views hold it)
            if (list(map(id, main)) == memo.ids and list(map(_DATA_PTR, main)) == memo.ptrs
                    and list(map(_DTYPE, main)) == memo.dtypes and all(map(_CONTIGUOUS, main))
                    and list(map(_SHAPE, main[::len(kinds[0])])) == memo.shapes):
                if not kinds.counting:
                    return memo.flags
                counters = kinds[4]
                if (memo.counters is not None and list(map(id, counters)) == memo.counter_ids
                        and list(map(_DATA_PTR, counters)) == memo.counter_ptrs
                        and list(map(_DTYPE, counters)) == memo.counter_dtypes
                        and all(map(_CONTIGUOUS, counters)) and counters[0].shape == memo.counter_shape):
                    return memo.flags
    nones = [any(map(_IS_NONE, ts)) for ts in kinds]
    flags = [not none and back_to_back(ts) for ts, none in zip(kinds, nones, strict=True)]
    if all(map(operator.or_, flags, nones)):  # (the usual call: every kind packed already; no context entered)
        return flags if owner is None else _remember_packs(owner, kinds, flags)
    with torch.no_grad(), torch.inference_mode(False):
        for k, ts in enumerate(kinds):
            if flags[k]:
                continue
            if nones[k] or len({(t.shape, t.dtype, t.device) for t in ts}) != 1 or not _movable(ts):
                continue
            packed = torch.stack([t.detach() for t in ts])
            for t, row in zip(ts, packed.unbind(0), strict=True):
                t.data = row
            flags[k] = back_to_back(ts)
    return flags if owner is None else _remember_packs(owner, kinds, flags)


_IS_NONE = None.__class__.__instancecheck__  # _IS_NONE(v): v is None, as a C-level call
_DATA_PTR, _CONTIGUOUS = Tensor.data_ptr, Tensor.is_contiguous
_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")
_PACKS_ATTR = "_deeplab_ops_aspp_packs"  # plain attribute of a fused ASPP: its _PackMemo


class _Kinds(list):
    """run_fused_aspp's BatchNorm tensors by kind (as `_pack` takes them), with the module whose last verified packing
    `_pack` may reuse (`owner`) and whether the call counts a batch (`counting`: the counters are then needed too)."""

    __slots__ = ("owner", "counting")


class _Flags(list):
    """`_pack`'s flags for a fused ASPP's call whose BatchNorm weights, biases and running statistics are back to back:
    with `packs`, their four `Packed` lists (each joined view made once), and `counters`, the batch counters' joined
    view (None where they are not back to back)."""

    __slots__ = ("packs", "counters")


class _PackMemo:
    """What a fused ASPP's `_pack` verified of its BatchNorm tensors (kinds 0-3 flattened, and the counters), with the
    views made of them: a later call whose tensors are the same objects at the same addresses, contiguous, in the
    same dtype and shape, reuses them instead of testing back_to_back per kind and making the views again. A tensor
    replaced (a parameter reassigned, load_state_dict(assign=True), a BatchNorm replaced) changes an id; a new
    storage (.to(), .half(), a `.data` assignment, a repack) an address; `.data` given another view of the same
    storage its shape, dtype or contiguity (the memo's views hold the old storage, so no new one takes its address).
    Pickled and deep-copied as None: a copy's tensors are others."""

    __slots__ = ("ids", "ptrs", "dtypes", "shapes", "flags", "counters", "counter_ids", "counter_ptrs",
                 "counter_dtypes", "counter_shape")

    def __reduce__(self):
        return (type(None), ())


def _remember_packs(owner: nn.Module, kinds: _Kinds, flags: list) -> list:
    """Keep on `owner` what `_pack` just verified (where kinds 0-3 are all back to back; else forget it) and return the
    flags as a `_Flags` carrying the views."""
    if not all(flags[:4]):
        owner.__dict__.pop(_PACKS_ATTR, None)
        return flags
    memo = _PackMemo()
    main = kinds[0] + kinds[1] + kinds[2] + kinds[3]
    memo.ids, memo.ptrs = list(map(id, main)), list(map(_DATA_PTR, main))
    memo.dtypes, memo.shapes = list(map(_DTYPE, main)), [ts[0].shape for ts in kinds[:4]]
    counters = kinds[4] if flags[4] else None
    with torch.inference_mode(False):  # (views of normal tensors, whatever mode this call runs in)
        packed = _Flags(flags)
        packed.packs = [Packed(ts, True) for ts in kinds[:4]]
        packed.counters = None if counters is None else counters[0].detach().as_strided((len(counters),), (1,))
    memo.flags, memo.counters = packed, packed.counters
    if counters is not None:
        memo.counter_ids, memo.counter_ptrs = list(map(id, counters)), list(map(_DATA_PTR, counters))
        memo.counter_dtypes, memo.counter_shape = list(map(_DTYPE, counters)), counters[0].shape
    owner.__dict__[_PACKS_ATTR] = memo
    return packed


def _movable(ts) -> bool:
    """Whether _pack may move the equally shaped tensors `ts` into a new storage of its own, where nothing but the
    tensors themselves sees the move: not a torch.func transform's (no storage), not on the meta device (no memory to
    lay out: a module built there is laid out by the conversion that gives it memory), not an inference tensor (made
    under torch.inference_mode: given another's storage it can no longer be used outside inference mode), not in
    shared memory (after model.share_memory() other processes read and write that storage: Hogwild training would
    lose their updates), each a different tensor (a Parameter tied between BatchNorms would be moved twice, and
    never be back to back), and each in a storage of its own: never a view into a larger one, which others may see —
    a user's (B, C) buffer, a flat parameter buffer, or an earlier pack whose other rows a user holds aliases of (a
    pack left behind when a BatchNorm was replaced: that kind is concatenated per call from then on, nothing moves
    under an alias)."""
    size = ts[0].numel() * ts[0].element_size()
    if len(set(map(id, ts))) != len(ts):
        return False
    for t in ts:
        if is_functorch_wrapped(t) or t.is_inference() or t.is_meta or (t.device.type == "cpu" and t.is_shared()):
            return False
        if t.untyped_storage().nbytes() != size:
            return False
    return True


def _aspp_config(bns: list[nn.BatchNorm2d], tensors: list[tuple], strict: bool = True) -> bool | None:
    """The mode of the fused ASPP's BatchNorms (training), after checking they can run as one: one mode, shared
    momentum factor (with momentum=None: the same num_batches_tracked), eps and track_running_stats, affine. Clear
    errors otherwise; strict=False: None instead of an error. tensors[i]: `_bn_tensors(bns[i])`."""
    training = bns[0].training
    # The usual case, decided from plain attributes: one mode, one numeric momentum (the factor then does not depend
    # on the batch counters), eps, track_running_stats and running statistics present or not, every one affine.
    # (A loop, not list.count: torch.compile of torch 2.6 cannot trace list.count.)
    first, uniform = None, True
    for bn, t in zip(bns, tensors, strict=True):
        key = (bn.training, bn.momentum, bn.eps, bn.track_running_stats, t[2] is None, t[3] is None,
               t[0] is None or t[1] is None)
        if first is None:
            first = key
        elif key != first:
            uniform = False
            break
    if uniform and first[1] is not None and not first[6]:
        return training
    if any(bn.training != training for bn in bns):
        if not strict:
            return None
        raise ValueError(
            "the fused ASPP runs all its BatchNorms in one mode, but some are in training mode and some in eval "
            "mode; put them all in one mode (e.g. freeze all: module.apply(lambda m: m.eval() if isinstance(m, "
            "nn.BatchNorm2d) else None))"
        )
    first = _bn_args(bns[0], training)
    for bn in bns:
        a = _bn_args(bn, training) if bn is not bns[0] else first
        if (a[4], a[5], a[6], a[2] is None) != (first[4], first[5], first[6], first[2] is None):
            if not strict:
                return None
            raise ValueError(
                "the fused ASPP needs every BatchNorm of the module to share momentum, eps and track_running_stats "
                "(with momentum=None also num_batches_tracked: the cumulative average's factor is 1/(n+1)); "
                f"{_bn_settings(bn, a)} differs from {_bn_settings(bns[0], first)}"
            )
        if a[0] is None or a[1] is None:
            if not strict:
                return None
            missing = " and ".join(n for n, t in (("weight", a[0]), ("bias", a[1])) if t is None)
            raise ValueError(f"the fused ASPP needs affine BatchNorms (a weight and a bias each), but a "
                             f"{type(bn).__name__}({bn.num_features}) has no {missing}")
    return training


def _bn_settings(bn: nn.BatchNorm2d, args: tuple) -> str:
    """What a fused ASPP compares of a BatchNorm, for its error message."""
    counter = _bn_tensors(bn)[4]
    return (f"{type(bn).__name__}({bn.num_features}, momentum={bn.momentum}, eps={bn.eps}, track_running_stats="
            f"{bn.track_running_stats}, num_batches_tracked={None if counter is None else int(counter)}, "
            f"running statistics {'absent' if args[2] is None else 'present'})")


def fused_aspp_forward(module: nn.Module, x: Tensor, backend: str | None = None, process_group=None,
                       memory_efficient: bool = False) -> Tensor:
    """Run a module with torchvision's ASPP structure (``convs``, ``project``) on the fused ASPP op.

    Same result and side effects (running statistics, num_batches_tracked) as the module's own forward,
    including the dropout after the projection when it has one. The BatchNorm mode is read from the BatchNorms
    (so frozen BatchNorm, ``bn.eval()`` inside a training model, is honoured); they must all be in one mode.
    The module's structure is validated on its first call and cached on it (`forget_aspp_parts` drops it); its
    BatchNorm tensors are kept back to back in one storage per kind (`pack_batchnorms`), outside tracing.
    memory_efficient=True: the op keeps no pre-BN activation for the backward (see deeplab_ops.aspp).
    """
    parts = current_aspp_parts(module)
    if parts is None:  # the structure is validated once per module, not per call
        parts = _cache_aspp_parts(module)
    return run_fused_aspp(module, parts, x, backend, process_group, memory_efficient)


def run_fused_aspp(module: nn.Module, parts: tuple, x: Tensor, backend: str | None, process_group,
                   memory_efficient: bool, unfused=None) -> Tensor:
    """fused_aspp_forward with the module's validated structure (current_aspp_parts / runnable_aspp_parts) given.
    unfused: None (BatchNorms that cannot run as one raise a clear error), or a function that `unfused(module, x)`
    runs the children one by one, called instead (a fused module's forward)."""
    convs, bns, rates, extras = parts[:4]
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != convs[0].in_channels:
        check_x_channels(x, conv_weight(convs[0]), "the ASPP module")
    if process_group is not None:
        group_name_of(process_group)  # its type checked in eval too, where the op does not use it
    tensors = [_bn_tensors(bn) for bn in bns]
    training = _aspp_config(bns, tensors, strict=unfused is None)
    if training is None:
        return unfused_call(module, process_group, unfused, x)
    # torch.compile or torch.jit.trace: no packing (a graph would record it, or depend on it) and one add per counter
    tracing = torch.compiler.is_compiling() or jit_tracing() is not None
    counting = training and bns[0].track_running_stats and tensors[0][4] is not None
    kinds = _Kinds(zip(*tensors, strict=True))  # per kind of _BN_TENSORS, every BatchNorm's tensor
    kinds.owner, kinds.counting = module, counting  # (_pack reuses what this module's last call verified)
    # Not inside a CUDA-graph capture either: a pack's new storage would come from the graph's pool, and the
    # recorded stack would copy freed memory over the BatchNorm tensors at every replay. Unpacked, the op
    # concatenates per call (recorded like any op).
    flags = None
    if not tracing and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        flags = _pack(kinds)
    counters_whole = None
    if flags is not None:  # the back-to-back test done once per kind and call, handed on to the op's front door
        packs = getattr(flags, "packs", None)  # (views made once, while the tensors stay as they were: _PackMemo)
        if packs is not None:
            bn_weights, bn_biases, running_means, running_vars = packs
            counters_whole = flags.counters
        else:
            bn_weights, bn_biases, running_means, running_vars = [
                Packed(ts, flags[k]) for k, ts in enumerate(kinds[:4])]
    else:
        bn_weights, bn_biases, running_means, running_vars = [list(ts) for ts in kinds[:4]]
    _, _, rm, _, bn_training, momentum, eps = _bn_args(bns[0], training)
    tracked = rm is not None
    try:
        out = aspp(
            x, [conv_weight(c) for c in convs[:-2]], conv_weight(convs[-2]), conv_weight(convs[-1]), bn_weights,
            bn_biases, running_means if tracked else None, running_vars if tracked else None, rates=rates,
            training=bn_training, momentum=momentum, eps=eps, backend=backend, process_group=process_group,
            memory_efficient=memory_efficient,
        )
    except Exception as error:
        if counting:
            _count_if_stopped(error, kinds[4])
        raise
    if counting:
        counters = list(kinds[4])
        if not tracing and (flags[4] if flags is not None else back_to_back(counters)):  # one add for all
            # The packed counters share storage, not version counters: each known value is carried over by hand.
            known = [_known_batches(c) for c in counters] if _BATCHES else ()
            if counters_whole is None:
                counters_whole = counters[0].detach().as_strided((len(counters),), (1,))
            counters_whole.add_(1)
            # (a view of the first counter: the others' versions bumped too, as each BatchNorm's add_(1) bumps its
            # own, which tells eval folds cached elsewhere of the statistics that moved: a BatchNorm shared with
            # a FusedConvBNReLU)
            torch.autograd.graph.increment_version(counters[1:])
            if flags is None and (counters[0].is_cuda or len(_REMEMBERED_DEVICES) > 1) and _capturing(counters[0]):
                _mark_captured(counters)
                known = ()
            for c, value in zip(counters, known, strict=False):
                if value is not None:
                    _remember_batches(c, value + 1)
        else:
            for c in counters:
                _count_batch(c)
    for extra in extras:
        if not (type(extra) is nn.Dropout and extra.p == 0):  # dropout(p=0) is the identity
            out = extra(out)
    return out


class FusedASPP(ReleasesDerived, nn.Module):
    """ASPP (Chen et al. 2017) on the fused ASPP op, with torchvision's ASPP state_dict keys.

    ``convs.0`` (1×1 branch), ``convs.{1..R}`` (3×3, dilation = padding = rate), ``convs.{R+1}`` (image pooling),
    ``project`` (1×1 projection, BN, ReLU, dropout): a torchvision ``ASPP`` state_dict loads unchanged. With
    dropout=0.5 it computes what torchvision's ASPP computes, in training and eval. memory_efficient=True keeps
    no pre-BN activation for the backward (see deeplab_ops.aspp), synchronized BatchNorm included.
    """

    def __init__(
        self,
        in_channels: int,
        atrous_rates: collections.abc.Sequence[int],
        out_channels: int = 256,
        dropout: float = 0.0,
        backend: str | None = None,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if not is_rate_sequence(atrous_rates):
            raise TypeError(f"atrous_rates must be a sequence (tuple, list, range, ...) of ints >= 1 (e.g. (12, 24, "
                            f"36)), got {atrous_rates!r}")
        check_module_options(backend, memory_efficient)
        _check_channel_counts(in_channels=in_channels, out_channels=out_channels)
        rates = checked_rates(atrous_rates, "atrous_rates")
        if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        def conv_bn_relu_seq(k: int, rate: int = 1) -> nn.Sequential:
            pad = 0 if k == 1 else rate
            return nn.Sequential(
                nn.Conv2d(in_channels, out_channels, k, padding=pad, dilation=rate, bias=False),
                nn.BatchNorm2d(out_channels), nn.ReLU(),
            )

        branches = [conv_bn_relu_seq(1)] + [conv_bn_relu_seq(3, r) for r in rates]
        branches.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels), nn.ReLU()))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(branches) * out_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(), nn.Dropout(dropout),
        )
        if not isinstance(memory_efficient, bool):
            raise TypeError(f"memory_efficient must be a bool, got {memory_efficient!r}")
        self.atrous_rates = rates
        self.backend = backend
        self.memory_efficient = memory_efficient
        self.process_group = None  # set by sync_batchnorm(): statistics shared across processes
        settle_aspp(self)
        self.register_load_state_dict_post_hook(settle_after_load)

    def forward(self, x: Tensor) -> Tensor:
        # The fused op computes torchvision's ASPP of these very children: where one was replaced by a module it
        # cannot compute (a biased conv, a SyncBatchNorm, a LeakyReLU; BatchNorms in different modes or of different
        # settings), or has a hook, the children run one by one as torchvision's ASPP runs them, so that what a user
        # changed or hooked is what runs.
        if isinstance(x, torch.fx.Proxy):  # torch.fx symbolic tracing: the children, as torchvision's ASPP calls them
            return self._unfused_forward(x)
        parts = runnable_aspp_parts(self)
        if parts is None:
            return unfused_call(self, self.process_group, type(self)._unfused_forward, x)
        return run_fused_aspp(self, parts, x, self.backend, self.process_group,
                              getattr(self, "memory_efficient", False),  # (a FusedASPP pickled before it existed)
                              unfused=FusedASPP._unfused_forward)

    def __prepare_scriptable__(self):
        refuse_scripting(self, "torchvision.models.segmentation.deeplabv3.ASPP")

    def _unfused_forward(self, x: Tensor) -> Tensor:
        branches = list(self.convs)
        out = [branch(x) for branch in branches[:-1]]
        size = x.shape[-2:]  # before the pooling branch runs, as torchvision's ASPPPooling (a torch.fx trace's order)
        pooled = branches[-1](x)  # (N, C, 1, 1): broadcast back bilinearly, as torchvision's ASPPPooling does
        out.append(torch.nn.functional.interpolate(pooled, size=size, mode="bilinear", align_corners=False))
        return self.project(torch.cat(out, dim=1))

    def extra_repr(self) -> str:
        return f"atrous_rates={self.atrous_rates}, backend={self.backend!r}" + (
            ", memory_efficient=True" if getattr(self, "memory_efficient", False) else ""
        )
