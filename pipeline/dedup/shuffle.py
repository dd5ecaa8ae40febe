"""Dedup's one format for partitioned intermediate files (the shuffle between its distributed steps): a task writes
ONE file holding its records (a numpy structured array) sorted by partition id, behind a table of where each
partition starts; a reader task fetches partition p (or a range, or a slice of one) from every file with ranged
reads (fsspec `cat_ranges`: concurrent on object stores), never the whole file.

Layout of a file (little-endian):
    b"CLSHUF01" | uint64 nparts | uint64 header_len | header (JSON: the record dtype) |
    int64 offsets[nparts + 1] (in records) | records
so partition p is the bytes [data + offsets[p] * itemsize, data + offsets[p + 1] * itemsize). Files of one step may
differ in the width of their fixed-size byte-string fields (each shard's longest key); readers widen them to one
dtype. Built and parsed only here."""

from __future__ import annotations

import json
from typing import Any, Sequence

import fsspec
import numpy as np

from pipeline.core.fsio import put_bytes

MAGIC = b"CLSHUF01"
PREFIX = 24  # magic, nparts, header_len


def _descr(dtype: np.dtype[Any]) -> Any:
    return np.lib.format.dtype_to_descr(dtype)


def _from_descr(descr: Any) -> np.dtype[Any]:
    return np.lib.format.descr_to_dtype(_tuples(descr))


def _tuples(descr: Any) -> Any:
    """JSON turns the descr's tuples (and sub-array shapes) into lists; numpy wants tuples back."""
    if isinstance(descr, str):
        return descr
    out = []
    for f in descr:
        name, kind, *shape = f
        out.append((name, _tuples(kind), *(tuple(s) for s in shape)))
    return out


def write(url: str, records: np.ndarray, parts: np.ndarray, nparts: int) -> None:
    """records[i] goes to partition parts[i] (0 <= parts < nparts); written by temporary name and rename."""
    parts = np.asarray(parts, np.int64)
    if len(parts) and (parts.min() < 0 or parts.max() >= nparts):
        raise ValueError(f"{url}: partition ids outside 0..{nparts - 1}")
    order = np.argsort(parts, kind="stable")
    offsets = np.zeros(nparts + 1, "<i8")
    offsets[1:] = np.cumsum(np.bincount(parts, minlength=nparts))
    header = json.dumps({"dtype": _descr(records.dtype)}).encode()
    body = b"".join(
        [
            MAGIC,
            np.array([nparts, len(header)], "<u8").tobytes(),
            header,
            offsets.tobytes(),
            np.ascontiguousarray(records[order]).view(np.uint8).data,
        ]
    )
    fs, path = fsspec.core.url_to_fs(url)
    put_bytes(fs, path, body)


class Files:
    """A set of shuffle files (one step's outputs, in task order) opened for partition reads."""

    def __init__(self, urls: Sequence[str]):
        self.urls = list(urls)
        self.fs, _ = fsspec.core.url_to_fs(self.urls[0]) if self.urls else (fsspec.filesystem("file"), "")
        self.paths = [fsspec.core.url_to_fs(u)[1] for u in self.urls]
        heads = self._ranges([0] * len(self.paths), [PREFIX] * len(self.paths))
        self.nparts, self.hlen, self.dtypes = [], [], []
        for url, h in zip(self.urls, heads):
            if h[:8] != MAGIC:
                raise ValueError(f"{url}: not a dedup shuffle file")
            nparts, hlen = np.frombuffer(h[8:PREFIX], "<u8")
            self.nparts.append(int(nparts))
            self.hlen.append(int(hlen))
        headers = self._ranges([PREFIX] * len(self.paths), [PREFIX + h for h in self.hlen])
        self.dtypes = [_from_descr(json.loads(h)["dtype"]) for h in headers]
        self.dtype = widest(self.dtypes) if self.dtypes else None

    def _ranges(self, starts: list[int], ends: list[int], paths: list[str] | None = None) -> list[bytes]:
        paths = self.paths if paths is None else paths
        if not paths:
            return []
        return list(self.fs.cat_ranges(paths, starts, ends))

    def _table_start(self, i: int) -> int:
        return PREFIX + self.hlen[i]

    def _data_start(self, i: int) -> int:
        return self._table_start(i) + 8 * (self.nparts[i] + 1)

    def offsets(self, p0: int, p1: int) -> np.ndarray:
        """[files, p1 - p0 + 1] record offsets of partitions p0..p1 in every file (one ranged read per file)."""
        if not self.paths:
            return np.zeros((0, p1 - p0 + 1), np.int64)
        starts = [self._table_start(i) + 8 * p0 for i in range(len(self.paths))]
        raw = self._ranges(starts, [s + 8 * (p1 - p0 + 1) for s in starts])
        return np.stack([np.frombuffer(r, "<i8") for r in raw]).astype(np.int64)

    def sizes(self, nparts: int, files_per_read: int = 256) -> np.ndarray:
        """Records per partition summed over every file: memory O(nparts), files read a batch at a time."""
        total = np.zeros(nparts, np.int64)
        for s in range(0, len(self.paths), files_per_read):
            sub = Files.__new__(Files)
            sub.__dict__.update(self.__dict__)
            sel = slice(s, s + files_per_read)
            sub.paths, sub.nparts, sub.hlen = self.paths[sel], self.nparts[sel], self.hlen[sel]
            total += np.diff(sub.offsets(0, nparts), axis=1).sum(axis=0)
        return total

    def _fetch(self, spans: list[tuple[int, int, int]]) -> np.ndarray:
        """Records [a, b) of file i for each (i, a, b), concatenated in the order given, widened to one dtype."""
        spans = [s for s in spans if s[2] > s[1]]
        assert self.dtype is not None
        if not spans:
            return np.zeros(0, self.dtype)
        paths = [self.paths[i] for i, _, _ in spans]
        starts = [self._data_start(i) + a * self.dtypes[i].itemsize for i, a, _ in spans]
        ends = [self._data_start(i) + b * self.dtypes[i].itemsize for i, _, b in spans]
        parts = [
            cast(np.frombuffer(raw, self.dtypes[i]), self.dtype)
            for raw, (i, _, _) in zip(self._ranges(starts, ends, paths), spans)
        ]
        return np.concatenate(parts)

    def read(self, p0: int, p1: int) -> tuple[np.ndarray, np.ndarray]:
        """Every record of partitions [p0, p1) from every file, file by file, and each record's partition id."""
        if not self.paths or p1 <= p0:
            return np.zeros(0, self.dtype or np.dtype("u1")), np.zeros(0, np.int64)
        off = self.offsets(p0, p1)
        recs = self._fetch([(i, int(o[0]), int(o[-1])) for i, o in enumerate(off)])
        parts = np.concatenate([np.repeat(np.arange(p0, p1), np.diff(o)) for o in off])
        return recs, parts

    def read_slice(self, parts: Sequence[int], start: int, stop: int) -> np.ndarray:
        """Records [start, stop) of the concatenation (partition by partition, each over every file in order) of
        the given partitions: one block of a cluster too big to read whole."""
        spans, pos = [], 0
        for p in parts:
            off = self.offsets(p, p + 1)
            for i, (a, b) in enumerate(off):
                lo, hi = max(start, pos), min(stop, pos + int(b - a))
                if hi > lo:
                    spans.append((i, int(a) + lo - pos, int(a) + hi - pos))
                pos += int(b - a)
        return self._fetch(spans)


def read_all(url: str) -> tuple[np.ndarray, np.ndarray]:
    """Every record of one file and its partition ids (small files: samples, centroids, truth)."""
    f = Files([url])
    return f.read(0, f.nparts[0])


def widest(dtypes: Sequence[np.dtype[Any]]) -> np.dtype[Any]:
    """One structured dtype whose byte-string fields are as wide as the widest of the given (same names)."""
    first = dtypes[0]
    assert first.names is not None
    fields = []
    for name in first.names:
        kinds = [d.fields[name][0] for d in dtypes]  # type: ignore[index]
        kind = kinds[0]
        if kind.kind == "S":
            kind = np.dtype(f"S{max(k.itemsize for k in kinds)}")
        fields.append((name, kind))
    return np.dtype(fields)


def cast(records: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """records in `dtype` (same field names), field by field."""
    if records.dtype == dtype:
        return records
    out = np.zeros(len(records), dtype)
    for name in dtype.names or ():
        out[name] = records[name]
    return out
