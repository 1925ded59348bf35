#!/usr/bin/env python
"""Table of a sweep's jobs; marks the best by final training error (paper Sec. 5.2), lists failed jobs.

Example::

    python scripts/sweep_table.py outputs/multirun/2026-11-28/10-00-00-cifar10_sgd-ab12 \\
        --markdown lr_sgd.md --json lr_sgd.json

The logic lives in :mod:`kfcrun.analysis.sweep`.
"""

from kfcrun.analysis.sweep import main

if __name__ == "__main__":
    main()
