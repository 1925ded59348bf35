"""Cases where ``Omega ⊗ Gamma`` IS the exact Fisher block (curvlinops' idea), checked against Jacobians.

(a) One conv layer whose every output position carries an independent unit-variance
    Gaussian likelihood: ``DS = s - y`` with ``y ~ N(s, I)`` is white noise,
    independent of the activations and spatially uncorrelated (IAD and SUD hold
    exactly), and ``E[DS DS^T] = I``. The exact Fisher is
    ``(1/M) sum_m J_m^T J_m`` with ``J_m = [[A_m]]_H ⊗ I``, i.e.
    ``(1/M) sum_m [[A_m]]_H^T [[A_m]]_H ⊗ I = Omega ⊗ Gamma`` for any stride/padding.
(b) One example (M = 1), softmax output: activations and ``B = d logits / d s`` are
    deterministic, so ``F_block = a a^T ⊗ B^T (diag p - p p^T) B = Omega ⊗ E_y[Gamma]``.
(c) A deep LINEAR MLP with Gaussian outputs and M > 1: ``B`` does not depend on the
    input, so ``E[DS DS^T] = B^T B`` is the same for every example and the block is exact.

``Gamma`` is taken in expectation over the targets: one backward pass per column of a
square root of the output Fisher (``I`` for the Gaussian, ``diag p - p p^T`` for softmax,
see :func:`kfcrun.curvature.expected_fisher_losses`). (d) checks that the sampled
("sampled") estimate converges to that expectation.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.curvature import batch_factors_for_loss, expected_fisher_losses, nll_sum, sample_targets
from tests.helpers.oracles import assert_close, jacobian_wrt_wbar

# PyTorch warns (once) that an even kernel with padding="same" pads a copy of the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


def gaussian_expected_losses(out: torch.Tensor) -> list[torch.Tensor]:
    """Unit-variance Gaussian on every output entry: output Fisher = I, square root = I.

    Pass ``k`` backpropagates the unit vector of entry ``k`` (channel, positions...) for all examples.
    """
    return [out[(slice(None), *idx)].sum() for idx in itertools.product(*(range(n) for n in out.shape[1:]))]


def _wbar(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach().flatten(1)
    return w if layer.bias is None else torch.cat([layer.bias.detach()[:, None], w], dim=1)


def _params_from_wbar(layer: nn.Module, wbar: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    if layer.bias is None:
        return {f"{prefix}weight": wbar.reshape(layer.weight.shape)}
    return {f"{prefix}weight": wbar[:, 1:].reshape(layer.weight.shape), f"{prefix}bias": wbar[:, 0]}


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=2, padding="same", bias=False),
        dict(kernel_size=3, padding=2, dilation=2),
    ],
    ids=["k3_p1", "k3_s2_p1", "k2_same_nobias", "k3_dil2"],
)
def test_single_conv_gaussian_block_is_exact(conv_kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, **conv_kwargs).double()
    model = nn.Sequential(conv)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    omega, gamma = batch_factors_for_loss(model, x, gaussian_expected_losses)["0"]
    assert_close(gamma, torch.eye(2, dtype=torch.float64), atol=1e-14, what="Gamma (Gaussian, expected)")

    wbar = _wbar(conv)
    fisher = torch.zeros(wbar.numel(), wbar.numel(), dtype=torch.float64)
    for m in range(x.shape[0]):

        def out_m(wb: torch.Tensor, m: int = m) -> torch.Tensor:
            return torch.func.functional_call(
                conv, _params_from_wbar(conv, wb, ""), (x[m : m + 1],)
            ).flatten()

        jac = jacobian_wrt_wbar(out_m, wbar)
        fisher += jac.T @ jac  # Gaussian output Fisher is I
    fisher /= x.shape[0]
    assert_close(torch.kron(omega, gamma), fisher, atol=1e-11, what="Omega ⊗ Gamma vs exact Fisher block")


@pytest.mark.parametrize("act", ["linear", "tanh"])
def test_single_example_softmax_blocks_are_exact(act: str) -> None:
    torch.manual_seed(1)
    nonlin: nn.Module = nn.Identity() if act == "linear" else nn.Tanh()
    model = nn.Sequential(
        nn.Linear(5, 4), nonlin, nn.Linear(4, 3, bias=False), nonlin, nn.Linear(3, 6)
    ).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    factors = batch_factors_for_loss(model, x, expected_fisher_losses)
    p = torch.softmax(model(x)[0], dim=0).detach()
    out_fisher = torch.diag(p) - torch.outer(p, p)
    for name, (omega, gamma) in factors.items():
        layer = model.get_submodule(name)

        def logits_of(wb: torch.Tensor, layer: nn.Module = layer, name: str = name) -> torch.Tensor:
            return torch.func.functional_call(model, _params_from_wbar(layer, wb, f"{name}."), (x,))[0]

        jac = jacobian_wrt_wbar(logits_of, _wbar(layer))
        exact = jac.T @ out_fisher @ jac
        assert_close(torch.kron(omega, gamma), exact, atol=1e-13, what=f"layer {name} ({act}, M=1)")


def test_deep_linear_gaussian_blocks_are_exact_for_many_examples() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3, bias=False), nn.Linear(3, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    factors = batch_factors_for_loss(model, x, gaussian_expected_losses)
    for name, (omega, gamma) in factors.items():
        layer = model.get_submodule(name)
        exact = torch.zeros(
            omega.shape[0] * gamma.shape[0], omega.shape[0] * gamma.shape[0], dtype=torch.float64
        )
        for m in range(x.shape[0]):

            def out_m(
                wb: torch.Tensor, m: int = m, layer: nn.Module = layer, name: str = name
            ) -> torch.Tensor:
                return torch.func.functional_call(
                    model, _params_from_wbar(layer, wb, f"{name}."), (x[m : m + 1],)
                )[0]

            jac = jacobian_wrt_wbar(out_m, _wbar(layer))
            exact += jac.T @ jac
        exact /= x.shape[0]
        assert_close(torch.kron(omega, gamma), exact, atol=1e-12, what=f"layer {name} (deep linear, M=6)")


def test_sampled_gamma_converges_to_expected_gamma() -> None:
    """Monte Carlo: one example repeated N times, sampled targets; relative error ~ 1/sqrt(N)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(1, 5, dtype=torch.float64)
    expected = batch_factors_for_loss(model, x, expected_fisher_losses)
    n = 40000
    gen = torch.Generator().manual_seed(0)
    sampled = batch_factors_for_loss(
        model, x.expand(n, 5), lambda logits: nll_sum(logits, sample_targets(logits, gen))
    )
    for name in expected:
        assert_close(sampled[name][0], expected[name][0], atol=1e-12, what=f"{name} Omega")
        err = torch.linalg.norm(sampled[name][1] - expected[name][1]) / torch.linalg.norm(expected[name][1])
        # Std of a one-sample estimate of E[g g^T] is O(|E[g g^T]|); 5% is > 5 sigma at N = 40000.
        assert err < 0.05, f"layer {name}: sampled Gamma off by {err:.3%} (relative Frobenius)"


def test_expected_fisher_losses_square_root() -> None:
    """Sum over passes of g_c g_c^T equals diag(p) - p p^T per example."""
    logits = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(loss, logits)[0] for loss in expected_fisher_losses(logits)]
    p = F.softmax(logits.detach(), dim=1)
    for m in range(3):
        got = sum(torch.outer(g[m], g[m]) for g in grads)
        assert_close(got, torch.diag(p[m]) - torch.outer(p[m], p[m]), atol=1e-15, what=f"example {m}")
