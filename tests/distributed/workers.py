"""Process bodies for the data-parallel tests (spawned with gloo on CPU; importable by the children)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kfcrun.distributed import DataParallelCurvatureComm, DistributedContext, wrap_data_parallel
from kfcrun.optim import KFAC, SGD, KFCPre
from kfcrun.optim.kfc_base import KFCOptimizerBase
from tests.helpers.nets import two_conv_net


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    )
    return net.double()


def data(steps: int, batch: int, init: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * batch + init, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (steps * batch + init,), generator=g)
    return x[init:], y[init:], x[:init]


def train(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    """``spec['steps']`` steps of global batch ``spec['batch']`` on ``world`` ranks; rank 0 writes ``out``."""
    torch.set_num_threads(1)
    ctx = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        ctx = DistributedContext(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls["all_reduce"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    net = bn_net() if spec.get("bn") else two_conv_net(0)
    steps, batch, init = spec["steps"], spec["batch"], spec.get("init", 0)
    if spec["method"] == "sgd":
        opt: Any = SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, avg_decay=0.9)
    elif spec["method"] == "kfac":
        opt = KFAC(
            net,
            weight_decay=1e-3,
            stats_every=2,
            inverse_every=3,
            lambda_every=2,
            gamma_every=4,
            stats_fraction=spec.get("stats_fraction", 0.5),
            avg_decay=0.9,
            seed=0,
            grad_worker_fraction=spec.get("fraction", 1.0),
        )
    else:
        opt = KFCPre(
            net,
            lr=0.05,
            weight_decay=1e-3,
            stats_every=2,
            inverse_every=3,
            stats_fraction=spec.get("stats_fraction", 0.5),
            nu_fraction=0.5,
            damping_mode=spec.get("damping_mode", "pi"),
            avg_decay=0.9,
            seed=0,
            grad_worker_fraction=spec.get("fraction", 1.0),
        )
    model: nn.Module = net
    stats_calls: list[int] = []
    if ctx is not None:
        if isinstance(opt, KFCOptimizerBase):
            comm = DataParallelCurvatureComm(ctx, opt.curvature.blocks, opt.grad_worker_fraction)
            opt.distribute(comm)
        model = wrap_data_parallel(net, ctx)
    if isinstance(opt, KFCOptimizerBase):
        update = opt.curvature.update_statistics

        def counted_update(*args: Any, **kwargs: Any) -> Any:
            before = calls["all_reduce"]
            result = update(*args, **kwargs)
            stats_calls.append(calls["all_reduce"] - before)
            return result

        opt.curvature.update_statistics = counted_update  # type: ignore[method-assign]
    x, y, x_init = data(steps, batch, init)
    if init and isinstance(opt, KFCOptimizerBase):
        opt.initialize(x_init[start : start + batch][rank::world] for start in range(0, init, batch))
    losses = []
    for k in range(steps):
        xb, yb = x[k * batch : (k + 1) * batch][rank::world], y[k * batch : (k + 1) * batch][rank::world]
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        closure = (lambda x=xb, y=yb: F.cross_entropy(net(x), y)) if spec["method"] == "kfac" else None
        opt.step(closure, inputs=xb)
        losses.append(float(loss.detach()))
    state = {name: p.detach().clone() for name, p in net.named_parameters()}
    extra = {}
    if isinstance(opt, KFCOptimizerBase):
        full = opt.state_dict()  # a collective with grad_worker_fraction=0
        extra["inverse_updates"] = opt.curvature.num_inverse_updates
        extra["has_all_inverses"] = all(
            v is not None for layer in full["curvature"]["layers"].values() for v in layer.values()
        )
    if rank == 0:
        torch.save(state, out)
        Path(out + ".json").write_text(json.dumps({"stats_calls": stats_calls, "losses": losses, **extra}))
    if ctx is not None:
        dist.barrier()
        dist.destroy_process_group()


def run(world: int, spec: dict[str, Any], out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Run :func:`train` on ``world`` spawned processes (or inline for 1); return rank 0's results."""
    if world == 1:
        train(0, 1, 0, spec, str(out))
    else:
        # One thread per spawned rank; set for the spawn only, so that the test process's later
        # subprocesses (the CLI tests) keep torch's default thread count.
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            torch.multiprocessing.spawn(
                train, args=(world, free_port(), spec, str(out)), nprocs=world, join=True
            )
        finally:
            if saved is None:
                del os.environ["OMP_NUM_THREADS"]
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    return torch.load(out), json.loads(Path(str(out) + ".json").read_text())
