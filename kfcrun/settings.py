"""Typed settings of the runner's own config sections: the top level, ``trainer`` and ``logger``.

Each section is a dataclass whose fields carry their config rule (:mod:`kfcrun.schema`),
so adding a knob means adding a field here and a line in the section's YAML. The
dataset section is :class:`kfcrun.data.DatasetConfig`; the ``model`` and ``optimizer``
sections are validated from the constructor their ``_target_`` names (:mod:`kfcrun.builders`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any

from kfcrun.schema import boolean, choice, device_rule, integer, list_of, number, parse_period, period, text

__all__ = ["LoggerSettings", "RunSettings", "TrainerSettings", "from_section"]


@dataclass(frozen=True)
class RunSettings:
    """Top-level keys of a run config.

    Attributes:
        task: ``train`` a network, or run a study (``assumptions``: paper Sec. 5.1, Figs. 1-2).
        name: run name used in the output directory; experiments set it to their own name.
        seed: seed for parameter init, data order, dropout and sampled Fisher targets.
        resume: an earlier run's directory to continue from its last checkpoint.
        checkpoint: for studies, a run directory (or checkpoint file) holding a trained network.
        objective: the metric returned to Hydra sweepers and used by sweep tables (the paper
            tuned learning rates on final training error, Sec. 5.2).
    """

    task: Annotated[str, choice("train", "assumptions")] = "train"
    name: Annotated[str, text("my_run")] = "custom"
    seed: Annotated[int, integer(0, "0")] = 0
    resume: Annotated[str | None, text("outputs/<date>/<run>", optional=True)] = None
    checkpoint: Annotated[str | None, text("outputs/<date>/<run>", optional=True)] = None
    objective: Annotated[str, choice("train/error", "train/nll", "test/error", "test/nll")] = "train/error"


@dataclass(frozen=True)
class TrainerSettings:
    """The ``trainer`` section: batch size, budget, evaluation, checkpoints, device.

    Iterations are optimizer updates (mini-batches). ``eval_every`` and
    ``checkpoint_every`` are periods: an int counts iterations, ``"<x>epoch"`` counts
    epochs and keeps its meaning when ``batch_size`` changes (:meth:`iterations`).
    ``max_train_seconds`` stops the run once that much training time (``train_time_s``) is
    used, a time budget on top of the iteration budget (the stop iteration then depends on
    the machine's speed). ``test_eval_size`` evaluates on a fixed random subset of the test set
    (``null``: all of it). ``averaged_bn``: BatchNorm's running statistics for the averaged
    parameters, either recomputed (``recompute``) on the training evaluation subset before they are evaluated
    (:func:`kfcrun.evaluate.batchnorm_statistics_for_current_parameters`; the training run's
    own statistics are restored afterwards), or the ``running`` ones gathered along the
    training iterates, which do not match an average of the weights.
    ``lr_schedule`` (``constant``, ``cosine``, ``step`` with ``lr_milestones`` as fractions
    of the run and ``lr_decay``) scales the optimizer's learning rate per iteration
    (:mod:`kfcrun.optim.lr_schedule`). ``precision``: the training forward and backward in
    ``fp32``, or under autocast in ``bf16`` or ``fp16`` (with a ``GradScaler``); the curvature's
    statistics, inverses and ``nu`` stay in float32/float64 either way. ``compile``: the
    training forward through ``torch.compile`` (the curvature's own passes run eagerly).
    """

    batch_size: Annotated[int, integer(1, "128")] = 128
    max_iters: Annotated[int | None, integer(1, "1000", optional=True)] = 1000
    max_epochs: Annotated[float | None, number("10", gt=0, optional=True)] = None
    max_train_seconds: Annotated[float | None, number("1200", gt=0, optional=True)] = None
    eval_every: Annotated[int | str, period("500")] = 500
    train_eval_size: Annotated[int, integer(1, "10000")] = 10000
    test_eval_size: Annotated[int | None, integer(1, "1000", optional=True)] = None
    eval_batch_size: Annotated[int, integer(1, "1000")] = 1000
    eval_current: Annotated[bool, boolean()] = True
    averaged_bn: Annotated[str, choice("recompute", "running")] = "recompute"
    checkpoint_every: Annotated[int | str | None, period("1000", optional=True)] = 1000
    log_every: Annotated[int, integer(1, "10")] = 10
    lr_schedule: Annotated[str, choice("constant", "cosine", "step")] = "constant"
    lr_milestones: Annotated[tuple[float, ...], list_of(number("0.5", gt=0, lt=1), "[0.5, 0.75]")] = (
        0.5,
        0.75,
    )
    lr_decay: Annotated[float, number("0.1", gt=0, le=1)] = 0.1
    device: Annotated[str, device_rule()] = "auto"
    threads: Annotated[int | None, integer(1, "2", optional=True)] = None
    progress: Annotated[bool, boolean()] = True
    precision: Annotated[str, choice("fp32", "bf16", "fp16")] = "fp32"
    compile: Annotated[bool, boolean()] = False

    def iterations(self, value: int | str, batches_per_epoch: int) -> int:
        """A period (``eval_every``, ``checkpoint_every``) in iterations for this run's epoch length."""
        return parse_period(value, batches_per_epoch)


@dataclass(frozen=True)
class LoggerSettings:
    """The ``logger`` section. ``metrics.jsonl`` is always written; TensorBoard events optionally."""

    tensorboard: Annotated[bool, boolean()] = True


def from_section(cls: type, section: Mapping[str, Any]) -> Any:
    """``cls(**section)`` keeping only ``cls``'s fields (other keys belong to other readers)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in names})
