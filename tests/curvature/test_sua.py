"""The spatially-uncorrelated-activations Omega (Theorem 4) against its definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfcrun.curvature import KFCCurvature
from kfcrun.curvature.kron_math import conv_omega, conv_omega_sua, conv_padding
from tests.helpers.oracles import assert_close, conv_geometry


def sua_by_definition(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Theorem 4 entry by entry: beta counted by looping over output positions."""
    _, channels, height, width = x.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    geo = conv_geometry(conv, height, width)
    pt, pl = geo["pad_before"]
    out_h, out_w = geo["out"]
    pixels = x.transpose(0, 1).reshape(channels, -1)
    mean = pixels.mean(1)
    cov = pixels @ pixels.T / pixels.shape[1] - torch.outer(mean, mean)
    offsets = [(p, q) for p in range(kh) for q in range(kw)]

    def inside(t: tuple[int, int], off: tuple[int, int]) -> bool:
        ih, iw = t[0] * sh - pt + off[0], t[1] * sw - pl + off[1]
        return 0 <= ih < height and 0 <= iw < width

    positions = [(a, b) for a in range(out_h) for b in range(out_w)]
    k = channels * len(offsets)
    omega = torch.zeros(k + 1, k + 1, dtype=x.dtype)
    omega[0, 0] = len(positions)
    for j in range(channels):
        for di, d in enumerate(offsets):
            row = j * len(offsets) + di + 1
            omega[row, 0] = omega[0, row] = mean[j] * sum(inside(t, d) for t in positions)
            for j2 in range(channels):
                for di2, d2 in enumerate(offsets):
                    beta = sum(inside(t, d) and inside(t, d2) for t in positions)
                    value = mean[j] * mean[j2] + (cov[j, j2] if di == di2 else 0.0)
                    omega[row, j2 * len(offsets) + di2 + 1] = beta * value
    return omega


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, stride=2), nn.Conv2d(2, 3, 2, padding=1, stride=2)],
    ids=["same", "stride2-valid", "even-kernel-pad1-stride2"],
)
def test_sua_omega_matches_theorem_4(conv):
    x = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.7
    padding = conv_padding(conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    got = conv_omega_sua(x, conv.kernel_size, stride=conv.stride, padding=padding, dilation=conv.dilation)
    assert_close(got, sua_by_definition(x, conv), rtol=1e-10, what="SUA Omega")


def test_sua_and_kfc_agree_when_activations_are_spatially_white():
    """With i.i.d. pixels SUA holds, so KFC's Omega estimate converges to the SUA one."""
    g = torch.Generator().manual_seed(1)
    mixing = torch.tensor([[1.0, 0.6], [0.0, 0.8]], dtype=torch.float64)
    x = (
        torch.einsum("bjhw,jk->bkhw", torch.randn(4000, 2, 6, 6, generator=g, dtype=torch.float64), mixing)
        + 0.5
    )
    padding = conv_padding(3, 1, 1, 1)
    kfc = conv_omega(x, 3, padding=padding)
    sua = conv_omega_sua(x, 3, padding=padding)
    assert (kfc - sua).abs().max() < 0.05 * sua.abs().max()


def test_sua_differs_from_kfc_on_smooth_images():
    """Spatially correlated inputs (the paper's point about 1/f^2 images): SUA loses that."""
    g = torch.Generator().manual_seed(2)
    smooth = torch.nn.functional.avg_pool2d(
        torch.randn(200, 1, 10, 10, generator=g, dtype=torch.float64), 3, 1, 1
    )
    padding = conv_padding(3, 1, 1, 1)
    kfc, sua = conv_omega(smooth, 3, padding=padding), conv_omega_sua(smooth, 3, padding=padding)
    assert (kfc - sua).abs().max() > 0.3 * sua[1:, 1:].diagonal().max()


def test_curvature_uses_sua_for_conv_layers_only():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double()
    x = torch.randn(5, 2, 4, 4, dtype=torch.float64)
    sua = KFCCurvature(model, omega_model="sua")
    kfc = KFCCurvature(model, omega_model="kfc")
    for curvature in (sua, kfc):
        curvature.update_statistics(x, generator=torch.Generator().manual_seed(0), init=True)
    padding = conv_padding(3, 1, 1, 1)
    assert_close(sua.blocks["0"].omega, conv_omega_sua(x, 3, padding=padding), what="conv Omega (SUA)")
    assert_close(sua.blocks["2"].omega, kfc.blocks["2"].omega, what="Linear Omega is K-FAC's either way")
    assert_close(sua.blocks["0"].gamma, kfc.blocks["0"].gamma, what="Gamma does not depend on approx")
