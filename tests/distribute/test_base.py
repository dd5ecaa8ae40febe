"""The distributor contract: the one retry ledger (policy, log lines, progress, on_result), the probe before a retry,
the registry."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pipeline.core.config import load_config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import Job, Ledger, TaskResult, WorkerContext, get_distributor, run_attempt
from pipeline.distribute.local import LocalDistributor

TASKS = [ShardTask(f"{i:05d}", f"/in/{i}.tar", "/out", "webdataset") for i in range(3)]


def _ledger(max_retries: int = 1, seen: list[TaskResult] | None = None) -> Ledger:
    job = Job("embed", TASKS, "m:f", max_retries=max_retries, unit="shard")
    return Ledger(job, seen.append if seen is not None else None)


def test_failed_attempts_are_retried_up_to_the_bound_and_logged_once_each(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    seen: list[TaskResult] = []
    ledger = _ledger(max_retries=1, seen=seen)
    assert ledger.fail(0, "RuntimeError: boom\ntraceback...", 1) is True
    assert ledger.pending() == [0, 1, 2] and ledger.next_attempt[0] == 1 and seen == []
    assert ledger.fail(0, "RuntimeError: again", 2) is False
    assert ledger.pending() == [1, 2] and ledger.remaining == 2
    [r] = seen
    assert not r.ok and r.attempts == 2 and r.errors == ["RuntimeError: boom\ntraceback...", "RuntimeError: again"]
    assert [rec.getMessage() for rec in caplog.records] == [
        "shard 00000 failed (attempt 1), retrying: RuntimeError: boom",
        "shard 00000 failed after 2 attempts: RuntimeError: again",
    ]
    assert ledger.fail(0, "late duplicate", 3) is False and len(seen) == 1  # a closed task stays closed


def test_spark_retries_count_towards_the_bound() -> None:
    ledger = _ledger(max_retries=2)
    assert ledger.fail(1, "Spark gave up on the task", 3) is False  # Spark tried 3 times itself
    assert ledger.results[1].attempts == 3 and ledger.pending() == [0, 2]


def test_success_is_reported_once_with_its_attempt_and_samples() -> None:
    seen: list[TaskResult] = []
    ledger = _ledger(seen=seen)
    ledger.report(2, 40)
    assert ledger.progress.samples == 40
    ledger.fail(2, "OSError: reset", 1)
    assert ledger.progress.samples == 0  # the failed attempt's samples are gone
    ledger.succeed(2, {"samples": 50}, attempt=1, samples=50)
    ledger.succeed(2, {"samples": 50}, attempt=1, samples=50)  # a duplicate record changes nothing
    assert [(r.ok, r.attempts, r.stats) for r in seen] == [(True, 2, {"samples": 50})]
    assert ledger.progress.samples == 50 and ledger.progress.done == 1 and ledger.remaining == 2


def _worker(task: Any, cfg: Any, ctx: WorkerContext) -> dict[str, Any]:
    return {"ran": ctx.attempt}


def test_only_retries_or_an_explicit_probe_ask_whether_the_task_committed() -> None:
    asked: list[str] = []

    def probe(task: ShardTask, cfg: Any) -> dict[str, Any] | None:
        asked.append(task.name)
        return {"committed": True} if task.name == "00001" else None

    cfg = load_config([])
    assert run_attempt(_worker, probe, TASKS[1], cfg, WorkerContext(attempt=0)) == {"ran": 0}  # first try: no probe
    assert asked == []
    assert run_attempt(_worker, probe, TASKS[1], cfg, WorkerContext(attempt=1)) == {"committed": True}
    assert run_attempt(_worker, probe, TASKS[0], cfg, WorkerContext(attempt=1)) == {"ran": 1}  # not committed
    assert run_attempt(_worker, probe, TASKS[1], cfg, WorkerContext(attempt=0), probe=True) == {"committed": True}
    assert asked == ["00001", "00000", "00001"]
    assert run_attempt(_worker, None, TASKS[1], cfg, WorkerContext(attempt=3)) == {"ran": 3}  # no probe given


def test_registry_names_every_backend_when_the_name_is_unknown() -> None:
    cfg = load_config([])
    assert isinstance(get_distributor(cfg), LocalDistributor)
    object.__setattr__(cfg, "distributor", "ray")
    with pytest.raises(ValueError, match=r"unknown distributor 'ray'; known: local, spark$"):
        get_distributor(cfg)


def test_shard_task_is_named_by_its_shard_id() -> None:
    assert TASKS[2].name == "00002"
