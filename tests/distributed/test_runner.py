"""The runner on 2 gloo ranks: one writer, a common stop, resume on the same or another world size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kfcrun.checkpoint import load_checkpoint
from kfcrun.train import train
from tests.distributed.runner_workers import train_ranks
from tests.helpers.runs import KFC_TINY, TINY, smoke_config


def _yaml(cache_dir: Path, *overrides: str) -> str:
    return OmegaConf.to_yaml(smoke_config(cache_dir, *TINY, "trainer.threads=1", *overrides))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_only_rank_0_writes_and_resume_on_the_same_world_size_is_exact(tmp_path: Path, cache_dir: Path):
    kfc = [*KFC_TINY, "optimizer.grad_worker_fraction=0"]
    # 2 ranks to iteration 4 in one go ...
    straight = tmp_path / "straight"
    outcome = train_ranks(2, _yaml(cache_dir, *kfc), straight, tmp_path / "o1")
    assert [r["outcome"] for r in outcome] == ["done", "done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o1", "straight"]  # rank 1 made no directory
    assert {"config.yaml", "run.json", "metrics.jsonl", "checkpoints/last.pt"} <= _files(straight)
    assert json.loads((straight / "run.json").read_text())["world_size"] == 2
    # ... equals 2 ranks to iteration 2, then resume= on 2 ranks to 4, bit for bit
    split = tmp_path / "split"
    train_ranks(2, _yaml(cache_dir, *kfc, "trainer.max_iters=2"), split, tmp_path / "o2")
    resumed = _yaml(cache_dir, *kfc, f"resume={split}")
    assert [r["outcome"] for r in train_ranks(2, resumed, split, tmp_path / "o3")] == ["done", "done"]
    a, b = load_checkpoint(straight / "checkpoints/last.pt"), load_checkpoint(split / "checkpoints/last.pt")
    assert a["iteration"] == b["iteration"] == 4
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    # the checkpoint holds every layer's inverse once, although each rank kept only its own
    layers = a["optimizer"]["curvature"]["layers"]
    assert all(state["omega_inv"] is not None for state in layers.values())


@pytest.mark.slow
def test_resume_on_another_world_size_works_and_says_so(tmp_path: Path, cache_dir: Path, caplog):
    run = tmp_path / "run"
    train_ranks(2, _yaml(cache_dir, *KFC_TINY, "trainer.max_iters=2"), run, tmp_path / "o")
    cfg = smoke_config(cache_dir, *TINY, *KFC_TINY, f"resume={run}")
    with caplog.at_level("WARNING"):
        train(cfg, run)
    assert load_checkpoint(run / "checkpoints/last.pt")["iteration"] == 4
    assert any("not bit-identical" in r.getMessage() for r in caplog.records)


def test_a_nonfinite_loss_on_one_rank_stops_both(tmp_path: Path, cache_dir: Path):
    run = tmp_path / "run"
    yaml = _yaml(cache_dir, "trainer.max_iters=8", "trainer.log_every=2")
    outcome = train_ranks(2, yaml, run, tmp_path / "o", nan_at=5)
    assert [r["outcome"] for r in outcome] == ["TrainingDivergedError"] * 2
    assert outcome[0]["message"] == outcome[1]["message"]
    assert "iteration 5" in outcome[0]["message"]
    assert load_checkpoint(run / "checkpoints/last.pt")["iteration"] == 4  # the last good one stays


def test_batchnorm_runs_on_two_ranks(tmp_path: Path, cache_dir: Path):
    """BN normalizes by each rank's batch statistics, so this is not the 1-process run (documented)."""
    run = tmp_path / "run"
    outcome = train_ranks(2, _yaml(cache_dir, *KFC_TINY, "model.batch_norm=true"), run, tmp_path / "o")
    assert [r["outcome"] for r in outcome] == ["done", "done"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == 4 and all(v == v for v in rows[-1].values() if isinstance(v, float))
