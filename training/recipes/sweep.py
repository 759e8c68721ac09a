"""`safevlm sft/dpo --sweep`: one run per grid point, the best kept by its held-out slice.

Every run trains on the same training records; runs are ranked on the held-out slice of those
records by the recipe's `sweep_metrics` (training/recipes/registry.py), compared in order. Nothing
from an evaluation split is read.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import shutil
from typing import Any, Callable

from runtime.distributed import is_main
from runtime.layout import StageLayout
from safety_modules.configio import ConfigError, parse_overrides
from training.engine import TrainingDiverged
from training.recipes.common import write_json

log = logging.getLogger(__name__)


def parse_sweep(specs: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """["train.lr=1e-4,3e-4", "beta=0.1,0.5"] -> {"train.lr": [1e-4, 3e-4], "beta": [0.1, 0.5]}."""
    grid: dict[str, list[Any]] = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--sweep {spec!r}: expected key=value1,value2,...")
        key, raw = spec.split("=", 1)
        values = [parse_overrides([f"v={v.strip()}"])["v"] for v in raw.split(",") if v.strip()]
        if not key.strip() or not values:
            raise ConfigError(f"--sweep {spec!r}: expected key=value1,value2,...")
        grid[key.strip()] = values
    return grid


def _trial_name(combo: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in combo.items())


def _sort_key(heldout: dict[str, float], metrics) -> tuple[float, ...]:
    """Lower is better, metric by metric; a missing or NaN value ranks last on that metric."""
    key = []
    for name, mode in metrics:
        value = heldout.get(name, float("nan"))
        key.append(float("inf") if not math.isfinite(value) else (value if mode == "min" else -value))
    return tuple(key)


def _check(cfg, grid: dict[str, list[Any]], metrics) -> None:
    for name, mode in metrics:
        if mode not in ("min", "max"):
            raise ValueError(f"sweep: mode of {name} must be 'min' or 'max', got {mode!r}")
    if not grid:
        raise ValueError("sweep: no values to try (e.g. --sweep train.lr=1e-4,3e-4,1e-3)")
    if not cfg.heldout_fraction:
        raise ValueError("sweep: heldout_fraction is 0, so there is no held-out slice of the training records "
                         "to compare the runs on; set heldout_fraction (e.g. 0.1)")


def sweep(run: Callable[..., dict[str, Any]], cfg, grid: dict[str, list[Any]], metrics, resume: bool = False
          ) -> dict[str, Any]:
    """Train one run per grid point in `<run_dir>/sweep/<key=value,...>`, keep the best on the held-out slice.

    `metrics` is a list of (name, "min"|"max") compared in order (the next breaks ties). A run that
    diverges is recorded and ranked out. The best run's adapter is copied to `<run_dir>/adapter`
    and its summary, with the whole table, written to `<run_dir>/summary.json` (and `sweep.json`).
    With `resume`, a grid point whose run finished is read back, an interrupted one continues.
    """
    _check(cfg, grid, metrics)
    layout = StageLayout(cfg.run_dir)
    results, summaries = [], {}
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        trial_dir = layout.sweep_trial(_trial_name(combo))
        overrides = parse_overrides([f"{k}={v}" for k, v in combo.items()])
        trial = cfg.for_trial(overrides, trial_dir)      # every trial starts from this run's model
        done = StageLayout(trial_dir).summary
        try:
            summary = json.loads(done.read_text()) if resume and done.is_file() else run(trial, resume=resume)
        except TrainingDiverged as exc:             # a rate too high for this model: a result, not a crash
            results.append({"overrides": combo, "run_dir": str(trial_dir), "error": str(exc)})
            if is_main():
                log.warning("sweep %s: diverged (%s)", _trial_name(combo), exc)
            continue
        summaries[str(trial_dir)] = summary
        results.append({"overrides": combo, "run_dir": str(trial_dir), "adapter": summary["adapter"],
                        "heldout_before": summary["heldout_before"], "heldout_after": summary["heldout_after"]})
        if is_main():
            shown = ", ".join(f"{n} {summary['heldout_after'].get(n, float('nan')):.4f}" for n, _ in metrics)
            log.info("sweep %s: held-out %s", _trial_name(combo), shown)
    ranked = sorted((r for r in results if "error" not in r), key=lambda r: _sort_key(r["heldout_after"], metrics))
    if not ranked:
        raise ValueError("sweep: every run diverged; try smaller values")
    best = ranked[0]
    table = {"metrics": [list(m) for m in metrics], "best": best, "runs": results}
    summary = dict(summaries[best["run_dir"]])
    summary.update(sweep=table, best_run_dir=best["run_dir"], adapter=str(layout.adapter))
    if is_main():
        if layout.adapter.exists():
            shutil.rmtree(layout.adapter)
        shutil.copytree(best["adapter"], layout.adapter)
    write_json(layout.sweep, table)
    write_json(layout.summary, summary)
    return summary
