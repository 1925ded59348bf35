"""Finite blow-ups stop the run like a NaN; the exact damping mode warns when it is ill-conditioned."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import kfcrun.train as train_module
from kfcrun.checkpoint import load_checkpoint
from kfcrun.curvature import KFCCurvatureWarning
from kfcrun.curvature.inverses import EigenInverse
from kfcrun.errors import ConfigError, TrainingDivergedError
from kfcrun.logging import read_metrics
from tests.conftest import run_cli
from tests.helpers.runs import kfcrun_lines, smoke_config


def guard(**settings):
    from kfcrun.divergence import DivergenceGuard, DivergenceSettings

    return DivergenceGuard(DivergenceSettings(**settings), lambda: "no checkpoint was written before it")


def test_guard_stops_after_patience_intervals_above_the_ratio():
    g = guard(max_loss_ratio=3.0, patience=2)
    g.observe(torch.tensor([2.0, 2.5]), iteration=2)  # L_1 = 2: threshold 6
    assert g.threshold == 6.0 and not g.suspect
    g.observe(torch.tensor([7.0, 7.0]), iteration=4)
    assert g.suspect and g.strikes == 1
    g.observe(torch.tensor([5.0, 5.0]), iteration=6)  # back below: the count restarts
    assert not g.suspect
    g.observe(torch.tensor([9.0, 9.0]), iteration=8)
    with pytest.raises(TrainingDivergedError) as err:
        g.observe(torch.tensor([1e20, 1e21]), iteration=10)
    message = str(err.value)
    assert "\n" not in message and "iteration 10" in message and "5.5e+20" in message
    assert "divergence.max_loss_ratio=3 x the first loss 2" in message and "divergence.patience=2" in message


def test_guard_fixed_bound_and_the_end_of_the_run():
    g = guard(max_loss_ratio=None, max_loss=4.0, patience=5)
    g.observe(torch.tensor([2.3]), iteration=1)
    g.observe(torch.tensor([4.5]), iteration=2)
    assert g.threshold == 4.0 and g.strikes == 1
    with pytest.raises(TrainingDivergedError, match="at the end of the run"):
        g.observe(torch.tensor([4.5]), iteration=3, final=True)
    off = guard(max_loss_ratio=None, max_loss=None)
    off.observe(torch.tensor([2.3, 1e30]), iteration=2, final=True)  # no bound: only NaN/inf stop it
    with pytest.raises(TrainingDivergedError, match="training loss became nan at iteration 4"):
        off.observe(torch.tensor([1.0, math.nan]), iteration=4)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("divergence.patience=0", r"divergence.patience=0 is out of range"),
        ("divergence.max_loss_ratio=0.5", r"divergence.max_loss_ratio=0.5 is out of range"),
        ("divergence.max_loss=-1", r"divergence.max_loss=-1 is out of range"),
    ],
)
def test_guard_settings_are_validated(override: str, match: str):
    from kfcrun.cli import preflight

    with pytest.raises(ConfigError, match=match):
        preflight(["experiment=smoke", override])


def test_finite_blow_up_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, cache_dir: Path, monkeypatch
):
    """The loss VALUE is multiplied by 1e6 from step 13 on (its gradient is not), as a blow-up looks."""
    real_loss = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def blown_up(logits, labels, *args, **kwargs):
        loss = real_loss(logits, labels, *args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= 13:
                return loss + (1e6 * loss).detach() - loss.detach()
        return loss

    monkeypatch.setattr(train_module.F, "cross_entropy", blown_up)
    cfg = smoke_config(
        cache_dir,
        "trainer.checkpoint_every=5",
        "trainer.log_every=2",
        "trainer.eval_every=10",
        "trainer.train_eval_size=64",
        "divergence.patience=3",
    )
    with pytest.raises(TrainingDivergedError) as err:
        train_module.train(cfg, tmp_path)
    message = str(err.value)
    # log intervals end at 14, 15 (a checkpoint is due: logged, not written) and 16, all above 3 x L_1
    assert "training loss diverged" in message and "ending at iteration 16" in message
    assert f"the last good checkpoint is {tmp_path / 'checkpoints' / 'last.pt'} (iteration 10)" in message
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 10
    assert [r["iter"] for r in read_metrics(tmp_path)] == [10]


def test_issue_repro_tiny_damping_stops_with_exit_3_and_warns(tmp_path: Path, cache_dir: Path):
    """Issue 9, item 5: KFC-pre, damping 1e-12, exact mode ended 'done', rc 0, test NLL 1e16, no warning."""
    result = run_cli(
        [
            "experiment=smoke",
            "optimizer=kfc_pre",
            "optimizer.init_examples=128",
            "optimizer.stats_every=2",
            "optimizer.inverse_every=4",
            "optimizer.damping=1e-12",
            "optimizer.damping_mode=exact",
            "trainer.max_iters=20",
            "trainer.log_every=2",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
        cache_dir,
        PYTHONWARNINGS="default",
    )
    assert result.returncode == 3, result.stdout + result.stderr
    lines = kfcrun_lines(result.stderr)
    assert len(lines) == 1 and "training loss diverged" in lines[0], result.stderr
    assert "no checkpoint was written before it" in lines[0] and "raise optimizer.damping" in lines[0]
    assert "the damped block is ill-conditioned" in result.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_exact_damping_warns_once_when_below_the_rounding_level():
    """Condition number (max d_G max d_O + t) / t beyond 1/eps of the stored dtype: warn, once per layer."""
    omega = torch.diag(torch.tensor([1e3, 1.0, 0.0]))
    gamma = torch.diag(torch.tensor([1e-1, 1e-2]))
    block = EigenInverse("conv1", 3, 2)
    with pytest.warns(KFCCurvatureWarning, match=r"'conv1'.*ill-conditioned.*condition number 1e\+14"):
        block.prepare((omega, gamma), [1e-12], torch.float64)
        block.commit([True])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block.prepare((omega, gamma), [1e-12], torch.float64)
        block.commit([True])  # once per layer
        fine = EigenInverse("conv2", 3, 2)
        fine.prepare((omega, gamma), [1e-3], torch.float64)
        fine.commit([True])
    # the threshold is 1/eps of the stored dtype: 100 / 1e-3 = 1e5 is fine in float32, not in float16
    assert fine.check_conditioning(
        torch.tensor([1e3]), torch.tensor([1e-1]), 1e-3, torch.float32
    ) == pytest.approx(1e5 + 1)
    with pytest.warns(KFCCurvatureWarning):
        EigenInverse("h", 1, 1).check_conditioning(
            torch.tensor([1e3]), torch.tensor([1e-1]), 1e-3, torch.float16
        )
