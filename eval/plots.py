"""PNG plots of evaluation results (matplotlib, headless Agg backend).

Why these three: per-category accuracy shows where a model fails; image vs text bars make the
modality gap (the paper's central finding) visible per category; RTVLM per-subtask scores show which
risks an adapter fixed. `plot_runs` puts several runs' headline numbers side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from eval.core.items import TEXT_ALIGNMENT  # noqa: E402
from safety_modules.labels import ALIGNMENT, PERCEPTION  # noqa: E402

TASK_LABELS = {PERCEPTION: "perception", ALIGNMENT: "image alignment", TEXT_ALIGNMENT: "text-only alignment"}


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def _value(acc: Mapping | None, convention: str) -> float:
    v = None if acc is None else acc.get(convention)
    return float("nan") if v is None else float(v)


def _bar_axes(ax, ticks: Sequence[float], names: Sequence[str], top: float, ylabel: str | None, title: str,
              legend: bool = True) -> None:
    """The x labels (slanted), the y range and label, the title and the legend of a bar chart."""
    ax.set_xticks(list(ticks))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, top)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.set_title(title)
    if legend:
        ax.legend(fontsize=8)


def plot_category_accuracy(metrics: Mapping, path: str | Path, convention: str = "na_excluded") -> Path:
    """Grouped bars: accuracy per category for each task present."""
    tasks = [t for t in TASK_LABELS if t in metrics]
    categories = sorted({c for t in tasks for c in metrics[t]["per_category"]})
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(categories) + 2), 4.2))
    width = 0.8 / max(1, len(tasks))
    for k, task in enumerate(tasks):
        vals = [_value(metrics[task]["per_category"].get(c), convention) for c in categories]
        ax.bar([i + k * width for i in range(len(categories))], vals, width, label=TASK_LABELS[task])
    _bar_axes(ax, [i + width * (len(tasks) - 1) / 2 for i in range(len(categories))], categories, 1.05,
              f"accuracy ({convention})", "Accuracy per category")
    return _save(fig, path)


def plot_modality_gap(metrics: Mapping, path: str | Path, convention: str = "na_excluded") -> Path:
    """Image vs text-only alignment accuracy per category (and overall), the gap written above."""
    image, text = metrics[ALIGNMENT], metrics[TEXT_ALIGNMENT]
    categories = sorted(set(image["per_category"]) & set(text["per_category"]))
    labels = ["overall"] + categories
    img = [_value(image["overall"], convention)] + [_value(image["per_category"][c], convention) for c in categories]
    txt = [_value(text["overall"], convention)] + [_value(text["per_category"][c], convention) for c in categories]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.2))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], img, 0.4, label="image")
    ax.bar([x + 0.2 for x in xs], txt, 0.4, label="text only")
    for x, a, b in zip(xs, img, txt):
        if a == a and b == b:  # not NaN
            ax.annotate(f"{b - a:+.2f}", (x, max(a, b) + 0.02), ha="center", fontsize=7)
    _bar_axes(ax, xs, labels, 1.12, f"alignment accuracy ({convention})", "Modality gap: text-only minus image accuracy")
    return _save(fig, path)


def plot_rtvlm(metrics: Mapping, path: str | Path) -> Path:
    """Bars of the mean judge score per subtask, the overall score as a line."""
    per = metrics["per_subtask"]
    names = list(per)
    vals = [float("nan") if per[n]["score"] is None else per[n]["score"] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.2))
    ax.bar(range(len(names)), vals, color="tab:green")
    overall = metrics.get("overall")
    if overall is not None:
        ax.axhline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.2f}")
    _bar_axes(ax, range(len(names)), names, 10.5, "judge score (1-10)",
              f"RTVLM per subtask ({metrics.get('judge', 'judge')})", legend=overall is not None)
    return _save(fig, path)


def plot_mme(metrics: Mapping, path: str | Path) -> Path:
    """Accuracy and accuracy+ per MME category."""
    per = metrics["per_category"]
    names = list(per)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.0))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [per[n]["accuracy"] or 0 for n in names], 0.4, label="accuracy")
    ax.bar([x + 0.2 for x in xs], [per[n]["accuracy_plus"] or 0 for n in names], 0.4, label="accuracy+")
    _bar_axes(ax, xs, names, 1.05, None, "MME-style yes/no")
    return _save(fig, path)


def plot_runs(table: Mapping[str, Mapping[str, float | None]], runs: Sequence[str], path: str | Path) -> Path:
    """Grouped horizontal bars: each headline metric (rows of `table`) for each run."""
    metrics = list(table)
    fig, ax = plt.subplots(figsize=(8.0, max(3.0, 0.45 * len(metrics) * max(1, len(runs)) ** 0.5 + 1.5)))
    height = 0.8 / max(1, len(runs))
    for k, run in enumerate(runs):
        vals = [table[m].get(run) for m in metrics]
        ax.barh([i + k * height for i in range(len(metrics))],
                [float("nan") if v is None else v for v in vals], height, label=run)
    ax.set_yticks([i + height * (len(runs) - 1) / 2 for i in range(len(metrics))])
    ax.set_yticklabels(metrics, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel("value (accuracies and rates 0-1; RTVLM scores / 10)")
    ax.set_title("Runs side by side")
    ax.legend(fontsize=7)
    return _save(fig, path)
