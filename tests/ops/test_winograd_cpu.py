"""The cpu backend's Winograd convolution (csrc/cpu/winograd_cpu.cpp): float32 3x3 convolutions of stride 1 (and
2) with at least 32 channels each way, where F(4x4, 3x3), F(3x3, 3x3), F(2x2, 3x3) or the stride-2 tiles do less
work than oneDNN, in inference only (eval with no gradient to compute: conv_bias_act with BatchNorm folded in, the
fused ASPP's branches); training and eval-with-gradients keep oneDNN's convolution.

Which algorithm ran is read from the profiler (Winograd records deeplab_ops::winograd_conv3x3 around its own GEMMs;
oneDNN's convolution is mkldnn::_convolution_pointwise or aten::convolution); values are compared with float64
convolutions on fresh inputs, odd shapes, paddings and dilations included.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import deeplab_ops
from deeplab_ops import reference

_ops = torch.ops.deeplab_ops
CL = torch.channels_last
WINOGRAD = "deeplab_ops::winograd_conv3x3"  # the profiler's name of a Winograd convolution


def _ran(fn):
    """fn's result and the names of the aten/deeplab ops it ran."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


def _used_winograd(names) -> bool:
    conv = {"aten::convolution", "aten::_convolution", "mkldnn::_convolution_pointwise", "aten::mkldnn_convolution"}
    return WINOGRAD in names and not conv & names


def _inputs(n, c, k, h, w, scale=1.0):
    x = torch.randn(n, c, h, w).contiguous(memory_format=CL)
    weight = (torch.randn(k, c, 3, 3) * scale / (3 * c**0.5)).contiguous(memory_format=CL)
    return x, weight


def _kept(weight):
    """weight, registered as one whose Winograd transform is kept between calls (as the eval path registers the
    BatchNorm folds it caches): winograd_plan then counts no per-call weight transform against it."""
    _ops.winograd_cache_allow(weight)
    return weight


def _close(actual, expected, what, tol=2e-5):
    # Winograd rounds in its transforms: 3-14x oneDNN's mean error, relative to the output's size (docs/kernels.md).
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual.double(), expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}:\n{m}")


# (N, C_in, C_out, H, W, padding, dilation): square and not, 'same' padding and not, tiles over the border,
# outputs smaller than one tile, channel counts that are not a multiple of the vector width or of 64.
WINOGRAD_CASES = [
    (2, 32, 32, 17, 17, (1, 1), (1, 1)),
    (1, 40, 36, 13, 22, (1, 1), (1, 1)),
    (2, 33, 70, 9, 9, (0, 0), (1, 1)),
    (1, 32, 32, 20, 15, (2, 1), (2, 1)),
    (1, 48, 32, 33, 33, (2, 2), (2, 2)),
    (2, 32, 40, 7, 7, (1, 1), (1, 1)),
    (1, 65, 33, 12, 12, (3, 3), (1, 1)),
    (1, 32, 32, 29, 29, (4, 4), (4, 4)),
    # F(3x3, 3x3): 9 x 9 phase grids, a 9 x 15 map, a grid of 6 x 9 / 6 x 14 pixels per phase
    (1, 32, 32, 27, 27, (3, 3), (3, 3)),
    (2, 40, 36, 9, 15, (1, 1), (1, 1)),
    (1, 36, 40, 18, 27, (3, 2), (3, 2)),
    # F(2x2, 3x3): a 2 x 4 output
    (2, 32, 32, 4, 6, (0, 0), (1, 1)),
]
# The tile size winograd_plan picks for each case above.
WINOGRAD_TILES = [4, 4, 4, 4, 4, 4, 4, 4, 3, 3, 3, 2]


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=str)
@pytest.mark.parametrize("epilogue", ["bias", "bias+residual+relu", "relu", "residual"])
def test_conv_bias_act_runs_winograd_and_matches_float64(case, epilogue, layout):
    # NCHW input is converted in and out (the output keeps x's memory format).
    n, c, k, h, w, padding, dilation = case
    x, weight = _inputs(n, c, k, h, w)
    x, weight = x.contiguous(memory_format=layout), _kept(weight)
    bias = torch.randn(k) if "bias" in epilogue else None
    ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), 1, padding, dilation)
    residual = torch.randn(ref.shape).contiguous(memory_format=layout) if "residual" in epilogue else None
    if residual is not None:
        ref = ref + residual.double()
    relu = "relu" in epilogue
    if relu:
        ref = F.relu(ref)
    out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, residual, (1, 1), padding, dilation, relu))
    assert _used_winograd(names), sorted(names)
    assert out.shape == ref.shape and out.dtype == torch.float32 and out.is_contiguous(memory_format=layout)
    _close(out, ref, f"winograd {case} {epilogue}")


def _plan(n, c, k, h, w, padding, dilation, stride=(1, 1), kept=True):
    weight = torch.empty(k, c, 3, 3)
    return _ops.winograd_plan(torch.empty(n, c, h, w), _kept(weight) if kept else weight, stride, padding, dilation)


@pytest.mark.parametrize(
    "case,tile",
    [*zip(WINOGRAD_CASES, WINOGRAD_TILES, strict=True),
     # DeepLabV3's layers on a 513 x 513 crop: F(4x4) on dense maps; F(3x3) where the dilation splits a 33 x 33 or
     # 65 x 65 map into grids of 9, 6 or 3 pixels (layer4 at dilation 4, the ASPP's rates 6 and 12); short grids
     # (1) where the grids are at most 3 pixels and mostly padding for tiles (rate 18 on 33 x 33, 24 and 36 on
     # 65 x 65)
     ((1, 256, 256, 33, 33, (1, 1), (1, 1)), 4), ((1, 512, 512, 33, 33, (2, 2), (2, 2)), 4),
     ((1, 512, 512, 33, 33, (4, 4), (4, 4)), 3), ((1, 2048, 256, 33, 33, (6, 6), (6, 6)), 3),
     ((1, 2048, 256, 33, 33, (12, 12), (12, 12)), 3), ((1, 2048, 256, 65, 65, (12, 12), (12, 12)), 3),
     ((1, 2048, 256, 33, 33, (18, 18), (18, 18)), 1), ((1, 2048, 256, 65, 65, (24, 24), (24, 24)), 1),
     ((1, 2048, 256, 65, 65, (36, 36), (36, 36)), 1), ((2, 2048, 256, 33, 33, (18, 18), (18, 18)), 1),
     # short grids declined: grids of 2 and 1 pixels where most are 1 (rate 24 on 33 x 33, rate 12 on 17 x 17: the
     # GEMMs' weight reads outweigh the products saved), 256 channels (the transforms' share too large), padding
     # other than the dilation (the grids are not whole convolutions with padding 1)
     ((1, 2048, 256, 33, 33, (24, 24), (24, 24)), 0), ((1, 2048, 256, 17, 17, (12, 12), (12, 12)), 0),
     ((1, 256, 256, 33, 33, (12, 12), (12, 12)), 0), ((1, 300, 300, 33, 33, (18, 17), (18, 18)), 0)],
    ids=str,
)
def test_plan_picks_the_tile_size_with_the_fewest_products(case, tile):
    assert _plan(*case) == tile


@pytest.mark.parametrize(
    "case,kept,transformed",
    [((2, 32, 32, 17, 17, (1, 1), (1, 1)), 4, 0),  # 50 tiles: a transform per call would cost more than it saves
     ((1, 32, 32, 32, 32, (1, 1), (1, 1)), 4, 4),  # 64 tiles: it pays even so
     ((2, 2048, 256, 33, 33, (6, 6), (6, 6)), 3, 0),  # an ASPP branch (its parameter, not kept): oneDNN
     ((8, 2048, 256, 33, 33, (6, 6), (6, 6)), 3, 3),  # ... but over batch 8's tiles the transform pays
     ((2, 2048, 256, 65, 65, (12, 12), (12, 12)), 3, 3),  # ... as over an output-stride-8 map's (docs/kernels.md)
     ((1, 512, 512, 33, 33, (2, 2), (2, 2)), 4, 3)],  # F(4x4)'s 38 MB transform would be mapped in on every call
    ids=str,
)
def test_plan_counts_the_weight_transform_of_weights_not_kept(case, kept, transformed):
    # A weight not registered with winograd_cache_allow is transformed on every call: the plan adds that cost.
    assert _plan(*case, kept=True) == kept
    assert _plan(*case, kept=False) == transformed


# Stride 2 (plan -4): (N, C_in, C_out, H, W, padding), odd and even maps, no padding, asymmetric padding, channel counts
# that leave part of a 32-channel GEMM panel, tiles over the border.
STRIDED_CASES = [
    (1, 40, 36, 47, 31, (1, 1)),
    (2, 33, 70, 32, 25, (0, 0)),
    (2, 32, 48, 30, 31, (2, 1)),
    (2, 32, 32, 16, 16, (1, 1)),
    # outputs of 4t + 1 rows or columns: the last one computed directly (strided_edges), not by a row of tiles
    (1, 32, 48, 129, 129, (1, 1)),  # 65 x 65 (DeepLabV3's layer2): the last row and column
    (2, 32, 40, 35, 33, (0, 0)),  # 17 x 16: the last row only
    (1, 36, 33, 33, 35, (0, 0)),  # 16 x 17: the last column only (33 output channels: a part panel)
    (1, 32, 32, 75, 75, (0, 0)),  # 37 x 37
]


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", STRIDED_CASES, ids=str)
@pytest.mark.parametrize("epilogue", ["bias", "bias+residual+relu"])
def test_stride_2_runs_winograd_and_matches_float64(case, epilogue, layout):
    n, c, k, h, w, padding = case
    x, weight = _inputs(n, c, k, h, w)
    x, weight = x.contiguous(memory_format=layout), _kept(weight)
    assert _ops.winograd_plan(x, weight, (2, 2), padding, (1, 1)) == -4
    bias = torch.randn(k)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 2, padding)
    residual = torch.randn(ref.shape).contiguous(memory_format=layout) if "residual" in epilogue else None
    if residual is not None:
        ref = F.relu(ref + residual.double())
    out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, residual, (2, 2), padding, (1, 1),
                                                  residual is not None))
    assert _used_winograd(names), sorted(names)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=layout)
    _close(out, ref, f"stride 2 {case} {epilogue}")


@pytest.mark.parametrize("size", [(31, 32), (129, 66)], ids=["tiles", "edges"])  # 16 x 16; 65 x 33 with edges
def test_stride_2_gives_the_same_bits_for_any_thread_count(size):
    x, weight = _inputs(3, 64, 40, *size)
    weight = _kept(weight)
    bias = torch.randn(40)
    assert _ops.winograd_plan(x, weight, (2, 2), (1, 1), (1, 1)) == -4
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            # with an epilogue: the plain form (no bias, residual or ReLU: a training recompute) keeps oneDNN
            out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, None, (2, 2), (1, 1), (1, 1), True))
            assert _used_winograd(names), sorted(names)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 2, 1))
    _close(outs[0], ref, "stride 2, 3 threads")


@pytest.mark.parametrize("size,edges", [((129, 129), True), ((129, 66), True), ((127, 127), False)],
                         ids=["65x65", "65x33", "64x64"])
def test_stride_2_edges_run_directly_with_their_weight_kept(size, edges):
    """An output of 4t + 1 pixels across computes its last row and column directly (strided_edges), with the weight
    packed for it kept beside the tile transform: two cache entries, each found again on the next call, and the
    output equal to float64's; an output without such an edge keeps one entry."""
    x, weight = _inputs(1, 32, 40, *size)
    _ops.winograd_cache_clear()  # (forgets the registrations too)
    weight = _kept(weight)
    assert _ops.winograd_plan(x, weight, (2, 2), (1, 1), (1, 1)) == -4
    before = _ops.winograd_cache_info()
    bias = torch.randn(40)
    outs = [_ops.conv_bias_act(x, weight, bias, None, (2, 2), (1, 1), (1, 1), True) for _ in range(2)]
    entries, _, hits, misses = (a - b for a, b in zip(_ops.winograd_cache_info(), before, strict=True))
    kept = 2 if edges else 1
    assert (entries, misses, hits) == (kept, kept, kept)
    assert torch.equal(outs[0], outs[1])
    _close(outs[0], F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 2, 1)), f"stride 2 {size}")


# (N, C_in, C_out, H, W, padding): outputs of 4t + 1 rows and columns, their last row and column (strided_edges) with
# taps in the padding beyond them (padding 1 on an odd map: one of three rows or columns of taps; padding 2 on an odd
# map: two) and without (padding 0 on an odd map, 1 on an even one), the ends of a row and column gathered (padding
# at least 1) or not, batches of 1 and 2, channel counts that are not a multiple of the vector width. (In the
# baseline build, with no vector kernels, the edges are all gathered.)
EDGE_CASES = [
    (2, 32, 48, 129, 129, (1, 1)),
    (1, 33, 35, 129, 66, (1, 1)),
    (2, 40, 32, 83, 65, (0, 1)),
    (1, 32, 32, 159, 160, (2, 2)),
]


@pytest.mark.parametrize("case", EDGE_CASES, ids=str)
def test_stride_2_edges_read_in_place_give_the_gathered_bits(case):
    """A channels-last x's edge pixels are read in place, a tap per term, the taps outside x left out; an NCHW x's
    are gathered as 3 x 3 patches with zeros outside (strided_edges). Both are one chain of multiply-adds over (ky,
    kx, c), so the two layouts give the same bits, and both float64's values."""
    n, c, k, h, w, padding = case
    x, weight = _inputs(n, c, k, h, w)
    weight = _kept(weight)
    assert _ops.winograd_plan(x, weight, (2, 2), padding, (1, 1)) == -4
    bias = torch.randn(k)
    outs = {}
    for layout in (CL, torch.contiguous_format):
        out, names = _ran(lambda layout=layout: _ops.conv_bias_act(
            x.contiguous(memory_format=layout), weight, bias, None, (2, 2), padding, (1, 1), True))
        assert _used_winograd(names), sorted(names)
        outs[layout] = out
    assert (outs[CL].shape[-2] - 1) % 4 == 0 and (outs[CL].shape[-1] - 1) % 4 == 0  # edges on both sides
    assert torch.equal(outs[CL], outs[torch.contiguous_format])
    _close(outs[CL], F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 2, padding)), f"edges {case}")


# (N, C_in, C_out, H, W, stride): a block's V and M share one buffer of max(C_in, C_out) floats per element, each
# GEMM writing its products over V elements that earlier GEMMs have read (gemm_plan), unless that takes more memory
# than the two apart: channel counts 36 times apart or more at stride 1 (37 slots of max(C_in, C_out) floats against
# 36 of each).
SLOT_CASES = [
    (1, 32, 1200, 17, 17, 1),  # apart
    (1, 1200, 32, 17, 17, 1),  # apart
    (1, 32, 600, 17, 17, 1),  # shared, C_out wider
    (2, 600, 32, 13, 17, 1),  # shared, C_in wider
    (1, 40, 160, 47, 47, 2),  # shared (85 slots), C_out wider
    (2, 160, 40, 31, 47, 2),  # shared, C_in wider
]


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", SLOT_CASES, ids=str)
def test_v_and_m_shared_or_apart_match_float64_on_any_thread_count(case, layout):
    n, c, k, h, w, stride = case
    x, weight = _inputs(n, c, k, h, w)
    x, weight = x.contiguous(memory_format=layout), _kept(weight)
    assert _ops.winograd_plan(x, weight, (stride, stride), (1, 1), (1, 1)) == (4 if stride == 1 else -4)
    bias, residual = torch.randn(k), None
    ref = F.conv2d(x.double(), weight.double(), bias.double(), stride, 1)
    residual = torch.randn(ref.shape).contiguous(memory_format=layout)
    ref = F.relu(ref + residual.double())
    outs = []
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, residual, (stride, stride), (1, 1), (1, 1),
                                                         True))
            assert _used_winograd(names), sorted(names)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    for t, out in enumerate(outs, 1):
        _close(out, ref, f"slots {case}, {t} threads")
    # the same bits for any thread count, but in the baseline build, whose GEMMs are ATen's mm (cpu/gemm_cpu.h)
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert all(torch.equal(outs[0], o) for o in outs[1:])


# (N, C_in, C_out, H, W, stride, padding, tile size winograd_plan picks): NCHW activations that winograd_blocks reads
# and writes through bands of rows: blocks of tiles across two and three images and across rows of tiles, each tile
# size of stride 1, stride 2 with and without edges, maps of many bands per thread.
BAND_CASES = [
    ((2, 32, 40, 17, 17, 1, (1, 1)), 4),
    ((3, 40, 36, 9, 15, 1, (1, 1)), 3),
    ((2, 32, 32, 4, 6, 1, (0, 0)), 2),
    ((1, 64, 64, 60, 61, 1, (1, 1)), 4),
    ((2, 33, 70, 32, 25, 2, (0, 0)), -4),  # 16 x 12 plus the last column
    ((1, 32, 48, 129, 129, 2, (1, 1)), -4),  # 65 x 65: the last row and column
    ((3, 32, 32, 31, 32, 2, (1, 1)), -4),  # 16 x 16, no edges
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case,tile", BAND_CASES, ids=str)
def test_nchw_runs_in_bands_with_the_bits_of_channels_last(case, tile, threads):
    """An NCHW x is read, and the NCHW output written, through channels-last bands of rows per block of tiles: the
    same bits as the channels-last call (the transforms read and write the same values), and nothing allocated
    through torch but the output: no whole-map conversion of x or of the output, and the bands, V and M in the
    threads' kept scratch (thread_scratch), not in per-call buffers."""
    n, c, k, h, w, stride, padding = case
    x, weight = _inputs(n, c, k, h, w)
    weight, bias = _kept(weight), torch.randn(k)
    x_nchw = x.contiguous()
    assert _ops.winograd_plan(x_nchw, weight, (stride, stride), padding, (1, 1)) == tile

    def conv(inp):
        return _ops.conv_bias_act(inp, weight, bias, None, (stride, stride), padding, (1, 1), True)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        expected = conv(x)
        out, names = _ran(lambda: conv(x_nchw))
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            again = conv(x_nchw)
    finally:
        torch.set_num_threads(before)
    assert _used_winograd(names), sorted(names)
    assert out.is_contiguous() and torch.equal(out, expected) and torch.equal(again, expected)
    allocs = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    assert allocs == [again.numel() * again.element_size()], allocs
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), stride, padding))
    _close(out, ref, f"nchw bands {case}")


@pytest.mark.parametrize("case,plan", [
    ((1, 128, 128, 129, 129, (1, 1)), -4),  # DeepLabV3's layer2 stride-2 convolution (0.63 of direct's products)
    ((1, 256, 256, 65, 65, (1, 1)), 0),  # its layer3 one: the 9.4 MB transform is read from L3 by every block
    ((1, 64, 64, 33, 33, (1, 1)), 0),  # 17 x 17 outputs: 5 x 5 tiles of which a fifth is padding
    ((1, 16, 16, 129, 129, (1, 1)), 0),  # too few channels for the GEMMs
], ids=str)
def test_stride_2_plan(case, plan):
    n, c, k, h, w, padding = case
    assert _plan(n, c, k, h, w, padding, (1, 1), stride=(2, 2)) == plan


def test_plan_declines_what_winograd_cannot_run():
    assert _plan(1, 64, 64, 33, 33, (1, 1), (1, 1), stride=(2, 2)) == 0
    assert _plan(1, 128, 128, 129, 129, (1, 1), (1, 1), stride=(2, 1)) == 0  # strides 1 and 2, or 3: oneDNN
    assert _plan(1, 128, 128, 129, 129, (1, 1), (1, 1), stride=(3, 3)) == 0
    assert _plan(1, 128, 128, 129, 129, (2, 2), (2, 2), stride=(2, 2)) == 0  # stride 2 with dilation
    assert _ops.winograd_plan(torch.empty(1, 64, 33, 33, dtype=torch.float64), torch.empty(64, 64, 3, 3,
                              dtype=torch.float64), (1, 1), (1, 1), (1, 1)) == 0
    assert _ops.winograd_plan(torch.empty(1, 64, 33, 33), torch.empty(64, 64, 1, 1), (1, 1), (0, 0), (1, 1)) == 0


@pytest.mark.parametrize(
    "why,make",
    [
        ("float64", lambda: (*(t.double() for t in _inputs(2, 32, 32, 17, 17)), (1, 1), (1, 1), (1, 1))),
        ("16 input channels", lambda: (*_inputs(2, 16, 32, 17, 17), (1, 1), (1, 1), (1, 1))),
        ("16 output channels", lambda: (*_inputs(2, 32, 16, 17, 17), (1, 1), (1, 1), (1, 1))),
        ("stride 2", lambda: (*_inputs(2, 32, 32, 17, 17), (2, 2), (1, 1), (1, 1))),
        ("dilation 4 on 17x17: sparse tiles", lambda: (*_inputs(2, 32, 32, 17, 17), (1, 1), (4, 4), (4, 4))),
        ("3x3 map: one F(3x3) tile's 25 products against 49 direct taps", lambda: (*_inputs(2, 32, 40, 3, 3), (1, 1),
                                                                                   (1, 1), (1, 1))),
        ("dilation 4 on 8x8: most taps in the padding", lambda: (*_inputs(8, 128, 128, 8, 8), (1, 1), (4, 4),
                                                                 (4, 4))),
        ("1x1 kernel", lambda: (torch.randn(2, 32, 9, 9).contiguous(memory_format=CL),
                                torch.randn(32, 32, 1, 1), (1, 1), (0, 0), (1, 1))),
        ("1088 x 1088 channels: transformed weight over 160 MB", lambda: (*_inputs(1, 1088, 1088, 9, 9), (1, 1),
                                                                           (1, 1), (1, 1))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_other_convolutions_run_onednn(why, make):
    x, weight, stride, padding, dilation = make()
    out, names = _ran(lambda: _ops.conv_bias_act(x, weight, None, None, stride, padding, dilation, True))
    assert not _used_winograd(names), (why, sorted(names))
    ref = F.relu(F.conv2d(x.double(), weight.double(), None, stride, padding, dilation))
    _close(out, ref, why, 1e-12 if x.dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", [(1, 300, 300, 100, 100, (1, 1), (1, 1)), (2, 320, 296, 23, 31, (2, 2), (2, 2)),
                                  (1, 512, 512, 33, 33, (4, 4), (4, 4)), (1, 300, 300, 4, 4, (1, 1), (1, 1))],
                         ids=str)
def test_large_weights_run_in_chunks(case, layout):
    """Transformed weights over 12 MB (about 300 channels each way): chunks of tiles, each multiplied in one GEMM
    per transformed element; tile counts that are not a multiple of the chunk or of its 16-tile sub-blocks, fewer
    tiles than a chunk's minimum (a 4x4 map), and dilated grids (at dilation 4 on 33x33 maps, F(3x3) tiles on 9x9
    grids)."""
    n, cin, cout, h, w, padding, dilation = case
    torch.manual_seed(1)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=layout)
    weight = _kept(torch.randn(cout, cin, 3, 3) / (3 * cin**0.5))
    bias, residual = torch.randn(cout), torch.randn(n, cout, h, w).contiguous(memory_format=layout)
    out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, residual, (1, 1), padding, dilation, True))
    assert _used_winograd(names), sorted(names)
    assert out.is_contiguous(memory_format=layout)
    ref = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 1, padding, dilation) + residual.double())
    _close(out, ref, f"chunked {case}")


# Short grids (plan 1): maps at most three dilations across, padding = dilation, channels enough to pay (about 300
# each way). (N, C_in, C_out, H, W, padding = dilation): grids of 2 and 1 pixels both ways (the ASPP's rate 18 on a
# 33 x 33 map), of 3 and 2 (rate 24 on 65 x 65), 3 / 2 one way and 2 / 1 the other, 3 only one way, every grid 3
# (F(3x3)'s products, which F(3x3) runs only with more channels), odd channel counts, batches.
SHORT_GRID_CASES = [
    (1, 301, 297, 33, 33, (18, 18)),
    (1, 320, 288, 26, 26, (10, 10)),
    (1, 320, 288, 26, 33, (10, 18)),
    (2, 300, 300, 20, 33, (7, 18)),
    (2, 320, 296, 23, 17, (8, 9)),
    (1, 300, 300, 30, 30, (10, 10)),
    (3, 300, 300, 13, 13, (7, 7)),
]


def _short_grid_inputs(case, layout=CL, seed=0):
    n, cin, cout, h, w, dil = case
    torch.manual_seed(seed)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=layout)
    weight = _kept(torch.randn(cout, cin, 3, 3) / (3 * cin**0.5))
    return x, weight, dil


@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("case", SHORT_GRID_CASES, ids=str)
@pytest.mark.parametrize("epilogue", ["bias", "bias+residual+relu"])
def test_short_grids_match_float64(case, epilogue, layout):
    """Each dilation phase grid computed whole: 3 products per 2 pixels along an axis where direct convolution does
    4 (a 2 x 2 Toeplitz product), F(3, 3) on 3-pixel grids, the centre tap on 1-pixel ones (docs/kernels.md)."""
    x, weight, dil = _short_grid_inputs(case, layout)
    assert _ops.winograd_plan(x, weight, (1, 1), dil, dil) == 1
    bias = torch.randn(weight.shape[0])
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, dil, dil)
    residual = None
    if "residual" in epilogue:
        residual = torch.randn(ref.shape).contiguous(memory_format=layout)
        ref = F.relu(ref + residual.double())
    relu = "relu" in epilogue
    out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, residual, (1, 1), dil, dil, relu))
    assert _used_winograd(names), sorted(names)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=layout)
    _close(out, ref, f"short grids {case} {epilogue}")


def test_short_grids_give_the_same_bits_for_any_thread_count_and_keep_their_transform():
    x, weight, dil = _short_grid_inputs((2, 300, 300, 20, 33, (7, 18)), seed=4)
    bias = torch.randn(300)
    before = _ops.winograd_cache_info()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_ops.conv_bias_act(x, weight, bias, None, (1, 1), dil, dil, True))
    finally:
        torch.set_num_threads(threads)
    for out in results[1:]:
        assert torch.equal(out, results[0])
    after = _ops.winograd_cache_info()
    assert after[2] - before[2] == 2 and after[3] - before[3] == 1  # transformed once, found twice


def test_short_grids_with_large_weights_give_the_same_bits_from_two_threads_up():
    """ASPP-sized weights (2 MB per transformed point): each point one GEMM, and a one-point type (the 1 x 1 grids
    of rate 18 on a 33 x 33 map) split in two, so that every GEMM runs on one thread inside the parallel region
    (one GEMM alone ran on MKL's threads: bits that followed the thread count)."""
    torch.manual_seed(6)
    x = torch.randn(1, 2048, 33, 33).contiguous(memory_format=CL)
    weight = _kept(torch.randn(256, 2048, 3, 3) / 136)
    bias = torch.randn(256)
    assert _ops.winograd_plan(x, weight, (1, 1), (18, 18), (18, 18)) == 1
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (2, 3):
            torch.set_num_threads(n)
            results.append(_ops.conv_bias_act(x, weight, bias, None, (1, 1), (18, 18), (18, 18), False))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, 18, 18)
    _close(results[0], ref, "2048 -> 256 at rate 18")


def test_short_grids_spread_non_finite_inputs_over_their_grid_only():
    # A NaN reaches every output it reaches in the direct convolution (its dilated 3 x 3 neighbourhood, all in its
    # own phase grid), and through the transforms at most the rest of that grid; every other output is exact.
    x, weight, dil = _short_grid_inputs((1, 300, 300, 26, 26, (10, 10)), seed=5)
    x[0, 7, 4, 13] = float("nan")
    out = _ops.conv_bias_act(x, weight, torch.zeros(300), None, (1, 1), dil, dil, False)
    ref = F.conv2d(x.double(), weight.double(), None, 1, dil, dil)
    assert not out[~ref.isfinite()].isfinite().any()
    grid = torch.zeros(26, 26, dtype=torch.bool)
    grid[4::10, 3::10] = True  # the NaN's phase grid: rows 4, 14, 24; columns 3, 13, 23
    assert out[:, :, ~grid].isfinite().all()
    _close(out[:, :, ~grid], ref[:, :, ~grid], "outside the NaN's grid")


@pytest.mark.parametrize("relu", [False, True])
def test_non_finite_inputs_never_vanish(relu):
    # A NaN or an infinity in the input reaches every output that it reaches in the direct convolution (as NaN or
    # inf; Winograd's transforms mix a whole tile, so the 4x4 outputs of the tiles that share its input patch go
    # NaN together, as with cuDNN's Winograd); the ReLU keeps NaN; every other output is the direct one's.
    x, weight = _inputs(1, 32, 32, 16, 16)
    weight = _kept(weight)
    x[0, 3, 5, 5] = float("nan")
    if not relu:  # relu(-inf) is 0 for both algorithms
        x[0, 5, 12, 2] = float("inf")
    zero = torch.zeros(32)  # a bias: the plain form (no epilogue) is the training recompute, which runs oneDNN
    out, names = _ran(lambda: _ops.conv_bias_act(x, weight, zero, None, (1, 1), (1, 1), (1, 1), relu))
    assert _used_winograd(names)
    ref = F.conv2d(x.double(), weight.double(), None, 1, 1, 1)
    ref = F.relu(ref) if relu else ref
    touched = F.max_pool2d((~x.isfinite()).any(1, keepdim=True).float(), 3, 1, 1).bool().expand_as(out)
    assert not out[touched].isfinite().any()
    assert out.isfinite().sum() > out.numel() // 2
    both = out.isfinite()
    _close(torch.where(both, out, 0), torch.where(both, ref, 0), "finite outputs")


@pytest.mark.parametrize("size", [15, 40], ids=["one-block", "many-blocks"])
def test_strided_views_and_the_same_bits_for_any_thread_count(size):
    # A channels-last view with gaps (a channel slice of a wider tensor), run on 1, 2 and 3 threads: the tile
    # blocks do not depend on the thread count, so neither do the bits.
    wide = torch.randn(2, 80, size, size).contiguous(memory_format=CL)
    x = wide[:, 8:48]
    assert x.stride(1) == 1 and not x.is_contiguous(memory_format=CL)
    weight = _kept(torch.randn(36, 40, 3, 3) / 20)
    bias = torch.randn(36)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, None, (1, 1), (1, 1), (1, 1), False))
            assert _used_winograd(names), (n, sorted(names))
            _close(out, ref, f"strided view, {n} threads")
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    for out in results[1:]:
        assert torch.equal(out, results[0])


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saved", "lean"])
@pytest.mark.parametrize("layout", [CL, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval-with-grad"])
def test_training_and_gradients_keep_onednn(memory_efficient, layout, training):
    # A training step's float32 gradients are ill-conditioned (BatchNorm over few values) and amplify Winograd's
    # rounding (a ResNet-50 step measured 4x farther from float64 than PyTorch's own): wherever a gradient is
    # computed, forward, backward and the memory-efficient recompute run oneDNN, on shapes Winograd would take.
    torch.manual_seed(0)
    x, weight = _inputs(2, 32, 48, 16, 13, scale=3.0)
    x = x.contiguous(memory_format=layout).requires_grad_(True)
    weight.requires_grad_(True)
    bn_w = (torch.rand(48) + 0.5).requires_grad_(True)
    bn_b = torch.randn(48).requires_grad_(True)
    rm, rv = torch.randn(48), torch.rand(48) + 0.5
    rm_ref, rv_ref = rm.double(), rv.double()
    kwargs = dict(stride=1, padding=2, dilation=2, training=training)
    out, names = _ran(lambda: deeplab_ops.conv_bn_relu(x, weight, bn_w, bn_b, rm, rv, backend="cpu",
                                                        memory_efficient=memory_efficient, **kwargs))
    assert WINOGRAD not in names, sorted(names)
    leaves = [x, weight, bn_w, bn_b]
    dleaves = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = reference.conv_bn_relu(*dleaves, rm_ref, rv_ref, **kwargs)
    _close(out, ref.detach(), "forward", 1e-4)
    torch.testing.assert_close(rm.double(), rm_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rv.double(), rv_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn(out.shape).contiguous(memory_format=layout)
    grads, names = _ran(lambda: torch.autograd.grad(out, leaves, g))
    assert WINOGRAD not in names, sorted(names)
    for name, got, want in zip(["x", "weight", "bn_weight", "bn_bias"], grads,
                               torch.autograd.grad(ref, dleaves, g.double()), strict=True):
        _close(got, want, f"grad {name}", 1e-4)
    # The same layer with no gradient to compute (eval under no_grad) folds BatchNorm and runs Winograd.
    if not training:
        with torch.no_grad():
            again, names = _ran(lambda: deeplab_ops.conv_bn_relu(x, weight, bn_w, bn_b, rm, rv, backend="cpu",
                                                                  **kwargs))
        assert _used_winograd(names), sorted(names)
        _close(again, ref.detach(), "no-grad eval", 1e-4)


def test_memory_efficient_recompute_gives_the_forward_convolution_bit_for_bit():
    # conv_bias_act's plain form (no bias, residual or ReLU) is the recompute of a training forward's convolution:
    # it runs that convolution (oneDNN's), not Winograd, and gives its bits.
    x, weight = _inputs(2, 32, 32, 17, 17)
    args = ((1, 1), (1, 1), (1, 1))
    conv_out = _ops.conv_bn_relu_forward(x, weight, torch.rand(32), torch.randn(32), None, None, *args, True, 0.1,
                                         1e-5, None, True)[1]
    again, names = _ran(lambda: _ops.conv_bias_act(x, weight, None, None, *args, False))
    assert not _used_winograd(names), sorted(names)
    assert torch.equal(again, conv_out)


@pytest.mark.parametrize("flag", [None, "", "1", "0"])
def test_eval_module_runs_winograd_and_the_switch_turns_it_off(flag, monkeypatch):
    # A FusedConvBNReLU in eval without gradients: one Winograd convolution with BatchNorm folded in, against the
    # float64 reference; DEEPLAB_OPS_CPU_WINOGRAD=0 (read per call) runs oneDNN instead; unset, "" and "1" are on.
    torch.manual_seed(0)
    if flag is None:
        monkeypatch.delenv("DEEPLAB_OPS_CPU_WINOGRAD", raising=False)
    else:
        monkeypatch.setenv("DEEPLAB_OPS_CPU_WINOGRAD", flag)
    m = deeplab_ops.nn.FusedConvBNReLU(32, 32, 3, padding=1, backend="cpu").eval().to(memory_format=CL)
    m[1].running_var.uniform_(0.5, 2)
    m[1].running_mean.normal_()
    x = torch.randn(2, 32, 17, 17).contiguous(memory_format=CL)
    with torch.no_grad():
        y, names = _ran(lambda: m(x))
    assert _used_winograd(names) == (flag != "0"), sorted(names)
    bn = m[1]
    ref = reference.conv_bn_relu(x.double(), m[0].weight.double(), bn.weight.double(), bn.bias.double(),
                                 bn.running_mean.double(), bn.running_var.double(), padding=1, training=False)
    _close(y, ref.detach(), f"DEEPLAB_OPS_CPU_WINOGRAD={flag!r}")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_runs_under_no_grad_and_inference_mode(mode):
    x, weight = _inputs(2, 32, 32, 11, 11)
    weight = _kept(weight)
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with ctx:
        out, names = _ran(lambda: _ops.conv_bias_act(x, weight, None, None, (1, 1), (1, 1), (1, 1), True))
    assert _used_winograd(names)
    _close(out, F.relu(F.conv2d(x.double(), weight.double(), None, 1, 1, 1)), mode)


@pytest.mark.parametrize(
    "mode", ["train", "train-lean", "eval-with-grad", "eval-with-grad-lean", "eval-no-grad", "eval-under-no_grad"]
)
def test_aspp_branches_run_winograd_only_without_gradients(mode):
    # The fused ASPP's 3x3 branches (channels-last, 32 channels, rates that tile a 40x40 map well enough to pay for
    # transforming the branch parameters on every call): Winograd in
    # eval with no gradient to compute (no input requires grad, or grad mode off though the parameters require
    # it), oneDNN in training and wherever a gradient flows, the memory-efficient backward's recompute included;
    # output, running statistics and (with gradients) every gradient against float64.
    torch.manual_seed(2)
    training, lean = mode.startswith("train"), mode.endswith("-lean")
    grad = mode != "eval-no-grad"  # whether the tensors require grad
    flows = grad and mode != "eval-under-no_grad"  # whether a gradient is computed
    n, cin, c, rates = 2, 32, 32, (2, 3)
    x = torch.randn(n, cin, 40, 40).contiguous(memory_format=CL).requires_grad_(grad)
    convs = [torch.randn(c, cin, 1, 1) / cin**0.5] + [torch.randn(c, cin, 3, 3) / (3 * cin**0.5) for _ in rates]
    convs = [w.contiguous(memory_format=CL).requires_grad_(grad) for w in convs]
    pool_w = (torch.randn(c, cin, 1, 1) / cin**0.5).requires_grad_(grad)
    proj_w = (torch.randn(c, (len(rates) + 2) * c, 1, 1) / (len(rates) + 2) / c**0.5).requires_grad_(grad)
    nb = len(rates) + 3
    bn_w = [(torch.rand(c) + 0.5).requires_grad_(grad) for _ in range(nb)]
    bn_b = [torch.randn(c).requires_grad_(grad) for _ in range(nb)]
    rms, rvs = [torch.randn(c) for _ in range(nb)], [torch.rand(c) + 0.5 for _ in range(nb)]
    rms_ref, rvs_ref = [t.double() for t in rms], [t.double() for t in rvs]
    with torch.set_grad_enabled(flows):
        out, names = _ran(lambda: deeplab_ops.aspp(x, convs, pool_w, proj_w, bn_w, bn_b, rms, rvs, rates=rates,
                                                   training=training, backend="cpu", memory_efficient=lean))
    assert "aspp_forward" in " ".join(names) and (WINOGRAD in names) == (not flows), sorted(names)
    leaves = [x, *convs, pool_w, proj_w, *bn_w, *bn_b]
    dl = [t.detach().double().requires_grad_(True) for t in leaves]
    k = len(convs)
    ref = reference.aspp(dl[0], dl[1:1 + k], dl[1 + k], dl[2 + k], dl[3 + k:3 + k + nb], dl[3 + k + nb:],
                         rms_ref, rvs_ref, rates=rates, training=training)
    _close(out, ref.detach(), "aspp forward", 1e-4)
    for got, want in zip(rms + rvs, rms_ref + rvs_ref, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if flows:
        g = torch.randn(out.shape).contiguous(memory_format=CL)
        grads, names = _ran(lambda: torch.autograd.grad(out, leaves, g))
        assert WINOGRAD not in names, sorted(names)
        for i, (got, want) in enumerate(zip(grads, torch.autograd.grad(ref, dl, g.double()), strict=True)):
            _close(got, want, f"aspp gradient {i}", 1e-4)


# oneDNN's own float32 matmul precision exists from torch 2.9 (torch.backends.mkldnn.matmul); the global one always.
@pytest.mark.parametrize("setting", ["matmul-precision-medium"] + (
    ["mkldnn-matmul-bf16"] if hasattr(torch.backends.mkldnn, "matmul") else []))
def test_lowered_matmul_precision_keeps_convolutions_float32(setting):
    # A convolution stays float32 whatever the float32 matmul precision says (bfloat16 on CPUs that have it):
    # Winograd's GEMMs are the extension's own float32 kernel, which no such setting changes, so it still runs, and
    # gives the same bits as with the default precision.
    x, weight = _inputs(2, 64, 64, 17, 17)
    weight, zero = _kept(weight), torch.zeros(64)
    ref = F.conv2d(x.double(), weight.double(), None, 1, 1, 1)
    before_global = torch.get_float32_matmul_precision()
    before_mkldnn = torch.backends.mkldnn.matmul.fp32_precision if setting == "mkldnn-matmul-bf16" else None
    try:
        if setting == "matmul-precision-medium":
            torch.set_float32_matmul_precision("medium")
        else:
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        lowered, names = _ran(lambda: _ops.conv_bias_act(x, weight, zero, None, (1, 1), (1, 1), (1, 1), False))
        assert _used_winograd(names), sorted(names)
        _close(lowered, ref, setting)
    finally:
        torch.set_float32_matmul_precision(before_global)
        if before_mkldnn is not None:
            torch.backends.mkldnn.matmul.fp32_precision = before_mkldnn
    out, names = _ran(lambda: _ops.conv_bias_act(x, weight, zero, None, (1, 1), (1, 1), (1, 1), False))
    assert _used_winograd(names) and torch.equal(out, lowered)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch before 2.9 has no per-backend float32 precision setting")
def test_cuda_tf32_through_the_new_api_leaves_cpu_convolutions_running():
    """TF32 for CUDA matmuls set through PyTorch's per-backend API (what its deprecation warning asks for) makes
    the legacy global precision unreadable (torch raises on reading it); the CPU kernels' precision test reads
    oneDNN's own setting, so CPU convolutions still run, and Winograd with them (oneDNN's matmul stays float32)."""
    x, weight = _inputs(2, 64, 64, 17, 17)
    weight, zero = _kept(weight), torch.zeros(64)
    ref = F.conv2d(x.double(), weight.double(), None, 1, 1, 1)
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        out, names = _ran(lambda: _ops.conv_bias_act(x, weight, zero, None, (1, 1), (1, 1), (1, 1), False))
        assert _used_winograd(names), sorted(names)
        _close(out, ref, "cuda matmul tf32")
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


# ---- the transformed-weight cache of the eval path (conv_bias_act's folded weights) ------------------------------


def _cache():
    entries, nbytes, hits, misses = _ops.winograd_cache_info()
    return {"entries": entries, "bytes": nbytes, "hits": hits, "misses": misses}


def test_eval_weight_transform_is_cached_and_follows_the_parameters():
    torch.manual_seed(0)
    m = deeplab_ops.nn.FusedConvBNReLU(32, 40, 3, padding=1, backend="cpu").to(memory_format=CL)
    x = torch.randn(2, 32, 13, 13).contiguous(memory_format=CL)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def eval_twice(what):
        m.eval()
        with torch.no_grad():
            before = _cache()
            first = m(x)
            after_first = _cache()
            second = m(x)
            after = _cache()
        assert after_first["misses"] == before["misses"] + 1, what  # transformed once...
        assert after["hits"] == after_first["hits"] + 1 and after["misses"] == after_first["misses"], what  # ...kept
        assert torch.equal(first, second), what
        bn = m[1]
        ref = reference.conv_bn_relu(x.double(), m[0].weight.double(), bn.weight.double(), bn.bias.double(),
                                     bn.running_mean.double(), bn.running_var.double(), padding=1, training=False)
        _close(first, ref.detach(), what)
        return after

    start = eval_twice("first")
    for step in range(4):  # each step folds new weights: their transforms replace the freed ones', not add to them
        m.train()
        m(x).square().mean().backward()
        opt.step()
        state = eval_twice(f"after optimizer step {step}")
        assert state["entries"] <= start["entries"] + 1, state
    deeplab_ops.common.clear_derived()
    assert _cache()["entries"] == 0 and _cache()["bytes"] == 0


def test_a_deep_models_transforms_stay_cached_across_passes():
    """30 registered 256 x 256 weights (9.4 MB of F(4x4) transform each, 283 MB: more than a 256 MB cache, which
    evicted every one before its next use, as in a DeepLabV3-ResNet-101 eval), used in turn for three passes: the
    second and third hit every one."""
    deeplab_ops.common.clear_derived()
    x = torch.randn(1, 256, 16, 16).contiguous(memory_format=CL)
    weights = [_kept(torch.randn(256, 256, 3, 3) / 48) for _ in range(30)]
    assert _ops.winograd_plan(x, weights[0], (1, 1), (1, 1), (1, 1)) == 4
    before = _cache()
    for _ in range(3):
        for w in weights:
            _ops.conv_bias_act(x, w, None, None, (1, 1), (1, 1), (1, 1), True)
    after = _cache()
    assert after["misses"] - before["misses"] == 30 and after["hits"] - before["hits"] == 60, after
    del weights
    deeplab_ops.common.clear_derived()


def test_direct_calls_follow_in_place_writes_and_new_storage():
    x, weight = _inputs(1, 32, 32, 32, 32)  # large enough for Winograd to pay for a transform per call
    bias = torch.randn(32)

    def check(what):
        out, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, None, (1, 1), (1, 1), (1, 1), False))
        assert _used_winograd(names), (what, sorted(names))
        _close(out, F.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1), what)

    check("first")
    check("cached")
    weight.mul_(-2.0)  # in place: a new version
    check("after an in-place write")
    weight.data = torch.randn_like(weight)  # a new storage, the same version counter
    check("after .data got a new tensor")


def test_inference_tensors_are_not_cached():
    """Inference tensors have no version counter: their transforms are never kept."""
    with torch.inference_mode():
        xi, wi = _inputs(1, 32, 32, 9, 9)
        _ops.winograd_cache_allow(wi)
        before = _cache()
        _ops.conv_bias_act(xi, wi, torch.zeros(32), None, (1, 1), (1, 1), (1, 1), True)
        assert _cache()["entries"] == before["entries"] and _cache()["bytes"] == before["bytes"]


def _aspp_reference(aspp, x):
    convs, pool, proj = list(aspp.convs)[:-1], aspp.convs[-1], aspp.project
    bns = [c[1] for c in convs] + [pool[2], proj[1]]
    d = lambda t: t.double()  # noqa: E731
    return reference.aspp(d(x), [d(c[0].weight) for c in convs], d(pool[1].weight), d(proj[0].weight),
                          [d(b.weight) for b in bns], [d(b.bias) for b in bns], [d(b.running_mean) for b in bns],
                          [d(b.running_var) for b in bns], rates=aspp.atrous_rates, training=False)


def test_aspp_eval_keeps_its_branch_transforms_and_follows_parameter_updates():
    """The fused ASPP's 3x3 branch weights, in a cpu eval call, are registered as the eval path's folds are: their
    transforms are kept per weight tensor, storage and version counter (a 2048 -> 256 branch would otherwise be
    transformed, 52 MB, on every call, and the plan would leave it to oneDNN). Here the branches take Winograd only
    because their transforms are kept; an in-place update (an optimizer step, load_state_dict) is seen; a write
    through `.data` is not, until clear_derived(), as for the folds."""
    torch.manual_seed(0)
    deeplab_ops.common.clear_derived()
    aspp = deeplab_ops.nn.FusedASPP(64, (3, 4), out_channels=32, backend="cpu").eval().to(memory_format=CL)
    x = torch.randn(1, 64, 33, 33).contiguous(memory_format=CL)
    branch = aspp.convs[1][0].weight
    assert _ops.winograd_plan(x, branch.detach(), (1, 1), (3, 3), (3, 3)) == 0  # not kept: oneDNN
    with torch.no_grad():
        before = _cache()
        first, names = _ran(lambda: aspp(x))
        assert WINOGRAD in names, sorted(names)
        after_first = _cache()
        assert after_first["misses"] == before["misses"] + 2 and after_first["entries"] == before["entries"] + 2
        assert torch.equal(aspp(x), first) and _cache()["hits"] == after_first["hits"] + 2
        _close(first, _aspp_reference(aspp, x), "aspp eval, kept transforms", 1e-4)
        branch.mul_(0.5)  # in place, through the parameter: a new version
        _close(aspp(x), _aspp_reference(aspp, x), "after an in-place update", 1e-4)
        stale = aspp(x)
        branch.data.mul_(2.0)  # not seen by the version counter
        assert torch.equal(aspp(x), stale)
        deeplab_ops.common.clear_derived()
        _close(aspp(x), _aspp_reference(aspp, x), "after clear_derived()", 1e-4)
    deeplab_ops.common.clear_derived()


def test_kept_transforms_follow_a_new_storage_at_the_old_address():
    """`.data` given a new tensor keeps the version counter, and a new storage may lie where the old one did (the
    allocator reuses a freed block: `w.data = a; w.data = b` put b at the weight's old address in most tries; here
    made certain by two storages over one buffer): the kept transform follows the storage, not its address."""
    torch.manual_seed(0)
    deeplab_ops.common.clear_derived()
    aspp = deeplab_ops.nn.FusedASPP(64, (3, 4), out_channels=32, backend="cpu").eval().to(memory_format=CL)
    x = torch.randn(1, 64, 33, 33).contiguous(memory_format=CL)
    branch = aspp.convs[1][0].weight
    shape, strides = branch.shape, branch.stride()
    buffer = bytearray(branch.numel() * 4)

    def over_buffer(values):  # a new storage over `buffer` holding `values`, laid out as the weight is
        flat = torch.frombuffer(buffer, dtype=torch.float32)
        flat.copy_(values.permute(0, 2, 3, 1).reshape(-1))
        return torch.frombuffer(buffer, dtype=torch.float32).as_strided(shape, strides)

    with torch.no_grad():
        branch.data = over_buffer(branch.detach())
        _close(aspp(x), _aspp_reference(aspp, x), "first", 1e-4)
        address, version = branch.data_ptr(), branch._version
        branch.data = over_buffer(torch.randn(shape) * 0.05)
        assert branch.data_ptr() == address and branch._version == version and branch.stride() == strides
        _close(aspp(x), _aspp_reference(aspp, x), "a new storage at the old address", 1e-4)
        for i in range(8):  # as the allocator does it
            branch.data = torch.empty_like(branch)
            branch.data = torch.randn_like(branch).mul_(0.05)
            _close(aspp(x), _aspp_reference(aspp, x), f"after .data got new tensors ({i})", 1e-4)
    deeplab_ops.common.clear_derived()


def test_kept_transforms_follow_another_view_of_the_same_storage():
    """`.data` given a transposed view of the weight's own storage keeps its storage, data pointer, shape and version
    counter: only the strides tell the kept transform (of the old layout) from the weight now."""
    torch.manual_seed(0)
    deeplab_ops.common.clear_derived()
    aspp = deeplab_ops.nn.FusedASPP(64, (3, 4), out_channels=32, backend="cpu").eval().to(memory_format=CL)
    x = torch.randn(1, 64, 33, 33).contiguous(memory_format=CL)
    branch = aspp.convs[1][0].weight
    with torch.no_grad():
        _close(aspp(x), _aspp_reference(aspp, x), "first", 1e-4)
        hits = _cache()["hits"]
        assert aspp(x) is not None and _cache()["hits"] > hits  # kept
        address, version = branch.data_ptr(), branch._version
        branch.data = branch.data.transpose(2, 3)
        assert branch.data_ptr() == address and branch._version == version
        _close(aspp(x), _aspp_reference(aspp, x), "after .data = a transposed view", 1e-4)
    deeplab_ops.common.clear_derived()


def test_aspp_weights_computed_per_call_are_not_kept():
    """deeplab_ops.aspp called with branch weights computed per call (not parameters): nothing is registered, so the
    plan still counts their transform and leaves them to oneDNN, and no dead transform is left in the cache."""
    torch.manual_seed(0)
    deeplab_ops.common.clear_derived()
    aspp = deeplab_ops.nn.FusedASPP(64, (3, 4), out_channels=32, backend="cpu").eval().to(memory_format=CL)
    x = torch.randn(1, 64, 33, 33).contiguous(memory_format=CL)
    convs, pool, proj = list(aspp.convs)[:-1], aspp.convs[-1], aspp.project
    bns = [c[1] for c in convs] + [pool[2], proj[1]]
    before = _cache()
    with torch.no_grad():
        for _ in range(2):
            weights = [c[0].weight * 1.0 for c in convs]  # fresh tensors, as a scaled weight would be
            out, names = _ran(lambda ws=weights: deeplab_ops.aspp(
                x, ws, pool[1].weight, proj[0].weight, [b.weight for b in bns], [b.bias for b in bns],
                [b.running_mean for b in bns], [b.running_var for b in bns], rates=(3, 4), training=False,
                backend="cpu"))
            assert _ops.winograd_plan(x, weights[1], (1, 1), (3, 3), (3, 3)) == 0
            assert WINOGRAD not in names, sorted(names)
            _close(out, _aspp_reference(aspp, x), "weights computed per call", 1e-4)
    assert _cache() == before
    deeplab_ops.common.clear_derived()


def test_chunked_weights_give_the_same_bits_for_any_thread_count():
    torch.manual_seed(3)
    x = torch.randn(1, 300, 40, 40).contiguous(memory_format=CL)
    weight, bias = torch.randn(300, 300, 3, 3) / 50, torch.randn(300)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_ops.conv_bias_act(x, weight, bias, None, (1, 1), (1, 1), (1, 1), True))
    finally:
        torch.set_num_threads(threads)
    for out in results[1:]:
        assert torch.equal(out, results[0])


def test_only_the_eval_paths_cached_folds_keep_their_transforms():
    """A weight the eval path did not register (a parameter, a compiled graph's buffer) may change without its
    version counter saying so: its transform is computed every call."""
    x, weight = _inputs(1, 32, 32, 32, 32)  # large enough for Winograd to pay for a transform per call
    bias = torch.randn(32)
    before = _cache()
    first, names = _ran(lambda: _ops.conv_bias_act(x, weight, bias, None, (1, 1), (1, 1), (1, 1), False))
    assert _used_winograd(names), sorted(names)
    weight.data.copy_(torch.randn_like(weight))  # a write the version counter does not see
    out = _ops.conv_bias_act(x, weight, bias, None, (1, 1), (1, 1), (1, 1), False)
    _close(out, F.conv2d(x.double(), weight.double(), bias.double(), 1, 1, 1), "after a .data write")
    assert not torch.equal(out, first)
    assert _cache()["entries"] == before["entries"] and _cache()["hits"] == before["hits"]


def test_compiled_eval_model_matches_eager():
    """Under torch.compile the fold is computed in the graph, and Inductor reuses one buffer for the next layer's
    folded weight without bumping its version: nothing of a compiled graph is kept between calls."""
    torch.manual_seed(0)
    layers = [deeplab_ops.nn.FusedConvBNReLU(32, 32, 3, padding=1, backend="cpu") for _ in range(3)]
    for f in layers:
        with torch.no_grad():
            f[1].running_mean.uniform_(-1, 1), f[1].running_var.uniform_(0.5, 2)
            f[1].weight.uniform_(0.5, 2), f[1].bias.uniform_(-1, 1)
    model = torch.nn.Sequential(*layers).eval()
    x = torch.randn(1, 32, 40, 40)  # large enough for Winograd to pay for a transform per call
    with torch.no_grad():
        ref = x.double()
        for f in layers:
            ref = reference.conv_bn_relu(ref, f[0].weight.double(), f[1].weight.double(), f[1].bias.double(),
                                         f[1].running_mean.double(), f[1].running_var.double(), padding=1,
                                         training=False)
        compiled = torch.compile(model)
        for _ in range(2):
            _close(compiled(x), ref, "compiled eval model")


def test_first_call_under_inference_mode_still_keeps_the_transform():
    torch.manual_seed(0)
    m = deeplab_ops.nn.FusedConvBNReLU(32, 32, 3, padding=1, backend="cpu").eval()
    x = torch.randn(2, 32, 17, 17)
    with torch.inference_mode():
        first = m(x)
    before = _cache()
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(m(x), first)
    assert _cache()["hits"] >= before["hits"] + 2  # the fold cached as a plain tensor, its transform kept


def test_a_freed_models_transforms_go_at_the_next_lookup():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 17, 17)
    deeplab_ops.common.clear_derived()
    m = deeplab_ops.nn.FusedConvBNReLU(32, 32, 3, padding=1, backend="cpu").eval()
    with torch.no_grad():
        m(x)
    assert _cache()["entries"] == 1
    del m
    gc.collect()
    other = deeplab_ops.nn.FusedConvBNReLU(32, 32, 3, padding=1, backend="cpu").eval()
    with torch.no_grad():
        other(x), other(x)
    assert _cache()["entries"] == 1  # only the live model's
