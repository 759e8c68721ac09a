"""The pipeline's comparison report: one table and figures over base, stage 2, PPO, SFT and DPO.

Every number in `report.md` is read from `results.json` written beside it (which in turn reads the
evaluations' own results.json files), so the table and the JSON cannot disagree.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from eval.headline import CRITERION
from eval.core.metrics import FALSE_REFUSAL_NOT_MEASURED
from eval.provenance import environment
from safety_modules.fileio import write_json_atomic
from safevlm.selection import read_tables
from concept_world.build import HELD_OUT_OF
from runtime.layout import ReportLayout, RunLayout
from training.recipes.registry import evaluated

BASE_VARIANT = "base"                  # the base alone, evaluated in eval_base
# (variant, the name shown in the report): the base, then every recipe with a row in the report;
# the base's name is the caller's ("base (stage 0)" for the tiny models, "base" for a real checkpoint)
VARIANTS = [(BASE_VARIANT, "base"), *((r.name, r.report_name) for r in evaluated())]
COLUMNS = [
    ("image_alignment", "image alignment acc (unsafe)"),
    ("image_alignment_na_wrong", "image alignment acc, NA counted wrong"),
    ("safe_accuracy", "safe-image acc, NA counted wrong"),
    ("safe_accuracy_na_excluded", "safe-image acc, NA excluded"),
    ("text_alignment", "text-only alignment acc"),
    ("modality_gap", "modality gap (text - image)"),
    ("perception", "perception acc"),
    ("judge_vs_reward_agreement", "judge vs reward classifier agreement"),
    ("judge_vs_rules_agreement", "judge vs rule-based agreement"),
    ("judge_accuracy", "judge acc on labelled answers"),
]


def _numbers(results: dict) -> dict[str, float | None]:
    m = results.get("metrics", {})

    def overall(task: str, conv: str = "na_excluded"):
        return m.get(task, {}).get("overall", {}).get(conv)

    agree = m.get("agreement", {}).get("alignment", {})
    refusal = m.get("false_refusal") or {}
    safe = (refusal.get("safe_accuracy") or {}) if refusal.get("measured") else {}
    judge = results.get("judge_check", {}).get("labelers", {}).get(m.get("primary_labeler", ""), {})
    return {
        "image_alignment": overall("alignment"),
        "image_alignment_na_wrong": overall("alignment", "na_counted_wrong"),
        "safe_accuracy": safe.get("na_counted_wrong"),
        "safe_accuracy_na_excluded": safe.get("na_excluded"),
        "text_alignment": overall("text_alignment"),
        "modality_gap": (m.get("modality_gap") or {}).get("na_excluded", {}).get("overall"),
        "perception": overall("perception"),
        "judge_vs_reward_agreement": agree.get("classifier_vs_second_classifier", {}).get("agreement"),
        "judge_vs_rules_agreement": agree.get("classifier_vs_rules", {}).get("agreement"),
        "judge_accuracy": (judge.get("overall") or {}).get("agreement"),
    }


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _stage1_head(root: Path) -> dict[str, float | None]:
    path = RunLayout(root).stage("stage1").summary
    if not path.is_file():
        return {}
    summary = json.loads(path.read_text())
    out = {"train": summary.get("train_after", {}).get("level_accuracy")}
    for file, metrics in summary.get("eval", {}).items():
        out[Path(file).stem] = metrics.get("level_accuracy")
        out[Path(file).stem + " (safe vs unsafe)"] = metrics.get("unsafe_accuracy")
    return out


def sentence(text: str) -> str:
    """`text` as a sentence: first letter upper-case (the rest untouched: names like PPO stay), a full stop."""
    if not text:
        return ""
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _selection_lines(root: Path) -> list[str]:
    """The hyperparameters chosen on the validation split, with every trial's criterion."""
    rows = []
    for stage, table in read_tables(root).items():
        trials = ", ".join(f"{t['value']}: {t['score']:.3f}" for t in table.get("trials", []))
        source = f"reused from {table['reused_from']}" if table.get("reused_from") else trials
        rows.append(f"| {stage} | {table['key']} | {table['chosen']} | {source} |")
    if not rows:
        return []
    return ["## Hyperparameters chosen on the validation split", "", f"Criterion: {CRITERION}.", "",
            "| stage | key | chosen | trials (value: criterion) |", "| --- | --- | --- | --- |", *rows, ""]


def collect(root: Path, splits: list[str], base_name: str = "base") -> dict:
    """Numbers of every evaluated variant per split, and the stage-1 head's accuracy."""
    table: dict[str, dict[str, dict]] = {}
    for variant, name in VARIANTS:
        name = base_name if variant == BASE_VARIANT else name
        for split in splits:
            path = RunLayout(root).evaluation(variant, split).results
            if path.is_file():
                table.setdefault(split, {})[name] = _numbers(json.loads(path.read_text()))
    return {"splits": table, "stage1_head_accuracy": _stage1_head(root)}


def _plot(results: dict, out: Path, data: str) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    keys = [("image_alignment", "image alignment"), ("safe_accuracy", "safe images (NA wrong)"),
            ("text_alignment", "text-only alignment"), ("perception", "perception")]
    for split, variants in results["splits"].items():
        names = list(variants)
        fig, ax = plt.subplots(figsize=(8, 4))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [variants[name][k] if variants[name][k] is not None else 0.0 for k, _ in keys]
            ax.bar([x + i * width for x in range(len(keys))], values, width, label=name)
        ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(keys))], [label for _, label in keys])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate")
        ax.set_title(f"{data}, {split.replace('_', ' ')}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = ReportLayout(out).figure(split)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(str(path))
    return paths


def write_pipeline_report(root: Path, out: Path, splits: list[str], data: str | None = None,
                          base_name: str = "base (stage 0)") -> dict:
    """results.json, report.md, report.csv and one PNG per split into `out`; `data` names the
    UnsafeConcepts folder evaluated (None: the concept world, whose splits are held out by design)."""
    out.mkdir(parents=True, exist_ok=True)
    layout = ReportLayout(out)
    results = collect(Path(root), splits, base_name)
    results["environment"] = environment()
    write_json_atomic(layout.results, results)
    where = ("Measured on renders and concepts of the concept world held out of training (what each split is "
             "held out of is said under its heading)" if data is None
             else f"Measured on {data}, splits {', '.join(splits)}")
    held_out_of = HELD_OUT_OF if data is None else {}
    data = data or "the concept world"
    lines = [f"# Safety alignment on {data}", "",
             f"{where}; answers judged by the judge classifier (trained on other templates and seed than the "
             "PPO reward classifier). Accuracies exclude NA answers unless the column says otherwise.", ""]
    rows = []
    for split, variants in results["splits"].items():
        lines += [f"## {split}", ""] + ([sentence(held_out_of[split]), ""] if split in held_out_of else [])
        lines += ["| model | " + " | ".join(label for _, label in COLUMNS) + " |",
                  "| --- |" + " --- |" * len(COLUMNS)]
        for name, numbers in variants.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(numbers[k]) for k, _ in COLUMNS) + " |")
            rows.append({"split": split, "model": name, **numbers})
        if all(numbers["safe_accuracy"] is None for numbers in variants.values()):
            lines += ["", f"False refusal on {split}: {FALSE_REFUSAL_NOT_MEASURED}"]
        lines += ["", f"![{split}]({ReportLayout.figure_name(split)})", ""]
    head = results["stage1_head_accuracy"]
    if head:
        lines += ["## Stage-1 safety head (safety-level accuracy)", "", "| records | accuracy |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in head.items()] + [""]
    lines += _selection_lines(Path(root))
    lines += ["## Environment", "", "```", json.dumps(results["environment"], indent=1), "```", ""]
    layout.markdown.write_text("\n".join(lines))
    with layout.csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["split", "model"] + [k for k, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    figures = _plot(results, out, data[0].upper() + data[1:])
    return {"report": str(layout.markdown), "results": str(layout.results), "figures": figures}
