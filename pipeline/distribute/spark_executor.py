"""What runs inside a Spark task: config and functions loaded once per Python worker, the attempt's device and threads
from TaskContext, a SIGALRM deadline, and one record per task, handed to the driver through an accumulator.

A worker exception becomes an error record, so only a dying process can make Spark fail a task. Records travel in an
accumulator rather than as the job's result so that the driver sees each Spark task's records when that task ends
(Spark merges a task's accumulator updates as it completes, once per task, failed attempts excluded), and keeps the
records of tasks that finished before Spark aborted the job.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from typing import Any, Iterable, Iterator

from pipeline.core.config import Config
from pipeline.distribute.base import WorkerContext, describe, resolve_worker, run_attempt

Item = tuple[int, Any, int]  # (task index on the driver, task, the driver's attempt count)


class TaskTimeout(Exception):
    """An attempt ran longer than its time limit inside a Spark task."""


class RecordList:
    """The AccumulatorParam of task records (duck-typed, so importing this needs no pyspark); the driver reads new
    records by position while Spark appends."""

    def zero(self, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return []

    def addInPlace(self, value1: list[dict[str, Any]], value2: list[dict[str, Any]]) -> list[dict[str, Any]]:
        value1.extend(value2)  # in place: the list the driver reads stays the same object
        return value1


@functools.lru_cache(maxsize=4)
def executor_config(cfg_json: str) -> Config:
    """The job's config, validated again on the executor, once per Python worker."""
    from pipeline.core.logs import setup_worker_logging
    from pipeline.core.storage import remember

    cfg = Config.model_validate_json(cfg_json)
    remember(cfg.storage)  # the options came as FSSPEC_<PROTOCOL> (spark_session.py); the log needs the secrets
    setup_worker_logging(cfg.log_level)
    return cfg


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Raise TaskTimeout in the main thread after `seconds` (a no-op off the main thread). PySpark runs a task in its
    worker's main thread; the error comes at the next Python instruction, so one long C call finishes first."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise TaskTimeout(f"timed out after {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def placement(ctx: Any, gpu: bool) -> tuple[str | None, int]:
    """(device, CPU threads) of this Spark task: the GPU Spark assigned it, and its `spark.task.cpus`."""
    device = None
    if gpu and ctx is not None and "gpu" in ctx.resources():
        addresses = list(ctx.resources()["gpu"].addresses)
        device = f"cuda:{addresses[0]}" if addresses else None
    threads = max(1, ctx.cpus()) if ctx is not None else (os.cpu_count() or 1)
    return device, threads


class _LastCount:
    """ctx.progress on an executor: the driver sees accumulators only when the task ends, so only the last count."""

    samples = 0

    def __call__(self, samples: int) -> None:
        self.samples = samples


def run_partition(
    groups: Iterable[list[Item]],
    worker: str,
    committed: str | None,
    cfg_json: str,
    timeout_s: float | None,
    gpu: bool,
    probe: bool,
) -> Iterator[dict[str, Any]]:
    """The body of one Spark task: one attempt of each task of its group, one record each. The attempt number is the
    driver's count plus Spark's own retries of this task (TaskContext.attemptNumber())."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    spark_attempt = ctx.attemptNumber() if ctx else 0
    setup_error = None
    try:
        cfg = executor_config(cfg_json)
        fn, probe_fn = resolve_worker(worker), resolve_worker(committed) if committed else None
        device, threads = placement(ctx, gpu)
    except Exception as e:
        setup_error = describe(e)
    for idx, task, base in (item for group in groups for item in group):  # one group per partition
        attempt = base + spark_attempt
        rec: dict[str, Any] = {"idx": idx, "attempt": attempt, "samples": 0}
        try:
            if setup_error:
                raise RuntimeError(f"Spark task set-up failed: {setup_error}")
            count = _LastCount()
            with deadline(timeout_s):
                stats = run_attempt(fn, probe_fn, task, cfg, WorkerContext(attempt, device, threads, count), probe)
            rec.update(ok=True, stats=stats, samples=count.samples)
        except Exception as e:  # reported to the driver, which resubmits the task in a later job
            rec.update(ok=False, error=describe(e))
        yield rec


def publish_partition(groups: Iterable[list[Item]], records: Any, **kwargs: Any) -> None:
    """foreachPartition body: run the partition, then add its records to the job's accumulator."""
    records.add(list(run_partition(groups, **kwargs)))
