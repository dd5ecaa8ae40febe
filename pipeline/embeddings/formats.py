"""Input formats of embeddings: the `Source` interface (which shards a folder holds, each shard's vectors and
metadata as stored) and clipline's own format (`registry.py` picks one by `embeddings.input_format`). The
formats of other tools are in `foreign.py`; stages never see a Source, only `EmbeddingSet` (read.py) on top of one.

A shard is the unit every reader, index id map and keep/drop list names: clipline's embed shard, clip-retrieval's
`N` of `img_emb_N.npy`, one npy or Parquet file. Its paths derive from its id alone, so a worker on another
machine opens a shard by (folder, options, shard id) without listing the folder again.
"""

from __future__ import annotations

import logging
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline.core.config import EmbeddingsConfig
from pipeline.core.errors import ConfigError
from pipeline.embeddings.layout import committed_shards, read_manifest, shard_files
from pipeline.embeddings.rows import Bounded, NpyHeader, RowArray, open_npy, read_npy_header

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
OK = "ok"
# Metadata columns stages ask for, by clipline's names (METADATA_SCHEMA); a foreign source fills what it has.
STANDARD_COLUMNS = ("key", "shard", "index", "caption", "url", "sha256", "width", "height", "clip_score")


class Source(ABC):
    """One input format opened on a folder: its shards, and each shard's vectors and metadata as stored."""

    name: ClassVar[str]

    def __init__(self, folder: str, options: EmbeddingsConfig, bounded: Bounded[Any]):
        self.folder, self.options, self.bounded = folder, options, bounded
        self.fs, self.root = fsspec.core.url_to_fs(folder)
        self._headers: dict[str, NpyHeader] = {}

    manifest: dict[str, Any] = {}

    @abstractmethod
    def list_shards(self) -> list[str]:
        """Every usable shard, in id order; raises ConfigError for a folder that is not of this format, or whose
        files do not pair up in row counts or widths (before any stage writes anything)."""

    @property
    @abstractmethod
    def modalities(self) -> list[str]:
        """The modalities the folder holds vectors for."""

    @abstractmethod
    def vector_path(self, shard: str, modality: str) -> str:
        """The file holding one shard's vectors of one modality."""

    @abstractmethod
    def vectors(self, shard: str, modality: str) -> RowArray:
        """Every row of the shard's vectors, as stored, read in place."""

    @abstractmethod
    def metadata(self, shard: str, columns: Sequence[str] | None) -> pd.DataFrame:
        """The shard's rows (file order) with the asked-for columns under clipline's names; `key`, `shard` and
        `index` always exist, other columns the source lacks are empty (None)."""

    def meta_valid(self, meta: pd.DataFrame, modality: str) -> np.ndarray:
        """Rows the metadata says hold a vector of `modality` (foreign formats keep no per-row status: all)."""
        return np.ones(len(meta), bool)

    def wanted_status(self) -> list[str]:
        """Metadata columns `meta_valid` reads."""
        return []

    @abstractmethod
    def dim(self, shards: Sequence[str]) -> int:
        """The embedding width."""

    def row_count(self, shard: str) -> int:
        """Rows the shard holds."""
        return len(self.vectors(shard, self.modalities[0]))

    def describe(self) -> dict[str, Any]:
        """The format options a later reader needs to open this folder again (recorded by the index)."""
        return {"input_format": self.name}

    def header(self, path: str) -> NpyHeader:
        if path not in self._headers:
            self._headers[path] = self.bounded(path, lambda: read_npy_header(self.fs, path))
        return self._headers[path]

    def npy_rows(self, path: str) -> RowArray:
        return open_npy(self.fs, path, self.header(path), self.bounded)


def natural_order(ids: Sequence[str]) -> list[str]:
    """Ids sorted as numbers when all are numbers (clip-retrieval's `img_emb_10` after `img_emb_9`), else as text."""
    if ids and all(i.isdigit() for i in ids):
        return sorted(ids, key=lambda i: (int(i), i))
    return sorted(ids)


def what_is_there(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """A hint naming the format a folder without a manifest looks like."""
    try:
        names = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return ""
    if {"img_emb", "metadata"} <= names or {"text_emb", "metadata"} <= names:
        return "; it looks like clip-retrieval's layout: set embeddings.input_format=clip-retrieval"
    if any(n.endswith(".npy") for n in names):
        return "; it holds .npy files: set embeddings.input_format=npy"
    if any(n.endswith(".parquet") for n in names):
        return "; it holds .parquet files: set embeddings.input_format=parquet (and embeddings.embedding_column)"
    return ""


class CliplineSource(Source):
    """`clipline embed` output: shards are the committed ones (stats markers), the manifest names the model, and the
    metadata's status columns say which rows were embedded (layout.py owns the names)."""

    name = "clipline"

    def __init__(self, folder: str, options: EmbeddingsConfig, bounded: Bounded[Any]):
        super().__init__(folder, options, bounded)
        manifest = read_manifest(folder)
        if manifest is None:
            raise ConfigError(
                f"input={folder}: no manifest.json; expected the output folder of `clipline embed`"
                + what_is_there(self.fs, self.root)
            )
        self.manifest = manifest

    def list_shards(self) -> list[str]:
        shards = committed_shards(self.folder)
        if not shards:
            raise ConfigError(f"input={self.folder}: holds no committed embed shards")
        return shards

    @property
    def modalities(self) -> list[str]:
        return [m for m in MODALITIES if self.manifest.get(m, True)]

    def vector_path(self, shard: str, modality: str) -> str:
        return shard_files(self.folder, shard).vectors(modality)

    def vectors(self, shard: str, modality: str) -> RowArray:
        return self.npy_rows(self.vector_path(shard, modality))

    def metadata(self, shard: str, columns: Sequence[str] | None) -> pd.DataFrame:
        path = shard_files(self.folder, shard).metadata

        def read() -> pd.DataFrame:
            with fsspec.open(path, "rb") as f:
                return pq.read_table(f, columns=list(columns) if columns is not None else None).to_pandas()

        return self.bounded(path, read)  # type: ignore[no-any-return]

    def wanted_status(self) -> list[str]:
        return ["status", "caption_status"]

    def meta_valid(self, meta: pd.DataFrame, modality: str) -> np.ndarray:
        """Image: status ok; text: a caption was read and the sample was not cut by a read error."""
        ok = np.ones(len(meta), bool)
        if "status" in meta:
            status = meta["status"].to_numpy(object)
            if modality == "image":
                ok &= status == OK
            else:
                ok &= status != "read_error"
                if "caption_status" in meta:
                    ok &= meta["caption_status"].to_numpy(object) != "missing"
        return ok

    def dim(self, shards: Sequence[str]) -> int:
        """From the manifest, else (older outputs) the first shard's npy header."""
        dim = self.manifest.get("dim")
        if dim:
            return int(dim)
        return self.header(self.vector_path(shards[0], self.modalities[0])).dim
