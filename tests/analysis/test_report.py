"""kfcrun.analysis.report: pairing by name, threshold table cells, speed-ups, seed summaries, CLI."""

from __future__ import annotations

import pytest

from kfcrun.analysis import report
from kfcrun.analysis.runs import AnalysisError, load_runs

from .fake_runs import KFC_ROWS, SGD_ROWS, config, rows, write_run, write_sweep


def by_threshold(table_rows: list[list[str]]) -> dict[str, list[str]]:
    return {r[0]: r[1:] for r in table_rows}


@pytest.fixture
def pair_dirs(tmp_path):
    sgd = write_run(tmp_path / "sgd", config("cifar10_sgd", "sgd", lr=0.01), SGD_ROWS)
    kfc = write_run(tmp_path / "kfc", config("cifar10_kfc", "kfc_pre", lr=0.003, batch_size=512), KFC_ROWS)
    return sgd, kfc


def test_partner_names():
    assert report.partner_names("cifar10_sgd") == ["cifar10_kfc", "cifar10_kfac"]
    assert report.partner_names("cifar10_bs4096_kfc") == ["cifar10_bs4096_kfac"]
    assert report.partner_names("cifar10_bn_sgd") == ["cifar10_bn_kfc", "cifar10_bn_kfac"]
    assert report.partner_names("cifar10_kfac") == []
    assert report.partner_names("smoke") == []


def test_kfac_pairs_with_sgd_and_with_kfc_pre(tmp_path):
    paths = [
        write_run(tmp_path / "sgd", config("cifar10_sgd", "sgd", lr=0.01), SGD_ROWS),
        write_run(tmp_path / "kfc", config("cifar10_kfc", "kfc_pre", lr=0.003, batch_size=512), KFC_ROWS),
        write_run(tmp_path / "kfac", config("cifar10_kfac", "kfac", lr=None, batch_size=512), KFC_ROWS),
    ]
    pairs, unpaired = report.find_pairs(load_runs(paths))
    assert [(p.baseline_name, p.candidate_name) for p in pairs] == [
        ("cifar10_sgd", "cifar10_kfc"),
        ("cifar10_sgd", "cifar10_kfac"),
        ("cifar10_kfc", "cifar10_kfac"),
    ] and unpaired == []
    last = pairs[2]
    assert report.column_names(last) == ("KFC-pre", "K-FAC")
    final = by_threshold(report.final_rows(last)[1])
    assert final["learning rate"] == ["0.003", "adapted"]
    text = report.build_report(load_runs(paths))
    assert "## cifar10_kfc vs cifar10_kfac" in text and "## cifar10_sgd vs cifar10_kfac" in text


def test_threshold_table_cells(pair_dirs):
    (pair,), unpaired = report.find_pairs(load_runs(pair_dirs))
    assert (pair.baseline_name, pair.candidate_name, unpaired) == ("cifar10_sgd", "cifar10_kfc", [])
    headers, table = report.threshold_rows(pair, [0.3, 0.1, 0.05], [0.35, 0.25], time_unit="s")
    assert headers == [
        "threshold",
        "SGD time (s)",
        "KFC-pre time (s)",
        "speed-up (time)",
        "SGD iters",
        "KFC-pre iters",
        "speed-up (iters)",
    ]
    cells = by_threshold(table)
    # SGD 600 s / 3000 iterations vs KFC-pre 200 s / 150 iterations
    assert cells["train error ≤ 30%"] == ["600.00", "200.00", "3.00×", "3000", "150", "20.0×"]
    # only KFC-pre reaches 10%: SGD ran 800 s / 4000 iterations, so the speed-up is a lower bound
    assert cells["train error ≤ 10%"] == ["never", "280.00", "> 2.86×", "never", "200", "> 20.0×"]
    assert cells["train error ≤ 5%"] == ["never", "never", "—", "never", "never", "—"]
    # test error 35%: SGD at 600 s / 3000, KFC-pre at 200 s / 150 (0.3 <= 0.35; 0.4 is not)
    assert cells["test error ≤ 35%"] == ["600.00", "200.00", "3.00×", "3000", "150", "20.0×"]
    # test error 25%: only KFC-pre (21% at 280 s / 200 iterations)
    assert cells["test error ≤ 25%"] == ["never", "280.00", "> 2.86×", "never", "200", "> 20.0×"]


def test_speedup_upper_bound_when_only_the_baseline_reaches():
    s = report.summarize
    assert report.speedup(s([600.0]), s([None]), 800.0, 300.0) == "< 2.00×"
    assert report.speedup(s([600.0, 700.0]), s([None, 100.0]), 800.0, 300.0) == "—"  # partial seeds
    assert report.format_ratio(1234.0) == "1234×" and report.format_ratio(0.5) == "0.50×"


def test_final_table(pair_dirs):
    (pair,), _ = report.find_pairs(load_runs(pair_dirs))
    headers, table = report.final_rows(pair, time_unit="min")
    cells = by_threshold(table)
    assert headers == ["final (last evaluation)", "SGD", "KFC-pre"]
    assert cells["train error"] == ["20.00%", "8.00%"]
    assert cells["test error"] == ["28.00%", "21.00%"]
    assert cells["train NLL"] == ["0.7000", "0.5800"]
    assert cells["iterations"] == ["4000", "200"]
    assert cells["training time (min)"] == ["13.33", "4.67"]
    assert cells["learning rate"] == ["0.01", "0.003"]
    assert cells["batch size"] == ["128", "512"]


def test_seed_repetitions_are_summarized(tmp_path):
    # SGD seeds reach 30% training error at 500, 600, 700 s; KFC-pre seeds at 190, 210 s
    paths = []
    for seed, t in enumerate([500.0, 600.0, 700.0]):
        r = rows([1000, 2000], [t / 2, t], [0.5, 0.3])
        paths.append(write_run(tmp_path / f"sgd{seed}", config("c_sgd", seed=seed), r))
    for seed, t in enumerate([190.0, 210.0]):
        r = rows([100, 200], [t / 2, t], [0.5, 0.3])
        paths.append(write_run(tmp_path / f"kfc{seed}", config("c_kfc", "kfc_pre", seed=seed), r))
    (pair,), _ = report.find_pairs(load_runs(paths))
    cells = by_threshold(report.threshold_rows(pair, [0.3], [], time_unit="s")[1])
    assert cells["train error ≤ 30%"] == [
        "600.00 ± 100.00 (n=3)",
        "200.00 ± 14.14 (n=2)",
        "3.00×",
        "2000 ± 0 (n=3)",
        "200 ± 0 (n=2)",
        "10.0×",
    ]
    final = by_threshold(report.final_rows(pair)[1])
    assert final["seeds"] == ["0, 1, 2", "0, 1"] and final["runs"] == ["3", "2"]
    assert final["train error"] == ["30.00 ± 0.00% (n=3)", "30.00 ± 0.00% (n=2)"]


def test_some_seeds_never_reach(tmp_path):
    paths = [
        write_run(tmp_path / "a", config("c_sgd", seed=0), rows([1, 2], [10.0, 20.0], [0.5, 0.2])),
        write_run(tmp_path / "b", config("c_sgd", seed=1), rows([1, 2], [10.0, 20.0], [0.5, 0.4])),
        write_run(tmp_path / "k", config("c_kfc", "kfc_pre"), rows([1, 2], [5.0, 10.0], [0.5, 0.2])),
    ]
    (pair,), _ = report.find_pairs(load_runs(paths))
    cells = by_threshold(report.threshold_rows(pair, [0.3], [], time_unit="s")[1])
    assert cells["train error ≤ 30%"][:3] == ["20.00 ± 0.00 (1/2 reached)", "10.00", "—"]


def test_sweep_within_a_name_uses_the_best_lr(tmp_path):
    sweep = write_sweep(
        tmp_path / "sweep",
        [
            (config("c_sgd", lr=0.1), rows([1, 2], [1.0, 2.0], [0.5, 0.4]), None, ["optimizer.lr=0.1"]),
            (config("c_sgd", lr=0.03), rows([1, 2], [1.0, 2.0], [0.5, 0.1]), None, ["optimizer.lr=0.03"]),
        ],
    )
    kfc = write_run(tmp_path / "kfc", config("c_kfc", "kfc_pre"), rows([1], [1.0], [0.1]))
    (pair,), _ = report.find_pairs(load_runs([sweep, kfc]))
    assert [r.lr for r in pair.baseline] == [0.03]
    assert "2 settings found" in pair.notes[0] and "lr=0.03" in pair.notes[0]


def test_explicit_and_unknown_pairs(pair_dirs, tmp_path):
    other = write_run(tmp_path / "bn", config("cifar10_bn_sgd", batch_norm=True), SGD_ROWS)
    runs = load_runs([*pair_dirs, other])
    pairs, unpaired = report.find_pairs(runs)
    assert [(p.baseline_name, p.candidate_name) for p in pairs] == [("cifar10_sgd", "cifar10_kfc")]
    assert unpaired == ["cifar10_bn_sgd"]
    (pair,), unpaired = report.find_pairs(runs, [("cifar10_bn_sgd", "cifar10_kfc")])
    assert pair.baseline[0].method == "SGD + BN" and unpaired == ["cifar10_sgd"]
    with pytest.raises(AnalysisError, match="unknown run name 'nope' in --pair"):
        report.find_pairs(runs, [("nope", "cifar10_kfc")])
    with pytest.raises(AnalysisError, match="compares a run name with itself"):
        report.find_pairs(runs, [("cifar10_kfc", "cifar10_kfc")])
    with pytest.raises(AnalysisError, match="no SGD/KFC-pre/K-FAC pairs found"):
        report.find_pairs(load_runs([other]))


def test_main_prints_and_writes_the_markdown(pair_dirs, tmp_path, capsys):
    out = tmp_path / "r" / "report.md"
    text = report.main(
        [*map(str, pair_dirs), "--train-errors", "0.3", "--test-errors", "0.35", "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert text in printed and out.read_text() == text + "\n"
    assert "## cifar10_sgd vs cifar10_kfc" in text
    assert "19% test error in 3 min vs 9 min" in text and "300 updates" in text  # paper context
    table = report.parse_markdown_table(text.split("## cifar10_sgd vs cifar10_kfc")[1])
    assert [r["threshold"] for r in table] == ["train error ≤ 30%", "test error ≤ 35%"]
    assert table[0]["SGD time (min)"] == "10.00" and table[0]["KFC-pre time (min)"] == "3.33"
    assert table[0]["speed-up (time)"] == "3.00×" and table[0]["speed-up (iters)"] == "20.0×"


def test_main_default_thresholds_follow_the_dataset(pair_dirs):
    text = report.main([str(p) for p in pair_dirs])
    thresholds = [r["threshold"] for r in report.parse_markdown_table(text.split("## ")[1])]
    assert thresholds[-2:] == ["test error ≤ 19%", "test error ≤ 18%"] and "train error ≤ 6%" in thresholds


def test_main_errors_exit_with_one_line(tmp_path, pair_dirs):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SystemExit, match=r"^report: no runs with metrics found in"):
        report.main([str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match=r"^report: unknown run name 'x' in --pair"):
        report.main([*map(str, pair_dirs), "--pair", "x", "cifar10_kfc"])
    with pytest.raises(SystemExit, match=r"^report: --train-errors 30 is not a fraction"):
        report.main([*map(str, pair_dirs), "--train-errors", "30"])
