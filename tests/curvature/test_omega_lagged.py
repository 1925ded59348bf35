"""Row-lag ``Omega_hat`` (no patch expansion) against the definition and the patch GEMM, float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfcrun.curvature import kron_math
from kfcrun.curvature.blocks import make_block
from kfcrun.curvature.omega_lagged import conv_omega_lagged, lagged_applies, lagged_preferred
from tests.helpers.oracles import assert_close

# (M, J, H, W, (kh, kw), padding ((pt, pb), (pl, pr)) or "same", dilation)
CASES = [
    (3, 2, 8, 8, (3, 3), "same", 1),
    (2, 3, 7, 9, (5, 5), "same", 1),
    (2, 2, 6, 5, (4, 4), "same", 1),  # even kernel: one more row/column of padding after
    (2, 2, 9, 7, (2, 3), "same", 1),  # wider than tall: lagged along the width
    (2, 3, 10, 8, (3, 3), "same", 2),
    (2, 2, 11, 9, (4, 3), "same", 2),
    (2, 2, 8, 8, (3, 3), ((0, 0), (0, 0)), 1),  # valid
    (2, 2, 9, 8, (3, 5), ((2, 0), (1, 3)), 1),  # asymmetric, wider than tall
    (2, 2, 9, 10, (3, 3), ((0, 3), (4, 0)), 2),  # asymmetric, dilated, padding beyond the kernel
    (2, 2, 4, 4, (3, 3), "same", 1),
    (2, 2, 3, 5, (5, 5), "same", 1),  # kernel larger than the image
    (2, 2, 5, 5, (5, 5), ((4, 4), (4, 4)), 1),  # "full" padding
    (1, 1, 1, 1, (3, 3), "same", 1),  # one pixel
    (2, 2, 12, 3, (3, 1), ((1, 1), (0, 0)), 3),  # 3x1, dilated
    (2, 2, 1, 11, (1, 4), ((0, 0), (2, 1)), 2),  # a Conv1d as a height-1 Conv2d
]


def _padding(case: tuple) -> tuple[tuple[int, int], tuple[int, int]]:
    _, _, _, _, kernel, pad, dil = case
    return kron_math.conv_padding(kernel, 1, "same", dil) if pad == "same" else pad


def _definition(x: torch.Tensor, kernel, padding, dilation, homogeneous: bool) -> torch.Tensor:
    """``(1/M) [[A]]_H^T [[A]]_H`` with ``[[A]]`` from ``F.unfold`` (Eqn 14) and an explicit ones column."""
    (pt, pb), (pl, pr) = padding
    patches = nn.functional.unfold(nn.functional.pad(x, (pl, pr, pt, pb)), kernel, dilation=dilation)
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    if homogeneous:
        rows = torch.cat([torch.ones(rows.shape[0], 1, dtype=rows.dtype), rows], dim=1)
    return rows.T @ rows / x.shape[0]


@pytest.mark.parametrize("homogeneous", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[f"c{i}" for i in range(len(CASES))])
def test_lagged_omega_is_the_definition_and_the_patch_gemm(case: tuple, homogeneous: bool) -> None:
    m, j, h, w, kernel, _, dil = case
    padding = _padding(case)
    g = torch.Generator().manual_seed(len(CASES) * h + w)
    x = torch.randn(m, j, h, w, generator=g, dtype=torch.float64) + 0.3
    got = conv_omega_lagged(x, kernel, padding=padding, dilation=dil, homogeneous=homogeneous)
    oracle = _definition(x, kernel, padding, dil, homogeneous)
    gemm = kron_math.conv_omega(x, kernel, padding=padding, dilation=dil, homogeneous=homogeneous)
    scale = oracle.abs().max().item()
    assert_close(got, oracle, atol=1e-12 * scale, what="lagged Omega vs (1/M) [[A]]_H^T [[A]]_H")
    assert_close(got, gemm, atol=1e-12 * scale, what="lagged Omega vs the patch GEMM")
    assert torch.equal(got, got.T), "the lagged Omega must be exactly symmetric"


@pytest.mark.parametrize("chunk_size", [1, 2, 5])
def test_lagged_omega_chunks_exactly(chunk_size: int) -> None:
    x = torch.randn(5, 3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    padding = kron_math.conv_padding(3, 1, "same", 1)
    whole = conv_omega_lagged(x, 3, padding=padding, chunk_size=5)
    got = conv_omega_lagged(x, 3, padding=padding, chunk_size=chunk_size)
    assert_close(got, whole, atol=1e-13, what=f"chunk_size={chunk_size}")


def test_lagged_float32_is_at_least_as_accurate_as_the_gemm() -> None:
    """Shorter sums (one image row each): float32 error vs float64 no worse than the patch GEMM's."""
    x = torch.randn(64, 8, 16, 16, generator=torch.Generator().manual_seed(4)).relu()
    padding = kron_math.conv_padding(5, 1, "same", 1)
    exact = kron_math.conv_omega(x.double(), 5, padding=padding)
    err_lag = (conv_omega_lagged(x, 5, padding=padding).double() - exact).norm() / exact.norm()
    err_gemm = (kron_math.conv_omega(x, 5, padding=padding).double() - exact).norm() / exact.norm()
    assert err_lag < 1e-6
    assert err_lag <= 1.5 * err_gemm, (err_lag.item(), err_gemm.item())


def test_auto_rule_skips_thin_inputs() -> None:
    """``auto`` keeps the patch GEMM where J*k < MIN_LAG_ROWS (measured slower at 2 threads)."""
    assert not lagged_preferred(3, 5), "cuda-convnet conv1: 15 rows"
    assert lagged_preferred(32, 5) and lagged_preferred(4, (1, 4)) and lagged_preferred(64, 3)


def test_applicability_rule() -> None:
    assert lagged_applies(3, 1)
    assert lagged_applies((1, 5), 1)
    assert not lagged_applies(3, 2), "strided convs stay on the patch GEMM"
    assert not lagged_applies(1, 1), "a 1x1 kernel has nothing to share"
    assert not lagged_applies(3, 1, groups=2)
    assert not lagged_applies(3, 1, diagonal=True)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 5, padding=2),
        nn.Conv2d(6, 4, 3, padding=1, bias=False),
        nn.Conv2d(8, 4, (2, 3), padding="same", dilation=2),
        nn.Conv2d(3, 4, 3, stride=2, padding=1),  # falls back to the patch GEMM
        nn.Conv2d(4, 4, 3, padding=1, groups=2),  # falls back to the patch GEMM
        nn.Conv2d(8, 4, 3, padding=1, padding_mode="reflect"),  # pre-padded input, valid lags
        nn.Conv1d(4, 4, 5, padding=2),
    ],
    ids=["5x5", "nobias", "even-dilated", "strided", "grouped", "reflect", "conv1d"],
)
def test_conv_block_methods_agree(conv: nn.Module) -> None:
    """A conv block gives the same Omega with ``omega_method`` auto / patch / lagged (where it applies)."""
    conv = conv.double()
    shape = (4, conv.in_channels, 9) if isinstance(conv, nn.Conv1d) else (4, conv.in_channels, 9, 8)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    block = make_block("c", conv)
    block.omega_method = "patch"
    patch = block.batch_omega(x)
    block.omega_method = "auto"
    auto = block.batch_omega(x)
    assert_close(auto, patch, atol=1e-12 * patch.abs().max().item(), what="auto vs patch")
    lagged = block.uses_lagged_omega()
    applies = conv.stride[0] == 1 and conv.groups == 1
    assert lagged == (applies and conv.in_channels * max(conv.kernel_size) >= 16)
    block.omega_method = "lagged"
    if applies:
        assert_close(block.batch_omega(x), patch, atol=1e-12 * patch.abs().max().item(), what="lagged")
    else:
        with pytest.raises(ValueError, match="omega_method"):
            block.batch_omega(x)


def test_curvature_takes_omega_method_per_layer() -> None:
    from kfcrun.curvature import KFCCurvature

    model = nn.Sequential(nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2))
    curvature = KFCCurvature(model, omega_method={"0": "patch"})
    assert curvature.blocks["0"].omega_method == "patch" and curvature.blocks["2"].omega_method == "auto"
    assert not curvature.blocks["0"].uses_lagged_omega() and not curvature.blocks["2"].uses_lagged_omega()
    assert KFCCurvature(model).blocks["0"].uses_lagged_omega()
    with pytest.raises(ValueError, match="omega_method='lagged' needs"):
        KFCCurvature(model, omega_method="lagged")
    with pytest.raises(ValueError, match="no curvature block"):
        KFCCurvature(model, omega_method={"9": "patch"})
