"""Bytes -> RGB PIL image with a fixed policy (EXIF, every mode, bomb limit), and raw samples -> decoded batches."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from PIL import Image

from pipeline.core.images import SampleError, decode_image
from pipeline.embed.batch import OK, DecodedBatch, RawSample, SampleRow
from pipeline.models.text import caption_for_tokenizer

if TYPE_CHECKING:
    from pipeline.embed.devicedecode import DeviceDecoder
    from pipeline.embed.hostdecode import HostDecoder


def decode_caption(raw: bytes | str | None) -> tuple[str | None, str]:
    """Caption bytes -> (text, caption_status); invalid UTF-8 is replaced, not dropped."""
    if raw is None:
        return None, "missing"
    if isinstance(raw, str):
        return raw, OK
    try:
        return raw.decode("utf-8"), OK
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), "invalid_utf8"


def _meta_str(meta: dict[str, Any], key: str) -> str | None:
    v = meta.get(key)
    return None if v is None else str(v)


class BatchDecoder:
    """Turns a list of RawSamples into a DecodedBatch using the model's preprocess and tokenizer.

    With a `host` decoder (embed.preprocess=uint8), images become uint8 crops at the model's input size (plain
    JPEGs through libjpeg-turbo, the rest through decode_image) and the batch is normalized on the model's device
    by `model_input`. With a `device` decoder as well (embed.decode=device), plain JPEGs are decoded and cropped on
    the model's device. Every sample a fast path refuses or fails on takes decode_image: the statuses stay the same.
    """

    def __init__(
        self,
        preprocess: Callable[[Image.Image], Any],
        tokenize: Callable[[list[str]], Any] | None,
        max_pixels: int,
        background: tuple[int, int, int],
        embed_image: bool = True,
        draft_size: int | None = None,
        device: "DeviceDecoder | None" = None,
        host: "HostDecoder | None" = None,
    ):
        if device is not None and host is None:
            raise ValueError("a device decoder needs the host decoder for the samples it refuses")
        self.preprocess = preprocess
        self.tokenize = tokenize
        self.max_pixels = max_pixels
        self.background = background
        self.embed_image = embed_image
        self.draft_size = draft_size
        self.device = device
        self.host = host
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to call from several threads

    def _row(self, s: RawSample) -> tuple[SampleRow, bool]:
        """The sample's metadata row, and whether its image is still to be decoded."""
        caption, caption_status = decode_caption(s.caption)
        sha = _meta_str(s.meta, "sha256") or (hashlib.sha256(s.image).hexdigest() if s.image else None)
        row = SampleRow(
            key=s.key,
            index=s.index,
            caption=caption,
            url=_meta_str(s.meta, "url"),
            sha256=sha,
            width=None,
            height=None,
            status=OK,
            error=None,
            caption_status=caption_status,
        )
        if s.error:
            row.status, row.error = "read_error", s.error
            return row, False
        if "_json_error" in s.meta:
            row.error = "json sidecar is not valid JSON: url/sha256 unknown"
        return row, self.embed_image

    def _cpu_pixels(self, row: SampleRow, data: bytes | None) -> Any:
        """The policy path: decode_image + the model's own preprocess (or the uint8 crop); failures become the
        row's status."""
        try:
            img = decode_image(data, self.max_pixels, self.background, self.draft_size)
            row.width, row.height = img.info.get("source_size", img.size)
            return self.host.from_image(img) if self.host is not None else self.preprocess(img)
        except SampleError as e:
            row.status, row.error = e.status, str(e)
            return None
        except Exception as e:  # a preprocess failure is still one sample's problem
            row.status, row.error = "preprocess_error", f"{type(e).__name__}: {e}"
            return None

    def _host_pixels(self, row: SampleRow, data: bytes | None) -> Any:
        """The host fast path for plain JPEGs, the policy path for everything it refuses or fails on."""
        if self.host is not None:
            try:
                fast = self.host.fast_jpeg(data)
            except Exception:  # never trusted over the policy path, which then says what the sample is
                fast = None
            if fast is not None:
                row.width, row.height = fast[1]
                return fast[0]
        return self._cpu_pixels(row, data)

    def __call__(self, shard_id: str, samples: list[RawSample]) -> DecodedBatch:
        t0 = time.perf_counter()
        rows: list[SampleRow] = []
        pixels: dict[int, Any] = {}
        deferred: list[tuple[int, tuple[int, int]]] = []  # (position, (w, h)) of JPEGs for the device
        for i, s in enumerate(samples):
            row, wants_image = self._row(s)
            rows.append(row)
            if not wants_image:
                continue
            size = self.device.probe(s.image, self.max_pixels) if self.device is not None else None
            if size is not None:
                deferred.append((i, size))
                continue
            px = self._host_pixels(row, s.image)
            if px is not None:
                pixels[i] = px
        on_device = self._device_pixels(samples, rows, deferred, pixels)
        text_rows = [i for i, r in enumerate(rows) if r.caption is not None and r.status != "read_error"]
        tokens = None
        if self.tokenize is not None and text_rows:
            texts = [caption_for_tokenizer(rows[i].caption or "") for i in text_rows]
            with self._tok_lock:
                tokens = self.tokenize(texts)
        else:
            text_rows = []
        image_rows = sorted(pixels)
        return DecodedBatch(
            shard_id,
            rows,
            self._assemble([pixels[i] for i in image_rows], [i in on_device for i in image_rows]),
            image_rows,
            tokens,
            text_rows,
            time.perf_counter() - t0,
            device_decoded=len(on_device),
        )

    def _device_pixels(
        self,
        samples: list[RawSample],
        rows: list[SampleRow],
        deferred: list[tuple[int, tuple[int, int]]],
        pixels: dict[int, Any],
    ) -> set[int]:
        """Decode the deferred JPEGs on the device into `pixels`; the ones it refuses take the host paths."""
        on_device: set[int] = set()
        if not deferred or self.device is None:
            return on_device
        crops = self.device.decode([samples[i].image or b"" for i, _ in deferred], [wh for _, wh in deferred])
        for (i, (w, h)), crop in zip(deferred, crops):
            if crop is None:  # the device refused it: the host decides what this sample is
                crop = self._host_pixels(rows[i], samples[i].image)
            else:
                rows[i].width, rows[i].height = w, h
                on_device.add(i)
            if crop is not None:
                pixels[i] = crop
        return on_device

    def _assemble(self, pixels: list[Any], on_device: list[bool]) -> Any:
        if not pixels:
            return None
        if self.device is not None and self.host is not None:
            return self.device.assemble(pixels, on_device, self.host)
        if self.host is not None:
            return self.host.stack(pixels)
        import torch

        return torch.stack(pixels)

    def model_input(self, pixels: Any) -> Any:
        """What encode_image takes: a uint8 batch goes to the model's device and is normalized there."""
        return self.host.model_input(pixels) if self.host is not None and pixels is not None else pixels
