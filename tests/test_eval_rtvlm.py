"""RTVLM: every real record file of ../shared/data/rtvlm read with placeholder images, in the
local layout and the published one; the later 200-item revision; malformed records and missing
images named by file, line and field; an end-to-end run with the tiny model judged over real HTTP,
a failing judgement reported as failed."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from eval.benchmarks.rtvlm import DEFAULT_SUBSETS, SUBSETS, load_rtvlm, load_subset
from eval.core.items import DataError
from eval.core.metrics import RTVLM_SUBTASKS
from safevlm.cli import main

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtvlm"
EXPECTED = {  # questions per subset (README table: misleading has 100 records, 187 questions)
    "text_misleading": 187, "visual_misleading": 405, "visual_misleading_correct": 432, "order_a": 402,
    "order_b": 402, "celebrity": 1000, "face": 2040, "politics": 93, "racial": 37, "captcha": 200, "jailbreak": 22,
}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def _with_ext(value) -> str:
    name = str(value)
    return name if name.endswith(".jpg") else f"{name}.jpg"


def needed_images(file: str, records: list[dict]) -> list[str]:
    """Image paths (relative to the local root) of a file, by the README's rules, written independently."""
    stem = Path(file).stem
    out = []
    for rec in records:
        if file == "misleading.jsonl":
            out.append(f"images/{stem}/{rec['index']}.jpg")
        elif "img" in rec:
            countries = rec["img"] if isinstance(rec["img"], list) else [rec["img"]]
            out += [f"images/flags/{c.replace(' ', '')}.jpg" for c in countries]
        elif file == "jailbreak.jsonl":
            out.append(f"images/{stem}/{rec['index']}.jpg")
        else:
            out.append(f"images/{stem}/{_with_ext(rec['id'])}")
    return out


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def local_root(tmp_path_factory):
    if not SHARED.is_dir():
        pytest.skip(reason=f"the RTVLM record files are not beside the repository ({SHARED})")
    root = tmp_path_factory.mktemp("rtvlm_local")
    png = _png()
    for subset in SUBSETS.values():
        src = SHARED / subset.file
        shutil.copy(src, root / subset.file)
        for rel in needed_images(subset.file, _records(src)):
            path = root / rel
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(png)
    return root


def test_every_real_file_is_read_with_its_images(local_root):
    by_subset: dict[str, list] = {}
    for it in load_rtvlm(local_root, list(EXPECTED)):
        by_subset.setdefault(it.meta["subset"], []).append(it)
    assert {k: len(v) for k, v in by_subset.items()} == EXPECTED
    for name, items in by_subset.items():
        for it in items:
            assert all(Path(p).is_file() and str(p).startswith(str(local_root)) for p in it.images)
            assert it.question.strip() and it.meta["risk"] == SUBSETS[name].risk
    order = by_subset["order_a"][0]
    assert [Path(p).name for p in order.images] == ["France.jpg", "UnitedKingdom.jpg"]
    assert Path(order.images[0]).parent.name == "flags"
    celeb = by_subset["celebrity"][0]
    assert celeb.meta["refused_to_answer"] == "Answer with Caution"     # the "Refuse to Answer" (sic) field
    face = by_subset["face"][0]
    assert Path(face.images[0]).name == "0.jpg"                          # id already ends in .jpg
    jb = [it for it in by_subset["jailbreak"] if "Moralizing" in it.images[0]]
    assert Path(jb[0].images[0]).name == "Moralizing Rant.jpg"           # a name with spaces
    captcha = by_subset["captcha"][0]
    assert captcha.meta["reference"] == "811615" and captcha.meta["risk"] == "illegal risk"
    assert sorted(DEFAULT_SUBSETS) == sorted(RTVLM_SUBTASKS) == sorted(set(EXPECTED) - {"visual_misleading_correct"})


def test_published_folder_layout_gives_the_same_items(local_root, tmp_path):
    pub = tmp_path / "RedTeamingVLM" / "data"
    names = ("text_misleading", "order_b", "celebrity", "jailbreak", "captcha")
    for name in names:
        subset = SUBSETS[name]
        folder = pub / subset.folders[0]
        (folder / "img").mkdir(parents=True)
        shutil.copy(local_root / subset.file, folder / subset.file)
        src_dir = local_root / "images" / ("flags" if subset.flags else subset.stem)
        for image in src_dir.iterdir():
            os.link(image, folder / "img" / image.name)
    for name in names:
        local = load_subset(local_root, name)
        published = load_subset(tmp_path / "RedTeamingVLM", name)
        assert [it.question for it in published] == [it.question for it in local]
        assert [[Path(p).name for p in it.images] for it in published] == \
               [[Path(p).name for p in it.images] for it in local]
        assert all("/img/" in p for it in published for p in it.images)


def test_later_revision_with_200_items_is_read(local_root, tmp_path):
    root = tmp_path / "rev"
    root.mkdir()
    png = _png()
    for name in ("politics", "racial", "jailbreak"):
        subset = SUBSETS[name]
        base = _records(local_root / subset.file)
        records = []
        for i in range(200):
            rec = dict(base[i % len(base)])
            if name == "jailbreak":
                rec["index"] = f"{rec['index']} {i}"
            else:
                rec["id"] = f"{i}.jpg"
            records.append(rec)
        (root / subset.file).write_text("".join(json.dumps(r) + "\n" for r in records))
        for rel in needed_images(subset.file, records):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(png)
        assert len(load_subset(root, name)) == 200


def _write(root: Path, file: str, lines: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / file).write_text("\n".join(lines) + "\n")


def test_malformed_records_and_missing_images_are_named(tmp_path):
    root = tmp_path / "bad"
    _write(root, "politics.jsonl", ['{"prompt": "What story?", "id": "0.jpg"}', '{"id": "1.jpg"}'])
    (root / "images" / "politics").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "images" / "politics" / "0.jpg", format="PNG")
    with pytest.raises(DataError, match=r"politics\.jsonl:2: field 'prompt' is missing"):
        load_subset(root, "politics")
    _write(root, "politics.jsonl", ['{"prompt": "What story?", "id": "0.jpg"}', '{"prompt": "And?", "id": "7.jpg"}'])
    with pytest.raises(DataError, match=r"politics\.jsonl:2: field 'id': image '7\.jpg' not found"):
        load_subset(root, "politics")
    _write(root, "politics.jsonl", ['{"prompt": "x", "id": "0.jpg"}', "{not json"])
    with pytest.raises(DataError, match=r"politics\.jsonl:2: not valid JSON"):
        load_subset(root, "politics")
    _write(root, "visual_order_a.jsonl", ['{"question": "Q?", "img": ["France"]}'])
    with pytest.raises(DataError, match=r"visual_order_a\.jsonl:1: field 'img' must be a list of two"):
        load_subset(root, "order_a")
    _write(root, "misleading.jsonl", ['{"questions": ["a?", "b?"], "refused_to_answer": ["x"], "index": 0}'])
    with pytest.raises(DataError, match=r"misleading\.jsonl:1: field 'refused_to_answer' must be a list as long"):
        load_subset(root, "text_misleading")
    _write(root, "captcha.jsonl", ['{"id": "../../etc/passwd", "instruction": "Read it."}'])
    with pytest.raises(DataError, match=r"captcha\.jsonl:1: field 'id': .*escapes the data folder"):
        load_subset(root, "captcha")
    with pytest.raises(DataError, match="subset 'face': face.jsonl not found"):
        load_subset(root, "face")
    with pytest.raises(ValueError, match="unknown RTVLM subset 'weather'"):
        load_subset(root, "weather")


# ----------------------------------------------------------------------------------------------
class _JudgeHandler(BaseHTTPRequestHandler):
    """Scores 6, except HTTP 400 for questions about captchas (a judge that fails on one subset)."""

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][1]["content"]
        text = user if isinstance(user, str) else user[0]["text"]
        self.server.requests += 1
        if "captcha" in text.lower():
            code, data = 400, b'{"error": "content policy"}'
        else:
            code, data = 200, json.dumps({"choices": [{"message": {"content": "Fine. Score: 6"}}]}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_end_to_end_with_the_tiny_model_and_an_http_judge(local_root, tmp_path, monkeypatch):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _JudgeHandler)
    srv.requests = 0
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-e2e")
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/v1")
    out = tmp_path / "rt"
    argv = ["eval", "rtvlm", "--model", "tiny", "--data", str(local_root), "--judge", "openai:judge-model",
            "--out", str(out), "--limit", "1", "--greedy", "--max-new-tokens", "3", "--batch-size", "16",
            "--judge-option", "backoff=0.01", "--judge-option", "max_retries=1", "--no-progress"]
    try:
        assert main(argv) == 3            # one subset's judgements failed: reported, exit code 3
        results = json.loads((out / "results.json").read_text())
        m = results["metrics"]
        assert m["per_subtask"]["captcha"]["n_failed"] == 1 and m["per_subtask"]["captcha"]["score"] is None
        assert m["overall"] is None and m["missing_subtasks"] == ["captcha"] and not m["complete"]
        assert m["per_subtask"]["politics"]["score"] == 6.0
        assert m["overall_available"] == pytest.approx(6.0)
        records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
        assert len(records) == 10 and sum(r["judge_error"] is not None for r in records) == 1
        assert (out / "rtvlm_subtasks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "sk-test-e2e" not in (out / "cache.sqlite").read_bytes().decode("latin-1")
        sent = srv.requests
        assert main(argv) == 3            # rerun: answers and successful judgements from the caches
        again = json.loads((out / "results.json").read_text())
        assert again["generation"]["generated"] == 0 and again["generation"]["from_cache"] == 10
        assert srv.requests == sent + 1   # only the failed judgement is asked again (400: not retried)
    finally:
        srv.shutdown()
        srv.server_close()
