"""The curvature block of one module: statistics, running factors, damped inverse, solve.

Every covered module gets one :class:`CurvatureBlock`; the manager
(:class:`~kfcrun.curvature.KFCCurvature`) loops over them without knowing their type.
A block's lifecycle, in the manager's order:

1. **statistics of one mini-batch** (Eqn 32 and its analogues): after one recorded
   forward pass, :meth:`CurvatureBlock.pass_statistic` turns the layer's recorded
   inputs and the derivatives ``DS`` of one backward pass into the output-side part of
   the estimate (several passes are summed: the exact expectation over targets), then
   :meth:`CurvatureBlock.batch_estimate` adds the input-side part. The result is the
   block's *estimate*, a tuple of tensors named by :attr:`CurvatureBlock.factor_names`;
   every entry is a mean over the ``M`` examples, so estimates of several micro-batches
   combine by an example-weighted mean (:class:`~kfcrun.curvature.EstimateAccumulator`);
2. **running factors**: Algorithm 1's initial average and Eqn 33's EMA, entry by entry
   (:meth:`accumulate_init`, :meth:`update_ema`);
3. **damped inverse**: :meth:`prepare_inverse` (no host sync; returns success flags),
   then ``block.inverse.commit(flags)`` after the manager's ONE sync;
4. **solve** on a gradient in the block's layout (:meth:`solve`), built from the
   module's parameters with :meth:`combine` and taken apart with :meth:`split`.

A module may run several times in one forward pass (a shared layer). Each block type
states in its docstring how the uses combine; all of them treat the uses of one
example as parts of that example (the per-example gradient is the sum over uses).

Kronecker blocks (:class:`KroneckerBlock`): for a layer with combined parameters
``W_bar = [b | W]`` of shape ``I x (1 + J|Δ|)`` (bias column first; the columns after
it are in ``weight.flatten(1)`` order) the Fisher block is approximated by
``Omega ⊗ Gamma`` (Eqn 25, ``vec`` stacks columns), with

* ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H``: summed over all ``M|T|`` rows (output
  positions of all examples), divided by ``M`` only. Shape ``(1+J|Δ|)^2``; index 0
  is the homogeneous coordinate (entry ``[0, 0] = |T|``, row/column 0 the mean patch
  sums). Layers without a (trainable) bias drop the homogeneous coordinate.
* ``Gamma_hat = 1/(M|T|) DS^T DS``: averaged over examples and output positions,
  ``DS`` the derivatives of the per-example loss w.r.t. the layer output. Shape ``I x I``.

A grouped layer (``groups = g``) has ``g`` such blocks, stacked along a leading dim.
Above ``max_factor_dim`` a factor is kept as its diagonal only (see
:class:`KroneckerBlock`).

Adding a layer type: subclass :class:`CurvatureBlock` (or :class:`KroneckerBlock`),
state the math in its docstring, add its type to :mod:`kfcrun.curvature.coverage` and
register it in :func:`kfcrun.curvature.blocks.make_block`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from kfcrun.errors import KfcrunError

from .. import kron_math
from ..inverses import DampedInverse, make_inverse
from ..vocabulary import DampingMode

__all__ = [
    "DEFAULT_MAX_FACTOR_DIM",
    "CurvatureBlock",
    "Estimate",
    "KroneckerBlock",
    "UnsupportedLayerError",
    "combined_grad",
    "combined_matrix",
    "split_update",
]

#: A block's mini-batch estimate: one tensor per entry of ``factor_names``.
Estimate = tuple[Tensor, ...]

#: Default cap on a Kronecker factor's size: above it the factor is stored as its diagonal.
#: 8192 keeps every factor of the usual CNNs (ResNet-18's largest is 4608) full, and
#: turns a language model head's ``V x V`` Gamma (V ~ 32k-50k) into a ``V``-vector.
DEFAULT_MAX_FACTOR_DIM = 8192


class UnsupportedLayerError(KfcrunError, ValueError):
    """A layer configuration KFC does not cover (e.g. ``approx="sua"`` on a grouped convolution)."""


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


def _trainable(param: Tensor | None) -> bool:
    return param is not None and param.requires_grad


class CurvatureBlock(ABC):
    """The curvature of one covered module (see the module docstring).

    Subclasses set :attr:`kind`, :attr:`factor_names`, :attr:`inverse` and implement the
    statistics and the layout. Parameters are the module's ``weight`` and ``bias``;
    a block covers those of them that exist and are trainable (:attr:`covers_weight`,
    :attr:`covers_bias`), and leaves frozen ones out of its layout.

    Attributes:
        name: the module's canonical name.
        module: the module.
        inverse: the damped-inverse strategy holding the fitted solve.
    """

    kind: ClassVar[str] = "base"
    #: Names of the estimate's tensors, which are also the running factors' attribute names.
    factor_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module
        weight = cast("Tensor | None", getattr(module, "weight", None))
        bias = cast("Tensor | None", getattr(module, "bias", None))
        self.covers_weight: bool = _trainable(weight)
        self.covers_bias: bool = _trainable(bias)
        #: The covered parameters (``None`` for one that is absent or frozen).
        self.weight: Tensor | None = weight if self.covers_weight else None
        self.bias: Tensor | None = bias if self.covers_bias else None
        self.inverse: DampedInverse
        for key in self.factor_names:
            setattr(self, key, None)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, shapes={self.factor_shapes()})"

    # -- coverage and layout ------------------------------------------------------------------
    @property
    def params(self) -> list[Tensor]:
        """The parameters this block preconditions, in layout order (weight, then bias)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    @abstractmethod
    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of each running factor, by name."""

    @property
    @abstractmethod
    def layout_shape(self) -> tuple[int, ...]:
        """Shape of a gradient in the block's layout (what :meth:`solve` takes)."""

    @abstractmethod
    def combine(self, weight_like: Tensor | None, bias_like: Tensor | None) -> Tensor:
        """The block's layout from tensors shaped like the module's weight and bias.

        Tensors for parameters the block does not cover are ignored.
        """

    @abstractmethod
    def split(self, mat: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(weight-shaped, bias-shaped)`` from the block's layout.

        ``None`` for a parameter the block does not cover.
        """

    def combined_grad(self) -> Tensor:
        """The module's ``.grad`` in the block's layout (zeros where ``.grad`` is None)."""
        weight = getattr(self.module, "weight", None)
        bias = getattr(self.module, "bias", None)

        def grad_of(p: Tensor | None, covered: bool) -> Tensor | None:
            if p is None or not covered:
                return None
            return p.grad if p.grad is not None else torch.zeros_like(p)

        return self.combine(grad_of(weight, self.covers_weight), grad_of(bias, self.covers_bias))

    # -- statistics of one mini-batch ---------------------------------------------------------
    def pass_context(self, inputs: Sequence[Tensor]) -> Any:
        """What :meth:`pass_statistic` needs from the recorded inputs, computed once (default: nothing)."""
        return None

    @abstractmethod
    def pass_statistic(self, inputs: Sequence[Tensor], derivatives: Sequence[Tensor], context: Any) -> Tensor:
        """The output-side estimate of one backward pass (summed over passes by the caller).

        ``inputs[u]`` and ``derivatives[u]`` are the layer input and ``DS`` of use ``u``
        in the recorded forward pass; ``context`` is :meth:`pass_context` of ``inputs``.
        """

    @abstractmethod
    def batch_estimate(
        self, inputs: Sequence[Tensor], pass_total: Tensor, *, chunk_size: int | None = None
    ) -> Estimate:
        """The mini-batch estimate, one tensor per :attr:`factor_names`, from inputs and summed passes."""

    # -- running factors (Algorithm 1 initialisation, Eqn 33) ---------------------------------
    def factors(self) -> Estimate | None:
        """The running factors, or ``None`` before the first statistics update."""
        values = tuple(getattr(self, key) for key in self.factor_names)
        return None if any(v is None for v in values) else values

    def _set_factors(self, values: Sequence[Tensor]) -> None:
        for key, value in zip(self.factor_names, values, strict=True):
            setattr(self, key, value)

    def accumulate_init(self, estimate: Sequence[Tensor], count: int) -> Tensor:
        """Equal-weight mean of the ``count + 1`` initialisation batches seen so far.

        ``count = 0`` sets the factors. A non-finite estimate is skipped when there is
        a previous value to keep. Returns a 0-d bool tensor: the estimate was finite.
        """
        ok = torch.stack([torch.isfinite(t).all() for t in estimate]).all()
        current = self.factors()
        if count == 0 or current is None:
            self._set_factors([t.clone() for t in estimate])
            return ok
        w = 1.0 / (count + 1)
        self._set_factors(
            [torch.where(ok, c + w * (e - c), c) for c, e in zip(current, estimate, strict=True)]
        )
        return ok

    def update_ema(self, estimate: Sequence[Tensor], decay: float) -> Tensor:
        """``F <- xi F + (1-xi) F_hat`` for every factor (Eqn 33, ``xi = decay``).

        A non-finite estimate leaves the factors unchanged (checked on-device, no host
        sync). Returns a 0-d bool tensor: the estimate was finite and used.
        """
        current = self.factors()
        if current is None:
            return self.accumulate_init(estimate, 0)
        ok = torch.stack([torch.isfinite(t).all() for t in estimate]).all()
        self._set_factors(
            [
                torch.where(ok, decay * c + (1.0 - decay) * e, c)
                for c, e in zip(current, estimate, strict=True)
            ]
        )
        return ok

    def factors_or_zero(self) -> Estimate:
        """The running factors, or zeros if no data ever reached this layer (its Fisher block is 0)."""
        current = self.factors()
        if current is not None:
            return current
        ref = self.params[0]
        dtype = kron_math.accumulation_dtype(ref.dtype)
        return tuple(
            torch.zeros(shape, dtype=dtype, device=ref.device) for shape in self.factor_shapes().values()
        )

    def mean_eigenvalue(self) -> Tensor | None:
        """``tr(F_hat) / n``: the mean eigenvalue of the block's curvature, in the loss's units.

        ``None`` before the first statistics update, and for a block type that does not say
        (the default). One scale for the whole block, free of its structure: K-FAC's damping
        ceiling compares ``gamma`` with it (:class:`~kfcrun.optim.KFAC`, ``gamma_ceiling``).
        """
        return None

    # -- damped inverse and solve ---------------------------------------------------------------
    def prepare_inverse(self, totals: Sequence[float], compute_dtype: torch.dtype | None) -> Tensor:
        """Start fitting the damped inverse for each ``λ + γ`` in ``totals``.

        No host sync: returns the fits' success flags as a bool tensor, read later in one batch.
        """
        return self.inverse.prepare(self.factors_or_zero(), totals, compute_dtype)

    def solve(self, grad: Tensor, index: int = 0) -> Tensor:
        """``(damped block)^{-1} vec(grad)`` for a gradient in the block's layout, in ``grad``'s dtype."""
        expected = self.layout_shape
        if tuple(grad.shape) != expected:
            raise ValueError(
                f"kfc: gradient for {self.name!r} has shape {tuple(grad.shape)}, expected {expected}"
            )
        return self.inverse.apply(grad, index).to(grad.dtype)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors and the inverse's tensors (cloned; ``None`` where not computed yet)."""
        factors = {
            key: (None if getattr(self, key) is None else getattr(self, key).detach().clone())
            for key in self.factor_names
        }
        return {**factors, **self.inverse.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output bitwise (dtype kept, moved to the layer's device)."""
        device = self.params[0].device
        shapes = self.factor_shapes()
        for key in self.factor_names:
            value = state.get(key)
            if value is not None and tuple(value.shape) != shapes[key]:
                raise ValueError(
                    f"kfc: state for layer {self.name!r} has {key} of shape {tuple(value.shape)}, "
                    f"expected {shapes[key]}"
                )
            setattr(self, key, None if value is None else value.detach().clone().to(device))
        self.inverse.load_state_dict(state, device)


class KroneckerBlock(CurvatureBlock):
    """Factors ``Omega`` (input side) and ``Gamma`` (output side) of one layer, and their damped inverse.

    Shapes (per group ``g`` of a grouped layer, stacked along a leading dim when ``g > 1``):
    ``Omega`` is ``omega_dim x omega_dim``, ``Gamma`` is ``gamma_dim x gamma_dim``, a
    gradient in the block's layout is ``gamma_dim x omega_dim``.

    Size cap: a factor whose size exceeds ``max_factor_dim`` is kept as its diagonal only
    (``diag(Omega_hat)``, ``diag(Gamma_hat)``, the same scaling), so that e.g. a language
    model head's ``V x V`` Gamma never exists; the other factor stays full. Damping and
    solve treat ``diag(d)`` as the factor (pi from its trace, Eqn 10; its own
    eigendecomposition with ``Q = I`` in exact mode). ``None`` disables the cap.

    Attributes:
        omega, gamma: the running factors (``None`` until the first statistics update).
    """

    factor_names = ("omega", "gamma")
    #: Dim of the layer output that holds the I output channels.
    channel_dim: ClassVar[int] = 1

    def __init__(
        self,
        name: str,
        module: nn.Module,
        damping_mode: DampingMode | str = DampingMode.PI,
        *,
        groups: int = 1,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        omega_diagonal: bool = False,
    ) -> None:
        super().__init__(name, module)
        self.omega: Tensor | None = None
        self.gamma: Tensor | None = None
        self.groups = groups
        self.has_bias: bool = self.covers_bias
        cap = max_factor_dim
        self.omega_diagonal = omega_diagonal or (cap is not None and self.omega_dim > cap)
        self.gamma_diagonal = cap is not None and self.gamma_dim > cap
        self.inverse = make_inverse(
            damping_mode,
            name,
            self.omega_dim,
            self.gamma_dim,
            groups=groups,
            omega_diagonal=self.omega_diagonal,
            gamma_diagonal=self.gamma_diagonal,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.name!r}, omega_dim={self.omega_dim}, gamma_dim={self.gamma_dim}"
            + (f", groups={self.groups}" if self.groups > 1 else "")
            + (", omega diagonal" if self.omega_diagonal else "")
            + (", gamma diagonal" if self.gamma_diagonal else "")
            + ")"
        )

    # -- shapes -------------------------------------------------------------------------------
    @property
    def omega_dim(self) -> int:
        """``1 + J|Δ|`` with a bias, ``J|Δ|`` without (per group: ``J/g``)."""
        return _weight(self.module)[0].numel() + int(self.has_bias)

    @property
    def gamma_dim(self) -> int:
        """``I``, the number of output channels / features (per group: ``I/g``)."""
        return _weight(self.module).shape[0] // self.groups

    @property
    def lead(self) -> tuple[int, ...]:
        """Leading dims of factors and layout: ``(g,)`` for a grouped layer, else ``()``."""
        return (self.groups,) if self.groups > 1 else ()

    def factor_shapes(self) -> dict[str, tuple[int, ...]]:
        """``omega``/``gamma`` shapes: ``(g?, k, k)``, or ``(g?, k)`` for a diagonal factor."""
        o, g = self.omega_dim, self.gamma_dim
        return {
            "omega": (*self.lead, o) if self.omega_diagonal else (*self.lead, o, o),
            "gamma": (*self.lead, g) if self.gamma_diagonal else (*self.lead, g, g),
        }

    @property
    def layout_shape(self) -> tuple[int, ...]:
        """``(g?, gamma_dim, omega_dim)``: ``[b | W]`` per group."""
        return (*self.lead, self.gamma_dim, self.omega_dim)

    def mean_eigenvalue(self) -> Tensor | None:
        """``tr(Omega x Gamma) / (o g) = (tr Omega / o)(tr Gamma / g)``, averaged over groups.

        The trace of a Kronecker product is the product of the traces; a grouped layer's
        block is block-diagonal over its groups, so its mean eigenvalue is the groups' mean.
        A diagonal factor is its own diagonal.
        """
        if self.omega is None or self.gamma is None:
            return None

        def mean_diagonal(factor: Tensor, diagonal: bool) -> Tensor:
            entries = factor if diagonal else factor.diagonal(dim1=-2, dim2=-1)
            return entries.mean(dim=-1)

        per_group = mean_diagonal(self.omega, self.omega_diagonal) * mean_diagonal(
            self.gamma, self.gamma_diagonal
        )
        return per_group.mean()

    # -- batch estimates (Eqn 32) -------------------------------------------------------------
    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """``Omega_hat`` from the layer input of one mini-batch."""
        raise NotImplementedError

    def batch_gamma(self, derivatives: Sequence[Tensor]) -> Tensor:
        """``Gamma_hat = 1/(M|T|) sum_k DS_k^T DS_k`` from one or more backward passes (one use each)."""
        return kron_math.gamma_from_derivatives(
            (self._batched(ds) for ds in derivatives),
            channel_dim=self.channel_dim,
            groups=self.groups,
            diagonal=self.gamma_diagonal,
        )

    def _batched(self, t: Tensor) -> Tensor:
        """Add the example dim to an unbatched input/output."""
        raise NotImplementedError

    def pass_statistic(self, inputs: Sequence[Tensor], derivatives: Sequence[Tensor], context: Any) -> Tensor:
        """``Gamma_hat`` of one pass: ``sum_u DS_u^T DS_u / (M sum_u |T_u|)``.

        Uses of a shared layer count as more output positions of the same example (the
        "expand" treatment of weight sharing, Eschenhagen et al. 2023): their rows are
        pooled and Gamma is their average, as if the uses were one call with
        ``sum_u |T_u|`` positions.
        """
        total: Tensor | None = None
        rows = 0
        for ds in derivatives:
            part, count = kron_math.gamma_sum(
                self._batched(ds),
                channel_dim=self.channel_dim,
                groups=self.groups,
                diagonal=self.gamma_diagonal,
            )
            total = part if total is None else total.add_(part)
            rows += count
        assert total is not None, "pass_statistic needs at least one use"
        return total.div_(max(rows, 1))

    def batch_estimate(
        self, inputs: Sequence[Tensor], pass_total: Tensor, *, chunk_size: int | None = None
    ) -> Estimate:
        """``(Omega_hat, Gamma_hat)``.

        A shared layer pools its uses' positions: ``Omega_hat = sum_u Omega_hat(use u)``.
        """
        omega: Tensor | None = None
        for inp in inputs:
            part = self.batch_omega(inp, chunk_size=chunk_size)
            omega = part if omega is None else omega.add_(part)
        assert omega is not None, "batch_estimate needs at least one use"
        return omega, pass_total

    # -- gradients in the block's layout ---------------------------------------------------------
    def combine(self, weight_like: Tensor | None, bias_like: Tensor | None) -> Tensor:
        """``[b | W.flatten(1)]`` from weight- and bias-shaped tensors (per group if ``g > 1``)."""
        assert weight_like is not None, (
            f"kfc: layer {self.name!r}: the weight is part of every Kronecker block"
        )
        mat = combined_matrix(weight_like, bias_like if self.has_bias else None)
        return mat.reshape(self.layout_shape) if self.groups > 1 else mat

    def split(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(dW, db)`` from a combined matrix (``db`` is None when the bias is absent or frozen)."""
        weight = _weight(self.module)
        flat = mat.reshape(weight.shape[0], -1)
        if not self.has_bias:
            return flat.reshape(weight.shape), None
        return flat[:, 1:].reshape(weight.shape), flat[:, 0].clone()
