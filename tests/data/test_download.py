"""download=True: fetches only missing files, and fails fast and clearly without a network.

The autouse fixture in conftest.py makes every connection and DNS lookup fail, so these
tests exercise torchvision's real download code without touching the network.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest

from kfcrun.data import load_dataset
from kfcrun.data.download import DOWNLOAD_TIMEOUT_S
from kfcrun.errors import DatasetError

from .fakes import write_svhn_mat


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_no_network_fails_fast(tmp_path: Path, name: str) -> None:
    root = tmp_path / name
    start = time.perf_counter()
    with pytest.raises(DatasetError) as err:
        load_dataset(name, root, download=True, cache_dir=tmp_path / "cache", progress=False)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "could not download" in message and "(no network?)" in message and "\n" not in message
    assert f"into {root}" in message and f"set dataset.root={root}" in message
    assert "check your connection" in message
    assert ("cifar-10-python.tar.gz" if name == "cifar10" else "train_32x32.mat") in message


def test_timeout_is_set_during_download_and_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float | None] = []

    def hanging_server(*args: object, **kwargs: object) -> None:
        seen.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")  # what a blackholed connection raises once the timeout fires

    monkeypatch.setattr(urllib.request, "urlopen", hanging_server)
    socket.setdefaulttimeout(None)
    with pytest.raises(DatasetError, match=r"\(no network\?\): TimeoutError: timed out"):
        load_dataset("svhn", tmp_path / "svhn", download=True, cache_dir=tmp_path / "cache", progress=False)
    assert seen and set(seen) == {DOWNLOAD_TIMEOUT_S}
    assert socket.getdefaulttimeout() is None


def test_downloads_only_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    root = tmp_path / "svhn"
    write_svhn_mat(root, "train", 4)
    fetched: list[str] = []

    def fake_download_url(url: str, root: str, filename: str, md5: str) -> None:
        fetched.append(filename)
        write_svhn_mat(Path(root), filename.split("_")[0], 3)

    monkeypatch.setattr(tv_utils, "download_url", fake_download_url)
    d = load_dataset("svhn", root, download=True, cache_dir=tmp_path / "cache", progress=False)
    assert fetched == ["test_32x32.mat"] and d.test_images.shape[0] == 3


def test_partial_download_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    root = tmp_path / "svhn"

    def dies_midway(url: str, root: str, filename: str, md5: str) -> None:
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(b"MATLAB 5.0 MAT-file, half of it")
        raise TimeoutError("timed out")

    monkeypatch.setattr(tv_utils, "download_url", dies_midway)
    with pytest.raises(DatasetError, match="no network"):
        load_dataset("svhn", root, download=True, cache_dir=tmp_path / "cache", progress=False)
    assert list(root.iterdir()) == [], "a half-written file would later pass for the real one"


def test_corrupted_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def bad_checksum(*args: object, **kwargs: object) -> None:
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", bad_checksum)
    with pytest.raises(DatasetError, match=r"but the file is corrupted .* fix: delete it and retry"):
        load_dataset("cifar10", tmp_path / "c", download=True, cache_dir=tmp_path / "cache", progress=False)


def test_unwritable_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr(tv_utils, "download_url", denied)
    with pytest.raises(DatasetError, match="the directory is not writable"):
        load_dataset("svhn", tmp_path / "ro", download=True, cache_dir=tmp_path / "cache", progress=False)


def test_image_folder_cannot_be_downloaded(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="download=true fetches only the official files"):
        load_dataset("cifar10", tmp_path, format="image_folder", download=True, progress=False)
