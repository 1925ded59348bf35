"""Optimizers: SGD (the paper's baseline), KFC-pre, K-FAC, and a KFC preconditioner for any optimizer.

:class:`SGD`, :class:`KFCPre` and :class:`KFAC` are ``torch.optim.Optimizer`` subclasses;
:class:`KFCPreconditioner` turns ``.grad`` into the KFC natural gradient for any optimizer.

SGD, KFC-pre and K-FAC implement :class:`~kfcrun.optim.protocol.TrainingOptimizer`, the
small protocol the training loop uses (initialize, step with the mini-batch, averaged
parameters, stats).
"""

from kfcrun.optim.averaging import IterateAveraging, averaging_decay
from kfcrun.optim.kfac import KFAC
from kfcrun.optim.kfc_pre import KFCPre
from kfcrun.optim.param_groups import build_param_groups, layer_weight_decays, weight_layers
from kfcrun.optim.preconditioner import KFCPreconditioner
from kfcrun.optim.protocol import TrainingOptimizer
from kfcrun.optim.sgd import SGD

__all__ = [
    "KFAC",
    "SGD",
    "IterateAveraging",
    "KFCPre",
    "KFCPreconditioner",
    "TrainingOptimizer",
    "averaging_decay",
    "build_param_groups",
    "layer_weight_decays",
    "weight_layers",
]
