"""Worker functions with injected faults, importable by Spark executors (tests/distribute/test_spark.py).

Faults are files in a `faults/` folder beside the task's output folder, so they reach executor
processes without environment variables (a Spark session's executors keep the environment they
started with). A "-once" file is removed by the attempt that trips it; os.remove is atomic, so
exactly one attempt fails even when two run at once.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pipeline.core.config import Config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import WorkerContext


def fault_dir(output: str) -> str:
    return os.path.join(os.path.dirname(output.rstrip("/")), "faults")


def add_fault(output: str, name: str, content: str = "") -> None:
    os.makedirs(fault_dir(output), exist_ok=True)
    with open(os.path.join(fault_dir(output), name), "w") as f:
        f.write(content)


def _take(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False


def faulty_worker(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """embed_worker, but first trips the faults named for this shard: raise-once-, crash-once-, raise-always-,
    crash-always- (crash = the Python worker process dies), and `slow` (seconds to sleep per shard)."""
    from pipeline.embed.runner import embed_worker

    d, sid = fault_dir(task.output), task.shard_id
    if _take(os.path.join(d, f"raise-once-{sid}")):
        raise RuntimeError(f"injected failure on shard {sid}")
    if _take(os.path.join(d, f"crash-once-{sid}")):
        os._exit(3)
    if os.path.exists(os.path.join(d, f"raise-always-{sid}")):
        raise RuntimeError(f"injected permanent failure on shard {sid}")
    if os.path.exists(os.path.join(d, f"crash-always-{sid}")):
        os._exit(3)
    slow = os.path.join(d, "slow")
    if os.path.exists(slow):
        with open(slow) as f:
            time.sleep(float(f.read() or 1))
    return embed_worker(task, cfg, ctx)


def where_worker(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """No model: reports which Spark partition and process ran the shard, and the context it was given."""
    from pyspark import TaskContext

    spark_ctx = TaskContext.get()
    return {
        "shard": task.shard_id,
        "partition": spark_ctx.partitionId() if spark_ctx else None,
        "pid": os.getpid(),
        "attempt": ctx.attempt,
        "device": ctx.device,
        "threads": ctx.threads,
    }


def sleepy_worker(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """Sleeps in a Python loop far longer than any test timeout."""
    for _ in range(600):
        time.sleep(0.1)
    return {"shard": task.shard_id}


def progress_worker(task: ShardTask, cfg: Config, ctx: WorkerContext) -> dict[str, Any]:
    """No model: sleeps int(shard_id) seconds, reporting 10 samples a second; returns without writing anything."""
    seconds = int(task.shard_id)
    for i in range(10 * seconds):
        time.sleep(0.1)
        ctx.progress(i + 1)
    return {"shard": task.shard_id, "attempt": ctx.attempt}
