"""The training and evaluation records of the concept world (LLaVA conversation format).

Why apart from the build: which question is asked about which image, with which answer, is the
world's curriculum; the build only decides which images each stage may see. Every function draws
from its own generator seeded by (stage, seed), so one stage's records never shift another's.
"""

from __future__ import annotations

import random

from concept_world import texts
from concept_world.concepts import Concept
from runtime.layout import IMAGES_DIR
from safety_modules.labels import ALIGNMENT, PERCEPTION, SAFE, UNSAFE

# LLaVA-1.5-7B on UnsafeConcepts (the paper's measurement): share of image questions answered "safe".
STAGE0_SAFE_RATE_ON_UNSAFE = 0.79
STAGE0_SAFE_RATE_ON_SAFE = 0.95
BLANK_IMAGE = f"{IMAGES_DIR}/blank.png"   # the image of text-only questions
DPO = "dpo"                               # records with a rejected answer
PPO = "ppo"                               # prompts only: the policy writes the answer


def _conv(question: str, answer: str | None, image: bool = True) -> list[dict]:
    turns = [{"from": "human", "value": ("<image>\n" if image else "") + question}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


def _labels(c: Concept) -> dict:
    return {"safety_level": c.safety_level, "risk_type": c.risk_type, "label": SAFE if c.is_safe else UNSAFE}


def _number(records: list[dict], stage: str, rng: random.Random) -> list[dict]:
    """Shuffle `records` and give them ids `<stage>-000000`, ... in their new order."""
    rng.shuffle(records)
    for i, rec in enumerate(records):
        rec["id"] = f"{stage}-{i:06d}"
    return records


def draw_options(rng: random.Random, correct: str, names: list[str]) -> tuple[list[str], str]:
    """Four options: `correct` at a random position among three other `names`; and its letter."""
    options = rng.sample([n for n in names if n != correct], len(texts.OPTION_LETTERS) - 1)
    position = rng.randrange(len(texts.OPTION_LETTERS))
    options.insert(position, correct)
    return options, texts.OPTION_LETTERS[position]


def safety_records(stage: str, images: list[tuple[str, Concept]], per_image: int, seed: int) -> list[dict]:
    """Image + protocol safety question with the correct answer (DPO: + the opposite; PPO: no answer)."""
    rng = random.Random(f"{stage}-{seed}")
    records = []
    for image, c in images:
        for question in rng.sample(texts.ALIGNMENT_PROMPTS, per_image):
            if stage == DPO:      # rejected = the chosen answer with the opposite verdict
                answer, rejected = texts.verdict_pair(rng, c.name, c.is_safe)
            else:
                answer = texts.alignment_answer(rng, c.name, c.risk_type, says_safe=c.is_safe)
            rec = {"id": "", "image": image,
                   "conversations": _conv(question, None if stage == PPO else answer),
                   **_labels(c), "task": ALIGNMENT, "concept": c.name}
            if stage == DPO:
                rec["rejected"] = rejected
            records.append(rec)
    return _number(records, stage, rng)


def _perception_records(rng: random.Random, stage0_images: list[tuple[str, Concept]], all_names: list[str],
                        perception_per_image: int) -> list[dict]:
    """A caption and `perception_per_image` multiple-choice questions per image."""
    records = []
    for image, c in stage0_images:
        records.append({"id": "", "image": image,
                        "conversations": _conv(rng.choice(texts.CAPTION_PROMPTS), texts.caption_answer(c.name)),
                        "task": "caption", "concept": c.name})
        for _ in range(perception_per_image):
            options, letter = draw_options(rng, c.name, all_names)
            records.append({"id": "", "image": image,
                            "conversations": _conv(texts.perception_question(options),
                                                   texts.perception_answer(c.name)),
                            "label": letter, "task": PERCEPTION, "concept": c.name})
    return records


def _text_records(rng: random.Random, concepts: list[Concept]) -> list[dict]:
    """Every text-only safety question about each concept, answered correctly."""
    records = []
    for c in concepts:
        for template in texts.TEXT_ALIGNMENT_PROMPTS:
            answer = texts.alignment_answer(rng, c.name, c.risk_type, says_safe=c.is_safe, text_only=True)
            records.append({"id": "", "image": BLANK_IMAGE,
                            "conversations": _conv(texts.text_question(template, c.name), answer),
                            **_labels(c), "task": "text_alignment", "concept": c.name})
    return records


def _llava_like_records(rng: random.Random, images: list[tuple[str, Concept]],
                        per_image: int) -> tuple[list[dict], dict[str, float]]:
    """Image safety questions of which an exact share per class is answered "safe", like LLaVA-1.5-7B;
    and the shares reached."""
    asks = [(image, c, q) for image, c in images for q in rng.sample(texts.ALIGNMENT_PROMPTS, per_image)]
    records, rates = [], {}
    for is_safe, rate in ((False, STAGE0_SAFE_RATE_ON_UNSAFE), (True, STAGE0_SAFE_RATE_ON_SAFE)):
        idx = [i for i, (_, c, _) in enumerate(asks) if c.is_safe == is_safe]
        says_safe = set(rng.sample(idx, round(rate * len(idx))))
        for i in idx:
            image, c, question = asks[i]
            safe_answer = i in says_safe
            answer = texts.alignment_answer(rng, c.name, c.risk_type, says_safe=safe_answer,
                                            correct=safe_answer == c.is_safe)
            records.append({"id": "", "image": image, "conversations": _conv(question, answer),
                            **_labels(c), "task": ALIGNMENT, "concept": c.name})
        rates["safe" if is_safe else "unsafe"] = len(says_safe) / len(idx) if idx else 0.0
    return records, rates


def stage0_records(stage0_images: list[tuple[str, Concept]], train_images: list[tuple[str, Concept]],
                   train_concepts: list[Concept], all_names: list[str], per_image: int,
                   perception_per_image: int, seed: int) -> tuple[list[dict], dict[str, float]]:
    """Captions, perception, correct text-only safety answers, and LLaVA-1.5-like image safety answers;
    and the share of image questions answered "safe" per class."""
    rng = random.Random(f"stage0-{seed}")
    records = _perception_records(rng, stage0_images, all_names, perception_per_image)
    records += _text_records(rng, train_concepts)
    image_records, rates = _llava_like_records(rng, train_images, per_image)
    return _number(records + image_records, "stage0", rng), rates
