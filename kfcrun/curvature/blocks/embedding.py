"""The Kronecker block of ``nn.Embedding``: a Linear layer on one-hot inputs, so Omega is diagonal."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..vocabulary import DampingMode
from .base import DEFAULT_MAX_FACTOR_DIM, KroneckerBlock

__all__ = ["EmbeddingBlock"]


class EmbeddingBlock(KroneckerBlock):
    """``nn.Embedding(V, D)``: ``out_t = W^T e_{x_t}``, a Linear layer whose inputs are one-hot rows.

    The per-example gradient of ``W`` (``V x D``) is ``sum_t e_{x_t} DS_t^T``; in the
    Kronecker layout ``[outputs x inputs]`` that is ``W^T`` (``D x V``). KFC with the token
    positions as ``|T|`` gives

    * ``Omega_hat = (1/M) sum_{m,t} e_{x_t} e_{x_t}^T = diag(token counts) / M``: exactly
      diagonal (one-hot rows have disjoint support), so it is stored as a ``V``-vector
      whatever the size cap. Tokens equal to ``padding_idx`` are not counted (their
      gradient is zero);
    * ``Gamma_hat = 1/(M|T|) DS^T DS`` (``D x D``), the output-side factor as for Linear.

    The block's layout is ``W^T``: :meth:`combine` transposes the weight-shaped gradient
    and :meth:`split` transposes back. A token that never occurs has ``Omega = 0``: its
    damped solve is the gradient divided by the damping (and that gradient is zero).
    """

    kind = "embedding"
    channel_dim = -1

    def __init__(
        self,
        name: str,
        module: nn.Embedding,
        damping_mode: DampingMode | str = DampingMode.PI,
        *,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
    ) -> None:
        self.embedding = module
        super().__init__(name, module, damping_mode, max_factor_dim=max_factor_dim, omega_diagonal=True)

    @property
    def omega_dim(self) -> int:
        """``V``, the number of embeddings."""
        return int(self.embedding.num_embeddings)

    @property
    def gamma_dim(self) -> int:
        """``D``, the embedding size."""
        return int(self.embedding.embedding_dim)

    def _batched(self, t: Tensor) -> Tensor:
        return t

    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """``diag(token counts) / M`` as a ``V``-vector (``padding_idx`` not counted)."""
        m = inp.shape[0] if inp.dim() > 1 else 1
        dtype = torch.promote_types(self.embedding.weight.dtype, torch.float32)
        counts = torch.bincount(inp.reshape(-1), minlength=self.omega_dim).to(dtype)
        padding_idx = self.embedding.padding_idx
        if padding_idx is not None:
            counts[padding_idx] = 0
        return counts / m

    def combine(self, weight_like: Tensor | None, bias_like: Tensor | None) -> Tensor:
        """``W^T`` (``D x V``) from a weight-shaped tensor."""
        assert weight_like is not None
        return weight_like.T

    def split(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Weight-shaped (``V x D``) from the layout ``D x V``."""
        return mat.T.contiguous(), None
