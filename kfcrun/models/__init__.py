"""The paper's networks, a CIFAR ResNet-18 and any torchvision classifier.

The runner builds them from ``configs/model/*.yaml`` (``_target_``, :mod:`kfcrun.builders`);
:func:`build_model` builds one of the paper's networks by its config name, for scripts.
"""

from __future__ import annotations

from torch import nn

from kfcrun.models.cuda_convnet import CudaConvnetCifar10
from kfcrun.models.layers import SpatialResponseNorm
from kfcrun.models.resnet import ResNet18Cifar
from kfcrun.models.svhn_net import SrivastavaSVHNNet
from kfcrun.models.torchvision_models import torchvision_classifier

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


__all__ = [
    "MODELS",
    "CudaConvnetCifar10",
    "ResNet18Cifar",
    "SpatialResponseNorm",
    "SrivastavaSVHNNet",
    "build_model",
    "torchvision_classifier",
]
