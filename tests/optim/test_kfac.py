"""K-FAC (App. A.2) against brute-force and closed-form computations in float64 on tiny networks."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfcrun.optim.curvature_steps as curvature_steps_module
import kfcrun.optim.kfac as kfac_module
from kfcrun.optim import KFAC, KFCPre
from kfcrun.optim.quadratic_model import gamma_candidates, levenberg_marquardt, model_coefficients
from tests.helpers.optim_nets import batch, flat_params, tiny_net
from tests.helpers.oracles import assert_close, explicit_fisher

#: Everything adaptive off: the curvature schedule alone.
FROZEN_CURVATURE = dict(stats_every=100, inverse_every=100, refresh_until=0, ema_warmup=False)


def kfac_step(model: nn.Module, opt: KFAC, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> None:
    """One K-FAC iteration on the mean loss (times ``scale``), with the closure the runner passes."""
    opt.zero_grad()
    (scale * F.cross_entropy(model(x), y)).backward()
    opt.step(lambda: scale * F.cross_entropy(model(x), y), inputs=x)


def weight_mask(model: nn.Module) -> torch.Tensor:
    """1 on the decayed entries (weights of Conv2d/Linear), 0 on biases and the rest."""
    return torch.cat(
        [
            torch.full((p.numel(),), 1.0 if n.endswith("weight") else 0.0, dtype=torch.float64)
            for n, p in model.named_parameters()
        ]
    )


def gradient_of_h(model: nn.Module, r: float) -> dict[torch.Tensor, torch.Tensor]:
    return {
        p: p.grad + (r * p.detach() if n.endswith("weight") else 0.0) for n, p in model.named_parameters()
    }


def preconditioned_direction(
    curvature, model: nn.Module, grads: dict[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """``v_1 = -(F_hat + (r + gamma) I)^{-1} grad h`` from the public curvature API, flattened."""
    parts: dict[torch.Tensor, torch.Tensor] = {}
    for name, block in curvature.blocks.items():
        module = model.get_submodule(name)
        combined = block.combine(grads[module.weight], grads.get(module.bias))
        d_weight, d_bias = block.split(curvature.precondition({name: combined})[name])
        parts[module.weight] = d_weight
        if d_bias is not None:
            parts[module.bias] = d_bias
    return -torch.cat([parts.get(p, grads[p]).reshape(-1) for p in model.parameters()])


def previous_update(opt: KFAC) -> torch.Tensor:
    return torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in opt.model.parameters()])


def quadratic_model(g: torch.Tensor, curvature: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``M(delta) - M(0) = g^T delta + 1/2 delta^T A delta``."""
    return lambda delta: g @ delta + 0.5 * delta @ curvature @ delta


def grid_minimum(fn: Callable[[float, float], float], half_width: float = 20.0) -> tuple[float, float]:
    """Minimize ``fn(a, m)`` by brute force on a 41 x 41 grid, zooming in around the best point.

    Stops after 40 zooms, or when the grid's values differ by no more than rounding.
    """
    center = (0.0, 0.0)
    for _ in range(40):
        axis = torch.linspace(-half_width, half_width, 41, dtype=torch.float64)
        values = [
            (fn(center[0] + a, center[1] + m), center[0] + a, center[1] + m)
            for a in axis.tolist()
            for m in axis.tolist()
        ]
        best = min(values)
        if max(values)[0] - best[0] <= 1e-13 * abs(best[0]):
            break  # the grid no longer resolves fn above rounding: its minimum would be noise
        assert abs(best[1] - center[0]) < half_width and abs(best[2] - center[1]) < half_width, (
            "minimum on the edge"
        )
        center, half_width = (best[1], best[2]), half_width / 4
    return center


# -- alpha and mu -----------------------------------------------------------------------------------
def test_alpha_mu_minimize_the_quadratic_model_over_a_grid():
    """C, d and the 2x2 solve against M(theta + delta) written out with the explicit Fisher."""
    r, lam = 0.01, 0.3
    model = tiny_net()
    opt = KFAC(
        model, weight_decay=r, damping=lam, lambda_every=None, gamma_every=None, seed=1, **FROZEN_CURVATURE
    )
    kfac_step(model, opt, *batch(1))  # the first step: alpha only
    assert opt.step_stats()["mu"].item() == 0.0

    x, y = batch(2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = gradient_of_h(model, r)
    g = torch.cat([grads[p].reshape(-1) for p in model.parameters()])
    v1, v2 = preconditioned_direction(opt.curvature, model, grads), previous_update(opt)
    a_matrix = explicit_fisher(model, x) + torch.diag(r * weight_mask(model) + lam)
    change = quadratic_model(g, a_matrix)
    alpha, mu = grid_minimum(lambda a, m: change(a * v1 + m * v2).item())

    before = flat_params(model)
    opt.step(lambda: F.cross_entropy(model(x), y), inputs=x)
    stats = opt.step_stats()
    assert stats["alpha"].item() == pytest.approx(alpha, rel=1e-7, abs=1e-9)
    assert stats["mu"].item() == pytest.approx(mu, rel=1e-7, abs=1e-9)
    assert abs(mu) > 1e-3, "mu came out 0: the test would not cover the second direction"
    assert_close(flat_params(model) - before, alpha * v1 + mu * v2, rtol=1e-6, atol=1e-10, what="delta")
    assert stats["m_decrease"].item() == pytest.approx(-change(alpha * v1 + mu * v2).item(), rel=1e-9)
    assert stats["nu"].item() == pytest.approx(
        (
            (alpha * v1 + mu * v2) @ explicit_fisher(model_at_flat(model, before), x) @ (alpha * v1 + mu * v2)
        ).item(),
        rel=1e-6,
    )


def model_at_flat(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(flat, twin.parameters())
    return twin


class ConvexQuadratic:
    """``q(theta) = 1/2 (theta - theta*)^T A (theta - theta*)`` standing in for the network's loss.

    K-FAC's exact Fisher is replaced by ``A`` itself (its Gram forms ``V A V^T``), so that ``M``
    is exactly the objective (with the L2 term ``h = q + r/2 |W|^2`` and curvature ``A + R``).
    """

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        n = sum(p.numel() for p in model.parameters())
        basis = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.a = basis @ basis.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
        self.optimum = torch.randn(n, generator=g, dtype=torch.float64)
        self.model = model

    def gram(
        self, model: nn.Module, inputs: torch.Tensor, directions: list[dict], **_: object
    ) -> torch.Tensor:
        vectors = torch.stack(
            [torch.cat([d[n].reshape(-1) for n, _ in model.named_parameters()]) for d in directions]
        )
        return vectors @ self.a @ vectors.T

    def value(self) -> torch.Tensor:
        e = flat_params(self.model) - self.optimum
        return 0.5 * e @ self.a @ e

    def set_gradient(self) -> None:
        grad = self.a @ (flat_params(self.model) - self.optimum)
        offset = 0
        for p in self.model.parameters():
            p.grad = grad[offset : offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()


@pytest.mark.parametrize("rho_includes_lambda", [False, True])
def test_closed_form_and_rho_on_a_convex_quadratic(monkeypatch, rho_includes_lambda):
    r, lam = 0.02, 0.5
    model = tiny_net()
    quadratic = ConvexQuadratic(model)
    monkeypatch.setattr(curvature_steps_module, "fisher_gram", quadratic.gram)
    opt = KFAC(
        model,
        weight_decay=r,
        damping=1.0,
        lambda_init=lam,
        lambda_every=1,
        lambda_decay=0.95,
        gamma_every=None,
        rho_includes_lambda=rho_includes_lambda,
        seed=2,
        **FROZEN_CURVATURE,
    )
    opt.initialize([batch(0)[0]])
    mask = weight_mask(model)
    for k in (1, 2, 3):
        quadratic.set_gradient()
        grads = gradient_of_h(model, r)
        g = torch.cat([grads[p].reshape(-1) for p in model.parameters()])
        v1 = preconditioned_direction(opt.curvature, model, grads)
        vectors = [v1] if k == 1 else [v1, previous_update(opt)]
        v = torch.stack(vectors)
        c = v @ (quadratic.a + torch.diag(r * mask + opt.lam)) @ v.T
        w = torch.linalg.solve(c, -(v @ g))  # the closed form of A.2
        lam_before, h_before = opt.lam, quadratic.value() + 0.5 * r * (mask * flat_params(model) ** 2).sum()
        opt.step(quadratic.value, inputs=batch(k)[0])
        stats = opt.step_stats()
        assert stats["alpha"].item() == pytest.approx(w[0].item(), rel=1e-9)
        if k > 1:
            assert stats["mu"].item() == pytest.approx(w[1].item(), rel=1e-9, abs=1e-12)
        delta = w @ v
        h_after = quadratic.value() + 0.5 * r * (mask * flat_params(model) ** 2).sum()
        assert (h_before - h_after).item() == pytest.approx(stats["h_decrease"].item(), rel=1e-9)
        if (
            rho_includes_lambda
        ):  # the model's change includes lambda/2 |delta|^2: rho = actual / (actual + that)
            actual = (h_after - h_before).item()
            expected_rho = actual / (actual + 0.5 * lam_before * (delta @ delta).item())
        else:
            expected_rho = 1.0
        assert stats["rho"].item() == pytest.approx(expected_rho, rel=1e-9)
        if expected_rho > 0.75:
            assert opt.lam == pytest.approx(lam_before * 0.95, rel=1e-12)  # lambda_- = 0.95^T1, T1 = 1
    assert k == 3


# -- lambda and gamma adaptation -------------------------------------------------------------------
def test_levenberg_marquardt_rule():
    minus, plus = 0.95**5, 0.95**-5
    assert levenberg_marquardt(1.0, 0.9, minus, plus) == minus
    assert levenberg_marquardt(1.0, 0.5, minus, plus) == 1.0
    assert levenberg_marquardt(1.0, 0.1, minus, plus) == plus
    assert levenberg_marquardt(1.0, math.nan, minus, plus) == plus
    assert (
        levenberg_marquardt(1.0, 0.75, minus, plus) == 1.0
        and levenberg_marquardt(1.0, 0.25, minus, plus) == 1.0
    )


@pytest.mark.parametrize(
    ("scripted_rho", "factor"),
    [(0.9, 0.95**2), (0.5, 1.0), (0.3, 1.0), (0.1, 0.95**-2), ("loss rose", 0.95**-2), ("nan", 0.95**-2)],
)
def test_lambda_moves_the_right_way(scripted_rho, factor):
    """Scripted losses h(theta), h(theta + delta) give a chosen rho; lambda follows Eqn 38 (T1 = 2)."""
    settings = dict(
        damping=0.2, lambda_every=2, lambda_decay=0.95, gamma_every=None, seed=4, **FROZEN_CURVATURE
    )
    model = tiny_net()
    opt = KFAC(model, **settings)
    kfac_step(model, opt, *batch(0))
    x, y = batch(1)
    probe_model = copy.deepcopy(model)  # a twin, to read the predicted change M(theta + delta) - M(theta)
    probe = KFAC(probe_model, **settings)
    probe.load_state_dict(opt.state_dict())
    probe_model.zero_grad()
    F.cross_entropy(probe_model(x), y).backward()
    probe.step(lambda: torch.tensor(0.0), inputs=x)
    predicted = -probe.step_stats()["m_decrease"].item()  # M(theta + delta) - M(theta) < 0

    if scripted_rho == "loss rose":
        values = iter([1.0, 1.5])
    elif scripted_rho == "nan":
        values = iter([1.0, math.nan])
    else:
        values = iter([1.0, 1.0 + scripted_rho * predicted])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    lam = opt.lam
    opt.step(lambda: torch.tensor(next(values), dtype=torch.float64), inputs=x)
    assert opt.lam == pytest.approx(lam * factor, rel=1e-12)
    if isinstance(scripted_rho, float):
        assert opt.step_stats()["rho"].item() == pytest.approx(scripted_rho, rel=1e-9)
    else:
        assert opt.rho == -math.inf


def brute_force_model_values(opt, model, x, y, r, lam, candidates):
    """``M(theta + delta) - M(theta)`` per damping candidate, from the explicit Fisher (float64)."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = gradient_of_h(model, r)
    g = torch.cat([grads[p].reshape(-1) for p in model.parameters()])
    prev = previous_update(opt)
    a_matrix = explicit_fisher(model, x) + torch.diag(r * weight_mask(model) + lam)
    values = {}
    for gamma in candidates:
        trial = copy.deepcopy(opt.curvature)
        trial.update_inverses([gamma], opt.lambdas)
        v1 = preconditioned_direction(trial, model, grads)
        v = torch.stack([v1, prev])
        c = v @ a_matrix @ v.T
        w = torch.linalg.solve(c, -(v @ g))
        values[gamma] = (w @ (v @ g) + 0.5 * w @ c @ w).item()
    ordered = sorted(values.values())
    assert ordered[1] - ordered[0] > 1e-6 * abs(ordered[0]), "candidates tie: the test cannot discriminate"
    return values


@pytest.mark.parametrize("candidates", [[0.02, 1.0, 50.0], [1.0, 50.0, 0.02], [50.0, 0.02, 1.0]])
def test_gamma_adaptation_keeps_the_candidate_with_the_lowest_model_value(monkeypatch, candidates):
    """Three hand-made gamma candidates; K-FAC must keep the one whose (alpha, mu) give the lowest M."""
    r, lam = 0.01, 0.05
    model = tiny_net()
    opt = KFAC(
        model,
        weight_decay=r,
        damping=candidates[0],
        lambda_init=lam,
        lambda_every=None,
        gamma_every=2,
        gamma_floor=False,
        seed=6,
        **FROZEN_CURVATURE,
    )
    monkeypatch.setattr(kfac_module, "gamma_candidates", lambda *args, **kwargs: list(candidates))
    kfac_step(model, opt, *batch(0))
    x, y = batch(1)
    values = brute_force_model_values(opt, model, x, y, r, lam, candidates)
    best = min(values, key=values.get)

    opt.step(lambda: F.cross_entropy(model(x), y), inputs=x)
    assert opt.damping == best
    assert opt.step_stats()["m_decrease"].item() == pytest.approx(-values[best], rel=1e-9)
    # the kept fit is the one used from now on
    for block in opt.blocks.values():
        assert block.inverse.damping_total.item() == pytest.approx(opt.lambdas[block.name] + best)


def test_the_wide_gamma_search_keeps_the_lowest_model_value_of_all_its_candidates():
    """gamma_search_decades=2: seven candidates (A.2's three and 10^(+-1, +-2) times gamma), lowest M kept."""
    r, lam, gamma = 0.01, 0.05, 0.3
    model = tiny_net()
    opt = KFAC(
        model,
        weight_decay=r,
        damping=gamma,
        lambda_init=lam,
        lambda_every=None,
        gamma_every=2,
        gamma_floor=False,
        gamma_search_decades=2,
        gamma_ceiling=None,  # the search alone
        seed=6,
        **FROZEN_CURVATURE,
    )
    kfac_step(model, opt, *batch(0))
    x, y = batch(1)
    candidates = gamma_candidates(gamma, opt.gamma_step, 0.0, decades=2)
    assert len(candidates) == 7
    values = brute_force_model_values(opt, model, x, y, r, lam, candidates)
    best = min(values, key=values.get)
    opt.step(lambda: F.cross_entropy(model(x), y), inputs=x)
    assert opt.damping == pytest.approx(best)
    assert opt.step_stats()["m_decrease"].item() == pytest.approx(-values[best], rel=1e-9)


def test_the_search_at_start_keeps_the_first_step_with_the_lowest_model_value(monkeypatch):
    """gamma_search_at_start: iteration 1 tries the candidates (alpha only) and keeps the best one.

    Each candidate's first step is also taken by a K-FAC that starts at that damping and does not
    search; the searching one must end where the one with the lowest ``M(theta + delta)`` ends.
    """
    candidates = [10.0, 0.03, 1.0]
    settings = dict(
        weight_decay=0.01, lambda_init=1e-3, lambda_every=None, gamma_every=5, gamma_ceiling=None, seed=6
    )
    start = copy.deepcopy(tiny_net().state_dict())

    def first_step(damping: float, search: bool) -> tuple[KFAC, torch.Tensor]:
        model = tiny_net()
        model.load_state_dict(start)
        opt = KFAC(model, damping=damping, gamma_search_at_start=search, **settings, **FROZEN_CURVATURE)
        kfac_step(model, opt, *batch(0))
        return opt, flat_params(model)

    fixed = {gamma: first_step(gamma, search=False) for gamma in candidates}
    decrease = {gamma: opt.step_stats()["m_decrease"].item() for gamma, (opt, _) in fixed.items()}
    assert all(opt.damping == gamma for gamma, (opt, _) in fixed.items()), "no search without the option"
    best = max(decrease, key=decrease.get)
    assert best != candidates[0], "the start is the best: the test cannot tell a search from none"
    assert sorted(decrease.values())[-1] - sorted(decrease.values())[-2] > 1e-6 * abs(decrease[best])

    monkeypatch.setattr(kfac_module, "gamma_candidates", lambda *args, **kwargs: list(candidates))
    searched, params = first_step(candidates[0], search=True)
    assert searched.damping == best
    assert searched.step_stats()["m_decrease"].item() == pytest.approx(decrease[best], rel=1e-9)
    assert_close(params, fixed[best][1], rtol=1e-9, atol=1e-12, what="parameters after the first step")


def test_gamma_candidates_and_floor():
    assert gamma_candidates(1.0, 0.5) == [1.0, 0.5, 2.0]
    assert gamma_candidates(1.0, 0.5, floor=0.8) == [1.0, 0.8, 2.0]
    assert gamma_candidates(0.1, 0.5, floor=0.8) == [0.8, 0.8, 1.6]  # gamma itself raised to the floor


def test_gamma_candidates_widened_by_decades():
    assert gamma_candidates(1.0, 0.5, decades=2) == pytest.approx([1.0, 0.5, 2.0, 0.1, 10.0, 0.01, 100.0])
    # below the floor the wide candidates are raised to it, and repeats are dropped
    expected = [1.0, 0.5, 2.0, 0.1, 10.0, 0.05, 100.0, 1000.0]
    assert gamma_candidates(1.0, 0.5, floor=0.05, decades=3) == pytest.approx(expected)
    # relative to gamma: the set scales with the loss (gamma and the floor both times c)
    c = 7.0
    assert gamma_candidates(c * 0.3, 0.4, floor=c * 1e-3, decades=4) == pytest.approx(
        [c * g for g in gamma_candidates(0.3, 0.4, floor=1e-3, decades=4)]
    )


def test_model_coefficients_fall_back_to_alpha_alone():
    parallel = torch.tensor([[2.0, 4.0], [4.0, 8.0]], dtype=torch.float64)
    w = model_coefficients(parallel, torch.tensor([-2.0, -4.0], dtype=torch.float64))
    assert w.tolist() == [1.0, 0.0]
    zero = model_coefficients(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    assert zero.tolist() == [0.0]
    fixed_alpha = model_coefficients(
        torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=torch.float64),
        torch.tensor([-1.0, 2.0]),
        fixed=[0.5, None],
    )
    assert fixed_alpha.tolist() == [0.5, -(2.0 + 0.5) / 4.0]


# -- the gamma floor scales with the loss -----------------------------------------------------------
def run_scaled(
    monkeypatch, c: float, steps: int = 8, **overrides: float
) -> tuple[torch.Tensor, list[float], list[float], KFAC]:
    """K-FAC on ``c`` times the loss, with the Fisher, r, lambda and gamma c times larger.

    ``c`` times the loss is the likelihood of ``c`` copies of each label: its Fisher (exact and
    Kronecker-factored) is ``c`` times larger, which the patches below supply. ``overrides``
    replace K-FAC's arguments (dampings among them are multiplied by ``c``).
    """
    model = tiny_net()
    real_gram = curvature_steps_module.fisher_gram
    monkeypatch.setattr(curvature_steps_module, "fisher_gram", lambda *a, **k: c * real_gram(*a, **k))
    settings = dict(
        weight_decay=0.01,
        damping=0.02,  # below lambda_init: the floor binds from the start
        lambda_init=0.3,
        lambda_min=0.0,
        lambda_every=1,
        gamma_every=2,
        stats_every=1,
        inverse_every=1,
        seed=7,
    )
    settings.update(overrides)
    for key in ("weight_decay", "damping", "lambda_init"):
        settings[key] *= c
    opt = KFAC(model, **settings)
    real_estimate = opt.curvature.estimate_statistics
    monkeypatch.setattr(
        opt.curvature,
        "estimate_statistics",
        lambda *a, **k: {n: (o, c * g) for n, (o, g) in real_estimate(*a, **k).items()},
    )
    lams, gammas = [], []
    for k in range(steps):
        kfac_step(model, opt, *batch(k), scale=c)
        lams.append(opt.lam)
        gammas.append(opt.damping)
    return flat_params(model), lams, gammas, opt


def test_gamma_floor_scales_with_the_loss(monkeypatch):
    params, lams, gammas, _ = run_scaled(monkeypatch, 1.0)
    monkeypatch.undo()
    scaled_params, scaled_lams, scaled_gammas, _ = run_scaled(monkeypatch, 8.0)
    assert_close(scaled_params, params, rtol=1e-8, atol=1e-10, what="parameters, loss x 8")
    assert scaled_lams == pytest.approx([8.0 * v for v in lams], rel=1e-9)
    assert scaled_gammas == pytest.approx([8.0 * v for v in gammas], rel=1e-9)
    assert any(g == lam for g, lam in zip(gammas, lams, strict=True)), "the floor never bound"
    assert len(set(lams)) > 1, "lambda never moved"


def largest_mean_eigenvalue_from_factors(opt: KFAC) -> float:
    """``max_l tr(Omega_l x Gamma_l) / n_l`` from explicit Kronecker products of the running factors."""
    means = []
    for block in opt.blocks.values():
        explicit = torch.kron(block.omega, block.gamma)
        means.append((explicit.trace() / explicit.shape[0]).item())
    return max(means)


def test_gamma_ceiling_holds_gamma_below_the_curvature_scale_and_scales_with_the_loss(monkeypatch):
    """``gamma <= gamma_ceiling * max_l tr(F_hat_l) / n_l`` from a start far above it, x c with the loss."""
    ceiling = dict(damping=1e3, gamma_ceiling=10.0, gamma_search_decades=2)
    params, lams, gammas, opt = run_scaled(monkeypatch, 1.0, **ceiling)
    expected = 10.0 * largest_mean_eigenvalue_from_factors(opt)
    assert opt.step_stats()["damping_ceiling"].item() == pytest.approx(expected, rel=1e-12)
    assert gammas[-1] <= expected * (1 + 1e-12)
    assert gammas[0] < 10.0, "the start 1e3 was not lowered to the ceiling at the first fit"
    # the floor still holds (each step fits with the lambda the previous step left)
    assert all(g >= lam for g, lam in zip(gammas[1:], lams[:-1], strict=True))
    monkeypatch.undo()
    scaled_params, _, scaled_gammas, scaled_opt = run_scaled(monkeypatch, 8.0, **ceiling)
    assert_close(scaled_params, params, rtol=1e-8, atol=1e-10, what="parameters, loss x 8")
    assert scaled_gammas == pytest.approx([8.0 * v for v in gammas], rel=1e-9)
    assert scaled_opt.step_stats()["damping_ceiling"].item() == pytest.approx(8.0 * expected, rel=1e-9)

    monkeypatch.undo()
    _, _, free_gammas, free_opt = run_scaled(monkeypatch, 1.0, **{**ceiling, "gamma_ceiling": None})
    assert free_gammas[0] == 1e3, "without the ceiling gamma starts where it was set"
    assert "damping_ceiling" not in free_opt.step_stats()


@pytest.mark.parametrize("lambda_init", [None, 1e-3])
def test_gamma_ceiling_lowers_the_start_and_lambda_follows_it_unless_set(lambda_init):
    """The first fit lowers ``gamma_0`` to the ceiling; then ``lambda_0 = gamma_0`` unless ``lambda_init``."""
    model = tiny_net()
    opt = KFAC(
        model,
        damping=1e3,
        lambda_init=lambda_init,
        gamma_ceiling=2.0,
        lambda_every=None,
        gamma_every=100,  # adapted (the ceiling holds), but no T_2 search in this test
        **FROZEN_CURVATURE,
    )
    kfac_step(model, opt, *batch(0))  # the factors of this step's statistics stay (frozen schedule)
    ceiling = 2.0 * largest_mean_eigenvalue_from_factors(opt)
    assert 1e-3 < ceiling < 1e3, "the test needs the ceiling between lambda_init and gamma_0"
    assert opt.damping == pytest.approx(ceiling, rel=1e-12)
    assert opt.lam == pytest.approx(ceiling if lambda_init is None else lambda_init, rel=1e-12)
    for block in opt.blocks.values():
        assert block.inverse.damping_total.item() == pytest.approx(opt.lambdas[block.name] + ceiling)
    restored = KFAC(tiny_net(), damping=1e3, gamma_ceiling=2.0, **FROZEN_CURVATURE)
    restored.load_state_dict(opt.state_dict())
    assert (restored.damping, restored.lam) == (opt.damping, opt.lam)
    assert restored._damping_ceiling == opt._damping_ceiling == pytest.approx(ceiling, rel=1e-12)


def test_gamma_candidates_below_the_ceiling_and_the_floor_wins():
    assert gamma_candidates(1.0, 0.5, decades=1, ceiling=1.5) == [1.0, 0.5, 1.5, 0.1]
    assert gamma_candidates(9.0, 0.5, decades=1, ceiling=2.0) == [2.0, 1.0, 2.0, 0.2]  # gamma lowered first
    assert gamma_candidates(9.0, 0.5, floor=3.0, ceiling=2.0) == [3.0, 3.0, 3.0]  # crossed: the floor


# -- special cases ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("damping_mode", ["exact", "pi"])
def test_without_adaptation_kfac_is_kfc_pre_without_clipping(batch_norm, damping_mode):
    settings = dict(
        lr=0.2,
        momentum=0.8,
        weight_decay=0.01,
        damping=0.05,
        damping_mode=damping_mode,
        stats_every=2,
        inverse_every=3,
        refresh_until=0,
        ema_warmup=True,
        stats_fraction=0.5,
        seed=9,
    )
    kfac_model, pre_model = tiny_net(batch_norm=batch_norm), tiny_net(batch_norm=batch_norm)
    kfac = KFAC(kfac_model, lambda_every=None, gamma_every=None, gamma_floor=False, **settings)
    pre = KFCPre(pre_model, clip=None, **settings)
    for seed in range(6):
        x, y = batch(seed)
        kfac_step(kfac_model, kfac, x, y)
        pre.zero_grad()
        F.cross_entropy(pre_model(x), y).backward()
        pre.step(inputs=x)
    assert_close(
        flat_params(kfac_model), flat_params(pre_model), rtol=1e-12, atol=1e-14, what="K-FAC vs KFC-pre"
    )
    assert kfac.step_stats()["alpha"].item() == 0.2 and kfac.step_stats()["mu"].item() == 0.8


def union_loss(
    model: nn.Module, parts: list[tuple[torch.Tensor, torch.Tensor]]
) -> Callable[[], torch.Tensor]:
    """The mean loss over the union of the micro-batches ``parts``."""
    count = sum(x.shape[0] for x, _ in parts)
    return lambda: sum(F.cross_entropy(model(x), y, reduction="sum") for x, y in parts) / count


def test_micro_batches_give_the_steps_of_one_batch():
    """Gradient accumulation: two micro-batches (their mean-loss gradients weighted into ``.grad``)
    take the same K-FAC steps as their union: statistics, the quadratic model and rho cover both."""
    settings = dict(weight_decay=0.01, damping=0.05, lambda_every=2, gamma_every=3, fisher="expected", seed=4)
    whole_model, micro_model = tiny_net(), tiny_net()
    whole, micro = KFAC(whole_model, **settings), KFAC(micro_model, **settings)
    for seed in range(4):
        x, y = batch(seed)
        kfac_step(whole_model, whole, x, y)
        parts = [(x[:2], y[:2]), (x[2:], y[2:])]
        micro.zero_grad()
        for xi, yi in parts:
            (F.cross_entropy(micro_model(xi), yi) * xi.shape[0] / x.shape[0]).backward()
        micro.step(union_loss(micro_model, parts), inputs=[xi for xi, _ in parts])
    assert_close(flat_params(micro_model), flat_params(whole_model), rtol=1e-10, atol=1e-12, what="params")
    for key in ("alpha", "mu", "lambda", "damping", "rho"):
        assert micro.step_stats()[key].item() == pytest.approx(whole.step_stats()[key].item(), rel=1e-9), key


def test_a_non_finite_model_skips_the_step_instead_of_poisoning_the_parameters(monkeypatch):
    """A direction with an inf entry (so a NaN Gram matrix, alpha = mu = 0, and 0 * inf = NaN) must
    leave theta unchanged and finite, reset delta_prev, and count as a failed step for lambda."""
    model = tiny_net()
    opt = KFAC(model, damping=0.1, lambda_every=1, gamma_every=None, **FROZEN_CURVATURE)
    kfac_step(model, opt, *batch(1))
    real_directions = opt._directions

    def overflowing(grads=None, index=0):
        directions = real_directions(grads, index)
        first = next(iter(directions))
        directions[first] = directions[first].clone()
        directions[first].view(-1)[0] = math.inf
        return directions

    monkeypatch.setattr(opt, "_directions", overflowing)
    before, lam = flat_params(model), opt.lam
    kfac_step(model, opt, *batch(2))
    assert torch.equal(flat_params(model), before)
    assert all(torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0 for p in model.parameters())
    assert opt.step_stats()["rho"].item() == -math.inf and opt.lam > lam


def test_step_needs_a_closure_when_rho_is_due():
    model = tiny_net()
    opt = KFAC(model, lambda_every=1)
    x, y = batch(0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step(inputs=x)
    assert KFAC.needs_closure and not KFCPre.needs_closure


def test_closure_evaluations_leave_no_trace():
    """h(theta) and h(theta + delta) use the same dropout masks, and BatchNorm statistics are restored."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(48, 4),
    ).double()
    opt = KFAC(net, lr=1e-300, momentum=0.0, lambda_every=1, gamma_every=None, seed=1)  # delta ~ 0
    x, y = batch(0)
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    after_user_forward = [b.clone() for b in net.buffers()]
    random_state = torch.get_rng_state()
    calls = []
    opt.step(lambda: calls.append(1) or F.cross_entropy(net(x), y), inputs=x)
    assert len(calls) == 2
    assert opt.step_stats()["h_decrease"].item() == 0.0  # the same masks: h(theta + ~0) == h(theta)
    for before, after in zip(after_user_forward, net.buffers(), strict=True):
        assert torch.equal(before, after)
    assert not torch.equal(random_state, torch.get_rng_state())  # only the JVP's dropout draws moved it
    twin_state = torch.get_rng_state()
    opt2 = KFAC(copy.deepcopy(net), lr=1e-300, momentum=0.0, lambda_every=None, gamma_every=None, seed=1)
    torch.set_rng_state(random_state)
    opt2.zero_grad()
    F.cross_entropy(opt2.model(x), y).backward()
    torch.set_rng_state(random_state)
    opt2.step(inputs=x)  # no closure evaluations at all
    assert torch.equal(twin_state, torch.get_rng_state())


# -- state ------------------------------------------------------------------------------------------
def batches(count: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    return (batch(s) for s in range(count))


@pytest.mark.parametrize("stop_after", [1, 3, 4, 6])
def test_state_dict_round_trip_resumes_bitwise(stop_after):
    """Resume anywhere: between inverse updates (T_f 4), after a gamma step (T_2 3), before rho (T_1 2)."""
    settings = dict(
        weight_decay=0.01,
        damping=0.1,
        lambda_every=2,
        gamma_every=3,
        stats_every=1,
        inverse_every=4,
        refresh_until=1,
        avg_decay=0.8,
        guard_nu_jump=3.0,
        seed=3,
    )
    model = tiny_net()
    opt = KFAC(model, **settings)
    data = list(batches(9))
    for x, y in data[:stop_after]:
        kfac_step(model, opt, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in data[stop_after:]:
        kfac_step(model, opt, x, y)

    resumed = tiny_net(seed=123)
    resumed.load_state_dict(saved_model)
    resumed_opt = KFAC(resumed, **{**settings, "seed": 999, "damping": 5.0})
    resumed_opt.load_state_dict(saved_opt)
    for x, y in data[stop_after:]:
        kfac_step(resumed, resumed_opt, x, y)
    assert torch.equal(flat_params(model), flat_params(resumed))
    with opt.averaged_parameters(), resumed_opt.averaged_parameters():
        assert torch.equal(flat_params(model), flat_params(resumed))
    assert (opt.lam, opt.damping, opt.rho) == (resumed_opt.lam, resumed_opt.damping, resumed_opt.rho)
    assert opt.guard.refreshes == resumed_opt.guard.refreshes
    assert len({round(v, 12) for v in [opt.lam, settings["damping"]]}) == 2, "lambda never adapted"
    for name, block in opt.blocks.items():
        other = resumed_opt.blocks[name]
        assert torch.equal(block.omega, other.omega) and torch.equal(
            block.inverse.q_omega, other.inverse.q_omega
        )
