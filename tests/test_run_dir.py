"""A new run never writes over a run; a failed start leaves no directory; one line for each problem."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kfcrun.cli import preflight
from kfcrun.errors import ConfigError
from tests.conftest import run_cli
from tests.data.fakes import snapshot, write_image_folder
from tests.helpers.runs import kfcrun_lines, train_in_process


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir: Path) -> Path:
    return train_in_process(tmp_path_factory.mktemp("finished") / "run", cache_dir)


def test_new_run_refuses_a_directory_that_holds_a_run(tmp_path: Path, cache_dir: Path, finished_run: Path):
    """Issue 9, item 2: the new run overwrote last.pt, config.yaml, run.json and mixed metrics rows."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    result = run_cli(
        ["experiment=smoke", f"hydra.run.dir={run}", "trainer.max_iters=20", "optimizer.lr=0.01"],
        tmp_path,
        cache_dir,
    )
    assert result.returncode == 2
    lines = kfcrun_lines(result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert f"hydra.run.dir={run} already holds a run" in lines[0]
    assert f"kfcrun resume={run}" in lines[0] and "fresh directory" in lines[0]
    assert snapshot(run) == before  # not even .hydra/ was touched


def test_new_sweep_refuses_a_sweep_directory_with_runs(tmp_path: Path, finished_run: Path):
    sweep = tmp_path / "sweep"
    shutil.copytree(finished_run, sweep / "0")
    with pytest.raises(ConfigError, match=r"hydra.sweep.dir=.* holds 1 finished or stopped run"):
        preflight(["-m", "experiment=smoke", "optimizer.lr=0.1,0.01", f"hydra.sweep.dir={sweep}"])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["experiment=cifar10_sgd", "dataset.root=emptydata"], "CIFAR-10"),  # a data error after preflight
        (["experiment=smoke", "trainer.batch_size=5000"], "trainer.batch_size=5000 is larger than the 1024"),
    ],
    ids=["data", "batch_size"],
)
def test_failure_after_preflight_leaves_no_stub(tmp_path: Path, cache_dir: Path, overrides, expected):
    """Issue 9, item 7: failures after preflight left outputs/<date>/<run>/ with .hydra/ and an empty log."""
    (tmp_path / "emptydata").mkdir()
    result = run_cli(overrides, tmp_path, cache_dir)
    assert result.returncode == 2
    lines = kfcrun_lines(result.stderr)
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "outputs").exists()

    existing = tmp_path / "mine"  # a directory the user made: it stays, empty as it was
    existing.mkdir()
    result = run_cli([*overrides, f"hydra.run.dir={existing}"], tmp_path, cache_dir)
    assert result.returncode == 2
    assert existing.is_dir() and list(existing.iterdir()) == []


def test_remove_stub_removes_only_what_hydra_wrote(tmp_path: Path):
    from kfcrun.run_dir import plan_run_dir, remove_stub

    run = tmp_path / "outputs" / "day" / "run"
    planned = plan_run_dir(run)  # before Hydra creates anything
    assert planned.existed == frozenset({tmp_path, *tmp_path.parents})
    (run / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (run / ".hydra" / name).write_text("x")
    (run / "kfcrun.log").write_text("")
    (run / "notes.txt").write_text("mine")
    assert not remove_stub(run, ["kfcrun.log"], ".hydra", planned)  # someone else's file: keep everything
    assert (run / ".hydra" / "hydra.yaml").exists()
    (run / "notes.txt").unlink()
    assert remove_stub(run, ["kfcrun.log"], ".hydra", planned)
    assert not (tmp_path / "outputs").exists()  # the parents Hydra created went too


def test_remove_stub_never_touches_a_run(tmp_path: Path, finished_run: Path):
    from kfcrun.run_dir import remove_stub

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    assert not remove_stub(run, ["kfcrun.log"], ".hydra", None)
    assert snapshot(run) == before


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make ``paths`` unwritable (as root, where permission bits do not apply: the immutable attribute)."""
    if os.geteuid() != 0:
        for path in paths:
            path.chmod(0o555)
        try:
            yield
        finally:
            for path in paths:
                path.chmod(0o755)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a directory read-only")
    done = []
    try:
        for path in paths:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
                pytest.skip("chattr +i is not supported here")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def test_read_only_run_directory_is_one_line(tmp_path: Path, cache_dir: Path, finished_run: Path):
    """Issue 9, item 7: resuming a read-only run gave a traceback fragment."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with read_only(run, run / "checkpoints"):
        result = run_cli([f"resume={run}", "trainer.max_iters=6"], tmp_path, cache_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = kfcrun_lines(result.stderr)
    assert len(lines) == 1 and f"cannot write in {run}" in lines[0] and "fix:" in lines[0], result.stderr

    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent):
        result = run_cli(["experiment=smoke", f"hydra.run.dir={parent / 'new'}"], tmp_path, cache_dir)
    assert result.returncode == 2
    lines = kfcrun_lines(result.stderr)
    assert len(lines) == 1 and "is not writable" in lines[0], result.stderr


def test_an_empty_class_folder_is_refused(tmp_path: Path):
    """Issue 9, item 7: an empty class folder trained with only a count warning."""
    from kfcrun.data import load_dataset
    from kfcrun.errors import DatasetError

    write_image_folder(tmp_path, {"train": 2, "test": 1})
    for image in (tmp_path / "train" / "cat").iterdir():
        image.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("cifar10", tmp_path, format="image_folder", cache_dir=tmp_path / "cache", progress=False)
    message = str(err.value)
    assert (
        "\n" not in message
        and f"class folder {tmp_path / 'train' / 'cat'} holds no .jpg/.png images" in message
    )


def _run_as_hydra_job(cfg, run_dir: Path):
    """Call the task as Hydra's launcher does for a single run in ``run_dir`` (no preflight)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from kfcrun.cli import _compose, run_task

    hydra_cfg = _compose(["experiment=smoke"])
    with open_dict(hydra_cfg):
        hydra_cfg.hydra.runtime.output_dir = str(run_dir)
        hydra_cfg.hydra.mode = RunMode.RUN
    HydraConfig.instance().set_config(hydra_cfg)
    return run_task(cfg)


def test_a_requeued_job_continues_its_run_and_another_config_is_refused(
    tmp_path: Path, cache_dir: Path, finished_run: Path
):
    """A launcher (submitit's requeue) runs the same job again in the same directory, without preflight."""
    import json

    from tests.helpers.runs import TINY, smoke_config

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    _run_as_hydra_job(smoke_config(cache_dir, *TINY), run)
    resumes = json.loads((run / "run.json").read_text())["resumes"]
    assert [r["at_iter"] for r in resumes] == [4]  # continued (here: already finished), not restarted

    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        _run_as_hydra_job(smoke_config(cache_dir, *TINY, "optimizer.lr=0.01"), run)
    assert exit_info.value.code == 2
    assert snapshot(run) == before
