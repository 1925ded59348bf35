"""Shared fixtures: repository paths, the shared CIFAR-10, and running the ``kfcrun`` CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR10 = Path(os.environ.get("KFCRUN_CIFAR10_DIR", REPO_ROOT.parent / "shared" / "data" / "cifar10"))

requires_shared_cifar10 = pytest.mark.skipif(
    not (SHARED_CIFAR10 / "train").is_dir(),
    reason=f"the offline CIFAR-10 image folder is not at {SHARED_CIFAR10} (set KFCRUN_CIFAR10_DIR)",
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
