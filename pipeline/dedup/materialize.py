"""Writing dedup results: keep/drop tables, summary and histogram (each under a temporary name, then renamed), and
the deduplicated dataset itself: filtered WebDataset shards streamed member by member, and a URL list.

OUTPUT/summary.json, written last, is the commit marker of a dedup output: `uncommit` removes it (and temporary files
of killed runs) before a run replaces any file, so the other files are one run's whenever it exists."""

from __future__ import annotations

import io
import logging
import posixpath
import re
import tarfile
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.fsio import TMP_MARK, discard, put_bytes, tmp_name
from pipeline.core.inputs import expand_input, shard_id_from_name
from pipeline.embeddings.read import EmbeddingSet

log = logging.getLogger(__name__)


_TEXT = pa.string()
SCHEMAS = {
    "duplicates": pa.schema(
        [
            ("key", _TEXT),
            ("shard", _TEXT),
            ("group_id", pa.int64()),
            ("kept", pa.bool_()),
            ("matched_key", _TEXT),
            ("similarity", pa.float32()),
            ("reason", _TEXT),
        ]
    ),
    "keep": pa.schema([("key", _TEXT), ("shard", _TEXT), ("reason", _TEXT)]),
    "drop": pa.schema([("key", _TEXT), ("shard", _TEXT), ("reason", _TEXT)]),
    "reference_matches": pa.schema(
        [
            ("key", _TEXT),
            ("shard", _TEXT),
            ("reference_key", _TEXT),
            ("reference_shard", _TEXT),
            ("similarity", pa.float32()),
        ]
    ),
}


URLS_SCHEMA = pa.schema([("key", _TEXT), ("url", _TEXT), ("caption", _TEXT)])
SUMMARY = "summary.json"
TABLES = ("duplicates", "keep", "drop")


def table_path(output: str, name: str, shard: str | None = None) -> str:
    """OUTPUT/NAME.parquet: one file (single-process modes), or with `shard` one part of the folder of that name
    (the distributed steps write OUTPUT/NAME.parquet/SHARD.parquet; Parquet readers take the folder as one table)."""
    base = posixpath.join(output, f"{name}.parquet")
    return base if shard is None else posixpath.join(base, f"{shard}.parquet")


def read_table(output: str, name: str) -> pd.DataFrame:
    """One output table, written whole or sharded; empty parts keep the schema."""
    fs, path = fsspec.core.url_to_fs(table_path(output, name))
    if fs.isdir(path):
        files = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet") and TMP_MARK not in p)
        tables = [pq.read_table(fs.open(f, "rb")) for f in files]
        schema = SCHEMAS.get(name)
        if not tables:
            return schema.empty_table().to_pandas() if schema is not None else pd.DataFrame()
        return pa.concat_tables(tables).to_pandas()
    with fs.open(path, "rb") as f:
        return pd.read_parquet(f)


def remove_tables(output: str) -> None:
    """Every output table in either form, and the materialized URL list (a new plan replaces them all)."""
    fs, root = fsspec.core.url_to_fs(output)
    for name in (*TABLES, "urls", "reference_matches"):
        p = posixpath.join(root, f"{name}.parquet")
        if fs.exists(p):
            fs.rm(p, recursive=True)


def uncommit(output: str) -> None:
    """Before a run writes: drop the earlier run's summary.json and temporary files that killed runs left."""
    fs, root = fsspec.core.url_to_fs(output)
    for folder in (root, posixpath.join(root, "shards")):
        if fs.isdir(folder):
            for p in fs.ls(folder, detail=False):
                if TMP_MARK in posixpath.basename(p):
                    fs.rm(p, recursive=True)
    summary = posixpath.join(root, SUMMARY)
    if fs.exists(summary):
        fs.rm(summary)


def write_histogram(nn_sim: np.ndarray, threshold: float, path: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Histogram of each sample's nearest-neighbour similarity, threshold marked (Agg backend: no display needed);
    returns the (counts, bin edges) drawn."""
    sims = nn_sim[np.isfinite(nn_sim)]
    counts, edges = np.histogram(sims, bins=np.linspace(min(float(sims.min(initial=0.0)), threshold - 0.05), 1.0, 101))
    draw_histogram(counts, edges, threshold, path, method)
    return counts, edges


def draw_histogram(counts: np.ndarray, edges: np.ndarray, threshold: float, path: str, method: str) -> None:
    """The histogram figure from counts already made (the distributed steps sum them over shards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sims_n = int(np.sum(counts))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stairs(counts, edges, fill=True, alpha=0.7)
    ax.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold:g}")
    ax.set_yscale("log")
    ax.set_xlabel("cosine similarity to nearest neighbour")
    ax.set_ylabel("samples")
    ax.set_title(f"Nearest-neighbour similarity ({method}, {sims_n} samples)")
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    fs, p = fsspec.core.url_to_fs(path)
    put_bytes(fs, p, buf.getvalue())


# webdataset's base_plus_ext rule (what the embed reader uses), restated: importing webdataset loads torch (~0.5 GB).
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def member_key(name: str) -> str | None:
    """The sample key of a tar member, as the embed reader derives it (basename of the part before the extension)."""
    m = _KEY_EXT.match(name)
    return posixpath.basename(m.group(1)) if m else None


def filter_tar(src: str, dst: str, keep: set[str]) -> dict[str, int]:
    """Copy src to dst without the members of samples not in keep; one member in memory at a time, dst renamed
    into place only when complete."""
    fs, dpath = fsspec.core.url_to_fs(dst)
    fs.makedirs(posixpath.dirname(dpath), exist_ok=True)
    tmp = tmp_name(dpath)
    kept, dropped = set(), set()
    try:
        with fsspec.open(src, "rb") as fin, fs.open(tmp, "wb") as fout:
            with tarfile.open(fileobj=fin, mode="r|*") as tin, tarfile.open(fileobj=fout, mode="w|") as tout:
                for member in tin:
                    key = member_key(member.name) if member.isfile() else None
                    if key is None or key not in keep:
                        dropped.add(key)
                        continue
                    kept.add(key)
                    tout.addfile(member, tin.extractfile(member))
        fs.mv(tmp, dpath)
    except BaseException:
        discard(fs, tmp)
        raise
    return {"samples_kept": len(kept), "samples_removed": len(dropped - {None})}


def tar_shards(spec: str) -> dict[str, str]:
    """shard id -> tar URL of the WebDataset shards named by dedup.shards (img2dataset output folder, pattern...)."""
    tars = [u for u in expand_input(spec) if u.lower().endswith(".tar")]
    if not tars:
        raise ConfigError(f"dedup.shards: {spec!r} names no .tar shards")
    return {shard_id_from_name(u): u for u in tars}


def write_urls(emb: EmbeddingSet, keep: pd.DataFrame, path: str) -> int:
    """urls.parquet: key, url, caption of the kept samples, streamed shard by shard from the embed metadata."""
    fs, final = fsspec.core.url_to_fs(path)
    tmp = tmp_name(final)
    kept_by_shard = keep.groupby("shard")["key"].agg(set).to_dict()
    schema = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string())])
    rows = 0
    try:
        with fs.open(tmp, "wb") as f, pq.ParquetWriter(f, schema) as w:
            for sid in emb.shards:
                t = pa.Table.from_pandas(emb.metadata(sid, ["key", "url", "caption"]), preserve_index=False)
                mask = pa.array(np.isin(t["key"].to_numpy(zero_copy_only=False), list(kept_by_shard.get(sid, ()))))
                t = t.filter(mask).cast(schema)
                rows += t.num_rows
                w.write_table(t)
        fs.mv(tmp, final)
    except BaseException:
        discard(fs, tmp)
        raise
    return rows


def materialize(emb: EmbeddingSet, spec: str | None, output: str, keep: pd.DataFrame) -> dict[str, Any]:
    """Filtered copies of the embedded tar shards (OUTPUT/shards/{shard}.tar) and OUTPUT/urls.parquet."""
    if spec is None:
        raise ConfigError("dedup.shards: required when dedup.materialize=true")
    tars = tar_shards(spec)
    shard_ids = emb.shards
    missing = sorted(set(shard_ids) - set(tars))
    if missing:
        log.warning("materialize: %d embedded shards have no tar in %s (first: %s)", len(missing), spec, missing[:3])
    kept_by_shard = keep.groupby("shard")["key"].agg(set).to_dict()
    totals = {"shards": 0, "samples_kept": 0, "samples_removed": 0}
    for sid in shard_ids:
        if sid not in tars:
            continue
        counts = filter_tar(tars[sid], posixpath.join(output, "shards", f"{sid}.tar"), kept_by_shard.get(sid, set()))
        totals["shards"] += 1
        for k, v in counts.items():
            totals[k] += v
    totals["urls"] = write_urls(emb, keep, posixpath.join(output, "urls.parquet"))
    return totals
