"""The Kronecker block of one layer: statistics, running factors, damped inverse, solve.

For a layer with combined parameters ``W_bar = [b | W]`` of shape
``I x (1 + J|Δ|)`` (bias column first; the columns after it are in
``weight.flatten(1)`` order) the Fisher block is approximated by
``Omega ⊗ Gamma`` (Eqn 25, ``vec`` stacks columns), with

* ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H``: summed over all ``M|T|`` rows (output
  positions of all examples), divided by ``M`` only. Shape ``(1+J|Δ|)^2``; index 0
  is the homogeneous coordinate (entry ``[0, 0] = |T|``, row/column 0 the mean patch
  sums). Layers without a bias drop the homogeneous coordinate: shape ``(J|Δ|)^2``.
* ``Gamma_hat = 1/(M|T|) DS^T DS``: averaged over examples and output positions,
  ``DS`` the derivatives of the per-example loss w.r.t. the layer output. Shape ``I x I``.

(Eqn 32.) The block owns its whole lifecycle: the batch estimates from a recorded
pass (:meth:`KroneckerBlock.batch_omega`, :meth:`KroneckerBlock.batch_gamma`), the
running factors (Algorithm 1's initial estimate and Eqn 33's average), the damped
inverse (a :class:`~kfcrun.curvature.inverses.DampedInverse` strategy chosen by the
damping mode) and the solve on a gradient in ``[b | W]`` layout (:meth:`KroneckerBlock.solve`).

Adding a layer type: subclass :class:`KroneckerBlock`, implement ``batch_omega`` and
``_batched`` (and the shape properties if the layout differs), state the math in its
docstring, and register it in :func:`kfcrun.curvature.blocks.make_block`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from kfcrun.errors import KfcrunError

from .. import kron_math
from ..inverses import DampedInverse, make_inverse
from ..vocabulary import DampingMode

__all__ = ["KroneckerBlock", "UnsupportedLayerError", "combined_grad", "combined_matrix", "split_update"]


class UnsupportedLayerError(KfcrunError, ValueError):
    """A layer configuration KFC does not cover (e.g. ``groups > 1``)."""


def _weight(module: nn.Module) -> Tensor:
    """``module.weight`` of a Conv2d/Linear, typed (``nn.Module.__getattr__`` is not)."""
    return cast(Tensor, module.weight)


def _bias(module: nn.Module) -> Tensor | None:
    """``module.bias`` of a Conv2d/Linear (``None`` for a layer without bias), typed."""
    return cast("Tensor | None", module.bias)


def combined_matrix(weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
    """``[b | W.flatten(1)]`` of shape ``I x (1 + J|Δ|)``, or ``W.flatten(1)`` without bias."""
    flat = weight_like.reshape(weight_like.shape[0], -1)
    if bias_like is None:
        return flat
    return torch.cat([bias_like.reshape(-1, 1), flat], dim=1)


def combined_grad(module: nn.Module) -> Tensor:
    """``G = [grad_b | grad_W.flatten(1)]`` of a Conv2d/Linear (zeros where ``.grad`` is None)."""
    weight = _weight(module)
    bias = _bias(module)
    gw = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    gb = None
    if bias is not None:
        gb = bias.grad if bias.grad is not None else torch.zeros_like(bias)
    return combined_matrix(gw, gb)


def split_update(module: nn.Module, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`combined_matrix`: ``(dW shaped like weight, db or None)``."""
    weight = _weight(module)
    if module.bias is None:
        return mat.reshape(weight.shape), None
    return mat[:, 1:].reshape(weight.shape), mat[:, 0].clone()


class KroneckerBlock:
    """Factors ``Omega`` (input side) and ``Gamma`` (output side) of one layer, and their damped inverse.

    Attributes:
        omega, gamma: the running factors (``None`` until the first statistics update).
        inverse: the damping strategy holding the fitted solve.
    """

    kind: ClassVar[str] = "base"
    #: Dim of the layer output that holds the I output channels.
    channel_dim: ClassVar[int] = 1

    def __init__(
        self, name: str, module: nn.Module, damping_mode: DampingMode | str = DampingMode.PI
    ) -> None:
        self.name = name
        self.module = module
        self.has_bias: bool = module.bias is not None
        self.omega: Tensor | None = None
        self.gamma: Tensor | None = None
        self.inverse: DampedInverse = make_inverse(damping_mode, name, self.omega_dim, self.gamma_dim)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, omega_dim={self.omega_dim}, gamma_dim={self.gamma_dim})"

    # -- shapes -------------------------------------------------------------------------------
    @property
    def omega_dim(self) -> int:
        """``1 + J|Δ|`` with a bias, ``J|Δ|`` without."""
        return _weight(self.module)[0].numel() + int(self.has_bias)

    @property
    def gamma_dim(self) -> int:
        """``I``, the number of output channels / features."""
        return _weight(self.module).shape[0]

    # -- batch estimates (Eqn 32) -------------------------------------------------------------
    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """``Omega_hat`` from the layer input of one mini-batch."""
        raise NotImplementedError

    def batch_gamma(self, derivatives: Iterable[Tensor]) -> Tensor:
        """``Gamma_hat = 1/(M|T|) sum_k DS_k^T DS_k`` from one or more backward passes."""
        return kron_math.gamma_from_derivatives(
            (self._batched(ds) for ds in derivatives), channel_dim=self.channel_dim
        )

    def _batched(self, t: Tensor) -> Tensor:
        """Add the example dim to an unbatched input/output."""
        raise NotImplementedError

    # -- running factors (Algorithm 1 initialisation, Eqn 33) ---------------------------------
    def accumulate_init(self, omega_hat: Tensor, gamma_hat: Tensor, count: int) -> Tensor:
        """Equal-weight mean of the ``count + 1`` initialisation batches seen so far.

        ``count = 0`` sets the factors. A non-finite estimate is skipped when there is
        a previous value to keep. Returns a 0-d bool tensor: the estimate was finite.
        """
        ok = torch.isfinite(omega_hat).all() & torch.isfinite(gamma_hat).all()
        if count == 0 or self.omega is None or self.gamma is None:
            self.omega, self.gamma = omega_hat.clone(), gamma_hat.clone()
            return ok
        w = 1.0 / (count + 1)
        self.omega = torch.where(ok, self.omega + w * (omega_hat - self.omega), self.omega)
        self.gamma = torch.where(ok, self.gamma + w * (gamma_hat - self.gamma), self.gamma)
        return ok

    def update_ema(self, omega_hat: Tensor, gamma_hat: Tensor, decay: float) -> Tensor:
        """``Omega <- xi Omega + (1-xi) Omega_hat``, same for Gamma (Eqn 33, ``xi = decay``).

        A non-finite estimate leaves the factors unchanged (checked on-device, no host
        sync). Returns a 0-d bool tensor: the estimate was finite and used.
        """
        if self.omega is None or self.gamma is None:
            return self.accumulate_init(omega_hat, gamma_hat, 0)
        ok = torch.isfinite(omega_hat).all() & torch.isfinite(gamma_hat).all()
        self.omega = torch.where(ok, decay * self.omega + (1.0 - decay) * omega_hat, self.omega)
        self.gamma = torch.where(ok, decay * self.gamma + (1.0 - decay) * gamma_hat, self.gamma)
        return ok

    def factors_or_zero(self) -> tuple[Tensor, Tensor]:
        """The running factors, or zeros if no data ever reached this layer (its Fisher block is 0)."""
        if self.omega is not None and self.gamma is not None:
            return self.omega, self.gamma
        weight = _weight(self.module)
        dtype = kron_math.accumulation_dtype(weight.dtype)
        return (
            torch.zeros(self.omega_dim, self.omega_dim, dtype=dtype, device=weight.device),
            torch.zeros(self.gamma_dim, self.gamma_dim, dtype=dtype, device=weight.device),
        )

    # -- damped inverse and solve (Eqns 28-29, 39-44) ------------------------------------------
    def prepare_inverse(self, totals: Sequence[float], compute_dtype: torch.dtype | None) -> Tensor:
        """Start fitting the damped inverse for each ``λ + γ`` in ``totals``; returns flags.

        No host sync: the returned bool tensor holds the fits' success flags, read later in one batch.
        """
        omega, gamma = self.factors_or_zero()
        return self.inverse.prepare(omega, gamma, totals, compute_dtype)

    def solve(self, grad: Tensor, index: int = 0) -> Tensor:
        """``(damped Omega ⊗ Gamma)^{-1} vec(grad)`` for a gradient in ``[b | W]`` layout.

        ``grad`` has shape ``I x omega_dim``; the result has its shape and dtype.
        ``index`` picks the damping candidate of the last fit.
        """
        expected = (self.gamma_dim, self.omega_dim)
        if tuple(grad.shape) != expected:
            raise ValueError(
                f"kfc: gradient for {self.name!r} has shape {tuple(grad.shape)}, expected {expected}"
            )
        return self.inverse.apply(grad, index).to(grad.dtype)

    # -- gradients in the block's layout ---------------------------------------------------------
    def combine(self, weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
        """``[b | W.flatten(1)]`` from tensors shaped like the layer's weight and bias."""
        return combined_matrix(weight_like, bias_like if self.has_bias else None)

    def combined_grad(self) -> Tensor:
        """``G = [grad_b | grad_W.flatten(1)]`` for this layer (see :func:`combined_grad`)."""
        return combined_grad(self.module)

    def split(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(dW, db)`` from a combined ``I x omega_dim`` matrix (see :func:`split_update`)."""
        return split_update(self.module, mat)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors and the inverse's tensors (cloned; ``None`` where not computed yet)."""
        factors = {k: (None if v is None else v.detach().clone()) for k, v in self._factors().items()}
        return {**factors, **self.inverse.state_dict()}

    def _factors(self) -> dict[str, Tensor | None]:
        return {"omega": self.omega, "gamma": self.gamma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output bitwise (dtype kept, moved to the layer's device)."""
        device = _weight(self.module).device
        for key in ("omega", "gamma"):
            value = state.get(key)
            setattr(self, key, None if value is None else value.detach().clone().to(device))
        if self.omega is not None and self.omega.shape != (self.omega_dim, self.omega_dim):
            raise ValueError(
                f"kfc: state for layer {self.name!r} has Omega of shape {tuple(self.omega.shape)}, "
                f"expected {(self.omega_dim, self.omega_dim)}"
            )
        self.inverse.load_state_dict(state, device)
