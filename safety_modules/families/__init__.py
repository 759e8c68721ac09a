"""Family adapters; importing this package registers the built-in ones."""

from safety_modules.families import llava, llava_next  # noqa: F401  (registration side effect)
from safety_modules.families.base import FamilyAdapter, VisionFeatures, family_for, register_family

__all__ = ["FamilyAdapter", "VisionFeatures", "family_for", "register_family"]
