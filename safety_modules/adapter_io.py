"""Save and load the safety modules (and a PEFT LoRA) as safetensors adapters.

Format: `safety_config.json` (module config + fingerprint of the base) and
`safety_adapter.safetensors`; with a LoRA, PEFT's `adapter_config.json` + `adapter_model.safetensors`
beside them. Loading checks the fingerprint field by field and the tensor names exactly: the
reference code applied adapters under a wrong prefix and silently did nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from safety_modules.attach import SafetyVLM, attach
from safety_modules.config import SafetyConfig
from safety_modules.configio import ConfigError, from_dict, to_dict
from safety_modules.families import family_for

CONFIG_NAME = "safety_config.json"
WEIGHTS_NAME = "safety_adapter.safetensors"
LORA_CONFIG_NAME = "adapter_config.json"
LORA_WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter does not fit the model, or its files are missing or corrupt."""


def framework_version() -> str:
    try:
        from importlib.metadata import version
        return version("safevlm")
    except Exception:  # not installed (running from a checkout)
        return "0+unknown"


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
    }


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: no half-written adapters."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_adapter(model: SafetyVLM, directory: str | Path) -> Path:
    """Write the safety modules (and the LoRA, if attached) to `directory`. Only trainable parts are saved."""
    if not isinstance(model, SafetyVLM):
        raise TypeError(f"save_adapter expects a model returned by attach(), got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.safety.state_dict().items()}
    _atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    meta = {
        "format_version": FORMAT_VERSION,
        "framework_version": framework_version(),
        "safety_config": to_dict(model.safety_config),
        "fingerprint": fingerprint(model),
        "has_lora": hasattr(model.base, "peft_config"),
    }
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    if meta["has_lora"]:
        model.base.save_pretrained(directory)
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{path}: no safety adapter here ({CONFIG_NAME} is missing)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    for key in ("safety_config", "fingerprint"):
        if key not in meta:
            raise AdapterError(f"{path}: field {key!r} is missing")
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise AdapterError(f"{path}: adapter weights are missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def _check_fingerprint(expected: dict, model: nn.Module, where: Path) -> None:
    actual = fingerprint(model)
    for key, value in expected.items():
        if key in actual and actual[key] != value:
            raise AdapterError(f"{where}: adapter was made for a different base: fingerprint field "
                               f"{key!r} is {value!r} in the adapter but {actual[key]!r} in this model")


def _load_state(module: nn.Module, tensors: dict[str, torch.Tensor], where: Path) -> None:
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
    module.load_state_dict(tensors, strict=True)


# LoRA settings that change what the same weights compute.
LORA_SETTINGS = ("r", "lora_alpha", "target_modules", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")


def _setting(config, name: str):
    value = getattr(config, name, None)
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def _load_lora(model: SafetyVLM, directory: Path, trainable: bool) -> None:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

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


def load_adapter(model: nn.Module, directory: str | Path, processor=None, trainable: bool = False) -> SafetyVLM:
    """Load an adapter onto a plain base model (attaching the modules) or onto an attached model.

    Refuses an adapter made for another base, naming the fingerprint field that differs; any
    missing, unexpected or misshapen tensor is an error, never a silent no-op.
    """
    directory = Path(directory)
    meta = read_adapter_config(directory)
    try:
        cfg = from_dict(SafetyConfig, meta["safety_config"])
    except ConfigError as exc:
        raise AdapterError(f"{directory / CONFIG_NAME}: safety_config.{exc}") from None
    plain = model.plain_model if isinstance(model, SafetyVLM) else model
    _check_fingerprint(meta["fingerprint"], plain, directory / CONFIG_NAME)
    tensors = _load_tensors(directory / WEIGHTS_NAME)
    if not isinstance(model, SafetyVLM):
        model = attach(model, cfg, processor, freeze_base=True)
    elif to_dict(model.safety_config) != to_dict(cfg):
        raise AdapterError(f"{directory / CONFIG_NAME}: its safety_config differs from the attached modules' config")
    _load_state(model.safety, tensors, directory / WEIGHTS_NAME)
    has_lora_files = (directory / LORA_CONFIG_NAME).is_file()
    if meta.get("has_lora") and not has_lora_files:
        raise AdapterError(f"{directory}: the adapter records a LoRA but {LORA_CONFIG_NAME} is missing")
    if has_lora_files:
        _load_lora(model, directory, trainable)
    for param in model.safety.parameters():
        param.requires_grad_(trainable)
    return model
