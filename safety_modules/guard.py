"""The guard: a safety verdict with no text generation, and a policy that acts on it.

Why: the reference code ran two full passes (and the vision tower twice) and its hint text carried
a literal unfilled placeholder. Here a verdict costs the vision tower, the safety projector, the
prompt's embeddings and the head; a guarded generate reuses those vision features, and every
template is filled and checked before use.

Why it fails closed: an argmax over NaN logits is class 0, "safe, pass". A head output that is not
finite is never a verdict: it is a GuardError, or (policy `on_nonfinite: refuse`) a refusal marked
with the error.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import torch

from safety_modules.attach import SafetyVLM
from safety_modules.prompting import build_prompt, encode_batch

DEFAULT_GUARD_PROMPT = "Is this image safe for viewing on social media?"
NONFINITE_ACTIONS = ("error", "refuse")
UNKNOWN_RISK = "unknown"


class GuardError(ValueError):
    """The guard cannot give a verdict (the safety head's output is NaN/inf)."""


@dataclass
class GuardPolicy:
    """Maps a verdict to an action before generation. Levels: 0 = safe ... max = serious."""

    refuse_at_level: int = 2
    instruct_at_level: int = 1
    refusal_template: str = ("I'm sorry, but I can't help with this image: it appears to contain "
                             "{risk_type} content (safety level {level}).")
    instruction_template: str = ("Note: the image may contain {risk_type} content. Answer safely and "
                                 "decline anything harmful. ")
    on_nonfinite: str = "error"          # NaN/inf head output: "error" (GuardError) or "refuse"

    def __post_init__(self) -> None:
        allowed = {"risk_type", "level"}
        for name in ("refusal_template", "instruction_template"):
            try:
                # None: literal text only; "" is a positional `{}`, which fill() could never satisfy.
                fields = {f for _, f, _, _ in string.Formatter().parse(getattr(self, name)) if f is not None}
            except ValueError as exc:  # unbalanced braces
                raise ValueError(f"{name}: not a valid template ({exc}); write a literal brace as '{{{{' or '}}}}'") from None
            if not fields <= allowed:
                unknown = sorted(repr(f) if f else "'{}' (positional)" for f in fields - allowed)
                raise ValueError(f"{name}: unknown placeholder(s) {', '.join(unknown)}; allowed: {sorted(allowed)}")
        if self.instruct_at_level > self.refuse_at_level:
            raise ValueError("instruct_at_level must not exceed refuse_at_level")
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite: must be one of {list(NONFINITE_ACTIONS)}, got {self.on_nonfinite!r}")

    def action(self, level: int) -> str:
        if level >= self.refuse_at_level:
            return "refuse"
        if level >= self.instruct_at_level:
            return "instruct"
        return "pass"

    def fill(self, template: str, verdict: "Verdict") -> str:
        return template.format(risk_type=verdict.risk_type, level=verdict.level)


@dataclass
class Verdict:
    level: int
    risk_type: str
    level_probs: list[float]
    risk_probs: dict[str, float]
    action: str = "pass"
    error: str | None = None             # set when no verdict could be computed (a fail-closed refusal)

    @property
    def unsafe_prob(self) -> float:
        return 1.0 - self.level_probs[0] if self.level_probs else 1.0

    def to_dict(self) -> dict:
        out = {"level": self.level, "risk_type": self.risk_type, "unsafe_prob": self.unsafe_prob,
               "level_probs": self.level_probs, "risk_probs": self.risk_probs, "action": self.action}
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass
class GuardedResponse:
    text: str
    verdict: Verdict
    action: str
    prompt: str = field(default="", repr=False)


class SafetyGuard:
    """Verdicts (and guarded generation) for images, from an attached model and its processor."""

    def __init__(self, model: SafetyVLM, processor=None, policy: GuardPolicy | None = None) -> None:
        self.model = model
        self.processor = processor if processor is not None else model.processor
        if self.processor is None:
            raise ValueError("SafetyGuard needs a processor: pass one or attach() with processor=...")
        if getattr(self.processor, "safety_reserved_tokens", 0) != model.safety_config.num_safety_tokens:
            raise ValueError("SafetyGuard needs the processor returned by attach() (it reserves the safety positions)")
        self.policy = policy or GuardPolicy()

    def _encode(self, images: list, prompts: list[str]):
        texts = [build_prompt(self.processor, p) for p in prompts]
        # Left padding for generation, asked per call: setting tokenizer.padding_side would change the
        # caller's processor too (reserve_safety_positions shares the tokenizer), e.g. a collator's.
        batch = encode_batch(self.processor, images, texts, return_tensors="pt", padding=True, padding_side="left")
        device = self.model.device
        return {k: v.to(device) for k, v in batch.items()}

    def _verdicts(self, level_logits: torch.Tensor, risk_logits: torch.Tensor) -> list[Verdict]:
        names = self.model.safety_config.risk_types
        finite = (torch.isfinite(level_logits).all(-1) & torch.isfinite(risk_logits).all(-1)).cpu().tolist()
        if not all(finite) and self.policy.on_nonfinite == "error":
            rows = [i for i, ok in enumerate(finite) if not ok]
            raise GuardError(f"the safety head's output is NaN/inf for image(s) {rows} (broken safety weights or "
                             "input); no verdict is given (GuardPolicy.on_nonfinite='refuse' refuses instead)")
        level_p = level_logits.float().softmax(-1).cpu()
        risk_p = risk_logits.float().softmax(-1).cpu()
        verdicts = []
        for lp, rp, ok in zip(level_p, risk_p, finite):
            if not ok:
                verdicts.append(Verdict(level=len(lp) - 1, risk_type=UNKNOWN_RISK, level_probs=[], risk_probs={},
                                        action="refuse", error="the safety head's output is NaN/inf"))
                continue
            level = int(lp.argmax())
            verdicts.append(Verdict(level=level, risk_type=names[int(rp.argmax())], level_probs=lp.tolist(),
                                    risk_probs={n: float(p) for n, p in zip(names, rp)},
                                    action=self.policy.action(level)))
        return verdicts

    @torch.no_grad()
    def verdict(self, images: list, prompts: list[str] | str | None = None) -> list[Verdict]:
        """One verdict per image; no token is generated and the LLM does not run."""
        prompts = self._prompts(images, prompts)
        batch = self._encode(images, prompts)
        encoded = self.model.encode_images(**self.model.image_inputs(batch))
        logits = self.model.head_logits(batch["input_ids"], batch["attention_mask"], encoded)
        return self._verdicts(*logits)

    @staticmethod
    def _prompts(images: list, prompts) -> list[str]:
        if prompts is None:
            prompts = DEFAULT_GUARD_PROMPT
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        return list(prompts)

    @torch.no_grad()
    def generate(self, images: list, prompts: list[str] | str, **generate_kwargs) -> list[GuardedResponse]:
        """Verdict first; then refuse with the template, add the safety instruction, or pass.

        The vision tower runs once per image: the guarded generation reuses the guard's features.
        """
        prompts = self._prompts(images, prompts)
        batch = self._encode(images, prompts)
        encoded = self.model.encode_images(**self.model.image_inputs(batch))
        verdicts = self._verdicts(*self.model.head_logits(batch["input_ids"], batch["attention_mask"], encoded))
        responses: list[GuardedResponse | None] = [None] * len(images)
        to_generate = []
        for i, v in enumerate(verdicts):
            if v.action == "refuse":
                responses[i] = GuardedResponse(self.policy.fill(self.policy.refusal_template, v), v, "refuse", prompts[i])
            else:
                to_generate.append(i)
        if to_generate:
            tok = self.processor.tokenizer
            if all(verdicts[i].action == "pass" for i in to_generate):
                # Prompts unchanged: reuse the tokens and the image features computed above.
                input_ids = batch["input_ids"][to_generate]
                attention_mask = batch["attention_mask"][to_generate]
            else:
                texts = []
                for i in to_generate:
                    v = verdicts[i]
                    prefix = self.policy.fill(self.policy.instruction_template, v) if v.action == "instruct" else ""
                    texts.append(build_prompt(self.processor, prefix + prompts[i]))
                # Only the text changes: tokenise it and reuse the image features computed above.
                sub = encode_batch(self.processor, [images[i] for i in to_generate], texts, return_tensors="pt",
                                   padding=True, padding_side="left")
                input_ids = sub["input_ids"].to(self.model.device)
                attention_mask = sub["attention_mask"].to(self.model.device)
            generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                      images=encoded.select(to_generate), **generate_kwargs)
            for row, i in enumerate(to_generate):
                text = tok.decode(out[row], skip_special_tokens=True).strip()
                responses[i] = GuardedResponse(text, verdicts[i], verdicts[i].action, prompts[i])
        return responses  # type: ignore[return-value]
