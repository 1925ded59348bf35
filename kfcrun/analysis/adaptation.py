"""Figure of an optimizer's per-step statistics over a run: K-FAC's adapted values (paper App. A.2).

The runner logs :meth:`~kfcrun.optim.protocol.TrainingOptimizer.step_stats` to TensorBoard
every ``trainer.log_every`` iterations as ``kfc/<name>`` scalars (with ``log_every=1``, every
step). This module reads them back from ``<run>/tensorboard`` and draws one panel per
statistic against the iteration, one line per run: for K-FAC ``alpha``, ``mu``, ``lambda``,
``damping`` (``gamma``), ``rho`` and ``m_decrease`` (the decrease ``M(theta) - M(theta + delta)``
the quadratic model predicts); for KFC-pre e.g. ``nu`` and ``clip_factor``. Quantities that
span decades (``lambda``, ``gamma``, ``m_decrease``, ``nu``) get a log axis. The paper says of
its CIFAR-10 runs that "the adaptation methods tended to choose stable values" (Sec. 3.2).

CLI (``scripts/plot_adaptation.py``)::

    plot_adaptation.py RUN_DIR... [--stats alpha mu lambda damping rho m_decrease] [--out adaptation.png]
                       [--labels NAME...] [--smooth 1]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kfcrun.analysis.runs import AnalysisError

#: K-FAC's adapted values, the default panels.
KFAC_STATS = ("alpha", "mu", "lambda", "damping", "rho", "m_decrease")
#: Statistics drawn on a log axis (positive, spanning decades).
LOG_STATS = {"lambda", "damping", "damping_ceiling", "m_decrease", "h_decrease", "nu", "pi_mean"}
#: Panel titles.
TITLES = {
    "alpha": "alpha (step size)",
    "mu": "mu (momentum)",
    "lambda": "lambda (trust region)",
    "damping": "gamma (damping)",
    "damping_ceiling": "gamma ceiling",
    "rho": "rho (reduction ratio)",
    "m_decrease": "M(theta) - M(theta + delta)",
    "h_decrease": "h(theta) - h(theta + delta)",
    "nu": "nu",
    "clip_factor": "clip factor",
}
PREFIX = "kfc/"


def read_step_stats(run_dir: str | Path, stats: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{stat: (iterations, values)}`` from ``<run>/tensorboard``; stats the run did not log are left out.

    A step logged twice (a resumed run rewrites the steps after its checkpoint) keeps its last value.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events_dir = Path(run_dir) / "tensorboard"
    if not events_dir.is_dir():
        raise AnalysisError(f"{run_dir} has no tensorboard/ directory (was logger.tensorboard=false?)")
    events = EventAccumulator(str(events_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    out = {}
    for stat in stats:
        if PREFIX + stat not in tags:
            continue
        by_step = {e.step: e.value for e in events.Scalars(PREFIX + stat)}
        steps = np.array(sorted(by_step), dtype=float)
        out[stat] = (steps, np.array([by_step[int(s)] for s in steps], dtype=float))
    return out


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over ``window`` points (fewer at the start); non-finite values are skipped."""
    if window <= 1:
        return values
    out = np.empty_like(values)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        out[i] = chunk.mean() if chunk.size else math.nan
    return out


def plot_adaptation(
    runs: Sequence[str | Path],
    out: str | Path,
    stats: Sequence[str] = KFAC_STATS,
    labels: Sequence[str] | None = None,
    smooth: int = 1,
) -> Path:
    """Draw ``stats`` of every run against the iteration into ``out`` (PNG); returns the path."""
    if labels is not None and len(labels) != len(runs):
        raise AnalysisError(f"{len(labels)} labels for {len(runs)} runs")
    series = [read_step_stats(run, stats) for run in runs]
    shown = [s for s in stats if any(s in run_series for run_series in series)]
    if not shown:
        raise AnalysisError(f"none of {', '.join(stats)} was logged by {', '.join(map(str, runs))}")
    columns = min(3, len(shown))
    rows = math.ceil(len(shown) / columns)
    fig = Figure(figsize=(4.2 * columns, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, stat in zip(axes, shown, strict=False):
        for index, run_series in enumerate(series):
            if stat not in run_series:
                continue
            steps, values = run_series[stat]
            label = labels[index] if labels is not None else Path(runs[index]).name
            ax.plot(steps, moving_average(values, smooth), lw=1.0, label=label)
        if stat in LOG_STATS:
            ax.set_yscale("log")
        if stat == "rho":
            for level in (0.25, 0.75):
                ax.axhline(level, color="grey", lw=0.6, ls="--")
        ax.set_title(TITLES.get(stat, stat), fontsize=10)
        ax.set_xlabel("iteration")
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``plot_adaptation.py`` command line."""
    parser = argparse.ArgumentParser(
        prog="plot_adaptation.py",
        description="Per-step optimizer statistics (K-FAC's adapted alpha, mu, lambda, gamma, rho).",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with tensorboard/)")
    parser.add_argument("--stats", nargs="+", default=list(KFAC_STATS), help="kfc/<name> scalars to draw")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving average over this many steps")
    parser.add_argument("--out", type=Path, default=Path("adaptation.png"))
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """``plot_adaptation.py`` entry point."""
    args = build_parser().parse_args(argv)
    try:
        path = plot_adaptation(args.runs, args.out, args.stats, args.labels, args.smooth)
    except AnalysisError as err:
        raise SystemExit(f"plot_adaptation: {err}") from None
    print(f"plot_adaptation: wrote {path}")
    return path
