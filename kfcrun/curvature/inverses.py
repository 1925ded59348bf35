"""Damping strategies: how a Kronecker block's damped inverse is fitted and applied.

A block's Fisher approximation is ``Omega ⊗ Gamma`` (Eqn 25); what an optimizer needs
is the solve ``(Omega ⊗ Gamma + (lambda + gamma) I)^{-1} vec(G)``, approximately or
exactly. Each strategy owns the tensors of its solve and has three operations:

* :meth:`DampedInverse.prepare` - the sync-free part of the fit (no host reads), from
  the factors and one or more damping totals ``lambda + gamma``; returns a 1-d bool
  tensor of success flags. The manager stacks every block's flags and reads them in
  ONE host sync per inverse update;
* :meth:`DampedInverse.commit` - given the flags as Python bools, install the result,
  or take the slow robust path, or keep the previous inverse (each with one warning);
* :meth:`DampedInverse.apply` - the solve for damping candidate ``index``;
* :meth:`DampedInverse.select` - keep candidate ``index`` as candidate 0 (the fit used
  from then on), without refitting: K-FAC keeps the best of its gamma candidates.

Several damping totals can be fitted from the same factors at once (K-FAC compares
``gamma_-, gamma, gamma_+``): the eigen strategy decomposes once and applies any total;
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
layer. A non-finite factor never reaches the parameters: the previous inverse is kept,
or, if there is none, the damped inverse of a zero block, ``I / t``.

Adding a damping mode: subclass :class:`DampedInverse`, implement the three operations
and the state keys, and register it in :data:`STRATEGIES`; nothing else changes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from . import kron_math
from .diagnostics import warn
from .vocabulary import DampingMode

__all__ = ["STRATEGIES", "DampedInverse", "EigenInverse", "PiCholeskyInverse", "make_inverse"]


class DampedInverse(ABC):
    """The damped inverse of one block ``Omega ⊗ Gamma`` (see the module docstring).

    Args:
        name: the layer's name, for warnings and errors.
        omega_dim, gamma_dim: the factors' sizes.
    """

    mode: ClassVar[DampingMode]
    #: Keys of :meth:`state_dict`, each a tensor or ``None``.
    state_keys: ClassVar[tuple[str, ...]]
    #: The strategy needs ``lambda + gamma > 0`` (else ``>= 0``).
    needs_positive_total: ClassVar[bool] = False

    def __init__(self, name: str, omega_dim: int, gamma_dim: int) -> None:
        self.name, self.omega_dim, self.gamma_dim = name, omega_dim, gamma_dim
        #: ``lambda + gamma`` of candidate 0 as a 0-d tensor in the stored dtype.
        self.damping_total: Tensor | None = None

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Whether a solve is available (a fit has been committed or restored)."""

    @abstractmethod
    def prepare(
        self, omega: Tensor, gamma: Tensor, totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        """Start a fit for the damping totals ``lambda + gamma``; return 1-d bool success flags (no sync)."""

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
        """Restore :meth:`state_dict` output bitwise (dtype kept, moved to ``device``); absent keys are ``None``."""
        for key in self.state_keys:
            value = state.get(key)
            setattr(self, key, None if value is None else value.detach().clone().to(device))

    def _keep_previous(self, total: float, store: torch.dtype, device: torch.device, reason: str = "") -> None:
        """Leave the last good inverse in place, or install the identity fallback if there is none."""
        why = reason or "factor contains NaN/inf"
        if self.ready:
            warn(f"kfc: layer {self.name!r}: {why}; keeping the previous inverse")
            return
        warn(f"kfc: layer {self.name!r}: {why}; no previous inverse, using identity / (lam+gamma)")
        self._install_identity(total, store, device)
        self.damping_total = torch.tensor(total, dtype=store, device=device)


def _clone(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach().clone()


@dataclass
class _PiPending:
    factor: Tensor  # Omega as given: its dtype and device are where results are stored
    totals: list[float]
    omega_d: list[Tensor] = field(default_factory=list)
    gamma_d: list[Tensor] = field(default_factory=list)
    omega_inv: list[Tensor] = field(default_factory=list)
    gamma_inv: list[Tensor] = field(default_factory=list)
    pi: Tensor | None = None


class PiCholeskyInverse(DampedInverse):
    """Factored damping with the trace-norm ``pi`` (Eqns 9-10, 28), inverted by Cholesky (Eqn 29)."""

    mode = DampingMode.PI
    state_keys = ("omega_inv", "gamma_inv", "pi", "damping_total")

    def __init__(self, name: str, omega_dim: int, gamma_dim: int) -> None:
        super().__init__(name, omega_dim, gamma_dim)
        self.omega_inv: Tensor | None = None
        self.gamma_inv: Tensor | None = None
        self.pi: Tensor | None = None
        #: Candidates 1.. of the last fit: ``(Omega_d^{-1}, Gamma_d^{-1})``, and their totals.
        self._extra: list[tuple[Tensor, Tensor]] = []
        self._extra_totals: list[float] = []
        self._pending: _PiPending | None = None

    @property
    def ready(self) -> bool:
        return self.omega_inv is not None and self.gamma_inv is not None

    def prepare(
        self, omega: Tensor, gamma: Tensor, totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        dt = compute_dtype if compute_dtype is not None else omega.dtype
        pending = _PiPending(omega, list(totals))
        oks: list[Tensor] = []
        for total in totals:
            omega_d, gamma_d, pi = kron_math.damped_factors(omega.to(dt), gamma.to(dt), total)
            omega_inv, ok_o = kron_math.cholesky_inverse_fast(omega_d)
            gamma_inv, ok_g = kron_math.cholesky_inverse_fast(gamma_d)
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
                omega_inv, note = kron_math.inverse_fallback(pending.omega_d[i])
                notes.append(f"Omega: {note}")
            if finite and not ok_g:
                gamma_inv, note = kron_math.inverse_fallback(pending.gamma_d[i])
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
        self.omega_inv = torch.eye(self.omega_dim, dtype=store, device=device) * scale
        self.gamma_inv = torch.eye(self.gamma_dim, dtype=store, device=device) * scale
        self.pi = torch.ones((), dtype=store, device=device)

    def apply(self, grad: Tensor, index: int = 0) -> Tensor:
        if self.omega_inv is None or self.gamma_inv is None:
            raise RuntimeError(f"kfc: layer {self.name!r} has no inverses; call update_inverses() first")
        omega_inv, gamma_inv = (self.omega_inv, self.gamma_inv) if index == 0 else self._extra[index - 1]
        return kron_math.kron_solve_pi(grad.to(omega_inv.dtype), gamma_inv, omega_inv)

    def summary(self) -> dict[str, Tensor]:
        """``pi`` (Eqn 10) of the last fit."""
        return {} if self.pi is None else {"pi": self.pi}


@dataclass
class _EigenPending:
    omega: Tensor
    gamma: Tensor
    totals: list[float]
    compute_dtype: torch.dtype | None


class EigenInverse(DampedInverse):
    """Exact damping through both factors' eigendecompositions (Eqns 39-44).

    ``d`` are clamped to ``>= 0`` (:func:`~kfcrun.curvature.kron_math.eigh_psd`), so the
    denominator ``d_G d_O^T + t`` is at least ``t > 0``. The decomposition does not depend
    on the damping, so any number of totals costs one fit.
    """

    mode = DampingMode.EXACT
    state_keys = ("d_omega", "q_omega", "d_gamma", "q_gamma", "damping_total")
    needs_positive_total = True

    def __init__(self, name: str, omega_dim: int, gamma_dim: int) -> None:
        super().__init__(name, omega_dim, gamma_dim)
        self.d_omega: Tensor | None = None
        self.q_omega: Tensor | None = None
        self.d_gamma: Tensor | None = None
        self.q_gamma: Tensor | None = None
        #: Totals of candidates 1.. of the last fit, as 0-d tensors.
        self._extra: list[Tensor] = []
        self._pending: _EigenPending | None = None

    @property
    def ready(self) -> bool:
        return all(t is not None for t in (self.d_omega, self.q_omega, self.d_gamma, self.q_gamma))

    def prepare(
        self, omega: Tensor, gamma: Tensor, totals: Sequence[float], compute_dtype: torch.dtype | None
    ) -> Tensor:
        # eigh needs finite input and syncs anyway; it runs in commit(), after the flags are read.
        self._pending = _EigenPending(omega, gamma, list(totals), compute_dtype)
        return (torch.isfinite(omega).all() & torch.isfinite(gamma).all()).reshape(1)

    def commit(self, flags: Sequence[bool]) -> None:
        pending, self._pending = self._pending, None
        assert pending is not None, "commit() without prepare()"
        omega, gamma = pending.omega, pending.gamma
        store, total = omega.dtype, pending.totals[0]
        eig = None
        if flags[0]:
            try:
                dt = pending.compute_dtype if pending.compute_dtype is not None else omega.dtype
                eig = (*kron_math.eigh_psd(omega.to(dt)), *kron_math.eigh_psd(gamma.to(dt)))
            except RuntimeError as err:  # eigh failed to converge
                self._keep_previous(total, store, omega.device, reason=f"eigendecomposition failed ({err})")
        else:
            self._keep_previous(total, store, omega.device)
        if eig is not None:
            self.d_omega, self.q_omega, self.d_gamma, self.q_gamma = (t.to(store) for t in eig)
            self.damping_total = torch.tensor(total, dtype=store, device=omega.device)
        self._extra = [torch.tensor(t, dtype=store, device=omega.device) for t in pending.totals[1:]]

    def select(self, index: int) -> None:
        if index:
            self.damping_total = self._extra[index - 1]
        self._extra = []

    def _install_identity(self, total: float, store: torch.dtype, device: torch.device) -> None:
        self.q_omega = torch.eye(self.omega_dim, dtype=store, device=device)
        self.q_gamma = torch.eye(self.gamma_dim, dtype=store, device=device)
        self.d_omega = torch.zeros(self.omega_dim, dtype=store, device=device)
        self.d_gamma = torch.zeros(self.gamma_dim, dtype=store, device=device)

    def apply(self, grad: Tensor, index: int = 0) -> Tensor:
        if self.q_omega is None or self.q_gamma is None or self.d_omega is None or self.d_gamma is None:
            raise RuntimeError(
                f"kfc: layer {self.name!r} has no eigendecomposition; call update_inverses() first"
            )
        total = self.damping_total if index == 0 else self._extra[index - 1]
        assert total is not None
        return kron_math.kron_solve_eigen(
            grad.to(self.q_omega.dtype), self.q_gamma, self.d_gamma, self.q_omega, self.d_omega, total
        )

    def summary(self) -> dict[str, Tensor]:
        """The largest eigenvalue of each factor."""
        if self.d_omega is None or self.d_gamma is None:
            return {}
        return {"eig_max_omega": self.d_omega.max(), "eig_max_gamma": self.d_gamma.max()}


#: Strategy class per damping mode.
STRATEGIES: dict[DampingMode, type[DampedInverse]] = {
    DampingMode.PI: PiCholeskyInverse,
    DampingMode.EXACT: EigenInverse,
}


def make_inverse(mode: DampingMode | str, name: str, omega_dim: int, gamma_dim: int) -> DampedInverse:
    """The strategy for ``mode`` (see :data:`STRATEGIES`)."""
    return STRATEGIES[DampingMode.parse(mode, "damping_mode")](name, omega_dim, gamma_dim)
