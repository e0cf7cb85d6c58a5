"""Checkpoints: atomic saves (temp file in the same folder, fsync, os.replace) and the full state a resume needs.

A save killed at any point (kill -9, power loss after the fsync) leaves the previous checkpoint intact and loadable;
the killed save's temp file is removed by the next save of the same path.

A checkpoint is a dict: model, optimizer, scheduler, grad_scaler (fp16), iteration (finished steps),
best_metric / best_iteration, eval_pending (saved just before the evaluation of its iteration, which had not
finished: a resume runs it first), rng (torch CPU + every CUDA device, numpy, python `random`; in a distributed run
rng_ranks holds every process's, rng process 0's), args, and
num_classes / class_names so that `--eval-only` and `--predict` rebuild the model from the file alone.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

from model.checkpoint import load_file, unwrap_model


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _remove_stale_temps(folder: str, path: str) -> None:
    """Delete temp files that killed saves of `path` left behind (their writer process no longer exists)."""
    remove_stale_temps(folder, [os.path.basename(path)])


def remove_stale_temps(folder: str, names) -> None:
    """Delete the temp files that killed writes of the files `names` in `folder` left behind: atomic_write's
    `.NAME.PID.X.tmp` whose writer process no longer exists. One listing of the folder, however many names
    (--predict's masks)."""
    wanted = set(names)
    for name in os.listdir(folder):
        if not (name.startswith(".") and name.endswith(".tmp")):
            continue
        stem, _, pid = name[1:-4].rpartition(".")[0].rpartition(".")
        if stem not in wanted or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # a live process is writing it
        except ProcessLookupError:
            pass
        except OSError:  # alive but not ours (PermissionError), or no way to tell: leave it
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def atomic_save(obj, path: str) -> None:
    """torch.save to `path` so that a crash leaves either the old file or the new one, never half of one."""
    atomic_write(path, lambda f: torch.save(obj, f))


NOT_A_FOLDER = "is a file, not a folder"  # unwritable_folder's reason when a part of the path is a file


def unwritable_folder(path: str) -> tuple[str, str] | None:
    """Why the folder `path` cannot be created or written in, without creating it: (the nearest existing path: the
    folder itself or an ancestor, the reason: "is a file, not a folder" or the OS error), or None when it can. A file
    is created there and removed (access() says yes to root on a read-only or virtual file system)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return probe, NOT_A_FOLDER
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        return probe, str(e.strerror or e)
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write, clean: bool = True) -> None:
    """write(f) into a binary file that then replaces `path` in one step (temp file in the same folder, fsync,
    os.replace): a crash leaves either the old file or the new one, never half of one. `clean`: first remove the
    temps killed writes of `path` left (False for a caller that cleans a folder's once: --predict's masks)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if clean:
        _remove_stale_temps(folder, path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: the mode any new file gets here instead
        os.replace(tmp, path)
    except BaseException as error:
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
        except OSError:  # (a folder made read-only meanwhile: the write's own error is the one to report)
            pass
        cause = error.__context__
        if (isinstance(error, RuntimeError) and isinstance(cause, (OSError, KeyboardInterrupt))
                and "inline_container" in str(error)):
            # torch.save's zip writer, closing after a failed write, raises a RuntimeError of its own ("unexpected
            # pos ...") that hides the write's error: a full disk, Ctrl-C. That error is what the caller handles.
            error = cause
        if isinstance(error, OSError) and error.filename is None and error.errno is not None:
            # a full disk or a file-size limit met by the writer names no file: this is the file being written
            raise OSError(error.errno, error.strerror, path) from None
        if error is cause:
            raise cause from None
        raise
    try:  # persist the rename itself
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory; the data is already safe
        pass


class FolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def lock_folder(folder: str) -> int | None:
    """An exclusive lock on the run folder `folder` (created if needed): the folder itself locked with flock, so the
    OS drops the lock when the process ends, however it ends (no stale lock to clear), and no file is added to it.
    Held while the returned descriptor stays open (os.close releases it); None where the platform or the filesystem
    has no flock (then nothing is locked). Raises FolderBusy where another process holds it: two runs into one folder
    would replace each other's checkpoints."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        return None
    os.makedirs(folder, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(f"{folder} is locked by another process") from None
    except OSError:  # a filesystem without locks (some network ones): unlocked, as before there was a lock
        os.close(fd)
        return None
    return fd


def unlock_folder(fd: int) -> None:
    """Release lock_folder's lock: unlocked first, so that a forked process still holding a copy of the descriptor
    does not keep it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# What fit() reads from a checkpoint to resume (train.py's checkpoints hold more: args, class names).
RESUME_KEYS = ("model", "optimizer", "scheduler", "iteration", "rng")


def unreadable_advice(path: str) -> str:
    """What to do about the checkpoint `path` that exists but cannot be read (the end of model.checkpoint.load_file's
    message): another of its run's files than the broken one, or an earlier copy."""
    others = {"best.pt": "last.pt", "last.pt": "best.pt"}.get(os.path.basename(path), "best.pt or last.pt")
    return ("; saves are atomic (a save that was interrupted leaves the previous file), so it was truncated or "
            f"overwritten afterwards, or it is not a checkpoint: use another one ({others} of its run, an earlier "
            "copy)")


def _numpy_array_globals() -> list:
    """What unpickling a plain numpy array needs (its reconstructor, ndarray, its dtype): data, no code. A file
    pickled under numpy 1.x names the reconstructor numpy.core.multiarray._reconstruct, one pickled under numpy 2
    numpy._core.multiarray._reconstruct: both are allowed, whichever numpy reads them."""
    multiarray = getattr(np, "_core", None) or np.core
    reconstruct = multiarray.multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
            (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by `atomic_save`; errors name the file and say what is wrong with it:
    FileNotFoundError, IsADirectoryError, model.CheckpointReadError (empty, corrupt, truncated; also a RuntimeError),
    ValueError (a file that holds no train.py checkpoint)."""
    # Weights-only, as model.load_file reads every file: a checkpoint is data, and a file crafted to run code when
    # unpickled (an object whose __reduce__ calls os.system) is refused, running nothing. numpy arrays are allowed:
    # checkpoints written before the numpy random state was kept as a tensor hold one.
    with torch.serialization.safe_globals(_numpy_array_globals()):
        ckpt = load_file(path, weights_only=True, map_location=map_location, advice=unreadable_advice(path))
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (expected a dict with a 'model' entry)")
    return ckpt


def checkpoint_iteration(path: str) -> int | None:
    """The iteration a checkpoint file records, read cheaply (weights-only and memory-mapped: no tensor is read);
    None when the file cannot be read so or records none."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):  # older checkpoints' numpy random state
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 (any unreadable file: no iteration to name)
        return None
    it = ckpt.get("iteration") if isinstance(ckpt, dict) else None
    return it if isinstance(it, int) else None


def check_resumable(ckpt: dict, path: str = "the checkpoint") -> None:
    """Raise a clear error unless `ckpt` holds everything a resume needs."""
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"cannot resume from {path}: it has no {', '.join(repr(k) for k in missing)} entries; "
                         "resume needs a last.pt/best.pt written by train.py's training loop (a bare state_dict "
                         "or an exported model only initialises a network)")
    iteration = ckpt["iteration"]
    if type(iteration) is not int or iteration < 0:  # (bool is no count either)
        raise ValueError(f"cannot resume from {path}: its 'iteration' entry is {iteration!r}, not a count of "
                         "iterations (an int >= 0); it was not written by train.py's training loop")


def check_rng_states(ckpt: dict) -> None:
    """Raise a ValueError naming the entry unless the checkpoint's random states ('rng', and 'rng_ranks' where
    saved) restore: tried here and undone, since fit() restores them only after --overwrite removed a run."""
    saved = capture_rng_state()
    # (CUDA's states only where CUDA is initialized: before, set_rng_state_all is deferred to its start, neither
    # checked here nor undone)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    try:
        for where, state in [("rng", ckpt["rng"]), *((f"rng_ranks[{i}]", r) for i, r in
                                                      enumerate(ckpt.get("rng_ranks") or ()))]:
            try:
                restore_rng_state(state if cuda or not isinstance(state, dict) else
                                  {k: v for k, v in state.items() if k != "cuda"})
            except Exception as e:  # noqa: BLE001 (whatever a malformed state raises: named in one line)
                raise ValueError(f"its {where!r} entry is not a random-number state that restores ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        restore_rng_state(saved)


def capture_rng_state() -> dict:
    # The legacy global NumPy state is saved on purpose: user code and libraries draw from it. Its key array is
    # kept as a tensor, so that the checkpoint holds no numpy object and loads with torch.load(weights_only=True)
    # (model.load_checkpoint reads train.py's checkpoints that way).
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]  # keys: a tensor (or, in checkpoints before it was, the numpy array)
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), *rest))  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def seed_process(seed: int, rank: int, iteration: int = 0) -> None:
    """Seed torch (CPU and every CUDA device), numpy's global state and python's `random` with a stream of their own
    for process `rank` of a distributed run: without it every process would draw the same dropout masks."""
    state = np.random.SeedSequence([seed, rank, iteration]).generate_state(2)
    value = int(state[0]) << 32 | int(state[1])
    torch.manual_seed(value)
    np.random.seed(int(state[0]))  # noqa: NPY002 (the legacy global state, for libraries that use it)
    random.seed(value)


def restore_process_rng(ckpt: dict, seed: int, rank: int, world_size: int) -> None:
    """Restore this process's random streams from a checkpoint: its own state when the checkpoint holds one per
    process of a run with as many processes ('rng_ranks'); otherwise process 0 takes the saved 'rng' and every other
    process a fresh stream of its own (seed_process at the checkpoint's iteration)."""
    per_rank = ckpt.get("rng_ranks")
    if per_rank is not None and len(per_rank) == world_size:
        restore_rng_state(per_rank[rank])
    elif rank == 0:
        restore_rng_state(ckpt["rng"])
    else:
        seed_process(seed, rank, int(ckpt.get("iteration", 0)))


def training_state(model, optimizer, scheduler, scaler, iteration: int, best_metric: float | None,
                   best_iteration: int | None, extra: dict, rng_ranks: list | None = None,
                   eval_pending: bool = False, metrics: dict | None = None) -> dict:
    """Everything a resume needs to continue the same run, as one dict for `atomic_save`. `rng_ranks`: every
    process's capture_rng_state() in a distributed run (saved as 'rng_ranks'; 'rng' is process 0's).
    `eval_pending`: the checkpoint is the one saved just before the evaluation of its iteration, which has not
    finished yet (a resume from it runs that evaluation first). `metrics`: the results of that evaluation, once it
    has run (None otherwise): a finished run resumed reports them again (metrics.json) without evaluating."""
    return {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "iteration": iteration,
        "best_metric": best_metric,
        "best_iteration": best_iteration,
        "eval_pending": eval_pending,
        "metrics": metrics,
        "rng": capture_rng_state() if rng_ranks is None else rng_ranks[0],
        **({} if rng_ranks is None else {"rng_ranks": rng_ranks}),
        **extra,
    }
