"""Optimizers as ``torch.optim.Optimizer`` subclasses: SGD (the paper's baseline) and KFC-pre."""

from kfcrun.optim.averaging import IterateAveraging, averaging_decay
from kfcrun.optim.build import build_optimizer
from kfcrun.optim.param_groups import build_param_groups, layer_weight_decays, weight_layers
from kfcrun.optim.sgd import SGD

__all__ = [
    "SGD",
    "IterateAveraging",
    "averaging_decay",
    "build_optimizer",
    "build_param_groups",
    "layer_weight_decays",
    "weight_layers",
]


def __getattr__(name: str):
    # KFCPre pulls in the curvature package; import it on first use.
    if name == "KFCPre":
        from kfcrun.optim.kfc_pre import KFCPre

        return KFCPre
    raise AttributeError(name)
