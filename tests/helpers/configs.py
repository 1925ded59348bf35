"""The experiment configs shipped in configs/experiment/, for tests that run over all of them."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Every experiment name (``configs/experiment/<name>.yaml``), sorted.
EXPERIMENTS = sorted(p.stem for p in (REPO_ROOT / "configs" / "experiment").glob("*.yaml"))
