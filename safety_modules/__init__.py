"""Safety modules for LLaVA-style VLMs: projector, safety tokens, safety head, guard, adapters.

Quick use::

    from safety_modules import attach, SafetyConfig, SafetyGuard, save_adapter, load_adapter
    model = attach(llava_model, SafetyConfig(num_safety_tokens=64), processor)
    verdicts = SafetyGuard(model).verdict([image])
"""

from safety_modules.adapter_io import AdapterError, fingerprint, load_adapter, save_adapter
from safety_modules.attach import EncodedImages, SafetyOutput, SafetyVLM, attach, detach, reserve_safety_positions
from safety_modules.config import SafetyConfig
from safety_modules.configio import ConfigError
from safety_modules.guard import GuardPolicy, GuardedResponse, SafetyGuard, Verdict
from safety_modules.lora import add_lora, has_lora
from safety_modules.prompting import build_prompt

__all__ = [
    "AdapterError", "ConfigError", "EncodedImages", "GuardPolicy", "GuardedResponse", "SafetyConfig",
    "SafetyGuard", "SafetyOutput", "SafetyVLM", "Verdict", "add_lora", "attach", "build_prompt", "detach",
    "fingerprint", "has_lora", "load_adapter", "reserve_safety_positions", "save_adapter",
]
