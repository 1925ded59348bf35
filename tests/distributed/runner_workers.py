"""The runner on spawned gloo ranks, in-process (``RANK``/``WORLD_SIZE`` set as torchrun would)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from tests.distributed.workers import free_port


def _body(
    rank: int, world: int, port: int, cfg_yaml: str, run_dir: str, out: str, nan_at: int | None
) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    torch.set_num_threads(1)
    from kfcrun import train as train_module

    if nan_at is not None and rank == 1:  # a non-finite loss on rank 1 only
        step = train_module.Trainer.train_step

        def poisoned(self: Any) -> torch.Tensor:
            loss = step(self)
            return loss * float("nan") if self.iteration == nan_at else loss

        train_module.Trainer.train_step = poisoned  # type: ignore[method-assign]
    cfg = OmegaConf.create(cfg_yaml)
    # every rank but 0 is handed a directory of its own: it must use rank 0's and write nothing
    mine = run_dir if rank == 0 else f"{run_dir}-rank{rank}"
    result: dict[str, Any] = {"rank": rank}
    try:
        train_module.train(cfg, mine)
        result["outcome"] = "done"
    except Exception as err:
        result["outcome"] = type(err).__name__
        result["message"] = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def train_ranks(world: int, cfg_yaml: str, run_dir: Path, out: Path, nan_at: int | None = None) -> list[dict]:
    """``kfcrun.train.train`` on ``world`` spawned ranks; every rank's outcome."""
    out.mkdir(parents=True, exist_ok=True)
    args = (world, free_port(), cfg_yaml, str(run_dir), str(out), nan_at)
    torch.multiprocessing.spawn(_body, args=args, nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
