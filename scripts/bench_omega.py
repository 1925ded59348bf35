#!/usr/bin/env python
"""Conv ``Omega_hat`` per layer: row-lagged products against the patch GEMM, in one run.

For every conv layer of the network (cuda-convnet ``cifar10_kfc``, or ResNet-18), the
layer's real input from one forward pass of random images at the experiment's pixel
scale is handed to its curvature block with ``omega_method="patch"`` and with
``omega_method="auto"`` (row lags where they apply; layers where they do not are marked
``patch`` and timed twice alike). The two are interleaved round by round, so load
changes hit both alike; the table gives the median and minimum wall time, the ratio
patch / auto (> 1: the row lags are faster) and the largest difference of the two
results relative to the largest entry. Example::

    python scripts/bench_omega.py --batch-sizes 128 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kfcrun.builders import build_model
from kfcrun.cli import compose_run_config
from kfcrun.curvature.blocks import ConvBlock, make_block
from kfcrun.curvature.capture import ActivationCapture

EXPERIMENTS = {"cuda_convnet": "cifar10_kfc", "resnet18": "cifar10_resnet18_kfc"}
INPUT_STD = {"cuda_convnet": 60.0, "resnet18": 1.0}


def layer_inputs(
    model_name: str, batch: int, device: torch.device
) -> dict[str, tuple[ConvBlock, torch.Tensor]]:
    """``{layer: (block, input)}`` for every conv of the network, from one forward pass."""
    cfg = compose_run_config([f"experiment={EXPERIMENTS[model_name]}", f"trainer.batch_size={batch}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.dataset).to(device)
    convs = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0)).mul_(INPUT_STD[model_name])
    capture = ActivationCapture(convs)
    with torch.no_grad(), capture.recording() as records:
        model(x.to(device))
    out = {}
    for name, module in convs.items():
        block = make_block(name, module)
        assert isinstance(block, ConvBlock)
        out[name] = (block, records[name][0].checked_input(name))
    return out


def measure(model_name: str, batch: int, device: torch.device, reps: int) -> list[dict]:
    rows = []
    for name, (block, inp) in layer_inputs(model_name, batch, device).items():
        results, times = {}, {"patch": [], "auto": []}
        for rep in range(reps + 1):  # the first round warms up
            for method in ("patch", "auto"):
                block.omega_method = method
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                results[method] = block.batch_omega(inp)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if rep:
                    times[method].append(time.perf_counter() - start)
        block.omega_method = "auto"
        patch, auto = results["patch"], results["auto"]
        rows.append(
            {
                "layer": name,
                "input_shape": list(inp.shape),
                "kernel": list(block.kernel_size),
                "stride": list(block.stride),
                "method": "lagged" if block.uses_lagged_omega() else "patch",
                "patch_median_s": statistics.median(times["patch"]),
                "patch_min_s": min(times["patch"]),
                "auto_median_s": statistics.median(times["auto"]),
                "auto_min_s": min(times["auto"]),
                "speedup_median": statistics.median(times["patch"]) / statistics.median(times["auto"]),
                "max_rel_diff": ((auto - patch).abs().max() / patch.abs().max()).item(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(EXPERIMENTS), default="cuda_convnet")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_omega.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    results = {batch: measure(args.model, batch, device, args.reps) for batch in args.batch_sizes}
    desc = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({desc}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    header = (
        f"{'batch':>5} {'layer':<24} {'input':<18} {'auto uses':<9} {'patch ms':>9} {'auto ms':>9} "
        f"{'speedup':>7} {'rel diff':>9}"
    )
    print(header)
    print("-" * len(header))
    for batch, rows in results.items():
        for r in rows:
            shape = "x".join(str(s) for s in r["input_shape"][1:])
            print(
                f"{batch:>5} {r['layer']:<24} {shape:<18} {r['method']:<9} {1000 * r['patch_median_s']:9.1f} "
                f"{1000 * r['auto_median_s']:9.1f} {r['speedup_median']:7.2f} {r['max_rel_diff']:9.1e}"
            )
    print(f"medians of {args.reps} interleaved reps; speedup = patch / auto")
    payload = {
        "device": str(device),
        "device_name": desc,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "results": {str(b): rows for b, rows in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
