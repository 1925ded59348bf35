"""Analysis of runs and of the paper's modelling assumptions.

* :mod:`kfcrun.analysis.runs` - load runs and sweeps from ``metrics.jsonl``; best run, seeds.
* :mod:`kfcrun.analysis.figures` - the paper's Figs. 3-5 from ``metrics.jsonl``.
* :mod:`kfcrun.analysis.report` - SGD vs KFC-pre speed-up tables.
* :mod:`kfcrun.analysis.sweep` - a sweep's table and its best job.
* :mod:`kfcrun.analysis.assumptions` - the assumption study of Sec. 5.1 (Figs. 1-2).
"""

from kfcrun.analysis.runs import Run, best_run, first_reach, load_runs

__all__ = ["Run", "best_run", "first_reach", "load_runs"]
