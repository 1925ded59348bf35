"""Ctrl-C and SIGTERM stop a run after the current step with a checkpoint; a second signal at once."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import torch

from kfcrun.checkpoint import load_checkpoint
from kfcrun.logging import is_timing_key, read_metrics
from tests.conftest import run_cli
from tests.helpers.runs import checkpoint_iteration, kfcrun_lines, kfcrun_process, wait_until

ARGS = [
    "experiment=smoke",
    "trainer.max_iters=40",
    "trainer.eval_every=5",
    "trainer.checkpoint_every=20",
    "trainer.train_eval_size=64",
]


@pytest.fixture(autouse=True)
def terminal_signal_handlers():
    """SIGINT and SIGTERM as a process started from a terminal has them, whatever started pytest.

    A shell without job control starts a background command (``cmd &``, as CI scripts and
    ``nohup`` lanes do) with SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler; GracefulStop rightly leaves an ignored SIGINT alone, so the in-process tests below
    would test nothing. (Two of them failed that way in a backgrounded clean-clone run.)
    """
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir: Path) -> Path:
    """The uninterrupted run."""
    run = tmp_path_factory.mktemp("reference") / "run"
    result = run_cli([*ARGS, f"hydra.run.dir={run}"], run.parent, cache_dir)
    assert result.returncode == 0, result.stderr
    return run


def strip(rows):
    return [{k: v for k, v in r.items() if not is_timing_key(k)} for r in rows]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_prints_the_resume_command_and_resume_finishes_the_same(
    tmp_path: Path, cache_dir: Path, reference: Path, sig: signal.Signals
):
    """Issue 9, item 3: finish the step, checkpoint, one line with resume=, exit 128 + signum."""
    run = tmp_path / "run"
    proc = kfcrun_process([*ARGS, f"hydra.run.dir={run}"], tmp_path, cache_dir)
    wait_until(proc, lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    lines = kfcrun_lines(stderr)
    assert len(lines) == 1, stderr
    match = re.search(
        rf"stopped by {sig.name} at iteration (\d+) of 40; checkpoint (\S+) written; "
        rf"resume with: kfcrun resume=(\S+)$",
        lines[0],
    )
    assert match, lines[0]
    stopped_at = int(match.group(1))
    assert 5 <= stopped_at < 40, "the run finished before the signal; nothing was tested"
    assert Path(match.group(3)) == run
    assert checkpoint_iteration(run) == stopped_at

    resumed = run_cli([f"resume={match.group(3)}"], tmp_path, cache_dir)
    assert resumed.returncode == 0, resumed.stderr
    final_ref = load_checkpoint(reference / "checkpoints" / "last.pt")
    final = load_checkpoint(run / "checkpoints" / "last.pt")
    assert final["iteration"] == final_ref["iteration"] == 40
    for name, tensor in final_ref["model"].items():
        assert torch.equal(tensor, final["model"][name]), name
    for index, state in final_ref["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, final["optimizer"]["state"][index][key]), (index, key)
    assert strip(read_metrics(run)) == strip(read_metrics(reference))


def test_sigusr2_stops_like_sigterm(tmp_path: Path, cache_dir: Path):
    """What submitit and `sbatch --signal` send before a job's time runs out."""
    run = tmp_path / "run"
    proc = kfcrun_process([*ARGS, f"hydra.run.dir={run}"], tmp_path, cache_dir)
    wait_until(proc, lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 1)
    proc.send_signal(signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGUSR2, stderr
    line = kfcrun_lines(stderr)[0]
    assert "stopped by SIGUSR2" in line and f"kfcrun resume={run}" in line
    assert 5 <= checkpoint_iteration(run) < 40


def test_a_second_signal_exits_at_once(tmp_path: Path, cache_dir: Path):
    """Both signals arrive together (the process is stopped meanwhile): the second one wins at once."""
    run = tmp_path / "run"
    proc = kfcrun_process([*ARGS, f"hydra.run.dir={run}"], tmp_path, cache_dir)
    # the evaluation at 25 is written after the checkpoint at 20; the next one is due at 40
    wait_until(proc, lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 5)
    proc.send_signal(signal.SIGSTOP)
    before = checkpoint_iteration(run)
    assert before == 20
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    lines = kfcrun_lines(stderr)
    assert len(lines) == 1 and "SIGTERM again: stopped at once" in lines[0], stderr
    assert f"(iteration {before})" in lines[0] and f"kfcrun resume={run}" in lines[0]
    assert checkpoint_iteration(run) == before  # no new checkpoint; the last one is intact


def test_signal_before_training_starts_stops_at_once():
    """No step to finish and nothing to save (e.g. while loading data or estimating initial factors)."""
    from kfcrun.signals import GracefulStop, RunInterrupted

    with GracefulStop() as stop, pytest.raises(RunInterrupted) as err:
        assert signal.SIGINT in stop.handled
        os.kill(os.getpid(), signal.SIGINT)
    assert err.value.exit_code == 130 and "before the first training step" in str(err.value)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_sigusr2_calls_a_launchers_handler_after_the_checkpoint():
    """submitit installs its own SIGUSR2 handler (checkpoint and requeue): it runs after ours."""
    from kfcrun.signals import GracefulStop

    called = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: called.append(signum))
    try:
        with GracefulStop() as stop:
            stop.arm()
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested == signal.SIGUSR2 and called == []  # the run finishes its step first
            stop.finish()
        assert called == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_ignored_and_foreign_handlers_are_left_alone():
    """A parent that ignores SIGINT (nohup) or a launcher that handles SIGTERM keeps it."""
    from kfcrun.signals import GracefulStop

    foreign = lambda signum, frame: None  # noqa: E731
    old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    old_term = signal.signal(signal.SIGTERM, foreign)
    try:
        with GracefulStop() as stop:
            assert signal.SIGINT not in stop.handled and signal.SIGTERM not in stop.handled
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is foreign
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)


def test_a_second_signal_in_process_calls_exit_with_its_code():
    from kfcrun.signals import GracefulStop

    exits = []
    with GracefulStop(exit_now=exits.append) as stop:
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested == signal.SIGINT and exits == [128 + signal.SIGTERM]
