"""URL lists for `clipline download`: their format, columns and row counts, read before any work starts."""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.core.config import Config, require
from pipeline.core.errors import ConfigError

log = logging.getLogger(__name__)

# The URL list formats img2dataset's reader accepts (parquet.gz is not one of them).
FORMATS = ("csv.gz", "tsv.gz", "txt.gz", "json.gz", "jsonl.gz", "parquet", "csv", "tsv", "txt", "jsonl", "json")
# Columns img2dataset writes itself and refuses as save_additional_columns.
RESERVED_COLUMNS = {
    "key",
    "caption",
    "url",
    "width",
    "height",
    "original_width",
    "original_height",
    "status",
    "error_message",
    "exif",
    "md5",
    "sha256",
    "sha512",
}


@dataclass
class InputPlan:
    """What the URL list holds, read before any work so bad config fails early and every URL can be accounted for."""

    url_list: str
    input_format: str
    files: list[str]
    rows_per_file: list[int]
    columns: list[str]
    caption_col: str | None

    @property
    def urls_in(self) -> int:
        return sum(self.rows_per_file)


def format_of(path: str) -> str | None:
    name = posixpath.basename(path.rstrip("/")).lower()
    return next((f for f in FORMATS if name.endswith("." + f)), None)


def _read_schema_and_rows(fs: Any, path: str, fmt: str) -> tuple[list[str], int]:
    """Column names and row count, parsed the way img2dataset's reader parses the file (so the counts agree)."""
    import pyarrow.csv as pa_csv
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            return list(meta.schema_arrow.names), meta.metadata.num_rows
    compression = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    with fs.open(path, "rb", compression=compression) as f:
        if base in ("csv", "tsv", "txt"):
            read_opts = pa_csv.ReadOptions(column_names=["url"]) if base == "txt" else pa_csv.ReadOptions()
            parse_opts = pa_csv.ParseOptions(delimiter="\t") if base == "tsv" else pa_csv.ParseOptions()
            reader = pa_csv.open_csv(f, read_options=read_opts, parse_options=parse_opts)
            return list(reader.schema.names), sum(batch.num_rows for batch in reader)
        if base == "jsonl":
            table = pa_json.read_json(f)
            return list(table.column_names), table.num_rows
        import pandas as pd

        df = pd.read_json(f)
        return [str(c) for c in df.columns], len(df)


def plan_input(cfg: Config) -> InputPlan:
    """Check input/output and the column options against the URL list; raises ConfigError naming the key."""
    require(cfg, "input", "output")
    url_list = cfg.input
    if isinstance(url_list, list):
        if len(url_list) != 1:
            raise ConfigError("input: download takes one URL list file or one folder of them, got a list")
        url_list = url_list[0]
    assert isinstance(url_list, str)
    dl = cfg.download
    fs, path = fsspec.core.url_to_fs(url_list)
    if not fs.exists(path):
        raise ConfigError(f"input: URL list {url_list} does not exist")
    fmt: str | None = dl.input_format
    if fs.isdir(path):
        if fmt is None:
            found = {format_of(p) for p in fs.ls(path, detail=False)} - {None}
            if len(found) != 1:
                raise ConfigError(
                    f"download.input_format: cannot tell the format of folder {url_list} "
                    f"(found {sorted(map(str, found)) or 'no URL lists'}); set download.input_format"
                )
            fmt = found.pop()
        files = sorted(fs.glob(path.rstrip("/") + "/*." + fmt))  # the glob img2dataset's reader uses
        if not files:
            raise ConfigError(f"input: no *.{fmt} file in {url_list}")
    else:
        fmt = fmt or format_of(path)
        if fmt is None:
            raise ConfigError(
                f"download.input_format: cannot tell the format of {url_list} from its extension; "
                f"set download.input_format to one of {', '.join(FORMATS)}"
            )
        files = [path]
    if fmt not in FORMATS:
        raise ConfigError(f"download.input_format: {fmt} is not supported by img2dataset")
    columns: list[str] = []
    rows: list[int] = []
    for f in files:
        cols, n = _read_schema_and_rows(fs, f, fmt)
        columns = columns or cols
        rows.append(n)
    caption_col = dl.caption_col
    if fmt.startswith("txt"):
        caption_col = None  # a txt list is one URL per line: there is nothing to caption from
        if dl.save_additional_columns:
            raise ConfigError("download.save_additional_columns: a txt URL list has no other columns")
    else:
        _check_columns(columns, dl.url_col, caption_col, dl.save_additional_columns)
    return InputPlan(url_list, fmt, files, rows, columns, caption_col)


def _check_columns(columns: list[str], url_col: str, caption_col: str | None, extra: list[str]) -> None:
    have = ", ".join(columns)
    if url_col not in columns:
        raise ConfigError(f"download.url_col: column {url_col!r} not in the URL list (columns: {have})")
    if caption_col is not None and caption_col not in columns:
        raise ConfigError(
            f"download.caption_col: column {caption_col!r} not in the URL list (columns: {have}); "
            "set download.caption_col=null to download without captions"
        )
    missing = [c for c in extra if c not in columns]
    if missing:
        raise ConfigError(f"download.save_additional_columns: {missing} not in the URL list (columns: {have})")
    reserved = sorted(set(extra) & RESERVED_COLUMNS)
    if reserved:
        raise ConfigError(f"download.save_additional_columns: {reserved} are written by img2dataset itself")
