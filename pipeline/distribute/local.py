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

from pipeline.core.config import Config
from pipeline.core.tasks import ShardTask

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


# Device nodes of the NVIDIA driver, AMD's ROCm and WSL2's GPU bridge: without any of them torch sees no GPU.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_count() -> int:
    """GPUs torch can use; 0 without importing torch (3-4 s) on a machine with no GPU device nodes."""
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in GPU_DEVICE_NODES):
        return 0
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
    from pipeline.core.logs import setup_worker_logging

    cfg = Config.model_validate_json(cfg_json)
    if gpu is not None and cfg.model.device != "cpu":
        # This process sees only its GPU, as cuda:0; an explicit cuda:N from the config would name another one.
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"device": "cuda"})})
    setup_worker_logging(cfg.log_level)
    fn = resolve_worker(worker)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    while True:
        item = task_q.get()
        if item is None:
            _exit_quickly(result_q)
        idx, task, attempt = item
        try:
            stats = fn(task, cfg, attempt)
            result_q.put(("done", slot, idx, stats))
        except BaseException as e:  # reported to the supervisor, which decides on a retry
            result_q.put(("error", slot, idx, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))


def _exit_quickly(result_q: Any) -> None:
    """Leave without the interpreter's teardown, which takes seconds once torch and open_clip are loaded.

    Nothing is lost: every result is flushed through the queue first, and logs and stdio are flushed.
    """
    result_q.close()
    result_q.join_thread()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class LocalDistributor(Distributor):
    """A spawn-context process pool: one process per GPU, or `local.processes` on CPU."""

    def _layout(self) -> tuple[int, list[int | None], int]:
        gpus = 0 if self.cfg.model.device == "cpu" else gpu_count()
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
        if not tasks:
            return []
        n, gpus, threads = self._layout()
        pool = _Pool(
            tasks, min(n, len(tasks)), gpus, threads, worker, self.cfg.model_dump_json(), max_retries, on_result
        )
        try:
            while pool.remaining:
                pool.dispatch()
                if not pool.take_result(timeout=0.5):
                    pool.check_workers(timeout_s)
        finally:
            pool.shutdown()
        return pool.results


class _Pool:
    """The supervisor's state: worker processes, what each holds, what is left to do, and the results."""

    def __init__(
        self,
        tasks: list[ShardTask],
        n: int,
        gpus: list[int | None],
        threads: int,
        worker: str,
        cfg_json: str,
        max_retries: int,
        on_result: Callable[[TaskResult], None] | None,
    ):
        self.tasks, self.n, self.gpus, self.threads = tasks, n, gpus, threads
        self.worker, self.cfg_json, self.max_retries, self.on_result = worker, cfg_json, max_retries, on_result
        self.ctx = mp.get_context("spawn")
        self.result_q = self.ctx.Queue()
        self.results = [TaskResult(t, ok=False) for t in tasks]
        self.todo: list[tuple[int, int]] = [(i, 0) for i in reversed(range(len(tasks)))]
        self.procs: dict[int, Any] = {}
        self.queues: dict[int, Any] = {}
        self.holding: dict[int, tuple[int, int, float]] = {}  # slot -> (task index, attempt, start time)
        self.remaining = len(tasks)
        self.idle_deaths = 0
        for slot in range(n):
            self.spawn(slot)

    def spawn(self, slot: int) -> None:
        q = self.ctx.Queue()
        p = self.ctx.Process(
            target=_worker_main,
            args=(slot, self.gpus[slot], self.threads, self.worker, self.cfg_json, q, self.result_q),
            name=f"clipline-worker-{slot}",
        )
        p.start()
        self.procs[slot], self.queues[slot] = p, q

    def dispatch(self) -> None:
        for slot in self.procs:
            if slot not in self.holding and self.todo:
                idx, attempt = self.todo.pop()
                self.queues[slot].put((idx, self.tasks[idx], attempt))
                self.holding[slot] = (idx, attempt, time.monotonic())

    def finish(self, r: TaskResult) -> None:
        self.remaining -= 1
        if self.on_result:
            self.on_result(r)

    def settle(self, idx: int, attempt: int, error: str) -> None:
        """A failed attempt: retry it, or past the bound report the task failed."""
        r = self.results[idx]
        r.errors.append(error)
        r.attempts = attempt + 1
        first = error.splitlines()[0]
        if attempt < self.max_retries:
            log.warning("shard %s failed (attempt %d), retrying: %s", self.tasks[idx].shard_id, attempt + 1, first)
            self.todo.append((idx, attempt + 1))
        else:
            log.error("shard %s failed after %d attempts: %s", self.tasks[idx].shard_id, attempt + 1, first)
            self.finish(r)

    def handle(self, msg: tuple[str, int, int, Any]) -> None:
        kind, slot, idx, payload = msg
        held = self.holding.get(slot)
        if held is None or held[0] != idx:
            return  # stale message from an attempt already settled (timed out, then finished)
        self.holding.pop(slot)
        if kind == "done":
            r = self.results[idx]
            r.ok, r.stats, r.attempts = True, payload, held[1] + 1
            self.finish(r)
        else:
            self.settle(idx, held[1], payload)

    def take_result(self, timeout: float | None) -> bool:
        try:
            msg = self.result_q.get(timeout=timeout) if timeout else self.result_q.get_nowait()
        except queue.Empty:
            return False
        self.handle(msg)
        return True

    def check_workers(self, timeout_s: float | None) -> None:
        """Replace dead workers (their shard counts as a failed attempt) and kill ones past the shard timeout."""
        for slot, p in list(self.procs.items()):
            held = self.holding.get(slot)
            if not p.is_alive():
                while self.take_result(timeout=None):  # a result sent just before dying is already in the pipe
                    pass
                held = self.holding.pop(slot, None)
                if held is not None:
                    self.settle(held[0], held[1], f"worker process died (exit code {p.exitcode})")
                else:
                    self.idle_deaths += 1
                    if self.idle_deaths > 3 * self.n:
                        raise RuntimeError(f"worker processes keep dying at start-up (exit code {p.exitcode})")
                if self.remaining:
                    self.spawn(slot)
            elif held is not None and timeout_s and time.monotonic() - held[2] > timeout_s:
                p.kill()
                p.join()
                self.holding.pop(slot)
                self.settle(held[0], held[1], f"shard timed out after {timeout_s:.0f}s")
                self.spawn(slot)

    def shutdown(self) -> None:
        for q in self.queues.values():
            try:
                q.put(None)
            except Exception:
                pass
        for p in self.procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


_BACKENDS: dict[str, str] = {
    "local": "pipeline.distribute.local:LocalDistributor",
    "spark": "pipeline.distribute.spark:SparkDistributor",
}


def get_distributor(cfg: Config) -> Distributor:
    """The backend named by cfg.distributor; an unknown name raises ValueError at once."""
    if cfg.distributor not in _BACKENDS:
        raise ValueError(f"unknown distributor {cfg.distributor!r}; known: {', '.join(sorted(_BACKENDS))}")
    module, _, name = _BACKENDS[cfg.distributor].partition(":")
    cls: type[Distributor] = getattr(importlib.import_module(module), name)
    return cls(cfg)
