"""Small files in the official on-disk layouts, written by the tests (never downloaded)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image

from kfcrun.data.cifar10 import CIFAR10_CLASSES, OFFICIAL_DIR, TRAIN_BATCHES


def write_cifar_batches(root: Path, per_batch: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``root/cifar-10-batches-py`` as the official python version does, with ``per_batch`` images.

    Each batch is a pickled dict with b"data" (N, 3072) uint8 (R, G, B planes, row-major)
    and b"labels" (list of int); ``batches.meta`` holds b"label_names". Returns the arrays written,
    as (N, 3, 32, 32) images and (N,) labels for "train" (batches 1..5 in order) and "test".
    """
    rng = np.random.default_rng(seed)
    folder = root / OFFICIAL_DIR
    folder.mkdir(parents=True)
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for name in (*TRAIN_BATCHES, "test_batch"):
        split = "test" if name == "test_batch" else "train"
        x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, size=per_batch)
        blob = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in y],
            b"data": x.reshape(per_batch, 3072),
            b"filenames": [b"x.png"] * per_batch,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(blob, f, protocol=2)
        images[split].append(x)
        labels[split].append(y)
    meta = {
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_cases_per_batch": per_batch,
        b"num_vis": 3072,
    }
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return {
        "train_images": np.concatenate(images["train"]),
        "train_labels": np.concatenate(labels["train"]),
        "test_images": np.concatenate(images["test"]),
        "test_labels": np.concatenate(labels["test"]),
    }


def write_svhn_mat(root: Path, split: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write ``root/<split>_32x32.mat`` in the official layout.

    Returns (X, y): X uint8 (32, 32, 3, N), y (N, 1) with labels 1..10 (10 is the digit 0).
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
    y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # every label 1..10 appears
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x, y


def write_image_folder(
    root: Path,
    per_class: dict[str, int],
    *,
    ext: str = "png",
    seed: int = 0,
    classes: tuple[str, ...] = CIFAR10_CLASSES,
) -> dict[str, torch.Tensor]:
    """Write 32x32 RGB images as ``root/<split>/<class>/NNNN.<ext>`` (PNG: random noise; JPEG: smooth).

    JPEG images are smooth ramps so the lossy round trip stays within a few pixel units.
    Returns the images written per split, class-major (the loader's order).
    """
    g = torch.Generator().manual_seed(seed)
    ramp = torch.arange(32, dtype=torch.float32).view(1, 1, 32) * 3  # 0..93 along the width
    written: dict[str, torch.Tensor] = {}
    for split, count in per_class.items():
        imgs = []
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                if ext == "png":
                    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=g)
                else:
                    base = torch.randint(0, 160, (3, 1, 1), generator=g).float()
                    img = (base + ramp).expand(3, 32, 32).to(torch.uint8)
                save_image(img, folder / f"{i:04d}.{ext}")
                imgs.append(img)
        written[split] = torch.stack(imgs)
    return written


def save_image(img: torch.Tensor, path: Path) -> None:
    """Save a uint8 (C, H, W) tensor with PIL (lossless PNG, quality-95 JPEG)."""
    array = img.permute(1, 2, 0).numpy()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path, quality=95)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file and folder under ``root``; equal snapshots mean nothing was written."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in [root, *root.rglob("*")]
    }
