"""Evaluation: UnsafeConcepts, RTVLM and general capability; judges, metrics, reports and plots.

Layout (one job per module):
    benchmarks/{unsafeconcepts,rtvlm,general}.py  read a benchmark folder into `EvalItem`s, score answers
    models.py        model runners (SafetyVLM + adapter, plain HF LLaVA): batched, left-padded generation
    generation.py    answer items through the response cache, sharded over ranks, with a progress bar
    cache.py         on-disk response/judgement cache (sqlite3), so reruns and resumes cost nothing
    distributed.py   shard by rank under torchrun, merge the answers
    judges/          RTVLM judges behind one interface: openai:MODEL, local:PATH, classifier:DIR
    labeling.py      response classifiers + rule-based check -> labels
    refusal.py       what counts as a refusal (false-refusal rate, offline judge)
    metrics.py       accuracies (both NA conventions), modality gap, false refusals, agreement, RTVLM, MME
    pipeline.py      one evaluation run from folder to report (what `safevlm eval` calls)
    report.py, plots.py   results.json, CSV, Markdown, PNGs; several runs side by side
"""
