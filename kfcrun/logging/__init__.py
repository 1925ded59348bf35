"""Run outputs: ``metrics.jsonl``, TensorBoard scalars, ``run.json``."""

from kfcrun.logging.metrics import METRICS_FILE, MetricsLogger, is_timing_key, read_metrics, truncate_metrics
from kfcrun.logging.run_record import run_record, write_json

__all__ = [
    "METRICS_FILE",
    "MetricsLogger",
    "is_timing_key",
    "read_metrics",
    "run_record",
    "truncate_metrics",
    "write_json",
]
