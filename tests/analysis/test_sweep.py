"""kfcrun.analysis.sweep: the sweep table marks the best job by final training error and lists failures."""

from __future__ import annotations

import json
import math

import pytest

from kfcrun.analysis import sweep as sweep_table
from kfcrun.analysis.report import parse_markdown_table

from .fake_runs import config, rows, write_run, write_sweep


@pytest.fixture
def lr_sweep(tmp_path):
    """An lr grid: 0.1 ends at 30% training error, 0.03 at 10% (best; its test error is worse than
    0.1's, which must not matter), 0.01 failed before writing anything, 0.3 diverged (nan),
    and job 4 has no metrics rows."""

    def job(lr, train, test, error=None):
        r = rows([100, 200], [30.0, 60.0], train, test_error=test) if train else None
        cfg = config("cifar10_sgd", lr=lr) if train else None
        return (cfg, r, error, ["experiment=cifar10_sgd", f"optimizer.lr={lr}"])

    root = write_sweep(
        tmp_path / "sweep",
        [
            job(0.1, [0.5, 0.3], [0.5, 0.2]),
            job(0.03, [0.4, 0.1], [0.5, 0.25]),
            job(0.01, None, None, error="config error: data not found; fix: dataset.root=<dir>"),
            job(0.3, [0.5, "nan"], [0.5, "nan"], error="training diverged at iteration 150"),
            job(0.003, None, None),
        ],
    )
    write_run(root / "4-experiment=cifar10_sgd,optimizer.lr=0.003", config("cifar10_sgd", lr=0.003), [])
    return root


def test_rows_mark_the_best_by_final_training_error(lr_sweep):
    rows_ = sweep_table.sweep_rows(sweep_table.load_sweep(lr_sweep))
    assert [r["lr"] for r in rows_] == [0.1, 0.03, 0.01, 0.3, 0.003]
    assert [r["best"] for r in rows_] == [False, True, False, False, False]
    assert [r["overrides"] for r in rows_][:2] == [
        "optimizer.lr=0.1",
        "optimizer.lr=0.03",
    ]  # shared ones hidden
    _, best, failed, diverged, empty = rows_
    assert (best["train_error"], best["test_error"], best["iters"], best["train_time_s"]) == (
        0.1,
        0.25,
        200,
        60.0,
    )
    assert best["train_nll"] == pytest.approx(0.6) and best["status"] == "ok"
    assert failed["status"] == "failed: config error: data not found; fix: dataset.root=<dir>"
    assert failed["iters"] is None and failed["train_error"] is None  # nothing logged
    assert diverged["status"] == "failed: training diverged at iteration 150"
    assert math.isnan(diverged["train_error"]) and diverged["iters"] == 200  # logged as "nan"
    assert empty["status"].startswith("failed: no metrics rows")


def test_main_prints_table_best_dir_and_writes_files(lr_sweep, tmp_path, capsys):
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    sweep_table.main([str(lr_sweep), "--markdown", str(md), "--json", str(js)])
    out = capsys.readouterr().out
    assert "5 job(s), 3 failed" in out
    assert (
        f"best (lowest final train/error): {lr_sweep / '1-experiment=cifar10_sgd,optimizer.lr=0.03'}" in out
    )
    table = parse_markdown_table(md.read_text())
    assert [r["best"] for r in table] == ["", "*", "", "", ""]
    assert table[1]["train error"] == "10.00%" and table[1]["train time (min)"] == "1.00"
    assert table[2]["train error"] == "-" and table[2]["status"].startswith("failed: config error")
    assert table[3]["train error"] == "nan" and table[1]["job"] == "1"
    payload = json.loads(js.read_text())
    assert [j["best"] for j in payload["jobs"]] == [False, True, False, False, False]
    assert payload["jobs"][3]["train_error"] is None  # NaN is written as null


def test_other_metric_and_no_best(lr_sweep, tmp_path, capsys):
    rows_ = sweep_table.sweep_rows(sweep_table.load_sweep(lr_sweep), metric="test/error")
    assert [r["best"] for r in rows_] == [True, False, False, False, False]
    only_failed = write_sweep(tmp_path / "bad", [(None, None, "boom", ["optimizer.lr=1"])])
    sweep_table.main([str(only_failed)])
    assert "best: none" in capsys.readouterr().out


def test_bad_inputs_exit_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^sweep_table: .* is not a directory"):
        sweep_table.main([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^sweep_table: no job directories found"):
        sweep_table.main([str(tmp_path / "empty")])
    run = write_run(tmp_path / "run", config("x"), rows([1], [1.0], [0.5]))
    with pytest.raises(SystemExit, match=r"^sweep_table: .* is a single run directory"):
        sweep_table.main([str(run)])
