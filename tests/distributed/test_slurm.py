"""The Slurm launcher config composes, and a submitit Slurm task forms the process group like torchrun."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from kfcrun.cli import _compose
from tests.distributed.workers import free_port

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
