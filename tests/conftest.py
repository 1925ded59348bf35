"""Shared fixtures: repository paths, the shared CIFAR-10, and running the ``kfcrun`` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def cifar10_image_folder() -> Path:
    """Where the real-data tests look for the CIFAR-10 image folder (``train/<class>/*.jpg``, ``test/...``).

    ``$KFCRUN_CIFAR10_DIR``, else ``<repo>/data/cifar10`` (the default ``dataset.root``), else
    the developers' shared copy ``<repo>/../shared/data/cifar10``.
    """
    if "KFCRUN_CIFAR10_DIR" in os.environ:
        return Path(os.environ["KFCRUN_CIFAR10_DIR"])
    for candidate in (REPO_ROOT / "data" / "cifar10", REPO_ROOT.parent / "shared" / "data" / "cifar10"):
        if (candidate / "train").is_dir():
            return candidate
    return REPO_ROOT / "data" / "cifar10"


def cifar10_skip_reason(path: Path) -> str:
    """Why a real-data test is skipped, and how to run it."""
    return (
        f"real CIFAR-10 image folder not found at {path}; to run this test set "
        "KFCRUN_CIFAR10_DIR=<folder with train/<class>/*.jpg and test/<class>/*.jpg> "
        "(or put it at data/cifar10)"
    )


SHARED_CIFAR10 = cifar10_image_folder()

requires_shared_cifar10 = pytest.mark.skipif(
    not (SHARED_CIFAR10 / "train").is_dir(), reason=cifar10_skip_reason(SHARED_CIFAR10)
)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    """Each test starts from the same global RNG state and default dtype."""
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A kfcrun data cache shared by the tests that run the CLI."""
    return Path(os.environ.get("KFCRUN_TEST_CACHE_DIR") or tmp_path_factory.mktemp("kfcrun-cache"))


def run_cli(
    args: list[str], cwd: Path, cache: Path, timeout: float = 600, **env: str
) -> subprocess.CompletedProcess:
    """Run ``python -m kfcrun ARGS`` in ``cwd`` and capture its output (progress bars off)."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"KFCRUN_CACHE_DIR": str(cache), **env})
    return subprocess.run(
        [sys.executable, "-m", "kfcrun", *args, "trainer.progress=false"],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Give every test the process's signal handlers back as it found them.

    Handlers are process-wide: one installed during a test and not restored changes what a later
    test finds. (The suite may also START with SIGINT ignored: see ``terminal_signal_handlers`` in
    tests/test_signals.py.)
    """
    import signal

    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
    saved = {sig: signal.getsignal(sig) for sig in signals}
    yield
    for sig, handler in saved.items():
        if signal.getsignal(sig) is not handler and handler is not None:
            signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Give every test the process's environment back as it found it.

    The CLI tests' subprocesses inherit it: an ``OMP_NUM_THREADS=1`` left behind by a distributed
    test once made every later CLI run single-threaded (slower, and a K-FAC smoke run took a
    different, diverging path on the other rounding).
    """
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)
