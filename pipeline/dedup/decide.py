"""Steps 5 and 6 of the distributed dedup: per group of embed shards, the decision records of every pairs and exact
task for those shards are gathered through the shuffle and merged, the drop rule applied (SemDeDup's and NeMo
Curator's: a row is dropped when any better-ranked row is its duplicate, exact or near, so no global connected
components are needed), the filters too, and the shard's keep/drop/duplicates parts written; then, one task per tar
shard, the deduplicated WebDataset shard and its URL list.

Duplicates table under this rule: a dropped row's group_id is the id ((shard ordinal << 32) | row) of the
best-ranked duplicate it was compared with (matched_key is that row's key), a kept row with worse duplicates is its
own group; in a chain (a ~ b ~ c, a !~ c) c's group is b's id although b is dropped."""

from __future__ import annotations

from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.core.config import Config
from pipeline.core.fsio import put_parquet
from pipeline.dedup import materialize as mat
from pipeline.dedup import records as rc
from pipeline.dedup import shuffle
from pipeline.dedup.groups import REASONS
from pipeline.dedup.work import shard_rows, step_files, truth_pairs_file

HIST_EDGES = np.linspace(-1.0, 1.0, 401)  # fixed bins, so shards' counts add up


def _gathered(task: Any) -> np.ndarray:
    p = task.params
    lo, hi = task.lo, task.lo + len(task.shards)
    parts = [step_files(p, "pairs", p.n_pairs).read(lo, hi)[0]]
    if p.n_exact:
        parts.append(step_files(p, "exact", p.n_exact).read(lo, hi)[0])
    parts = [x for x in parts if len(x)]
    if not parts:
        return rc.blank_decisions(0, np.dtype("S1"))
    wide = shuffle.widest([x.dtype for x in parts])
    return rc.merge(np.concatenate([shuffle.cast(x, wide) for x in parts]))


def shard_tables(
    sr: rc.ShardRows, ordinal: int, dec: np.ndarray, cfg: Config
) -> tuple[dict[str, pd.DataFrame], np.ndarray, np.ndarray]:
    """The three tables of one shard from its merged decision records; each row's best similarity seen and
    whether it is dropped."""
    n = len(sr.meta)
    full = np.zeros(n, dec.dtype)
    full["nn"], full["near"], full["exact"] = -np.inf, -1, -1
    full[(dec["gid"] & np.int64(0xFFFFFFFF)).astype(np.int64)] = dec
    own = rc.gids(ordinal, np.arange(n))
    exact, near = full["exact"] >= 0, (full["near"] >= 0) & (full["exact"] < 0)
    reason = np.full(n, None, object)
    reason[near], reason[exact] = "near", "exact"
    filters = {"not_embedded": ~sr.valid, "low_clip_score": rc.low_clip(sr.meta, cfg)}
    for name in REASONS[2:]:
        if name in filters:
            reason[filters[name]] = name
    dropped = pd.notna(reason)
    key = sr.meta["key"].astype(str).to_numpy(object)
    shard = np.full(n, sr.shard, object)
    flagged = full["flags"] > 0
    member = exact | near | flagged
    group = np.where(exact, full["exact"], np.where(near, full["near"], own))
    matched = np.where(exact, _text(full["exact_key"]), np.where(near, _text(full["near_key"]), key))
    sim = np.where(exact, np.nan, np.where(near, full["near_sim"], 1.0)).astype(np.float32)
    head_reason = np.where(full["flags"] & rc.EXACT_KEEPER, "exact", "near")
    member_reason = np.where(exact, "exact", np.where(near, "near", head_reason))
    m = np.flatnonzero(member)
    tables = {
        "duplicates": pd.DataFrame(
            {
                "key": key[m],
                "shard": shard[m],
                "group_id": group[m].astype(np.int64),
                "kept": ~dropped[m],
                "matched_key": matched[m],
                "similarity": sim[m],
                "reason": member_reason[m],
            }
        ),
        "keep": pd.DataFrame(
            {
                "key": key[~dropped],
                "shard": shard[~dropped],
                "reason": np.where(flagged[~dropped], "group_keeper", "unique"),
            }
        ),
        "drop": pd.DataFrame({"key": key[dropped], "shard": shard[dropped], "reason": reason[dropped].astype(str)}),
    }
    return tables, full["nn"], dropped


def _text(b: np.ndarray) -> np.ndarray:
    return np.array([x.decode() for x in b.tolist()], object)


def decide(task: Any, cfg: Config) -> dict[str, Any]:
    """Decisions of a group of embed shards; writes their parts of keep/drop/duplicates.parquet."""
    p = task.params
    dec = _gathered(task)
    truth, _ = shuffle.read_all(truth_pairs_file(p))
    owner = rc.shard_of(dec["gid"])
    stats: dict[str, Any] = {"kept": 0, "dropped": {}, "in_groups": 0, "groups": 0, "resolved": []}
    hist = np.zeros(len(HIST_EDGES) - 1, np.int64)
    for ordinal, sr in shard_rows(task, cfg):
        tables, nn, dropped = shard_tables(sr, ordinal, dec[owner == ordinal], cfg)
        for name, table in tables.items():
            put_parquet(mat.table_path(p.output, name, sr.shard), table, mat.SCHEMAS[name])
        dup = tables["duplicates"]
        stats["kept"] += len(tables["keep"])
        stats["in_groups"] += len(dup)
        stats["groups"] += int((tables["keep"]["reason"] == "group_keeper").sum())
        for r, c in tables["drop"]["reason"].value_counts().items():
            stats["dropped"][r] = stats["dropped"].get(r, 0) + int(c)
        seen = nn[sr.rows]
        hist += np.histogram(seen[np.isfinite(seen)], bins=HIST_EDGES)[0]
        # sampled true pairs whose worse-ranked end lies here: resolved when that end is dropped
        here = np.flatnonzero(rc.shard_of(truth["worse"]) == ordinal) if len(truth) else np.zeros(0, np.int64)
        local = (truth["worse"][here] & np.int64(0xFFFFFFFF)).astype(np.int64)
        stats["resolved"] += here[dropped[local]].tolist()
    stats["hist"] = [[int(i), int(c)] for i, c in enumerate(hist) if c]
    return stats


def materialize(task: Any, cfg: Config) -> dict[str, Any]:
    """One tar shard without its dropped samples (OUTPUT/shards/SHARD.tar) and its kept URLs
    (OUTPUT/urls.parquet/SHARD.parquet)."""
    p = task.params
    (sid,) = task.shards
    fs, path = fsspec.core.url_to_fs(mat.table_path(p.output, "keep", sid))
    with fs.open(path, "rb") as f:
        keep = set(pq.read_table(f, columns=["key"]).column("key").to_pylist())
    counts = mat.filter_tar(task.tar, f"{p.output}/shards/{sid}.tar", keep)
    meta = rc.open_set(cfg, [sid]).metadata(sid, ["key", "url", "caption"])
    meta = meta[meta["key"].astype(str).isin(keep)].reset_index(drop=True)
    put_parquet(mat.table_path(p.output, "urls", sid), meta[["key", "url", "caption"]], mat.URLS_SCHEMA)
    return {**counts, "urls": len(meta)}
