"""The paper's optimization figures (Grosse & Martens 2016, Figs. 3-5) from ``metrics.jsonl``.

* ``time`` (Figs. 3-4): two panels, negative log-likelihood and classification error
  against TRAINING wall-clock in minutes (``train_time_s``: evaluation excluded).
* ``iters`` (Fig. 5): classification error against iterations (weight updates, ``iter``).

As in the paper, training curves are dashed and test curves solid, one colour per method,
and a horizontal dashed line marks the previously published test error of the
architecture (CIFAR-10 cuda-convnet 18%, SVHN Srivastava (2013) 2.78%; Sec. 5.2). The
plotted metrics are those of the AVERAGED parameters (``train/error``, ``test/error``,
...), the paper's reported result. Repetitions that differ only in ``seed`` are drawn as
their mean with a shaded band (min-max by default, or +-1 std), aligned on evaluation
iterations; on the time axis the x value is the mean training time at each evaluation.

CLI (``scripts/make_figures.py``)::

    make_figures.py RUN_OR_SWEEP_DIR... [--out figures] [--kind auto|time|iters|both]
                    [--log-nll] [--published 0.18] [--all] [--band minmax|std]
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter

from kfcrun.analysis.runs import (
    AnalysisError,
    Run,
    aggregate,
    best_group,
    cfg_get,
    group_by,
    group_seeds,
    load_runs,
    varying_keys,
)

#: Previously published TEST error of each dataset's architecture (fraction), paper Sec. 5.2:
#: cuda-convnet "18% error in 20 minutes" on CIFAR-10; Srivastava (2013) 2.78% on SVHN.
PUBLISHED_TEST_ERROR = {"cifar10": 0.18, "svhn": 0.0278}

KINDS = ("auto", "time", "iters", "both")
BANDS = ("minmax", "std")
BAND_TEXT = {"minmax": "band: min–max", "std": "band: ±1 std"}

#: Config keys preferred (in this order) to tell apart curves of the same method.
LABEL_KEYS = (
    "optimizer.lr",
    "dataset.name",
    "optimizer.approx",
    "model.pooling",
    "optimizer.damping",
    "optimizer.momentum",
    "trainer.batch_size",
)

TRAIN_STYLE = "--"  # paper: dashed = training
TEST_STYLE = "-"  # paper: solid = test


# ---------------------------------------------------------------------------------------------
# choosing what to plot and how to name it
# ---------------------------------------------------------------------------------------------
def method_key(run: Run) -> tuple[str, str, str, object]:
    """What counts as one "method" when picking the best run of a sweep."""
    return (run.dataset, run.name, run.method, run.batch_size)


def select_groups(
    runs: Sequence[Run], all_runs: bool = False, metric: str = "train/error"
) -> list[list[Run]]:
    """The groups of seed repetitions to plot, one curve each.

    Runs that differ only in ``seed`` form a group. Unless ``all_runs``, for every method
    (:func:`method_key`) that has several settings and at least one run found inside a
    sweep directory (e.g. a learning-rate grid), only the setting with the lowest mean
    final ``metric`` (training error: the paper's protocol) is kept.
    """
    groups = group_seeds(runs)
    if all_runs:
        return groups
    by_method = group_by(groups, lambda g: method_key(g[0]))
    keep: list[list[Run]] = []
    for candidates in by_method.values():
        if len(candidates) > 1 and any(r.sweep is not None for g in candidates for r in g):
            keep.append(best_group(candidates, metric))
        else:
            keep.extend(candidates)
    # keep the order of first appearance so colours are stable between invocations
    order = {id(g[0]): i for i, g in enumerate(groups)}
    return sorted(keep, key=lambda g: order[id(g[0])])


def _short(key: str) -> str:
    """``optimizer.lr`` -> ``lr``; ``dataset.name`` -> ``dataset``."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _value_text(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def curve_labels(groups: Sequence[Sequence[Run]]) -> list[str]:
    """Legend labels, one per curve in ``groups``.

    Each label is the method ("SGD", "KFC-pre", "+ BN"), then the batch size if the curves
    differ in it, then (only where labels still collide) the config values that tell them apart.
    """
    labels = [g[0].method for g in groups]
    if len({g[0].batch_size for g in groups}) > 1:
        labels = [f"{lab}, batch {g[0].batch_size}" for lab, g in zip(labels, groups, strict=True)]
    for label in set(labels):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        if len(idx) < 2:
            continue
        firsts = [groups[i][0] for i in idx]
        varying = [k for k in varying_keys(firsts) if k != "name"]
        # the keys one usually varies first, so "lr=0.1" beats "dataset.channels=3"
        varying.sort(key=lambda k: LABEL_KEYS.index(k) if k in LABEL_KEYS else len(LABEL_KEYS))
        keys = varying or ["name"]
        for i in idx:
            extra = ", ".join(f"{_short(k)}={_value_text(cfg_get(groups[i][0].config, k))}" for k in keys[:3])
            labels[i] = f"{labels[i]} ({extra})"
    return labels


def published_error(groups: Sequence[Sequence[Run]], override: float | None = None) -> float | None:
    """The published test error for the runs' dataset (``override`` wins); ``None`` if unknown/mixed."""
    if override is not None:
        return override
    datasets = {r.dataset for g in groups for r in g}
    if len(datasets) != 1:
        return None
    return PUBLISHED_TEST_ERROR.get(datasets.pop())


def resolve_kind(runs: Sequence[Run], kind: str) -> list[str]:
    """Figure kinds to draw for ``kind`` (``time``, ``iters``, ``both`` or ``auto``).

    ``auto``: ``iters`` (Fig. 5) when every run is a large-batch experiment of Sec. 5.3
    (its name has a ``bs<N>`` token, e.g. ``cifar10_bs4096_kfc``), else ``time``
    (Figs. 3-4). ``both`` draws both.
    """
    if kind == "both":
        return ["time", "iters"]
    if kind != "auto":
        return [kind]
    large_batch = all(re.search(r"(^|_)bs\d+(_|$)", r.name) for r in runs)
    return ["iters"] if large_batch else ["time"]


def default_stem(runs: Sequence[Run]) -> str:
    """File name stem from the experiment families: ``cifar10_sgd`` + ``cifar10_kfc`` -> ``cifar10``."""
    families: list[str] = []
    for run in runs:
        tokens = [t for t in run.name.split("_") if t not in ("sgd", "kfc", "kfac")]
        family = "_".join(tokens) or run.name
        if family not in families:
            families.append(family)
    stem = "+".join(families)
    return stem if len(stem) <= 80 else "runs"


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def _draw(
    ax: Axes,
    group: Sequence[Run],
    metric: str,
    x: str,
    color: str,
    style: str,
    label: str,
    band: str,
) -> None:
    """One metric of one group: a line (the mean for several seeds) plus, for several seeds, a band."""
    curve = aggregate(group, metric)
    xs = curve.time_s / 60.0 if x == "time" else curve.iters
    ax.plot(xs, curve.mean, style, color=color, lw=1.5, gid=f"{label}|{metric}")
    if curve.n > 1:
        lo, hi = (
            (curve.lo, curve.hi) if band == "minmax" else (curve.mean - curve.std, curve.mean + curve.std)
        )
        ax.fill_between(xs, lo, hi, color=color, alpha=0.2, lw=0, gid=f"{label}|{metric}|band")


def plot_figure(
    groups: Sequence[Sequence[Run]],
    kind: str,
    published: float | None = None,
    log_nll: bool = False,
    band: str = "minmax",
    title: str | None = None,
    error_ylim: tuple[float, float] | None = None,
) -> Figure:
    """Draw one figure and return it (not saved).

    Args:
        groups: groups of seed repetitions, one curve (colour) each.
        kind: ``"time"`` (NLL and error vs training minutes, Figs. 3-4) or ``"iters"``
            (error vs iterations, Fig. 5).
        published: the previously published test error (fraction) drawn as a horizontal
            dashed line on the error panel (``gid="published"``); ``None``: no line.
        log_nll: log-scale NLL axis (Fig. 4).
        band: ``"minmax"`` or ``"std"`` (+-1 sample std) band for groups of several seeds.
        title: figure title.
        error_ylim: y-limits of the error panel (fractions).

    Every line carries ``gid="<label>|<metric>"`` (bands ``"...|band"``), so tests and
    callers can find them.
    """
    if kind not in ("time", "iters"):
        raise AnalysisError(f"unknown figure kind {kind!r}; allowed: time, iters")
    if band not in BANDS:
        raise AnalysisError(f"unknown band {band!r}; allowed: {', '.join(BANDS)}")
    labels = curve_labels(groups)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    # A bare Figure on the Agg canvas, not pyplot: no global figure registry, no display
    # backend, nothing to close, safe to call repeatedly from tests.
    if kind == "time":
        fig = Figure(figsize=(11, 5.0), layout="constrained")
        ax_nll, ax_err = fig.subplots(1, 2)
        panels = [(ax_nll, "nll"), (ax_err, "error")]
        xlabel = "training time (minutes)"
    else:
        fig = Figure(figsize=(6.5, 5.4), layout="constrained")
        ax_err = fig.subplots(1, 1)
        panels = [(ax_err, "error")]
        xlabel = "iterations (weight updates)"
    handles: list[Line2D] = []
    for i, (group, label) in enumerate(zip(groups, labels, strict=True)):
        color = colors[i % len(colors)]
        for ax, quantity in panels:
            _draw(ax, group, f"train/{quantity}", kind, color, TRAIN_STYLE, label, band)
            _draw(ax, group, f"test/{quantity}", kind, color, TEST_STYLE, label, band)
        legend = label if len(group) == 1 else f"{label} (mean of {len(group)} seeds, {BAND_TEXT[band]})"
        handles.append(Line2D([], [], color=color, lw=2, label=legend))
    handles.append(Line2D([], [], color="0.3", ls=TRAIN_STYLE, label="training (dashed)"))
    handles.append(Line2D([], [], color="0.3", ls=TEST_STYLE, label="test (solid)"))
    if published is not None:
        ax_err.axhline(published, color="k", ls=(0, (4, 3)), lw=1, gid="published")
        handles.append(
            Line2D(
                [], [], color="k", ls=(0, (4, 3)), lw=1, label=f"published test error ({100 * published:g}%)"
            )
        )
    for ax, quantity in panels:
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if quantity == "nll":
            ax.set_ylabel("negative log-likelihood")
            if log_nll:
                ax.set_yscale("log")
        else:
            ax.set_ylabel("classification error")
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
            if error_ylim is not None:
                ax.set_ylim(*error_ylim)
    # below the panels, so that it never hides a curve
    fig.legend(handles=handles, loc="outside lower center", ncol=2 if kind == "iters" else 3, fontsize=8)
    if title:
        fig.suptitle(title)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<stem>.png`` (150 dpi) and ``.pdf``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths


def make_figures(
    groups: Sequence[Sequence[Run]],
    out_dir: Path,
    kinds: Sequence[str] = ("time",),
    published: float | None = None,
    log_nll: bool = False,
    band: str = "minmax",
    stem: str | None = None,
    title: str | None = None,
    error_ylim: tuple[float, float] | None = None,
) -> dict[str, list[Path]]:
    """Draw and save one figure per kind for the curves ``groups``; returns ``{kind: [png, pdf]}``.

    Files are ``<out_dir>/<stem>_<kind>.png|pdf``; ``published`` is the dashed line's
    value (see :func:`published_error`).
    """
    stem = stem or default_stem([g[0] for g in groups])
    written: dict[str, list[Path]] = {}
    for kind in kinds:
        fig = plot_figure(
            groups, kind, published=published, log_nll=log_nll, band=band, title=title, error_ylim=error_ylim
        )
        written[kind] = save_figure(fig, out_dir, f"{stem}_{kind}")
    return written


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``make_figures.py`` (run/sweep paths, figure kind, output options)."""
    parser = argparse.ArgumentParser(
        prog="make_figures.py",
        description="Draw the paper's Figs. 3-5 (NLL / error vs training time or iterations) from "
        "metrics.jsonl + config.yaml of run or sweep directories.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories and/or sweep directories")
    parser.add_argument(
        "--out", type=Path, default=Path("figures"), help="output directory (default: figures)"
    )
    parser.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="time: Figs. 3-4 (NLL and error vs training minutes); iters: Fig. 5 (error vs iterations); "
        "auto: iters if every run name has a bs<N> token (Sec. 5.3), else time; both",
    )
    parser.add_argument("--log-nll", action="store_true", help="log-scale NLL axis (Fig. 4)")
    parser.add_argument(
        "--published",
        type=float,
        default=None,
        help="published test error as a fraction (default: 0.18 CIFAR-10, 0.0278 SVHN, else none)",
    )
    parser.add_argument(
        "--all",
        dest="all_runs",
        action="store_true",
        help="plot every run of a sweep, not the best per method",
    )
    parser.add_argument("--band", choices=BANDS, default="minmax", help="spread over seeds (default: minmax)")
    parser.add_argument("--name", default=None, help="file name stem (default: from the experiment names)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument(
        "--error-ylim",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="error axis limits (fractions)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """``make_figures.py`` entry point; returns the written files by figure kind."""
    args = build_parser().parse_args(argv)
    if args.published is not None and not 0.0 <= args.published <= 1.0:
        raise SystemExit(
            f"make_figures: --published {args.published} is not a fraction in [0, 1] (18% is 0.18)"
        )
    try:
        runs = load_runs(args.paths)
        groups = select_groups(runs, args.all_runs)
        published = published_error(groups, args.published)
        written = make_figures(
            groups,
            args.out,
            kinds=resolve_kind([r for g in groups for r in g], args.kind),
            published=published,
            log_nll=args.log_nll,
            band=args.band,
            stem=args.name,
            title=args.title,
            error_ylim=tuple(args.error_ylim) if args.error_ylim else None,
        )
    except AnalysisError as err:
        raise SystemExit(f"make_figures: {err}") from None
    print(f"make_figures: {len(runs)} run(s) loaded, {len(groups)} curve(s) plotted:")
    for group, label in zip(groups, curve_labels(groups), strict=True):
        finals = [r.final("train/error") for r in group]
        mean = float(np.nanmean(finals)) if not all(math.isnan(v) for v in finals) else math.nan
        print(f"  {label}: {len(group)} run(s), mean final train error {mean:.2%}; {group[0].path}")
    line = "none" if published is None else f"{published:.2%}"
    print(f"  published test error line: {line}")
    for paths in written.values():
        for path in paths:
            print(f"  wrote {path}")
    return written
