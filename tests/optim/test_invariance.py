"""Theorem 3: KFC updates are invariant to pointwise affine transforms of the activations.

A network N and a network N† whose activation functions additionally apply invertible
affine maps before and after the nonlinearity (Eqn 34), with parameters mapped so that
both compute the same function, must still compute the same function after one
KFC-pre step each (damping set near zero, so the Tikhonov term does not break it).
The convs have no padding: with zero padding a shift ``d`` of the activations would not
reach the border rows of ``[[A]]``, and no parameter mapping could absorb it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.optim import KFCPre
from tests.helpers.oracles import assert_close


class ChannelAffine(nn.Module):
    """``y[:, k] = sum_j x[:, j] M[j, k] + shift[k]`` at every position (fixed, not trained)."""

    def __init__(self, matrix: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bj...,jk->bk...", x, self.matrix) + self.shift.reshape(
            1, -1, *([1] * (x.dim() - 2))
        )


def base_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3)
    )
    for p in net.parameters():
        nn.init.normal_(p, std=0.4)
    return net.double()


def random_affine(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    matrix = torch.eye(n, dtype=torch.float64) + 0.5 * torch.randn(n, n, generator=g, dtype=torch.float64)
    return matrix, torch.randn(n, generator=g, dtype=torch.float64)


def consume(weight: torch.Tensor, bias: torch.Tensor, v: torch.Tensor, d: torch.Tensor):
    """Weights reading ``a† = a V + d`` instead of ``a`` (input channel dim 1, any trailing dims)."""
    new_w = torch.einsum("ij...,kj->ik...", weight, torch.linalg.inv(v))
    new_b = bias - torch.einsum("ik...,k->i", new_w, d)
    return new_w, new_b


def produce(weight: torch.Tensor, bias: torch.Tensor, u: torch.Tensor, c: torch.Tensor):
    """Weights producing ``s† = (s - c) U^{-1}``, so that ``s† U + c = s``."""
    u_inv = torch.linalg.inv(u)
    return torch.einsum("i...,ij->j...", weight, u_inv), (bias - c) @ u_inv


def transformed_twin(net: nn.Sequential, g: torch.Generator):
    """N† with affine maps around every nonlinearity (and on the input), computing N's function."""
    v0, d0 = random_affine(2, g)
    u1, c1 = random_affine(3, g)
    v1, d1 = random_affine(3, g)
    u2, c2 = random_affine(4, g)
    v2, d2 = random_affine(4, g)
    conv1, conv2, fc = net[0], net[2], net[5]
    twin = nn.Sequential(
        nn.Conv2d(2, 3, 3),
        ChannelAffine(u1, c1),
        nn.ReLU(),
        ChannelAffine(v1, d1),
        nn.Conv2d(3, 4, 3),
        ChannelAffine(u2, c2),
        nn.ReLU(),
        ChannelAffine(v2, d2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()
    with torch.no_grad():
        w, b = consume(conv1.weight, conv1.bias, v0, d0)
        twin[0].weight.copy_(produce(w, b, u1, c1)[0])
        twin[0].bias.copy_(produce(w, b, u1, c1)[1])
        w, b = consume(conv2.weight, conv2.bias, v1, d1)
        twin[4].weight.copy_(produce(w, b, u2, c2)[0])
        twin[4].bias.copy_(produce(w, b, u2, c2)[1])
        w, b = consume(fc.weight.reshape(3, 4, 4), fc.bias, v2, d2)
        twin[9].weight.copy_(w.reshape(3, 16))
        twin[9].bias.copy_(b)
    return twin, ChannelAffine(v0, d0)


def kfc_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, damping: float, mode: str) -> None:
    opt = KFCPre(
        model,
        lr=0.05,
        momentum=0.0,
        damping=damping,
        damping_mode=mode,
        clip=None,
        stats_every=1,
        inverse_every=1,
        seed=7,
    )
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The function the network computes: its predictive distribution (logits are defined
    only up to a constant, the null direction of the output layer's Gamma)."""
    return torch.log_softmax(model(x), dim=1)


def invariance_gap(damping: float, mode: str) -> tuple[float, float]:
    """(max |log p_N - log p_N†| after one step, max change of log p_N in that step)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    x_test = torch.randn(10, 2, 6, 6, generator=g, dtype=torch.float64)
    net = base_net()
    twin, input_map = transformed_twin(net, g)
    with torch.no_grad():
        assert_close(
            twin(input_map(x_test)), net(x_test), rtol=1e-10, atol=1e-12, what="same function before"
        )
        before = log_probs(net, x_test)
    kfc_step(net, x, y, damping, mode)
    kfc_step(twin, input_map(x), y, damping, mode)
    with torch.no_grad():
        after, after_twin = log_probs(net, x_test), log_probs(twin, input_map(x_test))
    return (after - after_twin).abs().max().item(), (after - before).abs().max().item()


def test_exact_damping_step_is_invariant_as_damping_vanishes():
    gap, change = invariance_gap(1e-12, "exact")
    assert change > 1.0, "the step barely changed the function; nothing was tested"
    assert gap < 1e-6 * change
    # the gap is the damping's doing: it scales with lambda + gamma
    assert invariance_gap(1e-8, "exact")[0] > 1000 * gap


def test_pi_damping_step_is_invariant_as_damping_vanishes():
    gap, change = invariance_gap(1e-14, "pi")
    assert change > 1.0
    assert gap < 1e-4 * change
    # pi damping adds sqrt(lambda + gamma) to each factor: the gap scales with its square root
    assert invariance_gap(1e-10, "pi")[0] > 30 * gap


def test_plain_gradient_step_is_not_invariant():
    """The control: the same comparison fails for SGD, so the test above can fail."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (48,), generator=g)
    x_test = torch.randn(10, 2, 6, 6, generator=g, dtype=torch.float64)
    net = base_net()
    twin, input_map = transformed_twin(net, g)
    for model, inputs in ((net, x), (twin, input_map(x))):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        F.cross_entropy(model(inputs), y).backward()
        opt.step()
    with torch.no_grad():
        assert (log_probs(net, x_test) - log_probs(twin, input_map(x_test))).abs().max() > 1e-2
