"""torch.autocast and in-place writes after a fused layer, as eager PyTorch behaves.

Under autocast the fused layers' convolutions run in autocast's dtype, as eager conv2d does (x, weights and the
residual cast; BatchNorm's tensors as they are), and no aten op inside an op is autocast on its own (csrc/ops.cpp:
every op's autocast kernel excludes autocast below it). A conv → BN without ReLU does not save its output, so the
output may be written in place afterwards (an in-place ReLU6, `+=`), as after eager BatchNorm.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models.segmentation.deeplabv3 import ASPP

import deeplab_ops
from deeplab_ops.nn import FusedASPP, fuse_modules

CL = torch.channels_last


def _conv_bn(cin, cout, relu, dilation=1):
    layers = [nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


@pytest.mark.parametrize("layout", [torch.contiguous_format, CL], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode", ["train", "eval", "eval-no-grad"])
def test_fused_layer_under_autocast_matches_eager_autocast(mode, layout):
    torch.manual_seed(0)
    eager = _conv_bn(8, 16, relu=True)
    with torch.no_grad():
        eager[1].running_mean.uniform_(-0.5, 0.5)
        eager[1].running_var.uniform_(0.5, 2.0)
    fused = fuse_modules(copy.deepcopy(eager))
    for m in (eager, fused):
        m.train(mode == "train")
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=layout)
    xa, xb = x.clone().requires_grad_(mode != "eval-no-grad"), x.clone().requires_grad_(mode != "eval-no-grad")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(mode != "eval-no-grad"):
        ya, yb = eager(xa), fused(xb)
    assert ya.dtype == yb.dtype == torch.bfloat16
    if mode == "eval-no-grad":  # BatchNorm folded into the weight: one more bfloat16 rounding (docs/ops.md)
        torch.testing.assert_close(yb, ya, atol=2 ** -5, rtol=2 ** -6)
    else:
        torch.testing.assert_close(yb, ya, atol=0.0, rtol=0.0)
    for key, value in eager.state_dict().items():  # the running statistics, updated alike (same state_dict keys)
        torch.testing.assert_close(fused.state_dict()[key], value, msg=key)
    if mode == "eval-no-grad":
        return
    g = torch.randn(ya.shape)
    ya.float().backward(g)
    yb.float().backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=0.0, rtol=0.0)
    assert xb.grad.dtype == torch.float32  # back through the cast, in the leaf's dtype
    for (name, p), q in zip(fused.named_parameters(), eager.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, atol=1e-2, rtol=1e-2, msg=name)


def test_fused_aspp_under_autocast_trains_and_matches_eager_autocast():
    # The crash this guards: the op's outputs in mixed dtypes (its pooling matmul autocast inside it, the rest
    # float32), which its backward, run outside autocast, could not combine.
    torch.manual_seed(1)
    tv = ASPP(16, [2, 3], 8)
    tv.project[3].p = 0.0
    fused = FusedASPP(16, [2, 3], 8)
    fused.load_state_dict(tv.state_dict())
    x = torch.randn(2, 16, 7, 7)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = tv(xa), fused(xb)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), atol=0.1, rtol=0.05)  # bfloat16's rounding, in another order
    g = torch.randn(a.shape)
    a.float().backward(g)
    b.float().backward(g)
    torch.testing.assert_close(xb.grad, xa.grad, atol=0.1, rtol=0.05)
    for (name, p), q in zip(fused.named_parameters(), tv.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, atol=0.2, rtol=0.05, msg=name)


def test_ops_called_under_autocast_run_in_their_inputs_dtype():
    # The op itself (no front door): autocast casts nothing inside it, so float32 in gives float32 out throughout.
    torch.manual_seed(2)
    c, cin = 4, 8
    args = (torch.randn(2, cin, 6, 6), [torch.randn(c, cin, 1, 1), torch.randn(c, cin, 3, 3)],
            torch.randn(c, cin, 1, 1), torch.randn(c, 3 * c, 1, 1), torch.ones(4 * c), torch.zeros(4 * c),
            torch.zeros(4 * c), torch.ones(4 * c), [2], True, 0.1, 1e-5)
    plain = torch.ops.deeplab_ops.aspp_forward(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = torch.ops.deeplab_ops.aspp_forward(*args)
    for p, u in zip(plain, under, strict=True):
        for pt, ut in zip(p, u, strict=True) if isinstance(p, list) else ((p, u),):  # branch_out: one per branch
            assert ut.dtype == pt.dtype
            torch.testing.assert_close(ut, pt, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["saved", "lean"])
@pytest.mark.parametrize("write", ["clamp_", "add_", "relu6"])
def test_output_without_relu_may_be_written_in_place(write, memory_efficient):
    torch.manual_seed(3)
    eager = _conv_bn(6, 10, relu=False)
    fused = fuse_modules(copy.deepcopy(eager), memory_efficient=memory_efficient)
    x = torch.randn(2, 6, 8, 8)
    other = torch.randn(2, 10, 8, 8)
    outs = []
    for m in (eager, fused):
        xi = x.clone().requires_grad_()
        y = m(xi)
        if write == "clamp_":
            y.clamp_(max=0.5)
        elif write == "add_":
            y += other
        else:
            y = nn.ReLU6(inplace=True)(y)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xi.grad, [p.grad for p in m.parameters()]))
    (ye, gxe, gpe), (yf, gxf, gpf) = outs
    torch.testing.assert_close(yf, ye, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gxf, gxe, atol=1e-5, rtol=1e-5)
    for a, b in zip(gpf, gpe, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_output_with_relu_is_saved_as_eager_relu_saves_its_own():
    # The ReLU's mask comes from the output, as eager ReLU's backward reads its result: an in-place write is caught.
    x = torch.randn(2, 6, 8, 8, requires_grad=True)
    y = deeplab_ops.conv_bn_relu(x, torch.randn(10, 6, 3, 3), None, None, None, None, padding=1, backend="cpu")
    y.clamp_(max=0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_loss_under_autocast_is_float32_as_eager_cross_entropy():
    torch.manual_seed(4)
    logits = torch.randn(2, 5, 4, 4).bfloat16().requires_grad_()
    target = torch.randint(0, 5, (2, 16, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = deeplab_ops.upsample_cross_entropy(logits, target)
        eager = nn.functional.cross_entropy(nn.functional.interpolate(logits, (16, 16), mode="bilinear"), target)
    assert got.dtype == eager.dtype == torch.float32
    # the interpolation in float32 too (eager's may round the upsampled logits to bfloat16 first)
    want = nn.functional.cross_entropy(nn.functional.interpolate(logits.float(), (16, 16), mode="bilinear"), target)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, eager, atol=2e-2, rtol=2e-2)
    got.backward()
    assert logits.grad.dtype == torch.bfloat16
