"""Every file a stage writes goes through here: written under a temporary name and renamed, so a killed or failed
writer never leaves a whole-looking file; and the small JSON/Parquet reads and writes that every stage shares."""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import uuid
from typing import Any

import fsspec

from pipeline.core.storage import mask

TMP_MARK = ".tmp-"


def tmp_name(final: str) -> str:
    """A unique temporary name beside `final`; readers ignore it (TMP_MARK) and later runs sweep it."""
    return f"{final}{TMP_MARK}{uuid.uuid4().hex[:12]}"


def is_temporary(path: str) -> bool:
    return TMP_MARK in posixpath.basename(path.rstrip("/"))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether a filesystem is the local disk (memory-mapping and os paths work there)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def discard(fs: fsspec.AbstractFileSystem, tmp: str) -> None:
    """Remove a temporary file after a failed write; a storage that fails again must not hide the first error."""
    with contextlib.suppress(OSError):
        if fs.exists(tmp):
            fs.rm(tmp)


def put_bytes(fs: fsspec.AbstractFileSystem, final: str, data: bytes) -> None:
    """Write under a unique temporary name, then rename: a killed writer never leaves a whole-looking file, and a
    failed write or rename removes its temporary file."""
    fs.makedirs(posixpath.dirname(final), exist_ok=True)
    tmp = tmp_name(final)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, final)
    except BaseException:
        discard(fs, tmp)
        raise


def put_json(url: str, obj: Any, sort_keys: bool = False) -> None:
    """A JSON document at `url` (any fsspec URL), by temporary name and rename."""
    fs, path = fsspec.core.url_to_fs(url)
    # Summaries and records carry error messages, which may quote a storage secret (core/storage.py)
    put_bytes(fs, path, mask(json.dumps(obj, indent=1, sort_keys=sort_keys, default=str)).encode())


def read_json(url: str) -> Any:
    """The JSON document at `url`, or None when there is no such file."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def put_parquet(url: str, table: Any, schema: Any = None) -> None:
    """A pyarrow Table or pandas DataFrame as Parquet at `url`; `schema` fixes the column types even when empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, schema=schema, preserve_index=False)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs, path = fsspec.core.url_to_fs(url)
    put_bytes(fs, path, buf.getvalue())
