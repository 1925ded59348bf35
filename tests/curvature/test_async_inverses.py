"""Background inverse fits: same numbers as update_inverses, installed only by finish_inverses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfcrun.curvature import KFCCurvature
from tests.helpers.oracles import assert_close


def _setup(damping_mode: str) -> tuple[nn.Module, KFCCurvature, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).double()
    x = torch.randn(12, 3, 6, 6, dtype=torch.float64)
    curvature = KFCCurvature(model, damping_mode=damping_mode)
    curvature.update_statistics(x, generator=torch.Generator().manual_seed(1), init=True)
    return model, curvature, x


def _grads(curvature: KFCCurvature) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        name: torch.randn(block.layout_shape, generator=g, dtype=torch.float64)
        for name, block in curvature.blocks.items()
    }


@pytest.mark.parametrize("damping_mode", ["pi", "exact"])
def test_start_then_finish_is_update_inverses(damping_mode: str) -> None:
    _, sync, _ = _setup(damping_mode)
    _, background, _ = _setup(damping_mode)
    sync.update_inverses([1e-2, 1e-1], 1e-3)
    background.start_inverses([1e-2, 1e-1], 1e-3)
    assert background.inverses_pending
    result = background.finish_inverses()
    assert result is not None and result.nonfinite == 0 and not background.inverses_pending
    assert background.num_inverse_updates == sync.num_inverse_updates == 1
    grads = _grads(sync)
    for index in (0, 1):
        a, b = sync.precondition(grads, index), background.precondition(grads, index)
        for name in a:
            assert torch.equal(a[name], b[name]), f"{name} candidate {index}"


def test_pending_fit_uses_its_snapshot_and_keeps_the_old_inverse() -> None:
    """While the job runs, precondition() uses the previous inverse; later statistics do not leak in."""
    _, curvature, x = _setup("pi")
    _, reference, _ = _setup("pi")
    curvature.update_inverses(1e-2, 0.0)
    reference.update_inverses(1e-2, 0.0)
    grads = _grads(curvature)
    before = curvature.precondition(grads)
    curvature.start_inverses(1.0, 0.0)  # snapshot of the factors as they are now
    reference.update_inverses(1.0, 0.0)
    # A statistics update after the start must not change the job's result.
    curvature.update_statistics(x * 3.0, generator=torch.Generator().manual_seed(5))
    during = curvature.precondition(grads)
    for name in before:
        assert torch.equal(before[name], during[name]), f"{name}: the pending fit must not be in use yet"
    with pytest.raises(RuntimeError, match="pending"):
        curvature.start_inverses(1.0, 0.0)
    curvature.finish_inverses()
    after, expected = curvature.precondition(grads), reference.precondition(grads)
    for name in after:
        assert_close(after[name], expected[name], atol=0.0, what=f"{name}: fit from the snapshot")
    assert curvature.finish_inverses() is None


def test_pending_fit_survives_a_checkpoint() -> None:
    """state_dict() saves a pending fit; after loading, finish_inverses() installs the same inverse."""
    _, curvature, _ = _setup("pi")
    _, restored, _ = _setup("pi")
    curvature.update_inverses(1e-2, 0.0)
    curvature.start_inverses(1.0, 0.0)
    state = curvature.state_dict()
    assert "pending_inverses" in state and curvature.inverses_pending
    restored.load_state_dict(state)
    assert restored.inverses_pending
    grads = _grads(curvature)
    old_a, old_b = curvature.precondition(grads), restored.precondition(grads)
    curvature.finish_inverses()
    restored.finish_inverses()
    new_a, new_b = curvature.precondition(grads), restored.precondition(grads)
    for name in grads:
        assert torch.equal(old_a[name], old_b[name]) and torch.equal(new_a[name], new_b[name]), name
        assert not torch.equal(old_a[name], new_a[name]), f"{name}: the pending fit must change the inverse"
    assert restored.num_inverse_updates == curvature.num_inverse_updates
