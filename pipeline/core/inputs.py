"""What an input spec names: paths, folders, brace patterns, globs, lists and fsspec URLs expanded to files, and
the stable shard id a file name gives."""

from __future__ import annotations

import posixpath
import re
from typing import Iterable

import fsspec
from braceexpand import braceexpand

from pipeline.core.errors import ConfigError

TAR_EXT = (".tar",)


PARQUET_EXT = (".parquet",)


IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def shard_id_from_name(url: str) -> str:
    """Stable shard id from an input file name: numeric stems zero-padded to 5, others sanitized."""
    stem = posixpath.basename(url.rstrip("/"))
    for ext in TAR_EXT + PARQUET_EXT:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    if stem.isdigit():
        return stem.zfill(5)
    clean = re.sub(r"[^A-Za-z0-9_.-]", "_", stem)
    if not clean:
        raise ConfigError(f"input {url!r}: cannot derive a shard name")
    return clean


def kind_of(url: str) -> str | None:
    low = url.lower()
    if low.endswith(TAR_EXT):
        return "webdataset"
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(IMAGE_EXT):
        return "image"
    return None


def _expand_one(pattern: str) -> list[str]:
    """Brace-expand, glob, or list a folder; returns protocol-qualified URLs, sorted within each expanded item.

    The names of a brace pattern are looked up in one listing of their folder, not one or two requests each: on an
    object store `{00000..99999}.tar` would otherwise cost two requests per shard before any work."""
    out: list[str] = []
    listings: dict[tuple[int, str], dict[str, str | None]] = {}  # (filesystem, folder) -> name -> its type
    items = list(braceexpand(pattern))
    for item in items:
        fs, path = fsspec.core.url_to_fs(item)
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
        else:
            kind = _listed(fs, path, listings) if len(items) > 1 else None
            kind = kind or _probe(fs, path)  # not in its folder's listing (HTTP, a link): ask about it alone
            if kind == "directory":
                found = sorted(p for p in fs.find(path) if kind_of(p) is not None)
            elif kind == "file":
                found = [path]
            else:
                raise ConfigError(f"input: {item} does not exist")
        out.extend(fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p for p in found)
    return out


def _probe(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """ "directory", "file" or None for one path named on its own."""
    if fs.isdir(path):
        return "directory"
    return "file" if fs.exists(path) else None


def _listed(
    fs: fsspec.AbstractFileSystem, path: str, listings: dict[tuple[int, str], dict[str, str | None]]
) -> str | None:
    """ "directory" or "file" when one listing of its folder (made once per folder) says so, else None."""
    path = path.rstrip("/")
    folder = posixpath.dirname(path)
    key = (id(fs), folder)
    if key not in listings:
        try:
            entries = fs.ls(folder, detail=True)
        except (OSError, ValueError, NotImplementedError):  # missing, or a filesystem that cannot list (HTTP)
            entries = []
        listings[key] = {str(e["name"]).rstrip("/"): e.get("type") for e in entries if isinstance(e, dict)}
    kind = listings[key].get(path)
    return kind if kind in ("file", "directory") else None


def expand_input(spec: str | Iterable[str]) -> list[str]:
    """Every input file named by a path, folder, brace pattern, glob, list or fsspec URL, in a stable order."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for p in patterns:
        urls.extend(_expand_one(p))
    if not urls:
        raise ConfigError(f"input: {spec!r} names no files")
    return urls
