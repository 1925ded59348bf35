"""KFC-pre's speed options (issue 13) against the plain path, float64 on a tiny network."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kfcrun.optim import KFAC, KFCPre
from tests.helpers.optim_nets import batch, flat_params, tiny_net, train_step
from tests.helpers.oracles import assert_close

SETTINGS = dict(lr=0.1, damping=0.1, weight_decay=1e-3, stats_every=2, inverse_every=4, clip=0.3, seed=0)


def _run(steps: int, *, explicit_backward: bool, **options) -> tuple[torch.Tensor, KFCPre]:
    model = tiny_net()
    opt = KFCPre(model, **{**SETTINGS, **options})
    for i in range(steps):
        x, y = batch(i, n=8)
        if explicit_backward:
            opt.zero_grad()
            logits = model(x)
            opt.backward(F.cross_entropy(logits, y), logits, y)
            opt.step()
        else:
            train_step(model, opt, x, y)
    return flat_params(model), opt


@pytest.mark.parametrize("stats_fraction", [1.0, 0.5])
def test_statistics_from_the_training_pass_equal_the_separate_pass(stats_fraction: float) -> None:
    """Same sampled targets (same generator draws), same estimates: the same parameters after 9 steps."""
    plain, _ = _run(9, explicit_backward=False, stats_fraction=stats_fraction)
    fused, opt = _run(9, explicit_backward=True, stats_fraction=stats_fraction, stats_from_training=True)
    assert_close(fused, plain, atol=1e-10, what="parameters with statistics from the training pass")
    assert opt.phase_times["kfc_statistics_s"] > 0
    # A plain loss.backward() loop with the option on falls back to the separate pass.
    fallback, _ = _run(9, explicit_backward=False, stats_fraction=stats_fraction, stats_from_training=True)
    assert_close(fallback, plain, atol=1e-12, what="plain loop with stats_from_training")


def test_training_pass_records_only_statistics_iterations() -> None:
    model = tiny_net()
    opt = KFCPre(model, **SETTINGS, stats_from_training=True)
    x, y = batch(0, n=8)
    for k in range(1, 6):
        opt.zero_grad()
        logits = model(x)
        recorded = opt._training_pass is not None
        # iteration 1 initializes; then statistics every T_s = 2
        assert recorded == (k == 1 or k % 2 == 0), k
        opt.backward(F.cross_entropy(logits, y), logits, y)
        opt.step()
    with torch.no_grad():
        model(x)
    assert opt._training_pass is None, "no recording without grad"


def test_patch_and_lagged_omega_give_the_same_steps() -> None:
    auto, _ = _run(6, explicit_backward=False, omega_method="auto")
    patch, _ = _run(6, explicit_backward=False, omega_method="patch")
    assert_close(auto, patch, atol=1e-10, what="omega_method auto vs patch")


KFAC_SETTINGS = dict(
    damping=0.1, weight_decay=1e-3, stats_every=2, inverse_every=4, lambda_every=2, gamma_every=3
)


def _run_kfac(steps: int, *, explicit_backward: bool, **options) -> torch.Tensor:
    """K-FAC steps with the runner's closure; ``explicit_backward``: through ``opt.backward``."""
    model = tiny_net()
    opt = KFAC(model, **{**KFAC_SETTINGS, **options})
    for i in range(steps):
        x, y = batch(i, n=8)
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if explicit_backward:
            opt.backward(loss, logits, y)
        else:
            loss.backward()
        opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y), inputs=x)
    return flat_params(model)


@pytest.mark.parametrize("options", [{"stats_from_training": True}, {"omega_method": "patch"}])
def test_kfac_speed_options_give_the_same_steps(options: dict) -> None:
    """K-FAC takes KFC-pre's speed options; 7 steps (lambda and gamma adapted) equal the plain path."""
    plain = _run_kfac(7, explicit_backward=False, omega_method="auto")
    fast = _run_kfac(7, explicit_backward=True, **options)
    assert_close(fast, plain, atol=1e-10, what=f"K-FAC parameters with {options}")
    assert not torch.equal(plain, flat_params(tiny_net())), "the steps moved nothing"


def test_kfac_and_kfc_pre_forward_every_shared_knob() -> None:
    """The knobs reach the shared base (a knob dropped on the way would leave its default)."""
    for cls, extra in ((KFCPre, {"lr": 0.1, "async_inverses": True}), (KFAC, {})):
        opt = cls(
            tiny_net(),
            omega_method="patch",
            stats_from_training=True,
            stats_fraction=0.5,
            stats_every=3,
            inverse_every=6,
            seed=7,
            **extra,
        )
        assert opt.curvature.blocks["0"].omega_method == "patch", cls.__name__
        assert opt.stats_from_training and opt.stats_fraction == 0.5, cls.__name__
        assert (opt.schedule.stats_every, opt.schedule.inverse_every) == (3, 6), cls.__name__
        assert opt.refresher.async_inverses == (cls is KFCPre), cls.__name__


def test_async_inverses_are_one_period_stale_and_resume_exactly() -> None:
    """Identical to the synchronous path before the first scheduled inverse (k = T_f = 4); then behind."""
    sync, _ = _run(3, explicit_backward=False)
    background, _ = _run(3, explicit_backward=False, async_inverses=True)
    assert torch.equal(sync, background), "steps 1..T_f-1 do not depend on the scheduled fit"
    sync, _ = _run(4, explicit_backward=False)
    background, opt = _run(4, explicit_backward=False, async_inverses=True)
    assert not torch.equal(sync, background), "from k = T_f the synchronous path uses a newer inverse"
    assert opt.curvature.inverses_pending
    # Save mid-period (a fit pending), load into a fresh optimizer, continue: same as uninterrupted.
    straight, _ = _run(10, explicit_backward=False, async_inverses=True)
    model = tiny_net()
    opt = KFCPre(model, **SETTINGS, async_inverses=True)
    for i in range(6):
        train_step(model, opt, *batch(i, n=8))
    state, params = opt.state_dict(), [p.detach().clone() for p in model.parameters()]
    model2 = tiny_net(seed=5)
    with torch.no_grad():
        for p, q in zip(model2.parameters(), params, strict=True):
            p.copy_(q)
    opt2 = KFCPre(model2, **SETTINGS, async_inverses=True)
    opt2.load_state_dict(state)
    for i in range(6, 10):
        train_step(model2, opt2, *batch(i, n=8))
    assert torch.equal(flat_params(model2), straight), "resume with a pending fit"


def test_data_parallel_refuses_async_inverses_and_skips_training_pass_statistics() -> None:
    """Owner-based distributed inverses are not combined with background fits (refused in one line);
    training-pass estimates would be one rank's alone, so data parallel uses the separate sharded pass."""
    from types import SimpleNamespace

    from kfcrun.curvature import BatchShard

    comm = SimpleNamespace(shard=BatchShard(0, 2), solve_on_owner=False)
    with pytest.raises(ValueError, match="async_inverses=true is not supported data parallel"):
        KFCPre(tiny_net(), lr=0.1, async_inverses=True).distribute(comm)  # type: ignore[arg-type]
    opt = KFCPre(tiny_net(), lr=0.1, stats_from_training=True)
    assert opt._statistics_due_next()
    opt.distribute(comm)  # type: ignore[arg-type]
    assert not opt._statistics_due_next()
