"""A training run's metrics: `metrics.jsonl` (one line per logged step) and TensorBoard when installed.

Only the main rank writes. A resumed run first drops the lines logged after its checkpoint
(`truncate_metrics`), so every step appears once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from runtime.distributed import is_main
from runtime.layout import StageLayout
from safety_modules.fileio import CorruptFileError, write_text_atomic

log = logging.getLogger(__name__)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of a metrics JSONL logged after `step` (a resumed run logs those steps again).

    A partial last line (the run was killed while writing it) is dropped with a warning; any other
    unreadable line is an error naming the file and the line, and the file is left as it was.
    """
    if not (is_main() and path.is_file()):
        return
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path}: cannot be read ({exc})") from None
    kept = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            row_step = row.get("step", 0) if isinstance(row, dict) else None
        except json.JSONDecodeError as exc:
            if number == len(lines):
                log.warning("%s:%d: dropped a partial last line (a run was stopped while writing it)", path, number)
                continue
            raise CorruptFileError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                   "fix or remove that line to resume") from None
        if not isinstance(row_step, (int, float)):
            raise CorruptFileError(f"{path}:{number}: expected a JSON object with a numeric 'step'")
        if row_step <= step:
            kept.append(line)
    write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """One metrics line, written with a single call so a kill leaves at most a partial last line."""
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def _tensorboard(folder: Path):
    try:
        # Imported here: TensorBoard is optional, and its import is slow.
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:          # tensorboard not installed: metrics.jsonl only
        return None
    return SummaryWriter(str(folder))


class MetricsLog:
    """Where a run's logged steps go: `layout.metrics` and, when installed, TensorBoard under
    `layout.tensorboard` (scalars named `<name>/<key>`). A no-op on every rank but the main one."""

    def __init__(self, layout: StageLayout, name: str) -> None:
        self.layout, self.name = layout, name
        self.enabled = is_main()
        self.writer = _tensorboard(layout.tensorboard) if self.enabled else None

    def write(self, row: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        append_metrics(self.layout.metrics, row)
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(f"{self.name}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
