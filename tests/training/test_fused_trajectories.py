"""Fused vs unfused DeepLabV3 training trajectories over several optimizer steps, in float64.

What a user comparing runs sees: the same initial weights trained on the same batches (SGD with momentum, weight
decay and the poly schedule, as training.loop.fit sets them up) give, per step, the same loss and, at the end, the
same weights, the same running statistics and num_batches_tracked of every BatchNorm and the same eval outputs.
In float64 the fused and unfused paths differ by their summation orders only: relative ~1e-15 at the first step,
growing to ~1e-12 after eight steps at these sizes (48 px crops, a width-8 ResNet-29, learning rate 1e-3, where
eager NCHW and eager channels_last differ by as much). At larger learning rates or 32 px crops training is chaotic
(BatchNorm over 2x2 maps, ASPP pooling over 4 images) and float64 rounding grows to 1e-3 in ~15 steps on either
path, so the sizes here keep the comparison sharp: a real difference (a momentum, an eps, a biased variance, a
missed update or a stale BatchNorm fold) shows at 1e-4 or more. Complements test_training_loop.py (TinySeg in
float32, DeepLabV3 with the fused loss for 3 steps) with the channels_last / memory-efficient / aux / output
stride 8 path, momentum=None with gradient accumulation and evaluations between steps, frozen backbone BatchNorm
with a training head, and a fused run resumed mid-run through training.loop.fit.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from test_training_loop import _cfg
from torch import nn

from deeplab_ops.nn import fuse_modules
from model import deeplabv3_resnet
from training import checkpoint as ckpt_io
from training import loop
from training.datasets import SyntheticShapes
from training.transforms import TrainTransform

CL = torch.channels_last
SIZE = 48


def _train_set(length=32):
    return loop.AugmentedDataset(SyntheticShapes("train", SIZE, length, seed=1),
                                 TrainTransform(SIZE, scale_range=(0.75, 1.5), flip=True))


def _batches(steps, batch=4):
    """`steps` batches of training.loop's sample stream, with ~10% of the labels set to 255 (ignored)."""
    ds = _train_set()
    gen = torch.Generator().manual_seed(1)
    out = []
    for keys in loop.StreamSampler(len(ds), batch, 1, 0, steps):
        items = [ds[k] for k in keys]
        x = torch.stack([i[0] for i in items]).double()
        y = torch.stack([i[1] for i in items]).long()
        out.append((x, torch.where(torch.rand(y.shape, generator=gen) < 0.1, torch.full_like(y, 255), y)))
    return out


def _model(**kw):
    torch.manual_seed(0)
    return deeplabv3_resnet(29, num_classes=21, width=8, **kw).double()


def _train(model, batches, *, layout=torch.contiguous_format, fused_loss=False, accum=1, freeze=None,
           eval_batch=None):
    """training.loop.fit's optimisation (param_groups, SGD momentum 0.9, weight decay 1e-4, poly 0.9, lr 1e-3) on
    the given batches; `accum` micro-batches per step; `freeze(model)` after model.train(); the eval outputs on
    `eval_batch` after every step when given. Returns (losses, eval outputs)."""
    model.to(memory_format=layout)
    torch.manual_seed(1234)  # dropout (the aux head's)
    opt = torch.optim.SGD(loop.param_groups(model, 1e-4), lr=1e-3, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, loop.poly_lambda(len(batches), 0.9))
    losses, evals = [], []
    for x, y in batches:
        model.train()
        if freeze is not None:
            freeze(model)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for xs, ys in zip(x.chunk(accum), y.chunk(accum), strict=True):
            out = model(xs.contiguous(memory_format=layout), upsample=not fused_loss)
            loss, logged = loop.segmentation_loss(out, ys, 0.5)
            (loss / accum).backward()
            total += float(logged) / accum
        opt.step()
        sched.step()
        losses.append(total)
        if eval_batch is not None:
            model.eval()
            with torch.no_grad():
                evals.append(model(eval_batch.contiguous(memory_format=layout))["out"])
    return losses, evals


def _assert_same_trajectory(eager, fused, la, lb, *, loss_rtol=1e-10, state_rtol=1e-9):
    for step, (a, b) in enumerate(zip(la, lb, strict=True)):
        assert abs(a - b) <= loss_rtol * abs(a), f"step {step + 1}: loss {b!r} fused vs {a!r} eager"
    se, sf = eager.state_dict(), fused.state_dict()
    assert se.keys() == sf.keys()
    for k, v in se.items():
        if k.endswith("num_batches_tracked"):
            assert torch.equal(sf[k], v), (k, sf[k], v)
            continue
        err = (sf[k] - v).norm().item() / max(v.norm().item(), 1e-6)
        assert err <= state_rtol, f"{k}: relative L2 difference {err:.3g} after {len(la)} steps"


def test_fused_channels_last_memory_efficient_aux_os8_trajectory_matches_eager_float64():
    # The fused model as train.py --fused-ops --memory-efficient --aux-loss trains it: channels_last, the fused
    # loss on output-stride-8 logits (the aux head's too), against the eager model with F.interpolate +
    # F.cross_entropy, channels_last too: dropout draws its mask in memory order, so the aux head's masks are the
    # same only in the same layout (eager NCHW vs eager channels_last differ there by as much as by any seed).
    batches = _batches(8)
    eager = _model(output_stride=8, aux_loss=True)
    fused = fuse_modules(copy.deepcopy(eager), memory_efficient=True)
    la, ea = _train(eager, batches, layout=CL, eval_batch=batches[0][0])
    lb, eb = _train(fused, batches, layout=CL, fused_loss=True, eval_batch=batches[0][0])
    _assert_same_trajectory(eager, fused, la, lb)
    for step, (a, b) in enumerate(zip(ea, eb, strict=True)):  # eval with BatchNorm folded, refreshed every step
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8, msg=f"eval after step {step + 1}")


def _cumulative_batchnorm(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    return model


def test_momentum_none_with_gradient_accumulation_and_evaluations_between_steps_float64():
    # momentum=None: the running statistics are the cumulative average over num_batches_tracked, which counts
    # micro-batches (two per step here); the eval after each step reads the updated averages (the fold refreshed).
    batches = _batches(6, batch=8)
    eager = _cumulative_batchnorm(_model())
    fused = _cumulative_batchnorm(_model(fused=True))
    fused.load_state_dict(eager.state_dict())
    la, ea = _train(eager, batches, accum=2, eval_batch=batches[0][0][:4])
    lb, eb = _train(fused, batches, accum=2, eval_batch=batches[0][0][:4])
    _assert_same_trajectory(eager, fused, la, lb)
    assert int(fused.state_dict()["backbone.bn1.num_batches_tracked"]) == 12
    for step, (a, b) in enumerate(zip(ea, eb, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8, msg=f"eval after step {step + 1}")


def _freeze_backbone_batchnorm(model):
    for m in model.backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.weight.requires_grad_(False)
            m.bias.requires_grad_(False)


def test_frozen_backbone_batchnorm_with_a_training_head_float64():
    # Fine-tuning: the backbone's BatchNorms frozen (eval, no affine gradient), the ASPP's and the aux head's
    # training. The frozen ones keep their statistics; everything else follows eager closely (eval-mode BatchNorm
    # in the backbone leaves little to reorder: the paths agree to ~1e-15).
    batches = _batches(6)
    eager = _model(aux_loss=True)
    fused = _model(aux_loss=True, fused=True, memory_efficient=True)
    fused.load_state_dict(eager.state_dict())
    before = copy.deepcopy(eager.state_dict())
    la, _ = _train(eager, batches, layout=CL, freeze=_freeze_backbone_batchnorm)
    lb, _ = _train(fused, batches, layout=CL, fused_loss=True, freeze=_freeze_backbone_batchnorm)
    _assert_same_trajectory(eager, fused, la, lb, loss_rtol=1e-12, state_rtol=1e-11)
    after = fused.state_dict()
    for k in ("backbone.bn1.running_mean", "backbone.layer2.1.bn2.running_var", "backbone.layer4.2.bn3.weight",
              "backbone.layer3.0.downsample.1.num_batches_tracked"):
        assert torch.equal(after[k], before[k]), k
    assert not torch.equal(after["classifier.0.project.1.running_mean"], before["classifier.0.project.1.running_mean"])


def test_a_fused_run_resumed_mid_run_continues_identically(tmp_path):
    # train.py --fused-ops's loop (training.loop.fit): channels_last, the fused loss, the aux head's dropout drawing
    # from the checkpointed RNG: stopped after 3 of 6 iterations and resumed, the same losses and final state,
    # bit for bit, as the uninterrupted run.
    def model():
        return deeplabv3_resnet(29, num_classes=21, width=8, aux_loss=True, fused=True, memory_efficient=True)

    cfg = _cfg(iterations=6, lr=1e-3, channels_last=True, fused_loss=True)
    torch.manual_seed(0)
    full = model()
    init = copy.deepcopy(full.state_dict())
    a = loop.fit(full, _train_set(), dataclasses.replace(cfg, out_dir=str(tmp_path / "a")), torch.device("cpu"))
    torch.manual_seed(0)
    first = model()
    first.load_state_dict(init)
    loop.fit(first, _train_set(), dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), stop_after=3),
             torch.device("cpu"))
    torch.manual_seed(123)  # another process state: everything comes from the checkpoint
    resumed = model()
    state = ckpt_io.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    b = loop.fit(resumed, _train_set(), dataclasses.replace(cfg, out_dir=str(tmp_path / "b")), torch.device("cpu"),
                 resume=state)
    assert [v for _, v in b.losses] == [v for _, v in a.losses[3:]]
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
