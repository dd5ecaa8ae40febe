"""Near-duplicate search over unit vectors: faiss k-NN self-search (exact or IVF), pair verification, recall
estimates and union-find grouping; SemDeDup, the third search, is in `semdedup.py`. Pure functions over a
`VectorSet`, so they run on arrays in tests and on memory-mapped embed shards in the stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Candidates are taken this far below the threshold, then verified with their exact cosine: faiss sums in another
# order and SemDeDup compares float16 copies, so a pair at exactly the threshold must not be lost before verification.
SLACK = 2e-3


class VectorSet(Protocol):
    """Row-addressable unit vectors (ids 0..n-1): streamed in blocks, or gathered by id."""

    n: int
    d: int

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, float32 [m, d] L2-normalized rows), in id order."""
        ...

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 [len(ids), d] L2-normalized rows, in the order of ids."""
        ...


def normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


class ArrayVectors:
    """A VectorSet over an in-memory array (tests, small reference sets)."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.n, self.d = x.shape

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for s in range(0, self.n, rows):
            yield s, normalize_rows(self.x[s : s + rows])

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return normalize_rows(self.x[np.asarray(ids, dtype=np.int64)])


@dataclass
class Pairs:
    """Unordered pairs of ids (a < b) with their cosine similarity."""

    a: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    b: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sim: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.a)

    @staticmethod
    def canonical(a: np.ndarray, b: np.ndarray, sim: np.ndarray) -> Pairs:
        """Order each pair, drop self pairs and repeats (keeping the first similarity seen)."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        lo, hi, sim = np.minimum(a, b), np.maximum(a, b), np.asarray(sim, np.float32)
        keep = lo != hi
        lo, hi, sim = lo[keep], hi[keep], sim[keep]
        _, first = np.unique(np.stack([lo, hi], axis=1), axis=0, return_index=True) if len(lo) else (None, [])
        first = np.sort(np.asarray(first, np.int64))
        return Pairs(lo[first], hi[first], sim[first])

    @staticmethod
    def concat(parts: list[Pairs]) -> Pairs:
        if not parts:
            return Pairs()
        return Pairs.canonical(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("a", "b", "sim")))

    def keys(self, n: int) -> np.ndarray:
        return self.a * np.int64(n) + self.b


@dataclass
class SearchResult:
    """Verified pairs of one near-duplicate search, each vector's nearest-neighbour similarity, and how it ran."""

    pairs: Pairs
    nn_sim: np.ndarray  # float32 [n]; -inf where no neighbour was seen
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Truth:
    """The true pairs of sample queries: every pair (query, any vector) at or above the threshold (sample_truth),
    or every such pair within the queries' nearest clusters (local_truth)."""

    queries: np.ndarray
    pairs: Pairs


def to_gpu(index: faiss.Index) -> faiss.Index:
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus"):
        return faiss.index_cpu_to_all_gpus(index)
    return index


class FlatArray:
    """Exact inner-product search over one preallocated float32 array (faiss.knn: the IndexFlatIP computation, BLAS
    blocks). Adding block by block to an IndexFlatIP grows its storage by doubling, up to twice n*d*4 bytes."""

    def __init__(self, xb: np.ndarray):
        self.xb = xb
        self.ntotal = len(xb)

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(x, self.xb, k, metric=faiss.METRIC_INNER_PRODUCT)  # type: ignore[no-any-return]


Searchable = Any  # a faiss index or a FlatArray: anything with search(x, k) and ntotal


def build_flat(vs: VectorSet, block: int = 65536) -> Searchable:
    """Exact search structure: a flat index on the GPUs when there are any, else a FlatArray."""
    if faiss.get_num_gpus() > 0:
        index = to_gpu(faiss.IndexFlatIP(vs.d))
        for _, x in vs.blocks(block):
            index.add(x)
        return index
    xb = np.empty((vs.n, vs.d), np.float32)
    for start, x in vs.blocks(block):
        xb[start : start + len(x)] = x
    return FlatArray(xb)


def ivf_nlist(n: int) -> int:
    """~4 sqrt(n) lists, but at least 39 training points per list (faiss's own lower bound)."""
    return max(1, min(int(4 * np.sqrt(n)), n // 39))


def build_ivf(vs: VectorSet, nlist: int, seed: int = 0, block: int = 65536) -> faiss.Index:
    """IVF with inner product and float16 codes: embeddings are stored as float16, so the codes lose nothing, take
    half the memory of IVF-Flat and scan faster (inverted lists also grow by doubling: plan for up to 2x)."""
    index = faiss.index_factory(vs.d, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.train(vs.gather(np.sort(rng.choice(vs.n, size=min(vs.n, 40 * nlist), replace=False))))
    for _, x in vs.blocks(block):
        index.add(x)
    return to_gpu(index)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "GpuParameterSpace"):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        faiss.extract_index_ivf(index).nprobe = nprobe


def knn_hits(index: Searchable, x: np.ndarray, k: int, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, neighbour id, similarity) of the k nearest neighbours at or above floor."""
    sims, ids = index.search(x, min(k, index.ntotal))
    rows = np.repeat(np.arange(len(x)), ids.shape[1])
    ok = (ids.reshape(-1) >= 0) & (sims.reshape(-1) >= floor)
    return rows[ok], ids.reshape(-1)[ok], sims.reshape(-1)[ok]


def self_search(
    index: Searchable, vs: VectorSet, k: int, threshold: float, block: int = 16384
) -> tuple[Pairs, np.ndarray]:
    """Candidate pairs (unverified) of every vector with its k nearest neighbours, and nearest-neighbour similarity."""
    parts, nn = [], np.full(vs.n, -np.inf, np.float32)
    for start, x in vs.blocks(block):
        sims, ids = index.search(x, min(k + 1, index.ntotal))
        q = start + np.arange(len(x))[:, None]
        other = (ids >= 0) & (ids != q)
        nn[start : start + len(x)] = np.where(other, sims, -np.inf).max(axis=1)
        hit = other & (sims >= threshold - SLACK)
        parts.append(Pairs.canonical(np.broadcast_to(q, ids.shape)[hit], ids[hit], sims[hit]))
    return Pairs.concat(parts), nn


def verify(
    va: VectorSet, a: np.ndarray, vb: VectorSet, b: np.ndarray, threshold: float, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine of each (a[i], b[i]) from the stored vectors; returns (mask sim >= threshold, sim)."""
    sim = np.empty(len(a), np.float32)
    for s in range(0, len(a), chunk):
        xa, xb = va.gather(a[s : s + chunk]), vb.gather(b[s : s + chunk])
        empty = ~(xa.any(axis=1) & xb.any(axis=1))  # a zero vector (failed sample) matches nothing
        sim[s : s + chunk] = np.where(empty, np.nan, np.einsum("ij,ij->i", xa, xb))
    return sim >= threshold, sim


def verify_pairs(vs: VectorSet, pairs: Pairs, threshold: float) -> Pairs:
    """Keep pairs whose exact cosine reaches the threshold, so the reported pairs have precision 1 by construction."""
    ok, sim = verify(vs, pairs.a, vs, pairs.b, threshold)
    return Pairs(pairs.a[ok], pairs.b[ok], sim[ok])


def sample_truth(vs: VectorSet, threshold: float, sample: int = 1000, seed: int = 0, block: int = 8192) -> Truth:
    """Brute force for `sample` random queries over the whole stream: the yardstick for tuning and recall."""
    queries = np.sort(np.random.default_rng(seed).choice(vs.n, size=min(vs.n, sample), replace=False))
    q = vs.gather(queries)
    parts = []
    for start, x in vs.blocks(block):
        r, c = np.nonzero(q @ x.T >= threshold - SLACK)
        parts.append(Pairs(queries[r].astype(np.int64), (start + c).astype(np.int64), np.zeros(len(r), np.float32)))
    return Truth(queries, verify_pairs(vs, Pairs.concat(parts), threshold))


def pair_recall(found: Pairs, truth: Pairs, n: int) -> float | None:
    return float(np.isin(truth.keys(n), found.keys(n)).mean()) if len(truth) else None


def recall_report(found: Pairs, truth: Truth, n: int) -> dict[str, Any]:
    """Pair recall on the sample, and group recall (both ends of a true pair land in one group, possibly through
    other members), which is what deduplication needs."""
    labels = connected_components(n, found.a, found.b)
    grouped = float((labels[truth.pairs.a] == labels[truth.pairs.b]).mean()) if len(truth.pairs) else None
    return {
        "recall_estimate": pair_recall(found, truth.pairs, n),
        "group_recall_estimate": grouped,
        "recall_sample_queries": len(truth.queries),
        "recall_sample_pairs": len(truth.pairs),
    }


def cap_per_query(truth: Pairs, queries: np.ndarray, k: int) -> Pairs:
    """The best a k-NN search can return: each query's k-1 most similar true neighbours."""
    qset = set(queries.tolist())
    q = np.where(np.isin(truth.a, list(qset)), truth.a, truth.b)
    order = np.lexsort((-truth.sim, q))
    q_sorted = q[order]
    first = np.searchsorted(q_sorted, q_sorted, side="left")
    keep = order[np.arange(len(order)) - first < k - 1]
    return Pairs(truth.a[keep], truth.b[keep], truth.sim[keep])


def tune_nprobe(
    index: faiss.Index,
    nlist: int,
    vs: VectorSet,
    truth: Truth,
    k: int,
    threshold: float,
    target: float = 0.99,
    start: int = 8,
) -> tuple[int, float | None]:
    """Smallest nprobe (doubling from start) whose k-NN recall on the sample queries reaches target."""
    capped = cap_per_query(truth.pairs, truth.queries, k)
    x = vs.gather(truth.queries)
    nprobe = min(start, nlist)
    while True:
        set_nprobe(index, nprobe)
        r, j, s = knn_hits(index, x, k + 1, threshold - SLACK)
        found = verify_pairs(vs, Pairs.canonical(truth.queries[r], j, s), threshold)
        recall = pair_recall(found, capped, vs.n)
        if recall is None or recall >= target or nprobe >= nlist:
            return nprobe, recall
        nprobe = min(2 * nprobe, nlist)


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Union-find over edges, vectorized: hook each root onto the smaller root, then jump pointers until flat.
    Every id is labelled with the smallest id of its component."""
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        np.minimum.at(parent, np.maximum(ra, rb)[differ], np.minimum(ra, rb)[differ])
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


# ---- exact and IVF self-search -----------------------------------------------------------------------------


def search_exact(vs: VectorSet, threshold: float, k: int) -> SearchResult:
    """Flat inner-product search over everything (IndexFlatIP's computation), queried in blocks of 16k vectors so
    only the vectors and one block of results are in memory: every k-NN list is exact."""
    pairs, nn = self_search(build_flat(vs), vs, k, threshold)
    return SearchResult(verify_pairs(vs, pairs, threshold), nn, "exact", {"k": k})


def search_ivf(
    vs: VectorSet, threshold: float, k: int, truth: Truth, target_recall: float = 0.99, seed: int = 0
) -> SearchResult:
    """IVF index; nprobe is raised until k-NN recall on the truth sample reaches target_recall, then every vector
    is searched with it."""
    nlist = ivf_nlist(vs.n)
    index = build_ivf(vs, nlist, seed=seed)
    nprobe, tuned = tune_nprobe(index, nlist, vs, truth, k, threshold, target_recall)
    log.info("ivf: nlist=%d nprobe=%d (sample k-NN recall %s)", nlist, nprobe, tuned)
    set_nprobe(index, nprobe)
    pairs, nn = self_search(index, vs, k, threshold)
    params = {"k": k, "nlist": nlist, "nprobe": nprobe, "tuning_recall": tuned}
    return SearchResult(verify_pairs(vs, pairs, threshold), nn, "ivf", params)
