"""Test images for the decode paths: photo-like pixels, and JPEGs with every header quirk the fast paths check."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "JPEG", **kw: Any) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth structure plus noise: something a resize filter has to work on, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([np.sin(x / (7 + seed % 5) + c) * np.cos(y / 9 - c) for c in (0, 1, 2)], -1) * 90 + 128
    return Image.fromarray((arr + rng.normal(0, 15, arr.shape)).clip(0, 255).astype(np.uint8))


def smooth_photo(w: int, h: int, seed: int) -> Image.Image:
    """Large-scale structure (periods of 60-400 px) plus mild noise: a large original's statistics."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    periods = rng.uniform(10, 60, (3, 2))
    arr = np.stack([np.sin(x / px + c) * np.cos(y / py - c) for c, (px, py) in enumerate(periods)], -1)
    return Image.fromarray(((arr * 0.5 + 0.5) * 200 + rng.normal(0, 8, arr.shape)).clip(0, 255).astype(np.uint8))


def with_sof(data: bytes, marker: int) -> bytes:
    i = data.index(b"\xff\xc0")
    return data[: i + 1] + bytes([marker]) + data[i + 2 :]


def with_size(data: bytes, w: int, h: int) -> bytes:
    i = data.index(b"\xff\xc0") + 5  # FF C0, length (2), precision (1), then height, width
    return data[:i] + h.to_bytes(2, "big") + w.to_bytes(2, "big") + data[i + 4 :]


def bad_scan_component(data: bytes) -> bytes:
    i = data.index(b"\xff\xda") + 5  # FF DA, length (2), component count (1), first component selector
    return data[:i] + b"\x09" + data[i + 1 :]


def adobe_rgb(data: bytes) -> bytes:
    app14 = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # transform 0: samples are RGB, not YCbCr
    return data[:2] + app14 + data[2:]


def exif_oriented(img: Image.Image, orientation: int, **kw: Any) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, exif=exif, **kw)


# Whole, valid files the device takes (their pixels may be compared exactly).
WHOLE = ("baseline", "progressive", "subsampling_444", "exif_upright", "trailing_zeros")


def special_jpegs() -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, whether the device may take it); everything else must go to decode_image."""
    base_img = photo(90, 60, 1)
    base = encode(base_img, quality=90)
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description tiff:Orientation="8"/></x:xmpmeta>'
    return {
        "baseline": (base, True),
        "progressive": (encode(base_img, progressive=True), True),
        "subsampling_444": (encode(base_img, subsampling=0), True),
        "exif_upright": (exif_oriented(base_img, 1), True),
        "trailing_zeros": (base + b"\x00" * 100, True),
        "cut_then_end_marker": (base[: len(base) // 2] + b"\xff\xd9", True),  # libjpeg and Pillow: a warning, ok
        "bad_scan_header": (bad_scan_component(base), False),  # libjpeg's header reader refuses it
        "exif_rotated": (exif_oriented(base_img, 6), False),
        "xmp_rotated": (encode(base_img, xmp=xmp), False),
        "grayscale": (encode(base_img.convert("L")), False),
        "cmyk": (encode(base_img.convert("CMYK")), False),
        "adobe_rgb": (adobe_rgb(base), False),
        "arithmetic": (with_sof(base, 0xC9), False),
        "lossless": (with_sof(base, 0xC3), False),
        "mpo": (encode(base_img, "MPO", save_all=True, append_images=[photo(90, 60, 2)]), False),
        "truncated": (base[: len(base) // 2], False),
        "trailing_garbage": (base + b"garbage", False),
        "over_pixel_limit": (with_size(base, 5000, 5000), False),
        "png": (encode(base_img, "PNG"), False),
    }


def fallback_images() -> dict[str, bytes]:
    """Every non-JPEG kind decode_image turns to RGB (modes, transparency, animation), for the uint8 fallbacks."""
    img = photo(70, 50, 3)
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))
    arr16 = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    frames = [photo(40, 30, s).convert("P") for s in (4, 5)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    palette = img.convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        "png": encode(img, "PNG"),
        "png_rgba": encode(rgba, "PNG"),
        "png_16bit": encode(Image.fromarray(arr16), "PNG"),
        "png_palette_transparent": encode(palette, "PNG", transparency=0),
        "png_gray": encode(img.convert("L"), "PNG"),
        "webp": encode(img, "WEBP", quality=92),
        "gif_animated": gif.getvalue(),
        "bmp": encode(img, "BMP"),
        "tiff": encode(img, "TIFF"),
        "jpeg_cmyk": encode(img.convert("CMYK"), quality=92),
    }
