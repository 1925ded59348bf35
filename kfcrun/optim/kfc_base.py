"""What KFC-pre (App. A.1) and K-FAC (App. A.2) share: the KFC curvature and the parameter plumbing.

:class:`KFCOptimizerBase` is a ``torch.optim.Optimizer`` over a model whose Conv2d/Linear
layers get KFC blocks (:class:`~kfcrun.curvature.KFCCurvature`). It owns

* the param groups: one per covered layer (its weight and bias, with the layer's weight
  decay ``r``, called ``lambda`` in App. A.1), one for every other trainable parameter
  (e.g. BatchNorm scale and shift, not decayed);
* the objective's gradient ``grad h = grad(mean loss) + r W`` (biases decayed only with
  ``decay_biases``; the L2 term is ``r/2 |W|^2``, the optimizer adds it, ``.grad`` holds
  the mean loss's gradient only);
* the curvature refresh of Algorithm 1 (statistics every ``T_s``, inverses every ``T_f``,
  Algorithm 1's initial estimate, the optional EMA warm-up and staleness guard) and the
  preconditioned directions ``(F_hat + (r + gamma) I)^{-1} grad h`` per block (Eqns 28-29 or
  39-44); parameters outside the blocks take ``grad h`` itself;
* the exact-Fisher forms ``v_i^T F v_j`` on a batch (:mod:`kfcrun.optim.fisher_vector`)
  plus the weight-decay forms ``sum r v_i v_j``;
* the momentum step ``p <- mu p + v; theta <- theta + p``, iterate averaging, phase timers,
  input recording and the state dict.

Subclasses write ``step``; see :class:`~kfcrun.optim.KFCPre` and :class:`~kfcrun.optim.KFAC`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from kfcrun.curvature import (
    CurvatureSchedule,
    DampingMode,
    FisherType,
    InverseUpdate,
    KFCCurvature,
    KroneckerBlock,
    OmegaModel,
)
from kfcrun.optim.averaging import IterateAveraging
from kfcrun.optim.fisher_vector import fisher_gram
from kfcrun.optim.inputs import BatchRecorder
from kfcrun.optim.param_groups import layer_weight_decays
from kfcrun.optim.protocol import InitBatch
from kfcrun.optim.staleness import StalenessGuard
from kfcrun.optim.timing import PhaseTimer

__all__ = ["KFCOptimizerBase", "subset_size"]

#: Names of the timed phases, as reported by :attr:`KFCOptimizerBase.phase_times`.
PHASES = ("statistics", "inverses", "precondition", "nu")


def subset_size(fraction: float, batch_size: int) -> int:
    """``max(1, ceil(fraction * batch_size))``: the leading examples a fraction of a batch uses."""
    return max(1, math.ceil(fraction * batch_size - 1e-9))


class KFCOptimizerBase(torch.optim.Optimizer):
    """The shared part of KFC-pre and K-FAC (see the module docstring); not an optimizer by itself.

    Args (the subclasses document them as config knobs):
        model: maps inputs to logits ``(batch, classes)`` of a softmax cross-entropy loss.
        defaults: the param groups' hyperparameters (``lr``, ``momentum``).
        weight_decay, layer_weight_decay, decay_biases: ``r`` per layer and its mask.
        damping, damping_mode: ``gamma`` and how ``r + gamma`` is added to each block.
        stat_decay, ema_warmup, stats_every, inverse_every, refresh_until, stats_fraction,
        init_examples, fisher, approx: the factor statistics (Eqns 32-33, Algorithm 1).
        staleness_guard: the :class:`~kfcrun.optim.staleness.StalenessGuard` (or ``None``).
        precondition: ``False`` skips curvature (directions are ``grad h``).
        avg_decay, avg_mode, avg_start, seed, chunk_size, inverse_dtype, record_inputs: as in KFC-pre.
    """

    #: Whether ``step`` needs a closure that returns the mini-batch loss (K-FAC's rho).
    needs_closure: ClassVar[bool] = False
    #: The timed phases of ``step``, as reported by :attr:`phase_times`.
    phases: ClassVar[tuple[str, ...]] = PHASES

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        weight_decay: float,
        layer_weight_decay: dict[str, float] | None,
        decay_biases: bool,
        damping: float,
        damping_mode: DampingMode | str,
        stat_decay: float,
        ema_warmup: bool,
        stats_every: int,
        inverse_every: int,
        refresh_until: int,
        stats_fraction: float,
        init_examples: int,
        fisher: FisherType | str,
        approx: OmegaModel | str,
        staleness_guard: StalenessGuard | None,
        precondition: bool,
        avg_decay: float | None,
        avg_mode: str,
        avg_start: int,
        seed: int,
        chunk_size: int | None,
        inverse_dtype: torch.dtype | None,
        record_inputs: bool,
    ) -> None:
        self.schedule = CurvatureSchedule(stats_every, inverse_every, refresh_until)
        self.model = model
        self.curvature = KFCCurvature(
            model,
            stat_decay=stat_decay,
            damping_mode=damping_mode,
            fisher_type=fisher,
            chunk_size=chunk_size,
            inverse_dtype=inverse_dtype,
            omega_model=approx,
            ema_warmup=ema_warmup,
        )
        self.lambdas = layer_weight_decays(model, weight_decay, layer_weight_decay)
        groups: list[dict[str, Any]] = []
        covered: set[int] = set()
        for name, block in self.blocks.items():
            params = [p for p in (block.module.weight, block.module.bias) if p is not None]
            if not all(p.requires_grad for p in params):
                raise ValueError(
                    f"{type(self).__name__}: layer {name!r} has frozen parameters; "
                    "KFC blocks need trainable layers"
                )
            covered.update(id(p) for p in params)
            groups.append({"params": params, "layer": name, "weight_decay": self.lambdas[name]})
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
        if others:
            groups.append({"params": others, "layer": None, "weight_decay": 0.0})
        super().__init__(groups, defaults)

        self.damping = damping
        self.stats_fraction = stats_fraction
        self.decay_biases, self.precondition_enabled = decay_biases, precondition
        self.init_examples = init_examples
        self.guard = staleness_guard or StalenessGuard()
        device = next(model.parameters()).device
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.iteration = 0
        self.averaging = IterateAveraging(self, avg_decay, avg_mode, avg_start)
        self.averaging.begin(self._params())
        self.timer = PhaseTimer(device)
        self._param_names = {id(p): name for name, p in model.named_parameters()}
        self._last_stats: dict[str, Tensor] = {}
        self._health: dict[str, Tensor] = {}
        self._pi_mean: Tensor | None = None
        self.recorder = BatchRecorder()
        self._recorder_handle = self.recorder.attach(model) if record_inputs else None

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def blocks(self) -> dict[str, KroneckerBlock]:
        """The KFC blocks, by layer name."""
        return self.curvature.blocks

    @property
    def needs_labels(self) -> bool:
        """Only the empirical Fisher needs the training labels (``step(targets=...)``)."""
        return self.curvature.fisher_type is FisherType.EMPIRICAL

    @property
    def initialized(self) -> bool:
        """Whether the damped inverses exist (after :meth:`initialize` or the first step)."""
        return self.curvature.has_inverses

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def phase_times(self) -> dict[str, float]:
        """Cumulative seconds per phase of :attr:`phases`, as ``kfc_<phase>_s``."""
        totals = self.timer.totals()
        return {f"kfc_{phase}_s": totals.get(phase, 0.0) for phase in self.phases}

    def remove_hooks(self) -> None:
        """Detach the input-recording hook from the model (``step`` then needs ``inputs=``)."""
        if self._recorder_handle is not None:
            self._recorder_handle.remove()
            self._recorder_handle = None

    def _batch_inputs(self, inputs: Tensor | None) -> Tensor:
        """The mini-batch: ``inputs``, else the recorded last training forward's."""
        if inputs is None:
            inputs = self.recorder.inputs
        if inputs is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs the mini-batch inputs: call step(inputs=x), or build "
                "the optimizer with record_inputs=True and run the model in train mode on them before step()"
            )
        return inputs

    # -- curvature ------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, batches: Iterable[InitBatch]) -> None:
        """Algorithm 1's initial factor estimate: average Eqn 32 over ``batches``, then invert.

        ``batches`` yields input tensors, or ``(inputs, labels)`` pairs (labels are used
        only with ``fisher="empirical"``): a large training subset; the paper used the full
        training set. Every example is used, whatever ``stats_fraction`` is.
        """
        count = 0
        for item in batches:
            inputs, labels = item if isinstance(item, (tuple, list)) else (item, None)
            self._update_statistics(inputs, labels, init=True)
            count += 1
        if count:
            self._update_inverses(self._fit_dampings())

    def _fit_dampings(self) -> list[float]:
        """The damping value(s) ``gamma`` a scheduled inverse update fits (KFC-pre: its fixed gamma)."""
        return [self.damping]

    def _update_inverses(self, dampings: Sequence[float]) -> InverseUpdate:
        with self.timer("inverses"):
            update = self.curvature.update_inverses(list(dampings), self.lambdas)
        self._pi_mean = update.pi_mean()
        self._health["inverse_nonfinite"] = torch.tensor(float(update.nonfinite))
        return update

    def _update_statistics(self, inputs: Tensor, targets: Tensor | None, init: bool) -> None:
        with self.timer("statistics"), self.recorder.paused(), torch.enable_grad():
            update = self.curvature.update_statistics(inputs, targets, generator=self.generator, init=init)
        self._health["stats_nonfinite"] = update.nonfinite

    def _refresh_curvature(self, k: int, inputs: Tensor, targets: Tensor | None, force: bool = False) -> bool:
        """Statistics every ``T_s`` and inverses every ``T_f`` (on a statistics subset); both if ``force``.

        Returns whether the inverses were refitted.
        """
        m = subset_size(self.stats_fraction, inputs.shape[0])
        stats_inputs, stats_targets = inputs[:m], (targets[:m] if targets is not None else None)
        if not self.initialized:
            self._update_statistics(stats_inputs, stats_targets, init=True)
            self._update_inverses(self._fit_dampings())
            return True
        if force or self.schedule.statistics_due(k):
            self._update_statistics(stats_inputs, stats_targets, init=False)
        if force or self.schedule.inverses_due(k):
            self._update_inverses(self._fit_dampings())
            return True
        return False

    # -- gradients and directions ---------------------------------------------------------------
    def _gradient_of_h(self, p: Tensor, weight_decay: float) -> Tensor:
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        return grad.add(p, alpha=weight_decay) if weight_decay else grad

    def _decay_of(self, group: dict, p: Tensor) -> float:
        """``r`` for a parameter: its layer's, for weights (and biases if ``decay_biases``)."""
        if group["layer"] is None:
            return 0.0
        if p is self.blocks[group["layer"]].module.bias and not self.decay_biases:
            return 0.0
        return group["weight_decay"]

    def _gradients_of_h(self) -> dict[Tensor, Tensor]:
        """``grad h`` per parameter (a fresh tensor for each)."""
        out: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                grad = self._gradient_of_h(p, self._decay_of(group, p))
                out[p] = grad.clone() if grad is p.grad else grad
        return out

    def _directions(self, index: int = 0) -> dict[Tensor, Tensor]:
        """``(F_hat + (r + gamma) I)^{-1} grad h`` per parameter for damping candidate ``index``.

        Parameters outside the blocks (and all of them without preconditioning) get
        ``grad h``. Every tensor is fresh: callers may scale them in place.
        """
        directions: dict[Tensor, Tensor] = {}
        combined: dict[str, Tensor] = {}
        for group in self.param_groups:
            if group["layer"] is None or not self.precondition_enabled:
                for p in group["params"]:
                    grad = self._gradient_of_h(p, self._decay_of(group, p))
                    directions[p] = grad.clone() if grad is p.grad else grad
                continue
            weight, bias = self._layer_parameters(group["layer"])
            weight_grad = self._gradient_of_h(weight, self._decay_of(group, weight))
            bias_grad = None
            if bias is not None:
                bias_grad = self._gradient_of_h(bias, self._decay_of(group, bias))
            combined[group["layer"]] = self.blocks[group["layer"]].combine(weight_grad, bias_grad)
        if combined:
            preconditioned = self.curvature.precondition(combined, index=index)
            for group in self.param_groups:
                name = group["layer"]
                if name is None or name not in preconditioned:
                    continue
                weight, bias = self._layer_parameters(name)
                d_weight, d_bias = self.blocks[name].split(preconditioned[name])
                directions[weight] = d_weight
                if bias is not None and d_bias is not None:
                    directions[bias] = d_bias
        return directions

    def _layer_parameters(self, name: str) -> tuple[Tensor, Tensor | None]:
        """The weight and bias (or ``None``) of the covered layer ``name``."""
        module = self.blocks[name].module
        return cast(Tensor, module.weight), cast("Tensor | None", module.bias)

    # -- quadratic forms ------------------------------------------------------------------------
    def _fisher_gram(self, inputs: Tensor, vectors: Sequence[dict[Tensor, Tensor]]) -> Tensor:
        """``G_ij = v_i^T F v_j`` with the exact Fisher of ``inputs`` (one JVP per vector)."""
        tangents = [{self._param_names[id(p)]: v for p, v in vec.items()} for vec in vectors]
        with self.recorder.paused(), torch.enable_grad():
            return fisher_gram(self.model, inputs, tangents)

    def _decay_form(self, a: dict[Tensor, Tensor], b: dict[Tensor, Tensor]) -> Tensor | None:
        """``sum_p r_p <a_p, b_p>`` over the decayed parameters (``None`` if none is decayed)."""
        terms = [
            self._decay_of(group, p) * (a[p].square() if a is b else a[p] * b[p]).sum()
            for group in self.param_groups
            for p in group["params"]
            if self._decay_of(group, p)
        ]
        return torch.stack(terms).sum() if terms else None

    # -- the update -----------------------------------------------------------------------------
    def _apply_momentum(self, updates: dict[Tensor, Tensor], momentum: float | Tensor) -> None:
        """``p <- mu p + v``, ``theta <- theta + p`` (``p`` is ``state["momentum_buffer"]``)."""
        params = list(updates)
        buffers = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, list(updates.values()))
        torch._foreach_add_(params, buffers)

    def _previous_update(self) -> dict[Tensor, Tensor]:
        """The last step's ``p`` per parameter (zeros before the first step)."""
        return {
            p: self.state[p]["momentum_buffer"] if "momentum_buffer" in self.state[p] else torch.zeros_like(p)
            for p in self._params()
        }

    # -- evaluation, logging, state --------------------------------------------------------------
    @contextmanager
    def averaged_parameters(self) -> Iterator[None]:
        """Load the averaged iterates into the parameters inside the ``with`` block."""
        with self.averaging.swapped_in(self._params(), self.iteration):
            yield

    def step_stats(self) -> dict[str, Tensor | float]:
        """Last step's statistics, non-finite counts and phase times.

        ``stats_nonfinite``/``inverse_nonfinite``: layers whose last statistics estimate /
        last factors were non-finite (and were skipped / kept their previous inverse);
        ``stat_decay``: the ``xi`` of the last statistics update (``xi_k`` with the warm-up);
        ``guard_refreshes``: refreshes the staleness guard asked for so far.
        Values are tensors where they come from the device; reading them syncs, so call
        this only when logging.
        """
        extra: dict[str, Tensor | float] = {"stat_decay": self.curvature.last_decay}
        if self.guard.enabled:
            extra["guard_refreshes"] = float(self.guard.refreshes)
        return {**self._last_stats, **self._health, **extra, **self.phase_times}

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus iteration, curvature, generator, timers and guard (loads bitwise)."""
        state = super().state_dict()
        state["iteration"] = self.iteration
        state["curvature"] = self.curvature.state_dict()
        state["generator"] = self.generator.get_state()
        state["phase_times"] = self.timer.state_dict()
        state["pi_mean"] = self._pi_mean
        state["staleness_guard"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model's parameters are loaded separately)."""
        state_dict = dict(state_dict)
        self.iteration = int(state_dict.pop("iteration"))
        self.curvature.load_state_dict(state_dict.pop("curvature"))
        self.generator.set_state(state_dict.pop("generator"))
        self.timer.load_state_dict(state_dict.pop("phase_times", {}))
        self._pi_mean = state_dict.pop("pi_mean", None)
        self.guard.load_state_dict(state_dict.pop("staleness_guard", {}), self.device)
        super().load_state_dict(state_dict)
