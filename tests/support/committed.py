"""Tiny committed embed jobs for planning and resume measurements: an img2dataset-shaped input folder of empty tars
and an embed output where every shard is committed, holding only what the planner and the resume check read (the
tars' names, img2dataset's stats markers, clipline's stats markers and the manifest), at any fsspec URL.

No pytest here: tests/embed/test_stage*.py and bench/bench_planning.py both build their data with it (the bench imports
tests/support, which already holds the counting filesystem and the S3 proxy it measures with; the suite must not
depend on bench/).
"""

from __future__ import annotations

import json
from typing import Any, Callable

import fsspec

from pipeline.core.config import Config
from pipeline.embeddings.layout import shard_files

DOWNLOAD_STATS = "{shard}_stats.json"  # img2dataset's marker of a finished download shard


def shard_ids(n: int) -> list[str]:
    return [f"{i:05d}" for i in range(n)]


def committed_files(input_url: str, output_url: str, n: int, manifest: dict[str, Any]) -> dict[str, bytes]:
    """path (without protocol) -> bytes of n empty tars (img2dataset's stats beside each) under input_url and an output
    where all n are committed (an empty shard's stats marker each: no data files, as the embed writer commits a shard
    without samples) under output_url."""
    _, inp = fsspec.core.url_to_fs(input_url.rstrip("/"))
    _, out = fsspec.core.url_to_fs(output_url.rstrip("/"))
    files: dict[str, bytes] = {f"{out}/manifest.json": json.dumps(manifest, sort_keys=True).encode()}
    for sid in shard_ids(n):
        files[f"{inp}/{sid}.tar"] = b""
        files[f"{inp}/{DOWNLOAD_STATS.format(shard=sid)}"] = b"{}"
        stats = {"shard": sid, "input": f"{input_url}/{sid}.tar", "samples": 0, "ok": 0, "status_counts": {}}
        files[shard_files(out, sid).stats] = json.dumps(stats).encode()
    return files


def write_committed(input_url: str, output_url: str, n: int, manifest: dict[str, Any]) -> None:
    """committed_files() written through fsspec (any URL)."""
    fs, _ = fsspec.core.url_to_fs(input_url)
    files = committed_files(input_url, output_url, n, manifest)
    for folder in {f.rsplit("/", 1)[0] for f in files}:
        fs.makedirs(folder, exist_ok=True)  # local folders; a no-op on object stores
    fs.pipe(files)  # concurrent on object stores (s3fs batches the PUTs)
    fs.invalidate_cache()


def spark_poll(n: int) -> None:
    """One progress poll of the Spark driver over n finished tasks: what its loop does every POLL_TICK_S (hand the
    accumulator's new records to the ledger, refresh the progress)."""
    from pipeline.distribute.base import Job, Ledger
    from pipeline.distribute.spark import apply_records

    ledger = Ledger(Job("embed", list(range(n)), "unused:worker", unit="shard"))
    records = [
        {"idx": i, "ok": True, "stats": {"shard": sid}, "attempt": 0, "samples": 0}
        for i, sid in enumerate(shard_ids(n))
    ]
    if apply_records(ledger, records, 0) != n or ledger.remaining:
        raise AssertionError("the poll did not take every record")
    ledger.tick()
    ledger.close()


def measured_steps(cfg: Config, n: int) -> dict[str, Callable[[], None]]:
    """The steps whose cost per shard is measured on a job of n committed shards: planning, a no-op resume (the embed
    stage with every shard committed) and one progress poll; each checks its own outcome."""
    from pipeline.embed.stage import embed, plan

    def planning() -> None:
        if len(plan(cfg)) != n:
            raise AssertionError("planning lost shards")

    def resume() -> None:
        summary = embed(cfg)
        if summary["shards_skipped"] != n or summary["shards_done"] != 0:
            raise AssertionError(f"not a no-op resume: {summary}")

    return {"planning": planning, "resume": resume, "poll": lambda: spark_poll(n)}
