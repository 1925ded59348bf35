"""A run on several processes (``torchrun``, Slurm tasks): one job, chosen by rank 0.

``torchrun --nproc_per_node=N -m kfcrun experiment=...`` starts ``N`` copies of the
command. Rank 0 does what one process does (preflight, Hydra, the run directory and its
guard) and, right before training, sends the job (the resolved config, the run directory,
a resume's overrides) to the other ranks, which wait for it without composing anything,
creating any directory or writing any file (:func:`follow`). If rank 0 stops before that
(a config error, a refused run directory), the others receive "no job" and exit quietly
with rank 0's exit code; rank 0 prints the one line.

Under submitit (``+cluster=slurm``, or ``+cluster=local`` for several tasks on this machine)
every task runs the Hydra job itself; :func:`share_job` then makes every rank use rank 0's
config and directory.
"""

from __future__ import annotations

import atexit
import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kfcrun.distributed import DistributedContext, init_from_environment, launched_rank, launched_world_size

log = logging.getLogger(__name__)

__all__ = [
    "Job",
    "context",
    "follow",
    "is_follower",
    "launched_world_size",
    "record_exit_code",
    "share_job",
    "withdraw_job",
]

_CONTEXT: DistributedContext | None = None
_JOB_SHARED = False
#: Rank 0's exit code when it stops without a job (sent to the others at exit).
_EXIT_CODE = {"code": 1}

Job = tuple[DictConfig, Path, list[str]]


def context() -> DistributedContext | None:
    """This process's data-parallel context (the process group joined on first use), or ``None``."""
    global _CONTEXT
    if _CONTEXT is None and launched_world_size() > 1:
        _CONTEXT = init_from_environment()
        if _CONTEXT.is_main:
            atexit.register(_withdraw_at_exit)
    return _CONTEXT


def is_follower() -> bool:
    """Whether this process is a rank other than 0 of a launched data-parallel run."""
    return launched_world_size() > 1 and launched_rank() != 0


def share_job(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Job:
    """Rank 0's job on every rank (once per process; a single process gets its own back)."""
    global _JOB_SHARED
    ctx = context()
    if ctx is None or _JOB_SHARED:
        return cfg, run_dir, overrides
    payload = None
    if ctx.is_main:
        payload = {
            "cfg": OmegaConf.to_container(cfg, resolve=True),
            "run_dir": str(run_dir),
            "overrides": list(overrides),
        }
    received = ctx.broadcast_object(payload)
    _JOB_SHARED = True
    if received is None or "exit_code" in received:
        raise SystemExit(received["exit_code"] if received else 1)
    return OmegaConf.create(received["cfg"]), Path(received["run_dir"]), list(received["overrides"])


def withdraw_job(exit_code: int) -> None:
    """Rank 0 stops before training: tell the waiting ranks there is no job (they exit with ``exit_code``)."""
    global _JOB_SHARED
    ctx = _CONTEXT
    if ctx is None or not ctx.is_main or _JOB_SHARED:
        return
    _JOB_SHARED = True
    try:
        ctx.broadcast_object({"exit_code": exit_code})
    except Exception:  # the others may be gone already; nothing left to tell
        log.debug("could not tell the other ranks that there is no job", exc_info=True)


def record_exit_code(code: int) -> None:
    """The code :func:`withdraw_job` sends if rank 0 exits before sharing a job."""
    _EXIT_CODE["code"] = code


def _withdraw_at_exit() -> None:
    withdraw_job(_EXIT_CODE["code"])


def follow(train: Any) -> None:
    """A rank other than 0 under torchrun: wait for rank 0's job, then ``train(cfg, run_dir, overrides)``."""
    ctx = context()
    assert ctx is not None and not ctx.is_main
    try:
        cfg, run_dir, overrides = share_job(OmegaConf.create({}), Path("."), [])
    except SystemExit as stop:
        ctx.close()
        sys.exit(stop.code)
    train(cfg, run_dir, overrides)
