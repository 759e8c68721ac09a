"""One module per `safevlm` subcommand; each defines `register(subparsers)`."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable


def run_training(command: str, train: Callable[[], dict[str, Any]]) -> int:
    """Run a training entry point for `safevlm COMMAND`: its summary printed as JSON by the main
    process, exit 0; a run stopped by a NaN/inf loss is one error line and exit 3 (not bad input,
    but no traceback either)."""
    from training.engine import TrainingDiverged, is_main, leave_distributed

    try:
        summary = train()
    except TrainingDiverged as exc:
        print(f"safevlm {command}: error: {exc}", file=sys.stderr)
        return 3
    if is_main():
        print(json.dumps(summary, indent=2))
    leave_distributed()
    return 0
