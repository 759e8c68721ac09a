"""Evaluation: UnsafeConcepts, RTVLM and general capability; judges, metrics, reports and plots.

Layers (each imports only those above it in this list):
    core/          the basic pieces: items, model runners, cache, labellers, refusal, metrics
    judges/        RTVLM judges behind one interface: openai:MODEL, local:PATH, classifier:DIR
    benchmarks/    read a benchmark folder into items, score the answers (unsafeconcepts, protocols,
                   safe_images, rtvlm, general)
    generation.py  answer items through the response cache, sharded over ranks, with a progress bar
    pipeline.py    one evaluation run from folder to report (what `safevlm eval` calls)
    judge_check.py, audit.py, headline.py   labelled answers that score the labellers; answers to
                   audit by hand; the headline numbers of model selection and the study
    report.py, plots.py, provenance.py   results.json, CSV, Markdown, PNGs; several runs side by side
"""
