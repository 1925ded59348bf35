"""Studies are tasks that run networks; dispatched by the CLI task table.

Unlike :mod:`kfcrun.analysis`, which only reads run outputs (``metrics.jsonl``,
``config.yaml``, ``summary.json``), a study builds, trains or evaluates networks and
writes its own outputs under the run directory.

* :mod:`kfcrun.studies.assumptions` - the assumption study of Sec. 5.1 (Figs. 1-2):
  ``kfcrun task=assumptions``; its config section is :class:`AssumptionSettings`.
* :mod:`kfcrun.studies.correlations` - spatial autocorrelations and cross-map correlations
  of feature maps (pure math on tensors).
* :mod:`kfcrun.studies.heatmaps` - heat maps in the layout of Figs. 1-2.
"""

from kfcrun.studies.assumptions import (
    AssumptionSettings,
    LayerStatistics,
    Network,
    collect_statistics,
    conv_layers,
    run_assumption_study,
    summarize_layer,
)
from kfcrun.studies.correlations import (
    CorrelationAccumulator,
    autocorrelation,
    centre_position,
    cross_map_correlation,
    mean_abs_cross_map,
    mean_abs_offcentre,
    offset_slices,
)
from kfcrun.studies.heatmaps import LayerPanel, plot_correlation_grid

__all__ = [
    "AssumptionSettings",
    "CorrelationAccumulator",
    "LayerPanel",
    "LayerStatistics",
    "Network",
    "autocorrelation",
    "centre_position",
    "collect_statistics",
    "conv_layers",
    "cross_map_correlation",
    "mean_abs_cross_map",
    "mean_abs_offcentre",
    "offset_slices",
    "plot_correlation_grid",
    "run_assumption_study",
    "summarize_layer",
]
