"""``nu``'s exact Fisher quadratic form against ``v^T F v`` from explicit Jacobians, for every likelihood.

``F = (1/M) sum_n J_n^T H_n J_n`` with ``J_n`` the Jacobian of example ``n``'s whole output
(every position) and ``H_n`` its output Fisher: the same object the factors approximate,
which the last test checks directly on dense outputs where KFC is exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfcrun.curvature import Bernoulli, Gaussian, SoftmaxCrossEntropy, batch_factors_for_loss
from kfcrun.optim.fisher_vector import fisher_quadratic
from tests.helpers.oracles import assert_close, vec


def output_fisher(lik, out: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``H_n`` ``(M, E, E)`` over the entries of each example's output, in ``out.reshape(M, -1)`` order."""
    m = out.shape[0]
    flat = out.reshape(m, -1)
    if isinstance(lik, Gaussian):
        return torch.eye(flat.shape[1], dtype=out.dtype).expand(m, -1, -1)
    if isinstance(lik, Bernoulli):
        p = torch.sigmoid(flat)
        return torch.diag_embed(p * (1 - p))
    moved = out.movedim(1, -1) if lik.class_dim == 1 else out  # (M, positions..., C)
    c = moved.shape[-1]
    p = torch.softmax(moved.reshape(m, -1, c), dim=-1)
    blocks = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (M, T, C, C)
    if labels is not None:
        blocks = blocks * (labels.reshape(m, -1) != lik.ignore_index)[..., None, None]
    h = torch.stack([torch.block_diag(*blocks[n]) for n in range(m)])  # (position, class) order
    if lik.class_dim == 1 and out.dim() > 2:  # out's own order is (class, position)
        t = p.shape[1]
        perm = torch.arange(t * c).reshape(t, c).T.reshape(-1)
        h = h[:, perm][:, :, perm]
    return h


def explicit_quadratic(
    model: nn.Module, x: torch.Tensor, v: dict[str, torch.Tensor], lik, labels
) -> torch.Tensor:
    """``(1/M) sum_n (J_n v)^T H_n (J_n v)`` with ``J_n`` from ``torch.func.jacrev``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = torch.func.jacrev(lambda ps: torch.func.functional_call(model, ps, (x,)))(params)
    m = x.shape[0]
    jv = sum(jac[n].reshape(m, -1, v[n].numel()) @ v[n].reshape(-1) for n in params)
    out = model(x).detach()
    h = output_fisher(lik, out, labels)
    return torch.einsum("mi,mij,mj->m", jv, h, jv).mean()


class Dense(nn.Module):
    """Conv -> tanh -> 1x1 conv: per-pixel outputs ``(M, C, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


class Tokens(nn.Module):
    """Embedding -> LayerNorm -> Linear: per-token outputs ``(M, T, V)``."""

    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Embedding(7, 4)
        self.n = nn.LayerNorm(4)
        self.h = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.n(self.e(x)))


def _case(name: str):
    g = torch.Generator().manual_seed(3)
    if name in ("ce_pixels", "gaussian_pixels", "bernoulli_pixels"):
        model, x = Dense(), torch.randn(3, 2, 3, 3, generator=g)
        lik = {
            "ce_pixels": SoftmaxCrossEntropy(),
            "gaussian_pixels": Gaussian(),
            "bernoulli_pixels": Bernoulli(),
        }
        return model, x, lik[name], None
    if name == "ce_classes":
        return (
            nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5)),
            torch.randn(4, 4, generator=g),
            SoftmaxCrossEntropy(),
            None,
        )
    labels = torch.tensor([[1, 2, -100, 0], [4, -100, -100, 3]])
    return (
        Tokens(),
        torch.randint(0, 7, (2, 4), generator=g),
        SoftmaxCrossEntropy(-1, ignore_index=-100),
        labels,
    )


@pytest.mark.parametrize(
    "name", ["ce_classes", "ce_pixels", "ce_tokens_masked", "gaussian_pixels", "bernoulli_pixels"]
)
def test_nu_is_v_f_v_from_jacobians(name: str) -> None:
    torch.manual_seed(0)
    model, x, lik, labels = _case(name)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    g = torch.Generator().manual_seed(4)
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
    got = fisher_quadratic(model, x, v, likelihood=lik, targets=labels)
    assert_close(got, explicit_quadratic(model, x, v, lik, labels), atol=1e-12, rtol=1e-10, what=name)


def test_nu_and_the_factors_describe_the_same_fisher_on_dense_outputs() -> None:
    """A 1x1 conv on a 3x3 map with a Gaussian per pixel: ``Omega ⊗ Gamma`` is exact, so
    ``vec(V)^T (Omega ⊗ Gamma) vec(V)`` must equal ``nu``'s ``v^T F v`` - both summing the 9 pixels
    per example and averaging over examples (no averaging over pixels on either side)."""
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 3, 1).double()
    model = nn.Sequential(conv)
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    omega, gamma = batch_factors_for_loss(model, x, Gaussian().expected_losses)["0"]
    g = torch.Generator().manual_seed(6)
    dw, db = (
        torch.randn(3, 2, 1, 1, generator=g, dtype=torch.float64),
        torch.randn(3, generator=g, dtype=torch.float64),
    )
    wbar = torch.cat([db[:, None], dw.flatten(1)], dim=1)
    from_factors = vec(wbar) @ torch.kron(omega, gamma) @ vec(wbar)
    nu = fisher_quadratic(model, x, {"0.weight": dw, "0.bias": db}, likelihood=Gaussian())
    assert_close(nu, from_factors, atol=1e-12, rtol=1e-12, what="nu vs factors")
