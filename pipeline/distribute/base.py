"""The distributor contract every backend shares: a Job (tasks plus importable worker and probe), what a worker is told
about its attempt, the one retry ledger (retry decision, its log lines, progress), and the backend registry.

A backend knows no stage: it never reads a stage's files or config section. A stage hands it a `Job`; the backend
calls `worker(task, cfg, ctx)` for each attempt, asks `committed(task, cfg)` before a retry whether the task is
already done, and reports every attempt's outcome to a `Ledger`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from pipeline.core.config import Config
from pipeline.distribute.progress import Progress

log = logging.getLogger(__name__)


class Task(Protocol):
    """A unit of work: a small, picklable, deterministic dataclass with a stable name."""

    @property
    def name(self) -> str: ...


def _ignore(samples: int) -> None:
    pass


@dataclass
class WorkerContext:
    """What the backend tells a worker about one attempt of one task."""

    attempt: int  # 0 for the first attempt; crashes, timeouts and Spark's own retries count
    device: str | None = None  # the accelerator the backend assigned ("cuda:0"), or None
    threads: int = 1  # CPU threads the attempt may use
    progress: Callable[[int], None] = _ignore  # samples this attempt has finished so far (cumulative)


WorkerFn = Callable[[Any, Config, WorkerContext], dict[str, Any]]
ProbeFn = Callable[[Any, Config], "dict[str, Any] | None"]


@dataclass(frozen=True)
class Job:
    """What a stage hands a distributor: its tasks and the importable (`module:function`) functions for them."""

    name: str  # the stage, e.g. "embed": names the progress bar and its log lines
    tasks: Sequence[Any]  # Task instances
    worker: str  # called as fn(task, cfg, ctx: WorkerContext) -> stats (a JSON-able dict)
    committed: str | None = None  # called as fn(task, cfg) -> stats of a task already done, or None
    max_retries: int = 0  # attempts per task = max_retries + 1
    timeout_s: float | None = None  # one attempt running longer fails
    gpu: bool = False  # an attempt wants an accelerator: one local process per GPU, a device in ctx
    unit: str = "task"  # what a task is called in log lines ("shard")


@dataclass
class TaskResult:
    """What became of one task after all its attempts."""

    task: Any
    ok: bool
    stats: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    attempts: int = 0


def resolve_worker(name: str | Callable[..., Any]) -> Callable[..., Any]:
    """`module:function` -> the function (importable names are what cross process and Spark boundaries)."""
    if callable(name):
        return name
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]


def describe(e: BaseException) -> str:
    """An attempt's error as the ledger records it: the first line names it, a short traceback follows."""
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"


def run_attempt(
    worker: WorkerFn, committed: ProbeFn | None, task: Any, cfg: Config, ctx: WorkerContext, probe: bool = False
) -> dict[str, Any]:
    """One attempt as every backend runs it. A retry (or with `probe`, any attempt) first asks the probe whether the
    task already committed: a worker killed after its commit, a Spark retry of a group, a late speculative copy."""
    if committed is not None and (probe or ctx.attempt > 0):
        done = committed(task, cfg)
        if done is not None:
            return done
    return worker(task, cfg, ctx)


class Ledger:
    """Every task's attempts and outcome on the driver: the one retry policy of all backends, its log lines (written
    here only), the progress display and the on_result calls."""

    def __init__(
        self, job: Job, on_result: Callable[[TaskResult], None] | None = None, progress: Progress | None = None
    ):
        self.job = job
        self.results = [TaskResult(t, ok=False) for t in job.tasks]
        self.next_attempt = [0] * len(job.tasks)  # the attempt number the next try of each task gets
        self.on_result = on_result
        self.progress = progress if progress is not None else Progress(job.name, job.unit, len(job.tasks))
        self.samples = [0] * len(job.tasks)  # what each task's current (or successful) attempt reported
        self.closed = 0  # tasks with a final outcome
        self.changes = 0  # outcomes recorded, successes and failures

    @property
    def remaining(self) -> int:
        """Tasks without a final outcome yet."""
        return len(self.results) - self.closed

    def is_open(self, i: int) -> bool:
        return not self.results[i].ok and self.next_attempt[i] <= self.job.max_retries

    def pending(self) -> list[int]:
        """Tasks that still need an attempt."""
        return [i for i in range(len(self.results)) if self.is_open(i)]

    def report(self, i: int, samples: int) -> None:
        """A running attempt of task i has finished `samples` samples (cumulative)."""
        if self.is_open(i) and samples != self.samples[i]:
            self.progress.add(samples - self.samples[i])
            self.samples[i] = samples

    def succeed(self, i: int, stats: dict[str, Any] | None, attempt: int, samples: int | None = None) -> None:
        r = self.results[i]
        if not self.is_open(i):
            return  # already reported (a duplicate record, a probe after the commit was seen)
        if samples is not None:
            self.report(i, samples)
        r.ok, r.stats, r.attempts = True, stats, attempt + 1
        self.changes += 1
        self._close(r, self.samples[i])

    def fail(self, i: int, error: str, attempts_used: int) -> bool:
        """A failed attempt; returns whether the task gets another one. `attempts_used` may exceed the next attempt
        (Spark retried the task itself), never fall below it."""
        r = self.results[i]
        if not self.is_open(i):
            return False
        r.errors.append(error)
        self.next_attempt[i] = max(self.next_attempt[i] + 1, attempts_used)
        r.attempts = self.next_attempt[i]
        self.progress.add(-self.samples[i])  # that attempt's samples are lost
        self.samples[i] = 0
        self.changes += 1
        first = error.splitlines()[0] if error else "?"
        name = getattr(self.job.tasks[i], "name", str(i))
        if self.is_open(i):
            log.warning("%s %s failed (attempt %d), retrying: %s", self.job.unit, name, r.attempts, first)
            return True
        log.error("%s %s failed after %d attempts: %s", self.job.unit, name, r.attempts, first)
        self._close(r, 0)
        return False

    def _close(self, r: TaskResult, samples: int) -> None:
        self.closed += 1
        self.progress.finished(r.ok, samples)
        if self.on_result:
            self.on_result(r)

    def tick(self) -> None:
        """Called by a backend's loop about once a second: refreshes the bar or writes the periodic log line."""
        self.progress.show()

    def close(self) -> None:
        self.progress.close()


class Distributor(ABC):
    """Runs a Job's tasks somewhere; every task gets a TaskResult, a task's failure never raises."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @abstractmethod
    def run(self, job: Job, on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
        """Run every task of `job`; one TaskResult per task, in the order of job.tasks."""


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


_BACKENDS: dict[str, str] = {
    "local": "pipeline.distribute.local:LocalDistributor",
    "spark": "pipeline.distribute.spark:SparkDistributor",
}


def get_distributor(cfg: Config) -> Distributor:
    """The backend named by cfg.distributor; an unknown name raises ValueError at once, naming the known ones."""
    if cfg.distributor not in _BACKENDS:
        raise ValueError(f"unknown distributor {cfg.distributor!r}; known: {', '.join(sorted(_BACKENDS))}")
    cls: type[Distributor] = resolve_worker(_BACKENDS[cfg.distributor])  # type: ignore[assignment]
    return cls(cfg)
