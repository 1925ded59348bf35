"""``run.json``: what produced a run (code version, software, hardware, command)."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import kfcrun


def git_state(path: str | Path) -> dict[str, Any]:
    """Commit and dirty flag of the git checkout containing ``path`` (``None`` if not a checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"git_sha": None, "git_dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": bool(status)}


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device``: the GPU model for CUDA, else the host's processor name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def run_record(device: torch.device, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything needed to tell where a result came from."""
    record: dict[str, Any] = {
        "kfcrun_version": kfcrun.__version__,
        **git_state(Path(kfcrun.__file__).parent),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record.update(extra or {})
    return record


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temp file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
