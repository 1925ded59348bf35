"""kfcrun.analysis.adaptation: per-step statistics read back from TensorBoard and drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from kfcrun.analysis import adaptation
from kfcrun.analysis.runs import AnalysisError


def write_stats(run_dir, values: dict[str, list[float]], start: int = 1) -> None:
    writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    for name, series in values.items():
        for offset, value in enumerate(series):
            writer.add_scalar(f"kfc/{name}", value, global_step=start + offset)
    writer.close()


def test_read_step_stats_returns_what_was_logged(tmp_path):
    write_stats(tmp_path, {"alpha": [0.5, 0.25, 0.125], "lambda": [1.0, 0.5, 0.25]})
    stats = adaptation.read_step_stats(tmp_path, ["alpha", "lambda", "rho"])
    assert set(stats) == {"alpha", "lambda"}  # rho was not logged
    steps, values = stats["alpha"]
    assert steps.tolist() == [1.0, 2.0, 3.0] and values.tolist() == [0.5, 0.25, 0.125]


def test_plot_writes_a_png_with_one_panel_per_logged_stat(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    write_stats(runs[0], {s: [1.0, 2.0, 3.0] for s in adaptation.KFAC_STATS})
    write_stats(runs[1], {"alpha": [0.1, 0.2], "rho": [0.9, math.inf]})
    out = adaptation.plot_adaptation(runs, tmp_path / "fig" / "adaptation.png", labels=["g1", "g1e-3"])
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(AnalysisError, match="none of"):
        adaptation.plot_adaptation(runs, tmp_path / "x.png", stats=["clip_factor"])
    with pytest.raises(AnalysisError, match="labels"):
        adaptation.plot_adaptation(runs, tmp_path / "x.png", labels=["one"])


def test_moving_average_skips_non_finite_values():
    values = np.array([1.0, 3.0, -math.inf, 5.0])
    assert adaptation.moving_average(values, 2).tolist() == [1.0, 2.0, 3.0, 5.0]
    assert adaptation.moving_average(values, 1) is values


def test_cli(tmp_path, capsys):
    write_stats(tmp_path / "run", {"alpha": [1.0, 2.0]})
    path = adaptation.main([str(tmp_path / "run"), "--out", str(tmp_path / "a.png"), "--stats", "alpha"])
    assert path.is_file() and "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no tensorboard"):
        adaptation.main([str(tmp_path / "missing"), "--out", str(tmp_path / "b.png")])
