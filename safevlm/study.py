"""`safevlm study CONFIG --seeds N`: the whole job once per seed, then one report with intervals.

Why: one seed and a handful of held-out concepts support no claim. Each seed rebuilds everything
that depends on it (the concept world and its held-out concepts, the response classifiers, every
training stage, every evaluation), in `<out>/seed-<s>/`, resumable like `safevlm run`. By default
hyperparameters are chosen once, on the first seed's validation split (whose concepts are the
same for every seed and never reported), and reused by the other seeds: every seed then trains
with the same settings, and no reported number ever fed a choice.

The report gives, per method, split and metric (NA counted wrong, `eval.headline`), the mean over
seeds of the mean over concepts, and a 95% percentile interval from a two-level bootstrap: seeds
resampled with replacement, then each drawn seed's concepts resampled with replacement. The paired
differences PPO - SFT and PPO - DPO use the same draws for both methods, so their intervals are
those of the difference itself.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from eval.headline import METRICS, Cell, concept_cells, read_evaluation
from eval.provenance import environment
from runtime.layout import StudyLayout
from safety_modules.fileio import write_json_atomic, write_text_atomic
from safevlm.pipeline import PipelineConfig, run_pipeline
from safevlm.selection import read_tables
from safevlm.summary import VARIANTS, sentence
from concept_world.build import HELD_OUT_OF

logger = logging.getLogger(__name__)

DIFFERENCES = (("PPO", "SFT"), ("PPO", "DPO"))
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95


def seed_config(cfg: PipelineConfig, seed: int, out: Path, reuse_from: Path | None) -> PipelineConfig:
    """The run config of one seed of the study: its own folder, seed (world, model init, training,
    classifiers) and, with `reuse_from`, the hyperparameters chosen in that run."""
    selection = dataclasses.replace(cfg.selection, reuse=str(reuse_from) if reuse_from else cfg.selection.reuse)
    return dataclasses.replace(cfg, seed=seed, run_dir=str(StudyLayout(out).seed(seed).root),
                               model=dataclasses.replace(cfg.model, seed=seed), selection=selection)


def run_study(cfg: PipelineConfig, seeds: Sequence[int], out: Path, select_each: bool = False,
              force: bool = False, log_line: Callable[[str], None] | None = None) -> dict:
    """Run the pipeline for every seed (finished stages are skipped) and write the study report."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    seconds: dict[int, float] = {}
    for index, seed in enumerate(seeds):
        reuse = None if select_each or index == 0 else StudyLayout(out).seed(seeds[0]).root
        seed_cfg = seed_config(cfg, seed, out, reuse)
        (log_line or logger.info)(f"== seed {seed} ({index + 1}/{len(seeds)}) in {seed_cfg.run_dir}")
        t0 = time.time()
        run_pipeline(seed_cfg, force=force, log=log_line)
        seconds[seed] = round(time.time() - t0, 1)
    report = write_study_report(out, list(seeds), cfg.eval.splits)
    report["seconds"] = {"total": round(time.time() - started, 1), "per_seed": seconds}
    write_json_atomic(StudyLayout(out).report.timing, report["seconds"])
    return report


# -- the numbers -------------------------------------------------------------------------------------
Cells = dict[int, dict[str, Cell]]        # seed -> concept -> Cell


def collect(out: Path, seeds: Sequence[int], splits: Sequence[str]) -> dict[str, dict[str, dict[str, Cells]]]:
    """method -> split -> metric -> seed -> concept -> Cell, from every seed's evaluation answers."""
    table: dict[str, dict[str, dict[str, Cells]]] = {}
    for variant, method in VARIANTS:
        for split in splits:
            for seed in seeds:
                evaluation = StudyLayout(out).seed(seed).evaluation(variant, split)
                if not evaluation.results.is_file():
                    continue
                records, labeler = read_evaluation(evaluation.root)
                for metric, by_concept in concept_cells(records, labeler).items():
                    table.setdefault(method, {}).setdefault(split, {}).setdefault(metric, {})[seed] = by_concept
    return table


def _rates(cells: Cells, seeds: Sequence[int]) -> list[np.ndarray]:
    """Per seed, the concepts' rates in sorted concept order (the order every method shares)."""
    return [np.array([cells[s][c].rate for c in sorted(cells[s])]) for s in seeds]


def bootstrap_draws(concepts_per_seed: Sequence[int], draws: int = BOOTSTRAP_DRAWS,
                    seed: int = BOOTSTRAP_SEED) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """`draws` two-level resamples: (seed indices, per drawn seed its concept indices)."""
    rng = np.random.default_rng(seed)
    n_seeds = len(concepts_per_seed)
    out = []
    for _ in range(draws):
        picked = rng.integers(0, n_seeds, n_seeds)
        out.append((picked, [rng.integers(0, concepts_per_seed[i], concepts_per_seed[i]) for i in picked]))
    return out


def statistic(rates: list[np.ndarray], draw: tuple[np.ndarray, list[np.ndarray]] | None = None) -> float:
    """Mean over seeds of the mean over concepts (on one bootstrap draw when given)."""
    if draw is None:
        return float(np.mean([r.mean() for r in rates]))
    picked, concept_idx = draw
    return float(np.mean([rates[s][idx].mean() for s, idx in zip(picked, concept_idx)]))


def _interval(values: Sequence[float]) -> tuple[float, float]:
    tail = (1 - CONFIDENCE) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def summarise(table: dict, seeds: Sequence[int], draws: int = BOOTSTRAP_DRAWS) -> dict:
    """Mean and interval per method/split/metric, and the paired differences, over seeds and concepts."""
    summary: dict = {"estimates": {}, "differences": {}}
    splits = sorted({split for per_split in table.values() for split in per_split})
    for split in splits:
        for metric in METRICS:
            present = {m: table[m][split][metric] for m in table if metric in table[m].get(split, {})}
            present = {m: cells for m, cells in present.items() if set(cells) == set(seeds)}
            if not present:
                continue
            some = next(iter(present.values()))
            for method, cells in present.items():
                for s in seeds:
                    if sorted(cells[s]) != sorted(some[s]):
                        raise ValueError(f"study: {method} was evaluated on other concepts than "
                                         f"{next(iter(present))} in {split}, seed {s}; rerun its evaluation")
            resamples = bootstrap_draws([len(some[s]) for s in seeds], draws)
            rates = {m: _rates(cells, seeds) for m, cells in present.items()}
            boot = {m: [statistic(r, d) for d in resamples] for m, r in rates.items()}
            for method, r in rates.items():
                lo, hi = _interval(boot[method])
                summary["estimates"].setdefault(split, {}).setdefault(method, {})[metric] = {
                    "mean": statistic(r), "low": lo, "high": hi,
                    "per_seed": [float(x.mean()) for x in r], "concepts_per_seed": [len(x) for x in r]}
            for a, b in DIFFERENCES:
                if a in boot and b in boot:
                    diffs = [x - y for x, y in zip(boot[a], boot[b])]
                    lo, hi = _interval(diffs)
                    summary["differences"].setdefault(split, {}).setdefault(f"{a} - {b}", {})[metric] = {
                        "mean": statistic(rates[a]) - statistic(rates[b]), "low": lo, "high": hi}
    return summary


# -- the files ---------------------------------------------------------------------------------------
def _cell(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"


def _selection(out: Path, seeds: Sequence[int]) -> dict[str, dict]:
    """The hyperparameters chosen on the first seed's validation split (reused by the others)."""
    return {stage: {"key": table["key"], "chosen": table["chosen"],
                    "trials": [(t["value"], t["score"]) for t in table.get("trials", [])]}
            for stage, table in read_tables(StudyLayout(out).seed(seeds[0]).root).items()}


def _plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = list(summary["estimates"])
    fig, axes = plt.subplots(1, len(splits), figsize=(7 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        methods = list(summary["estimates"][split])
        metrics = [m for m in METRICS if any(m in summary["estimates"][split][x] for x in methods)]
        width = 0.8 / max(len(methods), 1)
        for i, method in enumerate(methods):
            entries = [summary["estimates"][split][method].get(m) for m in metrics]
            means = [e["mean"] if e else 0.0 for e in entries]
            errors = [[e["mean"] - e["low"] if e else 0.0 for e in entries],
                      [e["high"] - e["mean"] if e else 0.0 for e in entries]]
            ax.bar([x + i * width for x in range(len(metrics))], means, width, yerr=errors, capsize=3, label=method)
        ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(metrics))],
                      [m.replace("_", " ") for m in metrics])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy, NA counted wrong")
        ax.set_title(f"{split.replace('_', ' ')} (mean, 95% interval)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_study_report(out: Path, seeds: Sequence[int], splits: Sequence[str],
                       draws: int = BOOTSTRAP_DRAWS) -> dict:
    """study.json, study.csv, report.md and study.png into `<out>/report`."""
    table = collect(out, seeds, splits)
    if not table:
        raise ValueError(f"{out}: no evaluation of any seed found (run the study first)")
    summary = summarise(table, seeds, draws)
    summary.update(seeds=list(seeds), bootstrap={"draws": draws, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                                                  "levels": "seeds, then concepts within each drawn seed"},
                   selection=_selection(out, seeds), environment=environment(),
                   held_out_of={s: HELD_OUT_OF.get(s, "") for s in splits})
    report = StudyLayout(out).report
    report.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report.study_json, summary)
    with report.study_csv.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["kind", "split", "method", "metric", "mean", "low", "high"])
        for kind in ("estimates", "differences"):
            for split, methods in summary[kind].items():
                for method, metrics in methods.items():
                    for metric, e in metrics.items():
                        writer.writerow([kind, split, method, metric, e["mean"], e["low"], e["high"]])
    _plot(summary, report.study_figure)
    write_text_atomic(report.markdown, _markdown(summary))
    return {"report": str(report.markdown), "summary": summary}


def _markdown(summary: dict) -> str:
    seeds = summary["seeds"]
    boot = summary["bootstrap"]
    lines = [f"# Study over {len(seeds)} seeds ({', '.join(map(str, seeds))})", "",
             f"Mean over seeds of the mean over concepts; in brackets the {boot['confidence']:.0%} percentile interval "
             f"of {boot['draws']} bootstrap draws ({boot['levels']}). Accuracy with NA counted wrong. Answers judged "
             "by the judge classifier (never the PPO reward classifier).", ""]
    for split, methods in summary["estimates"].items():
        metrics = [m for m in METRICS if any(m in v for v in methods.values())]
        lines += [f"## {split}", "", sentence(summary["held_out_of"].get(split, "")), "",
                  "| method | " + " | ".join(METRICS[m] for m in metrics) + " |",
                  "| --- |" + " --- |" * len(metrics)]
        for method, values in methods.items():
            lines.append(f"| {method} | " + " | ".join(_cell(values.get(m)) for m in metrics) + " |")
        diffs = summary["differences"].get(split, {})
        if diffs:
            lines += ["", "Paired differences (same bootstrap draws for both methods):", "",
                      "| difference | " + " | ".join(METRICS[m] for m in metrics) + " |",
                      "| --- |" + " --- |" * len(metrics)]
            for name, values in diffs.items():
                lines.append(f"| {name} | " + " | ".join(_cell(values.get(m)) for m in metrics) + " |")
        lines.append("")
    if summary["selection"]:
        lines += ["## Hyperparameters (chosen on the validation split of the first seed)", "",
                  "| stage | key | chosen | trials (value: criterion) |", "| --- | --- | --- | --- |"]
        for stage, sel in summary["selection"].items():
            trials = ", ".join(f"{v}: {s:.3f}" for v, s in sel["trials"])
            lines.append(f"| {stage} | {sel['key']} | {sel['chosen']} | {trials} |")
        lines.append("")
    lines += ["![study](study.png)", "", "## Environment", "", "```", json.dumps(summary["environment"], indent=1),
              "```", ""]
    return "\n".join(lines)
