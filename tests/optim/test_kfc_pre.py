"""KFC-pre (Algorithm 1) against explicit computations in float64 on tiny networks."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.curvature import batch_factors, sample_targets
from kfcrun.optim import SGD, KFCPre, build_param_groups
from kfcrun.optim.fisher_vector import fisher_quadratic
from tests.helpers.optim_nets import batch, flat_params, model_at, tiny_net, train_step
from tests.helpers.oracles import assert_close, explicit_fisher


# -- nu = v^T F v ---------------------------------------------------------------------------------
def test_fisher_quadratic_matches_explicit_jacobians():
    model = tiny_net()
    x, _ = batch(1)
    g = torch.Generator().manual_seed(3)
    tangents = {
        n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in model.named_parameters()
    }
    v = torch.cat([tangents[n].reshape(-1) for n, _ in model.named_parameters()])
    expected = v @ explicit_fisher(model, x) @ v
    assert_close(fisher_quadratic(model, x, tangents), expected, rtol=1e-10, what="v^T F v")


def test_fisher_quadratic_leaves_batch_norm_buffers_alone():
    model = tiny_net(batch_norm=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x, _ = batch(1)
    fisher_quadratic(model, x, {})
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


# -- the step against Algorithm 1 written out -----------------------------------------------------
def reference_kfc_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    lam: float,
    gamma: float,
    clip: float,
    velocity: torch.Tensor,
    mu: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One KFC-pre update with explicit Kronecker products (``torch.kron``, column-stacking vec)."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    v_parts = {}
    for name, module in layers.items():
        omega, gamma_f = factors[name]
        grad_w = module.weight.grad + lam * module.weight.detach()
        g = torch.cat([module.bias.grad.reshape(-1, 1), grad_w.reshape(grad_w.shape[0], -1)], dim=1)
        pi = math.sqrt((omega.trace() / omega.shape[0]) / (gamma_f.trace() / gamma_f.shape[0]))
        root = math.sqrt(lam + gamma)
        damped = torch.kron(
            omega + pi * root * torch.eye(omega.shape[0], dtype=omega.dtype),
            gamma_f + root / pi * torch.eye(gamma_f.shape[0], dtype=omega.dtype),
        )
        solved = torch.linalg.solve(damped, g.T.reshape(-1)).reshape(g.shape[1], g.shape[0]).T  # unvec
        v_parts[name] = -lr * solved
    v = []
    for _, p in model.named_parameters():
        for name, module in layers.items():
            if p is module.weight:
                v.append(v_parts[name][:, 1:].reshape(-1))
            elif p is module.bias:
                v.append(v_parts[name][:, 0])
    v = torch.cat(v)
    weight_mask = torch.cat(
        [
            torch.full((p.numel(),), 1.0 if n.endswith("weight") else 0.0, dtype=torch.float64)
            for n, p in model.named_parameters()
        ]
    )
    nu = float(v @ explicit_fisher(model, x) @ v + lam * (weight_mask * v * v).sum())
    if nu > clip:
        v = v / math.sqrt(nu / clip)
    velocity = mu * velocity + v
    return flat_params(model) + velocity, velocity, nu


def test_two_steps_match_algorithm_1_written_out():
    lr, lam, gamma, clip, mu, xi = 0.3, 0.01, 0.05, 0.2, 0.9, 0.6
    model, reference = tiny_net(), tiny_net()
    opt = KFCPre(
        model,
        lr=lr,
        momentum=mu,
        weight_decay=lam,
        damping=gamma,
        clip=clip,
        stat_decay=xi,
        stats_every=1,
        inverse_every=1,
        nu_fraction=1.0,
        stats_fraction=1.0,
        seed=11,
    )
    draws = torch.Generator().manual_seed(11)  # the same stream of sampled targets
    velocity = torch.zeros_like(flat_params(model))
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    nus = []
    for k, seed in enumerate((1, 2), start=1):
        x, y = batch(seed)
        fresh = batch_factors(reference, x, sample_targets(reference(x), draws))
        if k == 1:  # Algorithm 1: the first step's batch initializes the factors
            factors = fresh
        else:  # Eqn 33
            factors = {
                n: (xi * o + (1 - xi) * fresh[n][0], xi * g + (1 - xi) * fresh[n][1])
                for n, (o, g) in factors.items()
            }
        expected, velocity, nu = reference_kfc_step(
            reference, x, y, factors, lr=lr, lam=lam, gamma=gamma, clip=clip, velocity=velocity, mu=mu
        )
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(expected, reference.parameters())
        train_step(model, opt, x, y)
        nus.append(nu)
        assert_close(flat_params(model), expected, rtol=1e-9, atol=1e-12, what=f"parameters after step {k}")
        assert_close(
            opt.step_stats()["nu"], torch.tensor(nu, dtype=torch.float64), rtol=1e-9, what=f"nu at step {k}"
        )
    assert any(nu > clip for nu in nus), "clipping never fired; the test would not cover it"


def test_exact_damping_mode_step():
    lr, lam, gamma = 0.1, 0.02, 0.03
    model = tiny_net()
    opt = KFCPre(
        model,
        lr=lr,
        momentum=0.0,
        weight_decay=lam,
        damping=gamma,
        damping_mode="exact",
        clip=None,
        stats_every=1,
        inverse_every=1,
        seed=5,
    )
    x, y = batch(4)
    omega_gamma = batch_factors(
        tiny_net(), x, sample_targets(tiny_net()(x), torch.Generator().manual_seed(5))
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name in ("0", "4"):
        omega, gamma_f = omega_gamma[name]
        g = torch.cat(
            [
                grads[f"{name}.bias"].reshape(-1, 1),
                (grads[f"{name}.weight"] + lam * before[f"{name}.weight"]).flatten(1),
            ],
            dim=1,
        )
        block = torch.kron(omega, gamma_f) + (lam + gamma) * torch.eye(
            omega.shape[0] * gamma_f.shape[0], dtype=torch.float64
        )
        solved = torch.linalg.solve(block, g.T.reshape(-1)).reshape(g.shape[1], g.shape[0]).T
        step = torch.cat(
            [
                (model.get_submodule(name).bias - before[f"{name}.bias"]).reshape(-1, 1),
                (model.get_submodule(name).weight - before[f"{name}.weight"]).flatten(1),
            ],
            dim=1,
        )
        assert_close(step.detach(), -lr * solved, rtol=1e-9, atol=1e-12, what=f"exact-damping step of {name}")


# -- special cases ----------------------------------------------------------------------------------
def test_reduces_to_sgd_with_momentum_without_preconditioning():
    kfc_model, sgd_model = tiny_net(), tiny_net()
    kfc = KFCPre(kfc_model, lr=0.05, momentum=0.9, weight_decay=0.01, precondition=False, clip=None)
    sgd = SGD(build_param_groups(sgd_model, 0.05, weight_decay=0.01), lr=0.05, momentum=0.9)
    for seed in range(5):
        x, y = batch(seed)
        train_step(kfc_model, kfc, x, y)
        train_step(sgd_model, sgd, x, y)
    assert_close(
        flat_params(kfc_model), flat_params(sgd_model), rtol=1e-12, atol=1e-14, what="KFC-pre vs SGD"
    )


def test_batch_norm_parameters_take_their_blocks_step():
    """BN scale/shift: ``-alpha (F_c + gamma I)^{-1} g_c`` per channel, F_c from the first step's batch."""
    model = tiny_net(batch_norm=True)
    bn = model[1]
    x, y = batch(2)
    (fisher,) = batch_factors(model, x, y)["1"]
    opt = KFCPre(model, lr=0.1, momentum=0.9, clip=None, fisher="empirical", damping=1e-2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = torch.stack([bn.weight.grad, bn.bias.grad], dim=-1).unsqueeze(-1)
    step = torch.linalg.solve(fisher + 1e-2 * torch.eye(2, dtype=torch.float64), g).squeeze(-1)
    expected = bn.weight.detach() - 0.1 * step[:, 0], bn.bias.detach() - 0.1 * step[:, 1]
    opt.step(targets=y)
    assert_close(bn.weight.detach(), expected[0], rtol=1e-10, what="BN scale after one step")
    assert_close(bn.bias.detach(), expected[1], rtol=1e-10, what="BN shift after one step")
    assert model[0].bias is None and opt.curvature.blocks["0"].omega.shape == (18, 18)


def test_skipped_layers_take_plain_sgd_steps():
    model = tiny_net(batch_norm=True)
    opt = KFCPre(model, lr=0.1, momentum=0.9, clip=None, skip_layers=["1"])
    assert "1" not in opt.blocks
    bn = model[1]
    x, y = batch(2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    expected = bn.weight.detach() - 0.1 * bn.weight.grad
    opt.step()
    assert_close(bn.weight.detach(), expected, rtol=1e-12, what="BN scale after one plain step")


@pytest.mark.parametrize(
    ("refresh_until", "expected"),
    [
        (0, {"stats": [3, 6, 9, 12], "inverses": [4, 8, 12]}),
        (5, {"stats": [1, 2, 3, 4, 5, 6, 9, 12], "inverses": [1, 2, 3, 4, 5, 8, 12]}),
    ],
)
def test_statistics_and_inverses_follow_the_periods(monkeypatch, refresh_until, expected):
    model = tiny_net()
    opt = KFCPre(model, lr=0.01, stats_every=3, inverse_every=4, refresh_until=refresh_until, clip=None)
    opt.initialize([batch(0)[0]])
    calls = {"stats": [], "inverses": []}
    real_stats, real_inv = opt.curvature.update_statistics, opt.curvature.update_inverses
    monkeypatch.setattr(
        opt.curvature,
        "update_statistics",
        lambda *a, **k: (calls["stats"].append(opt.iteration + 1), real_stats(*a, **k))[1],
    )
    monkeypatch.setattr(
        opt.curvature,
        "update_inverses",
        lambda *a, **k: (calls["inverses"].append(opt.iteration + 1), real_inv(*a, **k))[1],
    )
    for k in range(12):
        train_step(model, opt, *batch(k))
    assert calls == expected


def test_initialize_averages_every_example_of_every_batch():
    model = tiny_net()
    opt = KFCPre(model, lr=0.01, stats_fraction=0.25, seed=2)
    batches = [batch(s, n=8)[0] for s in (1, 2)]
    opt.initialize(batches)
    draws = torch.Generator().manual_seed(2)
    expected = [batch_factors(model, x, sample_targets(model(x), draws)) for x in batches]
    for name, block in opt.curvature.blocks.items():
        assert_close(block.omega, (expected[0][name][0] + expected[1][name][0]) / 2, what=f"Omega {name}")
        assert_close(block.gamma, (expected[0][name][1] + expected[1][name][1]) / 2, what=f"Gamma {name}")
    assert opt.initialized


def test_clipping_bounds_nu_by_c():
    model = tiny_net()
    opt = KFCPre(model, lr=10.0, momentum=0.0, clip=1e-3, nu_fraction=1.0)
    x, y = batch(3)
    before = flat_params(model)
    train_step(model, opt, x, y)
    stats = opt.step_stats()
    assert stats["clip_factor"].item() < 1.0
    v = flat_params(model) - before
    clipped_nu = v @ explicit_fisher(model_at(model, before), x) @ v
    assert clipped_nu.item() == pytest.approx(1e-3, rel=1e-8)


def test_non_finite_factor_never_reaches_the_parameters():
    model = tiny_net()
    opt = KFCPre(model, lr=0.05, stats_every=100, inverse_every=2, clip=None)
    train_step(model, opt, *batch(0))
    opt.curvature.blocks["0"].omega = torch.full_like(opt.curvature.blocks["0"].omega, float("nan"))
    with pytest.warns(RuntimeWarning, match="'0'.*keeping the previous inverse"):
        train_step(model, opt, *batch(1))  # k = 2: inverses recomputed from the NaN factor
    assert torch.isfinite(flat_params(model)).all()


def test_step_needs_the_inputs():
    model = tiny_net()
    opt = KFCPre(model, lr=0.05)
    model.zero_grad()
    with torch.no_grad():
        model(batch(0)[0])  # no gradient: not a training forward
    with pytest.raises(RuntimeError, match="needs the mini-batch inputs"):
        opt.step()


def test_explicit_inputs_equal_remembered_inputs():
    a, b = tiny_net(), tiny_net()
    opt_a, opt_b = KFCPre(a, lr=0.05, seed=1), KFCPre(b, lr=0.05, seed=1)
    for seed in range(3):
        x, y = batch(seed)
        train_step(a, opt_a, x, y)
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward()
        b.eval()
        b(batch(99)[0])  # an evaluation forward in between must not matter
        b.train()
        opt_b.step(inputs=x)
    assert torch.equal(flat_params(a), flat_params(b))


def test_without_the_recorder_step_needs_explicit_inputs():
    """The runner's setting: record_inputs=False registers no hook, and step() must be given the batch."""
    model = tiny_net()
    opt = KFCPre(model, lr=0.05, record_inputs=False)
    assert not model._forward_pre_hooks
    x, y = batch(0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="needs the mini-batch inputs"):
        opt.step()
    opt.step(inputs=x)
    assert opt.iteration == 1


def test_copies_of_the_model_do_not_feed_the_optimizer():
    """An EMA copy's forwards (deepcopy carries its own recorder) cannot replace the recorded batch."""
    model = tiny_net()
    opt = KFCPre(model, lr=0.05)
    x, y = batch(0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    shadow = copy.deepcopy(model)
    shadow(batch(5)[0]).sum().backward()
    assert opt.recorder.inputs is x
    restored = pickle.loads(pickle.dumps(model))
    assert all(hook.inputs is None for hook in restored._forward_hooks.values())
    opt.remove_hooks()
    assert not model._forward_hooks


def test_stats_fraction_uses_the_first_examples():
    """Statistics on the leading ceil(f * M) examples of the batch (moved from the curvature tests)."""
    model = tiny_net()
    opt = KFCPre(model, lr=0.05, stats_fraction=0.5, stat_decay=0.0, stats_every=1, inverse_every=1, seed=4)
    opt.initialize([batch(7)[0]])
    x, y = batch(0, n=5)
    draws = torch.Generator().manual_seed(4)
    sample_targets(model(batch(7)[0]), draws)  # the initialization's draw
    expected = batch_factors(model, x[:3], sample_targets(model(x[:3]), draws))  # ceil(0.5 * 5) = 3
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step(inputs=x)  # explicit: batch_factors above ran (and backpropagated) the model too
    for name, block in opt.curvature.blocks.items():
        assert_close(block.omega, expected[name][0], what=f"Omega {name}")
        assert_close(block.gamma, expected[name][1], what=f"Gamma {name}")
    from kfcrun.optim.kfc_pre import subset_size

    assert subset_size(0.01, 5) == 1 and subset_size(0.5, 5) == 3
    with pytest.raises(ValueError, match="stats_fraction"):
        KFCPre(tiny_net(), lr=0.05, stats_fraction=0.0)


# -- state ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("early_phase", [{}, {"ema_warmup": True, "guard_clip": 0.9, "guard_nu_jump": 1.5}])
@pytest.mark.parametrize("stop_after", [1, 4, 5])
def test_state_dict_round_trip_resumes_bitwise(stop_after, early_phase):
    """Resume at any point, also between two inverse updates (T_f = 3), and with the early-phase options."""
    settings = dict(
        lr=0.05, weight_decay=0.01, stats_every=2, inverse_every=3, avg_decay=0.8, seed=3, **early_phase
    )
    model = tiny_net()
    opt = KFCPre(model, **settings)
    data = [batch(s) for s in range(8)]
    for x, y in data[:stop_after]:
        train_step(model, opt, x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, y in data[stop_after:]:
        train_step(model, opt, x, y)

    resumed = tiny_net(seed=123)
    resumed.load_state_dict(saved_model)
    resumed_opt = KFCPre(resumed, **{**settings, "seed": 999})
    resumed_opt.load_state_dict(saved_opt)
    for x, y in data[stop_after:]:
        train_step(resumed, resumed_opt, x, y)
    assert torch.equal(flat_params(model), flat_params(resumed))
    with opt.averaged_parameters(), resumed_opt.averaged_parameters():
        assert torch.equal(flat_params(model), flat_params(resumed))
    for name, block in opt.curvature.blocks.items():
        assert torch.equal(block.omega, resumed_opt.curvature.blocks[name].omega)
        assert torch.equal(block.inverse.omega_inv, resumed_opt.curvature.blocks[name].inverse.omega_inv)
    assert opt.guard.refreshes == resumed_opt.guard.refreshes
    if early_phase:
        assert opt.guard.refreshes > 0, "the guard never fired: the test would not cover its state"


def test_grad_is_left_as_the_user_computed_it():
    model = tiny_net()
    opt = KFCPre(model, lr=0.05, stats_every=1, inverse_every=1)
    x, y = batch(0)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    for before, p in zip(grads, model.parameters(), strict=True):
        assert torch.equal(before, p.grad)
