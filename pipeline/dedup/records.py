"""What the distributed dedup steps know about a row and hand each other: its global id, its rank as a survivor,
one shard's rows read for a task, the record types of the intermediate files, and the one merge of per-row
decisions (used inside a pairs task and again when a shard's decisions are gathered).

A row's global id is (shard ordinal << 32) | row: it orders rows by (shard, index) as the local path does and needs
no table of shard offsets. Its rank as a survivor is (ineligible, policy, gid), lower is better: ineligible rows (under
dedup.min_clip_score) last, then dedup.keep's policy value, then (shard, index)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.core.config import Config
from pipeline.dedup.groups import policy_value
from pipeline.dedup.vectors import MODALITY
from pipeline.embeddings.read import EmbeddingSet, unit_rows

SHIFT = np.int64(32)


def gids(ordinal: int, rows: np.ndarray) -> np.ndarray:
    return (np.int64(ordinal) << SHIFT) | np.asarray(rows, np.int64)


def shard_of(gid: np.ndarray) -> np.ndarray:
    return np.asarray(gid, np.int64) >> SHIFT


def unit_hash(gid: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per id (splitmix64): which rows a deterministic sample takes."""
    with np.errstate(over="ignore"):
        z = np.asarray(gid, np.uint64) + np.uint64(0x9E3779B97F4A7C15) * np.uint64(salt + 1)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def better(inel_a: Any, pol_a: Any, gid_a: Any, inel_b: Any, pol_b: Any, gid_b: Any) -> np.ndarray:
    """Whether a ranks before b (vectorized)."""
    inel_a, inel_b = np.asarray(inel_a), np.asarray(inel_b)
    pol_a, pol_b = np.asarray(pol_a), np.asarray(pol_b)
    return (inel_a < inel_b) | ((inel_a == inel_b) & ((pol_a < pol_b) | ((pol_a == pol_b) & (gid_a < gid_b))))


def read_columns(cfg: Config) -> list[str]:
    return ["key", "sha256", "clip_score"] + {"largest": ["width", "height"], "shortest_url": ["url"]}.get(
        cfg.dedup.keep, []
    )


def open_set(cfg: Config, shards: list[str]) -> EmbeddingSet:
    """The input opened for a task: just the named shards, no listing."""
    assert cfg.input is not None
    return EmbeddingSet(str(cfg.input).rstrip("/"), cfg.dedup.read_timeout_s, cfg.embeddings, shards=shards)


@dataclass
class ShardRows:
    """One shard as a task sees it: every row's metadata and validity, and the valid rows' ids, rank and keys."""

    shard: str
    meta: pd.DataFrame
    valid: np.ndarray
    rows: np.ndarray  # positions of the valid rows
    gid: np.ndarray
    inel: np.ndarray  # int8: 1 = ranked last (under dedup.min_clip_score)
    pol: np.ndarray  # float64: the keep policy, lower is better
    key: np.ndarray  # bytes (S) of the valid rows' keys
    emb: EmbeddingSet

    @staticmethod
    def read(cfg: Config, shard: str, ordinal: int) -> ShardRows:
        emb = open_set(cfg, [shard])
        r = emb.read(shard, MODALITY, read_columns(cfg))
        meta = r.meta.reset_index(drop=True)
        rows = np.flatnonzero(r.valid)
        low = low_clip(meta, cfg)
        key = np.array([str(k).encode() for k in meta["key"].to_numpy(object)[rows]], dtype=bytes)
        if not len(key):
            key = np.zeros(0, "S1")
        return ShardRows(
            shard,
            meta,
            r.valid,
            rows,
            gids(ordinal, rows),
            low[rows].astype(np.int8),
            policy_value(meta, cfg.dedup.keep)[rows],
            key,
            emb,
        )

    def vectors(self) -> np.ndarray:
        """float32 unit vectors of the valid rows (the whole shard: a shard is what one task holds)."""
        x = self.emb.vectors(self.shard, MODALITY)
        out = np.empty((len(self.rows), self.emb.dim), np.float32)
        step = self.emb.options.chunk_rows
        for s in range(0, len(self.rows), step):
            out[s : s + step] = unit_rows(np.asarray(x[self.rows[s : s + step]]), np.dtype("float32"))[0]
        return out

    def sha_hash(self) -> tuple[np.ndarray, np.ndarray]:
        """(which valid rows have a sha256, two uint64 halves of a 128-bit hash of it)."""
        if "sha256" not in self.meta:
            return np.zeros(len(self.rows), bool), np.zeros((0, 2), np.uint64)
        sha = self.meta["sha256"].to_numpy(object)[self.rows]
        has = pd.notna(sha) & (sha != "")
        h = [hashlib.blake2b(str(s).encode(), digest_size=16).digest() for s in sha[has]]
        return has, np.frombuffer(b"".join(h), "<u8").reshape(-1, 2)


def low_clip(meta: pd.DataFrame, cfg: Config) -> np.ndarray:
    """Rows under dedup.min_clip_score (no score is not a low score), as groups.drop_filters decides."""
    if cfg.dedup.min_clip_score is None or "clip_score" not in meta:
        return np.zeros(len(meta), bool)
    return np.asarray(meta["clip_score"].to_numpy(np.float64, na_value=np.nan) < cfg.dedup.min_clip_score)


def key_dtype(keys: np.ndarray) -> np.dtype[Any]:
    return np.dtype(f"S{max(1, keys.dtype.itemsize)}")


# ---- record types ---------------------------------------------------------------------------------------------


def exact_dtype(key: np.dtype[Any]) -> np.dtype[Any]:
    """Step 1's map output: a valid row with a sha256, hash-partitioned by it."""
    return np.dtype([("h0", "<u8"), ("h1", "<u8"), ("gid", "<i8"), ("inel", "i1"), ("pol", "<f8"), ("key", key)])


def sample_dtype(d: int) -> np.dtype[Any]:
    """Sampled rows: k-means training (partition 0), spill-tuning queries (1), recall queries (2)."""
    return np.dtype([("gid", "<i8"), ("inel", "i1"), ("pol", "<f8"), ("vec", "<f4", (d,))])


def bucket_dtype(d: int, key: np.dtype[Any]) -> np.dtype[Any]:
    """Step 3's output: a row in one of its clusters (partition 2c: cluster c's own rows, 2c+1: its guests)."""
    return np.dtype([("gid", "<i8"), ("inel", "i1"), ("pol", "<f8"), ("key", key), ("vec", "<f2", (d,))])


def truth_dtype(spill: int) -> np.dtype[Any]:
    """A sampled query's true duplicate (exact cosine over a whole shard) and that row's nearest clusters."""
    return np.dtype(
        [("q", "<i8"), ("gid", "<i8"), ("sim", "<f4"), ("inel", "i1"), ("pol", "<f8"), ("labels", "<i4", (spill,))]
    )


# A true pair of the recall sample: its two gids (a < b) and the worse-ranked of them.
TRUTH_PAIR = np.dtype([("a", "<i8"), ("b", "<i8"), ("worse", "<i8")])

NEAR_KEEPER, EXACT_KEEPER = 1, 2  # flags: the row has a worse-ranked near / exact duplicate


def decision_dtype(key: np.dtype[Any]) -> np.dtype[Any]:
    """What pairs and exact tasks learn about one row, merged per row by `merge` (partitioned by the row's shard):
    its best similarity seen, its best-ranked near duplicate that ranks before it, its exact group's head, flags."""
    return np.dtype(
        [
            ("gid", "<i8"),
            ("nn", "<f4"),
            ("near", "<i8"),
            ("near_inel", "i1"),
            ("near_pol", "<f8"),
            ("near_sim", "<f4"),
            ("near_key", key),
            ("exact", "<i8"),
            ("exact_key", key),
            ("flags", "u1"),
        ]
    )


def blank_decisions(n: int, key: np.dtype[Any]) -> np.ndarray:
    out = np.zeros(n, decision_dtype(key))
    out["nn"], out["near"], out["exact"] = -np.inf, -1, -1
    return out


def merge(recs: np.ndarray) -> np.ndarray:
    """One record per gid (sorted by gid): best nn, the best-ranked near duplicate, the exact head, flags or-ed."""
    if not len(recs):
        return recs
    none = recs["near"] < 0
    order = np.lexsort((recs["near"], recs["near_pol"], recs["near_inel"], none, recs["gid"]))
    r = recs[order]
    starts = np.flatnonzero(np.r_[True, r["gid"][1:] != r["gid"][:-1]])
    out = r[starts].copy()  # near fields: the best-ranked candidate, first in each run
    out["nn"] = np.maximum.reduceat(r["nn"], starts)
    out["flags"] = np.bitwise_or.reduceat(r["flags"], starts)
    ex = np.lexsort((-r["exact"], r["gid"]))
    re_ = r[ex]
    out["exact"] = re_["exact"][starts]  # runs start at the same positions: both orders sort by gid first
    out["exact_key"] = re_["exact_key"][starts]
    return out
