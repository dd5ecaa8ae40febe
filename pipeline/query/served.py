"""One name served by `clipline serve`: an index folder's image and/or text Searcher, one sample id space over
both, clip back's search (with its `deduplicate`) and the metadata of sample ids.

Ids. clip back serves one metadata table for both indices of a name, so an id is a sample. clipline's image and
text indices number their own vectors (a sample whose image failed has a text vector only), so each served name
gets one sample id space: image ids as they are, and for a sample with a text vector only, the image index's size
plus its text id. A text-index result then carries the same id as the image-index result of the same sample, and
/metadata needs no modality.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.core.config import ModelConfig
from pipeline.core.errors import ConfigError
from pipeline.index.store import MODALITIES, read_info
from pipeline.models import ModelLoadError
from pipeline.query.search import Searcher

log = logging.getLogger(__name__)

DEDUP_THRESHOLD = 0.94  # clip back's: a result this close to a better-ranked one is dropped by `deduplicate`
DEDUP_BLOCK = 256  # result rows compared at once: bounds memory when many results are near-identical


class RequestError(Exception):
    """A request that cannot be answered as asked: `status` is the HTTP status, the message says why."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class ServedIndex:
    """One name of /indices-list: an index folder's image and/or text index, one sample id space over both, and the
    model that embeds text and image queries for them (loaded once, used by one request at a time)."""

    def __init__(self, name: str, folder: str, model: ModelConfig, require_model: bool = True):
        self.name, self.folder = name, folder
        self.searchers = {m: Searcher(folder, m, model=model) for m in MODALITIES if read_info(folder, m) is not None}
        if not self.searchers:
            raise ConfigError(f"serve: {name} ({folder}) holds no index (image.json or text.json of `clipline index`)")
        image, text = self.searchers.get("image"), self.searchers.get("text")
        self.offset = int(image.index.ntotal) if image is not None else 0
        self.text_samples = text_sample_ids(image, text, self.offset) if text is not None else None
        self.size = self.offset + (int(text.index.ntotal) if text is not None else 0)
        # Deduplication compares the vectors the index holds, as clip back does (search_and_reconstruct).
        self.no_reconstruct = {m: _reconstruct_refusal(s) for m, s in self.searchers.items()}
        self.model_error = self._load_model(require_model)
        self._model_lock = threading.Lock()  # tokenizers and some towers are not safe to call from two threads

    def _load_model(self, required: bool) -> str | None:
        first, *others = self.searchers.values()
        try:
            first.model  # noqa: B018  (loaded and its width checked before any request)
            for s in others:
                if not s.share_model(first):
                    s.model  # noqa: B018
        except (ConfigError, ModelLoadError) as e:
            if required:
                raise ConfigError(
                    f"serve: {self.name}: {e} (serve.require_model=false serves it for embedding_input queries only)"
                ) from e
            log.warning("serving %s for embedding_input queries only: %s", self.name, e)
            return str(e)
        return None

    def searcher(self, modality: str) -> Searcher:
        if modality not in self.searchers:
            raise RequestError(f"{self.name} has no {modality} index (it has: {', '.join(self.searchers)})")
        return self.searchers[modality]

    def embed(self, modality: str, text: str | None = None, image: Any = None) -> np.ndarray:
        """(1, d) query vector of a text or an RGB image, by the model of the index searched."""
        if self.model_error is not None:
            raise RequestError(
                f"text and image queries need the model of {self.name}, which is not loaded: {self.model_error}"
            )
        searcher = self.searcher(modality)
        with self._model_lock:
            return searcher.embed_text([text]) if text is not None else searcher.embed_images([image])

    def search(self, vector: np.ndarray, modality: str, k: int, deduplicate: bool) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids and similarities of the k nearest, best first; with `deduplicate`, without every result linked
        to a better-ranked one by cosine > 0.94 (through others, as connected components: clip back's rule)."""
        index = self.searcher(modality).index
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        x = np.ascontiguousarray(vector, np.float32).reshape(1, -1)
        if deduplicate:
            if self.no_reconstruct[modality]:
                raise RequestError(
                    f"deduplicate: the {modality} index of {self.name} cannot give back its vectors "
                    f"({self.no_reconstruct[modality]}); send deduplicate=false"
                )
            sims, ids, vectors = index.search_and_reconstruct(x, k)
        else:
            sims, ids = index.search(x, k)
        found = ids[0] >= 0  # padding when fewer than k are found: clip back stops at the first -1
        n = int(found.argmin()) if not found.all() else len(found)
        hits, scores = ids[0][:n].astype(np.int64), sims[0][:n]
        samples = hits if modality == "image" else self.text_samples[hits]  # type: ignore[index]
        if deduplicate:
            keep = ~near_duplicates(vectors[0][:n])
            samples, scores = samples[keep], scores[keep]
        return samples, scores

    def metadata(self, samples: np.ndarray, columns: Sequence[str]) -> list[dict[str, Any]]:
        """The id map's `columns` of each sample id (all within 0..size-1), in the order given."""
        out: list[dict[str, Any]] = [{} for _ in range(len(samples))]
        is_image = samples < self.offset
        for modality, where, rows in (
            ("image", np.nonzero(is_image)[0], samples[is_image]),
            ("text", np.nonzero(~is_image)[0], samples[~is_image] - self.offset),
        ):
            if len(where):
                table = self.searchers[modality].ids.take(pa.array(rows)).select(list(columns))
                for i, record in zip(where, table.to_pylist()):
                    out[i] = record
        return out


def text_sample_ids(image: Searcher | None, text: Searcher, offset: int) -> np.ndarray:
    """text id -> sample id: the image id of the same (shard, row) when the sample has one, else offset + text id."""
    out = offset + np.arange(text.index.ntotal, dtype=np.int64)
    if image is None:
        return out
    left = text.ids.select(["shard", "row", "id"]).rename_columns(["shard", "row", "text_id"])
    joined = left.join(image.ids.select(["shard", "row", "id"]), keys=["shard", "row"], join_type="left outer")
    text_ids = joined["text_id"].to_numpy()
    image_ids = pc.fill_null(joined["id"], -1).to_numpy()
    out[text_ids] = np.where(image_ids >= 0, image_ids, out[text_ids])
    return out


def _reconstruct_refusal(searcher: Searcher) -> str | None:
    try:
        searcher.index.search_and_reconstruct(np.zeros((1, searcher.index.d), np.float32), 1)
        return None
    except RuntimeError as e:  # faiss: this index type keeps no vectors it can give back
        return str(e).strip().splitlines()[-1][:200]


def near_duplicates(vectors: np.ndarray, threshold: float = DEDUP_THRESHOLD, block: int = DEDUP_BLOCK) -> np.ndarray:
    """Which rows (ranked best first) to drop: all but the first of each connected component of the graph whose
    edges join rows of cosine > threshold. Rows are compared `block` at a time, carrying the components found so
    far as edges, so memory stays O(block x n) whatever the number of near-identical results."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(vectors)
    x = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms == 0, 1, norms)  # clip back normalizes the reconstructed vectors, zero ones left as is
    first = np.arange(n)  # each row's component, named by its best-ranked member
    for start in range(0, n, block):
        linked = x[start : start + block] @ x.T > threshold
        linked &= first[start : start + block, None] != first[None, :]  # pairs already in one component add nothing
        i, j = np.nonzero(linked)
        if not len(i):
            continue
        a, b = np.concatenate([i + start, np.arange(n)]), np.concatenate([j, first])
        _, comp = connected_components(coo_matrix((np.ones(len(a), bool), (a, b)), shape=(n, n)), directed=False)
        best = np.full(comp.max() + 1, n)
        np.minimum.at(best, comp, np.arange(n))
        first = best[comp]
    return np.asarray(first != np.arange(n))
