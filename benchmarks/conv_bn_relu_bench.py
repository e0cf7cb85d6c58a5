"""Benchmark fused conv + BatchNorm (+ residual) + ReLU at DeepLabV3's ResNet-50/101 shapes and ASPP rates.

    python benchmarks/conv_bn_relu_bench.py                          # every shape, provider, mode, dtype
    python benchmarks/conv_bn_relu_bench.py --dtypes bf16 --shapes os16 --plot
    python benchmarks/conv_bn_relu_bench.py --device cpu --quick     # small shapes: cpu, reference, eager

Shapes are those of a 513×513 crop. ResNet-50 and ResNet-101 have the same block shapes (ResNet-101 repeats
layer3's 23 times instead of 6), so one row covers both. Group os16: layer1 at 129×129 and layer2 (stride 2 at
129×129, stride 1 at 65×65), the same at either output stride, then output stride 16's layer3 at 33×33 (3×3, and
the 1×1 with the residual) and layer4 at 33×33 (dilation 2; 4 with multi-grid); group os8: layer3 at 65×65
(dilation 2), layer4 at 65×65 (dilation 4, and the 1×1 with the residual); group aspp: the ASPP 3×3 branches
(2048 → 256) at rates 6/12/18 (33×33) and 12/24/36 (65×65). Providers:
eager nn.Sequential(Conv2d(bias=False), BatchNorm2d, ReLU) (cuDNN, cudnn.benchmark on), deeplab_ops.reference,
torch.compile of the eager module (default, max-autotune), deeplab_ops triton, cuda and cpu; eager-cl, eager-amp,
eager-cl-amp: the eager module channels_last, under torch.autocast (fp32 module), or both; triton-cl, cuda-cl,
cpu-cl: the fused module and its input channels_last (the layout train.py --fused-ops runs); the -graph providers
(triton-graph, cuda-graph, eager-graph, eager-cl-graph, triton-cl-graph, cuda-cl-graph; CUDA only): that provider's
case captured in one CUDA graph and replayed, its kernels without the host work around them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass

import common
import torch
from torch import nn

CUDA_PROVIDERS = ("eager", "eager-cl", "eager-amp", "eager-cl-amp", "reference", "compile", "compile-max", "triton",
                  "cuda")
CPU_PROVIDERS = ("cpu", "cpu-cl", "reference", "eager", "eager-cl")
PROVIDERS = (*common.EAGER_PROVIDERS, "reference", "compile", "compile-max", "triton", "cuda", "cpu",
             *common.FUSED_CL_PROVIDERS, *common.GRAPH_PROVIDERS)


@dataclass(frozen=True)
class ConvShape:
    group: str  # os16, os8, aspp (what --shapes selects)
    name: str
    cin: int
    cout: int
    kernel: int
    size: int  # input H = W
    stride: int = 1
    dilation: int = 1
    residual: bool = False

    @property
    def padding(self) -> int:
        return self.dilation * (self.kernel - 1) // 2

    @property
    def out_size(self) -> int:
        return (self.size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1

    def label(self) -> str:
        s = f"{self.name} {self.cin}->{self.cout} k{self.kernel}"
        s += f" s{self.stride}" if self.stride > 1 else ""
        s += f" d{self.dilation}" if self.dilation > 1 else ""
        return s + f" @{self.size}" + (" +res" if self.residual else "")


CUDA_SHAPES = (
    ConvShape("os16", "layer1", 64, 64, 3, 129),
    ConvShape("os16", "layer2", 128, 128, 3, 129, stride=2),
    ConvShape("os16", "layer2", 128, 128, 3, 65),
    ConvShape("os16", "layer3", 256, 256, 3, 33),
    ConvShape("os16", "layer3", 256, 1024, 1, 33, residual=True),
    ConvShape("os16", "layer4", 512, 512, 3, 33, dilation=2),
    ConvShape("os16", "layer4", 512, 512, 3, 33, dilation=4),
    ConvShape("os8", "layer3", 256, 256, 3, 65, dilation=2),
    ConvShape("os8", "layer4", 512, 512, 3, 65, dilation=4),
    ConvShape("os8", "layer4", 512, 2048, 1, 65, residual=True),
    *(ConvShape("aspp", "aspp", 2048, 256, 3, 33, dilation=r) for r in (6, 12, 18)),
    *(ConvShape("aspp", "aspp", 2048, 256, 3, 65, dilation=r) for r in (12, 24, 36)),
)
# --shape-set small (the default on cpu): the kinds of layer of CUDA_SHAPES (3x3, 1x1 with the residual, stride 2,
# dilation, an ASPP branch), fewer channels and smaller maps; not each of its rows: no layer1, no stride-1 layer2,
# no dilation-2 row, one ASPP rate of six (docs/benchmarks.md says so).
CPU_SHAPES = (
    ConvShape("os16", "layer3", 32, 32, 3, 17),
    ConvShape("os16", "layer3", 64, 64, 3, 33),
    ConvShape("os16", "layer3", 32, 64, 1, 17, residual=True),
    ConvShape("os16", "layer2", 16, 16, 3, 33, stride=2),
    ConvShape("os8", "layer4", 32, 32, 3, 17, dilation=4),
    ConvShape("aspp", "aspp", 64, 16, 3, 17, dilation=6),
)
SHAPE_GROUPS = ("os16", "os8", "aspp")
QUICK_CPU_SHAPES = (
    ConvShape("os16", "layer3", 16, 16, 3, 9, dilation=2),
    ConvShape("os16", "layer3", 16, 32, 1, 9, residual=True),
)


class EagerConvBNReLU(nn.Module):
    """relu(bn(conv(x)) [+ residual]) in plain PyTorch modules (the cuDNN baseline)."""

    def __init__(self, s: ConvShape) -> None:
        super().__init__()
        self.conv = nn.Conv2d(s.cin, s.cout, s.kernel, s.stride, s.padding, s.dilation, bias=False)
        self.bn = nn.BatchNorm2d(s.cout)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.relu(y if residual is None else y + residual)


class ReferenceConvBNReLU(EagerConvBNReLU):
    """deeplab_ops.reference.conv_bn_relu on the same parameters and buffers."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        from deeplab_ops import reference

        c, bn = self.conv, self.bn
        return reference.conv_bn_relu(
            x, c.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, stride=c.stride, padding=c.padding,
            dilation=c.dilation, training=self.training, momentum=bn.momentum, eps=bn.eps, residual=residual,
        )


def make_module(provider: str, s: ConvShape) -> nn.Module:
    provider = common.base_provider(provider)
    backend = common.fused_backend(provider)
    if backend in ("triton", "cuda", "cpu"):
        from deeplab_ops.nn import FusedConvBNReLU

        return FusedConvBNReLU(s.cin, s.cout, s.kernel, s.stride, s.padding, s.dilation, backend=backend)
    if provider == "reference":
        return ReferenceConvBNReLU(s)
    module = EagerConvBNReLU(s)
    if provider in common.EAGER_PROVIDERS:
        return module
    return common.compiled(module, provider)


def make_inputs(s: ConvShape, batch: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A case's input and residual (None for a shape without one)."""
    x = torch.randn(batch, s.cin, s.size, s.size, device=device, dtype=dtype)
    r = torch.randn(batch, s.cout, s.out_size, s.out_size, device=device, dtype=dtype) if s.residual else None
    return x, r


def select_shapes(cuda: bool, shape_set: str | None, groups: list[str] | None, quick: bool) -> list[ConvShape]:
    """The rows to run: shape_set "deeplab" (the default on cuda) or "small" (the default on cpu), in `groups`
    (None: every group). --quick keeps the first two rows, and with groups given the first two of each group, so
    that every group asked for runs (on cpu, with neither a set nor groups given, two smaller layers still: given
    ones are kept, as every explicit list is)."""
    if quick and not cuda and shape_set is None and groups is None:
        return list(QUICK_CPU_SHAPES)
    shape_set = shape_set or ("deeplab" if cuda else "small")
    shapes = [s for s in (CUDA_SHAPES if shape_set == "deeplab" else CPU_SHAPES)
              if groups is None or s.group in groups]
    if not quick:
        return shapes
    if groups is None:
        return shapes[:2]
    return [s for i, s in enumerate(shapes) if sum(t.group == s.group for t in shapes[:i]) < 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, "conv_bn_relu_bench")
    parser.add_argument("--providers", type=common.csv_list(str, PROVIDERS), default=None,
                        help=f"comma list of {PROVIDERS}; default: {CUDA_PROVIDERS} on cuda, {CPU_PROVIDERS} on cpu")
    parser.add_argument("--shapes", type=common.csv_list(str, SHAPE_GROUPS), default=None,
                        help="comma list of shape groups: os16 (layer1, layer2, and layer3/layer4 at output stride "
                             "16), os8 (layer3/layer4 at output stride 8), aspp (the ASPP's 3x3 branches) "
                             "(default: all; --quick keeps the first two rows of each group given)")
    parser.add_argument("--shape-set", choices=("deeplab", "small"), default=None,
                        help="deeplab: DeepLabV3's own layer shapes (a 513x513 crop; the default on cuda); small: "
                             "six layers with fewer channels and smaller maps, the deeplab set's kinds of layer (3x3 "
                             "at two sizes, 1x1 with the residual, 3x3 stride 2, 3x3 dilation 4, an ASPP branch at "
                             "rate 6) but not each of its rows: no layer1, no dilation 2, one ASPP rate (the default "
                             "on cpu, where the deeplab set takes minutes)")
    args = common.parse_args(parser, argv)
    device = common.resolve_device(args)
    cuda = device.type == "cuda"
    providers = args.providers or list(CUDA_PROVIDERS if cuda else CPU_PROVIDERS)
    dtypes = args.dtypes or (["bf16", "fp16", "fp32", "tf32"] if cuda else ["fp32"])
    batches = args.batches or ([16] if cuda else [2])
    shapes = select_shapes(cuda, args.shape_set, args.shapes, args.quick)

    env = common.environment(device)
    peak, peak_desc = common.matmul_peak(device, args.quick)
    print(common.header(env))
    print(f"peak: {peak_desc}")
    meta = {"script": "conv_bn_relu_bench", "argv": sys.argv[1:] if argv is None else argv, "matmul_peak": peak_desc,
            "matmul_peak_tflops": peak, "environment": env, "environment_variables": common.run_variables()}
    runner = common.Runner(env, device, args, peak, meta)
    for s in shapes:
        forward = common.conv_flops(1, s.cin, s.cout, s.size, s.size, s.kernel, s.dilation, s.padding, s.stride)
        for batch, dtype_name, mode in itertools.product(batches, dtypes, args.modes):
            dtype = common.set_precision(dtype_name)
            flops = common.mode_flops((forward[0] * batch, forward[1] * batch), mode)
            with runner.group():
                for provider in providers:
                    case = dict(op="conv_bn_relu", provider=provider, mode=mode, dtype=dtype_name,
                                shape=s.label(), batch=batch)
                    # a batch too large to allocate is this case's error row (failed_build), not the run's end
                    inputs, failed = common.allocate(make_inputs, s, batch, device, dtype)
                    x, r = inputs or (None, None)
                    w = torch.empty(s.cout, s.cin, s.kernel, s.kernel, device="meta")
                    pair = (s.stride,) * 2, (s.padding,) * 2, (s.dilation,) * 2
                    reason = common.unavailable(
                        provider, "conv_bn_relu", device, x=x, weight=w, stride=pair[0], padding=pair[1],
                        dilation=pair[2], training=mode != "eval_fwd", residual=r,
                    ) if provider != "reference" and failed is None else ""
                    reason = common.eager_unavailable(provider, dtype_name) or reason

                    def build(provider=provider, mode=mode, x=x, r=r, s=s, dtype=dtype, dtype_name=dtype_name):
                        compiled = provider.startswith("compile")
                        module = common.prepare_eager(make_module(provider, s), provider, device, dtype)
                        inputs = [common.prepare_input(t, provider) for t in ([x] if r is None else [x, r])]
                        case = common.mode_case(mode, module, inputs, compiled,
                                                amp=common.autocast_dtype(provider, dtype_name))
                        return common.graphed(case, device) if provider in common.GRAPH_PROVIDERS else case

                    if failed is not None:
                        build = common.failed_build(failed)
                    min_bytes = common.conv_bn_relu_min_bytes(
                        batch, s.cin, s.cout, s.size, s.size, s.kernel, s.out_size, s.out_size, s.residual, mode,
                        common.DTYPE_BYTES[dtype_name])
                    runner.run(build, reason=reason, flops=flops, min_bytes=min_bytes, **case)
    return common.finish(runner.rows, args, meta, f"conv + BN + ReLU on {common.machine_name(env)} ({peak_desc})")


if __name__ == "__main__":
    sys.exit(common.run_script(main, "conv_bn_relu_bench.py"))
