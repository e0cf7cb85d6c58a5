"""Benchmark the ASPP module: eager (cuDNN), torch.compile (default, max-autotune), deeplab_ops triton and cuda.

    python benchmarks/aspp_bench.py                                  # every DeepLab shape, provider, mode, dtype
    python benchmarks/aspp_bench.py --dtypes bf16 --batches 16 --configs os16 --plot
    python benchmarks/aspp_bench.py --device cpu --quick             # small shapes: cpu(-cl), reference, eager(-cl)

Shapes (CUDA): Cin 2048 → Cout 256; 33×33 at output stride 16 with rates (6, 12, 18) and (12, 24, 36), 65×65 at
output stride 8 with (12, 24, 36); batches 1, 8, 16. Training modes at batch 1 are skipped: BatchNorm of the
pooling branch needs more than one value per channel, as in PyTorch. The eager module is torchvision's ASPP with
dropout 0 (model.ASPP when torchvision is absent); fused providers run deeplab_ops.nn.FusedASPP(dropout=0).
eager-cl runs it channels_last, eager-amp as an fp32 module under torch.autocast (input in the dtype, as a
backbone under autocast hands it over), eager-cl-amp both; the fastest eager setup is each case's anchor. triton-cl,
cuda-cl, cpu-cl: the fused module and its input channels_last. The -graph providers (triton-graph, cuda-graph,
eager-graph, eager-cl-graph, triton-cl-graph, cuda-cl-graph; CUDA only) replay that provider's case captured in one
CUDA graph: its kernels without the host work around them.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys

import common
import torch

CUDA_CONFIGS = {  # name: (H = W, rates)
    "os16": (33, (6, 12, 18)),
    "os16_r12": (33, (12, 24, 36)),
    "os8": (65, (12, 24, 36)),
}
CPU_CONFIGS = {"os16": (17, (3, 6, 9)), "os16_r12": (17, (6, 12, 18)), "os8": (33, (6, 12, 18))}
QUICK_CPU_CONFIGS = {"os16": (9, (2, 4, 6)), "os16_r12": (9, (3, 6, 9)), "os8": (17, (3, 6, 9))}  # --quick on cpu
SLOW_SETUP = ("compile-max",)  # providers run after all the others (main)
CUDA_PROVIDERS = ("eager", "eager-cl", "eager-amp", "eager-cl-amp", "compile", "compile-max", "triton", "cuda")
CPU_PROVIDERS = ("cpu", "cpu-cl", "reference", "eager", "eager-cl")
PROVIDERS = (*common.EAGER_PROVIDERS, "compile", "compile-max", "triton", "cuda", "cpu", "reference",
             *common.FUSED_CL_PROVIDERS, *common.GRAPH_PROVIDERS)


def eager_aspp(cin: int, rates: tuple[int, ...], cout: int) -> torch.nn.Module:
    """torchvision's ASPP with dropout 0, else model.ASPP (the same structure and keys)."""
    try:
        from torchvision.models.segmentation.deeplabv3 import ASPP

        module = ASPP(cin, list(rates), cout)
        module.project[3].p = 0.0
        return module
    except ImportError:
        from model import ASPP

        return ASPP(cin, rates, cout, dropout=0.0)


def eager_aspp_note() -> str:
    return "" if importlib.util.find_spec("torchvision") else "eager is model.ASPP (torchvision is not installed)"


def make_module(provider: str, cin: int, rates, cout: int) -> torch.nn.Module:
    provider = common.base_provider(provider)
    backend = common.fused_backend(provider)
    if backend is not None:
        from deeplab_ops.nn import FusedASPP

        return FusedASPP(cin, rates, cout, dropout=0.0, backend=backend)
    module = eager_aspp(cin, rates, cout)
    if provider in common.EAGER_PROVIDERS:
        return module
    return common.compiled(module, provider)


def make_input(batch: int, cin: int, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A case's input, batch x cin x size x size."""
    return torch.randn(batch, cin, size, size, device=device, dtype=dtype)


def select_batches(cuda: bool, given: list[int] | None, quick: bool) -> list[int]:
    """The batch sizes to run: those given (--batches), else 1, 8, 16 on cuda and 2 on cpu; --quick keeps the first
    default that runs the training modes (BatchNorm in training needs 2 images: a batch of 1 records train_fwd and
    fwd_bwd as skipped, so a quick GPU run at the first default, 1, timed eval alone): 8 on cuda, 2 on cpu."""
    if given:
        return given
    batches = [1, 8, 16] if cuda else [2]
    return [b for b in batches if b >= 2][:1] if quick else batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, "aspp_bench",
                           batches_default="1,8,16 on cuda, 2 on cpu; --quick: the first that trains, 8 on cuda")
    parser.add_argument("--providers", type=common.csv_list(str, PROVIDERS), default=None,
                        help=f"comma list of {PROVIDERS}; default: {CUDA_PROVIDERS} on cuda, {CPU_PROVIDERS} on cpu")
    parser.add_argument("--configs", type=common.csv_list(str, CUDA_CONFIGS), default=None,
                        help="comma list: os16 (33x33, rates 6/12/18), os16_r12 (33x33, 12/24/36), os8 (65x65, "
                             "12/24/36); on cpu the same names are 17/17/33 px with halved rates (--quick: 9/9/17 "
                             "px, rates 2/4/6, 3/6/9, 3/6/9); default: all (--quick: os16)")
    parser.add_argument("--in-channels", type=common.int_at_least(1, "channels"), default=None,
                        help="Cin (default 2048 on cuda, 64 on cpu; --quick on cpu: 32)")
    parser.add_argument("--out-channels", type=common.int_at_least(1, "channels"), default=None,
                        help="Cout (default 256 on cuda, 32 on cpu; --quick on cpu: 16)")
    args = common.parse_args(parser, argv)
    device = common.resolve_device(args)
    cuda = device.type == "cuda"
    providers = args.providers or list(CUDA_PROVIDERS if cuda else CPU_PROVIDERS)
    dtypes = args.dtypes or (["bf16", "fp16", "fp32", "tf32"] if cuda else ["fp32"])
    batches = select_batches(cuda, args.batches, args.quick)
    configs = CUDA_CONFIGS if cuda else CPU_CONFIGS
    names = args.configs or list(CUDA_CONFIGS)
    cin = args.in_channels or (2048 if cuda else 64)
    cout = args.out_channels or (256 if cuda else 32)
    if args.quick:  # fewer and smaller cases, but what was asked for explicitly is kept
        names = args.configs or names[:1]
        if not cuda:
            configs = QUICK_CPU_CONFIGS
            cin, cout = args.in_channels or 32, args.out_channels or 16

    env = common.environment(device)
    peak, peak_desc = common.matmul_peak(device, args.quick)
    print(common.header(env))
    print(f"peak: {peak_desc}")
    fractions = {name: {r: round(common.valid_tap_fraction(configs[name][0], r), 4) for r in configs[name][1]}
                 for name in names}
    meta = {"script": "aspp_bench", "argv": sys.argv[1:] if argv is None else argv, "matmul_peak": peak_desc,
            "matmul_peak_tflops": peak, "valid_tap_fraction": fractions, "environment": env,
            "environment_variables": common.run_variables()}
    runner = common.Runner(env, device, args, peak, meta)
    # max-autotune's setup takes a minute per case on a GPU (47 s and 71 s per mode on the H200, where it spent the
    # suite's ASPP budget before any fwd_bwd row ran): its rows come after every other provider's, all modes, so a
    # budget cut leaves them out rather than the others' forward+backward. On the CPU that second pass is a group
    # of its own: compile-max is timed interleaved with no other provider, at another time than its case's eager
    # rows (docs/benchmarks.md says so).
    slow = [p for p in providers if p in SLOW_SETUP]
    passes = [ps for ps in ([p for p in providers if p not in SLOW_SETUP], slow) if ps]
    for pass_providers, name in itertools.product(passes, names):
        size, rates = configs[name]
        forward = common.aspp_flops(1, cin, cout, size, size, rates)
        shape = f"{cin}x{size}x{size} r{'/'.join(map(str, rates))} ->{cout}"
        for batch, dtype_name, mode in itertools.product(batches, dtypes, args.modes):
            dtype = common.set_precision(dtype_name)
            training = mode != "eval_fwd"
            flops = common.mode_flops((forward[0] * batch, forward[1] * batch), mode)
            with runner.group():
                for provider in pass_providers:
                    case = dict(op="aspp", provider=provider, mode=mode, dtype=dtype_name, shape=shape,
                                batch=batch)
                    # a batch too large to allocate is this case's error row (failed_build), not the run's end
                    x, failed = common.allocate(make_input, batch, cin, size, device, dtype)
                    reason = (common.eager_unavailable(provider, dtype_name)
                              or (common.unavailable(provider, "aspp", device, x=x, rates=rates, channels=cout,
                                                     training=training) if failed is None else ""))
                    if training and batch == 1:
                        reason = "BatchNorm in training needs batch >= 2 (the pooling branch has 1 value/channel)"
                    module_note = "" if common.fused_backend(provider) else eager_aspp_note()

                    def build(provider=provider, mode=mode, x=x, rates=rates, dtype=dtype, dtype_name=dtype_name):
                        compiled = provider.startswith("compile")
                        module = common.prepare_eager(make_module(provider, cin, rates, cout), provider, device,
                                                      dtype)
                        case = common.mode_case(mode, module, [common.prepare_input(x, provider)], compiled,
                                                amp=common.autocast_dtype(provider, dtype_name))
                        return common.graphed(case, device) if provider in common.GRAPH_PROVIDERS else case

                    if failed is not None:
                        build = common.failed_build(failed)
                    min_bytes = common.aspp_min_bytes(batch, cin, cout, size, size, rates, mode,
                                                      common.DTYPE_BYTES[dtype_name])
                    runner.run(build, reason=reason, flops=flops, note=module_note, min_bytes=min_bytes, **case)
    return common.finish(runner.rows, args, meta, f"ASPP on {common.machine_name(env)} ({peak_desc})")


if __name__ == "__main__":
    sys.exit(common.run_script(main, "aspp_bench.py"))
