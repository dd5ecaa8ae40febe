"""JPEG headers and libjpeg-turbo decoding for the host fast path: what it takes is exactly what Pillow decodes."""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import pytest
from PIL import Image

from pipeline.core.images import SampleError, decode_image
from pipeline.embed.jpeg import JpegPlan, decode_reduced, plan_host_decode, read_header
from tests.support.helpers import hostile_samples, jpeg_bytes
from tests.support.jpegs import encode, exif_oriented, photo, special_jpegs

LIMIT = 10_000_000
# The host path takes these (as itself or with the transposition EXIF/XMP asks for); the rest go to decode_image.
HOST_TAKES = {
    "baseline": None,
    "progressive": None,
    "subsampling_444": None,
    "exif_upright": None,
    "trailing_zeros": None,
    "cut_then_end_marker": None,  # planned; libjpeg's strict decode then refuses it (a warning), Pillow decides
    "exif_rotated": Image.Transpose.ROTATE_270,
    "xmp_rotated": Image.Transpose.ROTATE_90,
    "grayscale": None,
    "adobe_rgb": None,  # a JFIF marker as well: libjpeg (in Pillow too) decodes YCbCr
    "truncated": None,  # planned; libjpeg's strict decode refuses it
    "trailing_garbage": None,
}


def _policy(data: bytes) -> tuple[str, np.ndarray | None]:
    """decode_image's verdict (status) and pixels, full scale."""
    try:
        return "ok", np.asarray(decode_image(data, LIMIT))
    except SampleError as e:
        return e.status, None


def _fast(data: bytes, denom: int = 1) -> tuple[JpegPlan, np.ndarray] | None:
    plan = plan_host_decode(data, LIMIT)
    arr = decode_reduced(data, plan, denom) if plan is not None else None
    return (plan, arr) if plan is not None and arr is not None else None


def _upright(arr: np.ndarray, plan: JpegPlan) -> np.ndarray:
    img = Image.fromarray(arr)
    return np.asarray(img.transpose(plan.transpose) if plan.transpose is not None else img)


@pytest.mark.parametrize("name", list(special_jpegs()))
def test_plan_takes_plain_jpegs_and_reads_their_orientation(name: str) -> None:
    data, _ = special_jpegs()[name]
    plan = plan_host_decode(data, LIMIT)
    assert (plan is not None) == (name in HOST_TAKES), plan
    if plan is not None:
        assert plan.transpose == HOST_TAKES[name]
        assert (plan.width, plan.height) == Image.open(io.BytesIO(data)).size
        if _policy(data)[0] == "ok":
            assert plan.upright_size == decode_image(data, LIMIT).info["source_size"]


@functools.cache
def _cases() -> dict[str, bytes]:
    cases = {k: d for k, (d, _) in special_jpegs().items()}
    for k, fields in hostile_samples():
        cases[f"hostile_{k}"] = next((fields[e] for e in ("jpg", "png") if e in fields), b"")
    img = photo(120, 80, 4)
    for o in range(1, 9):
        cases[f"exif_{o}"] = exif_oriented(img, o)
    cases["gray_progressive"] = encode(img.convert("L"), progressive=True)
    cases["restart_markers"] = encode(img, restart_marker_blocks=1)  # type: ignore[arg-type]
    return cases


@pytest.mark.parametrize("name", list(_cases()))
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow on the damaged EXIF blocks
def test_what_the_fast_path_decodes_pillow_decodes_to_the_same_pixels(name: str) -> None:
    data = _cases()[name]
    status, pil = _policy(data)
    fast = _fast(data)
    if fast is None:
        return  # decode_image decides this sample on the uint8 path too
    assert status == "ok", f"the fast path took a file decode_image calls {status}"
    plan, arr = fast
    assert np.array_equal(_upright(arr, plan), pil)  # the same libjpeg-turbo, ISLOW IDCT, fancy upsampling


def _mutants(data: bytes, n: int, seed: int) -> list[bytes]:
    """Header damage: 1-3 bytes changed before the first scan, or the file cut anywhere."""
    rng = np.random.default_rng(seed)
    scan = data.index(b"\xff\xda") + 2
    out = []
    for i in range(n):
        b = bytearray(data)
        if i % 4 == 3:
            out.append(bytes(b[: int(rng.integers(3, len(b)))]))
            continue
        for _ in range(int(rng.integers(1, 4))):
            b[int(rng.integers(2, scan + 12))] = int(rng.integers(0, 256))
        out.append(bytes(b))
    return out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_headers_never_pass_where_pillow_fails() -> None:
    """Random header damage to plain, EXIF-tagged and progressive JPEGs: every file the fast path decodes is
    one decode_image decodes to the same pixels, so a status can never change by taking the fast path."""
    img = photo(64, 48, 8)
    sources = [jpeg_bytes(5), exif_oriented(img, 6), exif_oriented(img, 1), encode(img, progressive=True)]
    taken = refused = 0
    for s, src in enumerate(sources):
        for data in _mutants(src, 150, seed=s):
            fast = _fast(data)
            status, pil = _policy(data)
            if fast is None:
                refused += 1
                continue
            taken += 1
            assert status == "ok"
            assert np.array_equal(_upright(fast[1], fast[0]), pil)
    assert taken > 100 and refused > 100  # both sides of the property were exercised


@pytest.mark.parametrize("denom", [2, 4, 8])
def test_reduced_decode_is_libjpegs_scaled_idct(denom: int) -> None:
    """simplejpeg at 1/denom gives Pillow's draft pixels: the same scaled IDCT, partial last block included."""
    data = encode(photo(1001, 757, 2), quality=90)
    fast = _fast(data, denom)
    assert fast is not None
    arr = fast[1]
    assert arr.shape == (math.ceil(757 / denom), math.ceil(1001 / denom), 3)
    pil = Image.open(io.BytesIO(data))
    pil.draft("RGB", (1001 // denom, 757 // denom))  # Pillow picks the scale by integer division of the sides
    assert pil.size == (arr.shape[1], arr.shape[0])
    assert np.array_equal(np.asarray(pil.convert("RGB")), arr)


def test_read_header_refuses_anything_unusual() -> None:
    base = jpeg_bytes(3)
    head = read_header(base)
    assert head is not None and (head.width, head.height, head.components, head.precision) == (48, 40, 3, 8)
    sof = base.index(b"\xff\xc0")
    dnl = base[:sof] + b"\xff\xdc\x00\x04\x00\x28" + base[sof:]
    two_sof = base[:sof] + base[sof : sof + 19] + base[sof:]
    junk = base[:sof] + b"\x00\x00" + base[sof:]
    short_dqt = base[:2] + b"\xff\xdb\x00\x05\x00\x01\x02" + base[2:]
    for bad in (b"", b"\xff\xd8", base[:sof], dnl, two_sof, junk, short_dqt, b"\x89PNG\r\n\x1a\n" + base):
        assert read_header(bad) is None
    assert read_header(exif_oriented(photo(10, 10, 1), 1)).needs_pillow  # type: ignore[union-attr]
    assert not head.needs_pillow


def test_pixel_limit_and_empty_frames_are_left_to_the_policy() -> None:
    from tests.support.jpegs import with_size

    base = jpeg_bytes(3)
    assert plan_host_decode(base, 48 * 40) is not None
    assert plan_host_decode(base, 48 * 40 - 1) is None  # decode_image says too_large
    assert plan_host_decode(with_size(base, 0, 40), LIMIT) is None
    assert plan_host_decode(None, LIMIT) is None and plan_host_decode(b"", LIMIT) is None
