"""Generated run and sweep directories for the analysis tests (no training involved).

A fake run is what ``kfcrun.train.train`` leaves behind: ``config.yaml`` (the resolved
config, with the keys the analysis reads) and ``metrics.jsonl`` (one row per evaluation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf


def config(
    name: str,
    optimizer: str = "sgd",
    lr: float | None = 0.01,
    seed: int = 0,
    dataset: str = "cifar10",
    batch_norm: bool = False,
    batch_size: int = 128,
    device: str = "cpu",
) -> dict[str, Any]:
    """A resolved run config with the keys the analysis reads (and a few it must ignore)."""
    opt: dict[str, Any] = {"name": optimizer, "lr": lr, "momentum": 0.9}
    if optimizer == "kfc_pre":
        opt |= {"approx": "kfc", "damping": 1e-3}
    return {
        "task": "train",
        "name": name,
        "seed": seed,
        "resume": None,
        "dataset": {"name": dataset, "root": f"/data/{dataset}"},
        "model": {"name": "cuda_convnet", "batch_norm": batch_norm, "pooling": "paper"},
        "optimizer": opt,
        "trainer": {"batch_size": batch_size, "max_iters": 1000, "device": device},
    }


def rows(
    iters: Sequence[int],
    times: Sequence[float],
    train_error: Sequence[float | str],
    test_error: Sequence[float | str] | None = None,
    train_nll: Sequence[float | str] | None = None,
    test_nll: Sequence[float | str] | None = None,
) -> list[dict[str, Any]]:
    """Evaluation rows; unspecified metrics default to simple functions of the training error."""
    test_error = test_error if test_error is not None else [_shift(e, 0.05) for e in train_error]
    train_nll = train_nll if train_nll is not None else [_shift(e, 0.5) for e in train_error]
    test_nll = test_nll if test_nll is not None else [_shift(e, 0.7) for e in train_error]
    out = []
    for i, it in enumerate(iters):
        out.append(
            {
                "iter": it,
                "examples": it * 128,
                "epoch": it / 390,
                "train_time_s": times[i],
                "elapsed_s": 1.5 * times[i],
                "train/nll": train_nll[i],
                "train/error": train_error[i],
                "test/nll": test_nll[i],
                "test/error": test_error[i],
                "train/error_current": train_error[i],
            }
        )
    return out


def _shift(value: float | str, by: float) -> float | str:
    return value if isinstance(value, str) else value + by


def write_run(
    path: Path,
    cfg: dict[str, Any] | None,
    metric_rows: Sequence[dict[str, Any]] | None,
    error: str | None = None,
    overrides: Sequence[str] | None = None,
) -> Path:
    """Write a run/job directory: ``config.yaml`` (if ``cfg``), ``metrics.jsonl`` (if ``metric_rows``
    is not None; may be empty), ``error.txt`` (if ``error``) and ``.hydra/overrides.yaml``."""
    path.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        OmegaConf.save(OmegaConf.create(cfg), path / "config.yaml")
    if metric_rows is not None:
        with (path / "metrics.jsonl").open("w") as f:
            for row in metric_rows:
                f.write(json.dumps(row) + "\n")
    if error is not None:
        (path / "error.txt").write_text(error + "\n")
    if overrides is not None:
        (path / ".hydra").mkdir(exist_ok=True)
        OmegaConf.save(OmegaConf.create(list(overrides)), path / ".hydra" / "overrides.yaml")
    return path


def write_sweep(root: Path, jobs: Sequence[tuple[dict[str, Any] | None, Any, str | None, list[str]]]) -> Path:
    """A Hydra multirun directory: ``multirun.yaml`` and job dirs ``<num>-<overrides>``.

    ``jobs``: ``(config, rows, error, overrides)`` per job, numbered in order.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "multirun.yaml").write_text("hydra:\n  mode: MULTIRUN\n")
    for num, (cfg, metric_rows, error, overrides) in enumerate(jobs):
        write_run(root / f"{num}-{','.join(overrides)}", cfg, metric_rows, error=error, overrides=overrides)
    return root


# A typical pair (seconds, iterations): SGD reaches 30% training error at 600 s / 3000
# iterations, KFC-pre at 200 s / 150 iterations; only KFC-pre reaches 10%.
SGD_ROWS = rows(
    iters=[1000, 2000, 3000, 4000],
    times=[200.0, 400.0, 600.0, 800.0],
    train_error=[0.6, 0.4, 0.3, 0.2],
    test_error=[0.62, 0.45, 0.35, 0.28],
)
KFC_ROWS = rows(
    iters=[50, 100, 150, 200],
    times=[70.0, 140.0, 200.0, 280.0],
    train_error=[0.5, 0.35, 0.25, 0.08],
    test_error=[0.55, 0.4, 0.3, 0.21],
)
