"""The index output's files: their names, the journaled commit that replaces them, recovery after a killed commit,
and reading them back.

A commit writes `M.index`, `M_ids.parquet` and `M.json` under temporary names, then records the three renames in
`M.commit.json` (the journal, itself written by temporary name and rename) and performs them, `M.json` (the commit
marker) last, and removes the journal. A run killed during the renames leaves the journal; the next run's `recover`
completes the renames from it, so the output ends exactly as the commit meant, never with a new index beside an
old id map. A commit that fails before its journal exists leaves the previous files untouched.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any

import faiss
import fsspec
import numpy as np
import pandas as pd

from pipeline.core.fsio import TMP_MARK, discard, is_local, read_json, tmp_name
from pipeline.embeddings.read import Chunk

log = logging.getLogger(__name__)

MODALITIES = ("image", "text")
IDS_COLUMNS = ["id", "shard", "row", "key", "caption", "url"]
ID_SOURCE_COLUMNS = ("key", "caption", "url")  # the embed metadata columns the id map copies


@dataclass(frozen=True)
class IndexFiles:
    """The files one modality's index owns; the only place their names are built."""

    index: str
    ids: str
    info: str
    journal: str


def index_files(output: str, modality: str) -> IndexFiles:
    j = posixpath.join
    return IndexFiles(
        j(output, f"{modality}.index"),
        j(output, f"{modality}_ids.parquet"),
        j(output, f"{modality}.json"),
        j(output, f"{modality}.commit.json"),
    )


def id_rows(chunk: Chunk) -> pd.DataFrame:
    """The id map's rows (without the id) of a chunk of one shard's valid vectors: where each is and what it shows."""
    kept = chunk.meta
    return pd.DataFrame(
        {
            "shard": pd.Series([chunk.shard] * len(chunk.rows), dtype=object),
            "row": chunk.rows.astype(np.int32),
            **{c: kept[c].to_numpy() if c in kept else None for c in ID_SOURCE_COLUMNS},
        }
    )


def read_info(output: str, modality: str) -> dict[str, Any] | None:
    return read_json(index_files(output, modality).info)  # type: ignore[no-any-return]


def absolute(path: str) -> str:
    fs, p = fsspec.core.url_to_fs(path)
    return os.path.abspath(p) if is_local(fs) else path


def _roll_forward(fs: fsspec.AbstractFileSystem, output: str, journal: str) -> None:
    """Perform the renames a journal lists that have not happened yet (their temporary file still exists)."""
    with fs.open(journal, "r") as f:
        renames = json.load(f)["renames"]
    for tmp_base, final_name in renames:
        tmp = posixpath.join(output, tmp_base)
        if fs.exists(tmp):
            fs.mv(tmp, posixpath.join(output, final_name))
    fs.rm(journal)


def commit(output: str, modality: str, index: faiss.Index, ids: pd.DataFrame, info: dict[str, Any]) -> int:
    """Replace the modality's index, id map and info (see the module docstring); returns the index size in bytes."""
    fs, _ = fsspec.core.url_to_fs(output)
    files = index_files(output, modality)
    fs.makedirs(output, exist_ok=True)
    finals = (files.index, files.ids, files.info)  # info, the commit marker, renamed last
    tmp = {p: tmp_name(p) for p in finals}
    journal_tmp = tmp_name(files.journal)
    try:
        with fs.open(tmp[files.index], "wb") as f:
            faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))  # type: ignore[attr-defined]
        size = int(fs.size(tmp[files.index]))
        with fs.open(tmp[files.ids], "wb") as f:
            ids[IDS_COLUMNS].to_parquet(f, index=False)
        with fs.open(tmp[files.info], "w") as f:
            json.dump(dict(info, size_bytes=size), f, indent=1, default=str)
        with fs.open(journal_tmp, "w") as f:
            json.dump({"renames": [[posixpath.basename(tmp[p]), posixpath.basename(p)] for p in finals]}, f)
        fs.mv(journal_tmp, files.journal)
    except BaseException:
        for p in (*tmp.values(), journal_tmp):
            discard(fs, p)
        raise
    _roll_forward(fs, output, files.journal)
    return size


def recover(output: str) -> None:
    """Before an index run writes: complete commits killed during their renames, then delete temporary files and
    build folders of killed runs (call when no other index run writes this output)."""
    fs, root = fsspec.core.url_to_fs(output)
    if not fs.isdir(root):
        return
    for modality in MODALITIES:
        journal = index_files(output, modality).journal
        if fs.exists(journal):
            log.warning("%s: completing the %s index commit of a run killed during its renames", output, modality)
            _roll_forward(fs, output, journal)
    for p in fs.ls(root, detail=False):
        if TMP_MARK in posixpath.basename(p.rstrip("/")):
            fs.rm(p, recursive=True)


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
