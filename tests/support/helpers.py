"""Test data made on the fly: tiny JPEGs, WebDataset tars, tiny open_clip checkpoints, fake embed outputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

TINY_ARCH = "tiny-test"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def jpeg_bytes(seed: int, size: tuple[int, int] = (48, 40), quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> Path:
    """samples: (key, {ext: bytes}) in order; written as key.ext members like img2dataset does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as t:
        for key, fields in samples:
            for ext, data in fields.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return path


def make_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    """n_shards tars of per_shard JPEG + caption + json samples, keys like img2dataset's (SSSSSIIII)."""
    paths = []
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            key = f"{s:05d}{i:04d}"
            meta = {"url": f"http://127.0.0.1/{key}.jpg", "key": key}
            samples.append(
                (
                    key,
                    {
                        "jpg": jpeg_bytes(seed * 100003 + s * 1000 + i),
                        "txt": f"photo number {i} of shard {s}".encode(),
                        "json": json.dumps(meta).encode(),
                    },
                )
            )
        paths.append(write_tar(root / f"{s:05d}.tar", samples))
    return paths


def make_tiny_checkpoint(dirpath: Path, seed: int = 0) -> dict[str, str]:
    """A random-weight open_clip model saved as a local checkpoint; returns the config overrides to load it."""
    return custom_checkpoint(dirpath, TINY_ARCH, TINY_CONFIG, seed, ckpt_name=f"{TINY_ARCH}-seed{seed}.pt")


def custom_checkpoint(
    root: Path, name: str, config: dict, seed: int = 0, ckpt_name: str | None = None
) -> dict[str, str]:
    """A random-weight model of an open_clip config (registered as `name`), saved as a local checkpoint."""
    import open_clip
    import torch

    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / f"{name}.json"
    cfg_path.write_text(json.dumps(config))
    open_clip.factory._MODEL_CONFIGS[name] = config
    torch.manual_seed(seed)
    ckpt = root / (ckpt_name or f"{name}.pt")
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), ckpt)
    return {"model.arch": name, "model.checkpoint": str(ckpt), "model.model_config_file": str(cfg_path)}


def overrides(d: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def random_unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_fake_embed_output(
    root: str | Path,
    shards: dict[str, np.ndarray],
    text: dict[str, np.ndarray] | None = None,
    model: dict[str, Any] | None = None,
    extra_meta: dict[str, dict[str, list[Any]]] | None = None,
) -> str:
    """An embed output folder (same writer, manifest and commit markers as the real stage) from given vectors.

    shards: shard_id -> (n, d) image embeddings; keys are f"{shard_id}{i:04d}".
    extra_meta: shard_id -> {column: values} overriding metadata columns (url, sha256, width, caption, status...).
    """
    from pipeline.embed.batch import OK, EmbeddedBatch, SampleRow
    from pipeline.embed.writer import ShardWriter, check_or_write_manifest, update_manifest
    from pipeline.embeddings.layout import new_manifest

    root = str(root)
    dim = next(iter(shards.values())).shape[1]
    manifest = new_manifest(
        model or {"family": "open_clip", "arch": TINY_ARCH, "checkpoint_sha256": "fake"},
        {"family": "open_clip", "arch": TINY_ARCH},
    )
    check_or_write_manifest(root, manifest)
    for sid, emb in shards.items():
        n = len(emb)
        cols = (extra_meta or {}).get(sid, {})
        rows = []
        for i in range(n):

            def col(name: str, default: Any, i: int = i, cols: dict[str, list[Any]] = cols) -> Any:
                return cols[name][i] if name in cols else default

            rows.append(
                SampleRow(
                    key=col("key", f"{sid}{i:04d}"),
                    index=i,
                    caption=col("caption", f"caption {sid} {i}"),
                    url=col("url", f"http://127.0.0.1/{sid}/{i}.jpg"),
                    sha256=col("sha256", f"sha-{sid}-{i}"),
                    width=col("width", 64),
                    height=col("height", 64),
                    status=col("status", OK),
                    error=col("error", None),
                    caption_status=col("caption_status", OK),
                )
            )
        txt = (text or {}).get(sid)
        if txt is None:
            txt = emb
        w = ShardWriter(root, sid, dim, "float16")
        w.write(EmbeddedBatch(sid, rows, emb.astype(np.float32), txt.astype(np.float32)))
        w.close({"shard": sid, "samples": n, "ok": n, "status_counts": {OK: n}, "dim": dim})
    update_manifest(root, dim=dim)
    return root


def _encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def hostile_samples() -> list[tuple[str, dict[str, bytes]]]:
    """One sample per bad-data kind the embed stage must survive (see tests/embed/test_runner.py for expectations)."""
    good = jpeg_bytes(1)
    palette = Image.new("P", (8, 8), 0)
    return [
        ("ok", {"jpg": good, "txt": b"fine"}),
        ("corrupt", {"jpg": good[: len(good) // 3], "txt": b"truncated jpeg"}),
        ("zero", {"jpg": b"", "txt": b"zero bytes"}),
        ("html", {"jpg": b"<html>not an image</html>", "txt": b"html saved as jpg"}),
        ("noimage", {"txt": b"only a caption"}),
        ("nocaption", {"jpg": good}),
        ("badutf8", {"jpg": good, "txt": b"caf\xe9"}),
        ("bomb", {"png": _encoded(Image.new("1", (12000, 12000)), "PNG")}),
        ("cmyk", {"jpg": _encoded(Image.new("CMYK", (16, 16), (0, 50, 50, 0)), "JPEG"), "txt": b"cmyk"}),
        ("palette", {"png": _encoded(palette, "PNG", transparency=0), "txt": b"palette"}),
        ("bigcaption", {"jpg": good, "txt": b"word " * 200_000}),
        ("ok", {"jpg": good, "txt": b"duplicate key"}),
    ]


def load_shard(out: str, sid: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read one committed embed shard back: (image embeddings, text embeddings, metadata DataFrame)."""
    import fsspec
    import pyarrow.parquet as pq

    from pipeline.embeddings.layout import shard_files

    f = shard_files(out, sid)
    with fsspec.open(f.img_emb, "rb") as fh:
        img = np.load(fh, allow_pickle=False)
    with fsspec.open(f.text_emb, "rb") as fh:
        txt = np.load(fh, allow_pickle=False)
    with fsspec.open(f.metadata, "rb") as fh:
        meta = pq.read_table(fh).to_pandas()
    return img, txt, meta
