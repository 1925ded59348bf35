"""Build the network and the optimizer from their config sections with Hydra's ``instantiate``.

``configs/model/*.yaml`` and ``configs/optimizer/*.yaml`` name the callable that builds
them in ``_target_``; every other key is one of its arguments, except the few keys the
runner reads itself (:data:`MODEL_RUNNER_KEYS`, :data:`OPTIMIZER_RUNNER_KEYS`). The
arguments the runner supplies (the network's input shape from the dataset; the model,
the averaging decay and the seed for the optimizer) are passed when the target accepts
them. Config validation reads the targets' annotated signatures (:mod:`kfcrun.schema`),
so a knob is declared once, in the constructor.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from hydra.utils import get_object, instantiate
from torch import nn

from kfcrun.errors import ConfigError
from kfcrun.optim import averaging_decay
from kfcrun.optim.protocol import TrainingOptimizer
from kfcrun.schema import Rule, number, rules_of, text

__all__ = [
    "MODEL_RUNNER_KEYS",
    "OPTIMIZER_RUNNER_KEYS",
    "build_model",
    "build_optimizer",
    "model_rules",
    "optimizer_rules",
]

#: ``model`` keys that are not constructor arguments.
MODEL_RUNNER_KEYS: dict[str, Rule] = {
    "_target_": text("kfcrun.models.CudaConvnetCifar10"),
    "name": text("cuda_convnet"),
    # Max-norm constraint on each unit's incoming weights after every step (null = off).
    "max_norm": number("4.0", gt=0, optional=True),
}
#: Model constructor arguments the runner takes from the dataset section.
MODEL_SUPPLIED = ("num_classes", "in_channels", "image_size")

#: ``optimizer`` keys that are not constructor arguments.
OPTIMIZER_RUNNER_KEYS: dict[str, Rule] = {
    "_target_": text("kfcrun.optim.KFCPre"),
    "name": text("kfc_pre"),
    # Averaging timescale in training examples; the optimizer gets avg_decay = exp(-batch / timescale).
    "avg_timescale": number("50000", gt=0, optional=True),
}
#: Optimizer arguments the runner supplies (when the target accepts them).
OPTIMIZER_SUPPLIED = ("model", "avg_decay", "seed", "record_inputs")


def _target(section: str, node: Mapping[str, Any]) -> Callable[..., Any]:
    path = node.get("_target_")
    if not isinstance(path, str):
        runner_keys = MODEL_RUNNER_KEYS if section == "model" else OPTIMIZER_RUNNER_KEYS
        raise ConfigError(
            f"config error: {section}._target_ is missing; allowed: the import path of a builder, e.g. "
            f"{runner_keys['_target_'].example}; "
            f"fix: use a {section} config from configs/{section}/"
        )
    try:
        return get_object(path)
    except Exception as err:
        raise ConfigError(
            f"config error: {section}._target_={path} cannot be imported ({err}); "
            f"fix: use a {section} config from configs/{section}/"
        ) from err


def model_rules(node: Mapping[str, Any]) -> dict[str, Rule]:
    """Rules of the ``model`` section: its target's annotated arguments plus the runner's keys."""
    rules = {f"model.{k}": r for k, r in MODEL_RUNNER_KEYS.items()}
    rules.update(rules_of(_target("model", node), "model.", skip=MODEL_SUPPLIED))
    return rules


def optimizer_rules(node: Mapping[str, Any]) -> dict[str, Rule]:
    """Rules of the ``optimizer`` section: its target's annotated arguments plus the runner's keys."""
    rules = {f"optimizer.{k}": r for k, r in OPTIMIZER_RUNNER_KEYS.items()}
    rules.update(rules_of(_target("optimizer", node), "optimizer.", skip=OPTIMIZER_SUPPLIED))
    return rules


def _arguments(node: Mapping[str, Any], runner_keys: Mapping[str, Rule]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k not in runner_keys}


def _accepted(target: Callable[..., Any], supplied: Mapping[str, Any]) -> dict[str, Any]:
    params = inspect.signature(target).parameters
    return {k: v for k, v in supplied.items() if k in params}


def build_model(model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> nn.Module:
    """The network ``model_cfg`` describes, shaped for the ``dataset_cfg`` section's data."""
    target = _target("model", model_cfg)
    supplied = {
        "num_classes": dataset_cfg["num_classes"],
        "in_channels": dataset_cfg["channels"],
        "image_size": dataset_cfg["image_size"],
    }
    partial = instantiate(
        {"_target_": model_cfg["_target_"], "_partial_": True, **_arguments(model_cfg, MODEL_RUNNER_KEYS)},
        _convert_="all",
    )
    return partial(**_accepted(target, supplied))


def build_optimizer(
    optimizer_cfg: Mapping[str, Any], model: nn.Module, batch_size: int, seed: int = 0
) -> TrainingOptimizer:
    """The optimizer ``optimizer_cfg`` describes, for ``model``.

    ``batch_size`` turns ``avg_timescale`` (in examples) into the per-iteration decay;
    ``seed`` seeds KFC-pre's generator for sampled Fisher targets. The runner always
    passes each mini-batch to ``step``, so input recording is off.
    """
    target = _target("optimizer", optimizer_cfg)
    timescale = optimizer_cfg.get("avg_timescale")
    supplied = {
        "model": model,
        "avg_decay": averaging_decay(batch_size, timescale) if timescale else None,
        "seed": seed,
        "record_inputs": False,
    }
    partial = instantiate(
        {
            "_target_": optimizer_cfg["_target_"],
            "_partial_": True,
            **_arguments(optimizer_cfg, OPTIMIZER_RUNNER_KEYS),
        },
        _convert_="all",
    )
    return partial(**_accepted(target, supplied))
