"""Flattening tensors into one buffer per collective.

* :func:`pack_triangles` / :func:`unpack_triangles`: a set of symmetric factors as ONE
  vector of their upper triangles (``d(d+1)/2`` numbers for a ``d x d`` factor, batched
  factors ``(..., d, d)`` per matrix; vectors and non-square tensors whole). The factor
  statistics of a step are summed across ranks with one all-reduce of this vector; the
  lower triangle is rebuilt from the upper one, so the reduced factors are exactly symmetric.
* :func:`pack_bytes` / :func:`unpack_bytes`: tensors of any dtypes as one ``uint8``
  buffer (a bit-exact byte view), for broadcasts of fitted inverses and solutions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Layout", "pack_bytes", "pack_triangles", "unpack_bytes", "unpack_triangles"]


@dataclass(frozen=True)
class Layout:
    """Shape and dtype of one packed tensor, and whether only its upper triangle was packed."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    triangle: bool

    @property
    def packed_numel(self) -> int:
        """Numbers this tensor takes in the packed buffer."""
        if not self.triangle:
            return int(torch.Size(self.shape).numel())
        d = self.shape[-1]
        return int(torch.Size(self.shape[:-2]).numel()) * d * (d + 1) // 2


def _is_square(t: Tensor) -> bool:
    return t.dim() >= 2 and t.shape[-1] == t.shape[-2]


def pack_triangles(
    tensors: Sequence[Tensor], dtype: torch.dtype | None = None
) -> tuple[Tensor, list[Layout]]:
    """One flat vector (of ``dtype``, default the widest input dtype) holding every tensor's upper triangle.

    Square tensors (last two dims equal) must be symmetric: only their upper triangles travel.
    """
    if not tensors:
        raise ValueError("pack_triangles needs at least one tensor")
    if dtype is None:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    parts, layouts = [], []
    for t in tensors:
        square = _is_square(t)
        layouts.append(Layout(tuple(t.shape), t.dtype, square))
        if square:
            d = t.shape[-1]
            rows, cols = torch.triu_indices(d, d, device=t.device)
            parts.append(t[..., rows, cols].reshape(-1).to(dtype))
        else:
            parts.append(t.reshape(-1).to(dtype))
    return torch.cat(parts), layouts


def unpack_triangles(buffer: Tensor, layouts: Sequence[Layout]) -> list[Tensor]:
    """The tensors :func:`pack_triangles` packed (symmetric tensors rebuilt from the upper triangle)."""
    out, start = [], 0
    for layout in layouts:
        n = layout.packed_numel
        part = buffer[start : start + n]
        start += n
        if not layout.triangle:
            out.append(part.reshape(layout.shape).to(layout.dtype))
            continue
        d = layout.shape[-1]
        rows, cols = torch.triu_indices(d, d, device=buffer.device)
        full = torch.zeros((*layout.shape[:-2], d, d), dtype=buffer.dtype, device=buffer.device)
        tri = part.reshape(*layout.shape[:-2], -1)
        full[..., rows, cols] = tri
        full[..., cols, rows] = tri
        out.append(full.to(layout.dtype))
    if start != buffer.numel():
        raise ValueError(f"packed buffer has {buffer.numel()} numbers, the layouts use {start}")
    return out


def pack_bytes(tensors: Sequence[Tensor], device: torch.device) -> tuple[Tensor, list[Layout]]:
    """The tensors' bytes, concatenated into one ``uint8`` buffer on ``device`` (bit-exact)."""
    layouts = [Layout(tuple(t.shape), t.dtype, False) for t in tensors]
    if not tensors:
        return torch.zeros(0, dtype=torch.uint8, device=device), layouts
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8).to(device) for t in tensors]
    return torch.cat(parts), layouts


def byte_size(layout: Layout) -> int:
    """Bytes of one tensor of ``layout``."""
    return int(torch.Size(layout.shape).numel()) * torch.empty((), dtype=layout.dtype).element_size()


def unpack_bytes(buffer: Tensor, layouts: Sequence[Layout], device: torch.device) -> list[Tensor]:
    """The tensors :func:`pack_bytes` packed, as new tensors on ``device``."""
    out, start = [], 0
    for layout in layouts:
        n = byte_size(layout)
        chunk = buffer[start : start + n].clone()
        start += n
        out.append(chunk.view(layout.dtype).reshape(layout.shape).to(device))
    return out
