#!/usr/bin/env python
"""Factor-statistics benchmark: kfcrun against ASDL, curvlinops and BackPACK, in one run.

Each row times one Kronecker-factor statistics pass on the same network, batch, device
and threads: forward, a backward with targets sampled from the model (one Monte-Carlo
sample per example), and the per-layer factors (Omega/A and Gamma/G). Ratios are to the
median of one SGD step (forward, backward, update) measured in the same process.

* ``kfcrun``: :meth:`KFCCurvature.estimate_statistics` (conv Omega by the default
  ``omega_method="auto"``: row lags for the stride-1 convs); ``kfcrun (patch Omega)``:
  the same with ``omega_method="patch"``, the patch GEMM.
* ``ASDL`` (``asdfghjkl``): ``FisherMCCrossEntropy`` with ``fisher_shapes=["kron"]``.
* ``curvlinops`` (``curvlinops-for-pytorch``): ``KFACLinearOperator(fisher_type="mc",
  kfac_approx="expand").compute_kronecker_factors()``.
* ``BackPACK`` (``backpack-for-pytorch``): ``KFAC(mc_samples=1)``. BackPACK needs a
  derivative for every module on the path, and it has none for the response
  normalization or for ``ceil_mode`` pools, so its row runs on a variant of the network
  without the two ``rnorm`` layers and with padded pools (:func:`backpack_variant`).

The peers are optional: ``pip install -e .[bench]``; a missing one is reported as such.
Example::

    python scripts/bench_peers.py --batch-sizes 512 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.builders import build_model
from kfcrun.cli import compose_run_config
from kfcrun.curvature import KFCCurvature

#: Std of the preprocessed pixels the cuda-convnet experiments feed the network.
INPUT_STD = 60.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int) -> list[float]:
    """Wall seconds of ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def kfcrun_stats(model: nn.Module, x: torch.Tensor, omega_method: str) -> Callable[[], object]:
    curvature = KFCCurvature(model, omega_method=omega_method)
    g = torch.Generator(device=x.device).manual_seed(0)
    return lambda: curvature.estimate_statistics(x, generator=g)


def asdl_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    asdl = importlib.import_module("asdl")
    config = asdl.FisherConfig(
        fisher_type=asdl.FISHER_MC,
        fisher_shapes=[asdl.SHAPE_KRON],
        loss_type=asdl.LOSS_CROSS_ENTROPY,
        data_size=x.shape[0],
        n_mc_samples=1,
    )
    maker = asdl.get_fisher_maker(model, config)
    dummy = maker.setup_model_call(model, x)
    maker.setup_loss_call(F.cross_entropy, dummy, y)
    return maker.forward_and_backward


def curvlinops_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    kfac = importlib.import_module("curvlinops").KFACLinearOperator
    params = [p for p in model.parameters() if p.requires_grad]
    op = kfac(
        model,
        nn.CrossEntropyLoss(reduction="mean"),
        params,
        [(x, y)],
        fisher_type="mc",
        mc_samples=1,
        kfac_approx="expand",
        check_deterministic=False,
    )
    return op.compute_kronecker_factors


def backpack_variant(model: nn.Module) -> nn.Module:
    """The network as an ``nn.Sequential`` without its response normalizations and identities.

    BackPACK extends only ``nn.Sequential`` containers of modules it has derivatives for;
    the response normalization is not one, and its pooling derivatives do not support
    ``ceil_mode``, so the 3x3/2 pools become ``padding=1`` pools with the same output sizes
    (32 -> 16 -> 8 -> 4). The children are declared in forward order.
    """
    layers: list[nn.Module] = []
    for name, module in model.named_children():
        if "rnorm" in name or isinstance(module, nn.Identity):
            continue
        if isinstance(module, nn.MaxPool2d):
            module = nn.MaxPool2d(3, stride=2, padding=1)
        elif isinstance(module, nn.AvgPool2d):
            module = nn.AvgPool2d(3, stride=2, padding=1)  # BackPACK needs count_include_pad
        layers.append(copy.deepcopy(module))
    return nn.Sequential(*layers)


def backpack_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    backpack = importlib.import_module("backpack")
    kfac = importlib.import_module("backpack.extensions").KFAC
    net = backpack.extend(backpack_variant(model))
    loss_fn = backpack.extend(nn.CrossEntropyLoss())

    def run() -> None:
        net.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        with backpack.backpack(kfac(mc_samples=1)):
            loss.backward()

    return run


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], object]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return run


PEERS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], Callable[[], object]]] = {
    "ASDL": asdl_stats,
    "curvlinops": curvlinops_stats,
    "BackPACK (variant)": backpack_stats,
}


def measure(batch: int, device: torch.device, reps: int, warmup: int, peers: list[str]) -> dict:
    torch.manual_seed(0)
    cfg = compose_run_config(["experiment=cifar10_kfc", f"trainer.batch_size={batch}"])
    model = build_model(cfg.model, cfg.dataset).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).mul_(INPUT_STD).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    runs: dict[str, Callable[[], object]] = {
        "SGD step": sgd_step(copy.deepcopy(model), x, y),
        "kfcrun": kfcrun_stats(model, x, "auto"),
        "kfcrun (patch Omega)": kfcrun_stats(model, x, "patch"),
    }
    missing = {}
    for label in peers:
        try:
            runs[label] = PEERS[label](copy.deepcopy(model), x, y)
        except ImportError as err:  # an optional peer that is not installed
            missing[label] = f"not installed ({err}); pip install -e .[bench]"
    # Interleave the methods round by round so that load changes hit them alike.
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for _ in range(reps):
        for name, fn in runs.items():
            times[name] += timed(fn, device, 1, 0)
    sgd = statistics.median(times["SGD step"])
    rows = {
        name: {"median_s": statistics.median(t), "min_s": min(t), "ratio_to_sgd": statistics.median(t) / sgd}
        for name, t in times.items()
    }
    peer_medians = [rows[p]["median_s"] for p in peers if p in rows]
    fastest = min(peer_medians) if peer_medians else float("nan")
    for name in ("kfcrun", "kfcrun (patch Omega)"):
        rows[name]["ratio_to_fastest_peer"] = rows[name]["median_s"] / fastest
    return {"batch_size": batch, "rows": rows, "missing": missing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_peers.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = [measure(b, device, args.reps, args.warmup, args.peers) for b in args.batch_sizes]

    device_desc = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({device_desc}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("network: cuda-convnet layers-18pct (cifar10_kfc), float32")
    print("statistics = forward + sampled backward + factors")
    for result in results:
        print(f"\nbatch {result['batch_size']}: median of {args.reps} (interleaved), ratio to one SGD step")
        print(f"{'method':<22} {'median ms':>10} {'min ms':>8} {'x SGD':>6} {'x fastest peer':>15}")
        for name, row in result["rows"].items():
            peer_ratio = row.get("ratio_to_fastest_peer")
            peer_col = f"{peer_ratio:15.2f}" if peer_ratio is not None else " " * 15
            print(
                f"{name:<22} {1000 * row['median_s']:10.1f} {1000 * row['min_s']:8.1f} "
                f"{row['ratio_to_sgd']:6.2f} {peer_col}"
            )
        for name, why in result["missing"].items():
            print(f"{name:<22} {why}")
    versions = {}
    for package in ("asdfghjkl", "curvlinops-for-pytorch", "backpack-for-pytorch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    payload = {
        "device": str(device),
        "device_name": device_desc,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peer_versions": versions,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
