"""The Kronecker block of ``nn.Conv2d``: KFC (paper Sec. 3), or the SUA model of Theorem 4."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .. import kron_math
from ..vocabulary import DampingMode, OmegaModel
from .base import KroneckerBlock, UnsupportedLayerError

__all__ = ["Conv2dBlock"]


class Conv2dBlock(KroneckerBlock):
    """``nn.Conv2d`` (KFC, Sec. 3): any stride, dilation, zero padding (int, pair, ``"same"``, ``"valid"``).

    ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` with ``[[A]]`` = ``F.unfold`` of the input
    (rows = output positions), built in chunks of examples (one GEMM each);
    ``Gamma_hat = 1/(M|T|) DS^T DS`` with ``|T|`` the number of output positions.
    ``omega_model="sua"`` replaces ``Omega_hat`` by the spatially-uncorrelated-activations
    model of Theorem 4 (:func:`kron_math.conv_omega_sua`); Gamma is unchanged.
    ``groups > 1`` and padding modes other than ``"zeros"`` raise
    :class:`UnsupportedLayerError`: KFC's Omega for them is not the unfold moment.
    """

    kind = "conv2d"
    channel_dim = 1

    def __init__(
        self,
        name: str,
        module: nn.Conv2d,
        damping_mode: DampingMode | str = DampingMode.PI,
        omega_model: OmegaModel | str = OmegaModel.KFC,
    ) -> None:
        if module.groups != 1:
            raise UnsupportedLayerError(
                f"kfc: layer {name!r} is a grouped convolution (groups={module.groups}); "
                "only groups=1 is supported"
            )
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"kfc: layer {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported"
            )
        self.omega_model = OmegaModel.parse(omega_model, "approx")
        super().__init__(name, module, damping_mode)
        self.padding = kron_math.conv_padding(
            module.kernel_size, module.stride, module.padding, module.dilation
        )

    def _batched(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0) if t.dim() == 3 else t

    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` (or the SUA model) from a ``(M, J, H, W)`` input.

        Shape ``(1 + J|Δ|)^2`` with a bias, ``(J|Δ|)^2`` without; an unbatched ``(J, H, W)``
        input is one example. ``chunk_size`` bounds the examples expanded at once (KFC model only).
        """
        conv: nn.Conv2d = self.module  # type: ignore[assignment]
        geometry: dict[str, Any] = dict(
            stride=conv.stride, padding=self.padding, dilation=conv.dilation, homogeneous=self.has_bias
        )
        if self.omega_model is OmegaModel.SUA:
            return kron_math.conv_omega_sua(self._batched(inp), conv.kernel_size, **geometry)
        return kron_math.conv_omega(self._batched(inp), conv.kernel_size, chunk_size=chunk_size, **geometry)
