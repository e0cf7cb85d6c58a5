"""Guards of the ops' and modules' API: the fused ASPP refuses (or does not fuse) padded or strided 1×1 convs and
sees a conv changed in place after its first call; the Triton twins refuse tensors beyond int32 indexing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.segmentation.deeplabv3 import ASPP as TorchvisionASPP

from deeplab_ops.nn import FusedASPP, fuse_modules


def _aspp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = TorchvisionASPP(3, [1, 2], 4).double().eval()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(0.5, 1.5)  # mostly positive before the ReLUs: every branch contributes
                bn.running_mean.normal_(0.0, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
    return m


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _pointwise_conv(m: nn.Module, where: str) -> nn.Conv2d:
    return {"project": m.project[0], "pool": m.convs[-1][1], "branch0": m.convs[0][0]}[where]


@pytest.mark.parametrize("where,change", [("project", "padding"), ("project", "stride"), ("pool", "padding")])
def test_aspp_with_padded_or_strided_pointwise_conv_is_not_fused_into_another_function(where, change):
    """An ASPP of torchvision's structure whose projection (or pooling) conv has a padding or a stride was fused, and
    the fused op silently computed the plain 1x1 convolution: another shape or other values than the module's own
    forward. Now such a module is not fused (it runs its own forward)."""
    m = _aspp()
    conv = _pointwise_conv(m, where)
    setattr(conv, change, (1, 1) if change == "padding" else (2, 2))
    fused = fuse_modules(copy.deepcopy(m), backend="cpu")
    x = _x()
    expected = m(x)
    out = fused(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


def test_aspp_with_padded_1x1_branch_is_not_fused():
    """The 1x1 branch with padding makes torchvision's ASPP fail (its branches' sizes differ); the fused op computed
    an output anyway. Now it is not fused, and fails as the module does."""
    m = _aspp()
    m.convs[0][0].padding = (1, 1)
    fused = fuse_modules(copy.deepcopy(m), backend="cpu")
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        m(_x())
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        fused(_x())


def _same_bias(m: nn.Module) -> None:
    m.project[0].bias = nn.Parameter(torch.linspace(-1, 1, 4, dtype=torch.float64))


def _dilate(m: nn.Module) -> None:
    m.convs[1][0].dilation = (2, 2)
    m.convs[1][0].padding = (2, 2)


def _reflect(m: nn.Module) -> None:
    m.convs[2][0].padding_mode = "reflect"


@pytest.mark.parametrize("change", [_same_bias, _dilate, _reflect], ids=["bias", "dilation", "reflect"])
@pytest.mark.parametrize("kind", ["fuse_modules", "FusedASPP"])
def test_aspp_conv_changed_in_place_after_a_call_is_seen(kind, change):
    """A fused ASPP caches its validated structure on its first call; a conv changed in place afterwards (a bias
    added, another dilation and padding, reflect padding) was not seen: the op kept computing the old structure
    (max differences 0.2-0.5). Now the change drops the cache, and the next call computes what the module does."""
    if kind == "fuse_modules":
        m = _aspp()
        fused = fuse_modules(copy.deepcopy(m), backend="cpu")
    else:
        fused = FusedASPP(3, [1, 2], 4, backend="cpu").double().eval()
        fused.load_state_dict(_aspp().state_dict())
        m = _aspp()
    x = _x()
    torch.testing.assert_close(fused(x), m(x))  # first call: the structure is cached
    change(m)
    change(fused)
    torch.testing.assert_close(fused(x), m(x))


def test_fused_aspp_forward_refuses_a_conv_changed_in_place():
    """deeplab_ops.nn.fused_aspp_forward (the functional form) validates again, with its clear error, after a conv of
    an ASPP it ran was given a bias."""
    from deeplab_ops.nn import fused_aspp_forward

    m = _aspp()
    fused_aspp_forward(m, _x(), backend="cpu")
    _same_bias(m)
    with pytest.raises(ValueError, match="conv has a bias"):
        fused_aspp_forward(m, _x(), backend="cpu")


def test_triton_refuses_padding_and_strides_whose_index_sums_pass_int32():
    """The conv kernels' tap-hit and tile arithmetic adds input size, padding, dilated kernel extent and stride in
    int32: with padding 2**31 - 1 and stride 2**26 (accepted geometry) the sums wrapped and the weight gradient came
    out 0 (a review's reproducer). Such a call is refused by the triton twins and never picked by backend=None, which
    computes it on another backend."""
    import deeplab_ops
    from deeplab_ops import backends
    from deeplab_ops.ops import conv_bn_relu as conv_ops

    x = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    w = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    g, b = torch.ones(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    geometry = dict(stride=(2**26, 1), padding=(2**31 - 1, 0))
    with pytest.raises(ValueError, match=r"triton_conv_bn_relu_forward: a padded extent of 4362076160 .*int32 .*"
                                         r"use backend='cuda' or 'cpu'"):
        conv_ops._direct_forward(x, w, g, b, None, None, (2**26, 1), (2**31 - 1, 0), (1, 1), True, 0.1, 1e-5, None,
                                 True)
    reasons = backends._triton_conv_bn_relu(x=x, weight=w, stride=(2**26, 1), padding=(2**31 - 1, 0),
                                            dilation=(1, 1))
    assert any("padded extent of 4362076160" in r for r in reasons), reasons
    with torch.no_grad():  # (the CPU backward of a 2**26 stride allocates its dilated gradient: not run here)
        out = deeplab_ops.conv_bn_relu(x, w, g, b, None, None, backend=None, **geometry)
        want = deeplab_ops.conv_bn_relu(x, w, g, b, None, None, backend="reference", **geometry)
    torch.testing.assert_close(out, want)
    # within int32: no reason (2 + 2·(2**30 − 2**26) + 2**26 < 2**31)
    assert backends._triton_conv_bn_relu(x=x, weight=w, stride=(2**26, 1), padding=(2**30 - 2**26, 0),
                                         dilation=(1, 1)) == []


def test_triton_aspp_refuses_rates_whose_index_sums_pass_int32():
    """The ASPP's branch kernels add a rate to row and column indices in int32, as the conv kernels add padding: a
    rate within a map's size of 2**31 (accepted: rates are at most 2**31 - 1) wrapped those sums, and its branch read
    only padding by the wrapped arithmetic's accident. Refused like the conv's padded extent by the triton twins and
    by backend selection, which computes it on another backend; rates whose reach fits stay triton's."""
    import deeplab_ops
    from deeplab_ops import backends
    from deeplab_ops.ops import aspp as aspp_ops

    torch.manual_seed(0)
    c, rate = 4, 2**29
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    weights = [torch.randn(c, 3, 1, 1, dtype=torch.float64), torch.randn(c, 3, 3, 3, dtype=torch.float64)]
    pool, proj = torch.randn(c, 3, 1, 1, dtype=torch.float64), torch.randn(c, 3 * c, 1, 1, dtype=torch.float64)
    bn_w, bn_b = torch.rand(4 * c, dtype=torch.float64) + 0.5, torch.randn(4 * c, dtype=torch.float64)
    reach = 6 + 4 * rate + 1
    with pytest.raises(ValueError, match=rf"triton_aspp_forward: a padded extent of {reach} .*int32 .*"
                                         r"use backend='cuda' or 'cpu'"):
        aspp_ops._direct_forward(x, weights, pool, proj, bn_w, bn_b, None, None, [rate], True, 0.1, 1e-5)
    reasons = backends._triton_aspp(x=x, rates=[rate], channels=c)
    assert any(f"padded extent of {reach}" in r for r in reasons), reasons
    assert backends._triton_aspp(x=x, rates=[2**29 - 2], channels=c) == []  # 6 + 4·(2**29 − 2) + 1 < 2**31
    args = (x, weights, pool, proj, bn_w, bn_b, None, None)
    with torch.no_grad():
        out = deeplab_ops.aspp(*args, rates=[rate], training=True, backend=None)
        want = deeplab_ops.aspp(*args, rates=[rate], training=True, backend="reference")
    torch.testing.assert_close(out, want)


def test_triton_twins_refuse_tensors_beyond_int32_indexing():
    # The Triton kernels index with int32; the front doors never pick triton past 2**31 - 1 elements, but a direct
    # torch.ops.deeplab_ops.triton_* call (or a traced graph's) went through its validator unrefused, and on a GPU
    # its offsets would wrap (e.g. x of 64 x 2048 x 129 x 129). Expanded tensors: no memory behind the sizes.
    from deeplab_ops.ops import aspp as aspp_ops
    from deeplab_ops.ops import conv_bn_relu as conv_ops

    x = torch.zeros(1).expand(64, 2048, 129, 129)
    w = torch.zeros(1).expand(256, 2048, 1, 1)
    g, b, rm, rv = (torch.ones(256) for _ in range(4))
    with pytest.raises(ValueError, match=r"triton_conv_bn_relu_forward: a tensor of 2181169152 elements.*int32"):
        conv_ops._direct_forward(x, w, g, b, rm, rv, (1, 1), (0, 0), (1, 1), True, 0.1, 1e-5, None, True)
    with pytest.raises(ValueError, match=r"triton_conv_bias_act: .*int32"):
        conv_ops._direct_conv_bias_act(x, w, b, None, (1, 1), (0, 0), (1, 1), True)
    small = torch.zeros(1).expand(2, 8, 5, 5)
    conv_ops._direct_conv_bias_act(small, torch.zeros(1).expand(4, 8, 1, 1), torch.ones(4), None, (1, 1), (0, 0),
                                   (1, 1), True)  # within the range: accepted
    c = 16
    weights = [torch.zeros(1).expand(c, 2048, 1, 1)] + [torch.zeros(1).expand(c, 2048, 3, 3) for _ in range(3)]
    pool, proj = torch.zeros(1).expand(c, 2048, 1, 1), torch.zeros(1).expand(c, 5 * c, 1, 1)
    bn = [torch.ones(6 * c) for _ in range(4)]
    with pytest.raises(ValueError, match=r"triton_aspp_forward: .*int32"):
        aspp_ops._direct_forward(x, weights, pool, proj, *bn, [6, 12, 18], True, 0.1, 1e-5)
    # the backward twins: the saved tensors of such a forward
    out = torch.zeros(1).expand(64, 256, 129, 129)
    with pytest.raises(ValueError, match=r"triton_conv_bn_relu_backward: .*int32"):
        conv_ops._direct_backward(out, x, w, g, out, out, torch.zeros(256), torch.ones(256), (1, 1), (0, 0), (1, 1),
                                  True, True, [True] * 5)
    n, h = 64, 129
    branch = [torch.zeros(1).expand(n, 4 * c, h, h)]
    small_out = torch.zeros(1).expand(n, c, h, h)
    with pytest.raises(ValueError, match=r"triton_aspp_backward: .*int32"):
        aspp_ops._direct_backward(small_out, x, weights, pool, proj, bn[0], bn[1], branch, torch.zeros(n, c),
                                  small_out, small_out, bn[2], bn[3], [6, 12, 18], True, [True] * 3)
