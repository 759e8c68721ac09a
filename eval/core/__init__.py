"""The pieces every evaluation builds on, and that import nothing else of `eval`.

    items.py      `EvalItem` (one question to answer), `DataError`, the JSONL reader and field checks
    models.py     model runners (SafetyVLM + adapter, plain HF model): batched, left-padded generation
    cache.py      on-disk response/judgement cache (sqlite3), so reruns and resumes cost nothing
    labeling.py   response classifiers + rule-based check -> labels
    refusal.py    what counts as a refusal (false-refusal rate, offline judge)
    metrics.py    accuracies (both NA conventions), modality gap, false refusals, agreement, RTVLM, MME

Why a layer of its own: the benchmarks and the judges build on these, and the orchestration
(`eval.generation`, `eval.pipeline`, the reports) builds on all three; with the basic pieces below
both, every import inside `eval` points one way.
"""
