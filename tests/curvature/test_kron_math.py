"""Pure math: chunked patch moments, pi, damping, Kronecker solves, robust inversion."""

from __future__ import annotations

import math

import pytest
import torch

from kfcrun.curvature import kron_math
from tests.helpers.oracles import assert_close, unvec, vec


def _spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or 2 * n, generator=g, dtype=torch.float64)
    return a @ a.T / a.shape[1]


@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("homogeneous", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_omega_equals_unchunked(chunk_size: int, homogeneous: bool, pad: int) -> None:
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    padding = kron_math.conv_padding(3, 2, pad, 1)
    kwargs = dict(stride=2, padding=padding, dilation=1, homogeneous=homogeneous)
    whole = kron_math.conv_omega(x, 3, chunk_size=5, **kwargs)
    got = kron_math.conv_omega(x, 3, chunk_size=chunk_size, **kwargs)
    assert_close(got, whole, atol=1e-13, what=f"chunk_size={chunk_size}")
    # The default (budget-based) chunking agrees too.
    assert_close(kron_math.conv_omega(x, 3, **kwargs), whole, atol=1e-13, what="default chunking")


def test_omega_is_exactly_the_unfold_moment() -> None:
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    omega = kron_math.conv_omega(x, 3, padding=((1, 1), (1, 1)))
    u = torch.nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    u_h = torch.cat([torch.ones(u.shape[0], 1, dtype=torch.float64), u], dim=1)
    assert_close(omega, u_h.T @ u_h / 4, atol=1e-13, what="Omega vs (1/M) [[A]]_H^T [[A]]_H")


def test_conv_padding_same_matches_pytorch_convention() -> None:
    assert kron_math.conv_padding(3, 1, "same", 1) == ((1, 1), (1, 1))
    assert kron_math.conv_padding((2, 4), 1, "same", (1, 1)) == ((0, 1), (1, 2))
    assert kron_math.conv_padding(3, 1, "same", 2) == ((2, 2), (2, 2))
    assert kron_math.conv_padding(5, 2, (2, 1), 1) == ((2, 2), (1, 1))
    assert kron_math.conv_padding(3, 1, "valid", 1) == ((0, 0), (0, 0))
    with pytest.raises(ValueError, match="stride 1"):
        kron_math.conv_padding(3, 2, "same", 1)


def test_pi_is_the_trace_norm_ratio_and_guarded() -> None:
    omega = torch.diag(torch.tensor([4.0, 2.0, 3.0], dtype=torch.float64))  # tr/dim = 3
    gamma = torch.diag(torch.tensor([0.5, 1.5], dtype=torch.float64))  # tr/dim = 1
    assert kron_math.pi_trace_norm(omega, gamma).item() == pytest.approx(math.sqrt(3.0), rel=1e-15)
    zero = torch.zeros(2, 2, dtype=torch.float64)
    nan = torch.full((2, 2), float("nan"), dtype=torch.float64)
    for a, b in [(omega, zero), (zero, gamma), (zero, zero), (omega, nan), (nan, gamma)]:
        assert kron_math.pi_trace_norm(a, b).item() == 1.0


def test_damped_factors_follow_eqn_28() -> None:
    omega, gamma = _spd(4, 0), _spd(3, 1)
    total = 0.3 + 1e-2
    omega_d, gamma_d, pi = kron_math.damped_factors(omega, gamma, total)
    ref_pi = math.sqrt((omega.trace().item() / 4) / (gamma.trace().item() / 3))
    assert pi.item() == pytest.approx(ref_pi, rel=1e-14)
    assert_close(omega_d, omega + ref_pi * math.sqrt(total) * torch.eye(4, dtype=torch.float64), atol=1e-14)
    assert_close(gamma_d, gamma + math.sqrt(total) / ref_pi * torch.eye(3, dtype=torch.float64), atol=1e-14)
    with pytest.raises(ValueError):
        kron_math.damped_factors(omega, gamma, -1.0)


def test_kron_solves_match_explicit_kronecker_systems() -> None:
    omega, gamma = _spd(5, 2), _spd(3, 3)
    grad = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    total = 0.05
    omega_d, gamma_d, _ = kron_math.damped_factors(omega, gamma, total)
    got = kron_math.kron_solve_pi(grad, torch.linalg.inv(gamma_d), torch.linalg.inv(omega_d))
    ref = unvec(torch.linalg.solve(torch.kron(omega_d, gamma_d), vec(grad)), 3, 5)
    assert_close(got, ref, atol=1e-12, what="pi solve")
    d_o, q_o = kron_math.eigh_psd(omega)
    d_g, q_g = kron_math.eigh_psd(gamma)
    got = kron_math.kron_solve_eigen(grad, q_g, d_g, q_o, d_o, total)
    ref = unvec(
        torch.linalg.solve(torch.kron(omega, gamma) + total * torch.eye(15, dtype=torch.float64), vec(grad)),
        3,
        5,
    )
    assert_close(got, ref, atol=1e-12, what="exact-damping solve (Eqns 42-44)")


def test_eigh_psd_clamps_negative_rounding() -> None:
    mat = torch.diag(torch.tensor([-1e-18, 0.0, 2.0], dtype=torch.float64))
    d, q = kron_math.eigh_psd(mat)
    assert bool((d >= 0).all())
    assert_close(q @ torch.diag(d) @ q.T, mat.clamp(min=0), atol=1e-15)


def test_fast_inverse_flags_failure_without_raising() -> None:
    good = _spd(4, 5)
    inv, ok = kron_math.cholesky_inverse_fast(good)
    assert bool(ok)
    assert_close(inv @ good, torch.eye(4, dtype=torch.float64), atol=1e-12, what="inverse")
    assert_close(inv, inv.T, atol=1e-12, what="symmetric inverse")
    _, ok = kron_math.cholesky_inverse_fast(torch.zeros(4, 4, dtype=torch.float64))
    assert not bool(ok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_fallback_handles_singular_and_refuses_nan(dtype: torch.dtype) -> None:
    singular = _spd(6, 6, rank=2).to(dtype)
    inv, how = kron_math.inverse_fallback(singular)
    assert inv is not None and inv.dtype == dtype and bool(torch.isfinite(inv).all()), how
    assert "jitter" in how or "eigen" in how
    inv, how = kron_math.inverse_fallback(torch.zeros(3, 3, dtype=dtype))
    assert inv is not None and bool(torch.isfinite(inv).all()), how
    bad = singular.clone()
    bad[0, 1] = float("nan")
    inv, how = kron_math.inverse_fallback(bad)
    assert inv is None and "not finite" in how


def test_gamma_from_several_passes_sums_them() -> None:
    g = torch.Generator().manual_seed(8)
    ds1 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    ds2 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    got = kron_math.gamma_from_derivatives([ds1, ds2], channel_dim=1)

    def one(ds: torch.Tensor) -> torch.Tensor:
        rows = ds.permute(0, 2, 3, 1).reshape(-1, 3)
        return rows.T @ rows / rows.shape[0]

    assert_close(got, one(ds1) + one(ds2), atol=1e-14, what="Gamma over two passes")


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation"),
    [(3, 1, ((1, 1), (1, 1)), 1), (2, 2, ((0, 1), (1, 0)), 1), ((2, 3), (1, 2), ((2, 2), (0, 0)), (2, 1))],
)
@pytest.mark.parametrize("channels_last", [False, True])
def test_patch_rows_is_the_transposed_unfold(
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: int | tuple[int, int],
    channels_last: bool,
) -> None:
    x = torch.randn(3, 2, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ref = kron_math.expand_patches(x, kernel, stride=stride, padding=padding, dilation=dilation)
    got = kron_math.patch_rows(x, kernel, stride=stride, padding=padding, dilation=dilation)
    assert torch.equal(got, ref.transpose(0, 1).reshape(ref.shape[1], -1))


def test_omega_is_exactly_symmetric_with_triangular_blocks() -> None:
    x = torch.randn(3, 32, 6, 6, generator=torch.Generator().manual_seed(3))  # J|Δ| = 800: 3 row blocks
    omega = kron_math.conv_omega(x, 5, padding=((2, 2), (2, 2)), chunk_size=2)
    assert torch.equal(omega, omega.T)
    u = torch.nn.functional.unfold(x.double(), 5, padding=2).transpose(1, 2).reshape(-1, 800)
    u_h = torch.cat([torch.ones(u.shape[0], 1, dtype=torch.float64), u], dim=1)
    assert_close(omega.double(), u_h.T @ u_h / 3, atol=1e-3, rtol=1e-5, what="float32 Omega (800 + 1)")
