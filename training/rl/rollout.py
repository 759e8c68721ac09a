"""Rollouts for PPO: sample answers with the safety modules active, then score them token by token.

One trunk serves three roles: the policy (LoRA on), the reference (the same weights under
`disable_adapter()`, no second copy) and the value function (a linear head on the policy's last
hidden state). The vision tower runs once per rollout; its features are reused by every later
forward pass of the PPO epochs (the vision tower and both projectors are frozen in PPO).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from safety_modules.attach import EncodedImages, SafetyVLM
from training.rl.losses import entropy_from_logits, token_logprobs


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
    """The module DeepSpeed trains in PPO: the attached VLM plus its value head."""

    def __init__(self, model: SafetyVLM) -> None:
        super().__init__()
        self.model = model
        self.value_head = ValueHead(model.config.text_config.hidden_size).to(next(model.safety.parameters()).device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: EncodedImages,
                response_start: int, with_value: bool = True) -> dict[str, torch.Tensor]:
        """Logits (and values) at the positions that predict the response tokens."""
        out = self.model(input_ids, attention_mask, images=images, run_head=False,
                         output_hidden_states=with_value)
        logits = out.logits[:, response_start - 1:-1]
        result = {"logits": logits}
        if with_value:
            result["values"] = self.value_head(out.hidden_states[-1][:, response_start - 1:-1])
        return result


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
           temperature: float, top_p: float, do_sample: bool = True) -> Rollout:
    """Batched sampling with KV cache and left padding; the vision tower runs once."""
    model = policy.model
    images = model.encode_images(batch["pixel_values"], batch.get("image_sizes"))
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p)
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


@torch.no_grad()
def score_tokens(policy: PolicyWithValue, rollout: Rollout) -> dict[str, torch.Tensor]:
    """Old log-probs, values and entropy under the policy; log-probs under the reference (LoRA off)."""
    out = policy(rollout.input_ids, rollout.attention_mask, rollout.images, rollout.prompt_len)
    base = policy.model.base
    ref_ctx = base.disable_adapter() if hasattr(base, "disable_adapter") else nullcontext()
    with ref_ctx:
        ref = policy(rollout.input_ids, rollout.attention_mask, rollout.images, rollout.prompt_len, with_value=False)
    return {
        "logp": token_logprobs(out["logits"], rollout.response),
        "ref_logp": token_logprobs(ref["logits"], rollout.response),
        "values": out["values"].float(),
        "entropy": entropy_from_logits(out["logits"]),
    }
