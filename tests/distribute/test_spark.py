"""Tests of the Spark backend on one local[2,2] session: same output as the local pool, retries, resume, spark-submit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipeline.distribute.spark_session as session_mod
import pipeline.embed.stage as embed_mod
from pipeline.core.config import Config, load_config, validate
from pipeline.core.fsio import TMP_MARK
from pipeline.core.tasks import ShardTask
from pipeline.distribute.base import Job, Ledger, TaskResult, get_distributor
from pipeline.distribute.spark import SparkDistributor, apply_records, failed_partition, plan_groups
from pipeline.distribute.spark_session import get_session, spark_session, stop_session
from pipeline.embed.stage import COMMITTED, embed, plan
from pipeline.embeddings.layout import committed_shards, read_stats, shard_files
from tests.support.helpers import make_shards, overrides
from tests.support.spark_faults import add_fault

FAULTY = "tests.support.spark_faults:faulty_worker"
ALL = [f"{s:05d}" for s in range(8)]


def job(tasks: list[ShardTask], worker: str, **kw: Any) -> Job:
    return Job("embed", tasks, worker, kw.pop("committed", COMMITTED), unit="shard", **kw)


# ---- pure parts (no Spark) ------------------------------------------------------------------------------


def test_plan_groups() -> None:
    assert plan_groups([0, 1, 2, 3, 4, 5, 6, 7], 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert plan_groups([4, 9], 1) == [[4], [9]]
    assert plan_groups([], 2) == []


def test_failed_partition_reads_spark_abort_message() -> None:
    msg = (
        "Job aborted due to stage failure: Task 5 in stage 0.0 failed 2 times, most recent failure: "
        "Lost task 5.1 in stage 0.0 (TID 8) (192.0.2.2 executor driver): Python worker exited unexpectedly"
    )
    assert failed_partition(msg) == (5, 2)
    assert failed_partition("Task 0 in stage 12.3 failed 1 time, most recent failure") == (0, 1)
    assert failed_partition("SparkContext was shut down") == (None, 1)


def test_records_reach_the_ledger_once_each_in_order_of_arrival() -> None:
    tasks = [ShardTask(f"{i:05d}", "/in", "/out", "webdataset") for i in range(3)]
    seen: list[TaskResult] = []
    ledger = Ledger(Job("t", tasks, "m:f", max_retries=1, unit="shard"), seen.append)
    records = [{"idx": 1, "attempt": 0, "ok": True, "stats": {"n": 1}, "samples": 5}]
    assert apply_records(ledger, records, 0) == 1
    records.append({"idx": 0, "attempt": 0, "ok": False, "error": "RuntimeError: boom", "samples": 0})
    assert apply_records(ledger, records, 1) == 2 and apply_records(ledger, records, 2) == 2  # nothing new
    assert [r.task.name for r in seen] == ["00001"] and ledger.pending() == [0, 2]
    assert ledger.next_attempt[0] == 1 and ledger.progress.samples == 5


def test_registry_gives_spark_backend() -> None:
    assert isinstance(get_distributor(validate({"distributor": "spark"})), SparkDistributor)


# ---- on a local Spark session ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    """One local[2,2] session for the module (start-up costs ~10 s); [2,2] lets Spark retry a crashed task once."""
    from pyspark import SparkContext

    old = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    cfg = validate(
        {
            "spark": {
                "master": "local[2,2]",
                "app_name": "clipline-tests",
                "conf": {
                    "spark.ui.enabled": "false",
                    "spark.driver.memory": "512m",
                    "spark.sql.shuffle.partitions": "2",
                },
            }
        }
    )
    creating = SparkContext._active_spark_context is None
    session = get_session(cfg)
    yield session
    assert stop_session(session) == creating  # stops the session get_session made, never another one
    if old is None:
        os.environ.pop("PYSPARK_PYTHON", None)
    else:
        os.environ["PYSPARK_PYTHON"] = old


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("spark_shards")
    make_shards(root, 8, 20)
    return root


def make_cfg(tiny_model: dict[str, str], inp: Path, out: Path, *extra: str) -> Config:
    return load_config(
        overrides(tiny_model)
        + [f"input={inp}", f"output={out}", "embed.batch_size=8", "local.processes=1", "local.threads=1", *extra]
    )


def read_output(out: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    keys, img, txt = [], [], []
    for sid in committed_shards(str(out)):
        f = shard_files(str(out), sid)
        keys += pq.read_table(f.metadata, columns=["key"]).column("key").to_pylist()
        img.append(np.load(f.img_emb).astype(np.float32))
        txt.append(np.load(f.text_emb).astype(np.float32))
    return keys, np.concatenate(img), np.concatenate(txt)


def leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if TMP_MARK in p.name]


def expected_keys(shards: list[str]) -> list[str]:
    return [f"{s}{i:04d}" for s in shards for i in range(20)]


@pytest.mark.spark
@pytest.mark.slow
def test_active_session_is_reused_and_never_stopped(spark: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(session_mod, "_OWNED", {})  # as if a notebook or spark-submit had created it
    cfg = validate({"spark": {"master": "local[1]"}})
    with spark_session(cfg) as s:
        assert s.sparkContext is spark.sparkContext
    assert not stop_session(s)
    assert spark.sparkContext.parallelize([1, 2, 3]).count() == 3


@pytest.mark.spark
@pytest.mark.slow
def test_storage_options_reach_the_executors_of_a_reused_session(spark: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The session was started before the storage section was applied (its executors' environment lacks it):
    spark_session() hands FSSPEC_S3 to the Python workers of the tasks defined meanwhile, and only to them."""
    from pipeline.core.storage import applied

    monkeypatch.setenv("STORAGE_TEST_SECRET", "executor-secret-1")
    cfg = validate({"storage": {"s3": {"endpoint_url": "http://127.0.0.1:1", "secret": "${ENV:STORAGE_TEST_SECRET}"}}})

    def executor_conf(rows: Any) -> Any:
        import fsspec

        return [(fsspec.config.conf.get("s3"), "STORAGE_TEST_SECRET" in os.environ)]

    with applied(cfg.storage), spark_session(cfg) as session:
        got = session.sparkContext.parallelize([0, 1], 2).mapPartitions(executor_conf).collect()
    want = {"endpoint_url": "http://127.0.0.1:1", "secret": "executor-secret-1"}
    assert got == [(want, False), (want, False)]  # the resolved options, not the variable they came from
    assert spark.sparkContext.parallelize([0], 1).mapPartitions(executor_conf).collect() == [(None, False)]


@pytest.mark.spark
@pytest.mark.slow
def test_same_output_as_local_pool(spark: Any, tiny_model: dict[str, str], shards_dir: Path, tmp_path: Path) -> None:
    local = embed(make_cfg(tiny_model, shards_dir, tmp_path / "local"))
    summary = embed(make_cfg(tiny_model, shards_dir, tmp_path / "spark", "distributor=spark"))
    assert summary["shards_done"] == 8 and summary["samples"] == local["samples"] == 160
    keys_l, img_l, txt_l = read_output(tmp_path / "local")
    keys_s, img_s, txt_s = read_output(tmp_path / "spark")
    assert keys_s == keys_l == expected_keys(ALL)
    np.testing.assert_allclose(img_s, img_l, atol=2e-3)
    np.testing.assert_allclose(txt_s, txt_l, atol=2e-3)
    assert np.abs(img_s).sum() > 0
    # The model is loaded once per executor Python process: fewer processes than shards did the work.
    pids = {read_stats(str(tmp_path / "spark"), s)["pid"] for s in ALL}
    assert len(pids) < 8, pids
    assert spark.sparkContext.parallelize([1, 2]).count() == 2  # the reused session was not stopped


@pytest.mark.spark
@pytest.mark.slow
def test_failed_tasks_are_retried_and_output_is_complete(
    spark: Any, tiny_model: dict[str, str], shards_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    add_fault(str(out), "raise-once-00002")  # caught in the task, resubmitted by the driver
    add_fault(str(out), "crash-once-00005")  # the Python worker dies: Spark retries the task (local[2,2])
    add_fault(str(out), "raise-always-00007")  # fails every attempt: reported, the rest still completes
    cfg = make_cfg(tiny_model, shards_dir, out, "distributor=spark")
    tasks = plan(cfg)
    seen: list[Any] = []
    results = SparkDistributor(cfg).run(job(tasks, FAULTY, max_retries=2), on_result=seen.append)
    assert [r.task.shard_id for r in results] == ALL
    assert sorted(r.task.shard_id for r in seen) == ALL  # on_result once per task
    by = {r.task.shard_id: r for r in results}
    stats = {s: r.stats or {} for s, r in by.items()}
    assert by["00002"].ok and by["00002"].attempts == 2 and stats["00002"]["attempt"] == 1
    assert "injected failure" in by["00002"].errors[0]
    assert by["00005"].ok and stats["00005"]["attempt"] >= 1
    assert not by["00007"].ok and by["00007"].attempts == 3 and len(by["00007"].errors) == 3
    assert all(by[s].ok and by[s].attempts == 1 for s in ALL if s not in ("00002", "00005", "00007"))
    good = [s for s in ALL if s != "00007"]
    assert committed_shards(str(out)) == good
    keys, img, _ = read_output(out)
    assert keys == expected_keys(good) and len(set(keys)) == len(keys) == img.shape[0]
    assert leftovers(out) == []


@pytest.mark.spark
@pytest.mark.slow
def test_poison_shard_that_crashes_spark_does_not_sink_the_run(
    spark: Any, tiny_model: dict[str, str], shards_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    add_fault(str(out), "crash-always-00001")  # Spark gives up on the task and aborts the job
    cfg = make_cfg(tiny_model, shards_dir, out, "distributor=spark")
    tasks = plan(cfg)[:3]
    results = SparkDistributor(cfg).run(job(tasks, FAULTY, max_retries=1))
    by = {r.task.shard_id: r for r in results}
    assert by["00000"].ok and by["00002"].ok
    assert not by["00001"].ok and by["00001"].attempts >= 2
    assert "Spark gave up on the task" in by["00001"].errors[-1]
    assert committed_shards(str(out)) == ["00000", "00002"]


@pytest.mark.spark
@pytest.mark.slow
def test_timeout_and_shards_per_task(spark: Any, tmp_path: Path) -> None:
    cfg = validate({"output": str(tmp_path / "out"), "distributor": "spark", "spark": {"shards_per_task": 3}})
    tasks = [ShardTask(s, f"/nowhere/{s}.tar", str(tmp_path / "out"), "webdataset") for s in ALL]
    results = SparkDistributor(cfg).run(job(tasks, "tests.support.spark_faults:where_worker"))
    parts = [(r.stats or {})["partition"] for r in results]
    assert {((r.stats or {})["device"], (r.stats or {})["threads"]) for r in results} == {(None, 1)}  # spark.task.cpus
    assert parts[0] == parts[1] == parts[2] != parts[3] == parts[4] == parts[5] != parts[6] == parts[7]
    assert len(set(parts)) == 3
    t0 = time.monotonic()
    slow = SparkDistributor(cfg).run(job(tasks[:1], "tests.support.spark_faults:sleepy_worker", timeout_s=1.0))
    assert not slow[0].ok and "timed out after 1s" in slow[0].errors[0]
    assert time.monotonic() - t0 < 30


@pytest.mark.spark
@pytest.mark.slow
def test_progress_and_outcomes_arrive_as_spark_tasks_end_without_touching_storage(
    spark: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 1-second task's outcome and samples reach the driver while the 4-second one still runs, from the round's
    accumulator: the driver makes no storage request at all while the job runs (the old one listed stats folders)."""
    from tests.support.countfs import CountingFileSystem

    out = f"countfile://{tmp_path}/out"
    cfg = validate({"output": out, "distributor": "spark"})
    tasks = [ShardTask(s, f"/nowhere/{s}.tar", out, "webdataset") for s in ("00001", "00004")]
    samples: list[tuple[float, int]] = []
    original = Ledger.tick

    def tick(self: Ledger) -> None:
        samples.append((time.monotonic(), self.progress.samples))
        original(self)

    monkeypatch.setattr(Ledger, "tick", tick)
    CountingFileSystem.calls.clear()
    seen: dict[str, float] = {}
    results = SparkDistributor(cfg).run(
        job(tasks, "tests.support.spark_faults:progress_worker"),
        on_result=lambda r: seen.setdefault(r.task.name, time.monotonic()),
    )
    end = time.monotonic()
    assert all(r.ok for r in results) and set(seen) == {"00001", "00004"}
    assert seen["00001"] < end - 2.0  # reported while the 4-second task was still running
    assert any(n == 10 for t, n in samples if t < end - 2.0)  # its 10 samples too
    assert sum(CountingFileSystem.calls.values()) == 0, CountingFileSystem.calls


def _spark_submit() -> str:
    here = Path(sys.executable).parent / "spark-submit"
    if here.exists():
        return str(here)
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-submit")


def settled_commits(out: Path, quiet_s: float = 4.0, limit_s: float = 60.0) -> list[str]:
    """Committed shards once no new commit appeared for quiet_s (a cancelled task may still be finishing)."""
    last, since, t0 = committed_shards(str(out)), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - t0 < limit_s:
        time.sleep(0.5)
        now = committed_shards(str(out))
        if now != last:
            last, since = now, time.monotonic()
    return last


@pytest.mark.spark
@pytest.mark.slow
def test_killed_job_resubmitted_with_spark_submit_skips_committed_shards(
    spark: Any,
    tiny_model: dict[str, str],
    shards_dir: Path,
    tmp_path: Path,
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    add_fault(str(out), "slow", "1.0")
    monkeypatch.setattr(embed_mod, "WORKER", FAULTY)
    cfg = make_cfg(tiny_model, shards_dir, out, "distributor=spark")
    box: dict[str, Any] = {}

    def first_run() -> None:
        try:
            box["summary"] = embed(cfg)
        except Exception as e:
            box["error"] = e

    thread = threading.Thread(target=first_run)
    thread.start()
    deadline = time.monotonic() + 120
    while len(committed_shards(str(out))) < 2 and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.2)
    spark.sparkContext.cancelAllJobs()  # the job dies midway, its running tasks are killed
    thread.join(60)
    assert "error" in box and "cancelled" in str(box["error"]).lower(), box
    done = settled_commits(out)
    assert 2 <= len(done) < 8
    before = {s: (os.stat(shard_files(str(out), s).stats).st_mtime_ns, read_stats(str(out), s)) for s in done}

    # Re-submit with spark-submit, the real worker and no faults: jobs/embed.py runs unchanged.
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    cmd = [
        _spark_submit(),
        "--master",
        "local[2]",
        "--driver-memory",
        "512m",
        "--conf",
        "spark.ui.enabled=false",
        str(repo_root / "jobs" / "embed.py"),
        f"input={shards_dir}",
        f"output={out}",
        "distributor=spark",
        "embed.batch_size=8",
        *overrides(tiny_model),
    ]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"shards_skipped: {len(done)}\n" in r.stdout and f"shards_done: {8 - len(done)}\n" in r.stdout, r.stdout
    assert json.loads((out / "run.json").read_text())["exit_status"] == 0
    for s, (mtime, stats) in before.items():  # committed shards were not redone
        assert os.stat(shard_files(str(out), s).stats).st_mtime_ns == mtime
        assert read_stats(str(out), s) == stats
    assert committed_shards(str(out)) == ALL
    keys, img, _ = read_output(out)
    assert keys == expected_keys(ALL) and img.shape[0] == 160
    assert leftovers(out) == []
