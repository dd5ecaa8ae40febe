"""`clipline run` as a scheduled job: URL lists ingested exactly once, re-runs process only what is new, summary.json,
exit codes, and the output lock (held, stale, raced)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli.main import main
from pipeline.core import lock as lk
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.run.chain import STAGES, run
from pipeline.run.httpserver import serve_directory
from pipeline.run.layout import layout
from pipeline.run.staging import ingest_url_lists
from tests.support.helpers import jpeg_bytes, overrides, random_unit, write_fake_embed_output

PER_SHARD = 16
REPO = Path(__file__).resolve().parents[2]


def _url_list(path: Path, base: str, names: list[str]) -> Path:
    pq.write_table(pa.table({"url": [f"{base}/{n}" for n in names], "caption": [f"picture {n}" for n in names]}), path)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("site")
    for i in range(60):
        (root / f"img_{i:03d}.jpg").write_bytes(jpeg_bytes(i, size=(40 + i % 9, 36)))
    # the same bytes as img_000 under another name: an exact duplicate that arrives with the second URL list
    (root / "copy_of_000.jpg").write_bytes((root / "img_000.jpg").read_bytes())
    with serve_directory(root) as base:
        yield root, base


def _args(tiny_model: dict[str, str], urls: Path, out: Path) -> list[str]:
    return [
        "run",
        f"input={urls}",
        f"output={out}",
        *overrides(tiny_model),
        "download.processes_count=1",
        "download.thread_count=8",
        f"download.number_sample_per_shard={PER_SHARD}",
        "download.timeout=5",
        "download.allow_private_addresses=true",  # the site is on 127.0.0.1
        "local.processes=1",
        "local.threads=1",
        "embed.batch_size=16",
        "index.max_index_memory_usage=50M",
        "index.current_memory_available=1G",
        "index.recall_queries=20",
        "dedup.threshold=1.0",
        "log_level=WARNING",
    ]  # random weights put every image near every other


def _summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "summary.json").read_text())  # type: ignore[no-any-return]


@pytest.mark.slow
def test_second_run_processes_only_the_new_url_list(
    site: tuple[Path, str], tiny_model: dict[str, str], tmp_path: Path
) -> None:
    _, base = site
    urls, out = tmp_path / "urls", tmp_path / "out"
    urls.mkdir()
    # 30 URLs, one of them missing on the server
    _url_list(urls / "b_first.parquet", base, [f"img_{i:03d}.jpg" for i in range(29)] + ["missing.jpg"])
    assert main(_args(tiny_model, urls, out)) == 0
    first = _summary(out)
    assert first["exit_status"] == 0 and set(first["stages"]) == set(STAGES)
    assert first["new_this_run"] == {
        "url_lists": 1,
        "urls": 30,
        "images": 29,
        "shards_embedded": 2,
        "samples_embedded": 29,
        "shards_indexed": 2,
    }
    assert first["stages"]["download"]["summary"]["failures_by_reason"] == {"http 404": 1}
    old_tars = {p.name: _sha(p) for p in (out / "shards").glob("*.tar")}
    assert sorted(old_tars) == ["00000.tar", "00001.tar"]

    # a new list that sorts BEFORE the first one: img2dataset alone would renumber the old shards
    _url_list(urls / "a_second.parquet", base, [f"img_{i:03d}.jpg" for i in range(29, 49)] + ["copy_of_000.jpg"])
    assert main(_args(tiny_model, urls, out)) == 0
    second = _summary(out)
    assert second["new_this_run"] == {
        "url_lists": 1,
        "urls": 21,
        "images": 21,
        "shards_embedded": 2,
        "samples_embedded": 21,
        "shards_indexed": 2,
    }
    st = second["stages"]
    assert st["download"]["summary"]["shards_skipped"] == 2 and st["download"]["summary"]["urls_in"] == 51
    assert st["embed"]["summary"]["shards_skipped"] == 2
    assert st["index"]["summary"]["image"]["action"] == "appended"
    assert st["index"]["summary"]["image"]["vectors"] == 50
    assert st["dedup"]["summary"]["samples"] == 50  # over the union of both runs
    assert {p.name: _sha(p) for p in (out / "shards").glob("*.tar") if p.name in old_tars} == old_tars
    assert sorted(p.name for p in (out / "url_lists").iterdir()) == ["00000_b_first.parquet", "00001_a_second.parquet"]

    meta = pd.concat(pd.read_parquet(p) for p in sorted((out / "embeddings" / "metadata").glob("*.parquet")))
    assert meta["key"].is_unique and len(meta) == 50
    assert meta["url"].str.endswith("missing.jpg").sum() == 0
    # the exact duplicate pairs an old sample (first run) with a new one (second run)
    dup = pd.read_parquet(out / "embeddings" / "dedup" / "duplicates.parquet")
    name = dict(zip(meta["key"], meta["url"].str.rsplit("/", n=1).str[-1]))
    groups = dup.assign(name=dup["key"].map(name)).groupby("group_id")["name"].agg(set)
    assert {"img_000.jpg", "copy_of_000.jpg"} in list(groups)
    assert dup.loc[dup["key"].map(name) == "copy_of_000.jpg", "reason"].tolist() == ["exact"]

    # nothing new: every stage runs and reports zero new work
    assert main(_args(tiny_model, urls, out)) == 0
    third = _summary(out)
    assert third["new_this_run"] == {
        "url_lists": 0,
        "urls": 0,
        "images": 0,
        "shards_embedded": 0,
        "samples_embedded": 0,
        "shards_indexed": 0,
    }
    assert third["stages"]["index"]["summary"]["image"]["action"] == "up to date"
    assert not (out / lk.LOCK_NAME).exists()


def test_changed_url_list_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("url,caption\nhttp://127.0.0.1:9/x.jpg,x\n")
    (src / "_partial.csv").write_text("url\n")  # being written: ignored
    (src / "notes.md").write_text("not a URL list")
    paths = layout(str(tmp_path / "out"))
    assert ingest_url_lists(str(src), paths, None)["new_files"] == ["a.csv"]
    assert ingest_url_lists(str(src), paths, None)["new_files"] == []
    (src / "a.csv").write_text("url,caption\nhttp://127.0.0.1:9/y.jpg,y\n")
    with pytest.raises(ConfigError, match="a.csv .* changed since"):
        ingest_url_lists(str(src), paths, None)
    (src / "a.csv").write_text("url,caption\nhttp://127.0.0.1:9/x.jpg,x\n")
    (src / "b.parquet").write_bytes(b"")
    with pytest.raises(ConfigError, match="mixes URL-list formats"):
        ingest_url_lists(str(src), paths, None)
    (src / "b.parquet").unlink()
    os.remove(src / "a.csv")  # a list that disappeared keeps its staged copy
    (src / "c.csv").write_text("url,caption\nhttp://127.0.0.1:9/z.jpg,z\n")
    assert ingest_url_lists(str(src), paths, None)["new_files"] == ["c.csv"]
    ledger = json.loads(Path(paths.inputs).read_text())
    assert [e["staged"] for e in ledger["files"]] == ["00000_a.csv", "00001_c.csv"]


def test_copies_left_by_a_killed_run_are_redone(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("url\nhttp://127.0.0.1:9/x.jpg\n")
    paths = layout(str(tmp_path / "out"))
    Path(paths.url_lists).mkdir(parents=True)
    Path(paths.url_lists, "00000_zzz.csv").write_text("url\nhttp://stale\n")  # copied, never recorded
    assert ingest_url_lists(str(src), paths, None)["url_lists"] == 1
    assert sorted(os.listdir(paths.url_lists)) == ["00000_a.csv"]
    assert Path(paths.url_lists, "00000_a.csv").read_text() == (src / "a.csv").read_text()


def test_failed_stage_is_recorded_with_its_exit_status(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.csv").write_text("link\nhttp://127.0.0.1:9/x.jpg\n")  # no `url` column
    out = tmp_path / "out"
    assert main(["run", f"input={src}", f"output={out}", "log_level=ERROR"]) == 2
    s = _summary(out)
    assert s["exit_status"] == 2 and s["stages"]["download"]["status"] == "failed"
    assert "download.url_col" in s["stages"]["download"]["error"]
    assert "embed" not in s["stages"] and not (out / lk.LOCK_NAME).exists()
    assert not (out / "inputs.json").exists()  # refused before staging: the file can still be fixed in place
    (src / "a.csv").write_text("url\nhttp://127.0.0.1:9/x.jpg\n")
    paths = layout(str(out))
    assert ingest_url_lists(str(src), paths, None)["new_files"] == ["a.csv"]


def test_one_stage_runs_alone_and_summary_keeps_the_others(tmp_path: Path) -> None:
    out = tmp_path / "out"
    vecs = random_unit(30, 16, seed=4)
    vecs[7] = vecs[3]
    write_fake_embed_output(out / "embeddings", {"00000": vecs})
    earlier = {"stages": {"download": {"status": "ok", "exit_status": 0, "summary": {"urls_in": 30}}}}
    (out / "summary.json").write_text(json.dumps(earlier))
    cfg = load_config([f"input={tmp_path / 'unused'}", f"output={out}", "log_level=WARNING"])
    result = run(cfg, stages=("dedup",), echo=False)
    assert set(result) == {"dedup"} and result["dedup"]["groups"] == 1
    s = _summary(out)
    assert s["stages_run"] == ["dedup"] and s["exit_status"] == 0 and s["new_this_run"] == {}
    assert s["stages"]["download"] == earlier["stages"]["download"]  # the last download, from an earlier run
    assert s["stages"]["dedup"]["status"] == "ok" and s["stages"]["dedup"]["summary"]["samples"] == 30
    assert not (out / lk.LOCK_NAME).exists()


def test_stages_read_the_chains_own_embeddings_whatever_embeddings_format_says(tmp_path: Path) -> None:
    """embeddings.* describes foreign vectors for the standalone commands; the chain's index and dedup read what its
    embed stage wrote, so a format left in a shared config file must not redirect them."""
    out = tmp_path / "out"
    vecs = random_unit(30, 16, seed=5)
    vecs[9] = vecs[2]
    write_fake_embed_output(out / "embeddings", {"00000": vecs})
    foreign = ["embeddings.input_format=clip-retrieval", "embeddings.key_column=uid", "embeddings.chunk_rows=7"]
    cfg = load_config([f"input={tmp_path / 'unused'}", f"output={out}", "log_level=WARNING", *foreign])
    result = run(cfg, stages=("dedup",), echo=False)
    assert result["dedup"]["groups"] == 1 and result["dedup"]["samples"] == 30


def test_unknown_stage_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config([f"input={tmp_path}", f"output={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="unknown stage"):
        run(cfg, stages=("download", "upload"))


# ---- the lock ----------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(root: Path, pid: int, host: str | None = None) -> dict[str, Any]:
    info = {
        "pid": pid,
        "host": host or socket.gethostname(),
        "time": time.time() - 3600,
        "command": "run",
        "token": "theirs",
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / lk.LOCK_NAME).write_text(json.dumps(info))
    return info


def test_held_lock_blocks_a_run_with_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        info = _write_lock(out, holder.pid)
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.csv").write_text("url\nhttp://127.0.0.1:9/x.jpg\n")
        assert main(["run", f"input={src}", f"output={out}", "log_level=ERROR"]) == 2
        assert json.loads((out / lk.LOCK_NAME).read_text()) == info  # untouched
        assert not (out / "summary.json").exists() and not (out / "run.json").exists()
        assert not (out / "url_lists").exists()  # nothing was done
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_exclusive_within_a_process_and_released(tmp_path: Path) -> None:
    with lk.output_lock(str(tmp_path), "first") as held:
        assert held is not None
        content = json.loads((tmp_path / lk.LOCK_NAME).read_text())
        assert content["pid"] == os.getpid() and content["host"] == socket.gethostname()
        with pytest.raises(lk.LockHeld, match=f"pid {os.getpid()}"):
            lk.acquire(str(tmp_path), "second")
    assert not (tmp_path / lk.LOCK_NAME).exists()
    assert not [p for p in tmp_path.iterdir()]  # no temporary files left either


def test_stale_lock_is_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid())
    held = lk.acquire(str(tmp_path), "run")
    assert json.loads((tmp_path / lk.LOCK_NAME).read_text())["token"] == held.info["token"]
    held.release()
    assert not (tmp_path / lk.LOCK_NAME).exists()


def test_lock_of_another_host_is_never_stale(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid(), host="some-other-host")
    with pytest.raises(lk.LockHeld, match="some-other-host"):
        lk.acquire(str(tmp_path), "run")


def _race(root: str, barrier: Any, results: Any) -> None:
    barrier.wait()
    try:
        held = lk.acquire(root, "race")
        results.put("won")
        time.sleep(0.5)  # hold it while the others try
        held.release()
    except lk.LockHeld:
        results.put("held")


def test_racing_takeovers_of_a_stale_lock_admit_one_run(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid())
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["held", "held", "held", "won"]


# ---- scheduling files ----------------------------------------------------------------------------------------


def test_example_dataset_config_is_valid() -> None:
    cfg = load_config(config_file=REPO / "conf" / "dataset" / "example.yaml")
    assert cfg.input and cfg.output and cfg.download.incremental


class _FakeDAG:
    """The part of Airflow's DAG the example uses: a context manager that collects the operators made inside it."""

    current: list[_FakeDAG] = []

    def __init__(self, dag_id: str, **options: Any):
        self.dag_id, self.options, self.tasks = dag_id, options, []

    def __enter__(self) -> _FakeDAG:
        _FakeDAG.current.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _FakeDAG.current.pop()


class _FakeBashOperator:
    """Airflow's BashOperator as far as the example uses it: keywords, a DAG, and `a >> b` dependencies."""

    def __init__(self, task_id: str, bash_command: str, **options: Any):
        self.task_id, self.bash_command, self.options = task_id, bash_command, options
        self.downstream: list[_FakeBashOperator] = []
        _FakeDAG.current[-1].tasks.append(self)

    def __rshift__(self, other: _FakeBashOperator) -> _FakeBashOperator:
        self.downstream.append(other)
        return other


def _import_dag(monkeypatch: pytest.MonkeyPatch, airflow: str | None) -> Any:
    """Import jobs/airflow_dag.py afresh with a stand-in `airflow` package (Airflow 2 or 3 layout), or none."""
    import importlib.util
    import types

    layouts = {
        "3": {"airflow.sdk": "DAG", "airflow.providers.standard.operators.bash": "BashOperator"},
        "2": {"airflow": "DAG", "airflow.operators.bash": "BashOperator"},
    }
    fakes = {"DAG": _FakeDAG, "BashOperator": _FakeBashOperator}
    names = {n for layout in layouts.values() for m in layout for n in _parents(m)}
    for name in names:  # nothing of a real or earlier stand-in Airflow is visible
        monkeypatch.setitem(sys.modules, name, None)
    for module, attr in layouts.get(airflow or "", {}).items():
        for name in _parents(module):
            if sys.modules.get(name) is None:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        setattr(sys.modules[module], attr, fakes[attr])
    spec = importlib.util.spec_from_file_location("clipline_example_dag", REPO / "jobs" / "airflow_dag.py")
    assert spec and spec.loader
    dag_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dag_module)
    return dag_module


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@pytest.mark.parametrize("airflow", ["2", "3"])
def test_airflow_dag_runs_every_stage_in_order_then_the_report(
    airflow: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import shlex

    from pipeline.cli.main import _parser

    config, output, binary = tmp_path / "my conf.yaml", tmp_path / "out dir", tmp_path / "bin" / "clipline"
    monkeypatch.setenv("CLIPLINE_CONFIG", str(config))
    monkeypatch.setenv("CLIPLINE_OUTPUT", str(output))
    monkeypatch.setenv("CLIPLINE_BIN", str(binary))
    dag = _import_dag(monkeypatch, airflow).dag
    assert isinstance(dag, _FakeDAG) and dag.dag_id == "clipline_example"
    assert dag.options["max_active_runs"] == 1 and dag.options["catchup"] is False and dag.options["schedule"]
    assert [t.task_id for t in dag.tasks] == [*STAGES, "report"]
    for upstream, downstream in zip(dag.tasks, dag.tasks[1:]):
        assert upstream.downstream == [downstream], upstream.task_id  # one chain, in the chain's order
    assert dag.tasks[-1].downstream == [] and dag.tasks[-1].options["trigger_rule"] == "all_done"
    for task in dag.tasks:
        argv = shlex.split(task.bash_command)  # quoted: the paths have spaces
        assert argv[0] == str(binary) and task.options["retries"] >= 1
        args = _parser().parse_args(argv[1:])  # a command line the real CLI accepts
        if task.task_id == "report":
            assert args.command == "report" and args.out_dir == str(output)
        else:
            assert args.command == "run" and args.stages == [task.task_id] and args.config == str(config)
            assert task.options["execution_timeout"].total_seconds() > 0
    assert dag.tasks[0].options["retries"] > dag.tasks[1].options["retries"]  # downloads meet flaky servers


def test_airflow_dag_without_airflow_defines_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLIPLINE_CONFIG", raising=False)
    module = _import_dag(monkeypatch, None)
    assert module.DAG is None and not hasattr(module, "dag")
    assert module.stage_command("embed").endswith("run --config /opt/clipline/conf/dataset/example.yaml --stage embed")


def test_crontab_example_runs_the_chain() -> None:
    lines = [
        ln
        for ln in (REPO / "jobs" / "crontab.example").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#") and "=" not in ln.split()[0]
    ]
    assert lines and all(len(ln.split()) > 5 and "clipline run" in ln for ln in lines)
