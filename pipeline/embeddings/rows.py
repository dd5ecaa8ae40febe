"""Vector files read in place: an npy file memory-mapped where local and read by byte range elsewhere, a Parquet
embedding column read one row group at a time. Each is a `RowArray`, indexed like a read-only 2-D array (a slice,
or positions), so what a caller holds in memory is what it asked for, never the whole file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol, TypeVar

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError
from pipeline.core.fsio import is_local

log = logging.getLogger(__name__)

T = TypeVar("T")
Bounded = Callable[[str, Callable[[], T]], T]
# Rows closer than this many bytes are fetched in one ranged read (one request instead of many small ones).
COALESCE_BYTES = 1 << 20
FLOAT_TYPES = (np.dtype("float16"), np.dtype("float32"), np.dtype("float64"))


class BadEmbeddings(ConfigError):
    """A vector file that cannot be read as embeddings (wrong shape, type or row count): exit 2, naming the file."""


class RowArray(Protocol):
    """Rows of one vector file: `x[a:b]`, `x[positions]` or `x[mask]` give an in-memory array of those rows."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, idx: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class NpyHeader:
    """What an npy file's header says: shape, dtype and where the data starts."""

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    offset: int
    fortran: bool

    @property
    def rows(self) -> int:
        return int(self.shape[0]) if self.shape else 0

    @property
    def dim(self) -> int:
        return int(self.shape[1]) if len(self.shape) == 2 else 0


def read_npy_header(fs: fsspec.AbstractFileSystem, path: str) -> NpyHeader:
    with fs.open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"npy format version {version} is not supported")
            shape, fortran, dtype = read[version](f)
        except ValueError as e:
            raise BadEmbeddings(f"{path}: not a readable .npy file ({e})") from e
        return NpyHeader(tuple(shape), np.dtype(dtype), int(f.tell()), bool(fortran))


def check_vectors_header(h: NpyHeader, path: str) -> None:
    """A 2-D float array in C order, the only npy layout rows can be read from by range."""
    if len(h.shape) != 2 or h.dtype not in FLOAT_TYPES:
        raise BadEmbeddings(f"{path}: expected a 2-D float16/float32 array, found shape {h.shape} dtype {h.dtype}")
    if h.fortran:
        raise BadEmbeddings(f"{path}: a Fortran-order array; rows can only be read from C-order .npy files")


def _positions(idx: Any, n: int) -> np.ndarray:
    """Row positions of a slice, a boolean mask or an integer array."""
    if isinstance(idx, slice):
        return np.arange(n)[idx]
    a = np.asarray(idx)
    if a.dtype == bool:
        if len(a) != n:
            raise IndexError(f"mask of {len(a)} rows for {n} rows")
        return np.flatnonzero(a)
    a = a.astype(np.int64)
    if len(a) and (a.min() < -n or a.max() >= n):
        raise IndexError(f"row positions out of range for {n} rows")
    return np.where(a < 0, a + n, a)


def _runs(rows: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """Sorted unique rows -> [start, end) spans covering them, neighbours closer than `gap` rows merged."""
    if not len(rows):
        return []
    cut = np.flatnonzero(np.diff(rows) > gap) + 1
    starts, ends = rows[np.r_[0, cut]], rows[np.r_[cut - 1, len(rows) - 1]] + 1
    return list(zip(starts.tolist(), ends.tolist()))


class NpyRows:
    """A 2-D npy file on a filesystem that cannot be memory-mapped (object stores), read by byte range: a slice is
    one ranged read, positions are grouped into runs so that nearby rows cost one read."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, header: NpyHeader, bounded: Bounded[Any]):
        check_vectors_header(header, path)
        self.fs, self.path, self.header, self._bounded = fs, path, header, bounded
        self.shape, self.dtype = header.shape, header.dtype
        self.row_bytes = header.dim * header.dtype.itemsize

    def __len__(self) -> int:
        return self.header.rows

    def _read(self, f: Any, start: int, end: int) -> np.ndarray:
        def read() -> bytes:
            f.seek(self.header.offset + start * self.row_bytes)
            return bytes(f.read((end - start) * self.row_bytes))

        data = self._bounded(self.path, read)
        if len(data) != (end - start) * self.row_bytes:
            raise BadEmbeddings(f"{self.path}: file ends before row {end} its header promises ({len(self)} rows)")
        return np.frombuffer(data, self.dtype).reshape(end - start, self.header.dim)

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self[np.array([idx])][0]
        if isinstance(idx, slice) and idx.step in (None, 1):  # one ranged read, no copy of what it returns
            start, stop, _ = idx.indices(len(self))
            with self._bounded(self.path, lambda: self.fs.open(self.path, "rb", cache_type="none")) as f:
                return self._read(f, start, max(start, stop))
        rows = _positions(idx, len(self))
        out = np.empty((len(rows), self.header.dim), self.dtype)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        gap = max(1, COALESCE_BYTES // max(self.row_bytes, 1))
        with self._bounded(self.path, lambda: self.fs.open(self.path, "rb", cache_type="none")) as f:
            for start, end in _runs(np.unique(ordered), gap):
                block = self._read(f, start, end)
                lo, hi = np.searchsorted(ordered, [start, end])
                out[order[lo:hi]] = block[ordered[lo:hi] - start]
        return out


def open_npy(fs: fsspec.AbstractFileSystem, path: str, header: NpyHeader, bounded: Bounded[Any]) -> RowArray:
    """The rows of an npy file: memory-mapped where local (pages come and go with the OS), ranged reads elsewhere."""
    check_vectors_header(header, path)
    if header.rows == 0:  # numpy cannot map a file with no data bytes
        return np.zeros((0, header.dim), header.dtype)
    if is_local(fs):
        local = fsspec.core.strip_protocol(path)
        return bounded(path, lambda: np.load(local, mmap_mode="r"))  # type: ignore[no-any-return]
    return NpyRows(fs, path, header, bounded)


# ---- Parquet embedding column -------------------------------------------------------------------------------


def column_dim(field: pa.Field, path: str) -> int | None:
    """The width a fixed_size_list column declares (None for a variable-length list); refuses other types."""
    t = field.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise BadEmbeddings(f"{path}: column {field.name!r} is {t}, expected a list or fixed_size_list of floats")
    if not pa.types.is_floating(t.value_type):
        raise BadEmbeddings(f"{path}: column {field.name!r} holds {t.value_type}, expected float16 or float32")
    return int(t.list_size) if pa.types.is_fixed_size_list(t) else None


def list_to_matrix(arr: pa.Array, dim: int, where: str, first_row: int) -> np.ndarray:
    """(n, dim) array of a list column; null entries become zero rows (skipped as missing vectors downstream)."""
    n = len(arr)
    dtype = np.dtype(arr.type.value_type.to_pandas_dtype())
    out = np.zeros((n, dim), dtype)
    present = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    if not present.any():
        return out
    kept = arr.filter(pa.array(present)) if not present.all() else arr
    if not pa.types.is_fixed_size_list(arr.type):
        lengths = np.asarray(pc.list_value_length(kept).to_numpy(zero_copy_only=False))
        bad = np.flatnonzero(lengths != dim)
        if len(bad):
            row = first_row + int(np.flatnonzero(present)[bad[0]])
            raise BadEmbeddings(f"{where}: row {row} has a vector of {lengths[bad[0]]} values, the others {dim}")
    out[present] = kept.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return out


class ParquetRows:
    """One embedding column of a Parquet file, read a row group at a time (what a caller gets is the rows it
    asked for; memory is bounded by one row group, the file's own unit of reading)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, column: str, dim: int, bounded: Bounded[Any]):
        self.fs, self.path, self.column, self._bounded = fs, path, column, bounded
        self._file = bounded(path, lambda: pq.ParquetFile(fs.open(path, "rb")))
        md = self._file.metadata
        self.group_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        field = self._file.schema_arrow.field(column)
        column_dim(field, path)
        self.dtype = np.dtype(field.type.value_type.to_pandas_dtype())
        self.shape: tuple[int, ...] = (int(md.num_rows), dim)
        self._last: tuple[int, np.ndarray] | None = None  # chunks smaller than a row group read it once

    def __len__(self) -> int:
        return self.shape[0]

    def _group(self, g: int) -> np.ndarray:
        if self._last is not None and self._last[0] == g:
            return self._last[1]
        try:
            table = self._bounded(self.path, lambda: self._file.read_row_group(g, columns=[self.column]))
        except pa.ArrowInvalid as e:  # e.g. null entries in a fixed_size_list, which pyarrow cannot read back
            raise BadEmbeddings(f"{self.path}: column {self.column!r} of row group {g} is unreadable: {e}") from e
        arr = table.column(0).combine_chunks()
        x = list_to_matrix(arr, self.shape[1], f"{self.path} ({self.column})", int(self.group_starts[g]))
        self._last = (g, x)
        return x

    def __getitem__(self, idx: Any) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self[np.array([idx])][0]
        rows = _positions(idx, len(self))
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        for g in np.unique(groups):
            sel = groups == g
            out[sel] = self._group(int(g))[rows[sel] - self.group_starts[g]]
        return out

    def close(self) -> None:
        self._file.close()
