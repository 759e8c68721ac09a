"""Batches of training records for any attached family (or a plain processor, for stage 0).

Text of a sample: `build_prompt(processor, question) + " " + answer + eos` -- the one prompt format
the guard, the evaluator and PPO use too (a processor that takes the response as a `suffix` gets it
so: `encode_batch`). Padding is on the right (training). Labels are -100 on the
prompt (image placeholders included) and on padding, so the LM loss sees the response and its
end-of-sequence token only; decoding the label positions gives back exactly " " + answer + eos.

How the prompt length is found: the processor encodes the prompt alone with its image, so every
token its image expansion adds (placeholders, safety slots, the row/column or start/end markers some
families write) is counted. The full sequence must start with exactly those prompt tokens; if a
tokenizer merged a token across the prompt/answer boundary, that is an error -- the reference code
corrupted its targets silently.

Every other tensor the processor returns (`image_sizes`, `image_grid_thw`, pixel masks, token types)
is carried by its name, so each family's model gets the image inputs it needs.
"""

from __future__ import annotations

from typing import Any

import torch

from safety_modules.images import MAX_IMAGE_PIXELS, load_image
from safety_modules.labels import IGNORE_INDEX
from safety_modules.prompting import build_prompt, encode_batch

# Processor outputs with one entry per token: cut together with input_ids under max_length.
PER_TOKEN_KEYS = ("attention_mask", "mm_token_type_ids", "token_type_ids")
# What only the safety head reads; a plain base model takes every other key of a batch.
HEAD_LABEL_KEYS = ("safety_labels", "risk_labels")


def plain_model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch's inputs for the plain base model (whatever image inputs its family has)."""
    return {k: v for k, v in batch.items() if k not in HEAD_LABEL_KEYS}


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str,
              dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A collated batch on `device`, its floating-point tensors (pixels) in the model's `dtype`."""
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}


class TrainingCollator:
    """rows (dicts of training/records.FEATURES) -> model inputs + labels.

    Returns input_ids, attention_mask, pixel_values and the processor's other outputs by name
    (image_sizes, image_grid_thw, ...), labels, safety_labels, risk_labels. With `with_response=False` only the prompt is encoded (stage 1: the
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

    def texts(self, row: dict[str, Any]) -> tuple[str, str | None]:
        """(prompt, response or None) of one record; `encode_batch` ends the response with EOS."""
        prompt = build_prompt(self.processor, row["question"])
        if not self.with_response or not row.get("answer"):
            return prompt, None
        return prompt, f" {row['answer']}"

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [load_image(row["image"], self.max_image_pixels) for row in rows]
        prompts, responses = zip(*(self.texts(row) for row in rows))
        enc = dict(encode_batch(self.processor, images, list(prompts), list(responses), return_tensors="pt",
                                padding="longest", padding_side="right"))
        input_ids, attention_mask = enc.pop("input_ids"), enc["attention_mask"]
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        lengths = [self._prompt_length(input_ids[i], image, prompt, row)
                   for i, (image, prompt, row) in enumerate(zip(images, prompts, rows))]
        for i, n_prompt in enumerate(lengths):
            labels[i, :n_prompt] = IGNORE_INDEX
        if self.max_length and input_ids.shape[1] > self.max_length:
            self._check_fits(lengths, rows)
            cut = slice(0, self.max_length)
            input_ids, labels = input_ids[:, cut], labels[:, cut]
            enc.update({key: enc[key][:, cut] for key in PER_TOKEN_KEYS if key in enc})
        return {
            "input_ids": input_ids,
            **enc,
            "labels": labels,
            "safety_labels": torch.tensor([row["safety_level"] for row in rows], dtype=torch.long),
            "risk_labels": torch.tensor([row["risk_type"] for row in rows], dtype=torch.long),
        }

    def _prompt_length(self, full: torch.Tensor, image, prompt: str, row: dict[str, Any]) -> int:
        """Tokens of the prompt with its image expanded; an error unless `full` starts with them."""
        prompt_ids = encode_batch(self.processor, [image], [prompt])["input_ids"][0]
        prompt_ids = list(prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)
        length = len(prompt_ids)
        if full[:length].tolist() != prompt_ids:
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
