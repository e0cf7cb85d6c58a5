"""The training loop's pieces: the resumable sample stream, poly LR, the loss, train and eval steps, logging.

Reproducibility contract: batch i of a run is a pure function of (seed, i): `StreamSampler` walks a stream of
per-epoch permutations and gives every stream position its own augmentation seed. Together with the checkpointed
model, optimizer, scheduler and RNG states (dropout), a resumed run on CPU produces the same loss sequence as an
uninterrupted one, and N processes with per-process batch B see exactly the samples one process with batch N·B
would see (process r takes the r-th slice of each global batch).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import deeplab_ops
from model.checkpoint import unwrap_model
from training import checkpoint as ckpt_io
from training import datasets
from training import distributed as dist_utils
from training.metrics import SegmentationMetrics
from training.palette import IGNORE_INDEX
from training.transforms import pad_collate, scaled_size

BATCH1_MESSAGE = (
    "batch size 1 per BatchNorm batch in training: the ASPP image-pooling branch pools each image to 1x1, so its "
    "BatchNorm sees one value per channel and has no batch statistics (PyTorch raises 'Expected more than 1 value "
    "per channel when training'). Use --batch-size >= 2, or --freeze-bn to fine-tune with frozen BatchNorm."
)


# ---- data stream ---------------------------------------------------------------------------------------------


class StreamSampler:
    """Yields, for iterations [start, stop), this process's slice of the global batch as (index, sample_seed) pairs.

    The stream is the concatenation of per-epoch permutations of range(dataset_len), epoch e drawn from
    (seed, e); global batch i covers stream positions [i·B, (i+1)·B); process r takes B/world of them.
    """

    def __init__(self, dataset_len: int, global_batch: int, seed: int, start: int, stop: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch size {global_batch} is not divisible by the world size {world_size}")
        if dataset_len < 1:
            raise ValueError("the training set is empty")
        self.n, self.global_batch, self.seed = dataset_len, global_batch, seed
        self.start, self.stop, self.rank, self.world = start, stop, rank, world_size
        self._epoch, self._perm = -1, None

    def _index(self, pos: int) -> int:
        epoch = pos // self.n
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[pos % self.n])

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world
        for it in range(self.start, self.stop):
            first = it * self.global_batch + self.rank * local
            yield [(self._index(p), self.seed * 1_000_003 + p) for p in range(first, first + local)]


class AugmentedDataset:
    """Applies a joint transform with a per-sample RNG; items are addressed as (index, sample_seed)."""

    def __init__(self, dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, mask, name = self.dataset[index]
        rng = random.Random(seed) if seed is not None else None
        img, lbl = self.transform(image, mask, rng)
        return img, lbl, name


# ---- optimisation ---------------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; BatchNorm parameters and biases (1-D tensors) get none, as in
    the TF reference (slim regularizes conv weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def poly_lambda(total: int, power: float) -> Callable[[int], float]:
    """lr(i) = base · (1 − i/total)^power, the paper's 'poly' schedule."""
    return lambda i: max(0.0, 1.0 - i / total) ** power


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          cfg: TrainConfig, it: int) -> None:
    """After loading a checkpoint's optimizer and scheduler: this run's lr, momentum, weight decay and poly
    schedule (cfg.iterations, cfg.poly_power) from iteration `it` on.

    The loaded states hold the saved run's values (its lr already decayed by its own schedule: 0 at the end of a
    finished run). With unchanged settings this writes the same floats (the same expression LambdaLR evaluates),
    so a resume stays bit-identical to an uninterrupted run."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler.last_epoch = it
    for i, (group, fn) in enumerate(zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True)):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * fn(it)
        group["momentum"] = cfg.momentum
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0  # param_groups: [decayed, not decayed]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm (plain or inside a fused deeplab_ops module, which follows its BatchNorm's mode) in
    eval mode with frozen affine params."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)


def check_batch_size(model: nn.Module, per_bn_batch: int, freeze_bn: bool) -> None:
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if per_bn_batch < 2 and has_bn and not freeze_bn:
        raise ValueError(BATCH1_MESSAGE)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def segmentation_loss(out: dict, target: torch.Tensor, aux_weight: float, ignore_index: int = IGNORE_INDEX,
                      world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy summed over valid pixels / valid pixels of the global batch (all processes together).

    Returns (loss to backpropagate, loss value for logging). Dividing by the global count — not by each process's
    own — makes DDP's gradient average equal the single-process gradient even when processes hold different
    numbers of ignore-labelled pixels. Logits smaller than the target (a model called with upsample=False) are
    upsampled bilinearly inside the loss, without materializing them (deeplab_ops.upsample_cross_entropy).
    """
    count = (target != ignore_index).sum().to(torch.float64)
    if world_size > 1:
        count = dist_utils.all_reduce_sum(count)
    count = count.clamp(min=1.0)
    loss = _cross_entropy_sum(out["out"], target, ignore_index)
    if "aux" in out and aux_weight:
        loss = loss + aux_weight * _cross_entropy_sum(out["aux"], target, ignore_index)
    loss = loss / count.float()
    logged = loss.detach()
    if world_size > 1:
        logged = dist_utils.all_reduce_sum(logged.clone())
    return loss * world_size, logged


def _cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()  # autocast's half logits: the loss in float32
    if logits.shape[-2:] == target.shape[-2:]:
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return deeplab_ops.upsample_cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")


# ---- evaluation ------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, scales=(1.0,), flip: bool = False, amp: str = "none",
                  channels_last: bool = False) -> torch.Tensor:
    """Class probabilities (N, C, H, W) at the input size, float32: the softmax of the logits, averaged over the
    scales and flips when more than one (every call returns probabilities, whatever the number of passes).

    Multi-scale: the input is resized (bilinear) by each scale, the logits resized back; probabilities are
    averaged, as in the TF reference's multi-scale inference.
    """
    h, w = images.shape[-2:]
    total, n = None, 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, size=scaled_size(h, w, s), mode="bilinear",
                                                  align_corners=False)
        for flipped in (False, True) if flip else (False,):
            xi = x.flip(-1) if flipped else x
            if channels_last:
                xi = xi.contiguous(memory_format=torch.channels_last)
            with autocast(images.device, amp):
                logits = model(xi)["out"].float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            p = logits.softmax(1)
            total = p if total is None else total + p
            n += 1
    return total / n


@torch.no_grad()
def evaluate(model: nn.Module, dataset, num_classes: int, class_names, device: torch.device, *, batch_size: int = 1,
             scales=(1.0,), flip: bool = False, amp: str = "none", channels_last: bool = False, keep: int = 0,
             num_workers: int = 0, rank: int = 0, world_size: int = 1, progress: bool = True) -> tuple[dict, list]:
    """Metrics over `dataset` (items (image, mask, name) already normalized by EvalTransform).

    With world_size > 1 each process evaluates every world_size-th image and the confusion matrices are summed.
    Returns (metrics, kept) where kept holds the (image, mask, prediction) triples of the dataset's first `keep`
    images, for a preview (gathered from every process: every process returns them).
    """
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(num_classes, class_names)
    indices = list(range(rank, len(dataset), world_size))
    reads = datasets.ReadTracker(torch.utils.data.Subset(dataset, indices), num_workers)
    loader = torch.utils.data.DataLoader(reads.dataset, batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, collate_fn=pad_collate)
    kept, t0, done = [], time.time(), 0  # kept: (index in the dataset, triple) for the first `keep` images
    batches = iter(loader)
    with reads.reporting(batches):
        for images, masks, sizes, _names in batches:
            preds = _predict_at_own_sizes(model, images, sizes, device, scales, flip, amp, channels_last)
            for i, ((h, w), pred) in enumerate(zip(sizes, preds, strict=True)):
                metrics.update(pred, masks[i, :h, :w])
                if indices[done + i] < keep:
                    kept.append((indices[done + i], (images[i, :, :h, :w], masks[i, :h, :w], pred)))
            done += len(sizes)
            if progress and rank == 0:
                # this process's count times the processes: an estimate, at most the dataset's size (5 images on
                # 2 processes: 3 and 2)
                seen = min(done * world_size, len(dataset))
                Progress.line(f"eval {seen}/{len(dataset)} images  {time.time() - t0:.0f}s", final=False)
    if world_size > 1:
        state = torch.cat([metrics.cm.flatten().double(),
                           torch.tensor([metrics.image_miou_sum, metrics.image_count, metrics.images_seen],
                                        dtype=torch.float64)])
        state = dist_utils.all_reduce_sum(state.to(device)).cpu()
        metrics.reset()
        c = num_classes * num_classes
        metrics.merge_(state[:c].round().long().view(num_classes, num_classes), float(state[c]), int(state[c + 1]),
                       int(state[c + 2]))
        if keep > 0:
            kept = sorted((k for share in dist_utils.all_gather_objects(kept) for k in share), key=lambda k: k[0])
    if progress and rank == 0:
        Progress.line(f"eval {len(dataset)} image{'' if len(dataset) == 1 else 's'}  {time.time() - t0:.1f}s",
                      final=True)
    model.train(was_training)
    return metrics.compute(), [triple for _, triple in kept]


def _predict_at_own_sizes(model: nn.Module, images: torch.Tensor, sizes, device: torch.device, scales, flip: bool,
                          amp: str, channels_last: bool) -> list[torch.Tensor]:
    """Per image of a padded batch (pad_collate), its (h, w) prediction on the CPU, each image predicted at its own
    size: the images of one size go through the network together, unpadded. Padding would change every pixel's
    prediction, not only those near the border (the ASPP image-pooling branch averages over the whole input, and
    the scaled size and the output-stride grid follow the padded size), so the metrics would depend on
    --eval-batch-size and on which images share a batch."""
    preds: list[torch.Tensor | None] = [None] * len(sizes)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault((int(h), int(w)), []).append(i)
    for (h, w), idx in groups.items():
        x = images[idx, :, :h, :w] if len(idx) < len(sizes) or (h, w) != tuple(images.shape[-2:]) else images
        probs = predict_probs(model, x.to(device, non_blocking=True), scales, flip, amp, channels_last)
        pred = probs.argmax(1).cpu()
        for j, i in enumerate(idx):
            preds[i] = pred[j]
    return preds


# ---- logging ---------------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar with throughput and ETA (a plain line every `every` steps when not a terminal), up to
    iteration `stop` (default: `total`), where it ends its line."""

    open_line = False  # a terminal's bar (or eval count) is on the last line, not ended by a newline yet

    def __init__(self, total: int, start: int, images_per_step: int, every: int = 20, stop: int | None = None) -> None:
        self.total, self.start, self.ips, self.every = total, start, images_per_step, every
        self.stop = total if stop is None else stop
        self.t0 = time.time()
        self.tty = sys.stderr.isatty()

    @staticmethod
    def line(text: str, final: bool) -> None:
        if sys.stderr.isatty():
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
            Progress.open_line = not final
        elif final:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    @staticmethod
    def end() -> bool:
        """Ends an open bar's line, so that what is printed next (an error, a stop line) starts a line of its own;
        whether one was open."""
        if not Progress.open_line:
            return False
        Progress.open_line = False
        sys.stderr.write("\n")
        sys.stderr.flush()
        return True

    def update(self, it: int, loss: float, lr: float) -> None:
        done = it - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - it) / rate if rate > 0 else float("inf")
        frac = it / self.total
        bar = "#" * int(frac * 24)
        text = (f"[{bar:<24}] {it}/{self.total} loss {loss:.4f} lr {lr:.2e} {rate * self.ips:.1f} img/s "
                f"{rate:.2f} it/s elapsed {_hms(elapsed)} eta {_hms(eta)}")
        if self.tty:
            self.line(text, final=it >= self.stop)
        elif it % self.every == 0 or it >= self.stop or done == 1:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def evaluates(cfg: TrainConfig, it: int) -> bool:
    """Whether a run with a validation set evaluates after iteration `it`: every `eval_every` iterations and at the
    end."""
    return it == cfg.iterations or bool(cfg.eval_every and it % cfg.eval_every == 0)


def resume_evaluates(resume: dict | None, cfg: TrainConfig, *, validating: bool) -> bool:
    """Whether a run resumed from `resume` first runs the evaluation its checkpoint was saved before and which did not
    finish (eval_pending): when this run, with its own flags, evaluates at that iteration."""
    return (resume is not None and bool(resume.get("eval_pending")) and validating
            and evaluates(cfg, resume["iteration"]))


def _append_line(path: str, line: str) -> None:
    """Append `line` to `path` whole or not at all: a write that fails (a full disk, a file-size limit) is cut back
    off, and its OSError names the file (a failed write's error names none)."""
    data = line.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    end = os.lseek(fd, 0, os.SEEK_END)
    try:
        while data:
            data = data[os.write(fd, data):]
    except BaseException as e:  # (Ctrl-C between two partial writes too)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, end)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, path) from None
        raise
    finally:
        os.close(fd)


class MetricsLog:
    """JSON-lines metrics log (one object per line) and, when `tensorboard` is installed, a SummaryWriter."""

    def __init__(self, path: str | None, tensorboard_dir: str | None = None, resume_at: int | None = None,
                 eval_pending: bool = False) -> None:
        """resume_at: the iteration a resumed run continues from. Records of later iterations, which the
        interrupted run logged after its last checkpoint and the resumed run logs again, are dropped (from the
        JSON-lines file, rewritten atomically, and from TensorBoard through its purge_step). eval_pending: the
        checkpoint's evaluation had not finished, and the resumed run runs it again: a validation record of
        resume_at is dropped too."""
        self.path = path
        self.tb = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if resume_at is not None and os.path.isfile(path):
                _drop_records_after(path, resume_at, drop_val_at=eval_pending)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(tensorboard_dir,
                                        purge_step=None if resume_at is None else resume_at + 1)

    def write(self, record: dict) -> None:
        if self.path:
            clean = {k: None if isinstance(v, float) and v != v else v for k, v in record.items()}  # NaN → null
            _append_line(self.path, json.dumps(clean, allow_nan=False) + "\n")
        if self.tb is not None:
            step = record.get("iteration", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "iteration":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _drop_records_after(path: str, iteration: int, drop_val_at: bool = False) -> None:
    """Rewrite the JSON-lines log at `path` without the records of iterations after `iteration` (and, with
    `drop_val_at`, the validation records of `iteration` itself), atomically: a crash leaves the old file or the new
    one. Lines that are not such records are kept byte for byte (text that is not UTF-8 included), but for a last
    line cut off mid-record (no newline, no JSON: the append of a process killed or out of disk while writing it),
    which is dropped: the next record would be appended to it. NUL bytes, which no JSON text holds (the zero-filled
    tail a crash can leave in a file whose size was written before its data), are removed, and a line of nothing
    else with them."""
    with open(path, "rb") as f:
        lines = f.readlines()
    kept = []
    for raw in lines:
        line = raw.replace(b"\0", b"")
        if line != raw and not line.strip():
            continue
        try:
            record = json.loads(line)
            it, kind = record.get("iteration"), record.get("kind")
        except (ValueError, AttributeError):  # not a JSON object (or not UTF-8): not ours to judge
            it = kind = None
            if not line.endswith(b"\n") and line.lstrip().startswith(b"{"):
                continue  # (only the last line can lack its newline)
        if not (isinstance(it, int) and (it > iteration or (drop_val_at and it == iteration and kind == "val"))):
            kept.append(line if line.endswith(b"\n") else line + b"\n")
    if kept != lines:
        ckpt_io.atomic_write(path, lambda f: f.write(b"".join(kept)))


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, model: nn.Module, weight_decay: float) -> None:
    """optimizer.load_state_dict(state), also where the saved run trained another set of parameters than this one
    (--freeze-bn changed on resume: `param_groups` leaves frozen BatchNorm parameters out, so the saved groups
    have other sizes). Then each parameter both runs train gets its saved state (momentum buffer); a parameter the
    saved run froze starts without one, as it would in a fresh run. Anything else that does not fit raises."""
    saved_sizes = [len(g["params"]) for g in state["param_groups"]]
    if saved_sizes == [len(g["params"]) for g in optimizer.param_groups]:
        optimizer.load_state_dict(state)
        return
    bn_params = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for p in m.parameters(recurse=False)]
    flags = [p.requires_grad for p in bn_params]
    try:  # the saved run's groups: BatchNorm parameters frozen where this run trains them, and the other way
        for p in bn_params:
            p.requires_grad_(not any(flags))
        groups = param_groups(model, weight_decay)
    finally:
        for p, flag in zip(bn_params, flags, strict=True):
            p.requires_grad_(flag)
    if [len(g["params"]) for g in groups] != saved_sizes:
        raise ValueError(
            f"the checkpoint's optimizer holds parameter groups of {saved_sizes} parameters, but this model trains "
            f"{[len(g['params']) for g in optimizer.param_groups]} (and {[len(g['params']) for g in groups]} with "
            f"its BatchNorms frozen the other way): it was saved for another model"
        )
    saved = torch.optim.SGD(groups, lr=1.0)
    saved.load_state_dict(state)
    mine = {p for g in optimizer.param_groups for p in g["params"]}
    for p, st in saved.state.items():
        if p in mine:
            optimizer.state[p] = st


def check_resume_state(model: nn.Module, resume: dict, weight_decay: float) -> None:
    """Raise a ValueError saying what is wrong unless `resume` can continue a run of `model` (its BatchNorms already
    frozen or not as the run trains them): the entries a resume needs, a count of finished steps, and an optimizer
    and a scheduler state that load as fit() loads them (into throwaway copies: the model is left as it is).
    train.py checks this before anything is written or removed (--overwrite), since fit() would only find out after."""
    ckpt_io.check_resumable(resume, "the checkpoint")
    ckpt_io.check_rng_states(resume)
    it = resume["iteration"]
    if isinstance(it, bool) or not isinstance(it, int) or it < 0:
        raise ValueError(f"its 'iteration' entry is {it!r}, not a count of finished steps")
    core = unwrap_model(model)
    optimizer = torch.optim.SGD(param_groups(core, weight_decay), lr=1.0, momentum=0.9)
    load_optimizer_state(optimizer, resume["optimizer"], core, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1.0)
    try:
        scheduler.load_state_dict(resume["scheduler"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"its 'scheduler' entry is not a learning-rate scheduler's state ({type(e).__name__}: "
                         f"{e})") from None


# ---- the loop --------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    iterations: int
    batch_size: int  # global: summed over processes
    lr: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    seed: int = 0
    amp: str = "none"
    channels_last: bool = False
    freeze_bn: bool = False
    aux_weight: float = 0.5
    num_workers: int = 0
    log_every: int = 20
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 0  # 0: at evaluations and at the end only
    stop_after: int | None = None  # stop (with a checkpoint) after this many iterations of this invocation
    fused_loss: bool = False  # model(x, upsample=False) + deeplab_ops.upsample_cross_entropy (model/'s DeepLabV3)
    out_dir: str | None = None
    progress: bool = True
    extra_state: dict = field(default_factory=dict)  # saved in every checkpoint (args, class names...)


@dataclass
class TrainResult:
    losses: list  # (iteration, loss) of the steps this invocation ran
    iteration: int
    best_metric: float | None
    best_iteration: int | None
    last_metrics: dict | None


def fit(model: nn.Module, train_set, cfg: TrainConfig, device: torch.device, *, val_fn=None,
        resume: dict | None = None, rank: int = 0, world_size: int = 1, log: MetricsLog | None = None) -> TrainResult:
    """Train `model` (already on `device`, DDP-wrapped when world_size > 1) for cfg.iterations steps.

    val_fn(model) -> metrics dict (or None) runs the evaluation; the best 'miou' is tracked and saved as best.pt.
    `resume` is a checkpoint dict: model, optimizer, scheduler, scaler, iteration, best metric and RNG states are
    restored and the sample stream continues at the saved iteration; lr, momentum, weight decay and the poly
    schedule are cfg's from there (apply_hyperparameters: unchanged settings continue the saved run exactly).
    """
    core = unwrap_model(model)
    local_batch = cfg.batch_size // world_size
    sync_bn = world_size > 1 and dist_utils.synchronized_batchnorm(core)
    check_batch_size(core, cfg.batch_size if sync_bn else local_batch, cfg.freeze_bn)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (fp16 autocast with a GradScaler); use --amp bf16 on CPU")

    _set_train_mode(model, cfg.freeze_bn)  # before the optimizer: frozen BatchNorm parameters are left out
    optimizer = torch.optim.SGD(param_groups(core, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(cfg.iterations, cfg.poly_power))
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp == "fp16")
    start, best, best_it = 0, None, None
    if resume is not None:
        ckpt_io.check_resumable(resume)
        core.load_state_dict(resume["model"])
        load_optimizer_state(optimizer, resume["optimizer"], core, cfg.weight_decay)
        scheduler.load_state_dict(resume["scheduler"])
        if resume.get("grad_scaler"):
            scaler.load_state_dict(resume["grad_scaler"])
        start, best, best_it = resume["iteration"], resume.get("best_metric"), resume.get("best_iteration")
        if start > cfg.iterations:
            raise ValueError(f"the checkpoint is at iteration {start}, beyond --iterations {cfg.iterations}")
        apply_hyperparameters(optimizer, scheduler, cfg, start)

    stop = cfg.iterations if cfg.stop_after is None else min(cfg.iterations, start + cfg.stop_after)
    sampler = StreamSampler(len(train_set), cfg.batch_size, cfg.seed, start, stop, rank, world_size)
    reads = datasets.ReadTracker(train_set, cfg.num_workers)  # names the file a crashed worker was reading
    loader = torch.utils.data.DataLoader(reads.dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                         pin_memory=device.type == "cuda", collate_fn=_collate_train)
    # Creating the loader's iterator draws a seed from the torch RNG, so the saved RNG state is restored after it.
    # Every process of a distributed run draws from a stream of its own (dropout masks): process 0 continues the
    # stream seeded before the model was built, the others are seeded from (seed, rank).
    batches = iter(loader)
    # The block's end, normal or by an error (a worker crash, a NaN loss, an interrupt; here on: the resume's
    # evaluation and checkpoints too), shuts the loader's workers down, before a worker crash is reported.
    with reads.reporting(batches):
        if resume is not None:
            ckpt_io.restore_process_rng(resume, cfg.seed, rank, world_size)
        elif rank > 0:
            ckpt_io.seed_process(cfg.seed, rank)
        is_main = rank == 0
        progress = Progress(cfg.iterations, start, cfg.batch_size, cfg.log_every, stop) \
            if cfg.progress and is_main else None

        saved: dict[str, int] = {}  # checkpoint path -> iteration, written by this invocation

        def rng_states() -> list | None:
            """Every process's random streams, for the checkpoints (collective: called by every process alike)."""
            return dist_utils.all_gather_objects(ckpt_io.capture_rng_state()) if world_size > 1 else None

        def save(name: str, it: int, rng_ranks: list | None, eval_pending: bool = False,
                 metrics: dict | None = None) -> None:
            if is_main and cfg.out_dir:
                state = ckpt_io.training_state(model, optimizer, scheduler, scaler, it, best, best_it, cfg.extra_state,
                                               rng_ranks, eval_pending=eval_pending, metrics=metrics)
                path = os.path.join(cfg.out_dir, name)
                ckpt_io.atomic_save(state, path)
                saved[path] = it

        last_metrics = None

        def evaluate_at(it: int, rng_ranks: list | None) -> None:
            """The evaluation of iteration `it`, whose last.pt is saved (marked eval_pending): best.pt when its mIoU is
            the best so far, the log's record, then last.pt again, the evaluation done and the best recorded."""
            nonlocal best, best_it, last_metrics
            # The evaluation's draws (its loader's seed) leave the training's random streams as they were, so that a
            # run resumed from the checkpoint saved just before it continues exactly as this one does.
            rng = ckpt_io.capture_rng_state()
            last_metrics = val_fn(model)
            ckpt_io.restore_rng_state(rng)
            _set_train_mode(model, cfg.freeze_bn)
            if last_metrics is not None and (best is None or last_metrics["miou"] > best):
                best, best_it = last_metrics["miou"], it
                save("best.pt", it, rng_ranks, metrics=last_metrics)
            if log is not None and is_main and last_metrics is not None:
                log.write({"kind": "val", "iteration": it, **{k: v for k, v in last_metrics.items()
                                                               if isinstance(v, (int, float))}})
            # The evaluation done, its results and the new best recorded: a finished run resumed after a failed
            # write of metrics.json (a full disk) reports them again from here.
            save("last.pt", it, rng_ranks, metrics=last_metrics)

        def evaluates_at(it: int) -> bool:
            return val_fn is not None and evaluates(cfg, it)

        if resume_evaluates(resume, cfg, validating=val_fn is not None):
            # The checkpoint was saved just before its iteration's evaluation, which did not finish (the run was
            # interrupted, or stopped on an error there): it runs now, as the uninterrupted run ran it, before the next
            # step (best.pt, the log's record and, at the end, metrics.json come from it).
            evaluate_at(start, rng_states())
        elif resume is not None and stop == start:
            # Nothing left to train (a finished run resumed, maybe into another --out-dir): the run's last.pt is the one
            # it resumed, so that the folder holds the checkpoint its report names; the results of its evaluation
            # there, which it records, are this run's again (train.py writes metrics.json from them, as the run did).
            if val_fn is not None and evaluates(cfg, start):
                last_metrics = resume.get("metrics")
            save("last.pt", start, rng_states(), metrics=last_metrics)
        losses, it, t_start = [], start, time.time()
        for images, masks in batches:
            images = images.to(device, non_blocking=True)
            masks = masks.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, cfg.amp):
                out = model(images, upsample=False) if cfg.fused_loss else model(images)
            loss, logged = segmentation_loss(out, masks, cfg.aux_weight, world_size=world_size)
            value = float(logged)  # summed over processes: every process stops at the same step
            if not math.isfinite(value):
                # Before backward: no weight and no checkpoint takes this step (BatchNorm running statistics saw the
                # forward, as they would in PyTorch; the checkpoints hold the last good ones).
                raise FloatingPointError(nonfinite_loss_message(value, it + 1, _checkpoints_in(cfg.out_dir, saved)
                                                                if is_main else saved,
                                                                start if resume is not None else None, cfg.amp))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            it += 1
            losses.append((it, value))
            if progress is not None:
                progress.update(it, value, lr)
            if log is not None and is_main and (it % cfg.log_every == 0 or it == stop):
                log.write({"kind": "train", "iteration": it, "loss": value, "lr": lr,
                           "elapsed_s": round(time.time() - t_start, 3)})
            do_eval = evaluates_at(it)
            if it == stop or do_eval or (cfg.checkpoint_every and it % cfg.checkpoint_every == 0):
                rng_ranks = rng_states()  # the same after the evaluation, which restores them
                # Before the evaluation: an error there keeps what was trained, and a resume runs the evaluation.
                save("last.pt", it, rng_ranks, eval_pending=do_eval)
                if world_size > 1:  # every process goes on once it is written (an error names it)
                    torch.distributed.barrier()
            if do_eval:
                evaluate_at(it, rng_ranks)
    return TrainResult(losses, it, best, best_it, last_metrics)


def _checkpoints_in(out_dir: str | None, saved: dict[str, int]) -> dict[str, int | None]:
    """Checkpoint path -> iteration: those this invocation saved, and last.pt / best.pt already in `out_dir` (an
    earlier invocation's, read for their iteration; None if unreadable)."""
    found: dict[str, int | None] = dict(saved)
    for name in ("last.pt", "best.pt") if out_dir else ():
        path = os.path.join(out_dir, name)
        if path not in found and os.path.isfile(path):
            found[path] = ckpt_io.checkpoint_iteration(path)
    return found


def nonfinite_loss_message(value: float, iteration: int, checkpoints: dict[str, int | None],
                           resumed_at: int | None = None, amp: str = "none") -> str:
    """Why training stopped at a NaN/Inf loss, which checkpoints there are, and what can get past it.

    No checkpoint is called good: the weights of iteration i's forward are those after step i - 1, so a checkpoint
    of iteration i - 1 holds exactly the weights that gave the NaN (resuming from it repeats the same forward on
    the same batch, at any --lr), and an older one may already hold diverging weights."""
    text = (f"loss is {value} at iteration {iteration}: training stopped before the optimizer step, so no weight and "
            "no checkpoint took it. ")
    ran = iteration - 1  # this forward ran the weights after `ran` steps
    again = "start the run again with a lower --lr (train.py --overwrite replaces this run; or give another --out-dir)"
    data = ", or check the data" + (" (--amp fp16 may overflow: try bf16 or none)." if amp == "fp16" else ".")
    found = sorted(((i, p) for p, i in checkpoints.items()), key=lambda t: -1 if t[0] is None else t[0], reverse=True)
    if not found:
        text += "No checkpoint was written by this run"
        if resumed_at is not None:
            holds = ", holds the weights this forward ran" if resumed_at == ran else ""
            text += f" (the checkpoint it resumed from, at iteration {resumed_at}{holds}, is unchanged)"
        return text + f"; {again}{data}"
    text += "Checkpoints: " + ", ".join(f"{p} (iteration {i})" if i is not None else f"{p} (unreadable)"
                                        for i, p in found) + ". "
    same = [p for i, p in found if i == ran]
    older = [(i, p) for i, p in found if i is not None and i < ran]
    if same:
        text += (f"{same[0]} holds the weights this forward ran: resuming from it repeats this step on the same batch "
                 "and stops here again, whatever the --lr. ")
    if older:
        i, p = older[0]
        later = [q for j, q in found if j is not None and j > i]
        # train.py refuses to resume an older checkpoint into the folder whose last.pt is later (its saves would
        # replace it): the advice names a new folder then, where the resumed run branches off
        branch = (f" --out-dir NEW_FOLDER (another folder: train.py does not resume an older checkpoint into the "
                  f"folder of the later {later[0]})" if later else "")
        text += (f"{'The older' if same else 'The most recent'} {p} (iteration {i}) may predate the divergence, or "
                 f"already hold diverging weights (see the losses logged up to iteration {i}): --resume {p}{branch} "
                 f"with a lower --lr, or {again}")
    else:
        text += again[0].upper() + again[1:]
    return text + data


def _set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        freeze_batchnorm(model)


def _collate_train(batch):
    images = torch.stack([b[0] for b in batch])
    masks = torch.stack([b[1] for b in batch])
    return images, masks
