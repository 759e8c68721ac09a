"""The training record format: reading, validating, and loading into a `datasets.Dataset`.

One record a line (JSONL) or a JSON array, the same for every stage::

    {"id": "s1-000123", "image": "images/12.png",
     "conversations": [{"from": "human", "value": "<image>\\nIs this image safe ...?"},
                       {"from": "gpt", "value": "No, ..."}],
     "safety_level": 2, "risk_type": "violence",
     "label": "Unsafe", "task": "alignment", "rejected": "...", "concept": "Knife attacks"}

The reference code's spelling is read too: `safe_level` (= safety_level), `safe_type` (an index
into the risk types) and speakers `USER` / `ASSISTANT`.

Image root: image paths are relative to the data set's folder and may not leave it. That folder is
`image_root` when given; otherwise, for a records file inside a `records/` folder (the concept
world's `DIR/records/stage1.jsonl`), the folder above it (`DIR`); otherwise the file's own folder.

Why validate everything up front, line by line: the reference code replaced an unreadable image
by zeros and kept its label, and a bad line found deep into a run wastes it. Every problem is an
error naming the file, the line and the field; with `skip_bad_records` the record is logged, skipped
and counted instead -- never dropped silently, never kept with a stand-in image.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import datasets

from safety_modules.images import MAX_IMAGE_PIXELS, ImageError, load_image, resolve_image_path
from safety_modules.labels import IGNORE_INDEX

log = logging.getLogger(__name__)

HUMAN = ("human", "user")
ASSISTANT = ("gpt", "assistant")
IMAGE_MARKER = "<image>"
NO_LABEL = IGNORE_INDEX  # "this record has no such label": the losses skip it
PATH_SHOWN = 80          # characters of an invalid image path quoted in its error

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "image": datasets.Value("string"),          # absolute path, checked to lie inside the image root
    "question": datasets.Value("string"),       # the human turn, image marker removed
    "answer": datasets.Value("string"),         # the assistant turn ("" when there is none)
    "safety_level": datasets.Value("int64"),    # NO_LABEL when absent
    "risk_type": datasets.Value("int64"),       # index into the risk types, NO_LABEL when absent
    "label": datasets.Value("string"),
    "task": datasets.Value("string"),
    "rejected": datasets.Value("string"),
    "concept": datasets.Value("string"),
    "source": datasets.Value("string"),         # "file:line", for messages at training time
})


class RecordError(ValueError):
    """A record is malformed; the message names the file, the line and the field."""


@dataclass
class RecordSet:
    """Validated records of one file, plus what loading them skipped."""

    dataset: datasets.Dataset
    path: Path
    image_root: Path
    total: int          # records read from the file
    skipped: int        # of those, skipped as bad (only with skip_bad_records)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.dataset[index]


def default_image_root(records_file: str | Path) -> Path:
    """`DIR` for `DIR/records/x.jsonl` (the concept world's layout), else the file's folder."""
    parent = Path(records_file).resolve().parent
    return parent.parent if parent.name == "records" else parent


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each record of a JSONL file or a JSON array.

    A line that is not valid JSON is yielded as a RecordError so the caller decides to raise or skip.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FileNotFoundError(f"{path}: cannot read records file ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise RecordError(f"{path}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if text.lstrip().startswith("["):
        yield from _iter_json_array(path, text)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, RecordError(f"{path}:{number}: malformed JSON ({exc.msg} at column {exc.colno})")


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise RecordError(f"{path}: malformed JSON (the array is not closed)")
        if text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            # The rest of an array cannot be re-synchronised: stop here either way.
            raise RecordError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        yield line, value


class _Validator:
    """Turns one raw record into a row of FEATURES, or raises RecordError naming the field."""

    def __init__(self, path: Path, image_root: Path, risk_types: list[str], num_levels: int,
                 require_answer: bool, require_labels: bool, verify_images: bool, max_image_pixels: int):
        self.path = path
        self.image_root = image_root
        self.risk_types = [r.lower() for r in risk_types]
        self.num_levels = num_levels
        self.require_answer = require_answer
        self.require_labels = require_labels
        self.verify_images = verify_images
        self.max_image_pixels = max_image_pixels
        self._checked: dict[Path, str | None] = {}   # image -> error, so shared images decode once

    def error(self, line: int, field: str | None, problem: str) -> RecordError:
        where = f"{self.path}:{line}"
        return RecordError(f"{where}: field {field!r}: {problem}" if field else f"{where}: {problem}")

    def __call__(self, line: int, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.error(line, None, f"expected a JSON object, got {type(raw).__name__}")
        question, answer = self._conversation(line, raw)
        return {
            "id": str(raw.get("id", f"{self.path.name}:{line}")),
            "image": str(self._image(line, raw)),
            "question": question,
            "answer": answer,
            "safety_level": self._level(line, raw),
            "risk_type": self._risk(line, raw),
            "label": self._optional_str(line, raw, "label"),
            "task": self._optional_str(line, raw, "task"),
            "rejected": self._optional_str(line, raw, "rejected"),
            "concept": self._optional_str(line, raw, "concept"),
            "source": f"{self.path}:{line}",
        }

    def _optional_str(self, line: int, raw: dict, key: str) -> str:
        value = raw.get(key, "")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.error(line, key, f"expected a string, got {value!r}")
        return value

    def _image(self, line: int, raw: dict) -> Path:
        rel = raw.get("image")
        if rel is None:
            raise self.error(line, "image", "missing (every record needs an image; text-only questions use "
                                            "a blank image)")
        if not isinstance(rel, str) or not rel:
            raise self.error(line, "image", f"expected a relative path, got {rel!r}")
        if "\x00" in rel:
            raise self.error(line, "image", f"invalid path {rel!r}: it contains a NUL byte")
        try:
            path = resolve_image_path(self.image_root, rel)
            exists = path.is_file()
        except ImageError as exc:
            raise self.error(line, "image", str(exc)) from None
        except (ValueError, OSError) as exc:   # e.g. a name too long for the file system
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            shown = repr(rel) if len(rel) <= PATH_SHOWN else f"{rel[:PATH_SHOWN]!r}... ({len(rel)} characters)"
            raise self.error(line, "image", f"invalid path {shown} ({reason.lower()})") from None
        if path not in self._checked:
            problem = None
            if not exists:
                problem = f"image file not found: {path}"
            elif self.verify_images:
                try:
                    load_image(path, self.max_image_pixels)
                except ImageError as exc:
                    problem = str(exc)
            self._checked[path] = problem
        if self._checked[path]:
            raise self.error(line, "image", self._checked[path])
        return path

    def _conversation(self, line: int, raw: dict) -> tuple[str, str]:
        turns = raw.get("conversations")
        if turns is None:
            raise self.error(line, "conversations", "missing")
        if not isinstance(turns, list) or not turns:
            raise self.error(line, "conversations", "expected a non-empty list of turns")
        if len(turns) > 2:
            raise self.error(line, "conversations", f"{len(turns)} turns: only one question and one answer "
                                                    "per record are supported")
        speakers = []
        for i, turn in enumerate(turns):
            key = f"conversations[{i}]"
            if not isinstance(turn, dict):
                raise self.error(line, key, f"expected an object with 'from' and 'value', got {turn!r}")
            for sub in ("from", "value"):
                if not isinstance(turn.get(sub), str):
                    raise self.error(line, f"{key}.{sub}", "missing or not a string")
            speaker = turn["from"].lower()
            if speaker not in HUMAN + ASSISTANT:
                raise self.error(line, f"{key}.from", f"unknown speaker {turn['from']!r} (expected human/USER "
                                                      "or gpt/ASSISTANT)")
            speakers.append("human" if speaker in HUMAN else "assistant")
        if speakers[0] != "human":
            raise self.error(line, "conversations[0].from", "the first turn must be the human's question")
        if len(turns) == 2 and speakers[1] != "assistant":
            raise self.error(line, "conversations[1].from", "the second turn must be the assistant's answer")
        question = turns[0]["value"]
        if question.count(IMAGE_MARKER) > 1:
            raise self.error(line, "conversations[0].value", "more than one <image> marker (one image per record)")
        question = question.replace(IMAGE_MARKER + "\n", "").replace("\n" + IMAGE_MARKER, "")
        question = question.replace(IMAGE_MARKER, "").strip()
        if not question:
            raise self.error(line, "conversations[0].value", "the question is empty")
        answer = turns[1]["value"].strip() if len(turns) == 2 else ""
        if self.require_answer and not answer:
            raise self.error(line, "conversations", "no assistant answer (this stage trains on answers)")
        return question, answer

    def _int_field(self, line: int, raw: dict, names: tuple[str, str]) -> tuple[str, Any]:
        """The value under either spelling; both present and different is an error."""
        present = [(n, raw[n]) for n in names if raw.get(n) is not None]
        if len(present) == 2 and present[0][1] != present[1][1]:
            raise self.error(line, names[0], f"{names[0]}={present[0][1]!r} contradicts {names[1]}={present[1][1]!r}")
        return present[0] if present else (names[0], None)

    def _level(self, line: int, raw: dict) -> int:
        name, value = self._int_field(line, raw, ("safety_level", "safe_level"))
        if value is None:
            if self.require_labels:
                raise self.error(line, "safety_level", "missing (this stage trains on safety labels)")
            return NO_LABEL
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(line, name, f"expected an integer, got {value!r}")
        if not 0 <= value < self.num_levels:
            raise self.error(line, name, f"label {value} out of range 0..{self.num_levels - 1}")
        return value

    def _risk(self, line: int, raw: dict) -> int:
        if raw.get("risk_type") is not None and raw.get("safe_type") is not None:
            a = self._risk_value(line, "risk_type", raw["risk_type"])
            b = self._risk_value(line, "safe_type", raw["safe_type"])
            if a != b:
                raise self.error(line, "risk_type", f"{raw['risk_type']!r} contradicts safe_type={raw['safe_type']!r}")
            return a
        for name in ("risk_type", "safe_type"):
            if raw.get(name) is not None:
                return self._risk_value(line, name, raw[name])
        if self.require_labels:
            raise self.error(line, "risk_type", "missing (this stage trains on risk-type labels)")
        return NO_LABEL

    def _risk_value(self, line: int, name: str, value: Any) -> int:
        if isinstance(value, str):
            key = value.strip().lower()
            if key not in self.risk_types:
                raise self.error(line, name, f"unknown risk type {value!r} (known: {self.risk_types})")
            return self.risk_types.index(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(line, name, f"expected a risk-type name or index, got {value!r}")
        if not 0 <= value < len(self.risk_types):
            raise self.error(line, name, f"label {value} out of range 0..{len(self.risk_types) - 1} "
                                         f"(risk types {self.risk_types})")
        return value


def load_records(path: str | Path, risk_types: list[str] | tuple[str, ...], num_levels: int, *,
                 image_root: str | Path | None = None, skip_bad_records: bool = False,
                 require_answer: bool = True, require_labels: bool = False, verify_images: bool = True,
                 max_image_pixels: int = MAX_IMAGE_PIXELS, max_records: int = 0) -> RecordSet:
    """Read, validate and load one records file into a `datasets.Dataset` (columns: FEATURES).

    `require_answer`: every record needs an assistant turn (stages that train on answers);
    `require_labels`: every record needs `safety_level` and `risk_type` (stage 1). Raises
    RecordError (file, line, field) on the first bad record unless `skip_bad_records`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: records file not found")
    root = Path(image_root).resolve() if image_root else default_image_root(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{path}: image root {root} is not a folder")
    validate = _Validator(path, root, list(risk_types), num_levels, require_answer, require_labels,
                          verify_images, max_image_pixels)
    rows: list[dict[str, Any]] = []
    total = skipped = 0
    for line, raw in iter_json_records(path):
        total += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            rows.append(validate(line, raw))
        except RecordError as exc:
            if not skip_bad_records:
                raise
            skipped += 1
            log.warning("skipped bad record: %s", exc)
        if max_records and len(rows) >= max_records:
            break
    if skipped:
        log.warning("%s: skipped %d of %d records (skip_bad_records: true)", path, skipped, total)
    if not rows:
        raise RecordError(f"{path}: no usable records ({total} read, {skipped} skipped)")
    dataset = datasets.Dataset.from_list(rows, features=FEATURES)
    return RecordSet(dataset=dataset, path=path, image_root=root, total=total, skipped=skipped)
