#!/usr/bin/env python
"""Step-time benchmark: SGD vs KFC-pre vs K-FAC on a CIFAR-10 network (cuda-convnet or ResNet-18).

For each batch size, in the same run and on the same device (each method in a fresh process):

* the median time of an SGD step (forward, backward, update, averaging);
* KFC-pre at the configured ``T_s``/``T_f`` (defaults: those of the model's KFC experiment,
  ``cifar10_kfc`` or ``cifar10_resnet18_kfc``):
  the median step, the AMORTIZED step (mean over whole ``lcm(T_s, T_f)`` cycles, which
  is what an epoch costs), and the seconds per step spent in each phase (statistics,
  inverses, preconditioning, ``nu``);
* KFC-pre with one speed option changed (``--variants``, :data:`VARIANTS`): the patch-GEMM
  Omega (the path before issue 13), statistics from the training pass, background inverses,
  ``nu`` on the paper's 1/4 of the batch (``cifar10_kfc`` uses 1/16);
  the step calls ``opt.backward(loss, logits)`` as the runner does;
* K-FAC with the settings of ``experiment=cifar10_kfac`` (``--no-kfac`` skips it): the same
  over whole ``lcm(T_s, T_f, T_1, T_2)`` cycles, with its phases (statistics, inverses,
  preconditioning, the quadratic model's exact-Fisher Gram matrix, ``rho``'s two forward
  passes); its step includes the loss closure the runner passes; and K-FAC with Appendix A.2's
  constants (:data:`KFAC_VARIANTS`), the cost of kfcrun's wider gamma search;
* the ratios to SGD, and peak memory (CUDA: peak allocated; CPU: the growth of
  the process's peak resident set over the model-only baseline, measured in a fresh
  subprocess per configuration).

The network, the optimizers' settings and the data scale come from the model's two
experiments (:data:`EXPERIMENTS`). Inputs are random tensors with the scale of the
experiment's preprocessed pixels (cuda-convnet: mean-subtracted on the 0-255 scale, std
~60; ResNet-18: standardized, std 1); the timings do not depend on the values. Example::

    python scripts/bench_step.py                       # batch 128 and 512, CPU or CUDA
    python scripts/bench_step.py --batch-sizes 512 --stats-fraction 0.5
    python scripts/bench_step.py --model resnet18 --batch-sizes 128 --cycles 1
    python scripts/bench_step.py --threads 1 --cpu-time     # on a machine others are using
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from kfcrun.builders import build_model, build_optimizer
from kfcrun.cli import compose_run_config
from kfcrun.optim.kfc_base import KFCOptimizerBase

#: KFC-pre settings that set its cost (App. A.3), overridable from the command line.
KFC_KNOBS = ("stats_every", "inverse_every", "stats_fraction", "nu_fraction", "clip")
#: model -> the experiment whose settings each method is benchmarked with.
EXPERIMENTS = {
    "cuda_convnet": {"sgd": "cifar10_sgd", "kfc_pre": "cifar10_kfc", "kfac": "cifar10_kfac"},
    "resnet18": {
        "sgd": "cifar10_resnet18_sgd",
        "kfc_pre": "cifar10_resnet18_kfc",
        "kfac": "cifar10_resnet18_kfac",
    },
}
#: Std of the preprocessed pixels each model's experiments feed it.
INPUT_STD = {"cuda_convnet": 60.0, "resnet18": 1.0}
#: Columns of the printed table, per method.
LABELS = {"sgd": "SGD", "kfc_pre": "KFC-pre", "kfac": "K-FAC"}
#: KFC-pre rows with one speed option changed from the experiment's settings (issue 13):
#: name -> (label, optimizer overrides). ``kfc_pre`` itself runs the defaults.
VARIANTS = {
    "kfc_pre_patch": ("KFC-pre, patch-GEMM Omega", {"omega_method": "patch"}),
    "kfc_pre_train_stats": ("KFC-pre, stats from training pass", {"stats_from_training": "true"}),
    "kfc_pre_async": ("KFC-pre, async inverses", {"async_inverses": "true"}),
    "kfc_pre_nu_quarter": ("KFC-pre, nu on 1/4 (App. A.1)", {"nu_fraction": "0.25"}),
    "kfc_pre_fast": (
        "KFC-pre, training-pass stats + async",
        {"stats_from_training": "true", "async_inverses": "true"},
    ),
}
LABELS |= {name: label for name, (label, _) in VARIANTS.items()}
# K-FAC with Appendix A.2's constants (three gamma candidates, lambda_- = 0.95^T_1) instead of
# kfcrun's defaults (configs/optimizer/kfac.yaml): the cost of the wider gamma search.
KFAC_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "kfac_a2": ("K-FAC, A.2 constants", {"gamma_search_decades": "0", "lambda_decay": "0.95"}),
}
LABELS |= {name: label for name, (label, _) in KFAC_VARIANTS.items()}


def run_config(optimizer: str, batch: int, opts: dict[str, Any]) -> DictConfig:
    """The model's experiment for ``optimizer`` (SGD, KFC-pre, K-FAC) at this batch size, with cost knobs."""
    base = "kfc_pre" if optimizer in VARIANTS else "kfac" if optimizer in KFAC_VARIANTS else optimizer
    overrides = [
        f"experiment={EXPERIMENTS[opts['model']][base]}",
        f"trainer.batch_size={batch}",
    ]
    if base == "kfc_pre":
        overrides += [f"optimizer.{key}={opts[key]}" for key in KFC_KNOBS]
    if optimizer in VARIANTS:
        overrides += [f"optimizer.{key}={value}" for key, value in VARIANTS[optimizer][1].items()]
    if optimizer in KFAC_VARIANTS:
        overrides += [f"optimizer.{key}={value}" for key, value in KFAC_VARIANTS[optimizer][1].items()]
    return compose_run_config(overrides)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, batch: int, device_name: str, opts: dict[str, Any], iters: int, warmup: int) -> dict:
    """Time ``iters`` steps after ``warmup`` steps (in its own process, for a clean peak-memory reading)."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    if opts.get("threads"):
        torch.set_num_threads(opts["threads"])
    if opts.get("cpu_time"):
        # The step and the optimizers' phase timers (time.perf_counter) count this process's CPU
        # time instead: with one thread that is the step's wall-clock on an idle machine, and it
        # does not grow when other processes share the cores.
        time.perf_counter = time.process_time
    cfg = run_config(name, batch, opts)
    model = build_model(cfg.model, cfg.dataset).to(device)
    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(batch, 3, 32, 32, generator=g).mul_(INPUT_STD[opts["model"]]).to(device),
            torch.randint(0, 10, (batch,), generator=g).to(device),
        )
        for _ in range(4)
    ]
    synchronize(device)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    opt = build_optimizer(cfg.optimizer, model, batch)
    if isinstance(opt, KFCOptimizerBase):
        opt.initialize([data[0][0]])

    def step(i: int) -> float:
        x, y = data[i % len(data)]
        synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if isinstance(opt, KFCOptimizerBase):  # as the runner does (statistics from the training pass)
            opt.backward(loss, logits, y)
        else:
            loss.backward()
        closure = (lambda: F.cross_entropy(model(x), y)) if opt.needs_closure else None
        # as the runner does: its optimizers are built with record_inputs=False (kfcrun.builders)
        opt.step(closure, inputs=x, targets=y if opt.needs_labels else None)
        synchronize(device)
        return time.perf_counter() - start

    for i in range(warmup):
        step(i)
    phases_before = dict(opt.phase_times)
    times = [step(warmup + i) for i in range(iters)]
    result = {
        "optimizer": name,
        "batch_size": batch,
        "iters": iters,
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
    }
    if isinstance(opt, KFCOptimizerBase):
        after = opt.phase_times
        result["phases"] = {
            key.removeprefix("kfc_").removesuffix("_s"): (after[key] - phases_before.get(key, 0.0)) / iters
            for key in after
        }
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # ru_maxrss is in KiB on Linux
        result["peak_memory_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_rss) / 1024
    return result


def _child(queue: mp.Queue, args: tuple) -> None:
    queue.put(measure(*args))


def run_isolated(*args: Any) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def kfac_cycle(batch: int, opts: dict[str, Any]) -> int:
    """Iterations after which every periodic part of K-FAC's step has run: ``lcm(T_s, T_f, T_1, T_2)``."""
    cfg = run_config("kfac", batch, opts).optimizer
    periods = [cfg.stats_every, cfg.inverse_every, cfg.lambda_every or 1, cfg.gamma_every or 1]
    return math.lcm(*periods)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(EXPERIMENTS), default="cuda_convnet")
    known, _ = parser.parse_known_args()
    defaults = compose_run_config([f"experiment={EXPERIMENTS[known.model]['kfc_pre']}"]).optimizer
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--cycles",
        type=int,
        default=2,
        help="whole cycles of periodic updates to time (KFC-pre, K-FAC)",
    )
    parser.add_argument("--sgd-iters", type=int, default=20)
    parser.add_argument("--stats-every", type=int, default=defaults["stats_every"])
    parser.add_argument("--inverse-every", type=int, default=defaults["inverse_every"])
    parser.add_argument("--stats-fraction", type=float, default=defaults["stats_fraction"])
    parser.add_argument("--nu-fraction", type=float, default=defaults["nu_fraction"])
    parser.add_argument("--no-clip", action="store_true", help="disable clipping (and so nu)")
    parser.add_argument("--no-kfac", action="store_true", help="time SGD and KFC-pre only")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="KFC-pre rows with one speed option changed (default: all; none: --variants)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU: time by process CPU time (needs --threads 1), robust to other load on the machine",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_step.json"))
    args = parser.parse_args()
    if args.cpu_time and (args.threads != 1 or args.device != "cpu"):
        parser.error("--cpu-time needs --device cpu --threads 1 (CPU time of several threads adds up)")

    opts = {
        "model": args.model,
        "stats_every": args.stats_every,
        "inverse_every": args.inverse_every,
        "stats_fraction": args.stats_fraction,
        "nu_fraction": args.nu_fraction,
        "clip": "null" if args.no_clip else defaults["clip"],
        "threads": args.threads,
        "cpu_time": args.cpu_time,
    }
    cycle = math.lcm(args.stats_every, args.inverse_every)
    rows = []
    for batch in args.batch_sizes:
        sgd = run_isolated("sgd", batch, args.device, opts, args.sgd_iters, 3)
        # warm up for one full cycle so every phase has run once before timing
        kfc = run_isolated("kfc_pre", batch, args.device, opts, cycle * args.cycles, cycle)
        row = {
            "batch_size": batch,
            "sgd": sgd,
            "kfc_pre": kfc,
            "ratio_median": kfc["median_s"] / sgd["median_s"],
            "ratio_amortized": kfc["mean_s"] / sgd["median_s"],
        }
        for variant in args.variants:
            res = run_isolated(variant, batch, args.device, opts, cycle * args.cycles, cycle)
            row |= {variant: res, f"{variant}_ratio_amortized": res["mean_s"] / sgd["median_s"]}
        if not args.no_kfac:
            kfac_period = kfac_cycle(batch, opts)
            kfac = run_isolated("kfac", batch, args.device, opts, kfac_period * args.cycles, kfac_period)
            row |= {
                "kfac": kfac,
                "kfac_ratio_median": kfac["median_s"] / sgd["median_s"],
                "kfac_ratio_amortized": kfac["mean_s"] / sgd["median_s"],
                "kfac_vs_kfc_pre_amortized": kfac["mean_s"] / kfc["mean_s"],
            }
            for variant in KFAC_VARIANTS:
                res = run_isolated(variant, batch, args.device, opts, kfac_period * args.cycles, kfac_period)
                row |= {variant: res, f"{variant}_ratio_amortized": res["mean_s"] / sgd["median_s"]}
        rows.append(row)

    threads = args.threads or torch.get_num_threads()  # what the measuring processes used
    device_desc = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    )
    print(
        f"device: {args.device} ({device_desc}), torch {torch.__version__}, threads {threads}"
        + (", clock: process CPU time" if args.cpu_time else ", clock: wall")
    )
    print(f"model: {args.model} (experiments {', '.join(EXPERIMENTS[args.model].values())})")
    print(
        f"KFC-pre: T_s={args.stats_every} T_f={args.inverse_every} stats_fraction={args.stats_fraction} "
        f"nu_fraction={args.nu_fraction} clip={opts['clip']}"
    )
    if not args.no_kfac:
        k = run_config("kfac", args.batch_sizes[0], opts).optimizer
        print(
            f"K-FAC: T_s={k.stats_every} T_f={k.inverse_every} T_1={k.lambda_every} T_2={k.gamma_every} "
            f"stats_fraction={k.stats_fraction} damping_mode={k.damping_mode} "
            f"(experiment={EXPERIMENTS[args.model]['kfac']})"
        )
    header = (
        f"{'batch':>5} {'method':>36} {'median ms':>10} {'amort. ms':>10} {'x SGD':>6} {'1+ph':>6} "
        f"{'MB':>6}  phases (ms per step)"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        sgd_median = row["sgd"]["median_s"]
        for method in ("sgd", "kfc_pre", *args.variants, "kfac", *KFAC_VARIANTS):
            if method not in row:
                continue
            res = row[method]
            amortized = res["mean_s"] if method != "sgd" else res["median_s"]
            phases = " ".join(f"{name}={1000 * sec:.1f}" for name, sec in res.get("phases", {}).items())
            by_phases = 1 + sum(res.get("phases", {}).values()) / sgd_median
            print(
                f"{row['batch_size']:>5} {LABELS[method]:>36} {1000 * res['median_s']:10.1f} "
                f"{1000 * amortized:10.1f} {amortized / sgd_median:6.2f} {by_phases:6.2f} "
                f"{res['peak_memory_mb']:6.0f}  {phases}"
            )
    print(
        "amortized = mean over whole cycles of the periodic updates; x SGD = amortized / SGD median; "
        "1+ph = 1 + (sum of the phases) / SGD median: the same ratio if the forward and backward cost "
        "what SGD's do, which does not move when the machine's speed drifts between the rows"
    )

    payload = {
        "device": args.device,
        "device_name": device_desc,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "kfc_settings": opts,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
