"""KFCCurvature: running averages, damped inverses (both strategies), preconditioning, robustness, state."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

from kfcrun.curvature import (
    KFCCurvature,
    KFCCurvatureWarning,
    batch_factors,
    combined_grad,
    split_update,
)
from tests.helpers.nets import two_conv_net
from tests.helpers.oracles import assert_close, unvec, vec

# PyTorch warns (once) that an even kernel with padding="same" pads a copy of the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

Batch = tuple[torch.Tensor, torch.Tensor]


def _batches(k: int, m: int = 5) -> list[Batch]:
    g = torch.Generator().manual_seed(99)
    return [
        (torch.randn(m, 2, 7, 7, generator=g, dtype=torch.float64), torch.randint(0, 4, (m,), generator=g))
        for _ in range(k)
    ]


def _ready(mode: str = "pi", **kwargs) -> tuple[nn.Module, KFCCurvature]:
    net = two_conv_net()
    curv = KFCCurvature(net, fisher_type="empirical", damping_mode=mode, **kwargs)
    for x, y in _batches(2):
        curv.update_statistics(x, y, init=True)
    return net, curv


def _random_grads(curv: KFCCurvature, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(b.gamma_dim, b.omega_dim, generator=g, dtype=torch.float64)
        for name, b in curv.blocks.items()
    }


def test_layers_are_the_convs_and_linears_in_model_order() -> None:
    curv = KFCCurvature(two_conv_net())
    assert list(curv.blocks) == ["0", "2", "6"]
    assert [b.kind for b in curv.blocks.values()] == ["conv2d", "conv2d", "linear"]
    assert [(b.gamma_dim, b.omega_dim) for b in curv.blocks.values()] == [(3, 19), (4, 12), (4, 17)]


def test_pi_damped_precondition_matches_explicit_kronecker_solve() -> None:
    _, curv = _ready("pi")
    lam = {"0": 1e-3, "2": 0.0, "6": 5e-2}
    damping = 1e-2
    update = curv.update_inverses(damping, lam)
    grads = _random_grads(curv)
    out = curv.precondition(grads)
    for name, block in curv.blocks.items():
        omega, gamma = block.omega, block.gamma
        total = lam[name] + damping
        pi = math.sqrt((omega.trace().item() / omega.shape[0]) / (gamma.trace().item() / gamma.shape[0]))
        assert update.summaries[name]["pi"].item() == pytest.approx(pi, rel=1e-12)
        omega_d = omega + pi * math.sqrt(total) * torch.eye(omega.shape[0], dtype=torch.float64)
        gamma_d = gamma + math.sqrt(total) / pi * torch.eye(gamma.shape[0], dtype=torch.float64)
        ref = torch.linalg.solve(torch.kron(omega_d, gamma_d), vec(grads[name]))
        assert_close(out[name], unvec(ref, *grads[name].shape), atol=1e-9, rtol=1e-9, what=f"layer {name}")
        assert out[name].shape == grads[name].shape and out[name].dtype == grads[name].dtype


def test_exact_damped_precondition_matches_explicit_kronecker_solve() -> None:
    _, curv = _ready("exact")
    lam = {"0": 1e-3, "2": 0.0, "6": 5e-2}
    damping = 1e-2
    curv.update_inverses(damping, lam)
    grads = _random_grads(curv)
    out = curv.precondition(grads)
    for name, block in curv.blocks.items():
        n = block.omega_dim * block.gamma_dim
        system = torch.kron(block.omega, block.gamma) + (lam[name] + damping) * torch.eye(
            n, dtype=torch.float64
        )
        ref = torch.linalg.solve(system, vec(grads[name]))
        assert_close(out[name], unvec(ref, *grads[name].shape), atol=1e-9, rtol=1e-9, what=f"layer {name}")


def test_factors_and_inverses_are_symmetric_psd() -> None:
    _, curv = _ready("pi")
    curv.update_inverses(1e-3, 0.0)
    for name, b in curv.blocks.items():
        for label, mat in [
            ("Omega", b.omega),
            ("Gamma", b.gamma),
            ("Omega_inv", b.inverse.omega_inv),
            ("Gamma_inv", b.inverse.gamma_inv),
        ]:
            assert_close(mat, mat.T, atol=1e-12, rtol=1e-10, what=f"{name} {label} symmetric")
            evals = torch.linalg.eigvalsh(mat)
            assert evals.min() >= -1e-12 * evals.abs().max(), (
                f"{name} {label}: min eigenvalue {evals.min():.3g}"
            )


def test_init_averages_batches_then_ema_follows_eqn_33() -> None:
    net = two_conv_net()
    xi = 0.8
    curv = KFCCurvature(net, fisher_type="empirical", stat_decay=xi)
    batches = _batches(5)
    hats = [batch_factors(net, x, y) for x, y in batches]
    for x, y in batches[:2]:
        curv.update_statistics(x, y, init=True)
    for x, y in batches[2:]:
        curv.update_statistics(x, y)
    assert curv.num_ema_updates == 3
    for name, block in curv.blocks.items():
        for i, label in enumerate(("Omega", "Gamma")):
            ref = (hats[0][name][i] + hats[1][name][i]) / 2
            for h in hats[2:]:
                ref = xi * ref + (1 - xi) * h[name][i]
            got = block.omega if i == 0 else block.gamma
            assert_close(got, ref, atol=1e-13, what=f"{name} {label} after init(2) + 3 EMA updates")


def test_first_update_without_init_sets_the_factors() -> None:
    net = two_conv_net()
    curv = KFCCurvature(net, fisher_type="empirical", stat_decay=0.9)
    ((x, y),) = _batches(1)
    curv.update_statistics(x, y)
    ref = batch_factors(net, x, y)
    for name, block in curv.blocks.items():
        assert torch.equal(block.omega, ref[name][0]) and torch.equal(block.gamma, ref[name][1])


def test_chunk_size_does_not_change_the_factors() -> None:
    net = two_conv_net()
    ((x, y),) = _batches(1)
    ref = KFCCurvature(net, fisher_type="empirical")
    one = KFCCurvature(net, fisher_type="empirical", chunk_size=1)
    ref.update_statistics(x, y, init=True)
    one.update_statistics(x, y, init=True)
    for name in ref.blocks:
        assert_close(one.blocks[name].omega, ref.blocks[name].omega, atol=1e-13, what=f"{name} Omega chunk 1")


def test_update_statistics_leaves_grads_buffers_hooks_alone() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4)
    ).double()
    ((x, _),) = _batches(1)
    net(x).sum().backward()
    grads = {k: v.grad.clone() for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    curv = KFCCurvature(net)
    curv.update_statistics(x, generator=torch.Generator().manual_seed(0), init=True)
    curv.update_statistics(x, generator=torch.Generator().manual_seed(1))
    for k, v in net.named_parameters():
        assert torch.equal(v.grad, grads[k]), k
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert all(not m._forward_hooks for m in net.modules())


def test_singular_undamped_factor_gets_finite_inverse_and_a_warning_naming_the_layer() -> None:
    _, curv = _ready("pi")
    curv.blocks["2"].omega = torch.zeros_like(curv.blocks["2"].omega)
    with pytest.warns(KFCCurvatureWarning) as caught:
        curv.update_inverses(0.0, 0.0)  # undamped: layer '2' is zero, layer '6' rank-deficient (5 < 17)
    messages = [str(w.message) for w in caught]
    assert any("layer '2'" in m and "fallback" in m for m in messages), messages
    assert any("layer '6'" in m for m in messages), messages
    inv = curv.blocks["2"].inverse.omega_inv
    assert bool(torch.isfinite(inv).all())
    out = curv.precondition(_random_grads(curv))
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


def test_nan_factor_keeps_the_previous_inverse_and_parameters_stay_finite() -> None:
    net, curv = _ready("pi")
    curv.update_inverses(1e-3, 0.0)
    before = {k: v.clone() for k, v in curv.blocks["0"].state_dict().items() if v is not None}
    curv.blocks["0"].gamma[1, 1] = float("nan")
    with pytest.warns(KFCCurvatureWarning, match=r"layer '0'.*keeping the previous inverse"):
        update = curv.update_inverses(1e-3, 0.0)
    assert update.nonfinite == 1
    for key in ("omega_inv", "gamma_inv", "pi"):
        assert torch.equal(getattr(curv.blocks["0"].inverse, key), before[key]), key
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    update = curv.precondition(_random_grads(curv))
    with torch.no_grad():
        for name, block in curv.blocks.items():
            dw, db = block.split(update[name])
            block.module.weight -= 0.1 * dw
            if db is not None:
                block.module.bias -= 0.1 * db
    for k, v in net.named_parameters():
        assert bool(torch.isfinite(v).all()), f"parameter {k} poisoned"
        assert not torch.equal(v, params[k])


@pytest.mark.parametrize("mode", ["pi", "exact"])
def test_nan_factor_without_previous_inverse_falls_back_to_scaled_identity(mode: str) -> None:
    _, curv = _ready(mode)
    curv.blocks["6"].omega[0, 0] = float("inf")
    with pytest.warns(KFCCurvatureWarning, match=r"layer '6'.*identity"):
        curv.update_inverses(0.01, 0.03)
    grads = _random_grads(curv)
    assert_close(curv.precondition(grads)["6"], grads["6"] / 0.04, atol=1e-12, what="identity fallback")


def test_exact_mode_nan_keeps_previous_eigendecomposition() -> None:
    _, curv = _ready("exact")
    curv.update_inverses(1e-2, 0.0)
    q_before = curv.blocks["2"].inverse.q_omega.clone()
    curv.blocks["2"].omega[0, 0] = float("nan")
    with pytest.warns(KFCCurvatureWarning, match=r"layer '2'.*previous"):
        curv.update_inverses(1e-2, 0.0)
    assert torch.equal(curv.blocks["2"].inverse.q_omega, q_before)


def test_non_finite_batch_is_not_folded_into_the_running_factors() -> None:
    _, curv = _ready("pi")
    saved = {n: (b.omega.clone(), b.gamma.clone()) for n, b in curv.blocks.items()}
    ((x, y),) = _batches(1)
    x[0, 0, 0, 0] = float("nan")
    stats = curv.update_statistics(x, y)
    assert int(stats.nonfinite) == 3 and stats.examples == 5
    for name, block in curv.blocks.items():
        assert torch.equal(block.omega, saved[name][0]) and torch.equal(block.gamma, saved[name][1]), name


def test_unused_layer_warns_and_is_preconditioned_as_zero_curvature() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(98, 4)
            self.unused = nn.Linear(3, 2)

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return self.fc(inp.flatten(1))

    net = Net().double()
    curv = KFCCurvature(net, fisher_type="empirical")
    ((x, y),) = _batches(1)
    with pytest.warns(KFCCurvatureWarning, match="'unused' did not run"):
        curv.update_statistics(x, y, init=True)
    curv.update_inverses(0.1, 0.1)
    g = torch.ones(2, 4, dtype=torch.float64)
    assert_close(curv.precondition({"unused": g})["unused"], g / 0.2, atol=1e-12, what="unused layer")


def test_misuse_raises_clear_errors() -> None:
    net = two_conv_net()
    curv = KFCCurvature(net)
    with pytest.raises(RuntimeError, match="before any update_statistics"):
        curv.update_inverses(1e-3, 0.0)
    _, curv = _ready("pi")
    with pytest.raises(RuntimeError, match="update_inverses"):
        curv.precondition(_random_grads(curv))
    with pytest.raises(ValueError, match="without a block"):
        curv.update_inverses(1e-3, {"nope": 0.0})
    curv.update_inverses(1e-3, 0.0)
    with pytest.raises(ValueError, match="shape"):
        curv.precondition({"0": torch.zeros(3, 3, dtype=torch.float64)})
    with pytest.raises(KeyError, match="nope"):
        curv.precondition({"nope": torch.zeros(3, 3)})
    _, exact = _ready("exact")
    with pytest.raises(ValueError, match="damping \\(λ \\+ γ\\) > 0"):
        exact.update_inverses(0.0, 0.0)
    with pytest.raises(ValueError, match="damping_mode"):
        KFCCurvature(net, damping_mode="kfac")


@pytest.mark.parametrize("mode", ["pi", "exact"])
def test_state_dict_round_trip_is_bitwise(mode: str) -> None:
    net, curv = _ready(mode)
    ((x, y),) = _batches(1)
    curv.update_statistics(x, y)
    curv.update_inverses(1e-3, {"0": 1e-4, "2": 0.0, "6": 2e-4})
    buf = io.BytesIO()
    torch.save(curv.state_dict(), buf)
    buf.seek(0)
    other = KFCCurvature(net, fisher_type="empirical", damping_mode=mode)
    other.load_state_dict(torch.load(buf))
    for name in curv.blocks:
        a, b = curv.blocks[name].state_dict(), other.blocks[name].state_dict()
        assert a.keys() == b.keys()
        for key in a:
            if a[key] is None:
                assert b[key] is None, (name, key)
            else:
                assert torch.equal(a[key], b[key]) and a[key].dtype == b[key].dtype, (name, key)
    assert (other.num_init_batches, other.num_ema_updates, other.num_inverse_updates) == (0, 1, 1)
    grads = _random_grads(curv)
    pa, pb = curv.precondition(grads), other.precondition(grads)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    with pytest.raises(ValueError, match="damping_mode"):
        KFCCurvature(net, damping_mode="exact" if mode == "pi" else "pi").load_state_dict(curv.state_dict())


def test_combined_grad_and_split_update_round_trip() -> None:
    net = two_conv_net()
    ((x, y),) = _batches(1)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    for idx in (0, 2, 6):
        layer = net[idx]
        g = combined_grad(layer)
        assert g.shape == (layer.weight.shape[0], layer.weight[0].numel() + (layer.bias is not None))
        dw, db = split_update(layer, g)
        assert torch.equal(dw, layer.weight.grad)
        assert (db is None) == (layer.bias is None)
        if db is not None:
            assert torch.equal(db, layer.bias.grad) and torch.equal(g[:, 0], layer.bias.grad)


def test_no_warnings_on_the_happy_path() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, curv = _ready("pi")
        curv.update_inverses(1e-3, 0.0)
        curv.precondition(_random_grads(curv))


@pytest.mark.parametrize("mode", ["pi", "exact"])
def test_several_damping_candidates_equal_separate_fits(mode: str) -> None:
    """One fit with gamma_-, gamma, gamma_+ (K-FAC's search) solves like three single fits."""
    lam = {"0": 1e-3, "2": 0.0, "6": 5e-2}
    dampings = [1e-2, 3e-3, 3e-2]
    _, curv = _ready(mode)
    update = curv.update_inverses(dampings, lam)
    grads = _random_grads(curv)
    together = [curv.precondition(grads, index=i) for i in range(len(dampings))]
    for i, damping in enumerate(dampings):
        _, single = _ready(mode)
        single_update = single.update_inverses(damping, lam)
        alone = single.precondition(grads)
        for name in grads:
            assert torch.equal(together[i][name], alone[name]), (mode, i, name)
        if i == 0:
            for name in grads:
                for key, value in single_update.summaries[name].items():
                    assert torch.equal(update.summaries[name][key], value), (name, key)
    # only candidate 0 is state: a restored object solves candidate 0 bitwise
    _, restored = _ready(mode)
    restored.load_state_dict(curv.state_dict())
    back = restored.precondition(grads)
    assert all(torch.equal(back[k], together[0][k]) for k in grads)


@pytest.mark.parametrize("mode", ["pi", "exact"])
@pytest.mark.parametrize("index", [0, 1, 2])
def test_selected_damping_candidate_becomes_the_fit(mode: str, index: int) -> None:
    """select_damping(i) keeps candidate i as candidate 0, bitwise, and it survives a state round trip."""
    lam = {"0": 1e-3, "2": 0.0, "6": 5e-2}
    dampings = [1e-2, 3e-3, 3e-2]
    _, curv = _ready(mode)
    curv.update_inverses(dampings, lam)
    grads = _random_grads(curv)
    expected = curv.precondition(grads, index=index)
    curv.select_damping(index)
    kept = curv.precondition(grads)
    assert all(torch.equal(kept[k], expected[k]) for k in grads)
    for name, block in curv.blocks.items():
        assert block.inverse.damping_total.item() == pytest.approx(lam[name] + dampings[index])
    if index:
        with pytest.raises(IndexError):
            curv.precondition(grads, index=index)  # the other candidates are gone
    _, restored = _ready(mode)
    restored.load_state_dict(curv.state_dict())
    back = restored.precondition(grads)
    assert all(torch.equal(back[k], expected[k]) for k in grads)


def test_ema_warmup_averages_the_first_updates_equally() -> None:
    """xi_k = min(1 - 1/k, xi): while 1 - 1/k < xi the factors are the plain mean of the estimates."""
    net = two_conv_net()
    curv = KFCCurvature(net, fisher_type="empirical", stat_decay=0.7, ema_warmup=True)
    batches = _batches(6)
    hats = [batch_factors(net, x, y) for x, y in batches]
    decays = []
    for x, y in batches:
        curv.update_statistics(x, y)
        decays.append(curv.last_decay)
    assert decays == pytest.approx([0.0, 1 / 2, 2 / 3, 0.7, 0.7, 0.7])
    for name, block in curv.blocks.items():
        ref = sum(h[name][0] for h in hats[:3]) / 3
        for h in hats[3:]:
            ref = 0.7 * ref + 0.3 * h[name][0]
        assert_close(block.omega, ref, atol=1e-13, what=f"{name} Omega after the warm-up")


def test_ema_warmup_counts_the_initial_estimate_by_its_examples() -> None:
    """An initial estimate over N examples weighs ceil(N / M) updates of M examples."""
    net = two_conv_net()
    curv = KFCCurvature(net, fisher_type="empirical", stat_decay=0.95, ema_warmup=True)
    init = _batches(2, m=5)  # N = 10 examples
    hats_init = [batch_factors(net, x, y) for x, y in init]
    for x, y in init:
        curv.update_statistics(x, y, init=True)
    later = [
        (x[:4], y[:4]) for x, y in _batches(2, m=4)
    ]  # M = 4: the estimate counts as ceil(10/4) = 3 updates
    hats = [batch_factors(net, x, y) for x, y in later]
    for x, y in later:
        curv.update_statistics(x, y)
    assert curv.statistics_count == 5 and curv.last_decay == pytest.approx(4 / 5)
    for name, block in curv.blocks.items():
        mean_init = (hats_init[0][name][1] + hats_init[1][name][1]) / 2
        ref = (3 * mean_init + hats[0][name][1] + hats[1][name][1]) / 5
        assert_close(block.gamma, ref, atol=1e-13, what=f"{name} Gamma: init as 3 updates, then 2")


def test_without_warmup_xi_is_constant() -> None:
    _, curv = _ready()
    ((x, y),) = _batches(1)
    curv.update_statistics(x, y)
    assert curv.last_decay == curv.stat_decay == 0.95
