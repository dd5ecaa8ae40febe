"""autofaiss as the index stage drives it: the faiss 1.15 OPQ keyword shim, its give-ups turned into JobFailed,
its pyspark session, and faiss's thread count given back afterwards."""

from __future__ import annotations

import logging
import posixpath
import types
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import faiss

from pipeline.core.config import Config, IndexConfig
from pipeline.core.errors import JobFailed


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


def pyspark_session(cfg: Config) -> Any:
    """With distributor=spark autofaiss runs its pyspark mode on the active session: make it ours (cfg.spark), not
    its local[1] default."""
    if cfg.distributor != "spark":
        return nullcontext()
    from pipeline.distribute.spark_session import spark_session

    return spark_session(cfg)


@contextmanager
def restore_threads(threads: int) -> Iterator[None]:
    """autofaiss sets faiss's process-wide thread count; give the caller back its own."""
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)
