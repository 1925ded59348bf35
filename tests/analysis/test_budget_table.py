"""scripts/budget_table.py: runs with the same optimizer and lr stay apart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from .fake_runs import config, rows, write_run

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "budget_table.py"


@pytest.fixture(scope="module")
def budget_table():
    spec = importlib.util.spec_from_file_location("budget_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_same_optimizer_and_lr_get_one_column_each(budget_table, tmp_path, monkeypatch, capsys):
    """1 process vs 2 ranks: same config, so the labels would collide; both runs must appear."""
    one = write_run(
        tmp_path / "kfc_1",
        config("cifar10_bs4096_kfc", "kfc_pre", lr=0.1),
        rows([5, 10], [8.0, 16.0], [0.8, 0.6]),
    )
    two = write_run(
        tmp_path / "kfc_2",
        config("cifar10_bs4096_kfc", "kfc_pre", lr=0.1),
        rows([5, 10], [9.0, 18.0], [0.8, 0.61]),
    )
    out = tmp_path / "table.md"
    monkeypatch.setattr(
        sys, "argv", ["budget_table.py", str(one), str(two), "--metrics", "train/error", "--out", str(out)]
    )
    budget_table.main()
    text = out.read_text()
    assert "| iter | kfc_pre lr=0.1 [kfc_1]: train/error | kfc_pre lr=0.1 [kfc_2]: train/error |" in text
    assert "| 10 | 0.600 | 0.610 |" in text
    assert capsys.readouterr().out.strip() == text.strip()
