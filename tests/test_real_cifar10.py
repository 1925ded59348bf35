"""Short training runs on the real CIFAR-10 images (minutes on a CPU: marked slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfcrun.logging import read_metrics
from tests.conftest import SHARED_CIFAR10, requires_shared_cifar10, run_cli

pytestmark = [pytest.mark.slow, requires_shared_cifar10]


def test_sgd_learns_cifar10_in_200_iterations(tmp_path: Path, cache_dir: Path):
    run = tmp_path / "sgd"
    result = run_cli(
        [
            "experiment=cifar10_sgd",
            f"dataset.root={SHARED_CIFAR10}",
            "trainer.max_iters=200",
            "trainer.eval_every=200",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        cache=cache_dir,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    final = read_metrics(run)[-1]
    assert final["iter"] == 200
    assert final["test/error_current"] < 0.75  # chance is 0.90
    assert final["test/error"] < 0.85  # the average still carries the initial weights


def test_kfc_pre_beats_sgd_per_iteration_at_batch_512(tmp_path: Path, cache_dir: Path):
    """The claim of paper Sec. 5.3 in miniature: same batch size, same iterations."""
    common = [
        f"dataset.root={SHARED_CIFAR10}",
        "trainer.max_iters=100",
        "trainer.eval_every=100",
        "trainer.batch_size=512",
        "trainer.train_eval_size=5000",
        "trainer.checkpoint_every=null",
    ]
    results = {}
    for name, extra in (
        ("sgd", ["experiment=cifar10_sgd", "optimizer.lr=0.01"]),
        ("kfc", ["experiment=cifar10_kfc", "optimizer.init_examples=2048"]),
    ):
        run = tmp_path / name
        done = run_cli([*extra, *common, f"hydra.run.dir={run}"], cwd=tmp_path, cache=cache_dir, timeout=1800)
        assert done.returncode == 0, done.stderr
        results[name] = read_metrics(run)[-1]
    assert results["kfc"]["train/nll_current"] < results["sgd"]["train/nll_current"] - 0.1
