"""`safevlm world build --out DIR ...`: render the concept world (the tiny default's data set)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("world", help="the concept world: a procedural stand-in for UnsafeConcepts")
    sub = p.add_subparsers(dest="world_command", required=True)
    b = sub.add_parser("build", help="render the world and write its metadata and training records")
    b.add_argument("--out", required=True, help="output folder (empty, or an earlier world with --overwrite)")
    b.add_argument("--concepts", type=int, default=18, help="unsafe concepts, spread over the 9 categories")
    b.add_argument("--safe-concepts", type=int, default=None, help="safe concepts (default: as many as unsafe)")
    b.add_argument("--images-per-concept", type=int, default=12)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--size", type=int, default=32, help="image side in pixels (the tiny tower's is 32)")
    b.add_argument("--heldout-unsafe", type=int, default=None,
                   help="categories that lose one concept to the held-out-concept split (default: up to 3)")
    b.add_argument("--heldout-safe", type=int, default=None,
                   help="safe concepts held out of safety training (default: up to 3)")
    b.add_argument("--heldout-render-fraction", type=float, default=0.25,
                   help="share of each concept's renders kept as new renders never trained on")
    b.add_argument("--validation-unsafe", type=int, default=0,
                   help="categories that lose one concept to the validation split (fixed, seed-independent)")
    b.add_argument("--validation-safe", type=int, default=0, help="safe concepts in the validation split")
    b.add_argument("--validation-render-fraction", type=float, default=0.0,
                   help="share of each training concept's renders kept for validation (model selection)")
    b.add_argument("--questions-per-image", type=int, default=2, help="safety questions per training image")
    b.add_argument("--perception-per-image", type=int, default=2, help="stage-0 multiple-choice records per image")
    b.add_argument("--metadata", default=None,
                   help="UnsafeConcepts metadata.jsonl for concept names (default: ../shared/... beside the "
                        "repo; a missing file selects built-in names)")
    b.add_argument("--overwrite", action="store_true", help="replace an earlier world in --out")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from concept_world import WorldConfig
    from concept_world.build import build_world, format_summary

    config = WorldConfig(concepts=args.concepts, safe_concepts=args.safe_concepts,
                         images_per_concept=args.images_per_concept, size=args.size,
                         heldout_unsafe=args.heldout_unsafe, heldout_safe=args.heldout_safe,
                         heldout_render_fraction=args.heldout_render_fraction,
                         validation_unsafe=args.validation_unsafe, validation_safe=args.validation_safe,
                         validation_render_fraction=args.validation_render_fraction,
                         questions_per_image=args.questions_per_image,
                         perception_per_image=args.perception_per_image, metadata=args.metadata)
    summary = build_world(args.out, config, args.seed, overwrite=args.overwrite, progress=not args.quiet)
    print(format_summary(summary))
    return 0
