"""Every experiment config runs end to end, shrunk to a smoke-sized job on generated data."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kfcrun.cli import _compose, _validate
from kfcrun.logging import read_metrics
from kfcrun.train import train
from tests.helpers.configs import EXPERIMENTS

#: The shrunk job: configs/debug/fast.yaml (generated data, 3 iterations, tiny evaluation).
SHRINK = ["+debug=fast"]

#: Full-width ResNet-18 jobs invert 4608 x 4608 factors even when shrunk: slow here; the default
#: suite runs them at width 4 (tests/test_runner_modern.py).
CASES = [pytest.param(e, marks=pytest.mark.slow) if "resnet18" in e else e for e in EXPERIMENTS]


@pytest.mark.parametrize("experiment", CASES)
def test_experiment_runs_when_shrunk(experiment: str, tmp_path: Path, cache_dir: Path):
    full = _compose([f"experiment={experiment}"])
    cfg = _compose([f"experiment={experiment}", *SHRINK, f"dataset.cache_dir={cache_dir}"])
    _validate(cfg)
    plain = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"})
    # the shrunk job keeps everything that defines the experiment
    assert plain.name == full.name and plain.model == full.model and plain.optimizer == full.optimizer
    assert plain.dataset.name == "synthetic" and plain.trainer.max_iters == 3
    row = train(plain, tmp_path)
    assert row["iter"] == 3 and read_metrics(tmp_path)[-1]["iter"] == 3
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
