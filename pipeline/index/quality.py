"""How well an index finds the vectors it holds: recall@k against exact search (vectors streamed shard by shard),
cross-modal recall, and one-query latency."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

import faiss
import numpy as np

from pipeline.embeddings.read import EmbeddingSet

log = logging.getLogger(__name__)

# Enough results for recall@100 after dropping the query itself from both lists.
MAX_K = 100
LATENCY_K = 10


def sample_vectors(
    emb: EmbeddingSet, modality: str, n: int, seed: int = 1, shards: list[str] | None = None
) -> np.ndarray:
    """About n random valid vectors, taken evenly across shards (queries for the cross-modal check)."""
    shards = emb.shards if shards is None else shards
    rng = np.random.default_rng(seed)
    quota = -(-n // max(len(shards), 1))
    out: list[np.ndarray] = []
    for sid in rng.permutation(shards):
        rows = emb.read(str(sid), modality, ()).rows
        take = rng.choice(len(rows), size=min(quota, len(rows), n - sum(map(len, out))), replace=False)
        out.append(emb.take(str(sid), rows[np.sort(take)], modality))
        if sum(map(len, out)) >= n:
            break
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# ---- measuring -------------------------------------------------------------------------------------------


def exact_search(blocks: Iterable[np.ndarray], queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product over vectors streamed in id order (one block in memory at a time)."""
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    offset = 0
    for block in blocks:
        if len(block) == 0:
            continue
        flat = faiss.IndexFlatIP(block.shape[1])
        flat.add(np.ascontiguousarray(block, dtype=np.float32))
        d, i = flat.search(queries, min(k, len(block)))
        heap.add_result(d, np.where(i >= 0, i + offset, -1))
        offset += len(block)
    heap.finalize()
    return heap.D, heap.I


def gather(blocks: Iterable[np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Rows `ids` (sorted, global ids in stream order) out of vectors streamed block by block."""
    out: list[np.ndarray] = []
    offset = 0
    for block in blocks:
        end = offset + len(block)
        lo, hi = np.searchsorted(ids, [offset, end])
        if hi > lo:
            out.append(np.asarray(block[ids[lo:hi] - offset], dtype=np.float32))
        offset = end
    if sum(len(o) for o in out) != len(ids):
        raise ValueError(f"asked for {len(ids)} query vectors, the embeddings hold only {offset} rows")
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def recall_at(truth: np.ndarray, found: np.ndarray, k: int, exclude: np.ndarray | None = None) -> float:
    """Mean |top-k found ∩ top-k true| / k; `exclude[i]` (the query's own id) is dropped from both lists first."""
    scores = []
    for i in range(len(truth)):
        t, f = truth[i], found[i]
        t, f = t[t >= 0], f[f >= 0]
        if exclude is not None:
            t, f = t[t != exclude[i]], f[f != exclude[i]]
        t = t[:k]
        if len(t) == 0:
            continue
        scores.append(len(np.intersect1d(t, f[:k])) / len(t))
    return float(np.mean(scores)) if scores else float("nan")


def search_latency(index: faiss.Index, queries: np.ndarray, k: int = LATENCY_K) -> tuple[float, float]:
    """(average, p99) milliseconds of one-query searches, the way a service sends them."""
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.mean(times)), float(np.percentile(times, 99))


def measure(
    index: faiss.Index,
    blocks: Callable[[], Iterable[np.ndarray]],
    n_queries: int,
    cross_queries: np.ndarray | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@10/@100 of `index` against exact search, the cross-modal recall@10, and latency.

    `blocks()` streams the indexed vectors in id order (called twice: to pick queries, then for the truth).
    Queries are indexed vectors sampled at random; each one's own id is left out of both result lists, so a
    query finding itself does not count. `cross_queries` (the other modality's embeddings) are not in the
    index and are compared as they are.
    """
    ntotal = int(index.ntotal)
    out: dict[str, Any] = {
        "queries": 0,
        "recall@10": None,
        "recall@100": None,
        "cross_modal_recall@10": None,
        "avg_latency_ms": None,
        "p99_latency_ms": None,
        "latency_k": LATENCY_K,
    }
    if ntotal < 2:
        return out
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(ntotal, size=min(n_queries, ntotal), replace=False)).astype(np.int64)
    queries = gather(blocks(), qids)
    n_self = len(queries)
    if cross_queries is not None and len(cross_queries):
        queries = np.concatenate([queries, np.asarray(cross_queries, dtype=np.float32)])
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(MAX_K + 1, ntotal)
    t0 = time.perf_counter()
    _, truth = exact_search(blocks(), queries, k)
    t1 = time.perf_counter()
    _, found = index.search(queries, k)
    log.info(
        "quality: exact search %.1fs, approximate %.1fs for %d queries", t1 - t0, time.perf_counter() - t1, len(queries)
    )
    own = qids
    out["queries"] = n_self
    out["recall@10"] = round(recall_at(truth[:n_self], found[:n_self], 10, own), 4)
    out["recall@100"] = round(recall_at(truth[:n_self], found[:n_self], 100, own), 4)
    if len(queries) > n_self:
        out["cross_modal_recall@10"] = round(recall_at(truth[n_self:], found[n_self:], 10), 4)
        out["cross_modal_queries"] = len(queries) - n_self
    avg, p99 = search_latency(index, queries[:n_self])
    out["avg_latency_ms"], out["p99_latency_ms"] = round(avg, 3), round(p99, 3)
    return out
