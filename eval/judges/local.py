"""A judge from a local `transformers` causal LM folder, prompted with the same rubric.

Why: for machines with no API, any instruction-tuned model saved with `save_pretrained` can judge.
Two modes:
- `generate` (default): greedy generation of a short reply, score parsed as for the API judge;
  a reply without a score is a failed judgement.
- `logits`: the prompt ends with "Score:" and the score is the most likely of the numbers 1..10
  that are single tokens (with digit-split tokenizers, 1..9). Always yields a score; use it for
  small models that will not follow the reply format.
The judge reads text only (the rubric, question, answer, and reference if any).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.core.cache import Cache, content_key
from eval.core.models import folder_fingerprint
from eval.judges.base import RUBRIC_VERSION, JudgeError, JudgeRequest, Judgement, read_score, rubric_prompt, score_error


class LocalJudge:
    def __init__(self, path: str | Path, device: str = "cpu", mode: str = "generate", max_new_tokens: int = 48,
                 batch_size: int = 8, cache: Cache | None = None, dtype: torch.dtype | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise JudgeError(f"judge local: model folder not found: {self.path}")
        if mode not in ("generate", "logits"):
            raise JudgeError(f"judge local: mode must be 'generate' or 'logits', got {mode!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if not any(self.path.glob("*.safetensors")):
            raise JudgeError(f"judge local: {self.path} holds no .safetensors weights (pickled weights are never "
                             "read: use_safetensors=True)")
        self.model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True, dtype=dtype,
                                                          use_safetensors=True).to(device)
        self.model.eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.mode = mode
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.cache = cache
        self.name = f"local:{self.path.name}"
        self._fingerprint = folder_fingerprint(self.path)

    def _prompt(self, request: JudgeRequest) -> str:
        system, user = rubric_prompt(request)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}],
                tokenize=False, add_generation_prompt=True)
        else:
            text = f"{system}\n\n{user}\n\n"
        return text + ("Score:" if self.mode == "logits" else "")

    def _key(self, prompt: str) -> str:
        return content_key("judge/local", RUBRIC_VERSION, self._fingerprint, self.mode, self.max_new_tokens, prompt)

    def _score_tokens(self) -> dict[int, int]:
        """token id -> score, for the numbers 1..10 that are one token (with or without a leading space)."""
        out: dict[int, int] = {}
        for value in range(1, 11):
            for text in (f" {value}", str(value)):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if len(ids) == 1 and ids[0] not in out:
                    out[ids[0]] = value
        if not out:
            raise JudgeError(f"judge local {self.path}: no number 1..10 is a single token: use mode 'generate'")
        return out

    @torch.no_grad()
    def _run(self, prompts: list[str]) -> list[Judgement]:
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        if self.mode == "logits":
            logits = self.model(**batch).logits[:, -1, :].float()
            table = self._score_tokens()
            ids = torch.tensor(list(table), device=logits.device)
            best = logits[:, ids].argmax(dim=-1).tolist()
            return [Judgement(score=float(table[int(ids[b])]), raw=f"logits: {table[int(ids[b])]}") for b in best]
        out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        texts = self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        results = []
        for text in texts:
            score, problem = read_score(text)
            results.append(Judgement(score=score, raw=text, error=None if score is not None else score_error(text, problem)))
        return results

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        prompts = [self._prompt(r) for r in requests]
        results: list[Judgement | None] = [None] * len(prompts)
        todo = []
        for i, prompt in enumerate(prompts):
            hit = self.cache.get(self._key(prompt), require=("score", "raw")) if self.cache is not None else None
            if hit is not None:
                results[i] = Judgement(score=hit["score"], raw=hit["raw"], cached=True)
            else:
                todo.append(i)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            for i, judgement in zip(chunk, self._run([prompts[i] for i in chunk])):
                results[i] = judgement
                if judgement.score is not None and self.cache is not None:
                    self.cache.put(self._key(prompts[i]), {"score": judgement.score, "raw": judgement.raw})
        return results  # type: ignore[return-value]
