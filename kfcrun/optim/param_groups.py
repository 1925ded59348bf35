"""Per-parameter settings from config: per-layer weight decay and per-kind lr scale.

cuda-convnet's ``layer-params-18pct.cfg`` gives each layer its own weight cost (0.004
on the convs, 1 on fc10) and biases twice the weights' learning rate (``epsB = 2 *
epsW``); biases are never decayed (cuda-convnet ``Weights(..., wc=0)`` for biases).
Weight decay here is always the L2 term ``lambda/2 * |w|^2`` of the objective, with
``lambda`` relative to the MEAN loss over the mini-batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from torch import Tensor, nn

from kfcrun.curvature import canonical_name
from kfcrun.curvature.coverage import KRONECKER_LAYER_TYPES
from kfcrun.errors import ConfigError


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights carry weight decay: convolutions and Linear layers, by canonical name.

    Normalization layers and embeddings are never decayed. Whether a layer has a
    curvature block (:func:`~kfcrun.curvature.kfc_layers`) does not matter: the L2 term
    is part of the objective either way.
    """
    return {
        canonical_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, KRONECKER_LAYER_TYPES)
    }


def layer_weight_decays(
    model: nn.Module, weight_decay: float, overrides: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Weight-decay coefficient ``lambda`` for each weight layer (:func:`weight_layers`).

    ``overrides`` maps a layer's name (as in ``model.named_modules()``, without wrapper
    prefixes such as ``module.``) to its own ``lambda``; every other layer gets ``weight_decay``.
    """
    layers = weight_layers(model)
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(layers))
    if unknown:
        raise ConfigError(
            f"config error: optimizer.layer_weight_decay names unknown layer(s) {unknown}; "
            f"allowed: {sorted(layers)}; fix: use those names or remove the entries"
        )
    return {name: float(overrides.get(name, weight_decay)) for name in layers}


def parameter_weight_decays(
    model: nn.Module, lambdas: Mapping[str, float], decay_biases: bool = False
) -> dict[Tensor, float]:
    """``{parameter: lambda}`` of the decayed parameters: weight-layer weights (biases if ``decay_biases``).

    ``lambdas`` is :func:`layer_weight_decays`'s result; parameters with ``lambda = 0`` are left out.
    """
    out: dict[Tensor, float] = {}
    for name, module in weight_layers(model).items():
        decay = float(lambdas.get(name, 0.0))
        if not decay:
            continue
        weight, bias = cast(Tensor, module.weight), cast("Tensor | None", module.bias)
        if weight.requires_grad:
            out[weight] = decay
        if decay_biases and bias is not None and bias.requires_grad:
            out[bias] = decay
    return out


def build_param_groups(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.0,
    layer_weight_decay: Mapping[str, float] | None = None,
    bias_lr_scale: float = 1.0,
    decay_biases: bool = False,
) -> list[dict]:
    """One param group per parameter, carrying its own ``lr`` and ``weight_decay``.

    * weight-layer weights: ``lr`` and the layer's ``lambda`` (see
      :func:`layer_weight_decays`).
    * Their biases: ``lr * bias_lr_scale``; decayed with the layer's ``lambda`` only if
      ``decay_biases``.
    * Everything else (e.g. BatchNorm scale and shift): ``lr``, no decay.

    Each group also records ``name`` and ``lr_scale`` so schedules can rescale the base lr.
    """
    layers = weight_layers(model)
    decays = layer_weight_decays(model, weight_decay, layer_weight_decay)
    groups: list[dict] = []
    for raw_name, module in model.named_modules():
        module_name = canonical_name(raw_name)
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            scale, decay = 1.0, 0.0
            if module_name in decays and module is layers[module_name]:
                if param_name == "bias":
                    scale = bias_lr_scale
                    decay = decays[module_name] if decay_biases else 0.0
                else:
                    decay = decays[module_name]
            groups.append(
                {
                    "params": [param],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": decay,
                    "name": full_name,
                }
            )
    return groups
