#!/usr/bin/env python
"""Cost of one Kronecker block per group for grouped/depthwise convolutions (MobileNetV3-small).

KFC gives a grouped convolution ``g`` independent blocks ``Omega_i ⊗ Gamma_i``
(:class:`kfcrun.curvature.ConvBlock`). This times, in one process, a KFC curvature update
(statistics on a batch, then the damped inverses) of torchvision's ``mobilenet_v3_small``
with every module covered, against the same with the depthwise convolutions skipped
(``skip_layers``: they would take the plain step), and reports the factors' sizes. The
difference is what the per-group blocks cost. Inputs are random 32x32 images; the
timings do not depend on the values. Example::

    python scripts/bench_grouped.py --batch 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from kfcrun.curvature import KFCCurvature


def depthwise_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]


def time_update(model: nn.Module, x: torch.Tensor, skip: list[str], repeats: int) -> dict:
    curv = KFCCurvature(model, skip_layers=skip, inverse_dtype=torch.float32)
    stats, inverses = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        curv.update_statistics(x)
        middle = time.perf_counter()
        curv.update_inverses(1e-2, 0.0)
        inverses.append(time.perf_counter() - middle)
        stats.append(middle - start)
    elements = sum(t.numel() for b in curv.blocks.values() for t in b.factors_or_zero())
    return {
        "blocks": len(curv.blocks),
        "factor_elements": elements,
        "statistics_s": statistics.median(stats),
        "inverses_s": statistics.median(inverses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_grouped.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=10)
    x = torch.randn(args.batch, 3, 32, 32)
    dw = depthwise_names(model)
    rows = {
        "all covered": time_update(model, x, [], args.repeats),
        "depthwise skipped": time_update(model, x, dw, args.repeats),
    }
    print(
        f"mobilenet_v3_small, batch {args.batch}, 32x32, {len(dw)} depthwise convs, torch {torch.__version__}"
    )
    print(f"{'':>18} {'blocks':>6} {'factor elems':>12} {'stats s':>8} {'inverses s':>10}")
    for label, r in rows.items():
        sizes = f"{r['blocks']:>6} {r['factor_elements']:>12,}"
        print(f"{label:>18} {sizes} {r['statistics_s']:8.2f} {r['inverses_s']:10.2f}")
    full, skipped = rows["all covered"], rows["depthwise skipped"]
    extra = (full["statistics_s"] + full["inverses_s"]) / (skipped["statistics_s"] + skipped["inverses_s"])
    print(f"covering the depthwise convs costs {extra:.2f}x the curvature update without them")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    args.out.write_text(json.dumps({**payload, "batch": args.batch, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
