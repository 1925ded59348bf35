#!/usr/bin/env python
"""Draw the paper's Figs. 3-5 from run or sweep directories (``metrics.jsonl`` + ``config.yaml`` only).

Figs. 3-4: NLL and classification error vs TRAINING wall-clock (minutes); Fig. 5: error
vs iterations. Training curves dashed, test curves solid, the published test error as a
horizontal dashed line; seed repetitions as mean + band; the best run per method of a
sweep (by final training error) unless ``--all``. Writes PNG and PDF. Examples::

    python scripts/make_figures.py outputs/.../cifar10_sgd outputs/.../cifar10_kfc --out figures
    python scripts/make_figures.py outputs/multirun/.../ --log-nll --kind both
    python scripts/make_figures.py RUNS... --kind iters --published 0.18

The logic lives in :mod:`kfcrun.analysis.figures`.
"""

from kfcrun.analysis.figures import main

if __name__ == "__main__":
    main()
