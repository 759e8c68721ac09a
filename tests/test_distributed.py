"""Multi-process DeepSpeed on CPU (gloo), and a run killed by a real SIGKILL and resumed.

One stage-2 configuration (tiny LLaVA, LoRA + safety modules, global batch 4, 12 steps) is run as:
- the reference: one process, micro-batch 2 x accumulation 2, ZeRO-2 (in this process);
- `torchrun --nproc-per-node 2` with ZeRO-2 (micro-batch 2) and with ZeRO-3 (micro-batch 1 x
  accumulation 2): the same loss at every step (relative 1e-4) and the same exported adapter;
- a one-process run killed with SIGKILL right after its first checkpoint, then resumed: the same
  losses and bit-identical exported weights as the reference;
- the 2-process ZeRO-3 run resumed from its step-10 checkpoint (per-rank optimizer partitions):
  the same last losses and weights as that run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from red_blue import write_red_blue_world
from safety_modules import SafetyConfig, attach, save_adapter
from base_models.loading import load_base
from training.checkpoint import latest_checkpoint
from training.recipes.registry import recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
ADAPTER_FILES = ("safety_adapter.safetensors", "adapter_model.safetensors")


def red_blue_world(root: Path, n: int = 8) -> Path:
    return write_red_blue_world(root, lambda i, unsafe: {
        "id": f"r{i}", "safety_level": 2 if unsafe else 0, "risk_type": "violence" if unsafe else "none",
        "conversations": [{"from": "human", "value": f"<image>\nQuestion {i}: is it safe?"},
                          {"from": "gpt", "value": "No, it shows a weapon and is unsafe." if unsafe
                           else "Yes, it is safe to post."}]}, n=n, seed=1, file_name="stage2.jsonl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    data = red_blue_world(root / "world")
    base, processor = load_base("tiny")
    torch.manual_seed(0)
    save_adapter(attach(base, SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1), processor),
                 root / "stage1")
    # adam_eps 1e-6: the head's key bias has a zero true gradient (softmax ignores a shift), and
    # with eps 1e-8 Adam turns its rounding noise into lr-sized steps that differ between layouts.
    config = root / "run.yaml"
    config.write_text(f"""run_dir: {root / 'unused'}
model: {{path: tiny}}
stage2:
  adapter: {root / 'stage1'}
  lora: {{r: 4, alpha: 8}}
  eval_records: 8
  data: {{train: {data}}}
  train:
    deepspeed: {REPO / 'configs' / 'deepspeed' / 'zero2.json'}
    micro_batch_size: 2
    global_batch_size: 4
    max_steps: {STEPS}
    lr: 1.0e-2
    adam_eps: 1.0e-6
    warmup_steps: 2
    save_every: 2
    torch_threads: 1
    progress: false
""")
    return config


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    run_dir = setup.parent / "one"
    recipe("stage2").run_function(recipe("stage2").load_config(setup, [f"run_dir={run_dir}"]))
    return run_dir


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in ADAPTER_FILES:
        out.update({f"{name}:{k}": v for k, v in load_file(str(run_dir / "adapter" / name)).items()})
    return out


def cli(config: Path, *overrides: str) -> list[str]:
    return ["-m", "safevlm.cli", "train", "stage2", "--config", str(config), *overrides]


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return {**clean, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("zero,micro", [("zero2", 2), ("zero3", 1)])
def test_two_processes_match_one(setup, reference, zero, micro):
    run_dir = setup.parent / f"two-{zero}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *cli(setup, f"run_dir={run_dir}", f"train.micro_batch_size={micro}",
                f"train.deepspeed={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}")]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, ref = losses(run_dir), losses(reference)
    assert len(ours) == len(ref) == STEPS
    np.testing.assert_allclose(ours, ref, rtol=1e-4)
    a, b = adapter(run_dir), adapter(reference)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)


def test_zero3_two_process_resume_matches_its_uninterrupted_run(setup):
    full = setup.parent / "two-zero3"
    if not (full / "adapter").is_dir():
        pytest.skip(reason="needs the ZeRO-3 run of test_two_processes_match_one")
    # a run folder holding what the ZeRO-3 run had after step 10: per-rank optimizer partitions
    run_dir = setup.parent / "zero3-resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000010", run_dir / "checkpoints" / "step-000010")
    (run_dir / "checkpoints" / "latest").write_text("step-000010")
    shutil.copy(full / "before.json", run_dir / "before.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *cli(setup, f"run_dir={run_dir}", "train.micro_batch_size=1",
                f"train.deepspeed={REPO / 'configs' / 'deepspeed' / 'zero3.json'}"), "--resume"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(losses(run_dir), losses(full)[10:], rtol=1e-6)
    a, b = adapter(run_dir), adapter(full)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7, msg=key)


def test_killed_run_resumes_to_the_uninterrupted_weights(setup, reference):
    run_dir = setup.parent / "killed"
    proc = subprocess.Popen([sys.executable, *cli(setup, f"run_dir={run_dir}")], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)                  # a real kill, right after the first checkpoint
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = int(latest_checkpoint(run_dir).name.split("-")[1])
    assert 2 <= killed_at < STEPS and not (run_dir / "adapter").exists()

    stage2 = recipe("stage2")
    summary = stage2.run_function(stage2.load_config(setup, [f"run_dir={run_dir}"]), resume=True)
    assert summary["steps"] == STEPS
    np.testing.assert_allclose(losses(run_dir), losses(reference), rtol=1e-6)
    a, b = adapter(run_dir), adapter(reference)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
