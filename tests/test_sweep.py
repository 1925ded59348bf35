"""Multirun sweeps: one directory per job, the objective returned to sweepers, failures reported."""

from __future__ import annotations

import math
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict

from kfcrun.cli import _compose, run_task
from kfcrun.logging import read_metrics
from tests.conftest import run_cli

FAST = [
    "trainer.max_iters=4",
    "trainer.eval_every=4",
    "trainer.train_eval_size=64",
    "trainer.checkpoint_every=null",
]


def test_sweep_gives_each_job_its_own_directory_and_reports_failures(tmp_path: Path, cache_dir: Path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        ["-m", "experiment=smoke", *FAST, "optimizer.lr=0.003,1e12", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        cache=cache_dir,
    )
    assert result.returncode == 1, result.stderr
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    assert read_metrics(jobs[0])[-1]["iter"] == 4  # the good job finished
    assert "training loss became" in (jobs[1] / "error.txt").read_text()
    assert "1 sweep job(s) failed" in result.stderr and str(jobs[1]) in result.stderr
    assert (jobs[0] / ".hydra" / "overrides.yaml").read_text().count("optimizer.lr=0.003") == 1


def test_job_returns_its_objective(tmp_path: Path, cache_dir: Path):
    cfg = _compose(
        [
            "experiment=smoke",
            *FAST,
            f"dataset.cache_dir={cache_dir}",
            "trainer.progress=false",
            "objective=test/error",
        ]
    )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    value = run_task(cfg)
    assert value is not None and not math.isnan(value)
    assert value == read_metrics(tmp_path)[-1]["test/error"]
