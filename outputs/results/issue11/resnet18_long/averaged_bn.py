"""Evaluate a finished run's averaged parameters with BatchNorm statistics recomputed or running.

python averaged_bn.py <run dir>: loads the run's last checkpoint (in a scratch copy of the run
directory), then evaluates as the runner does with trainer.averaged_bn=running and =recompute.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from kfcrun.train import Trainer

run = Path(sys.argv[1])
for mode in ("running", "recompute"):
    scratch = Path(tempfile.mkdtemp()) / run.name
    shutil.copytree(run, scratch)
    cfg = OmegaConf.load(scratch / "config.yaml")
    cfg.resume = str(scratch)
    cfg.trainer.averaged_bn = mode
    trainer = Trainer(cfg, scratch)
    trainer.setup()
    trainer.restore_or_start()
    row = trainer.evaluation_row()
    keys = ("train/nll", "train/error", "test/nll", "test/error", "train/nll_current", "test/error_current")
    print(f"{run.name} it {row['iter']} averaged_bn={mode}: " + ", ".join(f"{k} {row[k]:.3f}" for k in keys))
    shutil.rmtree(scratch.parent)
