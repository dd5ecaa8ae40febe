"""The embed output format: file naming, the per-shard writer with its commit protocol, and the manifest."""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.fsio import TMP_MARK, put_bytes
from pipeline.embed.batch import EmbeddedBatch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

METADATA_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("index", pa.int32()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("clip_score", pa.float32()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("caption_status", pa.string()),
    ]
)


@dataclass(frozen=True)
class ShardFiles:
    """Every path one output shard owns; the only place shard file names are built."""

    img_emb: str
    text_emb: str
    metadata: str
    parquet: str
    stats: str


def shard_files(output: str, shard_id: str) -> ShardFiles:
    """clip-retrieval layout, so embedding-reader, autofaiss and clip-retrieval read it unchanged."""
    j = posixpath.join
    return ShardFiles(
        img_emb=j(output, "img_emb", f"img_emb_{shard_id}.npy"),
        text_emb=j(output, "text_emb", f"text_emb_{shard_id}.npy"),
        metadata=j(output, "metadata", f"metadata_{shard_id}.parquet"),
        parquet=j(output, "parquet", f"{shard_id}.parquet"),
        stats=j(output, "stats", f"stats_{shard_id}.json"),
    )


def shard_id_of_stats(path: str) -> str:
    name = posixpath.basename(path)
    return name[len("stats_") : -len(".json")]


def committed_shards(output: str, include_empty: bool = False) -> list[str]:
    """Shard ids whose stats file (the commit marker, written last) exists, sorted.

    A shard whose input held no sample commits a stats file only (no data files: embedding-reader's
    parquet_npy mode would pair the following shards with the wrong metadata). Readers of embeddings get
    only shards with data; the embed driver asks for empty ones too, so it does not redo them.
    """
    fs, root = fsspec.core.url_to_fs(output)
    stats_dir = posixpath.join(root, "stats")
    if not fs.exists(stats_dir):
        return []
    names = [p for p in fs.ls(stats_dir, detail=False) if p.endswith(".json") and TMP_MARK not in p]
    done = sorted(shard_id_of_stats(p) for p in names)
    if include_empty:
        return done
    meta_dir = posixpath.join(root, "metadata")
    if not fs.exists(meta_dir):
        return []
    with_data = {
        posixpath.basename(p)[len("metadata_") : -len(".parquet")]
        for p in fs.ls(meta_dir, detail=False)
        if p.endswith(".parquet") and TMP_MARK not in p
    }
    return [s for s in done if s in with_data]


def uncommit(output: str, shard_id: str) -> None:
    """Remove a shard's commit marker (and so its claim to be done); its files are replaced when it is redone."""
    fs, _ = fsspec.core.url_to_fs(output)
    path = shard_files(output, shard_id).stats
    if fs.exists(path):
        fs.rm(path)


def read_stats(output: str, shard_id: str) -> dict[str, Any]:
    with fsspec.open(shard_files(output, shard_id).stats, "r") as f:
        return json.load(f)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Collects one shard's embedded batches and commits all its files at close(), stats file last."""

    def __init__(self, output: str, shard_id: str, dim: int, dtype: str = "float16", write_parquet: bool = False):
        self.fs, _ = fsspec.core.url_to_fs(output)
        self.files = shard_files(output, shard_id)
        self.shard_id = shard_id
        self.dim = dim
        self.dtype = np.dtype(dtype)
        self.write_parquet = write_parquet
        self._img: list[np.ndarray] = []
        self._txt: list[np.ndarray] = []
        self._meta: list[pa.Table] = []

    def write(self, batch: EmbeddedBatch) -> None:
        if not (len(batch.rows) == len(batch.image_emb) == len(batch.text_emb)):
            raise RuntimeError(
                f"shard {self.shard_id}: rows not aligned ({len(batch.rows)}, {len(batch.image_emb)}, {len(batch.text_emb)})"
            )
        self._img.append(batch.image_emb.astype(self.dtype, copy=False))
        self._txt.append(batch.text_emb.astype(self.dtype, copy=False))
        self._meta.append(batch.metadata_table())

    def close(self, stats: dict[str, Any], skip_if_committed: bool = False) -> dict[str, Any]:
        """Commit: data files by rename, then the stats file that marks the shard done."""
        if skip_if_committed and self.fs.exists(self.files.stats):
            # A retry or speculative copy finished second: the committed shard stays as it is.
            with self.fs.open(self.files.stats, "r") as f:
                return json.load(f)  # type: ignore[no-any-return]
        empty = np.zeros((0, self.dim), dtype=self.dtype)
        img = np.concatenate(self._img) if self._img else empty
        txt = np.concatenate(self._txt) if self._txt else empty
        meta = pa.concat_tables(self._meta) if self._meta else METADATA_SCHEMA.empty_table()
        if not (len(img) == len(txt) == meta.num_rows):
            raise RuntimeError(f"shard {self.shard_id}: rows not aligned ({len(img)}, {len(txt)}, {meta.num_rows})")
        t0 = time.perf_counter()
        if self.fs.exists(self.files.stats):
            # Redoing a committed shard: un-commit it first, so a failure midway never leaves a mixed shard.
            self.fs.rm(self.files.stats)
        if meta.num_rows == 0:
            return self._commit_stats(dict(stats, rows=0), t0)
        put_bytes(self.fs, self.files.img_emb, _npy_bytes(img))
        put_bytes(self.fs, self.files.text_emb, _npy_bytes(txt))
        put_bytes(self.fs, self.files.metadata, _parquet_bytes(meta))
        if self.write_parquet:
            emb_type = pa.list_(pa.float32() if self.dtype == np.float32 else pa.float16(), self.dim)
            flat = pa.array(img.reshape(-1), type=emb_type.value_type)
            col = pa.FixedSizeListArray.from_arrays(flat, self.dim)
            put_bytes(self.fs, self.files.parquet, _parquet_bytes(meta.append_column("embedding", col)))
        return self._commit_stats(dict(stats, rows=int(meta.num_rows)), t0)

    def _commit_stats(self, stats: dict[str, Any], t0: float) -> dict[str, Any]:
        stats.setdefault("timings", {})["write"] = stats.get("timings", {}).get("write", 0.0) + time.perf_counter() - t0
        put_bytes(self.fs, self.files.stats, json.dumps(stats, indent=1, sort_keys=True).encode())
        return stats


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def sweep_temporary(output: str) -> int:
    """Delete temporary files left by killed writers (call when no writer of this output runs)."""
    fs, root = fsspec.core.url_to_fs(output)
    removed = 0
    for sub in ("img_emb", "text_emb", "metadata", "parquet", "stats"):
        d = posixpath.join(root, sub)
        if not fs.exists(d):
            continue
        for p in fs.ls(d, detail=False):
            if TMP_MARK in posixpath.basename(p):
                fs.rm(p)
                removed += 1
    return removed


def uncommitted_leftovers(output: str) -> list[str]:
    """Final-named data files of shards without a commit marker (from a job killed mid-commit)."""
    fs, root = fsspec.core.url_to_fs(output)
    done = set(committed_shards(output, include_empty=True))
    stray = []
    for sub, prefix, suffix in (
        ("img_emb", "img_emb_", ".npy"),
        ("text_emb", "text_emb_", ".npy"),
        ("metadata", "metadata_", ".parquet"),
        ("parquet", "", ".parquet"),
    ):
        d = posixpath.join(root, sub)
        if not fs.exists(d):
            continue
        for p in fs.ls(d, detail=False):
            name = posixpath.basename(p)
            if TMP_MARK in name or not name.endswith(suffix):
                continue
            sid = name[len(prefix) : -len(suffix)]
            if sid not in done:
                stray.append(p)
    return stray


def remove_uncommitted(output: str) -> int:
    """Remove leftovers so readers that list files (embedding-reader) never see a shard without its marker."""
    fs, _ = fsspec.core.url_to_fs(output)
    stray = uncommitted_leftovers(output)
    for p in stray:
        fs.rm(p)
    return len(stray)


# ---- manifest -------------------------------------------------------------------------------------------


class ManifestMismatch(ValueError):
    """The output folder was made with a different model, preprocessing or dtype."""


def new_manifest(
    model: dict[str, Any],
    model_config: dict[str, Any],
    output_dtype: str = "float16",
    image: bool = True,
    text: bool = True,
) -> dict[str, Any]:
    """The manifest of an embed output: the one place its fields are spelled."""
    return {
        "format_version": FORMAT_VERSION,
        "model": model,
        "model_config": model_config,
        "output_dtype": output_dtype,
        "image": image,
        "text": text,
        "normalized": True,
        "failed_rows": "zero vector; see metadata status / caption_status",
    }


def manifest_path(output: str) -> str:
    return posixpath.join(output, "manifest.json")


def read_manifest(output: str) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(manifest_path(output))
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        try:
            return json.load(f)  # type: ignore[no-any-return]
        except ValueError as e:
            raise ManifestMismatch(
                f"{manifest_path(output)} is not valid JSON ({e}); restore it or use a new output"
            ) from e


def manifest_identity(m: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match for two runs to write into the same output."""
    return {k: m.get(k) for k in ("format_version", "model", "output_dtype", "image", "text", "normalized")}


def check_or_write_manifest(output: str, manifest: dict[str, Any]) -> None:
    """Write the manifest, or verify an existing one describes the same embeddings."""
    existing = read_manifest(output)
    if existing is not None and not committed_shards(output, include_empty=True):
        existing = None  # nothing was ever committed (e.g. the model failed to load): the old manifest binds nothing
    if existing is not None:
        old, new = manifest_identity(existing), manifest_identity(manifest)
        if old != new:
            diff = {k: (old[k], new[k]) for k in old if old[k] != new[k]}
            raise ManifestMismatch(
                f"{output} holds embeddings made differently: "
                + "; ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
                + ". Use a new output folder."
            )
        return
    fs, path = fsspec.core.url_to_fs(manifest_path(output))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    put_bytes(fs, path, json.dumps(manifest, indent=1, sort_keys=True).encode())


def update_manifest(output: str, **fields: Any) -> None:
    m = read_manifest(output) or {}
    if all(m.get(k) == v for k, v in fields.items()):
        return
    m.update(fields)
    fs, path = fsspec.core.url_to_fs(manifest_path(output))
    put_bytes(fs, path, json.dumps(m, indent=1, sort_keys=True).encode())
