"""``python -m kfcrun``: the same command line as the ``kfcrun`` script (:func:`kfcrun.cli.main`)."""

from kfcrun.cli import main

main()
