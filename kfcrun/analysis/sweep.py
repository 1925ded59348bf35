"""The table of a Hydra sweep's jobs, with the best one by final training error (paper Sec. 5.2).

The paper tuned each method's learning rate over {0.3, 0.1, 0.03, ..., 0.0003} on
TRAINING error; this table lists every job of such a sweep (its overrides, learning rate,
final training error / NLL and test error of the averaged parameters, iterations and
training wall-clock) and marks the job with the lowest final training error. A job is
*failed* if its directory holds an ``error.txt`` (the runner's one-line message) or its
``metrics.jsonl`` has no rows; failed jobs are listed but never chosen as best.

CLI (``scripts/sweep_table.py``)::

    sweep_table.py SWEEP_DIR [--metric train/error] [--markdown table.md] [--json table.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kfcrun.analysis.report import markdown_table
from kfcrun.analysis.runs import (
    CONFIG_FILE,
    ERROR_FILE,
    METRICS_FILE,
    AnalysisError,
    Run,
    best_run,
    is_run_dir,
    load_config,
    natural_key,
    read_error,
    to_float,
)
from kfcrun.logging import read_metrics

HYDRA_DIR = ".hydra"


@dataclass
class Job:
    """One job directory of a sweep (possibly failed: then ``run.rows`` may be empty).

    ``overrides`` are the job's command-line overrides (``.hydra/overrides.yaml``, or
    the directory name after ``<num>-`` when that file is missing).
    """

    run: Run
    overrides: list[str]

    @property
    def failure(self) -> str | None:
        """Why the job counts as failed (its error message, or "no metrics rows"); ``None`` if it did not."""
        if self.run.error:
            return self.run.error
        if not self.run.rows:
            return "no metrics rows (failed before the first evaluation, or not started)"
        return None


def find_job_dirs(sweep: Path) -> list[Path]:
    """Job directories below ``sweep``, in natural order (so job 2 precedes job 10).

    A job directory is one holding ``metrics.jsonl``, ``config.yaml``, ``error.txt`` or a
    ``.hydra/`` directory.
    """
    found: set[Path] = set()
    for marker in (METRICS_FILE, CONFIG_FILE, ERROR_FILE):
        for path in sweep.rglob(marker):
            parent = path.parent
            found.add(parent.parent if parent.name == HYDRA_DIR else parent)
    for path in sweep.rglob(HYDRA_DIR):
        if path.is_dir():
            found.add(path.parent)
    found.discard(sweep)
    return sorted(found, key=natural_key)


def _job_overrides(job_dir: Path) -> list[str]:
    file = job_dir / HYDRA_DIR / "overrides.yaml"
    if file.is_file():
        loaded = OmegaConf.to_container(OmegaConf.load(file))
        if isinstance(loaded, list):
            return [str(o) for o in loaded]
    num, sep, rest = job_dir.name.partition("-")
    return [rest] if sep and num.isdigit() and rest else [job_dir.name]


def load_job(job_dir: Path, sweep: Path) -> Job:
    """One job of ``sweep``, read from ``job_dir``.

    The job holds its resolved ``config.yaml`` (else the unresolved ``.hydra/config.yaml``,
    else ``{}``), metrics rows, ``error.txt`` message and overrides.
    """
    config: dict[str, Any] = {}
    for candidate in (job_dir / CONFIG_FILE, job_dir / HYDRA_DIR / CONFIG_FILE):
        if candidate.is_file():
            config = load_config(candidate)
            break
    rows = read_metrics(job_dir) if (job_dir / METRICS_FILE).is_file() else []
    run = Run(path=job_dir, config=config, rows=rows, error=read_error(job_dir), sweep=sweep)
    return Job(run=run, overrides=_job_overrides(job_dir))


def load_sweep(sweep: str | Path) -> list[Job]:
    """Every job of a sweep directory. Raises :class:`AnalysisError` if there is none."""
    sweep = Path(sweep)
    if not sweep.is_dir():
        raise AnalysisError(f"{sweep} is not a directory")
    if is_run_dir(sweep):
        raise AnalysisError(f"{sweep} is a single run directory, not a sweep (multirun) directory")
    jobs = [load_job(d, sweep) for d in find_job_dirs(sweep)]
    if not jobs:
        raise AnalysisError(f"no job directories found in {sweep} (expected <sweep>/<num>-<overrides>/)")
    return jobs


def best_job(jobs: Sequence[Job], metric: str = "train/error") -> Job | None:
    """The job with the lowest final ``metric`` among those that did not fail and have a finite value."""
    ok = [j for j in jobs if j.failure is None and math.isfinite(j.run.final(metric))]
    if not ok:
        return None
    best = best_run([j.run for j in ok], metric)
    return next(j for j in ok if j.run is best)


def varying_overrides(jobs: Sequence[Job]) -> list[list[str]]:
    """Each job's overrides without those shared by every job (all of them if every job has the same)."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    out = [[o for o in j.overrides if o not in common] for j in jobs]
    return out if any(out) else [list(j.overrides) for j in jobs]


def sweep_rows(jobs: Sequence[Job], metric: str = "train/error") -> list[dict[str, Any]]:
    """One dict per job, the rows of the sweep table.

    Keys: ``job``, ``overrides``, ``lr``, ``train_error``, ``train_nll``, ``test_error``,
    ``iters``, ``train_time_s`` (finals, NaN/None when absent), ``status`` ("ok" or
    "failed: ..."), ``best`` (lowest final ``metric``) and ``path``.
    """
    best = best_job(jobs, metric)
    rows = []
    for job, overrides in zip(jobs, varying_overrides(jobs), strict=True):
        run = job.run
        lr = run.lr
        if lr is None:  # a job that failed before writing config.yaml: read it off the overrides
            lr = next(
                (to_float(o.split("=", 1)[1]) for o in job.overrides if o.startswith("optimizer.lr=")), None
            )
        failure = job.failure
        num, sep, _ = run.path.name.partition("-")
        rows.append(
            {
                "job": num if sep and num.isdigit() else run.path.name,
                "overrides": " ".join(overrides),
                "lr": lr,
                # None: nothing was logged; NaN: logged as non-finite (a diverged evaluation)
                "train_error": run.final("train/error") if run.rows else None,
                "train_nll": run.final("train/nll") if run.rows else None,
                "test_error": run.final("test/error") if run.rows else None,
                "iters": run.final_iter if run.rows else None,
                "train_time_s": run.final_train_time_s if run.rows else None,
                "status": "ok" if failure is None else f"failed: {failure}",
                "best": job is best,
                "path": str(run.path),
            }
        )
    return rows


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if kind == "pct":
        return f"{100 * value:.2f}%"
    if kind == "nll":
        return f"{value:.4f}"
    if kind == "min":
        return f"{value / 60:.2f}"
    if kind == "lr":
        return f"{value:g}"
    return str(value)


COLUMNS = (
    ("best", "best", "best"),
    ("job", "job", "str"),
    ("overrides", "overrides", "str"),
    ("lr", "lr", "lr"),
    ("train error", "train_error", "pct"),
    ("train NLL", "train_nll", "nll"),
    ("test error", "test_error", "pct"),
    ("iters", "iters", "str"),
    ("train time (min)", "train_time_s", "min"),
    ("status", "status", "str"),
)


def table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells; the best job is marked ``*`` in the first column."""
    headers = [c[0] for c in COLUMNS]
    cells = [
        [("*" if row["best"] else "") if kind == "best" else _fmt(row[key], kind) for _, key, kind in COLUMNS]
        for row in rows
    ]
    return headers, cells


def text_table(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``sweep_table.py`` (sweep directory, metric, markdown/JSON outputs)."""
    parser = argparse.ArgumentParser(
        prog="sweep_table.py",
        description="Table of a sweep's jobs (overrides, lr, final errors, iterations, training time); marks "
        "the best job by final training error (the paper's protocol, Sec. 5.2) and lists failed jobs.",
    )
    parser.add_argument("sweep", type=Path, help="a Hydra multirun (sweep) directory")
    parser.add_argument("--metric", default="train/error", help="final metric that picks the best job")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``sweep_table.py`` entry point: prints the table and the best job's run dir; returns the rows."""
    args = build_parser().parse_args(argv)
    try:
        jobs = load_sweep(args.sweep)
    except AnalysisError as err:
        raise SystemExit(f"sweep_table: {err}") from None
    rows = sweep_rows(jobs, args.metric)
    headers, cells = table_cells(rows)
    failed = sum(row["status"] != "ok" for row in rows)
    print(f"sweep {args.sweep}: {len(rows)} job(s), {failed} failed")
    print(text_table(headers, cells))
    best = next((row for row in rows if row["best"]), None)
    if best is None:
        print(f"best: none (no job finished with a finite final {args.metric})")
    else:
        print(f"best (lowest final {args.metric}): {best['path']}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        best_line = f"Best (lowest final {args.metric}): `{best['path']}`" if best else "Best: none"
        args.markdown.write_text(f"Sweep `{args.sweep}`\n\n{markdown_table(headers, cells)}\n\n{best_line}\n")
        print(f"wrote {args.markdown}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"sweep": str(args.sweep), "metric": args.metric, "jobs": [_json_safe(r) for r in rows]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return rows
