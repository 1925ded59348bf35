"""Exact-Fisher bilinear forms v_i^T F v_j against explicit Jacobians, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfcrun.curvature import SoftmaxCrossEntropy
from kfcrun.optim.fisher_vector import fisher_gram, fisher_quadratic, output_gram
from tests.helpers.optim_nets import batch, tiny_net
from tests.helpers.oracles import assert_close, explicit_fisher
from tests.optim.test_nu_likelihoods import _case, explicit_quadratic


def random_directions(model: nn.Module, count: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
        for _ in range(count)
    ]


def flat(model: nn.Module, direction: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([direction[n].reshape(-1) for n, _ in model.named_parameters()])


def test_fisher_gram_matches_explicit_jacobians():
    model = tiny_net()
    x, _ = batch(1)
    directions = random_directions(model, 3)
    vectors = torch.stack([flat(model, d) for d in directions])
    expected = vectors @ explicit_fisher(model, x) @ vectors.T
    gram = fisher_gram(model, x, directions)
    assert_close(gram, expected, rtol=1e-10, what="V^T F V")
    assert torch.linalg.eigvalsh(gram).min() > 0  # the test's directions are not degenerate


def test_fisher_quadratic_is_the_one_direction_gram():
    model = tiny_net()
    x, _ = batch(2)
    v, w = random_directions(model, 2, seed=5)
    assert_close(
        fisher_quadratic(model, x, v), fisher_gram(model, x, [v, w])[0, 0], rtol=1e-12, what="v^T F v"
    )
    assert torch.equal(fisher_quadratic(model, x, v), fisher_gram(model, x, [v])[0, 0])


def test_missing_parameters_get_zero_tangents():
    model = tiny_net()
    x, _ = batch(3)
    (v,) = random_directions(model, 1)
    only_linear = {n: t for n, t in v.items() if n.startswith("4.")}
    padded = {n: (t if n.startswith("4.") else torch.zeros_like(t)) for n, t in v.items()}
    assert_close(fisher_gram(model, x, [only_linear, v]), fisher_gram(model, x, [padded, v]), rtol=1e-12)


def test_every_direction_sees_the_same_dropout_masks():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4)
    ).double()
    x, _ = batch(4)
    (v,) = random_directions(net, 1)
    gram = fisher_gram(net, x, [v, v, v])
    assert torch.equal(gram, torch.full_like(gram, gram[0, 0].item()))
    assert gram[0, 0] > 0


def test_batch_norm_buffers_are_left_alone():
    model = tiny_net(batch_norm=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x, _ = batch(1)
    gram = fisher_gram(model, x, random_directions(model, 2))
    assert gram.shape == (2, 2) and torch.isfinite(gram).all()
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_softmax_output_gram_from_its_definition():
    """``H_m = diag(p_m) - p_m p_m^T`` applied to two JVPs, by hand."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, generator=g, dtype=torch.float64)
    jvps = [torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    expected = torch.zeros(2, 2, dtype=torch.float64)
    for m in range(5):
        p = torch.softmax(logits[m], 0)
        h = torch.diag(p) - torch.outer(p, p)
        for i in range(2):
            for j in range(2):
                expected[i, j] += jvps[i][m] @ h @ jvps[j][m] / 5
    assert_close(
        output_gram(SoftmaxCrossEntropy(), logits, jvps), expected, rtol=1e-12, what="output-space Fisher"
    )


@pytest.mark.parametrize(
    "name", ["ce_classes", "ce_pixels", "ce_tokens_masked", "gaussian_pixels", "bernoulli_pixels"]
)
def test_fisher_gram_for_every_likelihood_and_dense_outputs(name: str) -> None:
    """Issue 11's likelihoods in K-FAC's Gram matrix: each entry against explicit Jacobians.

    The off-diagonal ``v^T F w`` by polarization, ``((v+w)^T F (v+w) - (v-w)^T F (v-w)) / 4``,
    each side from ``J`` (``torch.func.jacrev``) and ``H_n`` built from the likelihood's definition;
    the diagonal is ``fisher_quadratic`` bitwise (``nu``'s scaling: summed over positions, mean
    over examples, the scaling of the factors).
    """
    torch.manual_seed(0)
    model, x, lik, labels = _case(name)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    g = torch.Generator().manual_seed(4)
    v, w = (
        {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()}
        for _ in range(2)
    )
    gram = fisher_gram(model, x, [v, w], likelihood=lik, targets=labels)
    plus = {n: v[n] + w[n] for n in v}
    minus = {n: v[n] - w[n] for n in v}
    expected = torch.empty(2, 2, dtype=torch.float64)
    expected[0, 0] = explicit_quadratic(model, x, v, lik, labels)
    expected[1, 1] = explicit_quadratic(model, x, w, lik, labels)
    expected[0, 1] = expected[1, 0] = (
        explicit_quadratic(model, x, plus, lik, labels) - explicit_quadratic(model, x, minus, lik, labels)
    ) / 4
    assert_close(gram, expected, atol=1e-12, rtol=1e-10, what=name)
    assert torch.equal(
        fisher_gram(model, x, [v], likelihood=lik, targets=labels)[0, 0],
        fisher_quadratic(model, x, v, likelihood=lik, targets=labels),
    )
