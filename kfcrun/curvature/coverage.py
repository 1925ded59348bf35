"""Which layers KFC covers, and the names they go by.

:func:`kfc_layers` is the one definition of coverage: the optimizers, the weight-decay
groups and the assumption study all ask it. A covered layer gets one Kronecker block
(``Omega ⊗ Gamma``, :mod:`kfcrun.curvature.blocks`); every other parameter is left to
the optimizer's plain step.

Layer names are the qualified names of ``model.named_modules()`` with the prefixes
that wrappers insert removed (:func:`canonical_name`): ``DistributedDataParallel``
adds ``module.`` and ``torch.compile`` adds ``_orig_mod.``, so the same network has the
same layer names in configs and checkpoints however it is wrapped.
"""

from __future__ import annotations

from torch import nn

__all__ = ["KRONECKER_LAYER_TYPES", "WRAPPER_PREFIXES", "canonical_name", "kfc_layers"]

#: Module types that get a Kronecker block.
KRONECKER_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)

#: Name components that wrappers insert around the wrapped model.
WRAPPER_PREFIXES = ("module", "_orig_mod")


def canonical_name(name: str) -> str:
    """``name`` without wrapper components, e.g. ``module._orig_mod.conv1`` -> ``conv1``."""
    parts = [part for part in name.split(".") if part and part not in WRAPPER_PREFIXES]
    return ".".join(parts)


def kfc_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer KFC covers (``nn.Conv2d``, ``nn.Linear``) by canonical name, in ``named_modules`` order."""
    return {
        canonical_name(name): module
        for name, module in model.named_modules()
        if isinstance(module, KRONECKER_LAYER_TYPES)
    }
