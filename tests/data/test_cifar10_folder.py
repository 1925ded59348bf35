"""CIFAR-10 from the real JPEG image folder (shared/data/cifar10): counts, labels, pixel statistics, cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kfcrun.data import ImageData, load_dataset
from kfcrun.data import image_folder as image_folder_module
from kfcrun.data.cifar10 import CIFAR10_CLASSES

from .fakes import snapshot

# Per-channel training-set means of the official CIFAR-10 release, pixel units 0..255.
OFFICIAL_CHANNEL_MEAN = (125.3, 123.0, 113.9)
JPEG_TOLERANCE = 1.5  # pixel units: the JPEG re-encoding shifts the means slightly


def test_sizes_and_class_balance(cifar10_folder: ImageData) -> None:
    d = cifar10_folder
    assert d.name == "cifar10"
    assert d.classes == CIFAR10_CLASSES
    assert d.train_images.shape == (50_000, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (10_000, 3, 32, 32) and d.test_images.dtype == torch.uint8
    assert d.train_labels.dtype == torch.int64 and d.test_labels.dtype == torch.int64
    assert d.train_labels.bincount().tolist() == [5000] * 10
    assert d.test_labels.bincount().tolist() == [1000] * 10
    assert d.source == f"CIFAR-10 (JPEG export) image folder at {d.source.split(' at ', 1)[1]}"


@pytest.mark.parametrize(
    ("split", "cls", "label"), [("train", "airplane", 0), ("train", "truck", 9), ("test", "cat", 3)]
)
def test_known_file_has_its_label_and_pixels(
    cifar10_folder: ImageData, cifar10_dir: Path, split: str, cls: str, label: int
) -> None:
    _, files, _ = image_folder_module.list_split(cifar10_dir / split)
    path = str(cifar10_dir / split / cls / "0000.jpg")
    index = files.index(path)
    images = getattr(cifar10_folder, f"{split}_images")
    labels = getattr(cifar10_folder, f"{split}_labels")
    assert labels[index].item() == label
    # An independent decoder (PIL) agrees up to IDCT rounding.
    expected = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    diff = (images[index].int() - expected.int()).abs().max().item()
    assert diff <= 2, f"{path}: decoded pixels differ from PIL by up to {diff}"


def test_channel_means_match_official_cifar10(cifar10_folder: ImageData) -> None:
    images = cifar10_folder.train_images
    n, c = images.shape[:2]
    flat = images.view(n, c, -1)  # exact integer sums; the (N, C, H*W) view reduces fastest
    mean = (flat.sum(dim=(0, 2), dtype=torch.int64).double() / (n * flat.shape[2])).tolist()
    for channel, (got, want) in enumerate(zip(mean, OFFICIAL_CHANNEL_MEAN, strict=True)):
        assert abs(got - want) <= JPEG_TOLERANCE, f"channel {'RGB'[channel]}: mean {got:.2f}, official {want}"


def test_second_load_is_served_from_cache(
    cifar10_folder: ImageData, cifar10_dir: Path, cifar10_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded again although the cache holds the dataset")

    monkeypatch.setattr(image_folder_module, "decode_images", no_decoding)
    start = time.perf_counter()
    again = load_dataset("cifar10", cifar10_dir, cache_dir=cifar10_cache, progress=False)
    seconds = time.perf_counter() - start
    print(f"\ncached CIFAR-10 load: {seconds:.2f} s")
    assert seconds < 10, f"cached load took {seconds:.1f} s"
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        assert torch.equal(getattr(again, field), getattr(cifar10_folder, field)), field
    assert again.source == cifar10_folder.source
    assert len(list((cifar10_cache / "data").glob("cifar10-image_folder-*.pt"))) == 1


def test_root_is_not_written(cifar10_folder: ImageData, cifar10_dir: Path, cifar10_cache: Path) -> None:
    top = {p.name for p in cifar10_dir.iterdir()}
    before = snapshot(cifar10_dir / "test" / "cat")
    load_dataset("cifar10", cifar10_dir, cache_dir=cifar10_cache, progress=False)
    assert {p.name for p in cifar10_dir.iterdir()} == top
    assert snapshot(cifar10_dir / "test" / "cat") == before
