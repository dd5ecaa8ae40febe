"""The per-task functions of the distributed dedup, run alike by the local pool and Spark: the task type, the work
folder's names and commit markers (each task writes its one shuffle file, then its marker, last), the dispatcher
the distributors call, and the map-side steps over groups of embed shards: scan (exact-duplicate map and the
deterministic samples), exact (the reduce of identical image bytes), truth (sampled exact queries) and assign
(rows bucketed by cluster). Pairs are in `pairs.py`, decisions and outputs in `decide.py`."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.core.config import Config
from pipeline.core.fsio import put_json
from pipeline.dedup import decide, pairs, shuffle
from pipeline.dedup import records as rc
from pipeline.dedup.work import Params, StepTask, data_path, driver_file, marker_path, shard_rows, step_files
from pipeline.distribute.base import WorkerContext

WORKER = "pipeline.dedup.steps:run_task"


def run_task(task: StepTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """The one worker of every step: runs the step's function, then writes its marker (last)."""
    import faiss

    faiss.omp_set_num_threads(max(1, ctx.threads))

    fn = {
        "scan": scan,
        "exact": exact,
        "truth": truth,
        "assign": assign,
        "pairs": pairs.pairs,
        "decide": decide.decide,
        "materialize": decide.materialize,
    }[task.step]
    stats = fn(task, cfg)
    put_json(marker_path(task.params.work, task.step, task.index), stats)
    return stats


def _concat(parts: list[np.ndarray], dtype: np.dtype[Any]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype)
    wide = shuffle.widest([p.dtype for p in parts])
    return np.concatenate([shuffle.cast(p, wide) for p in parts])


# ---- step 1 and 2: scan (exact map and samples) ----------------------------------------------------------------


def scan(task: StepTask, cfg: Config) -> dict[str, Any]:
    """Per shard group: valid rows with a sha256 hash-partitioned for the exact step; the k-means sample and the
    query samples (rows whose id hashes under a rate: deterministic, bounded in total, no coordination)."""
    p = task.params
    ex_parts, ex_ids, samples, sample_ids = [], [], [], []
    rows = valid = 0
    for _, sr in shard_rows(task, cfg):
        rows, valid = rows + len(sr.meta), valid + len(sr.rows)
        kd = rc.key_dtype(sr.key)
        if cfg.dedup.exact:
            has, h = sr.sha_hash()
            e = np.zeros(int(has.sum()), rc.exact_dtype(kd))
            e["h0"], e["h1"] = h[:, 0], h[:, 1]
            e["gid"], e["inel"], e["pol"], e["key"] = sr.gid[has], sr.inel[has], sr.pol[has], sr.key[has]
            ex_parts.append(e)
            ex_ids.append((h[:, 0] % np.uint64(p.exact_parts)).astype(np.int64))
        u0, u1 = rc.unit_hash(sr.gid, 0), rc.unit_hash(sr.gid, 1)
        which = [u0 < p.kmeans_rate, u1 < p.tune_rate, (u1 >= p.tune_rate) & (u1 < p.tune_rate + p.recall_rate)]
        picked = np.concatenate([np.flatnonzero(w) for w in which])
        if len(picked):
            x = sr.vectors()[picked]
            s = np.zeros(len(picked), rc.sample_dtype(p.dim))
            s["gid"], s["inel"], s["pol"], s["vec"] = sr.gid[picked], sr.inel[picked], sr.pol[picked], x
            samples.append(s)
            sample_ids.append(np.repeat([0, 1, 2], [int(w.sum()) for w in which]))
    if cfg.dedup.exact:
        recs = _concat(ex_parts, rc.exact_dtype(np.dtype("S1")))
        shuffle.write(data_path(p.work, "scan", task.index), recs, _ids(ex_ids), p.exact_parts)
    sample = _concat(samples, rc.sample_dtype(p.dim))
    shuffle.write(data_path(p.work, "sample", task.index), sample, _ids(sample_ids), 3)
    return {"rows": rows, "valid": valid, "sampled": len(sample)}


def _ids(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def exact(task: StepTask, cfg: Config) -> dict[str, Any]:
    """Exact-duplicate partitions [lo, hi): rows of equal sha256 grouped; all but the best-ranked get its id."""
    p = task.params
    recs, _ = step_files(p, "scan", p.n_groups).read(task.lo, task.hi)
    if not len(recs):
        recs = np.zeros(0, rc.exact_dtype(np.dtype("S1")))
    r = recs[np.lexsort((recs["gid"], recs["pol"], recs["inel"], recs["h1"], recs["h0"]))]
    head = np.r_[True, (r["h0"][1:] != r["h0"][:-1]) | (r["h1"][1:] != r["h1"][:-1])] if len(r) else np.zeros(0, bool)
    head_of = np.flatnonzero(head)[np.cumsum(head) - 1]
    dup = ~head
    heads = np.unique(head_of[dup])
    out = rc.blank_decisions(int(dup.sum()) + len(heads), r.dtype["key"])
    n = int(dup.sum())
    out["gid"][:n], out["exact"][:n], out["exact_key"][:n] = (
        r["gid"][dup],
        r["gid"][head_of[dup]],
        r["key"][head_of[dup]],
    )
    out["gid"][n:], out["flags"][n:] = r["gid"][heads], rc.EXACT_KEEPER
    out = rc.merge(out)
    shuffle.write(data_path(p.work, "exact", task.index), out, rc.shard_of(out["gid"]), p.n_shards)
    return {"exact_dropped": n, "exact_groups": len(heads)}


# ---- step 3: assignment, and the sampled exact queries ----------------------------------------------------------


def centroids(p: Params) -> np.ndarray:
    recs, _ = shuffle.read_all(driver_file(p, "centroids.bin"))
    return np.ascontiguousarray(recs["vec"], np.float32)


def nearest(cent: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(cent.shape[1])
    index.add(cent)
    return np.asarray(index.search(np.ascontiguousarray(x), min(n, len(cent)))[1], np.int64)


def truth(task: StepTask, cfg: Config, block: int = 8192) -> dict[str, Any]:
    """The sample queries brute-forced against every valid row of the shard group (exact float32 cosine), with each
    hit's nearest clusters: the yardstick for the spill and for recall."""
    p = task.params
    q, _ = shuffle.read_all(driver_file(p, "queries.bin"))
    cent = centroids(p)
    out = []
    for _, sr in shard_rows(task, cfg):
        x = sr.vectors()
        for s in range(0, len(x), block):
            r, c = np.nonzero(q["vec"] @ x[s : s + block].T >= cfg.dedup.threshold)
            c = c + s
            keep = q["gid"][r] != sr.gid[c]
            r, c = r[keep], c[keep]
            t = np.zeros(len(r), rc.truth_dtype(p.max_spill))
            t["q"], t["gid"], t["inel"], t["pol"] = q["gid"][r], sr.gid[c], sr.inel[c], sr.pol[c]
            t["sim"] = np.einsum("ij,ij->i", q["vec"][r], x[c])
            if len(c):
                lab = nearest(cent, x[c], p.max_spill)
                t["labels"][:, : lab.shape[1]] = lab
                t["labels"][:, lab.shape[1] :] = -1
            out.append(t)
    recs = np.concatenate(out) if out else np.zeros(0, rc.truth_dtype(p.max_spill))
    shuffle.write(data_path(p.work, "truth", task.index), recs, np.zeros(len(recs), np.int64), 1)
    return {"truth_pairs": len(recs)}


def assign(task: StepTask, cfg: Config) -> dict[str, Any]:
    """Each valid row to its nearest cluster (partition 2c) and as a guest to its next spill-1 (2c+1), float16."""
    p = task.params
    cent = centroids(p)
    parts, ids = [], []
    for _, sr in shard_rows(task, cfg):
        x = sr.vectors()
        labels = nearest(cent, x, p.spill) if len(x) else np.zeros((0, p.spill), np.int64)
        b = np.zeros(len(x), rc.bucket_dtype(p.dim, rc.key_dtype(sr.key)))
        b["gid"], b["inel"], b["pol"], b["key"], b["vec"] = sr.gid, sr.inel, sr.pol, sr.key, x
        for j in range(labels.shape[1]):
            parts.append(b)
            ids.append(2 * labels[:, j] + (j > 0))
    recs = _concat(parts, rc.bucket_dtype(p.dim, np.dtype("S1")))
    shuffle.write(data_path(p.work, "assign", task.index), recs, _ids(ids), 2 * p.k)
    return {"rows": len(recs)}
