"""Embeddings other tools wrote, read in place: clip-retrieval's layout (npy + metadata parquet paired by file name,
rows aligned by position, as embedding-reader's parquet_npy reads it) and plain npy arrays; Parquet files with an
embedding column build on the same base (`parquetfiles.py`). No commit markers: a shard counts when its files pair up, and every shard's row counts and widths
are checked from headers and footers when the folder is opened, before a stage writes anything."""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.fsio import is_temporary
from pipeline.embeddings.formats import STANDARD_COLUMNS, Source, natural_order, what_is_there
from pipeline.embeddings.rows import BadEmbeddings, RowArray, check_vectors_header

log = logging.getLogger(__name__)

# clip-retrieval's file names (clip_retrieval/clip_inference/writer.py): folder, prefix, suffix per kind
CLIP_RETRIEVAL = {
    "image": ("img_emb", "img_emb_", ".npy"),
    "text": ("text_emb", "text_emb_", ".npy"),
    "metadata": ("metadata", "metadata_", ".parquet"),
}
HEADER_THREADS = 16  # headers and footers are small reads: on an object store their latency, not bandwidth, counts
SHOWN = 5  # problems named in one error message


def parallel(fn: Callable[[str], Any], items: Sequence[str]) -> list[Any]:
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(min(HEADER_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def refuse(problems: list[str], what: str) -> None:
    if problems:
        more = f" (and {len(problems) - SHOWN} more)" if len(problems) > SHOWN else ""
        raise BadEmbeddings(f"{what}: " + "; ".join(problems[:SHOWN]) + more)


class ForeignSource(Source):
    """What the foreign formats share: metadata frames under clipline's column names, and row counts from headers."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self._rows: dict[str, int] = {}
        self._schema: dict[str, list[str]] = {}
        unknown = sorted(set(self.options.columns) - set(STANDARD_COLUMNS[3:]))
        if unknown:
            raise ConfigError(
                f"embeddings.columns: {', '.join(unknown)} are not columns stages use; "
                f"known: {', '.join(STANDARD_COLUMNS[3:])}"
            )

    def row_count(self, shard: str) -> int:
        return self._rows[shard] if shard in self._rows else super().row_count(shard)

    def meta_path(self, shard: str) -> str | None:
        """The Parquet file holding the shard's metadata columns (None: the format has none)."""
        return None

    def _footer(self, path: str) -> pq.FileMetaData:
        def read() -> pq.FileMetaData:
            with self.fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata

        return self.bounded(path, read)  # type: ignore[no-any-return]

    def _check_columns(self, path: str, names: list[str]) -> list[str]:
        wanted = [self.options.key_column] if self.options.key_column else []
        wanted += list(self.options.columns.values())
        return [f"{path} has no column {c!r} (it has {', '.join(names[:20])})" for c in wanted if c not in names]

    def _source_columns(self, shard: str, columns: Sequence[str]) -> dict[str, str]:
        """clipline name -> source column, for the asked-for columns the shard's file has."""
        names = self._schema.get(shard)
        path = self.meta_path(shard)
        if names is None and path is not None:
            names = self._schema[shard] = list(self._footer(path).schema.to_arrow_schema().names)
        names = names or []
        out = {}
        if "key" in columns and self.options.key_column:
            out["key"] = self.options.key_column
        for c in columns:
            if c in STANDARD_COLUMNS[3:]:
                src = self.options.columns.get(c, c)
                if src in names:
                    out[c] = src
        return out

    def metadata(self, shard: str, columns: Sequence[str] | None) -> pd.DataFrame:
        want = list(STANDARD_COLUMNS if columns is None else columns)
        mapping = self._source_columns(shard, want)
        path = self.meta_path(shard)
        table: pa.Table | None = None
        if path is not None:
            if mapping or shard not in self._rows:

                def read() -> pa.Table:
                    with self.fs.open(path, "rb") as f:
                        return pq.read_table(f, columns=sorted(set(mapping.values())))

                table = self.bounded(path, read)
                self._rows[shard] = table.num_rows
        n = self._rows.get(shard)
        if n is None:
            n = len(self.vectors(shard, self.modalities[0]))
        out: dict[str, Any] = {}
        for c in want:
            if c in mapping and table is not None:
                out[c] = table.column(mapping[c]).to_pandas()
            elif c == "key":
                out[c] = np.arange(n).astype(str).astype(object)
            elif c == "shard":
                out[c] = np.full(n, shard, object)
            elif c == "index":
                out[c] = np.arange(n, dtype=np.int32)
            else:
                out[c] = np.full(n, None, object)
        frame = pd.DataFrame(out, index=pd.RangeIndex(n))
        if "key" in mapping:
            frame["key"] = _keys(frame["key"], f"{path} ({mapping['key']})")
        return frame


def _keys(col: pd.Series, where: str) -> pd.Series:
    """Keys as strings; a row without one is named by its row number."""
    missing = col.isna().to_numpy()
    keys = col.astype(str).to_numpy(object)
    if missing.any():
        log.warning("%s: %d rows have no key; they are named by their row number", where, int(missing.sum()))
        keys[missing] = np.flatnonzero(missing).astype(str)
    return pd.Series(keys, index=col.index, dtype=object)


class ClipRetrievalSource(ForeignSource):
    """clip-retrieval's layout: img_emb/img_emb_N.npy, text_emb/text_emb_N.npy, metadata/metadata_N.parquet."""

    name = "clip-retrieval"
    _mods: list[str] | None = None

    def _path(self, kind: str, shard: str) -> str:
        sub, prefix, suffix = CLIP_RETRIEVAL[kind]
        return posixpath.join(self.root, sub, f"{prefix}{shard}{suffix}")

    def meta_path(self, shard: str) -> str:
        return self._path("metadata", shard)

    def vector_path(self, shard: str, modality: str) -> str:
        return self._path(modality, shard)

    def vectors(self, shard: str, modality: str) -> RowArray:
        return self.npy_rows(self.vector_path(shard, modality))

    @property
    def modalities(self) -> list[str]:
        if self._mods is None:
            self._mods = [
                m for m in ("image", "text") if self.fs.isdir(posixpath.join(self.root, CLIP_RETRIEVAL[m][0]))
            ]
        return self._mods

    def _list(self, kind: str) -> dict[str, str]:
        sub, prefix, suffix = CLIP_RETRIEVAL[kind]
        folder = posixpath.join(self.root, sub)
        pattern = re.compile(re.escape(prefix) + r"(.+)" + re.escape(suffix) + "$")
        if not self.fs.isdir(folder):
            return {}
        out = {}
        for p in self.fs.ls(folder, detail=False):
            m = pattern.match(posixpath.basename(p))
            if m and not is_temporary(p):
                out[m.group(1)] = p
        return out

    def list_shards(self) -> list[str]:
        found = {kind: self._list(kind) for kind in CLIP_RETRIEVAL}
        self._mods = [m for m in ("image", "text") if found[m]]
        if not found["metadata"] or not self._mods:
            raise ConfigError(
                f"input={self.folder}: not clip-retrieval's layout: expected img_emb/img_emb_N.npy and/or "
                "text_emb/text_emb_N.npy beside metadata/metadata_N.parquet" + what_is_there(self.fs, self.root)
            )
        kinds = ["metadata", *self._mods]
        paired = set.intersection(*(set(found[k]) for k in kinds))
        lone = sorted({p for k in kinds for s, p in found[k].items() if s not in paired})
        if lone:
            log.warning(
                "%s: %d files without their pair are not read (a shard needs metadata_N.parquet and every modality's "
                "npy): %s",
                self.folder,
                len(lone),
                ", ".join(lone[:SHOWN]),
            )
        if not paired:
            raise ConfigError(f"input={self.folder}: no shard has both its metadata and its embedding files")
        shards = natural_order(list(paired))
        self._check(shards)
        return shards

    def _check(self, shards: list[str]) -> None:
        def one(shard: str) -> tuple[list[str], dict[str, int]]:
            md = self._footer(self.meta_path(shard))
            self._rows[shard] = md.num_rows
            self._schema[shard] = list(md.schema.to_arrow_schema().names)
            problems = self._check_columns(self.meta_path(shard), self._schema[shard])
            dims = {}
            for m in self.modalities:
                path = self.vector_path(shard, m)
                h = self.header(path)
                check_vectors_header(h, path)
                dims[path] = h.dim
                if h.rows != md.num_rows:
                    problems.append(f"{self.meta_path(shard)} has {md.num_rows} rows but {path} has {h.rows} vectors")
            return problems, dims

        results = parallel(one, shards)
        refuse([p for r in results for p in r[0]], f"input={self.folder}: shards whose files do not align")
        check_widths({p: d for r in results for p, d in r[1].items()}, self.folder)

    def dim(self, shards: Sequence[str]) -> int:
        return self.header(self.vector_path(shards[0], self.modalities[0])).dim

    def describe(self) -> dict[str, Any]:
        return {"input_format": self.name, "key_column": self.options.key_column, "columns": self.options.columns}


def check_widths(dims: dict[str, int], folder: str) -> None:
    widths = sorted(set(dims.values()))
    if len(widths) > 1:
        first = {w: next(p for p, d in dims.items() if d == w) for w in widths}
        raise BadEmbeddings(
            f"input={folder}: vectors of different widths: " + ", ".join(f"{p} has width {w}" for w, p in first.items())
        )


class FileSource(ForeignSource):
    """A folder of files of one suffix (searched recursively), or one such file; a shard is a file."""

    suffix: str

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.single = self.fs.isfile(self.root)

    def file(self, shard: str) -> str:
        return self.root if self.single else posixpath.join(self.root, shard + self.suffix)

    @property
    def modalities(self) -> list[str]:
        return [self.options.modality]

    def vector_path(self, shard: str, modality: str) -> str:
        return self.file(shard)

    def list_shards(self) -> list[str]:
        if self.single:
            if not self.root.endswith(self.suffix):
                raise ConfigError(
                    f"input={self.folder}: not a {self.suffix} file (embeddings.input_format={self.name})"
                )
            shards = [posixpath.basename(self.root)[: -len(self.suffix)]]
        else:
            files = self.fs.find(self.root) if self.fs.isdir(self.root) else []
            shards = [
                posixpath.relpath(p, self.root)[: -len(self.suffix)]
                for p in files
                if p.endswith(self.suffix) and not is_temporary(p)
            ]
        if not shards:
            raise ConfigError(
                f"input={self.folder}: no {self.suffix} files (embeddings.input_format={self.name})"
                + what_is_there(self.fs, self.root)
            )
        shards = natural_order(shards)
        self._check(shards)
        return shards

    def _check(self, shards: list[str]) -> None: ...


class NpySource(FileSource):
    """.npy arrays only: rows are identified by (file, row); no metadata."""

    name = "npy"
    suffix = ".npy"

    def __init__(self, *args: Any):
        super().__init__(*args)
        if self.options.key_column or self.options.columns:
            raise ConfigError(
                "embeddings.key_column / embeddings.columns: npy files hold no metadata; rows are named (file, row) "
                "(use input_format=clip-retrieval or parquet for keyed rows)"
            )

    def vectors(self, shard: str, modality: str) -> RowArray:
        return self.npy_rows(self.file(shard))

    def _check(self, shards: list[str]) -> None:
        def one(shard: str) -> tuple[str, int]:
            path = self.file(shard)
            h = self.header(path)
            check_vectors_header(h, path)
            self._rows[shard] = h.rows
            return path, h.dim

        check_widths(dict(parallel(one, shards)), self.folder)

    def dim(self, shards: Sequence[str]) -> int:
        return self.header(self.file(shards[0])).dim

    def describe(self) -> dict[str, Any]:
        return {"input_format": self.name, "modality": self.options.modality}
