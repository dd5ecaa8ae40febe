"""RunOutput: a read-only view of a chain or demo output root (or a bare embed folder, or a folder of embeddings
another tool wrote, read with `embeddings.*`), every stage's part optional; what `clipline report` and the notebooks
read a run's outputs through."""

from __future__ import annotations

import collections
import functools
import posixpath
from collections.abc import Iterable
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from pipeline.core.config import EmbeddingsConfig
from pipeline.core.fsio import read_json
from pipeline.download import layout as download_layout
from pipeline.embeddings.layout import committed_shards, read_manifest, read_stats
from pipeline.embeddings.read import EmbeddingSet
from pipeline.report import thumbnails
from pipeline.run.layout import embed_folder_layout, layout

NN_QUERIES = 2000
# Above this many vectors the nearest-neighbour histogram uses the image index instead of exact search.
EXACT_NN_MAX = 200_000


class RunOutput:
    """A chain or demo output root (or a bare embed folder) opened for reading; every stage's part may be missing."""

    def __init__(self, root: str, options: EmbeddingsConfig | None = None):
        self.root = str(root).rstrip("/")
        self.fs, _ = fsspec.core.url_to_fs(self.root)
        self.options = options or EmbeddingsConfig()
        self.foreign = self.options.input_format != "clipline"
        paths = layout(self.root)
        if self.foreign or (
            not self.exists(paths.embeddings) and self.exists(posixpath.join(self.root, "manifest.json"))
        ):
            paths = embed_folder_layout(self.root)  # an embeddings folder given directly
        self.paths = paths
        # Another tool's folder is opened (listed and checked) now, so a bad one is a config error before any work.
        self._foreign_set = EmbeddingSet(self.root, options=self.options) if self.foreign else None

    def exists(self, path: str) -> bool:
        return bool(path) and bool(self.fs.exists(fsspec.core.url_to_fs(path)[1]))

    def read_json(self, path: str) -> dict[str, Any] | None:
        return read_json(path) if path else None

    @functools.cached_property
    def run_info(self) -> dict[str, Any] | None:
        from pipeline.core.runinfo import read_record

        return read_record(self.root)

    @functools.cached_property
    def summary(self) -> dict[str, Any] | None:
        return self.read_json(posixpath.join(self.root, "summary.json"))

    @functools.cached_property
    def manifest(self) -> dict[str, Any] | None:
        if self.foreign:
            return None
        return read_manifest(self.paths.embeddings) if self.exists(self.paths.embeddings) else None

    @functools.cached_property
    def embeddings(self) -> EmbeddingSet | None:
        """The embeddings: clipline's when there is a manifest and committed shards; another tool's as configured."""
        if self.foreign:
            return self._foreign_set
        if not self.manifest or not committed_shards(self.paths.embeddings):
            return None
        return EmbeddingSet(self.paths.embeddings)

    @property
    def shards(self) -> list[str]:
        """Embed shards with data (committed)."""
        return self.embeddings.shards if self.embeddings else []

    @functools.cached_property
    def embed_stats(self) -> list[dict[str, Any]]:
        if not self.manifest:
            return []
        return [
            read_stats(self.paths.embeddings, s) for s in committed_shards(self.paths.embeddings, include_empty=True)
        ]

    @property
    def embedded(self) -> int:
        """Samples embedded (status ok), from the embed stats; for another tool's embeddings, the rows it wrote."""
        if self.foreign and self.embeddings is not None:
            return sum(self.embeddings.rows(s) for s in self.shards)
        return sum(int(s.get("status_counts", {}).get("ok", 0)) for s in self.embed_stats)

    @functools.cached_property
    def download_shards(self) -> dict[int, download_layout.DownloadShard]:
        """img2dataset's completed download shards."""
        return download_layout.completed_at(self.paths.shards) if self.paths.shards else {}

    @functools.cached_property
    def download_stats(self) -> dict[str, dict[str, Any]]:
        """img2dataset's NNNNN_stats.json of every completed download shard, by shard name."""
        return {s.name: download_layout.read_stats(self.fs, s) for s in self.download_shards.values()}

    def download_rows(self) -> pd.DataFrame | None:
        """status and error_message of every URL of the completed download shards."""
        if not self.download_shards:
            return None
        parts = []
        for s in self.download_shards.values():
            with self.fs.open(s.urls, "rb") as f:
                parts.append(pd.read_parquet(f, columns=["status", "error_message"]))
        return pd.concat(parts, ignore_index=True)

    def metadata(
        self,
        columns: Iterable[str] = ("key", "shard", "index", "status", "caption", "url", "clip_score", "caption_status"),
        shards: list[str] | None = None,
    ) -> pd.DataFrame | None:
        """The embed metadata of the given committed shards (default all), in shard order."""
        if self.embeddings is None:
            return None
        parts = [self.embeddings.metadata(s, list(columns)) for s in (self.shards if shards is None else shards)]
        return pd.concat(parts, ignore_index=True)

    def embedded_both(self, columns: list[str], shards: list[str] | None = None) -> pd.DataFrame | None:
        """`columns` of the rows with both an image and a caption embedding, by the format's own rule (clipline's
        status columns; other tools' folders keep none, so every row)."""
        if self.embeddings is None:
            return None
        emb = self.embeddings
        meta = self.metadata(list(dict.fromkeys([*columns, *emb.status_columns()])), shards)
        assert meta is not None
        return meta.loc[emb.embedded(meta, "image") & emb.embedded(meta, "text"), columns]

    def sample_shards(self, n: int) -> list[str]:
        """At most n committed shards spread evenly over all of them (what the report reads on big outputs)."""
        step = max(1, -(-len(self.shards) // max(n, 1)))
        return self.shards[::step]

    def image_vectors(self) -> tuple[np.ndarray, pd.DataFrame]:
        """Every embedded image vector (float32) with its metadata row; for notebooks on small outputs."""
        xs, rows = [], []
        for s in self.shards:
            assert self.embeddings is not None
            for c in self.embeddings.chunks(s, "image", ("key", "caption", "url")):
                xs.append(np.asarray(c.vectors, np.float32))
                kept = c.meta[["key", "caption", "url"]]
                rows.append(
                    kept.assign(shard=s, row=c.rows.astype(np.int32))[["shard", "row", "key", "caption", "url"]]
                )
        if not xs:
            return np.zeros((0, 0), np.float32), pd.DataFrame()
        return np.concatenate(xs), pd.concat(rows, ignore_index=True)

    def nn_exact(self) -> bool:
        """Exact search while it is cheap (or there is no index); the image index beyond that."""
        return self.embedded <= EXACT_NN_MAX or self.index_info("image") is None

    def nn_similarities(self, max_queries: int = NN_QUERIES, seed: int = 0) -> np.ndarray:
        """Sampled samples' cosine similarity to their nearest other sample (every sample when there are at most
        max_queries): exact search over all embedded images, or on big outputs the image index, its top hit taken
        to be the query itself."""
        from pipeline.index.quality import exact_search, sample_vectors

        emb = self.embeddings
        if emb is None:
            return np.zeros(0, np.float32)
        if not self.nn_exact():
            from pipeline.query.search import Searcher

            q = np.ascontiguousarray(sample_vectors(emb, "image", max_queries, seed))
            sims, _ = Searcher(self.paths.index, "image").index.search(q, 2)
            return sims[:, 1].astype(np.float32)  # type: ignore[no-any-return]
        rate = min(1.0, max_queries / max(self.embedded, 1))
        rng = np.random.default_rng(seed)
        ids, queries, offset = [], [], 0
        for block in emb.iter_kept("image"):
            pick = np.flatnonzero(rng.random(len(block)) < rate) if rate < 1 else np.arange(len(block))
            ids.append(pick + offset)
            queries.append(np.asarray(block[pick], np.float32))
            offset += len(block)
        if not queries or offset < 2:
            return np.zeros(0, np.float32)
        own, q = np.concatenate(ids), np.ascontiguousarray(np.concatenate(queries))
        sims, found = exact_search(emb.iter_kept("image"), q, 2)
        other = np.where(found[:, 0] == own, 1, 0)  # skip the query itself, whichever rank it landed at
        return sims[np.arange(len(q)), other].astype(np.float32)  # type: ignore[no-any-return]

    @functools.cached_property
    def dedup_summary(self) -> dict[str, Any] | None:
        return self.read_json(posixpath.join(self.paths.dedup, "summary.json"))

    def duplicates(self) -> pd.DataFrame | None:
        from pipeline.dedup.materialize import read_table

        path = posixpath.join(self.paths.dedup, "duplicates.parquet")
        if not self.exists(path):
            return None
        return read_table(self.paths.dedup, "duplicates")  # one file, or one per shard (distributed steps)

    def index_info(self, modality: str) -> dict[str, Any] | None:
        from pipeline.index.store import read_info

        return read_info(self.paths.index, modality) if self.exists(self.paths.index) else None

    def tar_of(self, shard: str) -> str | None:
        """The WebDataset tar an embed shard was read from (as its stats record it, else the chain's shards folder)."""
        recorded = next((s.get("input") for s in self.embed_stats if s.get("shard") == shard), None)
        for cand in (recorded, posixpath.join(self.paths.shards, f"{shard}.tar") if self.paths.shards else None):
            if isinstance(cand, str) and cand.endswith(".tar") and self.exists(cand):
                return cand
        return None

    def images(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """Image bytes of (shard, key) samples, each tar streamed once."""
        by_shard: dict[str, set[str]] = collections.defaultdict(set)
        for shard, key in pairs:
            by_shard[str(shard)].add(str(key))
        out: dict[tuple[str, str], bytes] = {}
        for shard, keys in by_shard.items():
            tar = self.tar_of(shard)
            if tar is not None:
                out.update({(shard, k): b for k, b in thumbnails.read_tar_images(tar, keys).items()})
        return out

    def thumbnails(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str | None]:
        return {p: thumbnails.thumbnail_uri(b) for p, b in self.images(pairs).items()}
