"""One vocabulary for the curvature settings, shared by configs, optimizers and curvature.

Each setting is a string enum: the value is what a config file or a keyword argument
spells, so ``FisherType("sampled")`` and ``FisherType.SAMPLED`` are the same thing and
a plain string is accepted wherever an enum is expected (:meth:`Choice.parse`).
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["Choice", "DampingMode", "FisherType", "OmegaModel"]

_E = TypeVar("_E", bound="Choice")


class Choice(str, Enum):
    """A string enum whose ``str()`` is its value and whose parse error lists the choices."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def parse(cls: type[_E], value: str | _E, what: str | None = None) -> _E:
        """``cls(value)``, with a one-line error naming ``what`` and the allowed values."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(repr(member.value) for member in cls)
            raise ValueError(f"{what or cls.__name__} must be one of {allowed}, got {value!r}") from None

    @classmethod
    def values(cls) -> tuple[str, ...]:
        """The spellings, in definition order."""
        return tuple(member.value for member in cls)


class FisherType(Choice):
    """Which targets the pre-activation derivatives ``DS`` come from (paper Sec. 3.1, footnote 3).

    ``SAMPLED``: one target per example drawn from the model's predictive distribution,
    a one-sample Monte-Carlo estimate of the true Fisher (the paper's choice).
    ``EXPECTED``: the exact expectation over targets (one backward pass per class).
    ``EMPIRICAL``: the training labels, the empirical Fisher, a different and worse object.
    """

    SAMPLED = "sampled"
    EXPECTED = "expected"
    EMPIRICAL = "empirical"


class DampingMode(Choice):
    """How ``λ + γ`` is added to a Kronecker block ``Omega ⊗ Gamma``.

    ``PI``: factored Tikhonov damping with the trace-norm ``pi`` (Eqns 9-10, 28).
    ``EXACT``: ``(Omega ⊗ Gamma + (λ + γ) I)^{-1}`` through both factors'
    eigendecompositions (Eqns 39-44).
    """

    PI = "pi"
    EXACT = "exact"


class OmegaModel(Choice):
    """The model of a convolution's input-side factor ``Omega``.

    ``KFC``: spatially homogeneous, spatially uncorrelated derivatives (Theorems 1-2).
    ``SUA``: additionally spatially uncorrelated activations, the idealized PRONG of
    Theorem 4 (Sec. 4.2), kept for the ablation.
    """

    KFC = "kfc"
    SUA = "sua"
