"""Generated malformed records and configs: every run succeeds, or exits 2 with one line naming the
file, and leaves no partial output behind.

Bounded and seeded: a few dozen record files and configs run in-process (records through the
loader, configs through the CLI's `train stage1`), and two records files through the installed
command in a subprocess, as a user would run it.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from red_blue import write_red_blue_world
from safevlm.cli import error_line
from safevlm.cli import main as cli_main
from training.records import load_records

SEED = 1234
RECORD_CASES = 48
CONFIG_CASES = 16
RISKS = ["none", "violence", "hate"]
ODD_VALUES = [None, 3.5, -1, 99, "", "x", [], {}, True, "\x00", "../../../etc/passwd", "images/0.png\x00",
              "a" * 3000, "é\udcff"[:1], {"from": "human"}, [1, 2], float("nan")]
FIELDS = ["id", "image", "conversations", "safety_level", "safe_level", "risk_type", "safe_type", "label", "task"]


def valid_record(i: int, unsafe: bool) -> dict:
    return {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\nIs it safe?"},
                                             {"from": "gpt", "value": "No." if unsafe else "Yes."}],
            "safety_level": 2 if unsafe else 0, "risk_type": "violence" if unsafe else "none"}


def mutated_line(rng: random.Random, record: dict) -> bytes:
    """One record made wrong in a random way: a field dropped or replaced, a turn broken, or the
    line's bytes damaged."""
    record = json.loads(json.dumps(record))
    kind = rng.choice(["drop", "replace", "replace", "turn", "bytes"])
    if kind == "drop":
        record.pop(rng.choice(["image", "conversations", "safety_level", "risk_type"]), None)
    elif kind == "replace":
        record[rng.choice(FIELDS)] = rng.choice(ODD_VALUES)
    elif kind == "turn":
        turns = record["conversations"]
        choice = rng.randrange(4)
        if choice == 0:
            turns[rng.randrange(2)]["from"] = rng.choice(["USER", "system", "", 7])
        elif choice == 1:
            turns[rng.randrange(2)]["value"] = rng.choice(ODD_VALUES)
        elif choice == 2:
            turns.append(dict(turns[0]))
        else:
            turns[0]["value"] = "<image> <image> twice"
    text = json.dumps(record, ensure_ascii=rng.random() < 0.5, allow_nan=True)
    data = text.encode("utf-8", "surrogatepass")
    if kind == "bytes":
        cut = rng.randrange(1, len(data))
        data = rng.choice([data[:cut], data[:cut] + b"\xff\xfe" + data[cut:], b"[" + data, b"42", b"\x00" + data])
    return data


def records_file(root: Path, rng: random.Random) -> Path:
    path = write_red_blue_world(root, valid_record, n=4)
    lines = path.read_bytes().splitlines()
    lines.insert(rng.randrange(len(lines) + 1), mutated_line(rng, json.loads(lines[0])))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_generated_records_load_or_fail_with_one_line_naming_the_file(tmp_path):
    rng = random.Random(SEED)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(RECORD_CASES):
        path = records_file(tmp_path / f"case{case}", rng)
        try:
            records = load_records(path, RISKS, 4, require_labels=True)
        except (ValueError, OSError) as exc:
            line = error_line(exc)
            assert "\n" not in line and line.startswith(str(path)), (case, line)
            outcomes["refused"] += 1
        else:
            assert len(records) in (4, 5), case
            outcomes["loaded"] += 1
    assert outcomes["refused"] >= RECORD_CASES // 2, outcomes


CONFIG_MUTATIONS = [
    lambda c: c + "seed: 3\nseed: 4\n",                                   # duplicate key
    lambda c: c + "stage1: {trian: {lr: 1}}\n",                           # unknown key (and a duplicate section)
    lambda c: c.replace("max_steps: 1", "max_steps: one"),
    lambda c: c.replace("max_steps: 1", "max_steps: -5"),
    lambda c: c.replace("max_steps: 1", "max_steps: [1]"),
    lambda c: c.replace("lr: 0.001", "lr: .nan"),
    lambda c: c.replace("lr: 0.001", "lr: -1"),
    lambda c: c.replace("train: {", "train: {{"),                          # not YAML
    lambda c: "- a\n- b\n",                                                # top level not a mapping
    lambda c: c.replace("num_queries: 4", "num_queries: 5"),               # not a square
    lambda c: c.replace("path: tiny", "path: /nonexistent/model"),
    lambda c: c.replace("path: tiny", "path: \"tiny\\0\""),
    lambda c: c + "safety: {risk_types: [a, a]}\n",
    lambda c: c.replace("deepspeed: ", "deepspeed: /nonexistent/"),
    lambda c: "\t" + c,
    lambda c: c.replace("stage1:", "stage1: 7\nstage1_unused:"),
]


def config_text(run_dir: Path, records: Path, deepspeed: str) -> str:
    return (f"run_dir: {run_dir}\nmodel: {{path: tiny}}\n"
            f"safety: {{num_safety_tokens: 4, num_queries: 4, projector_depth: 1}}\n"
            f"stage1:\n  data: {{train: {records}}}\n"
            f"  train: {{deepspeed: {deepspeed}, max_steps: 1, lr: 0.001, torch_threads: 1, progress: false}}\n")


def test_generated_configs_exit_2_with_one_line_and_leave_nothing(tmp_path, capsys):
    rng = random.Random(SEED)
    deepspeed = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json")
    bad_records = records_file(tmp_path / "data", random.Random(7))
    bad_records.write_text(bad_records.read_text() + '{"image": "images/0.png", "conversations": 5}\n')
    cases = [CONFIG_MUTATIONS[i % len(CONFIG_MUTATIONS)] for i in range(CONFIG_CASES)]
    rng.shuffle(cases)
    for case, mutate in enumerate(cases):
        run_dir = tmp_path / f"run{case}"
        config = tmp_path / f"config{case}.yaml"
        config.write_text(mutate(config_text(run_dir, bad_records, deepspeed)))
        assert cli_main(["train", "stage1", "--config", str(config)]) == 2, config.read_text()
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("safevlm ")]
        assert len(err) == 1 and err[0].startswith("safevlm train: error: "), (case, err)
        named = (str(config), str(bad_records), "/nonexistent/", "model 'tiny")   # the file, or the value at fault
        assert any(name in err[0] for name in named), err[0]
        assert not run_dir.exists(), (case, sorted(p.name for p in run_dir.rglob("*")))


@pytest.mark.slow
def test_the_installed_command_refuses_generated_records_in_one_line(tmp_path):
    rng = random.Random(SEED + 1)
    deepspeed = str(Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json")
    for case in range(2):
        records = records_file(tmp_path / f"data{case}", rng)
        records.write_text(records.read_text() + '{"image": "images/0.png\\u0000", "conversations": []}\n')
        run_dir = tmp_path / f"run{case}"
        config = tmp_path / f"config{case}.yaml"
        config.write_text(config_text(run_dir, records, deepspeed))
        result = subprocess.run([sys.executable, "-m", "safevlm.cli", "train", "stage1", "--config", str(config)],
                                capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        ours = [ln for ln in result.stderr.splitlines() if ln.startswith("safevlm ")]
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert len(ours) == 1 and ours[0].startswith(f"safevlm train: error: {records}:"), ours
        assert not run_dir.exists() and result.stdout == ""
