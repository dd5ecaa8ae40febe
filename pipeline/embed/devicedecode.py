"""JPEG decode and open_clip preprocessing on the model's device (nvjpeg on GPUs) for `embed.decode=device`."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.core.errors import ConfigError
from pipeline.embed.jpeg import HUFFMAN_SOF, plan_host_decode, read_header
from pipeline.embed.transform import PixelTransform

if TYPE_CHECKING:
    from pipeline.core.config import Config
    from pipeline.embed.hostdecode import HostDecoder

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; decode_jpeg is still the batched nvjpeg path.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

RGB_COMPONENT_IDS = b"RGB"  # libjpeg reads a file with these component ids as RGB, not YCbCr
# Full-size decoded images held on the device at once: bounds memory when a batch holds many large photos
# (64 MP x 3 B = 192 MB); a single larger image (up to embed.max_pixels) is decoded alone.
DEVICE_BATCH_PIXELS = 1 << 26


def check_config(cfg: "Config") -> None:
    """Fail before any work when the uint8 pipeline is asked of a family without open_clip's preprocess config."""
    e = cfg.embed
    if e.decode == "device" and cfg.model.family != "open_clip":
        raise ConfigError(
            f"embed.decode=device needs model.family=open_clip (its preprocess config is reproduced on the device); "
            f"model.family={cfg.model.family} preprocesses with its own code: use embed.decode=cpu"
        )
    if e.decode == "device" and e.preprocess == "model":
        raise ConfigError(
            "embed.decode=device crops uint8 images on the device and normalizes them there: it needs "
            "embed.preprocess=uint8 (or auto), not embed.preprocess=model"
        )
    if e.preprocess == "uint8" and cfg.model.family != "open_clip":
        raise ConfigError(
            f"embed.preprocess=uint8 reproduces open_clip's preprocess config; model.family={cfg.model.family} "
            "preprocesses with its own code: use embed.preprocess=auto or model"
        )


def probe_jpeg(data: bytes | None, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of an upright 8-bit YCbCr JPEG the device may decode; None leaves the sample to the host.

    The host fast path's checks (jpeg.plan_host_decode), narrowed to what nvjpeg is trusted with: three
    YCbCr-coded components, and a whole file (a JPEG cut short has no end marker; nvjpeg may not refuse it the
    way libjpeg, and so Pillow, does).
    """
    if not data or not data[-1024:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    head = read_header(data)
    if head is None or head.components != 3 or head.sof not in HUFFMAN_SOF:
        return None
    if head.component_ids == RGB_COMPONENT_IDS or head.adobe_transform == 0:  # RGB-coded samples
        return None
    plan = plan_host_decode(data, max_pixels)
    if plan is None or plan.transpose is not None:
        return None
    return plan.width, plan.height


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DeviceDecoder:
    """Decodes a batch's plain JPEGs with `torchvision.io.decode_jpeg` on the model's device and crops them there."""

    def __init__(self, transform: PixelTransform, batch_pixels: int = DEVICE_BATCH_PIXELS):
        self.device = transform.device
        self.pre = transform
        self.batch_pixels = batch_pixels

    probe = staticmethod(probe_jpeg)

    def _decode(self, datas: list[bytes]) -> list[torch.Tensor | None]:
        try:
            out = decode_jpeg([_as_tensor(d) for d in datas], mode=ImageReadMode.RGB, device=self.device)
            return list(out)
        except Exception:
            if len(datas) == 1:
                return [None]
        # One bad file fails the whole call; decode one by one so only that sample falls back.
        return [self._decode([d])[0] for d in datas]

    def decode(self, datas: list[bytes], sizes: list[tuple[int, int]]) -> list[torch.Tensor | None]:
        """uint8 [3, H, W] model-input crops on the device; None where the device could not decode the sample."""
        crops: list[torch.Tensor | None] = []
        start = 0
        while start < len(datas):
            end, pixels = start, 0
            while end < len(datas) and (end == start or pixels + sizes[end][0] * sizes[end][1] <= self.batch_pixels):
                pixels += sizes[end][0] * sizes[end][1]
                end += 1
            for img, (w, h) in zip(self._decode(datas[start:end]), sizes[start:end]):
                if img is None or tuple(img.shape) != (3, h, w):
                    crops.append(None)
                    continue
                try:
                    crops.append(self.pre.resize_crop(img))
                except Exception:
                    crops.append(None)
            start = end
        return crops

    def assemble(self, pixels: list[torch.Tensor], on_device: list[bool], host: "HostDecoder") -> torch.Tensor:
        """One uint8 batch on the device: the device crops, and the host's crops sent over in one pinned copy."""
        dev = [j for j, d in enumerate(on_device) if d]
        rest = [j for j, d in enumerate(on_device) if not d]
        if not rest:
            return torch.stack(pixels)
        sent = host.stack([pixels[j] for j in rest]).to(self.device, non_blocking=True)
        if not dev:
            return sent
        out = torch.empty((len(pixels), *sent.shape[1:]), dtype=torch.uint8, device=self.device)
        out[dev] = torch.stack([pixels[j] for j in dev])
        out[rest] = sent
        return out
