"""Heat maps in the layout of the paper's Figs. 1-2: absolute correlations on a fixed 0..1 scale.

One figure per quantity (derivatives or activations) and network: one row per conv layer;
the first columns are the spatial autocorrelations ``|rho_c(delta)|`` of the chosen maps
(``delta`` in ``[-K, K]^2``, centre = ``delta = 0``), the last column the cross-map
correlation matrix ``|R|`` at one position. Undefined entries (dead maps, offsets without
pairs) are drawn grey.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["LayerPanel", "plot_correlation_grid"]


@dataclass
class LayerPanel:
    """What one row of the figure shows."""

    layer: str
    autocorrelations: Sequence[Tensor]  # one (2K+1, 2K+1) per selected map
    maps: Sequence[int]  # the selected maps' indices
    cross_map: Tensor  # (C, C)
    position: tuple[int, int]  # where cross_map was taken
    map_size: tuple[int, int]  # (H, W)


def plot_correlation_grid(panels: Sequence[LayerPanel], title: str, path_stem: Path) -> list[Path]:
    """Draw the grid, save ``<path_stem>.png`` and ``<path_stem>.pdf``; return both paths."""
    if not panels:
        raise ValueError("nothing to plot")
    n_auto = max(len(p.autocorrelations) for p in panels)
    ncols = n_auto + 1
    # A bare Figure (Agg canvas on save), not pyplot: no global backend or figure state.
    fig = Figure(figsize=(2.1 * ncols + 0.8, 2.1 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), ncols, squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.75")
    image = None
    for row, panel in zip(axes, panels, strict=True):
        for col in range(n_auto):
            ax = row[col]
            if col >= len(panel.autocorrelations):
                ax.axis("off")
                continue
            rho = np.abs(panel.autocorrelations[col].double().cpu().numpy())
            k = (rho.shape[0] - 1) // 2
            image = ax.imshow(
                rho, vmin=0.0, vmax=1.0, cmap=cmap, extent=(-k - 0.5, k + 0.5, k + 0.5, -k - 0.5)
            )
            ax.set_title(f"{panel.layer} map {panel.maps[col]}", fontsize=8)
            ax.set_xticks([-k, 0, k])
            ax.set_yticks([-k, 0, k])
            ax.tick_params(labelsize=6)
            if col == 0:
                ax.set_ylabel(f"{panel.layer} ({panel.map_size[0]}x{panel.map_size[1]})", fontsize=8)
        ax = row[-1]
        r = np.abs(panel.cross_map.double().cpu().numpy())
        image = ax.imshow(r, vmin=0.0, vmax=1.0, cmap=cmap, interpolation="nearest")
        ax.set_title(f"{panel.layer} cross-map at {panel.position}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[-1][0].set_xlabel("offset δ (columns: δ₂, rows: δ₁)", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    if image is not None:
        cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
        fig.colorbar(image, cax=cax).ax.tick_params(labelsize=7)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths
