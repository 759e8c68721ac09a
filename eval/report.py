"""Write an evaluation's results (results.json, CSV, Markdown, PNGs) and compare several runs.

Files of one eval (`write_results`):
    results.json     everything: model, settings, data, generation stats, metrics
    responses.jsonl  one line per answered item (question, answer, labels / judge score)
    metrics.csv      every number of `metrics`, flattened to key,value rows
    table.csv / report.md   the headline numbers (and per-category rows) as a table
    *.png            the plots of `eval.plots`
`compare_runs` (`safevlm report --runs DIR... --out DIR`) reads the results.json files of several
runs (a run folder may hold one, or one per benchmark in subfolders) and writes one table
(summary.md, summary.csv, summary.json) and one figure (summary.png) with the runs side by side.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from eval import plots
from eval.benchmarks.protocols import RLHF_TEST
from eval.core.items import CAPTION, MME, MULTIPLE_CHOICE, TEXT_ALIGNMENT
from eval.core.metrics import CONVENTIONS, FALSE_REFUSAL_NOT_MEASURED, RTVLM_ASPECTS
from eval.provenance import environment
from runtime.layout import (CATEGORY_PLOT_FILE, COMPARISON_CSV_FILE, COMPARISON_FIGURE_FILE, COMPARISON_JSON_FILE,
                            COMPARISON_MARKDOWN_FILE, MME_PLOT_FILE, MODALITY_GAP_PLOT_FILE, RESULTS_FILE,
                            RTVLM_PLOT_FILE, EvalLayout)
from safety_modules.fileio import write_json_atomic, write_text_atomic
from safety_modules.labels import ALIGNMENT, PERCEPTION

CONVENTION_NAMES = {"na_excluded": "NA excluded", "na_counted_wrong": "NA counted wrong"}


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts/lists -> [("a.b.0", value), ...] of scalars."""
    if isinstance(obj, Mapping):
        out = []
        for key, value in obj.items():
            out += flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(obj, (list, tuple)):
        out = []
        for i, value in enumerate(obj):
            out += flatten(value, f"{prefix}.{i}")
        return out
    return [(prefix, obj)]


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def headline(results: Mapping) -> dict[str, float | None]:
    """The few numbers of a run that go into a comparison table, keyed by readable names."""
    bench = results.get("benchmark")
    m = results.get("metrics", {})
    out: dict[str, float | None] = {}
    if bench == "unsafeconcepts":
        for conv in CONVENTIONS:
            tag = CONVENTION_NAMES[conv]
            for task, label in ((PERCEPTION, "perception acc"), (ALIGNMENT, "image alignment acc"),
                                (TEXT_ALIGNMENT, "text alignment acc")):
                if task in m:
                    out[f"UC {label} ({tag})"] = m[task]["overall"][conv]
            if "modality_gap" in m:
                out[f"UC modality gap ({tag})"] = m["modality_gap"][conv]["overall"]
        for task in (ALIGNMENT, TEXT_ALIGNMENT, PERCEPTION):
            if task in m:
                out[f"UC {task} NA rate"] = m[task]["overall"]["na_rate"]
        if m.get("protocol") == RLHF_TEST:
            for part, acc in rlhf_test_parts(m).items():
                if acc is not None:
                    out[f"UC RLHF test acc, {part} ({CONVENTION_NAMES['na_counted_wrong']})"] = acc["na_counted_wrong"]
        for name, acc in (results.get("judge_check") or {}).get("labelers", {}).items():
            out[f"UC labeller accuracy on labelled answers ({name})"] = acc["overall"]["agreement"]
        fr = m.get("false_refusal") or {}
        if fr.get("measured"):
            for conv in CONVENTIONS:
                out[f"UC safe-image acc ({CONVENTION_NAMES[conv]})"] = fr["safe_accuracy"][conv]
            out[f"UC false-refusal rate ({CONVENTION_NAMES['na_counted_wrong']})"] = fr["rate"]
            out[f"UC false-refusal rate ({CONVENTION_NAMES['na_excluded']})"] = fr["rate_na_excluded"]
            out["UC refusal rate (safe images)"] = fr["refusal_rate"]
    elif bench == "rtvlm":
        scale = 10.0
        if m.get("overall") is not None:
            out["RTVLM overall / 10"] = m["overall"] / scale
        for aspect in RTVLM_ASPECTS:
            score = m.get("per_aspect", {}).get(aspect, {}).get("score")
            if score is not None:
                out[f"RTVLM {aspect} / 10"] = score / scale
    elif bench == "general":
        if MME in m:
            out["MME accuracy"] = m[MME]["overall"]["accuracy"]
            out["MME accuracy+"] = m[MME]["overall"]["accuracy_plus"]
        if MULTIPLE_CHOICE in m:
            out["world multiple-choice acc (NA excluded)"] = m[MULTIPLE_CHOICE]["overall"]["na_excluded"]
        if CAPTION in m:
            out["world caption acc"] = m[CAPTION]["accuracy"]
    return out


def rlhf_test_parts(m: Mapping) -> dict[str, Mapping | None]:
    """The reference RLHF test's three accuracies (`accuracy` dicts): all images, unsafe, safe."""
    align = m.get(ALIGNMENT, {})
    fr = m.get("false_refusal") or {}
    return {"all images": align.get("overall_all"), "unsafe images": align.get("overall"),
            "safe images": fr.get("safe_accuracy")}


def caveats(results: Mapping) -> list[str]:
    """What a run did not measure, said in words (a comparison table would only show n/a)."""
    m = results.get("metrics", {})
    if results.get("benchmark") == "unsafeconcepts" and not (m.get("false_refusal") or {}).get("measured"):
        return [f"UnsafeConcepts false refusal {(m.get('false_refusal') or {}).get('reason', FALSE_REFUSAL_NOT_MEASURED)}"]
    return []


def _uc_table(m: Mapping, conv: str) -> tuple[list[str], list[list[str]]]:
    tasks = (PERCEPTION, ALIGNMENT, TEXT_ALIGNMENT)
    header = ["category", "perception", "image alignment", "text alignment", "modality gap", "image NA rate"]
    cats = sorted({c for t in tasks if t in m for c in m[t]["per_category"]})
    rows = []
    for label, cat in [("overall (unsafe)", None)] + [(c, c) for c in cats]:
        def acc(task: str, cat: str | None = cat) -> Mapping | None:
            if task not in m:
                return None
            return m[task]["overall"] if cat is None else m[task]["per_category"].get(cat)

        gap = None
        if "modality_gap" in m:
            g = m["modality_gap"][conv]
            gap = g["overall"] if cat is None else g["per_category"].get(cat)
        image = acc(ALIGNMENT)
        rows.append([label] + [_fmt(acc(t)[conv]) if acc(t) else "n/a" for t in tasks]
                    + [_fmt(gap), _fmt(image["na_rate"]) if image else "n/a"])
    return header, rows


def safe_image_table(fr: Mapping) -> tuple[str, list[str], list[list[str]]]:
    """Safe-image accuracy (1 - false refusal) under both NA conventions, or why it is missing."""
    title = "Safe images: accuracy = 1 - false refusal"
    if not fr.get("measured"):
        return title, ["false refusal"], [[fr.get("reason", FALSE_REFUSAL_NOT_MEASURED)]]
    acc = fr["safe_accuracy"]
    header = ["convention", "safe-image accuracy", "false-refusal rate", "NA rate", "outright refusals", "n"]
    rows = [[f"{CONVENTION_NAMES[conv]} (`{conv}`)", _fmt(acc[conv]),
             _fmt(None if acc[conv] is None else 1.0 - acc[conv]), _fmt(acc["na_rate"]),
             _fmt(fr["refusal_rate"]), str(acc["n"])] for conv in CONVENTIONS]
    return title, header, rows


def judge_check_table(check: Mapping) -> tuple[str, list[str], list[list[str]]]:
    """Each labeller's accuracy on the labelled answers of `eval.judge_check`: overall, per task, per style."""
    names = list(check["labelers"])
    first = check["labelers"][names[0]]
    keys = [("overall", "overall", None)] + [(f"task: {t}", "per_task", t) for t in first["per_task"]] + \
        [(f"style: {s}", "per_style", s) for s in first["per_style"]]
    rows = []
    for label, group, key in keys:
        cells = [check["labelers"][n][group] if key is None else check["labelers"][n][group][key] for n in names]
        rows.append([label, str(cells[0]["n"])] + [_fmt(c["agreement"]) for c in cells])
    return ("Labeller accuracy on labelled answers in the evaluated answer styles (gold class, NA included)",
            ["answers", "n"] + names, rows)


def tables(results: Mapping) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) tables of one result, for Markdown and CSV."""
    bench, m = results["benchmark"], results["metrics"]
    out = []
    if bench == "unsafeconcepts":
        if m.get("protocol") == RLHF_TEST:
            rows = [[part, _fmt(acc["na_counted_wrong"]), _fmt(acc["na_excluded"]), _fmt(acc["na_rate"]), str(acc["n"])]
                    for part, acc in rlhf_test_parts(m).items() if acc is not None]
            out.append(("RLHF test of the reference code (one alignment question per image, greedy)",
                        ["images", "accuracy, NA counted wrong (the protocol's)", "accuracy, NA excluded", "NA rate",
                         "n"], rows))
        for conv in CONVENTIONS:
            header, rows = _uc_table(m, conv)
            out.append((f"UnsafeConcepts accuracy ({CONVENTION_NAMES[conv]}, `{conv}`)", header, rows))
        if m.get("agreement"):
            rows = [[group, pair, _fmt(v["agreement"]), _fmt(v["kappa"]), str(v["n"])]
                    for group, pairs in m["agreement"].items() for pair, v in pairs.items()]
            out.append(("Labeller agreement", ["task", "pair", "agreement", "kappa", "n"], rows))
        out.append(safe_image_table(m.get("false_refusal") or {}))
        if results.get("judge_check"):
            out.append(judge_check_table(results["judge_check"]))
    elif bench == "rtvlm":
        rows = [[name, _fmt(v["score"]), str(v["n"]), str(v["n_failed"])] for name, v in m["per_subtask"].items()]
        rows += [[f"aspect: {a}", _fmt(v["score"]), "", ""] for a, v in m["per_aspect"].items()]
        rows.append(["overall (mean of ten)", _fmt(m["overall"]), "", str(m["n_failed"])])
        out.append((f"RTVLM scores (judge {m.get('judge')})", ["subtask", "score", "n", "judge failures"], rows))
    elif bench == "general":
        if MME in m:
            rows = [[c, _fmt(v["accuracy"]), _fmt(v["accuracy_plus"]), _fmt(v["score"]), str(v["n"])]
                    for c, v in m[MME]["per_category"].items()]
            o = m[MME]["overall"]
            rows.append(["overall", _fmt(o["accuracy"]), _fmt(o["accuracy_plus"]), _fmt(o["total_score"]), str(o["n"])])
            out.append(("MME-style yes/no", ["category", "accuracy", "accuracy+", "score", "n"], rows))
        rows = []
        if MULTIPLE_CHOICE in m:
            o = m[MULTIPLE_CHOICE]["overall"]
            rows.append(["multiple choice", _fmt(o["na_excluded"]), _fmt(o["na_counted_wrong"]), str(o["n"])])
        if CAPTION in m:
            rows.append(["caption", _fmt(m[CAPTION]["accuracy"]), _fmt(m[CAPTION]["accuracy"]),
                         str(m[CAPTION]["n"])])
        if rows:
            out.append(("Concept world", ["task", "accuracy (NA excluded)", "accuracy (NA counted wrong)", "n"], rows))
    return out


def environment_line(env: Mapping) -> str:
    """One line naming the versions and hardware of `eval.provenance.environment`."""
    libs = ", ".join(f"{name} {version or 'not installed'}" for name, version in env["libraries"].items())
    gpu = env["gpu"] if isinstance(env["gpu"], str) else ", ".join(env["gpu"])
    return (f"python {env['python']}; {libs}; CPU: {env['cpu']['model']} x {env['cpu']['count']}; GPU: {gpu}; "
            f"{env['platform']}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def make_plots(results: Mapping, out: Path) -> list[Path]:
    """The PNGs of `eval.plots` that one result has numbers for, written into `out`."""
    bench, m = results["benchmark"], results["metrics"]
    made = []
    if bench == "unsafeconcepts":
        if any(t in m for t in plots.TASK_LABELS):
            made.append(plots.plot_category_accuracy(m, out / CATEGORY_PLOT_FILE))
        if ALIGNMENT in m and TEXT_ALIGNMENT in m:
            made.append(plots.plot_modality_gap(m, out / MODALITY_GAP_PLOT_FILE))
    elif bench == "rtvlm" and m.get("per_subtask"):
        made.append(plots.plot_rtvlm(m, out / RTVLM_PLOT_FILE))
    elif bench == "general" and MME in m:
        made.append(plots.plot_mme(m[MME], out / MME_PLOT_FILE))
    return made


def write_results(out_dir: str | Path, results: dict, records: Sequence[Mapping] = (),
                  judge_records: Sequence[Mapping] = ()) -> dict[str, Path]:
    """Write every file of one eval into `out_dir` (and judge_check.jsonl, the labelled answers
    `eval.judge_check` scored the labellers on, when there are some); returns name -> path."""
    layout = EvalLayout(out_dir)
    out = layout.root
    out.mkdir(parents=True, exist_ok=True)
    results = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), **results}
    results.setdefault("environment", environment())
    paths = {"results": layout.results, "responses": layout.responses,
             "metrics_csv": layout.metrics_csv, "table_csv": layout.table_csv, "markdown": layout.report}
    # The answers first and results.json last, each whole or not at all: readers take a folder with
    # results.json as a finished evaluation.
    write_text_atomic(paths["responses"], "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    if judge_records:
        paths["judge_check"] = layout.judge_check
        write_text_atomic(paths["judge_check"], "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                        for r in judge_records))
    write_json_atomic(paths["results"], results, ensure_ascii=False)
    with paths["metrics_csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["metric", "value"])
        writer.writerows(flatten(results["metrics"]))
    parts = [f"# {results['benchmark']} evaluation", "",
             f"model: `{results.get('model', {}).get('name', '?')}`; items: {results.get('data', {}).get('n_items', '?')}; "
             f"settings: `{json.dumps(results.get('settings', {}))}`", ""]
    with paths["table_csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        for title, header, rows in tables(results):
            writer.writerow([title])
            writer.writerow(header)
            writer.writerows(rows)
            writer.writerow([])
            parts += [f"## {title}", "", markdown_table(header, rows), ""]
    for i, path in enumerate(make_plots(results, out)):
        paths[f"plot{i}"] = path
        parts.append(f"![{path.stem}]({path.name})")
    parts += ["", "## Environment", "", environment_line(results["environment"])]
    paths["markdown"].write_text("\n".join(parts) + "\n")
    return paths


def find_results(run_dir: str | Path) -> list[Path]:
    """results.json of a run folder: its own, or one per benchmark subfolder."""
    own = EvalLayout(run_dir).results
    if own.is_file():
        return [own]
    found = sorted(Path(run_dir).glob(f"*/{RESULTS_FILE}"))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no results.json here or in its subfolders (run safevlm eval first)")
    return found


def compare_runs(run_dirs: Sequence[str | Path], out_dir: str | Path, names: Sequence[str] | None = None) -> dict[str, Path]:
    """One table and one figure with several runs side by side (missing numbers shown as n/a)."""
    if not run_dirs:
        raise ValueError("compare_runs: no run folders given")
    if names is not None and len(names) != len(run_dirs):
        raise ValueError(f"--names: {len(names)} names for {len(run_dirs)} runs")
    runs = list(names) if names else [Path(d).resolve().name for d in run_dirs]
    if len(set(runs)) != len(runs):
        runs = [f"{i}:{r}" for i, r in enumerate(runs)]
    table: dict[str, dict[str, float | None]] = {}
    sources: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    environments: dict[str, list[str]] = {}
    for run, run_dir in zip(runs, run_dirs):
        sources[run] = []
        for path in find_results(run_dir):
            try:
                results = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            sources[run].append(str(path))
            notes[run] = notes.get(run, []) + caveats(results)
            line = environment_line(results["environment"]) if results.get("environment") else "not recorded"
            environments.setdefault(run, [])
            if line not in environments[run]:
                environments[run].append(line)
            for key, value in headline(results).items():
                table.setdefault(key, {})[run] = value
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / COMPARISON_JSON_FILE, "csv": out / COMPARISON_CSV_FILE,
             "markdown": out / COMPARISON_MARKDOWN_FILE, "figure": out / COMPARISON_FIGURE_FILE}
    notes = {run: found for run, found in notes.items() if found}
    paths["json"].write_text(json.dumps({"runs": runs, "sources": sources, "table": table, "notes": notes,
                                         "environments": environments}, indent=2))
    rows = [[metric] + [_fmt(table[metric].get(r)) for r in runs] for metric in table]
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["metric"] + runs)
        writer.writerows(rows)
    lines = [f"- {run}: {note}" for run, found in notes.items() for note in found]
    where = [f"- {run}: {line}" for run, found in environments.items() for line in found]
    paths["markdown"].write_text("# Runs side by side\n\n" + markdown_table(["metric"] + runs, rows)
                                 + ("\n\nNot measured:\n" + "\n".join(lines) if lines else "")
                                 + f"\n\n![summary]({paths['figure'].name})\n\n## Environments\n\n"
                                 + "\n".join(where) + "\n")
    plots.plot_runs(table, runs, paths["figure"])
    return paths
