"""The embed stage's writer: one shard's embeddings and metadata committed all at once (data files by rename, the stats
file last), sweeping what killed writers left, and the manifest check. The names and formats it writes are
pipeline/embeddings/layout.py's."""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.fsio import is_temporary, put_bytes, put_json
from pipeline.embed.batch import EmbeddedBatch
from pipeline.embeddings.layout import (
    DATA_KINDS,
    KINDS,
    METADATA_SCHEMA,
    ManifestMismatch,
    committed_shards,
    list_kind,
    manifest_difference,
    manifest_path,
    read_manifest,
    read_stats,
    shard_files,
)

log = logging.getLogger(__name__)


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Collects one shard's embedded batches and commits all its files at close(), stats file last."""

    def __init__(self, output: str, shard_id: str, dim: int, dtype: str = "float16", write_parquet: bool = False):
        self.fs, _ = fsspec.core.url_to_fs(output)
        self.output = output
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
            return read_stats(self.output, self.shard_id)
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
        put_bytes(self.fs, self.files.stats, json.dumps(stats, indent=1, sort_keys=True).encode())  # last: the commit
        return stats


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def sweep_temporary(output: str) -> int:
    """Delete temporary files left by killed writers (call when no writer of this output runs)."""
    fs, root = fsspec.core.url_to_fs(output)
    removed = 0
    for sub, _, _ in KINDS.values():
        try:
            names = fs.ls(posixpath.join(root, sub), detail=False)  # one LIST, no existence check before it
        except FileNotFoundError:
            continue
        for p in names:
            if is_temporary(p):
                fs.rm(p)
                removed += 1
    return removed


def uncommitted_leftovers(output: str) -> list[str]:
    """Final-named data files of shards without a commit marker (from a job killed mid-commit)."""
    done = set(committed_shards(output, include_empty=True))
    return [p for kind in DATA_KINDS for sid, p in list_kind(output, kind).items() if sid not in done]


def uncommit(output: str, shard_id: str) -> None:
    """Remove a shard's commit marker (and so its claim to be done); its files are replaced when it is redone."""
    fs, _ = fsspec.core.url_to_fs(output)
    path = shard_files(output, shard_id).stats
    if fs.exists(path):
        fs.rm(path)


def remove_uncommitted(output: str) -> int:
    """Remove leftovers so readers that list files (embedding-reader) never see a shard without its marker."""
    fs, _ = fsspec.core.url_to_fs(output)
    stray = uncommitted_leftovers(output)
    for p in stray:
        fs.rm(p)
    return len(stray)


# ---- manifest -------------------------------------------------------------------------------------------


def check_or_write_manifest(output: str, manifest: dict[str, Any]) -> None:
    """Write the manifest, or verify an existing one describes the same embeddings."""
    existing = read_manifest(output)
    if existing is not None and not committed_shards(output, include_empty=True):
        existing = None  # nothing was ever committed (e.g. the model failed to load): the old manifest binds nothing
    if existing is not None:
        diff = manifest_difference(existing, manifest)
        if diff:
            raise ManifestMismatch(
                f"{output} holds embeddings made differently: "
                + "; ".join(f"{k}: existing {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
                + ". Use a new output folder."
            )
        return
    put_json(manifest_path(output), manifest, sort_keys=True)


def update_manifest(output: str, **fields: Any) -> None:
    m = read_manifest(output) or {}
    if all(m.get(k) == v for k, v in fields.items()):
        return
    m.update(fields)
    put_json(manifest_path(output), m, sort_keys=True)
