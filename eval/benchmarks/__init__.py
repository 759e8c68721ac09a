"""Benchmarks: each module reads its folder into `eval.core.items.EvalItem`s and scores the answers.

    unsafeconcepts.py   the UnsafeConcepts folder, its items and scores
    protocols.py        which images are asked which questions (measurement, the reference RLHF test)
    safe_images.py      the safe-image folder beside UnsafeConcepts and its reference split
    rtvlm.py            the RTVLM subsets, judged 1-10
    general.py          MME-style yes/no, or the concept world's multiple choice and captions
"""
