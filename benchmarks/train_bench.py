"""Benchmark a whole DeepLabV3 (ResNet-50 / ResNet-101) training step and eval forward: images/s, peak memory.

    python benchmarks/train_bench.py                                  # R50 and R101, OS 16, 513x513, bf16
    python benchmarks/train_bench.py --models r50 --output-strides 16,8 --batches 8,16 --plot
    python benchmarks/train_bench.py --device cpu --quick             # small images: cpu, reference, eager

Providers: eager (cuDNN, cudnn.benchmark on), torch.compile of the model (default; compile-max on request: it
autotunes every conv of the network), and the fused model (`deeplab_ops.nn.fuse_modules(model, backend=...)`,
what `fused=True` builds) on each deeplab_ops backend: triton, cuda (GPU), cpu, reference (CPU). A "-lean"
provider (triton-lean, cuda-lean, cpu-lean) is the same fused model in its memory-lean form, as `train.py
--fused-ops --memory-efficient` trains it: the fused ops save no pre-BN activations (memory_efficient=True) and
the loss takes the 1/16-resolution logits through `deeplab_ops.upsample_cross_entropy` (no upsampled logits);
compare its peak_mem_mb with eager's and the plain fused provider's.
train_step = zero_grad, forward, cross-entropy (ignore_index 255) against random labels, backward, SGD step
(momentum 0.9, weight decay 1e-4). eval_fwd = eval mode under no_grad. The model's parameters, buffers and inputs
are all in the benchmarked dtype (no autocast: the fused ops see what the eager convs see).
"""

from __future__ import annotations

import argparse
import sys

import common
import torch
import torch.nn.functional as F

MODES = ("train_step", "eval_fwd")
CUDA_PROVIDERS = ("eager", "compile", "triton", "cuda", "triton-lean", "cuda-lean")
CPU_PROVIDERS = ("cpu", "reference", "eager", "cpu-lean")
LEAN = "-lean"
PROVIDERS = ("eager", "compile", "compile-max", "triton", "cuda", "cpu", "reference", "triton-lean", "cuda-lean",
             "cpu-lean")


def backend_of(provider: str) -> str:
    """The deeplab_ops backend (or eager/compile provider) behind a provider name: triton-lean -> triton."""
    return provider.removesuffix(LEAN)
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
    """A typical backbone conv call, to ask a backend whether it runs the model's convs at all."""
    x = torch.empty((2, 256, 33, 33), device="meta", dtype=dtype)
    w = torch.empty((256, 256, 3, 3), device="meta", dtype=dtype)
    return {"x": x, "weight": w, "stride": (1, 1), "padding": (2, 2), "dilation": (2, 2), "training": True,
            "residual": None}


def step_case(mode: str, net: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, compiled: bool,
              lean: bool = False):
    mark = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if compiled else None
    if mode == "eval_fwd":
        net.eval()

        def fn():
            if mark:
                mark()
            with torch.no_grad():
                return net(x)["out"]

        return fn, []
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)

    def fn():
        if mark:
            mark()
        opt.zero_grad(set_to_none=True)
        if lean:
            import deeplab_ops

            loss = deeplab_ops.upsample_cross_entropy(net(x, upsample=False)["out"], target, ignore_index=255)
        else:
            loss = F.cross_entropy(net(x)["out"].float(), target, ignore_index=255)
        loss.backward()
        opt.step()

    return fn, []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, "train_bench", MODES,
                           "comma list of train_step (forward, loss, backward, SGD step) and eval_fwd (no_grad)",
                           "bf16 on cuda, fp32 on cpu")
    parser.add_argument("--providers", type=common.csv_list(str, PROVIDERS), default=None,
                        help=f"comma list of {PROVIDERS}; default: {CUDA_PROVIDERS} on cuda, {CPU_PROVIDERS} on cpu")
    parser.add_argument("--models", type=common.csv_list(str, DEPTHS), default=list(DEPTHS),
                        help="comma list of r50, r101")
    parser.add_argument("--output-strides", type=common.csv_list(int, (8, 16)), default=[16],
                        help="comma list of 16, 8")
    parser.add_argument("--image-size", type=int, default=None, help="square crop (default 513 on cuda, 65 on cpu)")
    parser.add_argument("--num-classes", type=int, default=21)
    args = parser.parse_args(argv)
    device = common.resolve_device(args)
    cuda = device.type == "cuda"
    providers = args.providers or list(CUDA_PROVIDERS if cuda else CPU_PROVIDERS)
    dtypes = args.dtypes or (["bf16"] if cuda else ["fp32"])
    batches = args.batches or ([16] if cuda else [2])
    size = args.image_size or (513 if cuda else 65)
    models = args.models
    if args.quick:
        models, batches = models[:1], batches[:1]
        size = args.image_size or (257 if cuda else 17)

    env = common.environment(device)
    print(f"{env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['git_commit']}")
    runner = common.Runner(env, device, args, None)
    _, missing = model_factory()
    if missing:
        print(f"train_bench: {missing}; every case is recorded as skipped", file=sys.stderr)
    for name in models:
        for os_ in args.output_strides:
            shape = f"deeplabv3_{name} os{os_} {size}x{size}"
            for batch in batches:
                for dtype_name in dtypes:
                    dtype = common.set_precision(dtype_name)
                    for mode in args.modes:
                        for provider in providers:
                            case = dict(op="deeplabv3", provider=provider, mode=mode, dtype=dtype_name, shape=shape,
                                        batch=batch)
                            reason = missing or common.unavailable(backend_of(provider), "conv_bn_relu", device,
                                                                   **probe_call(device, dtype))
                            if not reason and mode == "train_step" and batch == 1:
                                reason = "BatchNorm in training needs batch >= 2 (the ASPP pooling branch)"

                            def build(provider=provider, mode=mode, os_=os_, batch=batch, dtype=dtype, name=name):
                                compiled = provider.startswith("compile")
                                net = make_model(provider, DEPTHS[name], os_, args.num_classes)
                                net.to(device=device, dtype=dtype)
                                x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
                                target = torch.randint(0, args.num_classes, (batch, size, size), device=device)
                                return step_case(mode, net, x, target, compiled, lean=provider.endswith(LEAN))

                            runner.run(build, reason=reason, images=batch, **case)
    meta = {"script": "train_bench", "argv": sys.argv[1:] if argv is None else argv, "environment": env,
            "image_size": size}
    return common.finish(runner.rows, args, meta, f"DeepLabV3 on {env['gpu']}")


if __name__ == "__main__":
    sys.exit(main())
