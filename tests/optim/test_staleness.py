"""The staleness guard: when it asks for a refresh, and KFC-pre refreshing on it."""

from __future__ import annotations

import pytest
import torch

from kfcrun.optim import KFCPre
from kfcrun.optim.staleness import StalenessGuard
from tests.helpers.optim_nets import batch, tiny_net, train_step


def t(value: float) -> torch.Tensor:
    return torch.tensor(value)


def test_guard_fires_on_a_nu_jump_or_a_low_health_score():
    guard = StalenessGuard(nu_jump=10.0, health_below=0.5)
    guard.observe(nu=t(1.0), health=t(1.0))
    assert not guard.due()
    guard.observe(nu=t(9.0), health=t(0.9))  # grew, but less than 10x
    assert not guard.due()
    guard.observe(nu=t(91.0), health=t(0.9))  # 91 > 10 * 9
    assert guard.due() and not guard.due()  # reading clears the request
    guard.observe(nu=t(91.0), health=t(0.2))
    assert guard.due()
    guard.observe(nu=None, health=None)  # a step without the signals asks nothing
    assert not guard.due()
    assert guard.refreshes == 2


def test_guard_state_round_trip():
    guard = StalenessGuard(nu_jump=2.0)
    guard.observe(nu=t(1.0))
    guard.observe(nu=t(3.0))
    other = StalenessGuard(nu_jump=2.0)
    other.load_state_dict(guard.state_dict(), torch.device("cpu"))
    assert other.due() and guard.due()
    other.observe(nu=t(5.0))
    guard.observe(nu=t(5.0))
    assert other.due() == guard.due() is False


def test_a_guard_without_thresholds_never_fires():
    guard = StalenessGuard()
    guard.observe(nu=t(1.0), health=t(0.0))
    guard.observe(nu=t(1e9), health=t(0.0))
    assert not guard.enabled and not guard.due()


@pytest.mark.parametrize(("guard_clip", "expected"), [(None, [1]), (0.5, [1, 2, 3, 4, 5, 6])])
def test_kfc_pre_refreshes_after_a_heavily_clipped_step(monkeypatch, guard_clip, expected):
    """lr 10 with C = 1e-3 clips every step hard: the guard refreshes statistics and inverses at the next."""
    model = tiny_net()
    opt = KFCPre(model, lr=10.0, clip=1e-3, guard_clip=guard_clip, stats_every=100, inverse_every=100, seed=1)
    calls: dict[str, list[int]] = {"stats": [], "inverses": []}
    real_stats, real_inv = opt.curvature.update_statistics, opt.curvature.update_inverses
    monkeypatch.setattr(
        opt.curvature,
        "update_statistics",
        lambda *a, **k: (calls["stats"].append(opt.iteration + 1), real_stats(*a, **k))[1],
    )
    monkeypatch.setattr(
        opt.curvature,
        "update_inverses",
        lambda *a, **k: (calls["inverses"].append(opt.iteration + 1), real_inv(*a, **k))[1],
    )
    for k in range(6):
        train_step(model, opt, *batch(k))
        assert opt.step_stats()["clip_factor"].item() < 0.5
    assert calls == {"stats": expected, "inverses": expected}
    assert opt.guard.refreshes == len(expected) - 1


def test_guard_needs_nu():
    with pytest.raises(ValueError, match="clip=None"):
        KFCPre(tiny_net(), lr=0.1, clip=None, guard_nu_jump=10.0)
