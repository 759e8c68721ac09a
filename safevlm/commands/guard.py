"""`safevlm guard`: a safety verdict per image, with no text generation."""

from __future__ import annotations

import argparse
import json
import logging


def register(subparsers) -> None:
    p = subparsers.add_parser("guard", help="safety verdict per image (no text generation)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--model", default="tiny", help="base model folder, or 'tiny' / 'tiny-next'")
    p.add_argument("--adapter", help="safety adapter folder (without one, untrained modules: a warning)")
    p.add_argument("--prompt", help="question the head reads (default: the protocol's first safety question)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--strict-base", action="store_true",
                   help="refuse an adapter whose base had other weights (default: a warning)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from safety_modules import SafetyConfig, SafetyGuard, attach, load_adapter
    from safety_modules.images import load_image
    from base_models.loading import load_base

    images = [load_image(path) for path in args.images]
    model, processor = load_base(args.model)
    if args.adapter:
        safe_model = load_adapter(model, args.adapter, processor, strict_base=args.strict_base)
    else:
        logging.getLogger(__name__).warning("no --adapter given: the safety modules are untrained, verdicts are "
                                            "meaningless")
        safe_model = attach(model, SafetyConfig(num_safety_tokens=4, num_queries=4), processor)
    verdicts = SafetyGuard(safe_model).verdict(images, args.prompt)
    rows = [{"image": path, **v.to_dict()} for path, v in zip(args.images, verdicts)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"{row['image']}: level {row['level']} ({row['risk_type']}), "
                  f"P(unsafe)={row['unsafe_prob']:.3f}, action={row['action']}")
    return 0
