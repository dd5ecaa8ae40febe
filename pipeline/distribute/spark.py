"""The Spark backend: ShardTasks run as Spark tasks, failures retried per shard, progress read from commit markers.

Design (details and cluster recipes in docs/SPARK.md):
- One partition per group of `spark.shards_per_task` ShardTasks; nothing is shuffled. Each task calls the
  importable worker with (task, cfg, attempt), the config sent as JSON and re-validated on the executor. The
  model loads once per executor Python process (runner's cache + `spark.python.worker.reuse`).
- Failures: a worker exception is caught in the task and returned as an error record, so one bad shard never
  aborts the job; the driver resubmits failed shards in a new Spark job until each had `max_retries + 1`
  attempts, then reports TaskResult(ok=False). Crashes Python cannot catch are retried by Spark
  (`spark.task.maxFailures`; `local[N,F]` on a local master) and count: attempt = driver count +
  TaskContext.attemptNumber(). If Spark aborts the job, the driver reads the failed task from the abort
  message, charges its shards, keeps what committed and resubmits the rest uncharged (charging everyone when
  the message cannot be read, so the loop ends). Other job failures (cancelled, context stopped) are raised.
- Retries and speculative copies are safe: the writer commits by rename, stats file last, and a task skips a
  shard whose stats file exists (unless embed.overwrite).
- Progress: toLocalIterator() computes one partition at a time, so collect() runs in a thread while the
  driver polls the stats files and calls on_result as shards commit. Listing a stats folder is slow and billed on
  object stores, so the driver lists when Spark's status tracker (driver memory, free to ask) reports newly finished
  tasks, otherwise at an interval that doubles while listings find nothing new, and never so often that listing
  takes more than a tenth of the time (_ListSchedule).
- timeout_s is enforced in the task with SIGALRM (PySpark runs tasks in the worker's main thread).
- An active session is reused and never stopped; one built from cfg.spark is stopped by stop_session.
- GPUs: a task pins the GPU Spark assigned it (TaskContext.resources()["gpu"]) via model.device=cuda:N.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from pipeline.core.config import Config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.local import Distributor, TaskResult, resolve_worker
from pipeline.embeddings.layout import committed_shards, read_stats, shard_files

if TYPE_CHECKING:
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_OWNED: dict[str, Any] = {}  # the SparkContext get_session created, if any: the only one stop_session stops
_ABORT = re.compile(r"Task (\d+) in stage [\d.]+ failed (\d+) times?")
POLL_TICK_S = 1.0  # how often the driver asks Spark's status tracker (no storage access)
POLL_MAX_S = 300.0  # the longest a running job goes without listing its stats folders (unless one listing is slower)
POLL_LIST_SHARE = 10  # at least this many times a listing's own duration between two listings


class ShardTimeout(Exception):
    """A shard ran longer than its time limit inside a Spark task."""


# ---- sessions -------------------------------------------------------------------------------------------


def get_session(cfg: Config) -> SparkSession:
    """The active session if there is one (never stopped here), else a new one built from `cfg.spark`."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is None and SparkContext._active_spark_context is not None:
        active = SparkSession.builder.getOrCreate()  # made in another thread: the active session is per thread
    if active is not None:
        master = _context(active).master
        if cfg.spark.master and cfg.spark.master != master:
            log.warning("spark.master=%s ignored: reusing the active session (master %s)", cfg.spark.master, master)
        return active
    builder = SparkSession.builder.appName(cfg.spark.app_name)
    if cfg.spark.master:  # None: spark-submit's --master, or Spark's own default
        builder = builder.master(cfg.spark.master)
    # Worker reuse: one model load per executor Python process. The console bar would fight clipline's own.
    conf = {"spark.python.worker.reuse": "true", "spark.ui.showConsoleProgress": "false"}
    # Without a master and outside spark-submit (no gateway handed over), Spark defaults to local[*].
    master = cfg.spark.master or ("local[*]" if "PYSPARK_GATEWAY_PORT" not in os.environ else "")
    if master.startswith("local") and "PYSPARK_PYTHON" not in os.environ:
        # Local executors should run this interpreter, not `python3` on PATH; PySpark reads only the variable.
        os.environ["PYSPARK_PYTHON"] = sys.executable
    conf.update(cfg.spark.conf)
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    _OWNED["context"] = spark.sparkContext
    log.info("started Spark session (master %s)", spark.sparkContext.master)
    return spark


def stop_session(spark: SparkSession) -> bool:
    """Stop `spark` if get_session created it; returns whether it was stopped (others' sessions are kept)."""
    owned = _OWNED.get("context")
    if owned is None or _context(spark) is not owned:
        return False
    _OWNED.pop("context")
    spark.stop()
    return True


@contextlib.contextmanager
def spark_session(cfg: Config) -> Iterator[SparkSession]:
    """get_session for the length of a block; stops the session on exit only if the block created it."""
    owned_before = _OWNED.get("context")
    spark = get_session(cfg)
    created = _OWNED.get("context") is not owned_before
    try:
        yield spark
    finally:
        if created:
            stop_session(spark)


def _context(spark: SparkSession) -> SparkContext:
    try:
        return spark.sparkContext
    except Exception as e:  # Spark Connect sessions (Databricks serverless / shared access mode) have no RDDs
        raise RuntimeError(
            "distributor=spark needs a classic Spark session with the RDD API; Spark Connect sessions "
            "(Databricks serverless or shared access mode) are not supported: use a single-user cluster"
        ) from e


def _check_reuse(sc: SparkContext) -> None:
    if sc.getConf().get("spark.python.worker.reuse", "true").lower() != "true":
        log.warning("spark.python.worker.reuse is false: the model is reloaded for every Spark task")


# ---- pure planning --------------------------------------------------------------------------------------


def plan_groups(indices: list[int], per_task: int) -> list[list[int]]:
    """Consecutive groups of at most `per_task` task indices: one Spark task (partition) each."""
    return [indices[i : i + per_task] for i in range(0, len(indices), per_task)]


def failed_partition(message: str) -> tuple[int | None, int]:
    """(partition, times it failed) from Spark's "Job aborted ... Task 3 in stage 0.0 failed 4 times" message."""
    m = _ABORT.search(message)
    return (int(m.group(1)), int(m.group(2))) if m else (None, 1)


def spark_error_message(error: BaseException) -> str:
    """The JVM messages along an exception's chain: PySpark re-raises a task's PythonException `from None`,
    which hides the "Job aborted ... Task N in stage ..." message in `__context__`."""
    parts: list[str] = []
    e: BaseException | None = error
    while e is not None and len(parts) < 8:
        java = getattr(e, "java_exception", None)
        parts.append(str(java.getMessage()) if java is not None else str(e))
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


class _ListSchedule:
    """When the driver lists the stats folders during a Spark job: once Spark reports newly finished tasks, but never
    within a gap of the last listing (`min_s`, or POLL_LIST_SHARE times that listing's duration if longer);
    otherwise after an interval that starts at the gap and doubles (up to `max_s`) after each listing that found no
    new commit. These interval listings catch shards that commit inside a task still running (spark.shards_per_task
    > 1), so one that finds a commit Spark did not announce sets the interval back to the gap; they also stand in
    when the status tracker cannot tell."""

    def __init__(self, min_s: float, max_s: float = POLL_MAX_S, now: float = 0.0):
        self.min_s, self.max_s = min_s, max(min_s, max_s)
        self.gap = self.interval = min_s
        self.last, self.tasks_seen = now, 0

    def due(self, now: float, tasks_done: int | None) -> bool:
        since = now - self.last
        if since < self.gap:
            return False
        return (tasks_done is not None and tasks_done > self.tasks_seen) or since >= self.interval

    def listed(self, now: float, tasks_done: int | None, found_new: bool, took: float = 0.0) -> None:
        """A listing ended at `now` after `took` seconds; `tasks_done` is what the tracker said when it was due."""
        announced = tasks_done is not None and tasks_done > self.tasks_seen
        self.last = now
        if tasks_done is not None:
            self.tasks_seen = max(self.tasks_seen, tasks_done)
        self.gap = max(self.min_s, POLL_LIST_SHARE * took)
        if not found_new:
            self.interval = min(2 * self.interval, self.max_s)
        elif not announced:
            self.interval = self.gap
        self.interval = max(self.interval, self.gap)


def pin_gpu(cfg: Config, gpu_addresses: list[str]) -> Config:
    """A copy of cfg whose model runs on the first GPU Spark assigned the task (device=cpu is kept)."""
    if not gpu_addresses or cfg.model.device == "cpu":
        return cfg
    model = cfg.model.model_copy(update={"device": f"cuda:{gpu_addresses[0]}"})
    return cfg.model_copy(update={"model": model})


# ---- executor side --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _executor_config(cfg_json: str) -> Config:
    from pipeline.core.logs import setup_worker_logging

    cfg = Config.model_validate_json(cfg_json)
    setup_worker_logging(cfg.log_level)
    return cfg


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise ShardTimeout in the main thread after `seconds` (a no-op off the main thread)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def alarm(signum: int, frame: Any) -> None:
        raise ShardTimeout(f"shard timed out after {seconds:.0f}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _task_setup(worker: str, cfg_json: str, ctx: Any) -> tuple[Config, Callable[..., dict[str, Any]]]:
    gpus = list(ctx.resources()["gpu"].addresses) if ctx and "gpu" in ctx.resources() else []
    cfg = pin_gpu(_executor_config(cfg_json), gpus)
    if ctx and not gpus:
        import torch

        torch.set_num_threads(max(1, ctx.cpus()))  # the cores Spark gave this task (spark.task.cpus)
    return cfg, resolve_worker(worker)


def _committed_stats(task: ShardTask) -> dict[str, Any] | None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(shard_files(task.output, task.shard_id).stats)
    return read_stats(task.output, task.shard_id) if fs.exists(path) else None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"


def run_partition(
    groups: Iterable[list[tuple[int, ShardTask, int]]],
    worker: str,
    cfg_json: str,
    timeout_s: float | None,
    skip_committed: bool,
) -> Iterator[dict[str, Any]]:
    """The body of one Spark task: run the worker on each (index, task, attempt base) of its group; one record each.

    Every exception becomes an error record, so only a dying process can make Spark fail the task."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    spark_attempt = ctx.attemptNumber() if ctx else 0
    setup_error = None
    try:
        cfg, fn = _task_setup(worker, cfg_json, ctx)
    except Exception as e:
        setup_error = _describe(e)
    for idx, task, base in (item for group in groups for item in group):  # one group per partition
        attempt = base + spark_attempt
        rec: dict[str, Any] = {"idx": idx, "attempt": attempt}
        try:
            if setup_error:
                raise RuntimeError(f"Spark task set-up failed: {setup_error}")
            done = _committed_stats(task) if skip_committed else None
            if done is not None:  # a retry after the commit, or a late speculative copy: don't redo it
                rec.update(ok=True, stats=done, attempt=int(done.get("attempt", attempt)))
            else:
                with _deadline(timeout_s):
                    rec.update(ok=True, stats=fn(task, cfg, attempt))
        except Exception as e:  # reported to the driver, which resubmits the shard in a later job
            rec.update(ok=False, error=_describe(e))
        yield rec


# ---- driver side ----------------------------------------------------------------------------------------


class _Ledger:
    """Per-shard outcome on the driver: attempts used, success, final failure, on_result calls."""

    def __init__(self, tasks: list[ShardTask], max_retries: int, on_result: Callable[[TaskResult], None] | None):
        self.tasks = tasks
        self.results = [TaskResult(t, ok=False) for t in tasks]
        self.next_attempt = [0] * len(tasks)
        self.max_retries = max_retries
        self.on_result = on_result
        self.changes = 0

    def pending(self) -> list[int]:
        return [i for i, r in enumerate(self.results) if not r.ok and self.next_attempt[i] <= self.max_retries]

    def succeed(self, i: int, stats: dict[str, Any], attempt: int) -> None:
        r = self.results[i]
        if r.ok:
            return  # already reported (seen by polling, or a duplicate attempt)
        r.ok, r.stats, r.attempts = True, stats, attempt + 1
        self.changes += 1
        if self.on_result:
            self.on_result(r)

    def fail(self, i: int, error: str, attempts_used: int) -> None:
        r = self.results[i]
        if r.ok:
            return
        r.errors.append(error)
        self.next_attempt[i] = max(self.next_attempt[i] + 1, attempts_used)
        r.attempts = self.next_attempt[i]
        self.changes += 1
        shard = self.tasks[i].shard_id
        if self.next_attempt[i] <= self.max_retries:
            log.warning("shard %s failed (attempt %d), retrying: %s", shard, r.attempts, error.splitlines()[0])
        else:
            log.error("shard %s failed after %d attempts: %s", shard, r.attempts, error.splitlines()[0])
            if self.on_result:
                self.on_result(r)


def _finished_tasks(sc: SparkContext, group_id: str) -> int | None:
    """Spark tasks of a job group that finished, from the driver's status tracker (no storage access); None when
    it cannot tell."""
    try:
        tracker = sc.statusTracker()
        n = 0
        for job_id in tracker.getJobIdsForGroup(group_id):
            job = tracker.getJobInfo(job_id)
            for stage_id in job.stageIds if job else ():
                stage = tracker.getStageInfo(stage_id)
                n += stage.numCompletedTasks if stage else 0
        return n
    except Exception as e:  # progress is best effort: the interval listings stand in
        log.debug("spark status tracker: %s", e)
        return None


class SparkDistributor(Distributor):
    """Runs shard tasks as Spark tasks on the active or a configured Spark session."""

    def run(
        self,
        tasks: list[ShardTask],
        worker: str,
        max_retries: int,
        on_result: Callable[[TaskResult], None] | None = None,
        timeout_s: float | None = None,
    ) -> list[TaskResult]:
        ledger = _Ledger(tasks, max_retries, on_result)
        if not tasks:
            return ledger.results
        with spark_session(self.cfg) as spark:
            sc = _context(spark)
            _check_reuse(sc)
            pending = ledger.pending()
            while pending:
                self._round(sc, ledger, pending, worker, timeout_s)
                pending = ledger.pending()
        return ledger.results

    def _round(
        self, sc: SparkContext, ledger: _Ledger, pending: list[int], worker: str, timeout_s: float | None
    ) -> None:
        """One Spark job over the pending shards; updates the ledger, raises only if Spark itself failed."""
        from pyspark import InheritableThread

        groups = plan_groups(pending, self.cfg.spark.shards_per_task)
        payload = [[(i, ledger.tasks[i], ledger.next_attempt[i]) for i in g] for g in groups]
        outputs = sorted({ledger.tasks[i].output for i in pending})
        before = {out: set(committed_shards(out, include_empty=True)) for out in outputs}
        body = functools.partial(
            run_partition,
            worker=worker,
            cfg_json=self.cfg.model_dump_json(),
            timeout_s=timeout_s,
            skip_committed=not self.cfg.embed.overwrite,
        )
        group_id = f"clipline-{uuid.uuid4().hex[:8]}"
        box: dict[str, Any] = {}

        def collect() -> None:
            sc.setJobGroup(group_id, f"clipline: {len(pending)} shards", interruptOnCancel=True)
            try:
                box["records"] = sc.parallelize(payload, numSlices=len(payload)).mapPartitions(body).collect()
            except BaseException as e:  # handed to the driver thread below
                box["error"] = e

        log.info("spark: %d shards in %d tasks", len(pending), len(groups))
        # Listing the stats folder costs more on big outputs: at most every 1-30 s, more rarely while nothing commits.
        schedule = _ListSchedule(min(30.0, max(1.0, len(pending) / 500)), now=time.monotonic())
        thread = InheritableThread(target=collect, daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(POLL_TICK_S)
                done, now = _finished_tasks(sc, group_id), time.monotonic()
                if thread.is_alive() and schedule.due(now, done):  # once it ended, its records say it all
                    found = self._poll(ledger, pending, before)
                    schedule.listed(time.monotonic(), done, found > 0, time.monotonic() - now)
        except BaseException:  # Ctrl-C on the driver: stop the executors too
            sc.cancelJobGroup(group_id)
            raise
        for rec in box.get("records", []):
            if rec["ok"]:
                ledger.succeed(rec["idx"], rec["stats"], rec["attempt"])
            else:
                ledger.fail(rec["idx"], rec["error"], rec["attempt"] + 1)
        if "error" in box:
            self._aborted(ledger, pending, groups, box["error"], before)

    def _poll(self, ledger: _Ledger, pending: list[int], before: dict[str, set[str]]) -> int:
        """Report shards whose commit marker appeared since the round began; returns how many were new."""
        now = {out: set(committed_shards(out, include_empty=True)) for out in before}
        found = 0
        for i in pending:
            t = ledger.tasks[i]
            if not ledger.results[i].ok and t.shard_id in now[t.output] - before[t.output]:
                stats = read_stats(t.output, t.shard_id)
                ledger.succeed(i, stats, int(stats.get("attempt", ledger.next_attempt[i])))
                found += 1
        return found

    def _aborted(
        self,
        ledger: _Ledger,
        pending: list[int],
        groups: list[list[int]],
        error: BaseException,
        before: dict[str, set[str]],
    ) -> None:
        """Spark gave up on a task: charge its shards, keep what committed, raise anything else."""
        message = spark_error_message(error)
        if "Job aborted due to stage failure" not in message:
            raise error  # cancelled, SparkContext stopped, driver trouble: not a shard's fault
        changes = ledger.changes
        time.sleep(0.5)  # let tasks that were committing when the job aborted finish their rename
        self._poll(ledger, pending, before)
        part, times = failed_partition(message)
        culprits = groups[part] if part is not None and part < len(groups) else pending
        first = next(line for line in message.splitlines() if "Job aborted" in line)[:800]
        for i in culprits:
            if not ledger.results[i].ok:
                ledger.fail(i, f"Spark gave up on the task: {first}", ledger.next_attempt[i] + times)
        if ledger.changes == changes:  # nothing charged nor committed: charge everyone so the loop ends
            for i in pending:
                ledger.fail(i, f"Spark job aborted: {first}", ledger.next_attempt[i] + 1)
