"""The correlation math of the assumption study against brute-force loops and known structures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kfcrun.studies.correlations import (
    CorrelationAccumulator,
    autocorrelation,
    cross_map_correlation,
    mean_abs_cross_map,
    mean_abs_offcentre,
    offset_slices,
)


def brute_autocorrelation(x: torch.Tensor, c: int, d1: int, d2: int) -> float:
    """rho_c(d) by explicit loops: pairs (t, t+d) with BOTH positions inside the map."""
    n_ex, _, h, w = x.shape
    s = p = q = 0.0
    pairs = 0
    for n in range(n_ex):
        for t1 in range(h):
            for t2 in range(w):
                u1, u2 = t1 + d1, t2 + d2
                if 0 <= u1 < h and 0 <= u2 < w:
                    a, b = float(x[n, c, t1, t2]), float(x[n, c, u1, u2])
                    s, p, q, pairs = s + a * b, p + a * a, q + b * b, pairs + 1
    if pairs == 0 or p * q == 0:
        return math.nan
    return s / math.sqrt(p * q)


def brute_cross_map(x: torch.Tensor, pos: tuple[int, int]) -> torch.Tensor:
    n_ex, c_maps = x.shape[:2]
    out = torch.empty(c_maps, c_maps, dtype=torch.float64)
    for c in range(c_maps):
        for k in range(c_maps):
            a = [float(x[n, c, pos[0], pos[1]]) for n in range(n_ex)]
            b = [float(x[n, k, pos[0], pos[1]]) for n in range(n_ex)]
            s = sum(u * v for u, v in zip(a, b, strict=True))
            pc, pk = sum(u * u for u in a), sum(v * v for v in b)
            out[c, k] = s / math.sqrt(pc * pk)
    return out


def _report(got: torch.Tensor, want: torch.Tensor, tol: float) -> str:
    bad = ((got - want).abs() > tol) & ~(got.isnan() & want.isnan())
    idx = bad.nonzero().tolist()[:5]
    examples = [(i, float(got[tuple(i)]), float(want[tuple(i)])) for i in idx]
    return f"{int(bad.sum())} entries differ (index, got, want), e.g. {examples}"


def test_offset_slices_pair_every_in_image_position_once():
    for size in (1, 4, 5):
        for d in range(-size - 1, size + 2):
            got = offset_slices(size, d)
            want = [(t, t + d) for t in range(size) if 0 <= t + d < size]
            if not want:
                assert got is None, (size, d)
                continue
            head, tail = got
            assert list(zip(range(size)[head], range(size)[tail], strict=True)) == want, (size, d)


def test_autocorrelation_matches_brute_force_including_borders():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 5, 4) + 0.3  # non-zero mean: uncentered moments must be used as they are
    k = 4  # offsets of +-4 leave no pair along the width-4 axis: NaN
    rho = autocorrelation(x, k)
    assert rho.shape == (2, 2 * k + 1, 2 * k + 1) and rho.dtype == torch.float64
    want = torch.tensor(
        [
            [[brute_autocorrelation(x, c, d1, d2) for d2 in range(-k, k + 1)] for d1 in range(-k, k + 1)]
            for c in range(2)
        ],
        dtype=torch.float64,
    )
    assert torch.equal(rho.isnan(), want.isnan()), "undefined offsets differ"
    assert rho[:, :, 0].isnan().all() and rho[:, :, -1].isnan().all()  # d2 = -4, +4 on a width of 4
    assert torch.allclose(rho.nan_to_num(), want.nan_to_num(), atol=1e-10), _report(rho, want, 1e-10)
    assert torch.allclose(rho[:, k, k], torch.ones(2, dtype=torch.float64))  # rho(0) = 1
    sym = rho.flip(1, 2)  # rho(-d) == rho(d)
    assert torch.allclose(rho.nan_to_num(), sym.nan_to_num(), atol=1e-12)


@pytest.mark.parametrize("pos", [None, (0, 3)])
def test_cross_map_matches_brute_force(pos):
    torch.manual_seed(2)
    x = torch.randn(6, 3, 5, 4)
    got = cross_map_correlation(x, pos)
    want = brute_cross_map(x, pos or (5 // 2, 4 // 2))
    assert torch.allclose(got, want, atol=1e-10), _report(got, want, 1e-10)


def test_accumulator_is_batch_invariant():
    torch.manual_seed(3)
    x = torch.randn(10, 3, 6, 6)
    whole = CorrelationAccumulator(2)
    whole.update(x)
    parts = CorrelationAccumulator(2)
    for chunk in x.split(3):
        parts.update(chunk)
    assert parts.count == whole.count == 10
    assert torch.allclose(parts.autocorrelation(), whole.autocorrelation(), atol=1e-12)
    assert torch.allclose(parts.cross_map(), whole.cross_map(), atol=1e-12)
    with pytest.raises(ValueError, match="differs"):
        parts.update(torch.randn(2, 3, 5, 6))


def test_white_noise_has_no_spatial_correlation():
    torch.manual_seed(4)
    x = torch.randn(200, 3, 16, 16)
    rho = autocorrelation(x, 4)
    # one offset averages ~50,000 products: MC standard error ~ 0.005
    assert mean_abs_offcentre(rho) < 0.01
    off = rho.clone()
    off[:, 4, 4] = 0.0
    assert float(off.abs().max()) < 0.03
    assert mean_abs_cross_map(cross_map_correlation(x)) < 0.15  # 200 examples: error ~ 0.07


def test_smoothed_field_has_the_box_filter_autocorrelation():
    """A 3x3 box average of white noise: rho(d) = overlap of two boxes / 9."""
    torch.manual_seed(5)
    noise = torch.randn(100, 2, 18, 18)
    x = F.avg_pool2d(noise, 3, stride=1)  # (100, 2, 16, 16), stationary, no padding
    rho = autocorrelation(x, 3)
    k = 3
    for (d1, d2), want in {(0, 1): 6 / 9, (1, 0): 6 / 9, (1, 1): 4 / 9, (0, 2): 3 / 9, (2, 2): 1 / 9}.items():
        got = rho[:, k + d1, k + d2]
        assert torch.allclose(got, torch.full_like(got, want), atol=0.03), ((d1, d2), got.tolist(), want)
    assert rho[:, k + 3, k].abs().max() < 0.03  # boxes no longer overlap
    assert mean_abs_offcentre(rho, radius=1) > 0.4
    assert mean_abs_offcentre(rho) > 0.1


def test_perfectly_correlated_maps_have_cross_map_one():
    torch.manual_seed(6)
    base = torch.randn(50, 1, 4, 4)
    x = torch.cat([base, 2 * base, -0.5 * base], dim=1)
    r = cross_map_correlation(x)
    assert torch.allclose(r.abs(), torch.ones(3, 3, dtype=torch.float64), atol=1e-12)
    assert r[0, 2] < 0  # signed; the figures and the summary use |R|
    assert mean_abs_cross_map(r) == pytest.approx(1.0)


def test_dead_maps_are_undefined_and_left_out_of_the_means():
    torch.manual_seed(7)
    x = torch.randn(20, 3, 6, 6)
    x[:, 1] = 0.0  # a dead unit: every derivative zero
    acc = CorrelationAccumulator(2)
    acc.update(x)
    rho, r = acc.autocorrelation(), acc.cross_map()
    assert rho[1].isnan().all() and not rho[[0, 2]].isnan().any()
    assert r[1].isnan().all() and r[:, 1].isnan().all()
    assert mean_abs_offcentre(rho) == pytest.approx(mean_abs_offcentre(rho[[0, 2]]))
    assert mean_abs_cross_map(r) == pytest.approx(float(r[0, 2].abs()))
    assert mean_abs_offcentre(rho[[1]]) is None


def test_offcentre_mean_excludes_the_centre_and_respects_the_radius():
    rho = torch.zeros(1, 5, 5, dtype=torch.float64)
    rho[0, 2, 2] = 1.0  # delta = 0: excluded
    rho[0, 1, 2] = -0.8  # delta = (-1, 0): a neighbour (absolute value counts)
    rho[0, 0, 0] = 0.4  # delta = (-2, -2)
    assert mean_abs_offcentre(rho) == pytest.approx((0.8 + 0.4) / 24)
    assert mean_abs_offcentre(rho, radius=1) == pytest.approx(0.8 / 8)
