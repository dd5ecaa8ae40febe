"""Reading an embed output's vectors for the stages after embed: a stall bound on every read, and dedup's view of the
output (row metadata plus a memory-mapped `VectorSet` over the embedded rows)."""

from __future__ import annotations

import functools
import os
from typing import Iterator, TypeVar

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.timeouts import within
from pipeline.dedup.neighbors import normalize_rows
from pipeline.embed.batch import OK
from pipeline.embed.writer import committed_shards, read_manifest, shard_files

T = TypeVar("T")


class ShardVectors:
    """A VectorSet over the ok rows of an embed output's img_emb shards, memory-mapped (remote files are copied to
    a local work folder first), so only the blocks being searched are in memory."""

    def __init__(
        self,
        folder: str,
        shard_ids: list[str],
        ok_masks: list[np.ndarray],
        dim: int,
        workdir: str,
        read_timeout_s: float | None = None,
    ):
        self.fs, _ = fsspec.core.url_to_fs(folder)
        self.paths = [shard_files(folder, s).img_emb for s in shard_ids]
        self.rows = [np.flatnonzero(m) for m in ok_masks]
        self.expected = [len(m) for m in ok_masks]
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in self.rows])]).astype(np.int64)
        self.n, self.d = int(self.offsets[-1]), dim
        self.workdir = workdir
        self.read_timeout_s = read_timeout_s
        self._local: dict[int, str] = {}

    def _array(self, i: int) -> np.ndarray:
        """Shard i memory-mapped; callers drop it when done, so mapped pages never accumulate."""
        if i not in self._local:
            path = self.paths[i]
            if "file" not in self.fs.protocol:
                local = os.path.join(self.workdir, f"emb_{i}.npy")
                within(self.read_timeout_s, path, lambda: self.fs.get(path, local))
                path = local
            self._local[i] = fsspec.core.strip_protocol(path)
        arr = np.load(self._local[i], mmap_mode="r")
        if arr.shape != (self.expected[i], self.d):
            raise RuntimeError(f"{self.paths[i]}: shape {arr.shape}, metadata says ({self.expected[i]}, {self.d})")
        return arr  # type: ignore[no-any-return]

    def array_shape(self, i: int) -> tuple[int, ...]:
        def header() -> tuple[int, ...]:
            with fsspec.open(self.paths[i], "rb") as f:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                return read(f)[0]  # type: ignore[no-any-return]

        return within(self.read_timeout_s, self.paths[i], header)

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for i, local in enumerate(self.rows):
            if len(local):
                arr = self._array(i)
                for s in range(0, len(local), rows):
                    yield int(self.offsets[i] + s), normalize_rows(arr[local[s : s + rows]])
                del arr

    def gather(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        out = np.empty((len(ids), self.d), np.float32)
        shard_of = np.searchsorted(self.offsets, ids, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        cuts = np.flatnonzero(np.diff(shard_of[order])) + 1
        for sel in np.split(order, cuts) if len(ids) else []:
            i = int(shard_of[sel[0]])
            out[sel] = self._array(i)[self.rows[i][ids[sel] - self.offsets[i]]]
        return normalize_rows(out)


class Embeddings:
    """An embed output opened for dedup: row metadata (one row per sample, (shard, index) order) and its vectors."""

    def __init__(self, folder: str, columns: list[str], workdir: str, read_timeout_s: float | None = None):
        self.folder = folder.rstrip("/")
        self.shards = committed_shards(self.folder)
        if not self.shards:
            raise ConfigError(f"input: {folder} holds no committed embed shards (is it an embed output folder?)")
        self.manifest = read_manifest(self.folder) or {}
        wanted = ["key", "shard", "index", "status", *columns]

        def metadata(path: str) -> pd.DataFrame:
            with fsspec.open(path, "rb") as f:
                return pq.read_table(f, columns=wanted).to_pandas()

        tables = []
        for s in self.shards:
            path = shard_files(self.folder, s).metadata
            tables.append(within(read_timeout_s, path, functools.partial(metadata, path)))
        self.rows = pd.concat(tables, ignore_index=True)
        self.rows["shard"] = pd.Categorical(self.rows["shard"], categories=self.shards)
        ok = (self.rows["status"] == OK).to_numpy()
        sizes = [len(t) for t in tables]
        masks = np.split(ok, np.cumsum(sizes)[:-1])
        dim = int(self.manifest.get("dim") or 0)
        self.vectors = ShardVectors(self.folder, self.shards, masks, dim, workdir, read_timeout_s)
        if not self.vectors.d:  # manifest without dim (older outputs): read it off the first shard
            self.vectors.d = int(self.vectors.array_shape(0)[1])
        self.row_of = np.flatnonzero(ok)  # vector id -> row

    def __len__(self) -> int:
        return len(self.rows)
