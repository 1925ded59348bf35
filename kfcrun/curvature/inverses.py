"""Damping strategies: how a Kronecker block's damped inverse is fitted and applied.

A block's Fisher approximation is ``Omega ⊗ Gamma`` (Eqn 25); what an optimizer needs
is the solve ``(Omega ⊗ Gamma + (λ + γ) I)^{-1} vec(G)``, approximately or
exactly. Each strategy owns the tensors of its solve and has three operations:

* :meth:`DampedInverse.prepare` - the sync-free part of the fit (no host reads), from
  the factors and one or more damping totals ``λ + γ``; returns a 1-d bool
  tensor of success flags. The manager stacks every block's flags and reads them in
  ONE host sync per inverse update;
* :meth:`DampedInverse.commit` - given the flags as Python bools, install the result,
  or take the slow robust path, or keep the previous inverse (each with one warning);
* :meth:`DampedInverse.apply` - the solve for damping candidate ``index``;
* :meth:`DampedInverse.select` - keep candidate ``index`` as candidate 0 (the fit used
  from then on), without refitting: K-FAC keeps the best of its gamma candidates.

Several damping totals can be fitted from the same factors at once (K-FAC compares
``γ₋, γ, γ₊``): the eigen strategy decomposes once and applies any total;
the pi strategy needs one Cholesky pair per total and shares the symmetrised factors
and ``pi``. Only candidate 0 is kept in :meth:`~DampedInverse.state_dict`: the others
are used within the step that fitted them.

Strategies (:data:`STRATEGIES`, by :class:`~kfcrun.curvature.vocabulary.DampingMode`):

* :class:`PiCholeskyInverse` (``"pi"``, Eqn 28-29): ``Omega_d = Omega + pi sqrt(t) I``,
  ``Gamma_d = Gamma + sqrt(t)/pi I`` with the trace-norm ``pi`` (Eqn 10), inverted by
  Cholesky; solve ``Gamma_d^{-1} G Omega_d^{-1}``;
* :class:`EigenInverse` (``"exact"``, Eqns 39-44): ``Omega = Q_O D_O Q_O^T``,
  ``Gamma = Q_G D_G Q_G^T``; solve ``Q_G [(Q_G^T G Q_O) / (d_G d_O^T + t)] Q_O^T``.

Robustness: factors are symmetrised and decomposed in ``compute_dtype`` (float64 by
default) and the results stored in the factors' dtype. A failed Cholesky retries with
jitter, then float64, then a clamped eigendecomposition
(:func:`~kfcrun.curvature.kron_math.inverse_fallback`), with one warning naming the
layer. The exact mode cannot fail that way (its denominators are ``>= t``), so it warns,
once per layer, where the pi mode's Cholesky would be in trouble: when ``t`` is below the
rounding level of the block's largest curvature in the stored dtype
(:meth:`EigenInverse.check_conditioning`). A non-finite factor never reaches the
parameters: the previous inverse is kept, or, if there is none, the damped inverse of a
zero block, ``I / t``.

Shapes: a Kronecker strategy is built for a :class:`KroneckerShape`: the factor sizes,
a number of groups ``g`` (a grouped convolution's ``g`` independent blocks, factors
``(g, k, k)``, solved together with one ``pi`` per group) and whether either factor is
stored as its diagonal (above a size cap; see :mod:`kfcrun.curvature.blocks`).

:class:`UnitwiseInverse` is the strategy of blocks that are many tiny independent
matrices (a normalization layer's per-channel ``2 x 2`` scale/shift Fisher): exact
damping ``(F_c + (λ + γ) I)^{-1}`` for each unit, whatever the damping mode,
because the blocks are small enough to damp exactly.

Adding a damping mode: subclass :class:`KroneckerInverse`, implement the three operations
and the state keys, and register it in :data:`STRATEGIES`; nothing else changes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import kron_math
from .diagnostics import warn
from .vocabulary import DampingMode

__all__ = [
    "STRATEGIES",
    "DampedInverse",
    "EigenInverse",
    "KroneckerInverse",
    "KroneckerShape",
    "PiCholeskyInverse",
    "UnitwiseInverse",
    "make_inverse",
]


#: Attributes holding the other damping candidates of the last fit (see ``update_inverses``).
_CANDIDATE_KEYS = ("_extra", "_extra_totals")


class DampedInverse(ABC):
    """The damped inverse of one curvature block (see the module docstring).

    Args:
        name: the layer's name, for warnings and errors.
    """

    #: Keys of :meth:`state_dict`, each a tensor or ``None``.
    state_keys: ClassVar[tuple[str, ...]]
    #: The strategy needs ``λ + γ > 0`` (else ``>= 0``).
    needs_positive_total: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name
        #: ``λ + γ`` of candidate 0 as a 0-d tensor in the stored dtype.
        self.damping_total: Tensor | None = None

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether a solve is available (a fit has been committed or restored)."""

    @abstractmethod
    def prepare(
        self, factors: Sequence[Tensor], totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        """Start a fit from the block's factors for the damping totals ``λ + γ``.

        Returns 1-d bool success flags, without a host sync.
        """

    @abstractmethod
    def commit(self, flags: Sequence[bool]) -> None:
        """Finish the fit given :meth:`prepare`'s flags read on the host."""

    @abstractmethod
    def apply(self, grad: Tensor, index: int = 0) -> Tensor:
        """``(damped block)^{-1} vec(grad)`` for damping candidate ``index``, in the stored dtype."""

    @abstractmethod
    def select(self, index: int) -> None:
        """Make candidate ``index`` of the last fit candidate 0 and drop the other candidates."""

    @abstractmethod
    def summary(self) -> dict[str, Tensor]:
        """0-d tensors describing the fit, for logging (no sync)."""

    @abstractmethod
    def _install_identity(self, total: float, store: torch.dtype, device: torch.device) -> None:
        """Install the damped inverse of a zero block, ``I / total``."""

    def state_dict(self) -> dict[str, Tensor | None]:
        """The committed candidate-0 tensors (cloned; ``None`` where not computed yet)."""
        return {key: _clone(getattr(self, key)) for key in self.state_keys}

    def load_state_dict(self, state: dict[str, Tensor | None], device: torch.device) -> None:
        """Restore :meth:`state_dict` output bitwise (dtype kept, moved to ``device``).

        Keys absent from ``state`` are set to ``None``.
        """
        for key in self.state_keys:
            value = state.get(key)
            setattr(self, key, None if value is None else value.detach().clone().to(device))

    def fitted_state(self) -> dict[str, Any]:
        """Everything a solve reads: the committed tensors and the other damping candidates' fits."""
        extras = {key: getattr(self, key) for key in _CANDIDATE_KEYS if hasattr(self, key)}
        return {**{key: getattr(self, key) for key in self.state_keys}, **extras}

    def load_fitted_state(self, state: dict[str, Any]) -> None:
        """Install :meth:`fitted_state` output of another process (tensors used as given)."""
        for key in self.state_keys:
            setattr(self, key, state.get(key))
        for key in _CANDIDATE_KEYS:
            setattr(self, key, list(state.get(key, [])))

    def release(self) -> None:
        """Drop the fit (memory): :attr:`ready` is false until the next fit or load."""
        for key in self.state_keys:
            setattr(self, key, None)
        for key in _CANDIDATE_KEYS:
            setattr(self, key, [])

    def _keep_previous(
        self, total: float, store: torch.dtype, device: torch.device, reason: str = ""
    ) -> None:
        """Leave the last good inverse in place, or install the identity fallback if there is none."""
        why = reason or "factor contains NaN/inf"
        if self.ready:
            warn(f"kfc: layer {self.name!r}: {why}; keeping the previous inverse")
            return
        warn(f"kfc: layer {self.name!r}: {why}; no previous inverse, using identity / (λ + γ)")
        self._install_identity(total, store, device)
        self.damping_total = torch.tensor(total, dtype=store, device=device)


def _clone(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach().clone()


@dataclass(frozen=True)
class KroneckerShape:
    """The layout of a Kronecker block's factors.

    Attributes:
        omega_dim, gamma_dim: ``k`` of ``Omega`` (input side) and ``Gamma`` (output side), per group.
        groups: number of independent blocks ``g``; factors carry a leading ``g`` dim when ``g > 1``.
        omega_diagonal, gamma_diagonal: the factor is stored as its diagonal ``(..., k)``.
    """

    omega_dim: int
    gamma_dim: int
    groups: int = 1
    omega_diagonal: bool = False
    gamma_diagonal: bool = False

    @property
    def lead(self) -> tuple[int, ...]:
        """The batch shape of the factors: ``(g,)`` for a grouped block, ``()`` otherwise."""
        return (self.groups,) if self.groups > 1 else ()

    def factor_shape(self, side: str) -> tuple[int, ...]:
        """Shape of the ``"omega"`` or ``"gamma"`` factor as stored."""
        dim, diagonal = (
            (self.omega_dim, self.omega_diagonal)
            if side == "omega"
            else (self.gamma_dim, self.gamma_diagonal)
        )
        return (*self.lead, dim) if diagonal else (*self.lead, dim, dim)

    def identity(self, side: str, scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``scale * I`` in the stored layout of ``side``."""
        shape = self.factor_shape(side)
        if len(shape) == len(self.lead) + 1:
            return torch.full(shape, scale, dtype=dtype, device=device)
        eye = torch.eye(shape[-1], dtype=dtype, device=device) * scale
        return eye.expand(shape).clone()


class KroneckerInverse(DampedInverse):
    """A damping strategy for a block ``Omega ⊗ Gamma`` of the given :class:`KroneckerShape`.

    Args:
        name: the layer's name.
        omega_dim, gamma_dim: the factors' sizes (per group).
        groups, omega_diagonal, gamma_diagonal: see :class:`KroneckerShape`.
    """

    mode: ClassVar[DampingMode]

    def __init__(
        self,
        name: str,
        omega_dim: int,
        gamma_dim: int,
        *,
        groups: int = 1,
        omega_diagonal: bool = False,
        gamma_diagonal: bool = False,
    ) -> None:
        super().__init__(name)
        self.shape = KroneckerShape(omega_dim, gamma_dim, groups, omega_diagonal, gamma_diagonal)
        self.omega_dim, self.gamma_dim = omega_dim, gamma_dim

    def prepare(
        self, factors: Sequence[Tensor], totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        """:meth:`_prepare` of the factors ``(Omega, Gamma)``."""
        omega, gamma = factors
        return self._prepare(omega, gamma, totals, compute_dtype)

    @abstractmethod
    def _prepare(
        self, omega: Tensor, gamma: Tensor, totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        """:meth:`prepare` for the two Kronecker factors."""


@dataclass
class _PiPending:
    factor: Tensor  # Omega as given: its dtype and device are where results are stored
    totals: list[float]
    omega_d: list[Tensor] = field(default_factory=list)
    gamma_d: list[Tensor] = field(default_factory=list)
    omega_inv: list[Tensor] = field(default_factory=list)
    gamma_inv: list[Tensor] = field(default_factory=list)
    pi: Tensor | None = None


class PiCholeskyInverse(KroneckerInverse):
    """Factored damping with the trace-norm ``pi`` (Eqns 9-10, 28), inverted by Cholesky (Eqn 29).

    A diagonal factor is inverted entrywise; a grouped block gets one ``pi`` per group.
    """

    mode = DampingMode.PI
    state_keys = ("omega_inv", "gamma_inv", "pi", "damping_total")

    def __init__(
        self,
        name: str,
        omega_dim: int,
        gamma_dim: int,
        *,
        groups: int = 1,
        omega_diagonal: bool = False,
        gamma_diagonal: bool = False,
    ) -> None:
        super().__init__(
            name,
            omega_dim,
            gamma_dim,
            groups=groups,
            omega_diagonal=omega_diagonal,
            gamma_diagonal=gamma_diagonal,
        )
        self.omega_inv: Tensor | None = None
        self.gamma_inv: Tensor | None = None
        self.pi: Tensor | None = None
        #: Candidates 1.. of the last fit: ``(Omega_d^{-1}, Gamma_d^{-1})``, and their totals.
        self._extra: list[tuple[Tensor, Tensor]] = []
        self._extra_totals: list[float] = []
        self._pending: _PiPending | None = None

    @property
    def ready(self) -> bool:
        """Whether ``Omega_d^{-1}`` and ``Gamma_d^{-1}`` are installed."""
        return self.omega_inv is not None and self.gamma_inv is not None

    def _invert(self, damped: Tensor, diagonal: bool) -> tuple[Tensor, Tensor]:
        return (
            kron_math.diagonal_inverse_fast(damped) if diagonal else kron_math.cholesky_inverse_fast(damped)
        )

    def _prepare(
        self, omega: Tensor, gamma: Tensor, totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        """Damp both factors (Eqn 28) for each total and invert them by Cholesky, without a host sync.

        Returns ``[finite, ok_Omega_0, ok_Gamma_0, ok_Omega_1, ok_Gamma_1, ...]``: whether the
        factors are finite, then whether each total's two Cholesky inverses succeeded.
        """
        dt = compute_dtype if compute_dtype is not None else omega.dtype
        shape = self.shape
        pending = _PiPending(omega, list(totals))
        oks: list[Tensor] = []
        for total in totals:
            omega_d, gamma_d, pi = kron_math.damped_factors(
                omega.to(dt),
                gamma.to(dt),
                total,
                omega_diagonal=shape.omega_diagonal,
                gamma_diagonal=shape.gamma_diagonal,
            )
            omega_inv, ok_o = self._invert(omega_d, shape.omega_diagonal)
            gamma_inv, ok_g = self._invert(gamma_d, shape.gamma_diagonal)
            pending.omega_d.append(omega_d)
            pending.gamma_d.append(gamma_d)
            pending.omega_inv.append(omega_inv)
            pending.gamma_inv.append(gamma_inv)
            pending.pi = pi
            oks += [ok_o, ok_g]
        finite = torch.isfinite(omega).all() & torch.isfinite(gamma).all()
        self._pending = pending
        return torch.stack([finite, *oks])

    def commit(self, flags: Sequence[bool]) -> None:
        """Install each candidate's inverses; a failed Cholesky is redone by the fallback (one warning).

        A candidate that cannot be inverted (non-finite factors, or the fallback failed too):
        candidate 0 keeps the previous inverse (``I / t`` if there is none), the others reuse
        candidate 0's, each with a warning.
        """
        pending, self._pending = self._pending, None
        assert pending is not None and pending.pi is not None, "commit() without prepare()"
        finite = bool(flags[0])
        store, device = pending.factor.dtype, pending.factor.device
        fits: list[tuple[Tensor, Tensor] | None] = []
        for i, total in enumerate(pending.totals):
            ok_o, ok_g = flags[1 + 2 * i], flags[2 + 2 * i]
            omega_inv: Tensor | None = pending.omega_inv[i]
            gamma_inv: Tensor | None = pending.gamma_inv[i]
            notes = []
            if finite and not ok_o:
                omega_inv, note = kron_math.inverse_fallback(pending.omega_d[i], self.shape.omega_diagonal)
                notes.append(f"Omega: {note}")
            if finite and not ok_g:
                gamma_inv, note = kron_math.inverse_fallback(pending.gamma_d[i], self.shape.gamma_diagonal)
                notes.append(f"Gamma: {note}")
            if not finite or omega_inv is None or gamma_inv is None:
                fits.append(None)
                if i == 0:
                    self._keep_previous(total, store, device, reason="; ".join(notes))
                else:
                    warn(
                        f"kfc: layer {self.name!r}: {'; '.join(notes) or 'factor contains NaN/inf'} "
                        f"(damping candidate {i}); using candidate 0's inverse"
                    )
                continue
            if notes:
                warn(
                    f"kfc: layer {self.name!r}: damped factor not positive definite (Cholesky failed); "
                    f"inverted by fallback ({'; '.join(notes)})"
                )
            if i == 0:
                self.omega_inv, self.gamma_inv, self.pi = omega_inv.to(store), gamma_inv.to(store), pending.pi
                self.damping_total = torch.tensor(total, dtype=store, device=omega_inv.device)
            fits.append((omega_inv.to(store), gamma_inv.to(store)))
        assert self.omega_inv is not None and self.gamma_inv is not None
        first = (self.omega_inv, self.gamma_inv)
        self._extra = [fit if fit is not None else first for fit in fits[1:]]
        self._extra_totals = [
            total if fit is not None else float(self.damping_total)  # type: ignore[arg-type]
            for total, fit in zip(pending.totals[1:], fits[1:], strict=True)
        ]

    def select(self, index: int) -> None:
        """Make candidate ``index`` of the last fit candidate 0 (no refit); drop the others."""
        if index:
            self.omega_inv, self.gamma_inv = self._extra[index - 1]
            assert self.omega_inv is not None
            self.damping_total = torch.tensor(
                self._extra_totals[index - 1], dtype=self.omega_inv.dtype, device=self.omega_inv.device
            )
        self._extra, self._extra_totals = [], []

    def _install_identity(self, total: float, store: torch.dtype, device: torch.device) -> None:
        # (I/sqrt(t)) ⊗ (I/sqrt(t)) = I/t: the damped curvature of a zero block.
        scale = 1.0 / math.sqrt(total) if total > 0 else 1.0
        self.omega_inv = self.shape.identity("omega", scale, store, device)
        self.gamma_inv = self.shape.identity("gamma", scale, store, device)
        self.pi = torch.ones(self.shape.lead, dtype=store, device=device)

    def apply(self, grad: Tensor, index: int = 0) -> Tensor:
        """``Gamma_d^{-1} G Omega_d^{-1}`` (Eqn 29) for damping candidate ``index``, in the stored dtype."""
        if self.omega_inv is None or self.gamma_inv is None:
            raise RuntimeError(f"kfc: layer {self.name!r} has no inverses; call update_inverses() first")
        omega_inv, gamma_inv = (self.omega_inv, self.gamma_inv) if index == 0 else self._extra[index - 1]
        return kron_math.kron_solve_pi(
            grad.to(omega_inv.dtype),
            gamma_inv,
            omega_inv,
            gamma_diagonal=self.shape.gamma_diagonal,
            omega_diagonal=self.shape.omega_diagonal,
        )

    def summary(self) -> dict[str, Tensor]:
        """``pi`` (Eqn 10) of the last fit (the mean over groups for a grouped block)."""
        return {} if self.pi is None else {"pi": self.pi.mean()}


@dataclass
class _EigenPending:
    omega: Tensor
    gamma: Tensor
    totals: list[float]
    compute_dtype: torch.dtype | None


class EigenInverse(KroneckerInverse):
    """Exact damping through both factors' eigendecompositions (Eqns 39-44).

    ``d`` are clamped to ``>= 0`` (:func:`~kfcrun.curvature.kron_math.eigh_psd`), so the
    denominator ``d_G d_O^T + t`` is at least ``t > 0``. The decomposition does not depend
    on the damping, so any number of totals costs one fit. A diagonal factor is its own
    eigendecomposition (``Q = I``, stored as ``None``).
    """

    mode = DampingMode.EXACT
    state_keys = ("d_omega", "q_omega", "d_gamma", "q_gamma", "damping_total")
    needs_positive_total = True

    def __init__(
        self,
        name: str,
        omega_dim: int,
        gamma_dim: int,
        *,
        groups: int = 1,
        omega_diagonal: bool = False,
        gamma_diagonal: bool = False,
    ) -> None:
        super().__init__(
            name,
            omega_dim,
            gamma_dim,
            groups=groups,
            omega_diagonal=omega_diagonal,
            gamma_diagonal=gamma_diagonal,
        )
        self.d_omega: Tensor | None = None
        self.q_omega: Tensor | None = None
        self.d_gamma: Tensor | None = None
        self.q_gamma: Tensor | None = None
        #: Totals of candidates 1.. of the last fit, as 0-d tensors.
        self._extra: list[Tensor] = []
        self._pending: _EigenPending | None = None
        self._warned_conditioning = False

    @property
    def ready(self) -> bool:
        """Whether both factors' eigendecompositions are installed (``Q = None`` for a diagonal one)."""
        return (
            self.d_omega is not None
            and self.d_gamma is not None
            and (self.q_omega is not None or self.shape.omega_diagonal)
            and (self.q_gamma is not None or self.shape.gamma_diagonal)
        )

    def _prepare(
        self, omega: Tensor, gamma: Tensor, totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        """Keep the factors for :meth:`commit`; returns one flag, whether both factors are finite (no sync).

        The decomposition does not depend on ``totals``, so nothing is computed per total here.
        """
        # eigh needs finite input and syncs anyway; it runs in commit(), after the flags are read.
        self._pending = _EigenPending(omega, gamma, list(totals), compute_dtype)
        return (torch.isfinite(omega).all() & torch.isfinite(gamma).all()).reshape(1)

    def commit(self, flags: Sequence[bool]) -> None:
        """Eigendecompose both factors (``d`` clamped to ``>= 0``) in the compute dtype and install them.

        Non-finite factors, or an eigendecomposition that fails to converge, keep the previous
        decomposition (or, when there is none, install a zero block's: ``Q = I``, ``d = 0``, so the
        solve is ``G / t``), with one warning.
        """
        pending, self._pending = self._pending, None
        assert pending is not None, "commit() without prepare()"
        omega, gamma = pending.omega, pending.gamma
        store, total = omega.dtype, pending.totals[0]
        eig = None
        if flags[0]:
            try:
                dt = pending.compute_dtype if pending.compute_dtype is not None else omega.dtype
                eig = (
                    *kron_math.eigh_psd(omega.to(dt), self.shape.omega_diagonal),
                    *kron_math.eigh_psd(gamma.to(dt), self.shape.gamma_diagonal),
                )
            except RuntimeError as err:  # eigh failed to converge
                self._keep_previous(total, store, omega.device, reason=f"eigendecomposition failed ({err})")
        else:
            self._keep_previous(total, store, omega.device)
        if eig is not None:
            self.d_omega, self.q_omega, self.d_gamma, self.q_gamma = (
                None if t is None else t.to(store) for t in eig
            )
            self.damping_total = torch.tensor(total, dtype=store, device=omega.device)
            self.check_conditioning(eig[0], eig[2], total, store)
        self._extra = [torch.tensor(t, dtype=store, device=omega.device) for t in pending.totals[1:]]

    def select(self, index: int) -> None:
        """Make candidate ``index`` of the last fit candidate 0 (no refit); drop the others."""
        if index:
            self.damping_total = self._extra[index - 1]
        self._extra = []

    def check_conditioning(self, d_omega: Tensor, d_gamma: Tensor, total: float, store: torch.dtype) -> float:
        """Warn, once per layer, if the damped block is beyond what ``store`` resolves; return ``kappa``.

        The damped block's eigenvalues are ``d_G,i d_O,j + t`` (``t = λ + γ``), from
        ``>= t`` up to ``max d_G max d_O + t``, so its condition number is at most
        ``kappa = (max d_G max d_O + t) / t``. Eigenvalues below ``eps * max d_G max d_O``
        (``eps`` of the stored dtype) are rounding error, not curvature; ``kappa > 1/eps``
        means ``t`` is below that level and the solve scales those noise directions of the
        gradient by up to ``1/t`` (a damping of 1e-12 sent the loss to 1e16 in 5 steps).
        One host read per inverse update.
        """
        largest = float(d_omega.max()) * float(d_gamma.max())
        kappa = (largest + total) / total
        limit = 1.0 / torch.finfo(store).eps
        if kappa > limit and not self._warned_conditioning:
            self._warned_conditioning = True
            warn(
                f"kfc: layer {self.name!r}: the damped block is ill-conditioned (condition number "
                f"{kappa:.2g} > 1/eps = {limit:.2g} in {store}): λ + γ = {total:.3g} is below the rounding "
                f"level of its largest curvature {largest:.3g}, so directions the factors cannot resolve are "
                "scaled by up to 1/(λ + γ); raise the damping γ"
            )
        return kappa

    def _install_identity(self, total: float, store: torch.dtype, device: torch.device) -> None:
        shape = self.shape
        self.q_omega = None if shape.omega_diagonal else shape.identity("omega", 1.0, store, device)
        self.q_gamma = None if shape.gamma_diagonal else shape.identity("gamma", 1.0, store, device)
        self.d_omega = torch.zeros(*shape.lead, self.omega_dim, dtype=store, device=device)
        self.d_gamma = torch.zeros(*shape.lead, self.gamma_dim, dtype=store, device=device)

    def apply(self, grad: Tensor, index: int = 0) -> Tensor:
        """``Q_G [(Q_G^T G Q_O) / (d_G d_O^T + t)] Q_O^T`` (Eqns 42-44), ``t`` of candidate ``index``."""
        if not self.ready or self.d_omega is None or self.d_gamma is None:
            raise RuntimeError(
                f"kfc: layer {self.name!r} has no eigendecomposition; call update_inverses() first"
            )
        total = self.damping_total if index == 0 else self._extra[index - 1]
        assert total is not None
        return kron_math.kron_solve_eigen(
            grad.to(self.d_omega.dtype), self.q_gamma, self.d_gamma, self.q_omega, self.d_omega, total
        )

    def summary(self) -> dict[str, Tensor]:
        """The largest eigenvalue of each factor."""
        if self.d_omega is None or self.d_gamma is None:
            return {}
        return {"eig_max_omega": self.d_omega.max(), "eig_max_gamma": self.d_gamma.max()}


#: Strategy class per damping mode.
STRATEGIES: dict[DampingMode, type[KroneckerInverse]] = {
    DampingMode.PI: PiCholeskyInverse,
    DampingMode.EXACT: EigenInverse,
}


def make_inverse(
    mode: DampingMode | str,
    name: str,
    omega_dim: int,
    gamma_dim: int,
    *,
    groups: int = 1,
    omega_diagonal: bool = False,
    gamma_diagonal: bool = False,
) -> KroneckerInverse:
    """The strategy for ``mode`` (see :data:`STRATEGIES`) and the block's :class:`KroneckerShape`."""
    return STRATEGIES[DampingMode.parse(mode, "damping_mode")](
        name,
        omega_dim,
        gamma_dim,
        groups=groups,
        omega_diagonal=omega_diagonal,
        gamma_diagonal=gamma_diagonal,
    )


@dataclass
class _UnitPending:
    fisher: Tensor
    totals: list[float]
    damped: list[Tensor] = field(default_factory=list)
    inverse: list[Tensor] = field(default_factory=list)


class UnitwiseInverse(DampedInverse):
    """Exact damping of ``P`` independent ``d x d`` blocks: ``(F_p + (λ + γ) I)^{-1}``.

    The factor is one tensor ``(P, d, d)`` (``d <= 2`` for a normalization layer's scale
    and shift of one channel). Inverted by batched Cholesky; a failure (only possible
    with ``λ + γ = 0``) takes a batched eigendecomposition with eigenvalues
    clamped from below. The solve multiplies each unit's ``d``-vector by its inverse.
    """

    state_keys = ("inverse", "damping_total")

    def __init__(self, name: str, units: int, dim: int) -> None:
        super().__init__(name)
        self.units, self.dim = units, dim
        self.inverse: Tensor | None = None
        self._extra: list[Tensor] = []
        self._extra_totals: list[Tensor | None] = []
        self._pending: _UnitPending | None = None

    @property
    def ready(self) -> bool:
        """Whether the per-unit inverses are installed."""
        return self.inverse is not None

    def prepare(
        self, factors: Sequence[Tensor], totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        """Batched Cholesky inverses of ``F_p + t I`` for every total ``t``; flags ``[finite, ok per t]``."""
        (fisher,) = factors
        dt = compute_dtype if compute_dtype is not None else fisher.dtype
        pending = _UnitPending(fisher, list(totals))
        oks = []
        eye = torch.eye(self.dim, dtype=dt, device=fisher.device)
        for total in totals:
            damped = kron_math.symmetrize(fisher.to(dt)) + total * eye
            inverse, ok = kron_math.cholesky_inverse_fast(damped)
            pending.damped.append(damped)
            pending.inverse.append(inverse)
            oks.append(ok)
        self._pending = pending
        return torch.stack([torch.isfinite(fisher).all(), *oks])

    def commit(self, flags: Sequence[bool]) -> None:
        """Install the inverses; a failed Cholesky takes the clamped eigendecomposition (one warning)."""
        pending, self._pending = self._pending, None
        assert pending is not None, "commit() without prepare()"
        store, device = pending.fisher.dtype, pending.fisher.device
        fits: list[Tensor | None] = []
        for i, total in enumerate(pending.totals):
            inverse: Tensor | None = pending.inverse[i]
            if not flags[0]:
                inverse = None
            elif not flags[1 + i]:
                inverse = _clamped_eigen_inverse(pending.damped[i])
                warn(
                    f"kfc: layer {self.name!r}: damped unit blocks not positive definite; "
                    "inverted with eigenvalues clamped from below"
                )
            if inverse is None:
                fits.append(None)
                if i == 0:
                    self._keep_previous(total, store, device)
                continue
            if i == 0:
                self.inverse = inverse.to(store)
                self.damping_total = torch.tensor(total, dtype=store, device=device)
            fits.append(inverse.to(store))
        assert self.inverse is not None
        self._extra = [fit if fit is not None else self.inverse for fit in fits[1:]]
        self._extra_totals = [
            torch.tensor(t, dtype=store, device=device) if fit is not None else self.damping_total
            for t, fit in zip(pending.totals[1:], fits[1:], strict=True)
        ]

    def select(self, index: int) -> None:
        """Make candidate ``index`` of the last fit candidate 0 (no refit); drop the others."""
        if index:
            self.inverse = self._extra[index - 1]
            self.damping_total = self._extra_totals[index - 1]
        self._extra, self._extra_totals = [], []

    def _install_identity(self, total: float, store: torch.dtype, device: torch.device) -> None:
        scale = 1.0 / total if total > 0 else 1.0
        eye = torch.eye(self.dim, dtype=store, device=device) * scale
        self.inverse = eye.expand(self.units, self.dim, self.dim).clone()

    def apply(self, grad: Tensor, index: int = 0) -> Tensor:
        """``(F_p + t I)^{-1} g_p`` for every unit ``p`` of ``grad`` ``(P, d)``."""
        if self.inverse is None:
            raise RuntimeError(f"kfc: layer {self.name!r} has no inverses; call update_inverses() first")
        inverse = self.inverse if index == 0 else self._extra[index - 1]
        return (inverse @ grad.to(inverse.dtype).unsqueeze(-1)).squeeze(-1)

    def summary(self) -> dict[str, Tensor]:
        """Nothing to report: the unit blocks are damped exactly."""
        return {}


def _clamped_eigen_inverse(mat: Tensor) -> Tensor:
    """Batched inverse of symmetric ``(P, d, d)`` with eigenvalues clamped to ``>= 1e-12 * max``."""
    evals, evecs = torch.linalg.eigh(kron_math.symmetrize(mat.to(torch.float64)))
    floor = max(float(evals.abs().max()) * 1e-12 if evals.numel() else 1.0, 1e-30)
    inv = (evecs / evals.clamp(min=floor).unsqueeze(-2)) @ evecs.mT
    return inv.to(mat.dtype)
