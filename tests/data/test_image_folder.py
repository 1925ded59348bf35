"""CIFAR-10 from small generated image folders: exact pixels, labels, and the errors a user can fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kfcrun.data import ImageData, image_folder, load_dataset
from kfcrun.data.cifar10 import CIFAR10_CLASSES
from kfcrun.errors import DatasetError

from .fakes import save_image, write_image_folder


def load(root: Path, tmp_path: Path, **kwargs: object) -> ImageData:
    with pytest.warns(RuntimeWarning, match="not the official 50000 / 10000"):
        return load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False, **kwargs)


def test_png_folder_is_read_exactly(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    written = write_image_folder(root, {"train": 3, "test": 2})
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # hidden files are ignored
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    d = load(root, tmp_path, format="image_folder")
    assert torch.equal(d.train_images, written["train"]) and torch.equal(d.test_images, written["test"])
    assert d.train_labels.tolist() == [k for k in range(10) for _ in range(3)]
    assert d.test_labels.tolist() == [k for k in range(10) for _ in range(2)]
    assert d.source == f"CIFAR-10 image folder at {root}"


def test_jpeg_folder_is_labelled_as_export(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    written = write_image_folder(root, {"train": 1, "test": 1}, ext="jpg")
    d = load(root, tmp_path)
    assert d.source == f"CIFAR-10 (JPEG export) image folder at {root}"
    # quality-95 JPEG of smooth ramps: lossy, but within a few pixel units
    diff = (d.train_images.int() - written["train"].int()).abs()
    assert diff.float().mean() < 2 and diff.max() <= 12, f"mean {diff.float().mean():.2f}, max {diff.max()}"


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_pil_fallback_matches_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ext: str) -> None:
    """Without torchvision's (deprecated) codecs, PIL decodes the same pixels."""
    root = tmp_path / "folder"
    write_image_folder(root, {"train": 2, "test": 1}, ext=ext)
    fast = load(root, tmp_path / "a")
    monkeypatch.setattr(image_folder, "HAVE_TORCHVISION_CODECS", False)
    slow = load(root, tmp_path / "b")
    assert (fast.train_images.int() - slow.train_images.int()).abs().max() <= 1
    assert torch.equal(fast.train_labels, slow.train_labels)


def test_wrong_image_size_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    write_image_folder(root, {"train": 1, "test": 1})
    bad = root / "test" / "dog" / "0000.png"
    save_image(torch.zeros(3, 28, 28, dtype=torch.uint8), bad)
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    message = str(err.value)
    assert f"{bad} has shape (3, 28, 28)" in message and f"looked in {root}" in message
    assert "dataset.root=" in message and "dataset.download=true" in message


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_undecodable_image_names_the_file(tmp_path: Path, ext: str) -> None:
    root = tmp_path / "folder"
    write_image_folder(root, {"train": 2, "test": 1}, ext=ext)
    bad = root / "train" / "frog" / f"0001.{ext}"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated JPEG
    with pytest.raises(DatasetError, match=f"cannot decode image {bad}"):
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)


def test_wrong_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    write_image_folder(root, {"train": 1, "test": 1})
    shutil.move(root / "train" / "truck", root / "train" / "lorry")
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    assert "lorry" in str(err.value) and ", ".join(CIFAR10_CLASSES) in str(err.value)


def test_missing_test_split(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    write_image_folder(root, {"train": 1})
    with pytest.raises(DatasetError, match=r"image folder has train/ but no test/; looked in"):
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
