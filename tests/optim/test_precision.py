"""Mixed precision and compilation (issue 13, item 5): the curvature optimizers under autocast,
a ``GradScaler`` and ``torch.compile``, against the plain float32/float64 path."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.curvature import KFCCurvature, KFCCurvatureWarning
from kfcrun.optim import KFAC, KFCPre
from tests.helpers.optim_nets import batch, flat_params, tiny_net
from tests.helpers.oracles import assert_close

SETTINGS = dict(lr=0.1, damping=0.1, weight_decay=1e-3, stats_every=2, inverse_every=4, clip=0.3, seed=0)


def _losses(model: nn.Module, opt: torch.optim.Optimizer, steps: int, *, explicit: bool) -> torch.Tensor:
    dtype = next(model.parameters()).dtype
    out = []
    for i in range(steps):
        x, y = batch(i, n=8)
        x = x.to(dtype)
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if explicit:
            opt.backward(loss, logits, y)  # type: ignore[attr-defined]
        else:
            loss.backward()
        if isinstance(opt, KFAC):
            opt.step(lambda x=x, y=y: F.cross_entropy(model(x), y), inputs=x)
        else:
            opt.step()
        out.append(loss.detach())
    return torch.stack(out)


BACKENDS = [
    "aot_eager",
    pytest.param(  # generates and compiles C++ kernels: about 25 s cold on 2 cores, so `slow`
        "inductor",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(shutil.which("g++") is None, reason="inductor on CPU needs a C++ compiler"),
        ],
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer", ["kfc_pre", "kfac"])
def test_compiled_model_gives_the_eager_losses(backend: str, optimizer: str) -> None:
    """``torch.compile(model)``: 20 steps give eager's losses (float64); the curvature runs eagerly."""

    def make(model: nn.Module) -> torch.optim.Optimizer:
        if optimizer == "kfac":
            return KFAC(model, damping=0.1, weight_decay=1e-3, stats_every=2, inverse_every=4)
        return KFCPre(model, **SETTINGS)

    torch._dynamo.reset()
    eager_model = tiny_net()
    eager = _losses(eager_model, make(eager_model), 20, explicit=False)
    compiled_model = torch.compile(tiny_net(), backend=backend)
    compiled = _losses(compiled_model, make(compiled_model), 20, explicit=False)
    assert_close(compiled, eager, atol=1e-9, what=f"20 losses, compiled ({backend}) vs eager")
    assert torch.isfinite(eager).all()


def test_stats_from_training_falls_back_on_a_compiled_model() -> None:
    """A compiled forward runs no layer hooks: the option warns once and the separate pass is used."""
    torch._dynamo.reset()
    eager_model = tiny_net()
    plain = _losses(eager_model, KFCPre(eager_model, **SETTINGS), 8, explicit=False)
    model = torch.compile(tiny_net(), backend="aot_eager")
    with pytest.warns(KFCCurvatureWarning, match="torch.compile"):
        opt = KFCPre(model, **SETTINGS, stats_from_training=True)
    assert not opt.stats_from_training
    fused = _losses(model, opt, 8, explicit=True)
    assert_close(fused, plain, atol=1e-9, what="losses, compiled model with stats_from_training")


def test_loss_scale_leaves_the_estimates_unchanged_in_float64() -> None:
    """A scaled sampled backward (GradScaler's ``s``), unscaled before the statistics: the same estimates."""
    model = tiny_net()
    x, _ = batch(0, n=8)
    estimates = []
    for scale in (None, torch.tensor(2.0**12), torch.tensor(3.7)):
        curvature = KFCCurvature(model)
        with curvature.recording() as layer_pass:
            output = model(x)
        generator = torch.Generator().manual_seed(0)
        estimates.append(
            curvature.estimate_from_pass(layer_pass, output, generator=generator, loss_scale=scale)
        )
    for other in estimates[1:]:
        for name, parts in estimates[0].items():
            for a, b in zip(parts, other[name], strict=True):
                assert_close(b, a, atol=1e-12, what=f"{name} estimate with a loss scale")


def _half_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))


def test_float16_scaled_backward_keeps_small_derivatives() -> None:
    """Under float16 autocast, tiny sampled-target derivatives underflow unless the backward is scaled."""
    model = _half_net()
    with torch.no_grad():
        model[3].bias[0] += 18.0  # confident logits: p - onehot ~ 1e-8, below float16's 6e-8
    x, _ = batch(0, n=8)
    x = x.float()

    def gamma(scale: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor:
        curvature = KFCCurvature(model)
        with torch.autocast("cpu", dtype=dtype or torch.float16, enabled=dtype is not None):
            with curvature.recording() as layer_pass:
                output = model(x)
            generator = torch.Generator().manual_seed(0)
            est = curvature.estimate_from_pass(layer_pass, output, generator=generator, loss_scale=scale)
        return est["0"][1].float()  # the conv layer's Gamma

    reference = gamma(None, None)  # float32, no autocast
    assert reference.abs().max() > 0
    unscaled = gamma(None, torch.float16)
    scaled = gamma(torch.tensor(2.0**12), torch.float16)
    scaled_error = (scaled - reference).norm() / reference.norm()
    unscaled_error = (unscaled - reference).norm() / reference.norm()
    assert scaled_error < 0.05, f"scaled float16 Gamma off by {scaled_error:.3g}"
    assert unscaled_error > 0.5, f"unscaled float16 Gamma should underflow, off by only {unscaled_error:.3g}"


@pytest.mark.parametrize("explicit", [False, True], ids=["separate_pass", "training_pass"])
def test_grad_scaler_steps_equal_the_unscaled_steps(explicit: bool) -> None:
    """``scaler.scale(loss)``, ``opt.backward(..., scaler=)``, ``scaler.step(opt)``: KFC-pre preconditions
    the unscaled gradient and the statistics carry no ``s^2`` (float64, power-of-two scale: exact)."""
    plain_model = tiny_net()
    plain = KFCPre(plain_model, **SETTINGS)
    model = tiny_net()
    opt = KFCPre(model, **SETTINGS, stats_from_training=explicit)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for i in range(9):
        x, y = batch(i, n=8)
        plain.zero_grad()
        F.cross_entropy(plain_model(x), y).backward()
        plain.step()
        opt.zero_grad()
        logits = model(x)
        scaled = scaler.scale(F.cross_entropy(logits, y))
        if explicit:
            opt.backward(scaled, logits, y, scaler=scaler)
        else:
            scaled.backward()
        scaler.step(opt)
        scaler.update()
    assert scaler.get_scale() > 2.0**10, "the scale never grew: the test did not exercise a change of scale"
    assert_close(
        flat_params(model), flat_params(plain_model), atol=1e-10, what="parameters with a GradScaler"
    )


def test_bfloat16_autocast_trains_with_float32_factors() -> None:
    """bfloat16 autocast forward/backward: factors stay float32, inverses float64, and 20 steps follow
    the float32 run to bfloat16 accuracy, with statistics from the separate or the training pass."""
    runs = {}
    for name, autocast, explicit in (
        ("fp32", False, False),
        ("bf16", True, False),
        ("bf16_fused", True, True),
    ):
        model = _half_net()
        opt = KFCPre(
            model, lr=0.05, damping=0.1, stats_every=2, inverse_every=4, stats_from_training=explicit
        )
        losses = []
        for i in range(20):
            x, y = batch(i % 4, n=16)
            x = x.float()
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
            if explicit:
                opt.backward(loss, logits, y)
            else:
                loss.backward()
            opt.step()
            losses.append(loss.detach())
        runs[name] = torch.stack(losses)
        for block_name, block in opt.blocks.items():
            for factor in block.factors() or ():
                assert factor.dtype == torch.float32, (name, block_name, factor.dtype)
                assert torch.isfinite(factor).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("bf16", "bf16_fused"):
            gap = (runs[name] - runs["fp32"]).abs().max() / runs["fp32"].abs().max()
            assert gap < 0.05, f"{name}: losses differ from float32 by {gap:.3g} (relative)"
    assert runs["fp32"][-4:].mean() < runs["fp32"][:4].mean(), "the float32 run made no progress"
