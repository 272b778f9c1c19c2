"""Checkpoints that a crash cannot half-write and a bit flip cannot slip through, and RNG states.

Files in the output directory: ``checkpoint-last.pt`` (the newest) and
``checkpoint-prev.pt`` (the one before). :func:`save_checkpoint` writes a
temporary file in the same directory, flushes it to disk, moves ``last`` to
``prev`` and renames the temporary file to ``last`` (``os.replace``, atomic on
POSIX): at every instant both names hold either nothing or a complete file.

A checkpoint is a plain ``torch.save`` dictionary (``torch.load(path)["model"]``
is the model's state dict) that also carries the SHA-256 of its own contents
(:func:`content_digest`), because a flipped bit inside a tensor still unpickles
without complaint; :func:`load_checkpoint` recomputes it.
"""
from __future__ import annotations

import hashlib
import os
import random
from typing import Any, Dict, Mapping, Optional

import torch

from . import SetupError

CHECKPOINT_FORMAT = "se_fused.train/1"
LAST_NAME = "checkpoint-last.pt"
PREV_NAME = "checkpoint-prev.pt"
REQUIRED_KEYS = ("format", "sha256", "run", "model", "optimizer", "scheduler", "epoch", "step_in_epoch",
                 "global_step", "rng", "meters", "history")


class CheckpointError(SetupError):
    """A checkpoint cannot be read, is corrupt, or belongs to a different run."""


def to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor (nested in dicts, lists, tuples) copied to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((key, to_cpu(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(value) for value in obj)
    return obj


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        digest.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        data = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__[0]}{len(obj)}".encode())
        for value in obj:
            _feed(digest, value)
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


def content_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over every key and value of ``state`` but ``"sha256"`` (tensors by dtype, shape and bytes)."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key != "sha256"})
    return digest.hexdigest()


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict[str, Any], directory: str) -> str:
    """Write ``state`` to ``directory/checkpoint-last.pt``, keeping the former one as ``checkpoint-prev.pt``.

    Adds ``format`` and ``sha256``; tensors are saved on the CPU. Returns the path written.
    """
    state = to_cpu(dict(state))
    state["format"] = CHECKPOINT_FORMAT
    state["sha256"] = content_digest(state)
    os.makedirs(directory, exist_ok=True)
    last = os.path.join(directory, LAST_NAME)
    temporary = os.path.join(directory, f".{LAST_NAME}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if os.path.exists(last):
            os.replace(last, os.path.join(directory, PREV_NAME))
        os.replace(temporary, last)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    _fsync_directory(directory)
    return last


def find_resume_checkpoint(directory: str) -> Optional[str]:
    """``checkpoint-last.pt`` in ``directory``, else ``checkpoint-prev.pt`` (a save interrupted between its
    two renames leaves only that one), else ``None``."""
    for name in (LAST_NAME, PREV_NAME):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    return None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Raises :class:`CheckpointError` when the file is missing, unreadable,
    truncated, not a checkpoint of this trainer, or its contents do not match
    the SHA-256 stored in it. Reading never modifies any file.
    """
    previous = os.path.join(os.path.dirname(os.path.abspath(path)), PREV_NAME)
    hint = (f"; the checkpoint before it, {previous}, can be resumed with --resume {previous}"
            if os.path.exists(previous) and os.path.abspath(previous) != os.path.abspath(path) else "")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (zip, unpickling, EOF ... errors all mean "unreadable")
        raise CheckpointError(f"checkpoint {path} is unreadable, probably truncated or corrupt "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not a se_fused.train checkpoint "
                              f"(format {found!r}, expected {CHECKPOINT_FORMAT!r}){hint}")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is incomplete{hint}")
    if content_digest(state) != state["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the SHA-256 stored "
                              f"in it{hint}")
    return state


def check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], path: str) -> None:
    """Raise :class:`CheckpointError` if the run-defining settings of a checkpoint differ from this run's.

    ``saved``/``current`` map setting names (architecture, classes, global
    batch, seed, training-set size, ...) to values; any difference means the
    saved position and states would not continue this run.
    """
    differences = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
                   for key, value in current.items() if saved.get(key) != value]
    if differences:
        raise CheckpointError(f"checkpoint {path} belongs to a different run ({'; '.join(differences)}); "
                              "resume with the settings it was made with, or start a new --output-dir")


# ---------------------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------------------

def capture_rng_state(device: torch.device) -> Dict[str, Any]:
    """The states of Python's, NumPy's (when installed) and torch's CPU and CUDA (``device``) generators."""
    state: Dict[str, Any] = {"python": random.getstate(), "torch_cpu": torch.get_rng_state(), "numpy": None,
                             "torch_cuda": None}
    try:
        import numpy
    except ImportError:
        numpy = None
    if numpy is not None:
        name, keys, position, has_gauss, cached_gaussian = numpy.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "position": int(position),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Undo :func:`capture_rng_state`: set every generator back to the saved state."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_cpu"])
    if state.get("numpy") is not None:
        import numpy
        saved = state["numpy"]
        numpy.random.set_state((saved["name"], saved["keys"].numpy().astype("uint32"), saved["position"],
                                saved["has_gauss"], saved["cached_gaussian"]))
    if device.type == "cuda" and state.get("torch_cuda") is not None:
        torch.cuda.set_rng_state(state["torch_cuda"], device)
