"""A non-editable (wheel) install ships its configs and runs without the source tree; the build is quiet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"


def test_every_config_group_folder_is_a_listed_package():
    """setuptools warns (~350 lines in `make setup`) about data folders that are not listed packages."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    setuptools = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    groups = {f"kfcrun.configs.{p.name}" for p in CONFIGS.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups <= set(setuptools["packages"])
    assert all(setuptools["package-data"].get(group) == ["*.yaml"] for group in groups)


def test_every_python_package_is_listed():
    """A sub-package missing from the explicit list would be left out of the wheel (an import error there)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    source = REPO_ROOT / "kfcrun"
    found = {
        ".".join(("kfcrun", *init.parent.relative_to(source).parts))
        for init in source.rglob("__init__.py")
        if "configs" not in init.relative_to(source).parts  # the config packages are checked above
    }
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_wheel_install_finds_its_configs(tmp_path: Path, cache_dir: Path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-v",
            "-w",
            str(wheels),
            str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # (byte-compiling is off where PYTHONDONTWRITEBYTECODE is set: the environment's, not ours)
    warnings = [
        line
        for line in (build.stdout + build.stderr).splitlines()
        if re.search(r"warning|would be ignored", line, re.IGNORECASE)
        and "byte-compiling is disabled" not in line
    ]
    assert warnings == [], "\n".join(warnings)
    wheel = next(wheels.glob("kfcrun-*.whl"))
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".yaml")}
    expected = {f"kfcrun/configs/{p.relative_to(CONFIGS)}" for p in CONFIGS.rglob("*.yaml")}
    assert shipped == expected
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
