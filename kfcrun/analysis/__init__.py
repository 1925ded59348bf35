"""Analysis of finished runs: reads their outputs only.

The outputs are ``metrics.jsonl``, ``config.yaml``, ``summary.json`` and TensorBoard files.

Nothing here builds or runs a network; studies that do (the assumption study of
Sec. 5.1, Figs. 1-2) are tasks in :mod:`kfcrun.studies`.

* :mod:`kfcrun.analysis.runs` - load runs and sweeps from ``metrics.jsonl``; best run, seeds.
* :mod:`kfcrun.analysis.figures` - the paper's Figs. 3-5 from ``metrics.jsonl``.
* :mod:`kfcrun.analysis.report` - SGD vs KFC-pre vs K-FAC speed-up tables.
* :mod:`kfcrun.analysis.adaptation` - per-step optimizer statistics (K-FAC's adapted values).
* :mod:`kfcrun.analysis.sweep` - a sweep's table and its best job.
"""

from kfcrun.analysis.runs import Run, best_run, first_reach, load_runs

__all__ = ["Run", "best_run", "first_reach", "load_runs"]
