#!/usr/bin/env python
"""Runs with the same training-time budget side by side: metrics per iteration and per second.

For each run directory (``metrics.jsonl``: one row per evaluation), prints two markdown
tables and writes them with ``--out``:

* per iteration: at every evaluated iteration that all runs reached, the chosen metrics of
  each run (so the comparison at equal steps does not depend on machine load);
* with ``--batch-loss``, every logged iteration's mini-batch loss (``train/batch_loss``,
  read from the run's TensorBoard events; log it every step with ``trainer.log_every=1``);
  runs with the same seed see the same (augmented) batches, so these are paired;
* per second of training time (``train_time_s``, which excludes evaluation and logging): at
  every ``--every`` seconds up to the shortest run's last evaluation, each run's most recent
  evaluation at or before that time (its iteration in brackets).

Example::

    python scripts/budget_table.py outputs/resnet18_cpu/<stamp>/sgd outputs/resnet18_cpu/<stamp>/kfc \\
        --every 120 --out table.md
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from kfcrun.analysis.runs import cfg_get, to_float
from kfcrun.logging import METRICS_FILE, read_metrics

DEFAULT_METRICS = ("train/nll", "train/error", "test/error")


def label(run: Path) -> str:
    """The run's optimizer and lr, e.g. ``kfc_pre lr=0.1`` (the directory name if no config)."""
    from omegaconf import OmegaConf

    config_file = run / "config.yaml"
    if not config_file.exists():
        return run.name
    config: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(config_file))  # type: ignore[assignment]
    return f"{cfg_get(config, 'optimizer.name', run.name)} lr={cfg_get(config, 'optimizer.lr')}"


def fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def per_iteration(runs: dict[str, list[dict]], metrics: tuple[str, ...]) -> list[list[str]]:
    by_iter = [{int(r["iter"]): r for r in rows} for rows in runs.values()]
    common = sorted(set.intersection(*(set(b) for b in by_iter)))
    return [[str(it), *(fmt(to_float(b[it].get(m))) for b in by_iter for m in metrics)] for it in common]


def per_second(runs: dict[str, list[dict]], metrics: tuple[str, ...], every: float) -> list[list[str]]:
    end = min(to_float(rows[-1]["train_time_s"]) for rows in runs.values())
    out = []
    t = every
    while t <= end + 1e-9:
        row = [f"{t:.0f}"]
        for rows in runs.values():
            seen = [r for r in rows if to_float(r["train_time_s"]) <= t]
            if not seen:
                row += ["-"] * len(metrics)
                continue
            last = seen[-1]
            row += [f"{fmt(to_float(last.get(m)))} ({int(last['iter'])})" for m in metrics]
        out.append(row)
        t += every
    return out


def batch_losses(run: Path) -> dict[int, float]:
    """``iteration -> train/batch_loss`` from the run's TensorBoard events (empty if not logged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not (run / "tensorboard").is_dir():
        return {}
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/batch_loss" not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars("train/batch_loss")}


def batch_loss_rows(runs: list[Path]) -> list[list[str]]:
    losses = [batch_losses(r) for r in runs]
    common = sorted(set.intersection(*(set(b) for b in losses))) if losses else []
    return [[str(it), *(f"{b[it]:.3f}" for b in losses)] for it in common]


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--every", type=float, default=60.0, help="seconds between rows of the time table")
    parser.add_argument("--batch-loss", action="store_true", help="also each step's mini-batch loss")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    labels = [label(r) for r in args.runs]
    if len(set(labels)) < len(labels):  # same optimizer and lr (e.g. 1 process vs P ranks): say which run
        labels = [f"{name} [{r.name}]" for name, r in zip(labels, args.runs, strict=True)]
    runs = {name: read_metrics(r / METRICS_FILE) for name, r in zip(labels, args.runs, strict=True)}
    empty = [name for name, rows in runs.items() if not rows]
    if empty:
        parser.error(f"no evaluations in {', '.join(empty)}; fix: let the runs evaluate at least once")
    metrics = tuple(args.metrics)
    cols = [f"{name}: {m}" for name in runs for m in metrics]
    parts = [
        "Per iteration (same evaluated iterations):",
        table(["iter", *cols], per_iteration(runs, metrics)),
        "",
        f"Per second of training time (every {args.every:.0f} s; last evaluation by then, its iteration):",
        table(["train s", *cols], per_second(runs, metrics, args.every)),
        "",
        "End of budget:",
        table(
            ["run", "iters", "train s", *metrics],
            [
                [
                    name,
                    str(int(rows[-1]["iter"])),
                    f"{to_float(rows[-1]['train_time_s']):.0f}",
                    *(fmt(to_float(rows[-1].get(m))) for m in metrics),
                ]
                for name, rows in runs.items()
            ],
        ),
    ]
    if args.batch_loss:
        parts += ["", "Mini-batch loss per iteration:", table(["iter", *runs], batch_loss_rows(args.runs))]
    text = "\n".join(parts)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
