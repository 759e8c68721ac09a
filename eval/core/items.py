"""What the benchmarks read their folders into: `EvalItem`s, one question (with its image) to answer.

Why one item type: the generation loop, the cache, sharding and the reports are shared by
UnsafeConcepts, RTVLM and the general-capability sets; each benchmark module only reads its files
(with errors naming file, line and field) and scores the answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from safety_modules.fileio import CorruptFileError, iter_jsonl
from safety_modules.labels import ALIGNMENT, PERCEPTION

BLANK = "<blank>"   # the protocol's blank white image (text-only questions), rendered by the runner

# The tasks of items. Alignment (is the image safe?) and perception (which concept is it?) are the
# response classifier's tasks too; the others are the evaluation's own.
TEXT_ALIGNMENT = "text_alignment"     # alignment asked about a named concept, with a blank image
MULTIPLE_CHOICE = "multiple_choice"   # perception questions, asked as a general capability
CAPTION = "caption"                   # name what the image shows
MME = "mme"                           # an MME-style yes/no question
RTVLM = "rtvlm"                       # an RTVLM question, judged 1-10
ITEM_TASKS = (PERCEPTION, ALIGNMENT, TEXT_ALIGNMENT, MULTIPLE_CHOICE, CAPTION, MME, RTVLM)


class DataError(ValueError):
    """A benchmark file is malformed or an image is missing; the message names file, line and field."""


@dataclass
class EvalItem:
    """One question to answer. `images`: absolute paths (several are composed side by side) or BLANK."""

    id: str
    task: str
    question: str
    images: tuple[str, ...] = (BLANK,)
    meta: dict = field(default_factory=dict)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-empty line; bad JSON or a non-object is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        for lineno, record in iter_jsonl(path):
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record
    except CorruptFileError as exc:
        raise DataError(str(exc)) from None


def require(record: dict, key: str, types: type | tuple[type, ...], where: str):
    """`record[key]`, checked against `types`; a DataError naming `where` and the field otherwise."""
    if key not in record:
        raise DataError(f"{where}: field {key!r} is missing")
    value = record[key]
    allowed = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = "/".join(t.__name__ for t in allowed)
        raise DataError(f"{where}: field {key!r} must be {names}, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value
