#!/usr/bin/env python
"""Data-parallel cost: step time and bytes communicated per step, SGD and KFC-pre, 1 and P CPU ranks.

For each method (SGD; KFC-pre with ``grad_worker_fraction`` 1 and 0) on the paper's
cuda-convnet (settings of ``cifar10_sgd`` / ``cifar10_kfc``), at global batch ``B``:

* **1 rank, batch B** and **1 rank, batch B/P** (the work one of P ranks does, no communication);
* **P ranks (gloo), global batch B**: the mean step time (rank 0's clock), the payload
  bytes each rank puts into collectives per step, by purpose (gradients through DDP,
  factor statistics, inverses or solutions, ``nu``, the per-step control all-reduce), and
  the seconds spent waiting in the blocking ones.

The communication share is ``1 - t(1 rank, B/P) / t(P ranks, B)``: the part of a
data-parallel step that is not the rank's own compute (collectives, waiting for the
slower rank). On a machine with fewer free cores than ``P`` this is not a speed-up
measurement, and other processes inflate it; the bytes are exact. KFC-pre steps are
averaged over whole ``lcm(T_s, T_f)`` cycles (statistics and inverse steps included).
Inputs are random tensors of CIFAR-10's shape. Example (this machine: 2 cores)::

    flock /tmp/kfcrun-measure.lock python scripts/bench_distributed.py --ranks 2 --batch 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kfcrun.builders import build_model, build_optimizer
from kfcrun.cli import compose_run_config
from kfcrun.distributed import DataParallelCurvatureComm, DistributedContext, wrap_data_parallel
from kfcrun.optim import KFCPre

METHODS = {
    "sgd": ("cifar10_sgd", []),
    "kfc_pre f=1": ("cifar10_kfc", ["optimizer.grad_worker_fraction=1.0"]),
    "kfc_pre f=0": ("cifar10_kfc", ["optimizer.grad_worker_fraction=0.0"]),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(rank: int, world: int, port: int, method: str, batch: int, steps: int, out: str) -> None:
    """``steps`` timed steps (after warm-up) of ``method`` at global ``batch`` on ``world`` ranks."""
    torch.set_num_threads(1)
    experiment, overrides = METHODS[method]
    cfg = compose_run_config([f"experiment={experiment}", f"trainer.batch_size={batch}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.dataset)
    opt: Any = build_optimizer(cfg.optimizer, model, batch, seed=0)
    train_model = model
    ctx = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ctx = DistributedContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
        if isinstance(opt, KFCPre):
            opt.distribute(DataParallelCurvatureComm(ctx, opt.curvature.blocks, opt.grad_worker_fraction))
        train_model = wrap_data_parallel(model, ctx)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g) * 60.0
    y = torch.randint(0, 10, (batch,), generator=g)
    xl, yl = x[rank::world], y[rank::world]
    if isinstance(opt, KFCPre):
        opt.initialize([xl])  # factors and inverses exist before the timed steps
    warmup = 2

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(train_model(xl), yl)
        loss.backward()
        opt.step(inputs=xl)
        if ctx is not None:  # the runner's per-step agreement (loss, stop flags)
            ctx.all_reduce(torch.tensor([float(loss.detach()), 0.0, 0.0], dtype=torch.float64), "control")

    for _ in range(warmup):
        step()
    if ctx is not None:
        ctx.log.reset()
        dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    if ctx is not None:
        dist.barrier()
    result = {
        "step_s": seconds,
        "bytes_per_step": {k: v / steps for k, v in (ctx.log.bytes.items() if ctx else [])},
        "calls_per_step": {k: v / steps for k, v in (ctx.log.calls.items() if ctx else [])},
        "blocking_s_per_step": {k: v / steps for k, v in (ctx.log.seconds.items() if ctx else [])},
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    if ctx is not None:
        dist.destroy_process_group()


def run(method: str, world: int, batch: int, steps: int, tmp: Path) -> dict[str, Any]:
    folder = tmp / f"{method.replace(' ', '_')}-{world}-{batch}"
    folder.mkdir(parents=True, exist_ok=True)
    if world == 1:
        measure(0, 1, 0, method, batch, steps, str(folder))
    else:
        torch.multiprocessing.spawn(
            measure, args=(world, _port(), method, batch, steps, str(folder)), nprocs=world, join=True
        )
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
    out = ranks[0]
    out["bytes_per_step"] = {
        k: sum(r["bytes_per_step"].get(k, 0.0) for r in ranks) / world for k in out["bytes_per_step"]
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256, help="global mini-batch")
    parser.add_argument("--cycles", type=int, default=1, help="KFC-pre: whole lcm(T_s, T_f) cycles timed")
    parser.add_argument("--sgd-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_distributed.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    kfc = compose_run_config(["experiment=cifar10_kfc"]).optimizer
    cycle = math.lcm(int(kfc.stats_every), int(kfc.inverse_every))
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed_{os.getpid()}"
    rows = []
    for method in METHODS:
        steps = args.sgd_steps if method == "sgd" else cycle * args.cycles
        single = run(method, 1, args.batch, steps, tmp)
        part = run(method, 1, args.batch // args.ranks, steps, tmp)
        multi = run(method, args.ranks, args.batch, steps, tmp)
        total_bytes = sum(multi["bytes_per_step"].values())
        rows.append(
            {
                "method": method,
                "steps_timed": steps,
                "step_s_1rank_B": single["step_s"],
                f"step_s_1rank_B/{args.ranks}": part["step_s"],
                f"step_s_{args.ranks}ranks_B": multi["step_s"],
                "comm_share": 1.0 - part["step_s"] / multi["step_s"],
                "bytes_per_step_per_rank": multi["bytes_per_step"],
                "total_bytes_per_step_per_rank": total_bytes,
                "calls_per_step": multi["calls_per_step"],
                "blocking_s_per_step": multi["blocking_s_per_step"],
            }
        )
    header = f"{'method':<13} {'1r,B s':>8} {'1r,B/P s':>9} {'Pr,B s':>8} {'comm':>6} {'MB/step/rank':>13}"
    print(f"global batch {args.batch}, P = {args.ranks} gloo ranks on CPU ({os.cpu_count()} cores)")
    print(header + "  by purpose")
    for r in rows:
        parts = ", ".join(f"{k} {v / 1e6:.3f}" for k, v in sorted(r["bytes_per_step_per_rank"].items()))
        print(
            f"{r['method']:<13} {r['step_s_1rank_B']:>8.3f} {r[f'step_s_1rank_B/{args.ranks}']:>9.3f} "
            f"{r[f'step_s_{args.ranks}ranks_B']:>8.3f} {100 * r['comm_share']:>5.0f}% "
            f"{r['total_bytes_per_step_per_rank'] / 1e6:>13.3f}  {parts}"
        )
    payload = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "ranks": args.ranks,
        "batch": args.batch,
        "kfc_cycle": cycle,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
