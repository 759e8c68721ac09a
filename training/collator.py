"""Batches of training records for any attached family (or a plain processor, for stage 0).

Text of a sample: `build_prompt(processor, question) + " " + answer + eos` -- the one prompt format
the guard, the evaluator and PPO use too. Padding is on the right (training). Labels are -100 on the
prompt (image placeholders included) and on padding, so the LM loss sees the response and its
end-of-sequence token only; decoding the label positions gives back exactly " " + answer + eos.

How the prompt length is found: the prompt is tokenized alone (no image expansion), and the number
of image placeholders the processor actually laid out is added. The full sequence must start with
exactly those prompt tokens; if a tokenizer merged a token across the prompt/answer boundary, that
is an error -- the reference code corrupted its targets silently.
"""

from __future__ import annotations

from typing import Any

import torch

from safety_modules.images import MAX_IMAGE_PIXELS, load_image
from safety_modules.prompting import build_prompt, response_suffix

IGNORE_INDEX = -100


def _collapse_runs(ids: list[int], token: int) -> list[int]:
    """Each run of `token` shortened to one: the prompt as written, before image expansion."""
    return [t for i, t in enumerate(ids) if not (t == token and i and ids[i - 1] == token)]


class TrainingCollator:
    """rows (dicts of training/records.FEATURES) -> model inputs + labels.

    Returns input_ids, attention_mask, pixel_values (+ image_sizes for LLaVA-NeXT), labels,
    safety_labels, risk_labels. With `with_response=False` only the prompt is encoded (stage 1: the
    head reads the prompt, exactly what the guard sees at inference) and every label is -100.
    Use the processor returned by `attach()` for attached models, the plain one for a plain base.
    """

    def __init__(self, processor, with_response: bool = True, max_length: int = 0,
                 max_image_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.with_response = with_response
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.eos = response_suffix(processor)
        self.image_token_id = getattr(processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)

    def texts(self, row: dict[str, Any]) -> tuple[str, str]:
        """(prompt, full training text) of one record."""
        prompt = build_prompt(self.processor, row["question"])
        if not self.with_response or not row.get("answer"):
            return prompt, prompt
        return prompt, f"{prompt} {row['answer']}{self.eos}"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [load_image(row["image"], self.max_image_pixels) for row in rows]
        prompts, texts = zip(*(self.texts(row) for row in rows))
        enc = self.processor(images=images, text=list(texts), return_tensors="pt",
                             padding="longest", padding_side="right")
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        prompt_ids = self.tokenizer(list(prompts))["input_ids"]
        lengths = [self._prompt_length(input_ids[i], prompt_ids[i], row) for i, row in enumerate(rows)]
        for i, n_prompt in enumerate(lengths):
            labels[i, :n_prompt] = IGNORE_INDEX
        if self.max_length and input_ids.shape[1] > self.max_length:
            self._check_fits(lengths, rows)
            cut = slice(0, self.max_length)
            input_ids, attention_mask, labels = input_ids[:, cut], attention_mask[:, cut], labels[:, cut]
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": enc["pixel_values"],
            "labels": labels,
            "safety_labels": torch.tensor([row["safety_level"] for row in rows], dtype=torch.long),
            "risk_labels": torch.tensor([row["risk_type"] for row in rows], dtype=torch.long),
        }
        if "image_sizes" in enc:
            batch["image_sizes"] = enc["image_sizes"]
        return batch

    def _prompt_length(self, full: torch.Tensor, prompt: list[int], row: dict[str, Any]) -> int:
        token = self.image_token_id
        n_slots = int((full == token).sum())
        length = len(prompt) - prompt.count(token) + n_slots
        head = full[:length].tolist()
        if _collapse_runs(head, token) != _collapse_runs(prompt, token):
            raise ValueError(f"{row.get('source', row.get('id'))}: the prompt's tokens change when the answer "
                             "is appended (the tokenizer merges across the boundary), so the prompt cannot "
                             "be masked exactly")
        return length

    def _check_fits(self, prompt_lengths: list[int], rows: list[dict[str, Any]]) -> None:
        """Truncation cuts responses only: a prompt (with its image) that does not fit is an error."""
        for length, row in zip(prompt_lengths, rows):
            where = row.get("source", row.get("id"))
            if length > self.max_length:
                raise ValueError(f"{where}: the prompt alone is {length} tokens, over max_length={self.max_length}")
            if length == self.max_length and self.with_response and row.get("answer"):
                raise ValueError(f"{where}: no response token fits in max_length={self.max_length}")
