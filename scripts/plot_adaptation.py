#!/usr/bin/env python
"""Draw an optimizer's per-step statistics over runs: K-FAC's adapted alpha, mu, lambda, gamma, rho.

Reads the ``kfc/<name>`` TensorBoard scalars of each run directory (log every step with
``trainer.log_every=1``) and writes one PNG with a panel per statistic. Examples::

    python scripts/plot_adaptation.py outputs/kfac_study/kfac_g1 outputs/kfac_study/kfac_g10 --out a.png
    python scripts/plot_adaptation.py RUNS... --stats nu clip_factor --smooth 5

The logic lives in :mod:`kfcrun.analysis.adaptation`.
"""

from kfcrun.analysis.adaptation import main

if __name__ == "__main__":
    main()
