"""JPEG headers read without decoding (which files libjpeg-turbo or the device may take instead of Pillow) and
libjpeg-turbo decoding at a reduced DCT scale (simplejpeg) for the host fast path.

Conservative by design: a file this module refuses, or fails to decode, takes `core.images.decode_image`, whose policy
(statuses, EXIF, modes, pixel limit) thereby stays the only one. A file it accepts is one Pillow opens the same way.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.core.images import TRANSPOSE

# Huffman-coded baseline, extended sequential and progressive: what both libjpeg-turbo's fast path and nvjpeg
# decode. Lossless, arithmetic-coded and hierarchical files (the other SOF markers) are left to Pillow.
HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)
ANY_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
DHT, SOS, DQT, DRI, COM, APP0, APP1, APP2, APP14 = 0xC4, 0xDA, 0xDB, 0xDD, 0xFE, 0xE0, 0xE1, 0xE2, 0xEE
SWAPS_SIDES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                         Image.Transpose.ROTATE_90})  # fmt: skip


@dataclass(frozen=True)
class JpegHeader:
    """What the segments before the first scan say, read strictly (None from read_header if anything is unusual)."""

    width: int
    height: int
    sof: int
    precision: int
    components: int
    component_ids: bytes
    # A segment Pillow's reader parses at open (EXIF/XMP orientation, MPO index, Adobe transform, short JFIF or
    # ICC chunks it indexes into): only Pillow itself can say what it makes of it.
    needs_pillow: bool
    adobe_transform: int | None  # APP14's colour transform (0: RGB samples unless a JFIF marker says YCbCr)


def _tables_ok(body: bytes) -> bool:
    """DQT holds whole 8- or 16-bit tables, as Pillow's reader checks."""
    while body:
        length = 1 + (64 if body[0] // 16 == 0 else 128)
        if len(body) < length:
            return False
        body = body[length:]
    return True


def _app_needs_pillow(marker: int, body: bytes) -> bool:
    if marker == APP1:
        return True
    if marker == APP0:
        return body.startswith(b"JFIF") and len(body) < 12
    if marker == APP2:
        return body.startswith(b"MPF\0") or (body.startswith(b"ICC_PROFILE\0") and len(body) < 14)
    return marker == APP14 and body.startswith(b"Adobe")


def read_header(data: bytes) -> JpegHeader | None:
    """The frame header of a JPEG whose segments parse strictly up to the first scan; None for anything unusual."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    pos, n = 2, len(data)
    sof: tuple[int, bytes] | None = None
    needs_pillow = False
    adobe: int | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return None
        if marker == SOS:
            break
        if marker in ANY_SOF:
            if sof is not None:
                return None
            sof = (marker, body)
        elif marker == DQT:
            if not _tables_ok(body):
                return None
        elif 0xE0 <= marker <= 0xEF:
            needs_pillow = needs_pillow or _app_needs_pillow(marker, body)
            if marker == APP14 and body.startswith(b"Adobe") and len(body) >= 12:
                adobe = body[11]
        elif marker not in (DHT, DRI, COM):  # DNL, DAC, EXP, DHP, JPGn, standalone markers: leave to Pillow
            return None
        pos += 2 + length
    else:
        return None
    if sof is None or len(sof[1]) < 6 or len(sof[1]) != 6 + 3 * sof[1][5]:  # Pillow reads 3 bytes per component
        return None
    body = sof[1]
    comps = body[5]
    return JpegHeader(
        width=int.from_bytes(body[3:5], "big"),
        height=int.from_bytes(body[1:3], "big"),
        sof=sof[0],
        precision=body[0],
        components=comps,
        component_ids=bytes(body[6 : 6 + 3 * comps : 3]),
        needs_pillow=needs_pillow,
        adobe_transform=adobe,
    )


def pillow_orientation(data: bytes, mode: str) -> tuple[bool, Image.Transpose | None]:
    """(Pillow opens it as a plain JPEG of `mode`, the transposition decode_image would apply: None if upright).

    Not plain: an MPO, a mode other than `mode` ("RGB" for 3 components, "L" for 1), and whatever makes Pillow's
    reader or exif_transpose raise (the policy path then records that failure).
    """
    try:
        img = Image.open(io.BytesIO(data), formats=("JPEG",))
        if img.format != "JPEG" or img.mode != mode:
            return False, None
        exif = img.getexif()
        method = TRANSPOSE.get(exif.get(0x0112, 1))
        if method is not None and "exif" in img.info:
            # exif_transpose rewrites the EXIF block without the tag; a block it cannot write back fails there
            del exif[0x0112]
            exif.tobytes()
        return True, method
    except Exception:
        return False, None


@dataclass(frozen=True)
class JpegPlan:
    """A JPEG the host fast path decodes: stored size, the transposition EXIF asks for, and its decoded size."""

    width: int
    height: int
    transpose: Image.Transpose | None

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) after the EXIF transposition: what the metadata records."""
        return (self.height, self.width) if self.transpose in SWAPS_SIDES else (self.width, self.height)


def plan_host_decode(data: bytes | None, max_pixels: int) -> JpegPlan | None:
    """A plain 8-bit YCbCr or grayscale Huffman JPEG within the pixel limit; None leaves it to decode_image."""
    if not data:
        return None
    head = read_header(data)
    if head is None or head.sof not in HUFFMAN_SOF or head.precision != 8 or head.components not in (1, 3):
        return None
    w, h = head.width, head.height
    if w * h == 0 or w * h > max_pixels:
        return None
    transpose = None
    if head.needs_pillow:
        plain, transpose = pillow_orientation(data, "RGB" if head.components == 3 else "L")
        if not plain:
            return None
    try:  # libjpeg's own reading of the colour space (Adobe transform, 'R','G','B' component ids)
        if simplejpeg.decode_jpeg_header(data)[2] not in ("YCbCr", "Gray"):
            return None
    except ValueError:
        return None
    return JpegPlan(w, h, transpose)


def decode_reduced(data: bytes, plan: JpegPlan, denom: int) -> np.ndarray | None:
    """uint8 HWC RGB at 1/denom scale (libjpeg's scaled IDCT), in stored orientation; None on any libjpeg complaint.

    strict: libjpeg's warnings (corrupt or cut-short data) raise too, so such files take Pillow's path.
    """
    rows, cols = math.ceil(plan.height / denom), math.ceil(plan.width / denom)
    try:
        if denom == 1:
            arr = simplejpeg.decode_jpeg(data, "RGB", strict=True)
        else:
            arr = simplejpeg.decode_jpeg(data, "RGB", min_height=rows, min_width=cols, strict=True)
    except Exception:  # ValueError from libjpeg; anything else is no better a reason to trust the pixels
        return None
    return arr if arr.shape == (rows, cols, 3) else None
