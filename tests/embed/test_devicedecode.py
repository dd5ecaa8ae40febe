"""embed.decode=device: JPEG decode + preprocessing as tensor ops, run here on the CPU device (and CUDA if present)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.core.tasks import ShardTask
from pipeline.embed.batch import RawSample
from pipeline.embed.decode import BatchDecoder
from pipeline.embed.devicedecode import DeviceDecoder, check_config, probe_jpeg
from pipeline.embed.hostdecode import HostDecoder
from pipeline.embed.runner import embed_worker, get_model, run_shard
from pipeline.embed.transform import PixelTransform
from pipeline.models import EmbeddingModel
from tests.support.helpers import hostile_samples, jpeg_bytes, load_shard, overrides, write_tar
from tests.support.jpegs import WHOLE, encode, photo, special_jpegs

LIMIT = 10_000_000
# The CPU device decodes with the same libjpeg-turbo as Pillow (bit-identical pixels, checked below), so the
# paths differ only in the resize: torchvision's antialiased uint8 bicubic against Pillow's. Measured: at most one
# level per pixel, min cosine 0.999998 on the tiny model over 68 JPEGs of 16-1000 px, quality 60-95; 0.999 leaves
# about 500x margin on (1 - cosine). Geometry and normalization mistakes are caught by the pixel bound below.
CPU_COSINE = 0.999
MAX_LEVELS = 2  # per-pixel difference of the preprocessed images, in 0..255 units
# nvjpeg's IDCT and chroma upsampling differ from libjpeg's and the CUDA resize rounds once instead of per pass;
# not measured on this GPU-less machine, so the bound is the loose one the issue asks for.
CUDA_COSINE = 0.99


@pytest.fixture(scope="module")
def model(tiny_model: dict[str, str]) -> EmbeddingModel:
    return get_model(load_config(overrides(tiny_model)))


def _decoders(model: EmbeddingModel, **kw: Any) -> tuple[BatchDecoder, BatchDecoder]:
    """The model path (Pillow + the model's own preprocess) and the device path with its uint8 host fallbacks."""
    args = (model.preprocess, model.tokenize, LIMIT, (255, 255, 255))
    transform = PixelTransform(model.preprocess_info(), model.device)
    host = HostDecoder(transform, LIMIT, None, pin=model.device.type == "cuda")
    return BatchDecoder(*args), BatchDecoder(*args, device=DeviceDecoder(transform, **kw), host=host)


def _model_batch(dec: BatchDecoder, samples: list[RawSample]) -> Any:
    """The decoded batch with its pixels as encode_image takes them (the uint8 ones normalized on the device)."""
    batch = dec("0", samples)
    batch.pixels = dec.model_input(batch.pixels)
    return batch


def _comparable(rows: list[Any]) -> list[tuple[Any, ...]]:
    # Pillow's messages name the BytesIO object's address, which differs between any two decodes.
    return [
        (r.key, r.index, r.sha256, r.width, r.height, r.status, re.sub(r"0x[0-9a-f]+", "0x", r.error or ""))
        for r in rows
    ]


@pytest.mark.parametrize("name", list(special_jpegs()))
def test_probe_sends_only_plain_jpegs_to_the_device(name: str) -> None:
    data, on_device = special_jpegs()[name]
    size = probe_jpeg(data, LIMIT)
    assert (size is not None) == on_device
    if on_device:
        assert size == Image.open(io.BytesIO(data)).size


def test_cpu_device_decode_is_libjpeg_exactly() -> None:
    """On the CPU, torchvision and Pillow share libjpeg-turbo: any embedding gap comes from the resize alone."""
    from torchvision.io import ImageReadMode, decode_jpeg

    specials = special_jpegs()
    for name in (*WHOLE, "cut_then_end_marker"):
        data = specials[name][0]
        ours = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        pil = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(ours, pil), name


def test_device_pixels_and_embeddings_match_the_pil_path(model: EmbeddingModel) -> None:
    sizes = [(300, 300), (640, 480), (48, 40), (1000, 333), (20, 30), (333, 1000), (31, 32), (257, 129)]
    samples = [RawSample(f"{i}", i, encode(photo(w, h, i), quality=85), b"c") for i, (w, h) in enumerate(sizes)]
    cpu, dev = _decoders(model)
    a, b = _model_batch(cpu, samples), _model_batch(dev, samples)
    assert b.device_decoded == len(samples) and a.image_rows == b.image_rows == list(range(len(samples)))
    assert _comparable(a.rows) == _comparable(b.rows)
    std = torch.tensor(model.preprocess_info()["std"]).view(1, 3, 1, 1)
    levels = ((a.pixels - b.pixels).abs() * std * 255).amax().item()
    assert levels <= MAX_LEVELS + 0.01, levels
    cos = (model.encode_image(a.pixels) * model.encode_image(b.pixels)).sum(1)
    assert cos.min().item() >= CPU_COSINE, cos


def test_statuses_are_the_cpu_paths_for_every_special_and_hostile_sample(model: EmbeddingModel) -> None:
    specials = special_jpegs()
    samples = [RawSample(k, i, d, b"c") for i, (k, (d, _)) in enumerate(specials.items())]
    for k, fields in hostile_samples():
        image = next((fields[e] for e in ("jpg", "png") if e in fields), None)
        samples.append(RawSample(k, len(samples), image, fields.get("txt")))
    samples.append(RawSample("read_error", len(samples), jpeg_bytes(3), b"c", error="tar broke here"))
    cpu, dev = _decoders(model)
    a, b = _model_batch(cpu, samples), _model_batch(dev, samples)
    assert _comparable(a.rows) == _comparable(b.rows)
    assert [r.caption_status for r in a.rows] == [r.caption_status for r in b.rows]
    assert a.image_rows == b.image_rows and a.text_rows == b.text_rows
    assert {r.status for r in b.rows} >= {"ok", "decode_error", "too_large", "empty_image", "no_image", "read_error"}
    # The plain JPEGs of both lists were decoded on the device.
    expected = sum(on for _, on in specials.values()) + sum(
        1 for k, f in hostile_samples() if k in ("ok", "nocaption", "badutf8", "bigcaption")
    )
    assert b.device_decoded == expected
    cos = (model.encode_image(a.pixels) * model.encode_image(b.pixels)).sum(1)
    assert cos.min().item() >= CPU_COSINE


def test_a_sample_the_device_refuses_takes_the_host_path(
    model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like nvjpeg refusing a file libjpeg reads: the batch call fails, then only that sample falls back."""
    import pipeline.embed.devicedecode as dd

    real = dd.decode_jpeg
    calls: list[int] = []
    refused = encode(photo(50, 50, 9), quality=70)

    def picky(data: Any, **kw: Any) -> Any:
        calls.append(len(data))
        if any(bytes(t.numpy()) == refused for t in data):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(dd, "decode_jpeg", picky)
    samples = [RawSample(str(i), i, jpeg_bytes(i, (40, 30)), None) for i in range(3)]
    samples.insert(1, RawSample("refused", 1, refused, None))
    cpu, dev = _decoders(model)
    a, b = _model_batch(cpu, samples), _model_batch(dev, samples)
    assert calls == [4, 1, 1, 1, 1]  # the batch, then one call per sample
    assert b.device_decoded == 3 and _comparable(a.rows) == _comparable(b.rows)
    assert dev.host is not None
    own = dev.host.fast_jpeg(refused)  # the fallback is the host path's own crop
    assert own is not None and torch.equal(b.pixels[1], dev.model_input(own[0][None])[0])


def test_pixel_budget_splits_decode_calls(model: EmbeddingModel, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.embed.devicedecode as dd

    real = dd.decode_jpeg
    calls: list[int] = []
    monkeypatch.setattr(dd, "decode_jpeg", lambda data, **kw: calls.append(len(data)) or real(data, **kw))
    samples = [RawSample(str(i), i, jpeg_bytes(i, (100, 100)), None) for i in range(5)]
    _, whole = _decoders(model)
    _, split = _decoders(model, batch_pixels=25_000)  # two 100x100 images per call
    a = whole("0", samples)
    assert calls == [5]
    b = split("0", samples)
    assert calls == [5, 2, 2, 1] and torch.equal(a.pixels, b.pixels)


def test_run_shard_device_decode_equals_cpu_path(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    samples = [
        (f"{i:04d}", {"jpg": encode(photo(40 + 13 * i, 30 + 7 * i, i), quality=88), "txt": f"thing {i}".encode()})
        for i in range(9)
    ] + hostile_samples()
    tar = write_tar(tmp_path / "00000.tar", samples)
    base = overrides(tiny_model) + ["embed.batch_size=4", "embed.output_dtype=float32", "embed.max_pixels=50000000"]
    outs = {}
    for mode in ("cpu", "device"):
        cfg = load_config(base + [f"embed.decode={mode}"])
        stats = run_shard(ShardTask("00000", str(tar), str(tmp_path / mode), "webdataset"), get_model(cfg), cfg.embed)
        outs[mode] = (stats, *load_shard(str(tmp_path / mode), "00000"))
    (s_cpu, img_cpu, txt_cpu, meta_cpu), (s_dev, img_dev, txt_dev, meta_dev) = outs["cpu"], outs["device"]
    assert "device_decoded" not in s_cpu and s_dev["device_decoded"] == 9 + 5  # 5 plain JPEGs in hostile_samples
    assert s_cpu["status_counts"] == s_dev["status_counts"] and s_cpu["ok"] == s_dev["ok"] == 16
    cols = ["key", "status", "width", "height", "caption_status", "sha256"]
    assert meta_cpu[cols].equals(meta_dev[cols])
    ok = (meta_cpu["status"] == "ok").to_numpy()
    assert np.all(img_dev[~ok] == 0) and np.array_equal(txt_cpu, txt_dev)
    assert (np.sum(img_cpu[ok] * img_dev[ok], axis=1) >= CPU_COSINE).all()


class _NoPreprocessConfig(EmbeddingModel):
    """A family whose preprocessing is its own code (as hf's image processors are)."""

    dim = 4
    device = torch.device("cpu")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return torch.zeros(3, 8, 8)

    def tokenize(self, texts: list[str]) -> Any:
        return texts

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(pixels), 4) / 2

    def encode_text(self, tokens: Any) -> torch.Tensor:
        return torch.ones(len(tokens), 4) / 2

    def preprocess_info(self) -> dict[str, Any]:
        return {"processor": "CLIPImageProcessor", "size": 8}


def test_unsupported_combinations_fail_clearly(tmp_path: Path) -> None:
    cfg = load_config(["model=hf:/models/clip", "embed.decode=device"])
    with pytest.raises(ConfigError, match="embed.decode=device needs model.family=open_clip"):
        check_config(cfg)
    task = ShardTask(
        "00000", str(write_tar(tmp_path / "00000.tar", hostile_samples()[:1])), str(tmp_path), "webdataset"
    )
    with pytest.raises(ConfigError, match="model.family=hf"):
        embed_worker(task, cfg)  # before any model is loaded
    check_config(load_config(["model=hf:/models/clip"]))  # the cpu path serves every family
    with pytest.raises(ConfigError, match="no open_clip preprocess config"):
        run_shard(task, _NoPreprocessConfig(), cfg.embed)
    with pytest.raises(ConfigError, match="resize_mode 'crop'"):
        PixelTransform({"size": 8, "mean": 0.5, "std": 0.5, "resize_mode": "crop"}, torch.device("cpu"))
    with pytest.raises(ConfigError, match="embed.decode"):
        load_config(["embed.decode=gpu"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_nvjpeg_decode_matches_the_pil_path(tiny_model: dict[str, str]) -> None:
    """Needs OpenClipModel.encode_image to take pixels already on its device (no pin_memory of a CUDA tensor)."""
    cfg = load_config(overrides(tiny_model) + ["model.device=cuda", "embed.decode=device"])
    model = get_model(cfg)
    specials = special_jpegs()
    samples = [RawSample(k, i, d, b"c") for i, (k, (d, _)) in enumerate(specials.items())]
    samples += [RawSample(f"p{i}", 100 + i, encode(photo(200 + 40 * i, 150 + 30 * i, i)), b"c") for i in range(8)]
    cpu, dev = _decoders(model)
    a, b = _model_batch(cpu, samples), _model_batch(dev, samples)
    assert b.pixels.device.type == "cuda" and b.pixels.is_contiguous(memory_format=torch.channels_last)
    # nvjpeg must refuse what libjpeg refuses (or decode it, when Pillow does too): the statuses stay the CPU path's.
    assert _comparable(a.rows) == _comparable(b.rows)
    assert b.device_decoded >= 8 + 5
    # Whole, valid images only: how each decoder fills a cut-short scan is its own business.
    whole = [a.image_rows.index(i) for i, s in enumerate(samples) if s.key.startswith("p") or s.key in WHOLE]
    cos = (model.encode_image(a.pixels[whole]) * model.encode_image(b.pixels[whole])).sum(1)
    assert cos.min().item() >= CUDA_COSINE, cos
