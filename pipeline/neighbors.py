"""Near-duplicate search over unit vectors: faiss k-NN self-search (exact or IVF), SemDeDup clusters, pair
verification and union-find grouping. Pure functions over a `VectorSet`, so they run on arrays in tests and on
memory-mapped embed shards in the stage."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Protocol

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Candidates are taken this far below the threshold, then verified with their exact cosine: faiss sums in another
# order and SemDeDup compares float16 copies, so a pair at exactly the threshold must not be lost before verification.
SLACK = 2e-3
# No sampled duplicate pair to tune SemDeDup's spill on: compare each vector with its 3 nearest clusters.
DEFAULT_SPILL = 3


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


def spherical_kmeans(
    vs: VectorSet, n_clusters: int, seed: int = 0, niter: int = 10, points_per_centroid: int = 64
) -> np.ndarray:
    """faiss k-means on unit vectors (centroids renormalized each step), trained on a random sample."""
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(vs.n, size=min(vs.n, n_clusters * points_per_centroid), replace=False))
    km = faiss.Kmeans(
        vs.d,
        n_clusters,
        niter=niter,
        spherical=True,
        seed=seed,
        max_points_per_centroid=points_per_centroid,
        gpu=faiss.get_num_gpus() > 0,
    )
    km.train(vs.gather(sample))
    return np.asarray(km.centroids, np.float32)


def assign_clusters(vs: VectorSet, centroids: np.ndarray, nearest: int = 1, block: int = 65536) -> np.ndarray:
    """[n, nearest] ids of each vector's nearest centroids, nearest first."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    labels = np.empty((vs.n, min(nearest, len(centroids))), np.int32)
    for start, x in vs.blocks(block):
        labels[start : start + len(x)] = index.search(x, labels.shape[1])[1]
    return labels


def tune_spill(labels: np.ndarray, truth: Truth, target: float = 0.99) -> tuple[int, float | None]:
    """Smallest spill s for which the sample's true pairs meet in a cluster (one end's nearest cluster is among
    the other end's s nearest), read off the cluster assignment before any pair is computed."""
    if not len(truth.pairs):
        return min(DEFAULT_SPILL, labels.shape[1]), None
    a, b = labels[truth.pairs.a], labels[truth.pairs.b]
    for s in range(1, labels.shape[1] + 1):
        met = float(((a[:, :s] == b[:, [0]]).any(1) | (b[:, :s] == a[:, [0]]).any(1)).mean())
        if met >= target:
            break
    return s, met


def local_truth(
    vs: VectorSet,
    labels: np.ndarray,
    order: np.ndarray,
    bounds: np.ndarray,
    rows: RowFile,
    queries: np.ndarray,
    threshold: float,
) -> Truth:
    """The true pairs of many sample queries as far as they lie in each query's listed clusters: queries against
    those clusters' members only (queries x spill x cluster size work), so the spill can be tuned on tens of
    thousands of queries, enough to see whole groups split by a boundary (they fail together)."""
    qv = vs.gather(queries)
    clusters = labels[queries].ravel()
    asked = np.repeat(np.arange(len(queries)), labels.shape[1])
    by_c = np.argsort(clusters, kind="stable")
    cuts = np.searchsorted(clusters[by_c], np.arange(len(bounds)))
    parts = []
    for c in range(len(bounds) - 1):
        q = asked[by_c[cuts[c] : cuts[c + 1]]]
        if len(q) and bounds[c + 1] > bounds[c]:
            r, j = np.nonzero(
                qv[q] @ rows.read(np.arange(bounds[c], bounds[c + 1])).astype(np.float32).T >= threshold - SLACK
            )
            parts.append(Pairs.canonical(queries[q[r]], order[bounds[c] + j], np.zeros(len(r), np.float32)))
    return Truth(queries, verify_pairs(vs, Pairs.concat(parts), threshold))


def cluster_pairs(
    ids: np.ndarray, vecs: np.ndarray, threshold: float, members: int | None = None, max_cells: int = 1 << 25
) -> tuple[Pairs, np.ndarray]:
    """All pairs of one cluster at or above threshold, and each row's best similarity within the cluster.
    vecs are unit rows (any float dtype). The first `members` rows are the cluster's own; rows after them are
    guests (points of neighbouring clusters), compared with the members but not with each other. Blocked so a
    similarity block stays under max_cells floats. Self-contained: can run on a pool or Spark."""
    x = np.asarray(vecs, np.float32)
    m = len(x)
    members = m if members is None else members
    nn = np.full(m, -np.inf, np.float32)
    parts = []
    block = max(1, min(m, max_cells // max(m, 1)))
    for s in range(0, members, block):
        e = min(s + block, members)
        sims = x[s:e] @ x[s:].T  # rows s..e, columns s.. : each pair seen once
        rows = np.arange(e - s)
        sims[rows, rows] = -np.inf
        row_best = sims.max(axis=1)
        nn[s:e] = np.maximum(nn[s:e], row_best)
        nn[s:] = np.maximum(nn[s:], sims.max(axis=0))
        hit = np.flatnonzero(row_best >= threshold)  # few rows have a duplicate: search only those
        r, c = np.nonzero(sims[hit] >= threshold)
        parts.append(Pairs(ids[s + hit[r]].astype(np.int64), ids[s + c].astype(np.int64), sims[hit[r], c]))
    return Pairs.concat(parts), nn


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


# ---- the three self-search methods -----------------------------------------------------------------------


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


class RowFile:
    """float16 rows written by position and read back by position: an .npy file in workdir, memory-mapped only
    for the duration of one call, so its pages never add up in the process (or in memory when workdir is None)."""

    def __init__(self, n: int, d: int, workdir: str | None):
        self.path = None if workdir is None else f"{workdir}/rows-{id(self)}.npy"
        if self.path is None:
            self.rows = np.empty((n, d), np.float16)
        else:
            np.lib.format.open_memmap(self.path, "w+", np.float16, (n, d))  # creates the file, unmapped at once

    def _map(self, mode: Literal["r", "r+"]) -> np.ndarray:
        assert self.path is not None
        return np.load(self.path, mmap_mode=mode)  # type: ignore[no-any-return]

    def write(self, positions: np.ndarray, x: np.ndarray) -> None:
        rows = self.rows if self.path is None else self._map("r+")
        rows[positions] = x
        del rows

    def read(self, positions: np.ndarray) -> np.ndarray:
        rows = self.rows if self.path is None else self._map("r")
        return np.array(rows[positions])


def _by_cluster(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids sorted by label, where each label's run starts and ends)."""
    order = np.argsort(labels, kind="stable")
    return order, np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=k))])


def search_semdedup(
    vs: VectorSet,
    threshold: float,
    n_clusters: int = 0,
    workdir: str | None = None,
    target_recall: float = 0.99,
    max_spill: int = 8,
    tune_queries: int = 20000,
    seed: int = 0,
) -> SearchResult:
    """SemDeDup (Abbas et al., 2023): spherical k-means, then all pairs within each cluster. Each vector also visits
    its next spill-1 nearest clusters as a guest, so pairs split by a cluster boundary are still compared; spill is
    the smallest whose pairs meet target_recall on a sample (`local_truth`). On unclustered data plain SemDeDup
    (spill 1) found only ~75% of the pairs at 1M vectors (bench/bench_dedup.py). Vectors are first written to a
    float16 file in cluster order: memory holds one cluster (blocked) at a time, whatever the dataset size."""
    k = min(n_clusters or max(1, int(round(np.sqrt(vs.n)))), vs.n)
    labels = assign_clusters(vs, spherical_kmeans(vs, k, seed=seed), nearest=max_spill)
    order, bounds = _by_cluster(labels[:, 0], k)
    position = np.empty(vs.n, np.int64)
    position[order] = np.arange(vs.n)
    by_cluster = RowFile(vs.n, vs.d, workdir)
    for start, x in vs.blocks(65536):
        by_cluster.write(position[start : start + len(x)], x)
    queries = np.sort(np.random.default_rng(seed).choice(vs.n, size=min(vs.n, tune_queries), replace=False))
    truth = local_truth(vs, labels, order, bounds, by_cluster, queries, threshold)
    spill, met = tune_spill(labels, truth, target_recall)
    log.info("semdedup: %d clusters, spill %d (%s of %d sample pairs meet)", k, spill, met, len(truth.pairs))
    guests = [_by_cluster(labels[:, j], k) for j in range(1, spill)]
    del labels
    parts, nn = [], np.full(vs.n, -np.inf, np.float32)
    for c in range(k):
        s, e = bounds[c], bounds[c + 1]
        # guests are read from the cluster-ordered file too, in file order
        gpos = np.sort(np.concatenate([position[g[gb[c] : gb[c + 1]]] for g, gb in guests])) if guests else order[:0]
        if e - s == 0 or e - s + len(gpos) < 2:
            continue
        ids = np.concatenate([order[s:e], order[gpos]])
        pairs, cnn = cluster_pairs(ids, by_cluster.read(np.r_[s:e, gpos]), threshold - SLACK, members=int(e - s))
        np.maximum.at(nn, ids, cnn)
        parts.append(pairs)
    sizes = np.diff(bounds)
    params = {
        "clusters": k,
        "spill": spill,
        "tuning_recall": met,
        "tuning_pairs": len(truth.pairs),
        "largest_cluster": int(sizes.max()),
        "median_cluster": float(np.median(sizes)),
    }
    return SearchResult(verify_pairs(vs, Pairs.concat(parts), threshold), nn, "semdedup", params)
