"""PEFT LoRA on the LLM of an attached model.

Why PEFT and not our own LoRA: PEFT's adapter files are what users already ship and load;
`disable_adapter()` gives the PPO reference model for free (same weights, no second copy).
"""

from __future__ import annotations

from peft import LoraConfig, get_peft_model

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
