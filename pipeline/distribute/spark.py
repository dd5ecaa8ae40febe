"""The Spark backend, driver side: a Job's tasks run as Spark tasks, failed tasks are resubmitted per task, and
progress and outcomes come from an accumulator as each Spark task ends, never from listing storage.

Design (details and cluster recipes in docs/SPARK.md; the executor side is spark_executor.py):
- One partition per group of `spark.shards_per_task` tasks; nothing is shuffled. The config travels as JSON and is
  validated again on the executor; Spark reuses its Python workers, so a worker's model loads once per process.
- Failures: a worker exception comes back as an error record, so one bad task never aborts the job; the driver
  resubmits failed tasks in a new Spark job (a round) until each had `max_retries + 1` attempts. Crashes Python cannot
  catch are retried by Spark (`spark.task.maxFailures`; `local[N,F]` on a local master) and count: attempt = driver
  count + TaskContext.attemptNumber(). If Spark aborts the job, the driver reads the failed partition from the abort
  message, asks the Job's probe which of its tasks committed anyway, charges the others, and resubmits the rest of the
  round uncharged; that next round probes every task, since a task killed by the abort may have committed.
- Progress: the round's job runs in a thread; every POLL_TICK_S the driver reads the records the accumulator gathered
  (driver memory, no storage access) and hands them to the ledger, which moves the progress bar.
- Retries and speculative copies are safe: every retry asks the Job's probe first, and the stage's writer commits by
  rename.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any, Callable

from pipeline.distribute.base import Distributor, Job, Ledger, TaskResult, resolve_worker
from pipeline.distribute.spark_executor import RecordList, publish_partition
from pipeline.distribute.spark_session import check_reuse, session_context, spark_session

if TYPE_CHECKING:
    from pyspark import SparkContext

log = logging.getLogger(__name__)

_ABORT = re.compile(r"Task (\d+) in stage [\d.]+ failed (\d+) times?")
POLL_TICK_S = 1.0  # how often the driver reads the round's records (driver memory only)


def plan_groups(pending: list[int], per_task: int) -> list[list[int]]:
    """Task indices grouped `per_task` at a time, in order: one Spark task (partition) per group."""
    return [pending[i : i + per_task] for i in range(0, len(pending), per_task)]


def failed_partition(message: str) -> tuple[int | None, int]:
    """(partition, times it failed) from Spark's "Task 3 in stage 0.0 failed 4 times" message."""
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


def apply_records(ledger: Ledger, records: list[dict[str, Any]], seen: int) -> int:
    """Hand the records after the first `seen` to the ledger; returns how many have been handled."""
    new = records[seen:]  # one slice: Spark's accumulator thread may append meanwhile
    for rec in new:
        if rec["ok"]:
            ledger.succeed(rec["idx"], rec["stats"], rec["attempt"], rec["samples"])
        else:
            ledger.fail(rec["idx"], rec["error"], rec["attempt"] + 1)
    return seen + len(new)


class SparkDistributor(Distributor):
    """Runs a Job's tasks as Spark tasks on the active or a configured Spark session."""

    def run(self, job: Job, on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
        ledger = Ledger(job, on_result)
        try:
            if job.tasks:
                with spark_session(self.cfg) as spark:
                    sc = session_context(spark)
                    check_reuse(sc)
                    probe = False
                    while pending := ledger.pending():
                        probe = self._round(sc, job, ledger, pending, probe)
        finally:
            ledger.close()
        return ledger.results

    def _round(self, sc: SparkContext, job: Job, ledger: Ledger, pending: list[int], probe: bool) -> bool:
        """One Spark job over the pending tasks; returns whether Spark aborted it. Raises only if Spark itself
        failed (cancelled, context stopped) or the driver was interrupted."""
        from pyspark import InheritableThread

        groups = plan_groups(pending, self.cfg.spark.shards_per_task)
        payload = [[(i, job.tasks[i], ledger.next_attempt[i]) for i in g] for g in groups]
        records: Any = sc.accumulator([], RecordList())  # type: ignore[arg-type]  # an AccumulatorParam by duck typing
        body = functools.partial(
            publish_partition,
            records=records,
            worker=job.worker,
            committed=job.committed,
            cfg_json=self.cfg.model_dump_json(),
            timeout_s=job.timeout_s,
            gpu=job.gpu,
            probe=probe,
        )
        group_id = f"clipline-{uuid.uuid4().hex[:8]}"
        box: dict[str, BaseException] = {}

        def run_job() -> None:
            sc.setJobGroup(group_id, f"clipline {job.name}: {len(pending)} {job.unit}s", interruptOnCancel=True)
            try:
                sc.parallelize(payload, numSlices=len(payload)).foreachPartition(body)
            except BaseException as e:  # handed to the driver thread below
                box["error"] = e

        log.info("spark: %d %ss in %d tasks", len(pending), job.unit, len(groups))
        thread = InheritableThread(target=run_job, daemon=True)
        thread.start()
        seen = 0
        try:
            while thread.is_alive():
                thread.join(POLL_TICK_S)
                seen = apply_records(ledger, records.value, seen)
                ledger.tick()
        except BaseException:  # Ctrl-C on the driver: stop the executors too
            sc.cancelJobGroup(group_id)
            raise
        apply_records(ledger, records.value, seen)  # Spark merged every finished task's records before the job ended
        if "error" not in box:
            return False
        self._aborted(job, ledger, pending, groups, box["error"])
        return True

    def _aborted(
        self, job: Job, ledger: Ledger, pending: list[int], groups: list[list[int]], error: BaseException
    ) -> None:
        """Spark gave up on a task: its tasks that committed anyway succeed, the others are charged; raise anything
        that is not a task's fault."""
        message = spark_error_message(error)
        if "Job aborted due to stage failure" not in message:
            raise error  # cancelled, SparkContext stopped, driver trouble: not a task's fault
        part, times = failed_partition(message)
        culprits = groups[part] if part is not None and part < len(groups) else pending
        first = next(line for line in message.splitlines() if "Job aborted" in line)[:800]
        probe = resolve_worker(job.committed) if job.committed else None
        changes = ledger.changes
        for i in culprits:
            if not ledger.is_open(i):
                continue
            done = probe(job.tasks[i], self.cfg) if probe else None  # committed before its group's task died
            if done is not None:
                ledger.succeed(i, done, ledger.next_attempt[i])
            else:
                ledger.fail(i, f"Spark gave up on the task: {first}", ledger.next_attempt[i] + times)
        if ledger.changes == changes:  # nothing charged nor committed: charge everyone so the loop ends
            for i in pending:
                ledger.fail(i, f"Spark job aborted: {first}", ledger.next_attempt[i] + 1)
