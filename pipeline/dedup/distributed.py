"""The distributed dedup's driver: plans each step, runs it as a Job on the configured distributor (the local pool
or Spark, the same per-task functions in `steps.py`, `pairs.py`, `decide.py`), and holds only O(shards + clusters)
state: task lists, cluster sizes, the bounded k-means sample and the sampled queries; never an array of length N.

Steps: scan (exact map + samples) -> exact (reduce by sha256) -> k-means on the driver (centroids written as a
file every task reads) -> truth (sampled exact queries) -> spill tuned -> assign (rows bucketed by cluster) ->
pairs (cluster ranges, tiles of big clusters) -> decide (gathered by shard, outputs) -> materialize (per tar).
Everything intermediate lives in OUTPUT/_dedup_work/ on the output filesystem; each task commits by writing its
marker last, and a re-run skips committed tasks (plan.json: a changed input or config starts over)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import posixpath
import time
from typing import Any, Callable

import fsspec
import numpy as np

from pipeline.core.config import Config
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.fsio import TMP_MARK, put_json, read_json
from pipeline.dedup import materialize as mat
from pipeline.dedup import records as rc
from pipeline.dedup import shuffle
from pipeline.dedup.neighbors import ArrayVectors, Pairs, Truth
from pipeline.dedup.pairs import plan_pairs
from pipeline.dedup.semdedup import spherical_kmeans, tune_spill
from pipeline.dedup.steps import WORKER, centroids, nearest
from pipeline.dedup.vectors import MODALITY
from pipeline.dedup.work import COMMITTED, Params, StepTask, committed, driver_file, step_files, truth_pairs_file
from pipeline.distribute.base import Job, get_distributor
from pipeline.embeddings.read import EmbeddingSet

log = logging.getLogger(__name__)

WORK = "_dedup_work"
MAX_MAP_TASKS = 2048  # embed shards are grouped so map steps have at most this many tasks (and files)
EXACT_PART_ROWS = 1 << 20  # rows per exact-duplicate partition
TUNE_QUERIES, RECALL_QUERIES = 2000, 1000
TARGET_RECALL = 0.99


class Steps:
    """One distributed dedup run: its plan, its distributor, and what the steps reported so far."""

    def __init__(self, cfg: Config, folder: str, output: str):
        self.cfg, self.dc, self.output = cfg, cfg.dedup, output
        emb = EmbeddingSet(folder, cfg.dedup.read_timeout_s, cfg.embeddings)
        if MODALITY not in emb.modalities:
            raise ConfigError(f"input={folder}: holds no image embeddings to deduplicate ({emb.modalities} only)")
        self.shards = emb.shards
        self.input_format = emb.input_format
        rows = [emb.rows(s) for s in self.shards]
        self.total = int(sum(rows))
        n = len(self.shards)
        group = max(1, math.ceil(n / MAX_MAP_TASKS))
        self.work = posixpath.join(output, WORK)
        self.params = Params(
            work=self.work,
            output=output,
            n_shards=n,
            n_groups=math.ceil(n / group) if n else 0,
            group=group,
            dim=emb.dim if n else 0,
            exact_parts=max(1, math.ceil(self.total / EXACT_PART_ROWS)),
            kmeans_rate=min(1.0, self.dc.kmeans_sample / max(1, self.total)),
            tune_rate=0.0 if self.dc.spill else min(0.5, TUNE_QUERIES / max(1, self.total)),
            recall_rate=min(0.5, RECALL_QUERIES / max(1, self.total)),
        )
        plan = {
            "input": folder,
            "shards": self.shards,
            "rows": rows,
            "dedup": self.dc.model_dump(mode="json"),
            "embeddings": cfg.embeddings.model_dump(mode="json"),
            "params": self.params.__dict__,
        }
        self.fingerprint = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).hexdigest()
        self.dist = get_distributor(cfg)
        self.timings: dict[str, float] = {}

    # ---- work folder ------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Resume when plan.json matches, else start over; either way no earlier summary or temporary file stays."""
        fs, work = fsspec.core.url_to_fs(self.work)
        mat.uncommit(self.output)
        known = read_json(posixpath.join(self.work, "plan.json"))
        if known is None or known.get("fingerprint") != self.fingerprint:
            if fs.exists(work):
                fs.rm(work, recursive=True)
            mat.remove_tables(self.output)
            put_json(posixpath.join(self.work, "plan.json"), {"fingerprint": self.fingerprint})
            return
        log.info("dedup: resuming the distributed steps in %s", self.work)
        for p in fs.find(work) + fs.find(fsspec.core.url_to_fs(self.output)[1]):
            if TMP_MARK in posixpath.basename(p):
                fs.rm(p)

    def finish(self) -> None:
        fs, work = fsspec.core.url_to_fs(self.work)
        fs.rm(posixpath.join(work, "plan.json"))  # first: a kill in the middle of removing leaves no plan to trust
        fs.rm(work, recursive=True)

    # ---- running a step ---------------------------------------------------------------------------------------

    def run(self, step: str, tasks: list[StepTask], fold: Callable[[StepTask, dict[str, Any]], None]) -> None:
        """Run the step's uncommitted tasks; fold() sees every task's stats (committed earlier or now) once."""
        t0 = time.perf_counter()
        todo = []
        for t in tasks:
            done = committed(t, self.cfg)
            if done is None:
                todo.append(t)
            else:
                fold(t, done)
        log.info("dedup %s: %d tasks, %d already committed", step, len(tasks), len(tasks) - len(todo))

        def on_result(r: Any) -> None:
            if r.ok and r.stats is not None:
                fold(r.task, r.stats)
                r.stats = None  # folded: the ledger keeps no per-task payload

        if todo:
            job = Job(f"dedup {step}", todo, WORKER, COMMITTED, max_retries=1, unit="task")
            results = self.dist.run(job, on_result)
            failed = [r.task.name for r in results if not r.ok]
            if failed:
                raise JobFailed(f"dedup {step}: {len(failed)} task(s) failed: {', '.join(failed[:10])}; re-run")
        self.timings[step] = self.timings.get(step, 0.0) + time.perf_counter() - t0

    def map_tasks(self, step: str, p: Params) -> list[StepTask]:
        g = p.group
        return [
            StepTask(step, i, p, shards=tuple(self.shards[i * g : (i + 1) * g]), lo=i * g) for i in range(p.n_groups)
        ]


def _sum(into: dict[str, Any], stats: dict[str, Any], keys: tuple[str, ...]) -> None:
    for k in keys:
        into[k] = into.get(k, 0) + int(stats.get(k, 0))


def kmeans(s: Steps, p: Params, valid: int) -> Params:
    """Fit spherical k-means on the sample (driver, bounded by dedup.kmeans_sample); centroids and the sampled
    queries become files every later task reads. Committed by kmeans.json, written last."""
    done = read_json(driver_file(p, "kmeans.json"))
    if done is not None:
        return rc_params(p, k=int(done["k"]))
    t0 = time.perf_counter()
    sample = step_files(p, "sample", p.n_groups)
    train, _ = sample.read(0, 1)
    k = min(s.dc.semdedup_clusters or max(1, int(round(math.sqrt(valid)))), len(train)) if valid >= 2 else 0
    if k:
        cent = spherical_kmeans(ArrayVectors(np.ascontiguousarray(train["vec"])), k, seed=0)
        c = np.zeros(k, [("vec", "<f4", (p.dim,))])
        c["vec"] = cent
        shuffle.write(driver_file(p, "centroids.bin"), c, np.zeros(k, np.int64), 1)
        queries, roles = sample.read(1, 3)
        shuffle.write(driver_file(p, "queries.bin"), queries, roles - 1, 2)
    put_json(driver_file(p, "kmeans.json"), {"k": k, "trained_on": len(train)})
    s.timings["kmeans"] = time.perf_counter() - t0
    return rc_params(p, k=k)


def rc_params(p: Params, **changes: Any) -> Params:
    return dataclasses.replace(p, **changes)


def spill_and_truth(s: Steps, p: Params, truth: np.ndarray) -> tuple[Params, dict[str, Any]]:
    """The spill (dedup.spill, or the smallest whose sampled true pairs meet in a cluster at TARGET_RECALL) and the
    recall queries' true pairs, written for the pairs and decide tasks (truth_pairs.bin)."""
    q, role = shuffle.read_all(driver_file(p, "queries.bin"))
    spill_max = min(p.max_spill, p.k)
    lab_q = nearest(centroids(p), np.ascontiguousarray(q["vec"]), spill_max)
    where = {g: i for i, g in enumerate(q["gid"].tolist())}
    qi = np.array([where[g] for g in truth["q"].tolist()], np.int64)
    tune = role[qi] == 0 if len(qi) else np.zeros(0, bool)
    info: dict[str, Any] = {"tuning_pairs": int(tune.sum())}
    if s.dc.spill:
        spill, met = min(s.dc.spill, p.k), None
    else:
        labels = np.concatenate([lab_q[qi[tune]], truth["labels"][tune][:, :spill_max]])
        m = int(tune.sum())
        pairs = Pairs(np.arange(m), m + np.arange(m), truth["sim"][tune])
        spill, met = tune_spill(labels, Truth(np.arange(m), pairs), TARGET_RECALL)
    info["tuning_recall"] = met
    rec = ~tune
    qg, hg = truth["q"][rec], truth["gid"][rec]
    q_first = rc.better(q["inel"][qi[rec]], q["pol"][qi[rec]], qg, truth["inel"][rec], truth["pol"][rec], hg)
    t = np.zeros(int(rec.sum()), rc.TRUTH_PAIR)
    t["a"], t["b"], t["worse"] = np.minimum(qg, hg), np.maximum(qg, hg), np.where(q_first, hg, qg)
    t = t[np.sort(np.unique(np.stack([t["a"], t["b"]], 1), axis=0, return_index=True)[1])] if len(t) else t
    shuffle.write(truth_pairs_file(p), t, np.zeros(len(t), np.int64), 1)
    info["recall_sample_queries"] = int((role == 1).sum())
    return rc_params(p, spill=int(spill)), info


def near_steps(s: Steps, p: Params) -> tuple[Params, dict[str, Any], dict[str, Any], list[int], int]:
    """truth, spill tuning, assign and pairs (no clusters: only an empty truth file for decide);
    (params, search facts, pair counts, true pairs found, recall queries)."""
    search: dict[str, Any] = {"clusters": p.k, "kmeans_sample": s.dc.kmeans_sample}
    if not p.k:
        shuffle.write(truth_pairs_file(p), np.zeros(0, rc.TRUTH_PAIR), np.zeros(0, np.int64), 1)
        return p, search, {}, [], 0
    s.run("truth", s.map_tasks("truth", p), lambda t, st: None)
    p, info = spill_and_truth(s, p, step_files(p, "truth", p.n_groups).read(0, 1)[0])
    search.update(spill=p.spill, **{k: v for k, v in info.items() if k != "recall_sample_queries"})
    s.run("assign", s.map_tasks("assign", p), lambda t, st: None)
    sizes = step_files(p, "assign", p.n_groups).sizes(2 * p.k)
    members, guests = sizes[0::2], sizes[1::2]
    tasks = [
        StepTask("pairs", i, p, lo=lo, hi=hi, block=b, bi=bi, bj=bj, members=m)
        for i, (lo, hi, b, bi, bj, m) in enumerate(plan_pairs(members, guests, s.dc.max_cluster_rows))
    ]
    search.update(
        largest_cluster=int(members.max()),
        median_cluster=float(np.median(members)),
        pairs_tasks=len(tasks),
        tiles=sum(1 for t in tasks if t.block),
        max_cluster_rows=s.dc.max_cluster_rows,
    )
    found: set[int] = set()
    near: dict[str, Any] = {}

    def fold_pairs(t: StepTask, st: dict[str, Any]) -> None:
        found.update(st.pop("truth_found", []))
        _sum(near, st, ("near_pairs",))
        near["largest_task_rows"] = max(near.get("largest_task_rows", 0), int(st.get("rows", 0)))

    s.run("pairs", tasks, fold_pairs)
    search["largest_task_rows"] = near.get("largest_task_rows", 0)
    return rc_params(p, n_pairs=len(tasks)), search, near, sorted(found), info["recall_sample_queries"]


def dedup_distributed(cfg: Config, folder: str, output: str) -> dict[str, Any]:
    """Run every step; writes the sharded tables, the histogram and summary.json (last); returns the summary."""
    t0 = time.perf_counter()
    s = Steps(cfg, folder, output)
    if cfg.dedup.reference:
        raise ConfigError("dedup.reference: not supported by the distributed steps (use dedup.mode=semdedup)")
    s.prepare()
    p = s.params
    scanned: dict[str, Any] = {}
    s.run("scan", s.map_tasks("scan", p), lambda t, st: _sum(scanned, st, ("rows", "valid", "sampled")))
    exact: dict[str, Any] = {}
    if s.dc.exact:
        tasks = [StepTask("exact", i, p, lo=i, hi=i + 1) for i in range(p.exact_parts)]
        s.run("exact", tasks, lambda t, st: _sum(exact, st, ("exact_dropped", "exact_groups")))
        p = rc_params(p, n_exact=p.exact_parts)
    p = kmeans(s, p, scanned.get("valid", 0))
    p, search, near, truth_pairs, recall_queries = near_steps(s, p)
    decided: dict[str, Any] = {"dropped": {}, "resolved": set(), "hist": np.zeros(400, np.int64)}

    def fold_decide(t: StepTask, st: dict[str, Any]) -> None:
        _sum(decided, st, ("kept", "in_groups", "groups"))
        for r, c in st["dropped"].items():
            decided["dropped"][r] = decided["dropped"].get(r, 0) + c
        decided["resolved"].update(st.pop("resolved"))
        for i, c in st.pop("hist"):
            decided["hist"][i] += c

    s.run("decide", s.map_tasks("decide", p), fold_decide)
    materialized = materialize(s, p) if s.dc.materialize else None
    truth_n = len(shuffle.read_all(truth_pairs_file(p))[0])
    hist = decided["hist"]
    draw(hist, s.dc.threshold, posixpath.join(output, "similarity_hist.png"))
    summary = build_summary(s, scanned, exact, near, decided, search, materialized)
    summary.update(
        recall_estimate=len(truth_pairs) / truth_n if truth_n else None,
        group_recall_estimate=len(decided["resolved"]) / truth_n if truth_n else None,
        recall_sample_queries=recall_queries,
        recall_sample_pairs=truth_n,
    )
    summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    summary["time_split_seconds"] = {k: round(v, 2) for k, v in s.timings.items()}
    put_json(posixpath.join(output, mat.SUMMARY), summary)
    s.finish()
    return summary


def draw(hist: np.ndarray, threshold: float, path: str) -> None:
    """The histogram from the summed fixed bins, from threshold - 0.05 (or the lowest similarity seen) up to 1."""
    from pipeline.dedup.decide import HIST_EDGES

    lowest = int(np.flatnonzero(hist)[0]) if hist.any() else len(hist) - 1
    start = min(lowest, int(np.searchsorted(HIST_EDGES, threshold - 0.05, side="right")) - 1)
    mat.draw_histogram(hist[start:], HIST_EDGES[start:], threshold, path, "distributed")


def materialize(s: Steps, p: Params) -> dict[str, Any]:
    """One task per tar shard: the filtered shard and its URL list part."""
    if s.dc.shards is None:
        raise ConfigError("dedup.shards: required when dedup.materialize=true")
    tars = mat.tar_shards(s.dc.shards)
    missing = sorted(set(s.shards) - set(tars))
    if missing:
        log.warning(
            "materialize: %d embedded shards have no tar in %s (first: %s)", len(missing), s.dc.shards, missing[:3]
        )
    tasks = [
        StepTask("materialize", i, p, shards=(sid,), tar=tars[sid]) for i, sid in enumerate(s.shards) if sid in tars
    ]
    totals: dict[str, Any] = {}
    s.run("materialize", tasks, lambda t, st: _sum(totals, st, ("samples_kept", "samples_removed", "urls")))
    return {"shards": len(tasks), **totals}


def build_summary(
    s: Steps,
    scanned: dict[str, Any],
    exact: dict[str, Any],
    near: dict[str, Any],
    decided: dict[str, Any],
    search: dict[str, Any],
    materialized: dict[str, Any] | None,
) -> dict[str, Any]:
    dropped = {r: int(c) for r, c in sorted(decided["dropped"].items())}
    samples = int(scanned.get("rows", 0))
    out: dict[str, Any] = {
        "samples": samples,
        "samples_embedded": int(scanned.get("valid", 0)),
        "method": "distributed",
        "threshold": s.dc.threshold,
        "keep_policy": s.dc.keep,
        "groups": int(decided.get("groups", 0)),
        "samples_in_groups": int(decided.get("in_groups", 0)),
        "near_pairs": int(near.get("near_pairs", 0)),
        "exact_pairs": int(exact.get("exact_dropped", 0)),
        "kept": int(decided.get("kept", 0)),
        "dropped": sum(dropped.values()),
        "dropped_by_reason": dropped,
        "fraction_kept": round(decided.get("kept", 0) / samples, 6) if samples else None,
        "search": search,
        "output": s.output,
        "input": {"input_format": s.input_format},
        "distributor": s.cfg.distributor,
    }
    if materialized is not None:
        out["materialized"] = materialized
    return out
