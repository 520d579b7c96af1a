"""Open any image file as an RGB PIL image, the same way in every command.

Handles EXIF orientation, every Pillow mode (palette with transparency, alpha,
CMYK, 16-bit, 1-bit) and, for JPEGs, decoding at reduced scale when the caller
only needs a small image (libjpeg's DCT scaling: up to 8x fewer pixels to decode).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels are composited onto white: what a viewer shows, and what
# product shots on transparent backgrounds are meant to look like.
BACKGROUND = (255, 255, 255)


def open_rgb(path: str | Path, min_side: int | None = None) -> Image.Image:
    """Decode `path` to an upright RGB image.

    With `min_side`, a JPEG may be decoded at 1/2, 1/4 or 1/8 scale as long as
    both sides stay at least `min_side` pixels: callers that resize to a small
    size afterwards get the same picture for a fraction of the decode cost.
    """
    with Image.open(path) as img:
        if min_side is not None and img.format == "JPEG":
            img.draft("RGB", (min_side, min_side))
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any mode to RGB without clipping or losing transparency."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    # Pillow's convert("RGB") clips 16- and 32-bit values at 255, turning most
    # 16-bit scans white; rescale from the value range the data type implies.
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif values.max(initial=0.0) > 255:
        top = 65535.0
    else:
        top = 255.0
    gray = np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")
