"""A newcomer's first hour: plain pytest, skips that say why, README commands that work, help, progress."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kfcrun.cli import preflight
from kfcrun.train import Trainer
from tests.conftest import REPO_ROOT
from tests.helpers.runs import KFC_TINY, TINY, smoke_config, train_in_process

README = (REPO_ROOT / "README.md").read_text()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh shell: no PYTHONPATH pointing at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env.update(extra)
    return env


def test_plain_pytest_collects():
    """Issue 9, item 6: `.venv/bin/pytest` could not import `tests` (only `python -m pytest` could)."""
    pytest_bin = shutil.which("pytest", path=str(Path(sys.executable).parent))
    if pytest_bin is None:
        pytest.skip(f"no pytest executable beside {sys.executable}")
    result = subprocess.run(
        [pytest_bin, "--collect-only", "-q", "tests/test_config.py", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No module named 'tests'" not in result.stdout


def test_skipped_real_data_tests_say_how_to_enable_them(tmp_path: Path):
    """Issue 9, item 6: the real-data tests skipped silently in a fresh clone."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/data/test_cifar10_folder.py", "-p", "no:cacheprovider"],
        cwd=REPO_ROOT,
        env=clean_env(KFCRUN_CIFAR10_DIR=str(tmp_path / "absent")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skipped, result.stdout
    assert all("KFCRUN_CIFAR10_DIR" in line for line in skipped), result.stdout
    assert "KFCRUN_CIFAR10_DIR" in README


def readme_commands() -> list[str]:
    """Every `kfcrun ...` command line in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL):
        block = re.sub(r"\\\n\s*", "", block)  # a command continued over lines is one command
        for line in block.splitlines():
            for part in line.split("#")[0].split("&&"):
                part = part.strip()
                if re.match(r"^(\.venv/bin/)?kfcrun\b", part):
                    commands.append(part)
    return commands


def test_readme_has_no_paths_of_our_development_layout():
    """Issue 9, item 6: the README used ../shared/... paths, which exist only on the developers' machines."""
    assert "../shared" not in README
    assert "source .venv/bin/activate" in README  # so that bare `kfcrun` is on PATH


def test_quickstart_is_two_commands():
    quickstart = re.search(r"## Quickstart\n\n```bash\n(.*?)```", README, flags=re.DOTALL)
    assert quickstart
    commands = [line for line in quickstart.group(1).splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    assert commands[0].startswith("make setup && .venv/bin/kfcrun experiment=cifar10_kfc")
    assert commands[1] == "make test"


def test_every_readme_kfcrun_command_passes_preflight(tmp_path: Path, cache_dir: Path):
    """Each example composes and validates as written (placeholders filled in)."""
    run = train_in_process(tmp_path / "run", cache_dir, *KFC_TINY, "trainer.max_iters=1")  # (a KFC-pre run)
    commands = readme_commands()
    assert len(commands) >= 8
    try:
        has_launcher = importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:  # no hydra_plugins namespace at all
        has_launcher = False
    for command in commands:
        if "+cluster=" in command and not has_launcher:
            continue  # needs the optional `cluster` extra (pip install -e ".[cluster]"), as the README says
        filled = re.sub(r"resume=\S+", f"resume={run}", command)
        filled = filled.replace("<run dir>", str(run)).replace("<partition>", "p")
        args = shlex.split(filled)[1:]
        if "resume=" not in filled:
            args.append(f"hydra.run.dir={tmp_path / 'new'}")
        try:
            preflight(args)
        except Exception as err:
            raise AssertionError(f"README command fails: {command}: {err}") from err


def test_help_is_kfcruns(tmp_path: Path):
    """Issue 9, item 6: `kfcrun --help` called the app "cli" and showed no kfcrun usage."""
    result = subprocess.run(
        [sys.executable, "-m", "kfcrun", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "cli is powered by Hydra" not in result.stdout
    for text in (
        "kfcrun resume=<run dir>",
        "kfcrun experiment=cifar10_kfc",
        "kfcrun -m ",
        "cifar10_bn_kfc,",  # in the help's list of experiments
    ):
        assert text in result.stdout, text
    assert not (tmp_path / "outputs").exists()


def test_help_into_a_closed_pipe_is_quiet(tmp_path: Path):
    """`kfcrun --help | head -3` printed a BrokenPipeError traceback once head had left."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kfcrun", "--help"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before kfcrun prints (it takes a second to start)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports a reader that left early


def test_initial_curvature_estimate_shows_a_progress_bar(tmp_path: Path, cache_dir: Path, capsys):
    """Issue 9, item 6: `kfcrun experiment=cifar10_kfc` sat silent for ~84 s while estimating the factors."""
    cfg = smoke_config(cache_dir, *TINY, *KFC_TINY, "trainer.progress=true", "optimizer.init_examples=96")
    trainer = Trainer(cfg, tmp_path)
    trainer.setup()
    trainer.restore_or_start()
    trainer.initialize_optimizer()
    err = capsys.readouterr().err
    assert "initial curvature estimate" in err and "96/96" in err
    assert list(tmp_path.iterdir()) == []  # nothing written before training starts


def test_summary_shows_current_and_averaged_errors(tmp_path: Path, cache_dir: Path, capsys):
    """Issue 9, item 6: the final line showed only the averaged parameters."""
    train_in_process(tmp_path, cache_dir)
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if " done: " in line]
    assert len(summary) == 1
    assert re.search(
        r"averaged parameters: train error \d+\.\d\d%, test error \d+\.\d\d%, test NLL \d", summary[0]
    )
    assert re.search(
        r"current parameters: train error \d+\.\d\d%, test error \d+\.\d\d%, test NLL \d", summary[0]
    )
