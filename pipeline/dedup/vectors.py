"""Dedup's view of embeddings (clipline's or another tool's, `embeddings.*`): one metadata row per sample (shard, index
order) and a `VectorSet` over the samples whose image vector is valid (the embeddings read side's rule), read in place
(memory-mapped where local, by ranged reads elsewhere), so only the blocks being searched are in memory."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd

from pipeline.core.config import EmbeddingsConfig
from pipeline.core.errors import ConfigError
from pipeline.dedup.neighbors import normalize_rows
from pipeline.embeddings.read import EmbeddingSet
from pipeline.embeddings.rows import RowArray

MODALITY = "image"


class ShardVectors:
    """A VectorSet over the valid image rows of an EmbeddingSet's shards; ids number them shard by shard."""

    def __init__(self, emb: EmbeddingSet, valid: list[np.ndarray]):
        self.emb = emb
        self.rows = [np.flatnonzero(m) for m in valid]
        self.expected = [len(m) for m in valid]
        self.offsets = np.concatenate([[0], np.cumsum([len(r) for r in self.rows])]).astype(np.int64)
        self.n, self.d = int(self.offsets[-1]), emb.dim

    def _array(self, i: int) -> RowArray:
        """Shard i read in place; callers drop it when done, so mapped pages never accumulate."""
        arr = self.emb.vectors(self.emb.shards[i], MODALITY)
        if tuple(arr.shape) != (self.expected[i], self.d):
            path = self.emb.vector_path(self.emb.shards[i], MODALITY)
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
    """Embeddings opened for dedup: `rows` (every sample, with `embedded` = its image vector is valid) and
    `vectors` over the embedded ones; `row_of[vector id]` is the row."""

    def __init__(
        self,
        folder: str,
        columns: list[str],
        read_timeout_s: float | None = None,
        options: EmbeddingsConfig | None = None,
    ):
        self.set = EmbeddingSet(folder, read_timeout_s, options)
        if MODALITY not in self.set.modalities:
            raise ConfigError(f"input={folder}: holds no image embeddings to deduplicate ({self.set.modalities} only)")
        self.folder, self.shards, self.model = self.set.folder, self.set.shards, self.set.model
        wanted = ["key", "shard", "index", *columns]
        metas, valid = [], []
        for s in self.shards:  # one shard open at a time: its vectors are scanned, then let go
            r = self.set.read(s, MODALITY, wanted)
            metas.append(r.meta)
            valid.append(r.valid)
        self.rows = pd.concat(metas, ignore_index=True)
        self.rows["shard"] = pd.Categorical(self.rows["shard"].astype(str), categories=self.shards)
        self.rows["embedded"] = np.concatenate(valid) if valid else np.zeros(0, bool)
        self.vectors = ShardVectors(self.set, valid)
        self.row_of = np.flatnonzero(self.rows["embedded"].to_numpy())  # vector id -> row

    def __len__(self) -> int:
        return len(self.rows)
