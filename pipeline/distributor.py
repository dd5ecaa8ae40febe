"""One distributor interface, a registry of backends, and the local spawn-process pool with bounded retries."""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config import Config
from pipeline.shards import ShardTask

log = logging.getLogger(__name__)

WorkerFn = Callable[..., dict[str, Any]]


@dataclass
class TaskResult:
    """What became of one task after all its attempts."""

    task: ShardTask
    ok: bool
    stats: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    attempts: int = 0


def resolve_worker(worker: str | WorkerFn) -> WorkerFn:
    """`module:function` -> the function (importable names are what cross process and Spark boundaries)."""
    if callable(worker):
        return worker
    module, _, name = worker.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


class Distributor(ABC):
    """Runs a worker function over tasks; each task is retried up to `max_retries` times."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def run(
        self,
        tasks: list[ShardTask],
        worker: str,
        max_retries: int,
        on_result: Callable[[TaskResult], None] | None = None,
        timeout_s: float | None = None,
    ) -> list[TaskResult]:
        """Run every task; returns one TaskResult per task (never raises for a task's failure)."""


def gpu_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install means CPU
        return 0


def _worker_main(
    slot: int, gpu: int | None, threads: int, worker: str, cfg_json: str, task_q: Any, result_q: Any
) -> None:
    """Entry of one pool process: pin a GPU, load nothing until the first task, then loop over tasks."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)
    # torch reads this when first imported (by the worker function's model), so workers share the cores.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from pipeline.logs import setup_worker_logging

    cfg = Config.model_validate_json(cfg_json)
    setup_worker_logging(cfg.log_level)
    fn = resolve_worker(worker)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    while True:
        item = task_q.get()
        if item is None:
            return
        idx, task, attempt = item
        try:
            stats = fn(task, cfg, attempt)
            result_q.put(("done", slot, idx, stats))
        except BaseException as e:  # reported to the supervisor, which decides on a retry
            result_q.put(("error", slot, idx, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))


class LocalDistributor(Distributor):
    """A spawn-context process pool: one process per GPU, or `local.processes` on CPU."""

    def _layout(self) -> tuple[int, list[int | None], int]:
        gpus = gpu_count()
        n = self.cfg.local.processes or (gpus or 1)
        slots: list[int | None] = [i % gpus if gpus else None for i in range(n)]
        threads = self.cfg.local.threads or max(1, (os.cpu_count() or 1) // n)
        return n, slots, threads

    def run(
        self,
        tasks: list[ShardTask],
        worker: str,
        max_retries: int,
        on_result: Callable[[TaskResult], None] | None = None,
        timeout_s: float | None = None,
    ) -> list[TaskResult]:
        results = [TaskResult(t, ok=False) for t in tasks]
        if not tasks:
            return results
        n, gpus, threads = self._layout()
        n = min(n, len(tasks))
        ctx = mp.get_context("spawn")
        result_q = ctx.Queue()
        cfg_json = self.cfg.model_dump_json()
        todo: list[tuple[int, int]] = [(i, 0) for i in range(len(tasks))]
        todo.reverse()
        procs: dict[int, Any] = {}
        queues: dict[int, Any] = {}
        holding: dict[int, tuple[int, int, float]] = {}
        remaining = len(tasks)
        idle_deaths = 0

        def spawn(slot: int) -> None:
            q = ctx.Queue()
            p = ctx.Process(
                target=_worker_main,
                args=(slot, gpus[slot], threads, worker, cfg_json, q, result_q),
                name=f"clipline-worker-{slot}",
            )
            p.start()
            procs[slot], queues[slot] = p, q

        def settle(idx: int, attempt: int, error: str) -> None:
            nonlocal remaining
            r = results[idx]
            r.errors.append(error)
            r.attempts = attempt + 1
            if attempt < max_retries:
                log.warning(
                    "shard %s failed (attempt %d), retrying: %s",
                    tasks[idx].shard_id,
                    attempt + 1,
                    error.splitlines()[0],
                )
                todo.append((idx, attempt + 1))
            else:
                log.error(
                    "shard %s failed after %d attempts: %s", tasks[idx].shard_id, attempt + 1, error.splitlines()[0]
                )
                remaining -= 1
                if on_result:
                    on_result(r)

        def handle(msg: tuple[str, int, int, Any]) -> None:
            nonlocal remaining
            kind, slot, idx, payload = msg
            held = holding.get(slot)
            if held is None or held[0] != idx:
                return  # stale message from an attempt already settled (timed out, then finished)
            holding.pop(slot)
            if kind == "done":
                r = results[idx]
                r.ok, r.stats, r.attempts = True, payload, held[1] + 1
                remaining -= 1
                if on_result:
                    on_result(r)
            else:
                settle(idx, held[1], payload)

        for slot in range(n):
            spawn(slot)
        try:
            while remaining:
                for slot in procs:
                    if slot not in holding and todo:
                        idx, attempt = todo.pop()
                        queues[slot].put((idx, tasks[idx], attempt))
                        holding[slot] = (idx, attempt, time.monotonic())
                try:
                    handle(result_q.get(timeout=0.5))
                    continue
                except queue.Empty:
                    pass
                for slot, p in list(procs.items()):
                    held = holding.get(slot)
                    if not p.is_alive():
                        # A result sent just before dying is already in the pipe: take it first.
                        while True:
                            try:
                                handle(result_q.get_nowait())
                            except queue.Empty:
                                break
                        held = holding.get(slot)
                        if held is not None:
                            holding.pop(slot)
                            settle(held[0], held[1], f"worker process died (exit code {p.exitcode})")
                        else:
                            idle_deaths += 1
                            if idle_deaths > 3 * n:
                                raise RuntimeError(f"worker processes keep dying at start-up (exit code {p.exitcode})")
                        if remaining:
                            spawn(slot)
                    elif held is not None and timeout_s and time.monotonic() - held[2] > timeout_s:
                        p.kill()
                        p.join()
                        holding.pop(slot)
                        settle(held[0], held[1], f"shard timed out after {timeout_s:.0f}s")
                        spawn(slot)
        finally:
            for slot in procs:
                try:
                    queues[slot].put(None)
                except Exception:
                    pass
            for p in procs.values():
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
        return results


_BACKENDS: dict[str, str] = {
    "local": "pipeline.distributor:LocalDistributor",
    "spark": "pipeline.spark:SparkDistributor",
}


def get_distributor(cfg: Config) -> Distributor:
    """The backend named by cfg.distributor; an unknown name raises ValueError at once."""
    if cfg.distributor not in _BACKENDS:
        raise ValueError(f"unknown distributor {cfg.distributor!r}; known: {', '.join(sorted(_BACKENDS))}")
    module, _, name = _BACKENDS[cfg.distributor].partition(":")
    cls: type[Distributor] = getattr(importlib.import_module(module), name)
    return cls(cfg)
