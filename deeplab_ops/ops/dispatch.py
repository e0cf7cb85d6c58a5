"""What every op's front door and autograd share: the process group's name for the ops, calls past the Autograd
key, the registration of an op's one autograd kernel for both backend twins (docs/architecture.md), the key that
tells torch.compile's caches which build of the ops they hold, and the ops' FLOP formulas for
torch.utils.flop_counter (registered when that module is first imported)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.abc
import importlib.util
import os
import sys
import threading

import torch
import torch.autograd.forward_ad as _forward_ad

from deeplab_ops.common import is_functorch_wrapped, jit_tracing

BELOW_AUTOGRAD = torch._C._AutoDispatchBelowAutograd  # a guard: ops called inside skip the Autograd key
_LIB = torch.library.Library("deeplab_ops", "IMPL")


# ---- torch.compile's caches --------------------------------------------------------------------------------------
#
# AOTAutograd's and Inductor's on-disk caches key a compiled graph by the graph dynamo traced, in which a custom op
# is only its name: an artifact compiled with an earlier build of deeplab_ops would be served after an upgrade that
# changed what an op returns (aspp's branch_out became a list on 2026-12-02) and fail at its first call. torch's hook
# for custom ops, torch._inductor.config.unsafe_marked_cacheable_functions (a name -> key table that enters every
# cache key), is given this build's key; it is set from the fake kernels, which run natively while dynamo traces,
# before any cache is read, and only once torch.compile has imported Inductor's config (importing it here would
# add a second and a half to `import deeplab_ops`).

COMPILE_CACHE_NAME = "torch.ops.deeplab_ops"


@functools.cache
def compile_cache_key(schemas: tuple[str, ...] | None = None) -> str:
    """This build of deeplab_ops as torch.compile's caches must tell it apart: a hash of the ops' schemas, of the
    package's Python (the fake kernels and autograd a compiled graph is made of) and of the compiled extension's size
    and modification time. `schemas`: the deeplab_ops schemas to hash (default: the registered ones)."""
    if schemas is None:
        schemas = tuple(sorted(str(s) for s in torch._C._jit_get_all_schemas() if s.name.startswith("deeplab_ops::")))
    digest = hashlib.sha256("\n".join(schemas).encode())
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder, dirs, files in sorted(os.walk(package)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            path = os.path.join(folder, name)
            if name.endswith(".py"):
                digest.update(os.path.relpath(path, package).encode())
                with open(path, "rb") as f:
                    digest.update(f.read())
            elif name.startswith("_C.") and name.endswith((".so", ".pyd")):
                st = os.stat(path)
                digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def key_compile_caches() -> None:
    """Enters this build's key in torch.compile's cache keys, where torch.compile has imported Inductor's config
    (a no-op otherwise, and once it is there)."""
    config = sys.modules.get("torch._inductor.config")
    if config is None:
        return
    table = config.unsafe_marked_cacheable_functions
    key = compile_cache_key()
    if table.get(COMPILE_CACHE_NAME) != key:
        config.unsafe_marked_cacheable_functions = {**table, COMPILE_CACHE_NAME: key}


def register_fake(name: str):
    """torch.library.register_fake for a deeplab_ops op, whose fake kernel also enters this build's key in
    torch.compile's cache keys (key_compile_caches) before it computes the outputs."""

    def register(fn):
        @functools.wraps(fn)
        def fake(*args, **kwargs):
            key_compile_caches()
            return fn(*args, **kwargs)

        torch.library.register_fake(name)(fake)
        return fn

    return register


def group_name_of(process_group) -> str | None:
    """The name of `process_group` when it has more than one process (None: nothing to synchronize, or None
    given); a TypeError when it is neither None nor a torch.distributed ProcessGroup, initialized or not (a
    ValueError for GroupMember.NON_GROUP_MEMBER: what new_group returns on a process outside the group)."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        if dist.is_available() and type(process_group) is int and process_group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(
                f"process_group is torch.distributed's GroupMember.NON_GROUP_MEMBER ({process_group}), what new_group "
                "returns on a process outside the group: this process is not one of its members; pass the group "
                "only on its members (None, or another group, elsewhere)")
        raise TypeError(
            f"process_group must be a torch.distributed ProcessGroup (e.g. torch.distributed.group.WORLD) or None, "
            f"got {type(process_group).__name__} {process_group!r}"
            + ("" if dist.is_available() else " (this torch build has no torch.distributed)")
        )
    if not dist.is_initialized() or dist.get_world_size(process_group) <= 1:
        return None
    return process_group.group_name


def backend_for_batch(x, name: str, group_name: str | None) -> str:
    """The backend a resolved call runs on: `name`, or for an empty batch (N = 0; callers test that inline first,
    so that the usual call pays no frame) the reference, which computes
    what eager does (an empty output, zero parameter gradients, running statistics unchanged). With a process
    group in training, `name` (cpu or cuda): the process takes part in the statistics' collectives with nothing
    (its peers wait for it), its running statistics taking the group's, as nn.SyncBatchNorm's do."""
    if x.shape[0] != 0 or group_name is not None:
        return name
    return "reference"


def autograd_kernels(autograd_kernel) -> dict:
    """backend -> the op's Autograd kernel for that backend's twin (what the front door calls directly)."""
    return {"cpu": autograd_kernel(""), "cuda": autograd_kernel(""), "triton": autograd_kernel("triton_")}


def enter_directly(x) -> bool:
    """Whether a front door may call its op's Autograd kernel itself, which is what the dispatcher runs at the
    Autograd key, instead of the dispatched op (saving the boxing of every argument into Python): not while
    torch.compile or torch.jit.trace traces (its graph must hold the op, and no Python cache), nor under a
    __torch_function__ mode, a tensor subclass or a torch.func transform (its wrapped tensors have no storage for
    the front doors' aliasing)."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling() and jit_tracing() is None
            and not torch._C._is_torch_function_mode_enabled() and not is_functorch_wrapped(x))


def refuse_forward_ad(op: str, *tensors) -> None:
    """Raise a clear error when forward-mode AD is active (a torch.autograd.forward_ad dual level, torch.func.jvp)
    and one of `tensors` (or of a list among them) carries a tangent: the ops have no forward derivative, and a call
    below Autograd would drop the tangent silently. Free when no dual level is active."""
    level = _forward_ad._current_level
    if level < 0:
        return
    for t in tensors:
        for u in t if isinstance(t, (list, tuple)) else (t,):
            if isinstance(u, torch.Tensor) and torch._VF._unpack_dual(u, level)[1] is not None:
                raise RuntimeError(f"deeplab_ops.{op} does not support forward-mode AD (torch.autograd.forward_ad "
                                   "dual tensors, torch.func.jvp); use backend='reference' for it")


def _any_requires_grad_py(*args) -> bool:
    for a in args:  # loops, not any(...): no generator frames on the per-call path
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, list):  # as torch's: lists, not tuples
            for t in a:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    return True
    return False


# Whether a tensor among the arguments (tensors, lists of tensors, anything else; tuples are not looked into)
# requires grad: torch's C function where it has one (not torch 2.6), else the same in Python.
any_requires_grad = getattr(torch._C, "_any_requires_grad", _any_requires_grad_py)

_interpreter_stack = torch._C._functorch.get_interpreter_stack
_GRAD = torch._C._functorch.TransformType.Grad
_VMAP = torch._C._functorch.TransformType.Vmap
_is_batched = torch._C._functorch.is_batchedtensor


def refuse_grad_transforms(op: str, *tensors, statistics: tuple | None = None) -> None:
    """Raise a clear error inside torch.func's reverse-mode transforms (grad, vjp, jacrev, hessian) when one of
    `tensors` is wrapped by them: the op's autograd is a C++ autograd function, which they cannot run (PyTorch's own
    error names neither the op nor what to use instead). Forward mode (jvp, jacfwd) gets `refuse_forward_ad`'s
    error; vmap alone runs (the conv ops' batching rules, ops/conv_bn_relu.py), except that `statistics` (a training
    call's running mean and variance, updated in place) must be batched where one of `tensors` is, as F.batch_norm
    requires (the in-place copy would fail after the op ran, with an error naming neither). Free outside torch.func;
    skipped while torch.compile traces (its graph holds the op, and Dynamo cannot trace the interpreter stack)."""
    if torch.compiler.is_compiling():
        return
    stack = _interpreter_stack()
    if not stack:
        return
    keys = {i.key() for i in stack}
    if _GRAD in keys and any(isinstance(t, torch.Tensor) and is_functorch_wrapped(t) for t in tensors):
        raise RuntimeError(f"deeplab_ops.{op} cannot run inside torch.func's reverse-mode transforms (grad, vjp, "
                           "jacrev, hessian); use torch.autograd.grad or .backward() for its gradients, or "
                           "backend='reference' under torch.func")
    if (_VMAP in keys and statistics is not None
            and any(isinstance(t, torch.Tensor) and _is_batched(t) for t in tensors)
            and not all(_is_batched(t) for t in statistics)):
        raise RuntimeError(f"deeplab_ops.{op}: under vmap, a training call updates running_mean and running_var in "
                           "place, and they are not batched while its input or parameters are: batch them too (one "
                           "set per vmapped model, as torch.func.stack_module_state gives), or use BatchNorm without "
                           "running statistics (track_running_stats=False), as torch's batch_norm requires")


def below_autograd(op, *args):
    """`op(*args)` past the Autograd dispatch key: the op's autograd kernel is not entered."""
    with BELOW_AUTOGRAD():
        return op(*args)


def call_backward(op, *args):
    """An op's backward op from its autograd.Function.backward: past the Autograd key in the usual backward, through
    it when a graph is being built (create_graph=True), where its kernel refuses double backward."""
    if torch.is_grad_enabled():
        return op(*args)
    with BELOW_AUTOGRAD():
        return op(*args)


def _refusing_kernel(op, message: str):
    """The Autograd kernel of a backward op: run it, and if a graph is being built, give its outputs a node that
    raises `message` when differentiated (a gradient of a gradient)."""
    error = message.encode()

    def kernel(*args):
        with BELOW_AUTOGRAD():
            out = op(*args)
        if not (torch.is_grad_enabled() and any_requires_grad(*args)):
            return out
        single = isinstance(out, torch.Tensor)
        outs = (out,) if single else out
        flat = [t for o in outs for t in (o if isinstance(o, (list, tuple)) else [o]) if t is not None]
        if not flat:
            return out
        # The node's inputs: the outputs (detached, so that they become its results) and the backward op's
        # differentiable inputs, so that a gradient asked of those (torch.autograd.grad(gx, [x])) reaches the node
        # and gets its message, not "appears to not have been used in the graph".
        sources = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a])
                   if isinstance(t, torch.Tensor) and t.requires_grad]
        marked = torch._C._functions.DelayedError(error, len(flat) + len(sources))(
            *[t.detach().requires_grad_(t.is_floating_point()) for t in flat], *sources)
        marked = iter(marked[:len(flat)])

        def mark(o):
            if o is None:
                return None
            if isinstance(o, (list, tuple)):
                return [mark(t) for t in o]
            return next(marked)

        return mark(out) if single else tuple(mark(o) for o in outs)

    return kernel


def register_double_backward_refusal(op: str, double_backward_message: str) -> None:
    """`{prefix}{op}_backward` (both twins) gets an Autograd kernel that refuses double backward."""
    for prefix in ("", "triton_"):
        backward = getattr(torch.ops.deeplab_ops, f"{prefix}{op}_backward").default
        _LIB.impl(f"{prefix}{op}_backward", _refusing_kernel(backward, double_backward_message), "Autograd")


def register_autograd_kernels(op: str, autograd_kernel, double_backward_message: str) -> None:
    """Register the op's one autograd implementation for both twins: `autograd_kernel(prefix)` (prefix "" for the
    C++ ops of the cpu and cuda backends, "triton_" for the triton ones) becomes the Autograd kernel of
    `{prefix}{op}_forward`; `{prefix}{op}_backward` gets a kernel that refuses double backward. (conv_bn_relu's
    autograd is C++ and registers itself: csrc/composite/conv_bn_relu_autograd.cpp.)"""
    for prefix in ("", "triton_"):
        _LIB.impl(f"{prefix}{op}_forward", autograd_kernel(prefix), "Autograd")
    register_double_backward_refusal(op, double_backward_message)


# ---- FLOP counts ----------------------------------------------------------------------------------------------------
#
# torch.utils.flop_counter.FlopCounterMode counts the FLOPs of the ops that have a formula in its registry, which it
# copies when a mode is made: each fused op registers one there, counting the convolutions and matrix products it
# computes as the mode counts the eager layers it replaces (a fused network counts what the unfused one does). That
# module imports triton (0.15 s), so `import deeplab_ops` does not import it: the formulas are registered when it is
# imported, whenever that is (a finder on sys.meta_path runs its loader, then registers them), or at once where it
# already is.

FLOP_COUNTER = "torch.utils.flop_counter"
_FLOP_FORMULAS: dict[str, object] = {}  # op name -> formula(*args with shapes for tensors, out_shape=..., **kwargs)
_FLOP_LOCK = threading.Lock()


def conv_flops(x_shape, w_shape, out_shape) -> int:
    """A convolution's multiply-adds x 2 as torch.utils.flop_counter counts aten.convolution: every output element
    times C_in x kH x kW, padding taps included (x_shape: the formulas' signature; the count needs only the
    output's and the weight's)."""
    n, _, h, w = out_shape
    c_out, c_in, kh, kw = w_shape
    return 2 * n * c_out * h * w * c_in * kh * kw


def register_flops(names, formula) -> None:
    """Register `formula` as torch.utils.flop_counter's FLOP count of each deeplab_ops op in `names` (their twins
    included by name): formula(*args, out_shape=..., **kwargs) gets the op's arguments with every tensor replaced by
    its shape (a list of them for a Tensor[]) and the outputs' shapes as out_shape."""
    with _FLOP_LOCK:
        for name in names:
            _FLOP_FORMULAS[name] = formula
        if FLOP_COUNTER in sys.modules:
            _install_flop_formulas(sys.modules[FLOP_COUNTER])
        elif not any(isinstance(f, _FlopCounterFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _FlopCounterFinder())


def _install_flop_formulas(flop_counter) -> None:
    for name, formula in _FLOP_FORMULAS.items():
        packet = getattr(torch.ops.deeplab_ops, name)
        if packet not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(packet)(formula)


class _FlopCounterFinder(importlib.abc.MetaPathFinder):
    """Finds torch.utils.flop_counter as the other finders do, with a loader that registers the formulas once the
    module has run (and takes itself off sys.meta_path: it is needed once)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != FLOP_COUNTER:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ...: the wrapped loader's (tracebacks read them)
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        with _FLOP_LOCK:
            _install_flop_formulas(module)
