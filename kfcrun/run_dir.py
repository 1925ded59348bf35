"""The run directory's guard: a new run never writes over a run, a failed start leaves nothing.

A directory *holds a run* when it has any of :data:`RUN_MARKERS` (what the trainer
writes: the config, the record, the metrics, the checkpoint). Before Hydra creates
anything, the CLI asks :func:`plan_run_dir` where the run will go and refuses a
directory that holds a run (:func:`refuse_existing_run`): continuing it is
``resume=<dir>``, a new run needs a fresh directory.

Hydra creates the run directory, its ``.hydra/`` record and the job log before the
task starts; if the task then fails before the trainer writes its first file (bad data,
no device, a signal during the initial curvature estimate), :func:`remove_stub` removes
exactly those files and the directories Hydra created for them. It deletes files by
name and directories only when empty (``rmdir``), so it cannot remove anything a run or
a user put there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from kfcrun.checkpoint import CHECKPOINT_DIR, LAST_CHECKPOINT
from kfcrun.errors import ConfigError

__all__ = [
    "HYDRA_STUB_FILES",
    "RUN_MARKERS",
    "PlannedRunDir",
    "holds_run",
    "only_stub",
    "plan_run_dir",
    "refuse_existing_run",
    "remove_stub",
]

#: Files whose presence means a directory holds a run (written by :class:`kfcrun.train.Trainer`).
RUN_MARKERS = ("config.yaml", "run.json", "metrics.jsonl", f"{CHECKPOINT_DIR}/{LAST_CHECKPOINT}")
#: What Hydra writes into ``<run dir>/<hydra.output_subdir>/`` before the task runs.
HYDRA_STUB_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def holds_run(path: str | Path) -> bool:
    """Whether ``path`` (a directory) holds a run's files."""
    path = Path(path)
    return any((path / marker).exists() for marker in RUN_MARKERS)


def _held_markers(path: Path) -> list[str]:
    return [marker for marker in RUN_MARKERS if (path / marker).exists()]


@dataclass(frozen=True)
class PlannedRunDir:
    """Where a new run will write, as known before Hydra creates it.

    Attributes:
        path: the run directory (for a sweep, the sweep directory).
        existed: which of ``path`` and its ancestors existed before the command ran;
            :func:`remove_stub` never removes those.
    """

    path: Path
    existed: frozenset[Path]


def plan_run_dir(path: str | Path) -> PlannedRunDir:
    """Record ``path`` and which of its ancestors exist now."""
    path = Path(path).expanduser().absolute()
    return PlannedRunDir(path, frozenset(p for p in (path, *path.parents) if p.exists()))


def refuse_existing_run(path: str | Path, key: str, sweep: bool = False) -> None:
    """Raise :class:`ConfigError` (one line) if ``path`` (or, for a sweep, one of its jobs) holds a run."""
    path = Path(path)
    runs = [path] if holds_run(path) else []
    if sweep and path.is_dir():
        runs += sorted(p for p in path.iterdir() if p.is_dir() and holds_run(p))
    if not runs:
        return
    held = ", ".join(_held_markers(runs[0]))
    what = f"{runs[0]} holds a run ({held})"
    if sweep:
        raise ConfigError(
            f"config error: {key}={path} holds {len(runs)} finished or stopped run(s), e.g. {what}; "
            f"a new sweep never writes over them; fix: choose a fresh directory (drop {key}= for a new "
            "one under outputs/multirun/), or continue a job with kfcrun resume=<its directory>"
        )
    raise ConfigError(
        f"config error: {key}={path} already holds a run ({held}); a new run never writes over one; "
        f"fix: kfcrun resume={path} to continue it, or choose a fresh directory (drop {key}= for a new "
        "one under outputs/)"
    )


def _stub_files(run_dir: Path, log_files: Iterable[str], output_subdir: str | None) -> set[Path]:
    stub = {run_dir / name for name in log_files}
    if output_subdir:
        stub |= {run_dir / output_subdir / name for name in HYDRA_STUB_FILES}
        stub.add(run_dir / output_subdir)
    return stub


def only_stub(run_dir: str | Path, log_files: Iterable[str], output_subdir: str | None) -> bool:
    """Whether ``run_dir`` holds nothing but what Hydra writes before a job starts."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        return False
    return set(run_dir.rglob("*")) <= _stub_files(run_dir, log_files, output_subdir)


def remove_stub(
    run_dir: str | Path, log_files: Iterable[str], output_subdir: str | None, planned: PlannedRunDir | None
) -> bool:
    """Remove what Hydra wrote into ``run_dir`` if nothing else is there; return whether it is gone.

    ``log_files`` are the job log's file names in ``run_dir``; ``output_subdir`` is
    ``hydra.output_subdir`` (``.hydra``). Directories that existed before the command
    (``planned.existed``) stay; without a plan only ``run_dir`` itself may go.
    """
    run_dir = Path(run_dir).absolute()
    if not only_stub(run_dir, log_files, output_subdir):
        return False  # something else is there (a run, the user's files): not ours to remove
    present = set(run_dir.rglob("*"))
    for path in sorted(present, key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        except OSError as err:
            logging.getLogger(__name__).debug("could not remove %s: %s", path, err)
            return False
    existed = planned.existed if planned is not None else frozenset()
    removable = [run_dir, *run_dir.parents] if planned is not None else [run_dir]
    cwd = Path.cwd().absolute()
    for directory in removable:
        if directory in existed or directory == cwd:
            break
        try:
            directory.rmdir()  # only ever an empty directory
        except OSError:
            break
    return not run_dir.exists()


def writable_ancestor(path: str | Path) -> Path:
    """The nearest existing directory at or above ``path`` (where creating ``path`` starts)."""
    path = Path(path).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(os.sep)
