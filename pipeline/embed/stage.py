"""The embed stage: plan shards, check the manifest, skip committed shards, distribute, summarize."""

from __future__ import annotations

import logging
import time
from typing import Any

import fsspec

from pipeline.core import storage_retries
from pipeline.core.config import Config, require
from pipeline.core.errors import ConfigError, JobFailed
from pipeline.core.inputs import expand_input
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import Job, get_distributor
from pipeline.embed.plan import drop_unfinished_downloads, plan_shards
from pipeline.embed.summary import summarize_embed
from pipeline.embed.writer import (
    check_or_write_manifest,
    remove_uncommitted,
    sweep_temporary,
    uncommit,
    update_manifest,
)
from pipeline.embeddings.layout import ManifestMismatch, committed_shards, new_manifest, read_stats
from pipeline.models import model_fingerprint

log = logging.getLogger(__name__)

WORKER = "pipeline.embed.runner:embed_worker"
COMMITTED = "pipeline.embed.stage:committed_stats"


def build_manifest(cfg: Config) -> dict[str, Any]:
    return new_manifest(
        model_fingerprint(cfg.model),
        cfg.model.model_dump(mode="json"),
        cfg.embed.output_dtype,
        cfg.embed.image,
        cfg.embed.text,
    )


def plan(cfg: Config) -> list[ShardTask]:
    """Validate and plan before anything is written; raises ConfigError for bad input or model config."""
    require(cfg, "input", "output")
    assert cfg.input is not None and cfg.output is not None
    if not (cfg.embed.image or cfg.embed.text):
        raise ConfigError("embed.image and embed.text are both false: nothing to embed")
    if cfg.embed.decode == "device" or cfg.embed.preprocess == "uint8":
        from pipeline.embed.devicedecode import check_config

        check_config(cfg)  # a family without open_clip's preprocess config exits 2 before any work
    _, out_root = fsspec.core.url_to_fs(cfg.output.rstrip("/"))
    # An output folder inside the input folder must not feed its own files back in as shards.
    urls = [u for u in expand_input(cfg.input) if not fsspec.core.url_to_fs(u)[1].startswith(out_root + "/")]
    urls, unfinished = drop_unfinished_downloads(urls)
    if unfinished:
        log.warning(
            "skipping %d tar(s) whose img2dataset download has not finished (no _stats.json): %s",
            len(unfinished),
            ", ".join(unfinished[:5]),
        )
    return plan_shards(urls, cfg.output.rstrip("/"), cfg.embed.input_format, cfg.embed.folder_shard_size)


def committed_stats(task: ShardTask, cfg: Config) -> dict[str, Any] | None:
    """The distributors' probe before a retry: the stats of a shard already committed (its worker died after the
    commit, a late speculative copy), or None; always None under embed.overwrite, which redoes committed shards."""
    if cfg.embed.overwrite:
        return None
    try:
        return read_stats(task.output, task.shard_id)  # one GET, no separate existence check
    except FileNotFoundError:
        return None


def embed(cfg: Config, worker: str = WORKER) -> dict[str, Any]:
    """Run the embed stage; returns the summary, raises JobFailed when a shard failed for good.

    `worker` is the importable per-shard function (tests inject faults through it).
    """
    with storage_retries.counting() as retried:  # the driver's own requests; workers count theirs
        tasks, done = _prepare(cfg)
        driver_retries = retried()
    output = cfg.output.rstrip("/")  # type: ignore[union-attr]
    todo = [t for t in tasks if cfg.embed.overwrite or t.shard_id not in done]
    skipped = len(tasks) - len(todo)
    log.info("embed: %d shards planned, %d already committed, %d to do", len(tasks), skipped, len(todo))

    job = Job(
        "embed",
        todo,
        worker,
        COMMITTED,
        cfg.embed.max_shard_retries,
        cfg.embed.shard_timeout_s,
        gpu=cfg.model.device != "cpu",
        unit="shard",
    )
    t0 = time.perf_counter()
    try:
        results = get_distributor(cfg).run(job)  # logs each retry and each final failure, once
    finally:
        with storage_retries.counting() as retried:
            # Files of shards that did not commit (a worker died mid-commit) must not be seen by file-listing readers.
            sweep_temporary(output)
            remove_uncommitted(output)
            driver_retries += retried()
    wall = time.perf_counter() - t0
    failed = [r.task.shard_id for r in results if not r.ok]
    stats = [r.stats for r in results if r.ok and r.stats]
    with storage_retries.counting() as retried:
        if stats:
            update_manifest(output, dim=stats[0].get("dim"))
        driver_retries += retried()
    summary = summarize_embed(stats, wall, skipped, failed, driver_retries)
    if failed:
        raise JobFailed(f"{len(failed)} shard(s) failed: {', '.join(failed)}; re-run to retry them", summary)
    return summary


def _prepare(cfg: Config) -> tuple[list[ShardTask], set[str]]:
    """Plan, check or write the manifest, clear an interrupted run's leftovers; (tasks, ids already committed)."""
    from pipeline.models import ModelLoadError

    tasks = plan(cfg)
    output = cfg.output.rstrip("/")  # type: ignore[union-attr]
    try:
        manifest = build_manifest(cfg)
        check_or_write_manifest(output, manifest)
    except (ManifestMismatch, ModelLoadError) as e:
        raise ConfigError(str(e)) from e
    swept = sweep_temporary(output) + remove_uncommitted(output)
    if swept:
        log.info("removed %d leftover files of an interrupted run", swept)
    done = set(committed_shards(output, include_empty=True))
    for t in tasks:
        if (
            t.members
            and t.shard_id in done
            and read_stats(output, t.shard_id).get("members_sha256") != t.members_digest()
        ):
            log.warning("folder shard %s: its images changed since it was embedded; redoing it", t.shard_id)
            uncommit(output, t.shard_id)
            done.discard(t.shard_id)
    return tasks, done
