"""The index stage: autofaiss image/text indices over an embed output, an id->sample map, appends, quality.

Output folder (default `<input>/index`), per modality M in {image, text}:
  M.index        the faiss index (inner product on L2-normalized CLIP embeddings)
  M_ids.parquet  id -> shard, row (position in the shard's npy and metadata), key, caption, url; ids are
                 assigned shard by shard in sorted shard-id order, rows in file order, so the mapping never
                 depends on how a filesystem lists files; shards appended later get the ids after those
  M.json         renamed last (the commit marker): autofaiss's index infos, the shards included, the input
                 (path, format options, model identity and model_config, width), and the measured quality
The renames are journaled: the next run completes a commit killed during them, and first removes what killed runs
left (`index_store.py`). Rows whose vector is zero (image: status != "ok"; text: missing caption or unread sample)
are not indexed. A later run with new committed shards adds them to the trained index (no retraining) unless index.rebuild.
"""

from __future__ import annotations

import logging
import posixpath
import time
import uuid
from typing import Any, Iterator

import faiss
import fsspec
import numpy as np
import pandas as pd

from pipeline.core.config import Config, require
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.timeouts import naming_timeout
from pipeline.core.workdir import tempfiles_in, work_folder
from pipeline.embeddings.read import EmbeddingSet, needs_output
from pipeline.index.build import pyspark_session, restore_threads, run_autofaiss
from pipeline.index.quality import measure, sample_vectors
from pipeline.index.store import (
    ID_SOURCE_COLUMNS,
    absolute,
    commit,
    id_rows,
    index_files,
    read_index,
    read_info,
    recover,
)

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1


def _read(emb: EmbeddingSet, shard_id: str, modality: str) -> Iterator[tuple[np.ndarray, pd.DataFrame]]:
    """One shard's indexable vectors and their id-map rows, `embeddings.chunk_rows` rows of its file at a time."""
    for chunk in emb.chunks(shard_id, modality, ID_SOURCE_COLUMNS):
        yield chunk.vectors, id_rows(chunk)


def embed_record(cfg: Config, emb: EmbeddingSet) -> dict[str, Any]:
    """What the index records about its input (M.json `embed`): path, format options, model, width, dtype. For
    embeddings without a recorded model, model.* is recorded (embeddings.record_model), its width checked first."""
    from pipeline.embeddings.modelcheck import to_record
    from pipeline.models import ModelLoadError

    out = {"path": absolute(emb.folder), **emb.describe()}
    if out.get("model") is None and emb.input_format != "clipline" and cfg.embeddings.record_model:
        try:
            out["model"], out["model_config"] = to_record(cfg.model, emb.dim, f"input={emb.folder}")
        except ModelLoadError as e:
            raise ConfigError(f"model: {e} (or set embeddings.record_model=false)") from e
    return out


def _check_append(info: dict[str, Any], record: dict[str, Any], shards: list[str], modality: str) -> None:
    """Appending is only sound for the same model, width and input format, and when no indexed shard disappeared."""
    old = info.get("embed", {})
    embed_dir = record["path"]
    # indices of older versions record no input_format (clipline's) and may record no dim (unknown: not compared)
    same = (old.get("model"), old.get("dim") or record["dim"], old.get("input_format", "clipline")) == (
        record.get("model"),
        record["dim"],
        record["input_format"],
    )
    if not same:
        raise ConfigError(
            f"index: the existing {modality} index holds {old.get('input_format', 'clipline')} embeddings of model "
            f"{old.get('model')} (dim {old.get('dim')}) but input={embed_dir} holds {record['input_format']} "
            f"embeddings of {record.get('model')} (dim {record['dim']}); set index.rebuild=true or use another output"
        )
    gone = sorted(set(info["shards"]) - set(shards))
    if gone:
        raise ConfigError(
            f"index: shards {gone[:5]} of the existing {modality} index are not in input={embed_dir}; "
            "set index.rebuild=true"
        )


def _build_new(
    cfg: Config, emb: EmbeddingSet, output: str, modality: str, shards: list[str]
) -> tuple[faiss.Index, pd.DataFrame, dict[str, Any]]:
    """Stage the indexable vectors (zero rows dropped) as npy files under OUTPUT and let autofaiss build."""
    fs, _ = fsspec.core.url_to_fs(output)
    # Under OUTPUT, not /tmp: Spark executors must read the staged vectors in distributed mode.
    tmp_dir = posixpath.join(output, f".tmp-build-{modality}-{uuid.uuid4().hex[:8]}")
    stage = posixpath.join(tmp_dir, "vectors")
    fs.makedirs(stage, exist_ok=True)
    try:
        tables, n, dim = [], 0, 0
        for ordinal, sid in enumerate(shards):
            for part, (x, t) in enumerate(_read(emb, sid, modality)):
                t.insert(0, "id", np.arange(n, n + len(t), dtype=np.int64))
                tables.append(t)
                if len(x):
                    # The ordinal prefix fixes the order embedding-reader (which sorts paths) feeds vectors in.
                    with fs.open(posixpath.join(stage, f"{ordinal:09d}_{part:06d}.npy"), "wb") as f:
                        np.save(f, x)
                    n, dim = n + len(x), x.shape[1]
        if n == 0:
            raise JobFailed(f"no {modality} vectors to index: every row of {len(shards)} shards failed or is empty")
        # autofaiss also makes temporary files of its own in the tempfile module's folder
        with work_folder("index") as local, tempfiles_in(local):
            index, infos = run_autofaiss(stage, n, dim, cfg.index, modality, tmp_dir, cfg.distributor == "spark")
    finally:
        fs.rm(tmp_dir, recursive=True)
    if index.ntotal != n:
        raise JobFailed(f"autofaiss built a {modality} index of {index.ntotal} vectors, expected {n}")
    return index, pd.concat(tables, ignore_index=True), infos


class InterruptedCommit(JobFailed):
    """The index, its id map and its json disagree: a run was killed between their renames."""


def _append(
    emb: EmbeddingSet, output: str, modality: str, info: dict[str, Any], new: list[str]
) -> tuple[faiss.Index, pd.DataFrame]:
    """Add the new shards' vectors to the trained index; ids continue after the last one."""
    files = index_files(output, modality)
    index = read_index(files.index)
    with fsspec.open(files.ids, "rb") as f:
        ids = pd.read_parquet(f)
    if not index.ntotal == info["ntotal"] == len(ids):
        raise InterruptedCommit(
            f"{output}: the {modality} index ({index.ntotal}), its json ({info['ntotal']}) and its id "
            f"map ({len(ids)}) disagree (interrupted write?); set index.rebuild=true"
        )
    ivf = faiss.try_extract_index_ivf(index)
    # Flat and HNSW indices number vectors implicitly (ntotal onwards) and reject explicit ids, as does an IVF
    # index with an array direct map; both give the same ids as add_with_ids would.
    with_ids = ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap  # type: ignore[attr-defined]
    tables, next_id = [ids], int(index.ntotal)
    for sid in new:
        for x, t in _read(emb, sid, modality):
            new_ids = np.arange(next_id, next_id + len(x), dtype=np.int64)
            if len(x):
                x = np.ascontiguousarray(x, dtype=np.float32)
                index.add_with_ids(x, new_ids) if with_ids else index.add(x)
            t.insert(0, "id", new_ids)
            tables.append(t)
            next_id += len(x)
    if index.ntotal != next_id:
        raise JobFailed(f"{modality}: index holds {index.ntotal} vectors after the append, expected {next_id}")
    return index, pd.concat(tables, ignore_index=True)


def _index_modality(
    cfg: Config, emb: EmbeddingSet, record: dict[str, Any], output: str, modality: str
) -> dict[str, Any]:
    shards = emb.shards
    t0 = time.perf_counter()
    info = read_info(output, modality)
    fresh = info is None or cfg.index.rebuild or not cfg.index.append
    if not fresh:
        assert info is not None
        _check_append(info, record, shards, modality)
        if cfg.index.index_key and cfg.index.index_key != info.get("index_key"):
            log.warning(
                "index.index_key=%s ignored: appending to the existing %s index (%s); set index.rebuild=true "
                "to change it",
                cfg.index.index_key,
                modality,
                info.get("index_key"),
            )
        new = [s for s in shards if s not in set(info["shards"])]
        if not new:
            log.info("%s index is up to date (%d shards)", modality, len(shards))
            return _summary(info, "up to date", 0, time.perf_counter() - t0)
        log.info("appending %d new shards to the %s index", len(new), modality)
        try:
            index, ids = _append(emb, output, modality, info, new)
        except InterruptedCommit as e:
            # A killed commit left a mix of old and new files: the only safe resume is a rebuild.
            log.warning("%s; rebuilding the %s index", e, modality)
            fresh = True
        else:
            history = info.get("history", []) + [{"action": "appended", "shards": new, "time": time.time()}]
            infos = info.get("autofaiss", {})
            # Shards in id order: appended shards come after the indexed ones, whatever their ids.
            shards = info["shards"] + new
    if fresh:
        new = shards
        index, ids, infos = _build_new(cfg, emb, output, modality, shards)
        history = [{"action": "built", "shards": len(shards), "time": time.time()}]
    quality = _quality(cfg, emb, index, modality, shards)
    out = {
        "format_version": INDEX_FORMAT_VERSION,
        "modality": modality,
        "metric": "ip",
        "index_key": infos.get("index_key"),
        "index_param": infos.get("index_param"),
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "shards": shards,
        "embed": record,
        "autofaiss": infos,
        "quality": quality,
        "history": history,
    }
    out["size_bytes"] = commit(output, modality, index, ids, out)
    return _summary(out, "appended" if not fresh else "built", len(new), time.perf_counter() - t0)


def _quality(cfg: Config, emb: EmbeddingSet, index: faiss.Index, modality: str, shards: list[str]) -> dict[str, Any]:
    n = cfg.index.recall_queries
    other = "text" if modality == "image" else "image"
    cross = sample_vectors(emb, other, n, shards=shards) if other in emb.modalities else None
    return measure(index, lambda: emb.iter_kept(modality, shards), n, cross)


def _summary(info: dict[str, Any], action: str, added: int, seconds: float) -> dict[str, Any]:
    q = info.get("quality", {})
    return {
        "action": action,
        "index_key": info.get("index_key"),
        "index_param": info.get("index_param"),
        "vectors": info.get("ntotal"),
        "size_mb": round(info.get("size_bytes", 0) / 1e6, 3),
        "recall@10": q.get("recall@10"),
        "recall@100": q.get("recall@100"),
        "cross_modal_recall@10": q.get("cross_modal_recall@10"),
        "avg_latency_ms": q.get("avg_latency_ms"),
        "p99_latency_ms": q.get("p99_latency_ms"),
        "shards": len(info.get("shards", [])),
        "shards_added": added,
        "seconds": round(seconds, 2),
    }


def default_output(cfg: Config) -> str | None:
    """Where build() writes when output= is not given: INPUT/index (None without one input folder)."""
    return posixpath.join(cfg.input.rstrip("/"), "index") if isinstance(cfg.input, str) else None


def build(cfg: Config) -> dict[str, Any]:
    """Build or extend OUTPUT/{image,text}.index from the embed output at cfg.input; returns the summary."""
    require(cfg, "input")
    if not isinstance(cfg.input, str):
        raise ConfigError("input: expected one embed output folder, got a list")
    emb = EmbeddingSet(cfg.input, cfg.index.read_timeout_s, cfg.embeddings)
    record = embed_record(cfg, emb)
    needs_output(emb.folder, cfg.output)
    output = str(cfg.output or default_output(cfg)).rstrip("/")
    modalities = [m for m in cfg.index.modalities if m in emb.modalities]
    for m in set(cfg.index.modalities) - set(modalities):
        log.warning("index.modalities has %s but input=%s holds no %s embeddings; skipped", m, emb.folder, m)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"output": output, "shards": len(emb.shards)}
    threads = faiss.omp_get_max_threads()
    with pyspark_session(cfg), restore_threads(threads), naming_timeout("index.read_timeout_s"):
        recover(output)
        faiss.omp_set_num_threads(cfg.index.nb_cores or threads)
        for m in modalities:
            try:
                summary[m] = _index_modality(cfg, emb, record, output, m)
            except JobFailed as e:
                e.summary = dict(summary, **e.summary)
                raise
    summary["input"] = emb.report()
    summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return summary
