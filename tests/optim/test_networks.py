"""KFC-pre and K-FAC on the networks researchers use: build, report coverage, take 5 steps with a finite loss.

The ResNet-18s have 4608 x 4608 factors (512 channels x 3 x 3); in the default suite they run
with ``max_factor_dim=1024`` (every larger factor diagonal, which also exercises the cap on
a real network) and float32 inverses; the full-factor runs are marked slow.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kfcrun.curvature import KFCCurvatureWarning, SoftmaxCrossEntropy
from kfcrun.optim import KFAC, KFCPre, KFCPreconditioner


def _steps(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, n: int = 5, **step_kwargs) -> list[float]:
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(**step_kwargs)
        losses.append(loss.item())
    return losses


def _vision(arch: str, frozen: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    if frozen is not None:
        model.get_submodule(frozen).requires_grad_(False)
    return model


@pytest.mark.parametrize("method", ["kfc_pre", "kfac"])
@pytest.mark.parametrize(
    ("arch", "frozen", "kinds", "capped"),
    [
        ("resnet18", None, {"conv2d": 20, "norm": 20, "linear": 1}, 11),
        ("resnet18", "layer1", {"conv2d": 16, "norm": 16, "linear": 1}, 11),
        ("mobilenet_v3_small", None, {"conv2d": 52, "norm": 34, "linear": 2}, 1),
    ],
    ids=["resnet18", "resnet18_layer1_frozen", "mobilenet_v3_small"],
)
def test_torchvision_classifiers_take_five_finite_steps(method, arch, frozen, kinds, capped) -> None:
    model = _vision(arch, frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KFCCurvatureWarning)  # everything with parameters is covered
        if method == "kfc_pre":
            # nu on all 8 examples: BatchNorm in train mode over 2 examples of a 1x1 map makes the exact
            # Fisher's JVP explode (the batch variance nearly vanishes), and the clip then stops every step
            opt = KFCPre(
                model,
                lr=0.02,
                damping=1e-2,
                max_factor_dim=1024,
                inverse_dtype=torch.float32,
                nu_fraction=1.0,
            )
        else:  # K-FAC's quadratic model uses the whole batch anyway; lambda adapted on steps 2 and 4
            opt = KFAC(
                model,
                damping=1e-2,
                max_factor_dim=1024,
                inverse_dtype=torch.float32,
                lambda_every=2,
                gamma_every=3,
            )
    coverage = opt.curvature.coverage()
    found = {kind: sum(1 for k in coverage.values() if k == kind) for kind in set(coverage.values())}
    assert found == kinds, coverage
    if frozen is not None:
        assert not any(name.startswith(frozen + ".") for name in coverage)
        assert all(not p.requires_grad for p in model.get_submodule(frozen).parameters())
    diag = [n for n, b in opt.blocks.items() if getattr(b, "omega_diagonal", False)]
    # 3x3 convs reading 128, 256 or 512 channels (1152, 2304, 4608 > 1024); mobilenet's 1024 + 1 classifier
    assert len(diag) == capped, diag
    if arch == "mobilenet_v3_small":
        dw = opt.blocks["features.1.block.0.0"]
        assert dw.groups == 16 and dw.factor_shapes() == {"omega": (16, 9, 9), "gamma": (16, 1, 1)}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)  # small maps: fast
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    closure = {"closure": lambda: F.cross_entropy(model(x), y)} if method == "kfac" else {}
    losses = _steps(model, opt, x, y, **closure)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    if method == "kfac":
        # The exact-Fisher JVP through BatchNorm over 8 examples of layer4's 1x1 maps can overflow
        # (see KFCPre's nu_fraction); K-FAC then skips that step (alpha = mu = 0, rho = -inf) rather
        # than poisoning theta. So: every parameter finite and lambda finite, not a healthy last step.
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert math.isfinite(float(opt.step_stats()["lambda"])) and opt.lam > 0
    for name, p in model.named_parameters():
        moved = not torch.equal(before[name], p.detach())
        assert moved == p.requires_grad, f"{name}: moved={moved}, trainable={p.requires_grad}"


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> Linear -> GELU -> Linear(vocab): per-token logits ``(M, T, V)``."""

    def __init__(self, vocab: int = 40, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(2 * dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.up(self.norm(self.embed(tokens)))))


@pytest.mark.parametrize("use", ["kfc_pre", "preconditioner_adamw", "kfac"])
def test_sequence_model_with_per_token_cross_entropy(use: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 40, (6, 9), generator=g)
    targets = torch.randint(0, 40, (6, 9), generator=g)
    targets[:, -3:] = -100  # padding: ignored by the loss and by the curvature
    likelihood = SoftmaxCrossEntropy(class_dim=-1, ignore_index=-100)
    kwargs = dict(likelihood=likelihood, damping=1e-2, max_factor_dim=32)  # the 40 x 40 head Gamma is capped
    precond = None
    if use == "kfc_pre":
        opt = KFCPre(model, lr=0.1, **kwargs)
    elif use == "kfac":
        # the initial lambda (= damping) MG-code recommends for classifiers: from 1e-2 the trust region
        # is far too loose for these 22-nat losses, rho is -inf and the LM rule grows lambda too slowly
        opt = KFAC(model, lambda_every=2, gamma_every=3, **{**kwargs, "damping": 1.0})
    else:
        precond = KFCPreconditioner(model, **kwargs)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    owner = opt if precond is None else precond
    assert owner.curvature.coverage() == {
        "embed": "embedding",
        "norm": "norm",
        "up": "linear",
        "head": "linear",
    }
    assert owner.blocks["head"].gamma_diagonal and owner.blocks["embed"].omega_diagonal
    assert owner.needs_labels
    losses = []
    for _ in range(5):
        opt.zero_grad()
        if use == "kfac":
            # K-FAC's rho compares the closure's loss with a model built from the likelihood's Fisher:
            # both are the mean over sequences of the NLL summed over (unmasked) tokens
            loss = likelihood.loss(model(tokens), targets)
            loss.backward()
            opt.step(lambda: likelihood.loss(model(tokens), targets), targets=targets)
        else:
            loss = F.cross_entropy(model(tokens).movedim(-1, 1), targets, ignore_index=-100)
            loss.backward()
            if precond is not None:
                precond.step(targets=targets)
                opt.step()
            else:
                opt.step(targets=targets)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_classifiers_with_full_factors(arch: str) -> None:
    """No cap: ResNet-18's three 4608 x 4608 Omegas are inverted (pi damping, float32)."""
    model = _vision(arch)
    opt = KFCPre(model, lr=0.02, damping=1e-2, inverse_dtype=torch.float32, stats_every=2, inverse_every=2)
    assert not any(getattr(b, "omega_diagonal", False) for b in opt.blocks.values())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    losses = _steps(model, opt, x, y)
    assert all(torch.isfinite(torch.tensor(losses))), losses
