"""Fixtures for the data tests: an isolated cache, no network, and the real CIFAR-10 export when present."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from kfcrun.data import ImageData, load_dataset
from tests.conftest import cifar10_image_folder, cifar10_skip_reason


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point the default cache at a temporary folder so no test writes to ~/.cache."""
    monkeypatch.setenv("KFCRUN_CACHE_DIR", str(tmp_path / "env-cache"))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail every connection and name lookup at once, so no data test can touch the network."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError(101, "Network is unreachable (disabled in tests)")

    def refuse_lookup(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-3, "Temporary failure in name resolution (disabled in tests)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The CIFAR-10 image folder (:func:`tests.conftest.cifar10_image_folder`)."""
    path = cifar10_image_folder()
    if not (path / "train").is_dir():
        pytest.skip(cifar10_skip_reason(path))
    return path


@pytest.fixture(scope="session")
def cifar10_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for the whole session, so CIFAR-10 is decoded once."""
    return tmp_path_factory.mktemp("cifar10-cache")


@pytest.fixture(scope="session")
def cifar10_folder(cifar10_dir: Path, cifar10_cache: Path) -> ImageData:
    """CIFAR-10 decoded from the image folder (the slow step; done once per session)."""
    start = time.perf_counter()
    data = load_dataset("cifar10", cifar10_dir, cache_dir=cifar10_cache, progress=False)
    print(f"\ndecoded CIFAR-10 image folder in {time.perf_counter() - start:.2f} s")
    return data
