"""scripts/reproduce_cpu.sh passes its settings to the runs it starts, and refuses bad ones in one line.

``KFCRUN`` and ``PYTHON`` are replaced by a recorder that writes its arguments, so the script's
command lines are checked without training anything.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.configs import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "reproduce_cpu.sh"


def _run(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    data = tmp_path / "cifar10"
    (data / "train").mkdir(parents=True, exist_ok=True)
    calls = tmp_path / "calls"
    recorder = tmp_path / "record"
    # as PYTHON reading the sweep-picking program from stdin it answers one setting, as the real one would
    recorder.write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\t" "$@" >> {calls}\necho >> {calls}\n'
        'if [ "$1" = - ]; then cat > /dev/null; echo 0.5; fi\n'
    )
    recorder.chmod(0o755)
    env = {
        **os.environ,
        "KFCRUN": str(recorder),
        "PYTHON": str(recorder),
        "KFCRUN_CIFAR10_DIR": str(data),
        "OUT": str(tmp_path / "out"),
        **settings,
    }
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, [line.rstrip("\t").split("\t") for line in lines]


def _kfc_run(calls: list[list[str]]) -> list[str]:
    (kfc,) = [c for c in calls if "experiment=cifar10_kfc" in c and "-m" not in c]
    return kfc


def test_default_kfc_run_is_the_papers_batch_with_one_evaluation_per_epoch(tmp_path: Path):
    result, calls = _run(tmp_path, SGD_LR="0.003", KFC_LR="0.03", KFC_DAMPING="1.0")
    assert result.returncode == 0, result.stderr
    kfc = _kfc_run(calls)
    assert {"trainer.batch_size=512", "trainer.eval_every=97"} <= set(kfc)
    assert {"optimizer.lr=0.03", "optimizer.damping=1.0"} <= set(kfc)
    (sgd,) = [c for c in calls if "experiment=cifar10_sgd" in c]
    assert {"optimizer.lr=0.003", "trainer.eval_every=780"} <= set(sgd)
    assert not any("-m" in c for c in calls)  # the sweeps are skipped when all three settings are given


def test_kfc_batch_scales_the_evaluation_period_by_examples(tmp_path: Path):
    result, calls = _run(tmp_path, SGD_LR="0.003", KFC_LR="0.01", KFC_DAMPING="1.0", KFC_BATCH="128")
    assert result.returncode == 0, result.stderr
    assert {"trainer.batch_size=128", "trainer.eval_every=388"} <= set(_kfc_run(calls))


def test_sweeps_keep_the_examples_per_job_and_take_the_grids(tmp_path: Path):
    result, calls = _run(tmp_path, KFC_BATCH="128", KFC_LR_GRID="0.03,0.01", KFC_DAMPING_GRID="1.0,0.3")
    assert result.returncode == 0, result.stderr
    (kfc_sweep,) = [c for c in calls if "-m" in c and "experiment=cifar10_kfc" in c]
    assert {"trainer.batch_size=128", "trainer.max_iters=1200", "optimizer.lr=0.03,0.01"} <= set(kfc_sweep)
    assert "optimizer.damping=1.0,0.3" in kfc_sweep
    assert {"optimizer.lr=0.5", "optimizer.damping=0.5"} <= set(_kfc_run(calls))  # what the sweeps picked


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"KFC_BATCH": "1000"}, "KFC_BATCH=1000 must be a whole number dividing 153,600"),
        ({"KFC_BATCH": "abc"}, "KFC_BATCH=abc must be a whole number dividing 153,600"),
        ({"KFC_BATCH": "0"}, "KFC_BATCH=0 must be a whole number dividing 153,600"),
        ({"SGD_LR": "0.003"}, "set all of SGD_LR, KFC_LR and KFC_DAMPING"),
    ],
)
def test_bad_settings_stop_with_one_line_before_any_run(
    tmp_path: Path, settings: dict[str, str], message: str
):
    result, calls = _run(tmp_path, **settings)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr
    assert calls == []
