"""Statistics from the training forward (recording + one retained backward) vs the separate pass, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.curvature import KFCCurvature
from tests.helpers.oracles import assert_close


def _net(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, 4, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 6)]
    return nn.Sequential(*layers).double()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 6, (10,), generator=g)


@pytest.mark.parametrize("fisher_type", ["sampled", "expected", "empirical"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_training_pass_statistics_equal_the_separate_pass(fisher_type: str, batch_norm: bool) -> None:
    model = _net(batch_norm)
    x, y = _data()
    curvature = KFCCurvature(model, fisher_type=fisher_type)
    targets = y if fisher_type == "empirical" else None
    separate = curvature.estimate_statistics(x, targets, generator=torch.Generator().manual_seed(7))
    with curvature.recording() as layer_pass:
        logits = model(x)
    from_pass = curvature.estimate_from_pass(
        layer_pass, logits, targets, generator=torch.Generator().manual_seed(7)
    )
    assert list(from_pass) == list(separate)
    for name, estimate in separate.items():
        for a, b in zip(from_pass[name], estimate, strict=True):
            assert_close(a, b, atol=1e-12 * max(1.0, b.abs().max().item()), what=f"{name} ({fisher_type})")
    # The training backward still runs through the same graph, and gives the plain gradient.
    F.cross_entropy(logits, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for a, b in zip(grads, [p.grad for p in model.parameters()], strict=True):
        assert_close(a, b, atol=1e-13, what="training gradient after estimate_from_pass")


def test_training_pass_subset_equals_the_separate_pass_on_the_subset() -> None:
    model = _net(batch_norm=False)
    x, _ = _data()
    curvature = KFCCurvature(model)
    separate = curvature.estimate_statistics(x[:4], generator=torch.Generator().manual_seed(3))
    with curvature.recording() as layer_pass:
        logits = model(x)
    from_pass = curvature.estimate_from_pass(
        layer_pass, logits, generator=torch.Generator().manual_seed(3), examples=4
    )
    for name, estimate in separate.items():
        for a, b in zip(from_pass[name], estimate, strict=True):
            assert_close(a, b, atol=1e-12 * max(1.0, b.abs().max().item()), what=f"{name} (4 of 10 examples)")


def test_estimate_from_pass_needs_a_recorded_forward() -> None:
    model = _net(batch_norm=False)
    curvature = KFCCurvature(model)
    with curvature.recording() as layer_pass:
        pass
    with pytest.raises(RuntimeError, match="inside recording"):
        curvature.estimate_from_pass(layer_pass, torch.zeros(2, 6, dtype=torch.float64))
