"""``torchrun --nproc_per_node=2 -m kfcrun``: end to end, and a killed rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers.runs import TINY, checkpoint_iteration, kfcrun_lines, train_in_process, wait_until


def _torchrun(args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update({"KFCRUN_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.Popen(
        [*command, "-m", "kfcrun", *args, "trainer.progress=false"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_torchrun_smoke_on_two_processes(tmp_path: Path, cache_dir: Path):
    run = tmp_path / "run"
    proc = _torchrun(["experiment=smoke", *TINY, f"hydra.run.dir={run}"], tmp_path, cache_dir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert len([line for line in out.splitlines() if line.startswith("kfcrun: smoke done")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # rank 1 created nothing
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    # SGD on 2 ranks with global batch 64 is SGD on one process with batch 64 (float32 sums)
    one = train_in_process(tmp_path / "one", cache_dir)
    two_row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    one_row = json.loads((one / "metrics.jsonl").read_text().splitlines()[-1])
    assert two_row["iter"] == one_row["iter"] == 4
    assert two_row["train/nll"] == pytest.approx(one_row["train/nll"], rel=1e-5)
    assert two_row["train/nll"] != pytest.approx(
        json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["train/nll"], rel=1e-9
    )


@pytest.mark.slow
def test_a_bad_config_under_torchrun_is_one_line_and_no_directory(tmp_path: Path, cache_dir: Path):
    proc = _torchrun(
        ["experiment=smoke", "trainer.batch_size=63", f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
        cache_dir,
    )
    _, err = proc.communicate(timeout=600)
    assert proc.returncode != 0
    lines = kfcrun_lines(err)
    assert len(lines) == 1 and "multiple of the 2 ranks" in lines[0], err[-2000:]
    assert not (tmp_path / "run").exists()


def _rank_pid(parent: int, rank: int) -> int:
    children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent)], capture_output=True, text=True)
    for pid in children.stdout.split():
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} under {parent}")


@pytest.mark.slow
def test_killing_one_rank_ends_the_job_and_resume_continues(tmp_path: Path, cache_dir: Path):
    run = tmp_path / "run"
    args = [
        "experiment=smoke",
        "trainer.max_iters=2000",
        "trainer.checkpoint_every=2",
        f"hydra.run.dir={run}",
    ]
    proc = _torchrun(args, tmp_path, cache_dir)
    wait_until(proc, lambda: checkpoint_iteration(run) >= 4, timeout=600)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    lines = kfcrun_lines(err)
    assert any("lost contact with another rank" in line or "stopped by SIGTERM" in line for line in lines), (
        err
    )
    assert any("resume with: kfcrun resume=" in line for line in lines)
    stopped_at = checkpoint_iteration(run)
    resumed = _torchrun([f"resume={run}", f"trainer.max_iters={stopped_at + 4}"], tmp_path, cache_dir)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert checkpoint_iteration(run) == stopped_at + 4
