"""Any torchvision classification model, by name, untrained (``weights=None``).

``model=torchvision model.arch=mobilenet_v3_small`` builds
``torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=<dataset's>)``.
These networks were designed for 224x224 ImageNet images; on 32x32 inputs their stems
shrink the maps fast (a ResNet-18's last stage runs on 1x1 maps), which is their business,
not kfcrun's. They expect 3 input channels.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Any

import torchvision
from torch import nn

from kfcrun.errors import ConfigError
from kfcrun.schema import Rule

__all__ = ["ARCH_RULE", "classification_models", "torchvision_classifier"]


@cache
def classification_models() -> tuple[str, ...]:
    """The names of torchvision's classification models (``torchvision.models.list_models``)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


#: ``model.arch``: a torchvision classification model.
ARCH_RULE = Rule(
    "the name of a torchvision classification model (torchvision.models.list_models())",
    lambda v: isinstance(v, str) and v in classification_models(),
    "resnet18",
)


def torchvision_classifier(
    arch: Annotated[str, ARCH_RULE], num_classes: int = 10, in_channels: int = 3, **kwargs: Any
) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=num_classes)``, randomly initialised."""
    if arch not in classification_models():
        raise ConfigError(
            f"config error: model.arch={arch} is not a torchvision classification model; "
            f"allowed: e.g. resnet18, mobilenet_v3_small, efficientnet_b0; fix: model.arch=resnet18"
        )
    if in_channels != 3:
        raise ConfigError(
            f"config error: torchvision models take 3 input channels, the dataset has {in_channels}; "
            "fix: use a 3-channel dataset or a kfcrun model"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
