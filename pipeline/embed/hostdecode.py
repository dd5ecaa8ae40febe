"""Bytes -> uint8 model-input crops on the host (embed.preprocess=uint8): libjpeg-turbo at a reduced DCT scale for
plain JPEGs, decode_image's policy for every other file, the same uint8 resize and crop after both; and the batch
they are copied into (pinned on CUDA, so the uint8 batch crosses to the device asynchronously)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from PIL import Image

from pipeline.embed.jpeg import decode_reduced, plan_host_decode
from pipeline.embed.transform import PixelTransform


class HostDecoder:
    """The host half of the uint8 pipeline; `margin` None decodes JPEGs at full scale (embed.draft=false)."""

    def __init__(self, transform: PixelTransform, max_pixels: int, margin: float | None, pin: bool):
        self.transform = transform
        self.max_pixels = max_pixels
        self.margin = margin
        self.pin = pin

    def fast_jpeg(self, data: bytes | None) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """(uint8 crop, upright source size) of a plain JPEG; None sends the sample to decode_image."""
        plan = plan_host_decode(data, self.max_pixels)
        if plan is None or data is None:
            return None
        w, h = plan.upright_size
        denom = self.transform.reduction(h, w, self.margin) if self.margin else 1
        arr = decode_reduced(data, plan, denom)
        if arr is None:
            return None
        img = torch.from_numpy(arr).permute(2, 0, 1)  # a view: torch's uint8 resize reads channels-last natively
        return self.transform.resize_crop(img, (plan.height, plan.width), denom, plan.transpose), (w, h)

    def from_image(self, img: Image.Image) -> torch.Tensor:
        """uint8 crop of decode_image's RGB result (its draft scale, when it has one, keeps the geometry exact)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only array; torch only reads it
            t = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)
        denom = int(img.info.get("draft_scale", 1))
        if denom == 1:
            return self.transform.resize_crop(t)
        w, h = img.info["source_size"]
        return self.transform.resize_crop(t, (h, w), denom)

    def stack(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """uint8 [n, 3, H, W] stored channels-last (as the crops are: the copies are straight), in pinned memory
        when the model is on CUDA (the copy to it is then asynchronous)."""
        h, w = self.transform.size
        out = torch.empty((len(crops), h, w, 3), dtype=torch.uint8, pin_memory=self.pin).permute(0, 3, 1, 2)
        for i, c in enumerate(crops):
            out[i].copy_(c)
        return out

    def model_input(self, batch: torch.Tensor) -> torch.Tensor:
        """A uint8 batch (host or device) -> the normalized float batch on the model's device; float passes."""
        return self.transform.normalize(batch) if batch.dtype == torch.uint8 else batch
