"""A seeded sample of labelled answers per method, as CSV for a person to audit the labellers.

Why: the labellers' numbers (and `eval.judge_check`'s templated answers) still leave open whether
the judge reads *these* models' answers right. A person labelling a random sample of each method's
answers settles it; the empty `human_label` column is theirs, the labellers' columns sit beside it.

A run folder is searched for evaluations (results.json + responses.jsonl with labelled answers):
the pipeline's `<run_dir>/<eval stage>/<split>/`, a `safevlm eval --out` folder, or folders of such.
The method is the first folder below the run folder (the folder's own name when the evaluation sits
in it), the split the rest of the path (else the split the evaluation recorded).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from eval.core.items import read_jsonl
from runtime.layout import RESULTS_FILE, EvalLayout

FIXED_COLUMNS = ("method", "split", "task", "id", "question", "answer", "target")
HUMAN_LABEL = "human_label"
LABEL_PREFIX = "label_"


def labelled_answers(run_dir: str | Path) -> dict[str, list[dict]]:
    """method -> its labelled answers (each with `method` and `split`), every evaluation under `run_dir`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run folder not found")
    by_method: dict[str, list[dict]] = {}
    for results_path in sorted(run_dir.rglob(RESULTS_FILE)):
        responses = EvalLayout(results_path.parent).responses
        if not responses.is_file():
            continue
        folder = results_path.parent.relative_to(run_dir).parts
        try:
            recorded = json.loads(results_path.read_text()).get("data", {}).get("split")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{results_path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        method = folder[0] if folder else run_dir.resolve().name
        split = "/".join(folder[1:]) or str(recorded or "all")
        for _, record in read_jsonl(responses):
            if "labels" in record:
                by_method.setdefault(method, []).append({**record, "method": method, "split": split})
    if not by_method:
        raise FileNotFoundError(f"{run_dir}: no evaluation with labelled answers here or below "
                                "(results.json + responses.jsonl of safevlm eval unsafeconcepts)")
    return by_method


def write_audit(run_dir: str | Path, out: str | Path, per_method: int = 50, seed: int = 0) -> dict:
    """Write a CSV of `per_method` answers drawn per method with `random.Random(seed)` (all of a
    method's answers when it has fewer), in the evaluations' order; returns the path and counts."""
    if per_method < 1:
        raise ValueError(f"--per-method must be >= 1, got {per_method}")
    by_method = labelled_answers(run_dir)
    rng = random.Random(seed)
    rows: list[dict] = []
    labellers: list[str] = []
    for method in sorted(by_method):
        answers = by_method[method]
        for index in sorted(rng.sample(range(len(answers)), min(per_method, len(answers)))):
            rows.append(answers[index])
            labellers += [name for name in answers[index]["labels"] if name not in labellers]
    columns = list(FIXED_COLUMNS) + [LABEL_PREFIX + name for name in labellers] + [HUMAN_LABEL]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({**{key: row.get(key, "") for key in FIXED_COLUMNS},
                             **{LABEL_PREFIX + name: row["labels"].get(name, "") for name in labellers},
                             HUMAN_LABEL: ""})
    counts = {method: sum(1 for r in rows if r["method"] == method) for method in sorted(by_method)}
    return {"path": out, "per_method": counts, "columns": columns}
