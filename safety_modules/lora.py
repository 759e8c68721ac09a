"""PEFT LoRA on the LLM of an attached model, and a frozen copy of it as a second adapter.

Why PEFT and not our own LoRA: PEFT's adapter files are what users already ship and load, and one
PEFT model holds several adapters over one base. That is how PPO keeps its KL reference (the
starting LoRA) beside the LoRA it trains without a second copy of the base: `add_frozen_copy`
once, then `adapter_active` around each reference pass.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from safety_modules.attach import SafetyVLM

# Every linear layer of the language model, none of the vision tower or projectors.
LLM_LINEAR_PATTERN = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def llm_linear_pattern(llm_module_name: str) -> str:
    """LLM_LINEAR_PATTERN for a family whose language model is the module `llm_module_name`."""
    return LLM_LINEAR_PATTERN.replace("language_model", llm_module_name)


def add_lora(model: SafetyVLM, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: str | list[str] | None = None) -> SafetyVLM:
    """Wrap `model.base` with a LoRA on the LLM's linear layers (base weights stay frozen)."""
    if has_lora(model):
        raise ValueError("a LoRA is already attached to this model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules or llm_linear_pattern(model.family.llm_module_name))
    model.base = get_peft_model(model.base, config)
    return model


def has_lora(model: SafetyVLM) -> bool:
    return hasattr(model.base, "peft_config")


def _adapter_tensors(model: SafetyVLM, adapter: str) -> dict[str, torch.Tensor]:
    """The LoRA tensors of `adapter`, keyed by their name with the adapter's name taken out."""
    tag = f".{adapter}."
    return {name.replace(tag, "."): param for name, param in model.base.named_parameters()
            if "lora_" in name and tag in name}


def add_frozen_copy(model: SafetyVLM, name: str) -> None:
    """Add adapter `name`: an exact, frozen copy of the active LoRA (which stays active and as trainable as it was).

    Raises when the model has no LoRA, `name` exists, or the copy is not exact tensor for tensor.
    """
    if not has_lora(model):
        raise ValueError("add_frozen_copy: the model has no LoRA to copy")
    base = model.base
    source = base.active_adapter
    if name in base.peft_config:
        raise ValueError(f"add_frozen_copy: the model already has an adapter named {name!r}")
    config = copy.deepcopy(base.peft_config[source])
    config.inference_mode = True
    trainable = {n: p.requires_grad for n, p in base.named_parameters()}
    base.add_adapter(name, config)
    result = set_peft_model_state_dict(base, get_peft_model_state_dict(base, adapter_name=source), adapter_name=name)
    for param_name, param in base.named_parameters():      # PEFT re-marks adapters trainable when adding one
        param.requires_grad_(trainable.get(param_name, False))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    original, copied = _adapter_tensors(model, source), _adapter_tensors(model, name)
    if unexpected or set(original) != set(copied):
        raise ValueError(f"add_frozen_copy: the copy of LoRA {source!r} does not match it: unexpected "
                         f"{unexpected[:5]}, differing names {sorted(set(original) ^ set(copied))[:5]}")
    for key, param in original.items():
        if param.dtype != copied[key].dtype or not torch.equal(param, copied[key]):
            raise ValueError(f"add_frozen_copy: tensor {key!r} of the copy differs from LoRA {source!r}")


@contextmanager
def adapter_active(model: SafetyVLM, name: str) -> Iterator[None]:
    """Within the block, adapter `name` computes in place of the active one; afterwards the active
    adapter and every parameter's `requires_grad` are as before (PEFT's set_adapter changes both)."""
    base = model.base
    if name not in base.peft_config:
        raise ValueError(f"adapter_active: the model has no adapter named {name!r} "
                         f"(adapters: {sorted(base.peft_config)})")
    previous = base.active_adapter
    trainable = [(param, param.requires_grad) for param in base.parameters()]
    base.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        base.set_adapter(previous)
        for param, flag in trainable:
            param.requires_grad_(flag)
