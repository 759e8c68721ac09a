"""General capability: MME-style yes/no read from JSONL and from the MME release's folders, with
errors naming file and line; a run with the tiny model through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from eval.benchmarks.general import load_general, load_mme_folders, load_mme_jsonl
from eval.core.items import DataError
from safevlm.cli import main


def _img(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (shade, 80, 120)).save(path)


@pytest.fixture
def mme_folders(tmp_path) -> Path:
    """The MME release layouts: <cat>/images + <cat>/questions_answers_YN, and side by side."""
    root = tmp_path / "MME"
    for i in range(2):
        _img(root / "existence" / "images" / f"{i}.png", 40 * i)
        qa = root / "existence" / "questions_answers_YN" / f"{i}.txt"
        qa.parent.mkdir(parents=True, exist_ok=True)
        qa.write_text("Is there a dog in the image? Please answer yes or no.\tYes\n"
                      "Is there a cat in the image? Please answer yes or no.\tNo\n")
    _img(root / "count" / "0.jpg")
    (root / "count" / "0.txt").write_text("Are there two apples?\tyes\nAre there three apples?\tno\n")
    return root


def test_mme_folders_and_jsonl(mme_folders, tmp_path):
    items = load_mme_folders(mme_folders)
    assert len(items) == 6
    assert {it.meta["category"] for it in items} == {"existence", "count"}
    assert [it.meta["target"] for it in items if it.meta["category"] == "count"] == ["yes", "no"]
    assert load_general(mme_folders, limit=3) == items[:3]
    lines = [{"image": "MME/count/0.jpg", "question": "Two apples?", "answer": "Yes", "category": "count"},
             {"image": "MME/count/0.jpg", "question": "Three apples?", "answer": "No", "category": "count"}]
    (tmp_path / "mme.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    jsonl = load_general(tmp_path)
    assert [it.meta["target"] for it in jsonl] == ["yes", "no"] and jsonl[0].meta["image_id"] == "MME/count/0.jpg"
    bad = dict(lines[0], answer="Maybe")
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'answer' must be Yes or No"):
        load_mme_jsonl(tmp_path / "bad.jsonl")
    (mme_folders / "count" / "0.txt").write_text("Are there two apples? yes\n")
    with pytest.raises(DataError, match=r"0\.txt:1: expected 'question<TAB>answer'"):
        load_mme_folders(mme_folders)


def test_cli_general_on_mme_reports_accuracy_plus(mme_folders, tmp_path):
    out = tmp_path / "general"
    argv = ["eval", "general", "--model", "tiny", "--data", str(mme_folders), "--out", str(out), "--greedy",
            "--max-new-tokens", "2", "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    mme = results["metrics"]["mme"]
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert mme["overall"]["n"] == len(records) == 6 and mme["overall"]["n_images"] == 3
    from eval.core.metrics import parse_yes_no
    right = sum(parse_yes_no(r["answer"]) == r["target"] for r in records)
    assert mme["overall"]["accuracy"] == pytest.approx(right / 6)
    assert (out / "mme.png").read_bytes()[:4] == b"\x89PNG"
