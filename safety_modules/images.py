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


# Image-processor settings carried over when LLaVA-1.5's padding is switched on.
_CARRIED_SETTINGS = ("size", "crop_size", "do_resize", "do_center_crop", "resample", "do_rescale",
                     "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb")


def use_square_padding(processor):
    """Make `processor` pad every image to a square before resizing, as the original LLaVA-1.5 does.

    Why: LLaVA-1.5 was trained and evaluated on images padded to a square with the image
    processor's mean colour (`expand2square(image, tuple(int(x * 255) for x in image_mean))`, its
    `image_aspect_ratio: pad`); the Hugging Face processor centre-crops instead, which cuts off
    whatever is near the long sides' ends, e.g. an unsafe object at the edge. The image processor is
    replaced by transformers' `LlavaImageProcessorPil` with `do_pad=True` (that padding, then the same
    resize, crop and normalisation as before), so every caller of the processor gets it. Only for
    single-tile LLaVA processors: LLaVA-NeXT tiles the image itself.
    """
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil  # heavy; LLaVA only

    current = processor.image_processor
    if getattr(current, "image_grid_pinpoints", None):
        raise ValueError(f"image padding to a square is LLaVA-1.5's preprocessing; {type(current).__name__} "
                         "tiles images itself (LLaVA-NeXT): leave the processor's own preprocessing")
    settings = {name: getattr(current, name) for name in _CARRIED_SETTINGS if getattr(current, name, None) is not None}
    processor.image_processor = LlavaImageProcessorPil(**settings, do_pad=True)
    return processor
