"""KFCPreconditioner with torch.optim optimizers, and gradient accumulation for it and KFC-pre (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.curvature import batch_factors
from kfcrun.optim import KFCPre, KFCPreconditioner
from kfcrun.optim.fisher_vector import fisher_quadratic
from tests.helpers.oracles import assert_close, unvec, vec


def small_net(seed: int = 0) -> nn.Sequential:
    """conv(2->3, 3x3, pad 1) -> GroupNorm -> tanh -> Linear(48 -> 4), float64 (no cross-example terms)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)
    )
    for p in net.parameters():
        nn.init.normal_(p, std=0.4)
    return net.double()


def data(n_batches: int, m: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (m,), generator=g))
        for _ in range(n_batches)
    ]


def hand_natural_gradient(model: nn.Module, factors: dict, damping: float) -> None:
    """Replace each covered ``.grad`` by the explicit solve of its damped block (Eqn 28; exact for GN)."""
    for name, module in model.named_modules():
        if name not in factors:
            continue
        if isinstance(module, nn.GroupNorm):
            (fisher,) = factors[name]
            g = torch.stack([module.weight.grad, module.bias.grad], dim=-1).unsqueeze(-1)
            sol = torch.linalg.solve(fisher + damping * torch.eye(2, dtype=torch.float64), g).squeeze(-1)
            module.weight.grad.copy_(sol[:, 0])
            module.bias.grad.copy_(sol[:, 1])
            continue
        omega, gamma = factors[name]
        pi = math.sqrt((omega.trace() / omega.shape[0]) / (gamma.trace() / gamma.shape[0]))
        root = math.sqrt(damping)
        omega_d = omega + pi * root * torch.eye(omega.shape[0], dtype=torch.float64)
        gamma_d = gamma + root / pi * torch.eye(gamma.shape[0], dtype=torch.float64)
        grad = torch.cat([module.bias.grad[:, None], module.weight.grad.flatten(1)], dim=1)
        sol = unvec(torch.linalg.solve(torch.kron(omega_d, gamma_d), vec(grad)), *grad.shape)
        module.bias.grad.copy_(sol[:, 0])
        module.weight.grad.copy_(sol[:, 1:].reshape(module.weight.shape))


def test_preconditioner_with_adamw_equals_a_hand_computation() -> None:
    xi, damping, lr, wd, betas, eps = 0.5, 1e-2, 1e-2, 0.1, (0.9, 0.99), 1e-8
    model = small_net()
    ref = copy.deepcopy(model)
    precond = KFCPreconditioner(
        model, damping=damping, fisher="empirical", stat_decay=xi, stats_every=1, inverse_every=2
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=wd)
    running: dict = {}
    frozen: dict = {}
    m_buf = {p: torch.zeros_like(p) for p in ref.parameters()}
    v_buf = {p: torch.zeros_like(p) for p in ref.parameters()}
    for k, (x, y) in enumerate(data(3), start=1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step(targets=y)  # inputs: recorded
        opt.step()

        # by hand: Eqn 32 estimates, the initial estimate then Eqn 33, inverses at k = 1 and every 2nd step
        est = batch_factors(ref, x, y)
        running = (
            est
            if k == 1
            else {
                n: tuple(xi * r + (1 - xi) * e for r, e in zip(running[n], est[n], strict=True)) for n in est
            }
        )
        if k == 1 or k % 2 == 0:
            frozen = {n: tuple(t.clone() for t in f) for n, f in running.items()}
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        hand_natural_gradient(ref, frozen, damping)
        with torch.no_grad():
            for p in ref.parameters():
                g = p.grad
                m_buf[p].mul_(betas[0]).add_((1 - betas[0]) * g)
                v_buf[p].mul_(betas[1]).add_((1 - betas[1]) * g * g)
                m_hat = m_buf[p] / (1 - betas[0] ** k)
                v_hat = v_buf[p] / (1 - betas[1] ** k)
                p.mul_(1 - lr * wd).sub_(lr * m_hat / (v_hat.sqrt() + eps))
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            assert_close(p, q, atol=1e-10, rtol=1e-9, what=f"step {k}: {name}")
    assert precond.steps == 3


def test_uncovered_parameters_keep_their_gradient_and_clip_bounds_nu() -> None:
    model = small_net()
    precond = KFCPreconditioner(model, damping=1e-3, skip_layers=["4"], clip=1e-4, lr=0.5, nu_fraction=1.0)
    ((x, y),) = data(1)
    F.cross_entropy(model(x), y).backward()
    head = model[4].weight.grad.clone()
    precond.step()
    scale = precond.step_stats()["clip_factor"]
    assert 0 < float(scale) < 1, "this lr and C must clip"
    assert_close(model[4].weight.grad, head * scale, atol=1e-14, what="skipped layer: gradient only scaled")
    tangents = {n: p.grad * 0.5 for n, p in model.named_parameters()}
    nu = fisher_quadratic(model, x, tangents)
    assert float(nu) == pytest.approx(1e-4, rel=1e-9)


def test_state_dict_resumes_bitwise() -> None:
    batches = data(5)

    def run(stop: int | None):
        model = small_net()
        precond = KFCPreconditioner(model, stats_every=2, inverse_every=3, seed=4)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        saved = None
        for i, (x, y) in enumerate(batches):
            if stop is not None and i == stop:
                saved = copy.deepcopy((model.state_dict(), precond.state_dict(), opt.state_dict()))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            precond.step()
            opt.step()
        return model, saved

    full, saved = run(stop=2)
    model = small_net(seed=9)
    precond = KFCPreconditioner(model, stats_every=2, inverse_every=3, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.load_state_dict(saved[0])
    precond.load_state_dict(saved[1])
    opt.load_state_dict(saved[2])
    for x, y in batches[2:]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        precond.step()
        opt.step()
    for p, q in zip(full.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_step_without_inputs_says_how_to_give_them() -> None:
    precond = KFCPreconditioner(small_net(), record_inputs=False)
    with pytest.raises(RuntimeError, match="step\\(inputs=x\\)"):
        precond.step()


# -- gradient accumulation: 4 micro-batches of 128 = one batch of 512 ----------------------------
def _accumulated_run(make_opt, micro: int, steps: int = 3, last_only: bool = False) -> nn.Module:
    model = small_net(seed=3)
    opt = make_opt(model)
    g = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x = torch.randn(512, 2, 4, 4, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (512,), generator=g)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (F.cross_entropy(model(xs), ys) / micro).backward()
        if last_only:  # what recording only the last forward would do
            opt.step(inputs=xs, targets=ys)
        else:
            opt.step(targets=list(y.chunk(micro)) if micro > 1 else y)
    return model


class _WithOptimizer:
    """KFCPreconditioner + a torch.optim optimizer behind one ``step(targets=...)``."""

    def __init__(self, model: nn.Module, make_optimizer) -> None:
        self.precond = KFCPreconditioner(
            model, fisher="empirical", stats_every=1, inverse_every=1, clip=0.01, lr=0.1, damping=1e-2
        )
        self.opt = make_optimizer(model.parameters())

    def zero_grad(self) -> None:
        self.opt.zero_grad()

    def step(self, inputs=None, targets=None) -> None:
        self.precond.step(inputs=inputs, targets=targets)
        self.opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda m: KFCPre(m, lr=0.1, fisher="empirical", stats_every=1, inverse_every=1, weight_decay=1e-3),
        # the true Fisher by its exact expectation over the model's labels (deterministic, unlike sampling)
        lambda m: KFCPre(m, lr=0.1, fisher="expected", stats_every=1, inverse_every=1),
        lambda m: _WithOptimizer(m, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)),
        lambda m: _WithOptimizer(m, lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.01)),
    ],
    ids=["kfc_pre", "kfc_pre_expected_fisher", "preconditioner_sgd", "preconditioner_adamw"],
)
def test_four_micro_batches_equal_one_batch(make_opt) -> None:
    whole = _accumulated_run(make_opt, micro=1)
    parts = _accumulated_run(make_opt, micro=4)
    for (name, p), q in zip(whole.named_parameters(), parts.parameters(), strict=True):
        assert_close(q, p, atol=1e-6, rtol=1e-6, what=f"{name}: 4 x 128 vs 512")
    # the test can fail: statistics (and nu) of the last micro-batch alone move the parameters elsewhere
    last = _accumulated_run(make_opt, micro=4, last_only=True)
    gap = max((p - q).abs().max().item() for p, q in zip(whole.parameters(), last.parameters(), strict=True))
    assert gap > 1e-4, f"last micro-batch only is {gap:.3g} from the whole batch"
