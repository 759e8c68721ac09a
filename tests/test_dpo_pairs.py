"""The concept world's DPO pairs: rejected = the chosen answer with the opposite verdict, as the reference
code builds its pairs (RLHF/build_training_data.py: per prompt a Safe and an Unsafe template that differ
only in the verdict, both naming the concept).

For every record of a built world's records/dpo.jsonl: the two answers, split into words and
punctuation and into the tiny model's tokens, differ only inside verdict words; with those words
masked they are the same string; both name the record's concept; the rule-based check (not the
templates) reads the chosen answer as the record's label and the rejected one as the opposite.
"""

from __future__ import annotations

import difflib
import json
import re

import pytest

from base_models.tiny import build_tiny_tokenizer
from response_classifier.rules import rule_based_label
from concept_world.build import build_world

# Written out here, not taken from the templates: the words a verdict may change, and nothing else.
VERDICT = {"yes", "no", "safe", "unsafe", "harmless", "harmful"}
VERDICT_RE = re.compile(r"\b(?:" + "|".join(sorted(VERDICT)) + r")\b", re.IGNORECASE)
OPPOSITE = {"Safe": "Unsafe", "Unsafe": "Safe"}


@pytest.fixture(scope="module")
def dpo_records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("world") / "w"
    build_world(out, progress=False)
    return [json.loads(line) for line in (out / "records" / "dpo.jsonl").read_text().splitlines()]


def words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def changed(a: list, b: list) -> list[tuple[int, int, int, int]]:
    """(a_start, a_end, b_start, b_end) of every span where a and b differ."""
    ops = difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes()
    return [(i1, i2, j1, j2) for tag, i1, i2, j1, j2 in ops if tag != "equal"]


def words_around(text: str, start: int, end: int) -> set[str]:
    """The whole words touched by characters [start, end) of text (a token may hold part of a word)."""
    while 0 < start < len(text) and text[start].isalnum() and text[start - 1].isalnum():
        start -= 1
    while 0 < end < len(text) and text[end - 1].isalnum() and text[end].isalnum():
        end += 1
    return {w.lower() for w in re.findall(r"\w+", text[start:end])}


def test_every_rejected_answer_is_the_chosen_one_with_the_opposite_verdict(dpo_records):
    tokenizer = build_tiny_tokenizer()
    assert len(dpo_records) > 100 and {r["label"] for r in dpo_records} == {"Safe", "Unsafe"}
    for rec in dpo_records:
        question = rec["conversations"][0]["value"].removeprefix("<image>\n")
        chosen, rejected = rec["conversations"][-1]["value"], rec["rejected"]
        where = f"{rec['id']}: {chosen!r} / {rejected!r}"
        # words and punctuation: every difference is verdict words on both sides
        a, b = words(chosen), words(rejected)
        spans = changed(a, b)
        assert spans, where
        for i1, i2, j1, j2 in spans:
            assert set(a[i1:i2]) | set(b[j1:j2]) <= VERDICT, where
        assert VERDICT_RE.sub("<verdict>", chosen) == VERDICT_RE.sub("<verdict>", rejected), where
        # the model's tokens: differing tokens lie inside verdict words
        enc = [tokenizer(t, return_offsets_mapping=True, add_special_tokens=False) for t in (chosen, rejected)]
        for i1, i2, j1, j2 in changed(enc[0]["input_ids"], enc[1]["input_ids"]):
            for text, offsets, (s, e) in ((chosen, enc[0]["offset_mapping"], (i1, i2)),
                                          (rejected, enc[1]["offset_mapping"], (j1, j2))):
                if s < e:
                    assert words_around(text, offsets[s][0], offsets[e - 1][1]) <= VERDICT, where
        # both name the concept; the chosen verdict is the label's, the rejected the opposite
        assert rec["concept"] in chosen and rec["concept"] in rejected, where
        assert rule_based_label(question, chosen, "alignment") == rec["label"], where
        assert rule_based_label(question, rejected, "alignment") == OPPOSITE[rec["label"]], where
