"""KFC as a preconditioner for any ``torch.optim`` optimizer (the way kfac-pytorch is used).

:meth:`KFCPreconditioner.step` replaces the ``.grad`` of every parameter a curvature block
covers with the damped KFC natural gradient::

    grad  <-  (F_hat + damping I)^{-1} grad        # per block: Eqn 29 (pi) or Eqns 39-44 (exact)

and the optimizer then steps on it (SGD, AdamW, ...). The curvature is maintained as in
KFC-pre (Algorithm 1): statistics every ``stats_every`` steps and damped inverses every
``inverse_every`` steps, from the step's inputs (recorded, or passed to ``step``), with
targets sampled from the model (the true Fisher). Parameters without a block keep their
gradient.

Clipping (optional, ``clip=C`` with the optimizer's ``lr``): the exact-Fisher norm of the
step ``lr * grad`` an SGD-like optimizer would take, ``nu = lr^2 grad^T F grad`` (every
trainable parameter, ``F`` the exact Fisher of a fraction of the batch by forward-mode
AD), is kept ``<= C`` by scaling every ``.grad`` by ``min(1, sqrt(C / nu))``. That is
KFC-pre's update clipping (App. A.1) and plays the role of the peers' KL clip; with an
adaptive optimizer (Adam) the real step is not ``lr * grad``, so there it bounds a proxy.

Weight decay belongs to the optimizer: with ``AdamW`` it is decoupled and untouched; with
``SGD(weight_decay=...)`` the L2 gradient is added after the preconditioning (KFC-pre's
``(F + (λ + γ) I)^{-1}(grad + lambda theta)`` is :class:`~kfcrun.optim.KFCPre`).

Gradient accumulation: run ``backward`` on every micro-batch, then one ``step()``; the
statistics cover every micro-batch (see :mod:`kfcrun.optim.curvature_steps`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kfcrun.curvature import (
    DEFAULT_MAX_FACTOR_DIM,
    CurvatureBlock,
    CurvatureSchedule,
    DampingMode,
    FisherType,
    KFCCurvature,
    Likelihood,
    OmegaModel,
    eager_module,
)
from kfcrun.optim.curvature_steps import (
    CurvatureRefresher,
    exact_quadratic,
    leading_examples,
    micro_batches,
    precondition_parameters,
    subset_size,
)
from kfcrun.optim.inputs import BatchRecorder
from kfcrun.optim.protocol import InitBatch
from kfcrun.optim.timing import PhaseTimer

__all__ = ["KFCPreconditioner"]

#: Timed phases, reported by :meth:`KFCPreconditioner.step_stats`.
PHASES = ("statistics", "inverses", "precondition", "nu")


class KFCPreconditioner:
    """Turns ``.grad`` into the damped KFC natural gradient before another optimizer's step.

    Usage::

        precond = KFCPreconditioner(model, damping=1e-3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()   # the MEAN loss
            precond.step()                          # or precond.step(inputs=x)
            opt.step()

    Args:
        model: the network; the modules :func:`~kfcrun.curvature.kfc_layers` covers get blocks.
        damping: ``γ``, added to each block's curvature (``λ = 0``: weight decay is
            the optimizer's).
        damping_mode: ``"pi"`` (factored, Eqn 28) or ``"exact"`` (Eqns 39-44).
        stat_decay: ``xi`` of the factors' running averages (Eqn 33).
        stats_every, inverse_every, refresh_until: ``T_s``, ``T_f`` and the warm-up (see
            :class:`~kfcrun.curvature.CurvatureSchedule`), counted in calls to :meth:`step`.
        stats_fraction: fraction of each (micro-)batch the statistics use.
        fisher: ``"sampled"`` (true Fisher), ``"expected"`` or ``"empirical"`` (needs ``targets``).
        likelihood, approx, skip_layers, max_factor_dim: as for :class:`~kfcrun.optim.KFCPre`.
        clip: ``C`` of the optional ``nu`` clipping (needs ``lr``); ``None``: off.
        lr: the step size the optimizer applies to the gradient, for ``nu`` (update it
            with your schedule: ``precond.lr = ...``).
        nu_fraction: fraction of the step's examples whose exact Fisher gives ``nu``.
        seed: seeds the sampled targets.
        chunk_size, inverse_dtype: memory bound of the patch expansion, dtype of the inversions.
        record_inputs: record the batches of the training forwards (else pass ``inputs=``).

    Attributes:
        curvature: the :class:`~kfcrun.curvature.KFCCurvature` (blocks, factors, inverses).
        steps: completed calls to :meth:`step`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: float = 1e-3,
        damping_mode: DampingMode | str = DampingMode.PI,
        stat_decay: float = 0.95,
        stats_every: int = 10,
        inverse_every: int = 20,
        refresh_until: int = 0,
        stats_fraction: float = 1.0,
        fisher: FisherType | str = FisherType.SAMPLED,
        likelihood: Likelihood | str = "cross_entropy",
        approx: OmegaModel | str = OmegaModel.KFC,
        skip_layers: Sequence[str] = (),
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        clip: float | None = None,
        lr: float | None = None,
        nu_fraction: float = 0.25,
        seed: int = 0,
        chunk_size: int | None = None,
        inverse_dtype: torch.dtype | None = torch.float64,
        record_inputs: bool = True,
    ) -> None:
        if damping <= 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if clip is not None and (clip <= 0 or lr is None or lr <= 0):
            raise ValueError(
                "clip needs clip > 0 and the optimizer's lr > 0 (KFCPreconditioner(..., clip=C, lr=...))"
            )
        for what, value in (("stats_fraction", stats_fraction), ("nu_fraction", nu_fraction)):
            if not 0 < value <= 1:
                raise ValueError(f"{what} must be in (0, 1], got {value}")
        self.model = eager_module(model)  # the curvature's passes run eagerly (torch.compile)
        self.damping, self.clip, self.lr, self.nu_fraction = damping, clip, lr, nu_fraction
        self.curvature = KFCCurvature(
            model,
            stat_decay=stat_decay,
            damping_mode=damping_mode,
            fisher_type=fisher,
            chunk_size=chunk_size,
            inverse_dtype=inverse_dtype,
            omega_model=approx,
            likelihood=likelihood,
            skip_layers=skip_layers,
            max_factor_dim=max_factor_dim,
        )
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.timer = PhaseTimer(device)
        self.recorder = BatchRecorder()
        self._recorder_handle = self.recorder.attach(model) if record_inputs else None
        self.refresher = CurvatureRefresher(
            self.curvature,
            CurvatureSchedule(stats_every, inverse_every, refresh_until),
            stats_fraction=stats_fraction,
            generator=self.generator,
            timer=self.timer,
            recorder=self.recorder,
        )
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self.steps = 0
        self._last: dict[str, Tensor] = {}

    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        """The curvature blocks, by module name."""
        return self.curvature.blocks

    @property
    def needs_labels(self) -> bool:
        """Whether :meth:`step` needs ``targets`` (empirical Fisher, or a likelihood that masks positions)."""
        return self.curvature.fisher_type is FisherType.EMPIRICAL or self.curvature.likelihood.needs_labels

    def _weight_decays(self) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def initialize(self, batches: Iterable[InitBatch]) -> None:
        """Algorithm 1's initial estimate on ``batches`` (inputs, or ``(inputs, labels)``), then inverses."""
        self.refresher.initialize(batches, self.damping, self._weight_decays())

    @torch.no_grad()
    def step(
        self,
        inputs: Tensor | Sequence[Tensor] | None = None,
        targets: Tensor | Sequence[Tensor] | None = None,
    ) -> None:
        """Refresh the curvature when due, then replace each covered ``.grad`` by its natural gradient.

        Args:
            inputs: the batch (or the micro-batches) whose gradients ``.grad`` holds;
                default: the recorded training forwards since the last step.
            targets: training labels (lists for micro-batches), only when :attr:`needs_labels`.
        """
        recorded = self.recorder.take()
        if inputs is None and not recorded:
            raise RuntimeError(
                "KFCPreconditioner.step() needs the batch inputs: call step(inputs=x), or build it with "
                "record_inputs=True and run the model in train mode (with a backward) before step()"
            )
        batches, labels = micro_batches(inputs if inputs is not None else recorded, targets)
        k = self.steps + 1
        self.refresher.refresh(k, batches, labels, self.damping, self._weight_decays())
        params: list[Tensor] = [p for p in self.model.parameters() if p.requires_grad]
        grads: dict[Tensor, Tensor] = {
            p: p.grad if p.grad is not None else torch.zeros_like(p) for p in params
        }
        with self.timer("precondition"):
            natural = precondition_parameters(self.curvature, grads)
        for p, value in natural.items():
            if p.grad is None:
                p.grad = value
            else:
                p.grad.copy_(value)
        if self.clip is not None:
            self._clip(batches, labels, params)
        self.steps = k

    def _clip(self, batches: list[Tensor], labels: list[Tensor] | None, params: list[Tensor]) -> None:
        """Scale every ``.grad`` so that ``nu = lr^2 grad^T F grad <= C`` (no host sync)."""
        assert self.clip is not None and self.lr is not None
        with self.timer("nu"):
            total = sum(x.shape[0] for x in batches)
            inputs, targets = leading_examples(batches, labels, subset_size(self.nu_fraction, total))
            tangents = {self._param_names[id(p)]: p.grad * self.lr for p in params if p.grad is not None}
            with self.recorder.paused(), torch.enable_grad():
                nu = exact_quadratic(self.model, self.curvature.likelihood, inputs, targets, tangents)
            scale = torch.clamp(torch.sqrt(self.clip / nu), max=1.0)
            scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
        self._last = {"nu": nu, "clip_factor": scale}

    def remove_hooks(self) -> None:
        """Detach the input-recording hook (``step`` then needs ``inputs=``)."""
        if self._recorder_handle is not None:
            self._recorder_handle.remove()
            self._recorder_handle = None

    def step_stats(self) -> dict[str, Any]:
        """``nu``/``clip_factor`` of the last step (with clipping), ``pi_mean``, health, phase times."""
        out: dict[str, Any] = {**self._last, **self.refresher.health}
        if self.refresher.pi_mean is not None:
            out["pi_mean"] = self.refresher.pi_mean
        totals = self.timer.totals()
        out.update({f"kfc_{phase}_s": totals.get(phase, 0.0) for phase in PHASES})
        return out

    def state_dict(self) -> dict[str, Any]:
        """Curvature, generator, step count: everything to resume bitwise."""
        return {
            "steps": self.steps,
            "curvature": self.curvature.state_dict(),
            "generator": self.generator.get_state(),
            "pi_mean": self.refresher.pi_mean,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.steps = int(state["steps"])
        self.curvature.load_state_dict(state["curvature"])
        self.generator.set_state(state["generator"])
        self.refresher.pi_mean = state.get("pi_mean")
