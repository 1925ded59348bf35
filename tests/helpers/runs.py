"""Small real runs for the tests of the runner: configs, in-process training, a subprocess ``kfcrun``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kfcrun.checkpoint import load_checkpoint
from kfcrun.cli import _compose

#: The smoke experiment shrunk to a few steps: evaluations and checkpoints every 2 iterations.
TINY = [
    "trainer.max_iters=4",
    "trainer.eval_every=2",
    "trainer.checkpoint_every=2",
    "trainer.train_eval_size=64",
    "trainer.eval_batch_size=256",
    "trainer.progress=false",
]
#: KFC-pre on the smoke data at its cheapest (statistics and inverses every step, a tiny initial estimate).
KFC_TINY = [
    "optimizer=kfc_pre",
    "optimizer.init_examples=64",
    "optimizer.stats_every=1",
    "optimizer.inverse_every=1",
    "optimizer.damping=1.0",
]


def smoke_config(cache_dir: Path, *overrides: str) -> DictConfig:
    """The run config of ``kfcrun experiment=smoke <overrides>`` (validated, no ``hydra`` node)."""
    cfg = _compose(
        ["experiment=smoke", "trainer.progress=false", f"dataset.cache_dir={cache_dir}", *overrides]
    )
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    container.pop("hydra")
    return OmegaConf.create(container)


def train_in_process(run_dir: Path, cache_dir: Path, *overrides: str) -> Path:
    """Train ``experiment=smoke`` with ``TINY`` and ``overrides`` into ``run_dir``; returns it."""
    from kfcrun.train import train

    train(smoke_config(cache_dir, *TINY, *overrides), run_dir)
    return run_dir


def kfcrun_process(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    """Start ``python -m kfcrun ARGS`` (progress bars off), with SIGINT at its default (not ignored)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["KFCRUN_CACHE_DIR"] = str(cache)
    return subprocess.Popen(
        [sys.executable, "-m", "kfcrun", *args, "trainer.progress=false"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell without job control starts background jobs with SIGINT ignored; Python keeps that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_until(proc: subprocess.Popen, done: Callable[[], bool], timeout: float = 300) -> None:
    """Poll ``done`` until it holds; fail if the process ends first."""
    deadline = time.time() + timeout
    while not done():
        assert proc.poll() is None, f"the run ended first: {proc.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def checkpoint_iteration(run_dir: Path) -> int:
    """The iteration of ``run_dir``'s last checkpoint (-1 if there is none yet)."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.exists():
        return -1
    return int(load_checkpoint(path)["iteration"])


def kfcrun_lines(stderr: str) -> list[str]:
    """The ``kfcrun: ...`` lines of a command's stderr."""
    return [line for line in stderr.splitlines() if line.startswith("kfcrun:")]
