"""Rollouts for PPO: sample answers with the safety modules active, then score them token by token.

One trunk serves three roles: the policy (the trained LoRA), the reference (the frozen starting
policy: the same base with a frozen copy of the starting LoRA and a snapshot of the safety tokens,
training/rl/reference.py) and the value function (a linear head on the policy's last hidden state).
The vision tower runs once per rollout; its features are reused by every later forward pass of the
PPO epochs (the vision tower and both projectors are frozen in PPO).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from safety_modules.attach import EncodedImages, SafetyVLM
from training.logprobs import entropy_from_logits, token_logprobs
from training.rl.reference import StartingPolicy


class ValueHead(nn.Module):
    """V(s) from the policy trunk's last hidden state: one linear layer, zero-initialised."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.to(self.proj.weight.dtype)).squeeze(-1)


class PolicyWithValue(nn.Module):
    """The module DeepSpeed trains in PPO: the attached VLM, its value head and its KL reference.

    The reference is `model` as it is at construction (build it after choosing what is trainable):
    `reference_logits` computes with that frozen start whatever the policy has learnt since.
    """

    def __init__(self, model: SafetyVLM) -> None:
        super().__init__()
        self.model = model
        device = next(model.safety.parameters()).device
        self.value_head = ValueHead(model.config.text_config.hidden_size).to(device)
        self.reference = StartingPolicy(model).to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: EncodedImages,
                response_start: int, with_value: bool = True) -> dict[str, torch.Tensor]:
        """Logits (and values) at the positions that predict the response tokens.

        Only those positions' logits are computed (`logits_to_keep`): the (T, vocab) logits of the
        prompt and image tokens would be the largest tensor of a 7B forward and are never used. The
        response span goes to the model as `prompt_mask` (a prefix-LM family attends within the
        prompt both ways, within the response causally).
        """
        keep = input_ids.shape[1] - response_start + 1
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        prompt_mask = (positions < response_start).expand_as(input_ids)
        out = self.model(input_ids, attention_mask, images=images, run_head=False, prompt_mask=prompt_mask,
                         output_hidden_states=with_value, logits_to_keep=keep)
        logits = out.logits[:, -keep:-1]
        result = {"logits": logits}
        if with_value:
            result["values"] = self.value_head(out.hidden_states[-1][:, response_start - 1:-1])
        return result

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: EncodedImages,
                         response_start: int) -> torch.Tensor:
        """`forward`'s logits under the frozen starting policy (reference LoRA, snapshot of the safety tensors)."""
        with self.reference.active(self.model) as snapshot:
            out = functional_call(self, {f"model.{name}": t for name, t in snapshot.items()},
                                  (input_ids, attention_mask, images, response_start), {"with_value": False})
        return out["logits"]


@dataclass
class Rollout:
    """One batch of sampled answers and everything PPO needs about them."""

    input_ids: torch.Tensor        # (B, P + R) prompt (left-padded) + response (right-padded)
    attention_mask: torch.Tensor
    response: torch.Tensor         # (B, R)
    response_mask: torch.Tensor    # (B, R), 1 up to and including the first EOS
    images: EncodedImages
    prompt_len: int
    texts: list[str]


def response_mask_from(tokens: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """1 on real response tokens up to and including the first EOS, 0 after it."""
    is_eos = tokens == eos_id
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    mask = ~after_eos
    if pad_id != eos_id:
        mask &= tokens != pad_id
    return mask.long()


@torch.no_grad()
def sample(policy: PolicyWithValue, batch: dict[str, torch.Tensor], tokenizer, max_new_tokens: int,
           temperature: float, top_p: float, do_sample: bool = True, **generate_kwargs) -> Rollout:
    """Batched sampling with KV cache and left padding; the vision tower runs once.

    `generate_kwargs` go to HF generate, e.g. `synced_gpus=True` under multi-process ZeRO-3 (every
    rank must run the same number of forward passes while the parameters are gathered).
    """
    model = policy.model
    images = model.encode_images(**model.image_inputs(batch))
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
    gen_kwargs.update(generate_kwargs)
    response = model.generate(batch["input_ids"], batch["attention_mask"], images=images, **gen_kwargs)
    mask = response_mask_from(response, tokenizer.eos_token_id, tokenizer.pad_token_id)
    empty = mask.sum(dim=1) == 0
    if bool(empty.any()):  # a response that is pad only: keep its first token so it can be scored
        mask[empty, 0] = 1
    response = torch.where(mask.bool(), response, torch.full_like(response, tokenizer.pad_token_id))
    texts = tokenizer.batch_decode(response, skip_special_tokens=True)
    return Rollout(
        input_ids=torch.cat([batch["input_ids"], response], dim=1),
        attention_mask=torch.cat([batch["attention_mask"], mask], dim=1),
        response=response, response_mask=mask, images=images,
        prompt_len=batch["input_ids"].shape[1], texts=[t.strip() for t in texts],
    )


def select(rollout: Rollout, index: torch.Tensor | list[int]) -> Rollout:
    """The rows `index` of a rollout (a PPO minibatch); vision features are reused, not recomputed."""
    idx = torch.as_tensor(index, dtype=torch.long)
    rows = idx.tolist()
    images = rollout.images.select(rows)
    dev = rollout.input_ids.device
    return Rollout(input_ids=rollout.input_ids[idx.to(dev)], attention_mask=rollout.attention_mask[idx.to(dev)],
                   response=rollout.response[idx.to(dev)], response_mask=rollout.response_mask[idx.to(dev)],
                   images=images, prompt_len=rollout.prompt_len, texts=[rollout.texts[i] for i in rows])


@torch.no_grad()
def score_tokens(policy: PolicyWithValue, rollout: Rollout, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """Old log-probs, values and entropy under the policy; log-probs under the reference (the frozen start).

    Logits are divided by the sampling `temperature`, so the log-probs are those of the
    distribution the answers were drawn from (PPO's importance ratio starts at exactly 1).
    """
    out = policy(rollout.input_ids, rollout.attention_mask, rollout.images, rollout.prompt_len)
    ref = policy.reference_logits(rollout.input_ids, rollout.attention_mask, rollout.images, rollout.prompt_len)
    logits, ref_logits = out["logits"].float() / temperature, ref.float() / temperature
    return {
        "logp": token_logprobs(logits, rollout.response),
        "ref_logp": token_logprobs(ref_logits, rollout.response),
        "values": out["values"].float(),
        "entropy": entropy_from_logits(logits),
    }
