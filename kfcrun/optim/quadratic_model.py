"""K-FAC's adaptive rules (paper App. A.2; Martens & Grosse 2015, Secs. 6-7) as small pure functions.

The quadratic model of the objective ``h`` around ``theta`` (Eqn 36, with the Tikhonov
term of the trust region, A.2 "replacing r with r + lambda")::

    M(theta + delta) = h(theta) + grad h^T delta + 1/2 delta^T (F + R + lambda I) delta

with ``F`` the exact Fisher of the mini-batch and ``R`` the weight decay (``r`` on the
decayed parameters). On the span of ``v_1, ..., v_R`` (K-FAC: ``v_1 = -F_hat^{-1} grad h``,
``v_2 = delta_prev``), ``delta = sum_i w_i v_i`` and

    M(theta + delta) - M(theta) = d^T w + 1/2 w^T C w,   C_ij = v_i^T (F + R + lambda I) v_j,
                                                          d_i = grad h^T v_i,

minimized by ``C w = -d`` (A.2), where the model then predicts ``-1/2 d^T C^{-1} d <= 0``.

* :func:`model_coefficients` - the minimizing ``w`` (``alpha, mu``), some entries optionally
  fixed, with the fall-backs of the reference code (zero directions dropped; a 2x2 that is not
  positive definite falls back to ``alpha`` alone);
* :func:`model_change` - ``d^T w + 1/2 w^T C w``;
* :func:`levenberg_marquardt` - Eqn 38's rule for ``lambda`` given ``rho`` (Eqn 37);
* :func:`gamma_candidates` - ``gamma_-, gamma, gamma_+`` (A.2), with the floor ``gamma >= lambda``,
  optionally widened by whole decades (see :class:`~kfcrun.optim.KFAC`'s ``gamma_search_decades``).

Everything here is computed on the device in float64 without host reads, except the
last two, which take Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "RHO_HIGH",
    "RHO_LOW",
    "gamma_candidates",
    "levenberg_marquardt",
    "model_change",
    "model_coefficients",
]

#: Eqn 38: lambda decreases when rho > 3/4 and increases when rho < 1/4.
RHO_HIGH = 0.75
RHO_LOW = 0.25

#: A 2x2 ``C`` counts as singular when ``det <= _SINGULAR * C_11 * C_22`` (its directions
#: are parallel to about 1e-6 in angle); then ``alpha`` alone is used.
_SINGULAR = 1e-12


def model_coefficients(c: Tensor, d: Tensor, fixed: Sequence[float | None] = ()) -> Tensor:
    """``w`` minimizing ``d^T w + 1/2 w^T C w`` for ``C`` of size 1 or 2, in float64 (no host read).

    Args:
        c: the ``R x R`` matrix ``C`` (``R`` = 1: ``alpha`` only, the first step; 2: ``alpha, mu``).
        d: the ``R`` vector ``d``.
        fixed: per coefficient a value to hold it at (``None``: minimize over it); missing
            entries are free.

    The free coefficients solve ``C_FF w_F = -(d_F + C_FX w_X)``. A free coefficient whose
    direction has no curvature (``C_ii <= 0``, a zero direction) is 0. A 2x2 free system that
    is not positive definite (``det <= 1e-12 C_11 C_22``) falls back to ``alpha`` alone
    (``mu = 0``), as Martens & Grosse's code does when it strips the second direction.
    """
    c, d = c.to(torch.float64), d.to(torch.float64)
    size = d.shape[0]
    values = [*fixed, *([None] * (size - len(fixed)))][:size]
    zero = torch.zeros((), dtype=torch.float64, device=d.device)
    if size == 1:
        if values[0] is not None:
            return torch.full((1,), float(values[0]), dtype=torch.float64, device=d.device)
        return _one_dimensional(c[0, 0], d[0]).reshape(1)
    alpha_fixed, mu_fixed = values[0], values[1]
    if alpha_fixed is not None and mu_fixed is not None:
        return torch.tensor([float(alpha_fixed), float(mu_fixed)], dtype=torch.float64, device=d.device)
    if alpha_fixed is not None:
        alpha = torch.full((), float(alpha_fixed), dtype=torch.float64, device=d.device)
        return torch.stack([alpha, _one_dimensional(c[1, 1], d[1] + c[1, 0] * alpha)])
    if mu_fixed is not None:
        mu = torch.full((), float(mu_fixed), dtype=torch.float64, device=d.device)
        return torch.stack([_one_dimensional(c[0, 0], d[0] + c[0, 1] * mu), mu])
    a, b, e = c[0, 0], c[0, 1], c[1, 1]
    det = a * e - b * b
    definite = (a > 0) & (e > 0) & (det > _SINGULAR * a * e)
    safe_det = torch.where(definite, det, torch.ones_like(det))
    alpha_2 = -(e * d[0] - b * d[1]) / safe_det
    mu_2 = -(a * d[1] - b * d[0]) / safe_det
    alpha_1 = _one_dimensional(a, d[0])
    return torch.stack([torch.where(definite, alpha_2, alpha_1), torch.where(definite, mu_2, zero)])


def _one_dimensional(curvature: Tensor, slope: Tensor) -> Tensor:
    """``-slope / curvature``, or 0 where the direction has no curvature."""
    positive = curvature > 0
    return torch.where(positive, -slope / torch.where(positive, curvature, torch.ones_like(curvature)), 0.0)


def model_change(c: Tensor, d: Tensor, w: Tensor) -> Tensor:
    """``M(theta + delta) - M(theta) = d^T w + 1/2 w^T C w`` (float64, 0-d)."""
    c, d, w = c.to(torch.float64), d.to(torch.float64), w.to(torch.float64)
    return d @ w + 0.5 * (w @ (c @ w))


def levenberg_marquardt(lam: float, rho: float, lambda_minus: float, lambda_plus: float) -> float:
    """Eqn 38: ``lam * lambda_minus`` if ``rho > 3/4``, ``lam * lambda_plus`` if ``rho < 1/4``, else ``lam``.

    A NaN ``rho`` counts as a failed step (``lambda`` grows), as in Martens & Grosse's code.
    """
    if rho > RHO_HIGH:
        return lam * lambda_minus
    if rho >= RHO_LOW:
        return lam
    return lam * lambda_plus


def gamma_candidates(
    gamma: float, step: float, floor: float = 0.0, decades: int = 0, ceiling: float = math.inf
) -> list[float]:
    """``[gamma, gamma_-, gamma_+, ...]``: A.2's three, then ``gamma * 10^(+-j)`` for ``j = 1..decades``.

    ``gamma_- = max(step * gamma, floor)`` and ``gamma_+ = gamma / step`` (``0 < step < 1``). The
    current value comes first, so a tie in ``M`` keeps it. ``floor`` is the least damping
    allowed (K-FAC: ``lambda``, see :class:`~kfcrun.optim.KFAC`); ``gamma`` itself is raised to it
    first, and the wide candidates below it are raised to it too (duplicates dropped). The wide
    candidates are relative to ``gamma``, so the set scales with the loss as ``gamma`` does.
    ``ceiling`` is the largest damping allowed (K-FAC's ``gamma_ceiling``): every candidate,
    ``gamma`` included, is lowered to it first; where the two cross, the floor wins.
    """

    def bounded(g: float) -> float:
        return max(min(g, ceiling), floor)

    current = bounded(gamma)
    local = [current, bounded(step * current), bounded(current / step)]
    wide = [bounded(current * 10.0**j) for i in range(1, decades + 1) for j in (-i, i)]
    return local + [g for g in dict.fromkeys(wide) if g not in local]
