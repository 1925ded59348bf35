"""Markdown report: how much faster KFC-pre and K-FAC reach given errors than SGD (paper Sec. 5.2-5.3).

Runs are paired by experiment name through the method tokens ``sgd`` < ``kfc`` (KFC-pre) <
``kfac`` (K-FAC): a name pairs with each name that has a LATER method token in its place, the
earlier one being the baseline (``cifar10_sgd`` with ``cifar10_kfc`` and ``cifar10_kfac``,
``cifar10_kfc`` with ``cifar10_kfac``; ``cifar10_bn_sgd``/``cifar10_bn_kfc``/``cifar10_bn_kfac``, ...),
or explicitly with ``--pair BASELINE CANDIDATE``.
Within one name, runs that differ only in ``seed`` are repetitions (reported as mean ±
sample std over the runs); if a name has several settings (e.g. a learning-rate sweep),
the one with the lowest mean final training error is used (the paper's protocol).

For each threshold the report gives the TRAINING wall-clock (``train_time_s``: training
steps only, evaluation excluded) and the number of iterations at which each method first
reaches ``error <= threshold`` (of the averaged parameters), read at the first
EVALUATION at or below the threshold (no interpolation; see
:func:`kfcrun.analysis.runs.first_reach`), and the speed-up = baseline / candidate
(e.g. SGD / KFC-pre). When only one method reaches a threshold, the ratio is a bound
computed from the other's total time or iterations (``>`` or ``<``).

CLI (``scripts/report.py``)::

    report.py RUN_OR_SWEEP_DIR... [--train-errors 0.3 0.2 0.1 0.06] [--test-errors 0.25 0.19]
              [--pair cifar10_sgd cifar10_kfc] [--time-unit min|s] [--out report.md]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kfcrun.analysis.runs import (
    AnalysisError,
    Run,
    Summary,
    best_group,
    first_reach,
    group_by_name,
    group_seeds,
    summarize,
)

#: Default thresholds (fractions) per dataset: (training error, test error). The CIFAR-10
#: ones include the paper's headline points (6% training error, 19% and the published 18%
#: test error; 10% training error for batch 4096); SVHN's include the published 2.78%.
DEFAULT_THRESHOLDS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.3, 0.2, 0.1, 0.06), (0.3, 0.25, 0.2, 0.19, 0.18)),
    "svhn": ((0.1, 0.05, 0.02, 0.01), (0.1, 0.05, 0.04, 0.0278)),
}
GENERIC_THRESHOLDS = ((0.5, 0.3, 0.2, 0.1), (0.5, 0.3, 0.2, 0.1))

#: The paper's headline numbers (Grosse & Martens 2016), quoted for context only.
PAPER_HEADLINES = (
    "Paper (Grosse & Martens 2016; one GTX Titan Z; SGD batch 128, KFC-pre batch 512):",
    "- CIFAR-10 (Sec. 5.2, Fig. 3): KFC-pre reached 19% test error in 3 min vs 9 min for SGD (3×); "
    "6% training error in 4 min vs 30 min (7.5×). Both reached about the published 18% test error.",
    "- SVHN (Sec. 5.2, Fig. 3): KFC-pre reached the published 2.78% test error in 120 min; "
    "SGD did not within 250 min.",
    "- Batch 4096, CIFAR-10 (Sec. 5.3, Fig. 5): 10% training error after 300 updates for KFC-pre "
    "vs 6000 for SGD (~20×).",
)

TIME_UNITS = {"min": 60.0, "s": 1.0}

#: The methods' name tokens, baselines first: SGD, KFC-pre, K-FAC.
METHOD_TOKENS = ("sgd", "kfc", "kfac")


# ---------------------------------------------------------------------------------------------
# pairing
# ---------------------------------------------------------------------------------------------
def partner_names(name: str) -> list[str]:
    """The names ``name`` is the baseline for: its method token replaced by each later one.

    ``cifar10_sgd`` -> ``[cifar10_kfc, cifar10_kfac]``; ``cifar10_kfc`` -> ``[cifar10_kfac]``;
    ``cifar10_kfac`` and names without a method token -> ``[]``.
    """
    tokens = name.split("_")
    partners = []
    for position, token in enumerate(tokens):
        if token not in METHOD_TOKENS:
            continue
        for later in METHOD_TOKENS[METHOD_TOKENS.index(token) + 1 :]:
            partners.append("_".join([*tokens[:position], later, *tokens[position + 1 :]]))
    return partners


@dataclass
class Pair:
    """A baseline (e.g. SGD) and a candidate (e.g. KFC-pre) experiment, each a group of seed repetitions."""

    baseline_name: str
    candidate_name: str
    baseline: list[Run]
    candidate: list[Run]
    notes: list[str]


def _choose(name: str, runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """The runs of one name to report, and notes on the choice.

    All of them if they differ only in seed, else the setting with the lowest mean final
    training error (noted).
    """
    groups = group_seeds(runs)
    if len(groups) == 1:
        return list(groups[0]), []
    chosen = best_group(groups)
    lr = chosen[0].lr
    note = (
        f"{name}: {len(groups)} settings found; using the one with the lowest final training error "
        f"(lr={lr:g}, {chosen[0].path})"
        if isinstance(lr, (int, float))
        else f"{name}: {len(groups)} settings found; using {chosen[0].path} (lowest final training error)"
    )
    return chosen, [note]


def find_pairs(runs: Sequence[Run], explicit: Sequence[tuple[str, str]] = ()) -> tuple[list[Pair], list[str]]:
    """Pairs to report and the names left without a partner.

    With ``explicit`` pairs ``(baseline, candidate)`` only those are reported; otherwise
    every name pairs with each of its :func:`partner_names` that is present (baseline first).
    Raises :class:`AnalysisError` for an unknown name in ``explicit`` or when no pair can be formed.
    """
    by_name = group_by_name(runs)
    if explicit:
        names = [(a, b) for a, b in explicit]
        same = next((a for a, b in names if a == b), None)
        if same is not None:
            raise AnalysisError(
                f"--pair {same} {same} compares a run name with itself; give two different names"
            )
        for name in (n for pair in names for n in pair):
            if name not in by_name:
                raise AnalysisError(f"unknown run name {name!r} in --pair; known names: {', '.join(by_name)}")
    else:
        names = [(name, partner) for name in by_name for partner in partner_names(name) if partner in by_name]
        if not names:
            raise AnalysisError(
                f"no SGD/KFC-pre/K-FAC pairs found among the names {', '.join(by_name)} (names pair by "
                "their method token _sgd, _kfc or _kfac, e.g. cifar10_sgd/cifar10_kfc); "
                "pass --pair BASELINE CANDIDATE"
            )
    pairs = []
    for a, b in names:
        base, base_notes = _choose(a, by_name[a])
        cand, cand_notes = _choose(b, by_name[b])
        pairs.append(Pair(a, b, base, cand, base_notes + cand_notes))
    paired = {n for pair in names for n in pair}
    return pairs, [n for n in by_name if n not in paired]


# ---------------------------------------------------------------------------------------------
# cell formatting
# ---------------------------------------------------------------------------------------------
def format_ratio(ratio: float) -> str:
    """A speed-up with three significant digits: ``3.00×``, ``20.0×``, ``150×``."""
    if math.isinf(ratio):
        return "∞×"
    if abs(ratio) >= 100:
        return f"{ratio:.0f}×"
    if abs(ratio) >= 10:
        return f"{ratio:.1f}×"
    return f"{ratio:.2f}×"


def format_summary(summary: Summary, scale: float = 1.0, digits: int = 2, suffix: str = "") -> str:
    """One cell: ``v`` for one run; ``mean ± std (n=N)`` for several; ``never`` when nothing reached.

    ``scale`` divides the values (e.g. 60 for minutes); with some runs not reaching, the
    count is shown as ``(k/N reached)``.
    """
    if summary.count == 0:
        return "never" if summary.n <= 1 else f"never (0/{summary.n})"
    mean, std = summary.mean / scale, summary.std / scale
    if summary.n == 1:
        return f"{mean:.{digits}f}{suffix}"
    tail = f"n={summary.n}" if summary.all_reached else f"{summary.count}/{summary.n} reached"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{suffix} ({tail})"


def format_percent(summary: Summary) -> str:
    """An error cell in percent, e.g. ``12.34%`` or ``12.34 ± 0.50% (n=3)``; ``nan`` if not finite."""
    if summary.count == 0:
        return "nan"
    return format_summary(Summary(tuple(100 * v for v in summary.values), summary.n), suffix="%")


def speedup(base: Summary, cand: Summary, base_total: float, cand_total: float) -> str:
    """``base / cand`` (e.g. SGD / KFC-pre) of the mean times (or iterations) to reach a threshold.

    If only the candidate reached it in every run, the baseline took longer than its
    whole budget ``base_total``, so the ratio is ``> base_total / cand``; if only the
    baseline reached it, ``< base / cand_total``. "—" when neither, or when only some of
    several seeds reached it.
    """
    if base.all_reached and cand.all_reached:
        return format_ratio(base.mean / cand.mean) if cand.mean > 0 else "—"
    if base.count == 0 and cand.all_reached and cand.mean > 0:
        return f"> {format_ratio(base_total / cand.mean)}"
    if cand.count == 0 and base.all_reached and cand_total > 0:
        return f"< {format_ratio(base.mean / cand_total)}"
    return "—"


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (cells are used as given; ``|`` is escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *(line(r) for r in rows)])


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the first markdown table in ``text`` as ``{header: cell}`` dicts (for tests and tools)."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("|"):
            lines.append(line)
        elif lines:  # the first table ended
            break
    if len(lines) < 2:
        return []

    def cells(ln: str) -> list[str]:
        return [c.strip().replace("\\|", "|") for c in ln.strip("|").split(" | ")]

    headers = cells(lines[0])
    return [dict(zip(headers, cells(ln), strict=False)) for ln in lines[2:]]


def column_names(pair: Pair) -> tuple[str, str]:
    """Column titles: the method labels ("SGD", "KFC-pre + BN"), or the experiment names if those coincide."""
    b, c = pair.baseline[0].method, pair.candidate[0].method
    return (b, c) if b != c else (pair.baseline_name, pair.candidate_name)


def threshold_rows(
    pair: Pair,
    train_errors: Sequence[float],
    test_errors: Sequence[float],
    time_unit: str = "min",
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the time/iterations-to-threshold table of one pair.

    One row per threshold: ``train error ≤ 30%`` (metric ``train/error``) or ``test
    error ≤ 19%`` (``test/error``); columns: baseline time, candidate time, time
    speed-up, baseline iterations, candidate iterations, iteration speed-up.
    """
    scale = TIME_UNITS[time_unit]
    b, c = column_names(pair)
    headers = [
        "threshold",
        f"{b} time ({time_unit})",
        f"{c} time ({time_unit})",
        "speed-up (time)",
        f"{b} iters",
        f"{c} iters",
        "speed-up (iters)",
    ]

    def totals(runs: Sequence[Run], x: str) -> float:
        # the smallest budget among the seeds: a conservative bound for the ">"/"<" ratios
        return min(r.final_train_time_s if x == "train_time_s" else float(r.final_iter) for r in runs)

    rows = []
    for split, thresholds in (("train", train_errors), ("test", test_errors)):
        for threshold in thresholds:
            metric = f"{split}/error"
            cells = [f"{split} error ≤ {100 * threshold:g}%"]
            for x, digits, unit_scale in (("train_time_s", 2, scale), ("iter", 0, 1.0)):
                base = summarize(first_reach(r.rows, metric, threshold, x=x) for r in pair.baseline)
                cand = summarize(first_reach(r.rows, metric, threshold, x=x) for r in pair.candidate)
                cells += [
                    format_summary(base, unit_scale, digits),
                    format_summary(cand, unit_scale, digits),
                    speedup(base, cand, totals(pair.baseline, x), totals(pair.candidate, x)),
                ]
            rows.append(cells)
    return headers, rows


def final_rows(pair: Pair, time_unit: str = "min") -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the final-values table of one pair (last evaluation of each run)."""
    scale = TIME_UNITS[time_unit]
    headers = ["final (last evaluation)", *column_names(pair)]

    def cell(runs: Sequence[Run], what: str) -> str:
        if what.endswith("error"):
            return format_percent(summarize(r.final(what) for r in runs))
        if what.endswith("nll"):
            return format_summary(summarize(r.final(what) for r in runs), digits=4)
        if what == "iter":
            return format_summary(summarize(float(r.final_iter) for r in runs), digits=0)
        if what == "time":
            return format_summary(summarize(r.final_train_time_s for r in runs), scale, 2)
        values = sorted({_shown(getattr(r, what)) for r in runs})
        return ", ".join(values)

    items = [
        ("train error", "train/error"),
        ("test error", "test/error"),
        ("train NLL", "train/nll"),
        ("test NLL", "test/nll"),
        ("iterations", "iter"),
        (f"training time ({time_unit})", "time"),
        ("learning rate", "lr"),
        ("batch size", "batch_size"),
        ("seeds", "seed"),
    ]
    rows = [[label, cell(pair.baseline, key), cell(pair.candidate, key)] for label, key in items]
    rows.append(["runs", str(len(pair.baseline)), str(len(pair.candidate))])
    return headers, rows


def _shown(value: object) -> str:
    """A config value in the final table; a null learning rate is K-FAC's adapted one."""
    return "adapted" if value is None else str(value)


def thresholds_for(
    runs: Sequence[Run], train: Sequence[float] | None, test: Sequence[float] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (training, test) error thresholds: the given ones, else the defaults of the runs' dataset."""
    datasets = {r.dataset for r in runs}
    default = DEFAULT_THRESHOLDS.get(next(iter(datasets)), GENERIC_THRESHOLDS) if len(datasets) == 1 else None
    default = default or GENERIC_THRESHOLDS
    return tuple(train if train is not None else default[0]), tuple(test if test is not None else default[1])


def build_report(
    runs: Sequence[Run],
    explicit_pairs: Sequence[tuple[str, str]] = (),
    train_errors: Sequence[float] | None = None,
    test_errors: Sequence[float] | None = None,
    time_unit: str = "min",
    sources: Sequence[str] = (),
) -> str:
    """The whole markdown report (see the module docstring)."""
    pairs, unpaired = find_pairs(runs, explicit_pairs)
    out = ["# SGD, KFC-pre and K-FAC: time and iterations to reach a given error", ""]
    if sources:
        out += ["Inputs: " + ", ".join(f"`{s}`" for s in sources), ""]
    out += [
        "Times are TRAINING wall-clock (`train_time_s`: training steps only, evaluation excluded). "
        "A threshold counts as reached at the first evaluation whose error (of the averaged "
        "parameters) is at or below it, without interpolation. Speed-up = baseline / candidate "
        "(e.g. SGD / KFC-pre); `>`/`<` are bounds from the other method's whole budget when only "
        "one method reached the threshold. Several seeds: mean ± sample std over runs.",
        "",
        *PAPER_HEADLINES,
        "",
    ]
    for pair in pairs:
        train, test = thresholds_for([*pair.baseline, *pair.candidate], train_errors, test_errors)
        out += [f"## {pair.baseline_name} vs {pair.candidate_name}", ""]
        out += [f"- {pair.baseline_name}: " + ", ".join(f"`{r.path}`" for r in pair.baseline)]
        out += [f"- {pair.candidate_name}: " + ", ".join(f"`{r.path}`" for r in pair.candidate)]
        out += [f"- note: {note}" for note in pair.notes]
        datasets = {r.dataset for r in [*pair.baseline, *pair.candidate]}
        if len(datasets) > 1:
            out += [f"- warning: the pair mixes datasets {', '.join(sorted(datasets))}"]
        out += ["", markdown_table(*threshold_rows(pair, train, test, time_unit)), ""]
        out += [markdown_table(*final_rows(pair, time_unit)), ""]
    if unpaired:
        out += ["Runs without a partner (not compared): " + ", ".join(unpaired), ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``report.py`` (run/sweep paths, error thresholds, pairs, time unit)."""
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Markdown report of SGD vs KFC-pre vs K-FAC: time and iterations to reach given errors, "
        "speed-ups, final errors and NLLs (reads metrics.jsonl + config.yaml).",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="run directories and/or sweep directories")
    parser.add_argument(
        "--train-errors", type=float, nargs="+", default=None, help="training-error thresholds (fractions)"
    )
    parser.add_argument(
        "--test-errors", type=float, nargs="+", default=None, help="test-error thresholds (fractions)"
    )
    parser.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("BASELINE", "CANDIDATE"),
        default=None,
        help="compare these experiment names (repeatable); default: pair by the _sgd/_kfc/_kfac token",
    )
    parser.add_argument("--time-unit", choices=tuple(TIME_UNITS), default="min", help="default: min")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> str:
    """``report.py`` entry point: prints the markdown (and writes ``--out``); returns it."""
    args = build_parser().parse_args(argv)
    for option, values in (("--train-errors", args.train_errors), ("--test-errors", args.test_errors)):
        bad = [v for v in values or () if not 0.0 <= v <= 1.0]
        if bad:
            raise SystemExit(f"report: {option} {bad[0]:g} is not a fraction in [0, 1] (30% is 0.3)")
    from kfcrun.analysis.runs import load_runs

    try:
        runs = load_runs(args.paths)
        text = build_report(
            runs,
            explicit_pairs=[tuple(p) for p in args.pair or ()],
            train_errors=args.train_errors,
            test_errors=args.test_errors,
            time_unit=args.time_unit,
            sources=[str(p) for p in args.paths],
        )
    except AnalysisError as err:
        raise SystemExit(f"report: {err}") from None
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"report: wrote {args.out}")
    return text
