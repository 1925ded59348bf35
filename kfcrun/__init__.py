"""kfcrun: KFC (Kronecker Factors for Convolution) and KFC-pre in PyTorch.

Grosse & Martens (2016), "A Kronecker-factored approximate Fisher matrix for
convolution layers". The optimizers live in :mod:`kfcrun.optim`, the curvature
in :mod:`kfcrun.curvature`, and the Hydra runner in :mod:`kfcrun.cli`.
"""

__version__ = "0.1.0"
