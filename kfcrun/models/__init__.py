"""The paper's networks, built by name from the ``model`` config group."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from kfcrun.models.cuda_convnet import CudaConvnetCifar10
from kfcrun.models.layers import SpatialResponseNorm
from kfcrun.models.svhn_net import SrivastavaSVHNNet

#: config name -> model class
MODELS: dict[str, type[nn.Module]] = {
    "cuda_convnet": CudaConvnetCifar10,
    "srivastava_svhn": SrivastavaSVHNNet,
}


def build_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int = 32,
    batch_norm: bool = False,
    pooling: str = "paper",
    dropout: bool = True,
) -> nn.Module:
    """Instantiate a network by its config name (see :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    kwargs = dict(
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        batch_norm=batch_norm,
        pooling=pooling,
    )
    if name == "srivastava_svhn":
        kwargs["dropout"] = dropout
    return MODELS[name](**kwargs)


def model_from_config(model_cfg: Mapping[str, Any], dataset_cfg: Mapping[str, Any]) -> nn.Module:
    """The network a ``model`` config section describes, shaped for a ``dataset`` section."""
    return build_model(
        model_cfg["name"],
        num_classes=dataset_cfg["num_classes"],
        in_channels=dataset_cfg["channels"],
        image_size=dataset_cfg["image_size"],
        batch_norm=bool(model_cfg.get("batch_norm", False)),
        pooling=str(model_cfg.get("pooling", "paper")),
        dropout=bool(model_cfg.get("dropout", True)),
    )


__all__ = [
    "MODELS",
    "CudaConvnetCifar10",
    "SpatialResponseNorm",
    "SrivastavaSVHNNet",
    "build_model",
    "model_from_config",
]
