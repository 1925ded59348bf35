"""kfcrun's Hydra configs, shipped inside the wheel as the package ``kfcrun.configs``.

The YAML files here are the source of truth; ``kfcrun.cli`` points Hydra at
``pkg://kfcrun.configs`` so an installed (non-editable) kfcrun finds them too.
"""
