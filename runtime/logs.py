"""The one logging convention: progress bars (tqdm, rank 0) for long loops, INFO for progress a
user follows (a stage started, a resume, a sweep's trial), WARNING for what needs attention (a
skipped record, a corrupt checkpoint passed over, a fallback). Modules log through
`logging.getLogger(__name__)` and never print; the CLI's entry point calls `configure()` once, and
only rank 0 shows INFO, so N processes do not print N copies."""

from __future__ import annotations

import logging
import os

FORMAT = "%(levelname)s %(name)s: %(message)s"
PROGRESS_FORMAT = "%(message)s"          # INFO lines read as plain progress


class _LevelFormatter(logging.Formatter):
    """INFO as the bare message; WARNING and above with level and logger name."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._plain = logging.Formatter(PROGRESS_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return self._plain.format(record) if record.levelno == logging.INFO else super().format(record)


def configure(verbose: bool = True) -> None:
    """Root logging for a command: INFO on rank 0 (WARNING elsewhere, or with `verbose=False`).
    Idempotent: a second call replaces the handler the first one installed."""
    main = os.environ.get("RANK", "0") == "0"
    level = logging.INFO if verbose and main else logging.WARNING
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_safevlm", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler._safevlm = True  # type: ignore[attr-defined]
    handler.setFormatter(_LevelFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # Libraries stay at WARNING: their INFO lines are not this run's progress.
    for name in ("deepspeed", "DeepSpeed", "transformers", "datasets", "httpx", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)
