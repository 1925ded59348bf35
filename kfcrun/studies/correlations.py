"""Spatial autocorrelations and cross-map correlations of feature maps (paper Sec. 5.1, Figs. 1-2).

Pure math, no model: everything here takes tensors of shape ``(N, C, H, W)`` (N examples,
C feature maps, an H x W spatial grid) and returns correlations as float64 tensors.

Both statistics are **uncentered** normalized second moments, the objects KFC's
assumptions are about (``Gamma`` and ``Omega`` of Eqns 21-22 are uncentered):

Spatial autocorrelation of map ``c`` at offset ``delta = (d1, d2)``::

    rho_c(delta) = S_c(delta) / sqrt(P_c(delta) Q_c(delta))
    S_c(delta)   = sum_n sum_{t in T(delta)} x[n, c, t] x[n, c, t + delta]
    P_c(delta)   = sum_n sum_{t in T(delta)} x[n, c, t]^2
    Q_c(delta)   = sum_n sum_{t in T(delta)} x[n, c, t + delta]^2

where ``T(delta)`` is the set of positions ``t`` with BOTH ``t`` and ``t + delta`` inside
the H x W grid (no padding: a pair with one end outside the image is not a pair). This is
``E[x_t x_{t+delta}] / E[x_t^2]`` of the brief under spatial homogeneity (SH), estimated so
that Cauchy-Schwarz gives ``|rho| <= 1`` exactly and ``rho(0) = 1``; it is symmetric,
``rho(-delta) = rho(delta)``. Offsets with no pair (``|d| >= size``) and maps that are zero
on every pair are undefined: NaN.

Cross-map correlation at one spatial position ``t0`` (the centre, ``(H // 2, W // 2)``)::

    R[c, c'] = sum_n x[n, c, t0] x[n, c', t0] / sqrt(sum_n x[n, c, t0]^2  sum_n x[n, c', t0]^2)

with NaN where a map is zero on all examples at ``t0`` (a dead unit).

For the pre-activation derivatives ``DS`` sampled from the model's distribution the
uncentered and centered versions estimate the same thing, because ``E[DS] = 0`` under
the model's predictive distribution (paper Sec. 3, below Eqn 22). For the activations
they differ; the paper's Fig. 2 shows the uncentered correlations of ``Omega``.

Sums are accumulated in float64 over batches by :class:`CorrelationAccumulator`, so the
result does not depend on the batch size.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "CorrelationAccumulator",
    "autocorrelation",
    "centre_position",
    "cross_map_correlation",
    "mean_abs_cross_map",
    "mean_abs_offcentre",
    "offset_slices",
]


def offset_slices(size: int, d: int) -> tuple[slice, slice] | None:
    """Index ranges ``(head, tail)`` along one axis of length ``size`` for offset ``d``.

    ``x[head]`` are the positions ``t`` and ``x[tail]`` the positions ``t + d``, for every
    ``t`` with both in ``[0, size)``. ``None`` if no such ``t`` exists (``|d| >= size``).
    """
    if abs(d) >= size:
        return None
    if d >= 0:
        return slice(0, size - d), slice(d, size)
    return slice(-d, size), slice(0, size + d)


def centre_position(height: int, width: int) -> tuple[int, int]:
    """The position used for the cross-map correlations: ``(H // 2, W // 2)``."""
    return height // 2, width // 2


def _normalize(cross: Tensor, head: Tensor, tail: Tensor) -> Tensor:
    """``cross / sqrt(head * tail)``, NaN where the denominator is 0 (undefined)."""
    denom = (head * tail).sqrt()
    out = cross / denom
    return torch.where(denom > 0, out, torch.full_like(out, math.nan))


class CorrelationAccumulator:
    """Running float64 sums for :func:`autocorrelation` and :func:`cross_map_correlation`.

    Feed ``(N, C, H, W)`` batches of one quantity (one layer's derivatives or activations)
    to :meth:`update`; :meth:`autocorrelation` and :meth:`cross_map` normalize the sums.
    All C maps are kept (the spatial part costs ``(2K+1)^2`` products per element).

    Args:
        max_offset: ``K``; offsets ``delta`` in ``[-K, K]^2`` are computed.
        position: where the cross-map correlations are taken; default the centre.
    """

    def __init__(self, max_offset: int, position: tuple[int, int] | None = None) -> None:
        if max_offset < 0:
            raise ValueError(f"max_offset must be >= 0, got {max_offset}")
        self.max_offset = int(max_offset)
        self.position = position
        self.shape: tuple[int, int, int] | None = None  # (C, H, W)
        self.count = 0  # examples seen
        side = 2 * self.max_offset + 1
        self._side = side
        self.cross: Tensor | None = None  # (C, side, side): S
        self.head: Tensor | None = None  # (C, side, side): P
        self.tail: Tensor | None = None  # (C, side, side): Q
        self.outer: Tensor | None = None  # (C, C) at `position`

    @property
    def offsets(self) -> list[int]:
        """Offsets along each axis, ``-K .. K`` (row/column order of the result)."""
        return list(range(-self.max_offset, self.max_offset + 1))

    def update(self, x: Tensor) -> None:
        """Add a batch ``x`` of shape ``(N, C, H, W)`` (any float dtype, any device)."""
        if x.dim() != 4:
            raise ValueError(f"expected a (N, C, H, W) tensor, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if self.shape is None:
            self.shape = (c, h, w)
            if self.position is None:
                self.position = centre_position(h, w)
            self.cross = torch.zeros(c, self._side, self._side, dtype=torch.float64)
            self.head = torch.zeros_like(self.cross)
            self.tail = torch.zeros_like(self.cross)
            self.outer = torch.zeros(c, c, dtype=torch.float64)
        elif self.shape != (c, h, w):
            raise ValueError(f"batch shape {(c, h, w)} differs from the first batch's {self.shape}")
        assert self.cross is not None and self.head is not None and self.tail is not None
        assert self.outer is not None and self.position is not None

        x = x.detach()
        squares = (x * x).sum(dim=0, dtype=torch.float64)  # (C, H, W), summed over examples
        cross = torch.zeros(c, self._side, self._side, dtype=torch.float64, device=x.device)
        head = torch.zeros_like(cross)
        tail = torch.zeros_like(cross)
        for i, d1 in enumerate(self.offsets):
            rows = offset_slices(h, d1)
            if rows is None:
                continue
            for j, d2 in enumerate(self.offsets):
                cols = offset_slices(w, d2)
                if cols is None:
                    continue
                a = x[:, :, rows[0], cols[0]]
                b = x[:, :, rows[1], cols[1]]
                cross[:, i, j] = (a * b).sum(dim=(0, 2, 3), dtype=torch.float64)
                head[:, i, j] = squares[:, rows[0], cols[0]].sum(dim=(1, 2))
                tail[:, i, j] = squares[:, rows[1], cols[1]].sum(dim=(1, 2))
        self.cross += cross.cpu()
        self.head += head.cpu()
        self.tail += tail.cpu()

        p1, p2 = self.position
        v = x[:, :, p1, p2].to(torch.float64)  # (N, C)
        self.outer += (v.T @ v).cpu()
        self.count += n

    def autocorrelation(self) -> Tensor:
        """``rho`` of every map, shape ``(C, 2K+1, 2K+1)``; ``[c, i, j]`` is offset ``(i-K, j-K)``."""
        if self.cross is None or self.head is None or self.tail is None:
            raise RuntimeError("no data: call update() first")
        return _normalize(self.cross, self.head, self.tail)

    def cross_map(self) -> Tensor:
        """``R``, the ``(C, C)`` uncentered correlation matrix across maps at :attr:`position`."""
        if self.outer is None:
            raise RuntimeError("no data: call update() first")
        diag = self.outer.diagonal()
        return _normalize(self.outer, diag[:, None], diag[None, :])


def autocorrelation(x: Tensor, max_offset: int) -> Tensor:
    """Spatial autocorrelation ``rho`` of every map of ``x`` ``(N, C, H, W)`` (module docstring)."""
    acc = CorrelationAccumulator(max_offset)
    acc.update(x)
    return acc.autocorrelation()


def cross_map_correlation(x: Tensor, position: tuple[int, int] | None = None) -> Tensor:
    """Cross-map correlation ``R`` of ``x`` ``(N, C, H, W)`` at ``position`` (default: the centre)."""
    acc = CorrelationAccumulator(0, position)
    acc.update(x)
    return acc.cross_map()


def _nan_mean_abs(values: Tensor) -> float | None:
    values = values[~values.isnan()]
    return float(values.abs().mean()) if values.numel() else None


def mean_abs_offcentre(rho: Tensor, radius: int | None = None) -> float | None:
    """Mean ``|rho_c(delta)|`` over maps and offsets ``delta != 0`` (defined entries only).

    ``rho`` is ``(C, 2K+1, 2K+1)``. With ``radius=r`` only offsets with
    ``max(|d1|, |d2|) <= r`` count (``r=1``: the 8 nearest neighbours). ``None`` if no
    entry is defined.
    """
    k = (rho.shape[-1] - 1) // 2
    offsets = torch.arange(-k, k + 1)
    chebyshev = torch.maximum(offsets[:, None].abs(), offsets[None, :].abs())
    keep = chebyshev > 0
    if radius is not None:
        keep &= chebyshev <= radius
    return _nan_mean_abs(rho[:, keep])


def mean_abs_cross_map(r: Tensor) -> float | None:
    """Mean ``|R[c, c']|`` over ``c != c'`` (defined entries only); ``None`` if there is none."""
    off = ~torch.eye(r.shape[0], dtype=torch.bool)
    return _nan_mean_abs(r[off])
