"""Shared test fixtures: tiny models (built once per session, handed out as copies) and small images.

Why copies: a tiny build trains a tokenizer and initialises a model (~0.2-1 s); tests mutate models
(attach freezes the base, add_lora wraps it, optimizers step it), so each test gets its own deep copy
of a cached build instead of a shared object.
"""

from __future__ import annotations

import copy
import functools
import os

# One intra-op thread, set before torch starts and inherited by subprocesses. Why: the tests run tiny
# models whose ops take microseconds; with several threads on a busy 2-core machine they spend most
# of their time waiting on each other (measured 5-10x slower). And a test comparing bits across
# processes needs the same thread count on both sides (the reduction order follows it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@functools.lru_cache(maxsize=None)
def _cached_build(family: str, seed: int, sizes: tuple[tuple[str, int], ...]):
    from base_models.tiny import build_tiny_llava

    # build_tiny_llava seeds and draws from torch's global RNG; fork it so that a test's random state
    # does not depend on whether its model came from the cache or from a first build.
    with torch.random.fork_rng():
        return build_tiny_llava(seed=seed, family=family, **dict(sizes))


def tiny_llava(family: str = "llava", seed: int = 0, **sizes: int):
    """A fresh (model, processor) pair equal to `build_tiny_llava(seed, family, **sizes)`."""
    model, processor = _cached_build(family, seed, tuple(sorted(sizes.items())))
    return copy.deepcopy(model), copy.deepcopy(processor)


def random_image(seed: int = 0, size: tuple[int, int] = (32, 32)) -> Image.Image:
    """A deterministic RGB noise image of `size` = (width, height)."""
    rng = np.random.default_rng(seed)
    width, height = size
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_builder():
    """`tiny_builder(family="llava", seed=0, **sizes) -> (model, processor)`, a fresh copy per call."""
    return tiny_llava


@pytest.fixture(scope="session")
def make_image():
    """`make_image(seed=0, size=(32, 32)) -> PIL.Image`, deterministic noise."""
    return random_image


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same torch RNG state, whatever ran before it."""
    torch.manual_seed(0)
    yield
