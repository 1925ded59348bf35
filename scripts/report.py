#!/usr/bin/env python
"""Markdown report of SGD vs KFC-pre vs K-FAC: training time and iterations to reach given errors, speed-ups.

Pairs runs by experiment name (``cifar10_sgd`` with ``cifar10_kfc`` and ``cifar10_kfac``,
``cifar10_kfc`` with ``cifar10_kfac``: the method tokens ``_sgd`` < ``_kfc`` < ``_kfac``)
or ``--pair BASELINE CANDIDATE``; prints the markdown and writes it with ``--out``. Example::

    python scripts/report.py outputs/multirun/... --train-errors 0.3 0.2 0.1 0.06 \\
        --test-errors 0.25 0.19 --out report.md

The logic lives in :mod:`kfcrun.analysis.report`.
"""

from kfcrun.analysis.report import main

if __name__ == "__main__":
    main()
