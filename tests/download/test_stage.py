"""Download stage and loopback server: img2dataset against 127.0.0.1, every URL accounted for, resume, config errors."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main as cli
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.download.layout import classify_error
from pipeline.download.stage import download, expected_shards, format_of
from pipeline.run.httpserver import LoopbackServer, serve_directory
from tests.support.helpers import jpeg_bytes

N_URLS = 220
PER_SHARD = 64


def _kind(i: int) -> str:
    """Which URLs are bad: 404s, HTML saved as .jpg, and empty bodies, spread over all shards."""
    if i % 20 == 3:
        return "404"
    if i % 20 == 11:
        return "html"
    if i == 50:
        return "empty"
    return "ok"


def _make_site(root: Path) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(N_URLS):
        kind, name = _kind(i), f"img_{i:04d}.jpg"
        if kind == "ok":
            (root / name).write_bytes(jpeg_bytes(i, size=(40 + i % 17, 32 + i % 13)))
        elif kind == "html":
            (root / name).write_text("<!DOCTYPE html><html><body>not here</body></html>")
        elif kind == "empty":
            (root / name).write_bytes(b"")
        names.append(name)
    return names


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A served folder, its URL list, and one completed download (the expensive part, shared by the tests)."""
    tmp = tmp_path_factory.mktemp("download")
    names = _make_site(tmp / "site")
    with serve_directory(tmp / "site") as base:
        urls = [f"{base}/{n}" for n in names]
        url_list = tmp / "urls.parquet"
        pq.write_table(
            pa.table({"url": urls, "caption": [f"caption of {n}" for n in names], "extra": list(range(N_URLS))}),
            url_list,
        )
        out = tmp / "shards"
        overrides = [
            f"input={url_list}",
            f"output={out}",
            "download.processes_count=1",
            "download.thread_count=16",
            f"download.number_sample_per_shard={PER_SHARD}",
            "download.timeout=5",
            "download.save_additional_columns=[extra]",
            "download.allow_private_addresses=true",  # the site is on 127.0.0.1
        ]
        summary = download(load_config(overrides))
        yield {
            "base": base,
            "urls": urls,
            "names": names,
            "out": out,
            "summary": summary,
            "overrides": overrides,
            "tmp": tmp,
        }


def test_server_404_and_files(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"abc")
    with serve_directory(tmp_path) as base:
        assert base.startswith("http://127.0.0.1:")
        assert urllib.request.urlopen(f"{base}/a.jpg", timeout=5).read() == b"abc"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/nope.jpg", timeout=5)
        assert e.value.code == 404
    with pytest.raises(urllib.error.URLError):  # shut down on exit
        urllib.request.urlopen(f"{base}/a.jpg", timeout=2)


def test_server_backlog_takes_many_concurrent_clients(tmp_path: Path) -> None:
    assert LoopbackServer.request_queue_size >= 1024
    (tmp_path / "x.bin").write_bytes(b"x" * 1000)
    results: list[int] = []
    lock = threading.Lock()

    def fetch() -> None:
        body = urllib.request.urlopen(f"{base}/x.bin", timeout=10).read()
        with lock:
            results.append(len(body))

    with serve_directory(tmp_path) as base:
        threads = [threading.Thread(target=fetch) for _ in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert results == [1000] * 200


def test_server_rejects_non_loopback(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        with serve_directory(tmp_path, host="0.0.0.0"):
            pass


@pytest.mark.slow
def test_every_url_accounted_for(site: dict[str, Any]) -> None:
    out: Path = site["out"]
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("*.parquet"))]).to_pylist()
    by_url = {r["url"]: r for r in rows}
    assert len(rows) == N_URLS and set(by_url) == set(site["urls"])  # each URL exactly once
    for i, url in enumerate(site["urls"]):
        r, kind = by_url[url], _kind(i)
        assert r["extra"] == i
        if kind == "ok":
            assert r["status"] == "success" and r["sha256"] and r["error_message"] is None, r
        else:
            assert r["status"] != "success" and r["error_message"], r
            assert classify_error(r["error_message"]) == ("http 404" if kind == "404" else "cannot decode image")
    s = site["summary"]
    n_bad = sum(_kind(i) != "ok" for i in range(N_URLS))
    n_404 = sum(_kind(i) == "404" for i in range(N_URLS))
    assert s["urls_in"] == N_URLS
    assert s["images_written"] == N_URLS - n_bad
    assert s["failed"] == n_bad and s["unaccounted"] == 0
    assert s["failures_by_reason"] == {"http 404": n_404, "cannot decode image": n_bad - n_404}
    assert s["shards"] == s["shards_written"] == 4 and s["shards_skipped"] == 0
    assert s["urls_per_second"] > 0


@pytest.mark.slow
def test_shards_are_webdataset_tars(site: dict[str, Any]) -> None:
    import webdataset as wds

    tars = sorted(site["out"].glob("*.tar"))
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(4)]
    with tarfile.open(tars[0]) as t:
        members = t.getnames()
    keys = {m.split(".")[0] for m in members}
    assert all({f"{k}.jpg", f"{k}.txt", f"{k}.json"} <= set(members) for k in keys)
    n = 0
    for sample in wds.WebDataset([str(p) for p in tars], shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        assert meta["status"] == "success" and meta["url"].endswith(".jpg")
        assert sample["txt"].decode() == "caption of " + meta["url"].rsplit("/", 1)[1]
        Image.open(io.BytesIO(sample["jpg"])).verify()
        n += 1
    assert n == site["summary"]["images_written"]


@pytest.mark.slow
def test_rerun_skips_completed_shards(site: dict[str, Any], capfd: pytest.CaptureFixture[str]) -> None:
    out: Path = site["out"]
    argv = ["download", *site["overrides"]]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli.main(argv) == 0  # everything done: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "_clipline"} == mtimes
    run = json.loads((out / "_clipline" / "run.json").read_text())
    assert not (out / "run.json").exists()  # img2dataset would take a top-level json for a shard's stats
    assert run["summary"]["shards_skipped"] == 4 and run["summary"]["shards_written"] == 0
    assert run["summary"]["images_written"] == site["summary"]["images_written"]

    # A shard without its stats file is unfinished: img2dataset's incremental mode redoes that one only.
    # The record sits beside the shards as earlier versions left it: moved out of img2dataset's way first.
    (out / "_clipline" / "run.json").rename(out / "run.json")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "00002_stats.json").unlink()
    assert cli.main(argv) == 0
    stdout = capfd.readouterr().out
    assert stdout.startswith("== download ==") and "Starting the downloading" not in stdout  # stdout: summary only
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    changed = {n for n in mtimes if after.get(n) != mtimes[n]}
    assert changed == {"00002.tar", "00002.parquet", "00002_stats.json", "run.json", "_clipline"}
    assert (out / "00002_stats.json").exists() and not (out / "_tmp").exists()
    assert not (out / "run.json").exists() and sorted(p.name for p in (out / "_clipline").iterdir()) == ["run.json"]
    run = json.loads((out / "_clipline" / "run.json").read_text())["summary"]
    assert run["shards_written"] == 1 and run["shards_skipped"] == 3 and run["unaccounted"] == 0
    assert run["images_written"] == site["summary"]["images_written"]


@pytest.mark.slow
def test_other_json_beside_the_shards_is_refused_before_img2dataset_runs(site: dict[str, Any]) -> None:
    out: Path = site["out"]
    (out / "notes.json").write_text("{}")
    stats = (out / "00001_stats.json").read_bytes()
    (out / "00001_stats.json").unlink()
    try:
        with pytest.raises(ConfigError, match=r"notes\.json, which img2dataset would take"):
            download(load_config(site["overrides"]))
        assert not (out / "_tmp").exists() and (out / "notes.json").exists()
    finally:
        (out / "notes.json").unlink()
        (out / "00001_stats.json").write_bytes(stats)


@pytest.mark.slow
@pytest.mark.spark
def test_spark_distributor_gives_same_accounting(site: dict[str, Any]) -> None:
    out = site["tmp"] / "spark_shards"
    overrides = [o for o in site["overrides"] if not o.startswith("output=")]
    summary = download(load_config(overrides + [f"output={out}", "distributor=spark", "spark.master=local[2]"]))
    for key in ("urls_in", "images_written", "failed", "failures_by_reason", "shards", "unaccounted"):
        assert summary[key] == site["summary"][key], key
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]


@pytest.mark.slow
def test_changed_shard_size_is_refused(site: dict[str, Any]) -> None:
    overrides = [o for o in site["overrides"] if "number_sample_per_shard" not in o]
    with pytest.raises(ConfigError, match="download.number_sample_per_shard"):
        download(load_config(overrides + ["download.number_sample_per_shard=50"]))


def _urls_csv(tmp_path: Path, header: str = "url,caption") -> Path:
    p = tmp_path / "urls.csv"
    p.write_text(header + "\nhttp://127.0.0.1:9/a.jpg,a cat\nhttp://127.0.0.1:9/b.jpg,a dog\n")
    return p


@pytest.mark.parametrize(
    "header, extra, key",
    [
        ("link,caption", [], "download.url_col"),
        ("url,text", [], "download.caption_col"),
        ("url,caption", ["download.save_additional_columns=[nope]"], "download.save_additional_columns"),
        ("url,caption", ["download.save_additional_columns=[status]"], "download.save_additional_columns"),
    ],
)
def test_bad_columns_fail_before_writing(tmp_path: Path, header: str, extra: list[str], key: str) -> None:
    out = tmp_path / "out"
    cfg = load_config([f"input={_urls_csv(tmp_path, header)}", f"output={out}", *extra])
    with pytest.raises(ConfigError, match=key):
        download(cfg)
    assert not out.exists()


def test_missing_input_fails_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="input"):
        download(load_config([f"input={tmp_path / 'nope.parquet'}", f"output={out}"]))
    with pytest.raises(ConfigError, match="input"):
        download(load_config([f"output={out}"]))
    with pytest.raises(ConfigError, match="output"):
        download(load_config([f"input={_urls_csv(tmp_path)}"]))
    assert cli.main(["download", f"input={tmp_path / 'nope.csv'}", f"output={out}"]) == 2
    assert not out.exists()


def test_unknown_extension_needs_input_format(tmp_path: Path) -> None:
    p = tmp_path / "urls.list"
    p.write_text("url\nhttp://127.0.0.1:9/a.jpg\n")
    with pytest.raises(ConfigError, match="download.input_format"):
        download(load_config([f"input={p}", f"output={tmp_path / 'o'}"]))


def test_txt_list_ignores_caption_column(tmp_path: Path) -> None:
    from pipeline.download.stage import plan_input

    p = tmp_path / "urls.txt"
    p.write_text("http://127.0.0.1:9/a.jpg\nhttp://127.0.0.1:9/b.jpg\nhttp://127.0.0.1:9/c.jpg\n")
    plan = plan_input(load_config([f"input={p}", f"output={tmp_path / 'o'}"]))
    assert plan.urls_in == 3 and plan.caption_col is None and plan.input_format == "txt"


def test_formats_and_row_counts(tmp_path: Path) -> None:
    from pipeline.download.stage import plan_input

    rows = [{"url": f"http://h/{i}.jpg", "caption": f"c{i}"} for i in range(7)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.tsv").write_text("url\tcaption\n" + "".join(f"{r['url']}\t{r['caption']}\n" for r in rows))
    for name in ("a.jsonl", "a.tsv"):
        plan = plan_input(load_config([f"input={tmp_path / name}", f"output={tmp_path / 'o'}"]))
        assert plan.urls_in == 7 and plan.input_format == name.split(".")[1]
    folder = tmp_path / "lists"
    folder.mkdir()
    for i in range(3):
        pq.write_table(pa.table({"url": ["u"] * (5 + i), "caption": ["c"] * (5 + i)}), folder / f"{i}.parquet")
    plan = plan_input(load_config([f"input={folder}", f"output={tmp_path / 'o'}"]))
    assert plan.rows_per_file == [5, 6, 7] and plan.input_format == "parquet"


def test_run_record_of_a_download_output_is_out_of_img2datasets_glob(tmp_path: Path) -> None:
    from pipeline.core.runinfo import find_record, read_record, record_path

    out = str(tmp_path / "o")
    assert record_path(out, "download") == f"{out}/_clipline/run.json"
    assert record_path(out + "/", "embed") == record_path(out, "run") == f"{out}/run.json"
    assert find_record(out) is None and read_record(out) is None
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text('{"command": "embed"}')  # every other command, or an old download
    assert find_record(out) == f"{out}/run.json" and read_record(out) == {"command": "embed"}
    (tmp_path / "o" / "_clipline").mkdir()
    (tmp_path / "o" / "_clipline" / "run.json").write_text('{"command": "download"}')
    assert find_record(out) == f"{out}/_clipline/run.json" and read_record(out) == {"command": "download"}


def test_expected_shards_numbered_like_img2dataset() -> None:
    assert expected_shards([10], 4) == {0: 4, 1: 4, 2: 2}
    assert expected_shards([5, 3], 4) == {0: 4, 1: 1, 2: 3}  # each file starts a new shard
    assert expected_shards([0], 4) == {}


def test_classify_error() -> None:
    assert classify_error("HTTP Error 404: File not found") == "http 404"
    assert classify_error("HTTP Error 503: Service Unavailable") == "http 503"
    assert classify_error("<urlopen error timed out>") == "timeout"
    assert classify_error("The read operation timed out") == "timeout"
    assert classify_error("Image decoding error") == "cannot decode image"
    assert classify_error("<urlopen error [Errno 111] Connection refused>") == "connection refused"
    assert classify_error("image too small") == "image too small"
    assert classify_error("something odd").startswith("other: something odd")
    # clipline's fetch step: checked before the older rules, whose needles ("timeout") appear inside them
    assert classify_error("shard deadline passed: download.shard_timeout (90s) ran out") == "shard timeout"
    assert classify_error("too many pixels: header claims 9x9 = 81 > download.max_pixels 80") == "too many pixels"
    assert classify_error("scheme refused: file (only http, https are fetched)") == "scheme refused"
    assert classify_error("address refused: a.example resolves to 10.0.0.1 is a private ...") == "address refused"
    assert classify_error("response too large: more than 16 bytes (stopped reading there)") == "too large"
    assert classify_error("cannot identify image: UnidentifiedImageError: ...") == "cannot decode image"
    assert format_of("s3://b/x.CSV.gz") == "csv.gz" and format_of("x.jsonl") == "jsonl"
    assert format_of("x.json") == "json" and format_of("x.bin") is None


def test_img2dataset_kwargs(tmp_path: Path) -> None:
    from pipeline.download.stage import img2dataset_kwargs, plan_input

    base = [f"input={_urls_csv(tmp_path)}", f"output={tmp_path / 'o'}"]
    cfg = load_config(base)
    kw = img2dataset_kwargs(cfg, plan_input(cfg))
    assert kw["distributor"] == "multiprocessing" and kw["incremental_mode"] == "incremental"
    assert kw["max_aspect_ratio"] == float("inf") and kw["input_format"] == "csv"
    assert kw["enable_wandb"] is False and kw["compute_hash"] == "sha256" and kw["caption_col"] == "caption"
    cfg = load_config(
        base
        + [
            "distributor=spark",
            "download.incremental=false",
            "download.max_aspect_ratio=3",
            "download.caption_col=null",
            "download.resize_mode=center_crop",
        ]
    )
    kw = img2dataset_kwargs(cfg, plan_input(cfg))
    assert kw["distributor"] == "pyspark" and kw["incremental_mode"] == "overwrite"
    assert kw["max_aspect_ratio"] == 3 and kw["caption_col"] is None and kw["resize_mode"] == "center_crop"
