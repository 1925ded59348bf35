"""kfcrun.analysis.runs: loading, first_reach, best-run selection, grouping, seed aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kfcrun.analysis.runs import (
    AnalysisError,
    aggregate,
    best_run,
    first_reach,
    group_by_name,
    group_by_seed,
    group_seeds,
    load_runs,
    summarize,
    to_float,
)

from .fake_runs import config, rows, write_run, write_sweep

# iter 100..400 at 60 s per 100 iterations; training error 50%, 35%, 25%, 10%
ROWS = rows(iters=[100, 200, 300, 400], times=[60.0, 120.0, 180.0, 240.0], train_error=[0.5, 0.35, 0.25, 0.1])


@pytest.mark.parametrize(
    ("threshold", "x", "expected"),
    [
        (0.3, "train_time_s", 180.0),  # first evaluation at or below: 0.25 at 180 s
        (0.3, "iter", 300),
        (0.35, "train_time_s", 120.0),  # equality counts as reached
        (0.5, "iter", 100),  # reached at the very first evaluation
        (0.1, "iter", 400),
        (0.05, "train_time_s", None),  # never
    ],
)
def test_first_reach_reads_the_first_evaluation_at_or_below(threshold, x, expected):
    assert first_reach(ROWS, "train/error", threshold, x=x) == expected


def test_first_reach_interpolates_linearly_between_evaluations():
    # 0.35 at 120 s -> 0.25 at 180 s: 0.30 is crossed half-way, at 150 s (iteration 250)
    assert first_reach(ROWS, "train/error", 0.3, interpolate=True) == pytest.approx(150.0)
    assert first_reach(ROWS, "train/error", 0.3, x="iter", interpolate=True) == pytest.approx(250.0)
    # reached at the first row: nothing before it to interpolate from
    assert first_reach(ROWS, "train/error", 0.6, interpolate=True) == 60.0
    assert first_reach(ROWS, "train/error", 0.01, interpolate=True) is None


def test_first_reach_skips_nan_and_missing_values():
    nan_rows = rows(iters=[1, 2, 3], times=[1.0, 2.0, 3.0], train_error=["nan", 0.9, 0.2])
    assert first_reach(nan_rows, "train/error", 0.5, x="iter") == 3
    assert first_reach(nan_rows, "train/error", 0.95, x="iter", interpolate=True) == 2  # no NaN endpoint
    assert first_reach(nan_rows, "no/such_metric", 1.0) is None


def test_to_float_reads_the_logged_nan_and_inf_strings():
    assert math.isnan(to_float("nan")) and to_float("inf") == math.inf and to_float("-inf") == -math.inf
    assert math.isnan(to_float(None)) and to_float(3) == 3.0


def test_load_runs_accepts_run_and_sweep_dirs(tmp_path):
    single = write_run(tmp_path / "single", config("cifar10_kfc", "kfc_pre"), ROWS)
    sweep = write_sweep(
        tmp_path / "sweep",
        [(config("cifar10_sgd", lr=lr), ROWS, None, [f"optimizer.lr={lr}"]) for lr in [0.3] * 11],
    )
    write_run(tmp_path / "sweep" / "11-empty", config("cifar10_sgd"), [])  # started, no evaluation yet
    runs = load_runs([single, sweep, single])  # the repeated path is loaded once
    assert len(runs) == 12
    assert runs[0].path == single and runs[0].sweep is None and runs[0].method == "KFC-pre"
    # natural job order (2 before 10), all tagged with their sweep
    assert [r.path.name.split("-")[0] for r in runs[1:]] == [str(i) for i in range(11)]
    assert {r.sweep for r in runs[1:]} == {sweep}
    assert (
        runs[1].final("train/error") == 0.1
        and runs[1].final_iter == 400
        and runs[1].final_train_time_s == 240
    )
    assert runs[1].lr == 0.3 and runs[1].dataset == "cifar10" and runs[1].batch_size == 128
    assert len(load_runs([sweep], keep_empty=True)) == 12


def test_load_runs_errors_are_one_line(tmp_path):
    with pytest.raises(AnalysisError, match="does not exist"):
        load_runs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no runs with metrics found in") as info:
        load_runs([tmp_path / "empty"])
    assert "\n" not in str(info.value)


def test_best_run_uses_final_training_error(tmp_path):
    # a reaches the lowest error (5%) mid-run but ends at 20%; b ends at 15%; c diverged (nan)
    a = write_run(tmp_path / "a", config("x", lr=0.1), rows([1, 2, 3], [1, 2, 3], [0.5, 0.05, 0.2]))
    b = write_run(tmp_path / "b", config("x", lr=0.03), rows([1, 2, 3], [1, 2, 3], [0.5, 0.3, 0.15]))
    c = write_run(tmp_path / "c", config("x", lr=0.3), rows([1, 2], [1, 2], [0.5, "nan"]))
    d = write_run(tmp_path / "d", config("x", lr=1.0), rows([1], [1], [0.01]), error="diverged")
    runs = load_runs([a, b, c, d])
    assert best_run(runs).path == b
    assert best_run(runs, metric="test/error").path == b
    assert best_run([runs[0], runs[2]]).path == a  # NaN ranks after any number
    assert best_run([runs[2], runs[3]]).path == c  # a failed run ranks after every other


def test_grouping_by_name_seed_and_setting(tmp_path):
    paths = [
        write_run(tmp_path / f"s{seed}", config("cifar10_sgd", seed=seed, device=f"cuda:{seed}"), ROWS)
        for seed in range(3)
    ]
    paths.append(write_run(tmp_path / "lr", config("cifar10_sgd", lr=0.1), ROWS))
    paths.append(write_run(tmp_path / "kfc", config("cifar10_kfc", "kfc_pre"), ROWS))
    runs = load_runs(paths)
    assert {k: len(v) for k, v in group_by_name(runs).items()} == {"cifar10_sgd": 4, "cifar10_kfc": 1}
    assert {k: len(v) for k, v in group_by_seed(runs).items()} == {0: 3, 1: 1, 2: 1}
    groups = group_seeds(runs)  # device differs too, but it does not change the experiment
    assert [[r.path.name for r in g] for g in groups] == [["s0", "s1", "s2"], ["lr"], ["kfc"]]


def test_aggregate_mean_std_minmax_on_common_iterations(tmp_path):
    errors = [[0.5, 0.3, 0.2], [0.6, 0.4, 0.1], [0.4, 0.2, 0.3]]
    times = [[10.0, 20.0, 30.0], [12.0, 22.0, 32.0], [14.0, 24.0, 34.0]]
    paths = [
        write_run(tmp_path / f"s{i}", config("x", seed=i), rows([100, 200, 300], times[i], errors[i]))
        for i in range(3)
    ]
    # a fourth seed that stopped after iteration 200: the aggregate covers 100 and 200 only
    short = write_run(tmp_path / "s3", config("x", seed=3), rows([100, 200], [16.0, 26.0], [0.5, 0.3]))
    curve = aggregate(load_runs(paths), "train/error")
    np.testing.assert_array_equal(curve.iters, [100, 200, 300])
    np.testing.assert_allclose(curve.time_s, [12.0, 22.0, 32.0])
    np.testing.assert_allclose(curve.mean, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(curve.std, [0.1, 0.1, 0.1])  # sample std (n - 1)
    np.testing.assert_allclose(curve.lo, [0.4, 0.2, 0.1])
    np.testing.assert_allclose(curve.hi, [0.6, 0.4, 0.3])
    assert curve.n == 3
    curve4 = aggregate(load_runs([*paths, short]), "train/error")
    np.testing.assert_array_equal(curve4.iters, [100, 200])
    np.testing.assert_allclose(curve4.mean, [0.5, 0.3])
    np.testing.assert_allclose(curve4.time_s, [13.0, 23.0])


def test_summarize_counts_unreached_values():
    s = summarize([500.0, 600.0, 700.0])
    assert (s.mean, s.std, s.min, s.max, s.n, s.all_reached) == (600.0, 100.0, 500.0, 700.0, 3, True)
    partial = summarize([1.0, None, float("nan")])
    assert (partial.count, partial.n, partial.all_reached, partial.std) == (1, 3, False, 0.0)
