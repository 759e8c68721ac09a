"""`safevlm run` for a real checkpoint: a model folder (here a tiny LLaVA written by save_pretrained)
and the user's data in the records + UnsafeConcepts layout (here a concept world built beforehand),
in one process and under `torchrun` with two processes.

What a 7B run relies on and these check on CPU: the plan drops the world and stage 0, every stage
of the plan finishes and leaves its marker, the adapters sit on the folder's model (they load onto a
fresh copy of it and reproduce the outputs), the evaluations shard over the ranks, a rerun under
torchrun skips every finished stage, and the config's mistakes stop the run before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from safety_modules.configio import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "pipeline_real.yaml"
PLAN = ["classifiers", "eval_base", "stage1", "stage2", "eval_stage2", "ppo", "eval_ppo", "sft", "eval_sft",
        "dpo", "eval_dpo", "report", "adapters"]


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory) -> dict[str, Path]:
    """A saved model folder and a data folder in the layout `data_dir` expects."""
    from base_models.tiny import build_tiny_llava
    from concept_world import WorldConfig
    from concept_world.build import build_world

    root = tmp_path_factory.mktemp("real")
    model, processor = build_tiny_llava(seed=7)
    model.save_pretrained(root / "base")
    processor.save_pretrained(root / "base")
    build_world(root / "data", WorldConfig(concepts=9, images_per_concept=5, heldout_render_fraction=0.2,
                                           questions_per_image=1, perception_per_image=1), progress=False)
    return {"base": root / "base", "data": root / "data", "root": root}


def _overrides(setup: dict[str, Path], run_dir: Path) -> list[str]:
    return [f"run_dir={run_dir}", f"model.path={setup['base']}", f"data_dir={setup['data']}"]


def _run(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, "-m", "safevlm.cli", "run", str(CONFIG), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1200)


def _check_run(run_dir: Path, base: Path, image: Path) -> None:
    from pipeline_checks import assert_adapters_reproduce_outputs

    assert not (run_dir / "world").exists() and not (run_dir / "stage0").exists()
    for name in PLAN:
        assert (run_dir / name / "DONE.json").is_file(), f"stage {name} left no DONE.json"
    report = (run_dir / "report" / "report.md").read_text()
    assert report.startswith("# Safety alignment on ") and "world" not in report.splitlines()[0]
    results = json.loads((run_dir / "report" / "results.json").read_text())
    assert set(results["splits"]["heldout_render"]) == {"base", "stage 2", "PPO", "SFT", "DPO"}
    assert_adapters_reproduce_outputs(run_dir, base, image)


@pytest.mark.slow
def test_one_process_runs_the_real_model_plan(user_setup, tmp_path):
    run_dir = tmp_path / "run"
    proc = _run(_overrides(user_setup, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    started = re.findall(r"\] (\w+): ", proc.stderr)
    assert [s for i, s in enumerate(started) if s not in started[:i]] == PLAN
    _check_run(run_dir, user_setup["base"], user_setup["data"] / "images" / "0.png")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["path"] == str(user_setup["base"])


@pytest.mark.slow
def test_two_processes_run_the_plan_and_a_rerun_skips_it(user_setup, tmp_path):
    run_dir = tmp_path / "run2"
    proc = _run(_overrides(user_setup, run_dir), processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run(run_dir, user_setup["base"], user_setup["data"] / "images" / "0.png")
    for name in ("eval_base", "eval_ppo"):
        results = json.loads((run_dir / name / "heldout_render" / "results.json").read_text())
        assert results["generation"]["world_size"] == 2
        assert all(r["items"] > 0 for r in results["generation"]["per_rank"])
    for stage in ("stage1", "stage2", "ppo", "sft", "dpo"):
        assert json.loads((run_dir / stage / "summary.json").read_text())["processes"] == 2, stage
    before = {name: (run_dir / name / "DONE.json").stat().st_mtime_ns for name in PLAN}
    again = _run(_overrides(user_setup, run_dir), processes=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.findall(r"\] (\w+): done already, skipped", again.stderr) == PLAN
    assert before == {name: (run_dir / name / "DONE.json").stat().st_mtime_ns for name in PLAN}


# -- mistakes found before anything runs ------------------------------------------------------------
def _config(tmp_path: Path, *overrides: str):
    from safevlm.pipeline import load_pipeline_config
    return load_pipeline_config(CONFIG, [f"run_dir={tmp_path / 'run'}", *overrides])


def _data(tmp_path: Path, stages=("stage1", "stage2", "ppo", "sft", "dpo")) -> Path:
    data = tmp_path / "data"
    (data / "records").mkdir(parents=True)
    for stage in stages:
        (data / "records" / f"{stage}.jsonl").write_text("")
    row = {"image_filename": "images/0.png", "category": "Hate", "unsafe_concept": "Swastika", "split": "heldout_render"}
    (data / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    return data


@pytest.mark.parametrize("overrides, key", [
    (["model.path=shape:llava-13b"], "model.path: unknown shape"),
    (["model.path=/no/such/folder"], "model.path: '/no/such/folder' is not a local folder"),
    (["stage1.init_from=stage0"], "stage1.init_from"),
    (["eval.splits=[nosuch]"], "data_dir: evaluation data"),
    (["eval.data=/no/such/UnsafeConcepts"], "eval.data: evaluation data"),
    (["sft.data.train=/no/such/sft.jsonl"], "sft.data.train: sft records '/no/such/sft.jsonl' not found"),
])
def test_config_mistakes_stop_before_anything_is_written(tmp_path, overrides, key):
    from safevlm.pipeline import run_pipeline
    data = _data(tmp_path)
    cfg = _config(tmp_path, "model.path=shape:small", f"data_dir={data}", *overrides)
    with pytest.raises(ConfigError, match=re.escape(key)):
        run_pipeline(cfg, log=lambda line: None)
    assert not (tmp_path / "run").exists()


def test_missing_records_name_data_dir_and_the_file(tmp_path):
    from safevlm.pipeline import run_pipeline
    data = _data(tmp_path, stages=("stage1", "stage2", "sft", "dpo"))
    cfg = _config(tmp_path, "model.path=shape:small", f"data_dir={data}")
    with pytest.raises(ConfigError, match=r"data_dir: ppo records '.*records/ppo.jsonl' not found"):
        run_pipeline(cfg, log=lambda line: None)


def test_plans_of_the_shipped_configs():
    from safevlm.pipeline import load_pipeline_config, plan
    tiny = [s.name for s in plan(load_pipeline_config(REPO / "configs" / "tiny.yaml"))]
    assert tiny[:3] == ["world", "classifiers", "stage0"] and tiny[3:] == PLAN[1:]
    real = load_pipeline_config(REPO / "configs" / "llava-1.5-7b.yaml")
    assert [s.name for s in plan(real)] == PLAN and real.base_model == "models/llava-1.5-7b-hf"
    shape = load_pipeline_config(REPO / "configs" / "llava-1.5-7b-shape.yaml")
    assert [s.name for s in plan(shape)] == ["world"] + PLAN and shape.base_model == "shape:llava-1.5-7b"
