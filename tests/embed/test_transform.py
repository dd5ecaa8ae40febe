"""open_clip's eval transform on uint8 tensors: geometry, reduced decodes, EXIF transpositions, normalization."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from pipeline.embed.transform import DCT_DENOMINATORS, PixelTransform, _scale_reaching
from tests.support.jpegs import encode, photo, smooth_photo

MAX_LEVELS = 2  # per-pixel difference to open_clip's PIL path, in 0..255 units (torch's uint8 bicubic vs Pillow's)
INFO = {"size": 32, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3), "interpolation": "bicubic"}


def _u8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.int() - b.int()).abs()


@pytest.mark.parametrize(
    "size,resize_mode,interpolation",
    [
        (32, "shortest", "bicubic"),
        (32, "shortest", "bilinear"),
        ((24, 40), "shortest", "bicubic"),
        (32, "squash", "bilinear"),
        (32, "longest", "bicubic"),
        ((40, 24), "longest", "bicubic"),
    ],
)
def test_resize_modes_follow_open_clip(size: Any, resize_mode: str, interpolation: str) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ref = open_clip.image_transform(
        size, is_train=False, mean=mean, std=std, resize_mode=resize_mode, interpolation=interpolation, fill_color=7
    )
    info = {"size": size, "mean": mean, "std": std, "resize_mode": resize_mode, "interpolation": interpolation}
    pre = PixelTransform({**info, "fill_color": 7}, torch.device("cpu"))
    for i, (w, h) in enumerate([(100, 60), (60, 100), (33, 33), (17, 90), (32, 32)]):
        img = photo(w, h, i)
        want = ref(img)
        for u8 in (_u8(img), _u8(img).contiguous()):  # the decoders' HWC views, and planar tensors
            got = pre.normalize(pre.resize_crop(u8)[None])[0]
            assert got.shape == want.shape
            levels = ((got - want).abs() * torch.tensor(std).view(3, 1, 1) * 255).amax().item()
            assert levels <= MAX_LEVELS + 0.01, (w, h, levels)


def test_normalize_is_open_clips_to_tensor_and_normalize() -> None:
    pre = PixelTransform(INFO, torch.device("cpu"))
    u8 = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last storage
    ref = open_clip.image_transform(32, is_train=False, mean=INFO["mean"], std=INFO["std"])
    want = torch.stack([ref(Image.fromarray(x.permute(1, 2, 0).numpy())) for x in u8])
    got = pre.normalize(u8)
    assert got.dtype == torch.float32 and got.is_contiguous()
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("w,h", [(1001, 757), (2000, 1163), (757, 1001), (1600, 1600), (999, 2000)])
def test_reduced_decode_keeps_the_full_images_geometry(w: int, h: int) -> None:
    """A 1/d decode whose last block is partial resizes onto the full image's grid: within a few levels of the
    full-resolution resize, where resizing it as if it were whole shifts the picture (the old draft geometry)."""
    data = encode(smooth_photo(w, h, 3), quality=95)
    pre = PixelTransform({**INFO, "size": 224}, torch.device("cpu"))
    want = pre.resize_crop(_u8(Image.open(io.BytesIO(data)).convert("RGB")))
    for d in DCT_DENOMINATORS:
        if min(w, h) / d < 224:
            continue
        reduced = Image.open(io.BytesIO(data))
        reduced.draft("RGB", (w // d, h // d))
        assert reduced.size == (math.ceil(w / d), math.ceil(h / d))
        exact = _levels(pre.resize_crop(_u8(reduced.convert("RGB")), (h, w), d), want)
        stretched = _levels(pre.resize_crop(_u8(reduced.convert("RGB"))), want)
        # measured: exact mean 0.2-0.8, max 2-4 levels; stretched mean up to 5.8, max 33
        assert exact.float().mean() < 1.0 and exact.max() <= 8, (d, exact.max())
        if w % d or h % d:
            assert stretched.float().mean() > 1.5 * exact.float().mean()


@pytest.mark.parametrize("method", list(Image.Transpose))
@pytest.mark.parametrize("size", [32, (24, 40)])
def test_transposition_after_the_resize_is_pillows_before_it(method: Image.Transpose, size: Any) -> None:
    img = photo(90, 61, 5)
    pre = PixelTransform({**INFO, "size": size}, torch.device("cpu"))
    want = pre.resize_crop(_u8(img.transpose(method)))
    got = pre.resize_crop(_u8(img), transpose=method)
    assert got.shape == want.shape and _levels(got, want).max() <= 1


def test_output_length_reaches_the_size_despite_float_rounding() -> None:
    rng = np.random.default_rng(0)
    for _ in range(2000):
        extent = float(rng.uniform(20, 3000))
        n = math.ceil(extent)
        size = int(rng.integers(1, 400))
        scale = _scale_reaching(n, size, extent)
        assert math.floor(n * scale) >= size and scale - size / extent < 1e-9 * scale


def test_reduction_keeps_the_margin_on_both_axes() -> None:
    pre = PixelTransform({**INFO, "size": 224}, torch.device("cpu"))
    assert pre.reduction(256, 384, 1.0) == 1
    assert pre.reduction(1500, 2000, 1.0) == 4 and pre.reduction(1500, 2000, 1.5) == 4
    assert pre.reduction(1500, 2000, 2.0) == 2
    assert pre.reduction(4000, 3000, 1.5) == 8
    squash = PixelTransform({**INFO, "size": 224, "resize_mode": "squash"}, torch.device("cpu"))
    assert squash.reduction(3000, 500, 1.0) == 2  # the short side limits a squash
