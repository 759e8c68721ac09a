"""Greedy decoding by one full forward per token, no KV cache (imported by test modules).

Why: `generate(inputs_embeds=...)` always uses a cache (transformers forces it for embeddings), so
`use_cache=False` proves nothing there; this loop recomputes the whole sequence, extras included,
for every token, and is what the cached generation must equal.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_by_full_forwards(model, batch: dict, new_tokens: int, suppress: list[int]) -> torch.Tensor:
    """`new_tokens` greedy tokens per row of a left-padded `batch`, never choosing `suppress` ids."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    images = model.encode_images(**model.image_inputs(batch))
    prompt_length = ids.shape[1]
    chosen = []
    for _ in range(new_tokens):
        prompt = (torch.arange(ids.shape[1]) < prompt_length).expand_as(ids)  # the tokens chosen are response
        logits = model(input_ids=ids, attention_mask=mask, images=images, prompt_mask=prompt,
                       run_head=False).logits[:, -1].clone()
        logits[:, suppress] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        chosen.append(token)
        ids = torch.cat([ids, token], dim=1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
    return torch.cat(chosen, dim=1)


def eos_ids(model) -> list[int]:
    """The end-of-sequence ids `min_new_tokens` keeps from being generated."""
    eos = model.plain_model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])
