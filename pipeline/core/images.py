"""Untrusted image bytes to an RGB picture under one policy, shared by the embed stage, query images and report
thumbnails: only formats that decode no pixels before the size check, a pixel limit read from the header, EXIF
orientation, every Pillow mode to RGB with transparency on a background."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

# Our own pixel check runs on the header first; PIL's own guard would only warn or raise with another message.
Image.MAX_IMAGE_PIXELS = None


# What ImageOps.exif_transpose does for each EXIF orientation (decode_image applies it).
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


OPEN_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")  # JPEG also opens MPO
Image.init()  # register every plugin now: open(formats=...) fails on one that is not loaded yet


class SampleError(Exception):
    """A sample that cannot be used; `status` is the reason class written to metadata."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Every Pillow mode to RGB; transparency is composited on `background` (white by default)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 257.0
        elif img.mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(
    data: bytes | None,
    max_pixels: int,
    background: tuple[int, int, int] = (255, 255, 255),
    draft_size: int | None = None,
) -> Image.Image:
    """Decode image bytes to RGB; raises SampleError(no_image|empty_image|too_large|decode_error)."""
    if data is None:
        raise SampleError("no_image", "sample has no image field")
    if len(data) == 0:
        raise SampleError("empty_image", "image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Only formats that do not decode pixels inside open(): ICO, for one, would decode before our size check.
            img = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise SampleError("too_large", f"{w}x{h} = {w * h} pixels > embed.max_pixels={max_pixels}")
            scale = 1.0
            if draft_size and img.format == "JPEG" and min(w, h) > 2 * draft_size:
                # Keep the short side >= 2x the model input so the resize after it sees enough pixels.
                k = 2 * draft_size / min(w, h)
                drafted = img.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
                scale = w / drafted[1][2] if drafted else 1.0  # draft's box: the source extent in reduced pixels
            loaded = img.size
            img.load()
            upright = scale == 1 or TRANSPOSE.get(img.getexif().get(0x0112, 1)) is None
            img = ImageOps.exif_transpose(img) or img  # type: ignore[assignment]
            out = to_rgb(img, background)
            # Record the source size (draft decoding shrinks the pixels, EXIF rotation may swap the sides).
            swapped = img.size != loaded
            out.info["source_size"] = (h, w) if swapped else (w, h)
            if scale > 1 and upright:  # the uint8 resize maps reduced pixels exactly while the partial block is last
                out.info["draft_scale"] = round(scale)
            return out
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad files
        raise SampleError("decode_error", f"{type(e).__name__}: {e}") from None
