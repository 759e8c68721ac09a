"""`safevlm classifier ...`: train the response classifier (PPO reward / evaluation judge) and use it.

    train          fine-tune one classifier on a JSONL file, or on generated answers (no --data)
    build-default  train both default classifiers: OUT/reward (family a) and OUT/judge (family b)
    generate       write generated labelled answers to JSONL (to inspect, or to train elsewhere)
    predict        label answers with a trained classifier
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("classifier", help="response classifier: train, build-default, generate, predict",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="classifier_command", required=True)

    def training_flags(q: argparse.ArgumentParser) -> None:
        q.add_argument("--config", help="YAML with a `classifier:` section (default: built-in defaults)")
        q.add_argument("--base", help="backbone folder or cached hub name (default: packaged all-MiniLM-L6-v2)")
        q.add_argument("--epochs", type=int)
        q.add_argument("--seed", type=int)
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
        q.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lr=1e-4")

    t = sub.add_parser("train", help="fine-tune one classifier")
    t.add_argument("--data", help="training JSONL: {task, question, answer, label} per line (default: generated)")
    t.add_argument("--eval-data", help="evaluation JSONL (default: held-out templates, or 10%% of --data)")
    t.add_argument("--out", required=True, help="output folder (safetensors + configs)")
    t.add_argument("--family", choices=["a", "b"], help="template family of generated data (a = reward, b = judge)")
    training_flags(t)
    t.set_defaults(func=run_train)

    b = sub.add_parser("build-default", help="train the reward (family a) and judge (family b) classifiers")
    b.add_argument("--out", required=True, help="folder receiving reward/ and judge/")
    training_flags(b)
    b.set_defaults(func=run_build_default)

    g = sub.add_parser("generate", help="write generated labelled answers as JSONL")
    g.add_argument("--out", required=True, help="output JSONL file")
    g.add_argument("--family", choices=["a", "b"], default="a")
    g.add_argument("--split", choices=["train", "heldout"], default="train")
    g.add_argument("--per-task", type=int, default=500, help="answers per task")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=run_generate)

    r = sub.add_parser("predict", help="label answers with a trained classifier")
    r.add_argument("--model", required=True, help="classifier folder")
    r.add_argument("--task", required=True, choices=["alignment", "perception"])
    r.add_argument("--question", required=True)
    r.add_argument("--answer", required=True, action="append", help="an answer (repeat for several)")
    r.set_defaults(func=run_predict)


def _config(args: argparse.Namespace, **flags):
    from safety_modules.configio import load_config
    from response_classifier.train import ClassifierTrainConfig

    cfg = load_config(ClassifierTrainConfig, args.config, args.overrides,
                      section="classifier" if args.config else None)
    given = {k: v for k, v in {"base": args.base, "epochs": args.epochs, "seed": args.seed, **flags}.items()
             if v is not None}
    return dataclasses.replace(cfg, **given)  # __post_init__ validates the flags too


def _summary(name: str, report: dict) -> str:
    held = report["heldout"]
    line = (f"{name}: held-out accuracy {held['accuracy']:.4f} (alignment {held.get('alignment', float('nan')):.4f}, "
            f"perception {held.get('perception', float('nan')):.4f}; {report['heldout_kind']}), "
            f"rules {held['rules_accuracy']:.4f}, agreement with rules {held['agreement_with_rules']:.4f}; "
            f"{report['steps']} steps, {report['train_seconds']:.0f} s")
    if "other_family_heldout" in report:
        line += f"; other family's held-out answers {report['other_family_heldout']['accuracy']:.4f}"
    return line


def run_train(args: argparse.Namespace) -> int:
    from response_classifier.data import read_jsonl
    from response_classifier.train import train_classifier

    cfg = _config(args, family=args.family)
    train_records = read_jsonl(args.data) if args.data else None
    eval_records = read_jsonl(args.eval_data) if args.eval_data else None
    _, report = train_classifier(cfg, train_records, eval_records, out_dir=args.out,
                                 progress=not args.no_progress)
    print(_summary(str(args.out), report))
    return 0


def run_build_default(args: argparse.Namespace) -> int:
    from response_classifier.train import build_default

    reports = build_default(args.out, _config(args), progress=not args.no_progress)
    for name, report in reports.items():
        print(_summary(str(Path(args.out) / name), report))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from response_classifier.answers import generate
    from response_classifier.data import write_jsonl

    records = generate(args.family, args.per_task, args.seed, args.split)
    print(f"{write_jsonl(records, args.out)}: {len(records)} records (family {args.family}, {args.split})")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from response_classifier.data import TASK_LABELS
    from response_classifier.model import ResponseClassifier

    clf = ResponseClassifier.load(args.model)
    questions = [args.question] * len(args.answer)
    probs = clf.probabilities(questions, args.answer, args.task)
    names = TASK_LABELS[args.task]
    for answer, row in zip(args.answer, probs.tolist()):
        best = max(range(len(names)), key=row.__getitem__)
        print(json.dumps({"answer": answer, "label": names[best],
                          "probabilities": {n: round(p, 4) for n, p in zip(names, row)}}))
    return 0
