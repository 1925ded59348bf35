"""Loading finished (or running) training runs for tables and figures.

A *run directory* is one written by a ``kfcrun task=train`` run: it holds the
resolved config in ``config.yaml`` and one row per evaluation in ``metrics.jsonl``
(see :mod:`kfcrun.logging.metrics` for the fields). A *sweep directory* is a Hydra
multirun directory: a ``multirun.yaml`` and one job directory per job, e.g.
``<sweep>/0-optimizer.lr=0.1/``; a job that failed has an ``error.txt`` holding its
one-line message. Everything here reads those files only (never TensorBoard).

Conventions used by every analysis module:

* metric values are floats; ``"nan"``/``"inf"`` strings (JSON has no NaN) become
  ``float("nan")``/``float("inf")``, and a metric missing from a row is NaN;
* the *final* value of a metric is its value in the LAST row (the last evaluation);
* the *best* run is the one with the lowest final TRAINING error, the paper's
  protocol for tuning learning rates (Sec. 5.2).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf

from kfcrun.logging import METRICS_FILE, read_metrics

#: Whatever :func:`group_by` groups (runs, or groups of runs).
_T = TypeVar("_T")

CONFIG_FILE = "config.yaml"
ERROR_FILE = "error.txt"
MULTIRUN_FILE = "multirun.yaml"

#: Display names of ``optimizer.name``.
OPTIMIZER_LABELS = {"sgd": "SGD", "kfc_pre": "KFC-pre", "kfac": "K-FAC"}

#: Config keys that do not change what a run computes (where the data lives, devices,
#: progress bars, resuming); two runs that differ only in these and ``seed`` are
#: repetitions of the same experiment.
NON_SEMANTIC_KEYS = (
    "seed",
    "resume",
    "checkpoint",
    "dataset.root",
    "dataset.download",
    "dataset.cache_dir",
    "dataset.format",
    "trainer.device",
    "trainer.threads",
    "trainer.progress",
    "trainer.checkpoint_every",
    "trainer.log_every",
    "logger",
)


class AnalysisError(ValueError):
    """A problem with the analysis inputs (no runs found, unknown run name); ``str`` is one line."""


def to_float(value: Any) -> float:
    """A metric value as a float: JSON strings ``"nan"``/``"inf"``/``"-inf"`` and ``None`` become NaN/inf."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def cfg_get(config: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``dotted="a.b"``, or ``default`` if any level is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and other leaves are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


@dataclass
class Run:
    """One run directory.

    Attributes:
        path: the run directory.
        config: the resolved config (``<run>/config.yaml``) as a plain nested dict.
        rows: the evaluation rows of ``<run>/metrics.jsonl``, in file order.
        error: the one-line message in ``<run>/error.txt`` (a failed sweep job), else ``None``.
        sweep: the sweep directory the run was found under (``None`` for a run passed directly).
    """

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    sweep: Path | None = None

    # --- config shortcuts ----------------------------------------------------------------
    @property
    def name(self) -> str:
        """Experiment name (config ``name``, e.g. ``cifar10_kfc``)."""
        return str(self.config.get("name", self.path.name))

    @property
    def seed(self) -> Any:
        """The config's ``seed`` (``None`` if the config has none)."""
        return self.config.get("seed")

    @property
    def optimizer(self) -> str:
        """The config's ``optimizer.name`` (e.g. ``sgd``, ``kfc_pre``), ``"?"`` if missing."""
        return str(cfg_get(self.config, "optimizer.name", "?"))

    @property
    def dataset(self) -> str:
        """The config's ``dataset.name`` (e.g. ``cifar10``), ``"?"`` if missing."""
        return str(cfg_get(self.config, "dataset.name", "?"))

    @property
    def batch_size(self) -> int | None:
        """The config's ``trainer.batch_size`` (examples per mini-batch), ``None`` if missing."""
        return cfg_get(self.config, "trainer.batch_size")

    @property
    def lr(self) -> float | None:
        """The config's ``optimizer.lr`` (learning rate), ``None`` if missing."""
        return cfg_get(self.config, "optimizer.lr")

    @property
    def method(self) -> str:
        """Display name of the method: "SGD", "KFC-pre" (+ " (SUA)") or "K-FAC"; " + BN" with batch norm."""
        label = OPTIMIZER_LABELS.get(self.optimizer, self.optimizer)
        if self.optimizer == "kfc_pre" and cfg_get(self.config, "optimizer.approx") == "sua":
            label += " (SUA)"
        if cfg_get(self.config, "model.batch_norm"):
            label += " + BN"
        return label

    # --- metrics -------------------------------------------------------------------------
    def values(self, metric: str) -> list[float]:
        """The metric at every evaluation, as floats (NaN where missing or non-finite in the log)."""
        return [to_float(row.get(metric)) for row in self.rows]

    def final(self, metric: str) -> float:
        """The metric at the last evaluation (NaN if there is none)."""
        return to_float(self.rows[-1].get(metric)) if self.rows else math.nan

    @property
    def final_iter(self) -> int:
        """Iteration (optimizer update) of the last evaluation; 0 without rows."""
        return int(self.rows[-1]["iter"]) if self.rows else 0

    @property
    def final_train_time_s(self) -> float:
        """Training wall-clock (seconds, evaluation excluded) at the last evaluation."""
        return self.final("train_time_s")

    def __repr__(self) -> str:  # the dataclass repr would print every row
        return f"Run({str(self.path)!r}, name={self.name!r}, rows={len(self.rows)})"


# ---------------------------------------------------------------------------------------------
# finding and loading
# ---------------------------------------------------------------------------------------------
def natural_key(path: Path) -> list[Any]:
    """Sort ``2-...`` before ``10-...`` (Hydra numbers jobs without zero padding)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", str(path))]


def is_run_dir(path: Path) -> bool:
    """True for a directory holding both ``metrics.jsonl`` and ``config.yaml``."""
    return (path / METRICS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def find_run_dirs(path: str | Path) -> list[Path]:
    """``[path]`` if it is a run directory, else every run directory below it (recursively, sorted)."""
    path = Path(path)
    if is_run_dir(path):
        return [path]
    found = {m.parent for m in path.rglob(METRICS_FILE) if is_run_dir(m.parent)}
    return sorted(found, key=natural_key)


def load_config(path: str | Path) -> dict[str, Any]:
    """A ``config.yaml`` (of a run directory, or the file itself) as a plain dict, unresolved.

    OmegaConf (not PyYAML) reads it so that values such as ``1e-3`` come back as floats,
    exactly as the trainer wrote them.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    container = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(container, dict):
        raise AnalysisError(f"{path} does not hold a mapping")
    return container  # type: ignore[return-value]


def read_error(path: Path) -> str | None:
    """The one-line message in ``<path>/error.txt``, or ``None`` if there is none."""
    file = path / ERROR_FILE
    if not file.is_file():
        return None
    text = " ".join(file.read_text().split())
    return text or "failed (empty error.txt)"


def load_run(path: str | Path, sweep: Path | None = None) -> Run:
    """Load one run directory (which must hold ``config.yaml``; ``metrics.jsonl`` may be absent)."""
    path = Path(path)
    rows = read_metrics(path) if (path / METRICS_FILE).is_file() else []
    return Run(path=path, config=load_config(path), rows=rows, error=read_error(path), sweep=sweep)


def load_runs(paths: Iterable[str | Path], keep_empty: bool = False) -> list[Run]:
    """Every run in ``paths`` (run directories or sweep/output directories searched recursively).

    Runs are returned in argument order, and within a directory in natural path order.
    Runs whose ``metrics.jsonl`` has no rows yet are dropped unless ``keep_empty``.
    A run given twice is loaded once.

    Raises:
        AnalysisError: a path does not exist, or no run with metrics was found at all.
    """
    runs: list[Run] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise AnalysisError(f"{path} does not exist")
        sweep = None if is_run_dir(path) else path
        for run_dir in find_run_dirs(path):
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            run = load_run(run_dir, sweep=sweep)
            if run.rows or keep_empty:
                runs.append(run)
    if not runs:
        shown = " ".join(str(p) for p in paths)
        raise AnalysisError(
            f"no runs with metrics found in {shown}; expected run directories holding "
            f"{METRICS_FILE} and {CONFIG_FILE} (or sweep directories containing them)"
        )
    return runs


# ---------------------------------------------------------------------------------------------
# selecting and grouping
# ---------------------------------------------------------------------------------------------
def _rank(value: float) -> float:
    """Sort key for a final metric: NaN (a diverged run) ranks after every number."""
    return math.inf if math.isnan(value) else value


def best_run(runs: Sequence[Run], metric: str = "train/error") -> Run:
    """The run with the lowest FINAL ``metric`` (default: training error, the paper's protocol).

    A run that failed (``error.txt``) ranks after every run that did not, and a NaN final
    value after every number; ties keep the first run in ``runs``.
    """
    if not runs:
        raise AnalysisError("best_run: no runs to choose from")
    return min(runs, key=lambda r: (r.error is not None, _rank(r.final(metric))))


def best_group(groups: Sequence[Sequence[Run]], metric: str = "train/error") -> list[Run]:
    """The group of seed repetitions with the lowest MEAN final ``metric``.

    Same ranking rules as :func:`best_run`: groups with a failed run rank last, NaN after numbers.
    """
    if not groups:
        raise AnalysisError("best_group: no runs to choose from")

    def key(group: Sequence[Run]) -> tuple[bool, float]:
        finals = [r.final(metric) for r in group]
        return any(r.error for r in group), _rank(sum(finals) / len(finals))

    best: Sequence[Run] = min(groups, key=key)
    return list(best)


def group_by(runs: Iterable[_T], key: Callable[[_T], Hashable]) -> dict[Hashable, list[_T]]:
    """Runs (or groups of runs) grouped by ``key(run)``, groups in order of first appearance."""
    groups: dict[Hashable, list[_T]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def group_by_name(runs: Iterable[Run]) -> dict[str, list[Run]]:
    """Runs grouped by experiment ``name`` (e.g. ``cifar10_sgd``)."""
    return group_by(runs, lambda r: r.name)  # type: ignore[return-value]


def group_by_seed(runs: Iterable[Run]) -> dict[Any, list[Run]]:
    """Runs grouped by ``seed`` (e.g. to pair SGD and KFC-pre runs of the same seed)."""
    return group_by(runs, lambda r: r.seed)


def setting_key(run: Run, ignore: Sequence[str] = NON_SEMANTIC_KEYS) -> tuple[tuple[str, str], ...]:
    """The run's config without ``ignore``d keys (prefixes included), as a hashable key."""
    flat = flatten(run.config)
    kept = {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)}
    return tuple(sorted((k, repr(v)) for k, v in kept.items()))


def group_seeds(runs: Iterable[Run]) -> list[list[Run]]:
    """Groups of runs that differ ONLY in ``seed`` (and the non-semantic keys), in order of appearance.

    A group of one is a single run; a larger group is repetitions to be averaged.
    """
    return list(group_by(runs, setting_key).values())


def varying_keys(runs: Sequence[Run], ignore: Sequence[str] = NON_SEMANTIC_KEYS) -> list[str]:
    """Dotted config keys whose values differ between ``runs`` (sorted; ``ignore``d keys left out)."""
    flats = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    out = []
    for k in keys:
        if any(k == i or k.startswith(i + ".") for i in ignore):
            continue
        if len({repr(f.get(k)) for f in flats}) > 1:
            out.append(k)
    return out


# ---------------------------------------------------------------------------------------------
# thresholds and summaries
# ---------------------------------------------------------------------------------------------
def first_reach(
    rows: Sequence[dict[str, Any]],
    metric: str,
    threshold: float,
    x: str = "train_time_s",
    interpolate: bool = False,
) -> float | None:
    """The first ``x`` (``"train_time_s"`` in seconds, or ``"iter"``) at which ``metric <= threshold``.

    Without ``interpolate`` (the default, used by the report) this is ``x`` of the first
    EVALUATION whose value is at or below the threshold: a conservative upper bound, since
    the run may have crossed it any time after the previous evaluation. With
    ``interpolate=True`` the crossing is placed by linear interpolation between that
    evaluation and the one before it (no interpolation for the first row, or when the
    previous value is NaN). Rows whose metric is NaN never count as reaching. Returns
    ``None`` if the threshold is never reached.
    """
    prev_x: float | None = None
    prev_v = math.nan
    for row in rows:
        value = to_float(row.get(metric))
        here = to_float(row.get(x))
        if not math.isnan(value) and value <= threshold:
            if interpolate and prev_x is not None and not math.isnan(prev_v) and prev_v > value:
                frac = (prev_v - threshold) / (prev_v - value)
                return prev_x + frac * (here - prev_x)
            return here
        prev_x, prev_v = here, value
    return None


@dataclass(frozen=True)
class Summary:
    """Mean and spread of one quantity over seed repetitions.

    ``values`` are the reached/finite values; ``n`` the number of runs (so
    ``len(values) < n`` means some runs never reached a threshold). ``std`` is the sample
    standard deviation (``n - 1`` in the denominator; 0 for a single value).
    """

    values: tuple[float, ...]
    n: int

    @property
    def count(self) -> int:
        """Number of runs that reached a value (``len(values)``)."""
        return len(self.values)

    @property
    def all_reached(self) -> bool:
        """Whether there is at least one run and every run reached a value."""
        return self.n > 0 and self.count == self.n

    @property
    def mean(self) -> float:
        """Mean of the reached values (NaN if none)."""
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation of the reached values (0 for fewer than two)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    @property
    def min(self) -> float:
        """Smallest reached value (NaN if none)."""
        return min(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        """Largest reached value (NaN if none)."""
        return max(self.values) if self.values else math.nan


def summarize(values: Iterable[float | None]) -> Summary:
    """A :class:`Summary` of per-run values; ``None`` and NaN count as "not reached"."""
    values = list(values)
    kept = tuple(float(v) for v in values if v is not None and not math.isnan(float(v)))
    return Summary(values=kept, n=len(values))


@dataclass(frozen=True)
class Curve:
    """One metric of a group of seed repetitions, aligned on evaluation iterations.

    All arrays have one entry per iteration that EVERY run evaluated (the intersection,
    so a run that stopped early shortens the curve). ``time_s`` is the mean training
    wall-clock (seconds) over runs at each iteration; ``mean``/``std``/``lo``/``hi`` are
    the mean, sample standard deviation (0 for one run) and min/max of the metric
    across runs, ignoring NaN entries (NaN where every run is NaN).
    """

    iters: Any  # numpy arrays; typed loosely so this module does not need numpy at import
    time_s: Any
    mean: Any
    std: Any
    lo: Any
    hi: Any
    n: int


def aggregate(runs: Sequence[Run], metric: str) -> Curve:
    """Mean and spread of ``metric`` over ``runs`` (seed repetitions) at their common iterations."""
    import warnings

    import numpy as np

    if not runs:
        raise AnalysisError("aggregate: no runs")
    common = set.intersection(*({int(row["iter"]) for row in r.rows} for r in runs))
    iters = np.array(sorted(common), dtype=np.int64)
    values = np.full((len(runs), len(iters)), np.nan)
    times = np.full((len(runs), len(iters)), np.nan)
    position = {it: j for j, it in enumerate(iters.tolist())}
    for i, run in enumerate(runs):
        for row in run.rows:
            j = position.get(int(row["iter"]))
            if j is not None:  # a resumed run may log an iteration twice; the last row wins
                values[i, j] = to_float(row.get(metric))
                times[i, j] = to_float(row.get("train_time_s"))
    with warnings.catch_warnings():  # all-NaN columns (a diverged point) are expected: keep NaN
        warnings.simplefilter("ignore", category=RuntimeWarning)
        finite = np.where(np.isfinite(values), values, np.nan)
        mean = np.nanmean(finite, axis=0)
        std = np.nanstd(finite, axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(iters))
        lo, hi = np.nanmin(finite, axis=0), np.nanmax(finite, axis=0)
        time_s = np.nanmean(times, axis=0)
    return Curve(iters=iters, time_s=time_s, mean=mean, std=np.nan_to_num(std), lo=lo, hi=hi, n=len(runs))
