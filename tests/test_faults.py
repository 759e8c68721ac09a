"""The faults a hostile or careless user finds, one class per test, each reproduced for real.

A NaN adapter and a NaN head output (the guard fails closed), a NaN update with save_every=1 (never
checkpointed), an adapter on a base with other weights, a second process on one run folder,
duplicate YAML keys, a record longer than the model's context, a disk that fills during a
checkpoint (a real tmpfs), run folders that are files, NUL bytes in records, pickled-only bases,
truncated checkpoints with an intact older one beside them, corrupt caches. The judge client's
faults are in test_judges.py (against a real server on 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from red_blue import write_red_blue_world
from safety_modules import AdapterError, SafetyConfig, SafetyGuard, attach, load_adapter, save_adapter
from safety_modules.adapter_io import CONFIG_NAME, WEIGHTS_NAME, AdapterWarning
from safety_modules.configio import ConfigError, read_yaml
from safety_modules.fileio import CorruptFileError, FileWriteError, read_json, write_text_atomic
from safety_modules.guard import GuardError, GuardPolicy
from base_models.loading import load_base
from safevlm.cli import main as cli_main
from test_engine import red_blue_world, stage1_cfg
from training import checkpoint as ckpt
from runtime import runlock
from training.collator import TrainingCollator
from training.engine import Trainer, TrainingDiverged, truncate_metrics
from training.recipes.common import load_training_records, measured_before
from training.recipes.stage1 import build_stage1_model, stage1_loss, train_stage1
from training.records import RecordError, load_records

SAFETY = dict(num_safety_tokens=4, num_queries=4, projector_depth=1)
CONTEXT = 2048                                  # the tiny Llama's max_position_embeddings


def stage1_trainer(cfg, loss_fn=stage1_loss, with_response: bool = False) -> Trainer:
    model = build_stage1_model(cfg)
    records = load_training_records(cfg.data, cfg.safety, require_answer=with_response, require_labels=True)
    collate = TrainingCollator(model.processor, with_response=with_response, max_length=cfg.data.max_length)
    return Trainer(model, records, collate, loss_fn, cfg.train, Path(cfg.run_dir), name="stage1")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1
    line = err[-1]
    assert line.startswith("safevlm ") and ": error: " in line
    return line


@contextlib.contextmanager
def full_disk(path: Path, size: str = "1m"):
    """A small tmpfs at `path` (a real file system that fills up); skips when mounting is refused."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'mount refused'}); needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Write to `path` until the file system is genuinely full."""
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


# -- 1. the guard fails closed ------------------------------------------------------------------
def attached(tiny_builder, seed: int = 0):
    base, processor = tiny_builder("llava", seed=seed)
    torch.manual_seed(3)
    return attach(base, SafetyConfig(**SAFETY), processor)


def test_nan_or_integer_adapter_weights_are_refused(tiny_builder, tmp_path):
    model = attached(tiny_builder)
    save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / WEIGHTS_NAME)
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, tmp_path / "a" / WEIGHTS_NAME)
    base, processor = tiny_builder("llava")
    with pytest.raises(AdapterError, match=rf"{WEIGHTS_NAME}: tensor '.+' holds \d+ NaN/inf values"):
        load_adapter(base, tmp_path / "a", processor)
    save_file({k: (v * 100).to(torch.int32) for k, v in tensors.items()}, tmp_path / "a" / WEIGHTS_NAME)
    with pytest.raises(AdapterError, match=r"has dtype int32; adapter weights must be floating point \(refused, not cast\)"):
        load_adapter(base, tmp_path / "a", processor)
    with torch.no_grad():
        next(model.safety.parameters()).fill_(float("inf"))
    with pytest.raises(AdapterError, match="a safety adapter must be finite"):
        save_adapter(model, tmp_path / "b")                        # and none is ever written
    assert not (tmp_path / "b").exists()


def test_a_nan_head_never_passes(tiny_builder, make_image):
    model = attached(tiny_builder)
    with torch.no_grad():
        for p in model.safety.head.parameters():
            p.fill_(float("nan"))
    images = [make_image(1), make_image(2)]
    with pytest.raises(GuardError, match=r"NaN/inf for image\(s\) \[0, 1\]"):
        SafetyGuard(model).verdict(images)
    guard = SafetyGuard(model, policy=GuardPolicy(on_nonfinite="refuse"))
    verdicts = guard.verdict(images)
    assert [v.action for v in verdicts] == ["refuse", "refuse"] and all(v.error for v in verdicts)
    assert verdicts[0].unsafe_prob == 1.0
    replies = guard.generate(images, "Describe it.", max_new_tokens=3)
    assert [r.action for r in replies] == ["refuse", "refuse"] and "unknown" in replies[0].text
    with pytest.raises(ValueError, match="on_nonfinite: must be one of"):
        GuardPolicy(on_nonfinite="pass")


# -- 2. nothing non-finite is checkpointed --------------------------------------------------------
def test_a_nan_update_is_never_checkpointed_and_the_named_checkpoint_resumes(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    cfg = stage1_cfg(tmp_path, data, save_every=1, max_steps=4)
    steps = []

    def poisoned(engine, batch, n):
        # Step 2's update turns every weight NaN (Adam's second moment made negative: sqrt < 0),
        # while its own loss is finite; the save right after it is what must refuse.
        steps.append(1)
        if len(steps) == 2:
            for state in engine.optimizer.optimizer.state.values():
                state["exp_avg_sq"].fill_(-1.0)
        return stage1_loss(engine, batch, n)

    trainer = stage1_trainer(cfg, poisoned)
    with pytest.raises(TrainingDiverged) as err:
        trainer.fit()
    root = Path(cfg.run_dir) / "checkpoints"
    good = root / "step-000001"
    assert "the update of step 2 made the weights NaN/inf" in str(err.value)
    assert f"the last good checkpoint is {good}" in str(err.value)
    assert ckpt.latest_checkpoint(cfg.run_dir) == good and not (root / "step-000002").exists()
    assert all(torch.isfinite(t).all() for t in load_file(good / "trainable.safetensors").values())
    del trainer
    again = stage1_trainer(cfg)
    assert again.resume() and again.step == 1


# -- 3. an adapter on a base with other weights ------------------------------------------------
def test_an_adapter_on_a_base_with_other_weights_warns_or_is_refused(tiny_builder, make_image, tmp_path):
    model = attached(tiny_builder, seed=0)
    save_adapter(model, tmp_path / "a")
    base, processor = tiny_builder("llava", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # the same base: not a word
        load_adapter(base, tmp_path / "a", processor)
    other, processor = tiny_builder("llava", seed=1)                # same shapes, other weights
    with pytest.warns(AdapterWarning, match="the base's weights differ from the base the adapter was trained on"):
        loaded = load_adapter(other, tmp_path / "a", processor)
    image = [make_image(5)]
    assert not torch.equal(torch.tensor(SafetyGuard(loaded).verdict(image)[0].level_probs),
                           torch.tensor(SafetyGuard(model).verdict(image)[0].level_probs))
    other, processor = tiny_builder("llava", seed=1)
    with pytest.raises(AdapterError, match=r"weights_sha256.*refused: strict_base"):
        load_adapter(other, tmp_path / "a", processor, strict_base=True)


def test_the_evaluation_runner_refuses_another_base_under_strict_base(tmp_path):
    from eval.core.models import load_runner
    from safety_modules import SafetyConfig, attach
    from base_models.loading import load_base

    base, processor = load_base("tiny", seed=0)
    save_adapter(attach(base, SafetyConfig(num_safety_tokens=2, num_queries=4), processor), tmp_path / "a")
    with pytest.warns(AdapterWarning, match="the base's weights differ"):
        load_runner("tiny", tmp_path / "a", device="cpu", seed=1)
    with pytest.raises(AdapterError, match="refused: strict_base"):
        load_runner("tiny", tmp_path / "a", device="cpu", seed=1, strict_base=True)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(fingerprint={}), r"field 'fingerprint' is empty"),
    (lambda m: m["fingerprint"].pop("vocab_size"), r"field 'fingerprint.vocab_size' is missing"),
    (lambda m: m["fingerprint"].update(vocab_size="640"), r"field 'fingerprint.vocab_size' is '640', expected int"),
    (lambda m: m["fingerprint"].update(weights_sha256=7), r"field 'fingerprint.weights_sha256' is 7"),
    (lambda m: m.update(format_version=99), r"field 'format_version' is 99; this version of safevlm reads \[1, 2\]"),
    (lambda m: m.pop("format_version"), r"field 'format_version' is missing"),
    (lambda m: m["safety_config"].update(risk_types=m["safety_config"]["risk_types"][::-1]),
     r"field 'safety_config.risk_types' is \['deception'.* but the weights were trained with \['none'"),
])
def test_malformed_adapter_configs_name_the_field(tiny_builder, tmp_path, change, message):
    save_adapter(attached(tiny_builder), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    change(meta)
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps(meta))
    base, processor = tiny_builder("llava")
    with pytest.raises(AdapterError, match=message):
        load_adapter(base, tmp_path / "a", processor)


def test_weights_without_their_label_metadata_are_refused(tiny_builder, tmp_path):
    save_adapter(attached(tiny_builder), tmp_path / "a")
    save_file(load_file(tmp_path / "a" / WEIGHTS_NAME), tmp_path / "a" / WEIGHTS_NAME)     # labels dropped
    base, processor = tiny_builder("llava")
    with pytest.raises(AdapterError, match=r"carries no 'risk_types'/'num_safety_levels' metadata"):
        load_adapter(base, tmp_path / "a", processor)


# -- 4. one run per run folder --------------------------------------------------------------------
HOLDER = "import sys, time; from runtime import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)"


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run" / "stage1"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = rf"in use by another run \(pid {holder.pid} on host {socket.gethostname()}, started "
        with pytest.raises(runlock.RunLockError, match=who):
            runlock.acquire(run)
        config = tmp_path / "run.yaml"
        config.write_text(f"run_dir: {tmp_path / 'run'}\nstage1: {{data: {{train: {tmp_path / 'none.jsonl'}}}}}\n")
        assert cli_main(["train", "stage1", "--config", str(config)]) == 2   # refused before loading anything
        assert f"pid {holder.pid}" in one_error_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    with runlock.acquire(run), runlock.acquire(run):      # a killed holder leaves no stale lock; re-entrant
        assert (run / runlock.LOCK_NAME).is_file()
    assert not (run / runlock.LOCK_NAME).exists()


# -- 5. duplicate YAML keys ---------------------------------------------------------------------
def test_duplicate_yaml_keys_are_refused_naming_the_key_and_both_lines(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("run_dir: x\nstage1:\n  train:\n    lr: 1.0e-3\n    epochs: 2\n    lr: 1.0e-5\n")
    with pytest.raises(ConfigError, match=r"run.yaml: duplicate key 'lr' at line 6 \(first at line 4\)"):
        read_yaml(config)
    assert cli_main(["train", "stage1", "--config", str(config)]) == 2
    assert "duplicate key 'lr' at line 6 (first at line 4)" in one_error_line(capsys)
    config.write_text("base: &b {lr: 1}\nother:\n  <<: *b\n  lr: 2\n")    # a merge key overriding is not a duplicate
    assert read_yaml(config)["other"] == {"lr": 2}


# -- 6. a record longer than the model's context ---------------------------------------------------
def long_world(root: Path, long_answer: bool) -> Path:
    text = "please describe it in detail " * 400
    def record(i, unsafe):
        question = "Is this image safe to post?" + ("" if long_answer or i != 5 else " " + text)
        answer = ("No." if unsafe else "Yes.") + (" " + text if long_answer else "")
        return {"id": f"r{i}", "conversations": [{"from": "human", "value": "<image>\n" + question},
                                                 {"from": "gpt", "value": answer}],
                "safety_level": 2 if unsafe else 0, "risk_type": "violence" if unsafe else "none"}
    return write_red_blue_world(root, record, n=8)


def test_a_record_longer_than_the_context_is_refused_naming_file_and_line(tmp_path):
    cfg = stage1_cfg(tmp_path, long_world(tmp_path / "world", long_answer=False))
    with pytest.raises(RecordError, match=rf"train.jsonl:6: the sequence is \d+ tokens .* over the model's context "
                                          rf"of {CONTEXT} tokens; shorten it, or set data.max_length"):
        train_stage1(cfg, build_stage1_model(cfg))


def test_long_responses_are_refused_unless_the_config_truncates_them(tmp_path):
    data = long_world(tmp_path / "world", long_answer=True)
    count = lambda engine, batch: {"n": (torch.ones(len(batch["input_ids"])), torch.ones(len(batch["input_ids"])))}
    cfg = stage1_cfg(tmp_path / "a", data)
    with pytest.raises(RecordError, match=r"train.jsonl:1: the sequence is \d+ tokens"):
        trainer = stage1_trainer(cfg, with_response=True)
        trainer.evaluate(trainer.dataset, trainer.collate_fn, count)
    cfg = stage1_cfg(tmp_path / "b", data)
    cfg.data.max_length = 256
    trainer = stage1_trainer(cfg, with_response=True)
    assert trainer.evaluate(trainer.dataset, trainer.collate_fn, count) == {"n": 1.0}


# -- 7. every user fault is one line naming what is wrong ----------------------------------------
def test_a_run_dir_or_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    data = red_blue_world(tmp_path / "world", n=8)
    config = tmp_path / "run.yaml"
    config.write_text(f"run_dir: {tmp_path / 'afile'}\nstage1: {{data: {{train: {data}}}}}\n")
    assert cli_main(["train", "stage1", "--config", str(config)]) == 2
    assert "run_dir" in (line := one_error_line(capsys)) and "a file is in the way" in line
    assert cli_main(["classifier", "generate", "--out", str(tmp_path / "afile" / "x.jsonl"), "--per-task", "2"]) == 2
    assert f"{tmp_path / 'afile'}: a file is in the way where a folder is expected" in one_error_line(capsys)


@pytest.mark.parametrize("image, problem", [
    ("images/0\x00.png", r"invalid path 'images/0\\x00.png': it contains a NUL byte"),
    ("x" * 5000 + ".png", r"invalid path 'x{80}'\.\.\. \(5004 characters\) \(file name too long\)"),
])
def test_invalid_paths_in_records_name_file_line_and_field(tmp_path, image, problem):
    bad = json.dumps({"image": image, "conversations": [{"from": "human", "value": "<image>\nq"}]})
    data = red_blue_world(tmp_path / "world", n=2, bad_lines=(bad,))
    with pytest.raises(RecordError, match=rf"train.jsonl:3: field 'image': {problem}"):
        load_records(data, ["none", "violence"], 4, require_answer=False)


def test_a_base_folder_with_only_pickled_weights_is_refused(tiny_builder, make_image, tmp_path, capsys):
    base, processor = tiny_builder("llava")
    folder = tmp_path / "pickled"
    base.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    torch.save(base.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no .safetensors weights in the folder \(only pickled pytorch_model.bin"):
        load_base(str(folder))
    make_image(0).save(tmp_path / "x.png")
    assert cli_main(["guard", "--model", str(folder), str(tmp_path / "x.png")]) == 2
    assert "use_safetensors=True" in one_error_line(capsys)


def test_metrics_partial_last_line_is_dropped_and_a_bad_middle_line_is_named(tmp_path, caplog):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste')         # killed mid-line
    truncate_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "dropped a partial last line" in caplog.text
    metrics.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(CorruptFileError, match=r"metrics.jsonl:2: not valid JSON"):
        truncate_metrics(metrics, 2)
    assert metrics.read_text() == '{"step": 1}\n{"st\n{"step": 2}\n'           # nothing lost


def test_truncated_json_files_are_named_and_before_json_is_measured_again(tmp_path, caplog):
    (tmp_path / "DONE.json").write_text('{"seconds": 1.5, "adap')
    with pytest.raises(CorruptFileError, match=r"DONE.json: stage marker is not valid JSON \(.* truncated\?\)"):
        read_json(tmp_path / "DONE.json", "stage marker")
    (tmp_path / "before.json").write_text('{"level_accuracy": 0.')
    assert measured_before(tmp_path, True, lambda: {"level_accuracy": 0.5}) == {"level_accuracy": 0.5}
    assert "measuring it again" in caplog.text and read_json(tmp_path / "before.json") == {"level_accuracy": 0.5}


def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path):
    with full_disk(tmp_path / "disk", "64k") as disk:
        write_text_atomic(disk / "DONE.json", '{"ok": true}')
        with pytest.raises(FileWriteError, match=r"DONE.json: cannot write \(no space left on device\)"):
            write_text_atomic(disk / "DONE.json", "x" * 200_000)
        assert (disk / "DONE.json").read_text() == '{"ok": true}'
        assert [p.name for p in disk.iterdir()] == ["DONE.json"]                  # no temporary left


def test_a_disk_that_fills_during_a_checkpoint_keeps_the_previous_one(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    with full_disk(tmp_path / "disk", "3m") as disk:
        cfg = stage1_cfg(tmp_path, data, save_every=1, max_steps=3, log_every=100)
        cfg.run_dir = str(disk / "stage1")
        steps = []

        def filling(engine, batch, n):
            steps.append(1)
            if len(steps) == 2:
                fill(disk / "filler")                                  # someone else fills the disk
            return stage1_loss(engine, batch, n)

        trainer = stage1_trainer(cfg, filling)
        with pytest.raises(ckpt.CheckpointError, match=r"step-000002 not written: .*no space left on device.*; "
                                                       r"the latest checkpoint is still .*step-000001"):
            trainer.fit()
        root = disk / "stage1" / "checkpoints"
        assert ckpt.latest_checkpoint(cfg.run_dir) == root / "step-000001"
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000001"]
        ckpt.read_checkpoint(root / "step-000001", {})                 # intact
        del trainer


def test_options_are_named_rightly_in_their_own_errors():
    from eval.core.models import load_runner
    from training.config import LoraSpec
    with pytest.raises(ValueError, match=r"drop --adapter, or use --runner safevlm"):
        load_runner("tiny", "some/adapter", kind="hf")
    with pytest.raises(ConfigError, match=r"^alpha: must be >= 1, got 0$"):
        LoraSpec(r=8, alpha=0)


# -- 8. fall back to an intact older state -----------------------------------------------------
@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    data = red_blue_world(root / "world", n=8)
    cfg = stage1_cfg(root, data, save_every=1, max_steps=3, keep_checkpoints=0)
    train_stage1(cfg, build_stage1_model(cfg))
    return cfg


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, named", [
    (lambda d: truncate(d / "trainable.safetensors"), r"trainable.safetensors: corrupt or truncated"),
    (lambda d: truncate(d / "rank-00000.pt"), r"rank-00000.pt: corrupt or truncated"),
    (lambda d: truncate(d / "state.json"), r"state.json: checkpoint state is not valid JSON"),
])
def test_resume_skips_a_corrupt_newest_checkpoint_for_an_intact_older_one(three_checkpoints, tmp_path, caplog,
                                                                           damage, named):
    cfg = stage1_cfg(tmp_path, Path(three_checkpoints.data.train), save_every=1, max_steps=3, keep_checkpoints=0)
    shutil.copytree(Path(three_checkpoints.run_dir) / "checkpoints", Path(cfg.run_dir) / "checkpoints")
    damage(Path(cfg.run_dir) / "checkpoints" / "step-000003")
    trainer = stage1_trainer(cfg)
    assert trainer.resume() and trainer.step == 2
    assert trainer.last_checkpoint.name == "step-000002"
    assert caplog.text.count("skipped") == 1
    assert "step-000003 skipped: " in caplog.text and re.search(named, caplog.text)
    for step in ("step-000001", "step-000002"):
        damage(Path(cfg.run_dir) / "checkpoints" / step)
    del trainer
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint verifies \(step-000003 skipped: .*"
                                                   r"step-000002 skipped: .*step-000001 skipped: "):
        stage1_trainer(cfg).resume()


def test_an_unreadable_cache_row_is_a_counted_miss_and_a_non_database_is_set_aside(tmp_path, caplog):
    from eval.core.cache import Cache
    cache = Cache(tmp_path / "cache.sqlite")
    cache.put_many({"a": {"text": "kept"}, "b": {"text": "lost"}, "c": {"text": "odd"}})
    with sqlite3.connect(tmp_path / "cache.sqlite") as conn:
        conn.execute("UPDATE responses SET value = '{\"text\": \"lo' WHERE key = 'b'")
        conn.execute("UPDATE responses SET value = '[1, 2]' WHERE key = 'c'")
    assert cache.get("a", require=("text",)) == {"text": "kept"}
    assert cache.get("b", require=("text",)) is None and cache.get("c", require=("text",)) is None
    assert cache.stats() == {"hits": 1, "misses": 2, "unreadable": 2, "entries": 3}
    cache.close()
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database, just bytes\n" * 200)
    fresh = Cache(junk)
    assert fresh.get("a") is None and len(fresh) == 0 and "not a usable cache database" in caplog.text
    assert fresh.set_aside.read_bytes() == b"not a database, just bytes\n" * 200          # nothing deleted
    fresh.put("a", {"text": "new"})
    assert Cache(junk).get("a") == {"text": "new"}
