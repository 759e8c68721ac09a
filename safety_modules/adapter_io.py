"""Save and load the safety modules (and a PEFT LoRA) as safetensors adapters.

Format: `safety_config.json` (module config + fingerprint of the base) and
`safety_adapter.safetensors`; with a LoRA, PEFT's `adapter_config.json` + `adapter_model.safetensors`
beside them. Loading checks the fingerprint field by field and the tensor names exactly: the
reference code applied adapters under a wrong prefix and silently did nothing.

Why a content hash in the fingerprint: config fields alone let an adapter trained on one base load
silently on a same-shaped base with other weights, where its verdicts mean something else. The hash
covers a fixed sample of every base tensor (cheap at 7B); a mismatch warns, or refuses under
`strict_base`. Why the safety modules fail closed: a guard built from NaN weights answers "level 0,
pass", so non-finite or non-floating weights are refused when saved and when loaded, and the risk
types the head was trained with travel inside the weights file, where editing the JSON cannot
reorder them.
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import version
import warnings
import weakref
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from safety_modules.attach import SafetyVLM, _plain, attach
from safety_modules.config import SafetyConfig
from safety_modules.configio import ConfigError, from_dict, to_dict
from safety_modules.fileio import CorruptFileError, atomic_write, read_json, write_json_atomic
from safety_modules.families import family_for

CONFIG_NAME = "safety_config.json"
WEIGHTS_NAME = "safety_adapter.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)          # 1: no content hash of the base, no label metadata in the weights
WEIGHTS_HASH = "weights_sha256"     # the fingerprint field holding the base's content hash
HASH_SAMPLES = 64                   # values sampled from each base tensor for the content hash
RISK_TYPES_META = "risk_types"      # weights-file metadata: the head's risk types, in order
LEVELS_META = "num_safety_levels"


class AdapterError(ValueError):
    """An adapter does not fit the model, or its files are missing or corrupt."""


class AdapterWarning(UserWarning):
    """An adapter loads, but on a base whose weights differ from the one it was trained on."""


def framework_version() -> str:
    try:
        return version("safevlm")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


# Content hashes of bases whose tensors were whole when hashed (under ZeRO-3 they are partitioned
# later, and a rank-0-only export cannot gather them): module -> hash.
_HASHES: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def _base_tensors(plain: nn.Module) -> list[torch.Tensor]:
    """The base's own tensors in registration order (a PEFT LoRA's tensors excluded: the order and
    values of the base's tensors are the same with and without one)."""
    return [p for n, p in plain.named_parameters() if "lora_" not in n]


def base_weights_hash(model: nn.Module) -> str | None:
    """sha256 over shapes and a fixed sample of every base tensor, rounded to bfloat16.

    Why rounded: the same checkpoint loaded in float32 on CPU or bfloat16 on GPU gives the same hash.
    None when the tensors are partitioned (ZeRO-3) and were not hashed before (`remember_base`).
    """
    plain = model.plain_model if isinstance(model, SafetyVLM) else _plain(model)
    tensors = _base_tensors(plain)
    if any(getattr(t, "ds_id", None) is not None and t.numel() == 0 for t in tensors):
        return _HASHES.get(plain)
    digest = hashlib.sha256()
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(-1)
            index = torch.linspace(0, max(flat.numel() - 1, 0), min(HASH_SAMPLES, flat.numel()),
                                   device=flat.device).long()
            sample = flat[index].to(torch.bfloat16).view(torch.int16).cpu()
            digest.update(repr(tuple(t.shape)).encode())
            digest.update(sample.numpy().tobytes())
    value = digest.hexdigest()
    _HASHES[plain] = value
    return value


def remember_base(model: nn.Module) -> None:
    """Hash the base now, while its tensors are whole (before ZeRO-3 partitions them)."""
    base_weights_hash(model)


def fingerprint(model: nn.Module) -> dict[str, object]:
    """What an adapter must agree on with the base it is loaded onto."""
    config = model.config
    family = family_for(config)
    return {
        "model_type": config.model_type,
        "vision_hidden_size": family.vision_width(config),
        "vision_image_size": getattr(config.vision_config, "image_size", None),  # None: dynamic resolution
        "vision_patch_size": getattr(config.vision_config, "patch_size", None),
        "text_hidden_size": family.text_width(config),
        "text_num_layers": config.text_config.num_hidden_layers,
        "vocab_size": config.text_config.vocab_size,
        "image_token_id": family.image_token_id(config),
        WEIGHTS_HASH: base_weights_hash(model),
    }


# The fingerprint's config fields and the JSON types they must have.
# The vision tower's image and patch sizes are a list for rectangular sizes and null for towers of
# dynamic resolution (Qwen, Pixtral).
SIZE = (int, list, type(None))
FINGERPRINT_FIELDS: dict[str, tuple[type, ...]] = {
    "model_type": (str,), "vision_hidden_size": (int,), "vision_image_size": SIZE, "vision_patch_size": SIZE,
    "text_hidden_size": (int,), "text_num_layers": (int,), "vocab_size": (int,), "image_token_id": (int,)}


def _check_finite_tensors(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Safety weights must be floating point and finite: a NaN head answers 'level 0, pass'."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterError(f"{where}: tensor {name!r} has dtype {str(tensor.dtype).replace('torch.', '')}; "
                               "adapter weights must be floating point (refused, not cast)")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterError(f"{where}: tensor {name!r} holds {bad} NaN/inf values of {tensor.numel()}; "
                               "a safety adapter must be finite")


def save_adapter(model: SafetyVLM, directory: str | Path) -> Path:
    """Write the safety modules (and the LoRA, if attached) to `directory`. Only trainable parts are saved."""
    if not isinstance(model, SafetyVLM):
        raise TypeError(f"save_adapter expects a model returned by attach(), got {type(model).__name__}")
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.safety.state_dict().items()}
    _check_finite_tensors(tensors, directory / WEIGHTS_NAME)
    if hasattr(model.base, "peft_config"):
        lora = {n: p.detach().cpu() for n, p in model.base.named_parameters() if "lora_" in n}
        _check_finite_tensors(lora, directory / LORA_WEIGHTS_NAME)
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory}: a file is in the way (expected an adapter folder)")
    directory.mkdir(parents=True, exist_ok=True)
    labels = {RISK_TYPES_META: json.dumps(list(model.safety_config.risk_types)),
              LEVELS_META: str(model.safety_config.num_safety_levels)}
    data = safetensors_bytes(tensors, metadata={"format": "pt", **labels})
    atomic_write(directory / WEIGHTS_NAME, lambda fh: fh.write(data))
    meta = {
        "format_version": FORMAT_VERSION,
        "framework_version": framework_version(),
        "safety_config": to_dict(model.safety_config),
        "fingerprint": fingerprint(model),
        "has_lora": hasattr(model.base, "peft_config"),
    }
    write_json_atomic(directory / CONFIG_NAME, meta)
    if meta["has_lora"]:   # the active LoRA only: another adapter (e.g. PPO's frozen reference) is not the model's
        model.base.save_pretrained(directory, selected_adapters=[model.base.active_adapter])
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    """`safety_config.json`, checked: a known format_version and a complete, well-typed fingerprint."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: no safety adapter here ({CONFIG_NAME} is missing)")
    try:
        meta = read_json(path, "adapter config")
    except CorruptFileError as exc:
        raise AdapterError(str(exc)) from None
    if not isinstance(meta, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key in ("format_version", "safety_config", "fingerprint"):
        if key not in meta:
            raise AdapterError(f"{path}: field {key!r} is missing")
    version = meta["format_version"]
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise AdapterError(f"{path}: field 'format_version' is {version!r}; this version of safevlm reads "
                           f"{list(READABLE_VERSIONS)} (a newer safevlm wrote it?)")
    _check_fingerprint_fields(meta["fingerprint"], path, version)
    return meta


def _field_type_ok(value: object, kinds: tuple[type, ...]) -> bool:
    """A JSON value of one of `kinds` (bool is not an int; a list must hold ints only)."""
    if value is None:
        return type(None) in kinds
    if isinstance(value, list):
        return list in kinds and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return not isinstance(value, bool) and isinstance(value, tuple(k for k in kinds if k not in (list, type(None))))


def _check_fingerprint_fields(found, path: Path, version: int) -> None:
    if not isinstance(found, dict) or not found:
        raise AdapterError(f"{path}: field 'fingerprint' is empty or not an object ({found!r})")
    for key, kinds in FINGERPRINT_FIELDS.items():
        if key not in found:
            raise AdapterError(f"{path}: field 'fingerprint.{key}' is missing")
        value = found[key]
        if not _field_type_ok(value, kinds):
            names = " or ".join("null" if k is type(None) else ("list of int" if k is list else k.__name__)
                                for k in kinds)
            raise AdapterError(f"{path}: field 'fingerprint.{key}' is {value!r}, expected {names}")
    unknown = sorted(set(found) - set(FINGERPRINT_FIELDS) - {WEIGHTS_HASH})
    if unknown:
        raise AdapterError(f"{path}: field 'fingerprint.{unknown[0]}' is not a fingerprint field")
    digest = found.get(WEIGHTS_HASH)
    if version >= 2 and digest is not None and not (isinstance(digest, str) and len(digest) == 64):
        raise AdapterError(f"{path}: field 'fingerprint.{WEIGHTS_HASH}' is {digest!r}, expected a sha256 hex digest")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each floating point and finite, or an AdapterError."""
    if not path.is_file():
        raise AdapterError(f"{path}: adapter weights are missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    _check_finite_tensors(tensors, path)
    return tensors


def _check_labels(cfg: SafetyConfig, path: Path, required: bool) -> None:
    """The JSON's risk types and levels must be the ones the weights were trained with (kept in the
    weights file's metadata): reordering them would relabel every verdict silently."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if required and not {RISK_TYPES_META, LEVELS_META} <= set(meta):
        raise AdapterError(f"{path}: the weights file carries no {RISK_TYPES_META!r}/{LEVELS_META!r} metadata "
                           "(save_adapter writes it), so the labels of safety_config cannot be checked against "
                           "the weights; export the adapter again with save_adapter")
    if RISK_TYPES_META in meta:
        try:
            trained = json.loads(meta[RISK_TYPES_META])
        except json.JSONDecodeError:
            raise AdapterError(f"{path}: metadata {RISK_TYPES_META!r} is not valid JSON") from None
        if list(cfg.risk_types) != trained:
            raise AdapterError(f"{path.parent / CONFIG_NAME}: field 'safety_config.risk_types' is {list(cfg.risk_types)} "
                               f"but the weights were trained with {trained} (order matters)")
    if LEVELS_META in meta and str(cfg.num_safety_levels) != meta[LEVELS_META]:
        raise AdapterError(f"{path.parent / CONFIG_NAME}: field 'safety_config.num_safety_levels' is "
                           f"{cfg.num_safety_levels} but the weights were trained with {meta[LEVELS_META]}")


def _check_fingerprint(expected: dict, model: nn.Module, where: Path, strict_base: bool) -> None:
    """Config fields must match (an error naming the field); the content hash warns, or refuses
    under `strict_base`."""
    actual = fingerprint(model)
    for key in FINGERPRINT_FIELDS:
        if actual[key] != expected[key]:
            raise AdapterError(f"{where}: adapter was made for a different base: fingerprint field "
                               f"{key!r} is {expected[key]!r} in the adapter but {actual[key]!r} in this model")
    saved, ours = expected.get(WEIGHTS_HASH), actual[WEIGHTS_HASH]
    if saved is not None and ours is not None and saved == ours:
        return
    if saved is None or ours is None:
        problem = (f"{where}: the adapter records no content hash of its base" if saved is None
                   else f"{where}: this base's tensors are partitioned and were not hashed")
        problem += ", so it cannot be checked that the base's weights are the ones it was trained on"
    else:
        problem = (f"{where}: the base's weights differ from the base the adapter was trained on (fingerprint "
                   f"field {WEIGHTS_HASH!r} is {saved[:12]}... in the adapter but {ours[:12]}... in this model); "
                   "its verdicts may not mean what they meant in training")
    if strict_base:
        raise AdapterError(problem + " (refused: strict_base)")
    warnings.warn(problem, AdapterWarning, stacklevel=3)


def _check_state(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """The tensors' names and shapes must be exactly the modules' own."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise AdapterError(f"{where}: tensor names do not match the safety modules: "
                           f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise AdapterError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                               f"the model expects {tuple(own[name].shape)}")


# LoRA settings that change what the same weights compute.
LORA_SETTINGS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def _setting(config, name: str):
    value = getattr(config, name, None)
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def _load_lora(model: SafetyVLM, directory: Path, trainable: bool) -> None:
    config_path = directory / LORA_CONFIG_NAME
    try:
        lora_config = LoraConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise AdapterError(f"{config_path}: cannot read the LoRA config ({exc})") from None
    lora_config.inference_mode = not trainable
    # Read the weights before touching the model: a corrupt file must not leave LoRA layers injected.
    weights = _load_tensors(directory / LORA_WEIGHTS_NAME)
    if hasattr(model.base, "peft_config"):
        # Loading into an existing LoRA: same-shaped weights under another alpha (or targets) would
        # load without complaint and give other outputs, so the settings must agree.
        current = model.base.peft_config[model.base.active_adapter]
        for name in LORA_SETTINGS:
            ours, theirs = _setting(lora_config, name), _setting(current, name)
            if ours != theirs:
                raise AdapterError(f"{config_path}: the model's LoRA differs from the adapter's: {name!r} is "
                                   f"{ours!r} in the adapter but {theirs!r} in the model")
    else:
        model.base = get_peft_model(model.base, lora_config)
    try:
        result = set_peft_model_state_dict(model.base, weights)
    except RuntimeError as exc:  # e.g. a size mismatch
        raise AdapterError(f"{directory / LORA_WEIGHTS_NAME}: LoRA tensors do not fit the model ({exc})") from None
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in (getattr(result, "missing_keys", []) or []) if "lora_" in k]
    if unexpected or missing:
        raise AdapterError(f"{directory / LORA_WEIGHTS_NAME}: LoRA tensor names do not match the model: "
                           f"unexpected {unexpected[:5]}, missing {missing[:5]}")


def load_adapter(model: nn.Module, directory: str | Path, processor=None, trainable: bool = False,
                 strict_base: bool = False) -> SafetyVLM:
    """Load an adapter onto a plain base model (attaching the modules) or onto an attached model.

    Refuses an adapter made for another base, naming the fingerprint field that differs; any
    missing, unexpected, misshapen, non-floating or non-finite tensor is an error, never a silent
    no-op. A base with other weights than the adapter's (its content hash) is a warning
    (AdapterWarning), or an error with `strict_base`.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    try:
        cfg = from_dict(SafetyConfig, meta["safety_config"])
    except ConfigError as exc:
        raise AdapterError(f"{directory / CONFIG_NAME}: safety_config.{exc}") from None
    plain = model.plain_model if isinstance(model, SafetyVLM) else model
    _check_fingerprint(meta["fingerprint"], plain, directory / CONFIG_NAME, strict_base)
    tensors = _load_tensors(directory / WEIGHTS_NAME)
    if not isinstance(model, SafetyVLM):
        model = attach(model, cfg, processor, freeze_base=True)
    elif to_dict(model.safety_config) != to_dict(cfg):
        raise AdapterError(f"{directory / CONFIG_NAME}: its safety_config differs from the attached modules' config")
    _check_state(model.safety, tensors, directory / WEIGHTS_NAME)
    _check_labels(cfg, directory / WEIGHTS_NAME, required=meta["format_version"] >= 2)
    model.safety.load_state_dict(tensors, strict=True)
    has_lora_files = (directory / LORA_CONFIG_NAME).is_file()
    if meta.get("has_lora") and not has_lora_files:
        raise AdapterError(f"{directory}: the adapter records a LoRA but {LORA_CONFIG_NAME} is missing")
    if has_lora_files:
        _load_lora(model, directory, trainable)
    for param in model.safety.parameters():
        param.requires_grad_(trainable)
    return model
