"""A non-editable (wheel) install ships its configs and runs without the source tree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def test_wheel_install_finds_its_configs(tmp_path: Path, cache_dir: Path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    wheel = next(wheels.glob("kfcrun-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (target / "kfcrun" / "configs" / "config.yaml").is_file()
    assert (target / "kfcrun" / "configs" / "experiment" / "smoke.yaml").is_file()

    workdir = tmp_path / "elsewhere"  # no configs/ here, and not the source tree
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "KFCRUN_CACHE_DIR": str(cache_dir)}
    where = subprocess.run(
        [sys.executable, "-c", "import kfcrun; print(kfcrun.__file__)"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(target)), "the test imported the source tree, not the wheel"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "kfcrun",
            "experiment=smoke",
            "trainer.max_iters=2",
            "trainer.eval_every=2",
            "trainer.progress=false",
            f"hydra.run.dir={workdir / 'run'}",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert (workdir / "run" / "metrics.jsonl").is_file()
