"""Kill and resume for `clipline download`: SIGKILL the whole job (driver, img2dataset pool, logger) mid-run,
re-run it, and check every URL is accounted for exactly once, as in an uninterrupted run, with nothing left over.

What a SIGKILL leaves (observed with img2dataset 1.47): `_tmp/` holding one `{shard}.feather` slice of the URL
list per shard not yet done; for shards being downloaded, `{shard}.tar` and `{shard}.parquet` written in place
(partial, the parquet often without its footer) and no `{shard}_stats.json`; finished shards complete with
their stats file. The re-run's incremental mode redoes exactly the shards without a stats file, overwriting
their tar/parquet in place, and removes `_tmp/` at the end.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as cli
from pipeline.run.httpserver import serve_directory
from tests.support.helpers import jpeg_bytes

pytestmark = pytest.mark.slow

N_URLS = 300
PER_SHARD = 50
N_SHARDS = N_URLS // PER_SHARD
REPO = Path(__file__).resolve().parents[2]
SHARD_FILE = ("{:05d}.tar", "{:05d}.parquet", "{:05d}_stats.json")


def _kind(i: int) -> str:
    if i % 10 == 7:
        return "404"
    if i % 37 == 5:
        return "html"
    return "ok"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A served folder of generated images (some missing, some HTML), its URL list, and the job's command line."""
    tmp = tmp_path_factory.mktemp("dl_reliability")
    root = tmp / "site"
    root.mkdir()
    names = [f"img_{i:04d}.jpg" for i in range(N_URLS)]
    for i, name in enumerate(names):
        if _kind(i) == "ok":
            (root / name).write_bytes(jpeg_bytes(i, size=(24 + i % 11, 20 + i % 7)))
        elif _kind(i) == "html":
            (root / name).write_text("<html><body>moved</body></html>")
    with serve_directory(root) as base:
        urls = [f"{base}/{n}" for n in names]
        url_list = tmp / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"caption {n}" for n in names]}), url_list)
        argv = [
            "download",
            f"input={url_list}",
            "download.processes_count=1",
            "download.thread_count=16",
            f"download.number_sample_per_shard={PER_SHARD}",
            "download.timeout=5",
            "download.allow_private_addresses=true",  # the site is on 127.0.0.1
            "log_level=WARNING",
        ]
        yield {"tmp": tmp, "urls": urls, "argv": argv}


def _command(site: dict[str, Any], out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", *site["argv"], f"output={out}"]


def _run(site: dict[str, Any], out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(site, out), capture_output=True, text=True, cwd=REPO, timeout=600)


class Reference:
    """An uninterrupted run of the same job, started in the background and awaited when first needed."""

    def __init__(self, site: dict[str, Any]):
        self.out = site["tmp"] / "reference"
        self.proc = subprocess.Popen(
            _command(site, self.out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        self.err: str | None = None

    def path(self) -> Path:
        if self.err is None:
            _, self.err = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, self.err[-3000:]
        return self.out


@pytest.fixture(scope="module")
def reference(site: dict[str, Any]) -> Iterator[Reference]:
    ref = Reference(site)
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


def _rows(out: Path) -> list[dict[str, Any]]:
    tables = [pq.read_table(p, columns=["key", "url", "status"]) for p in sorted(out.glob("*.parquet"))]
    return pa.concat_tables(tables).to_pylist() if tables else []


def _success_keys(out: Path) -> set[str]:
    return {r["key"] for r in _rows(out) if r["status"] == "success"}


def _state(out: Path) -> dict[str, Any]:
    """What a kill left: files at the top level and in _tmp/, with sizes."""
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()} if out.exists() else {}
    tmp = sorted(p.name for p in (out / "_tmp").iterdir()) if (out / "_tmp").exists() else None
    return {"files": files, "_tmp": tmp}


def _wait_for(out: Path, pattern: str, count: int, proc: subprocess.Popen[bytes], deadline_s: float = 300) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end and proc.poll() is None:
        if out.exists() and len(list(out.glob(pattern))) >= count:
            return
        time.sleep(0.02)


# seed -> (what must appear before the kill, how many); the kill then comes after a seeded random delay
KILL_POINTS = {1: ("*.tar", 1), 2: ("*_stats.json", 2)}


@pytest.mark.parametrize("seed", sorted(KILL_POINTS))
def test_sigkill_then_rerun_accounts_for_every_url_once(seed: int, site: dict[str, Any], reference: Reference) -> None:
    out = site["tmp"] / f"killed_{seed}"
    rng = random.Random(seed)
    pattern, count = KILL_POINTS[seed]
    proc = subprocess.Popen(
        _command(site, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True
    )
    try:
        _wait_for(out, pattern, count, proc)
        time.sleep(rng.uniform(0.0, 0.2))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # driver, img2dataset's pool and its logger process at once
        proc.wait()
    left = _state(out)
    done = {n for n in left["files"] if n.endswith("_stats.json")}
    assert len(done) < N_SHARDS, f"the kill came after the job finished: {left}"

    r = _run(site, out)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "_clipline" / "run.json").read_text())["summary"]
    assert summary["unaccounted"] == 0 and summary["shards"] == N_SHARDS
    assert summary["shards_skipped"] == len(done) and summary["shards_written"] == N_SHARDS - len(done)

    rows = _rows(out)
    counts = collections.Counter(r["url"] for r in rows)
    assert set(counts) == set(site["urls"]) and set(counts.values()) == {1}, "each URL exactly once"
    assert _success_keys(out) == _success_keys(reference.path())
    # Each tar holds exactly its parquet's successful samples: no stale content from the killed attempt.
    for s in range(N_SHARDS):
        with tarfile.open(out / f"{s:05d}.tar") as t:
            tar_keys = {m.split(".")[0] for m in t.getnames()}
        shard_rows = pq.read_table(out / f"{s:05d}.parquet", columns=["key", "status"]).to_pylist()
        assert tar_keys == {x["key"] for x in shard_rows if x["status"] == "success"}, s
    expected = {f.format(s) for s in range(N_SHARDS) for f in SHARD_FILE} | {"_clipline"}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected), f"leftovers; the kill left {left}"


def _copy(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest)
    return dest


def test_rerun_after_a_kill_mid_stats_write_completes(
    site: dict[str, Any], reference: Reference, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _copy(reference.path(), site["tmp"] / "torn_stats")
    (out / "00002_stats.json").write_text("")  # what a kill between open('w') and the flush leaves
    assert cli.main([*site["argv"], f"output={out}"]) == 0, capsys.readouterr().err[-2000:]
    assert json.loads((out / "00002_stats.json").read_text())["count"] == PER_SHARD
    assert _success_keys(out) == _success_keys(reference.path())


def test_rerun_after_a_kill_at_the_very_end_cleans_up(site: dict[str, Any], reference: Reference) -> None:
    out = _copy(reference.path(), site["tmp"] / "killed_at_end")
    (out / "_tmp").mkdir()
    (out / "_tmp" / "5.feather").write_bytes(b"slice of the URL list")
    # An earlier version killed while img2dataset ran left its run record set aside in .clipline_aside/.
    (out / ".clipline_aside").mkdir()
    (out / "_clipline" / "run.json").rename(out / ".clipline_aside" / "run.json")
    (out / "_clipline").rmdir()
    assert cli.main([*site["argv"], f"output={out}"]) == 0
    assert not (out / "_tmp").exists() and not (out / ".clipline_aside").exists()
    assert json.loads((out / "_clipline" / "run.json").read_text())["summary"]["shards_skipped"] == N_SHARDS
    assert _success_keys(out) == _success_keys(reference.path())
