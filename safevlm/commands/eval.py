"""`safevlm eval unsafeconcepts|rtvlm|general`: evaluate a model (with an optional adapter).

Examples:
    safevlm eval unsafeconcepts --model tiny --adapter runs/stage2/adapter --data world/ --split heldout_render \
        --classifier runs/clf_eval --judge-classifier runs/clf_reward --out runs/eval/uc --greedy
    safevlm eval rtvlm --model /models/llava-1.5-7b-hf --data rtvlm/ --judge openai:gpt-4o --out runs/eval/rtvlm
    torchrun --nproc-per-node 8 -m safevlm.cli eval unsafeconcepts --model ... --data ... --out ...
    # the reference code's RLHF test: 345 unsafe + 345 safe test images, one question each, greedy
    safevlm eval unsafeconcepts --model ... --data UnsafeConcepts/ --safe-data imagenet_1k/ --protocol rlhf-test \
        --classifier runs/clf_eval --out runs/eval/rlhf_test
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from runtime.layout import CACHE_FILE, DOWNLOAD_FILE, HUB_DATA_DIR, EvalLayout

log = logging.getLogger(__name__)

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="base model folder, or 'tiny' / 'tiny-next' (default: tiny)")
    p.add_argument("--model-seed", type=int, default=0, help="seed of the tiny model (ignored for folders)")
    p.add_argument("--adapter", help="safety adapter folder (runs the model with the safety modules)")
    p.add_argument("--strict-base", action="store_true",
                   help="refuse an adapter whose base had other weights (default: a warning)")
    p.add_argument("--runner", default="auto", choices=["auto", "hf", "safevlm"],
                   help="auto: safevlm with --adapter, hf (the plain model) without")
    p.add_argument("--data", help="benchmark folder")
    p.add_argument("--out", required=True, help="output folder (results.json, CSV, Markdown, PNGs, cache)")
    p.add_argument("--limit", type=int, help="only the first N images/questions (quick runs)")
    p.add_argument("--sample", type=int, help="a seeded random sample of N images/questions")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample and of sampling")
    p.add_argument("--config", help="YAML with an `eval` section (generation settings, batch_size)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. generation.max_new_tokens=64 (repeatable)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (reproducible; default: the protocol's sampling)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--cache", help=f"response cache file (default: OUT/{CACHE_FILE})")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the response cache")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--image-preprocess", choices=["processor", "pad_to_square"],
                   help="processor (default): the processor's own (centre crop); pad_to_square: pad to a square "
                        "with the mean colour first, as the original LLaVA-1.5 did")
    p.add_argument("--conversation", choices=["llava_v1"],
                   help="an original prompt template instead of the processor's (llava_v1: LLaVA-1.5's, with "
                        "its system prompt)")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model on UnsafeConcepts, RTVLM or general capability",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benches = p.add_subparsers(dest="benchmark", required=True)

    uc = benches.add_parser("unsafeconcepts", help="perception, image and text-only alignment, modality gap")
    _common(uc)
    uc.add_argument("--split", help="all (default); train/test (the reference 80/20 split, seed 2024); on a "
                                    "concept world any value of its split column, e.g. heldout_render")
    uc.add_argument("--tasks", nargs="+", choices=["perception", "alignment", "text_alignment"])
    uc.add_argument("--protocol", default="measurement", choices=["measurement", "rlhf-test"],
                    help="measurement (default): the paper's measurement, every image x 5 alignment questions, "
                         "perception, text-only; rlhf-test: the reference code's RLHF test, the reference split's "
                         "345 unsafe + as many safe test images, one question per image as the reference drew it, "
                         "greedy, NA counted wrong (needs --safe-data)")
    uc.add_argument("--safe-data", metavar="DIR",
                    help="safe images (DIR/metadata.json = [{image_filename, concept}] + the images, as the "
                         "reference code writes its ImageNet subset): their alignment answers give the "
                         "false-refusal rate; --split train/test splits them by the reference rule")
    uc.add_argument("--classifier", help="response classifier folder whose labels are the metrics")
    uc.add_argument("--judge-classifier", "--second-classifier", dest="second_classifier",
                    help="a second, independently trained classifier: its agreement is reported")
    uc.add_argument("--no-rules", action="store_true", help="skip the rule-based check")
    uc.add_argument("--hub", action="store_true", help="read yiting/UnsafeConcepts from the Hugging Face Hub "
                                                      "(gated: needs network and --hub-token or HF_TOKEN)")
    uc.add_argument("--hub-token", help="Hub token (default: $HF_TOKEN); never printed")
    uc.add_argument("--perception-metadata", metavar="FILE",
                    help="with --hub: the published perception_metadata.jsonl (github.com/TrustAIRLab/SaferVLM, "
                         "data/UnsafeConcepts/); the hub has no perception options, so without it they are "
                         f"generated (OUT/{HUB_DATA_DIR}/{DOWNLOAD_FILE} says so)")
    uc.set_defaults(func=run)

    rt = benches.add_parser("rtvlm", help="RTVLM subsets judged 1-10 per risk rubric")
    _common(rt)
    rt.add_argument("--judge", required=True, metavar="SPEC", help="openai:MODEL | local:PATH | classifier:DIR")
    rt.add_argument("--judge-option", action="append", default=[], metavar="KEY=VALUE",
                    help="judge constructor option, e.g. max_workers=8, requests_per_minute=100, mode=logits")
    rt.add_argument("--subsets", nargs="+", help="subsets to run (default: the ten scored subtasks)")
    rt.set_defaults(func=run)

    ge = benches.add_parser("general", help="MME-style yes/no, or the concept world's multiple choice + captions")
    _common(ge)
    ge.add_argument("--split", default="heldout_render", help="concept world split (default heldout_render)")
    ge.add_argument("--classifier", help="response classifier for multiple-choice answers (default: rules)")
    ge.set_defaults(func=run)


def _config(args: argparse.Namespace):
    # eval and safety_modules load torch and transformers: imported when the command runs, so that
    # `safevlm --help` does not wait for them (the same in the functions below).
    from eval.pipeline import EvalConfig
    from safety_modules.configio import load_config

    overrides = list(args.overrides)
    for flag, key in (("temperature", "generation.temperature"), ("top_p", "generation.top_p"),
                      ("max_new_tokens", "generation.max_new_tokens"), ("batch_size", "batch_size")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.greedy:
        overrides.append("generation.greedy=true")
    overrides.append(f"generation.seed={args.seed}")
    if args.no_progress:
        overrides.append("progress=false")
    for flag in ("image_preprocess", "conversation"):
        if getattr(args, flag):
            overrides.append(f"{flag}={getattr(args, flag)}")
    return load_config(EvalConfig, args.config, overrides, section="eval" if args.config else None)


def _data(args: argparse.Namespace, out: EvalLayout) -> str:
    """The benchmark folder: --data, or the hub download (--hub) in the output folder."""
    from eval.benchmarks.unsafeconcepts import download_from_hub   # heavy: see _config

    if getattr(args, "hub", False):
        return str(download_from_hub(out.hub_data, args.hub_token or os.environ.get("HF_TOKEN"),
                                     perception_metadata=args.perception_metadata))
    if not args.data:
        raise ValueError("--data DIR is required (or --hub for UnsafeConcepts)")
    return args.data


def _judge(args: argparse.Namespace, out: EvalLayout):
    """The RTVLM judge of --judge, with its --judge-option values and the judgement cache."""
    from eval.core.cache import Cache                    # heavy: see _config
    from eval.judges import build_judge
    from safety_modules.configio import parse_overrides

    options = parse_overrides(args.judge_option, what="--judge-option")
    if not args.no_cache:
        options.setdefault("cache", Cache(Path(args.cache) if args.cache else out.cache, table="judgements"))
    return build_judge(args.judge, **options)


def run(args: argparse.Namespace) -> int:
    import torch                                         # heavy: see _config

    from eval import pipeline
    from eval.core.models import load_runner
    from runtime.distributed import setup, teardown

    cfg = _config(args)
    ctx = setup()
    out = EvalLayout(args.out)
    data = _data(args, out)
    device = args.device or ctx.device()
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    runner = load_runner(args.model, args.adapter, kind=args.runner, device=device, dtype=dtype, seed=args.model_seed,
                         image_preprocess=cfg.image_preprocess, conversation=cfg.conversation,
                         strict_base=args.strict_base)
    cache = False if args.no_cache else args.cache
    common = dict(limit=args.limit, sample=args.sample, seed=args.seed, cfg=cfg, cache=cache, ctx=ctx)
    try:
        if args.benchmark == "unsafeconcepts":
            results = pipeline.run_unsafeconcepts(
                runner, data, out.root, split=args.split, protocol=args.protocol, safe_data=args.safe_data,
                tasks=args.tasks, classifier=args.classifier, second_classifier=args.second_classifier,
                rules=not args.no_rules, **common)
        elif args.benchmark == "rtvlm":
            judge = _judge(args, out) if ctx.is_main else None
            results = pipeline.run_rtvlm(runner, data, out.root, judge, subsets=args.subsets, **common)
        else:
            results = pipeline.run_general(runner, data, out.root, split=args.split, classifier=args.classifier,
                                           **common)
    finally:
        teardown()
    if results is None:
        return 0
    gen = results["generation"]
    print(f"{args.benchmark}: {results['data']['n_items']} items ({gen['generated']} generated, "
          f"{gen['from_cache']} from cache) -> {out.results}, {out.report}")
    if args.benchmark == "rtvlm" and not results["metrics"]["complete"]:
        log.warning("the judge failed on %d answers; they are reported as failed (see %s), not scored",
                    results["metrics"]["n_failed"], out.responses)
        return 3
    return 0
