"""Importable fault-injecting worker functions for the distributor and embed tests (run in spawned processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import WorkerContext
from pipeline.embed.runner import embed_worker  # at import: a pool worker loads torch before it reports ready

FAULT_DIR = "CLIPLINE_TEST_FAULT_DIR"
BARRIER = "CLIPLINE_TEST_BARRIER"  # report_placement: how many processes must each hold a task before any returns


def _mark(task: ShardTask) -> Path:
    return Path(os.environ[FAULT_DIR]) / f"attempts_{task.shard_id}"


def _count(task: ShardTask) -> int:
    p = _mark(task)
    n = int(p.read_text()) if p.exists() else 0
    p.write_text(str(n + 1))
    return n


def echo(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    ctx.progress(1)
    return {"shard": task.shard_id, "attempt": ctx.attempt, "pid": os.getpid(), "samples": 1}


def report_placement(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Where the pool put this worker: its visible GPU, the device and threads it was given, torch's threads.

    Waits (up to 120 s) until $CLIPLINE_TEST_BARRIER processes each hold a task, so that a process that became
    ready first cannot take every task."""
    import torch

    folder = Path(os.environ[FAULT_DIR])
    (folder / f"placed_{os.getpid()}").touch()
    deadline = time.monotonic() + 120
    while len(list(folder.glob("placed_*"))) < int(os.environ.get(BARRIER, "1")) and time.monotonic() < deadline:
        time.sleep(0.05)

    return {
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": ctx.device,
        "threads": ctx.threads,
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "samples": 1,
    }


def crash_first_attempt(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Shard 00001 kills its process on the first attempt (os._exit, as a segfault or OOM kill would)."""
    if task.shard_id == "00001" and _count(task) == 0:
        os._exit(3)
    return echo(task, cfg, ctx)


def always_raise_00002(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    _count(task)
    if task.shard_id == "00002":
        raise RuntimeError("injected failure")
    return echo(task, cfg, ctx)


def hang_00000(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    if task.shard_id == "00000" and _count(task) == 0:
        time.sleep(600)
    return echo(task, cfg, ctx)


def embed_dies_mid_shard(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """The real embed worker, but shard 00001 dies half-way through on every attempt."""
    if task.shard_id == "00001":
        import pipeline.embed.writer as writer

        original = writer.ShardWriter.write

        def write_then_die(self: Any, batch: Any) -> None:
            original(self, batch)
            os._exit(9)

        writer.ShardWriter.write = write_then_die  # type: ignore[method-assign]
    return embed_worker(task, cfg, ctx)


def slow_progress(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Reports 10 samples a second for int(task.shard_id) seconds, then finishes (progress inside one long task)."""
    seconds = int(task.shard_id)
    for i in range(10 * seconds):
        time.sleep(0.1)
        ctx.progress(i + 1)
    return {"shard": task.shard_id, "attempt": ctx.attempt, "samples": 10 * seconds}


def crash_after_commit(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Commits a marker file for the task, then (first attempt only) dies before reporting it."""
    marker = Path(os.environ[FAULT_DIR]) / f"committed_{task.shard_id}"
    marker.write_text(str(ctx.attempt))
    if ctx.attempt == 0:
        os._exit(3)
    return echo(task, cfg, ctx)


def marker_probe(task: ShardTask, cfg: Config) -> dict[str, Any] | None:
    """The committed probe of crash_after_commit: the task is done once its marker file exists."""
    marker = Path(os.environ[FAULT_DIR]) / f"committed_{task.shard_id}"
    return {"shard": task.shard_id, "from_probe": True} if marker.exists() else None
