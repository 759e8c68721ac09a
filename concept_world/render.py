"""Procedural renderer of the concept world: one bold pattern per concept, shared traits per category.

Why these traits: a tiny ViT (patch 8 at 32 px) must learn the world quickly on a CPU, so every feature is
large. A concept is a central glyph, a SHAPE in a COLOUR, plus its group's look: every concept of an
unsafe category shares a dark FRAME in the category's hue and a striped/checked TEXTURE inside it
(what lets a held-out concept of a seen category be recognised as unsafe, and its risk type named);
safe concepts have neither: a plain pale background to the edge. Glyphs are shared across groups
(see `assign_traits`), so only frame and texture carry category and safety. Renders of one concept differ by position, scale, rotation,
colour jitter, texture phase and pixel noise, so new renders are a real generalisation test.

Everything is drawn with numpy on a supersampled grid (anti-aliased by averaging), so the pixels are
a pure function of (traits, size, seed): byte-identical PNGs for the same arguments.
"""

from __future__ import annotations

import colorsys
import random

import numpy as np
from PIL import Image

from concept_world.concepts import SAFE_CATEGORY

SHAPES = ["circle", "ring", "square", "diamond", "triangle", "plus", "cross", "flower", "hexagon", "bars"]
# Saturated shape colours (RGB 0..1), far apart so nearest-colour perception works at 32 px.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.15, 0.75, 0.15),
    "teal": (0.05, 0.65, 0.65),
    "blue": (0.10, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.40, 0.75),
    "black": (0.05, 0.05, 0.05),
    "brown": (0.50, 0.28, 0.10),
}
TEXTURES = ["hstripes", "vstripes", "diagonal", "antidiagonal", "checker", "dots", "grid", "rings", "waves"]

SUPERSAMPLE = 3
FRAME_WIDTH = 4.0 / 32        # fraction of the side: half a tiny-ViT patch at 32 px
SHAPE_RADIUS = 7.5 / 32       # fraction of the side
TEXTURE_PERIOD = 8.0 / 32     # one period per tiny-ViT patch: bold, not fine detail
NOISE_STD = 6.0 / 255


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def category_traits(categories: list[str]) -> dict[str, dict]:
    """Frame hue and texture per unsafe category (hues evenly spaced, one texture each)."""
    if len(categories) > len(TEXTURES):
        raise ValueError(f"at most {len(TEXTURES)} unsafe categories have distinct textures, got {len(categories)}")
    return {c: {"frame_hue": round(i / len(categories), 4), "texture": TEXTURES[i]}
            for i, c in enumerate(categories)}


def glyph_sequence(seed: int) -> list[tuple[str, str]]:
    """All (shape, colour) pairs in an order where neighbours differ in both shape and colour.

    Entry k is (shape k mod 10, colour (3k + k div 10) mod 10) under seeded permutations of the
    shapes and colours: the 100 pairs are all distinct.
    """
    rng = random.Random(f"glyphs-{seed}")
    shapes, colours = SHAPES[:], list(COLOURS)
    rng.shuffle(shapes)
    rng.shuffle(colours)
    n = len(shapes)
    return [(shapes[k % n], colours[(3 * k + k // n) % n]) for k in range(n * n)]


def assign_traits(groups: list[tuple[str, list[str]]], seed: int) -> dict[str, dict]:
    """Shape and colour per concept: the j-th concept of EVERY group (category, or "Safe") gets the
    j-th glyph of one shared sequence.

    Why shared: a glyph then says nothing about the category or about safety (each one appears in
    every category and among safe concepts), so only the category frame and texture can; a model
    cannot take the shortcut "this shape means Violence", and a held-out concept (a seen glyph in a
    seen category's frame) tests the category traits. Concepts of one group have distinct glyphs;
    concepts of different groups differ by frame, texture or plain background.
    `groups` is [(group name, [concept names])]; the result maps concept name -> traits.
    """
    glyphs = glyph_sequence(seed)
    rng = random.Random(f"background-{seed}")
    traits: dict[str, dict] = {}
    for group, names in groups:
        if len(names) > len(glyphs):
            raise ValueError(f"group {group!r}: at most {len(glyphs)} concepts have distinct glyphs, got {len(names)}")
        for j, name in enumerate(names):
            shape, colour = glyphs[j]
            traits[name] = {"shape": shape, "colour": colour}
            if group == SAFE_CATEGORY:
                # A pale background tint per safe concept: one more cue to tell safe concepts apart.
                traits[name]["background_hue"] = round(rng.random(), 4)
    return traits


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Inside-test of a shape of radius r centred at the origin (x right, y down)."""
    ax, ay = np.abs(x), np.abs(y)
    rho = np.hypot(x, y)
    if shape == "circle":
        return rho < r
    if shape == "ring":
        return (rho < r) & (rho > 0.55 * r)
    if shape == "square":
        return np.maximum(ax, ay) < 0.82 * r
    if shape == "diamond":
        return ax + ay < 1.1 * r
    if shape == "triangle":  # apex up
        return (y < 0.6 * r) & (y > -r + 1.9 * ax)
    if shape == "plus":
        return ((ax < 0.32 * r) & (ay < r)) | ((ay < 0.32 * r) & (ax < r))
    if shape == "cross":
        u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
        return ((np.abs(u) < 0.3 * r) & (np.abs(v) < r)) | ((np.abs(v) < 0.3 * r) & (np.abs(u) < r))
    if shape == "flower":
        theta = np.arctan2(y, x)
        return rho < r * (0.62 + 0.38 * np.cos(5 * theta))
    if shape == "hexagon":
        return (ay < 0.87 * r) & (ay * 0.577 + ax < r)
    if shape == "bars":
        return (ax < r) & ((np.abs(y - 0.5 * r) < 0.27 * r) | (np.abs(y + 0.5 * r) < 0.27 * r))
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _texture(kind: str, x: np.ndarray, y: np.ndarray, period: float, phase: tuple[float, float]) -> np.ndarray:
    """Texture value in [0, 1] (1 = dark tone) at supersampled pixel coordinates."""
    px, py = x + phase[0] * period, y + phase[1] * period
    f = lambda t: (np.floor(t / period * 2) % 2)  # noqa: E731  half-period bands
    if kind == "hstripes":
        return f(py)
    if kind == "vstripes":
        return f(px)
    if kind == "diagonal":
        return f((px + py) / np.sqrt(2))
    if kind == "antidiagonal":
        return f((px - py) / np.sqrt(2))
    if kind == "checker":
        return (f(px) + f(py)) % 2
    if kind == "dots":
        cx = (px % period) - period / 2
        cy = (py % period) - period / 2
        return (np.hypot(cx, cy) < period * 0.3).astype(float)
    if kind == "grid":
        return (((px % period) < period * 0.3) | ((py % period) < period * 0.3)).astype(float)
    if kind == "rings":
        return f(np.hypot(x, y) + phase[0] * period)
    if kind == "waves":
        return f(py + 0.3 * period * np.sin(2 * np.pi * px / period))
    raise ValueError(f"unknown texture {kind!r}; known: {TEXTURES}")


def render(traits: dict, size: int, seed: int | list[int]) -> Image.Image:
    """One render of a concept with `traits` ({"shape", "colour"} + "frame_hue"/"texture" for unsafe
    categories or "background_hue" for safe ones), as an RGB `size` x `size` image.

    `seed` (an int or a list of ints, e.g. [world seed, concept, render]) fixes every random choice.
    """
    if size < 16:
        raise ValueError(f"size: must be at least 16 pixels, got {size}")
    rng = np.random.default_rng(seed)
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE  # pixel units
    x, y = np.meshgrid(coords, coords)
    unsafe = "texture" in traits

    if unsafe:
        hue = traits["frame_hue"] + rng.uniform(-0.015, 0.015)
        light = _hsv(hue, 0.30 + rng.uniform(-0.05, 0.05), 0.90)
        dark = _hsv(hue, 0.45 + rng.uniform(-0.05, 0.05), 0.62)
        t = _texture(traits["texture"], x - size / 2, y - size / 2, TEXTURE_PERIOD * size,
                     (rng.uniform(0, 1), rng.uniform(0, 1)))[..., None]
        canvas = light * (1 - t) + dark * t
    else:
        canvas = np.broadcast_to(_hsv(traits["background_hue"] + rng.uniform(-0.02, 0.02),
                                      0.12 + rng.uniform(-0.03, 0.03), 0.96), (n, n, 3)).copy()

    # The concept's shape: jittered position, scale, rotation and colour.
    base = np.array(COLOURS[traits["colour"]])
    colour = np.clip(base * rng.uniform(0.85, 1.1) + rng.uniform(-0.06, 0.06, 3), 0, 1)
    cx = size / 2 + rng.uniform(-2.5, 2.5) * size / 32
    cy = size / 2 + rng.uniform(-2.5, 2.5) * size / 32
    radius = SHAPE_RADIUS * size * rng.uniform(0.88, 1.12)
    angle = np.deg2rad(rng.uniform(-12, 12))
    dx, dy = x - cx, y - cy
    rx = dx * np.cos(angle) + dy * np.sin(angle)
    ry = -dx * np.sin(angle) + dy * np.cos(angle)
    inside = _shape_mask(traits["shape"], rx, ry, radius)[..., None]
    canvas = np.where(inside, colour, canvas)

    if unsafe:  # the category frame, drawn last so the shape never covers it
        width = FRAME_WIDTH * size * rng.uniform(0.9, 1.1)
        edge = np.minimum(np.minimum(x, size - x), np.minimum(y, size - y))
        frame = _hsv(traits["frame_hue"] + rng.uniform(-0.015, 0.015), 0.85, 0.50 + rng.uniform(-0.06, 0.06))
        canvas = np.where((edge < width)[..., None], frame, canvas)

    small = canvas.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    small = small * rng.uniform(0.95, 1.05) + rng.normal(0.0, NOISE_STD, small.shape)
    return Image.fromarray(np.clip(np.rint(small * 255), 0, 255).astype(np.uint8))
