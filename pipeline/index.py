"""The index stage: autofaiss image/text indices over an embed output, an id->sample map, appends, quality.

Output folder (default `<input>/index`), per modality M in {image, text}:
  M.index        the faiss index (inner product on L2-normalized CLIP embeddings)
  M_ids.parquet  id -> shard, row (position in the shard's npy and metadata), key, caption, url; ids are
                 assigned shard by shard in sorted shard-id order, rows in file order, so the mapping never
                 depends on how a filesystem lists files; shards appended later get the ids after those
  M.json         written last (the commit marker): autofaiss's index infos, the shards included, the embed
                 folder and its manifest's model identity and model_config, and the measured quality
Rows whose vector is zero (image: status != "ok"; text: missing caption or unread sample) are not indexed.
A later run with new committed shards adds them to the trained index (no retraining) unless index.rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import types
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import faiss
import fsspec
import numpy as np
import pandas as pd

from pipeline.config import Config, ConfigError, IndexConfig, require
from pipeline.index_quality import iter_vectors, measure, read_shard, sample_vectors
from pipeline.summary import JobFailed
from pipeline.writer import TMP_MARK, committed_shards, read_manifest

log = logging.getLogger(__name__)

INDEX_FORMAT_VERSION = 1
IDS_COLUMNS = ["id", "shard", "row", "key", "caption", "url"]


@dataclass(frozen=True)
class IndexFiles:
    """The three files one modality's index owns; the only place their names are built."""

    index: str
    ids: str
    info: str


def index_files(output: str, modality: str) -> IndexFiles:
    j = posixpath.join
    return IndexFiles(
        j(output, f"{modality}.index"), j(output, f"{modality}_ids.parquet"), j(output, f"{modality}.json")
    )


def read_info(output: str, modality: str) -> dict[str, Any] | None:
    fs, path = fsspec.core.url_to_fs(index_files(output, modality).info)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)  # type: ignore[no-any-return]


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def _abs(path: str) -> str:
    fs, p = fsspec.core.url_to_fs(path)
    return os.path.abspath(p) if is_local(fs) else path


# ---- autofaiss -------------------------------------------------------------------------------------------


class _FaissOPQKeywords(types.ModuleType):
    """faiss as autofaiss 2.18's index factory sees it: OPQMatrix also accepts the old `M=` keyword."""

    def __init__(self, real: types.ModuleType):
        super().__init__("faiss")
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def OPQMatrix(self, d: int = 0, M: int = 1, d2: int = -1) -> Any:  # noqa: N802 (faiss's name)
        return self._real.OPQMatrix(d, M, d2)


def patch_autofaiss_opq() -> None:
    """autofaiss 2.18 builds OPQ indices with faiss.OPQMatrix(d, M=.., d2=..); faiss 1.15 renamed M to M_in,
    so every OPQ key autofaiss picks raises TypeError. Only autofaiss's factory module sees the shim."""
    import autofaiss.indices.index_factory as factory

    try:
        faiss.OPQMatrix(8, M=2, d2=8)
        return
    except TypeError:
        pass
    if not isinstance(factory.faiss, _FaissOPQKeywords):
        factory.faiss = _FaissOPQKeywords(faiss)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def _autofaiss_errors() -> Iterator[list[str]]:
    """autofaiss logs why it gives up and returns (None, None); keep those messages for the JobFailed."""
    handler = _Collect()
    logger = logging.getLogger("autofaiss")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def run_autofaiss(
    vectors_dir: str, n: int, dim: int, ix: IndexConfig, modality: str, tmp_dir: str, distributed: bool
) -> tuple[faiss.Index, dict[str, Any]]:
    """Train and fill an index with autofaiss from a folder of npy files; raises JobFailed when it gives up."""
    from autofaiss import build_index
    from autofaiss.external.optimize import get_optimal_index_keys_v2

    patch_autofaiss_opq()
    if ix.index_key is None and not get_optimal_index_keys_v2(
        n, dim, ix.max_index_memory_usage, should_be_memory_mappable=distributed
    ):
        raise JobFailed(
            f"{modality}: no index type fits index.max_index_memory_usage={ix.max_index_memory_usage} "
            f"for {n} vectors of dim {dim}; raise it or set index.index_key"
        )
    with _autofaiss_errors() as errors:
        try:
            index, infos = build_index(
                embeddings=vectors_dir,
                index_path=None,
                index_infos_path=None,
                save_on_disk=False,
                index_key=ix.index_key,
                max_index_query_time_ms=ix.max_index_query_time_ms,
                max_index_memory_usage=ix.max_index_memory_usage,
                current_memory_available=ix.current_memory_available,
                metric_type="ip",
                nb_cores=ix.nb_cores,
                distributed="pyspark" if distributed else None,
                temporary_indices_folder=posixpath.join(tmp_dir, "autofaiss"),
                verbose=logging.getLogger().getEffectiveLevel(),
            )
        except Exception as e:  # autofaiss raises many types; the stage reports one failure with its cause
            raise JobFailed(f"autofaiss failed to build the {modality} index: {type(e).__name__}: {e}") from e
    if index is None:
        reason = "; ".join(errors) or "autofaiss returned no index and logged no reason"
        raise JobFailed(f"autofaiss did not build the {modality} index: {reason}")
    return index, dict(infos or {})


# ---- writing ---------------------------------------------------------------------------------------------


def _tmp(path: str) -> str:
    return f"{path}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def commit(output: str, modality: str, index: faiss.Index, ids: pd.DataFrame, info: dict[str, Any]) -> int:
    """Write index, ids, then info under temporary names and rename them, info last; returns the index size."""
    fs, _ = fsspec.core.url_to_fs(output)
    files = index_files(output, modality)
    fs.makedirs(output, exist_ok=True)
    tmp = {p: _tmp(p) for p in (files.index, files.ids, files.info)}
    with fs.open(tmp[files.index], "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # type: ignore[attr-defined]
    size = int(fs.size(tmp[files.index]))
    with fs.open(tmp[files.ids], "wb") as f:
        ids[IDS_COLUMNS].to_parquet(f, index=False)
    info = dict(info, size_bytes=size)
    with fs.open(tmp[files.info], "w") as f:
        json.dump(info, f, indent=1, default=str)
    for final in (files.index, files.ids, files.info):
        fs.mv(tmp[final], final)
    return size


def read_index(path: str, mmap: bool = False) -> faiss.Index:
    """Read a faiss index; memory-mapped and read-only when asked and the type allows it."""
    fs, p = fsspec.core.url_to_fs(path)
    if not is_local(fs):
        with fs.open(p, "rb") as f:
            return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))
    if mmap:
        try:
            return faiss.read_index(p, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:  # index types faiss cannot map are read into memory
            log.info("%s cannot be memory-mapped (%s); reading it into memory", path, str(e).splitlines()[0])
    return faiss.read_index(p)


# ---- the stage -------------------------------------------------------------------------------------------


def _check_append(
    info: dict[str, Any], manifest: dict[str, Any], shards: list[str], modality: str, embed_dir: str
) -> None:
    """Appending is only sound for the same model and when no indexed shard disappeared."""
    old = info.get("embed", {})
    if old.get("model") != manifest.get("model") or old.get("dim", manifest.get("dim")) != manifest.get("dim"):
        raise ConfigError(
            f"index: the existing {modality} index holds embeddings of model {old.get('model')} (dim {old.get('dim')}) "
            f"but input={embed_dir} was made with {manifest.get('model')} (dim {manifest.get('dim')}); "
            "set index.rebuild=true or use another output"
        )
    gone = sorted(set(info["shards"]) - set(shards))
    if gone:
        raise ConfigError(
            f"index: shards {gone[:5]} of the existing {modality} index are not committed in "
            f"input={embed_dir}; set index.rebuild=true"
        )


def _build_new(
    cfg: Config, embed_dir: str, output: str, modality: str, shards: list[str]
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
            x, t = read_shard(embed_dir, sid, modality)
            t.insert(0, "id", np.arange(n, n + len(t), dtype=np.int64))
            tables.append(t)
            if len(x):
                # The ordinal prefix fixes the order embedding-reader (which sorts paths) feeds vectors in.
                with fs.open(posixpath.join(stage, f"{ordinal:09d}.npy"), "wb") as f:
                    np.save(f, x)
                n, dim = n + len(x), x.shape[1]
        if n == 0:
            raise JobFailed(f"no {modality} vectors to index: every row of {len(shards)} shards failed or is empty")
        index, infos = run_autofaiss(stage, n, dim, cfg.index, modality, tmp_dir, cfg.index.distributed)
    finally:
        fs.rm(tmp_dir, recursive=True)
    if index.ntotal != n:
        raise JobFailed(f"autofaiss built a {modality} index of {index.ntotal} vectors, expected {n}")
    return index, pd.concat(tables, ignore_index=True), infos


class InterruptedCommit(JobFailed):
    """The index, its id map and its json disagree: a run was killed between their renames."""


def _append(
    embed_dir: str, output: str, modality: str, info: dict[str, Any], new: list[str]
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
        x, t = read_shard(embed_dir, sid, modality)
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
    cfg: Config, embed_dir: str, output: str, modality: str, shards: list[str], manifest: dict[str, Any]
) -> dict[str, Any]:
    t0 = time.perf_counter()
    info = read_info(output, modality)
    fresh = info is None or cfg.index.rebuild or not cfg.index.append
    if not fresh:
        assert info is not None
        _check_append(info, manifest, shards, modality, embed_dir)
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
            index, ids = _append(embed_dir, output, modality, info, new)
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
        index, ids, infos = _build_new(cfg, embed_dir, output, modality, shards)
        history = [{"action": "built", "shards": len(shards), "time": time.time()}]
    other = "text" if modality == "image" else "image"
    cross = sample_vectors(embed_dir, shards, other, cfg.index.recall_queries) if manifest.get(other, True) else None
    quality = measure(index, lambda: iter_vectors(embed_dir, shards, modality), cfg.index.recall_queries, cross)
    out = {
        "format_version": INDEX_FORMAT_VERSION,
        "modality": modality,
        "metric": "ip",
        "index_key": infos.get("index_key"),
        "index_param": infos.get("index_param"),
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "shards": shards,
        "embed": {
            "path": _abs(embed_dir),
            "model": manifest.get("model"),
            "model_config": manifest.get("model_config"),
            "dim": manifest.get("dim"),
            "output_dtype": manifest.get("output_dtype"),
        },
        "autofaiss": infos,
        "quality": quality,
        "history": history,
    }
    out["size_bytes"] = commit(output, modality, index, ids, out)
    return _summary(out, "appended" if not fresh else "built", len(new), time.perf_counter() - t0)


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


def _spark(cfg: Config) -> Any:
    """autofaiss's pyspark mode uses the active session: make it ours (cfg.spark), not its local[1] default."""
    if not cfg.index.distributed:
        return nullcontext()
    if cfg.distributor != "spark":
        raise ConfigError("index.distributed=true needs distributor=spark")
    from pipeline.spark import spark_session

    return spark_session(cfg)


@contextmanager
def _restore_threads(threads: int) -> Iterator[None]:
    """autofaiss sets faiss's process-wide thread count; give the caller back its own."""
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)


def build(cfg: Config) -> dict[str, Any]:
    """Build or extend OUTPUT/{image,text}.index from the embed output at cfg.input; returns the summary."""
    require(cfg, "input")
    if not isinstance(cfg.input, str):
        raise ConfigError("input: expected one embed output folder, got a list")
    embed_dir = cfg.input.rstrip("/")
    output = (cfg.output or posixpath.join(embed_dir, "index")).rstrip("/")
    manifest = read_manifest(embed_dir)
    if manifest is None:
        raise ConfigError(f"input={embed_dir}: no manifest.json; expected the output folder of `clipline embed`")
    shards = committed_shards(embed_dir)
    if not shards:
        raise ConfigError(f"input={embed_dir}: no committed shards to index")
    modalities = [m for m in cfg.index.modalities if manifest.get(m, True)]
    for m in set(cfg.index.modalities) - set(modalities):
        log.warning("index.modalities has %s but input=%s holds no %s embeddings; skipped", m, embed_dir, m)
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"output": output, "shards": len(shards)}
    threads = faiss.omp_get_max_threads()
    with _spark(cfg), _restore_threads(threads):
        faiss.omp_set_num_threads(cfg.index.nb_cores or threads)
        for m in modalities:
            try:
                summary[m] = _index_modality(cfg, embed_dir, output, m, shards, manifest)
            except JobFailed as e:
                e.summary = dict(summary, **e.summary)
                raise
    summary["wall_seconds"] = round(time.perf_counter() - t0, 2)
    return summary
