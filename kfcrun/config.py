"""Validation of a composed run config, before anything is written.

Every rule names its key, what is allowed and an example of a fix, so that a bad
value stops the run with ONE line, e.g.::

    kfcrun: config error: optimizer.lr=-1 is out of range; allowed: a number > 0; fix: e.g. optimizer.lr=0.003

Unknown keys are refused too: Hydra refuses unknown command-line keys itself (the
config is in struct mode), and :func:`validate_config` refuses keys that a
hand-written experiment file adds, which Hydra would merge silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kfcrun.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """What one config key accepts."""

    allowed: str  # human-readable description of the allowed values
    check: Callable[[Any], bool]
    example: str  # a valid value to suggest in the fix


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(minimum: int, example: str, optional: bool = False) -> Rule:
    text = f"an integer >= {minimum}" + (" or null" if optional else "")
    return Rule(text, lambda v: (optional and v is None) or (_is_int(v) and v >= minimum), example)


def number(
    example: str,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    optional: bool = False,
) -> Rule:
    bounds = [
        f"> {gt:g}" if gt is not None else "",
        f">= {ge:g}" if ge is not None else "",
        f"< {lt:g}" if lt is not None else "",
        f"<= {le:g}" if le is not None else "",
    ]
    text = "a number " + " and ".join(b for b in bounds if b) + (" or null" if optional else "")

    def check(v: Any) -> bool:
        if optional and v is None:
            return True
        if not _is_number(v):
            return False
        return (
            (gt is None or v > gt)
            and (ge is None or v >= ge)
            and (lt is None or v < lt)
            and (le is None or v <= le)
        )

    return Rule(text, check, example)


def choice(*values: Any) -> Rule:
    shown = " | ".join("null" if v is None else str(v) for v in values)
    return Rule(
        f"one of {shown}", lambda v: v in values and type(v) is type(values[values.index(v)]), str(values[0])
    )


def boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool), "true")


def text(example: str, optional: bool = False) -> Rule:
    return Rule(
        "a string" + (" or null" if optional else ""),
        lambda v: (optional and v is None) or isinstance(v, str),
        example,
    )


def mapping_of_numbers(example: str) -> Rule:
    return Rule(
        "a mapping from layer name to a number >= 0",
        lambda v: isinstance(v, Mapping) and all(_is_number(x) and x >= 0 for x in v.values()),
        example,
    )


def list_of(item: Rule, example: str) -> Rule:
    """A non-empty list whose every entry satisfies ``item``."""
    return Rule(
        f"a non-empty list, each entry {item.allowed}",
        lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(item.check(x) for x in v),
        example,
    )


def device_rule() -> Rule:
    def check(v: Any) -> bool:
        if not isinstance(v, str):
            return False
        return v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())

    return Rule("auto | cpu | cuda | cuda:N", check, "auto")


COMMON_RULES: dict[str, Rule] = {
    "task": choice("train", "assumptions"),
    "name": text("my_run"),
    "seed": integer(0, "0"),
    "resume": text("outputs/<date>/<run>", optional=True),
    "checkpoint": text("outputs/<date>/<run>", optional=True),
    "objective": choice("train/error", "train/nll", "test/error", "test/nll"),
    "dataset.name": choice("cifar10", "svhn", "synthetic"),
    "dataset.root": text("../shared/data/cifar10", optional=True),
    "dataset.download": boolean(),
    "dataset.format": choice("auto", "official", "image_folder"),
    "dataset.cache_dir": text("~/.cache/kfcrun", optional=True),
    "dataset.num_classes": integer(2, "10"),
    "dataset.image_size": integer(8, "32"),
    "dataset.channels": integer(1, "3"),
    "dataset.pixel_scale": number("1.0", gt=0),
    "dataset.mean": choice("image", "channel", "none"),
    "dataset.std": choice("none", "channel"),
    "dataset.use_extra": boolean(),
    "dataset.num_train": integer(1, "2048"),
    "dataset.num_test": integer(1, "512"),
    "model.name": choice("cuda_convnet", "srivastava_svhn"),
    "model.batch_norm": boolean(),
    "model.pooling": choice("paper", "max", "avg"),
    "model.dropout": boolean(),
    "model.max_norm": number("4.0", gt=0, optional=True),
    "trainer.batch_size": integer(1, "128"),
    "trainer.max_iters": integer(1, "1000", optional=True),
    "trainer.max_epochs": number("10", gt=0, optional=True),
    "trainer.eval_every": integer(1, "500"),
    "trainer.train_eval_size": integer(1, "10000"),
    "trainer.eval_batch_size": integer(1, "1000"),
    "trainer.eval_current": boolean(),
    "trainer.checkpoint_every": integer(1, "1000", optional=True),
    "trainer.log_every": integer(1, "10"),
    "trainer.device": device_rule(),
    "trainer.threads": integer(1, "2", optional=True),
    "trainer.progress": boolean(),
    "logger.tensorboard": boolean(),
    "assumptions.num_examples": integer(1, "2000"),
    "assumptions.batch_size": integer(1, "250"),
    "assumptions.max_offset": integer(1, "4"),
    "assumptions.feature_maps": list_of(integer(0, "0"), "[0,1,2]"),
    "assumptions.poolings": list_of(choice("paper", "max", "avg"), "[paper,avg]"),
    "assumptions.checkpoint_avg": text("outputs/<date>/<run>", optional=True),
    "assumptions.train_iters": integer(1, "2000"),
    "assumptions.mode": choice("eval", "train"),
}

OPTIMIZER_COMMON: dict[str, Rule] = {
    "optimizer.name": choice("sgd", "kfc_pre"),
    "optimizer.lr": number("0.003", gt=0),
    "optimizer.momentum": number("0.9", ge=0, lt=1),
    "optimizer.weight_decay": number("0.004", ge=0),
    "optimizer.layer_weight_decay": mapping_of_numbers("{fc10: 1.0}"),
    "optimizer.decay_biases": boolean(),
    "optimizer.avg_timescale": number("50000", gt=0, optional=True),
    "optimizer.avg_mode": choice("paper", "debiased"),
    "optimizer.avg_start": integer(0, "0"),
}

OPTIMIZER_RULES: dict[str, dict[str, Rule]] = {
    "sgd": {**OPTIMIZER_COMMON, "optimizer.bias_lr_scale": number("2.0", gt=0)},
    "kfc_pre": {
        **OPTIMIZER_COMMON,
        "optimizer.damping": number("0.001", gt=0),
        "optimizer.damping_mode": choice("pi", "exact"),
        "optimizer.stat_decay": number("0.95", ge=0, lt=1),
        "optimizer.stats_every": integer(1, "10"),
        "optimizer.inverse_every": integer(1, "20"),
        "optimizer.refresh_until": integer(0, "0"),
        "optimizer.clip": number("0.3", gt=0, optional=True),
        "optimizer.nu_fraction": number("0.25", gt=0, le=1),
        "optimizer.stats_fraction": number("0.25", gt=0, le=1),
        "optimizer.init_examples": integer(0, "10000"),
        "optimizer.fisher": choice("sampled", "empirical"),
        "optimizer.approx": choice("kfc", "sua"),
        "optimizer.precondition": boolean(),
    },
}

#: Keys whose value is a free-form mapping (its own keys are not checked against a schema).
MAPPING_KEYS = {"optimizer.layer_weight_decay"}


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in MAPPING_KEYS:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def rules_for(cfg: Mapping[str, Any]) -> dict[str, Rule]:
    optimizer = cfg.get("optimizer", {}) or {}
    name = optimizer.get("name", "sgd")
    return {**COMMON_RULES, **OPTIMIZER_RULES.get(name, OPTIMIZER_COMMON)}


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` (one line) for the first invalid, missing or unknown key."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    container.pop("hydra", None)
    values = _flatten(container)
    rules = rules_for(container)

    for key in values:
        if key not in rules:
            section = key.split(".")[0]
            known = sorted(k for k in rules if k.startswith(section + "."))
            if not known:  # not even the section exists: list the sections
                known = sorted({k.split(".")[0] + (".*" if "." in k else "") for k in rules})
            raise ConfigError(
                f"config error: unknown key {key} (value {_show(values[key])}); allowed keys here: "
                f"{', '.join(known)}; fix: correct the spelling or remove it"
            )
    for key, rule in rules.items():
        if key not in values:
            if key.startswith(("dataset.num_train", "dataset.num_test")):
                continue  # only the synthetic dataset has these
            raise ConfigError(
                f"config error: missing key {key}; allowed: {rule.allowed}; fix: add {key}={rule.example} "
                "(or +{key}=... on the command line)"
            )
        value = values[key]
        if not rule.check(value):
            problem = "has the wrong type" if not _plausible_type(rule, value) else "is out of range"
            raise ConfigError(
                f"config error: {key}={_show(value)} {problem}; allowed: {rule.allowed}; "
                f"fix: e.g. {key}={rule.example}"
            )
    _validate_relations(values)


def _plausible_type(rule: Rule, value: Any) -> bool:
    """Whether ``value`` is of a type the rule could accept (to word the message)."""
    if rule.allowed.startswith(("an integer", "a number")):
        return _is_number(value) or value is None
    if rule.allowed.startswith("true or false"):
        return isinstance(value, bool)
    return True


def _validate_relations(values: Mapping[str, Any]) -> None:
    if values["trainer.max_iters"] is None and values["trainer.max_epochs"] is None:
        raise ConfigError(
            "config error: trainer.max_iters and trainer.max_epochs are both null; allowed: at least one "
            "set; fix: e.g. trainer.max_iters=1000"
        )
    if values["dataset.name"] != "synthetic" and not values["dataset.root"]:
        raise ConfigError(
            f"config error: dataset.root=null for dataset {values['dataset.name']}; allowed: a directory; "
            "fix: dataset.root=<dir with the data> (add dataset.download=true to fetch it)"
        )
    if values["dataset.name"] == "synthetic" and "dataset.num_train" not in values:
        raise ConfigError(
            "config error: dataset.num_train is missing for the synthetic dataset; "
            "fix: +dataset.num_train=2048"
        )
    if values["task"] == "train" and values["resume"] is not None:
        _require_run_dir("resume", values["resume"])
    if values["task"] == "assumptions" and values["checkpoint"] is None and values["resume"] is None:
        pass  # the assumptions task trains a network first when no checkpoint is given
    if values["checkpoint"] is not None:
        _require_run_dir("checkpoint", values["checkpoint"])
    if values["task"] == "assumptions" and values.get("assumptions.checkpoint_avg") is not None:
        _require_run_dir("assumptions.checkpoint_avg", values["assumptions.checkpoint_avg"])


def _require_run_dir(key: str, value: str) -> None:
    from kfcrun.checkpoint import checkpoint_path, find_checkpoint

    if find_checkpoint(value) is None:
        target = checkpoint_path(Path(value).expanduser())
        raise ConfigError(
            f"config error: {key}={value} has no checkpoint ({target} not found); allowed: a run directory "
            "with checkpoints/last.pt or a checkpoint file; fix: point to an existing run, e.g. "
            f"{key}=outputs/<date>/<time>-<name>-<id>"
        )
