"""The local backend: a spawn-context process pool, one process per GPU (or `local.processes` on CPU), each fed one
task at a time over its own pipe; the supervisor sees results, in-task progress, crashes and hangs.

Why one pipe per worker and no multiprocessing.Queue: a queue shares one lock among all workers, so a worker killed
for a timeout while its feeder thread held that lock would block every other worker's results, and a message cut in
half would corrupt the stream for all; a pipe dies with its worker. Pipes also need no named semaphore, so nothing is
left for multiprocessing's resource tracker to report as leaked.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

from pipeline.core.config import Config
from pipeline.distribute.base import (
    Distributor,
    Job,
    Ledger,
    TaskResult,
    WorkerContext,
    describe,
    gpu_count,
    resolve_worker,
    run_attempt,
)

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 0.5  # a worker sends its in-task progress at most this often
TICK_S = 0.5  # the supervisor's longest wait between two looks at timeouts and the progress display
# A new worker process gets at least this long to become ready, whatever the job's timeout_s: importing torch and the
# model code takes seconds, many more on a loaded machine, and a slow start is not a hung task.
START_TIMEOUT_S = 120.0


class _Reporter:
    """ctx.progress inside a worker process: the latest count, sent to the supervisor at most every PROGRESS_EVERY_S."""

    def __init__(self, conn: Connection, lock: threading.Lock, idx: int, attempt: int):
        self.conn, self.lock, self.idx, self.attempt = conn, lock, idx, attempt
        self.samples, self.sent_at = 0, 0.0

    def __call__(self, samples: int) -> None:
        self.samples = samples
        now = time.monotonic()
        if now - self.sent_at >= PROGRESS_EVERY_S:
            self.sent_at = now
            with self.lock:  # a worker may report from its own threads
                self.conn.send(("progress", self.idx, self.attempt, samples))


def _worker_main(
    gpu: int | None, threads: int, worker: str, committed: str | None, cfg_json: str, conn: Connection
) -> None:
    """Entry of one pool process: pin a GPU, load nothing until the first task, then run tasks until told to stop."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # this process sees only its GPU, as cuda:0
    # torch reads this when first imported (by the worker function's model), so workers share the cores.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    from pipeline.core.logs import setup_worker_logging
    from pipeline.core.storage import remember

    cfg = Config.model_validate_json(cfg_json)
    remember(cfg.storage)  # fsspec has the options from the inherited FSSPEC_<PROTOCOL>; the log needs the secrets
    setup_worker_logging(cfg.log_level)
    fn = resolve_worker(worker)
    probe = resolve_worker(committed) if committed else None
    lock = threading.Lock()
    conn.send(("ready",))  # imports done: from now on a task's time limit is the task's own
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the supervisor is gone
            break
        if item is None:
            break
        idx, task, attempt = item
        report = _Reporter(conn, lock, idx, attempt)
        ctx = WorkerContext(attempt, "cuda:0" if gpu is not None else None, threads, report)
        try:
            msg: tuple[Any, ...] = ("done", idx, attempt, run_attempt(fn, probe, task, cfg, ctx), report.samples)
        except BaseException as e:  # reported to the supervisor, which decides on a retry
            msg = ("error", idx, attempt, describe(e))
        with lock:
            conn.send(msg)
    _exit_quickly(conn)


def _exit_quickly(conn: Connection) -> None:
    """Leave without the interpreter's teardown, which takes seconds once torch and open_clip are loaded.

    Nothing is lost: a pipe's send returns once the message is written, and logs and stdio are flushed. The process
    registered nothing with multiprocessing's resource tracker, so skipping its atexit hooks leaks nothing."""
    conn.close()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class LocalDistributor(Distributor):
    """A spawn-context process pool: one process per GPU, or `local.processes` on CPU."""

    def _layout(self, gpu: bool = True) -> tuple[int, list[int | None], int]:
        """(processes, the GPU of each, CPU threads of each) for a job that does or does not want GPUs."""
        gpus = gpu_count() if gpu else 0
        n = self.cfg.local.processes or (gpus or 1)
        slots: list[int | None] = [i % gpus if gpus else None for i in range(n)]
        threads = self.cfg.local.threads or max(1, (os.cpu_count() or 1) // n)
        return n, slots, threads

    def run(self, job: Job, on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
        ledger = Ledger(job, on_result)
        if not job.tasks:
            ledger.close()
            return ledger.results
        n, gpus, threads = self._layout(job.gpu)
        tracker_was_running = _tracker_running()
        pool = _Pool(job, ledger, gpus[: min(n, len(job.tasks))], threads, self.cfg.model_dump_json())
        try:
            while ledger.remaining:
                pool.dispatch()
                pool.wait(TICK_S)
                pool.check_timeouts()
                ledger.tick()
        finally:
            pool.shutdown()
            ledger.close()
            if not tracker_was_running:
                _reap_resource_tracker()
        return ledger.results


class _Pool:
    """The supervisor's state: worker processes and their pipes, what each holds, and what is left to dispatch."""

    def __init__(self, job: Job, ledger: Ledger, gpus: list[int | None], threads: int, cfg_json: str):
        self.job, self.ledger, self.gpus, self.threads, self.cfg_json = job, ledger, gpus, threads, cfg_json
        self.ctx = mp.get_context("spawn")
        self.todo = collections.deque(range(len(job.tasks)))  # retries go to the front
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Connection] = {}
        self.holding: dict[int, tuple[int, int, float]] = {}  # slot -> (task index, attempt, start time)
        self.gone: set[int] = set()  # slots whose pipe reached its end: their process is exiting
        self.started: dict[int, float] = {}  # slot -> when its process was started, until it is ready
        self.idle_deaths = 0
        for slot in range(len(gpus)):
            self.spawn(slot)

    def spawn(self, slot: int) -> None:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(
            target=_worker_main,
            args=(self.gpus[slot], self.threads, self.job.worker, self.job.committed, self.cfg_json, child),
            name=f"clipline-worker-{slot}",
        )
        p.start()
        child.close()  # only the worker holds its end, so the pipe ends when the worker does
        self.procs[slot], self.conns[slot] = p, parent
        self.gone.discard(slot)
        self.started[slot] = time.monotonic()

    def dispatch(self) -> None:
        for slot, conn in self.conns.items():
            if slot not in self.holding and slot not in self.started and slot not in self.gone and self.todo:
                i = self.todo.popleft()
                attempt = self.ledger.next_attempt[i]
                self.holding[slot] = (i, attempt, time.monotonic())
                with contextlib.suppress(OSError):  # a dead worker: its sentinel reports it and the task
                    conn.send((i, self.job.tasks[i], attempt))

    def wait(self, timeout: float) -> None:
        """Handle what the workers sent and the workers that died, waiting up to `timeout` for the first event."""
        owners: dict[Any, tuple[str, int, Any]] = {}
        for slot, conn in self.conns.items():
            if slot not in self.gone:
                owners[conn] = ("pipe", slot, conn)
            owners[self.procs[slot].sentinel] = ("exit", slot, conn)
        for ready in wait(list(owners), timeout):
            what, slot, conn = owners[ready]
            if self.conns.get(slot) is not conn:
                continue  # that worker was replaced earlier in this loop
            if what == "pipe":
                self.drain(slot)
            else:
                self.died(slot)

    def drain(self, slot: int) -> None:
        conn = self.conns[slot]
        try:
            while conn.poll():
                self.handle(slot, conn.recv())
        except (EOFError, OSError):
            self.gone.add(slot)  # the worker is exiting; its sentinel settles what it held

    def handle(self, slot: int, msg: tuple[Any, ...]) -> None:
        if msg[0] == "ready":
            self.started.pop(slot, None)
            return
        kind, i, attempt = msg[:3]
        held = self.holding.get(slot)
        if held is None or held[:2] != (i, attempt):
            return  # from an attempt already settled
        if kind == "progress":
            self.ledger.report(i, msg[3])
            return
        self.holding.pop(slot)
        if kind == "done":
            self.ledger.succeed(i, msg[3], attempt, msg[4])
        else:
            self.settle(i, attempt, msg[3])

    def settle(self, i: int, attempt: int, error: str) -> None:
        if self.ledger.fail(i, error, attempt + 1):
            self.todo.appendleft(i)

    def retire(self, slot: int, kill: bool = False) -> Any:
        """Stop tracking a worker (killing it first if asked) and reap it."""
        p = self.procs.pop(slot)
        if kill:
            p.kill()
        p.join()
        self.conns.pop(slot).close()
        self.gone.discard(slot)
        self.started.pop(slot, None)
        return p

    def died(self, slot: int) -> None:
        """A worker exited on its own: its task counts as a failed attempt; a replacement starts."""
        self.drain(slot)  # a result sent just before dying is still in the pipe
        p = self.retire(slot)
        held = self.holding.pop(slot, None)
        if held is not None:
            self.settle(held[0], held[1], f"worker process died (exit code {p.exitcode})")
        else:
            self.idle_death(f"exit code {p.exitcode}")
        if self.ledger.remaining:
            self.spawn(slot)

    def idle_death(self, why: str) -> None:
        self.idle_deaths += 1
        if self.idle_deaths > 3 * len(self.gpus):
            raise RuntimeError(f"worker processes keep failing at start-up ({why})")

    def check_timeouts(self) -> None:
        """Kill a worker past the time limit: on its task (a failed attempt), or still starting (a failed start)."""
        timeout_s = self.job.timeout_s
        start_s = max(timeout_s, START_TIMEOUT_S) if timeout_s else None
        for slot, t0 in list(self.started.items()):
            if start_s and time.monotonic() - t0 > start_s:
                self.retire(slot, kill=True)
                self.idle_death(f"not ready after {start_s:.0f}s")
                self.spawn(slot)
        for slot, (i, attempt, t0) in list(self.holding.items()):
            if timeout_s and time.monotonic() - t0 > timeout_s:
                self.retire(slot, kill=True)
                self.holding.pop(slot)
                self.settle(i, attempt, f"timed out after {timeout_s:.0f}s")
                if self.ledger.remaining:
                    self.spawn(slot)

    def shutdown(self) -> None:
        """Idle workers are told to stop; busy ones (the run ended early: an error, Ctrl-C) are killed."""
        for slot, conn in self.conns.items():
            if slot not in self.holding:
                with contextlib.suppress(OSError):
                    conn.send(None)
        for slot in list(self.procs):
            if slot not in self.holding:
                self.procs[slot].join(timeout=10)
            self.retire(slot, kill=self.procs[slot].is_alive())


def _tracker_running() -> bool:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker._resource_tracker, "_pid", None) is not None


def _reap_resource_tracker(wait_s: float = 5.0) -> None:
    """Stop the resource tracker that starting the pool's processes launched, and reap it.

    Every spawn-context process start launches multiprocessing's resource tracker, a process that otherwise lives
    until this interpreter has exited (and a little longer): a scheduler watching the process group sees it outlive
    `clipline embed`. The pool registers nothing with it (pipes, no named semaphores) and its workers are gone, so it
    has nothing left to do; closing our end of its pipe makes it exit. Python offers no public call for this: this
    does what the private `ResourceTracker._stop()` does, without its unbounded wait (a grandchild of a worker could
    still hold the pipe). The next spawn starts a new tracker.
    """
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker  # private fields: see above
    try:
        with tracker._lock:
            fd, pid = tracker._fd, tracker._pid
            if fd is None or pid is None:
                return
            tracker._fd = tracker._pid = None
            os.close(fd)
    except Exception as e:  # a Python whose tracker looks different: leave it to exit with us
        log.debug("resource tracker left running: %s", e)
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        except ChildProcessError:  # not ours to reap after all
            return
        time.sleep(0.01)
