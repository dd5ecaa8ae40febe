"""Decode policy: every mode to RGB, EXIF orientation, bombs, broken bytes, captions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.core.images import SampleError, decode_image, to_rgb
from pipeline.embed.decode import decode_caption

LIMIT = 10_000_000


def _bytes(img: Image.Image, fmt: str, **kw: object) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def test_palette_with_transparency_goes_on_white() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    out = decode_image(_bytes(img, "PNG", transparency=0), LIMIT)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_modes_composited_on_background(mode: str) -> None:
    img = Image.new(mode, (3, 3), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    out = decode_image(_bytes(img, "PNG"), LIMIT, background=(10, 20, 30))
    assert out.getpixel((1, 1)) == (10, 20, 30)


def test_cmyk_16bit_and_1bit() -> None:
    cmyk = decode_image(_bytes(Image.new("CMYK", (5, 5), (0, 0, 0, 0)), "JPEG"), LIMIT)
    assert cmyk.mode == "RGB" and min(cmyk.getpixel((2, 2))) > 240
    arr16 = np.full((4, 4), 65535, dtype=np.uint16)
    i16 = decode_image(_bytes(Image.fromarray(arr16), "PNG"), LIMIT)
    assert i16.mode == "RGB" and i16.getpixel((0, 0)) == (255, 255, 255)
    one = decode_image(_bytes(Image.new("1", (4, 4), 1), "PNG"), LIMIT)
    assert one.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (20, 10), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_image(_bytes(img, "JPEG", exif=exif), LIMIT)
    assert out.size == (10, 20) and out.info["source_size"] == (10, 20)


def test_failures_have_reasons() -> None:
    with pytest.raises(SampleError) as e:
        decode_image(None, LIMIT)
    assert e.value.status == "no_image"
    with pytest.raises(SampleError) as e:
        decode_image(b"", LIMIT)
    assert e.value.status == "empty_image"
    with pytest.raises(SampleError) as e:
        decode_image(b"<html><body>not an image</body></html>", LIMIT)
    assert e.value.status == "decode_error"
    good = _bytes(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(SampleError) as e:
        decode_image(good[: len(good) // 2], LIMIT)
    assert e.value.status == "decode_error"
    with pytest.raises(SampleError) as e:
        decode_image(good, max_pixels=64 * 64 - 1)
    assert e.value.status == "too_large"


def test_decompression_bomb_rejected_from_header_only() -> None:
    # A 30000x30000 PNG compresses to a few hundred KB; only the header is read before rejecting it.
    bomb = _bytes(Image.new("1", (30000, 30000)), "PNG")
    with pytest.raises(SampleError) as e:
        decode_image(bomb, max_pixels=89_478_485)
    assert e.value.status == "too_large"


def test_animated_gif_first_frame_and_webp() -> None:
    frames = [Image.new("P", (8, 8), i) for i in range(3)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(b.getvalue(), LIMIT).size == (8, 8)
    assert decode_image(_bytes(Image.new("RGB", (9, 7), (5, 5, 5)), "WEBP"), LIMIT).size == (9, 7)


def test_draft_mode_keeps_enough_resolution() -> None:
    rng = np.random.default_rng(0)
    big = Image.fromarray((rng.random((1200, 1600, 3)) * 255).astype("uint8"))
    data = _bytes(big, "JPEG")
    full = decode_image(data, LIMIT)
    drafted = decode_image(data, LIMIT, draft_size=224)
    assert full.size == (1600, 1200)
    assert min(drafted.size) >= 2 * 224 and drafted.size[0] < 1600
    assert drafted.info["source_size"] == (1600, 1200)  # metadata keeps the source size


def test_captions() -> None:
    assert decode_caption(None) == (None, "missing")
    assert decode_caption("é".encode()) == ("é", "ok")
    text, status = decode_caption(b"caf\xe9 \xff")
    assert status == "invalid_utf8" and text.startswith("caf")


def test_to_rgb_passthrough() -> None:
    img = Image.new("RGB", (2, 2))
    assert to_rgb(img) is img
