"""Thumbnails for the report and the notebooks: image bytes of chosen samples streamed out of WebDataset tars (never
extracted to disk), decoded under the embed policy (bomb limit included) and shrunk."""

from __future__ import annotations

import base64
import io
import logging
import tarfile
from collections.abc import Iterable
from typing import Any

import fsspec

log = logging.getLogger(__name__)


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


THUMB_PX = 160


# Thumbnails come from untrusted downloads: refuse decompression bombs (the embed stage's default limit).
MAX_PIXELS = 89_478_485


def read_tar_images(tar_url: str, keys: Iterable[str]) -> dict[str, bytes]:
    """The image bytes of the wanted sample keys, streamed out of a WebDataset tar member by member."""
    from pipeline.dedup.materialize import member_key

    wanted = set(keys)
    found: dict[str, bytes] = {}
    if not wanted:
        return found
    with fsspec.open(tar_url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key = member_key(member.name)
            ext = member.name.rsplit(".", 1)[-1].lower()
            if key in wanted and key not in found and ext in IMAGE_EXTS:
                data = tar.extractfile(member)
                if data is not None:
                    found[key] = data.read()
                if len(found) == len(wanted):
                    break
    return found


def thumbnail(data: bytes, size: int = THUMB_PX) -> Any:
    """A PIL thumbnail of image bytes (RGB, at most size x size)."""
    from pipeline.core.images import decode_image

    img = decode_image(data, MAX_PIXELS)
    img.thumbnail((size, size))
    return img


def thumbnail_uri(data: bytes, size: int = THUMB_PX) -> str | None:
    """A JPEG data URI of the image's thumbnail; None when the bytes do not decode."""
    from pipeline.core.images import SampleError

    try:
        img = thumbnail(data, size)
    except SampleError as e:
        log.info("no thumbnail: %s", e)
        return None
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
