"""Dedup's view of an embed output: one metadata row per sample (shard, index order) and a memory-mapped
`VectorSet` over the samples whose image vector is valid (the embeddings read side's rule), so only the blocks being
searched are in memory."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

from pipeline.dedup.neighbors import normalize_rows
from pipeline.embeddings.read import EmbeddingSet

MODALITY = "image"


class ShardVectors:
    """A VectorSet over the valid image rows of an EmbeddingSet's shards; ids number them shard by shard."""

    def __init__(self, emb: EmbeddingSet, valid: list[np.ndarray]):
        self.emb = emb
        self.rows = [np.flatnonzero(m) for m in valid]
        self.expected = [len(m) for m in valid]
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in self.rows])]).astype(np.int64)
        self.n, self.d = int(self.offsets[-1]), emb.dim

    def _array(self, i: int) -> np.ndarray:
        """Shard i memory-mapped; callers drop it when done, so mapped pages never accumulate."""
        arr = self.emb.vectors(self.emb.shards[i], MODALITY)
        if arr.shape != (self.expected[i], self.d):
            path = self.emb.files(self.emb.shards[i]).vectors(MODALITY)
            raise RuntimeError(f"{path}: shape {arr.shape}, metadata says ({self.expected[i]}, {self.d})")
        return arr

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
    """An embed output opened for dedup: `rows` (every sample, with `embedded` = its image vector is valid) and
    `vectors` over the embedded ones; `row_of[vector id]` is the row."""

    def __init__(self, folder: str, columns: list[str], workdir: str, read_timeout_s: float | None = None):
        self.set = EmbeddingSet(folder, read_timeout_s, workdir)
        self.folder, self.shards, self.manifest = self.set.folder, self.set.shards, self.set.manifest
        wanted = ["key", "shard", "index", *columns]
        reads = [self.set.read(s, MODALITY, wanted) for s in self.shards]
        self.rows = pd.concat([r.meta for r in reads], ignore_index=True)
        self.rows["shard"] = pd.Categorical(self.rows["shard"], categories=self.shards)
        valid = [r.valid for r in reads]
        self.rows["embedded"] = np.concatenate(valid) if valid else np.zeros(0, bool)
        self.vectors = ShardVectors(self.set, valid)
        self.row_of = np.flatnonzero(self.rows["embedded"].to_numpy())  # vector id -> row

    def __len__(self) -> int:
        return len(self.rows)
