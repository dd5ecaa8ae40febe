"""open_clip's eval transform on uint8 tensors (resize, center crop or pad) plus its normalization as one batched
multiply-add on the model's device: the one reproduction of a model's preprocess config, for host and device decode."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

from pipeline.core.errors import ConfigError
from pipeline.embed.jpeg import SWAPS_SIDES

REQUIRED_KEYS = ("size", "mean", "std")
RESIZE_MODES = ("shortest", "longest", "squash")
DCT_DENOMINATORS = (8, 4, 2)  # libjpeg's fast scaled IDCTs; 3/4, 5/8... decode slower than full size (measured)


def unsupported(info: dict[str, Any]) -> str | None:
    """Why a model's preprocess config cannot be reproduced on uint8 tensors; None when it can."""
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        return f"the model exposes no open_clip preprocess config (missing {missing})"
    mode = info.get("resize_mode") or "shortest"
    if mode not in RESIZE_MODES:
        return f"resize_mode {mode!r} is not supported"
    return None


def _triple(v: Any) -> list[float]:
    return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]


class PixelTransform:
    """open_clip's eval transform for resize modes 'shortest' (the default), 'longest' and 'squash', on uint8.

    Follows open_clip's `image_transform`, including its output-size rounding, so a uint8 image gets the same
    geometry as the PIL path. The resize is antialiased bicubic (or bilinear when the config says so) with
    Pillow's kernel (a = -0.5, support scaled by the reduction), which torch's uint8 CPU kernel implements:
    within one level of Pillow per pixel, at a third of its CPU time (measured; see bench/bench_input.py).
    """

    def __init__(self, info: dict[str, Any], device: torch.device):
        reason = unsupported(info)
        if reason:
            raise ConfigError(f"embed.preprocess=uint8 / embed.decode=device: {reason}; use embed.preprocess=model")
        size = info["size"]
        self.size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        self.resize_mode = info.get("resize_mode") or "shortest"
        # open_clip's eval transform: bilinear when asked, bicubic otherwise ('random' is a training option);
        # its non-square 'shortest' path builds ResizeKeepRatio with that class's default, bicubic.
        bilinear = info.get("interpolation") == "bilinear"
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            bilinear = False
        self.mode = "bilinear" if bilinear else "bicubic"
        self.fill = int(info.get("fill_color") or 0)
        mean, std = torch.tensor(_triple(info["mean"])), torch.tensor(_triple(info["std"]))
        self.device = device
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        # (x/255 - mean)/std folded into one multiply-add
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(device)
        self.shift = (-mean / std).view(1, 3, 1, 1).to(device)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) of open_clip's resize output for an h x w image, before the crop or pad."""
        th, tw = self.size
        if self.resize_mode == "squash":
            return th, tw
        if self.resize_mode == "shortest" and th == tw:
            # torchvision Resize(int): the short side becomes `size`, the long one is truncated
            if w <= h:
                return int(th * h / w), th
            return th, int(th * w / h)
        # open_clip's ResizeKeepRatio: non-square 'shortest' (longest=0) and 'longest' (longest=1)
        rh, rw = h / th, w / tw
        ratio = max(rh, rw) if self.resize_mode == "longest" else min(rh, rw)
        return round(h / ratio), round(w / ratio)

    def reduction(self, h: int, w: int, margin: float) -> int:
        """The largest DCT-scaling denominator that leaves at least `margin` x the resize output on both axes."""
        rh, rw = self.resized_size(h, w)
        for d in DCT_DENOMINATORS:
            if h / d >= margin * rh and w / d >= margin * rw:
                return d
        return 1

    def resize_crop(
        self,
        img: torch.Tensor,
        full: tuple[int, int] | None = None,
        denom: int = 1,
        transpose: Image.Transpose | None = None,
    ) -> torch.Tensor:
        """uint8 [3, h, w] -> uint8 [3, H, W] at the model's input size.

        `img` may be a reduced decode (DCT scaling, Pillow draft) of a `full` = (height, width) image by `denom`:
        pixel i of it covers source pixels [denom*i, denom*(i+1)), and its last row/column may cover a partial
        block. The resize then maps output pixels onto source coordinates exactly as from the full image;
        resizing the reduced image to the output size instead would stretch it by up to denom-1 source pixels.
        `transpose` (EXIF orientation) applies after the resize, where the partial block is still last; the
        geometry is that of the transposed image, as in decode_image, and the pixels agree within rounding.
        """
        h, w = full if full is not None else (int(img.shape[-2]), int(img.shape[-1]))
        swap = transpose in SWAPS_SIDES
        rh, rw = self.resized_size(w, h) if swap else self.resized_size(h, w)
        target = (rw, rh) if swap else (rh, rw)
        out = self._resize(img, target, (h / denom, w / denom) if denom > 1 else None)
        if transpose is not None:
            out = _transposed(out, transpose)
        if self.resize_mode == "longest":
            th, tw = self.size
            if th > rh or tw > rw:
                left, top = max(tw - rw, 0) // 2, max(th - rh, 0) // 2
                out = TF.pad(out, [left, top, max(tw - rw, 0) - left, max(th - rh, 0) - top], fill=self.fill)
        return _center_crop(out, self.size)

    def _resize(self, img: torch.Tensor, size: tuple[int, int], extent: tuple[float, float] | None) -> torch.Tensor:
        """Antialiased resize to `size`; `extent` = the image's size in its own pixels when it ends in a partial one."""
        if extent is None and tuple(img.shape[-2:]) == size:
            return img
        # torch's uint8 kernels are CPU only; elsewhere resize in float and round back, as torchvision does
        native = img.device.type == "cpu"
        x = _channels_last_batch(img) if native else img[None].float()
        if extent is None:
            out = F.interpolate(x, size=size, mode=self.mode, antialias=True, align_corners=False)
        else:
            scales = [_scale_reaching(int(n), s, e) for n, s, e in zip(img.shape[-2:], size, extent)]
            out = F.interpolate(
                x, scale_factor=scales, mode=self.mode, antialias=True, align_corners=False,
                recompute_scale_factor=False,
            )[..., : size[0], : size[1]]  # fmt: skip
        if not native:
            out = out.clamp_(0, 255).round_().to(torch.uint8)
        return out[0]

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] (pinned host memory, or already on the device) -> float32 normalized on the device.

        Channels-last on CUDA (what the model's conv stem wants). The cast is a copy and the normalization runs in
        place: a multiply with a uint8 operand takes torch's slow mixed-dtype path (2.3x the time, measured).
        """
        x = batch.to(self.device, non_blocking=True)
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device, memory_format=self.memory_format)
        out.copy_(x)
        return out.mul_(self.scale).add_(self.shift)


def _channels_last_batch(img: torch.Tensor) -> torch.Tensor:
    """[3, h, w] -> [1, 3, h, w]; an HWC-strided image keeps strides torch reads as channels-last.

    torch allocates interpolate's output contiguous for a 1-image batch it cannot tell is channels-last (the trick
    is torchvision's, pytorch#68430); the channels-last output resizes in 0.83x the time (measured).
    """
    x = img[None]
    if not x.is_contiguous(memory_format=torch.channels_last) or x.stride(0) == x.numel():
        return x
    strides = list(x.stride())
    strides[0] = x.numel()
    return x.as_strided(x.shape, strides)


def _center_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's center_crop offsets (round half to even, as CenterCrop on PIL images) as a view."""
    th, tw = size
    h, w = int(img.shape[-2]), int(img.shape[-1])
    if th > h or tw > w:  # never after open_clip's resizes; torchvision pads first
        return TF.center_crop(img, [th, tw])
    top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
    return img[..., top : top + th, left : left + tw]


def _transposed(img: torch.Tensor, method: Image.Transpose) -> torch.Tensor:
    """Pillow's Image.transpose on a [3, h, w] tensor (views; the crop or the batch copy makes them contiguous)."""
    T = Image.Transpose
    if method == T.FLIP_LEFT_RIGHT:
        return img.flip(-1)
    if method == T.FLIP_TOP_BOTTOM:
        return img.flip(-2)
    if method == T.ROTATE_180:
        return img.flip(-2, -1)
    if method == T.TRANSPOSE:
        return img.transpose(-2, -1)
    if method == T.TRANSVERSE:
        return img.transpose(-2, -1).flip(-2, -1)
    if method == T.ROTATE_90:  # counter-clockwise
        return img.transpose(-2, -1).flip(-2)
    if method == T.ROTATE_270:
        return img.transpose(-2, -1).flip(-1)
    raise ValueError(f"unknown transposition {method!r}")


def _scale_reaching(n: int, size: int, extent: float) -> float:
    """size / extent, nudged up by ulps until torch's output length floor(n * scale) reaches `size` (n >= extent)."""
    scale = size / extent
    while math.floor(n * scale) < size:
        scale = math.nextafter(scale, math.inf)
    return scale
