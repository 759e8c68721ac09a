"""Family adapters; importing this package registers the built-in ones."""

from safety_modules.families import (  # noqa: F401  (registration side effect)
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    mistral3,
    paligemma,
    qwen2_vl,
)
from safety_modules.families.base import (
    TOKEN_TYPE_NAMES,
    FamilyAdapter,
    VisionFeatures,
    family_for,
    register_family,
    supported_families,
)

__all__ = ["TOKEN_TYPE_NAMES", "FamilyAdapter", "VisionFeatures", "family_for", "register_family",
           "supported_families"]
