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


def is_slow(experiment: str) -> bool:
    """Whether the shrunk job takes a minute or more on a 2-core CPU.

    Full-width ResNet-18 jobs invert 4608 x 4608 factors even when shrunk (the default suite runs
    them at width 4, tests/test_runner_modern.py); the SVHN network's KFC-pre and K-FAC jobs fit
    fc1's 4097 x 4097 factor (55-140 s each). Every experiment still composes and validates in the
    default suite (:func:`test_experiment_composes_and_shrinks`), and the same blocks and optimizers
    run there on the cuda-convnet experiments.
    """
    return "resnet18" in experiment or (experiment.startswith("svhn") and "sgd" not in experiment)


def shrunk_config(experiment: str, cache_dir: Path):
    """The experiment shrunk by +debug=fast, validated, without Hydra's own node."""
    full = _compose([f"experiment={experiment}"])
    cfg = _compose([f"experiment={experiment}", *SHRINK, f"dataset.cache_dir={cache_dir}"])
    _validate(cfg)
    plain = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"})
    # the shrunk job keeps everything that defines the experiment
    assert plain.name == full.name and plain.model == full.model and plain.optimizer == full.optimizer
    assert plain.dataset.name == "synthetic" and plain.trainer.max_iters == 3
    return plain


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_shrinks(experiment: str, cache_dir: Path):
    shrunk_config(experiment, cache_dir)


@pytest.mark.parametrize(
    "experiment", [pytest.param(e, marks=pytest.mark.slow) if is_slow(e) else e for e in EXPERIMENTS]
)
def test_experiment_runs_when_shrunk(experiment: str, tmp_path: Path, cache_dir: Path):
    plain = shrunk_config(experiment, cache_dir)
    row = train(plain, tmp_path)
    assert row["iter"] == 3 and read_metrics(tmp_path)[-1]["iter"] == 3
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
