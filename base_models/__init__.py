"""The base VLMs the safety modules wrap: `load_base(spec)` resolves a model spec (a local
`save_pretrained` folder, a tiny model built from a config, or a real model's shape with random
weights). The tiny and shape-only builders are fixtures for the default run, the tests and the
benchmarks; the model layer (`safety_modules`) never imports them."""

from base_models.loading import SHAPE_PREFIX, TINY_SPECS, load_base

__all__ = ["SHAPE_PREFIX", "TINY_SPECS", "load_base"]
