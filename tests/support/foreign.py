"""The same vectors written the way other tools write them: clip-retrieval's inference layout (its writer.py: np.save
into a buffer, metadata through pandas' to_parquet, partitions named str(i).zfill(digits of the partition count)),
plain npy files, and Parquet with a list or fixed_size_list embedding column; plus clipline's own embed output of the
same samples, so a test can compare every stage's results across formats."""

from __future__ import annotations

import io
import json
import math
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tests.support.helpers import random_unit, write_fake_embed_output


@dataclass
class Samples:
    """Shards of samples: image and text vectors (exactly representable in float16), keys, captions, urls, hashes."""

    img: dict[str, np.ndarray]
    txt: dict[str, np.ndarray]
    keys: dict[str, list[str]]
    captions: dict[str, list[str]]
    urls: dict[str, list[str]]
    sha256: dict[str, list[str]]

    @property
    def shards(self) -> list[str]:
        return list(self.img)


def f16_exact(x: np.ndarray) -> np.ndarray:
    """Vectors whose float32 values are float16 values, so float16 and float32 copies hold the same numbers."""
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def near_copy(v: np.ndarray, cos: float, seed: int) -> np.ndarray:
    u = random_unit(1, len(v), seed)[0]
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    return (cos * v + np.sqrt(1 - cos * cos) * u).astype(np.float32)


def make_samples(n_shards: int = 3, per_shard: int = 60, dim: int = 32, seed: int = 0) -> Samples:
    """Random unit vectors with planted duplicates: a near trio across shards, one pair of identical bytes (same
    sha256, unrelated vectors), and a distractor at cosine 0.9; keys are random hex uids."""
    rng = np.random.default_rng(seed)
    ids = [f"{i:05d}" for i in range(n_shards)]
    img = {s: random_unit(per_shard, dim, seed * 100 + i) for i, s in enumerate(ids)}
    centre = img[ids[1]][5]
    img[ids[0]][7] = near_copy(centre, 0.985, 1)
    img[ids[-1]][3] = near_copy(centre, 0.975, 2)
    img[ids[0]][20] = near_copy(img[ids[0]][30], 0.90, 3)
    img = {s: f16_exact(v) for s, v in img.items()}
    txt = {s: f16_exact(random_unit(per_shard, dim, seed * 100 + 50 + i)) for i, s in enumerate(ids)}
    keys = {s: [f"u{rng.integers(1 << 48):012x}" for _ in range(per_shard)] for s in ids}
    sha = {s: [f"sha-{s}-{i}" for i in range(per_shard)] for s in ids}
    sha[ids[-1]][11] = sha[ids[1]][9] = "same-bytes"
    return Samples(
        img,
        txt,
        keys,
        {s: [f"caption {s} {i}" for i in range(per_shard)] for s in ids},
        {s: [f"http://127.0.0.1/{s}/{i}.jpg" for i in range(per_shard)] for s in ids},
        sha,
    )


def write_clipline(root: str, data: Samples) -> str:
    meta = {
        s: {"key": data.keys[s], "caption": data.captions[s], "url": data.urls[s], "sha256": data.sha256[s]}
        for s in data.shards
    }
    return write_fake_embed_output(root, data.img, text=data.txt, extra_meta=meta)


def _put(url: str, payload: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(payload)


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def clip_retrieval_names(data: Samples) -> dict[str, str]:
    """clipline shard id -> clip-retrieval partition name (str(i).zfill(int(log10(count)) + 1))."""
    digits = int(math.log10(len(data.shards))) + 1
    return {s: str(i).zfill(digits) for i, s in enumerate(data.shards)}


def write_clip_retrieval(root: str, data: Samples, text: bool = True) -> str:
    """As clip-retrieval inference writes a webdataset input with metadata: float16 npy per partition, metadata with
    image_path (the sample's __key__), caption, and the img2dataset json's columns flattened in."""
    root = root.rstrip("/")
    for s, part in clip_retrieval_names(data).items():
        _put(f"{root}/img_emb/img_emb_{part}.npy", _npy_bytes(data.img[s].astype(np.float16)))
        if text:
            _put(f"{root}/text_emb/text_emb_{part}.npy", _npy_bytes(data.txt[s].astype(np.float16)))
        records = [
            json.dumps({"url": u, "key": k, "status": "success", "sha256": h, "width": 64, "height": 64})
            for u, k, h in zip(data.urls[s], data.keys[s], data.sha256[s])
        ]
        df = pd.DataFrame({"image_path": data.keys[s], "caption": data.captions[s], "metadata": records})
        parsed = pd.json_normalize(df["metadata"].apply(json.loads))
        df = df.join(parsed.drop(columns=list({"caption", "metadata", "image_path"} & set(parsed)))).drop(
            columns=["metadata"]
        )
        buf = io.BytesIO()
        df.to_parquet(buf)
        _put(f"{root}/metadata/metadata_{part}.parquet", buf.getvalue())
    return root


def write_npy(root: str, data: Samples, modality: str = "image") -> str:
    root = root.rstrip("/")
    vecs = data.img if modality == "image" else data.txt
    for s in data.shards:
        _put(f"{root}/{s}.npy", _npy_bytes(vecs[s].astype(np.float32)))
    return root


def embedding_array(x: np.ndarray, kind: str) -> pa.Array:
    values = pa.array(x.ravel())
    if kind == "fixed_size_list":
        return pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    offsets = pa.array(np.arange(0, x.size + 1, x.shape[1], dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, values)


def write_parquet(
    root: str, data: Samples, kind: str = "list", dtype: Any = np.float32, column: str = "embedding", **extra: Any
) -> str:
    """One file per shard: uid, caption, url, sha256 and the image vectors as a `kind` column of `dtype`."""
    root = root.rstrip("/")
    for s in data.shards:
        table = pa.table(
            {
                "uid": data.keys[s],
                "caption": data.captions[s],
                "url": data.urls[s],
                "sha256": data.sha256[s],
                column: embedding_array(data.img[s].astype(dtype), kind),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, **extra)
        _put(f"{root}/{s}.parquet", buf.getvalue())
    return root
