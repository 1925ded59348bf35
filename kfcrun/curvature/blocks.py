"""One Kronecker-factored Fisher block per layer (Conv2d, Linear), holding its factors.

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

(Eqn 32.) A Linear layer is the case ``|T| = 1``: ``Psi = E[a_bar a_bar^T]``,
``a_bar = (1, a)``, ``Gamma = E[Ds Ds^T]`` (Eqn 6). A Linear input with extra
leading dims ``(M, T..., in)`` is treated like a conv: dim 0 indexes examples, the
rest positions.

The block also keeps its running factors (Eqn 33) and the inverse-side state the
preconditioner computes from them (damped inverses and ``pi`` for Eqn 28-29, or
eigendecompositions for Eqns 39-44).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from kfcrun.errors import KfcrunError

from . import kron_math

__all__ = [
    "Conv2dBlock",
    "KroneckerBlock",
    "LinearBlock",
    "UnsupportedLayerError",
    "combined_grad",
    "combined_matrix",
    "make_block",
    "split_update",
    "tracked_modules",
]

#: Models of a conv layer's Omega: KFC (Theorems 1-2) or spatially uncorrelated activations (Theorem 4).
APPROXIMATIONS = ("kfc", "sua")

#: Inverse-side tensors a block may hold, in state_dict order.
INVERSE_KEYS = ("omega_inv", "gamma_inv", "pi", "d_omega", "q_omega", "d_gamma", "q_gamma", "damping_total")


class UnsupportedLayerError(KfcrunError, ValueError):
    """A Conv2d/Linear configuration KFC does not cover (e.g. ``groups > 1``)."""


def combined_matrix(weight_like: Tensor, bias_like: Tensor | None) -> Tensor:
    """``[b | W.flatten(1)]`` of shape ``I x (1 + J|Δ|)``, or ``W.flatten(1)`` without bias."""
    flat = weight_like.reshape(weight_like.shape[0], -1)
    if bias_like is None:
        return flat
    return torch.cat([bias_like.reshape(-1, 1), flat], dim=1)


def combined_grad(module: nn.Module) -> Tensor:
    """``G = [grad_b | grad_W.flatten(1)]`` of a Conv2d/Linear (zeros where ``.grad`` is None)."""
    weight: Tensor = module.weight
    bias: Tensor | None = module.bias
    gw = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    gb = None
    if bias is not None:
        gb = bias.grad if bias.grad is not None else torch.zeros_like(bias)
    return combined_matrix(gw, gb)


def split_update(module: nn.Module, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`combined_matrix`: ``(dW shaped like weight, db or None)``."""
    weight: Tensor = module.weight
    if module.bias is None:
        return mat.reshape(weight.shape), None
    return mat[:, 1:].reshape(weight.shape), mat[:, 0].clone()


def tracked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Conv2d`` and ``nn.Linear`` in ``model``, by qualified name, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


class KroneckerBlock:
    """Factors ``Omega`` (input side) and ``Gamma`` (output side) of one layer.

    Attributes ``omega``/``gamma`` are the running factors (``None`` until the first
    statistics update); the inverse-side attributes are filled by
    :class:`~kfcrun.curvature.preconditioner.KFCCurvature`.
    """

    kind: ClassVar[str] = "base"
    #: Dim of the layer output that holds the I output channels.
    channel_dim: ClassVar[int] = 1

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        self.has_bias: bool = module.bias is not None
        self.omega: Tensor | None = None
        self.gamma: Tensor | None = None
        self.omega_inv: Tensor | None = None
        self.gamma_inv: Tensor | None = None
        self.pi: Tensor | None = None
        self.d_omega: Tensor | None = None
        self.q_omega: Tensor | None = None
        self.d_gamma: Tensor | None = None
        self.q_gamma: Tensor | None = None
        self.damping_total: Tensor | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, omega_dim={self.omega_dim}, gamma_dim={self.gamma_dim})"

    # -- shapes -------------------------------------------------------------------------------
    @property
    def omega_dim(self) -> int:
        """``1 + J|Δ|`` with a bias, ``J|Δ|`` without."""
        return self.module.weight[0].numel() + int(self.has_bias)

    @property
    def gamma_dim(self) -> int:
        """``I``, the number of output channels / features."""
        return self.module.weight.shape[0]

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

    # -- gradients ------------------------------------------------------------------------------
    def combined_grad(self) -> Tensor:
        """``G = [grad_b | grad_W.flatten(1)]`` for this layer (see :func:`combined_grad`)."""
        return combined_grad(self.module)

    def split_update(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(dW, db)`` from a combined ``I x omega_dim`` matrix (see :func:`split_update`)."""
        return split_update(self.module, mat)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor | None]:
        """Factors and inverse-side tensors (cloned; ``None`` where not computed yet)."""
        keys = ("omega", "gamma", *INVERSE_KEYS)
        return {k: (None if getattr(self, k) is None else getattr(self, k).detach().clone()) for k in keys}

    def load_state_dict(self, state: dict[str, Tensor | None]) -> None:
        """Restore :meth:`state_dict` output bitwise (dtype kept, moved to the layer's device)."""
        device = self.module.weight.device
        for key in ("omega", "gamma", *INVERSE_KEYS):
            value = state.get(key)
            setattr(self, key, None if value is None else value.detach().clone().to(device))
        if self.omega is not None and self.omega.shape != (self.omega_dim, self.omega_dim):
            raise ValueError(
                f"kfc: state for layer {self.name!r} has Omega of shape {tuple(self.omega.shape)}, "
                f"expected {(self.omega_dim, self.omega_dim)}"
            )


class LinearBlock(KroneckerBlock):
    """``nn.Linear``: ``Psi_hat = (1/M) sum a_bar a_bar^T``, ``Gamma_hat = 1/(M|T|) sum Ds Ds^T``.

    Input ``(M, in)`` is standard K-FAC (``|T| = 1``). Input ``(M, T..., in)`` treats
    the middle dims as ``|T|`` positions, consistently with the conv convention
    (Omega summed over positions and divided by ``M``; Gamma averaged over ``M|T|``).
    A 1-D (unbatched) input is one example.
    """

    kind = "linear"
    channel_dim = -1

    def _batched(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0) if t.dim() == 1 else t

    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        return kron_math.linear_omega(self._batched(inp), homogeneous=self.has_bias)


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` (KFC, Sec. 3): any stride, dilation, zero padding (int, pair, ``"same"``, ``"valid"``).

    ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` with ``[[A]]`` = ``F.unfold`` of the input
    (rows = output positions), built in chunks of examples (one GEMM each);
    ``Gamma_hat = 1/(M|T|) DS^T DS`` with ``|T|`` the number of output positions.
    ``approx="sua"`` replaces ``Omega_hat`` by the spatially-uncorrelated-activations
    model of Theorem 4 (:func:`kron_math.conv_omega_sua`); Gamma is unchanged.
    ``groups > 1`` and padding modes other than ``"zeros"`` raise
    :class:`UnsupportedLayerError`: KFC's Omega for them is not the unfold moment.
    """

    kind = "conv2d"
    channel_dim = 1

    def __init__(self, name: str, module: nn.Conv2d, approx: str = "kfc") -> None:
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"kfc: layer {name!r} is a grouped convolution (groups={module.groups}); "
                "only groups=1 is supported"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"kfc: layer {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported"
            )
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}")
        super().__init__(name, module)
        self.approx = approx
        self.padding = kron_math.conv_padding(
            module.kernel_size, module.stride, module.padding, module.dilation
        )

    def _batched(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0) if t.dim() == 3 else t

    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        conv: nn.Conv2d = self.module  # type: ignore[assignment]
        geometry = dict(
            stride=conv.stride, padding=self.padding, dilation=conv.dilation, homogeneous=self.has_bias
        )
        if self.approx == "sua":
            return kron_math.conv_omega_sua(self._batched(inp), conv.kernel_size, **geometry)
        return kron_math.conv_omega(self._batched(inp), conv.kernel_size, chunk_size=chunk_size, **geometry)


def make_block(name: str, module: nn.Module, approx: str = "kfc") -> KroneckerBlock:
    """The block class for ``module``; raises :class:`UnsupportedLayerError` for other layer types.

    ``approx`` (``"kfc"`` or ``"sua"``) selects the conv Omega model; Linear layers are
    standard K-FAC either way.
    """
    if isinstance(module, nn.Conv2d):
        return Conv2dBlock(name, module, approx=approx)
    if isinstance(module, nn.Linear):
        return LinearBlock(name, module)
    raise UnsupportedLayerError(f"kfc: layer {name!r} of type {type(module).__name__} has no KFC block")
