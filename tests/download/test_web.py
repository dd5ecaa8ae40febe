"""`clipline download` of a URL list full of the web's pathologies, served by misbehaving loopback servers: the job
ends within the timeout and retries, every URL has its row and its reason, and no file, link-local or (by default)
private address is ever opened, in img2dataset's multiprocessing workers and in Spark executors alike."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.download.layout import classify_error
from tests.support.helpers import jpeg_bytes
from tests.support.webservers import WebServer, jpeg_claiming, png_header, watched_fifo, web_server

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT, RETRIES, PER_SHARD = 1, 1, 25
NORMAL_WORK_S = 30.0  # generous room for 25 small URLs on a loaded machine: a hang would take forever
N_OK = 30


def _urls(web: WebServer, private: WebServer, fifo: Path, local: Path) -> list[tuple[str, str]]:
    """(url, expected outcome) for every URL of the list."""
    b, p = web.base, private.base
    bad = [
        (f"{b}/trickle", "timeout"),
        (f"{b}/trickle?again", "timeout"),
        (f"{b}/trickle-headers", "timeout"),
        (f"{b}/stall", "timeout"),
        (f"{b}/huge", "too large"),  # 1 GiB, declared
        (f"{b}/huge?declare=0", "too large"),  # 1 GiB, ended by closing
        (f"{b}/cut", "connection closed"),
        (f"{b}/status/404", "http 404"),
        (f"{b}/loop/0", "too many redirects"),
        (f"{b}/redirect?to={fifo.as_uri()}", "scheme refused"),
        (fifo.as_uri(), "scheme refused"),
        (local.as_uri(), "scheme refused"),  # a real JPEG: stored as a success before
        ("ftp://127.0.0.1/x.jpg", "scheme refused"),
        ("data:image/jpeg;base64,/9j/4AAQ", "scheme refused"),
        ("http://169.254.169.254/latest/meta-data/", "address refused"),
        ("http://[fe80::1]/x.jpg", "address refused"),
        (f"{p}/f/secret.jpg", "address refused"),
        (f"{b}/redirect?to={p}/f/secret.jpg", "address refused"),
        (f"{b}/f/bomb.png", "too many pixels"),
        (f"{b}/f/bomb.jpg", "too many pixels"),
    ]
    ok = [(f"{b}/f/{i:03d}.jpg", "success") for i in range(N_OK)]
    return [x for pair in zip(ok[: len(bad)], bad) for x in pair] + ok[len(bad) :]  # pathologies spread out


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("web")
    with web_server() as w, web_server(host="127.0.0.2") as private:
        for i in range(N_OK):
            w.files[f"{i:03d}.jpg"] = jpeg_bytes(i, (48 + i, 40))
        w.files["bomb.png"] = png_header(100_000, 100_000)
        w.files["bomb.jpg"] = jpeg_claiming(jpeg_bytes(99, (32, 32)), 40_000, 40_000)
        private.files["secret.jpg"] = jpeg_bytes(98, (32, 32))
        local = tmp / "local.jpg"
        local.write_bytes(jpeg_bytes(97, (32, 32)))
        with watched_fifo(tmp / "secret.jpg") as opened:
            expected = _urls(w, private, tmp / "secret.jpg", local)
            url_list = tmp / "urls.parquet"
            pq.write_table(pa.table({"url": [u for u, _ in expected], "caption": [o for _, o in expected]}), url_list)
            yield {
                "tmp": tmp,
                "server": w,
                "private": private,
                "opened": opened,
                "expected": dict(expected),
                "local": local,
                "argv": [
                    "download",
                    f"input={url_list}",
                    "download.processes_count=1",
                    "download.thread_count=8",
                    f"download.number_sample_per_shard={PER_SHARD}",
                    f"download.timeout={TIMEOUT}",
                    f"download.retries={RETRIES}",
                    "download.max_bytes=4194304",
                    "download.allow_networks=[127.0.0.1]",  # the test server, but not 127.0.0.2
                    "log_level=WARNING",
                ],
            }


def _download(web: dict[str, Any], out: Path, *extra: str) -> dict[str, Any]:
    """The CLI in a subprocess, so a hang fails the test (its timeout) instead of holding the suite."""
    cmd = [sys.executable, "-m", "pipeline.cli", *web["argv"], f"output={out}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((out / "_clipline" / "run.json").read_text())["summary"]  # type: ignore[no-any-return]


def _outcomes(out: Path) -> dict[str, list[str]]:
    rows = pa.concat_tables(pq.read_table(p, columns=["url", "status", "error_message"]) for p in out.glob("*.parquet"))
    got: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows.to_pylist():
        got[r["url"]].append("success" if r["status"] == "success" else classify_error(r["error_message"]))
    return got


@pytest.fixture(scope="module")
def local_run(web: dict[str, Any]) -> dict[str, Any]:
    out = web["tmp"] / "local"
    return {"out": out, "summary": _download(web, out)}


def _check_accounting(web: dict[str, Any], out: Path, summary: dict[str, Any]) -> None:
    got = _outcomes(out)
    assert {u: v for u, v in got.items()} == {u: [o] for u, o in web["expected"].items()}  # each URL once, its reason
    wanted = collections.Counter(o for o in web["expected"].values() if o != "success")
    assert summary["failures_by_reason"] == dict(wanted) and summary["unaccounted"] == 0
    assert summary["images_written"] == N_OK and summary["urls_in"] == len(web["expected"])
    assert web["opened"] == [], "a file: URL was opened"
    assert web["private"].connections == 0, "a refused private address was connected to"
    tar_bytes = b"".join(p.read_bytes() for p in sorted(out.glob("*.tar")))
    assert web["local"].read_bytes() not in tar_bytes
    with tarfile.open(sorted(out.glob("*.tar"))[0]) as t:
        assert all(m.name.endswith((".jpg", ".txt", ".json")) for m in t.getmembers())


def test_every_url_accounted_for_with_its_reason(web: dict[str, Any], local_run: dict[str, Any]) -> None:
    _check_accounting(web, local_run["out"], local_run["summary"])


def test_a_trickling_server_holds_no_shard_longer_than_its_timeouts(
    web: dict[str, Any], local_run: dict[str, Any]
) -> None:
    """Each shard's own clock (img2dataset's stats): at most timeout x (retries + 1) for its slow URLs, which run
    side by side in its threads, plus the normal work."""
    stats = [json.loads(p.read_text()) for p in sorted(local_run["out"].glob("*_stats.json"))]
    assert len(stats) == 2
    for s in stats:
        assert s["end_time"] - s["start_time"] < TIMEOUT * (RETRIES + 1) + NORMAL_WORK_S, s
    server: WebServer = web["server"]
    assert server.requests["/trickle"] == 2 * (RETRIES + 1)  # both trickling URLs, each tried twice
    assert server.requests["/status/404"] == 1  # a 404 is not worth a retry


def test_private_addresses_are_refused_by_default(tmp_path: Path) -> None:
    """Without download.allow_private_addresses (or allow_networks), a list on 127.0.0.1 is never connected to."""
    from pipeline.core.config import load_config
    from pipeline.download.stage import download

    with web_server() as w:
        w.files["a.jpg"] = jpeg_bytes(1, (32, 32))
        url_list = tmp_path / "urls.csv"
        url_list.write_text("url,caption\n" + "".join(f"{w.base}/f/a.jpg?{i},c\n" for i in range(5)))
        cfg = load_config([f"input={url_list}", f"output={tmp_path / 'out'}", "download.processes_count=1"])
        summary = download(cfg)
        assert w.connections == 0
    assert summary["failures_by_reason"] == {"address refused": 5} and summary["images_written"] == 0


@pytest.mark.spark
def test_spark_executors_fetch_under_the_same_rules(web: dict[str, Any], local_run: dict[str, Any]) -> None:
    out = web["tmp"] / "spark"
    summary = _download(web, out, "distributor=spark", "spark.master=local[2]")
    _check_accounting(web, out, summary)
