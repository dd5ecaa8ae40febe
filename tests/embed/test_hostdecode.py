"""The uint8 pipeline on the host: the same statuses as the Pillow path, embeddings within cosine 0.999 of open_clip's
own preprocess on both input kinds and every fallback, uint8 batches normalized on the device, the runner's choice."""

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
from pipeline.core.images import decode_image
from pipeline.core.tasks import ShardTask
from pipeline.embed.batch import RawSample
from pipeline.embed.decode import BatchDecoder
from pipeline.embed.devicedecode import check_config
from pipeline.embed.hostdecode import HostDecoder
from pipeline.embed.runner import get_model, make_decoder, run_shard, uses_uint8
from pipeline.embed.transform import PixelTransform
from pipeline.models import EmbeddingModel
from tests.support.helpers import hostile_samples, jpeg_bytes, load_shard, overrides, write_tar
from tests.support.jpegs import encode, exif_oriented, fallback_images, photo, smooth_photo, special_jpegs

LIMIT = 50_000_000
# Measured on the tiny model (32 px input: the DCT reduction is largest there): min cosine 0.999988 for the
# 256-384 px JPEGs below, 0.999995 for the 2,000 px ones, 0.999998 for the fallbacks; on ViT-B-32 random weights
# (bench/bench_input.py) 0.999992 and above.
# 0.999 is the bound: a geometry or normalization mistake lands far below it.
COSINE = 0.999


@pytest.fixture(scope="module")
def model(tiny_model: dict[str, str]) -> EmbeddingModel:
    return get_model(load_config(overrides(tiny_model)))


def _decoders(model: EmbeddingModel, margin: float | None = 1.5) -> tuple[BatchDecoder, BatchDecoder]:
    """Today's path (decode_image with draft + the model's preprocess) and the uint8 path."""
    args = (model.preprocess, None, LIMIT, (255, 255, 255))
    kw: dict[str, Any] = {"draft_size": 32}
    host = HostDecoder(PixelTransform(model.preprocess_info(), model.device), LIMIT, margin, pin=False)
    return BatchDecoder(*args, **kw), BatchDecoder(*args, **kw, host=host)


def _comparable(rows: list[Any]) -> list[tuple[Any, ...]]:
    # Pillow's messages name the BytesIO object's address, which differs between any two decodes.
    return [
        (r.key, r.index, r.sha256, r.width, r.height, r.status, re.sub(r"0x[0-9a-f]+", "0x", r.error or ""))
        for r in rows
    ]


def _reference(model: EmbeddingModel, samples: list[RawSample]) -> torch.Tensor:
    """open_clip's own preprocess on the upright full-resolution image (decode_image without draft)."""
    return torch.stack([model.preprocess(decode_image(s.image, LIMIT)) for s in samples])


def _cosines(model: EmbeddingModel, dec: BatchDecoder, samples: list[RawSample]) -> torch.Tensor:
    got = dec.model_input(dec("0", samples).pixels)
    return (model.encode_image(_reference(model, samples)) * model.encode_image(got)).sum(1)


def _samples(images: dict[str, bytes]) -> list[RawSample]:
    return [RawSample(k, i, d, b"c") for i, (k, d) in enumerate(images.items())]


def test_statuses_and_sizes_are_the_pillow_paths_for_every_kind_of_sample(model: EmbeddingModel) -> None:
    images = {k: d for k, (d, _) in special_jpegs().items()} | fallback_images()
    samples = _samples(images)
    for k, fields in hostile_samples():
        image = next((fields[e] for e in ("jpg", "png") if e in fields), None)
        samples.append(RawSample(k, len(samples), image, fields.get("txt")))
    samples.append(RawSample("read_error", len(samples), jpeg_bytes(3), b"c", error="tar broke here"))
    pillow, uint8 = _decoders(model)
    a, b = pillow("0", samples), uint8("0", samples)
    assert _comparable(a.rows) == _comparable(b.rows) and a.image_rows == b.image_rows
    assert {r.status for r in b.rows} >= {"ok", "decode_error", "too_large", "empty_image", "no_image", "read_error"}
    assert b.pixels.dtype == torch.uint8 and tuple(b.pixels.shape[1:]) == (3, 32, 32)
    assert b.pixels.is_contiguous(memory_format=torch.channels_last)  # the crops are copied straight in


def test_small_jpegs_embed_like_open_clip(model: EmbeddingModel) -> None:
    """img2dataset-like 256-384 px JPEGs: full-scale libjpeg-turbo decode, torch's uint8 bicubic resize."""
    sizes = [(256, 256), (256, 384), (384, 256), (300, 256), (256, 333), (48, 40), (20, 30)]
    samples = _samples({f"{w}x{h}": encode(photo(w, h, i), quality=90) for i, (w, h) in enumerate(sizes)})
    _, uint8 = _decoders(model)
    cos = _cosines(model, uint8, samples)
    assert cos.min().item() >= COSINE, cos
    # pixel-level: within two levels of open_clip's transform wherever libjpeg-turbo decodes at full scale
    _, full = _decoders(model, margin=None)
    std = torch.tensor(model.preprocess_info()["std"]).view(1, 3, 1, 1)
    levels = ((full.model_input(full("0", samples).pixels) - _reference(model, samples)).abs() * std * 255).amax()
    assert levels.item() <= 2.01


def test_large_originals_decoded_at_reduced_scale_embed_like_open_clip(model: EmbeddingModel) -> None:
    images = {
        "2000x1500": encode(smooth_photo(2000, 1500, 1), quality=90),
        "1163x2000": encode(smooth_photo(1163, 2000, 2), quality=90),
        "3001x1001": encode(smooth_photo(3001, 1001, 3), quality=85),
        "2000x1500_exif6": exif_oriented(smooth_photo(2000, 1500, 4), 6, quality=90),
        "1999x1333_progressive": encode(smooth_photo(1999, 1333, 5), quality=90, progressive=True),
    }
    samples = _samples(images)
    _, uint8 = _decoders(model)
    batch = uint8("0", samples)
    assert [(r.width, r.height) for r in batch.rows] == [(2000, 1500), (1163, 2000), (3001, 1001), (1500, 2000),
                                                         (1999, 1333)]  # fmt: skip
    cos = _cosines(model, uint8, samples)
    assert cos.min().item() >= COSINE, cos


def test_fallbacks_embed_like_open_clip(model: EmbeddingModel) -> None:
    """Every file the fast path leaves to decode_image: its RGB image, then the same uint8 resize and crop."""
    images = fallback_images()
    images["jpeg_cmyk_2000"] = encode(smooth_photo(2000, 1400, 6).convert("CMYK"), quality=90)  # drafted by Pillow
    images["jpeg_gray"] = encode(photo(300, 256, 7).convert("L"), quality=90)  # fast path, grey to RGB
    samples = _samples(images)
    _, uint8 = _decoders(model)
    cos = _cosines(model, uint8, samples)
    assert cos.min().item() >= COSINE, dict(zip(images, cos.tolist()))


def test_draft_scale_is_recorded_for_upright_images_only() -> None:
    big = smooth_photo(1001, 757, 1)
    upright = decode_image(encode(big), LIMIT, draft_size=100)
    assert upright.info["draft_scale"] == 2 and upright.info["source_size"] == (1001, 757)
    rotated = decode_image(exif_oriented(big, 6), LIMIT, draft_size=100)
    assert "draft_scale" not in rotated.info and rotated.info["source_size"] == (757, 1001)
    assert "draft_scale" not in decode_image(encode(big), LIMIT).info  # no draft asked


def test_run_shard_uint8_equals_the_model_path(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    samples = (
        [
            (f"{i:04d}", {"jpg": encode(photo(40 + 31 * i, 30 + 17 * i, i), quality=88), "txt": f"thing {i}".encode()})
            for i in range(9)
        ]
        + [("png", {"png": fallback_images()["png_rgba"], "txt": b"a png"})]
        + hostile_samples()
    )
    tar = write_tar(tmp_path / "00000.tar", samples)
    base = overrides(tiny_model) + ["embed.batch_size=4", "embed.output_dtype=float32", f"embed.max_pixels={LIMIT}"]
    outs = {}
    for mode in ("model", "uint8"):
        cfg = load_config(base + [f"embed.preprocess={mode}"])
        stats = run_shard(ShardTask("00000", str(tar), str(tmp_path / mode), "webdataset"), get_model(cfg), cfg.embed)
        outs[mode] = (stats, *load_shard(str(tmp_path / mode), "00000"))
    (s_model, img_model, txt_model, meta_model), (s_u8, img_u8, txt_u8, meta_u8) = outs["model"], outs["uint8"]
    assert s_model["status_counts"] == s_u8["status_counts"] and s_u8["ok"] == 17
    cols = ["key", "status", "width", "height", "caption_status", "sha256"]
    assert meta_model[cols].equals(meta_u8[cols])
    ok = (meta_u8["status"] == "ok").to_numpy()
    assert np.all(img_u8[~ok] == 0) and np.array_equal(txt_model, txt_u8)
    assert (np.sum(img_model[ok] * img_u8[ok], axis=1) >= COSINE).all()


class _OtherFamily(EmbeddingModel):
    """A family with its own preprocessing code whose info still names a size, mean and std (as `offline` does)."""

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
        return {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "resize_short_side": 9}


def test_the_runner_picks_uint8_for_open_clip_only(model: EmbeddingModel) -> None:
    e = load_config([]).embed
    assert uses_uint8(model, e) and make_decoder(model, e).host is not None
    other = _OtherFamily()
    assert not uses_uint8(other, e) and make_decoder(other, e).host is None  # auto: its own preprocess
    with pytest.raises(ConfigError, match="embed.preprocess=uint8"):
        make_decoder(other, e.model_copy(update={"preprocess": "uint8"}))
    assert not uses_uint8(model, e.model_copy(update={"preprocess": "model"}))
    assert make_decoder(model, e.model_copy(update={"image": False})).host is None  # nothing to decode


@pytest.mark.parametrize(
    "args,needle",
    [
        (["model=hf:/models/clip", "embed.preprocess=uint8"], "embed.preprocess=uint8 reproduces open_clip"),
        (["embed.decode=device", "embed.preprocess=model"], "needs embed.preprocess=uint8"),
    ],
)
def test_combinations_that_cannot_work_fail_before_any_work(args: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_config(load_config(args))
    check_config(load_config(["model=hf:/models/clip"]))  # auto serves every family
    with pytest.raises(ConfigError, match="embed.draft_margin"):
        load_config(["embed.draft_margin=0.5"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_cross_as_pinned_uint8(tiny_model: dict[str, str]) -> None:
    cfg = load_config(overrides(tiny_model) + ["model.device=cuda"])
    model = get_model(cfg)
    dec = make_decoder(model, cfg.embed)
    batch = dec("0", _samples({str(i): jpeg_bytes(i, (64, 48)) for i in range(4)}))
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.is_pinned()
    x = dec.model_input(batch.pixels)
    assert x.device.type == "cuda" and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_model_input_passes_float_batches_through(model: EmbeddingModel) -> None:
    pillow, uint8 = _decoders(model)
    x = torch.zeros(2, 3, 32, 32)
    assert uint8.model_input(x) is x and pillow.model_input(x) is x and uint8.model_input(None) is None
    img = Image.open(io.BytesIO(jpeg_bytes(1)))
    assert img.format == "JPEG"
