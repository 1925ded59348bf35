"""Metric sinks: ``metrics.jsonl`` (the source of truth for figures) and TensorBoard.

``metrics.jsonl`` holds one JSON object per evaluation, with at least ``iter``,
``examples``, ``epoch``, ``train_time_s`` and the metrics (``train/nll``,
``train/error``, ``test/nll``, ``test/error``, ``test/error_current``, ...). Timing
fields are ``train_time_s``, ``elapsed_s`` and everything under ``time/``; every other
field is a deterministic function of the run (what a resumed run must reproduce).

TensorBoard scalars are logged against the iteration with ``walltime`` set to
``start + train_time_s``, so TensorBoard's "relative" time axis shows the TRAINING
wall-clock (evaluation and logging excluded), the x-axis of the paper's Figs. 3-4.

A process killed while writing leaves a *torn* last line (no newline, not valid JSON)
or a torn last TensorBoard record. Readers drop such a line; a resumed run removes it
from the file and says so (:func:`truncate_metrics`, :func:`drop_torn_event_records`).
Anything else that does not parse is an error naming the file and line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TIMING_KEYS = ("train_time_s", "elapsed_s")
METRICS_FILE = "metrics.jsonl"


def is_timing_key(key: str) -> bool:
    """True for fields that measure time and so differ between identical runs."""
    return key in TIMING_KEYS or key.startswith("time/")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it readable
    return value


def _parse_rows(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of ``path``, and its torn last line (``None`` if the file ends cleanly)."""
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    torn = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines) and not text.endswith("\n"):
                torn = line  # the last write was cut short
                continue
            raise ValueError(f"{path}:{number} is not a JSON row ({err}); the file is damaged") from err
    return rows, torn


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` file (or of ``<run dir>/metrics.jsonl``); a torn last line is dropped."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return _parse_rows(path)[0]


def truncate_metrics(path: str | Path, last_iter: int) -> int:
    """Drop rows with ``iter > last_iter`` (a resumed run rewrites them) and a torn last line.

    Returns the number of rows kept.
    """
    path = Path(path)
    if not path.exists():
        return 0
    rows, torn = _parse_rows(path)
    if torn is not None:
        log.warning(
            "%s: dropped a torn last line (%d characters, a write cut short when the process was killed)",
            path,
            len(torn),
        )
    kept = [row for row in rows if row["iter"] <= last_iter]
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as f:
        for row in kept:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return len(kept)


#: A TensorBoard event file is a sequence of records: uint64 length, uint32 CRC of the
#: length, ``length`` bytes of data, uint32 CRC of the data (TFRecord format).
_RECORD_HEADER = 12
_RECORD_FOOTER = 4


def drop_torn_event_records(tensorboard_dir: str | Path) -> int:
    """Cut each event file in ``tensorboard_dir`` after its last complete record; returns the files cut.

    A record is complete when its header and all ``length`` bytes and the footer are there
    (a kill mid-write leaves a short last record; TensorBoard would skip it silently).
    """
    cut = 0
    for path in sorted(Path(tensorboard_dir).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        end = 0
        while end + _RECORD_HEADER <= len(data):
            (length,) = struct.unpack_from("<Q", data, end)
            record_end = end + _RECORD_HEADER + length + _RECORD_FOOTER
            if record_end > len(data):
                break
            end = record_end
        if end < len(data):
            with path.open("r+b") as f:
                f.truncate(end)
            log.warning(
                "%s: dropped a torn last record (%d bytes, a write cut short when the process was killed)",
                path,
                len(data) - end,
            )
            cut += 1
    return cut


class MetricsLogger:
    """Writes evaluation rows to ``metrics.jsonl`` and scalars to TensorBoard.

    Args:
        run_dir: the run's output directory.
        start_walltime: Unix time that ``train_time_s = 0`` maps to in TensorBoard.
        purge_step: on resume, TensorBoard events at or after this step are discarded.
        tensorboard: write TensorBoard events (``False`` keeps only ``metrics.jsonl``).
    """

    def __init__(
        self,
        run_dir: str | Path,
        start_walltime: float,
        purge_step: int | None = None,
        tensorboard: bool = True,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_walltime = start_walltime
        self._jsonl = (self.run_dir / METRICS_FILE).open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            if purge_step is not None:
                drop_torn_event_records(self.run_dir / "tensorboard")

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def scalars(self, values: dict[str, Any], step: int, train_time_s: float) -> None:
        """Log scalars to TensorBoard only (per-step optimizer statistics)."""
        if self._tb is None:
            return
        walltime = self.start_walltime + train_time_s
        for key, value in values.items():
            value = _jsonable(value)
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, global_step=step, walltime=walltime)

    def row(self, row: dict[str, Any]) -> None:
        """Append an evaluation row to ``metrics.jsonl`` and mirror it to TensorBoard."""
        clean = {key: _jsonable(value) for key, value in row.items()}
        self._jsonl.write(json.dumps(clean) + "\n")
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())
        scalars = {k: v for k, v in clean.items() if "/" in k}
        scalars["time/train_s"] = clean["train_time_s"]
        self.scalars(scalars, step=int(clean["iter"]), train_time_s=float(clean["train_time_s"]))
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Close ``metrics.jsonl`` and the TensorBoard writer (flushing both); closing again is a no-op."""
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
