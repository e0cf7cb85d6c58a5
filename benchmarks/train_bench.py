"""Benchmark a whole DeepLabV3 (ResNet-50 / ResNet-101) training step and eval forward: images/s, peak memory
(on a GPU: peak_mem_mb is empty on CPU).

    python benchmarks/train_bench.py                                  # R50 and R101, OS 16, 513x513, bf16
    python benchmarks/train_bench.py --models r50 --output-strides 16,8 --batches 8,16 --plot
    python benchmarks/train_bench.py --device cpu --quick             # small images: cpu, reference, eager

Providers: eager (cuDNN, cudnn.benchmark on), torch.compile of the model (default; compile-max on request: it
autotunes every conv of the network), and the fused model (`deeplab_ops.nn.fuse_modules(model, backend=...)`,
what `fused=True` builds) on each deeplab_ops backend: triton, cuda (GPU), cpu, reference (CPU). A "-lean"
provider (triton-lean, cuda-lean, cpu-lean) is the same fused model in its memory-lean form, as `train.py
--fused-ops --memory-efficient` trains it (channels_last, its default with --fused-ops: compare cpu-lean with
cpu-cl): the fused ops save no pre-BN activations (memory_efficient=True) and
the loss takes the logits at the output stride's resolution (1/16 by default) through
`deeplab_ops.upsample_cross_entropy` (no upsampled logits); compare its peak_mem_mb with eager's and the plain
fused provider's.
train_step = zero_grad, forward, cross-entropy (ignore_index 255) against random labels, backward, SGD step
(momentum 0.9, weight decay 1e-4). eval_fwd = eval mode under no_grad. The model's parameters, buffers and inputs
are in the benchmarked dtype, except for the eager setups users also run: eager-cl (channels_last), eager-amp
(an fp32 model under torch.autocast at the dtype, as torchvision's reference training runs --amp; GradScaler for
fp16) and eager-cl-amp. The fastest eager setup is each case's anchor (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import common
import torch
import torch.nn.functional as F

MODES = ("train_step", "eval_fwd")
CUDA_PROVIDERS = ("eager", "eager-cl", "eager-amp", "eager-cl-amp", "compile", "triton", "cuda", "triton-lean",
                  "cuda-lean")
CPU_PROVIDERS = ("cpu", "cpu-cl", "reference", "eager", "eager-cl", "cpu-lean")
LEAN = "-lean"
PROVIDERS = (*common.EAGER_PROVIDERS, "compile", "compile-max", "triton", "cuda", "cpu", "cpu-cl", "reference",
             "triton-lean", "cuda-lean", "cpu-lean")


def backend_of(provider: str) -> str:
    """The deeplab_ops backend (or eager/compile provider) behind a provider name: triton-lean -> triton, cpu-cl
    -> cpu (the fused model with its weights and input channels_last, as train.py --fused-ops runs it on the CPU;
    on CUDA the fused model converts at its boundary by itself)."""
    return provider.removesuffix(LEAN).removesuffix("-cl") if provider == "cpu-cl" else provider.removesuffix(LEAN)
DEPTHS = {"r50": 50, "r101": 101}


def model_factory():
    """model.deeplabv3_resnet, imported lazily: None and the reason when the model package is missing."""
    try:
        from model import deeplabv3_resnet
    except ImportError as e:
        return None, f"the DeepLabV3 model package (model/) cannot be imported: {e}"
    return deeplabv3_resnet, ""


def make_model(provider: str, depth: int, output_stride: int, num_classes: int) -> torch.nn.Module:
    factory, reason = model_factory()
    if factory is None:
        raise RuntimeError(reason)
    net = factory(depth, num_classes=num_classes, output_stride=output_stride)
    if backend_of(provider) in common.FUSED_PROVIDERS:
        from deeplab_ops.nn import fuse_modules

        fuse_modules(net, backend=backend_of(provider), memory_efficient=provider.endswith(LEAN))
    elif provider.startswith("compile"):
        net = common.compiled(net, provider)
    return net


def probe_call(device: torch.device, dtype: torch.dtype) -> dict:
    """A typical backbone conv call, to ask a backend whether it runs the model's convs at all. Its input is on the
    device (a backend's rules look at it: the Triton interpreter refuses half types on CPU tensors); its weight,
    whose size is all that is asked, is not allocated."""
    x = torch.empty((2, 256, 33, 33), device=device, dtype=dtype)
    w = torch.empty((256, 256, 3, 3), device="meta", dtype=dtype)
    return {"x": x, "weight": w, "stride": (1, 1), "padding": (2, 2), "dilation": (2, 2), "training": True,
            "residual": None}


_COUNTS: dict[tuple, tuple[float, float, int] | None] = {}


def model_counts(depth: int, output_stride: int, size: int, num_classes: int) -> tuple[float, float, int] | None:
    """(train_step FLOPs, eval_fwd FLOPs, parameters) of one image: torch.utils.flop_counter over the eager model
    on the meta device (convolutions and matmuls, padding taps included; batch 2, halved). None if it fails."""
    key = (depth, output_stride, size, num_classes)
    if key not in _COUNTS:
        try:
            from torch.utils.flop_counter import FlopCounterMode

            factory, _ = model_factory()
            with torch.device("meta"):
                net = factory(depth, num_classes=num_classes, output_stride=output_stride)
            x = torch.randn(2, 3, size, size, device="meta")
            target = torch.randint(0, num_classes, (2, size, size), device="meta")
            train, evaluate = FlopCounterMode(display=False), FlopCounterMode(display=False)
            with train:
                F.cross_entropy(net.train()(x)["out"], target, ignore_index=255).backward()
            with evaluate, torch.no_grad():
                net.eval()(x)
            params = sum(p.numel() for p in net.parameters())
            _COUNTS[key] = (train.get_total_flops() / 2, evaluate.get_total_flops() / 2, params)
        except Exception as e:  # noqa: BLE001  (the rows then have no roofline columns; the timing still runs)
            print(f"train_bench: counting the model's FLOPs failed: {type(e).__name__}: {e}", file=sys.stderr)
            _COUNTS[key] = None
    return _COUNTS[key]


def step_min_bytes(mode: str, batch: int, size: int, num_classes: int, params: int, elem: int) -> int:
    """A lower bound on a step's HBM bytes: the images (and int64 labels), and the parameters' traffic: eval_fwd
    reads them once and writes the logits; train_step reads them in forward and backward, writes their gradient,
    and SGD reads parameter, gradient and momentum and writes parameter and momentum (8 passes). Activations are
    not counted (a whole network's bound is its FLOPs)."""
    images = batch * 3 * size * size * elem
    if mode == "eval_fwd":
        return images + params * elem + batch * num_classes * size * size * elem
    return images + batch * size * size * 8 + 8 * params * elem


def step_case(mode: str, net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, compiled: bool,
              lean: bool = False, amp: torch.dtype | None = None):
    """(fn, []) of one train_step or eval_fwd. `amp`: forward and loss under torch.autocast at that dtype, as
    torchvision's reference training runs --amp (with a GradScaler for float16; bfloat16 needs none)."""
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if compiled else None
    device = x.device
    if mode == "eval_fwd":
        net.eval()

        def fn():
            if mark:
                mark()
            with torch.no_grad(), common.autocast(device, amp):
                return net(x)["out"]

        return fn, []
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None

    def fn():
        if mark:
            mark()
        opt.zero_grad(set_to_none=True)
        with common.autocast(device, amp):
            if lean:
                import deeplab_ops

                loss = deeplab_ops.upsample_cross_entropy(net(x, upsample=False)["out"], target, ignore_index=255)
            else:
                loss = F.cross_entropy(net(x)["out"].float(), target, ignore_index=255)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return fn, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, "train_bench", MODES,
                           "comma list of train_step (forward, loss, backward, SGD step) and eval_fwd (no_grad)",
                           "bf16 on cuda, fp32 on cpu")
    parser.add_argument("--providers", type=common.csv_list(str, PROVIDERS), default=None,
                        help=f"comma list of {PROVIDERS}; default: {CUDA_PROVIDERS} on cuda, {CPU_PROVIDERS} on cpu")
    parser.add_argument("--models", type=common.csv_list(str, DEPTHS), default=None,
                        help="comma list of r50, r101 (default: both; --quick: r50)")
    parser.add_argument("--output-strides", type=common.csv_list(int, (8, 16)), default=[16],
                        help="comma list of 16, 8 (default: 16)")
    parser.add_argument("--image-size", type=common.int_at_least(16, "pixels: the largest output stride"),
                        default=None,
                        help="square crop (default 513 on cuda, 65 on cpu; --quick: 257 on cuda, 17 on cpu)")
    parser.add_argument("--num-classes", type=common.int_at_least(1, "classes"), default=21,
                        help="classes of the head and of the random labels (default: %(default)s)")
    args = common.parse_args(parser, argv)
    device = common.resolve_device(args)
    cuda = device.type == "cuda"
    providers = args.providers or list(CUDA_PROVIDERS if cuda else CPU_PROVIDERS)
    dtypes = args.dtypes or (["bf16"] if cuda else ["fp32"])
    batches = args.batches or ([16] if cuda else [2])
    size = args.image_size or (513 if cuda else 65)
    models = args.models or list(DEPTHS)
    if args.quick:  # fewer and smaller cases, but what was asked for explicitly is kept
        models, batches = args.models or models[:1], args.batches or batches[:1]
        size = args.image_size or (257 if cuda else 17)

    env = common.environment(device)
    print(common.header(env))
    peak, peak_desc = common.matmul_peak(device, args.quick)  # pct_peak's denominator, as in the other scripts
    meta = {"script": "train_bench", "argv": sys.argv[1:] if argv is None else argv, "environment": env,
            "environment_variables": common.run_variables(), "image_size": size, "matmul_peak": peak_desc,
            "matmul_peak_tflops": peak}
    runner = common.Runner(env, device, args, peak, meta)
    _, missing = model_factory()
    if missing:
        print(f"train_bench: {missing}; every case is recorded as skipped", file=sys.stderr)
    for name, os_, batch, dtype_name, mode in itertools.product(models, args.output_strides, batches, dtypes,
                                                                args.modes):
        shape = f"deeplabv3_{name} os{os_} {size}x{size}"
        dtype = common.set_precision(dtype_name)
        with runner.group():
            for provider in providers:
                case = dict(op="deeplabv3", provider=provider, mode=mode, dtype=dtype_name, shape=shape,
                            batch=batch)
                reason = missing or common.eager_unavailable(provider, dtype_name) or common.unavailable(
                    backend_of(provider), "conv_bn_relu", device, **probe_call(device, dtype))
                if not reason and mode == "train_step" and batch == 1:
                    reason = "BatchNorm in training needs batch >= 2 (the ASPP pooling branch)"

                def build(provider=provider, mode=mode, os_=os_, batch=batch, dtype=dtype, name=name,
                          dtype_name=dtype_name):
                    compiled = provider.startswith("compile")
                    net = make_model(provider, DEPTHS[name], os_, args.num_classes)
                    net = common.prepare_eager(net, provider, device, dtype)
                    amp = common.autocast_dtype(provider, dtype_name)
                    # under autocast the images stay float32, as a data loader gives them
                    x = torch.randn(batch, 3, size, size, device=device,
                                    dtype=torch.float32 if amp else dtype)
                    x = common.prepare_input(x, provider)  # (channels_last for -cl and -lean)
                    target = torch.randint(0, args.num_classes, (batch, size, size), device=device)
                    return step_case(mode, net, x, target, compiled, lean=provider.endswith(LEAN), amp=amp)

                counts = None if missing else model_counts(DEPTHS[name], os_, size, args.num_classes)
                flops = min_bytes = None
                if counts is not None:
                    per_image = counts[0] if mode == "train_step" else counts[1]
                    flops = (per_image * batch, per_image * batch)
                    min_bytes = step_min_bytes(mode, batch, size, args.num_classes, counts[2],
                                               common.DTYPE_BYTES[dtype_name])
                runner.run(build, reason=reason, images=batch, flops=flops, min_bytes=min_bytes, **case)
    return common.finish(runner.rows, args, meta, f"DeepLabV3 on {common.machine_name(env)} ({peak_desc})")


if __name__ == "__main__":
    sys.exit(common.run_script(main, "train_bench.py"))
