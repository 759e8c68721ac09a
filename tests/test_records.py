"""Training records: both spellings load, every kind of bad data is an error naming file, line and
field, `skip_bad_records` logs and counts, and no image path may leave the data folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safety_modules.config import DEFAULT_RISK_TYPES
from training.records import NO_LABEL, RecordError, default_image_root, load_records

RISKS = list(DEFAULT_RISK_TYPES)     # none, violence, hate, sexual, self-harm, illegal activity, deception


def good(i: int = 0, **extra) -> dict:
    return {"id": f"r{i}", "image": f"images/{i}.png",
            "conversations": [{"from": "human", "value": "<image>\nIs this image safe?"},
                              {"from": "gpt", "value": "No, it shows violence."}],
            "safety_level": 2, "risk_type": "violence", **extra}


def make_world(root: Path, n: int = 3) -> Path:
    """root/images/{i}.png and root/records/, the concept world's layout."""
    (root / "images").mkdir(parents=True)
    (root / "records").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    return root / "records"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path: Path, **kw):
    return load_records(path, RISKS, 4, **kw)


def test_world_spelling_loads_into_a_dataset(tmp_path):
    records = make_world(tmp_path)
    path = write_jsonl(records / "s1.jsonl", [good(0, label="Unsafe", task="alignment", concept="Knife attacks"),
                                              good(1, rejected="Yes, it is safe.")])
    rs = load(path)
    assert len(rs) == 2 and rs.total == 2 and rs.skipped == 0
    assert rs.image_root == tmp_path.resolve()          # the folder above records/
    row = rs[0]
    assert row["question"] == "Is this image safe?"       # the <image> marker is removed
    assert row["answer"] == "No, it shows violence."
    assert (row["safety_level"], row["risk_type"]) == (2, RISKS.index("violence"))
    assert (row["label"], row["task"], row["concept"]) == ("Unsafe", "alignment", "Knife attacks")
    assert rs[1]["rejected"] == "Yes, it is safe."
    assert Path(row["image"]) == (tmp_path / "images" / "0.png").resolve()
    assert row["source"] == f"{path}:1"


def test_reference_spelling_loads(tmp_path):
    records = make_world(tmp_path)
    ref = {"id": 7, "image": "images/1.png", "safe_level": 3, "safe_type": 2,
           "conversations": [{"from": "USER", "value": "Is it harmful?\n<image>"},
                             {"from": "ASSISTANT", "value": "Yes."}]}
    row = load(write_jsonl(records / "ref.jsonl", [ref]))[0]
    assert (row["id"], row["question"], row["answer"]) == ("7", "Is it harmful?", "Yes.")
    assert (row["safety_level"], row["risk_type"]) == (3, 2)


def test_json_array_file_and_line_numbers(tmp_path):
    records = make_world(tmp_path)
    bad = good(1)
    bad["risk_type"] = "piracy"
    text = "[\n" + json.dumps(good(0), indent=2) + ",\n" + json.dumps(bad, indent=2) + "\n]\n"
    path = records / "s1.json"
    path.write_text(text)
    start_of_second = text[:text.index('"id": "r1"')].count("\n")   # the line of the second object's "{"
    with pytest.raises(RecordError) as err:
        load(path)
    assert f"{path}:{start_of_second}: field 'risk_type'" in str(err.value)
    assert "unknown risk type 'piracy'" in str(err.value)


def test_unlabelled_records_allowed_unless_required(tmp_path):
    records = make_world(tmp_path)
    plain = good(0)
    del plain["safety_level"], plain["risk_type"]
    path = write_jsonl(records / "s0.jsonl", [plain])
    row = load(path)[0]
    assert (row["safety_level"], row["risk_type"]) == (NO_LABEL, NO_LABEL)
    with pytest.raises(RecordError, match=r"s0.jsonl:1: field 'safety_level': missing"):
        load(path, require_labels=True)


def _with(record: dict, **changes) -> dict:
    out = json.loads(json.dumps(record))
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


BAD_CASES = [
    ("malformed json", '{"id": "x", "image": ', None, "malformed JSON"),
    ("not an object", "[1, 2]", None, "expected a JSON object"),
    ("missing image", _with(good(), image=None), "image", "missing"),
    ("missing conversations", _with(good(), conversations=None), "conversations", "missing"),
    ("image file absent", _with(good(), image="images/99.png"), "image", "not found"),
    ("unknown risk type", _with(good(), risk_type="piracy"), "risk_type", "unknown risk type"),
    ("risk index out of range", _with(good(), risk_type=None, safe_type=9), "safe_type", "out of range"),
    ("level out of range", _with(good(), safety_level=4), "safety_level", "out of range 0..3"),
    ("negative level", _with(good(), safe_level=-1, safety_level=None), "safe_level", "out of range"),
    ("level not an int", _with(good(), safety_level="2"), "safety_level", "expected an integer"),
    ("spellings disagree", _with(good(), safe_level=1), "safety_level", "contradicts"),
    ("unknown speaker", _with(good(), conversations=[{"from": "bot", "value": "hi"}]), "conversations[0].from",
     "unknown speaker"),
    ("answer first", _with(good(), conversations=[{"from": "gpt", "value": "hi"}]), "conversations[0].from",
     "first turn"),
    ("no answer", _with(good(), conversations=[{"from": "human", "value": "<image>\nsafe?"}]), "conversations",
     "no assistant answer"),
    ("two image markers", _with(good(), conversations=[{"from": "human", "value": "<image> <image> q"},
                                                        {"from": "gpt", "value": "a"}]),
     "conversations[0].value", "more than one <image>"),
]


@pytest.mark.parametrize("name,line,field,problem", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_names_file_line_and_field(tmp_path, name, line, field, problem):
    records = make_world(tmp_path)
    path = write_jsonl(records / "bad.jsonl", [good(0), line])    # the bad record is on line 2
    with pytest.raises(RecordError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ")
    if field:
        assert f"field {field!r}" in message
    assert problem in message


def test_undecodable_and_oversized_images(tmp_path):
    records = make_world(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (300, 300)).save(tmp_path / "images" / "huge.png")
    broken = write_jsonl(records / "a.jsonl", [_with(good(), image="images/broken.png")])
    with pytest.raises(RecordError, match=r"a.jsonl:1: field 'image': .*broken.png: cannot decode image"):
        load(broken)
    huge = write_jsonl(records / "b.jsonl", [good(0), _with(good(), image="images/huge.png")])
    with pytest.raises(RecordError, match=r"b.jsonl:2: field 'image': .*300x300, over the limit"):
        load(huge, max_image_pixels=100 * 100)


@pytest.mark.parametrize("escape", ["../outside.png", "images/../../outside.png", "/etc/passwd"])
def test_image_path_escaping_the_data_folder_is_refused(tmp_path, escape):
    data = tmp_path / "data"
    records = make_world(data)
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")      # exists, but outside the data folder
    path = write_jsonl(records / "esc.jsonl", [_with(good(), image=escape)])
    with pytest.raises(RecordError, match=r"esc.jsonl:1: field 'image': .*escapes the data folder"):
        load(path)


def test_skip_bad_records_logs_each_and_counts(tmp_path, caplog):
    records = make_world(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"garbage")
    rows = [good(0), "{oops", _with(good(1), image="images/broken.png"), good(2),
            _with(good(1), risk_type="piracy")]
    path = write_jsonl(records / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="training.records"):
        rs = load(path, skip_bad_records=True)
    assert (len(rs), rs.total, rs.skipped) == (2, 5, 3)
    assert [r["id"] for r in rs.dataset] == ["r0", "r2"]
    # never a stand-in image with the label kept: the broken image's record is gone, not zero-filled
    assert all(Path(r["image"]).name != "broken.png" for r in rs.dataset)
    skips = [r.getMessage() for r in caplog.records if "skipped bad record" in r.getMessage()]
    assert len(skips) == 3 and any("mixed.jsonl:3: field 'image'" in s for s in skips)
    assert any("skipped 3 of 5 records" in r.getMessage() for r in caplog.records)


def test_every_record_bad_is_an_error_even_when_skipping(tmp_path):
    records = make_world(tmp_path)
    path = write_jsonl(records / "allbad.jsonl", ["{", "{"])
    with pytest.raises(RecordError, match="no usable records"):
        load(path, skip_bad_records=True)


def test_image_root_default_and_explicit(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    assert default_image_root(flat / "x.jsonl") == flat.resolve()
    assert default_image_root(tmp_path / "w" / "records" / "x.jsonl") == (tmp_path / "w").resolve()
    path = write_jsonl(flat / "x.jsonl", [_with(good(), image="a.png")])
    assert Path(load(path)[0]["image"]) == (flat / "a.png").resolve()
    # an explicit image_root wins, and confines paths to itself
    other = tmp_path / "other"
    (other / "pics").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(other / "pics" / "b.png")
    path2 = write_jsonl(flat / "y.jsonl", [_with(good(), image="pics/b.png")])
    assert Path(load(path2, image_root=other)[0]["image"]) == (other / "pics" / "b.png").resolve()
    with pytest.raises(RecordError, match="not found"):
        load(path2)


def test_max_records_and_missing_file(tmp_path):
    records = make_world(tmp_path)
    path = write_jsonl(records / "m.jsonl", [good(0), good(1), good(2)])
    assert len(load(path, max_records=2)) == 2
    with pytest.raises(FileNotFoundError, match="records file not found"):
        load(records / "absent.jsonl")
