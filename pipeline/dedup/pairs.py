"""Step 4 of the distributed dedup: within-cluster pairs at or above the threshold. `plan_pairs` (pure) turns cluster
sizes into tasks: consecutive clusters together up to `dedup.max_cluster_rows` rows, and a cluster above it split
into blocks of max_cluster_rows/2 rows compared tile by tile (block i x block j, i <= j), so no task holds more than
max_cluster_rows rows: memory ~ max_cluster_rows x dim x 6 bytes (float16 as read, float32 as compared) plus one
similarity block of MAX_CELLS floats. Each task writes, per row it saw, the merged decision records (`records.merge`)
partitioned by the row's shard."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from pipeline.core.config import Config
from pipeline.dedup import records as rc
from pipeline.dedup import shuffle
from pipeline.dedup.neighbors import Pairs, normalize_rows
from pipeline.dedup.semdedup import cluster_pairs
from pipeline.dedup.work import data_path, step_files, truth_pairs_file

MAX_CELLS = 1 << 25  # floats in one similarity block: 128 MiB


def plan_pairs(members: np.ndarray, guests: np.ndarray, cap: int) -> list[tuple[int, int, int, int, int, int]]:
    """Tasks as (first cluster, end cluster, block rows, block i, block j, members): ranges have block 0; a cluster
    over `cap` rows gets one task per tile (i <= j, block i holding some of the cluster's own rows, since guests
    are compared with its own rows only)."""
    tasks: list[tuple[int, int, int, int, int, int]] = []
    start, held = 0, 0
    for c in range(len(members)):
        m, rows = int(members[c]), int(members[c] + guests[c])
        if rows <= cap:
            if held + rows > cap:
                tasks.append((start, c, 0, 0, 0, 0))
                start, held = c, 0
            held += rows
            continue
        if held:
            tasks.append((start, c, 0, 0, 0, 0))
        start, held = c + 1, 0
        block = max(1, cap // 2)
        blocks = math.ceil(rows / block)
        for i in range(math.ceil(m / block)):
            for j in range(i, blocks):
                tasks.append((c, c + 1, block, i, j, m))
    if held:
        tasks.append((start, len(members), 0, 0, 0, 0))
    return tasks


class Found:
    """Pairs and similarities of one task, turned into decision records at the end."""

    def __init__(self) -> None:
        self.recs: list[np.ndarray] = []
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []

    def add(self, rows: np.ndarray, a: np.ndarray, b: np.ndarray, sim: np.ndarray, nn: np.ndarray) -> None:
        """rows: bucket records; (a, b, sim) pairs of positions in them; nn: each row's best similarity seen."""
        kd = rows.dtype["key"]
        first = rc.better(
            rows["inel"][a], rows["pol"][a], rows["gid"][a], rows["inel"][b], rows["pol"][b], rows["gid"][b]
        )
        best, worse = np.where(first, a, b), np.where(first, b, a)
        d = rc.blank_decisions(len(rows) + 2 * len(a), kd)
        n = len(rows)
        d["gid"][:n], d["nn"][:n] = rows["gid"], nn
        w = slice(n, n + len(a))
        d["gid"][w], d["near"][w], d["near_sim"][w] = rows["gid"][worse], rows["gid"][best], sim
        d["near_inel"][w], d["near_pol"][w], d["near_key"][w] = rows["inel"][best], rows["pol"][best], rows["key"][best]
        k = slice(n + len(a), None)
        d["gid"][k], d["flags"][k] = rows["gid"][best], rc.NEAR_KEEPER
        self.recs.append(rc.merge(d))
        self.pairs.append((rows["gid"][a], rows["gid"][b]))

    def write(self, url: str, n_shards: int) -> np.ndarray:
        recs = rc.merge(np.concatenate(self.recs)) if self.recs else rc.blank_decisions(0, np.dtype("S1"))
        shuffle.write(url, recs, rc.shard_of(recs["gid"]), n_shards)
        return recs

    def found_truth(self, truth: np.ndarray) -> list[int]:
        """Indices of the truth pairs (a < b) this task found."""
        if not len(truth) or not self.pairs:
            return []
        a = np.concatenate([p[0] for p in self.pairs])
        b = np.concatenate([p[1] for p in self.pairs])
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        near = np.isin(lo, truth["a"])
        seen = set(zip(lo[near].tolist(), hi[near].tolist()))
        return [i for i, (x, y) in enumerate(zip(truth["a"].tolist(), truth["b"].tolist())) if (x, y) in seen]


def _unit(rows: np.ndarray) -> np.ndarray:
    return normalize_rows(rows["vec"].astype(np.float32))


def _cluster(found: Found, rows: np.ndarray, members: int, threshold: float) -> None:
    if members == 0 or len(rows) < 2:
        return
    got, nn = cluster_pairs(np.arange(len(rows)), _unit(rows), threshold, members=members, max_cells=MAX_CELLS)
    got = Pairs.canonical(got.a, got.b, got.sim)  # a block sees each pair among its own rows twice
    found.add(rows, got.a, got.b, got.sim, nn)


def _tile(found: Found, a: np.ndarray, a_members: int, b: np.ndarray, threshold: float) -> None:
    """Pairs between block a's own rows and every row of block b (a later block of the same cluster)."""
    xa, xb = _unit(a), _unit(b)
    nn_a, nn_b = np.full(len(a), -np.inf, np.float32), np.full(len(b), -np.inf, np.float32)
    step = max(1, MAX_CELLS // max(1, len(b)))
    ia, ib, sims = [], [], []
    for s in range(0, a_members, step):
        e = min(s + step, a_members)
        m = xa[s:e] @ xb.T
        nn_a[s:e] = np.maximum(nn_a[s:e], m.max(axis=1, initial=-np.inf))
        nn_b = np.maximum(nn_b, m.max(axis=0, initial=-np.inf))
        r, c = np.nonzero(m >= threshold)
        ia.append(s + r)
        ib.append(len(a) + c)
        sims.append(m[r, c])
    rows = np.concatenate([a, b])
    cat = lambda xs, t: np.concatenate(xs).astype(t) if xs else np.zeros(0, t)  # noqa: E731
    found.add(rows, cat(ia, np.int64), cat(ib, np.int64), cat(sims, np.float32), np.concatenate([nn_a, nn_b]))


def pairs(task: Any, cfg: Config) -> dict[str, Any]:
    """A range of clusters, or one tile of a cluster too big for one task."""
    p = task.params
    files = step_files(p, "assign", p.n_groups)
    found = Found()
    thr = cfg.dedup.threshold
    rows_held = 0
    if task.block == 0:
        recs, parts = files.read(2 * task.lo, 2 * task.hi)
        order = np.argsort(parts, kind="stable")
        recs, parts = recs[order], parts[order]
        cuts = np.searchsorted(parts, np.arange(2 * task.lo, 2 * task.hi + 1))
        for i in range(task.hi - task.lo):
            s, m, e = cuts[2 * i], cuts[2 * i + 1], cuts[2 * i + 2]
            _cluster(found, recs[s:e], int(m - s), thr)
        rows_held = len(recs)
    else:
        c, size = task.lo, task.block
        a = files.read_slice([2 * c, 2 * c + 1], task.bi * size, (task.bi + 1) * size)
        a_members = int(min(len(a), max(0, task.members - task.bi * size)))
        if task.bi == task.bj:
            _cluster(found, a, a_members, thr)
            rows_held = len(a)
        else:
            b = files.read_slice([2 * c, 2 * c + 1], task.bj * size, (task.bj + 1) * size)
            _tile(found, a, a_members, b, thr)
            rows_held = len(a) + len(b)
    recs = found.write(data_path(p.work, "pairs", task.index), p.n_shards)
    truth, _ = shuffle.read_all(truth_pairs_file(p))
    return {
        "rows": rows_held,
        "near_pairs": int(sum(len(x[0]) for x in found.pairs)),
        "records": len(recs),
        "truth_found": found.found_truth(truth),
    }
