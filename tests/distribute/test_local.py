"""The local process pool: results per task, crash detection and bounded retries, timeouts, GPU layout, in-task
progress through the pipes, the committed probe, and no process or semaphore left behind by `clipline embed`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.distribute.local as local
from pipeline.core.config import load_config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import Job, TaskResult
from pipeline.distribute.local import LocalDistributor
from tests.support.faults import BARRIER, FAULT_DIR
from tests.support.helpers import make_shards, overrides


@pytest.fixture
def tasks() -> list[ShardTask]:
    return [ShardTask(f"{i:05d}", f"/in/{i}.tar", "/out", "webdataset") for i in range(4)]


@pytest.fixture(autouse=True)
def fault_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(FAULT_DIR, str(tmp_path))
    return tmp_path


def _dist(processes: int = 2, *extra: str) -> LocalDistributor:
    return LocalDistributor(load_config([f"local.processes={processes}", "local.threads=1", *extra]))


def _job(tasks: list[ShardTask], worker: str, **kw: object) -> Job:
    return Job("test", tasks, f"tests.support.faults:{worker}", unit="shard", **kw)  # type: ignore[arg-type]


@pytest.mark.slow
def test_every_task_gets_a_result(tasks: list[ShardTask]) -> None:
    seen: list[TaskResult] = []
    results = _dist().run(_job(tasks, "echo"), on_result=seen.append)
    assert [r.task.shard_id for r in results] == [t.shard_id for t in tasks]
    assert all(r.ok and r.attempts == 1 for r in results) and len(seen) == 4


@pytest.mark.slow
def test_crashed_worker_is_replaced_and_shard_retried(tasks: list[ShardTask]) -> None:
    results = _dist().run(_job(tasks, "crash_first_attempt", max_retries=1))
    assert all(r.ok for r in results)
    r1 = results[1]
    assert r1.attempts == 2 and "died" in r1.errors[0] and (r1.stats or {})["attempt"] == 1


@pytest.mark.slow
def test_failure_past_the_bound_is_reported_once_and_others_complete(
    tasks: list[ShardTask], fault_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    results = _dist().run(_job(tasks, "always_raise_00002", max_retries=2))
    bad = results[2]
    assert not bad.ok and bad.attempts == 3 and len(bad.errors) == 3 and "injected failure" in bad.errors[-1]
    assert [r.ok for r in results] == [True, True, False, True]
    assert (fault_dir / "attempts_00002").read_text() == "3"
    lines = [r.getMessage() for r in caplog.records if "00002" in r.getMessage()]
    assert lines == [
        "shard 00002 failed (attempt 1), retrying: RuntimeError: injected failure",
        "shard 00002 failed (attempt 2), retrying: RuntimeError: injected failure",
        "shard 00002 failed after 3 attempts: RuntimeError: injected failure",
    ]


@pytest.mark.slow
def test_hanging_shard_times_out(tasks: list[ShardTask]) -> None:
    results = _dist(processes=1).run(_job(tasks[:2], "hang_00000", max_retries=1, timeout_s=3))
    assert results[0].ok and results[0].attempts == 2 and "timed out after 3s" in results[0].errors[0]


@pytest.mark.slow
def test_retry_after_a_commit_is_answered_by_the_probe(tasks: list[ShardTask], fault_dir: Path) -> None:
    """The worker dies after committing: the retry asks the job's probe and does not run the worker again."""
    job = _job(tasks[:1], "crash_after_commit", committed="tests.support.faults:marker_probe", max_retries=1)
    [r] = _dist(processes=1).run(job)
    assert r.ok and r.attempts == 2 and r.stats == {"shard": "00000", "from_probe": True}
    assert (fault_dir / "committed_00000").read_text() == "0"  # the worker ran once, the retry only probed


@pytest.mark.slow
def test_progress_inside_one_long_task_reaches_the_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker on one long shard moves the progress: its reports arrive through its pipe while it runs."""
    seen: list[tuple[int, bool]] = []
    original = local.Ledger.report

    def report(self: local.Ledger, i: int, samples: int) -> None:
        seen.append((samples, self.results[i].ok))
        original(self, i, samples)

    monkeypatch.setattr(local.Ledger, "report", report)
    [r] = _dist(processes=1).run(_job([ShardTask("00003", "/in/3.tar", "/out", "webdataset")], "slow_progress"))
    assert r.ok and (r.stats or {})["samples"] == 30
    during = [n for n, done in seen if not done]
    assert len(during) >= 3 and during == sorted(during) and during[-1] <= 30  # several reports, before the end


@pytest.mark.slow
@pytest.mark.parametrize("processes", [0, 3])
def test_one_process_per_gpu_each_pinned_to_its_own_device(
    processes: int, tasks: list[ShardTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU layout, exercised without a GPU: the supervisor counts 2 devices and pins each process to one."""
    monkeypatch.setattr(local, "gpu_count", lambda: 2)
    monkeypatch.setenv(BARRIER, str(processes or 2))  # every process holds a task before any finishes
    dist = LocalDistributor(load_config([f"local.processes={processes}", "local.threads=1"]))
    results = dist.run(_job(tasks, "report_placement", gpu=True))
    placements = {(r.stats or {})["pid"]: r.stats or {} for r in results}
    assert len(placements) == (processes or 2)  # 0 = one process per GPU; each took shards
    assert {p["cuda_visible_devices"] for p in placements.values()} == {"0", "1"}
    # inside a pinned process its GPU is cuda:0: that is the device the worker is given
    assert {p["device"] for p in placements.values()} == {"cuda:0"}
    assert {(p["threads"], p["omp_threads"], p["torch_threads"]) for p in placements.values()} == {(1, "1", 1)}


@pytest.mark.slow
def test_a_job_that_wants_no_gpu_gets_none(tasks: list[ShardTask], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "gpu_count", lambda: 2)
    results = _dist(processes=1).run(_job(tasks[:1], "report_placement", gpu=False))
    stats = results[0].stats or {}
    assert stats["device"] is None and stats["cuda_visible_devices"] == os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.slow
def test_embed_leaves_no_process_and_no_semaphore_behind(tmp_path: Path, tiny_model: dict[str, str]) -> None:
    """`clipline embed` in its own process group: once it has exited, nothing of its group is left (the spawned
    workers and multiprocessing's resource tracker are reaped before it returns), and nothing leaked."""
    make_shards(tmp_path / "in", n_shards=3, per_shard=4)
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "embed",
        f"input={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}",
        *overrides(tiny_model),
        "local.processes=2",
        "embed.batch_size=2",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err[-3000:]
    assert "shards_done: 3" in out
    left = subprocess.run(
        ["ps", "-o", "pid,stat,args", "--no-headers", "-s", str(p.pid)], capture_output=True, text=True
    )
    assert left.stdout.strip() == "", f"left in the process group:\n{left.stdout}"
    with pytest.raises(ProcessLookupError):
        os.killpg(p.pid, 0)
    assert "leaked semaphore" not in err and "resource_tracker" not in err
