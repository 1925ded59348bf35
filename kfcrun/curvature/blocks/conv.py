"""The Kronecker block of a convolution (``nn.Conv1d``, ``nn.Conv2d``): KFC (Sec. 3), or SUA (Theorem 4)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from .. import kron_math
from ..omega_lagged import OMEGA_METHODS, conv_omega_lagged, lagged_applies, lagged_preferred
from ..vocabulary import DampingMode, OmegaModel
from .base import DEFAULT_MAX_FACTOR_DIM, KroneckerBlock, UnsupportedLayerError

__all__ = ["Conv1dBlock", "Conv2dBlock", "ConvBlock"]

#: ``padding_mode`` of a conv layer -> ``mode`` of ``F.pad``.
_PAD_MODES = {"reflect": "reflect", "replicate": "replicate", "circular": "circular"}


class ConvBlock(KroneckerBlock):
    """A convolution (KFC, Sec. 3): any stride, dilation, padding, ``padding_mode`` and ``groups``.

    ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` with ``[[A]]`` the patches of the input as the
    layer sees them (rows = output positions), built in chunks of examples (one GEMM
    each); ``Gamma_hat = 1/(M|T|) DS^T DS`` with ``|T|`` the number of output positions.

    * **Padding.** ``padding_mode="zeros"``: the patches are zero outside the image (any
      ``padding``, including ``"same"`` with an even kernel). Other modes
      (``"reflect"``, ``"replicate"``, ``"circular"``): the input is padded exactly as the
      layer pads it (``F.pad`` with the layer's ``_reversed_padding_repeated_twice`` and
      mode) and then expanded without padding, so ``[[A]]`` holds the values the kernel
      really multiplies.
    * **Groups** (``groups = g > 1``, including depthwise ``g = J``): output channels
      ``i I/g .. (i+1) I/g - 1`` see only input channels ``i J/g .. (i+1) J/g - 1``, so the
      layer's Fisher block is block-diagonal over groups in its weights, and KFC gives
      ``g`` independent Kronecker blocks ``Omega_i ⊗ Gamma_i``: ``Omega_i`` from the
      patches of input group ``i`` (size ``(J/g)|Δ| [+1]``), ``Gamma_i`` from the
      derivatives of output group ``i`` (size ``I/g``). Factors are stacked ``(g, k, k)``
      and inverted together (one ``pi`` per group). Cross-group Fisher entries are
      dropped, as KFC drops cross-layer entries. A depthwise conv with channel multiplier
      ``m`` has ``Omega_i`` of size ``|Δ| [+1]`` and ``Gamma_i`` of size ``m``.
    * **Omega method** (``omega_method``, per layer): ``"auto"`` computes a stride-1,
      one-group conv's ``Omega_hat`` from row-lagged products without the patch expansion
      (:func:`~kfcrun.curvature.omega_lagged.conv_omega_lagged`, the same matrix with about
      ``1/kh`` of the flops) when its input has enough channels to be faster
      (:data:`~kfcrun.curvature.omega_lagged.MIN_LAG_ROWS`), and every other conv by the
      patch GEMM; ``"patch"`` always uses the patch GEMM; ``"lagged"`` insists on the row
      lags (an error where they do not apply).
    * **SUA** (``omega_model="sua"``): the spatially-uncorrelated-activations Omega of
      Theorem 4 (:func:`kron_math.conv_omega_sua`), for ``groups = 1`` and zero padding only.

    Shared (reused) layers: the uses' output positions are pooled (see
    :meth:`KroneckerBlock.pass_statistic`).
    """

    kind = "conv"
    channel_dim = 1
    #: Spatial dims of the layer's input (1 for Conv1d, 2 for Conv2d).
    spatial_dims: ClassVar[int] = 2

    def __init__(
        self,
        name: str,
        module: nn.Conv1d | nn.Conv2d,
        damping_mode: DampingMode | str = DampingMode.PI,
        omega_model: OmegaModel | str = OmegaModel.KFC,
        *,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        omega_method: str = "auto",
    ) -> None:
        self.omega_method = omega_method
        self.omega_model = OmegaModel.parse(omega_model, "approx")
        if self.omega_model is OmegaModel.SUA and (module.groups != 1 or module.padding_mode != "zeros"):
            raise UnsupportedLayerError(
                f"kfc: layer {name!r}: approx='sua' needs groups=1 and padding_mode='zeros' "
                f"(got groups={module.groups}, padding_mode={module.padding_mode!r}); use approx='kfc'"
            )
        super().__init__(name, module, damping_mode, groups=module.groups, max_factor_dim=max_factor_dim)
        self.conv = module
        self.pad_mode = _PAD_MODES.get(module.padding_mode)
        kernel, stride, dilation = self._as_2d(module.kernel_size, module.stride, module.dilation)
        self.kernel_size, self.stride, self.dilation = kernel, stride, dilation
        if self.pad_mode is not None:
            self.padding = ((0, 0), (0, 0))  # the input is pre-padded in the layer's mode
        elif self.spatial_dims == 1:
            (left, right), _ = kron_math.conv_padding(
                module.kernel_size[0], module.stride[0], _first(module.padding), module.dilation[0]
            )
            self.padding = ((0, 0), (left, right))
        else:
            self.padding = kron_math.conv_padding(
                module.kernel_size, module.stride, module.padding, module.dilation
            )

    def _as_2d(self, *pairs: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
        """Kernel/stride/dilation as 2-D pairs (a Conv1d is a Conv2d of height 1)."""
        if self.spatial_dims == 1:
            return tuple((1, int(p[0])) for p in pairs)
        return tuple((int(p[0]), int(p[1])) for p in pairs)

    def _batched(self, t: Tensor) -> Tensor:
        return t.unsqueeze(0) if t.dim() == self.spatial_dims + 1 else t

    def _image(self, inp: Tensor) -> Tensor:
        """The input as the layer convolves it: batched, padded in the layer's mode, as a 4-D image."""
        x = self._batched(inp)
        if self.pad_mode is not None:
            x = F.pad(x, self.conv._reversed_padding_repeated_twice, mode=self.pad_mode)
        return x.unsqueeze(2) if self.spatial_dims == 1 else x

    def uses_lagged_omega(self) -> bool:
        """Whether :meth:`batch_omega` takes the row-lag path (``omega_method``, see the class docstring)."""
        if self.omega_method not in OMEGA_METHODS:
            raise ValueError(
                f"kfc: layer {self.name!r}: omega_method must be one of {OMEGA_METHODS}, "
                f"got {self.omega_method!r}"
            )
        applies = self.omega_model is OmegaModel.KFC and lagged_applies(
            self.kernel_size, self.stride, groups=self.groups, diagonal=self.omega_diagonal
        )
        if self.omega_method == "lagged" and not applies:
            raise ValueError(
                f"kfc: layer {self.name!r}: omega_method='lagged' needs a stride-1, one-group conv with "
                f"a kernel of at least 2 and a full KFC Omega (got kernel {self.kernel_size}, "
                f"stride {self.stride}, groups {self.groups}); use omega_method='auto'"
            )
        if self.omega_method == "auto":
            return applies and lagged_preferred(self.conv.in_channels // self.groups, self.kernel_size)
        return applies and self.omega_method == "lagged"

    def batch_omega(self, inp: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` (or the SUA model) of the input as the layer pads it.

        Per group for ``g > 1``, the diagonal only above the size cap; an unbatched input is one
        example; ``chunk_size`` bounds the examples expanded at once (KFC model only).
        """
        x = self._image(inp)
        geometry: dict[str, Any] = dict(
            stride=self.stride, padding=self.padding, dilation=self.dilation, homogeneous=self.has_bias
        )
        if self.omega_model is OmegaModel.SUA:
            omega = kron_math.conv_omega_sua(x, self.kernel_size, **geometry)
            return omega.diagonal().clone() if self.omega_diagonal else omega
        if self.uses_lagged_omega():
            return conv_omega_lagged(
                x,
                self.kernel_size,
                padding=self.padding,
                dilation=self.dilation,
                homogeneous=self.has_bias,
                chunk_size=chunk_size,
            )
        return kron_math.conv_omega(
            x,
            self.kernel_size,
            chunk_size=chunk_size,
            groups=self.groups,
            diagonal=self.omega_diagonal,
            **geometry,
        )


def _first(padding: str | tuple[int, ...]) -> str | int:
    return padding if isinstance(padding, str) else int(padding[0])


class Conv2dBlock(ConvBlock):
    """``nn.Conv2d``: see :class:`ConvBlock`."""

    kind = "conv2d"
    spatial_dims = 2


class Conv1dBlock(ConvBlock):
    """``nn.Conv1d``: the same patch machinery, as a Conv2d of height 1 (kernel ``(1, k)``).

    See :class:`ConvBlock`.
    """

    kind = "conv1d"
    spatial_dims = 1
