"""Reading an embed output back, for every stage after embed (index, dedup, query, classify, report): its committed
shards, each shard's vectors with the one validity rule, its metadata, every read bounded in time."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.fsio import is_local
from pipeline.core.timeouts import within
from pipeline.embeddings.layout import ShardFiles, committed_shards, read_manifest, shard_files

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
OK = "ok"


def valid_rows(meta: pd.DataFrame, vectors: np.ndarray, modality: str) -> np.ndarray:
    """The one rule for which rows hold a usable vector: the sample's status says the modality was embedded (image:
    status ok; text: a caption was read and the sample was not cut by a read error), and the vector is finite and
    not all zeros (failed rows are stored as zero vectors)."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    n = len(vectors)
    ok = np.ones(n, bool)
    if "status" in meta:
        status = meta["status"].to_numpy(object)
        if modality == "image":
            ok &= status == OK
        else:
            ok &= status != "read_error"
            if "caption_status" in meta:
                ok &= meta["caption_status"].to_numpy(object) != "missing"
    if n:
        x = np.asarray(vectors)
        usable = np.isfinite(x).all(axis=1) & (np.abs(x).max(axis=1) > 0)
        bad = ok & ~usable
        if bad.any():
            log.warning("%d %s rows marked ok have a zero or non-finite vector; skipped", int(bad.sum()), modality)
        ok &= usable
    return ok


@dataclass
class ShardRead:
    """One shard's vectors of one modality (every row, stored dtype), which rows are valid, and their metadata."""

    shard: str
    vectors: np.ndarray
    valid: np.ndarray
    meta: pd.DataFrame

    @property
    def rows(self) -> np.ndarray:
        """Positions (in the shard's files) of the valid rows."""
        return np.flatnonzero(self.valid)

    def kept(self) -> np.ndarray:
        """The valid rows' vectors, in row order."""
        return self.vectors[self.valid]


class EmbeddingSet:
    """An embed output opened for reading: manifest, committed shards and their vectors and metadata.

    `read_timeout_s` bounds every single read (a stalled object store fails the stage instead of hanging it);
    `workdir` is where remote vector files are copied when a caller needs them memory-mapped.
    """

    def __init__(self, folder: str, read_timeout_s: float | None = None, workdir: str | None = None):
        self.folder = folder.rstrip("/")
        self.read_timeout_s = read_timeout_s
        self.workdir = workdir
        manifest = read_manifest(self.folder)
        if manifest is None:
            raise ConfigError(f"input={self.folder}: no manifest.json; expected the output folder of `clipline embed`")
        self.manifest = manifest
        self.shards = committed_shards(self.folder)
        if not self.shards:
            raise ConfigError(f"input={self.folder}: holds no committed embed shards")
        self.fs, _ = fsspec.core.url_to_fs(self.folder)
        self._local: dict[str, str] = {}

    @property
    def modalities(self) -> list[str]:
        """The modalities this output was embedded with."""
        return [m for m in MODALITIES if self.manifest.get(m, True)]

    @functools.cached_property
    def dim(self) -> int:
        """Embedding width: from the manifest, else (older outputs) the first shard's npy header."""
        dim = self.manifest.get("dim")
        if dim:
            return int(dim)
        path = self.files(self.shards[0]).vectors(self.modalities[0])
        return int(self._bounded(path, lambda: _npy_shape(path))[1])

    def files(self, shard: str) -> ShardFiles:
        return shard_files(self.folder, shard)

    def _bounded(self, what: str, fn):  # type: ignore[no-untyped-def]
        return within(self.read_timeout_s, what, fn)

    def metadata(self, shard: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The shard's metadata rows (all of them, file order); `columns` None reads every column."""
        path = self.files(shard).metadata

        def read() -> pd.DataFrame:
            with fsspec.open(path, "rb") as f:
                return pq.read_table(f, columns=list(columns) if columns is not None else None).to_pandas()

        return self._bounded(path, read)  # type: ignore[no-any-return]

    def vectors(self, shard: str, modality: str, mmap: bool = True) -> np.ndarray:
        """The shard's vectors of one modality, every row, stored dtype: memory-mapped where local (or copied to the
        work folder first when `workdir` is set), read whole otherwise."""
        path = self.files(shard).vectors(modality)
        if not is_local(self.fs):
            if not (mmap and self.workdir):
                return self._bounded(path, lambda: _load_remote(self.fs, path))  # type: ignore[no-any-return]
            if path not in self._local:
                local = os.path.join(self.workdir, f"{modality}_{shard}.npy")
                self._bounded(path, lambda: self.fs.get(path, local))
                self._local[path] = local
            path = self._local[path]
        local_path = fsspec.core.strip_protocol(path)
        return self._bounded(path, lambda: np.load(local_path, mmap_mode="r" if mmap else None))  # type: ignore[no-any-return]

    def read(self, shard: str, modality: str, columns: Sequence[str] = ("key",)) -> ShardRead:
        """One shard of one modality with the validity mask; `columns` of its metadata come along."""
        wanted = list(dict.fromkeys([*columns, "status", "caption_status"]))
        meta = self.metadata(shard, wanted)
        vectors = self.vectors(shard, modality)
        if len(meta) != len(vectors):
            raise JobFailed(
                f"{self.folder}: shard {shard} has {len(meta)} metadata rows but {len(vectors)} {modality} embeddings"
            )
        return ShardRead(shard, vectors, valid_rows(meta, vectors, modality), meta)

    def iter_kept(self, modality: str, shards: Sequence[str] | None = None) -> Iterator[np.ndarray]:
        """The valid vectors shard by shard, in shard order (the order index ids are given in)."""
        for shard in self.shards if shards is None else shards:
            yield self.read(shard, modality, ()).kept()

    def vector(self, shard: str, row: int, modality: str) -> np.ndarray:
        """One stored vector, as float32."""
        return np.asarray(self.vectors(shard, modality)[row], dtype=np.float32)


def _load_remote(fs: fsspec.AbstractFileSystem, path: str) -> np.ndarray:
    with fs.open(path, "rb") as f:
        return np.load(f, allow_pickle=False)  # type: ignore[no-any-return]


def _npy_shape(path: str) -> tuple[int, ...]:
    with fsspec.open(path, "rb") as f:
        fmt = np.lib.format
        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        return read(f)[0]  # type: ignore[no-any-return]
