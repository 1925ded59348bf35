"""Per-evaluation table of runs (current and averaged parameters), and their figure.

python table.py <run dir>...                  markdown table per run
python table.py --figure <out.png> <run dir>...  training NLL and test error vs iterations and minutes
"""

import json
import sys
from pathlib import Path

for run in map(Path, sys.argv[1:] if sys.argv[1:2] != ["--figure"] else []):
    print(f"\n{run.name}")
    print("| iter | training s | train NLL cur / avg | train err cur / avg | test NLL cur / avg | test err cur / avg |")
    print("| --- | --- | --- | --- | --- | --- |")
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "test/error" not in row:
            continue
        cells = [
            f"{row['train/nll_current']:.3f} / {row['train/nll']:.3f}",
            f"{row['train/error_current']:.3f} / {row['train/error']:.3f}",
            f"{row['test/nll_current']:.3f} / {row['test/nll']:.3f}",
            f"{row['test/error_current']:.3f} / {row['test/error']:.3f}",
        ]
        print(f"| {row['iter']} | {row['train_time_s']:.0f} | " + " | ".join(cells) + " |")


def figure(runs: list[Path], out: Path) -> None:
    """Current parameters' training NLL and test error against iterations and training seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for run in runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "test/error" in r]
        for col, x_key in enumerate(("iter", "train_time_s")):
            x = [r[x_key] / (60 if col else 1) for r in rows]
            axes[0, col].plot(x, [r["train/nll_current"] for r in rows], "o-", label=run.name)
            axes[1, col].plot(x, [r["test/error_current"] for r in rows], "o-", label=run.name)
    for col, label in enumerate(("iterations", "training minutes")):
        axes[1, col].set_xlabel(label)
    axes[0, 0].set_ylabel("training NLL (1,000 images)")
    axes[1, 0].set_ylabel("test error (1,000 images)")
    axes[0, 0].legend()
    fig.suptitle("ResNet-18, CIFAR-10, batch 128, augmentation (current parameters)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if len(sys.argv) > 1 and sys.argv[1] == "--figure":
    figure([Path(p) for p in sys.argv[3:]], Path(sys.argv[2]))
