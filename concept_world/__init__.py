"""The concept world: a procedural stand-in for UnsafeConcepts that a tiny VLM can learn on a CPU."""

from concept_world.build import build_world, format_summary
from concept_world.config import WorldConfig

__all__ = ["WorldConfig", "build_world", "format_summary"]
