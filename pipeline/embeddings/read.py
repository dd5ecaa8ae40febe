"""Reading embeddings back, for every stage after embed (index, dedup, query, classify, report), whatever wrote them:
`EmbeddingSet` over one input format's `Source` (formats.py, foreign.py) gives the shards, each shard's vectors with
the one validity rule (`valid_rows`), unit-norm rows and its metadata, every read bounded in time and, for the
vectors, in size (`embeddings.chunk_rows` rows at a time). Stages see only this class, never the format."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from pipeline.core.config import EmbeddingsConfig
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.timeouts import within
from pipeline.embeddings.formats import MODALITIES, Source
from pipeline.embeddings.registry import source_for
from pipeline.embeddings.rows import RowArray

log = logging.getLogger(__name__)

# A stored vector whose norm is further than this from 1 is normalized (and counted): float16 rounding stays within
# about 1e-3 of 1, so this catches only vectors that were never normalized.
NORM_TOLERANCE = 1e-2


def vector_state(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(finite, not all zeros) of each row, with one boolean temporary of the block's size each."""
    x = np.asarray(x)
    if not len(x):
        return np.zeros(0, bool), np.zeros(0, bool)
    return np.isfinite(x).all(axis=1), (x != 0).any(axis=1)


def usable(x: np.ndarray) -> np.ndarray:
    """Rows that hold a vector: finite and not all zeros (failed rows are stored as zero vectors)."""
    finite, nonzero = vector_state(x)
    return finite & nonzero


def valid_rows(meta_ok: np.ndarray, vectors: np.ndarray, modality: str) -> np.ndarray:
    """The one rule for which rows hold a usable vector: the metadata says the modality was embedded (`meta_ok`, from
    the format: clipline's status columns; other tools keep none) and the vector is finite and not all zeros."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}")
    return np.asarray(meta_ok, bool) & usable(vectors)


def off_unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(norms, rows whose norm is off 1 by more than NORM_TOLERANCE) of usable rows, summed in float32 without a
    float32 copy of the rows."""
    x = np.asarray(x)
    if not len(x):
        return np.zeros(0, np.float32), np.zeros(0, bool)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return norms, np.abs(norms - 1) > NORM_TOLERANCE


def unit_rows(x: np.ndarray, dtype: np.dtype[Any]) -> tuple[np.ndarray, int]:
    """Rows (all usable) with every norm off 1 by more than NORM_TOLERANCE normalized; (rows as dtype, count)."""
    norms, off = off_unit(x)
    if not off.any():
        return np.asarray(x).astype(dtype, copy=False), 0
    y = np.asarray(x).astype(np.float32)
    np.divide(y, norms[:, None], out=y, where=off[:, None])
    return y.astype(dtype, copy=False), int(off.sum())


def needs_output(folder: str, output: str | None, setting: str = "output") -> None:
    """Stages write beside their input by default; when the input is one file (npy, parquet) there is no folder to
    write in, so an output must be given (ConfigError before any work)."""
    if output:
        return
    fs, path = fsspec.core.url_to_fs(folder)
    if fs.isfile(path):
        raise ConfigError(f"{setting}: required when input={folder} is a file (the default output is inside the input)")


@dataclass
class Counts:
    """What reading one shard of one modality found: rows, rows skipped (zero or not finite vectors, where the
    metadata did not already mark them failed) and rows normalized."""

    rows: int = 0
    failed: int = 0  # the metadata says not embedded (clipline's status columns)
    zero: int = 0
    nonfinite: int = 0
    normalized: int = 0


@dataclass
class Chunk:
    """Up to `embeddings.chunk_rows` rows of one shard: the valid ones' positions, unit vectors and metadata rows."""

    shard: str
    rows: np.ndarray
    vectors: np.ndarray
    meta: pd.DataFrame


@dataclass
class ShardRead:
    """One shard's vectors of one modality (read in place), which rows are valid, and their metadata."""

    shard: str
    vectors: RowArray
    valid: np.ndarray
    meta: pd.DataFrame
    dtype: np.dtype[Any] = field(default_factory=lambda: np.dtype("float32"))

    @property
    def rows(self) -> np.ndarray:
        """Positions (in the shard's files) of the valid rows."""
        return np.flatnonzero(self.valid)

    def kept(self) -> np.ndarray:
        """The valid rows' unit vectors, in row order (the whole shard in memory: for shards known to be small)."""
        return unit_rows(self.vectors[self.rows], self.dtype)[0]


class EmbeddingSet:
    """Embeddings opened for reading: shards, modalities, width, the model that made them (when recorded), and each
    shard's valid unit vectors and metadata.

    `options` picks the input format (`embeddings.*`, default clipline's own); `read_timeout_s` bounds every single
    read (a stalled object store fails the stage instead of hanging it). `shards` opens just those shards without
    listing or checking the folder (a worker handed shards the driver already listed).
    """

    def __init__(
        self,
        folder: str,
        read_timeout_s: float | None = None,
        options: EmbeddingsConfig | None = None,
        shards: Sequence[str] | None = None,
    ):
        self.folder = folder.rstrip("/")
        self.read_timeout_s = read_timeout_s
        self.options = options or EmbeddingsConfig()
        self.source: Source = source_for(self.folder, self.options, self._bounded)
        self.shards = list(shards) if shards is not None else self.source.list_shards()
        self.counts: dict[tuple[str, str], Counts] = {}

    def _bounded(self, what: str, fn):  # type: ignore[no-untyped-def]
        return within(self.read_timeout_s, what, fn)

    @property
    def input_format(self) -> str:
        return self.source.name

    @property
    def manifest(self) -> dict[str, Any]:
        """clipline's manifest; empty for formats that have none."""
        return self.source.manifest

    @property
    def model(self) -> dict[str, Any] | None:
        """Fingerprint of the model that made the vectors, when the folder records one (clipline's manifest)."""
        return self.manifest.get("model")

    @property
    def modalities(self) -> list[str]:
        """The modalities the folder holds vectors for."""
        return self.source.modalities

    @functools.cached_property
    def dim(self) -> int:
        """Embedding width."""
        return self.source.dim(self.shards)

    @functools.cached_property
    def dtype(self) -> np.dtype[Any]:
        """What vectors are handed out as: the stored float16/float32, float32 for anything else."""
        d = self.source.vectors(self.shards[0], self.modalities[0]).dtype
        return d if d in (np.dtype("float16"), np.dtype("float32")) else np.dtype("float32")

    def describe(self) -> dict[str, Any]:
        """What an index records about its input: path and format options, model, width, dtype."""
        return {
            **self.source.describe(),
            "model": self.model,
            "model_config": self.manifest.get("model_config"),
            "dim": self.dim,
            "output_dtype": str(self.dtype),
        }

    def vector_path(self, shard: str, modality: str) -> str:
        return self.source.vector_path(shard, modality)

    def rows(self, shard: str) -> int:
        """Rows the shard holds, valid or not (from headers where the format has them)."""
        return self.source.row_count(shard)

    def metadata(self, shard: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """The shard's metadata rows (all of them, file order) under clipline's column names; None: every column."""
        return self.source.metadata(shard, columns)

    def embedded(self, meta: pd.DataFrame, modality: str) -> np.ndarray:
        """Rows of `meta` (read with `status_columns()` among its columns) that the format says hold a vector of
        `modality`: clipline's status columns; formats that keep none: every row."""
        return self.source.meta_valid(meta, modality)

    def status_columns(self) -> list[str]:
        """The metadata columns `embedded` reads (none for formats that keep no per-row status)."""
        return self.source.wanted_status()

    def vectors(self, shard: str, modality: str) -> RowArray:
        """The shard's vectors of one modality, every row, as stored, read in place (memory-mapped where local)."""
        return self.source.vectors(shard, modality)

    def _open(self, shard: str, modality: str, columns: Sequence[str]) -> tuple[pd.DataFrame, RowArray, np.ndarray]:
        wanted = list(dict.fromkeys([*columns, *self.source.wanted_status()]))
        meta = self.metadata(shard, wanted)
        vectors = self.vectors(shard, modality)
        if len(meta) != len(vectors):
            raise JobFailed(
                f"{self.folder}: shard {shard} has {len(meta)} metadata rows but {len(vectors)} {modality} embeddings "
                f"({self.vector_path(shard, modality)})"
            )
        return meta, vectors, self.source.meta_valid(meta, modality)

    @staticmethod
    def _scan(c: Counts, meta_ok: np.ndarray, x: np.ndarray, modality: str) -> np.ndarray:
        """Validity of one block of rows and its `meta_ok` (valid_rows' rule), added to the shard's counts."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}")
        finite, nonzero = vector_state(x)
        good = meta_ok & finite & nonzero
        c.rows += len(x)
        c.failed += int((~meta_ok).sum())
        c.nonfinite += int((meta_ok & ~finite).sum())
        c.zero += int((meta_ok & finite & ~nonzero).sum())
        return good

    def _record(self, shard: str, modality: str, c: Counts) -> None:
        """Keep a shard's counts (once: a shard read twice is counted once) and say what was skipped or fixed."""
        key = (shard, modality)
        if key in self.counts:
            return
        self.counts[key] = c
        where = self.vector_path(shard, modality)
        if c.zero or c.nonfinite:
            log.warning(
                "%s: skipped %d %s rows with a zero and %d with a non-finite vector",
                where,
                c.zero,
                modality,
                c.nonfinite,
            )
        if c.normalized:
            log.info("%s: %d vectors were not unit-norm; normalized", where, c.normalized)

    def chunks(self, shard: str, modality: str, columns: Sequence[str] = ("key",)) -> Iterator[Chunk]:
        """The shard's valid rows in file order, `embeddings.chunk_rows` rows of the file at a time, read once."""
        meta, vectors, meta_ok = self._open(shard, modality, columns)
        c, step = Counts(), self.options.chunk_rows
        for start in range(0, len(vectors), step):
            x = vectors[start : start + step]
            good = self._scan(c, meta_ok[start : start + len(x)], x, modality)
            y, n = unit_rows(x[good], self.dtype)
            c.normalized += n
            rows = start + np.flatnonzero(good)
            yield Chunk(shard, rows, y, meta.iloc[rows].reset_index(drop=True))
            del x
        self._record(shard, modality, c)

    def read(self, shard: str, modality: str, columns: Sequence[str] = ("key",)) -> ShardRead:
        """One shard of one modality with the validity mask (vectors scanned a chunk at a time, left in place)."""
        meta, vectors, meta_ok = self._open(shard, modality, columns)
        c, step, parts = Counts(), self.options.chunk_rows, []
        for start in range(0, len(vectors), step):
            x = vectors[start : start + step]
            good = self._scan(c, meta_ok[start : start + len(x)], x, modality)
            c.normalized += int(off_unit(x[good])[1].sum())
            parts.append(good)
        self._record(shard, modality, c)
        valid = np.concatenate(parts) if parts else np.zeros(0, bool)
        return ShardRead(shard, vectors, valid, meta, self.dtype)

    def iter_kept(self, modality: str, shards: Sequence[str] | None = None) -> Iterator[np.ndarray]:
        """The valid unit vectors in blocks of at most `embeddings.chunk_rows`, in shard order (the order index ids
        are given in)."""
        for shard in self.shards if shards is None else shards:
            for chunk in self.chunks(shard, modality, ()):
                yield chunk.vectors

    def take(self, shard: str, rows: np.ndarray, modality: str) -> np.ndarray:
        """Some stored rows of a shard as float32 unit vectors (rows known to be valid)."""
        return unit_rows(np.asarray(self.vectors(shard, modality)[np.asarray(rows, np.int64)]), np.dtype("float32"))[0]

    def vector(self, shard: str, row: int, modality: str) -> np.ndarray:
        """One stored vector, as a float32 unit vector."""
        return self.take(shard, np.array([row]), modality)[0]

    def report(self) -> dict[str, Any]:
        """What reading found so far, for a stage's summary: the input format, rows whose vector was skipped (zero or
        not finite although the metadata did not mark them failed) and vectors normalized."""
        total = Counts()
        for c in self.counts.values():
            total.zero += c.zero
            total.nonfinite += c.nonfinite
            total.normalized += c.normalized
        return {
            "input_format": self.input_format,
            "skipped_zero_vectors": total.zero,
            "skipped_nonfinite_vectors": total.nonfinite,
            "normalized_vectors": total.normalized,
        }
