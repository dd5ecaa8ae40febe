"""JPEG decode and open_clip preprocessing on the model's device (nvjpeg on GPUs) for `embed.decode=device`."""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

from pipeline.core.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.core.config import Config
    from pipeline.models import EmbeddingModel

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec; decode_jpeg is still the batched nvjpeg path.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

# Baseline, extended sequential and progressive Huffman JPEG: what nvjpeg decodes. Lossless, arithmetic-coded
# and hierarchical files (the other SOF markers) are left to Pillow.
DEVICE_SOF = (0xC0, 0xC1, 0xC2)
ANY_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
RGB_COMPONENT_IDS = (82, 71, 66)  # 'R','G','B': libjpeg reads such files as RGB, not YCbCr
EXIF_KEYS = ("exif", "xmp", "XML:com.adobe.xmp", "Raw profile type exif")  # where Pillow's getexif() looks
# Full-size decoded images held on the device at once: bounds memory when a batch holds many large photos
# (64 MP x 3 B = 192 MB); a single larger image (up to embed.max_pixels) is decoded alone.
DEVICE_BATCH_PIXELS = 1 << 26
REQUIRED_KEYS = ("size", "mean", "std")


def check_config(cfg: "Config") -> None:
    """Fail before any work when `embed.decode=device` is asked of a family without open_clip's preprocess config."""
    if cfg.embed.decode == "device" and cfg.model.family != "open_clip":
        raise ConfigError(
            f"embed.decode=device needs model.family=open_clip (its preprocess config is reproduced on the device); "
            f"model.family={cfg.model.family} preprocesses with its own code: use embed.decode=cpu"
        )


def _sof(data: bytes) -> tuple[int, bytes] | None:
    """(SOF marker, its segment) of a JPEG whose headers parse up to the scan; None for anything unusual."""
    pos, n = 2, len(data)
    found: tuple[int, bytes] | None = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD9:  # no standalone marker belongs among the headers
            return None
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return None
        if marker == 0xDA:
            return found
        if marker in ANY_SOF:
            if found is not None:
                return None
            found = (marker, body)
        elif marker == 0xEE and body.startswith(b"Adobe") and len(body) >= 12 and body[11] == 0:
            return None  # Adobe transform 0: RGB-coded samples
        pos += 2 + length
    return None


def probe_jpeg(data: bytes | None, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of an upright 8-bit YCbCr JPEG the device may decode; None leaves the sample to decode_image.

    Conservative by design: every sample refused here, and every one the device then fails on, takes the CPU
    path, whose policy (statuses, EXIF, modes, pixel limit) thereby stays the only one.
    """
    if not data or not data.startswith(b"\xff\xd8\xff"):
        return None
    # A JPEG cut short has no end marker; nvjpeg may not refuse it the way libjpeg (and so Pillow) does.
    if not data[-1024:].rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    sof = _sof(data)
    if sof is None or sof[0] not in DEVICE_SOF:
        return None
    body = sof[1]
    if len(body) < 15 or body[0] != 8 or body[5] != 3 or tuple(body[6:15:3]) == RGB_COMPONENT_IDS:
        return None
    try:
        # The same header reader as decode_image: whatever Pillow would refuse, rotate or convert goes its way.
        img = Image.open(io.BytesIO(data), formats=("JPEG",))
        if img.format != "JPEG" or img.mode != "RGB":  # MPO, CMYK, grayscale
            return None
        w, h = img.size
        if w * h > max_pixels or w * h == 0:
            return None
        if any(k in img.info for k in EXIF_KEYS):
            orientation = img.getexif().get(0x0112, 1)
            if not isinstance(orientation, int) or 2 <= orientation <= 8:
                return None
    except Exception:
        return None
    return w, h


def _interpolation(info: dict[str, Any]) -> InterpolationMode:
    # open_clip's eval transform: bilinear when asked, bicubic otherwise ('random' is a training option)
    return InterpolationMode.BILINEAR if info.get("interpolation") == "bilinear" else InterpolationMode.BICUBIC


class DevicePreprocess:
    """open_clip's eval transform (resize, center crop or pad, normalize) as tensor ops on any device.

    Follows open_clip's `image_transform` for resize modes 'shortest' (the default), 'longest' and 'squash',
    including its output-size rounding, so a uint8 image gets the same geometry as the PIL path.
    """

    def __init__(self, info: dict[str, Any], device: torch.device):
        missing = [k for k in REQUIRED_KEYS if k not in info]
        if missing:
            raise ConfigError(
                f"embed.decode=device: the model exposes no open_clip preprocess config (missing {missing}); "
                "use embed.decode=cpu"
            )
        size = info["size"]
        self.size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        self.resize_mode = info.get("resize_mode") or "shortest"
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ConfigError(
                f"embed.decode=device: resize_mode {self.resize_mode!r} is not supported; use embed.decode=cpu"
            )
        self.interpolation = _interpolation(info)
        self.fill = int(info.get("fill_color") or 0)
        mean, std = info["mean"], info["std"]
        mean = [float(mean)] * 3 if isinstance(mean, (int, float)) else [float(v) for v in mean]
        std = [float(std)] * 3 if isinstance(std, (int, float)) else [float(v) for v in std]
        self.device = device
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        # (x/255 - mean)/std folded into one multiply-add
        self.scale = (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1).to(device)
        self.shift = (-torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1).to(device)

    def _resized_size(self, h: int, w: int) -> list[int]:
        th, tw = self.size
        if self.resize_mode == "squash":
            return [th, tw]
        if self.resize_mode == "shortest" and th == tw:
            # torchvision Resize(int): the short side becomes `size`, the long one is truncated
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(th * long / short)
            return [new_long, th] if w <= h else [th, new_long]
        # open_clip's ResizeKeepRatio: non-square 'shortest' (longest=0) and 'longest' (longest=1)
        rh, rw = h / th, w / tw
        ratio = max(rh, rw) if self.resize_mode == "longest" else min(rh, rw)
        return [round(h / ratio), round(w / ratio)]

    def resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [3, h, w] -> uint8 [3, H, W] at the model's input size."""
        h, w = img.shape[-2:]
        size = self._resized_size(int(h), int(w))
        # open_clip's non-square 'shortest' path builds ResizeKeepRatio with its default (bicubic) interpolation
        interp = (
            InterpolationMode.BICUBIC
            if self.resize_mode == "shortest" and self.size[0] != self.size[1]
            else self.interpolation
        )
        out = TF.resize(img, size, interpolation=interp, antialias=True)
        if self.resize_mode == "longest":
            th, tw = self.size
            rh, rw = out.shape[-2:]
            if th > rh or tw > rw:
                left, top = max(tw - rw, 0) // 2, max(th - rh, 0) // 2
                pad = [left, top, max(tw - rw, 0) - left, max(th - rh, 0) - top]
                out = TF.pad(out, pad, fill=self.fill)
        return TF.center_crop(out, list(self.size))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, H, W] -> float32 normalized, channels_last on CUDA (what the model's conv stem wants)."""
        out = torch.empty(batch.shape, dtype=torch.float32, device=batch.device, memory_format=self.memory_format)
        torch.mul(batch, self.scale, out=out)
        return out.add_(self.shift)


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class DeviceDecoder:
    """Decodes a batch's plain JPEGs with `torchvision.io.decode_jpeg` on the model's device and preprocesses them."""

    def __init__(self, model: "EmbeddingModel", batch_pixels: int = DEVICE_BATCH_PIXELS):
        self.device = model.device
        self.pre = DevicePreprocess(model.preprocess_info(), model.device)
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

    def assemble(self, pixels: list[torch.Tensor], on_device: list[bool]) -> torch.Tensor:
        """One model batch on the device: device crops normalized together, CPU-preprocessed fallbacks copied in."""
        dev = [j for j, d in enumerate(on_device) if d]
        host = [j for j, d in enumerate(on_device) if not d]
        if not host:
            return self.pre.normalize(torch.stack(pixels))
        cpu = torch.stack([pixels[j] for j in host])
        if self.device.type == "cuda":
            cpu = cpu.pin_memory()
        cpu = cpu.to(self.device, non_blocking=True)
        if not dev:
            return cpu.contiguous(memory_format=self.pre.memory_format)
        out = torch.empty(
            (len(pixels), *cpu.shape[1:]), dtype=torch.float32, device=self.device, memory_format=self.pre.memory_format
        )
        out[dev] = self.pre.normalize(torch.stack([pixels[j] for j in dev]))
        out[host] = cpu
        return out
