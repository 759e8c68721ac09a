"""The DeepSpeed trainer and the stage recipes on tiny models and small synthetic record sets.

Every run here is a real one-process DeepSpeed ZeRO-2 run on CPU (gloo, fp32): stage 1 learns a
trivially separable set (red = safe, blue = unsafe) with the base byte-identical afterwards, stage 2
lowers the response LM loss, stage 0 fine-tunes the plain base, a huge learning rate stops the run
naming the step and the last good checkpoint, and a run resumed from a checkpoint ends with the
same weights as one that never stopped.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from red_blue import write_red_blue_world
from safety_modules import SafetyConfig, attach, save_adapter
from safety_modules.configio import ConfigError
from base_models.loading import load_base
from safevlm.cli import main as cli_main
from training.checkpoint import latest_checkpoint
from training.config import DataConfig, LoraSpec, ModelSpec, TrainConfig, resolve_base_path
from training.recipes.registry import recipe
from training.engine import TrainingDiverged, WarmupDecay, deepspeed_config
from training.recipes.stage0 import Stage0Config
from training.recipes.stage1 import Stage1Config, Stage1Section, build_stage1_model, train_stage1
from training.recipes.stage2 import Stage2Config, build_stage2_model, train_stage2
from training.records import RecordError

REPO = Path(__file__).resolve().parents[1]
ZERO2 = str(REPO / "configs" / "deepspeed" / "zero2.json")
SAFETY = SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1)


def red_blue_world(root: Path, n: int = 16, bad_lines: tuple[str, ...] = ()) -> Path:
    """n records: red images are safe (level 0), blue ones unsafe (level 2, violence). Returns the file."""
    return write_red_blue_world(root, lambda i, unsafe: {
        "id": f"r{i}",
        "conversations": [{"from": "human", "value": "<image>\nIs this image safe to post?"},
                          {"from": "gpt", "value": "No, it is unsafe." if unsafe else "Yes, it is safe."}],
        "safety_level": 2 if unsafe else 0, "risk_type": "violence" if unsafe else "none"}, n=n, extra_lines=bad_lines)


def train_cfg(**kw) -> TrainConfig:
    base = dict(deepspeed=ZERO2, micro_batch_size=4, max_steps=6, lr=3e-3, warmup_steps=1, torch_threads=1,
                progress=False)
    return TrainConfig(**{**base, **kw})


def stage1_cfg(tmp_path: Path, data: Path, **train) -> Stage1Config:
    return Stage1Config(run_dir=str(tmp_path / "run" / "stage1"), model=ModelSpec("tiny"), safety=SAFETY,
                        data=DataConfig(train=str(data)), train=train_cfg(**train))


def base_snapshot(model) -> dict[str, bytes]:
    return {k: v.detach().cpu().numpy().tobytes() for k, v in model.plain_model.state_dict().items()
            if "lora_" not in k}


def test_stage1_head_learns_and_the_base_stays_byte_identical(tmp_path):
    data = red_blue_world(tmp_path / "world", bad_lines=('{"id": "broken"',))
    cfg = stage1_cfg(tmp_path, data, max_steps=12, save_every=4)
    cfg.data.skip_bad_records = True
    cfg.eval_files = [str(data)]
    model = build_stage1_model(cfg)
    before = base_snapshot(model)
    summary = train_stage1(cfg, model)
    assert summary["train_before"]["level_accuracy"] <= 0.75
    assert summary["train_after"]["level_accuracy"] == 1.0
    assert summary["eval"][str(data)]["level_accuracy"] == 1.0
    assert summary["skipped_records"] == 1 and summary["records"] == 16
    assert base_snapshot(model) == before                         # frozen base: not a bit changed
    # metrics: one line per step, with loss, learning rate and throughput
    lines = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    assert lines[-1]["loss"] < lines[0]["loss"] and all(x["samples_per_s"] > 0 for x in lines)
    # the LR schedule is applied: half the rate in the one warm-up step, then the full rate, decaying
    assert lines[0]["lr"] == pytest.approx(3e-3 / 2) and lines[1]["lr"] == pytest.approx(3e-3)
    assert lines[-1]["lr"] < lines[2]["lr"]
    # checkpoints hold the trainable tensors only; the exported adapter loads onto a fresh base
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt.name == "step-000012"
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(k.startswith("safety.") for k in saved)
    rank_state = torch.load(ckpt / "rank-00000.pt", weights_only=True)
    assert set(rank_state) == {"optimizer", "scheduler", "rng"}
    assert (Path(cfg.run_dir) / "adapter" / "safety_adapter.safetensors").is_file()


def test_stage2_lowers_the_response_lm_loss(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    base, processor = load_base("tiny")
    torch.manual_seed(0)
    save_adapter(attach(base, SAFETY, processor), tmp_path / "stage1")
    cfg = Stage2Config(run_dir=str(tmp_path / "run" / "stage2"), model=ModelSpec("tiny"),
                       adapter=str(tmp_path / "stage1"), lora=LoraSpec(r=4, alpha=8),
                       data=DataConfig(train=str(data)), train=train_cfg(max_steps=8, lr=1e-2))
    model = build_stage2_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and "safety.llm_tokens" in trainable
    assert not any(n.startswith("safety.projector") for n in trainable)      # projector stays as stage 1 left it
    before = base_snapshot(model)
    summary = train_stage2(cfg, model)
    assert summary["lm_loss_after"] < 0.95 * summary["lm_loss_before"], summary
    assert base_snapshot(model) == before
    adapter = Path(summary["adapter"])
    assert {p.name for p in adapter.iterdir()} >= {"safety_adapter.safetensors", "safety_config.json",
                                                    "adapter_model.safetensors", "adapter_config.json"}


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    base, processor = load_base("tiny")
    torch.manual_seed(0)
    save_adapter(attach(base, SAFETY, processor), tmp_path / "stage1")
    runs = []
    for checkpointing in (False, True):
        cfg = Stage2Config(run_dir=str(tmp_path / f"gc-{checkpointing}"), model=ModelSpec("tiny"),
                           adapter=str(tmp_path / "stage1"), lora=LoraSpec(r=4, alpha=8), eval_records=4,
                           data=DataConfig(train=str(data)),
                           train=train_cfg(max_steps=3, lr=1e-2, gradient_checkpointing=checkpointing))
        model = build_stage2_model(cfg)
        train_stage2(cfg, model)
        assert model.plain_model.is_activation_checkpointing == checkpointing
        runs.append([json.loads(x)["loss"] for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()])
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)


def test_stage0_fine_tunes_the_plain_base_and_exports_it(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    cfg = Stage0Config(run_dir=str(tmp_path / "run" / "stage0"), model=ModelSpec("tiny"), safety=SAFETY,
                       data=DataConfig(train=str(data)), train=train_cfg(max_steps=6, lr=3e-3))
    summary = recipe("stage0").run_function(cfg)
    assert summary["lm_loss_after"] < summary["lm_loss_before"]
    model, processor = load_base(summary["model"])                  # a loadable save_pretrained folder
    assert sum(p.numel() for p in model.parameters()) > 0 and processor.tokenizer is not None
    # init_from: stage0 picks it up in the next stage of the same run
    nxt = Stage1Config(run_dir=str(tmp_path / "run" / "stage1"), init_from="stage0")
    assert Path(resolve_base_path(nxt)) == Path(summary["model"])


def test_nan_loss_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    cfg = stage1_cfg(tmp_path, data, lr=1e30, warmup_steps=0, save_every=1)   # a real divergence
    with pytest.raises(TrainingDiverged) as err:
        train_stage1(cfg, build_stage1_model(cfg))
    message = str(err.value)
    good = latest_checkpoint(cfg.run_dir)
    step = int(message.split(" at step ")[1].split(";")[0])
    assert step >= 2 and good.name == f"step-{step - 1:06d}"
    assert f"the last good checkpoint is {good}" in message
    assert not (Path(cfg.run_dir) / "adapter").exists()             # nothing exported from a diverged run


def test_resume_from_a_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    full = stage1_cfg(tmp_path / "a", data, max_steps=6, save_every=3)
    train_stage1(full, build_stage1_model(full))
    # a second run that stopped after step 3: its run folder holds only that checkpoint
    part = stage1_cfg(tmp_path / "b", data, max_steps=6, save_every=3)
    src, dst = Path(full.run_dir), Path(part.run_dir)
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step-000003", dst / "checkpoints" / "step-000003")
    (dst / "checkpoints" / "latest").write_text("step-000003")
    (dst / "checkpoints" / ".tmp-step-000004").mkdir()              # debris of a write killed midway
    shutil.copy(src / "before.json", dst / "before.json")
    summary = train_stage1(part, build_stage1_model(part), resume=True)
    assert summary["steps"] == 6
    a = load_file(str(src / "adapter" / "safety_adapter.safetensors"))
    b = load_file(str(dst / "adapter" / "safety_adapter.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (dst / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 5, 6]
    assert not (dst / "checkpoints" / ".tmp-step-000004").exists()


def test_resume_refuses_a_checkpoint_from_another_layout(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8)
    cfg = stage1_cfg(tmp_path, data, max_steps=2, save_every=2)
    train_stage1(cfg, build_stage1_model(cfg))
    other = stage1_cfg(tmp_path, data, max_steps=2, save_every=2, micro_batch_size=2)
    with pytest.raises(ValueError, match=r"micro_batch_size=4, this run has 2"):
        train_stage1(other, build_stage1_model(other), resume=True)


def test_bad_record_stops_before_training(tmp_path):
    data = red_blue_world(tmp_path / "world", n=8, bad_lines=(json.dumps({"id": "x", "image": "images/0.png",
                          "conversations": [{"from": "human", "value": "q"}], "safety_level": 9}),))
    cfg = stage1_cfg(tmp_path, data)
    with pytest.raises(RecordError, match=r"train.jsonl:9: field 'safety_level': label 9 out of range 0..3"):
        train_stage1(cfg, build_stage1_model(cfg))


def test_cli_trains_a_stage_from_a_run_yaml(tmp_path, capsys):
    data = red_blue_world(tmp_path / "world", n=8)
    config = tmp_path / "run.yaml"
    config.write_text(f"""run_dir: {tmp_path / 'run'}
model: {{path: tiny}}
safety: {{num_safety_tokens: 4, num_queries: 4, projector_depth: 1}}
stage1:
  data: {{train: {data}}}
  train: {{deepspeed: {ZERO2}, micro_batch_size: 4, max_steps: 2, torch_threads: 1, progress: false}}
""")
    assert cli_main(["train", "stage1", "--config", str(config), "train.lr=1e-3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["adapter"] == str(tmp_path / "run" / "stage1" / "adapter")
    assert cli_main(["train", "stage1", "--config", str(config), "train.lr=1e30", "train.save_every=1",
                     "train.max_steps=4", "train.warmup_steps=0", f"run_dir={tmp_path / 'nan'}"]) == 3
    assert "at step" in capsys.readouterr().err
    assert cli_main(["train", "stage1", "--config", str(config), "train.lr=-1"]) == 2
    assert "stage1: train.lr: must be > 0, got -1" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays():
    cosine = WarmupDecay(warmup=4, total=20, kind="cosine", min_ratio=0.1)
    values = [cosine(s) for s in range(20)]
    assert values[:4] == [0.2, 0.4, 0.6, 0.8] and values[4] == 1.0
    assert all(a >= b for a, b in zip(values[4:], values[5:])) and values[-1] > 0.1
    assert cosine(20) == pytest.approx(0.1)
    linear = WarmupDecay(warmup=0, total=10, kind="linear")
    assert [linear(s) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert WarmupDecay(warmup=2, total=10, kind="constant")(9) == 1.0


def test_deepspeed_config_fills_auto_values(tmp_path):
    cfg = TrainConfig(deepspeed=ZERO2, micro_batch_size=4, global_batch_size=32, lr=2e-5, grad_clip=0.5)
    ds = deepspeed_config(cfg, world_size=2)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 4, 32)
    assert ds["optimizer"]["params"]["lr"] == 2e-5 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is torch.cuda.is_available()
    with pytest.raises(ConfigError, match="global_batch_size: 32 is not a multiple of micro_batch_size x processes"):
        deepspeed_config(cfg, world_size=3)
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({**json.loads(Path(ZERO2).read_text()), "zero_optimization": {"stage": "auto"}}))
    with pytest.raises(ValueError, match="zero_optimization.stage: 'auto' is not a value the trainer can fill"):
        deepspeed_config(TrainConfig(deepspeed=str(odd)), 1)


def test_stage_configs_from_a_run_yaml():
    tiny = REPO / "configs" / "tiny.yaml"
    s1 = recipe("stage1").load_config(tiny, ["train.lr=0.5"])
    assert s1.run_dir == "checkpoints/tiny/stage1" and s1.train.lr == 0.5
    assert s1.safety.num_safety_tokens == 4                        # shared `safety` section
    assert resolve_base_path(s1) == str(Path("checkpoints/tiny/stage0/model"))
    s2 = recipe("stage2").load_config(tiny)
    assert s2.start_adapter == Path("checkpoints/tiny/stage1/adapter")
    for paper in ("llava-1.5-7b.yaml", "llava-v1.6-mistral-7b.yaml"):
        one, two = (recipe(s).load_config(REPO / "configs" / paper) for s in ("stage1", "stage2"))
        assert (one.train.lr, one.train.epochs, one.train.global_batch_size) == (1e-5, 3, 128)
        assert (two.lora.r, two.lora.alpha, two.train.lr, two.train.epochs) == (256, 16, 1e-5, 3)
        assert one.train.deepspeed.endswith("zero2.json") and one.train.precision == "auto"
    with pytest.raises(ConfigError, match=r"stage1: train.lrr: unknown key"):
        recipe("stage1").load_config(tiny, ["train.lrr=1"])
    # the pipeline's way: a parsed section plus the run's shared settings
    cfg = recipe("stage1").config_for_run(Stage1Section(), run_root="runs/x", seed=3, model=ModelSpec("tiny-next"),
                                          safety=SAFETY)
    assert (cfg.run_dir, cfg.seed, cfg.model.path, cfg.safety) == (str(Path("runs/x/stage1")), 3, "tiny-next", SAFETY)


def test_a_lone_process_whose_port_was_taken_picks_another(tmp_path):
    """Two runs side by side: the port a lone run picked is bound by someone else before its store
    starts. The run must move to another port, not fail (a real socket holds the first port)."""
    import subprocess
    import sys

    script = tmp_path / "lone.py"
    script.write_text(
        "import os, socket, torch.distributed as dist\n"
        "import runtime.distributed as engine\n"
        "held = socket.socket(); held.bind(('127.0.0.1', 0)); held.listen()\n"
        "ports = iter([held.getsockname()[1], engine._free_port()])\n"
        "engine._free_port = lambda: next(ports)\n"
        "ctx = engine.setup(group_of_one=True); rank, world = ctx.rank, ctx.world_size\n"
        "print(rank, world, os.environ['MASTER_PORT'] != str(held.getsockname()[1]))\n")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0 1 True"


def test_a_subprocess_of_a_lone_run_starts_its_own_group():
    """The pipeline test's situation: this process holds a group of one (its store listens on the
    port in MASTER_PORT), and a `safevlm` subprocess inherits RANK/WORLD_SIZE/MASTER_PORT. The child
    must not take them for a launcher's and bind the parent's port."""
    import os
    import subprocess
    import sys

    from runtime.distributed import setup

    ctx = setup(group_of_one=True)
    assert (ctx.rank, ctx.world_size) == (0, 1)
    script = "import runtime.distributed as d; c = d.setup(group_of_one=True); print(c.rank, c.world_size)"
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0 1"
