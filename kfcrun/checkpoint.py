"""Atomic checkpoints and RNG state capture, for runs that resume bit-for-bit.

A checkpoint holds the model, the full optimizer state (momentum, averaged iterates,
KFC factors and inverses, counters), every RNG state, the data-order position and the
iteration/clock counters. It is written to a temporary file in the same directory,
flushed to disk, then renamed over the old one, so a crash (even SIGKILL) mid-write
leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfcrun.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"


def checkpoint_path(run_dir: str | Path) -> Path:
    """Where a run directory keeps its checkpoint: ``<run_dir>/checkpoints/last.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint file a run directory (or a checkpoint file itself) points to, if it exists."""
    path = Path(path).expanduser()
    target = path if path.is_file() else checkpoint_path(path)
    return target if target.is_file() else None


def save_checkpoint(
    path: str | Path, payload: dict[str, Any], companions: Mapping[Path, str] | None = None
) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename).

    ``companions`` maps other files to their new text (the run's ``config.yaml``): they are
    written and flushed first and renamed right after the checkpoint, so that only a kill
    between two consecutive renames can leave them describing the previous checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    staged = [(_stage_text(target, text), Path(target)) for target, text in (companions or {}).items()]
    os.replace(tmp, path)
    for staged_file, target in staged:
        os.replace(staged_file, target)
    for folder in {path.parent, *(target.parent for _, target in staged)}:
        _fsync_dir(folder)  # make the renames themselves durable


def _stage_text(target: Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``target`` and flush it to disk; returns the temp file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with a clear error if it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint at {path}; fix: pass resume=<run dir> of a run that wrote "
            f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT} (it is written every trainer.checkpoint_every iterations)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # torch raises several types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
            "fix: resume from another run dir "
            "or start the run again"
        ) from err


def rng_state() -> dict[str, Any]:
    """Global RNG states: Python, NumPy, torch CPU and (if present) all CUDA devices."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNG states captured by :func:`rng_state` (CUDA only where available)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
