"""The local process pool: results per task, crash detection and bounded retries, timeouts, the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.config import load_config
from pipeline.core.tasks import ShardTask
from pipeline.distribute.local import LocalDistributor, get_distributor
from tests.support.faults import FAULT_DIR


@pytest.fixture
def tasks() -> list[ShardTask]:
    return [ShardTask(f"{i:05d}", f"/in/{i}.tar", "/out", "webdataset") for i in range(4)]


@pytest.fixture(autouse=True)
def fault_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(FAULT_DIR, str(tmp_path))
    return tmp_path


def _dist(processes: int = 2) -> LocalDistributor:
    return LocalDistributor(load_config([f"local.processes={processes}", "local.threads=1"]))


@pytest.mark.slow
def test_every_task_gets_a_result(tasks: list[ShardTask]) -> None:
    seen = []
    results = _dist().run(tasks, "tests.support.faults:echo", max_retries=0, on_result=seen.append)
    assert [r.task.shard_id for r in results] == [t.shard_id for t in tasks]
    assert all(r.ok and r.attempts == 1 for r in results) and len(seen) == 4


@pytest.mark.slow
def test_crashed_worker_is_replaced_and_shard_retried(tasks: list[ShardTask]) -> None:
    results = _dist().run(tasks, "tests.support.faults:crash_first_attempt", max_retries=1)
    assert all(r.ok for r in results)
    r1 = results[1]
    assert r1.attempts == 2 and "died" in r1.errors[0] and r1.stats["attempt"] == 1


@pytest.mark.slow
def test_failure_past_the_bound_is_reported_and_others_complete(tasks: list[ShardTask], fault_dir: Path) -> None:
    results = _dist().run(tasks, "tests.support.faults:always_raise_00002", max_retries=2)
    bad = results[2]
    assert not bad.ok and bad.attempts == 3 and len(bad.errors) == 3 and "injected failure" in bad.errors[-1]
    assert [r.ok for r in results] == [True, True, False, True]
    assert (fault_dir / "attempts_00002").read_text() == "3"


@pytest.mark.slow
def test_hanging_shard_times_out(tasks: list[ShardTask]) -> None:
    results = _dist(processes=1).run(tasks[:2], "tests.support.faults:hang_00000", max_retries=1, timeout_s=5)
    assert results[0].ok and results[0].attempts == 2 and "timed out" in results[0].errors[0]


def test_unknown_backend_raises_at_once() -> None:
    cfg = load_config([])
    object.__setattr__(cfg, "distributor", "ray")
    with pytest.raises(ValueError, match="unknown distributor 'ray'"):
        get_distributor(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["auto", "cuda:1"])
def test_one_process_per_gpu_each_pinned_to_its_own_device(
    device: str, tasks: list[ShardTask], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU layout, exercised without a GPU: the supervisor counts 2 devices and starts one pinned process each."""
    import pipeline.distribute.local as distributor

    monkeypatch.setattr(distributor, "gpu_count", lambda: 2)
    dist = LocalDistributor(load_config([f"model.device={device}", "local.threads=1"]))  # local.processes unset
    results = dist.run(tasks, "tests.support.faults:report_placement", max_retries=0)
    placements = {(r.stats or {})["pid"]: r.stats for r in results}
    assert len(placements) == 2  # one process per GPU, each took shards
    assert sorted(p["cuda_visible_devices"] for p in placements.values()) == ["0", "1"]
    # inside a pinned process its GPU is cuda:0, so an explicit cuda:N becomes plain "cuda"
    assert {p["device"] for p in placements.values()} == {"cuda"}
    assert {(p["omp_threads"], p["torch_threads"]) for p in placements.values()} == {("1", 1)}


@pytest.mark.slow
def test_cpu_device_is_kept_when_gpus_are_present(tasks: list[ShardTask], monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.distribute.local as distributor

    monkeypatch.setattr(distributor, "gpu_count", lambda: 2)
    dist = LocalDistributor(load_config(["model.device=cpu", "local.processes=1", "local.threads=1"]))
    results = dist.run(tasks[:1], "tests.support.faults:report_placement", max_retries=0)
    assert results[0].stats is not None and results[0].stats["device"] == "cpu"
