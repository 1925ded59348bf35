"""KFCCurvature: running KFC factors, their damped inverses, and preconditioning (Eqns 28-33, 39-44).

Knows nothing about learning rates or momentum. The optimizer calls, per
Algorithm 1 (Appendix A.1):

1. ``update_statistics(x, init=True)`` on a large subset before training (may be
   called repeatedly: the initialisation batches are averaged with equal weight);
2. ``update_statistics(x)`` every ``T_s`` iterations (EMA, Eqn 33);
3. ``update_inverses(gamma, lam)`` every ``T_f`` iterations;
4. ``precondition({name: G})`` every iteration, with ``G = [grad_b | grad_W.flatten(1)]``
   (build it with :meth:`KFCCurvature.combined_grads` or :func:`~kfcrun.curvature.blocks.combined_grad`,
   take it apart with :func:`~kfcrun.curvature.blocks.split_update`).

Damping (``lam`` = weight decay of the layer, ``gamma`` = damping):

* ``damping_mode="pi"`` (Eqn 28): ``(Omega + pi sqrt(lam+gamma) I) ⊗ (Gamma + sqrt(lam+gamma)/pi I)``,
  ``pi`` the trace-norm ratio (Eqn 10); result ``Gamma_d^{-1} G Omega_d^{-1}`` (Eqn 29).
* ``damping_mode="exact"`` (Eqns 39-44): ``(Omega ⊗ Gamma + (lam+gamma) I)^{-1} vec(G)`` through
  the eigendecompositions of both factors (needs ``lam + gamma > 0``).

Robustness: factors are symmetrised and inverted in ``inverse_dtype`` (float64 by
default) with Cholesky; a failed Cholesky retries with jitter, then float64, then an
eigendecomposition with clamped eigenvalues, and warns once naming the layer. A
non-finite factor never reaches the parameters: the previous inverse is kept (or a
``1/(lam+gamma)``-scaled identity if there is none) with a warning. The hot path
does one host sync per ``update_inverses`` call (all layers' success flags at once)
and none in ``update_statistics``/``precondition``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from . import kron_math
from .blocks import KroneckerBlock, make_block, tracked_modules
from .factors import compute_block_estimates
from .fisher import FISHER_TYPES, make_loss_fn

__all__ = ["DAMPING_MODES", "KFCCurvature", "KFCCurvatureWarning"]

DAMPING_MODES = ("pi", "exact")
_STATE_FORMAT = 1


class KFCCurvatureWarning(RuntimeWarning):
    """A factor could not be used as is (inversion fallback, non-finite values, unused layer)."""


def _warn(message: str) -> None:
    """Warn, attributing the warning to the first caller outside this package."""
    here = os.path.dirname(__file__)
    frame, level = sys._getframe(1), 2
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == here:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, KFCCurvatureWarning, stacklevel=level)


class KFCCurvature:
    """Kronecker-factored curvature (KFC) of every Conv2d/Linear in ``model``.

    Args:
        model: maps inputs to logits (class dim 1).
        stat_decay: ``xi`` of the running averages (Eqn 33), in ``[0, 1)``.
        damping_mode: ``"pi"`` (Eqn 28, factored) or ``"exact"`` (Eqns 39-44).
        fisher_type: ``"true"`` (targets sampled from the model, the paper's choice),
            ``"expected"`` (exact expectation over targets; ``C`` backward passes) or
            ``"empirical"`` (training labels; needs ``targets``).
        stats_batch_fraction: statistics use only the FIRST ``ceil(f * M)`` examples of
            each batch passed to :meth:`update_statistics` (at least one). Cost scales
            with ``f``; the estimate is noisier (fewer examples), unbiased if batches are
            shuffled. ``M`` in Eqn 32 is then that subset's size.
        chunk_size: examples per chunk of the conv patch expansion (memory bound);
            ``None`` picks it from :data:`kron_math.DEFAULT_PATCH_BUDGET_BYTES`.
        inverse_dtype: dtype the damped inverses / eigendecompositions are computed in
            (``None``: the factors' dtype). Results are stored in the factors' dtype.
        approx: ``"kfc"`` or ``"sua"``: the conv Omega model (see
            :class:`~kfcrun.curvature.blocks.Conv2dBlock`).

    Attributes:
        layers: ``name -> block`` for every Conv2d/Linear, in ``named_modules`` order.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        stat_decay: float = 0.95,
        damping_mode: str = "pi",
        fisher_type: str = "true",
        stats_batch_fraction: float = 1.0,
        chunk_size: int | None = None,
        inverse_dtype: torch.dtype | None = torch.float64,
        approx: str = "kfc",
    ) -> None:
        if not 0.0 <= stat_decay < 1.0:
            raise ValueError(f"stat_decay must be in [0, 1), got {stat_decay}")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        if not 0.0 < stats_batch_fraction <= 1.0:
            raise ValueError(f"stats_batch_fraction must be in (0, 1], got {stats_batch_fraction}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.model = model
        self.stat_decay = stat_decay
        self.damping_mode = damping_mode
        self.fisher_type = fisher_type
        self.stats_batch_fraction = stats_batch_fraction
        self.chunk_size = chunk_size
        self.inverse_dtype = inverse_dtype
        self.layers: dict[str, KroneckerBlock] = {
            name: make_block(name, m, approx=approx) for name, m in tracked_modules(model).items()
        }
        self.num_init_batches = 0  # initialisation batches averaged into the factors
        self.num_ema_updates = 0  # Eqn 33 updates since the initialisation
        self.num_inverse_updates = 0
        self._warned_unused: set[str] = set()

    # -- statistics ---------------------------------------------------------------------------
    def stats_subset_size(self, batch_size: int) -> int:
        """Examples used for statistics out of a batch of ``batch_size``: ``max(1, ceil(f * M))``."""
        return max(1, math.ceil(self.stats_batch_fraction * batch_size - 1e-9))

    def update_statistics(
        self,
        inputs: Tensor,
        targets: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        init: bool = False,
    ) -> dict[str, float | Tensor]:
        """Estimate ``Omega_hat, Gamma_hat`` (Eqn 32) on ``inputs`` and fold them into the factors.

        ``init=True`` (Algorithm 1's initialisation): consecutive ``init=True`` calls average
        their estimates with equal weight per call; the first of a run of them overwrites
        the factors. ``init=False``: ``Omega <- xi Omega + (1-xi) Omega_hat`` (Eqn 33); the
        very first update of a layer, init or not, sets its factors directly.
        Targets: sampled from the model with ``generator`` (``"true"``), the expectation
        (``"expected"``) or ``targets`` (``"empirical"``, required then).

        Returns ``time/kfc_stats_s`` (wall seconds, no device sync), ``kfc/stats_examples``
        and ``kfc/stats_nonfinite`` (0-d tensor: layers whose estimate was non-finite and skipped).
        """
        start = time.perf_counter()
        m = self.stats_subset_size(inputs.shape[0])
        inputs = inputs[:m]
        if targets is not None:
            targets = targets[:m]
        loss_fn = make_loss_fn(self.fisher_type, targets=targets, generator=generator)
        estimates = compute_block_estimates(
            self.model, inputs, loss_fn, self.layers, chunk_size=self.chunk_size
        )

        oks: list[Tensor] = []
        for name, (omega_hat, gamma_hat) in estimates.items():
            block = self.layers[name]
            if init:
                oks.append(block.accumulate_init(omega_hat, gamma_hat, self.num_init_batches))
            else:
                oks.append(block.update_ema(omega_hat, gamma_hat, self.stat_decay))
        for name in [n for n in self.layers if n not in estimates]:
            if name not in self._warned_unused:
                self._warned_unused.add(name)
                _warn(f"kfc: layer {name!r} did not run in the statistics forward pass; factors not updated")
        if init:
            self.num_init_batches += 1
        else:
            # The next init=True call starts a fresh initialisation.
            self.num_init_batches = 0
            self.num_ema_updates += 1
        nonfinite = (~torch.stack(oks)).sum() if oks else torch.zeros((), dtype=torch.long)
        return {
            "time/kfc_stats_s": time.perf_counter() - start,
            "kfc/stats_examples": float(m),
            "kfc/stats_nonfinite": nonfinite,
        }

    # -- inverses -----------------------------------------------------------------------------
    def _weight_decays(self, weight_decay: Mapping[str, float] | float) -> dict[str, float]:
        if isinstance(weight_decay, Mapping):
            missing = [n for n in self.layers if n not in weight_decay]
            if missing:
                raise ValueError(f"weight_decay has no entry for layers {missing}")
            return {n: float(weight_decay[n]) for n in self.layers}
        return dict.fromkeys(self.layers, float(weight_decay))

    def _factors_or_zero(self, block: KroneckerBlock) -> tuple[Tensor, Tensor]:
        if block.omega is not None and block.gamma is not None:
            return block.omega, block.gamma
        if self.num_init_batches == 0 and self.num_ema_updates == 0:
            raise RuntimeError("KFCCurvature.update_inverses() called before any update_statistics()")
        # No data ever reached this layer: its Fisher block is 0, the damped curvature (lam+gamma) I.
        weight = block.module.weight
        dtype = kron_math.accumulation_dtype(weight.dtype)
        zeros = [
            torch.zeros(d, d, dtype=dtype, device=weight.device) for d in (block.omega_dim, block.gamma_dim)
        ]
        return zeros[0], zeros[1]

    def update_inverses(self, damping: float, weight_decay: Mapping[str, float] | float) -> dict[str, Tensor]:
        """Recompute the inverse-side state of every layer from the current factors.

        ``damping`` is ``gamma``; ``weight_decay`` is ``lam``, one float for all layers or
        a ``{name: lam}`` dict covering every layer. Mode ``"pi"``: damped inverses of both
        factors (Eqn 28); mode ``"exact"``: eigendecompositions (Eqns 39-44).
        Returns 0-d tensors: ``kfc/pi/<name>`` (pi mode) or ``kfc/eig_max_omega/<name>``
        and ``kfc/eig_max_gamma/<name>`` (exact mode), plus ``time/kfc_inverse_s``.
        """
        start = time.perf_counter()
        lams = self._weight_decays(weight_decay)
        totals = {name: lams[name] + float(damping) for name in self.layers}
        for name, total in totals.items():
            if not math.isfinite(total) or total < 0:
                raise ValueError(f"lam + gamma must be finite and >= 0, got {total} for layer {name!r}")
            if self.damping_mode == "exact" and total <= 0:
                raise ValueError(
                    f"damping_mode='exact' needs lam + gamma > 0, got {total} for layer {name!r}"
                )
        if self.damping_mode == "pi":
            stats = self._update_inverses_pi(totals)
        else:
            stats = self._update_inverses_exact(totals)
        self.num_inverse_updates += 1
        stats["time/kfc_inverse_s"] = torch.tensor(time.perf_counter() - start)
        return stats

    def _compute_dtype(self, factor: Tensor) -> torch.dtype:
        return self.inverse_dtype if self.inverse_dtype is not None else factor.dtype

    def _update_inverses_pi(self, totals: dict[str, float]) -> dict[str, Tensor]:
        # First pass: every layer's fast (sync-free) Cholesky inverses and success flags.
        pending: dict[str, dict[str, Tensor]] = {}
        for name, block in self.layers.items():
            omega, gamma = self._factors_or_zero(block)
            dt = self._compute_dtype(omega)
            omega_d, gamma_d, pi = kron_math.damped_factors(omega.to(dt), gamma.to(dt), totals[name])
            omega_inv, ok_o = kron_math.cholesky_inverse_fast(omega_d)
            gamma_inv, ok_g = kron_math.cholesky_inverse_fast(gamma_d)
            finite = torch.isfinite(omega).all() & torch.isfinite(gamma).all()
            pending[name] = {
                "factor": omega,
                "omega_d": omega_d,
                "gamma_d": gamma_d,
                "omega_inv": omega_inv,
                "gamma_inv": gamma_inv,
                "pi": pi,
                "flags": torch.stack([finite, ok_o, ok_g]),
            }
        flags = self._sync_flags([p["flags"] for p in pending.values()])

        # Second pass: install the results; failures take the slow path.
        stats: dict[str, Tensor] = {}
        for (name, p), (finite, ok_o, ok_g) in zip(pending.items(), flags, strict=True):
            block, total = self.layers[name], totals[name]
            store = p["factor"].dtype  # inverses are stored in the factors' dtype
            omega_inv, gamma_inv = p["omega_inv"], p["gamma_inv"]
            notes = []
            if finite and not ok_o:
                omega_inv, note = kron_math.inverse_fallback(p["omega_d"])
                notes.append(f"Omega: {note}")
            if finite and not ok_g:
                gamma_inv, note = kron_math.inverse_fallback(p["gamma_d"])
                notes.append(f"Gamma: {note}")
            if not finite or omega_inv is None or gamma_inv is None:
                self._keep_previous(block, total, store, reason="; ".join(notes))
            else:
                if notes:
                    _warn(
                        f"kfc: layer {name!r}: damped factor not positive definite (Cholesky failed); "
                        f"inverted by fallback ({'; '.join(notes)})"
                    )
                block.omega_inv, block.gamma_inv, block.pi = omega_inv.to(store), gamma_inv.to(store), p["pi"]
                block.damping_total = torch.tensor(total, dtype=store, device=omega_inv.device)
            stats[f"kfc/pi/{name}"] = block.pi if block.pi is not None else p["pi"]
        return stats

    def _update_inverses_exact(self, totals: dict[str, float]) -> dict[str, Tensor]:
        factors = {name: self._factors_or_zero(block) for name, block in self.layers.items()}
        finite_flags = [torch.isfinite(o).all() & torch.isfinite(g).all() for o, g in factors.values()]
        flags = self._sync_flags([f.reshape(1) for f in finite_flags])
        stats: dict[str, Tensor] = {}
        for (name, block), (finite,) in zip(self.layers.items(), flags, strict=True):
            omega, gamma = factors[name]
            store = omega.dtype
            eig = None
            if finite:
                try:
                    dt = self._compute_dtype(omega)
                    eig = (*kron_math.eigh_psd(omega.to(dt)), *kron_math.eigh_psd(gamma.to(dt)))
                except RuntimeError as err:  # eigh failed to converge
                    self._keep_previous(
                        block, totals[name], store, reason=f"eigendecomposition failed ({err})"
                    )
            else:
                self._keep_previous(block, totals[name], store)
            if eig is not None:
                d_o, q_o, d_g, q_g = (t.to(store) for t in eig)
                block.d_omega, block.q_omega, block.d_gamma, block.q_gamma = d_o, q_o, d_g, q_g
                block.damping_total = torch.tensor(totals[name], dtype=store, device=omega.device)
            if block.d_omega is not None and block.d_gamma is not None:
                stats[f"kfc/eig_max_omega/{name}"] = block.d_omega.max()
                stats[f"kfc/eig_max_gamma/{name}"] = block.d_gamma.max()
        return stats

    @staticmethod
    def _sync_flags(flags: list[Tensor]) -> list[list[bool]]:
        """All layers' success flags in ONE host sync."""
        if not flags:
            return []
        device = flags[0].device
        return torch.stack([f.to(device) for f in flags]).tolist()

    def _keep_previous(
        self, block: KroneckerBlock, total: float, store: torch.dtype, reason: str = ""
    ) -> None:
        """Leave the last good inverse in place, or install the identity fallback if there is none."""
        why = reason or "factor contains NaN/inf"
        has_previous = (
            block.omega_inv is not None and block.gamma_inv is not None
            if self.damping_mode == "pi"
            else block.q_omega is not None and block.q_gamma is not None
        )
        if has_previous:
            _warn(f"kfc: layer {block.name!r}: {why}; keeping the previous inverse")
            return
        _warn(f"kfc: layer {block.name!r}: {why}; no previous inverse, using identity / (lam+gamma)")
        device = block.module.weight.device
        eye_o = torch.eye(block.omega_dim, dtype=store, device=device)
        eye_g = torch.eye(block.gamma_dim, dtype=store, device=device)
        if self.damping_mode == "pi":
            # (I/sqrt(lam+gamma)) ⊗ (I/sqrt(lam+gamma)) = I/(lam+gamma): damped curvature of a zero block.
            scale = 1.0 / math.sqrt(total) if total > 0 else 1.0
            block.omega_inv, block.gamma_inv = eye_o * scale, eye_g * scale
            block.pi = torch.ones((), dtype=store, device=device)
        else:
            block.q_omega, block.q_gamma = eye_o, eye_g
            block.d_omega = torch.zeros(block.omega_dim, dtype=store, device=device)
            block.d_gamma = torch.zeros(block.gamma_dim, dtype=store, device=device)
        block.damping_total = torch.tensor(total, dtype=store, device=device)

    # -- preconditioning ----------------------------------------------------------------------
    def combined_grads(self) -> dict[str, Tensor]:
        """``{name: [grad_b | grad_W.flatten(1)]}`` from the layers' current ``.grad``."""
        return {name: block.combined_grad() for name, block in self.layers.items()}

    def precondition(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Apply the inverse damped Fisher block of each layer to its combined gradient ``G``.

        ``grads[name]`` has shape ``I x omega_dim``. Pi mode: ``Gamma_d^{-1} G Omega_d^{-1}``
        (Eqn 29); exact mode: ``Q_G [(Q_G^T G Q_O) / (d_G d_O^T + lam + gamma)] Q_O^T``
        (Eqns 42-44). Returns tensors of the same shape and dtype as the inputs.
        """
        out: dict[str, Tensor] = {}
        for name, grad in grads.items():
            block = self.layers.get(name)
            if block is None:
                raise KeyError(f"kfc: no KFC layer named {name!r}; known: {list(self.layers)}")
            expected = (block.gamma_dim, block.omega_dim)
            if tuple(grad.shape) != expected:
                raise ValueError(
                    f"kfc: gradient for {name!r} has shape {tuple(grad.shape)}, expected {expected}"
                )
            if self.damping_mode == "pi":
                if block.omega_inv is None or block.gamma_inv is None:
                    raise RuntimeError(f"kfc: layer {name!r} has no inverses; call update_inverses() first")
                res = kron_math.kron_solve_pi(
                    grad.to(block.omega_inv.dtype), block.gamma_inv, block.omega_inv
                )
            else:
                if (
                    block.q_omega is None
                    or block.q_gamma is None
                    or block.d_omega is None
                    or block.d_gamma is None
                ):
                    raise RuntimeError(
                        f"kfc: layer {name!r} has no eigendecomposition; call update_inverses() first"
                    )
                assert block.damping_total is not None
                res = kron_math.kron_solve_eigen(
                    grad.to(block.q_omega.dtype),
                    block.q_gamma,
                    block.d_gamma,
                    block.q_omega,
                    block.d_omega,
                    block.damping_total,
                )
            out[name] = res.to(grad.dtype)
        return out

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Factors, inverse-side state and counters (tensors cloned; loads back bitwise)."""
        return {
            "format": _STATE_FORMAT,
            "damping_mode": self.damping_mode,
            "fisher_type": self.fisher_type,
            "num_init_batches": self.num_init_batches,
            "num_ema_updates": self.num_ema_updates,
            "num_inverse_updates": self.num_inverse_updates,
            "layers": {name: block.state_dict() for name, block in self.layers.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Layer names and ``damping_mode`` must match this object."""
        if state_dict.get("format") != _STATE_FORMAT:
            raise ValueError(f"kfc: unknown KFCCurvature state format {state_dict.get('format')!r}")
        if state_dict["damping_mode"] != self.damping_mode:
            raise ValueError(
                f"kfc: state was saved with damping_mode={state_dict['damping_mode']!r}, "
                f"this object uses {self.damping_mode!r}"
            )
        layers = state_dict["layers"]
        if list(layers) != list(self.layers):
            raise ValueError(f"kfc: state has layers {list(layers)}, the model has {list(self.layers)}")
        for name, block in self.layers.items():
            block.load_state_dict(layers[name])
        self.num_init_batches = int(state_dict["num_init_batches"])
        self.num_ema_updates = int(state_dict["num_ema_updates"])
        self.num_inverse_updates = int(state_dict["num_inverse_updates"])
