"""Opening images with errors that name the file, never a silent zero image.

Why: the reference code replaced an unreadable image with zeros and kept its label, teaching the
model that a black square is "unsafe". Every loader of the framework opens images through here.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_IMAGE_PIXELS = 64_000_000  # ~8000 x 8000; larger is refused as oversized


class ImageError(ValueError):
    """An image is missing, undecodable, oversized, or outside its data folder."""


def resolve_image_path(root: str | Path, relative: str) -> Path:
    """`root/relative`, refusing absolute paths and paths that escape `root` (e.g. `../../etc`)."""
    root = Path(root).resolve()
    candidate = (root / relative).resolve()
    if Path(relative).is_absolute() or (candidate != root and root not in candidate.parents):
        raise ImageError(f"image path {relative!r} escapes the data folder {root}")
    return candidate


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open `path` as RGB, fully decoded, or raise ImageError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"{path}: image is {width}x{height}, over the limit of {max_pixels} pixels")
            img.load()
            return img.convert("RGB")
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{path}: cannot decode image ({exc})") from None
