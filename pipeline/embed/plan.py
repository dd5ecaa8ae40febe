"""Shard planning: expand an input spec into ShardTasks (the picklable unit of work every distributor runs)."""

from __future__ import annotations

import posixpath

import fsspec

from pipeline.core.errors import ConfigError
from pipeline.core.inputs import kind_of, shard_id_from_name
from pipeline.core.tasks import ShardTask
from pipeline.download import layout as download_layout


def plan_shards(
    urls: list[str], output: str, input_format: str = "auto", folder_shard_size: int = 10000
) -> list[ShardTask]:
    """Turn input files into ShardTasks; pure, so it is tested exhaustively and runs the same everywhere."""
    kinds = {u: (input_format if input_format != "auto" else kind_of(u)) for u in urls}
    if input_format == "folder":
        kinds = {u: ("image" if kind_of(u) == "image" else None) for u in urls}
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
            by_dir[d] = download_layout.stats_names(fs, path)
        (unfinished if download_layout.is_unfinished_tar(u, by_dir[d]) else keep).append(u)
    sidecars = {u[: -len(".tar")] + ".parquet" for u in unfinished}
    return [u for u in keep if u not in sidecars], unfinished
