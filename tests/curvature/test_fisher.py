"""Target sampling (true Fisher) and the explicitly named empirical variant."""

from __future__ import annotations

import pytest
import torch

from kfcrun.curvature import (
    KFCCurvature,
    batch_factors,
    batch_factors_for_loss,
    expected_fisher_losses,
    sample_targets,
)
from kfcrun.curvature.fisher import make_loss_fn
from tests.helpers.nets import two_conv_net

# PyTorch warns (once) that an even kernel with padding="same" pads a copy of the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def test_sample_targets_is_reproducible_with_a_seeded_generator() -> None:
    logits = torch.randn(64, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = sample_targets(logits, torch.Generator().manual_seed(5))
    b = sample_targets(logits, torch.Generator().manual_seed(5))
    c = sample_targets(logits, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (64,) and a.dtype == torch.int64 and a.device == logits.device
    assert not a.requires_grad


def test_sample_targets_follows_softmax() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)).expand(20000, 3)
    draws = sample_targets(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=3).double() / 20000
    # Binomial std at p=0.7, n=20000 is 0.0032; allow 5 sigma.
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64), atol=0.016), freq
    peaked = torch.tensor([[0.0, 60.0, 0.0]]).expand(50, 3)
    assert torch.equal(
        sample_targets(peaked, torch.Generator().manual_seed(0)), torch.ones(50, dtype=torch.long)
    )


def test_sample_targets_spatial_logits_use_class_dim_1() -> None:
    logits = torch.zeros(2, 4, 3, 3)
    logits[:, 2] = 50.0
    y = sample_targets(logits, torch.Generator().manual_seed(0))
    assert y.shape == (2, 3, 3) and bool((y == 2).all())


def test_true_fisher_uses_samples_from_the_model(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = batch
    net = two_conv_net()
    curv = KFCCurvature(net, fisher_type="sampled")
    curv.update_statistics(x, generator=torch.Generator().manual_seed(11), init=True)
    with torch.no_grad():
        y = sample_targets(net(x), torch.Generator().manual_seed(11))
    ref = batch_factors(net, x, y)
    for name, block in curv.blocks.items():
        assert torch.equal(block.omega, ref[name][0]) and torch.equal(block.gamma, ref[name][1]), name


def test_empirical_fisher_uses_the_labels(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    net = two_conv_net()
    curv = KFCCurvature(net, fisher_type="empirical")
    curv.update_statistics(x, y, init=True)
    ref = batch_factors(net, x, y)
    for name, block in curv.blocks.items():
        assert torch.equal(block.omega, ref[name][0]) and torch.equal(block.gamma, ref[name][1]), name
    with pytest.raises(ValueError, match="empirical"):
        curv.update_statistics(x)


def test_unknown_fisher_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="fisher_type"):
        KFCCurvature(two_conv_net(), fisher_type="mc")
    with pytest.raises(ValueError, match="fisher_type"):
        make_loss_fn("mc")


def test_expected_fisher_type_is_the_exact_expectation(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, _ = batch
    net = two_conv_net()
    curv = KFCCurvature(net, fisher_type="expected")
    curv.update_statistics(x, init=True)
    ref = batch_factors_for_loss(net, x, expected_fisher_losses)
    for name, block in curv.blocks.items():
        assert torch.equal(block.omega, ref[name][0]) and torch.equal(block.gamma, ref[name][1]), name
