"""PPO's KL reference is the frozen starting policy: the stage-2 LoRA, safety tokens and modules at step 0.

On the tiny LLaVA with test_ppo.py's setup (a stage-2 adapter whose LoRA changes the model, a
really trained reward classifier) and real one-process ZeRO-2 PPO steps:
- the reference's logits are those of a fresh model carrying the stage-2 adapter, so the KL of the
  first rollout is 0, while the old reference (LoRA disabled) is far from it on the same rollout;
- PPO updates that move the policy's log-probabilities (through the LoRA and the safety tokens)
  leave the reference's log-probabilities of a fixed rollout bit for bit as they were;
- a run resumed from a checkpoint has the trained policy back and the same reference (rebuilt from
  the starting adapter: checkpoints hold no reference tensor);
- `save_adapter` on the trained policy writes a plain adapter (files and tensor names of stage 2's,
  one LoRA) that reproduces the policy's logits on a fresh base;
- a tensor made trainable after the reference was taken is refused (fail closed), and a reference
  pass leaves the active adapter and the trainable set as they were.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safety_modules import load_adapter, save_adapter
from base_models.loading import load_base
from test_ppo import ppo_config, prompt_rows, setup  # noqa: F401  (setup: the shared module fixture)
from training.logprobs import token_logprobs
from training.rl.losses import kl_estimate
from training.rl.reference import REFERENCE_ADAPTER
from training.rl.rollout import sample, score_tokens
from training.rl.trainer import PromptCollator

STEPS = 2


def build_policy(setup, run_dir: Path, **train_kw):
    from training.recipes.ppo import build_ppo_model

    cfg = ppo_config(setup, run_dir, **train_kw)
    return cfg, build_ppo_model(cfg).eval()


def fixed_rollout(policy, setup, seed: int = 3):
    batch = PromptCollator(policy.model.processor)(prompt_rows(setup["data"], 4))
    torch.manual_seed(seed)
    return sample(policy, batch, policy.model.processor.tokenizer, max_new_tokens=8, temperature=1.0, top_p=1.0)


def log_probs(policy, rollout) -> dict[str, torch.Tensor]:
    """Policy and reference log-probs of the rollout's tokens, the policy in eval mode."""
    policy.eval()
    scored = score_tokens(policy, rollout)
    return {"policy": scored["logp"], "reference": scored["ref_logp"]}


def trainer_for(cfg, policy):
    from training.recipes.ppo import classifier_path, load_prompts
    from training.rl.reward import ClassifierReward
    from training.rl.trainer import PPOTrainer

    reward = ClassifierReward.load(classifier_path(cfg), kind=cfg.reward, device="cpu")
    return PPOTrainer(policy, load_prompts(cfg, policy), reward, cfg.train, cfg.rollout, cfg.algo, cfg.run_dir,
                      seed=cfg.seed)


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):  # noqa: F811
    """A policy before and after STEPS real PPO steps (checkpoint at the last), with a fixed rollout."""
    run_dir = tmp_path_factory.mktemp("ppo_ref") / "run"
    cfg, policy = build_policy(setup, run_dir, max_steps=STEPS, save_every=STEPS)
    rollout = fixed_rollout(policy, setup)
    start = log_probs(policy, rollout)
    start_tokens = policy.model.safety.llm_tokens.detach().clone()
    trainer_for(cfg, policy).fit()
    return {"cfg": cfg, "policy": policy, "rollout": rollout, "start": start, "after": log_probs(policy, rollout),
            "start_tokens": start_tokens}


def test_first_rollout_kl_is_zero_and_lora_disabled_is_not_the_start(setup, tmp_path):  # noqa: F811
    _, policy = build_policy(setup, tmp_path / "run")
    rollout = fixed_rollout(policy, setup, seed=0)
    scored = score_tokens(policy, rollout)
    mask = rollout.response_mask.float()
    for kind in ("k1", "k3"):
        assert (kl_estimate(scored["logp"], scored["ref_logp"], kind) * mask).abs().max() <= 1e-6

    # The reference is the stage-2 model itself: a fresh base with the stage-2 adapter, recomputed here.
    base, processor = load_base("tiny")
    start = load_adapter(base, setup["stage2"], processor).eval()
    pixels = PromptCollator(start.processor)(prompt_rows(setup["data"], 4))["pixel_values"]   # the rollout's images
    P = rollout.prompt_len
    with torch.no_grad():
        logits = start(rollout.input_ids, rollout.attention_mask, pixel_values=pixels, run_head=False).logits
    torch.testing.assert_close(scored["ref_logp"], token_logprobs(logits[:, P - 1:-1].float(), rollout.response),
                               rtol=0, atol=1e-6)

    # Negative control: the old reference (the same trunk with its LoRA disabled) on the same rollout.
    with torch.no_grad(), policy.model.base.disable_adapter():
        old = policy(rollout.input_ids, rollout.attention_mask, rollout.images, P, with_value=False)["logits"]
    old_kl = ((scored["logp"] - token_logprobs(old.float(), rollout.response)) * mask).sum(dim=1)
    assert old_kl.mean() > 0.1, old_kl


def test_reference_log_probs_stay_fixed_while_ppo_moves_the_policy(trained):
    start, after = trained["start"], trained["after"]
    mask = trained["rollout"].response_mask.bool()
    assert torch.equal(start["reference"], after["reference"])
    assert torch.equal(start["reference"], start["policy"])                    # step 0: reference = policy
    assert (after["policy"] - start["policy"])[mask].abs().max() > 1e-3       # the updates moved the policy ...
    model = trained["policy"].model
    assert not torch.equal(model.safety.llm_tokens.detach(), trained["start_tokens"])   # ... its safety tokens too,
    assert torch.equal(trained["policy"].reference.snapshot()["llm_tokens"], trained["start_tokens"])   # not these
    assert not any(p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n)


def test_resume_rebuilds_the_same_reference_from_the_starting_adapter(trained):
    from training.recipes.ppo import build_ppo_model

    cfg = trained["cfg"]
    checkpoint = Path(cfg.run_dir) / "checkpoints" / f"step-{STEPS:06d}"
    saved = load_file(str(checkpoint / "trainable.safetensors"))
    assert not [n for n in saved if REFERENCE_ADAPTER in n]                  # no reference tensor in checkpoints
    policy = build_ppo_model(cfg)
    trainer = trainer_for(cfg, policy)
    assert trainer.resume() and trainer.step == STEPS
    resumed = log_probs(policy, trained["rollout"])
    assert torch.equal(resumed["policy"], trained["after"]["policy"])        # the trained policy is back
    assert torch.equal(resumed["reference"], trained["start"]["reference"])  # and the reference is the start


def test_saved_adapter_is_a_plain_adapter_reproducing_the_policy(trained, setup, tmp_path):  # noqa: F811
    model = trained["policy"].model.eval()
    out = save_adapter(model, tmp_path / "adapter")
    stage2 = setup["stage2"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in stage2.iterdir())
    for name in ("safety_adapter.safetensors", "adapter_model.safetensors"):
        assert set(load_file(str(out / name))) == set(load_file(str(stage2 / name)))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config == json.loads((stage2 / "adapter_config.json").read_text())
    base, processor = load_base("tiny")
    fresh = load_adapter(base, out, processor).eval()
    assert set(fresh.base.peft_config) == {"default"}
    batch = PromptCollator(model.processor)(prompt_rows(setup["data"], 3))
    with torch.no_grad():
        ours, theirs = model(**batch), fresh(**batch)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.safety_logits, theirs.safety_logits)


def test_reference_refuses_a_trainable_tensor_it_did_not_copy(setup, tmp_path):  # noqa: F811
    _, policy = build_policy(setup, tmp_path / "run")
    rollout = fixed_rollout(policy, setup)
    policy.model.safety.head.requires_grad_(True)          # trained now, but read live by a reference pass
    with pytest.raises(ValueError, match=r"trainable tensors \['safety\.head\..*not in the frozen starting policy"):
        score_tokens(policy, rollout)
    policy.model.safety.head.requires_grad_(False)
    base = policy.model.base
    lora_flags = {n: p.requires_grad for n, p in base.named_parameters() if "lora_" in n}
    assert set(lora_flags.values()) == {True, False}       # the trained LoRA and its frozen copy
    score_tokens(policy, rollout)                           # a reference pass leaves the trainable set as it was
    assert lora_flags == {n: p.requires_grad for n, p in base.named_parameters() if "lora_" in n}
    assert base.active_adapter == "default"


def test_a_second_ppo_run_on_the_same_folder_is_refused(setup, tmp_path):  # noqa: F811
    """PPO's trainer takes the run folder's lock like the supervised engine, from Python too."""
    import subprocess
    import sys

    from runtime import runlock

    run_dir = tmp_path / "run"
    cfg, policy = build_policy(setup, run_dir, max_steps=1)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from runtime import runlock; "
                               "runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLockError, match=f"in use by another run \\(pid {holder.pid} "):
            trainer_for(cfg, policy)
    finally:
        holder.kill()
        holder.wait()
    assert not list(run_dir.glob("checkpoints/*"))
