"""CIFAR-10 from small generated pickles in the official ``cifar-10-batches-py`` layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kfcrun.data import cifar10 as cifar10_module
from kfcrun.data import load_dataset
from kfcrun.data.cifar10 import CIFAR10_CLASSES, OFFICIAL_DIR
from kfcrun.errors import DatasetError

from .fakes import write_cifar_batches, write_image_folder


@pytest.fixture
def batches(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "cifar"
    return root, write_cifar_batches(root, per_batch=20)


@pytest.mark.parametrize("where", ["parent", "batches_dir"])
@pytest.mark.parametrize("format", ["auto", "official"])
def test_reads_the_official_layout(
    batches: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, where: str, format: str
) -> None:
    root, written = batches
    path = root if where == "parent" else root / OFFICIAL_DIR
    d = load_dataset("cifar10", path, format=format, cache_dir=tmp_path / "cache", progress=False)
    assert d.classes == CIFAR10_CLASSES
    assert d.train_images.shape == (100, 3, 32, 32) and d.test_images.shape == (20, 3, 32, 32)
    for field, array in written.items():
        assert torch.equal(getattr(d, field), torch.from_numpy(array).to(getattr(d, field).dtype)), field
    assert d.source == f"CIFAR-10 (official python batches) at {root / OFFICIAL_DIR}"


def test_rows_are_rgb_planes(tmp_path: Path) -> None:
    """Row layout: 1024 R values, then 1024 G, then 1024 B, each plane row-major (official README)."""
    root = tmp_path / "cifar"
    write_cifar_batches(root, per_batch=2)
    path = root / OFFICIAL_DIR / "test_batch"
    with open(path, "rb") as f:
        blob = pickle.load(f, encoding="bytes")
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.arange(1024) % 256]).astype(np.uint8)
    blob[b"data"][0] = row
    with open(path, "wb") as f:
        pickle.dump(blob, f)
    image = load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False).test_images[0]
    assert image[0].unique().tolist() == [10] and image[1].unique().tolist() == [20]
    assert image[2, 0, :3].tolist() == [0, 1, 2] and image[2, 1, 0].item() == 32  # row-major: (1, 0) is 32


def test_auto_prefers_official_over_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "both"
    written = write_cifar_batches(root, per_batch=3)
    write_image_folder(root, {"train": 1, "test": 1})
    d = load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    assert d.source.startswith("CIFAR-10 (official") and d.train_images.shape[0] == 15
    assert torch.equal(d.test_labels, torch.from_numpy(written["test_labels"]))
    with pytest.warns(RuntimeWarning, match="not the official"):
        folder = load_dataset(
            "cifar10", root, format="image_folder", cache_dir=tmp_path / "cache", progress=False
        )
    assert folder.train_images.shape[0] == 10


def test_second_load_comes_from_cache(
    batches: tuple[Path, dict[str, np.ndarray]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = batches
    first = load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setattr(
        cifar10_module, "read_official", lambda *a, **k: pytest.fail("read the pickles again")
    )
    second = load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    assert torch.equal(first.train_images, second.train_images)


def test_changed_files_invalidate_the_cache(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    write_cifar_batches(root, per_batch=4, seed=0)
    cache = tmp_path / "cache"
    first = load_dataset("cifar10", root, cache_dir=cache, progress=False)
    (root / OFFICIAL_DIR).rename(tmp_path / "old")
    write_cifar_batches(root, per_batch=5, seed=1)
    second = load_dataset("cifar10", root, cache_dir=cache, progress=False)
    assert first.train_images.shape[0] == 20 and second.train_images.shape[0] == 25
    assert len(list((cache / "data").glob("*.pt"))) == 1, "the stale entry should have been removed"


def test_truncated_pickle_names_the_file(batches: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, _ = batches
    path = root / OFFICIAL_DIR / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
    message = str(err.value)
    assert "data_batch_3 is corrupted" in message and str(root) in message
    assert "dataset.download=true" in message and "dataset.root=" in message and "\n" not in message


def test_wrong_shape_is_corruption(batches: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    root, _ = batches
    path = root / OFFICIAL_DIR / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 1000), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DatasetError, match=r"test_batch is corrupted \(data uint8 \(4, 1000\)"):
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)


def test_incomplete_folder_lists_missing_files(
    batches: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    root, _ = batches
    (root / OFFICIAL_DIR / "test_batch").unlink()
    (root / OFFICIAL_DIR / "batches.meta").unlink()
    with pytest.raises(DatasetError, match=r"is incomplete, missing test_batch, batches\.meta; looked in"):
        load_dataset("cifar10", root, cache_dir=tmp_path / "cache", progress=False)
