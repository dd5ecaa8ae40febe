"""Shard planning: expand an input spec into ShardTasks (the picklable unit of work every distributor runs)."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from typing import Iterable

import fsspec
from braceexpand import braceexpand

from pipeline.core.errors import ConfigError

TAR_EXT = (".tar",)
PARQUET_EXT = (".parquet",)
IMAGE_EXT = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ShardTask:
    """One input shard to process: small, picklable and deterministic."""

    shard_id: str
    input_url: str  # a tar/parquet URL, or for folder inputs a "folder shard" (see members)
    output: str
    kind: str  # "webdataset" | "parquet" | "folder"
    members: tuple[str, ...] = ()  # folder inputs: the image URLs of this shard, sorted

    def members_digest(self) -> str | None:
        """Identifies a folder shard's content, so a committed one is redone when the folder changed."""
        if not self.members:
            return None
        import hashlib

        return hashlib.sha256("\n".join(self.members).encode()).hexdigest()


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


def _kind_of(url: str) -> str | None:
    low = url.lower()
    if low.endswith(TAR_EXT):
        return "webdataset"
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(IMAGE_EXT):
        return "image"
    return None


def _expand_one(pattern: str) -> list[str]:
    """Brace-expand, glob, or list a folder; returns protocol-qualified URLs, sorted."""
    out: list[str] = []
    for item in braceexpand(pattern):
        fs, path = fsspec.core.url_to_fs(item)
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if _kind_of(p) is not None)
        elif fs.exists(path):
            found = [path]
        else:
            raise ConfigError(f"input: {item} does not exist")
        out.extend(fs.unstrip_protocol(p) if fs.protocol not in ("file", ("file", "local")) else p for p in found)
    return out


def expand_input(spec: str | Iterable[str]) -> list[str]:
    """Every input file named by a path, folder, brace pattern, glob, list or fsspec URL, in a stable order."""
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for p in patterns:
        urls.extend(_expand_one(p))
    if not urls:
        raise ConfigError(f"input: {spec!r} names no files")
    return urls


def plan_shards(
    urls: list[str], output: str, input_format: str = "auto", folder_shard_size: int = 10000
) -> list[ShardTask]:
    """Turn input files into ShardTasks; pure, so it is tested exhaustively and runs the same everywhere."""
    kinds = {u: (input_format if input_format != "auto" else _kind_of(u)) for u in urls}
    if input_format == "folder":
        kinds = {u: ("image" if _kind_of(u) == "image" else None) for u in urls}
    unknown = [u for u, k in kinds.items() if k is None]
    if unknown and input_format == "auto":
        shards = [u for u in urls if kinds[u] is not None]
        if not shards:
            raise ConfigError(f"input: no .tar, .parquet or image files among {unknown[:3]}")
        urls = shards
    # img2dataset writes NNNNN.parquet (per-shard metadata) beside NNNNN.tar: the tar is the shard.
    tar_stems = {u[: -len(".tar")] for u in urls if kinds[u] == "webdataset" and u.lower().endswith(".tar")}
    urls = [u for u in urls if not (kinds[u] == "parquet" and u[: -len(".parquet")] in tar_stems)]
    tasks: list[ShardTask] = []
    images = [u for u in urls if kinds[u] == "image"]
    for u in urls:
        kind = kinds[u]
        if kind in ("webdataset", "parquet"):
            tasks.append(ShardTask(shard_id_from_name(u), u, output, kind))
    for i in range(0, len(images), folder_shard_size):
        chunk = tuple(images[i : i + folder_shard_size])
        tasks.append(ShardTask(f"{i // folder_shard_size:05d}", posixpath.dirname(chunk[0]), output, "folder", chunk))
    seen: dict[str, str] = {}
    for t in tasks:
        if t.shard_id in seen:
            raise ConfigError(
                f"input: {seen[t.shard_id]} and {t.input_url} map to the same shard name {t.shard_id!r}; "
                "embed them into separate outputs or rename one"
            )
        seen[t.shard_id] = t.input_url
    return sorted(tasks, key=lambda t: t.shard_id)


def drop_unfinished_downloads(urls: list[str]) -> tuple[list[str], list[str]]:
    """In an img2dataset output folder, a tar without its NNNNN_stats.json is still being written: skip it."""
    keep: list[str] = []
    unfinished: list[str] = []
    by_dir: dict[str, set[str]] = {}
    for u in urls:
        if not u.lower().endswith(".tar"):
            keep.append(u)
            continue
        d = posixpath.dirname(u)
        if d not in by_dir:
            fs, path = fsspec.core.url_to_fs(d)
            by_dir[d] = {posixpath.basename(p) for p in fs.ls(path, detail=False) if p.endswith("_stats.json")}
        stats = by_dir[d]
        stem = posixpath.basename(u)[: -len(".tar")]
        (keep if not stats or f"{stem}_stats.json" in stats else unfinished).append(u)
    sidecars = {u[: -len(".tar")] + ".parquet" for u in unfinished}
    return [u for u in keep if u not in sidecars], unfinished
