"""Model runners: the models an evaluation can answer with, behind one small interface.

Two kinds, one registry (`RUNNERS`): `safevlm` (a base model with our safety adapter, generating
through `SafetyVLM.generate` so the safety tokens are in the sequence) and `hf` (the plain Hugging
Face LLaVA-family model, the baseline). Both generate in batches with left padding and the KV cache.

Sampling is per item, not per batch: the protocol samples (temperature 1.0, top-p 0.9), and a
sample that depends on which other items share its batch would make results change with the batch
size, the number of ranks, or a resume. So each item gets its own seed (derived from the content
of the item) and its own random stream: temperature and top-p filtering, then Gumbel noise drawn
from that stream, then argmax -- exactly a categorical sample (the Gumbel-max trick), independent
of the batch. Greedy decoding (`greedy=True`) is available for reproducible runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from base_models.loading import TINY_SPECS, load_base
from runtime.distributed import context
from safety_modules.adapter_io import load_adapter
from safety_modules.attach import SafetyVLM
from safety_modules.configio import ConfigError
from safety_modules.input_format import PROCESSOR_PREPROCESS
from safety_modules.prompting import build_prompt, encode_batch


@dataclass
class GenerationSettings:
    """How answers are generated. Defaults are the UnsafeConcepts protocol's; configs override."""

    temperature: float = 1.0
    top_p: float = 0.9
    max_new_tokens: int = 512
    greedy: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0 when sampling (use greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")

    def cache_fields(self) -> dict:
        """What decides an answer (greedy ignores temperature, top-p and seed)."""
        if self.greedy:
            return {"greedy": True, "max_new_tokens": self.max_new_tokens}
        return asdict(self)


class SeededSampler(LogitsProcessor):
    """Temperature + top-p + Gumbel noise from one generator per row; generate then takes argmax."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(int(s) % (2 ** 63)) for s in seeds]
        self.temperature = temperature
        self.top_p = top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs        # mass of the strictly more likely tokens
            sorted_scores = sorted_scores.masked_fill(before >= self.top_p, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1.0 - 1e-7)))
        return scores + gumbel


def item_seed(base_seed: int, key: str) -> int:
    """A 63-bit seed from the run's seed and an item's content key."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{key}".encode()).digest()[:8], "big") >> 1


def tensor_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over parameter and buffer names, dtypes and bytes (for models built in memory)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def folder_fingerprint(path: str | Path, full_below: int = 64 << 20) -> str:
    """sha256 over a folder's files: small files in full, big weight files by size + head + tail.

    Why not all bytes: hashing a full-size model's weights on every evaluation would cost more than a
    short evaluation; size plus the first and last MiB (the safetensors header names every tensor and
    offset) changes with any re-save.
    """
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        size = file.stat().st_size
        digest.update(f"{rel}:{size}".encode())
        with file.open("rb") as fh:
            if size <= full_below:
                digest.update(fh.read())
            else:
                digest.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                digest.update(fh.read())
    return digest.hexdigest()


class ModelRunner:
    """Formats prompts, batches them with left padding and generates; subclasses say how.

    `fingerprint` identifies the weights, adapter, processor and dtype: it is part of every cache key.
    """

    kind = "base"

    def __init__(self, model, processor, fingerprint: str, name: str = "") -> None:
        if processor is None:
            raise ValueError(f"{type(self).__name__} needs a processor")
        self.model = model
        self.processor = processor
        self.name = name or fingerprint[:12]
        template = getattr(processor, "chat_template", "") or ""
        padding = ":pad_to_square" if getattr(processor.image_processor, "do_pad", False) else ""
        self.fingerprint = hashlib.sha256(
            f"{self.kind}:{fingerprint}:{template}:{self.dtype}{padding}".encode()).hexdigest()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        size = getattr(ip, "size", None) or {}
        return int(crop.get("height") or size.get("shortest_edge") or size.get("height") or 336)

    def blank_image(self) -> Image.Image:
        """The protocol's blank white image for text-only questions, at the model's resolution."""
        return Image.new("RGB", (self.image_size, self.image_size), (255, 255, 255))

    def format_prompt(self, question: str) -> str:
        return build_prompt(self.processor, question, with_image=True)

    def _batch(self, prompts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        batch = encode_batch(self.processor, images, prompts, return_tensors="pt", padding=True)
        out = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.dtype)
        return out

    def _generate_tokens(self, batch: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, questions: list[str], images: list[Image.Image], settings: GenerationSettings,
                 seeds: list[int] | None = None) -> list[str]:
        """One answer per (question, image), generated as one left-padded batch."""
        if len(questions) != len(images):
            raise ValueError(f"generate: {len(questions)} questions but {len(images)} images")
        if not questions:
            return []
        batch = self._batch([self.format_prompt(q) for q in questions], images)
        tokenizer = self.processor.tokenizer
        kwargs: dict = {"max_new_tokens": settings.max_new_tokens, "do_sample": False,
                        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                        else tokenizer.eos_token_id,
                        "temperature": None, "top_p": None, "top_k": None}
        if not settings.greedy:
            seeds = seeds if seeds is not None else [item_seed(settings.seed, q) for q in questions]
            kwargs["logits_processor"] = LogitsProcessorList(
                [SeededSampler(seeds, settings.temperature, settings.top_p)])
        new_tokens = self._generate_tokens(batch, **kwargs)
        return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


class HFRunner(ModelRunner):
    """The plain Hugging Face model (no safety modules): the baseline of every comparison."""

    kind = "hf"

    def _generate_tokens(self, batch, **kwargs):
        out = self.model.generate(**batch, **kwargs)
        return out[:, batch["input_ids"].shape[1]:]


class SafetyRunner(ModelRunner):
    """A `SafetyVLM` (base + safety adapter, optional LoRA): prompts built with its reserving processor."""

    kind = "safevlm"

    def __init__(self, model, processor=None, fingerprint: str = "", name: str = "") -> None:
        if not isinstance(model, SafetyVLM):
            raise TypeError(f"SafetyRunner needs a model returned by attach()/load_adapter(), got {type(model).__name__}")
        super().__init__(model, processor if processor is not None else model.processor,
                         fingerprint or tensor_fingerprint(model), name)

    def _generate_tokens(self, batch, **kwargs):
        return self.model.generate(**batch, **kwargs)  # image inputs by name, whatever the family


RUNNERS: dict[str, type[ModelRunner]] = {"hf": HFRunner, "safevlm": SafetyRunner}


def load_runner(model: str, adapter: str | Path | None = None, kind: str = "auto", device: str | None = None,
                dtype: torch.dtype | None = None, seed: int = 0, image_preprocess: str = PROCESSOR_PREPROCESS,
                conversation: str = "", strict_base: bool = False) -> ModelRunner:
    """A runner for a model spec ('tiny', 'tiny-next' or a local folder), with an optional adapter.

    kind 'auto' is 'safevlm' with an adapter and 'hf' without. bf16 on GPU, fp32 on CPU by default.
    `image_preprocess` 'pad_to_square' feeds images as the original LLaVA-1.5 did (padded to a square
    with the mean colour, not centre-cropped); `conversation` names an original prompt template
    (`safety_modules.prompting.CONVERSATIONS`, e.g. 'llava_v1'); '' keeps the processor's own.
    `strict_base` refuses an adapter trained on a base with other weights (default: a warning).
    """
    if kind == "auto":
        kind = "safevlm" if adapter else "hf"
    if kind not in RUNNERS:
        raise ValueError(f"model runner kind {kind!r} is unknown; known: {sorted(RUNNERS)} (or 'auto')")
    if kind == "safevlm" and not adapter:
        raise ValueError("runner 'safevlm' needs --adapter DIR (untrained safety modules would be meaningless)")
    if kind == "hf" and adapter:
        raise ValueError("runner 'hf' is the plain model: drop --adapter, or use --runner safevlm (kind='safevlm')")
    device = device or context().device()
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    base, processor = load_base(model, dtype=dtype, device=device, seed=seed, image_preprocess=image_preprocess,
                                conversation=conversation)
    if model in TINY_SPECS:
        base_fp = f"{model}:seed{seed}:{tensor_fingerprint(base)}"
    else:
        base_fp = f"{Path(model).resolve().name}:{folder_fingerprint(model)}"
    if kind == "hf":
        return HFRunner(base, processor, base_fp, name=Path(model).name)
    safe = load_adapter(base, adapter, processor, strict_base=strict_base).to(device)
    safe.eval()
    fp = f"{base_fp}+adapter:{folder_fingerprint(adapter)}"
    return SafetyRunner(safe, fingerprint=fp, name=f"{Path(model).name}+{Path(adapter).name}")


def runner_from_model(model, processor=None, name: str = "", fingerprint: str = "") -> ModelRunner:
    """Wrap a model already in memory (a SafetyVLM or a plain HF VLM); fingerprint from its tensors."""
    if isinstance(model, SafetyVLM):
        return SafetyRunner(model, processor, fingerprint, name)
    return HFRunner(model, processor, fingerprint or tensor_fingerprint(model), name)

