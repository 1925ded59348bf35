"""Build an optimizer from the ``optimizer`` config group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from kfcrun.optim.averaging import averaging_decay
from kfcrun.optim.kfc_pre import KFCPre
from kfcrun.optim.param_groups import build_param_groups
from kfcrun.optim.sgd import SGD


def build_optimizer(
    cfg: Mapping[str, Any], model: nn.Module, batch_size: int, seed: int = 0
) -> torch.optim.Optimizer:
    """``kfcrun.optim.SGD`` or ``kfcrun.optim.KFCPre`` for ``model``, as ``cfg`` says.

    ``batch_size`` turns the averaging timescale (in examples) into the per-iteration
    decay; ``seed`` seeds KFC-pre's generator for sampled Fisher targets.
    """
    avg_decay = averaging_decay(batch_size, cfg["avg_timescale"]) if cfg["avg_timescale"] else None
    layer_wd = dict(cfg.get("layer_weight_decay") or {})
    if cfg["name"] == "sgd":
        groups = build_param_groups(
            model,
            cfg["lr"],
            weight_decay=cfg["weight_decay"],
            layer_weight_decay=layer_wd,
            bias_lr_scale=cfg["bias_lr_scale"],
            decay_biases=cfg["decay_biases"],
        )
        return SGD(
            groups,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            avg_decay=avg_decay,
            avg_mode=cfg["avg_mode"],
            avg_start=cfg["avg_start"],
        )
    if cfg["name"] == "kfc_pre":
        return KFCPre(
            model,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            weight_decay=cfg["weight_decay"],
            layer_weight_decay=layer_wd,
            decay_biases=cfg["decay_biases"],
            damping=cfg["damping"],
            damping_mode=cfg["damping_mode"],
            stat_decay=cfg["stat_decay"],
            stats_every=cfg["stats_every"],
            inverse_every=cfg["inverse_every"],
            refresh_until=cfg["refresh_until"],
            clip=cfg["clip"],
            nu_fraction=cfg["nu_fraction"],
            stats_fraction=cfg["stats_fraction"],
            init_examples=cfg["init_examples"],
            fisher=cfg["fisher"],
            approx=cfg["approx"],
            precondition=cfg["precondition"],
            avg_decay=avg_decay,
            avg_mode=cfg["avg_mode"],
            avg_start=cfg["avg_start"],
            seed=seed,
            record_inputs=False,
        )
    raise ValueError(f"unknown optimizer {cfg['name']!r}")
