"""One module per `safevlm` subcommand; each defines `register(subparsers)`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

DIVERGED = 3           # exit status of a run stopped by NaN/inf (not bad input, but no traceback either)


def run_training(command: str, train: Callable[[], dict[str, Any]], run_dir: str | Path | None = None) -> int:
    """Run a training entry point for `safevlm COMMAND`: its summary printed as JSON by the main
    process, exit 0; a run stopped by a NaN/inf loss or update is one error line and exit 3.

    With `run_dir`, the run folder's lock is held for the whole run (by the main process), so a
    second run on the same folder is refused before it loads anything.
    """
    from runtime import runlock
    from training.checkpoint import NonFiniteCheckpoint
    from runtime.distributed import is_main, teardown
    from training.engine import TrainingDiverged

    lock = runlock.acquire(run_dir) if run_dir is not None and runlock.is_main_process() else None
    try:
        summary = train()
    except (TrainingDiverged, NonFiniteCheckpoint) as exc:
        print(f"safevlm {command}: error: {exc}", file=sys.stderr)
        return DIVERGED
    finally:
        if lock is not None:
            lock.release()
    if is_main():
        print(json.dumps(summary, indent=2))
    teardown()
    return 0
