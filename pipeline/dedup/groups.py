"""From candidate pairs to deduplication decisions: duplicate groups (connected components), one survivor per group by
the keep policy, the drop filters, and the keep/drop/duplicates tables; plus calibrating the threshold on labelled
pairs. Pure functions over row metadata, so the local and distributed paths decide alike."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.core.config import DedupConfig
from pipeline.core.errors import ConfigError
from pipeline.dedup import neighbors as nb
from pipeline.dedup.vectors import Embeddings

# Drop reasons, lowest precedence first: a sample dropped for several reasons reports the last that applies.
REASONS = ("near", "exact", "low_clip_score", "near_reference", "not_embedded")


def exact_pairs(sha256: pd.Series, eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs (first row with a hash, every later row with the same hash): identical image bytes."""
    codes, _ = pd.factorize(sha256)
    rows = np.flatnonzero(eligible & (codes >= 0))
    order = rows[np.argsort(codes[rows], kind="stable")]
    c = codes[order]
    heads = np.r_[True, c[1:] != c[:-1]] if len(c) else np.zeros(0, bool)
    first_of = order[heads][np.cumsum(heads) - 1]
    dup = ~heads
    return first_of[dup], order[dup]


def policy_value(rows: pd.DataFrame, keep: str) -> np.ndarray:
    """The keep policy as a float64 per row, lower = better survivor (missing values last)."""
    if keep == "first":
        policy = np.zeros(len(rows))
    elif keep == "largest":
        policy = -(rows["width"].fillna(0).to_numpy(np.float64) * rows["height"].fillna(0).to_numpy(np.float64))
    elif keep == "clip_score":
        policy = -rows["clip_score"].to_numpy(np.float64, na_value=np.nan)
        policy = np.where(np.isnan(policy), np.inf, policy)
    elif keep == "shortest_url":
        policy = rows["url"].map(lambda u: len(u) if isinstance(u, str) else np.inf).to_numpy(np.float64)
    else:
        raise ConfigError(f"dedup.keep: unknown policy {keep!r}")
    return np.asarray(policy, np.float64)


def keeper_rank(rows: pd.DataFrame, keep: str, eligible: np.ndarray) -> np.ndarray:
    """Rank of every row as a group survivor (0 = best): eligible first, then the policy, then (shard, index)."""
    policy = policy_value(rows, keep)
    order = np.lexsort((rows["index"].to_numpy(), rows["shard"].cat.codes.to_numpy(), policy, ~eligible))
    rank = np.empty(len(rows), np.int64)
    rank[order] = np.arange(len(rows))
    return rank


def assign_groups(n: int, a: np.ndarray, b: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of the duplicate pairs: (member rows, group id per member, keeper row per member);
    group ids count from 0 in order of each group's first row."""
    labels = nb.connected_components(n, a, b)
    sizes = np.bincount(labels, minlength=n)
    members = np.flatnonzero(sizes[labels] > 1)
    _, group = np.unique(labels[members], return_inverse=True)
    order = np.lexsort((rank[members], group))
    heads = np.r_[True, group[order][1:] != group[order][:-1]] if len(order) else np.zeros(0, bool)
    keeper_of_group = members[order][heads]
    return members, group.astype(np.int64), keeper_of_group[group]


def drop_filters(rows: pd.DataFrame, dc: DedupConfig, near_reference: np.ndarray) -> dict[str, np.ndarray]:
    """Masks of rows dropped whatever their group: not embedded, low clip score, near the reference set."""
    out = {"not_embedded": ~rows["embedded"].to_numpy(bool), "near_reference": near_reference}
    if dc.min_clip_score is not None:
        score = rows["clip_score"].to_numpy(np.float64, na_value=np.nan)
        out["low_clip_score"] = score < dc.min_clip_score  # no score (no caption) is not a low score
    return out


def calibrate(similarities: np.ndarray, labels: np.ndarray, thresholds: np.ndarray | None = None) -> pd.DataFrame:
    """Precision and recall of `similarity >= threshold` as a duplicate test, over pairs labelled True (duplicate)
    or False; one row per threshold (default 0.80 to 1.00 by 0.005), for choosing dedup.threshold."""
    sims = np.asarray(similarities, np.float64)
    truth = np.asarray(labels, bool)
    if sims.shape != truth.shape:
        raise ValueError(f"similarities {sims.shape} and labels {truth.shape} differ in shape")
    grid = np.round(np.arange(0.80, 1.0001, 0.005), 3) if thresholds is None else np.asarray(thresholds, np.float64)
    rows = []
    for t in grid:
        pred = sims >= t
        tp = int((pred & truth).sum())
        precision = tp / pred.sum() if pred.any() else np.nan
        recall = tp / truth.sum() if truth.any() else np.nan
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        rows.append(
            {
                "threshold": float(t),
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "predicted": int(pred.sum()),
                "true_positives": tp,
            }
        )
    return pd.DataFrame(rows)


def decide(
    emb: Embeddings, a: np.ndarray, b: np.ndarray, dc: DedupConfig, near_reference: np.ndarray
) -> dict[str, pd.DataFrame]:
    """Group rows joined by pairs (a, b), pick each group's survivor, apply the filters; the three output tables."""
    rows, n = emb.rows, len(emb.rows)
    filters = drop_filters(rows, dc, near_reference)
    eligible = ~(filters.get("low_clip_score", np.zeros(n, bool)) | filters["near_reference"])
    members, group, keeper = assign_groups(n, a, b, keeper_rank(rows, dc.keep, eligible))
    vector_of = np.full(n, -1, np.int64)
    vector_of[emb.row_of] = np.arange(len(emb.row_of))
    _, sim = nb.verify(emb.vectors, vector_of[members], emb.vectors, vector_of[keeper], -np.inf)
    is_keeper = members == keeper
    sim[is_keeper] = 1.0
    sha = rows["sha256"].to_numpy(object) if "sha256" in rows else np.full(n, None, object)
    exact = pd.notna(sha[members]) & (sha[members] == sha[keeper])
    group_near = np.zeros(group.max() + 1 if len(group) else 0, bool)
    np.logical_or.at(group_near, group, ~exact)
    member_reason = np.where(is_keeper, np.where(group_near[group], "near", "exact"), np.where(exact, "exact", "near"))
    reason = np.full(n, None, object)
    reason[members[~is_keeper]] = member_reason[~is_keeper]
    for name in REASONS[2:]:
        if name in filters:
            reason[filters[name]] = name
    dropped = pd.notna(reason)
    key, shard = rows["key"].to_numpy(object), rows["shard"].astype(str).to_numpy(object)
    in_group = np.zeros(n, bool)
    in_group[members] = True
    return {
        "duplicates": pd.DataFrame(
            {
                "key": key[members],
                "shard": shard[members],
                "group_id": group,
                "kept": ~dropped[members],
                "matched_key": key[keeper],
                "similarity": sim.astype(np.float32),
                "reason": member_reason,
            }
        ),
        "keep": pd.DataFrame(
            {
                "key": key[~dropped],
                "shard": shard[~dropped],
                "reason": np.where(in_group[~dropped], "group_keeper", "unique"),
            }
        ),
        "drop": pd.DataFrame({"key": key[dropped], "shard": shard[dropped], "reason": reason[dropped].astype(str)}),
    }
