"""The Kronecker block of ``nn.Linear`` (standard K-FAC, Eqn 6, as the ``|T| = 1`` case of KFC)."""

from __future__ import annotations

from torch import Tensor

from .. import kron_math
from .base import KroneckerBlock

__all__ = ["LinearBlock"]


class LinearBlock(KroneckerBlock):
    """``nn.Linear``: ``Psi_hat = (1/M) sum a_bar a_bar^T``, ``Gamma_hat = 1/(M|T|) sum Ds Ds^T``.

    Input ``(M, in)`` is standard K-FAC (``|T| = 1``). Input ``(M, T..., in)`` (tokens of
    a sequence, pixels of a 1x1 conv written as Linear) treats the middle dims as
    ``|T|`` positions, consistently with the conv convention (Omega summed over positions
    and divided by ``M``; Gamma averaged over ``M|T|``). A 1-D (unbatched) input is one
    example. A shared layer pools the positions of its uses.
    """

    kind = "linear"
    channel_dim = -1

    def _batched(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0) if t.dim() == 1 else t

    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """``Psi_hat = (1/M) sum_rows a_bar a_bar^T`` of a ``(M, ..., in)`` input (``chunk_size`` unused)."""
        return kron_math.linear_omega(
            self._batched(inp), homogeneous=self.has_bias, diagonal=self.omega_diagonal
        )
