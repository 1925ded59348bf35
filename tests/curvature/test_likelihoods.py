"""Likelihoods: losses vs PyTorch's, samples vs the distribution, square roots and H vs definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kfcrun.curvature import Bernoulli, Gaussian, SoftmaxCrossEntropy, make_likelihood, make_loss_fn
from kfcrun.curvature.likelihoods import inverse_cdf_sample
from tests.helpers.oracles import assert_close


def output_fisher(lik, out: torch.Tensor) -> torch.Tensor:
    """``H_n`` of every example, ``(M, E, E)`` over the E entries of one example, by definition."""
    m = out.shape[0]
    flat = out.reshape(m, -1)
    if isinstance(lik, Gaussian):
        return torch.eye(flat.shape[1], dtype=out.dtype).expand(m, -1, -1)
    if isinstance(lik, Bernoulli):
        p = torch.sigmoid(flat)
        return torch.diag_embed(p * (1 - p))
    # softmax over the class dim, independent positions: block-diagonal over positions
    logits = out.movedim(lik.class_dim, -1) if lik.class_dim == 1 else out
    logits = logits.reshape(m, -1, logits.shape[-1])
    p = torch.softmax(logits, dim=-1)
    blocks = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # (M, T, C, C)
    h = torch.stack([torch.block_diag(*blocks[n]) for n in range(m)])
    if lik.class_dim == 1 and out.dim() > 2:
        # entries of out in its own order (class major): permute from (position, class) order
        t, c = logits.shape[1], logits.shape[2]
        perm = torch.arange(t * c).reshape(t, c).T.reshape(-1)
        h = h[:, perm][:, :, perm]
    return h


LIKS = {
    "ce_classes": (SoftmaxCrossEntropy(), (4, 5)),
    "ce_pixels": (SoftmaxCrossEntropy(), (3, 4, 2, 3)),
    "ce_tokens_last": (SoftmaxCrossEntropy(class_dim=-1), (3, 4, 5)),
    "gaussian_dense": (Gaussian(), (3, 2, 3)),
    "bernoulli_dense": (Bernoulli(), (3, 4, 2)),
}


@pytest.mark.parametrize("case", list(LIKS))
def test_expected_losses_are_a_square_root_of_the_output_fisher(case: str) -> None:
    lik, shape = LIKS[case]
    out = torch.randn(
        *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True
    )
    grads = [torch.autograd.grad(loss, out, retain_graph=True)[0] for loss in lik.expected_losses(out)]
    m = shape[0]
    got = sum(torch.einsum("mi,mj->mij", g.reshape(m, -1), g.reshape(m, -1)) for g in grads)
    assert_close(got, output_fisher(lik, out.detach()), atol=1e-14, what=f"{case}: sum_k g_k g_k^T = H")


@pytest.mark.parametrize("case", list(LIKS))
def test_fisher_bilinear_is_u_h_w(case: str) -> None:
    lik, shape = LIKS[case]
    g = torch.Generator().manual_seed(1)
    out, u, w = (torch.randn(*shape, dtype=torch.float64, generator=g) for _ in range(3))
    h = output_fisher(lik, out)
    m = shape[0]
    ref = torch.einsum("mi,mij,mj->m", u.reshape(m, -1), h, w.reshape(m, -1))
    assert_close(lik.fisher_bilinear(out, u, w), ref, atol=1e-13, what=f"{case}: u^T H w per example")


def test_losses_equal_pytorchs() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 4, (3, 2, 2), generator=g)
    ce = SoftmaxCrossEntropy()
    assert_close(ce.nll_sum(logits, labels), F.cross_entropy(logits, labels, reduction="sum"), atol=1e-12)
    tokens = logits.movedim(1, -1)  # (M, H, W, C): class dim last
    assert_close(
        SoftmaxCrossEntropy(class_dim=-1).nll_sum(tokens, labels), ce.nll_sum(logits, labels), atol=1e-12
    )
    assert_close(ce.loss(logits, labels), ce.nll_sum(logits, labels) / 3, atol=1e-14)
    y = torch.randn(3, 4, 2, 2, dtype=torch.float64, generator=g)
    # nn.MSELoss(mean) = (2/C) * mean over examples of 1/2 |f - y|^2, with C = entries per example
    assert_close(F.mse_loss(logits, y), (2 / 16) * Gaussian().loss(logits, y), atol=1e-14, what="MSE factor")
    bits = torch.randint(0, 2, logits.shape, generator=g).double()
    assert_close(
        Bernoulli().nll_sum(logits, bits),
        F.binary_cross_entropy_with_logits(logits, bits, reduction="sum"),
        atol=1e-12,
    )


def test_ignore_index_masks_samples_losses_and_fisher() -> None:
    g = torch.Generator().manual_seed(3)
    lik = SoftmaxCrossEntropy(class_dim=-1, ignore_index=-100)
    logits = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([[1, -100, 2], [-100, -100, 0]])
    draws = lik.sample(logits, torch.Generator().manual_seed(0), labels=labels)
    assert torch.equal(draws == -100, labels == -100)
    (ds,) = torch.autograd.grad(lik.nll_sum(logits, draws), logits)
    assert torch.count_nonzero(ds[labels == -100]) == 0
    for loss in lik.expected_losses(logits, labels=labels):
        (d,) = torch.autograd.grad(loss, logits, retain_graph=True)
        assert torch.count_nonzero(d[labels == -100]) == 0
    u = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    masked = u.clone()
    masked[labels == -100] = 0.0
    assert_close(
        lik.fisher_quadratic(logits, u, labels), lik.fisher_quadratic(logits, masked, labels), atol=1e-14
    )
    assert lik.needs_labels
    with pytest.raises(ValueError, match="training labels"):
        make_loss_fn("sampled", likelihood=lik)


def test_samples_follow_the_distribution() -> None:
    n = 20000
    f = torch.tensor([[0.3, -1.2]], dtype=torch.float64).expand(n, 2)
    gen = torch.Generator().manual_seed(4)
    y = Gaussian().sample(f, gen)
    assert_close(y.mean(0), f[0], atol=0.05, rtol=0, what="Gaussian mean")
    assert_close(y.var(0), torch.ones(2, dtype=torch.float64), atol=0.05, rtol=0, what="Gaussian variance 1")
    b = Bernoulli().sample(f, gen)
    assert set(b.unique().tolist()) <= {0.0, 1.0}
    assert_close(b.mean(0), torch.sigmoid(f[0]), atol=0.02, rtol=0, what="Bernoulli mean")
    c = SoftmaxCrossEntropy().sample(f, gen)
    assert_close(torch.bincount(c, minlength=2).double() / n, torch.softmax(f[0], 0), atol=0.02, rtol=0)


def test_make_likelihood_by_name() -> None:
    assert isinstance(make_likelihood("gaussian"), Gaussian)
    lik = SoftmaxCrossEntropy(class_dim=-1)
    assert make_likelihood(lik) is lik
    with pytest.raises(ValueError, match="likelihood must be one of"):
        make_likelihood("poisson")


def test_inverse_cdf_sample_is_the_definition() -> None:
    """Draw = first class whose cumulative probability exceeds u * total, with u from the same generator."""
    g = torch.Generator().manual_seed(6)
    probs = torch.rand(50, 7, generator=g, dtype=torch.float64)
    probs[:, 2] = 0.0  # a class of probability zero is never drawn
    probs[0] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    u = torch.rand(50, 1, generator=g, dtype=torch.float64)
    draws = inverse_cdf_sample(probs, u)
    for row, p in enumerate(probs):
        cdf = torch.cumsum(p, 0)
        expected = next(c for c in range(7) if cdf[c] > u[row, 0] * cdf[-1])
        assert draws[row].item() == expected
    assert not (draws == 2).any() and draws[0] == 6


def test_inverse_cdf_sample_frequencies() -> None:
    n = 40000
    p = torch.tensor([0.5, 0.0, 0.2, 0.25, 0.05], dtype=torch.float64)
    draws = inverse_cdf_sample(p.expand(n, 5), torch.rand(n, generator=torch.Generator().manual_seed(7)))
    freq = torch.bincount(draws, minlength=5).double() / n
    assert_close(freq, p, atol=0.01, rtol=0, what="inverse-CDF frequencies")
    assert freq[1] == 0
