"""SemDeDup (Abbas et al., 2023) as dedup's search for datasets too big for exact k-NN: spherical k-means, then all
pairs within each cluster, each vector also visiting its next nearest clusters (the spill, tuned on a sample), with
the vectors streamed from a cluster-ordered float16 file so memory holds one cluster at a time."""

from __future__ import annotations

import logging
from typing import Literal

import faiss
import numpy as np

from pipeline.dedup.neighbors import SLACK, Pairs, SearchResult, Truth, VectorSet, verify_pairs

log = logging.getLogger(__name__)

# No sampled duplicate pair to tune SemDeDup's spill on: compare each vector with its 3 nearest clusters.
DEFAULT_SPILL = 3


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
