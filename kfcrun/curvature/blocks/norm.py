"""The block of a normalization layer's scale and shift: one small Fisher matrix per channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import kron_math
from ..coverage import NORM_LAYER_TYPES
from ..inverses import UnitwiseInverse
from .base import CurvatureBlock, Estimate

__all__ = ["NORM_LAYER_TYPES", "NormBlock"]


class NormBlock(CurvatureBlock):
    """Scale ``gamma`` and shift ``beta`` of a normalization layer: ``y = gamma x_hat + beta``.

    BatchNorm, GroupNorm, LayerNorm and RMSNorm.

    The layer's parameters have one entry per *unit* ``c`` (a channel for BatchNorm and
    GroupNorm; an entry of ``normalized_shape`` for LayerNorm and RMSNorm), ``P`` units in
    all. With ``x_hat`` the normalized input and ``DS`` the derivatives of the
    per-example loss w.r.t. the output ``y``, example ``n``'s gradient for unit ``c`` is::

        g_nc = ( sum_t x_hat[n, c, t] DS[n, c, t],  sum_t DS[n, c, t] )   # (d gamma_c, d beta_c)

    summed over every position ``t`` that shares the unit (pixels, tokens), and over the
    uses of a shared layer, *before* squaring: the true per-example gradient. The block
    is the per-unit Fisher (kfac-jax's scale-and-shift block restricted to units, ASDL's
    unit-wise form)::

        F_c = (1/M) sum_n g_nc g_nc^T        # 2 x 2 (1 x 1 if only one of gamma, beta is trainable)

    stored as ``(P, d, d)``, i.e. the Fisher's diagonal ``d x d`` blocks, with the
    correlations between different units dropped (as KFC drops them between layers).
    It is exact when those vanish, e.g. when each output entry carries an independent
    Gaussian likelihood directly after the layer. Damping is exact for these tiny blocks,
    ``(F_c + (λ + γ) I)^{-1}``, in either damping mode
    (:class:`~kfcrun.curvature.inverses.UnitwiseInverse`).

    ``x_hat`` is recomputed from the recorded input with the layer's own normalization
    without its affine part (``F.batch_norm`` with batch statistics in training mode and
    running statistics in eval mode, ``F.group_norm``, ``F.layer_norm``, ``F.rms_norm``),
    never as ``(y - beta) / gamma``, which fails for ``gamma = 0``. Scaling as the
    Kronecker blocks: an average over examples of per-example gradient outer products.
    """

    kind = "norm"
    factor_names = ("fisher",)

    def __init__(self, name: str, module: nn.Module) -> None:
        super().__init__(name, module)
        self.fisher: Tensor | None = None
        ref = cast(Tensor, module.weight if module.weight is not None else module.bias)
        self.unit_shape: tuple[int, ...] = tuple(ref.shape)
        self.units = ref.numel()
        self.dim = int(self.covers_weight) + int(self.covers_bias)
        self.channel_first = isinstance(module, (_BatchNorm, nn.GroupNorm))
        self.inverse = UnitwiseInverse(name, self.units, self.dim)

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``fisher``: ``(P, d, d)``, one ``d x d`` matrix per unit."""
        return {"fisher": (self.units, self.dim, self.dim)}

    @property
    def layout_shape(self) -> tuple[int, ...]:
        """``(P, d)``: per unit, ``(d gamma, d beta)`` (only the trainable ones)."""
        return (self.units, self.dim)

    def mean_eigenvalue(self) -> Tensor | None:
        """``tr(F) / (P d)``: the mean of the per-unit blocks' diagonals."""
        if self.fisher is None:
            return None
        return self.fisher.diagonal(dim1=-2, dim2=-1).mean()

    # -- layout -----------------------------------------------------------------------------
    def combine(self, weight_like: Tensor | None, bias_like: Tensor | None) -> Tensor:
        """``(P, d)``: per unit, the scale entry then the shift entry (the trainable ones)."""
        cols = []
        if self.covers_weight:
            assert weight_like is not None
            cols.append(weight_like.reshape(-1))
        if self.covers_bias:
            assert bias_like is not None
            cols.append(bias_like.reshape(-1))
        return torch.stack(cols, dim=-1)

    def split(self, mat: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(scale-shaped, shift-shaped)`` from ``(P, d)``; ``None`` for a frozen or absent one."""
        col = 0
        scale = shift = None
        if self.covers_weight:
            scale = mat[:, col].reshape(self.unit_shape).clone()
            col += 1
        if self.covers_bias:
            shift = mat[:, col].reshape(self.unit_shape).clone()
        return scale, shift

    # -- statistics ---------------------------------------------------------------------------
    def normalized(self, inp: Tensor) -> Tensor:
        """``x_hat``: the layer's normalization of ``inp`` without the affine part, in at least float32."""
        m = self.module
        x = inp.to(kron_math.accumulation_dtype(inp.dtype))
        if isinstance(m, _BatchNorm):
            batch_stats = m.training or (m.running_mean is None and m.running_var is None)
            if batch_stats:
                return F.batch_norm(x, None, None, None, None, True, 0.0, m.eps)
            assert m.running_mean is not None and m.running_var is not None
            return F.batch_norm(
                x, m.running_mean.to(x.dtype), m.running_var.to(x.dtype), None, None, False, 0.0, m.eps
            )
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.RMSNorm):
            return F.rms_norm(x, m.normalized_shape, None, m.eps)
        raise TypeError(f"kfc: {type(m).__name__} is not a normalization layer")

    def _batched(self, t: Tensor) -> Tensor:
        # LayerNorm/RMSNorm accept an unbatched input of exactly normalized_shape: one example.
        return t.unsqueeze(0) if not self.channel_first and t.dim() == len(self.unit_shape) else t

    def _unit_sums(self, t: Tensor) -> Tensor:
        """``(M, P)``: ``t`` summed over the positions that share each unit."""
        if self.channel_first:
            return t.reshape(t.shape[0], t.shape[1], -1).sum(dim=-1)
        return t.reshape(t.shape[0], -1, self.units).sum(dim=1)

    def pass_context(self, inputs: Sequence[Tensor]) -> Any:
        """``x_hat`` of each use, computed once for all backward passes."""
        return [self._batched(self.normalized(inp)) for inp in inputs]

    def pass_statistic(self, inputs: Sequence[Tensor], derivatives: Sequence[Tensor], context: Any) -> Tensor:
        """``(1/M) sum_n g_n g_n^T`` per unit, ``g_n`` summed over positions and uses (class docstring)."""
        d_scale: Tensor | None = None
        d_shift: Tensor | None = None
        for x_hat, ds in zip(context, derivatives, strict=True):
            dy = self._batched(ds).to(x_hat.dtype)
            if self.covers_weight:
                part = self._unit_sums(x_hat * dy)
                d_scale = part if d_scale is None else d_scale + part
            if self.covers_bias:
                part = self._unit_sums(dy)
                d_shift = part if d_shift is None else d_shift + part
        grads = torch.stack([g for g in (d_scale, d_shift) if g is not None], dim=-1)  # (M, P, d)
        return torch.einsum("npi,npj->pij", grads, grads).div_(max(grads.shape[0], 1))

    def batch_estimate(
        self, inputs: Sequence[Tensor], pass_total: Tensor, *, chunk_size: int | None = None
    ) -> Estimate:
        """``(F_hat,)``: everything comes from the backward passes."""
        return (pass_total,)
