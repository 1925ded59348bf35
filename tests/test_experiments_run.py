"""Every experiment config runs end to end, shrunk to a smoke-sized job on generated data."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kfcrun.cli import _compose, _validate
from kfcrun.logging import read_metrics
from kfcrun.train import train
from tests.test_config import EXPERIMENTS

SHRINK = [
    "dataset=synthetic",
    "dataset.num_train=96",
    "dataset.num_test=32",
    "trainer.batch_size=16",
    "trainer.max_iters=3",
    "trainer.max_epochs=null",
    "trainer.eval_every=3",
    "trainer.train_eval_size=32",
    "trainer.eval_batch_size=32",
    "trainer.checkpoint_every=3",
    "trainer.device=cpu",
    "trainer.progress=false",
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_when_shrunk(experiment: str, tmp_path: Path, cache_dir: Path):
    full = _compose([f"experiment={experiment}"])
    extra = ["optimizer.init_examples=32"] if full.optimizer.name == "kfc_pre" else []
    cfg = _compose([f"experiment={experiment}", *SHRINK, *extra, f"dataset.cache_dir={cache_dir}"])
    _validate(cfg)
    plain = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"})
    # the shrunk job keeps everything that defines the experiment
    assert plain.name == full.name and plain.model == full.model
    shrunk_opt, full_opt = dict(plain.optimizer), dict(full.optimizer)
    shrunk_opt.pop("init_examples", None), full_opt.pop("init_examples", None)
    assert shrunk_opt == full_opt
    row = train(plain, tmp_path)
    assert row["iter"] == 3 and read_metrics(tmp_path)[-1]["iter"] == 3
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
