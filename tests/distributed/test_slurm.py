"""Launching through submitit: the Slurm config composes, a Slurm task forms the process group like
torchrun, and a sweep of data-parallel jobs runs on this machine through the local executor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kfcrun.cli import _compose
from tests.conftest import REPO_ROOT, run_cli
from tests.distributed.workers import free_port
from tests.helpers.runs import TINY, train_in_process

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'kfcrun[cluster]'")


def test_slurm_launcher_config_has_one_task_per_gpu():
    cfg = _compose(
        ["+cluster=slurm", "experiment=smoke", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4"]
    )
    launcher = cfg.hydra.launcher
    assert "submitit" in launcher._target_ and "Slurm" in launcher._target_
    assert OmegaConf.select(cfg, "hydra.launcher.tasks_per_node") == 4
    assert launcher.nodes == 2 and launcher.max_num_timeout == 3


def _slurm_task(rank: int, port: int, out: str) -> None:
    env = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank),
        "SLURM_NTASKS": "2",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": "4242",
        "MASTER_PORT": str(port),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        os.environ.pop(key, None)
    os.environ.update(env)
    from kfcrun import launch

    assert launch.is_follower() == (rank == 1)
    ctx = launch.context()
    assert ctx is not None and (ctx.rank, ctx.world_size) == (rank, 2)
    total = ctx.all_reduce(torch.tensor([float(rank + 1)]), "control")
    Path(out, f"{rank}").write_text(str(float(total)))
    ctx.close()


def test_a_slurm_task_joins_the_process_group_like_torchrun(tmp_path: Path):
    torch.multiprocessing.spawn(_slurm_task, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / str(r)).read_text() for r in range(2)] == ["3.0", "3.0"]


def _last_row(run: Path) -> dict:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])


def test_a_sweep_of_data_parallel_jobs_runs_through_the_local_executor(tmp_path: Path, cache_dir: Path):
    sweep = tmp_path / "sweep"
    lrs = ("0.003", "0.01")  # 0.003: experiment=smoke's own lr
    sweep_args = [f"optimizer.lr={','.join(lrs)}", f"hydra.sweep.dir={sweep}"]
    result = run_cli(
        ["-m", "+cluster=local", "experiment=smoke", *TINY, *sweep_args],
        tmp_path,
        cache_dir,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO_ROOT),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no task wrote outside the sweep
    jobs = [sweep / str(k) for k in range(len(lrs))]
    for job, lr in zip(jobs, lrs, strict=True):
        assert json.loads((job / "run.json").read_text())["world_size"] == 2
        assert OmegaConf.load(job / "config.yaml").optimizer.lr == float(lr)
        assert _last_row(job)["iter"] == 4
        # rank 1 shares rank 0's directory but leaves its log file to rank 0 (one completion line)
        assert (job / "kfcrun.log").read_text().count("Job completed successfully") == 1
    # each job is the one-process run with the same global batch (SGD: float32 sums), and the
    # values of the sweep reached their jobs
    one = train_in_process(tmp_path / "one", cache_dir)
    assert _last_row(jobs[0])["train/nll_current"] == pytest.approx(
        _last_row(one)["train/nll_current"], rel=1e-5
    )
    assert _last_row(jobs[1])["train/nll_current"] != pytest.approx(
        _last_row(one)["train/nll_current"], rel=1e-3
    )
