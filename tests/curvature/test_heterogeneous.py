"""KFCCurvature over every block type: damped solves vs explicit systems, coverage, warnings, accumulation."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from kfcrun.curvature import (
    EstimateAccumulator,
    Gaussian,
    KFCCurvature,
    KFCCurvatureWarning,
    NormBlock,
    kfc_layers,
    layer_matches,
    uncovered_modules,
)
from tests.helpers.oracles import assert_close, unvec, vec


class Mixed(nn.Module):
    """Grouped conv, GroupNorm, depthwise reflect conv, BN, Conv1d, Linear (max_factor_dim=12 caps some)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", groups=4, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv1d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 16, 14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.gn(self.conv(x)))
        h = torch.relu(self.bn(self.dw(h)))
        h = torch.tanh(self.c1(h.flatten(2)))
        return self.fc(h.flatten(1))


def mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    net = Mixed()
    for p in net.parameters():
        nn.init.normal_(p, std=0.4)
    return net.double()


def batches(k: int, m: int = 6, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(m, 2, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 14, (m,), generator=g))
        for _ in range(k)
    ]


def ready(mode: str, **kwargs) -> KFCCurvature:
    curv = KFCCurvature(mixed(), fisher_type="empirical", damping_mode=mode, max_factor_dim=12, **kwargs)
    for x, y in batches(2):
        curv.update_statistics(x, y, init=True)
    return curv


def dense(factor: torch.Tensor, diagonal: bool) -> torch.Tensor:
    return torch.diag_embed(factor) if diagonal else factor


def test_coverage_of_the_mixed_net() -> None:
    curv = ready("pi")
    assert curv.coverage() == {
        "conv": "conv2d",
        "gn": "norm",
        "dw": "conv2d",
        "bn": "norm",
        "c1": "conv1d",
        "fc": "linear",
    }
    assert curv.uncovered == {}
    shapes = {name: b.factor_shapes() for name, b in curv.blocks.items()}
    assert shapes["conv"] == {"omega": (2, 10, 10), "gamma": (2, 2, 2)}
    assert shapes["dw"] == {"omega": (4, 9, 9), "gamma": (4, 1, 1)}
    assert shapes["gn"] == {"fisher": (4, 2, 2)}
    assert shapes["fc"] == {"omega": (49,), "gamma": (14,)}  # both above max_factor_dim=12: diagonal
    assert shapes["c1"] == {"omega": (13,), "gamma": (3, 3)}


@pytest.mark.parametrize("mode", ["pi", "exact"])
def test_every_block_solves_its_damped_system(mode: str) -> None:
    curv = ready(mode)
    lam = {"conv": 1e-3, "dw": 2e-3, "c1": 0.0, "fc": 1e-2}  # norm blocks left out: lambda = 0
    damping = 3e-2
    curv.update_inverses(damping, lam)
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(b.layout_shape, generator=g, dtype=torch.float64) for n, b in curv.blocks.items()}
    out = curv.precondition(grads)
    for name, block in curv.blocks.items():
        total = lam.get(name, 0.0) + damping
        if isinstance(block, NormBlock):
            eye = torch.eye(block.dim, dtype=torch.float64)
            ref = torch.linalg.solve(block.fisher + total * eye, grads[name].unsqueeze(-1)).squeeze(-1)
            assert_close(out[name], ref, atol=1e-10, what=f"{name}: (F_c + t I)^-1 g_c")
            continue
        omegas = dense(block.omega, block.omega_diagonal).reshape(-1, block.omega_dim, block.omega_dim)
        gammas = dense(block.gamma, block.gamma_diagonal).reshape(-1, block.gamma_dim, block.gamma_dim)
        grad = grads[name].reshape(-1, block.gamma_dim, block.omega_dim)
        got = out[name].reshape(grad.shape)
        for i, (omega, gamma) in enumerate(zip(omegas, gammas, strict=True)):
            if mode == "exact":
                n = omega.shape[0] * gamma.shape[0]
                system = torch.kron(omega, gamma) + total * torch.eye(n, dtype=torch.float64)
            else:
                pi = torch.sqrt((omega.diagonal().mean()) / (gamma.diagonal().mean()))
                pi = (
                    pi if torch.isfinite(pi) and pi > 0 else torch.ones((), dtype=torch.float64)
                )  # Eqn 10's guard (dead ReLU units here)
                root = total**0.5
                system = torch.kron(
                    omega + pi * root * torch.eye(omega.shape[0], dtype=torch.float64),
                    gamma + root / pi * torch.eye(gamma.shape[0], dtype=torch.float64),
                )
            ref = unvec(torch.linalg.solve(system, vec(grad[i])), *grad[i].shape)
            assert_close(got[i], ref, atol=1e-9, rtol=1e-9, what=f"{name} group {i} ({mode})")


@pytest.mark.parametrize("mode", ["pi", "exact"])
def test_state_dict_round_trip_every_block_type(mode: str) -> None:
    curv = ready(mode)
    curv.update_inverses([1e-3, 1e-2], 0.0)
    buf = io.BytesIO()
    torch.save(curv.state_dict(), buf)
    buf.seek(0)
    other = KFCCurvature(curv.model, fisher_type="empirical", damping_mode=mode, max_factor_dim=12)
    other.load_state_dict(torch.load(buf))
    g = torch.Generator().manual_seed(2)
    grads = {n: torch.randn(b.layout_shape, generator=g, dtype=torch.float64) for n, b in curv.blocks.items()}
    a, b = curv.precondition(grads), other.precondition(grads)
    for name in grads:
        assert torch.equal(a[name], b[name]), name


def test_several_damping_candidates_equal_separate_fits_for_norm_blocks() -> None:
    curv = ready("pi")
    curv.update_inverses([1e-3, 1e-1], 0.0)
    g = torch.Generator().manual_seed(3)
    grads = {n: torch.randn(b.layout_shape, generator=g, dtype=torch.float64) for n, b in curv.blocks.items()}
    second = curv.precondition(grads, index=1)
    curv.update_inverses(1e-1, 0.0)
    alone = curv.precondition(grads)
    for name in grads:
        assert_close(second[name], alone[name], atol=1e-13, what=name)


def test_micro_batch_estimates_equal_the_whole_batch() -> None:
    """4 micro-batches of 3 give the estimate of the 12 together (GroupNorm: no cross-example statistics)."""
    curv = KFCCurvature(mixed(), fisher_type="empirical", max_factor_dim=12)
    curv.model.bn.eval()  # BatchNorm in train mode would see different batch statistics per micro-batch
    ((x, y),) = batches(1, m=12)
    whole = curv.estimate_statistics(x, y)
    parts = curv.estimate_statistics(list(x.split(3)), list(y.split(3)))
    for name in whole:
        for a, b in zip(whole[name], parts[name], strict=True):
            assert_close(b, a, atol=1e-12, rtol=1e-10, what=f"{name} micro-batches vs whole")
    acc = EstimateAccumulator()
    acc.add({"a": (torch.tensor([2.0]),)}, 1)
    acc.add({"a": (torch.tensor([5.0]),)}, 2)
    assert acc.result()["a"][0].item() == pytest.approx(4.0)


def test_expected_fisher_of_dense_gaussian_outputs_covers_every_block() -> None:
    curv = KFCCurvature(mixed(), fisher_type="expected", likelihood=Gaussian(), max_factor_dim=12)
    ((x, _),) = batches(1, m=2)
    est = curv.estimate_statistics(x)
    assert set(est) == set(curv.blocks)
    assert_close(
        est["fc"][1], torch.ones(14, dtype=torch.float64), atol=1e-13, what="Gaussian Gamma of the last layer"
    )


# -- coverage --------------------------------------------------------------------------------------
class WithExtras(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.layer1 = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
        self.act = nn.PReLU()
        self.head = nn.Linear(3, 2)
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)  # weight frozen, bias trainable: not covered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.layer1(x)).mean((2, 3))
        return self.head(self.frozen(h)) * self.scale


def test_uncovered_parameters_get_one_warning_listing_them() -> None:
    model = WithExtras().double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curv = KFCCurvature(model)
    msgs = [str(w.message) for w in caught if issubclass(w.category, KFCCurvatureWarning)]
    assert len(msgs) == 1, msgs
    assert "<root> (WithExtras: scale)" in msgs[0]
    assert "act (PReLU: weight)" in msgs[0] and "frozen (Linear: bias)" in msgs[0]
    assert list(curv.blocks) == ["layer1.0", "layer1.1", "head"]
    assert curv.uncovered == {"": ["scale"], "act": ["weight"], "frozen": ["bias"]}


def test_skip_layers_by_name_and_pattern() -> None:
    model = WithExtras().double()
    assert layer_matches("layer1.0", ["layer1"]) and layer_matches("layer1.1", ["*.1"])
    assert not layer_matches("layer10", ["layer1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KFCCurvatureWarning)
        curv = KFCCurvature(model, skip_layers=["layer1", "act", "frozen"])
    assert list(curv.blocks) == ["head"]
    assert curv.uncovered == {"": ["scale"]}  # skipped modules are not "uncovered"
    assert list(kfc_layers(model, ["*.0", "head"])) == ["layer1.1"]
    with pytest.raises(ValueError, match="name no module"):
        KFCCurvature(model, skip_layers=["layer9"])


def test_wrapped_models_have_canonical_names() -> None:
    inner = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3))

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    assert list(kfc_layers(Wrapper())) == ["0", "1"]
    assert uncovered_modules(Wrapper()) == {}


def test_state_saved_from_a_wrapped_model_loads_into_the_bare_model() -> None:
    """Names ignore ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile)."""

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._orig_mod(x)

    class Parallel(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    net = mixed()
    wrapped = Parallel(Wrapped(net))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFCCurvatureWarning)
        curv = KFCCurvature(wrapped, fisher_type="empirical", skip_layers=["bn"], max_factor_dim=12)
    assert "bn" not in curv.blocks and next(iter(curv.blocks)) == "conv"
    ((x, y),) = batches(1)
    curv.update_statistics(x, y)
    curv.update_inverses(1e-2, 0.0)
    bare = KFCCurvature(net, fisher_type="empirical", skip_layers=["bn"], max_factor_dim=12)
    bare.load_state_dict(curv.state_dict())
    for name in curv.blocks:
        assert torch.equal(curv.blocks[name].factors()[0], bare.blocks[name].factors()[0]), name


def test_tied_weights_are_left_to_the_plain_step_with_one_warning() -> None:
    """An embedding and a language-model head sharing one weight: neither gets a block."""

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 11, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(tokens)))

    model = TiedLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        curv = KFCCurvature(model, likelihood="cross_entropy")
    assert list(curv.blocks) == ["norm"]
    assert curv.uncovered == {"embed": ["weight"], "head": ["weight"]}
    assert sum(issubclass(w.category, KFCCurvatureWarning) for w in caught) == 1
