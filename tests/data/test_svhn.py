"""SVHN from small generated .mat files in the official layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kfcrun.data import load_dataset
from kfcrun.data import svhn as svhn_module
from kfcrun.errors import DatasetError

from .fakes import snapshot, write_svhn_mat


@pytest.fixture
def svhn_root(tmp_path: Path) -> Path:
    root = tmp_path / "svhn"
    write_svhn_mat(root, "train", 30, seed=1)
    write_svhn_mat(root, "test", 20, seed=2)
    write_svhn_mat(root, "extra", 10, seed=3)
    return root


def test_layout_and_label_mapping(svhn_root: Path, tmp_path: Path) -> None:
    d = load_dataset("svhn", svhn_root, cache_dir=tmp_path / "cache", progress=False)
    x, y = write_svhn_mat(tmp_path / "again", "train", 30, seed=1)  # the same arrays as in svhn_root
    assert d.name == "svhn" and d.classes == tuple("0123456789")
    assert d.train_images.shape == (30, 3, 32, 32) and d.test_images.shape == (20, 3, 32, 32)
    # X[row, col, channel, i] -> images[i, channel, row, col]
    assert d.train_images[7, 2, 5, 9].item() == x[5, 9, 2, 7]
    assert torch.equal(d.train_images, torch.from_numpy(x).permute(3, 2, 0, 1))
    # file label 10 is digit 0; 1..9 stay
    assert d.train_labels.tolist() == [int(v) % 10 for v in y[:, 0]]
    assert d.train_labels.dtype == torch.int64 and set(d.train_labels.tolist()) == set(range(10))
    assert d.source == f"SVHN (official .mat files, train / test) at {svhn_root}"


def test_use_extra_appends_to_train(svhn_root: Path, tmp_path: Path) -> None:
    plain = load_dataset("svhn", svhn_root, cache_dir=tmp_path / "cache", progress=False)
    extra = load_dataset("svhn", svhn_root, use_extra=True, cache_dir=tmp_path / "cache", progress=False)
    assert extra.train_images.shape[0] == 40 and torch.equal(extra.train_images[:30], plain.train_images)
    assert torch.equal(extra.test_images, plain.test_images)
    assert "train+extra" in extra.source
    # both variants stay cached side by side
    assert len(list((tmp_path / "cache" / "data").glob("svhn-*.pt"))) == 2


def test_extra_is_only_needed_with_use_extra(svhn_root: Path, tmp_path: Path) -> None:
    (svhn_root / "extra_32x32.mat").unlink()
    load_dataset("svhn", svhn_root, cache_dir=tmp_path / "cache", progress=False)
    with pytest.raises(DatasetError, match=r"SVHN: missing extra_32x32\.mat; looked in"):
        load_dataset("svhn", svhn_root, use_extra=True, cache_dir=tmp_path / "cache", progress=False)


def test_missing_file_message(svhn_root: Path, tmp_path: Path) -> None:
    (svhn_root / "test_32x32.mat").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("svhn", svhn_root, cache_dir=tmp_path / "cache", progress=False)
    assert str(err.value) == (
        f"SVHN: missing test_32x32.mat; looked in {svhn_root}, expected train_32x32.mat, test_32x32.mat "
        "(official SVHN cropped digits, MATLAB .mat); fix: put the files there and set dataset.root=<dir>, "
        "or set dataset.download=true to fetch them"
    )


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "bad_labels"])
def test_corrupted_mat(svhn_root: Path, tmp_path: Path, damage: str) -> None:
    path = svhn_root / "train_32x32.mat"
    if damage == "garbage":
        path.write_bytes(b"this is not a MATLAB file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "wrong_shape":
        import scipy.io

        scipy.io.savemat(path, {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1))})
    else:
        import scipy.io

        scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [11]])})
    with pytest.raises(DatasetError) as err:
        load_dataset("svhn", svhn_root, cache_dir=tmp_path / "cache", progress=False)
    message = str(err.value)
    assert message.startswith(f"SVHN: {path} is corrupted (") and "\n" not in message
    assert "dataset.download=true" in message and "dataset.root=" in message


def test_read_only_root(svhn_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CI mounts the data read-only: loading must not write there; the cache goes to the cache dir."""
    before = snapshot(svhn_root)
    paths = [svhn_root, *svhn_root.iterdir()]
    modes = {p: p.stat().st_mode for p in paths}
    try:
        for p in paths:
            p.chmod(modes[p] & ~0o222)  # a-w
        first = load_dataset("svhn", svhn_root, cache_dir=tmp_path / "cache", progress=False)
        monkeypatch.setattr(
            svhn_module, "read_official", lambda *a, **k: pytest.fail("not served from cache")
        )
        second = load_dataset("svhn", svhn_root, cache_dir=tmp_path / "cache", progress=False)
    finally:
        for p in paths:
            p.chmod(modes[p])
    assert snapshot(svhn_root) == before
    assert torch.equal(first.train_images, second.train_images)
    assert os.listdir(tmp_path / "cache" / "data")
