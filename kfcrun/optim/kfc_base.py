"""What KFC-pre (App. A.1) and K-FAC (App. A.2) share: the KFC curvature and the parameter plumbing.

:class:`KFCOptimizerBase` is a ``torch.optim.Optimizer`` over a model whose covered
modules (:func:`~kfcrun.curvature.kfc_layers`: convolutions of any groups, Linear,
Embedding, the scale/shift of normalization layers) get curvature blocks
(:class:`~kfcrun.curvature.KFCCurvature`). It owns

* the param groups: one per block (its trainable weight and bias), one for every other
  trainable parameter (no block, or in ``skip_layers``; frozen parameters are left out);
* the objective's gradient ``grad h = grad(mean loss) + r W`` (``r`` per weight layer,
  called ``lambda`` in App. A.1; biases decayed only with ``decay_biases``; the L2 term is
  ``r/2 |W|^2``, the optimizer adds it, ``.grad`` holds the mean loss's gradient only);
* the curvature refresh of Algorithm 1 (statistics every ``T_s``, inverses every ``T_f``,
  Algorithm 1's initial estimate, the optional EMA warm-up and staleness guard) and the
  preconditioned directions ``(F_hat + (r + gamma) I)^{-1} grad h`` per block (Eqns 28-29 or
  39-44); parameters outside the blocks take ``grad h`` itself
  (:mod:`kfcrun.optim.curvature_steps`, shared with :class:`~kfcrun.optim.KFCPreconditioner`);
* the exact-Fisher forms ``v_i^T F v_j`` of the likelihood on a step's micro-batches
  (:mod:`kfcrun.optim.fisher_vector`) plus the weight-decay forms ``sum r v_i v_j``;
* the momentum step ``p <- mu p + v; theta <- theta + p``, iterate averaging, phase timers,
  input recording (every micro-batch since the last step) and the state dict.

Subclasses write ``step``; see :class:`~kfcrun.optim.KFCPre` and :class:`~kfcrun.optim.KFAC`.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kfcrun.curvature import (
    CurvatureBlock,
    CurvatureComm,
    CurvatureSchedule,
    DampingMode,
    FisherType,
    KFCCurvature,
    KFCCurvatureWarning,
    LayerPass,
    Likelihood,
    OmegaModel,
    eager_module,
)
from kfcrun.optim.averaging import IterateAveraging
from kfcrun.optim.curvature_steps import (
    Batches,
    CurvatureRefresher,
    exact_gram,
    leading_examples,
    micro_batches,
    precondition_parameters,
    sharded_leading,
    subset_size,
)
from kfcrun.optim.inputs import BatchRecorder
from kfcrun.optim.param_groups import layer_weight_decays, parameter_weight_decays
from kfcrun.optim.protocol import InitBatch
from kfcrun.optim.staleness import StalenessGuard
from kfcrun.optim.timing import PhaseTimer
from kfcrun.schema import check_arguments

__all__ = [
    "PHASES",
    "KFCOptimizerBase",
    "StepInputs",
    "parse_inverse_dtype",
    "shared_arguments",
    "subset_size",
]

#: Names of the timed phases, as reported by :attr:`KFCOptimizerBase.phase_times`.
PHASES = ("statistics", "inverses", "precondition", "nu")

#: A step's inputs (or labels): one mini-batch or the list of its micro-batches.
StepInputs = Tensor | Sequence[Tensor]


def parse_inverse_dtype(owner: type, inverse_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The ``torch.dtype`` of an ``inverse_dtype`` knob given as a name (checked) or a dtype."""
    if isinstance(inverse_dtype, str):
        check_arguments(owner, {"inverse_dtype": inverse_dtype})
        return getattr(torch, inverse_dtype)
    return inverse_dtype


class KFCOptimizerBase(torch.optim.Optimizer):
    """The shared part of KFC-pre and K-FAC (see the module docstring); not an optimizer by itself.

    Args (the subclasses document them as config knobs):
        model: maps inputs to the output of ``likelihood``.
        defaults: the param groups' hyperparameters (``lr``, ``momentum``).
        weight_decay, layer_weight_decay, decay_biases: ``r`` per layer and its mask.
        damping, damping_mode: ``gamma`` and how ``r + gamma`` is added to each block.
        stat_decay, ema_warmup, stats_every, inverse_every, refresh_until, stats_fraction,
        init_examples, fisher, approx: the factor statistics (Eqns 32-33, Algorithm 1).
        likelihood, skip_layers, max_factor_dim: the output distribution and the coverage.
        staleness_guard: the :class:`~kfcrun.optim.staleness.StalenessGuard` (or ``None``).
        precondition: ``False`` skips curvature (directions are ``grad h``).
        avg_decay, avg_mode, avg_start, seed, chunk_size, inverse_dtype, record_inputs: as in KFC-pre.
        omega_method, async_inverses, stats_from_training: the speed options of KFC-pre (issue 13).
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
        likelihood: Likelihood | str,
        skip_layers: Sequence[str],
        max_factor_dim: int | None,
        staleness_guard: StalenessGuard | None,
        precondition: bool,
        avg_decay: float | None,
        avg_mode: str,
        avg_start: int,
        seed: int,
        chunk_size: int | None,
        inverse_dtype: torch.dtype | None,
        record_inputs: bool,
        omega_method: str = "auto",
        async_inverses: bool = False,
        stats_from_training: bool = False,
        grad_worker_fraction: float = 1.0,
    ) -> None:
        self.schedule = CurvatureSchedule(stats_every, inverse_every, refresh_until)
        compiled, model = model, eager_module(model)  # the curvature's passes run eagerly
        if stats_from_training and compiled is not model:
            # A compiled forward does not run layer hooks added at run time: nothing to record.
            warnings.warn(
                "kfc: stats_from_training has no effect on a torch.compile'd model (statistics come from "
                "a separate eager pass); pass the uncompiled model or set stats_from_training=false",
                KFCCurvatureWarning,
                stacklevel=3,
            )
            stats_from_training = False
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
            likelihood=likelihood,
            skip_layers=skip_layers,
            max_factor_dim=max_factor_dim,
            omega_method=omega_method,
        )
        #: ``r`` per weight layer (Conv/Linear) by name, covered or not.
        self.lambdas = layer_weight_decays(model, weight_decay, layer_weight_decay)
        #: ``r`` per parameter: weights of weight layers, biases with ``decay_biases``.
        self.decays = parameter_weight_decays(model, self.lambdas, decay_biases)
        groups: list[dict[str, Any]] = []
        covered: set[int] = set()
        for name, block in self.blocks.items():
            covered.update(id(p) for p in block.params)
            groups.append({"params": block.params, "layer": name})
        others = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
        if others:
            groups.append({"params": others, "layer": None})
        super().__init__(groups, defaults)

        self.damping = damping
        self.stats_fraction = stats_fraction
        self.decay_biases, self.precondition_enabled = decay_biases, precondition
        self.init_examples = init_examples
        #: KAISA's ``f`` for a data-parallel run (:meth:`distribute`).
        self.grad_worker_fraction = grad_worker_fraction
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
        self.recorder = BatchRecorder()
        self._recorder_handle = self.recorder.attach(compiled) if record_inputs else None
        self.refresher = CurvatureRefresher(
            self.curvature,
            self.schedule,
            stats_fraction=stats_fraction,
            generator=self.generator,
            timer=self.timer,
            recorder=self.recorder,
            async_inverses=async_inverses,
        )
        # Statistics from the training pass: the model's forward is recorded on the
        # iterations whose statistics are due, and backward() takes the estimates from it.
        self.stats_from_training = stats_from_training
        self._training_pass: tuple[contextlib.ExitStack, LayerPass] | None = None
        self._pass_handles = (
            [model.register_forward_pre_hook(self._begin_pass), model.register_forward_hook(self._end_pass)]
            if stats_from_training
            else []
        )

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def blocks(self) -> dict[str, CurvatureBlock]:
        """The curvature blocks, by module name."""
        return self.curvature.blocks

    @property
    def block_weight_decays(self) -> dict[str, float]:
        """``r`` of each block's damping ``r + gamma`` (0 for normalization blocks)."""
        return {name: self.lambdas.get(name, 0.0) for name in self.blocks}

    @property
    def needs_labels(self) -> bool:
        """The empirical Fisher and a masking likelihood need the labels (``step(targets=...)``)."""
        return self.curvature.fisher_type is FisherType.EMPIRICAL or self.curvature.likelihood.needs_labels

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

    # -- data parallelism -------------------------------------------------------------------------
    def distribute(self, comm: CurvatureComm) -> None:
        """Run data parallel: statistics, inverses, solves and the exact-Fisher forms go through ``comm``.

        ``comm`` (:class:`kfcrun.distributed.DataParallelCurvatureComm`, built by the runner with
        :attr:`grad_worker_fraction`) averages the factor statistics over ranks, splits the
        inverses among them and sums the per-rank parts of ``v^T F v`` (``nu``, K-FAC's
        quadratic model) and of K-FAC's objective, so that every rank steps the same. Each
        rank's ``step`` gets its interleaved slice of the global batch (``.grad`` averaged over
        ranks, e.g. by DDP); the statistics and ``nu`` subsets are the leading examples of
        the GLOBAL batch (:func:`~kfcrun.optim.curvature_steps.sharded_leading`).
        """
        # Background inverse fits are not combined with owner-based inverses (whose sharing is a
        # collective every rank joins in update_inverses): the simplest correct rule is to refuse.
        if self.refresher.async_inverses and not comm.shard.single:
            raise ValueError(
                "kfc: async_inverses=true is not supported data parallel; set async_inverses=false"
            )
        self.curvature.comm = comm
        self.curvature.release_foreign_inverses()

    @property
    def _data_parallel(self) -> bool:
        comm = self.curvature.comm
        return comm is not None and not comm.shard.single

    def _leading(
        self, batches: Batches, targets: Batches | None, fraction: float
    ) -> tuple[Batches, Batches | None, int | None]:
        """The step's leading ``ceil(f B)`` examples: this rank's part of the global ones, their count."""
        if self._data_parallel:
            return sharded_leading(self.curvature, batches, targets, fraction)
        total = sum(x.shape[0] for x in batches)
        inputs, labels = leading_examples(batches, targets, subset_size(fraction, total))
        return inputs, labels, None

    def _global_mean(self, value: Tensor, local: int, total: int | None, purpose: str) -> Tensor:
        """A mean over this rank's ``local`` examples made the mean over all ``total`` (one all-reduce).

        ``total`` defaults to equal shards; one process: ``value`` itself.
        """
        comm = self.curvature.comm
        if comm is None or comm.shard.single:
            return value
        count = comm.shard.global_batch(local) if total is None else total
        return comm.all_reduce_sum(value * (local / count), purpose)

    def remove_hooks(self) -> None:
        """Detach the input-recording hook from the model (``step`` then needs ``inputs=``)."""
        if self._recorder_handle is not None:
            self._recorder_handle.remove()
            self._recorder_handle = None
        for handle in self._pass_handles:
            handle.remove()
        self._pass_handles = []

    # -- statistics from the training pass (issue 13) ---------------------------------------------
    def _statistics_due_next(self) -> bool:
        """Whether the coming step updates the factor statistics (so its forward is worth recording)."""
        if not self.precondition_enabled or self._data_parallel:
            # Data parallel: the separate statistics pass (global-example draws, one all-reduce
            # of the estimates); training-pass estimates would be this rank's alone.
            return False
        k = self.iteration + 1
        return not self.initialized or self.guard.due() or self.schedule.statistics_due(k)

    def _begin_pass(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Model forward pre-hook: start recording the covered layers on a statistics iteration."""
        if (
            self._training_pass is not None
            or self.recorder.is_paused
            or not module.training
            or not torch.is_grad_enabled()
            or not self._statistics_due_next()
        ):
            return
        stack = contextlib.ExitStack()
        layer_pass = stack.enter_context(self.curvature.recording())
        self._training_pass = (stack, layer_pass)

    def _end_pass(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Model forward hook: stop recording (the records stay until :meth:`backward` or the step)."""
        if self._training_pass is not None:
            self._training_pass[0].close()

    def backward(
        self,
        loss: Tensor,
        output: Tensor,
        targets: Tensor | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """``loss.backward()``, taking the factor statistics from this training pass first if they are due.

        Use instead of ``loss.backward()`` with ``stats_from_training=True`` (the runner does):
        ``output`` is the model output of the forward that produced ``loss``; on a
        statistics iteration the sampled-target derivatives come from one extra backward
        through its graph (:meth:`KFCCurvature.estimate_from_pass`, on the leading
        ``stats_fraction`` of the batch), so no separate statistics forward runs. ``targets``
        are the labels, used only when :attr:`needs_labels`. Without this call (a plain
        ``loss.backward(); step()`` loop) the step runs its own statistics pass as before.

        Mixed precision: under float16 autocast pass ``scaler.scale(loss)`` as ``loss`` and
        the ``scaler``: the sampled backward is then scaled by the same factor (read on the
        device, no host sync) and its derivatives unscaled before the statistics, and
        ``scaler.step(opt)`` unscales ``.grad`` before the step preconditions it. bfloat16
        needs no scaler. A step the scaler skips (non-finite gradients) leaves its
        statistics to be folded with the next step's.
        """
        recorded, self._training_pass = self._training_pass, None
        if recorded is not None:
            stack, layer_pass = recorded
            stack.close()
            if layer_pass.names:
                count = subset_size(self.stats_fraction, output.shape[0])
                labels = targets if self.needs_labels else None
                with self.timer("statistics"), self.recorder.paused():
                    estimates = self.curvature.estimate_from_pass(
                        layer_pass,
                        output,
                        labels,
                        generator=self.generator,
                        examples=count if count < output.shape[0] else None,
                        loss_scale=_scale_of(scaler, output.device),
                    )
                self.refresher.add_pass_estimates(estimates, count)
            del layer_pass
        loss.backward()

    def _step_batches(
        self, inputs: StepInputs | None, targets: StepInputs | None
    ) -> tuple[Batches, Batches | None]:
        """The step's micro-batches: ``inputs``, else the recorded training forwards since the last step."""
        if self._training_pass is not None:  # recorded, but the loop called loss.backward() itself
            self._training_pass[0].close()
            self._training_pass = None
        recorded = self.recorder.take()
        if inputs is None:
            inputs = recorded
        if isinstance(inputs, Sequence) and not isinstance(inputs, Tensor) and not inputs:
            raise RuntimeError(
                f"{type(self).__name__}.step() needs the mini-batch inputs: call step(inputs=x), or build "
                "the optimizer with record_inputs=True and run the model in train mode on them before step()"
            )
        return micro_batches(inputs, targets)

    # -- curvature ------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, batches: Iterable[InitBatch]) -> None:
        """Algorithm 1's initial factor estimate: average Eqn 32 over ``batches``, then invert.

        ``batches`` yields input tensors, or ``(inputs, labels)`` pairs (labels are used
        only with ``fisher="empirical"`` or a masking likelihood): a large training subset;
        the paper used the full training set. Every example is used, whatever
        ``stats_fraction`` is.
        """
        self.refresher.initialize(batches, self._fit_dampings(), self.block_weight_decays)

    def _fit_dampings(self) -> list[float]:
        """The damping value(s) ``gamma`` a scheduled inverse update fits (KFC-pre: its fixed gamma)."""
        return [self.damping]

    def _update_inverses(self, dampings: Sequence[float]) -> None:
        self.refresher.update_inverses(list(dampings), self.block_weight_decays)

    def _refresh_curvature(
        self, k: int, batches: Batches, targets: Batches | None, force: bool = False
    ) -> bool:
        """Statistics every ``T_s`` and inverses every ``T_f`` (on a statistics subset); both if ``force``.

        Returns whether the inverses were refitted.
        """
        return self.refresher.refresh(
            k, batches, targets, self._fit_dampings, self.block_weight_decays, force=force
        )

    # -- gradients and directions ---------------------------------------------------------------
    def _gradient_of_h(self, p: Tensor) -> Tensor:
        """``grad h = grad(mean loss) + r p`` (a fresh tensor)."""
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        decay = self.decays.get(p, 0.0)
        return grad.add(p, alpha=decay) if decay else grad.clone()

    def _gradients_of_h(self) -> dict[Tensor, Tensor]:
        """``grad h`` per parameter (a fresh tensor for each)."""
        return {p: self._gradient_of_h(p) for p in self._params()}

    def _directions(self, grads: dict[Tensor, Tensor] | None = None, index: int = 0) -> dict[Tensor, Tensor]:
        """``(F_hat + (r + gamma) I)^{-1} grad h`` per parameter for damping candidate ``index``.

        Parameters outside the blocks (and all of them without preconditioning) get
        ``grad h``. Every tensor is fresh: callers may scale them in place. ``grads``:
        :meth:`_gradients_of_h` (computed if ``None``; not modified).
        """
        grads = self._gradients_of_h() if grads is None else grads
        directions = {p: g.clone() for p, g in grads.items()}
        if self.precondition_enabled and self.blocks:
            directions.update(precondition_parameters(self.curvature, grads, index))
        return directions

    # -- quadratic forms ------------------------------------------------------------------------
    def _fisher_gram(
        self,
        batches: Batches,
        targets: Batches | None,
        vectors: Sequence[dict[Tensor, Tensor]],
        global_examples: int | None = None,
    ) -> Tensor:
        """``G_ij = v_i^T F v_j``, the exact Fisher of the examples of ``batches`` (a JVP per vector).

        Data parallel: ``batches`` are this rank's part of ``global_examples`` (default: equal
        shards of the global batch); the result is the mean over all of them (one all-reduce).
        """
        tangents = [{self._param_names[id(p)]: v for p, v in vec.items()} for vec in vectors]
        with self.recorder.paused(), torch.enable_grad():
            gram = exact_gram(self.model, self.curvature.likelihood, batches, targets, tangents)
        local = sum(x.shape[0] for x in batches)
        return self._global_mean(gram, local, global_examples, "quadratic")

    def _decay_form(self, a: dict[Tensor, Tensor], b: dict[Tensor, Tensor]) -> Tensor | None:
        """``sum_p r_p <a_p, b_p>`` over the decayed parameters (``None`` if none is decayed)."""
        terms = [
            decay * (a[p].square() if a is b else a[p] * b[p]).sum()
            for p, decay in self.decays.items()
            if decay and p in a
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
        return {**self._last_stats, **self.refresher.health, **extra, **self.phase_times}

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim`` state plus iteration, curvature, generator, timers and guard (loads bitwise)."""
        state = super().state_dict()
        state["iteration"] = self.iteration
        state["curvature"] = self.curvature.state_dict()
        state["generator"] = self.generator.get_state()
        state["phase_times"] = self.timer.state_dict()
        state["pi_mean"] = self.refresher.pi_mean
        state["staleness_guard"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the model's parameters are loaded separately)."""
        state_dict = dict(state_dict)
        self.iteration = int(state_dict.pop("iteration"))
        self.curvature.load_state_dict(state_dict.pop("curvature"))
        self.generator.set_state(state_dict.pop("generator"))
        self.timer.load_state_dict(state_dict.pop("phase_times", {}))
        self.refresher.pi_mean = state_dict.pop("pi_mean", None)
        self.guard.load_state_dict(state_dict.pop("staleness_guard", {}), self.device)
        super().load_state_dict(state_dict)


def _scale_of(scaler: torch.amp.GradScaler | None, device: torch.device) -> Tensor | None:
    """A ``GradScaler``'s current scale as a 0-d float32 tensor on ``device`` (no host sync)."""
    if scaler is None or not scaler.is_enabled():
        return None
    return scaler.scale(torch.ones((), dtype=torch.float32, device=device))


def shared_arguments(arguments: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The knobs a subclass constructor forwards to :class:`KFCOptimizerBase` unchanged, by name.

    ``arguments`` is the constructor's ``locals()``: every base keyword argument found there
    under the same name (``model`` and ``defaults`` excepted), then ``overrides`` (knobs that
    the subclass converts first, e.g. ``inverse_dtype``). One list of names, the base's
    signature, instead of the same thirty keywords repeated in every subclass.
    """
    names = inspect.signature(KFCOptimizerBase.__init__).parameters
    shared = {name: arguments[name] for name in names if name in arguments and name not in _NOT_SHARED}
    return shared | overrides


#: Base-constructor parameters a subclass passes itself, not by name from its own arguments.
_NOT_SHARED = frozenset({"self", "model", "defaults", "staleness_guard"})
