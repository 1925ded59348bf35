"""kfcrun.analysis.figures: what the paper's Figs. 3-5 contain, and that PNG + PDF files are written."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from kfcrun.analysis import figures
from kfcrun.analysis.runs import load_runs

from .fake_runs import KFC_ROWS, SGD_ROWS, config, rows, write_run, write_sweep

SCRIPTS = Path(figures.__file__).resolve().parents[2] / "scripts"


def lines_by_gid(fig) -> dict[str, object]:
    return {line.get_gid(): line for ax in fig.axes for line in ax.get_lines() if line.get_gid()}


@pytest.fixture
def pair(tmp_path):
    sgd = write_run(tmp_path / "sgd", config("cifar10_sgd"), SGD_ROWS)
    kfc = write_run(tmp_path / "kfc", config("cifar10_kfc", "kfc_pre", batch_size=512), KFC_ROWS)
    return load_runs([sgd, kfc])


def test_time_figure_has_nll_and_error_panels_with_paper_line_styles(pair):
    groups = figures.select_groups(pair)
    fig = figures.plot_figure(groups, "time", published=figures.published_error(groups), log_nll=True)
    ax_nll, ax_err = fig.axes
    lines = lines_by_gid(fig)
    expected = [
        f"{label}|{split}/{q}"
        for label in ("SGD, batch 128", "KFC-pre, batch 512")  # batch sizes differ -> in the label
        for split in ("train", "test")
        for q in ("nll", "error")
    ]
    assert sorted(lines) == sorted([*expected, "published"])
    assert lines["SGD, batch 128|train/error"].get_linestyle() == "--"  # training dashed
    assert lines["SGD, batch 128|test/error"].get_linestyle() == "-"  # test solid
    assert lines["SGD, batch 128|train/error"].get_color() == lines["SGD, batch 128|test/nll"].get_color()
    assert (
        lines["SGD, batch 128|train/error"].get_color() != lines["KFC-pre, batch 512|train/error"].get_color()
    )
    # x is training time in minutes; y the logged values
    np.testing.assert_allclose(
        lines["KFC-pre, batch 512|train/error"].get_xdata(), [70 / 60, 140 / 60, 200 / 60, 280 / 60]
    )
    np.testing.assert_allclose(lines["KFC-pre, batch 512|train/error"].get_ydata(), [0.5, 0.35, 0.25, 0.08])
    # the published CIFAR-10 error (18%) as a horizontal line on the error panel only
    assert lines["published"] in ax_err.get_lines() and list(lines["published"].get_ydata()) == [0.18, 0.18]
    assert ax_nll.get_yscale() == "log" and ax_err.get_yscale() == "linear"
    assert len(ax_nll.get_lines()) == 4 and len(ax_err.get_lines()) == 5
    assert "published test error (18%)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_iterations_figure_plots_error_against_updates(pair):
    fig = figures.plot_figure(figures.select_groups(pair), "iters", published=None)
    (ax,) = fig.axes
    lines = lines_by_gid(fig)
    assert len(ax.get_lines()) == 4 and "published" not in lines
    np.testing.assert_array_equal(lines["SGD, batch 128|test/error"].get_xdata(), [1000, 2000, 3000, 4000])
    assert ax.get_xlabel() == "iterations (weight updates)"


def test_seeds_are_drawn_as_mean_and_band(tmp_path):
    paths = [
        write_run(
            tmp_path / f"s{i}",
            config("svhn_sgd", seed=i, dataset="svhn"),
            rows([1, 2], [60.0 * (i + 1), 120.0 * (i + 1)], e),
        )
        for i, e in enumerate([[0.5, 0.3], [0.8, 0.1], [0.5, 0.2]])
    ]
    groups = figures.select_groups(load_runs(paths))
    assert len(groups) == 1 and len(groups[0]) == 3
    assert figures.published_error(groups) == 0.0278  # SVHN, Srivastava (2013)
    assert figures.published_error(groups, override=0.05) == 0.05
    # iteration 1: 0.5, 0.8, 0.5 (mean 0.6, sample std sqrt(0.03)); iteration 2: 0.3, 0.1, 0.2 (0.2, 0.1)
    for band, (lo, hi) in (("minmax", (0.1, 0.8)), ("std", (0.1, 0.6 + np.sqrt(0.03)))):
        fig = figures.plot_figure(groups, "time", band=band)
        line = lines_by_gid(fig)["SGD|train/error"]
        np.testing.assert_allclose(line.get_xdata(), [2.0, 4.0])  # mean time over seeds, minutes
        np.testing.assert_allclose(line.get_ydata(), [0.6, 0.2])
        bands = [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 4  # train + test, NLL + error
        band_poly = next(c for c in bands if c.get_gid() == "SGD|train/error|band")
        ys = band_poly.get_paths()[0].vertices[:, 1]
        np.testing.assert_allclose([ys.min(), ys.max()], [lo, hi])
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert legend[0] == f"SGD (mean of 3 seeds, {figures.BAND_TEXT[band]})"


def test_sweep_plots_best_run_per_method_unless_all(tmp_path):
    def job(lr, final):
        return (
            config("cifar10_sgd", lr=lr),
            rows([1, 2], [1.0, 2.0], [0.5, final]),
            None,
            [f"optimizer.lr={lr}"],
        )

    sweep = write_sweep(tmp_path / "sweep", [job(0.1, 0.3), job(0.03, 0.1), job(0.01, 0.2)])
    kfc = write_run(tmp_path / "kfc", config("cifar10_kfc", "kfc_pre"), rows([1, 2], [1.0, 2.0], [0.4, 0.05]))
    runs = load_runs([sweep, kfc])
    best = figures.select_groups(runs)
    assert [(g[0].method, g[0].lr) for g in best] == [("SGD", 0.03), ("KFC-pre", 0.01)]
    assert figures.curve_labels(best) == ["SGD", "KFC-pre"]
    everything = figures.select_groups(runs, all_runs=True)
    assert figures.curve_labels(everything) == ["SGD (lr=0.1)", "SGD (lr=0.03)", "SGD (lr=0.01)", "KFC-pre"]


def test_kind_and_stem_from_experiment_names(pair, tmp_path):
    assert figures.resolve_kind(pair, "auto") == ["time"]
    assert figures.resolve_kind(pair, "both") == ["time", "iters"]
    big = load_runs([write_run(tmp_path / "b", config("cifar10_bs4096_kfc", "kfc_pre"), KFC_ROWS)])
    assert figures.resolve_kind(big, "auto") == ["iters"]
    assert figures.default_stem(pair) == "cifar10" and figures.default_stem(big) == "cifar10_bs4096"


def test_main_writes_png_and_pdf_for_each_kind(pair, tmp_path, capsys):
    out = tmp_path / "figs"
    written = figures.main([str(pair[0].path), str(pair[1].path), "--out", str(out), "--kind", "both"])
    assert sorted(p.name for paths in written.values() for p in paths) == [
        "cifar10_iters.pdf",
        "cifar10_iters.png",
        "cifar10_time.pdf",
        "cifar10_time.png",
    ]
    for paths in written.values():
        png, pdf = paths
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1_000
    printed = capsys.readouterr().out
    assert "2 curve(s) plotted" in printed and "published test error line: 18.00%" in printed


def test_main_errors_exit_with_one_line(tmp_path, pair):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"^make_figures: no runs with metrics found in"):
        figures.main([str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"^make_figures: --published 18.0 is not a fraction"):
        figures.main([str(pair[0].path), "--published", "18"])


@pytest.mark.parametrize(
    ("script", "module"), [("make_figures", "figures"), ("report", "report"), ("sweep_table", "sweep")]
)
def test_scripts_are_thin_wrappers(script, module):
    spec = importlib.util.spec_from_file_location(f"script_{script}", f"{SCRIPTS}/{script}.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    target = importlib.import_module(f"kfcrun.analysis.{module}")
    assert loaded.main is target.main


def test_labels_prefer_informative_keys(tmp_path):
    a = write_run(tmp_path / "a", config("x_sgd", dataset="cifar10", lr=0.1), rows([1], [1.0], [0.5]))
    b = write_run(tmp_path / "b", config("x_sgd", dataset="svhn", lr=0.01), rows([1], [1.0], [0.5]))
    c = write_run(tmp_path / "c", config("y_sgd"), rows([1], [1.0], [0.5]))
    d = write_run(tmp_path / "d", config("z_sgd"), rows([1], [1.0], [0.5]))
    groups = figures.select_groups(load_runs([a, b]))
    assert figures.curve_labels(groups) == ["SGD (lr=0.1, dataset=cifar10)", "SGD (lr=0.01, dataset=svhn)"]
    assert figures.published_error(groups) is None  # mixed datasets: no single published value
    assert figures.curve_labels(figures.select_groups(load_runs([c, d]))) == [
        "SGD (name=y_sgd)",
        "SGD (name=z_sgd)",
    ]
