"""Config rules shared by the curvature optimizers' constructors (KFC-pre, the preconditioner).

The likelihood knob accepts a config name or, from Python, a
:class:`~kfcrun.curvature.Likelihood` object; ``skip_layers`` a list of layer names or
patterns. Both are declared once here and used in the constructors' annotations.
"""

from __future__ import annotations

from typing import Any

from kfcrun.curvature import LIKELIHOODS, Likelihood
from kfcrun.schema import Rule

__all__ = ["LIKELIHOOD_RULE", "SKIP_LAYERS_RULE"]


def _likelihood(value: Any) -> bool:
    return isinstance(value, Likelihood) or (isinstance(value, str) and value in LIKELIHOODS)


def _names(value: Any) -> bool:
    return value is None or (
        isinstance(value, (list, tuple)) and all(isinstance(x, str) and x for x in value)
    )


#: ``likelihood``: one of the names in :data:`kfcrun.curvature.LIKELIHOODS` (or a Likelihood object).
LIKELIHOOD_RULE = Rule(f"one of {' | '.join(LIKELIHOODS)}", _likelihood, "cross_entropy")
#: ``skip_layers``: module names or shell-style patterns (see :func:`kfcrun.curvature.layer_matches`).
SKIP_LAYERS_RULE = Rule("a list of layer names or patterns", _names, "[fc10, 'layer4.*']")
