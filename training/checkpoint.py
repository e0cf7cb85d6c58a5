"""Checkpoints: atomic saves (temp file in the same folder, fsync, os.replace) and the full state a resume needs.

A checkpoint is a dict: model, optimizer, scheduler, grad_scaler (fp16), iteration (finished steps),
best_metric / best_iteration, rng (torch CPU + every CUDA device, numpy, python `random`), args, and
num_classes / class_names so that `--eval-only` and `--predict` rebuild the model from the file alone.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch


def atomic_save(obj, path: str) -> None:
    """torch.save to `path` so that a crash leaves either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # persist the rename itself
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory; the data is already safe
        pass


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by `atomic_save`; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise RuntimeError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (expected a dict with a 'model' entry)")
    return ckpt


def capture_rng_state() -> dict:
    # The legacy global NumPy state is saved on purpose: user code and libraries draw from it.
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}  # noqa: NPY002
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DistributedDataParallel / torch.compile wrappers (whose state_dict keys are the plain ones)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def training_state(model, optimizer, scheduler, scaler, iteration: int, best_metric: float | None,
                   best_iteration: int | None, extra: dict) -> dict:
    """Everything a resume needs to continue the same run, as one dict for `atomic_save`."""
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "iteration": iteration,
        "best_metric": best_metric,
        "best_iteration": best_iteration,
        "rng": capture_rng_state(),
        **extra,
    }
