"""The dedup stage: exact (same image bytes) and near (image-embedding cosine) duplicate groups of an embed output,
one survivor per group by a keep policy, and keep/drop lists keyed by sample key.

Why dedup.threshold defaults to 0.95: on CLIP image embeddings, resized, re-encoded or lightly cropped copies of
one photo stay well above 0.95 while different photos of similar scenes mostly fall below it (the range SemDeDup
and LAION-style deduplication work in). That rests on published practice, not on a measurement here: no pretrained
ViT-B-32 weights are reachable offline. What the tests measure is the search itself on synthetic unit vectors
(tests/dedup/test_neighbors.py, 20k x 512): planted copies at ~0.95-0.99 of each other come out as whole groups (all of
them with exact search, >= 98% with IVF and SemDeDup) and distractors at 0.90-0.93 are never joined. Calibrate on
your own labelled pairs with `calibrate()` before trusting 0.95 for another model.
"""

from __future__ import annotations

import logging
import posixpath
import time
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import Config, DedupConfig, require
from pipeline.core.errors import ConfigError
from pipeline.core.fsio import put_json, put_parquet
from pipeline.core.logs import timed
from pipeline.core.timeouts import naming_timeout
from pipeline.core.units import parse_bytes
from pipeline.core.workdir import work_folder
from pipeline.dedup import materialize as mat
from pipeline.dedup import neighbors as nb
from pipeline.dedup import semdedup
from pipeline.dedup.groups import decide, exact_pairs
from pipeline.dedup.vectors import Embeddings
from pipeline.embeddings.read import EmbeddingSet, needs_output

log = logging.getLogger(__name__)

# Auto mode runs exact search only while its n*n*d multiply-adds stay under this: ~2 minutes on 2 CPU cores.
EXACT_MAX_WORK = {"cpu": 1e13, "gpu": 1e15}
# Queries brute-forced to tune IVF's nprobe, and as many again (another sample) to estimate IVF/SemDeDup recall.
RECALL_SAMPLE = 1000


def choose_mode(mode: str, n: int, d: int, budget: int, gpus: int = 0) -> str:
    """auto: exact while the flat float32 array fits the budget and its n*n*d work is small; then IVF on a GPU
    while it fits; otherwise SemDeDup, which streams clusters from disk and fits any budget. Measured at 1M x 512
    on 2 shared CPU cores (bench/bench_dedup.py): SemDeDup 66 s / 0.9 GB, IVF 323 s / 2.4 GB (its per-query list
    scans are slow on CPU), exact ~1.5-2 h extrapolated from 100k."""
    if mode != "auto":
        return mode
    if n * d * 4 <= budget and float(n) * n * d <= EXACT_MAX_WORK["gpu" if gpus else "cpu"]:
        return "exact"
    return "ivf" if gpus and n * d * 4 <= budget else "semdedup"


def near_search(vs: nb.VectorSet, dc: DedupConfig, budget: int, workdir: str) -> nb.SearchResult:
    """Run the configured search; IVF and SemDeDup also get a brute-force recall estimate on sample queries."""
    import faiss

    mode = choose_mode(dc.mode, vs.n, vs.d, budget, faiss.get_num_gpus())
    if mode in ("exact", "ivf") and vs.n * vs.d * 4 > budget:
        # exact: the float32 flat index; ivf: float16 codes in lists that grow by doubling
        raise ConfigError(
            f"dedup.mode={mode}: {vs.n} x {vs.d} vectors need {vs.n * vs.d * 4 / 2**30:.1f} GiB, "
            f"over dedup.memory_budget={dc.memory_budget} (mode=semdedup fits any budget)"
        )
    if vs.n < 2:
        return nb.SearchResult(nb.Pairs(), np.full(vs.n, -np.inf, np.float32), mode)
    if mode == "exact":
        return nb.search_exact(vs, dc.threshold, dc.k)
    if mode == "ivf":
        result = nb.search_ivf(vs, dc.threshold, dc.k, nb.sample_truth(vs, dc.threshold, RECALL_SAMPLE, seed=0))
    else:
        result = semdedup.search_semdedup(vs, dc.threshold, dc.semdedup_clusters, workdir)
    # brute force on a sample of its own, so the estimate is not the one the tuning was chosen on
    result.params.update(nb.recall_report(result.pairs, nb.sample_truth(vs, dc.threshold, RECALL_SAMPLE, seed=1), vs.n))
    return result


def reference_matches(emb: Embeddings, ref: Embeddings, dc: DedupConfig, budget: int) -> pd.DataFrame:
    """Samples of the input whose nearest reference sample reaches the threshold (exact cosine verified)."""
    rv = ref.vectors
    if rv.n == 0 or emb.vectors.n == 0:
        return pd.DataFrame(columns=["row", "reference_key", "reference_shard", "similarity"])
    if rv.n * rv.d * 4 <= budget:
        index = nb.build_flat(rv)
    else:  # a reference too big for exact search: IVF probing generously (one query per input sample)
        index = nb.build_ivf(rv, nb.ivf_nlist(rv.n))
        nb.set_nprobe(index, min(64, nb.ivf_nlist(rv.n)))
    q, j = [], []
    for start, x in emb.vectors.blocks(16384):
        r, jj, _ = nb.knn_hits(index, x, 1, dc.threshold - nb.SLACK)
        q.append(start + r)
        j.append(jj)
    qa, ja = np.concatenate(q).astype(np.int64), np.concatenate(j).astype(np.int64)
    ok, sim = nb.verify(emb.vectors, qa, rv, ja, dc.threshold)
    ref_rows = ref.rows.iloc[ref.row_of[ja[ok]]]
    return pd.DataFrame(
        {
            "row": emb.row_of[qa[ok]],
            "reference_key": ref_rows["key"].to_numpy(object),
            "reference_shard": ref_rows["shard"].astype(str).to_numpy(object),
            "similarity": sim[ok],
        }
    )


def default_output(cfg: Config) -> str | None:
    """Where dedup() writes when output= is not given: INPUT/dedup (None without one input folder)."""
    return posixpath.join(cfg.input.rstrip("/"), "dedup") if isinstance(cfg.input, str) else None


def plan(cfg: Config) -> tuple[str, str, int]:
    """Check the configuration before any work: (input folder, output folder, memory budget in bytes)."""
    require(cfg, "input")
    if not isinstance(cfg.input, str):
        raise ConfigError("input: dedup reads one embed output folder, not a list")
    dc = cfg.dedup
    try:
        budget = parse_bytes(dc.memory_budget)
    except ValueError as e:
        raise ConfigError(f"dedup.memory_budget: {e}") from None
    if dc.materialize and not dc.shards:
        raise ConfigError(
            "dedup.shards: required when dedup.materialize=true (the WebDataset shards that were embedded)"
        )
    folder = cfg.input.rstrip("/")
    needs_output(folder, cfg.output)
    return folder, str(cfg.output or default_output(cfg)).rstrip("/"), budget


def _open_reference(cfg: Config, emb: Embeddings) -> Embeddings:
    """The reference set, read with the same embeddings.* options as the input; same model and width required."""
    dc = cfg.dedup
    assert dc.reference is not None
    ref = Embeddings(dc.reference, [], dc.read_timeout_s, cfg.embeddings)
    if emb.model != ref.model or emb.vectors.d != ref.vectors.d:
        raise ConfigError(
            f"dedup.reference: {dc.reference} was embedded with another model ({ref.model}, dim {ref.vectors.d}) "
            f"than input ({emb.model}, dim {emb.vectors.d})"
        )
    return ref


def write_outputs(
    emb: Embeddings,
    tables: dict[str, pd.DataFrame],
    matches: pd.DataFrame | None,
    found: nb.SearchResult,
    dc: DedupConfig,
    output: str,
) -> dict[str, Any] | None:
    """Every output but summary.json, each file by temporary name and rename; the earlier run's summary.json (the
    commit marker) is removed first. Returns what materialize wrote, if it ran."""
    mat.uncommit(output)
    mat.remove_tables(output)
    for name in ("duplicates", "keep", "drop"):
        put_parquet(posixpath.join(output, f"{name}.parquet"), tables[name], mat.SCHEMAS[name])
    if matches is not None:
        rows = emb.rows.iloc[matches["row"].to_numpy(np.int64)]
        matches = matches.drop(columns="row").assign(
            key=rows["key"].to_numpy(object), shard=rows["shard"].astype(str).to_numpy(object)
        )
        put_parquet(posixpath.join(output, "reference_matches.parquet"), matches, mat.SCHEMAS["reference_matches"])
    mat.write_histogram(found.nn_sim, dc.threshold, posixpath.join(output, "similarity_hist.png"), found.method)
    if not dc.materialize:
        return None
    return mat.materialize(emb.set, dc.shards, output, tables["keep"])


def distributed_steps(cfg: Config, folder: str, budget: int) -> bool:
    """Whether this run takes the distributed steps: always with distributor=spark or dedup.mode=distributed; under
    auto, when the single-process choice would be SemDeDup (the input is too big for exact search) and no
    dedup.reference is given (the distributed steps have none). The estimate reads row counts, not rows."""
    dc = cfg.dedup
    if cfg.distributor == "spark":
        if dc.mode not in ("auto", "distributed"):
            raise ConfigError(
                f"dedup.mode={dc.mode}: runs in one process; with distributor=spark dedup runs its distributed "
                "steps (dedup.mode=distributed or auto)"
            )
        return True
    if dc.mode != "auto" or dc.reference:
        return dc.mode == "distributed"
    import faiss

    emb = EmbeddingSet(folder, dc.read_timeout_s, cfg.embeddings)
    n = sum(emb.rows(s) for s in emb.shards)
    return bool(emb.shards) and choose_mode("auto", n, emb.dim, budget, faiss.get_num_gpus()) == "semdedup"


def dedup(cfg: Config) -> dict[str, Any]:
    """Run the dedup stage on an embed output; writes OUTPUT/{duplicates,keep,drop}.parquet, similarity_hist.png
    (plus filtered shards and urls.parquet with dedup.materialize) and summary.json last, the commit marker: the
    other files are this run's only when it exists. Returns the summary. The distributed steps (`distributed.py`)
    write the three tables as folders of one Parquet file per embed shard instead (docs/FORMAT.md)."""
    with naming_timeout("dedup.read_timeout_s"):
        folder, output, budget = plan(cfg)
        if distributed_steps(cfg, folder, budget):
            from pipeline.dedup.distributed import dedup_distributed

            return dedup_distributed(cfg, folder, output)
    dc = cfg.dedup
    columns = ["sha256", "clip_score"] + {"largest": ["width", "height"], "shortest_url": ["url"]}.get(dc.keep, [])
    t0, timings = time.perf_counter(), {}
    timeout = dc.read_timeout_s
    with work_folder("dedup") as workdir, naming_timeout("dedup.read_timeout_s"):
        emb = Embeddings(folder, columns, timeout, cfg.embeddings)
        ref = _open_reference(cfg, emb) if dc.reference else None
        vs = emb.vectors
        log.info("dedup: %d samples, %d embedded, dim %d, threshold %.3f", len(emb), vs.n, vs.d, dc.threshold)
        with timed("near-duplicate search", log) as tm:
            found = near_search(vs, dc, budget, workdir)
        timings["near_search"] = tm["seconds"]
        a, b = emb.row_of[found.pairs.a], emb.row_of[found.pairs.b]
        ok = emb.rows["embedded"].to_numpy(bool)
        ea, eb = exact_pairs(emb.rows["sha256"], ok) if dc.exact else (np.zeros(0, np.int64),) * 2
        near_ref = np.zeros(len(emb), bool)
        matches = None
        if ref is not None:
            with timed("reference search", log) as tm:
                matches = reference_matches(emb, ref, dc, budget)
            timings["reference_search"] = tm["seconds"]
            near_ref[matches["row"].to_numpy(np.int64)] = True
        tables = decide(emb, np.concatenate([a, ea]), np.concatenate([b, eb]), dc, near_ref)
        with timed("write outputs", log) as tm:
            materialized = write_outputs(emb, tables, matches, found, dc, output)
        timings["write"] = tm["seconds"]
    summary = build_summary(emb, found, tables, dc, len(ea), materialized, output)
    summary["input"] = emb.set.report()
    summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    summary["time_split_seconds"] = {k: round(v, 2) for k, v in timings.items()}
    put_json(posixpath.join(output, mat.SUMMARY), summary)
    return summary


def build_summary(
    emb: Embeddings,
    found: nb.SearchResult,
    tables: dict[str, pd.DataFrame],
    dc: DedupConfig,
    exact_pairs_count: int,
    materialized: dict[str, Any] | None,
    output: str,
) -> dict[str, Any]:
    dup, kept, dropped = tables["duplicates"], tables["keep"], tables["drop"]
    params = dict(found.params)
    recall = {k: params.pop(k, None) for k in ("recall_estimate", "group_recall_estimate", "recall_sample_pairs")}
    out: dict[str, Any] = {
        "samples": len(emb),
        "samples_embedded": emb.vectors.n,
        "method": found.method,
        "threshold": dc.threshold,
        "keep_policy": dc.keep,
        "groups": int(dup["group_id"].nunique()),
        "samples_in_groups": len(dup),
        "near_pairs": len(found.pairs),
        "exact_pairs": exact_pairs_count,
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": {r: int(c) for r, c in dropped["reason"].value_counts().sort_index().items()},
        "fraction_kept": round(len(kept) / len(emb), 6) if len(emb) else None,
        **recall,
        "search": params,
        "output": output,
    }
    if materialized is not None:
        out["materialized"] = materialized
    return out
