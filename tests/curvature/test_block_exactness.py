"""Every block type against the exact Fisher block from Jacobians, where its assumptions make it exact.

The Fisher of the per-example NLL averaged over examples is ``F = (1/M) sum_n J_n^T H_n J_n``.
With a unit-variance Gaussian on every output entry (``H = I``) and the exact expectation
over targets (one backward pass per output entry), KFC's assumptions hold exactly when:

* the layer is the last one (its ``DS`` is white noise, independent of the inputs and of
  the other positions): then ``Omega ⊗ Gamma`` is the whole Fisher block for a conv of any
  padding mode, stride, dilation and groups (block-diagonal over groups, the cross-group
  entries of the exact Fisher being zero), a Conv1d, a Linear on tokens, a shared layer
  (uses pooled as positions) and an Embedding (one-hot inputs: Omega diagonal);
* a normalization layer's output carries the likelihood directly: the per-unit
  ``2 x 2`` blocks are the whole Fisher block (the cross-unit entries are zero), whatever
  comes before the layer (BatchNorm in train or eval mode, GroupNorm, LayerNorm, RMSNorm).

The comparison is of full matrices: our block-diagonal assembly vs the exact
``(1/M) sum_n J_n^T J_n``, so wrong off-block entries fail too. The layout's vec is
column-stacking of each ``gamma_dim x omega_dim`` Kronecker block (row-major for norm
blocks); gradients go through ``block.split`` to reach the parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from kfcrun.curvature import (
    CurvatureBlock,
    Gaussian,
    KroneckerBlock,
    NormBlock,
    batch_factors_for_loss,
    kfc_layers,
    make_block,
)
from kfcrun.curvature.factors import block_estimates
from tests.helpers.oracles import assert_close

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

GAUSS = Gaussian()


def approx_matrix(block: CurvatureBlock, estimate: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Our Fisher block as an explicit matrix in the layout's vec order."""
    if isinstance(block, NormBlock):
        (fisher,) = estimate
        return torch.block_diag(*fisher)
    omega, gamma = estimate
    if block.omega_diagonal:
        omega = torch.diag_embed(omega)
    if block.gamma_diagonal:
        gamma = torch.diag_embed(gamma)
    if omega.dim() == 2:
        return torch.kron(omega, gamma)
    return torch.block_diag(*[torch.kron(o, g) for o, g in zip(omega, gamma, strict=True)])


def layout_jacobian(
    block: CurvatureBlock, out_of_layout: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``d out / d vec(layout)``, ``(outputs, params)``: column-stacking per Kronecker block."""
    weight = block.module.weight.detach() if block.covers_weight else None
    bias = block.module.bias.detach() if block.covers_bias else None
    layout = block.combine(weight, bias)
    jac = torch.func.jacrev(out_of_layout)(layout)  # (*out, *layout)
    jac = jac.reshape(-1, *layout.shape)
    if isinstance(block, KroneckerBlock):
        jac = jac.transpose(-1, -2)
    return jac.reshape(jac.shape[0], -1)


def exact_fisher(model: nn.Module, name: str, block: CurvatureBlock, x: torch.Tensor) -> torch.Tensor:
    """``(1/M) sum_n J_n^T J_n`` (Gaussian, H = I) w.r.t. the block's layout (whole-batch forward)."""
    params = dict(model.named_parameters())
    total = None
    for n in range(x.shape[0]):

        def out_n(layout: torch.Tensor, n: int = n) -> torch.Tensor:
            w, b = block.split(layout)
            replaced = dict(params)
            if w is not None:
                replaced[f"{name}.weight"] = w
            if b is not None:
                replaced[f"{name}.bias"] = b
            buffers = {k: v.clone() for k, v in model.named_buffers()}  # BatchNorm updates copies
            return torch.func.functional_call(model, (replaced, buffers), (x,))[n]

        jac = layout_jacobian(block, out_n)
        total = jac.T @ jac if total is None else total + jac.T @ jac
    assert total is not None
    return total / x.shape[0]


def check_block(model: nn.Module, x: torch.Tensor, name: str, *, atol: float = 1e-11, **block_kwargs) -> None:
    module = model.get_submodule(name)
    block = make_block(name, module, **block_kwargs)
    estimate = block_estimates(model, x, GAUSS.expected_losses, {name: block})[name]
    ours = approx_matrix(block, estimate)
    exact = exact_fisher(model, name, block, x)
    assert_close(ours, exact, atol=atol, what=f"{name}: block vs exact Fisher")


def _init(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    return model.double()


# -- convolutions ---------------------------------------------------------------------------------
CONVS = {
    "grouped_k3_p1": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise_mult2_s2": lambda: nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3, bias=False),
    "depthwise_k2_same": lambda: nn.Conv2d(2, 2, 2, padding="same", groups=2),
    "reflect_k3x2": lambda: nn.Conv2d(2, 3, (3, 2), padding=(1, 1), padding_mode="reflect"),
    "replicate_dil2": lambda: nn.Conv2d(2, 2, 3, padding=2, dilation=2, padding_mode="replicate"),
    "circular_same_even": lambda: nn.Conv2d(2, 2, 4, padding="same", padding_mode="circular", bias=False),
    "circular_grouped_s2": lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular", groups=4),
    "conv1d_k3_p1": lambda: nn.Conv1d(2, 3, 3, padding=1),
    "conv1d_reflect_grouped": lambda: nn.Conv1d(4, 2, 3, padding=1, padding_mode="reflect", groups=2),
    "conv1d_s2_dil2_nobias": lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, bias=False),
}


@pytest.mark.parametrize("case", list(CONVS))
def test_last_conv_block_is_the_exact_fisher_block(case: str) -> None:
    conv = CONVS[case]()
    model = _init(nn.Sequential(conv), 0)
    shape = (3, conv.in_channels, 5, 5) if isinstance(conv, nn.Conv2d) else (3, conv.in_channels, 7)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    check_block(model, x, "0")


def test_conv_patches_reproduce_the_layer_output_for_every_padding_mode_and_groups() -> None:
    """``[[A]]_H`` as the block builds it, times ``W_bar`` per group, is the layer's own output."""
    from kfcrun.curvature import kron_math

    for case, make in CONVS.items():
        conv = _init(nn.Sequential(make()), 2)[0]
        block = make_block("c", conv)
        shape = (2, conv.in_channels, 6, 5) if isinstance(conv, nn.Conv2d) else (2, conv.in_channels, 8)
        x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        patches = kron_math.expand_patches(
            block._image(x),
            block.kernel_size,
            stride=block.stride,
            padding=block.padding,
            dilation=block.dilation,
        )  # (M, J|Δ|, |T|)
        g = conv.groups
        patches = patches.reshape(x.shape[0], g, -1, patches.shape[-1])
        if block.has_bias:
            ones = torch.ones(x.shape[0], g, 1, patches.shape[-1], dtype=x.dtype)
            patches = torch.cat([ones, patches], dim=2)
        wbar = block.combine(conv.weight.detach(), None if conv.bias is None else conv.bias.detach())
        wbar = wbar.reshape(g, block.gamma_dim, block.omega_dim)
        out = torch.einsum("gok,mgkt->mgot", wbar, patches).reshape(x.shape[0], conv.out_channels, -1)
        assert_close(out, conv(x).detach().reshape(out.shape), atol=1e-12, what=f"{case}: patches x W_bar")


def test_grouped_block_drops_cross_group_entries_once_groups_mix_downstream() -> None:
    """Exact for the last layer (above); once a later layer mixes the groups, blocks per group drop terms."""
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    model = _init(nn.Sequential(conv, nn.Tanh(), nn.Conv2d(4, 2, 1)), 4)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    block = make_block("0", conv)
    exact = exact_fisher(model, "0", block, x)  # Gaussian on the second conv's output
    per_group = block.gamma_dim * block.omega_dim
    off = exact[:per_group, per_group:]
    # Not zero in general once layers follow (the groups mix downstream): this documents the approximation.
    assert torch.count_nonzero(off) > 0
    estimate = block_estimates(model, x, GAUSS.expected_losses, {"0": block})["0"]
    assert estimate[0].shape == (2, 19, 19) and estimate[1].shape == (2, 2, 2)


# -- Linear on tokens, Embedding, shared layers, size cap -----------------------------------------
class TwoUses(nn.Module):
    """One Linear applied to both halves of the input; outputs concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.lin(x[:, :3]), self.lin(x[:, 3:])], dim=1)


class SharedConv(nn.Module):
    """One conv applied twice in a row (weights tied across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.conv(x), self.conv(x.flip(-1))], dim=1)


class SharedNorm(nn.Module):
    """One LayerNorm on two token streams."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.norm(x), self.norm(2 * x + 1)], dim=1)


@pytest.mark.parametrize(
    ("case", "make", "x_shape", "name", "kwargs"),
    [
        ("linear_tokens", lambda: nn.Sequential(nn.Linear(3, 2)), (3, 4, 3), "0", {}),
        ("linear_shared", TwoUses, (4, 6), "lin", {}),
        ("conv_shared", SharedConv, (2, 2, 4, 4), "conv", {}),
        ("linear_gamma_capped", lambda: nn.Sequential(nn.Linear(3, 5)), (4, 3), "0", {"max_factor_dim": 4}),
    ],
)
def test_kronecker_blocks_are_exact_for_the_last_layer(case, make, x_shape, name, kwargs) -> None:
    model = _init(make(), 6)
    x = torch.randn(*x_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    check_block(model, x, name, **kwargs)
    if case == "linear_gamma_capped":
        block = make_block(name, model.get_submodule(name), **kwargs)
        assert block.gamma_diagonal and not block.omega_diagonal


def test_embedding_block_is_exact_with_repeated_tokens_and_padding_idx() -> None:
    model = _init(nn.Sequential(nn.Embedding(6, 3, padding_idx=0)), 8)
    tokens = torch.tensor([[1, 2, 2, 0], [5, 5, 5, 3], [0, 4, 1, 1]])
    block = make_block("0", model[0])
    estimate = block_estimates(model, tokens, GAUSS.expected_losses, {"0": block})["0"]
    counts = torch.tensor([0, 3, 2, 1, 1, 3], dtype=torch.float64) / 3  # padding_idx 0 not counted
    assert_close(estimate[0], counts, atol=1e-15, what="Omega = diag(token counts) / M")
    # The exact Fisher w.r.t. W^T, with the padding row frozen as PyTorch freezes its gradient.
    params = dict(model.named_parameters())
    total = torch.zeros(18, 18, dtype=torch.float64)
    for n in range(3):

        def out_n(layout: torch.Tensor, n: int = n) -> torch.Tensor:
            w, _ = block.split(layout)
            return torch.func.functional_call(model, {**params, "0.weight": w}, (tokens,))[n]

        jac = layout_jacobian(block, out_n)
        jac[:, 0:3] = 0  # column 0 of W^T (the padding embedding) gets no gradient
        total += jac.T @ jac
    assert_close(approx_matrix(block, estimate), total / 3, atol=1e-12, what="embedding block")


# -- normalization layers -------------------------------------------------------------------------
def _bn_eval() -> nn.Module:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
        bn.running_var.uniform_(0.5, 2, generator=torch.Generator().manual_seed(1))
    return bn.eval()


def _frozen_scale() -> nn.Module:
    bn = nn.BatchNorm2d(3)
    bn.weight.requires_grad_(False)
    return bn


def _ln_nobias() -> nn.Module:
    return nn.LayerNorm(4, bias=False)


NORMS = {
    "batchnorm2d_train": (lambda: nn.BatchNorm2d(3), (4, 3, 3, 3)),
    "batchnorm2d_eval": (_bn_eval, (4, 3, 3, 3)),
    "batchnorm1d_train": (lambda: nn.BatchNorm1d(3), (5, 3)),
    "batchnorm_no_running_stats": (lambda: nn.BatchNorm2d(3, track_running_stats=False).eval(), (4, 3, 2, 2)),
    "batchnorm_shift_only": (_frozen_scale, (4, 3, 2, 2)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (3, 4, 3, 2)),
    "layernorm_tokens": (lambda: nn.LayerNorm(4), (3, 5, 4)),
    "layernorm_2d_shape": (lambda: nn.LayerNorm((2, 3)), (3, 4, 2, 3)),
    "layernorm_no_bias": (_ln_nobias, (3, 2, 4)),
    "rmsnorm": (lambda: nn.RMSNorm(4), (3, 5, 4)),
}


@pytest.mark.parametrize("case", list(NORMS))
def test_norm_block_is_exact_when_the_likelihood_follows_the_layer(case: str) -> None:
    make, shape = NORMS[case]
    norm = make()
    training = norm.training
    model = _init(nn.Sequential(norm), 9)
    model.train(training)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10)) * 2 + 0.5
    check_block(model, x, "0")


def test_norm_block_after_a_layer_and_zero_scale() -> None:
    """A linear layer before the LayerNorm, and gamma = 0 (x_hat is never recovered by dividing by gamma)."""
    model = _init(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)), 11)
    with torch.no_grad():
        model[1].weight[1] = 0.0
    x = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    check_block(model, x, "1")


def test_shared_norm_sums_the_uses_before_squaring() -> None:
    model = _init(SharedNorm(), 13)
    x = torch.randn(3, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    check_block(model, x, "norm")


def test_normalized_input_matches_the_layer() -> None:
    """``gamma x_hat + beta`` from the block's x_hat is the layer's output, for every norm type and mode."""
    for case, (make, shape) in NORMS.items():
        norm = make()
        training = norm.training
        _init(nn.Sequential(norm), 15)
        norm.train(training)
        x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(16))
        block = make_block("n", norm)
        assert isinstance(block, NormBlock)
        x_hat = block.normalized(x)
        scale = norm.weight.detach()
        bias = getattr(norm, "bias", None)
        shift = bias.detach() if bias is not None else torch.zeros_like(scale)
        if block.channel_first:
            view = (1, -1) + (1,) * (x.dim() - 2)
            expected = x_hat * scale.reshape(view) + shift.reshape(view)
        else:
            expected = x_hat * scale + shift
        with torch.no_grad():
            out = norm(x)
        assert_close(out, expected, atol=1e-12, what=f"{case}: gamma x_hat + beta")


def test_batch_factors_report_every_block_type() -> None:
    model = nn.Sequential(
        nn.Embedding(7, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.Flatten(), nn.Linear(6, 2)
    ).double()
    tokens = torch.tensor([[1, 2], [3, 6], [0, 0]])
    factors = batch_factors_for_loss(model, tokens, GAUSS.expected_losses)
    kinds = {name: make_block(name, m).kind for name, m in kfc_layers(model).items()}
    assert kinds == {"0": "embedding", "1": "norm", "2": "linear", "4": "linear"}
    assert factors["0"][0].shape == (7,) and factors["0"][1].shape == (4, 4)
    assert factors["1"][0].shape == (4, 2, 2)


# -- the blocks' curvature scale (K-FAC's damping ceiling) --------------------------------------------
MEAN_EIGENVALUE_CASES = {
    "conv": (lambda: nn.Conv2d(2, 3, 3), {}),
    "grouped_conv": (lambda: nn.Conv2d(4, 6, 3, groups=2), {}),
    "linear_gamma_diagonal": (lambda: nn.Linear(3, 5), {"max_factor_dim": 4}),
    "embedding": (lambda: nn.Embedding(6, 3), {}),
    "batch_norm": (lambda: nn.BatchNorm2d(3), {}),
    "layer_norm_scale_only": (lambda: nn.LayerNorm(4, bias=False), {}),
}


@pytest.mark.parametrize("case", list(MEAN_EIGENVALUE_CASES))
def test_mean_eigenvalue_is_the_trace_of_the_explicit_block_over_its_size(case: str) -> None:
    make, kwargs = MEAN_EIGENVALUE_CASES[case]
    torch.manual_seed(3)
    block = make_block("layer", make().double(), **kwargs)
    assert block.mean_eigenvalue() is None, "no statistics yet"

    def random_psd(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if getattr(block, f"{name}_diagonal", False):
            return torch.rand(shape, dtype=torch.float64) + 0.1  # a diagonal factor's entries
        root = torch.randn(*shape, dtype=torch.float64)
        return root @ root.transpose(-1, -2)

    factors = tuple(random_psd(name, shape) for name, shape in block.factor_shapes().items())
    block._set_factors(factors)
    explicit = approx_matrix(block, factors)
    value = block.mean_eigenvalue()
    assert value is not None
    assert value.item() == pytest.approx((explicit.trace() / explicit.shape[0]).item(), rel=1e-12)
    assert value.item() == pytest.approx(torch.linalg.eigvalsh(explicit).mean().item(), rel=1e-10)
